//! How VMs and clone operations ended, as the supervisor reports them to
//! callers, the daemon's API and the cluster.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::descriptor::CaptureKind;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmOutcome {
    /// The guest called `EXIT` (returned from main) with this code.
    Exited(i32),
    /// A clone called `exit(result)`.
    Result(Vec<u8>),
    /// The VM failed; the text names the RIP and the reason.
    Failed(String),
    /// Its parent (or the operator) killed it.
    Killed,
    /// The host it ran on went away, or stopped answering.
    Lost(String),
}

impl VmOutcome {
    /// How it ended, as a label value.
    pub fn kind(&self) -> &'static str {
        match self {
            VmOutcome::Exited(_) => "exited",
            VmOutcome::Result(_) => "result",
            VmOutcome::Failed(_) => "failed",
            VmOutcome::Killed => "killed",
            VmOutcome::Lost(_) => "lost",
        }
    }
}

/// One child of a clone operation, as the parent's join saw it.
#[derive(Debug, Clone)]
pub struct ChildReport {
    pub id: u32,
    /// The child's VM on this host (0 for a clone on another host).
    pub vm: u64,
    /// The host it ran on, when not this one.
    pub host: Option<String>,
    /// Time to restore the child's VM from the descriptor (with a copy of
    /// the parent's memory, the copy's time too).
    pub restore: Duration,
    /// It ran on memory of its own, a copy of its parent's, rather than a
    /// copy-on-write view of it.
    pub own_memory: bool,
    /// From the child's first instruction to its end.
    pub runtime: Duration,
    pub outcome: VmOutcome,
}

/// One clone (or create-from-checkpoint) operation.
#[derive(Debug, Clone)]
pub struct CloneReport {
    pub parent_vm: u64,
    pub ticket: u64,
    pub kind: CaptureKind,
    pub clones: u32,
    /// How long the parent's vCPU was stopped for the capture.
    pub capture_pause: Duration,
    pub descriptor_bytes: usize,
    /// Pages of the parent's memory holding data at the clone point.
    pub data_pages: u64,
    /// From the clone hypercall to the last child executing guest code.
    pub all_running: Option<Duration>,
    /// The Slurm allocation its clones ran in.
    pub slurm_job: Option<u64>,
    pub children: Vec<ChildReport>,
}
