//! A local multi-host snowflock cluster for tests and benchmarks: several `sfd` hosts on one
//! machine, each in a network namespace of its own, joined by one Linux bridge.
//!
//! Used by `sf cluster up|down|status|impair`, by the multi-host integration tests and by the
//! `perf` scenarios.
//!
//! ```no_run
//! use snowflock_testkit::{ClusterSpec, NetnsCluster};
//!
//! let spec = ClusterSpec::new(3, "/tmp/sf-cluster", "target/debug/sfd");
//! let cluster = NetnsCluster::up(spec)?;
//! for host in cluster.hosts() {
//!     println!("{} {} {}", host.name, host.address, host.socket.display());
//! }
//! cluster.down()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What [`NetnsCluster::up`] creates
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
//! With [`ClusterSpec::slurm`], a Slurm cluster runs on the hosts too (see [below](#slurm)).
//!
//! `up` returns once every socket accepts a connection. It fails if a daemon exits first (the
//! error carries the tail of its log) or if the sockets are not all ready within
//! [`ClusterSpec::ready_timeout`] (20 s by default, one deadline for all hosts). A failed `up`
//! removes everything it created before returning.
//!
//! # Slurm
//!
//! With [`ClusterSpec::slurm`], [`NetnsCluster::up`] also runs a Slurm cluster on the hosts,
//! from the distribution's Slurm 22.05 and munge (Debian packages `munge`, `slurmctld`,
//! `slurmd`, `slurm-client`), after the namespaces exist and before the daemons start:
//!
//! - `DIR/slurm/slurm.conf`: cluster `P`, controller `h1` at `10.77.0.1:`[`SLURMCTLD_PORT`],
//!   node `h{i}` at `10.77.0.{i}:`[`SLURMD_PORT`] declaring [`ClusterSpec::slurm_cpus`] CPUs
//!   (the host's clone slots by default), every node in partition [`SLURM_PARTITION`] (the
//!   default); munge authentication, no accounting, no cgroups (and `DIR/slurm/cgroup.conf`
//!   saying so);
//! - `munged` (a fresh key `DIR/slurm/munge/munge.key`, socket `DIR/slurm/munge/munge.socket`)
//!   and `slurmctld -D` in `P-h1`, and `slurmd -D -N h{i}` in each `P-h{i}`: each in a session
//!   and a UTS namespace of its own, hostname its host's name, logging to
//!   `DIR/slurm/munge/munged.log`, `DIR/slurm/slurmctld.log` or `DIR/slurm/h{i}/slurmd.log`;
//!   the controller's state is in `DIR/slurm/state`, each node's spool and pid file in
//!   `DIR/slurm/h{i}`;
//! - every host's `sfd.toml` gets `[allocation] backend = "slurm"` and `slurm_conf`.
//!
//! `up` waits until `sinfo` lists every node idle, failing early if a Slurm daemon exits and
//! after [`SLURM_READY_TIMEOUT`] (30 s) otherwise, with the tails of the Slurm logs either way.
//! The daemons' pids go into `cluster.json`. [`NetnsCluster::slurm`] runs a Slurm command
//! against the cluster; by hand, `SLURM_CONF=DIR/slurm/slurm.conf ip netns exec P-h1 squeue`.
//!
//! # What [`NetnsCluster::down`] removes
//!
//! 1. Each daemon gets SIGTERM; those still running after [`ClusterSpec::stop_timeout`]
//!    (10 s by default, one deadline for all) get SIGKILL and [`KILL_TIMEOUT`] more. Then the
//!    Slurm daemons likewise: the slurmds and slurmctld first, munged last.
//! 2. Every other process still inside a cluster namespace gets SIGKILL (bounded likewise).
//! 3. Every cluster namespace is deleted (which deletes its veth ends and the bridge).
//! 4. The runtime files: `cluster.json`, `cluster.key`, each `DIR/h{i}` directory (daemon
//!    files included) and `DIR/slurm`. If the environment variable [`KEEP_LOGS_ENV`]
//!    (`SF_KEEP_LOGS`) is set to anything but empty or `0`, each `DIR/h{i}/sfd.log` and the
//!    Slurm daemons' logs are kept. `DIR` itself is removed if that leaves it empty; nothing
//!    else in `DIR` is touched.
//!
//! `down` carries on past failures and reports them all at the end. Dropping a
//! [`NetnsCluster`] without calling `down` (an early return, a panicking test) runs the same
//! teardown and prints failures to stderr; [`NetnsCluster::detach`] is the only way to leave a
//! cluster running.
//! A process killed outright (SIGKILL, Ctrl-C on a test run) runs no destructor: run
//! `sf cluster down --dir DIR` (it reads `cluster.json`), or `sf cluster down --prefix P`.
//!
//! # Bounds
//!
//! Every wait has a deadline: each `ip` command and each Slurm command [`IP_TIMEOUT`],
//! readiness [`ClusterSpec::ready_timeout`] (Slurm's [`SLURM_READY_TIMEOUT`]), graceful stop
//! [`ClusterSpec::stop_timeout`], each SIGKILL [`KILL_TIMEOUT`]. Polling loops sleep between attempts (5-50 ms), so their count is bounded
//! by their deadline. Signals go through pidfds, so a pid reused by an unrelated process is
//! never signalled; a daemon started by another process is only adopted if its command line
//! still names its host's `sfd.toml` (a Slurm daemon: the cluster's `slurm.conf`, munged: its
//! socket).
//!
//! # Safety of the network
//!
//! Addresses (`10.77.0.0/24`) exist only on the cluster's own `eth0` links; hosts have no
//! default route and the switch namespace has no uplink, so cluster traffic cannot leave the
//! cluster. Two clusters (different prefixes) are fully separate even though they use the same
//! addresses. The Slurm daemons run in the host namespaces as well, and munged's socket is a
//! file in `DIR`.

mod bpf;
mod cluster;
mod command;
mod config;
mod error;
mod files;
mod impair;
mod mangle;
mod netns;
mod network;
mod prefix;
mod process;
mod record;
mod slurm;
mod spec;

pub use cluster::NetnsCluster;
pub use command::{CommandError, IP_TIMEOUT};
pub use error::{
    HostError, ImpairCountsError, ImpairError, InvalidSpec, LinkError, LoadError, LoadRecordError,
    MangleCountsError, MangleError, MtuError, NoSuchHost, PurgeError, RandomSourceError,
    SaveRecordError, SlurmCommandError, StartDaemonError, StartSlurmError, StopDaemonError,
    StopSlurmError, TeardownError, TeardownFailure, UpError,
};
pub use files::KEEP_LOGS_ENV;
pub use impair::ImpairmentCounts;
pub use mangle::MangleCounts;
pub use netns::enter as enter_netns;
pub use network::purge_prefix;
pub use prefix::{MAX_PREFIX_LEN, random_prefix, validate_prefix};
pub use process::KILL_TIMEOUT;
pub use record::{
    CONTROL_PORT, ClusterRecord, HostInfo, HostStatus, KEY_FILE, MAX_HOSTS, PAGES_PORT, STATE_FILE,
    SlurmDaemonInfo, SlurmDaemonKind, SlurmDaemonStatus, SlurmRecord, host_address,
};
pub use slurm::{SLURM_PARTITION, SLURM_READY_TIMEOUT, SLURMCTLD_PORT, SLURMD_PORT};
pub use spec::{
    ClusterSpec, DEFAULT_CLONE_SLOTS, DEFAULT_FETCH_TIMEOUT_MS, DEFAULT_READY_TIMEOUT,
    DEFAULT_STOP_TIMEOUT, UpProgress,
};
