//! A Slurm cluster on a cluster's hosts, run from the distribution's packages (Slurm 22.05 and
//! munge as Debian 12 ships them): its files under `DIR/slurm`, its daemons (munged and
//! slurmctld in `h1`'s namespace, a slurmd in every host's), the wait until every node is idle,
//! running Slurm's commands against it, and stopping it.
//!
//! Every daemon runs inside a cluster network namespace, so deleting the namespaces (which kills
//! whatever runs in them) stops it even when its pid is lost. Each also gets a UTS namespace of
//! its own with its host's name as hostname: slurmctld refuses to run on a host not named like
//! its `SlurmctldHost`, and a job step should see the name of the node it runs on.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use crate::command::{self, CommandError, IP_TIMEOUT};
use crate::error::{LoadError, RandomSourceError, StartSlurmError, StopSlurmError, UpError};
use crate::process::{self, Daemon, KILL_TIMEOUT, StopFailure};
use crate::record::{ClusterRecord, HostInfo, SlurmDaemonKind, SlurmRecord};

/// The Debian packages a cluster with Slurm needs.
pub(crate) const DEBIAN_PACKAGES: &str = "munge slurmctld slurmd slurm-client";
/// TCP port of slurmctld, on `h1`'s address.
pub const SLURMCTLD_PORT: u16 = 6817;
/// TCP port of every host's slurmd.
pub const SLURMD_PORT: u16 = 6818;
/// Bound on bringing a cluster's Slurm up: munged answering, slurmctld answering, every node
/// idle.
pub const SLURM_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The partition holding every node, the cluster's default.
pub const SLURM_PARTITION: &str = "snowflock";

/// Lines of each Slurm daemon's log quoted in errors.
const LOG_TAIL_LINES: usize = 15;
/// Bytes of munge key (munge's own `mungekey` draws 1024 bits; it accepts 32 to 1024 bytes).
const MUNGE_KEY_LEN: usize = 1024;
/// Environment variables of the caller that would steer a Slurm command elsewhere (another
/// cluster's job, another output format) when the caller itself runs inside a Slurm job or
/// under a user's defaults.
const INHERITED_SLURM_PREFIXES: [&str; 8] = [
    "SLURM_",
    "SALLOC_",
    "SBATCH_",
    "SRUN_",
    "SQUEUE_",
    "SINFO_",
    "SCANCEL_",
    "SCONTROL_",
];

/// The Slurm and munge programs, found before anything of a cluster exists.
#[derive(Debug)]
pub(crate) struct Programs {
    munged: PathBuf,
    slurmctld: PathBuf,
    slurmd: PathBuf,
    sinfo: PathBuf,
}

impl Programs {
    pub(crate) fn find() -> Result<Programs, StartSlurmError> {
        // Debian installs the Slurm daemons as `*-wlm`, behind alternatives symlinks.
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| command::find_program(name))
                .ok_or_else(|| StartSlurmError::MissingProgram {
                    program: names[0].to_owned(),
                })
        };
        Ok(Programs {
            munged: find(&["munged"])?,
            slurmctld: find(&["slurmctld", "slurmctld-wlm"])?,
            slurmd: find(&["slurmd", "slurmd-wlm"])?,
            sinfo: find(&["sinfo"])?,
        })
    }

    fn daemon(&self, kind: SlurmDaemonKind) -> &Path {
        match kind {
            SlurmDaemonKind::Munged => &self.munged,
            SlurmDaemonKind::Slurmctld => &self.slurmctld,
            SlurmDaemonKind::Slurmd => &self.slurmd,
        }
    }
}

/// Writes the Slurm files, starts the daemons (munged, then slurmctld, then every slurmd, each
/// stage once the previous one answers) recording their pids in `record` (saved after each
/// stage) and their handles in `daemons`, and waits until every node is idle; all within
/// [`SLURM_READY_TIMEOUT`]. Does nothing for a cluster without Slurm. On failure, whatever was
/// started stays in `daemons` for the caller's teardown.
pub(crate) fn start(
    record: &mut ClusterRecord,
    daemons: &mut [Option<Daemon>],
    programs: &Programs,
    cpus: u32,
) -> Result<(), UpError> {
    let Some(slurm) = record.slurm.clone() else {
        return Ok(());
    };
    let deadline = Instant::now() + SLURM_READY_TIMEOUT;
    write_files(record, &slurm, cpus)?;
    for kind in [
        SlurmDaemonKind::Munged,
        SlurmDaemonKind::Slurmctld,
        SlurmDaemonKind::Slurmd,
    ] {
        for (i, info) in slurm.daemons.iter().enumerate() {
            if info.kind != kind {
                continue;
            }
            let host = host_named(record, &info.host);
            let daemon =
                spawn(&slurm, i, host, programs).map_err(|source| StartSlurmError::Spawn {
                    daemon: info.label(),
                    source,
                })?;
            if let Some(entry) = record.slurm.as_mut() {
                entry.daemons[i].pid = Some(daemon.pid());
            }
            daemons[i] = Some(daemon);
        }
        record.save()?;
        let first = &record.hosts[0];
        wait_until(&slurm, daemons, deadline, |left| match kind {
            SlurmDaemonKind::Munged => UnixStream::connect(&slurm.munge_socket)
                .map(drop)
                .map_err(|e| format!("munged to accept connections on its socket ({e})")),
            SlurmDaemonKind::Slurmctld => sinfo(first, &slurm, programs, left)
                .map(drop)
                .map_err(|e| format!("slurmctld to answer (last sinfo: {e})")),
            SlurmDaemonKind::Slurmd => sinfo(first, &slurm, programs, left)
                .and_then(|nodes| all_idle(&record.hosts, &nodes))
                .map_err(|e| format!("every node to be idle (last sinfo: {e})")),
        })?;
    }
    Ok(())
}

/// Takes hold of the Slurm daemons of a cluster another process started (see
/// [`Daemon::adopt`]); one slot per daemon of the record, `None` for those gone.
pub(crate) fn adopt(slurm: &SlurmRecord) -> Result<Vec<Option<Daemon>>, LoadError> {
    slurm
        .daemons
        .iter()
        .map(|info| match info.pid {
            Some(pid) => Daemon::adopt(pid, slurm.identity(info.kind)).map_err(|source| {
                LoadError::WatchSlurm {
                    daemon: info.label(),
                    source,
                }
            }),
            None => Ok(None),
        })
        .collect()
}

/// Stops the Slurm daemons in `daemons` (slots as in `slurm.daemons`): the node daemons and
/// the controller first, then munged, which they need until they are gone; each group gets
/// SIGTERM, up to `grace`, then SIGKILL (see [`process::stop`]). Returns the failures.
pub(crate) fn stop(
    slurm: &SlurmRecord,
    daemons: &mut [Option<Daemon>],
    grace: Duration,
) -> Vec<StopSlurmError> {
    let (munged, others): (Vec<usize>, Vec<usize>) =
        (0..slurm.daemons.len()).partition(|&i| slurm.daemons[i].kind == SlurmDaemonKind::Munged);
    let mut failures = Vec::new();
    for which in [others, munged] {
        failures.extend(
            process::stop(daemons, &which, grace)
                .into_iter()
                .map(|failure| match failure {
                    StopFailure::Signal { slot, pid, source } => StopSlurmError::Signal {
                        daemon: slurm.daemons[slot].label(),
                        pid,
                        source,
                    },
                    StopFailure::Survived { slot, pid } => StopSlurmError::StillRunning {
                        daemon: slurm.daemons[slot].label(),
                        pid,
                        waited: KILL_TIMEOUT,
                    },
                }),
        );
    }
    failures
}

/// Runs `program ARGS...` in `host`'s namespace against the cluster's Slurm (`SLURM_CONF` set
/// to its configuration), killing it after `timeout`; returns how it ended and what it printed.
/// `program` is looked up like the daemons (`PATH`, then the system's bin directories).
pub(crate) fn run(
    host: &HostInfo,
    slurm: &SlurmRecord,
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<Output, CommandError> {
    let program = command::find_program(program).unwrap_or_else(|| PathBuf::from(program));
    let mut command = client_command(host, slurm, &program);
    command.args(args);
    command::output_bounded(&mut command, timeout)
}

/// `ip netns exec {host's netns} program` with `SLURM_CONF` naming the cluster's configuration
/// and none of the caller's Slurm variables.
fn client_command(host: &HostInfo, slurm: &SlurmRecord, program: &Path) -> Command {
    let mut command = host.command(program);
    let inherited = std::env::vars_os().map(|(name, _)| name).filter(|name| {
        let name = name.to_string_lossy();
        INHERITED_SLURM_PREFIXES.iter().any(|p| name.starts_with(p))
    });
    for name in inherited.collect::<Vec<OsString>>() {
        command.env_remove(name);
    }
    command.env("SLURM_CONF", &slurm.conf);
    command
}

/// `sinfo -h -N -o "%N %T"` in `host`'s namespace: one `NODE STATE` line per node. Errors are
/// described for the message of a failed wait.
fn sinfo(
    host: &HostInfo,
    slurm: &SlurmRecord,
    programs: &Programs,
    left: Duration,
) -> Result<String, String> {
    // Never past the deadline by more than a moment, never so short that sinfo cannot answer.
    let timeout = left.max(Duration::from_millis(200)).min(IP_TIMEOUT);
    let mut command = client_command(host, slurm, &programs.sinfo);
    command.args(["-h", "-N", "-o", "%N %T"]);
    match command::output_bounded(&mut command, timeout) {
        Ok(output) if output.status.success() => {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        }
        Ok(output) => Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether `sinfo` lists every host as an idle node; if not, which are not, and how they are.
fn all_idle(hosts: &[HostInfo], sinfo: &str) -> Result<(), String> {
    let states: HashMap<&str, &str> = sinfo
        .lines()
        .filter_map(|line| line.trim().split_once(' '))
        .collect();
    let busy: Vec<String> = hosts
        .iter()
        .filter_map(|host| match states.get(host.name.as_str()) {
            Some(&"idle") => None,
            Some(state) => Some(format!("{} {state}", host.name)),
            None => Some(format!("{} not listed", host.name)),
        })
        .collect();
    if busy.is_empty() {
        Ok(())
    } else {
        Err(busy.join(", "))
    }
}

/// Polls `missing` (given the time left; `Ok` when what is awaited is there, else a description
/// of what is missing) until it is `Ok`, failing early if a started daemon exits, and at
/// `deadline` with the last description and the tails of the daemons' logs.
fn wait_until(
    slurm: &SlurmRecord,
    daemons: &mut [Option<Daemon>],
    deadline: Instant,
    mut missing: impl FnMut(Duration) -> Result<(), String>,
) -> Result<(), StartSlurmError> {
    let mut pause = Duration::from_millis(20);
    loop {
        for (info, daemon) in slurm.daemons.iter().zip(daemons.iter_mut()) {
            let Some(daemon) = daemon else { continue };
            let ended = daemon
                .exit_status()
                .map_err(|source| StartSlurmError::Watch {
                    daemon: info.label(),
                    source,
                })?;
            if let Some(status) = ended {
                return Err(StartSlurmError::DaemonExited {
                    daemon: info.label(),
                    status,
                    log: info.log.clone(),
                    tail: process::log_tail(&info.log, LOG_TAIL_LINES),
                });
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let waiting_for = match missing(left) {
            Ok(()) => return Ok(()),
            Err(waiting_for) => waiting_for,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(StartSlurmError::NotReady {
                waited: SLURM_READY_TIMEOUT,
                waiting_for,
                logs: log_tails(slurm),
            });
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// The last lines of every Slurm daemon's log, each under a heading.
fn log_tails(slurm: &SlurmRecord) -> String {
    let mut text = String::new();
    for info in &slurm.daemons {
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "\nlast lines of {} ({}):\n{}",
            info.log.display(),
            info.label(),
            process::log_tail(&info.log, LOG_TAIL_LINES)
        );
    }
    text
}

/// The host named `name` (the record's Slurm daemons run on its hosts); `h1` if none is.
fn host_named<'a>(record: &'a ClusterRecord, name: &str) -> &'a HostInfo {
    record
        .hosts
        .iter()
        .find(|host| host.name == name)
        .unwrap_or(&record.hosts[0])
}

/// Starts daemon `index` of `slurm` in `host`'s namespaces, in the foreground of a session of
/// its own, logging to its log.
fn spawn(
    slurm: &SlurmRecord,
    index: usize,
    host: &HostInfo,
    programs: &Programs,
) -> io::Result<Daemon> {
    let info = &slurm.daemons[index];
    let mut command = host.command(programs.daemon(info.kind));
    match info.kind {
        SlurmDaemonKind::Munged => {
            let munge = munge_dir(slurm);
            // --force: munged refuses a socket below a directory that not everyone may enter,
            // which a private DIR is. The socket is given as an argument of its own so that
            // the command line names it whole (see `SlurmRecord::identity`). --origin: an
            // address, so munged does not look its hostname up.
            command
                .args(["--foreground", "--force", "--socket"])
                .arg(&slurm.munge_socket)
                .arg("--key-file")
                .arg(munge.join("munge.key"))
                .arg("--pid-file")
                .arg(munge.join("munged.pid"))
                .arg("--seed-file")
                .arg(munge.join("munged.seed"))
                .arg("--origin")
                .arg(host.address.to_string());
        }
        SlurmDaemonKind::Slurmctld => {
            command.arg("-D").arg("-f").arg(&slurm.conf);
        }
        SlurmDaemonKind::Slurmd => {
            command
                .arg("-D")
                .arg("-f")
                .arg(&slurm.conf)
                .args(["-N", &host.name]);
        }
    }
    let hostname = host.name.clone().into_bytes();
    // SAFETY: the closure only makes the unshare(2) and sethostname(2) system calls on memory
    // it owns, allocating nothing, as code running between fork and exec must.
    unsafe { command.pre_exec(move || own_hostname(&hostname)) };
    Daemon::start(command, &info.log)
}

/// Moves the calling process into a UTS namespace of its own named `hostname` (runs in the
/// forked child before exec; `ip netns exec` keeps it).
fn own_hostname(hostname: &[u8]) -> io::Result<()> {
    // SAFETY: unshare takes a flags word and touches no memory.
    if unsafe { libc::unshare(libc::CLONE_NEWUTS) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the pointer and length describe `hostname`, which outlives the call.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn munge_dir(slurm: &SlurmRecord) -> PathBuf {
    slurm.dir.join("munge")
}

fn state_dir(slurm: &SlurmRecord) -> PathBuf {
    slurm.dir.join("state")
}

/// Writes `DIR/slurm`: the directories, a fresh munge key, `slurm.conf` and `cgroup.conf`.
fn write_files(
    record: &ClusterRecord,
    slurm: &SlurmRecord,
    cpus: u32,
) -> Result<(), StartSlurmError> {
    // munged refuses a key directory others can write to; nobody else needs the key.
    let mut dirs = vec![
        (slurm.dir.clone(), 0o755),
        (munge_dir(slurm), 0o700),
        (state_dir(slurm), 0o755),
    ];
    dirs.extend(
        record
            .hosts
            .iter()
            .map(|host| (slurm.dir.join(&host.name), 0o755)),
    );
    for (path, mode) in dirs {
        DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&path)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(mode)))
            .map_err(|source| StartSlurmError::CreateDir { path, source })?;
    }

    let mut key = vec![0u8; MUNGE_KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| {
        StartSlurmError::MungeKey(RandomSourceError {
            problem: e.to_string(),
        })
    })?;
    let key_file = munge_dir(slurm).join("munge.key");
    write_file(&key_file, &key, 0o400)?;
    write_file(
        &slurm.conf,
        render_conf(record, slurm, cpus).as_bytes(),
        0o644,
    )?;
    write_file(
        &slurm.dir.join("cgroup.conf"),
        CGROUP_CONF.as_bytes(),
        0o644,
    )
}

/// Writes `contents` to a new file at `path` with permissions `mode` (replacing any file there).
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), StartSlurmError> {
    let write = || -> io::Result<()> {
        crate::files::remove_if_present(path)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(contents)
    };
    write().map_err(|source| StartSlurmError::WriteFile {
        path: path.to_path_buf(),
        source,
    })
}

/// `cgroup.conf`, read from beside `slurm.conf`.
const CGROUP_CONF: &str = "\
# slurmd loads a cgroup plugin even when nothing uses cgroups, and autodetecting the cgroup
# version fails where `ip netns exec` mounted a fresh /sys without /sys/fs/cgroup. The v1
# plugin loads without one; with proctrack/linuxproc and task/none nothing calls it.
CgroupPlugin=cgroup/v1
";

/// `slurm.conf` of the cluster `record`, its nodes declaring `cpus` CPUs each.
fn render_conf(record: &ClusterRecord, slurm: &SlurmRecord, cpus: u32) -> String {
    let dir = slurm.dir.display();
    let controller = &record.hosts[0];
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        text,
        "# The Slurm cluster of snowflock test cluster {}; removed when it goes down.",
        record.prefix
    );
    let _ = writeln!(text, "ClusterName={}", record.prefix);
    let _ = writeln!(
        text,
        "SlurmctldHost={}({})",
        controller.name, controller.address
    );
    let _ = writeln!(text, "SlurmctldPort={SLURMCTLD_PORT}");
    let _ = writeln!(text, "SlurmdPort={SLURMD_PORT}");
    let _ = writeln!(text, "SlurmUser=root");
    let _ = writeln!(text, "SlurmdUser=root");
    let _ = writeln!(text, "AuthType=auth/munge");
    let _ = writeln!(text, "CredType=cred/munge");
    let _ = writeln!(text, "AuthInfo=socket={}", slurm.munge_socket.display());
    let _ = writeln!(text, "StateSaveLocation={}", state_dir(slurm).display());
    let _ = writeln!(text, "SlurmctldPidFile={dir}/slurmctld.pid");
    let _ = writeln!(text, "SlurmdSpoolDir={dir}/%n");
    let _ = writeln!(text, "SlurmdPidFile={dir}/%n/slurmd.pid");
    text.push_str(
        "# No log files: each daemon logs to its stderr, which goes to its log in the same\n\
         # directory, so that what it says before it has read this file is kept too.\n\
         # Nothing goes to syslog.\n\
         SlurmctldSyslogDebug=quiet\n\
         SlurmdSyslogDebug=quiet\n\
         # No cgroups: processes are tracked through /proc and tasks are not confined.\n\
         ProctrackType=proctrack/linuxproc\n\
         TaskPlugin=task/none\n\
         JobAcctGatherType=jobacct_gather/none\n\
         SelectType=select/cons_tres\n\
         SelectTypeParameters=CR_CPU\n\
         # The nodes declare more CPUs than the machine has.\n\
         SlurmdParameters=config_overrides\n\
         ReturnToService=2\n\
         AccountingStorageType=accounting_storage/none\n\
         JobCompType=jobcomp/none\n\
         MpiDefault=none\n\
         # Without mail, slurmctld complains that the default mail program is missing.\n\
         MailProg=/bin/true\n",
    );
    for host in &record.hosts {
        let _ = writeln!(
            text,
            "NodeName={} NodeAddr={} CPUs={cpus}",
            host.name, host.address
        );
    }
    let _ = writeln!(
        text,
        "PartitionName={SLURM_PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ClusterRecord {
        ClusterRecord::new("sft", Path::new("/run/c"), 3, Path::new("/bin/sfd"), "info")
            .with_slurm()
    }

    #[test]
    fn the_configuration_names_every_node_and_keeps_everything_under_the_directory() {
        let record = record();
        let slurm = record.slurm.as_ref().unwrap();
        let text = render_conf(&record, slurm, 8);
        let settings: Vec<(&str, &str)> = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_once('='))
            .collect();
        let get = |key: &str| {
            settings
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no {key} in\n{text}"))
        };
        assert_eq!(get("ClusterName"), "sft");
        assert_eq!(get("SlurmctldHost"), "h1(10.77.0.1)");
        assert_eq!(get("AuthInfo"), "socket=/run/c/slurm/munge/munge.socket");
        assert_eq!(get("SlurmdSpoolDir"), "/run/c/slurm/%n");
        for key in ["StateSaveLocation", "SlurmctldPidFile", "SlurmdPidFile"] {
            assert!(get(key).starts_with("/run/c/slurm/"), "{key}");
        }
        let nodes: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("NodeName="))
            .collect();
        assert_eq!(
            nodes,
            [
                "NodeName=h1 NodeAddr=10.77.0.1 CPUs=8",
                "NodeName=h2 NodeAddr=10.77.0.2 CPUs=8",
                "NodeName=h3 NodeAddr=10.77.0.3 CPUs=8",
            ]
        );
        assert!(
            text.contains("PartitionName=snowflock Nodes=ALL Default=YES"),
            "{text}"
        );
    }

    #[test]
    fn only_every_node_idle_is_ready() {
        let record = record();
        assert_eq!(
            all_idle(&record.hosts, "h1 idle\nh2 idle\nh3 idle\n"),
            Ok(())
        );
        assert_eq!(
            all_idle(&record.hosts, "h1 idle\nh2 unknown\n"),
            Err("h2 unknown, h3 not listed".into())
        );
        assert_eq!(
            all_idle(&record.hosts, "h1 idle*\nh2 idle\nh3 idle\n"),
            Err("h1 idle*".into())
        );
    }

    #[test]
    fn daemons_run_in_their_hosts_namespaces_and_log_under_the_directory() {
        let record = record();
        let slurm = record.slurm.as_ref().unwrap();
        let kinds: Vec<(SlurmDaemonKind, &str)> = slurm
            .daemons
            .iter()
            .map(|d| (d.kind, d.host.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (SlurmDaemonKind::Munged, "h1"),
                (SlurmDaemonKind::Slurmctld, "h1"),
                (SlurmDaemonKind::Slurmd, "h1"),
                (SlurmDaemonKind::Slurmd, "h2"),
                (SlurmDaemonKind::Slurmd, "h3"),
            ]
        );
        assert!(slurm.daemons.iter().all(|d| d.log.starts_with(&slurm.dir)));
        assert_eq!(
            slurm.daemons[3].log,
            Path::new("/run/c/slurm/h2/slurmd.log")
        );
    }
}
