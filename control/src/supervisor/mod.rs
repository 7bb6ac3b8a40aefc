//! Local clone orchestration: every VM runs on its own thread; the VM's
//! control-plane hypercalls (tickets, clone, checkpoint, join, kill) are
//! served here. Children are restored from the parent's descriptor onto
//! copy-on-write views of its frozen memory, each on its own thread, while the
//! parent keeps running.
//!
//! This module is the front end: [`Supervisor`] starts VMs and answers
//! questions about this host. A VM's thread (`vm`) serves its hypercalls
//! (`hypercalls`), holds its tickets (`tickets`) and starts its clones
//! (`spawn`); `hollow` runs clones whose memory lives on another host. What
//! they all share is the host's state (`host`): slots and prepared VMs
//! (`slots`), the running VMs and the clone reports.

mod admission;
mod describe;
mod error;
mod handle;
mod hollow;
mod host;
mod hypercalls;
mod populate;
mod slots;
mod spawn;
mod tickets;
mod vm;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snowflock_vmm::files::FilesConfig;
use snowflock_vmm::{Hypervisor, Machine, MachineConfig};

pub use self::admission::MemoryShortage;
pub use self::error::{CaptureError, DescribeError, SupervisorError};
pub use self::handle::{VmController, VmHandle};
use self::host::{CloneProgress, HostState};
use self::vm::VmContext;
use crate::config::PopulateMode;
use crate::console::{ConsoleFlush, LineSink, labelled};
use crate::descriptor::Descriptor;
use crate::metrics::ControlMetrics;
use crate::outcome::CloneReport;
use crate::protocol::VmProgress;
use crate::remote::{Cluster, JobScope};
use crate::sync::lock;
use crate::working_sets::ImageDigest;
use snowflock_vmm::memory::{HostPages, MemoryImage};

/// Settings of a local supervisor.
#[derive(Clone)]
pub struct SupervisorConfig {
    /// Clone slots on this host: at most this many clones run at once.
    pub clone_limit: u32,
    /// Where VM console lines go.
    pub lines: LineSink,
    /// If set, every captured descriptor is also written here.
    pub descriptor_dir: Option<PathBuf>,
    /// Other hosts that take clones; `None` keeps every clone on this host.
    pub cluster: Option<Arc<dyn Cluster>>,
    /// How each local clone's view of its parent's data pages is mapped in
    /// the background as it starts, so that the guest's first touches find
    /// them mapped.
    pub populate: PopulateMode,
    /// The host pages behind the memory of the VMs this supervisor starts
    /// and of their clones.
    pub host_pages: HostPages,
    /// The Linux personality (`snowflock_guest::images::LINUX_PERSONALITY`),
    /// which runs static Linux executables; without it only flock images run.
    pub linux_personality: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for SupervisorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorConfig")
            .field("clone_limit", &self.clone_limit)
            .field("descriptor_dir", &self.descriptor_dir)
            .field("cluster", &self.cluster.is_some())
            .field("populate", &self.populate)
            .field("host_pages", &self.host_pages)
            .finish_non_exhaustive()
    }
}

/// What a root VM starts with besides its image and arguments: a Linux-ABI
/// program's host files and system-call options (flock images take the
/// default), and the Slurm job its clones must stay in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartOptions {
    pub files: FilesConfig,
    /// Print every system call with its result.
    pub strace: bool,
    /// Never patch system-call sites: every call traps to the VMM.
    pub trap_syscalls: bool,
    /// The VM runs as (part of) this Slurm job: its tickets take slots on
    /// the job's nodes only, at most the job's CPUs there, and allocate
    /// nothing themselves.
    pub slurm_job: Option<JobScope>,
}

/// How a VM came to run on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRole {
    /// Started from an image or a descriptor.
    Root,
    /// A clone of a VM on this host, on copy-on-write views of its memory.
    Clone,
    /// A clone of a VM on another host, its memory fetched on demand.
    Hollow,
}

/// One running VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub vm: u64,
    pub label: String,
    pub role: VmRole,
    pub mem_size: u64,
    pub uptime: Duration,
    /// The Slurm allocations its tickets hold.
    #[serde(default)]
    pub slurm_jobs: Vec<u64>,
}

/// Runs VMs on this host and serves their clone requests.
#[derive(Clone)]
pub struct Supervisor {
    host: Arc<HostState>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("config", &self.host.config)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    pub fn new(hv: Arc<dyn Hypervisor>, config: SupervisorConfig) -> Self {
        if config.host_pages == HostPages::Huge && !snowflock_vmm::memory::huge_pages_available() {
            tracing::warn!(
                "huge host pages asked for, but the kernel's shmem THP policy refuses them: \
                 guest memory stays on 4 KiB pages (scripts/deps.sh sets it to advise)"
            );
        }
        Self {
            host: Arc::new(HostState::new(hv, config)),
        }
    }

    /// Boots `image` and runs it on a new thread.
    pub fn launch(
        &self,
        image: &[u8],
        mem_size: u64,
        cmdline: &str,
    ) -> Result<VmHandle, SupervisorError> {
        self.launch_labelled(image, mem_size, cmdline, StartOptions::default(), |_| {
            String::new()
        })
    }

    /// Like [`Supervisor::launch`], for a Linux-ABI program with host
    /// files (and system call tracing).
    pub fn launch_linux(
        &self,
        image: &[u8],
        mem_size: u64,
        cmdline: &str,
        options: StartOptions,
    ) -> Result<VmHandle, SupervisorError> {
        self.launch_labelled(image, mem_size, cmdline, options, |_| String::new())
    }

    /// Like [`Supervisor::launch_linux`], with console lines labelled by
    /// `label(vm id)`; clones extend the label with their number.
    pub fn launch_labelled(
        &self,
        image: &[u8],
        mem_size: u64,
        cmdline: &str,
        options: StartOptions,
        label: impl FnOnce(u64) -> String,
    ) -> Result<VmHandle, SupervisorError> {
        admission::check_memory(mem_size).map_err(SupervisorError::Admit)?;
        let vm = self.host.fresh_vm();
        let label = label(vm);
        let (console, flush) = labelled(label.clone(), self.host.config.lines.clone());
        let config = MachineConfig {
            mem_size,
            cmdline: cmdline.to_string(),
            console,
            host_pages: self.host.config.host_pages,
            personality: self.host.config.linux_personality.clone(),
            files: options.files,
            strace: options.strace,
            trap_syscalls: options.trap_syscalls,
        };
        let machine =
            Machine::boot(self.host.hv.as_ref(), image, &config).map_err(SupervisorError::Start)?;
        self.host.warm_up(mem_size);
        let image = ImageDigest::of(image, mem_size, cmdline);
        Ok(self.spawn_root(
            vm,
            machine,
            flush,
            (0, Some(image)),
            label,
            options.slurm_job,
        ))
    }

    /// Starts a new VM from `descriptor` on a private view of `image`.
    pub fn resume(
        &self,
        descriptor: &Descriptor,
        image: &Arc<MemoryImage>,
    ) -> Result<VmHandle, SupervisorError> {
        self.resume_labelled(descriptor, image, |vm| format!("vm {vm}"))
    }

    /// Like [`Supervisor::resume`], with console lines labelled by `label(vm id)`.
    pub fn resume_labelled(
        &self,
        descriptor: &Descriptor,
        image: &Arc<MemoryImage>,
        label: impl FnOnce(u64) -> String,
    ) -> Result<VmHandle, SupervisorError> {
        let vm = self.host.fresh_vm();
        let label = label(vm);
        let (console, flush) = labelled(label.clone(), self.host.config.lines.clone());
        let machine = Machine::restore(self.host.hv.as_ref(), &descriptor.machine, image, console)
            .map_err(SupervisorError::Start)?;
        self.host.warm_up(descriptor.machine.mem_size);
        Ok(self.spawn_root(
            vm,
            machine,
            flush,
            (descriptor.generation, None),
            label,
            None,
        ))
    }

    fn spawn_root(
        &self,
        vm: u64,
        machine: Machine,
        flush: ConsoleFlush,
        (generation, image): (u32, Option<ImageDigest>),
        label: String,
        slurm_job: Option<JobScope>,
    ) -> VmHandle {
        let (control, requests) = mpsc::channel();
        let kill = Arc::new(AtomicBool::new(false));
        let kicker = machine.kicker();
        let ctx = VmContext::new(
            self.host.clone(),
            vm,
            label,
            false,
            kill.clone(),
            flush,
            generation,
        )
        .with_requests(requests)
        .with_image(image)
        .with_slurm_job(slurm_job);
        let thread = std::thread::Builder::new()
            .name(format!("vm{vm}"))
            .spawn(move || ctx.drive(machine))
            .expect("spawning a VM thread");
        VmHandle {
            vm,
            thread,
            control,
            kicker,
            kill,
        }
    }

    /// The latest clone operations (up to 4096), oldest first; each is filed when joined.
    pub fn reports(&self) -> Vec<CloneReport> {
        lock(&self.host.reports).iter().cloned().collect()
    }

    /// The kept clone operations of VM `parent_vm`, oldest first (a copy of those only, not of
    /// the whole history).
    pub fn reports_of(&self, parent_vm: u64) -> Vec<CloneReport> {
        lock(&self.host.reports)
            .iter()
            .filter(|r| r.parent_vm == parent_vm)
            .cloned()
            .collect()
    }

    /// What this host's control plane counted (tickets, clone operations).
    pub fn metrics(&self) -> &Arc<ControlMetrics> {
        &self.host.metrics
    }

    /// What VM `vm`'s clone operations got so far; `None` if it does not
    /// run here.
    pub fn progress(&self, vm: u64) -> Option<VmProgress> {
        if !lock(&self.host.vms).contains_key(&vm) {
            return None;
        }
        Some(
            lock(&self.host.progress)
                .get(&vm)
                .map(CloneProgress::summary)
                .unwrap_or_default(),
        )
    }

    /// VMs prepared ahead of clone points (all memory sizes).
    pub fn warm_vms(&self) -> usize {
        self.host.warm_vms()
    }

    /// The VMs running on this host, by id.
    pub fn vms(&self) -> Vec<VmInfo> {
        let slurm_jobs = lock(&self.host.slurm_jobs).clone();
        let mut list: Vec<VmInfo> = lock(&self.host.vms)
            .iter()
            .map(|(&vm, e)| VmInfo {
                vm,
                label: e.label.clone(),
                role: e.role,
                mem_size: e.mem_size,
                uptime: e.started.elapsed(),
                slurm_jobs: slurm_jobs.get(&vm).cloned().unwrap_or_default(),
            })
            .collect();
        list.sort_by_key(|v| v.vm);
        list
    }

    /// Ends VM `vm` (and its clones); false if no such VM runs.
    pub fn kill_vm(&self, vm: u64) -> bool {
        let vms = lock(&self.host.vms);
        let Some(entry) = vms.get(&vm) else {
            return false;
        };
        entry.kill.store(true, Ordering::Release);
        entry.kicker.kick();
        true
    }

    /// Reserves up to `wanted` clone slots for clones coming from another
    /// host; returns how many it got.
    pub fn reserve_slots(&self, wanted: u32) -> u32 {
        self.host.slots.reserve(wanted)
    }

    /// Returns slots reserved with [`Supervisor::reserve_slots`] that will not be used.
    pub fn release_slots(&self, slots: u32) {
        self.host.slots.release(slots);
    }

    /// Prepares VMs for clones of `mem_size` bytes ahead of their arrival.
    pub fn prepare(&self, mem_size: u64) {
        self.host.warm_up(mem_size);
    }

    /// Clone slots currently reserved.
    pub fn slots_in_use(&self) -> u32 {
        self.host.slots.in_use()
    }
}
