//! The record of a cluster: its hosts (names, namespaces, addresses, paths, daemon pids), its
//! Slurm daemons if it runs Slurm, and `cluster.json`, the file that holds them, so that another process can find, inspect and tear
//! down a cluster it did not start. Every name and path follows from the cluster's prefix and
//! directory; loading a record checks that they still do.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::command;
use crate::error::{LoadRecordError, SaveRecordError};
use crate::netns;
use crate::prefix::validate_prefix;
use crate::process::Daemon;

/// Most hosts a cluster may have (addresses `10.77.0.1..=32`).
pub const MAX_HOSTS: usize = 32;
/// TCP port of each host's inter-host control protocol.
pub const CONTROL_PORT: u16 = 7070;
/// TCP port of each host's memory server.
pub const PAGES_PORT: u16 = 7071;
/// The state file in a cluster's directory.
pub const STATE_FILE: &str = "cluster.json";
/// The cluster key file in a cluster's directory.
pub const KEY_FILE: &str = "cluster.key";

const STATE_FORMAT: &str = "snowflock-cluster";
const STATE_VERSION: u32 = 1;
const MAX_STATE_LEN: u64 = 1 << 20;

/// Address of host `i` (1-based).
pub fn host_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, u8::try_from(i).unwrap_or(u8::MAX))
}

/// One host of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// `h1`, `h2`, ...: the host's name in the cluster.
    pub name: String,
    /// Its network namespace, `{prefix}-h{i}`.
    pub netns: String,
    /// Its address on `eth0`, `10.77.0.{i}`.
    pub address: Ipv4Addr,
    /// Where its daemon serves the inter-host control protocol.
    pub control: SocketAddr,
    /// Where its daemon serves memory pages.
    pub pages: SocketAddr,
    /// The daemon's state directory, `DIR/h{i}`.
    pub state_dir: PathBuf,
    /// The daemon's configuration file, `DIR/h{i}/sfd.toml`.
    pub config: PathBuf,
    /// The daemon's local API socket, `DIR/h{i}/sfd.sock`.
    pub socket: PathBuf,
    /// The daemon's stdout and stderr, `DIR/h{i}/sfd.log`.
    pub log: PathBuf,
    /// The daemon's pid, when one was started and not stopped through this API.
    pub pid: Option<u32>,
}

impl HostInfo {
    fn new(prefix: &str, dir: &Path, i: usize) -> HostInfo {
        let name = format!("h{i}");
        let address = host_address(i);
        let state_dir = dir.join(&name);
        HostInfo {
            netns: format!("{prefix}-{name}"),
            address,
            control: SocketAddr::V4(SocketAddrV4::new(address, CONTROL_PORT)),
            pages: SocketAddr::V4(SocketAddrV4::new(address, PAGES_PORT)),
            config: state_dir.join("sfd.toml"),
            socket: state_dir.join("sfd.sock"),
            log: state_dir.join("sfd.log"),
            state_dir,
            pid: None,
            name,
        }
    }

    /// A command that runs `program` inside this host's namespace
    /// (`ip netns exec {netns} program`); add arguments and spawn as usual.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(command::ip_program());
        command.args(["netns", "exec", &self.netns]).arg(program);
        command
    }
}

/// One of the daemons of a cluster's Slurm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlurmDaemonKind {
    /// The munge daemon that authenticates every Slurm message (on `h1`).
    Munged,
    /// The Slurm controller (on `h1`).
    Slurmctld,
    /// A Slurm node daemon (one per host).
    Slurmd,
}

impl SlurmDaemonKind {
    /// The daemon's program name.
    pub fn program(self) -> &'static str {
        match self {
            SlurmDaemonKind::Munged => "munged",
            SlurmDaemonKind::Slurmctld => "slurmctld",
            SlurmDaemonKind::Slurmd => "slurmd",
        }
    }
}

/// One Slurm daemon of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmDaemonInfo {
    pub kind: SlurmDaemonKind,
    /// The host whose namespaces it runs in (network, and a UTS namespace of its own with the
    /// host's name as hostname).
    pub host: String,
    /// Its stdout and stderr, where it logs.
    pub log: PathBuf,
    /// Its pid, when one was started.
    pub pid: Option<u32>,
}

impl SlurmDaemonInfo {
    /// How messages name it, e.g. `slurmd on h2`.
    pub fn label(&self) -> String {
        format!("{} on {}", self.kind.program(), self.host)
    }
}

/// The Slurm cluster that runs on a cluster's hosts (see
/// [`ClusterSpec::slurm`](crate::ClusterSpec::slurm)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmRecord {
    /// `DIR/slurm`: configuration, munge key and socket, controller state, node spool
    /// directories, pid files and logs.
    pub dir: PathBuf,
    /// `DIR/slurm/slurm.conf`; Slurm's commands find the cluster with `SLURM_CONF` set to it.
    pub conf: PathBuf,
    /// munged's socket, `DIR/slurm/munge/munge.socket`.
    pub munge_socket: PathBuf,
    /// munged and slurmctld (both on `h1`), then each host's slurmd, `h1` first.
    pub daemons: Vec<SlurmDaemonInfo>,
}

impl SlurmRecord {
    fn new(dir: &Path, hosts: &[HostInfo]) -> SlurmRecord {
        let dir = dir.join("slurm");
        let munge = dir.join("munge");
        let first = hosts.first().map_or("h1", |h| h.name.as_str());
        let daemon = |kind, host: &str, log: PathBuf| SlurmDaemonInfo {
            kind,
            host: host.to_owned(),
            log,
            pid: None,
        };
        let mut daemons = vec![
            daemon(SlurmDaemonKind::Munged, first, munge.join("munged.log")),
            daemon(SlurmDaemonKind::Slurmctld, first, dir.join("slurmctld.log")),
        ];
        daemons.extend(hosts.iter().map(|host| {
            daemon(
                SlurmDaemonKind::Slurmd,
                &host.name,
                dir.join(&host.name).join("slurmd.log"),
            )
        }));
        SlurmRecord {
            conf: dir.join("slurm.conf"),
            munge_socket: munge.join("munge.socket"),
            daemons,
            dir,
        }
    }

    /// The argument that identifies the daemon `kind` of this cluster on its command line:
    /// munged's socket, the others' configuration file.
    pub(crate) fn identity(&self, kind: SlurmDaemonKind) -> &Path {
        match kind {
            SlurmDaemonKind::Munged => &self.munge_socket,
            SlurmDaemonKind::Slurmctld | SlurmDaemonKind::Slurmd => &self.conf,
        }
    }
}

/// What `cluster.json` holds: enough for another process to find, inspect and tear down a
/// cluster. Loading checks the format tag and version, and that every name and path is the
/// one the prefix and directory imply, so a damaged file cannot point teardown elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Always `snowflock-cluster`.
    pub format: String,
    /// Layout version, currently 1.
    pub version: u32,
    /// Prefix of every namespace and link name.
    pub prefix: String,
    /// The state directory (absolute).
    pub dir: PathBuf,
    /// The switch namespace, `{prefix}-sw`.
    pub switch: String,
    /// The cluster key file, `DIR/cluster.key`.
    pub key_file: PathBuf,
    /// The daemon binary.
    pub sfd: PathBuf,
    /// `RUST_LOG` of the daemons.
    pub log_filter: String,
    /// The hosts, `h1` first.
    pub hosts: Vec<HostInfo>,
    /// The Slurm cluster on the hosts; `None` unless brought up with
    /// [`ClusterSpec::slurm`](crate::ClusterSpec::slurm).
    #[serde(default)]
    pub slurm: Option<SlurmRecord>,
}

/// What [`ClusterRecord::status`] found for one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// `h1`, `h2`, ...
    pub name: String,
    /// The host's namespace.
    pub netns: String,
    /// Whether the namespace exists.
    pub netns_exists: bool,
    /// The recorded daemon pid.
    pub pid: Option<u32>,
    /// Whether that pid is still the host's daemon and has not exited.
    pub running: bool,
    /// Whether the daemon's socket accepts a connection.
    pub accepting: bool,
}

/// What [`ClusterRecord::slurm_status`] found for one Slurm daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmDaemonStatus {
    pub kind: SlurmDaemonKind,
    /// The host it runs on.
    pub host: String,
    /// The recorded pid.
    pub pid: Option<u32>,
    /// Whether that pid is still this daemon and has not exited.
    pub running: bool,
}

impl ClusterRecord {
    pub(crate) fn new(
        prefix: &str,
        dir: &Path,
        hosts: usize,
        sfd: &Path,
        log_filter: &str,
    ) -> ClusterRecord {
        ClusterRecord {
            format: STATE_FORMAT.to_owned(),
            version: STATE_VERSION,
            prefix: prefix.to_owned(),
            dir: dir.to_path_buf(),
            switch: format!("{prefix}-sw"),
            key_file: dir.join(KEY_FILE),
            sfd: sfd.to_path_buf(),
            log_filter: log_filter.to_owned(),
            hosts: (1..=hosts).map(|i| HostInfo::new(prefix, dir, i)).collect(),
            slurm: None,
        }
    }

    /// The same cluster with a Slurm cluster on its hosts (no daemon started yet).
    pub(crate) fn with_slurm(mut self) -> ClusterRecord {
        self.slurm = Some(SlurmRecord::new(&self.dir, &self.hosts));
        self
    }

    /// Reads and checks `DIR/cluster.json`.
    pub fn load(dir: &Path) -> Result<ClusterRecord, LoadRecordError> {
        let dir = std::path::absolute(dir).map_err(|source| LoadRecordError::ReadState {
            path: dir.join(STATE_FILE),
            source,
        })?;
        let path = dir.join(STATE_FILE);
        let read_error = |source| LoadRecordError::ReadState {
            path: path.clone(),
            source,
        };
        let mut bytes = Vec::new();
        fs::File::open(&path)
            .map_err(read_error)?
            .take(MAX_STATE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        let bad = |problem: String| LoadRecordError::BadState {
            path: path.clone(),
            problem,
        };
        if bytes.len() as u64 > MAX_STATE_LEN {
            return Err(bad(format!("larger than {MAX_STATE_LEN} bytes")));
        }
        let record: ClusterRecord =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if record.format != STATE_FORMAT {
            return Err(bad(format!(
                "format is {:?}, not {STATE_FORMAT:?}",
                record.format
            )));
        }
        if record.version != STATE_VERSION {
            return Err(bad(format!(
                "version {} (this sf reads version {STATE_VERSION})",
                record.version
            )));
        }
        validate_prefix(&record.prefix).map_err(|e| bad(e.to_string()))?;
        if record.dir != dir {
            return Err(bad(format!(
                "it describes directory {}",
                record.dir.display()
            )));
        }
        if record.hosts.is_empty() || record.hosts.len() > MAX_HOSTS {
            return Err(bad(format!("{} hosts", record.hosts.len())));
        }
        // Everything teardown acts on must be what the prefix and directory imply.
        let mut expected = ClusterRecord::new(
            &record.prefix,
            &dir,
            record.hosts.len(),
            &record.sfd,
            &record.log_filter,
        );
        if record.slurm.is_some() {
            expected = expected.with_slurm();
        }
        let mut comparable = record.clone();
        for host in &mut comparable.hosts {
            host.pid = None;
        }
        for daemon in comparable.slurm.iter_mut().flat_map(|s| &mut s.daemons) {
            daemon.pid = None;
        }
        if comparable != expected {
            return Err(bad(
                "names or paths differ from those its prefix and directory imply".into(),
            ));
        }
        Ok(record)
    }

    /// Writes `DIR/cluster.json` (via a temporary file and a rename).
    pub(crate) fn save(&self) -> Result<(), SaveRecordError> {
        let path = self.dir.join(STATE_FILE);
        let temporary = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let write_error = |source| SaveRecordError {
            path: path.clone(),
            source,
        };
        let mut text = serde_json::to_string_pretty(self)
            .map_err(io::Error::other)
            .map_err(write_error)?;
        text.push('\n');
        fs::write(&temporary, text).map_err(write_error)?;
        fs::rename(&temporary, &path).map_err(write_error)
    }

    /// Which daemons are alive and accepting connections. Changes nothing.
    pub fn status(&self) -> Vec<HostStatus> {
        self.hosts
            .iter()
            .map(|host| HostStatus {
                name: host.name.clone(),
                netns: host.netns.clone(),
                netns_exists: netns::exists(&host.netns),
                pid: host.pid,
                running: host
                    .pid
                    .is_some_and(|pid| matches!(Daemon::adopt(pid, &host.config), Ok(Some(_)))),
                accepting: UnixStream::connect(&host.socket).is_ok(),
            })
            .collect()
    }

    /// Which Slurm daemons are alive (none without Slurm). Changes nothing.
    pub fn slurm_status(&self) -> Vec<SlurmDaemonStatus> {
        let Some(slurm) = &self.slurm else {
            return Vec::new();
        };
        slurm
            .daemons
            .iter()
            .map(|daemon| SlurmDaemonStatus {
                kind: daemon.kind,
                host: daemon.host.clone(),
                pid: daemon.pid,
                running: daemon.pid.is_some_and(|pid| {
                    matches!(Daemon::adopt(pid, slurm.identity(daemon.kind)), Ok(Some(_)))
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_tampered_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = ClusterRecord::new("sft", dir.path(), 2, Path::new("/bin/sfd"), "debug");
        record.hosts[0].pid = Some(1234);
        record.save().unwrap();
        assert_eq!(ClusterRecord::load(dir.path()).unwrap(), record);

        record.hosts[1].netns = "somebody-elses".into();
        record.save().unwrap();
        let err = ClusterRecord::load(dir.path()).unwrap_err();
        assert!(matches!(err, LoadRecordError::BadState { .. }), "{err}");

        let mut record = ClusterRecord::new("sft", dir.path(), 1, Path::new("/bin/sfd"), "x");
        record.version = 99;
        record.save().unwrap();
        let err = ClusterRecord::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");
    }

    #[test]
    fn a_slurm_record_round_trips_and_a_misplaced_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut record =
            ClusterRecord::new("sft", dir.path(), 2, Path::new("/bin/sfd"), "info").with_slurm();
        let slurm = record.slurm.as_mut().unwrap();
        assert_eq!(slurm.conf, dir.path().join("slurm/slurm.conf"));
        slurm.daemons[1].pid = Some(4321);
        record.save().unwrap();
        assert_eq!(ClusterRecord::load(dir.path()).unwrap(), record);

        record.slurm.as_mut().unwrap().daemons[2].log = "/var/log/elsewhere.log".into();
        record.save().unwrap();
        let err = ClusterRecord::load(dir.path()).unwrap_err();
        assert!(matches!(err, LoadRecordError::BadState { .. }), "{err}");
    }
}
