//! A local test cluster: several `sfd` hosts on one machine, each in a network namespace of
//! its own, joined by one Linux bridge.
//!
//! Used by `sf cluster up|down|status` and by integration tests.
//!
//! ```no_run
//! use snowflock_tools::cluster::{Cluster, ClusterSpec};
//!
//! let spec = ClusterSpec::new(3, "/tmp/sf-cluster", "target/debug/sfd");
//! let cluster = Cluster::up(spec)?;
//! for host in cluster.hosts() {
//!     println!("{} {} {}", host.name, host.address, host.socket.display());
//! }
//! cluster.down()?;
//! # Ok::<(), snowflock_tools::cluster::ClusterError>(())
//! ```
//!
//! # What [`Cluster::up`] creates
//!
//! With `P` the cluster's prefix (`sf` + 6 random hex digits unless given) and `DIR` its state
//! directory, for a cluster of `N` hosts (`i` = 1..=N):
//!
//! - namespace `P-sw`, holding bridge `br0` (up, no address, STP off, forward delay 0,
//!   multicast snooping off so that IP multicast floods to every port), a plain L2 switch:
//!   where `br_netfilter` is loaded, its firewall hooks are turned off in `P-sw`;
//! - namespace `P-h{i}` with `lo` up and `eth0` up at `10.77.0.{i}/24` with a route
//!   `224.0.0.0/4 dev eth0` and no default route. `eth0` is a veth whose peer `P-h{i}` is a
//!   port of `br0` in `P-sw`. The pair is created from inside `P-h{i}` with the peer placed
//!   straight into `P-sw`: nothing is ever created in, or read from, the root namespace's
//!   links, routes or addresses;
//! - `DIR/cluster.key` (the cluster key, 64 hex digits, mode 0600),
//!   `DIR/h{i}/sfd.toml` (the daemon's configuration: control on `10.77.0.{i}:7070`, pages on
//!   `10.77.0.{i}:7071`, every host as a member) and `DIR/cluster.json` (a [`ClusterRecord`],
//!   written before any namespace exists and again once the daemons run, so that a separate
//!   process can always tear down what was built);
//! - one daemon per host, `ip netns exec P-h{i} SFD --config DIR/h{i}/sfd.toml`, in a session
//!   of its own with stdin `/dev/null`, stdout and stderr appended to `DIR/h{i}/sfd.log` and
//!   `RUST_LOG` set to the spec's filter. It makes its API socket `DIR/h{i}/sfd.sock`.
//!
//! `up` returns once every socket accepts a connection. It fails if a daemon exits first (the
//! error carries the tail of its log) or if the sockets are not all ready within
//! [`ClusterSpec::ready_timeout`] (20 s by default, one deadline for all hosts). A failed `up`
//! removes everything it created before returning.
//!
//! # What [`Cluster::down`] removes
//!
//! 1. Each daemon gets SIGTERM; those still running after [`ClusterSpec::stop_timeout`]
//!    (10 s by default, one deadline for all) get SIGKILL and [`KILL_TIMEOUT`] more.
//! 2. Every other process still inside a cluster namespace gets SIGKILL (bounded likewise).
//! 3. Every cluster namespace is deleted (which deletes its veth ends and the bridge).
//! 4. The runtime files: `cluster.json`, `cluster.key`, and each `DIR/h{i}` directory (daemon
//!    files included). If the environment variable [`KEEP_LOGS_ENV`] (`SF_KEEP_LOGS`) is set to
//!    anything but empty or `0`, each `DIR/h{i}/sfd.log` is kept. `DIR` itself is removed if
//!    that leaves it empty; nothing else in `DIR` is touched.
//!
//! `down` carries on past failures and reports them all at the end. Dropping a [`Cluster`]
//! without calling `down` (an early return, a panicking test) runs the same teardown and
//! prints failures to stderr; [`Cluster::detach`] is the only way to leave a cluster running.
//! A process killed outright (SIGKILL, Ctrl-C on a test run) runs no destructor: run
//! `sf cluster down --dir DIR` (it reads `cluster.json`), or `sf cluster down --prefix P`.
//!
//! # Bounds
//!
//! Every wait has a deadline: each `ip` command [`IP_TIMEOUT`], readiness
//! [`ClusterSpec::ready_timeout`], graceful stop [`ClusterSpec::stop_timeout`], each SIGKILL
//! [`KILL_TIMEOUT`]. Polling loops sleep between attempts (5-50 ms), so their count is bounded
//! by their deadline. Signals go through pidfds, so a pid reused by an unrelated process is
//! never signalled; a daemon started by another process is only adopted if its command line
//! still names its host's `sfd.toml`.
//!
//! # Safety of the network
//!
//! Addresses (`10.77.0.0/24`) exist only on the cluster's own `eth0` links; hosts have no
//! default route and the switch namespace has no uplink, so cluster traffic cannot leave the
//! cluster. Two clusters (different prefixes) are fully separate even though they use the same
//! addresses.

mod config;
mod netns;
mod process;

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snowflock_dataplane::auth::{ClusterKey, SaveKeyError};

pub use netns::{CommandError, IP_TIMEOUT, enter as enter_netns};
use process::Daemon;

/// Most hosts a cluster may have (addresses `10.77.0.1..=32`).
pub const MAX_HOSTS: usize = 32;
/// Longest prefix: `{prefix}-h32` must fit a 15-byte interface name.
pub const MAX_PREFIX_LEN: usize = 8;
/// Default clone slots per host.
pub const DEFAULT_CLONE_SLOTS: u32 = 16;
/// Default page fetch timeout written to each host's `[limits]`.
pub const DEFAULT_FETCH_TIMEOUT_MS: u64 = 5000;
/// TCP port of each host's inter-host control protocol.
pub const CONTROL_PORT: u16 = 7070;
/// TCP port of each host's memory server.
pub const PAGES_PORT: u16 = 7071;
/// Default bound on waiting for all daemons' sockets in [`Cluster::up`].
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound on waiting for daemons to exit after SIGTERM.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for a process to exit after SIGKILL.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Set to anything but empty or `0` to keep each host's `sfd.log` when a cluster goes down.
pub const KEEP_LOGS_ENV: &str = "SF_KEEP_LOGS";
/// The state file in a cluster's directory.
pub const STATE_FILE: &str = "cluster.json";
/// The cluster key file in a cluster's directory.
pub const KEY_FILE: &str = "cluster.key";

const STATE_FORMAT: &str = "snowflock-cluster";
const STATE_VERSION: u32 = 1;
const MAX_STATE_LEN: u64 = 1 << 20;
/// `sockaddr_un.sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH_LEN: usize = 107;
/// Lines of a daemon's log quoted in errors.
const LOG_TAIL_LINES: usize = 20;

/// Address of host `i` (1-based).
pub fn host_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, u8::try_from(i).unwrap_or(u8::MAX))
}

/// A fresh prefix: `sf` + 6 random hex digits.
pub fn random_prefix() -> Result<String, ClusterError> {
    let mut bytes = [0u8; 3];
    getrandom::fill(&mut bytes).map_err(|e| ClusterError::Random {
        problem: e.to_string(),
    })?;
    Ok(format!(
        "sf{:02x}{:02x}{:02x}",
        bytes[0], bytes[1], bytes[2]
    ))
}

/// Checks a prefix: 1 to [`MAX_PREFIX_LEN`] characters from `[a-z0-9]`.
pub fn validate_prefix(prefix: &str) -> Result<(), ClusterError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ClusterError::InvalidSpec {
            problem: format!(
                "prefix {prefix:?} must be 1 to {MAX_PREFIX_LEN} characters from [a-z0-9]"
            ),
        })
    }
}

/// What [`Cluster::up`] builds. Construct with [`ClusterSpec::new`], then adjust fields.
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
    /// `RUST_LOG` of the daemons.
    pub log_filter: String,
    /// One deadline for every daemon's socket to accept a connection.
    pub ready_timeout: Duration,
    /// How long daemons get after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
}

impl ClusterSpec {
    /// `hosts` hosts with state in `dir` running the daemon binary `sfd`; everything else at
    /// its default (random prefix, 16 clone slots, fetch timeout 5 s, `RUST_LOG=info`, 20 s to
    /// become ready, 10 s to stop).
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
            log_filter: "info".to_owned(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        }
    }
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
        let mut command = Command::new(netns::ip_program());
        command.args(["netns", "exec", &self.netns]).arg(program);
        command
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

impl ClusterRecord {
    fn new(prefix: &str, dir: &Path, hosts: usize, sfd: &Path, log_filter: &str) -> ClusterRecord {
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
        }
    }

    /// Reads and checks `DIR/cluster.json`.
    pub fn load(dir: &Path) -> Result<ClusterRecord, ClusterError> {
        let dir = std::path::absolute(dir).map_err(|source| ClusterError::ReadState {
            path: dir.join(STATE_FILE),
            source,
        })?;
        let path = dir.join(STATE_FILE);
        let read_error = |source| ClusterError::ReadState {
            path: path.clone(),
            source,
        };
        let mut bytes = Vec::new();
        fs::File::open(&path)
            .map_err(read_error)?
            .take(MAX_STATE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        let bad = |problem: String| ClusterError::BadState {
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
        let expected = ClusterRecord::new(
            &record.prefix,
            &dir,
            record.hosts.len(),
            &record.sfd,
            &record.log_filter,
        );
        let mut comparable = record.clone();
        for host in &mut comparable.hosts {
            host.pid = None;
        }
        if comparable != expected {
            return Err(bad(
                "names or paths differ from those its prefix and directory imply".into(),
            ));
        }
        Ok(record)
    }

    /// Writes `DIR/cluster.json` (via a temporary file and a rename).
    fn save(&self) -> Result<(), ClusterError> {
        let path = self.dir.join(STATE_FILE);
        let temporary = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let write_error = |source| ClusterError::WriteFile {
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
}

/// A failed cluster operation. Each variant names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid cluster spec: {problem}")]
    InvalidSpec { problem: String },
    #[error("the random source failed: {problem}")]
    Random { problem: String },
    #[error(
        "network namespaces with prefix {prefix:?} already exist ({}); pick another prefix or \
         run `sf cluster down --prefix {prefix}`",
        .namespaces.join(", ")
    )]
    PrefixInUse {
        prefix: String,
        namespaces: Vec<String>,
    },
    #[error(
        "{} exists: a cluster may be up there; run `sf cluster down --dir {}` first",
        .path.display(),
        .path.parent().unwrap_or(Path::new("/")).display()
    )]
    StateExists { path: PathBuf },
    #[error("listing network namespaces in /run/netns")]
    ListNamespaces {
        #[source]
        source: io::Error,
    },
    #[error("creating directory {}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {}", .path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {}", .path.display())]
    RemoveFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the cluster key")]
    Key {
        #[source]
        source: SaveKeyError,
    },
    #[error("reading cluster state {}", .path.display())]
    ReadState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a usable cluster state file: {problem}", .path.display())]
    BadState { path: PathBuf, problem: String },
    #[error("creating namespace {netns}")]
    CreateNamespace {
        netns: String,
        #[source]
        source: CommandError,
    },
    #[error("setting the MTU of {host}")]
    Mtu {
        host: String,
        #[source]
        source: CommandError,
    },
    #[error("impairing the switch port of {host}")]
    Impair {
        host: String,
        #[source]
        source: CommandError,
    },
    #[error("creating the bridge in {netns}")]
    CreateBridge {
        netns: String,
        #[source]
        source: CommandError,
    },
    #[error("turning off the host firewall's bridge hooks in {netns}")]
    BridgeFirewall {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("linking {host} to the switch")]
    CreateLink {
        host: String,
        #[source]
        source: CommandError,
    },
    #[error("configuring the network of {host}")]
    ConfigureHost {
        host: String,
        #[source]
        source: CommandError,
    },
    #[error("deleting namespace {netns}")]
    DeleteNamespace {
        netns: String,
        #[source]
        source: CommandError,
    },
    #[error("processes {pids:?} in namespace {netns} survived SIGKILL for {waited:?}")]
    NamespaceBusy {
        netns: String,
        pids: Vec<u32>,
        waited: Duration,
    },
    #[error("killing the processes in namespace {netns}")]
    KillNamespace {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("starting sfd for {host}")]
    SpawnDaemon {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("sfd of {host} exited before its socket accepted connections ({status}); last lines of {}:\n{tail}", .log.display())]
    DaemonExited {
        host: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("sfd of {host} did not accept connections on {} within {waited:?}; last lines of {}:\n{tail}", .socket.display(), .log.display())]
    DaemonNotReady {
        host: String,
        socket: PathBuf,
        waited: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("watching sfd of {host}")]
    Watch {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("signalling sfd of {host} (pid {pid})")]
    Signal {
        host: String,
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("sfd of {host} (pid {pid}) survived SIGKILL for {waited:?}")]
    StillRunning {
        host: String,
        pid: u32,
        waited: Duration,
    },
    #[error("sfd of {host} is already running (pid {pid})")]
    AlreadyRunning { host: String, pid: u32 },
    #[error("no host index {index}: the cluster has {hosts} hosts (indices 0..{hosts})")]
    NoSuchHost { index: usize, hosts: usize },
    #[error("tearing down cluster {prefix} failed:{}", Failures(.failures))]
    Teardown {
        prefix: String,
        failures: Vec<ClusterError>,
    },
}

/// Lists teardown failures, each with its full source chain.
struct Failures<'a>(&'a [ClusterError]);

impl fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for failure in self.0 {
            write!(f, "\n  - {}", chain(failure))?;
        }
        Ok(())
    }
}

/// `error: source: source...` on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}

/// A running cluster, owned by this process.
///
/// Dropping it tears it down like [`Cluster::down`] (printing failures to stderr) unless it was
/// [detached](Cluster::detach). Host indices in this API are positions in [`Cluster::hosts`]:
/// index 0 is `h1`.
#[derive(Debug)]
pub struct Cluster {
    record: ClusterRecord,
    /// One slot per host; `None` when no daemon runs (not started yet, or stopped).
    daemons: Vec<Option<Daemon>>,
    /// Namespaces this handle must delete: those it created, or for a loaded cluster every
    /// namespace of its prefix.
    namespaces: Vec<String>,
    ready_timeout: Duration,
    stop_timeout: Duration,
    /// Torn down or detached: Drop has nothing to do.
    finished: bool,
}

impl Cluster {
    /// Builds and starts a cluster as described in the [module documentation](self).
    ///
    /// Nothing is created if the spec is invalid, the prefix is in use, or `DIR/cluster.json`
    /// exists. After that, any failure tears down everything created so far before the error
    /// is returned.
    pub fn up(spec: ClusterSpec) -> Result<Cluster, ClusterError> {
        let invalid = |problem: String| ClusterError::InvalidSpec { problem };
        if !(1..=MAX_HOSTS).contains(&spec.hosts) {
            return Err(invalid(format!(
                "{} hosts: a cluster has 1 to {MAX_HOSTS}",
                spec.hosts
            )));
        }
        if spec.clone_slots == 0 || spec.fetch_timeout_ms == 0 || spec.peer_timeout_ms == Some(0) {
            return Err(invalid("clone slots and timeouts must be positive".into()));
        }
        for (key, value) in &spec.extra_limits {
            if value.is_table()
                || ["clone_slots", "fetch_timeout_ms", "peer_timeout_ms"].contains(&key.as_str())
            {
                return Err(invalid(format!(
                    "extra limit {key:?} must be a new scalar or array key"
                )));
            }
        }
        if let Some((key, _)) = spec.mcdist.iter().find(|(_, v)| v.is_table()) {
            return Err(invalid(format!(
                "mcdist key {key:?} must be a scalar or array"
            )));
        }
        let prefix = match spec.prefix {
            Some(prefix) => prefix,
            None => random_prefix()?,
        };
        validate_prefix(&prefix)?;
        let dir = std::path::absolute(&spec.dir)
            .map_err(|e| invalid(format!("directory {}: {e}", spec.dir.display())))?;
        let sfd = std::path::absolute(&spec.sfd)
            .map_err(|e| invalid(format!("sfd {}: {e}", spec.sfd.display())))?;
        if !sfd.is_file() {
            return Err(invalid(format!(
                "sfd binary {} does not exist",
                sfd.display()
            )));
        }
        if dir.to_str().is_none() {
            return Err(invalid(format!("directory {} is not UTF-8", dir.display())));
        }
        let record = ClusterRecord::new(&prefix, &dir, spec.hosts, &sfd, &spec.log_filter);
        if let Some(long) = record
            .hosts
            .iter()
            .find(|h| h.socket.as_os_str().len() > MAX_SOCKET_PATH_LEN)
        {
            return Err(invalid(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH_LEN} bytes; use a shorter directory",
                long.socket.display()
            )));
        }
        let taken =
            netns::list(&prefix).map_err(|source| ClusterError::ListNamespaces { source })?;
        if !taken.is_empty() {
            return Err(ClusterError::PrefixInUse {
                prefix,
                namespaces: taken,
            });
        }
        fs::create_dir_all(&dir).map_err(|source| ClusterError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let state = dir.join(STATE_FILE);
        if state.exists() {
            return Err(ClusterError::StateExists { path: state });
        }

        // From here on, dropping `cluster` undoes whatever was done.
        let mut cluster = Cluster {
            daemons: record.hosts.iter().map(|_| None).collect(),
            record,
            namespaces: Vec::new(),
            ready_timeout: spec.ready_timeout,
            stop_timeout: spec.stop_timeout,
            finished: false,
        };
        // Claim the state file first, so that `sf cluster down --dir` can always clean up.
        cluster.record.save()?;
        let limits = config::Limits {
            clone_slots: spec.clone_slots,
            fetch_timeout_ms: spec.fetch_timeout_ms,
            peer_timeout_ms: spec.peer_timeout_ms,
            extra: &spec.extra_limits,
        };
        cluster.write_files(&limits, &spec.mcdist)?;
        cluster.build_network()?;
        for i in 0..cluster.record.hosts.len() {
            cluster.spawn(i)?;
        }
        cluster.record.save()?;
        let all: Vec<usize> = (0..cluster.record.hosts.len()).collect();
        cluster.wait_ready(&all, cluster.ready_timeout)?;
        Ok(cluster)
    }

    /// Takes charge of the cluster described by `DIR/cluster.json` (started by another
    /// process, e.g. `sf cluster up`). Daemons still running are adopted through pidfds; the
    /// namespaces to delete are every existing `{prefix}-sw` / `{prefix}-h{N}`.
    ///
    /// The returned handle tears the cluster down when dropped; use [`ClusterRecord::load`]
    /// to only look.
    pub fn load(dir: &Path) -> Result<Cluster, ClusterError> {
        let record = ClusterRecord::load(dir)?;
        let mut daemons = Vec::with_capacity(record.hosts.len());
        for host in &record.hosts {
            let daemon = match host.pid {
                Some(pid) => {
                    Daemon::adopt(pid, &host.config).map_err(|source| ClusterError::Watch {
                        host: host.name.clone(),
                        source,
                    })?
                }
                None => None,
            };
            daemons.push(daemon);
        }
        let mut namespaces = netns::list(&record.prefix)
            .map_err(|source| ClusterError::ListNamespaces { source })?;
        // Creation order (switch first): teardown walks it backwards, hosts before the switch.
        namespaces.sort_by_key(|name| !name.ends_with("-sw"));
        Ok(Cluster {
            record,
            daemons,
            namespaces,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            finished: false,
        })
    }

    /// The hosts, `h1` first.
    pub fn hosts(&self) -> &[HostInfo] {
        &self.record.hosts
    }

    /// Host `index` (0 is `h1`).
    pub fn host(&self, index: usize) -> Result<&HostInfo, ClusterError> {
        self.record
            .hosts
            .get(index)
            .ok_or(ClusterError::NoSuchHost {
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

    /// SIGKILLs host `index`'s daemon and waits up to [`KILL_TIMEOUT`] for it to die (for
    /// failure tests). The namespace stays; [`Cluster::start_host`] brings the host back.
    /// A host with no running daemon is left as it is.
    pub fn kill_host(&mut self, index: usize) -> Result<(), ClusterError> {
        self.host(index)?;
        let result = self.stop(&[index], Duration::ZERO).into_iter().next();
        self.forget(index)?;
        result.map_or(Ok(()), Err)
    }

    /// Stops host `index`'s daemon: SIGTERM, up to the stop timeout, then SIGKILL and up to
    /// [`KILL_TIMEOUT`]. The namespace stays; [`Cluster::start_host`] brings the host back.
    pub fn stop_host(&mut self, index: usize) -> Result<(), ClusterError> {
        self.host(index)?;
        let result = self.stop(&[index], self.stop_timeout).into_iter().next();
        self.forget(index)?;
        result.map_or(Ok(()), Err)
    }

    /// Starts host `index`'s daemon again (same configuration, log appended) and waits up to
    /// the ready timeout for its socket. Fails if it is running.
    pub fn start_host(&mut self, index: usize) -> Result<(), ClusterError> {
        let host = self.host(index)?.clone();
        if let Some(daemon) = self.daemons[index].as_mut() {
            let running = daemon.exit_status().map_err(|source| ClusterError::Watch {
                host: host.name.clone(),
                source,
            })?;
            if running.is_none() {
                return Err(ClusterError::AlreadyRunning {
                    host: host.name,
                    pid: daemon.pid(),
                });
            }
        }
        self.spawn(index)?;
        self.record.save()?;
        self.wait_ready(&[index], self.ready_timeout)
    }

    /// Makes the switch lose `loss_percent`% of the UDP datagrams (mcdist's traffic) it
    /// forwards to each host and hold back another `reorder_percent`% behind the rest (a
    /// 20 Mbit/s class with a one-packet burst, so later packets overtake them), replacing
    /// any earlier impairment; 0 and 0 removes it. TCP (the control protocol, the memory
    /// server) is left alone. Built from an HTB root and a classic-BPF classifier drawing a
    /// random number per packet, because kernels without netem (`CONFIG_NET_SCH_NETEM`) are
    /// common; it needs only `tc` and the HTB and BPF classifier built in.
    pub fn impair(&self, loss_percent: u32, reorder_percent: u32) -> Result<(), ClusterError> {
        let switch = self.record.switch.clone();
        let threshold = |percent: u32| {
            (u64::from(percent.min(100)) * (1u64 << 32) / 100).min(u64::from(u32::MAX))
        };
        let drop_below = threshold(loss_percent);
        let hold_below = threshold(loss_percent + reorder_percent);
        // Not UDP (IPv4 protocol byte, after the Ethernet header on this egress port) → 1:1;
        // A = random; A < drop_below → class 1:3 (a zero-length FIFO: dropped);
        // A < hold_below → 1:2 (slow: overtaken); else 1:1.
        let program = format!(
            "9,48 0 0 23,21 1 0 17,6 0 0 65537,32 0 0 4294963256,53 1 0 {drop_below},6 0 0 65539,53 1 0 {hold_below},6 0 0 65538,6 0 0 65537"
        );
        for host in &self.record.hosts {
            let port = host.netns.as_str();
            let fail = |source| ClusterError::Impair {
                host: host.name.clone(),
                source,
            };
            // Nothing to delete the first time.
            let _ = netns::tc(&switch, &["qdisc", "del", "dev", port, "root"]);
            if loss_percent == 0 && reorder_percent == 0 {
                continue;
            }
            let fast = ["htb", "rate", "10gbit", "burst", "256k", "cburst", "256k"];
            let steps: Vec<Vec<&str>> = vec![
                vec![
                    "qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "1",
                ],
                [
                    &[
                        "class", "add", "dev", port, "parent", "1:", "classid", "1:1",
                    ][..],
                    &fast,
                ]
                .concat(),
                [
                    &[
                        "class", "add", "dev", port, "parent", "1:", "classid", "1:3",
                    ][..],
                    &fast,
                ]
                .concat(),
                vec![
                    "class", "add", "dev", port, "parent", "1:", "classid", "1:2", "htb", "rate",
                    "20mbit", "burst", "1600", "cburst", "1600",
                ],
                vec![
                    "qdisc", "add", "dev", port, "parent", "1:3", "handle", "30:", "pfifo",
                    "limit", "0",
                ],
                vec![
                    "qdisc", "add", "dev", port, "parent", "1:2", "handle", "20:", "pfifo",
                    "limit", "64",
                ],
                vec![
                    "filter", "add", "dev", port, "parent", "1:", "protocol", "ip", "prio", "1",
                    "bpf", "bytecode", &program,
                ],
            ];
            for step in steps {
                netns::tc(&switch, &step).map_err(fail)?;
            }
        }
        Ok(())
    }

    /// Sets the MTU of every host's `eth0`, its switch port and the bridge (jumbo frames:
    /// up to 9000 on veth). Daemons keep the MTU they started with; set it before starting
    /// traffic that should use it.
    pub fn set_mtu(&self, mtu: u32) -> Result<(), ClusterError> {
        let switch = self.record.switch.clone();
        let mtu = mtu.to_string();
        for host in &self.record.hosts {
            let fail = |source| ClusterError::Mtu {
                host: host.name.clone(),
                source,
            };
            netns::ip(&["-n", &host.netns, "link", "set", "eth0", "mtu", &mtu]).map_err(fail)?;
            netns::ip(&["-n", &switch, "link", "set", &host.netns, "mtu", &mtu]).map_err(fail)?;
        }
        netns::ip(&["-n", &switch, "link", "set", "br0", "mtu", &mtu]).map_err(|source| {
            ClusterError::Mtu {
                host: "br0".into(),
                source,
            }
        })?;
        Ok(())
    }

    /// Stops everything and removes what `up` created, as described in the
    /// [module documentation](self). Carries on past failures; returns them all.
    pub fn down(mut self) -> Result<(), ClusterError> {
        self.teardown()
    }

    /// Leaves the cluster running and gives up responsibility for it: the daemons, namespaces
    /// and files stay (`cluster.json` describes them) and Drop does nothing. Later,
    /// [`Cluster::load`] + [`Cluster::down`] (or `sf cluster down`) removes them.
    pub fn detach(mut self) -> ClusterRecord {
        self.finished = true;
        self.record.clone()
    }

    fn write_files(
        &mut self,
        limits: &config::Limits,
        mcdist: &toml::Table,
    ) -> Result<(), ClusterError> {
        for host in &self.record.hosts {
            fs::create_dir_all(&host.state_dir).map_err(|source| ClusterError::CreateDir {
                path: host.state_dir.clone(),
                source,
            })?;
            // A socket left by an earlier run would look ready before the daemon is.
            remove_if_present(&host.socket)?;
        }
        ClusterKey::generate()
            .save(&self.record.key_file)
            .map_err(|source| ClusterError::Key { source })?;
        for host in &self.record.hosts {
            let text = config::render(
                host,
                &self.record.hosts,
                &self.record.key_file,
                limits,
                mcdist,
            );
            fs::write(&host.config, text).map_err(|source| ClusterError::WriteFile {
                path: host.config.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn build_network(&mut self) -> Result<(), ClusterError> {
        let switch = self.record.switch.clone();
        self.add_namespace(&switch)?;
        netns::ip(&[
            "-n",
            &switch,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])
        .and_then(|_| netns::ip(&["-n", &switch, "link", "set", "br0", "up"]))
        .map_err(|source| ClusterError::CreateBridge {
            netns: switch.clone(),
            source,
        })?;
        plain_switch(&switch).map_err(|source| ClusterError::BridgeFirewall {
            netns: switch.clone(),
            source,
        })?;
        for i in 0..self.record.hosts.len() {
            let host = self.record.hosts[i].clone();
            self.add_namespace(&host.netns)?;
            // The switch-side end is named after the host namespace, e.g. `sfab12cd-h3`.
            let port = host.netns.as_str();
            netns::ip(&[
                "-n",
                &host.netns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                &switch,
            ])
            .and_then(|_| netns::ip(&["-n", &switch, "link", "set", port, "master", "br0", "up"]))
            .map_err(|source| ClusterError::CreateLink {
                host: host.name.clone(),
                source,
            })?;
            let address = format!("{}/24", host.address);
            let steps: [&[&str]; 4] = [
                &["-n", &host.netns, "link", "set", "lo", "up"],
                &["-n", &host.netns, "addr", "add", &address, "dev", "eth0"],
                &["-n", &host.netns, "link", "set", "eth0", "up"],
                &[
                    "-n",
                    &host.netns,
                    "route",
                    "add",
                    "224.0.0.0/4",
                    "dev",
                    "eth0",
                ],
            ];
            for step in steps {
                netns::ip(step).map_err(|source| ClusterError::ConfigureHost {
                    host: host.name.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn add_namespace(&mut self, name: &str) -> Result<(), ClusterError> {
        netns::ip(&["netns", "add", name]).map_err(|source| ClusterError::CreateNamespace {
            netns: name.to_owned(),
            source,
        })?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    fn spawn(&mut self, index: usize) -> Result<(), ClusterError> {
        let host = &self.record.hosts[index];
        remove_if_present(&host.socket)?;
        let daemon =
            Daemon::spawn(host, &self.record.sfd, &self.record.log_filter).map_err(|source| {
                ClusterError::SpawnDaemon {
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
    fn wait_ready(&mut self, which: &[usize], timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        let mut pending = which.to_vec();
        let mut pause = Duration::from_millis(5);
        loop {
            let mut still = Vec::new();
            for &i in &pending {
                let host = &self.record.hosts[i];
                if let Some(daemon) = self.daemons[i].as_mut() {
                    let ended = daemon.exit_status().map_err(|source| ClusterError::Watch {
                        host: host.name.clone(),
                        source,
                    })?;
                    if let Some(status) = ended {
                        return Err(ClusterError::DaemonExited {
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
            let Some(&first) = still.first() else {
                return Ok(());
            };
            let now = Instant::now();
            if now >= deadline {
                let host = &self.record.hosts[first];
                return Err(ClusterError::DaemonNotReady {
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

    /// Stops the daemons of hosts `which`: SIGTERM and up to `grace` (skipped when zero), then
    /// SIGKILL for survivors and up to [`KILL_TIMEOUT`]. Daemons that ended are dropped from
    /// their slot. Returns the failures.
    fn stop(&mut self, which: &[usize], grace: Duration) -> Vec<ClusterError> {
        let mut failures = Vec::new();
        let mut phases = vec![(libc::SIGKILL, KILL_TIMEOUT)];
        if !grace.is_zero() {
            phases.insert(0, (libc::SIGTERM, grace));
        }
        for (signal, bound) in phases {
            let mut signalled = Vec::new();
            for &i in which {
                let name = &self.record.hosts[i].name;
                let Some(daemon) = self.daemons[i].as_mut() else {
                    continue;
                };
                match daemon.signal(signal) {
                    Ok(()) => signalled.push(i),
                    Err(source) => failures.push(ClusterError::Signal {
                        host: name.clone(),
                        pid: daemon.pid(),
                        source,
                    }),
                }
            }
            let deadline = Instant::now() + bound;
            let mut pause = Duration::from_millis(5);
            loop {
                signalled.retain(
                    |&i| match self.daemons[i].as_mut().map(Daemon::exit_status) {
                        Some(Ok(None)) => true,
                        _ => {
                            self.daemons[i] = None;
                            false
                        }
                    },
                );
                let now = Instant::now();
                if signalled.is_empty() || now >= deadline {
                    break;
                }
                thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
        for &i in which {
            if let Some(daemon) = &self.daemons[i] {
                failures.push(ClusterError::StillRunning {
                    host: self.record.hosts[i].name.clone(),
                    pid: daemon.pid(),
                    waited: KILL_TIMEOUT,
                });
            }
        }
        failures
    }

    /// Records that host `index` has no daemon (if it has none left).
    fn forget(&mut self, index: usize) -> Result<(), ClusterError> {
        if self.daemons[index].is_none() && self.record.hosts[index].pid.take().is_some() {
            self.record.save()?;
        }
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), ClusterError> {
        self.finished = true;
        let all: Vec<usize> = (0..self.record.hosts.len()).collect();
        let mut failures = self.stop(&all, self.stop_timeout);
        let namespaces: Vec<String> = self.namespaces.drain(..).rev().collect();
        remove_namespaces(&namespaces, &mut failures);
        failures.extend(self.remove_files());
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Teardown {
                prefix: self.record.prefix.clone(),
                failures,
            })
        }
    }

    fn remove_files(&self) -> Vec<ClusterError> {
        let keep_logs = std::env::var_os(KEEP_LOGS_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        let mut failures = Vec::new();
        for host in &self.record.hosts {
            let result = if keep_logs {
                remove_all_but(&host.state_dir, &host.log)
            } else {
                match fs::remove_dir_all(&host.state_dir) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            };
            if let Err(source) = result {
                failures.push(ClusterError::RemoveFile {
                    path: host.state_dir.clone(),
                    source,
                });
            }
        }
        for path in [&self.record.key_file, &self.record.dir.join(STATE_FILE)] {
            if let Err(e) = remove_if_present(path) {
                failures.push(e);
            }
        }
        // Only if empty: the directory may hold things that are not ours.
        let _ = fs::remove_dir(&self.record.dir);
        failures
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!("snowflock cluster {}: {}", self.record.prefix, chain(&e));
        }
    }
}

/// Where `br_netfilter` (loaded by container runtimes, among others) keeps its switches: on,
/// every frame the bridge forwards runs the host's IPv4, IPv6 and ARP firewall hooks.
const BRIDGE_FIREWALL_SYSCTLS: [&str; 3] = [
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
    "/proc/sys/net/bridge/bridge-nf-call-arptables",
];

/// Makes the bridges of namespace `switch` plain L2 switches: turns off `br_netfilter`'s
/// firewall hooks there (the switches are per namespace; other namespaces keep theirs), which
/// would otherwise cost every forwarded frame a pass through the firewall. Without
/// `br_netfilter` there is nothing to turn off.
fn plain_switch(switch: &str) -> io::Result<()> {
    let switch = switch.to_owned();
    // /proc/sys/net belongs to the namespace of the thread that opens it.
    thread::spawn(move || -> io::Result<()> {
        netns::enter(&switch)?;
        for path in BRIDGE_FIREWALL_SYSCTLS {
            match fs::write(path, "0") {
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// Deletes every namespace a cluster with `prefix` would have (`{prefix}-sw`, `{prefix}-h{N}`),
/// first SIGKILLing the processes inside each (bounded by [`KILL_TIMEOUT`] per namespace).
/// For cleaning up when `cluster.json` is lost; files are not touched. Returns the namespaces
/// it deleted.
pub fn purge_prefix(prefix: &str) -> Result<Vec<String>, ClusterError> {
    validate_prefix(prefix)?;
    let mut names =
        netns::list(prefix).map_err(|source| ClusterError::ListNamespaces { source })?;
    // Hosts before the switch.
    names.sort_by_key(|name| name.ends_with("-sw"));
    let mut failures = Vec::new();
    remove_namespaces(&names, &mut failures);
    if failures.is_empty() {
        Ok(names)
    } else {
        Err(ClusterError::Teardown {
            prefix: prefix.to_owned(),
            failures,
        })
    }
}

/// Kills the processes in, then deletes, each of `names` in order; missing ones are skipped.
fn remove_namespaces(names: &[String], failures: &mut Vec<ClusterError>) {
    for name in names {
        match netns::kill_processes_in(name, KILL_TIMEOUT) {
            Ok(alive) if alive.is_empty() => {}
            Ok(pids) => failures.push(ClusterError::NamespaceBusy {
                netns: name.clone(),
                pids,
                waited: KILL_TIMEOUT,
            }),
            Err(source) => failures.push(ClusterError::KillNamespace {
                netns: name.clone(),
                source,
            }),
        }
        if netns::exists(name)
            && let Err(source) = netns::ip(&["netns", "delete", name])
        {
            failures.push(ClusterError::DeleteNamespace {
                netns: name.clone(),
                source,
            });
        }
    }
}

fn remove_if_present(path: &Path) -> Result<(), ClusterError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ClusterError::RemoveFile {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Removes everything in `dir` except the file `keep`.
fn remove_all_but(dir: &Path, keep: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path == keep {
            continue;
        }
        if fs::symlink_metadata(&path)?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Whether `path` is a file only its owner can read or write (mode `0600` or stricter).
pub fn is_private(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_lowercase_alphanumerics() {
        let drawn = random_prefix().unwrap();
        assert_eq!(drawn.len(), 8);
        validate_prefix(&drawn).unwrap();
        for good in ["a", "sf01", "abcdefgh"] {
            validate_prefix(good).unwrap();
        }
        for bad in ["", "abcdefghi", "Sf01", "sf-1", "sf_1", "sf 1"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
        // The longest derived interface name fits IFNAMSIZ - 1.
        assert!(format!("{}-h{MAX_HOSTS}", "x".repeat(MAX_PREFIX_LEN)).len() <= 15);
    }

    #[test]
    fn the_config_lists_every_member_and_parses_as_the_documented_layout() {
        let record =
            ClusterRecord::new("sft", Path::new("/run/c"), 2, Path::new("/bin/sfd"), "info");
        let mut extra = toml::Table::new();
        extra.insert("prefetch_pages".into(), toml::Value::Integer(3));
        let limits = config::Limits {
            clone_slots: 16,
            fetch_timeout_ms: 5000,
            peer_timeout_ms: Some(700),
            extra: &extra,
        };
        let mut mcdist = toml::Table::new();
        mcdist.insert("rx_path".into(), toml::Value::String("sockets".into()));
        let text = config::render(
            &record.hosts[1],
            &record.hosts,
            &record.key_file,
            &limits,
            &mcdist,
        );
        let doc: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(doc["host"]["name"].as_str(), Some("h2"));
        assert_eq!(doc["host"]["state_dir"].as_str(), Some("/run/c/h2"));
        assert_eq!(doc["listen"]["control"].as_str(), Some("10.77.0.2:7070"));
        assert_eq!(doc["listen"]["pages"].as_str(), Some("10.77.0.2:7071"));
        assert_eq!(
            doc["cluster"]["key_file"].as_str(),
            Some("/run/c/cluster.key")
        );
        let members = doc["cluster"]["members"].as_array().unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[0]["name"].as_str(), Some("h1"));
        assert_eq!(members[0]["control"].as_str(), Some("10.77.0.1:7070"));
        assert_eq!(doc["limits"]["clone_slots"].as_integer(), Some(16));
        assert_eq!(doc["limits"]["fetch_timeout_ms"].as_integer(), Some(5000));
        assert_eq!(doc["limits"]["peer_timeout_ms"].as_integer(), Some(700));
        assert_eq!(doc["limits"]["prefetch_pages"].as_integer(), Some(3));
        assert_eq!(doc["mcdist"]["rx_path"].as_str(), Some("sockets"));
    }

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
        assert!(matches!(err, ClusterError::BadState { .. }), "{err}");

        let mut record = ClusterRecord::new("sft", dir.path(), 1, Path::new("/bin/sfd"), "x");
        record.version = 99;
        record.save().unwrap();
        let err = ClusterRecord::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");
    }

    #[test]
    fn keeping_logs_removes_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("h1");
        fs::create_dir_all(host.join("vms/1")).unwrap();
        for file in ["sfd.log", "sfd.toml", "sfd.sock", "vms/1/state"] {
            fs::write(host.join(file), "x").unwrap();
        }
        remove_all_but(&host, &host.join("sfd.log")).unwrap();
        let left: Vec<_> = fs::read_dir(&host)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["sfd.log"]);
        remove_all_but(&dir.path().join("missing"), &host).unwrap();
    }

    #[test]
    fn invalid_specs_are_refused_before_anything_exists() {
        let dir = tempfile::tempdir().unwrap();
        let sfd = dir.path().join("sfd");
        fs::write(&sfd, "").unwrap();
        let state = dir.path().join("state");
        let check = |spec: ClusterSpec, needle: &str| {
            let err = Cluster::up(spec).unwrap_err();
            assert!(matches!(err, ClusterError::InvalidSpec { .. }), "{err}");
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
    }
}
