//! Messages of the local API (CLI ↔ `sfd`, Unix socket) and of the
//! inter-host control protocol (`sfd` ↔ `sfd`, TCP). Framing and
//! authentication are in [`crate::wire`].

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snowflock_dataplane::mcast::{McastServerStats, ReceiverStats};
use snowflock_fault_handler::{CloneStats, FamilyStats};

use crate::config::{Distribution, RxPath, XdpAttachMode};
use crate::outcome::VmOutcome;
use crate::supervisor::{StartOptions, VmInfo};

/// A request from the CLI to its host's daemon. One per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ApiRequest {
    /// Boot a flock image.
    Start {
        name: String,
        image: Vec<u8>,
        mem_size: u64,
        cmdline: String,
        /// A Linux-ABI program's host files (host paths absolute) and
        /// system-call options.
        linux: StartOptions,
        /// Stream the VM's console on this connection after `Started`, as
        /// `Wait` does, from its first line: a short VM may end before a
        /// separate `Wait` could attach.
        wait: bool,
    },
    /// Stream a VM's console (and its clones') until it ends.
    Wait { vm: u64 },
    /// What a VM's clone operations got so far.
    Progress { vm: u64 },
    /// Clone a running VM from outside: `clones` copies spread over the cluster.
    Clone { vm: u64, clones: u32 },
    /// VMs on every host of the cluster.
    Ps,
    /// End a VM on `host` (this host when `None`).
    Kill { host: Option<String>, vm: u64 },
    /// Fault counters of every hollow clone and host of the cluster.
    Stats,
    /// This host's page transport: receive path, XDP program, queues, rings, counters.
    NetShow,
    /// Change this host's receive path settings and NIC queues or rings.
    NetTune(NetTune),
    /// This host's cluster keys and rotation.
    KeyShow,
    /// Start moving this host to the cluster key `key` (64 hex digits) over `window`
    /// (`snowflock_dataplane::keyring`), and save it as the host's key file.
    KeyRotate { key: String, window: Duration },
}

/// The daemon's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ApiResponse {
    Started {
        vm: u64,
    },
    /// A console line of the VM being waited for, or of one of its clones.
    Console {
        label: String,
        line: String,
    },
    /// The VM ended; `reports` are its clone operations.
    Ended {
        outcome: VmOutcome,
        reports: Vec<CloneSummary>,
    },
    Cloned {
        /// How long the VM was paused for the capture.
        pause: Duration,
        descriptor_bytes: u64,
        /// Where the clones run: (host, console label).
        clones: Vec<(String, String)>,
    },
    Ps {
        hosts: Vec<HostVms>,
    },
    Progress(VmProgress),
    Killed,
    Stats {
        hosts: Vec<HostStats>,
    },
    Net(Box<NetStatus>),
    Keys(KeyStatus),
    Error {
        message: String,
    },
}

/// A host's cluster keys, by id (public fingerprints, never the keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The newest key.
    pub current: String,
    /// The key this host proves and seals with now.
    pub sending: String,
    /// The key being retired, while it is still accepted.
    pub retiring: Option<String>,
    /// `settled`, `introducing` (the old key is still sent with) or `retiring` (the old key
    /// is still accepted).
    pub phase: String,
    /// Until the phase ends.
    pub remaining: Duration,
    /// The key file the newest key is saved in.
    pub key_file: std::path::PathBuf,
}

/// A VM's clones so far, as `sf start --wait` shows them while it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProgress {
    /// Clones its tickets asked for.
    pub requested: u64,
    /// Slots they were granted.
    pub granted: u64,
    /// Clones started (children of clone calls), running or not.
    pub started: u64,
    /// Of those, clones running guest code now.
    pub running: u64,
    pub ended: u64,
}

/// One clone operation of a VM, as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneSummary {
    pub ticket: u64,
    pub clones: u32,
    pub capture_pause: Duration,
    pub descriptor_bytes: u64,
    /// Pages of the parent's memory holding data at the clone point.
    pub data_pages: u64,
    /// From the clone call to the last child running guest code.
    pub all_running: Option<Duration>,
    /// The Slurm allocation its clones ran in.
    #[serde(default)]
    pub slurm_job: Option<u64>,
    pub children: Vec<ChildSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildSummary {
    pub id: u32,
    /// `None` for a clone on the parent's host.
    pub host: Option<String>,
    pub runtime: Duration,
    pub outcome: VmOutcome,
}

/// The VMs of one host, or why it did not answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostVms {
    pub host: String,
    pub vms: Result<Vec<VmInfo>, String>,
}

/// Fault counters of one host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostStats {
    pub host: String,
    /// Set when the host did not answer.
    pub error: Option<String>,
    /// Hollow clones on this host, running and recently ended.
    pub clones: Vec<CloneStatsEntry>,
    /// Page caches of clone points on this host.
    pub families: Vec<FamilyEntry>,
    /// This host's memory server.
    pub served_pages: u64,
    pub served_bytes: u64,
    /// Of the pages served, those multicast before any clone asked (push).
    #[serde(default)]
    pub pushed_pages: u64,
    /// Of the pages pushed, those a recorded working set put first.
    #[serde(default)]
    pub push_led_pages: u64,
    pub served_families: u32,
    /// Bytes of `/out` files that clones on other hosts sent here and this
    /// host wrote into its jobs' output directories.
    #[serde(default)]
    pub clone_output_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneStatsEntry {
    pub vm: u64,
    pub label: String,
    pub family: u64,
    pub running: bool,
    /// How it ended; `None` while it runs.
    pub outcome: Option<VmOutcome>,
    pub stats: CloneStats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FamilyEntry {
    pub family: u64,
    pub parent_host: String,
    pub stats: FamilyStats,
    /// No clone of it runs on the host: its cache is kept for the next ones.
    #[serde(default)]
    pub idle: bool,
}

/// What a parent host tells the host that runs some of its clones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToHost {
    /// First frame after the handshake.
    Hello {
        host: String,
    },
    Request {
        id: u64,
        request: HostRequest,
    },
    Ping,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HostRequest {
    /// Free and total clone slots.
    Capacity,
    /// Reserve up to `slots` slots for clones of a `mem_size`-byte VM.
    Reserve {
        slots: u32,
        mem_size: u64,
    },
    Release {
        reservation: u64,
    },
    /// Start hollow clones in a reservation.
    Launch {
        reservation: u64,
        order: CloneOrder,
    },
    /// End one clone started by this connection.
    KillClone {
        family: u64,
        child: u32,
    },
    /// End any VM on that host (operator request).
    KillVm {
        vm: u64,
    },
    /// The parent host no longer serves clone point `family` (its last
    /// clone ended and no checkpoint keeps it): its page cache can go.
    EndFamily {
        family: u64,
    },
    Ps,
    Stats,
}

/// Clones of one clone point for one host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneOrder {
    pub family: u64,
    /// The encoded descriptor (checked on arrival like a file).
    pub descriptor: Vec<u8>,
    /// The parent host's memory server.
    pub pages: SocketAddr,
    /// Where the clone point's pages are multicast; `None` when the parent host
    /// distributes by unicast only.
    pub mcdist: Option<McastOrder>,
    pub checkpoint: u64,
    /// Copies of a VM paused from outside rather than guest clones.
    pub external: bool,
    /// (child id, console label) of each clone.
    pub children: Vec<(u32, String)>,
}

/// The multicast side of a clone point (see `docs/mcdist.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct McastOrder {
    /// The parent host's mcdist endpoint: requests go here.
    pub server: std::net::SocketAddrV4,
    /// The family's group; fragments arrive on it at the server's port.
    pub group: std::net::Ipv4Addr,
    /// The server's generation of the family.
    pub generation: u32,
    /// The id of the cluster key the family's fragments are sealed under.
    pub key: [u8; 4],
}

/// What a host tells the parent host whose clones it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromHost {
    Hello {
        host: String,
    },
    Response {
        id: u64,
        response: HostResponse,
    },
    Pong,
    ChildStarted {
        family: u64,
        child: u32,
        vm: u64,
        restore: Duration,
    },
    ChildConsole {
        label: String,
        line: String,
    },
    /// Bytes of a file of a Linux-ABI clone's `/out` (path relative to it),
    /// for the parent host to write into the job's output directory.
    ChildOutput {
        family: u64,
        child: u32,
        path: Vec<u8>,
        offset: u64,
        data: Vec<u8>,
    },
    ChildEnded {
        family: u64,
        child: u32,
        outcome: VmOutcome,
        runtime: Duration,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HostResponse {
    Capacity { free: u32, total: u32 },
    Reserved { reservation: u64, granted: u32 },
    Done,
    Launched { vms: Vec<u64> },
    Ps { vms: Vec<VmInfo> },
    Stats(HostStats),
    Error { message: String },
}

/// Settings `sf net tune` changes; `None` leaves one as it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetTune {
    pub rx_path: Option<RxPath>,
    pub xdp_mode: Option<XdpAttachMode>,
    /// RX queues that get an AF_XDP socket; empty = all.
    pub queues: Option<Vec<u32>>,
    pub umem_frames: Option<u32>,
    pub fill_ring: Option<u32>,
    pub rx_ring: Option<u32>,
    pub busy_poll_us: Option<u32>,
    /// The NIC's own RX/TX descriptor rings (ethtool -G).
    pub nic_rx_ring: Option<u32>,
    pub nic_tx_ring: Option<u32>,
    /// The NIC's combined channels (ethtool -L).
    pub nic_channels: Option<u32>,
}

/// A host's page transport, as `sf net show` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetStatus {
    pub host: String,
    pub distribution: Distribution,
    /// The interface the pages address is on.
    pub interface: String,
    pub device: Option<NetDevice>,
    /// The receive path in use: "xdp" or "sockets".
    pub rx_path: String,
    /// Why AF_XDP is not in use, when it was asked for.
    pub fallback: Option<String>,
    pub xdp: Option<XdpStatus>,
    /// What this host's receiver saw (all families since it started).
    pub rx: ReceiverStats,
    /// What this host's server did.
    pub tx: McastServerStats,
    /// Families this host receives pages of, and serves.
    pub families_receiving: u32,
    pub families_serving: u32,
}

/// The interface, as netlink and ethtool report it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetDevice {
    pub ifindex: u32,
    pub mtu: u32,
    pub rx_queues: u32,
    pub tx_queues: u32,
    /// (current, max) RX channels (dedicated plus combined), when the driver reports them.
    pub channels: Option<(u32, u32)>,
    /// (rx, tx, rx max, tx max) ring sizes, when the driver reports them.
    pub rings: Option<(u32, u32, u32, u32)>,
    /// What XDP program is attached and how ("none", "driver 42", ...).
    pub xdp: String,
}

/// The AF_XDP receive path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XdpStatus {
    pub mode: XdpAttachMode,
    pub program_id: u32,
    pub queues: Vec<u32>,
    pub zero_copy: bool,
    pub umem_frames: u32,
    pub frame_size: u32,
    pub fill_ring: u32,
    pub rx_ring: u32,
    pub busy_poll_us: u32,
    /// From the program's counter map.
    pub received: u64,
    pub redirected: u64,
    pub duplicate_dropped: u64,
    pub passed: u64,
    pub malformed: u64,
    /// From the sockets' XDP_STATISTICS, summed.
    pub socket_dropped: u64,
    pub rx_ring_full: u64,
    pub fill_ring_empty: u64,
}
