//! What a cluster is to be: [`ClusterSpec`], its defaults, and the checks
//! [`NetnsCluster::up`](crate::NetnsCluster::up) runs on it before creating anything.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Limits;
use crate::error::{InvalidSpec, UpError};
use crate::prefix::{random_prefix, validate_prefix};
use crate::record::{ClusterRecord, MAX_HOSTS};

/// Default clone slots per host.
pub const DEFAULT_CLONE_SLOTS: u32 = 16;
/// Default page fetch timeout written to each host's `[limits]`.
pub const DEFAULT_FETCH_TIMEOUT_MS: u64 = 5000;
/// Default bound on waiting for all daemons' sockets in
/// [`NetnsCluster::up`](crate::NetnsCluster::up).
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound on waiting for daemons to exit after SIGTERM.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Most CPUs a Slurm node may declare (slurmctld refuses more).
const MAX_SLURM_CPUS: u32 = 65535;
/// `sockaddr_un.sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH_LEN: usize = 107;

/// What [`NetnsCluster::up`](crate::NetnsCluster::up) builds. Construct with
/// [`ClusterSpec::new`], then adjust fields.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of hosts, 1..=[`MAX_HOSTS`].
    pub hosts: usize,
    /// Namespace and link name prefix; `None` draws `sf` + 6 random hex digits.
    /// Must be 1..=8 characters from `[a-z0-9]`, and no namespace `{prefix}-*` may exist.
    pub prefix: Option<String>,
    /// State directory (made absolute). Created if missing; must not hold a `cluster.json`.
    pub dir: PathBuf,
    /// The daemon binary (made absolute; must exist).
    pub sfd: PathBuf,
    /// `[limits] clone_slots` of every host.
    pub clone_slots: u32,
    /// `[limits] fetch_timeout_ms` of every host.
    pub fetch_timeout_ms: u64,
    /// `[limits] peer_timeout_ms` of every host; `None` leaves the daemon's default.
    pub peer_timeout_ms: Option<u64>,
    /// Further `[limits]` keys, written as given (scalars and arrays only). The daemon rejects
    /// keys it does not know.
    pub extra_limits: toml::Table,
    /// Keys of the `[mcdist]` section, written as given (scalars and arrays only).
    pub mcdist: toml::Table,
    /// Every daemon serves Prometheus metrics on this port of its control address
    /// (`[metrics] listen`); `None` leaves them off.
    pub metrics_port: Option<u16>,
    /// `RUST_LOG` of the daemons.
    pub log_filter: String,
    /// One deadline for every daemon's socket to accept a connection.
    pub ready_timeout: Duration,
    /// How long daemons get after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// Also run a Slurm cluster on the hosts (munged and slurmctld on `h1`, a slurmd on every
    /// host, node names the host names) before the daemons start, and point every daemon's
    /// `[allocation]` at it. Needs Slurm and munge installed.
    pub slurm: bool,
    /// CPUs each Slurm node declares (Slurm grants one clone per CPU); `None`: the host's
    /// clone slots.
    pub slurm_cpus: Option<u32>,
    /// Told each step of [`NetnsCluster::up`](crate::NetnsCluster::up) as it begins, and
    /// how many daemons are ready while it waits for them (`sf cluster up` shows them).
    pub progress: Option<UpProgress>,
}

/// Receives [`NetnsCluster::up`](crate::NetnsCluster::up)'s steps, one line each.
#[derive(Clone)]
pub struct UpProgress(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for UpProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpProgress")
    }
}

impl UpProgress {
    pub(crate) fn step(progress: Option<&UpProgress>, line: &str) {
        if let Some(progress) = progress {
            (progress.0)(line);
        }
    }
}

impl ClusterSpec {
    /// `hosts` hosts with state in `dir` running the daemon binary `sfd`; everything else at
    /// its default (random prefix, 16 clone slots, fetch timeout 5 s, `RUST_LOG=info`, 20 s to
    /// become ready, 10 s to stop, no Slurm).
    pub fn new(hosts: usize, dir: impl Into<PathBuf>, sfd: impl Into<PathBuf>) -> ClusterSpec {
        ClusterSpec {
            hosts,
            prefix: None,
            dir: dir.into(),
            sfd: sfd.into(),
            clone_slots: DEFAULT_CLONE_SLOTS,
            fetch_timeout_ms: DEFAULT_FETCH_TIMEOUT_MS,
            peer_timeout_ms: None,
            extra_limits: toml::Table::new(),
            mcdist: toml::Table::new(),
            metrics_port: None,
            log_filter: "info".to_owned(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            slurm: false,
            slurm_cpus: None,
            progress: None,
        }
    }

    /// Checks the spec and derives the record of the cluster it describes (drawing a prefix if
    /// none is given). Looks at nothing but the spec and the `sfd` binary.
    pub(crate) fn checked_record(&self) -> Result<ClusterRecord, UpError> {
        self.check_settings()?;
        let invalid = |problem: String| InvalidSpec { problem };
        let prefix = match &self.prefix {
            Some(prefix) => prefix.clone(),
            None => random_prefix()?,
        };
        validate_prefix(&prefix)?;
        let dir = std::path::absolute(&self.dir)
            .map_err(|e| invalid(format!("directory {}: {e}", self.dir.display())))?;
        let sfd = std::path::absolute(&self.sfd)
            .map_err(|e| invalid(format!("sfd {}: {e}", self.sfd.display())))?;
        if !sfd.is_file() {
            return Err(invalid(format!("sfd binary {} does not exist", sfd.display())).into());
        }
        if dir.to_str().is_none() {
            return Err(invalid(format!("directory {} is not UTF-8", dir.display())).into());
        }
        let mut record = ClusterRecord::new(&prefix, &dir, self.hosts, &sfd, &self.log_filter);
        if self.slurm {
            // Slurm's configuration format has no quoting: a path holding a separator would be
            // read as something else.
            if !dir.to_string_lossy().chars().all(slurm_conf_safe) {
                return Err(invalid(format!(
                    "directory {} holds characters slurm.conf cannot carry; with Slurm use only \
                     letters, digits and /._-+@:~",
                    dir.display()
                ))
                .into());
            }
            record = record.with_slurm();
        }
        let sockets = record.hosts.iter().map(|h| &h.socket);
        if let Some(long) = sockets
            .chain(record.slurm.as_ref().map(|s| &s.munge_socket))
            .find(|socket| socket.as_os_str().len() > MAX_SOCKET_PATH_LEN)
        {
            return Err(invalid(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH_LEN} bytes; use a shorter directory",
                long.display()
            ))
            .into());
        }
        Ok(record)
    }

    /// Checks the host count, the limits and the `[mcdist]` keys.
    fn check_settings(&self) -> Result<(), InvalidSpec> {
        let invalid = |problem: String| InvalidSpec { problem };
        if !(1..=MAX_HOSTS).contains(&self.hosts) {
            return Err(invalid(format!(
                "{} hosts: a cluster has 1 to {MAX_HOSTS}",
                self.hosts
            )));
        }
        if self.clone_slots == 0
            || self.fetch_timeout_ms == 0
            || self.peer_timeout_ms == Some(0)
            || self.slurm_cpus == Some(0)
        {
            return Err(invalid(
                "clone slots, Slurm CPUs and timeouts must be positive".into(),
            ));
        }
        for (key, value) in &self.extra_limits {
            if value.is_table()
                || ["clone_slots", "fetch_timeout_ms", "peer_timeout_ms"].contains(&key.as_str())
            {
                return Err(invalid(format!(
                    "extra limit {key:?} must be a new scalar or array key"
                )));
            }
        }
        if self.slurm && self.slurm_node_cpus() > MAX_SLURM_CPUS {
            return Err(invalid(format!(
                "Slurm nodes declare at most {MAX_SLURM_CPUS} CPUs, not {}",
                self.slurm_node_cpus()
            )));
        }
        if let Some((key, _)) = self.mcdist.iter().find(|(_, v)| v.is_table()) {
            return Err(invalid(format!(
                "mcdist key {key:?} must be a scalar or array"
            )));
        }
        Ok(())
    }

    /// CPUs each Slurm node declares.
    pub(crate) fn slurm_node_cpus(&self) -> u32 {
        self.slurm_cpus.unwrap_or(self.clone_slots)
    }

    /// The `[limits]` section every host's configuration gets.
    pub(crate) fn limits(&self) -> Limits<'_> {
        Limits {
            clone_slots: self.clone_slots,
            fetch_timeout_ms: self.fetch_timeout_ms,
            peer_timeout_ms: self.peer_timeout_ms,
            extra: &self.extra_limits,
        }
    }
}

/// Whether `c` may appear in a path written into `slurm.conf`.
fn slurm_conf_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || "/._-+@:~".contains(c)
}
