//! Messages of the local API (CLI ↔ `sfd`, Unix socket) and of the
//! inter-host control protocol (`sfd` ↔ `sfd`, TCP). Framing and
//! authentication are in [`crate::wire`].

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snowflock_fault_handler::{CloneStats, FamilyStats};

use crate::supervisor::{VmInfo, VmOutcome};

/// A request from the CLI to its host's daemon. One per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ApiRequest {
    /// Boot a flock image.
    Start {
        name: String,
        image: Vec<u8>,
        mem_size: u64,
        cmdline: String,
    },
    /// Stream a VM's console (and its clones') until it ends.
    Wait { vm: u64 },
    /// Clone a running VM from outside: `clones` copies spread over the cluster.
    Clone { vm: u64, clones: u32 },
    /// VMs on every host of the cluster.
    Ps,
    /// End a VM on `host` (this host when `None`).
    Kill { host: Option<String>, vm: u64 },
    /// Fault counters of every hollow clone and host of the cluster.
    Stats,
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
    Killed,
    Stats {
        hosts: Vec<HostStats>,
    },
    Error {
        message: String,
    },
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
    pub served_families: u32,
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
    pub checkpoint: u64,
    /// Copies of a VM paused from outside rather than guest clones.
    pub external: bool,
    /// (child id, console label) of each clone.
    pub children: Vec<(u32, String)>,
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
