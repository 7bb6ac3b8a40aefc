//! The seam between the supervisor, which runs VMs on this host, and the
//! cluster, which reserves slots and runs clones on other hosts.
//!
//! A parent's clone slots may lie on several hosts. The supervisor asks its
//! [`Cluster`] for a plan when the guest requests a ticket, starts the local
//! share itself, and hands each remote share to [`Cluster::launch`] together
//! with one [`RemoteChild`] per clone; the cluster reports each child's start
//! and end through those handles. On the receiving host the daemon starts
//! hollow clones with [`crate::Supervisor::start_hollow`].

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snowflock_fault_handler::{CloneStats, Family};
use snowflock_vmm::memory::MemoryImage;

use crate::child::{ChildCell, RemoteTarget};
use crate::descriptor::Descriptor;
use crate::outcome::VmOutcome;
use crate::working_sets::ClonePointKey;

/// Clone slots reserved on another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteGrant {
    pub host: String,
    /// The reservation on that host; its slots return when it is released or used.
    pub reservation: u64,
    pub slots: u32,
}

/// A Slurm job a VM runs in (`sf start --slurm-job` inside a batch job):
/// its id, and its CPUs per node (node names are member names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobScope {
    pub job: u64,
    pub cpus: Vec<(String, u32)>,
}

/// Where a ticket's slots are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Slots to take on this host.
    pub local: u32,
    pub remote: Vec<RemoteGrant>,
    /// The Slurm allocation the slots belong to, released with the ticket.
    pub slurm_job: Option<u64>,
}

/// Clones to start on one host from one clone point.
#[derive(Debug)]
pub struct RemoteLaunch {
    pub descriptor: Arc<Descriptor>,
    /// The children, in id order; each reports through its handle.
    pub children: Vec<RemoteChild>,
    /// `rdx` of the children's return from `clone`/`checkpoint_parent`.
    pub checkpoint: u64,
    /// Label of the parent, for the children's console lines.
    pub parent_label: String,
    /// Copies of a VM paused from outside: they resume as VMs of their own,
    /// without a return value from `clone`.
    pub external: bool,
}

/// Slots and clones on other hosts.
pub trait Cluster: Send + Sync {
    /// Plans `wanted` slots for clones of a VM with `mem_size` bytes of
    /// memory, this host having `local_free` free slots. Remote shares are
    /// already reserved. `owner` names the VM asking, for the scheduler;
    /// `scope`, the Slurm job it runs in, bounds where its slots may be.
    fn plan(
        &self,
        wanted: u32,
        mem_size: u64,
        local_free: u32,
        owner: &str,
        scope: Option<&JobScope>,
    ) -> Plan;
    /// Ends the scheduler's allocation of a [`Plan`] (its ticket was
    /// joined, or its VM ended).
    fn release_allocation(&self, slurm_job: u64);
    /// Returns a reservation that will not be used.
    fn release(&self, grant: RemoteGrant);
    /// Serves `image` to other hosts under `family` until a matching
    /// [`Cluster::retire_image`]; calls nest. `key` names the clone point
    /// across jobs of the same image (`None`: not booted from one): its
    /// recorded working set, if any, leads the push, and what its clones ask
    /// for is recorded for the next job.
    fn serve_image(&self, family: u64, image: Arc<MemoryImage>, key: Option<ClonePointKey>);
    /// Ends one [`Cluster::serve_image`]; after the last, the hosts that
    /// ran clones of `family` are told it ended (their page caches go).
    fn retire_image(&self, family: u64);
    /// Starts clones in a reservation. Returns at once; every child in
    /// `launch` ends through its handle, also when its host is lost.
    fn launch(&self, grant: RemoteGrant, launch: RemoteLaunch);
    /// Ends one remote clone.
    fn kill(&self, host: &str, family: u64, child: u32);
}

/// The parent's view of one clone running on another host.
#[derive(Clone)]
pub struct RemoteChild(pub(crate) Arc<ChildCell>);

impl std::fmt::Debug for RemoteChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteChild")
            .field("id", &self.0.id)
            .finish_non_exhaustive()
    }
}

impl RemoteChild {
    /// A clone `id` to run on `host`, not tied to a ticket.
    pub fn new_remote(
        id: u32,
        label: String,
        cluster: Arc<dyn Cluster>,
        host: &str,
        family: u64,
    ) -> Self {
        let target = RemoteTarget {
            host: host.to_string(),
            kill: Box::new({
                let host = host.to_string();
                move || cluster.kill(&host, family, id)
            }),
        };
        Self(Arc::new(ChildCell::new(id, 0, label, Some(target))))
    }

    /// The child's number, 1..=m within its ticket.
    pub fn id(&self) -> u32 {
        self.0.id
    }

    /// The child's label, e.g. `clone 3`.
    pub fn label(&self) -> &str {
        &self.0.label
    }

    /// The child runs guest code; restoring it took `restore`.
    pub fn started(&self, restore: Duration) {
        self.0.mark_started(restore);
    }

    /// The child ended. Only the first report counts.
    pub fn ended(&self, outcome: VmOutcome, runtime: Duration) {
        self.0.finish(outcome, runtime);
    }

    pub fn has_ended(&self) -> bool {
        self.0.has_ended()
    }
}

/// Receives the life events of a hollow clone started on this host.
pub trait HollowEvents: Send + Sync {
    /// The clone's VM `vm` is about to run guest code.
    fn started(
        &self,
        vm: u64,
        restore: Duration,
        faults: Arc<snowflock_fault_handler::FaultHandler>,
    );
    /// The clone ended; `stats` are its final fault counters.
    fn ended(&self, vm: u64, outcome: VmOutcome, runtime: Duration, stats: CloneStats);
}

/// A clone to start on this host whose memory comes from another host.
pub struct HollowStart {
    pub descriptor: Arc<Descriptor>,
    /// The clone point's pages on this host and the way to fetch missing ones.
    pub family: Arc<Family>,
    /// Skip fetching zero and free-heap pages (and fresh ones later).
    pub avoidance: bool,
    /// Map the clone's view of the pages already in the host cache in the
    /// background as it starts.
    pub populate: bool,
    pub child: u32,
    pub checkpoint: u64,
    /// A copy made from outside (see [`RemoteLaunch::external`]).
    pub external: bool,
    pub label: String,
    /// Where its console lines go, if not to the supervisor's sink.
    pub lines: Option<crate::console::LineSink>,
    /// Where a Linux-ABI clone's `/out` goes, if not to this host's disk:
    /// to the host that started the job.
    pub output: Option<snowflock_vmm::files::OutputSink>,
    pub events: Arc<dyn HollowEvents>,
}

impl std::fmt::Debug for HollowStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HollowStart")
            .field("child", &self.child)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}
