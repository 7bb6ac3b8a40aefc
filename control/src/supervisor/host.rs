//! The state of this host that the supervisor's front end and every VM
//! thread share: the hypervisor, the launcher thread, clone slots and
//! prepared VMs, the registry of running VMs and the clone reports.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use snowflock_vmm::background::Worker;
use snowflock_vmm::machine::PreparedVm;
use snowflock_vmm::{Hypervisor, VcpuKicker};

use super::slots::{Slots, WarmPool};
use super::{SupervisorConfig, VmRole};
use crate::child::ChildCell;
use crate::metrics::ControlMetrics;
use crate::outcome::CloneReport;
use crate::protocol::VmProgress;

pub(super) struct HostState {
    pub(super) hv: Arc<dyn Hypervisor>,
    /// Starts clones' threads and prepares VMs off the parents' vCPU threads.
    pub(super) launcher: Worker,
    /// Maps local clones' memory ahead of their guests (`populate`). Normal
    /// priority: at idle priority it starves while the clones' vCPUs keep
    /// every core busy, which is when mapping ahead saves the most.
    pub(super) populating: Worker,
    warm: Arc<WarmPool>,
    pub(super) config: SupervisorConfig,
    pub(super) slots: Slots,
    next_vm: AtomicU64,
    next_id: AtomicU64,
    /// The latest [`MAX_REPORTS`] clone reports, oldest first.
    pub(super) reports: Mutex<VecDeque<CloneReport>>,
    pub(super) metrics: Arc<ControlMetrics>,
    /// The Slurm allocations each VM's tickets hold now.
    pub(super) slurm_jobs: Mutex<HashMap<u64, Vec<u64>>>,
    /// What each running VM's clone operations got so far.
    pub(super) progress: Mutex<HashMap<u64, CloneProgress>>,
    /// Every VM running on this host.
    pub(super) vms: Mutex<HashMap<u64, VmEntry>>,
}

/// Clone reports kept: a long-running daemon files one per clone operation,
/// and the report of a VM is read when the VM ends.
pub(super) const MAX_REPORTS: usize = 4096;

/// A VM's clone operations so far: what its tickets asked for and got, and
/// its children not joined yet (those joined are counted).
#[derive(Default)]
pub(super) struct CloneProgress {
    pub(super) requested: u64,
    pub(super) granted: u64,
    pub(super) joined: u64,
    pub(super) children: Vec<Arc<ChildCell>>,
}

impl CloneProgress {
    pub(super) fn summary(&self) -> VmProgress {
        let ended = self.children.iter().filter(|c| c.has_ended()).count() as u64;
        let running = self
            .children
            .iter()
            .filter(|c| c.first_run().is_some() && !c.has_ended())
            .count() as u64;
        VmProgress {
            requested: self.requested,
            granted: self.granted,
            started: self.joined + self.children.len() as u64,
            running,
            ended: self.joined + ended,
        }
    }
}

/// A running VM, as [`super::Supervisor::vms`] lists it.
pub(super) struct VmEntry {
    pub(super) label: String,
    pub(super) role: VmRole,
    pub(super) mem_size: u64,
    pub(super) started: Instant,
    pub(super) kill: Arc<AtomicBool>,
    pub(super) kicker: Arc<dyn VcpuKicker>,
}

impl HostState {
    pub(super) fn new(hv: Arc<dyn Hypervisor>, config: SupervisorConfig) -> Self {
        Self {
            warm: Arc::new(WarmPool::new(hv.clone(), config.clone_limit)),
            slots: Slots::new(config.clone_limit),
            hv,
            launcher: Worker::start("sf-launcher", false),
            populating: Worker::start("sf-populate", false),
            config,
            next_vm: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            reports: Mutex::new(VecDeque::new()),
            metrics: Arc::new(ControlMetrics::default()),
            slurm_jobs: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            vms: Mutex::new(HashMap::new()),
        }
    }

    /// A new VM id, unique on this host.
    pub(super) fn fresh_vm(&self) -> u64 {
        self.next_vm.fetch_add(1, Ordering::Relaxed)
    }

    /// A new ticket or checkpoint id, unique on this host.
    pub(super) fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Up to `n` prepared VMs for `mem_size` bytes of memory.
    pub(super) fn take_warm(&self, mem_size: u64, n: usize) -> Vec<PreparedVm> {
        self.warm.take(mem_size, n)
    }

    /// Tops up the prepared VMs for `mem_size` on the launcher.
    pub(super) fn warm_up(&self, mem_size: u64) {
        self.warm.top_up(&self.launcher, mem_size);
    }

    /// Prepared VMs of all memory sizes.
    pub(super) fn warm_vms(&self) -> usize {
        self.warm.len()
    }
}
