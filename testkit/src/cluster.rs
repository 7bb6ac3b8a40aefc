//! [`NetnsCluster`], the handle of a running cluster: bringing it up (with its Slurm, if asked),
//! adopting one another process started, looking at its hosts, stopping and starting their
//! daemons, running Slurm's commands, and tearing it all down, on request or when the handle is
//! dropped.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use snowflock_control::error_chain;

use crate::command::{IP_TIMEOUT, ip};
use crate::error::{
    HostError, ImpairCountsError, ImpairError, LinkError, LoadError, MangleCountsError,
    MangleError, MtuError, NoSuchHost, SaveRecordError, SlurmCommandError, StartDaemonError,
    StopDaemonError, TeardownError, TeardownFailure, UpError,
};
use crate::impair::ImpairmentCounts;
use crate::mangle::{MangleCounts, Mangler};
use crate::process::{self, Daemon, KILL_TIMEOUT, StopFailure};
use crate::record::{ClusterRecord, HostInfo, HostStatus, STATE_FILE};
use crate::spec::{ClusterSpec, DEFAULT_READY_TIMEOUT, DEFAULT_STOP_TIMEOUT, UpProgress};
use crate::{files, impair, netns, network, slurm};

/// Lines of a daemon's log quoted in errors.
const LOG_TAIL_LINES: usize = 20;

/// A running cluster, owned by this process.
///
/// Dropping it tears it down like [`NetnsCluster::down`] (printing failures to stderr) unless it
/// was [detached](NetnsCluster::detach). Host indices in this API are positions in
/// [`NetnsCluster::hosts`]: index 0 is `h1`.
#[derive(Debug)]
pub struct NetnsCluster {
    record: ClusterRecord,
    /// One slot per host; `None` when no daemon runs (not started yet, or stopped).
    daemons: Vec<Option<Daemon>>,
    /// One slot per Slurm daemon of the record (none without Slurm); `None` when it does not
    /// run.
    slurm_daemons: Vec<Option<Daemon>>,
    /// Namespaces this handle must delete: those it created, or for a loaded cluster every
    /// namespace of its prefix.
    namespaces: Vec<String>,
    ready_timeout: Duration,
    stop_timeout: Duration,
    /// The switch's duplication and corruption, while on.
    mangler: Option<Mangler>,
    /// Torn down or detached: Drop has nothing to do.
    finished: bool,
}

impl NetnsCluster {
    /// Builds and starts a cluster as described in the [crate documentation](crate).
    ///
    /// Nothing is created if the spec is invalid, the prefix is in use, or `DIR/cluster.json`
    /// exists. After that, any failure tears down everything created so far before the error
    /// is returned.
    pub fn up(spec: ClusterSpec) -> Result<NetnsCluster, UpError> {
        let record = spec.checked_record()?;
        let slurm_programs = match spec.slurm {
            true => Some(slurm::Programs::find()?),
            false => None,
        };
        claim(&record)?;

        // From here on, dropping `cluster` undoes whatever was done.
        let mut cluster = NetnsCluster {
            daemons: record.hosts.iter().map(|_| None).collect(),
            slurm_daemons: record
                .slurm
                .iter()
                .flat_map(|s| &s.daemons)
                .map(|_| None)
                .collect(),
            record,
            namespaces: Vec::new(),
            ready_timeout: spec.ready_timeout,
            stop_timeout: spec.stop_timeout,
            mangler: None,
            finished: false,
        };
        let progress = spec.progress.as_ref();
        let hosts = cluster.record.hosts.len();
        // Claim the state file first, so that `sf cluster down --dir` can always clean up.
        cluster.record.save()?;
        files::write(
            &cluster.record,
            &spec.limits(),
            &spec.mcdist,
            spec.metrics_port,
        )?;
        UpProgress::step(
            progress,
            &format!("building {hosts} host namespaces and the switch"),
        );
        network::build(&cluster.record, &mut cluster.namespaces)?;
        if let Some(programs) = &slurm_programs {
            UpProgress::step(progress, "starting Slurm (munged, slurmctld, slurmds)");
            // Before the daemons, which allocate from it as soon as they run.
            slurm::start(
                &mut cluster.record,
                &mut cluster.slurm_daemons,
                programs,
                spec.slurm_node_cpus(),
            )?;
        }
        UpProgress::step(progress, &format!("starting {hosts} daemons"));
        for i in 0..cluster.record.hosts.len() {
            cluster.spawn(i)?;
        }
        cluster.record.save()?;
        let all: Vec<usize> = (0..cluster.record.hosts.len()).collect();
        cluster.wait_ready(&all, cluster.ready_timeout, progress)?;
        Ok(cluster)
    }

    /// Takes charge of the cluster described by `DIR/cluster.json` (started by another
    /// process, e.g. `sf cluster up`). Daemons still running (Slurm's too) are adopted through
    /// pidfds; the namespaces to delete are every existing `{prefix}-sw` / `{prefix}-h{N}`.
    ///
    /// The returned handle tears the cluster down when dropped; use [`ClusterRecord::load`]
    /// to only look.
    pub fn load(dir: &Path) -> Result<NetnsCluster, LoadError> {
        let record = ClusterRecord::load(dir)?;
        let mut daemons = Vec::with_capacity(record.hosts.len());
        for host in &record.hosts {
            let daemon = match host.pid {
                Some(pid) => {
                    Daemon::adopt(pid, &host.config).map_err(|source| LoadError::Watch {
                        host: host.name.clone(),
                        source,
                    })?
                }
                None => None,
            };
            daemons.push(daemon);
        }
        let slurm_daemons = match &record.slurm {
            Some(slurm) => slurm::adopt(slurm)?,
            None => Vec::new(),
        };
        let mut namespaces =
            netns::list(&record.prefix).map_err(|source| LoadError::ListNamespaces { source })?;
        // Creation order (switch first): teardown walks it backwards, hosts before the switch.
        namespaces.sort_by_key(|name| !name.ends_with("-sw"));
        Ok(NetnsCluster {
            record,
            daemons,
            slurm_daemons,
            namespaces,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            mangler: None,
            finished: false,
        })
    }

    /// The hosts, `h1` first.
    pub fn hosts(&self) -> &[HostInfo] {
        &self.record.hosts
    }

    /// Host `index` (0 is `h1`).
    pub fn host(&self, index: usize) -> Result<&HostInfo, NoSuchHost> {
        self.record.hosts.get(index).ok_or(NoSuchHost {
            index,
            hosts: self.record.hosts.len(),
        })
    }

    /// The prefix of every namespace and link name.
    pub fn prefix(&self) -> &str {
        &self.record.prefix
    }

    /// The switch namespace, `{prefix}-sw`.
    pub fn switch_netns(&self) -> &str {
        &self.record.switch
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.record.dir
    }

    /// The cluster key file.
    pub fn key_file(&self) -> &Path {
        &self.record.key_file
    }

    /// What `cluster.json` holds.
    pub fn record(&self) -> &ClusterRecord {
        &self.record
    }

    /// Which daemons are alive and accepting connections.
    pub fn status(&self) -> Vec<HostStatus> {
        self.record.status()
    }

    /// The configuration of the cluster's Slurm (`DIR/slurm/slurm.conf`), `None` if it runs
    /// none. Slurm's commands find the cluster with `SLURM_CONF` set to it, run inside a
    /// host's namespace.
    pub fn slurm_conf(&self) -> Option<&Path> {
        self.record.slurm.as_ref().map(|slurm| slurm.conf.as_path())
    }

    /// Runs the Slurm command `program` (`squeue`, `sinfo`, `sbatch`, `salloc`, `scancel`,
    /// `scontrol`, ...) with `args` in `h1`'s namespace against the cluster's Slurm
    /// (`SLURM_CONF` set, the caller's own Slurm variables removed), killing it after
    /// [`IP_TIMEOUT`]. Returns how it ended and what it printed, whatever its exit status.
    pub fn slurm(&self, program: &str, args: &[&str]) -> Result<Output, SlurmCommandError> {
        let slurm = self
            .record
            .slurm
            .as_ref()
            .ok_or_else(|| SlurmCommandError::NoSlurm {
                prefix: self.record.prefix.clone(),
            })?;
        Ok(slurm::run(
            &self.record.hosts[0],
            slurm,
            program,
            args,
            IP_TIMEOUT,
        )?)
    }

    /// SIGKILLs host `index`'s daemon and waits up to [`KILL_TIMEOUT`] for it to die (for
    /// failure tests). The namespace stays; [`NetnsCluster::start_host`] brings the host back.
    /// A host with no running daemon is left as it is.
    pub fn kill_host(&mut self, index: usize) -> Result<(), HostError> {
        self.host(index)?;
        let result = self.stop(&[index], Duration::ZERO).into_iter().next();
        self.forget(index)?;
        result.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Stops host `index`'s daemon: SIGTERM, up to the stop timeout, then SIGKILL and up to
    /// [`KILL_TIMEOUT`]. The namespace stays; [`NetnsCluster::start_host`] brings the host back.
    pub fn stop_host(&mut self, index: usize) -> Result<(), HostError> {
        self.host(index)?;
        let result = self.stop(&[index], self.stop_timeout).into_iter().next();
        self.forget(index)?;
        result.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Starts host `index`'s daemon again (same configuration, log appended) and waits up to
    /// the ready timeout for its socket. Fails if it is running.
    pub fn start_host(&mut self, index: usize) -> Result<(), HostError> {
        let host = self.host(index)?.clone();
        if let Some(daemon) = self.daemons[index].as_mut() {
            let running = daemon
                .exit_status()
                .map_err(|source| StartDaemonError::Watch {
                    host: host.name.clone(),
                    source,
                })?;
            if running.is_none() {
                return Err(HostError::AlreadyRunning {
                    host: host.name,
                    pid: daemon.pid(),
                });
            }
        }
        self.spawn(index)?;
        self.record.save()?;
        self.wait_ready(&[index], self.ready_timeout, None)?;
        Ok(())
    }

    /// Makes the switch lose `loss_percent`% of the UDP datagrams (mcdist's traffic) it
    /// forwards to each host and hold back another `reorder_percent`% behind the rest (a
    /// 200 Mbit/s class with a one-packet burst and a long queue, so later packets overtake
    /// them but none is lost), replacing
    /// any earlier impairment; 0 and 0 removes it. TCP (the control protocol, the memory
    /// server) is left alone. Built from an HTB root and a classic-BPF classifier drawing a
    /// random number per packet, because kernels without netem (`CONFIG_NET_SCH_NETEM`) are
    /// common; it needs only `tc` and the HTB and BPF classifier built in.
    pub fn impair(&self, loss_percent: u32, reorder_percent: u32) -> Result<(), ImpairError> {
        impair::apply(&self.record, loss_percent, reorder_percent)
    }

    /// What the impaired switch did since [`Self::impair`]: packets lost, held back, and held
    /// back but dropped for lack of room (0 unless the impairment lost more than it was told).
    pub fn impairment_counts(&self) -> Result<ImpairmentCounts, ImpairCountsError> {
        impair::counts(&self.record)
    }

    /// Makes the switch send `duplicate_percent`% of the UDP datagrams (mcdist's traffic) it
    /// forwards to each host twice, and flip one bit in the payload of `corrupt_percent`% of
    /// them with the UDP checksum updated to match (so only the receiver's authentication can
    /// tell), replacing any earlier mangling; 0 and 0 removes it. TCP is left alone. Runs
    /// before [`Self::impair`]'s loss and reordering, which apply to the duplicates too. An
    /// eBPF program on each switch port's egress, attached by this handle: it goes when the
    /// handle does (or the process ends).
    pub fn mangle(
        &mut self,
        duplicate_percent: u32,
        corrupt_percent: u32,
    ) -> Result<(), MangleError> {
        self.mangler = None;
        if duplicate_percent > 0 || corrupt_percent > 0 {
            self.mangler = Some(Mangler::attach(
                &self.record,
                duplicate_percent,
                corrupt_percent,
            )?);
        }
        Ok(())
    }

    /// What the switch's mangling did since [`Self::mangle`] (all 0 when it is off).
    pub fn mangle_counts(&self) -> Result<MangleCounts, MangleCountsError> {
        self.mangler
            .as_ref()
            .map_or(Ok(MangleCounts::default()), Mangler::counts)
    }

    /// Takes host `index`'s switch port down (`up` false: the host is cut off the network,
    /// its daemon keeps running) or brings it back up.
    pub fn set_link(&self, index: usize, up: bool) -> Result<(), LinkError> {
        let host = self.host(index)?;
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.record.switch, "link", "set", &host.netns, state]).map_err(|source| {
            LinkError::Command {
                host: host.name.clone(),
                state,
                source,
            }
        })?;
        Ok(())
    }

    /// Sets the MTU of every host's `eth0`, its switch port and the bridge (jumbo frames:
    /// up to 9000 on veth). Daemons keep the MTU they started with; set it before starting
    /// traffic that should use it.
    pub fn set_mtu(&self, mtu: u32) -> Result<(), MtuError> {
        network::set_mtu(&self.record, mtu)
    }

    /// Stops everything and removes what `up` created, as described in the
    /// [crate documentation](crate). Carries on past failures; returns them all.
    pub fn down(mut self) -> Result<(), TeardownError> {
        self.teardown()
    }

    /// Leaves the cluster running and gives up responsibility for it: the daemons, namespaces
    /// and files stay (`cluster.json` describes them) and Drop does nothing. Later,
    /// [`NetnsCluster::load`] + [`NetnsCluster::down`] (or `sf cluster down`) removes them.
    pub fn detach(mut self) -> ClusterRecord {
        self.finished = true;
        self.record.clone()
    }

    fn spawn(&mut self, index: usize) -> Result<(), StartDaemonError> {
        let host = &self.record.hosts[index];
        files::remove_if_present(&host.socket).map_err(|source| StartDaemonError::RemoveFile {
            path: host.socket.clone(),
            source,
        })?;
        let daemon =
            Daemon::spawn(host, &self.record.sfd, &self.record.log_filter).map_err(|source| {
                StartDaemonError::SpawnDaemon {
                    host: host.name.clone(),
                    source,
                }
            })?;
        self.record.hosts[index].pid = Some(daemon.pid());
        self.daemons[index] = Some(daemon);
        Ok(())
    }

    /// Waits until the sockets of hosts `which` accept a connection, failing early if one of
    /// their daemons exits; one deadline for all.
    fn wait_ready(
        &mut self,
        which: &[usize],
        timeout: Duration,
        progress: Option<&UpProgress>,
    ) -> Result<(), StartDaemonError> {
        let deadline = Instant::now() + timeout;
        let mut pending = which.to_vec();
        let mut reported = None;
        let mut pause = Duration::from_millis(5);
        loop {
            let mut still = Vec::new();
            for &i in &pending {
                let host = &self.record.hosts[i];
                if let Some(daemon) = self.daemons[i].as_mut() {
                    let ended = daemon
                        .exit_status()
                        .map_err(|source| StartDaemonError::Watch {
                            host: host.name.clone(),
                            source,
                        })?;
                    if let Some(status) = ended {
                        return Err(StartDaemonError::DaemonExited {
                            host: host.name.clone(),
                            status,
                            log: host.log.clone(),
                            tail: process::log_tail(&host.log, LOG_TAIL_LINES),
                        });
                    }
                }
                if UnixStream::connect(&host.socket).is_err() {
                    still.push(i);
                }
            }
            if reported != Some(still.len()) {
                reported = Some(still.len());
                let ready = which.len() - still.len();
                UpProgress::step(
                    progress,
                    &format!("{ready} of {} daemons ready", which.len()),
                );
            }
            let Some(&first) = still.first() else {
                return Ok(());
            };
            let now = Instant::now();
            if now >= deadline {
                let host = &self.record.hosts[first];
                return Err(StartDaemonError::DaemonNotReady {
                    host: host.name.clone(),
                    socket: host.socket.clone(),
                    waited: timeout,
                    log: host.log.clone(),
                    tail: process::log_tail(&host.log, LOG_TAIL_LINES),
                });
            }
            thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
            pending = still;
        }
    }

    /// Stops the daemons of hosts `which` (see [`process::stop`]). Returns the failures.
    fn stop(&mut self, which: &[usize], grace: Duration) -> Vec<StopDaemonError> {
        process::stop(&mut self.daemons, which, grace)
            .into_iter()
            .map(|failure| match failure {
                StopFailure::Signal { slot, pid, source } => StopDaemonError::Signal {
                    host: self.record.hosts[slot].name.clone(),
                    pid,
                    source,
                },
                StopFailure::Survived { slot, pid } => StopDaemonError::StillRunning {
                    host: self.record.hosts[slot].name.clone(),
                    pid,
                    waited: KILL_TIMEOUT,
                },
            })
            .collect()
    }

    /// Records that host `index` has no daemon (if it has none left).
    fn forget(&mut self, index: usize) -> Result<(), SaveRecordError> {
        if self.daemons[index].is_none() && self.record.hosts[index].pid.take().is_some() {
            self.record.save()?;
        }
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), TeardownError> {
        self.finished = true;
        self.mangler = None;
        let all: Vec<usize> = (0..self.record.hosts.len()).collect();
        let mut failures: Vec<TeardownFailure> = self
            .stop(&all, self.stop_timeout)
            .into_iter()
            .map(TeardownFailure::from)
            .collect();
        // After the daemons, which may still release their allocations on the way out.
        if let Some(slurm) = &self.record.slurm {
            failures.extend(
                slurm::stop(slurm, &mut self.slurm_daemons, self.stop_timeout)
                    .into_iter()
                    .map(TeardownFailure::from),
            );
        }
        let namespaces: Vec<String> = self.namespaces.drain(..).rev().collect();
        network::remove_namespaces(&namespaces, &mut failures);
        failures.extend(files::remove(&self.record));
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TeardownError {
                prefix: self.record.prefix.clone(),
                failures,
            })
        }
    }
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!(
                "snowflock cluster {}: {}",
                self.record.prefix,
                error_chain(&e)
            );
        }
    }
}

/// Checks that nothing of the cluster `record` describes exists yet (no namespace with its
/// prefix, no `cluster.json` in its directory), creating the directory if it is missing.
fn claim(record: &ClusterRecord) -> Result<(), UpError> {
    let taken = netns::list(&record.prefix).map_err(|source| UpError::ListNamespaces { source })?;
    if !taken.is_empty() {
        return Err(UpError::PrefixInUse {
            prefix: record.prefix.clone(),
            namespaces: taken,
        });
    }
    fs::create_dir_all(&record.dir).map_err(|source| UpError::CreateDir {
        path: record.dir.clone(),
        source,
    })?;
    let state = record.dir.join(STATE_FILE);
    if state.exists() {
        return Err(UpError::StateExists { path: state });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::record::MAX_HOSTS;

    #[test]
    fn invalid_specs_are_refused_before_anything_exists() {
        let dir = tempfile::tempdir().unwrap();
        let sfd = dir.path().join("sfd");
        fs::write(&sfd, "").unwrap();
        let state = dir.path().join("state");
        let check = |spec: ClusterSpec, needle: &str| {
            let err = NetnsCluster::up(spec).unwrap_err();
            assert!(matches!(err, UpError::InvalidSpec(_)), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
            assert!(!state.exists());
        };
        check(ClusterSpec::new(0, &state, &sfd), "0 hosts");
        check(ClusterSpec::new(MAX_HOSTS + 1, &state, &sfd), "33 hosts");
        check(
            ClusterSpec::new(1, &state, dir.path().join("nope")),
            "does not exist",
        );
        let mut spec = ClusterSpec::new(1, &state, &sfd);
        spec.prefix = Some("Bad".into());
        check(spec, "prefix");
        let mut spec = ClusterSpec::new(1, &state, &sfd);
        spec.clone_slots = 0;
        check(spec, "positive");
        check(
            ClusterSpec::new(1, state.join("x".repeat(100)), &sfd),
            "longer than",
        );
        let mut spec = ClusterSpec::new(1, state.join("with space"), &sfd);
        spec.slurm = true;
        check(spec, "slurm.conf cannot carry");
        // A directory whose `h1/sfd.sock` just fits, and `slurm/munge/munge.socket` does not.
        let fitting = 107 - state.as_os_str().len() - "/".len() - "/h1/sfd.sock".len();
        let mut spec = ClusterSpec::new(1, state.join("x".repeat(fitting)), &sfd);
        spec.slurm = true;
        check(spec, "munge.socket is longer than");
        let mut spec = ClusterSpec::new(1, &state, &sfd);
        spec.slurm_cpus = Some(0);
        check(spec, "positive");
        let mut spec = ClusterSpec::new(1, &state, &sfd);
        spec.slurm = true;
        spec.clone_slots = 70_000;
        check(spec, "at most 65535 CPUs");
    }
}
