//! What the cluster's operations can fail with: one error type per operation, each variant named
//! after the step that failed. Operations that share steps (starting a daemon, stopping one,
//! saving the record) share the error type of those steps, wrapped transparently, so a message
//! reads the same whichever operation ran the step.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use snowflock_control::error_chain;
use snowflock_dataplane::auth::SaveKeyError;

use crate::command::CommandError;

/// A spec [`NetnsCluster::up`](crate::NetnsCluster::up) refuses before creating anything, or a
/// prefix [`validate_prefix`](crate::validate_prefix) refuses.
#[derive(Debug, thiserror::Error)]
#[error("invalid cluster spec: {problem}")]
pub struct InvalidSpec {
    pub problem: String,
}

/// Drawing a random prefix ([`random_prefix`](crate::random_prefix)).
#[derive(Debug, thiserror::Error)]
#[error("the random source failed: {problem}")]
pub struct RandomSourceError {
    pub problem: String,
}

/// Reading and checking `cluster.json` ([`ClusterRecord::load`](crate::ClusterRecord::load)).
#[derive(Debug, thiserror::Error)]
pub enum LoadRecordError {
    #[error("reading cluster state {}", .path.display())]
    ReadState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a usable cluster state file: {problem}", .path.display())]
    BadState { path: PathBuf, problem: String },
}

/// Writing `cluster.json`.
#[derive(Debug, thiserror::Error)]
#[error("writing {}", .path.display())]
pub struct SaveRecordError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Starting one host's daemon and waiting for its socket (when a cluster comes up, and when a
/// stopped host is started again).
#[derive(Debug, thiserror::Error)]
pub enum StartDaemonError {
    /// Removing the socket an earlier daemon left.
    #[error("removing {}", .path.display())]
    RemoveFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting sfd for {host}")]
    SpawnDaemon {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("watching sfd of {host}")]
    Watch {
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
}

/// Stopping one host's daemon (SIGTERM, then SIGKILL).
#[derive(Debug, thiserror::Error)]
pub enum StopDaemonError {
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
}

/// Bringing up a cluster's Slurm (munged, slurmctld, one slurmd per host) until every node is
/// idle.
#[derive(Debug, thiserror::Error)]
pub enum StartSlurmError {
    #[error(
        "{program} is not installed: not on PATH nor in /usr/sbin, /sbin, /usr/bin or /bin \
         (Debian packages: {})",
        crate::slurm::DEBIAN_PACKAGES
    )]
    MissingProgram { program: String },
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
    #[error("drawing the munge key")]
    MungeKey(#[source] RandomSourceError),
    #[error("starting {daemon}")]
    Spawn {
        daemon: String,
        #[source]
        source: io::Error,
    },
    #[error("watching {daemon}")]
    Watch {
        daemon: String,
        #[source]
        source: io::Error,
    },
    #[error("{daemon} exited while Slurm was coming up ({status}); last lines of {}:\n{tail}", .log.display())]
    DaemonExited {
        daemon: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("Slurm was not up within {waited:?}: still waiting for {waiting_for}{logs}")]
    NotReady {
        waited: Duration,
        /// What was missing at the deadline, with the last observation.
        waiting_for: String,
        /// The last lines of every Slurm daemon's log, each under a heading.
        logs: String,
    },
}

/// Stopping one of a cluster's Slurm daemons (SIGTERM, then SIGKILL).
#[derive(Debug, thiserror::Error)]
pub enum StopSlurmError {
    #[error("signalling {daemon} (pid {pid})")]
    Signal {
        daemon: String,
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("{daemon} (pid {pid}) survived SIGKILL for {waited:?}")]
    StillRunning {
        daemon: String,
        pid: u32,
        waited: Duration,
    },
}

/// [`NetnsCluster::up`](crate::NetnsCluster::up).
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    InvalidSpec(#[from] InvalidSpec),
    #[error(transparent)]
    RandomPrefix(#[from] RandomSourceError),
    #[error("listing network namespaces in /run/netns")]
    ListNamespaces {
        #[source]
        source: io::Error,
    },
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
    #[error("creating directory {}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    SaveRecord(#[from] SaveRecordError),
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
    #[error("writing {}", .path.display())]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating namespace {netns}")]
    CreateNamespace {
        netns: String,
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
    #[error(transparent)]
    StartSlurm(#[from] StartSlurmError),
    #[error(transparent)]
    StartDaemon(#[from] StartDaemonError),
}

/// [`NetnsCluster::load`](crate::NetnsCluster::load).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Record(#[from] LoadRecordError),
    #[error("watching sfd of {host}")]
    Watch {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("watching {daemon}")]
    WatchSlurm {
        daemon: String,
        #[source]
        source: io::Error,
    },
    #[error("listing network namespaces in /run/netns")]
    ListNamespaces {
        #[source]
        source: io::Error,
    },
}

/// A host index past the end of the cluster.
#[derive(Debug, thiserror::Error)]
#[error("no host index {index}: the cluster has {hosts} hosts (indices 0..{hosts})")]
pub struct NoSuchHost {
    pub index: usize,
    pub hosts: usize,
}

/// Killing, stopping or starting one host's daemon
/// ([`NetnsCluster::kill_host`](crate::NetnsCluster::kill_host) and its siblings).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    NoSuchHost(#[from] NoSuchHost),
    #[error("sfd of {host} is already running (pid {pid})")]
    AlreadyRunning { host: String, pid: u32 },
    #[error(transparent)]
    StopDaemon(#[from] StopDaemonError),
    #[error(transparent)]
    StartDaemon(#[from] StartDaemonError),
    #[error(transparent)]
    SaveRecord(#[from] SaveRecordError),
}

/// [`NetnsCluster::impair`](crate::NetnsCluster::impair).
#[derive(Debug, thiserror::Error)]
#[error("impairing the switch port of {host}")]
pub struct ImpairError {
    pub host: String,
    #[source]
    pub source: CommandError,
}

/// [`NetnsCluster::mangle`](crate::NetnsCluster::mangle).
#[derive(Debug, thiserror::Error)]
pub enum MangleError {
    #[error("loading the mangling program's object")]
    Load(#[source] aya::EbpfError),
    #[error("the mangling program's object has no program `mangle`")]
    NoProgram,
    #[error("loading the mangling program into the kernel")]
    Program(#[source] aya::programs::ProgramError),
    #[error("entering the switch namespace {netns}")]
    EnterSwitch {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching the mangling program to the switch port of {host}")]
    Attach {
        host: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the thread attaching the mangling program panicked")]
    AttachThread,
    #[error("the mangling program's object has no map `counters`")]
    NoCounters,
    #[error("the mangling program's map `counters` is not an array of u64")]
    Counters(#[source] aya::maps::MapError),
}

/// [`NetnsCluster::mangle_counts`](crate::NetnsCluster::mangle_counts).
#[derive(Debug, thiserror::Error)]
#[error("reading the mangling program's counters")]
pub struct MangleCountsError(#[source] pub aya::maps::MapError);

/// [`NetnsCluster::set_link`](crate::NetnsCluster::set_link).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    NoSuchHost(#[from] NoSuchHost),
    #[error("setting the switch port of {host} {state}")]
    Command {
        host: String,
        state: &'static str,
        #[source]
        source: CommandError,
    },
}

/// [`NetnsCluster::impairment_counts`](crate::NetnsCluster::impairment_counts).
#[derive(Debug, thiserror::Error)]
pub enum ImpairCountsError {
    #[error("reading the queue counters of the switch port of {host}")]
    Command {
        host: String,
        #[source]
        source: CommandError,
    },
    #[error(
        "reading the queue counters of the switch port of {host}: `tc` printed no JSON this parser understands"
    )]
    Parse {
        host: String,
        #[source]
        source: serde_json::Error,
    },
}

/// [`NetnsCluster::slurm`](crate::NetnsCluster::slurm).
#[derive(Debug, thiserror::Error)]
pub enum SlurmCommandError {
    #[error("cluster {prefix} runs no Slurm (it was brought up without it)")]
    NoSlurm { prefix: String },
    #[error(transparent)]
    Run(#[from] CommandError),
}

/// [`NetnsCluster::set_mtu`](crate::NetnsCluster::set_mtu).
#[derive(Debug, thiserror::Error)]
#[error("setting the MTU of {host}")]
pub struct MtuError {
    pub host: String,
    #[source]
    pub source: CommandError,
}

/// One step of a teardown that failed; teardown carries on past it.
#[derive(Debug, thiserror::Error)]
pub enum TeardownFailure {
    #[error(transparent)]
    StopDaemon(#[from] StopDaemonError),
    #[error(transparent)]
    StopSlurm(#[from] StopSlurmError),
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
    #[error("deleting namespace {netns}")]
    DeleteNamespace {
        netns: String,
        #[source]
        source: CommandError,
    },
    #[error("removing {}", .path.display())]
    RemoveFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// [`NetnsCluster::down`](crate::NetnsCluster::down): every step that failed.
#[derive(Debug, thiserror::Error)]
#[error("tearing down cluster {prefix} failed:{}", Failures(.failures))]
pub struct TeardownError {
    pub prefix: String,
    pub failures: Vec<TeardownFailure>,
}

/// Lists teardown failures, each with its full source chain.
struct Failures<'a>(&'a [TeardownFailure]);

impl fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for failure in self.0 {
            write!(f, "\n  - {}", error_chain(failure))?;
        }
        Ok(())
    }
}

/// [`purge_prefix`](crate::purge_prefix).
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error(transparent)]
    InvalidPrefix(#[from] InvalidSpec),
    #[error("listing network namespaces in /run/netns")]
    ListNamespaces {
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Teardown(#[from] TeardownError),
}
