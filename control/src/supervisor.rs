//! Local clone orchestration: every VM runs on its own thread; the VM's
//! control-plane hypercalls (tickets, clone, checkpoint, join, kill) are
//! served here. Children are restored from the parent's descriptor onto
//! copy-on-write views of its frozen memory, each on its own thread, while the
//! parent keeps running.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use snowflock_abi::{ChildStatus, errno};
use snowflock_fault_handler::{AvoidMap, CloneStats, FaultHandler};
use snowflock_vmm::background::{Job, Worker, housekeeper};
use snowflock_vmm::machine::{MachineConfig, MachineSnapshot, PreparedVm, Request, Stop};
use snowflock_vmm::memory::MemoryImage;
use snowflock_vmm::{Hypervisor, Machine, MachineError, VcpuKicker};

use crate::console::{ConsoleFlush, LineSink, labelled};
use crate::descriptor::{CaptureKind, Descriptor};
use crate::remote::{
    Cluster, HollowStart, Plan, RemoteChild, RemoteGrant, RemoteLaunch, RemoteTarget,
};

/// How long a waiting VM thread sleeps between checks for kills and control
/// requests; bounds how late a kill of a joining parent is noticed.
const WAIT_SLICE: Duration = Duration::from_millis(20);
/// Longest an external capture waits for the VM thread to stop.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most prepared VMs kept per guest memory size.
const MAX_WARM_VMS: u32 = 64;

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
}

impl std::fmt::Debug for SupervisorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorConfig")
            .field("clone_limit", &self.clone_limit)
            .field("descriptor_dir", &self.descriptor_dir)
            .field("cluster", &self.cluster.is_some())
            .finish_non_exhaustive()
    }
}

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

/// One child of a clone operation, as the parent's join saw it.
#[derive(Debug, Clone)]
pub struct ChildReport {
    pub id: u32,
    /// The child's VM on this host (0 for a clone on another host).
    pub vm: u64,
    /// The host it ran on, when not this one.
    pub host: Option<String>,
    /// Time to restore the child's VM from the descriptor.
    pub restore: Duration,
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
    pub children: Vec<ChildReport>,
}

/// Failure of a supervisor operation requested from outside a VM.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("starting the VM failed")]
    Start(#[source] MachineError),
    #[error("the VM is no longer running")]
    Gone,
    #[error("the VM did not stop for the capture within {0:?}")]
    CaptureTimeout(Duration),
    #[error("capturing the VM failed: {0}")]
    Capture(String),
}

struct Shared {
    hv: Arc<dyn Hypervisor>,
    launcher: Worker,
    /// VMs prepared ahead of clone points, by guest memory size.
    warm: Mutex<HashMap<u64, Vec<PreparedVm>>>,
    config: SupervisorConfig,
    slots_in_use: Mutex<u32>,
    next_vm: AtomicU64,
    next_id: AtomicU64,
    reports: Mutex<Vec<CloneReport>>,
    /// Every VM running on this host.
    vms: Mutex<HashMap<u64, VmEntry>>,
}

/// A running VM, as [`Supervisor::vms`] lists it.
struct VmEntry {
    label: String,
    role: VmRole,
    mem_size: u64,
    started: Instant,
    kill: Arc<AtomicBool>,
    kicker: Arc<dyn VcpuKicker>,
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
}

impl Shared {
    fn reserve(&self, wanted: u32) -> u32 {
        let mut used = self.slots_in_use.lock().unwrap_or_else(|p| p.into_inner());
        let granted = wanted.min(self.config.clone_limit.saturating_sub(*used));
        *used += granted;
        granted
    }

    fn free_slots(&self) -> u32 {
        let used = self.slots_in_use.lock().unwrap_or_else(|p| p.into_inner());
        self.config.clone_limit.saturating_sub(*used)
    }

    fn release(&self, slots: u32) {
        let mut used = self.slots_in_use.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(slots);
    }

    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// How many prepared VMs of one size to keep: enough for a full clone of
    /// the host's slots, within reason (each holds a KVM VM and its slot).
    fn warm_target(&self) -> usize {
        self.config.clone_limit.min(MAX_WARM_VMS) as usize
    }

    /// Up to `n` prepared VMs for `mem_size` bytes of memory.
    fn take_warm(&self, mem_size: u64, n: usize) -> Vec<PreparedVm> {
        let mut warm = self.warm.lock().unwrap_or_else(|p| p.into_inner());
        let pool = warm.entry(mem_size).or_default();
        let keep = pool.len().saturating_sub(n);
        pool.split_off(keep)
    }

    /// Tops up the prepared VMs for `mem_size` on the launcher, preparing
    /// them in parallel: each waits milliseconds, mostly idle, in KVM.
    fn warm_up(self: &Arc<Self>, mem_size: u64) {
        let shared = self.clone();
        // The job reports nothing; later launcher jobs run after it anyway.
        let _ = self.launcher.submit(move || {
            let have = shared
                .warm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&mem_size)
                .map_or(0, Vec::len);
            let missing = shared.warm_target().saturating_sub(have);
            let preparing: Vec<_> = (0..missing)
                .map(|_| {
                    let hv = shared.hv.clone();
                    std::thread::spawn(move || PreparedVm::new(hv.as_ref(), mem_size))
                })
                .collect();
            for thread in preparing {
                match thread.join() {
                    Ok(Ok(vm)) => shared
                        .warm
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(mem_size)
                        .or_default()
                        .push(vm),
                    Ok(Err(e)) => tracing::warn!("cannot prepare a VM: {}", error_chain(&e)),
                    Err(_) => tracing::warn!("preparing a VM panicked"),
                }
            }
        });
    }
}

/// Runs VMs on this host and serves their clone requests.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Requests to a running VM's thread from outside.
enum Control {
    Capture(mpsc::Sender<Result<(Descriptor, Arc<MemoryImage>), String>>),
}

/// A VM started by [`Supervisor::launch`] or [`Supervisor::resume`].
pub struct VmHandle {
    vm: u64,
    thread: JoinHandle<VmOutcome>,
    control: mpsc::Sender<Control>,
    kicker: Arc<dyn VcpuKicker>,
    kill: Arc<AtomicBool>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl VmHandle {
    pub fn id(&self) -> u64 {
        self.vm
    }

    /// Waits for the VM to end.
    pub fn wait(self) -> VmOutcome {
        self.thread
            .join()
            .unwrap_or_else(|_| VmOutcome::Failed("VM thread panicked".into()))
    }

    /// Pauses the running VM, captures its descriptor and freezes its memory,
    /// then lets it continue. Returns the descriptor and the frozen image.
    pub fn capture(&self) -> Result<(Descriptor, Arc<MemoryImage>), SupervisorError> {
        self.controller().capture()
    }

    /// Ends the VM (and its clones).
    pub fn kill(&self) {
        self.controller().kill();
    }

    /// A handle for capturing or killing the VM from elsewhere while this
    /// one waits for it.
    pub fn controller(&self) -> VmController {
        VmController {
            vm: self.vm,
            control: self.control.clone(),
            kicker: self.kicker.clone(),
            kill: self.kill.clone(),
        }
    }
}

/// Captures or kills a running VM; see [`VmHandle::controller`].
#[derive(Clone)]
pub struct VmController {
    vm: u64,
    control: mpsc::Sender<Control>,
    kicker: Arc<dyn VcpuKicker>,
    kill: Arc<AtomicBool>,
}

impl std::fmt::Debug for VmController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmController")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl VmController {
    /// See [`VmHandle::capture`].
    pub fn capture(&self) -> Result<(Descriptor, Arc<MemoryImage>), SupervisorError> {
        let (tx, rx) = mpsc::channel();
        self.control
            .send(Control::Capture(tx))
            .map_err(|_| SupervisorError::Gone)?;
        self.kicker.kick();
        match rx.recv_timeout(CAPTURE_TIMEOUT) {
            Ok(Ok(captured)) => Ok(captured),
            Ok(Err(e)) => Err(SupervisorError::Capture(e)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(SupervisorError::CaptureTimeout(CAPTURE_TIMEOUT))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(SupervisorError::Gone),
        }
    }

    /// Ends the VM (and its clones).
    pub fn kill(&self) {
        self.kill.store(true, Ordering::Release);
        self.kicker.kick();
    }
}

impl Supervisor {
    pub fn new(hv: Arc<dyn Hypervisor>, config: SupervisorConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                hv,
                launcher: Worker::start("sf-launcher", false),
                warm: Mutex::new(HashMap::new()),
                config,
                slots_in_use: Mutex::new(0),
                next_vm: AtomicU64::new(1),
                next_id: AtomicU64::new(1),
                reports: Mutex::new(Vec::new()),
                vms: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Boots `image` and runs it on a new thread.
    pub fn launch(
        &self,
        image: &[u8],
        mem_size: u64,
        cmdline: &str,
    ) -> Result<VmHandle, SupervisorError> {
        self.launch_labelled(image, mem_size, cmdline, |_| String::new())
    }

    /// Like [`Supervisor::launch`], with console lines labelled by
    /// `label(vm id)`; clones extend the label with their number.
    pub fn launch_labelled(
        &self,
        image: &[u8],
        mem_size: u64,
        cmdline: &str,
        label: impl FnOnce(u64) -> String,
    ) -> Result<VmHandle, SupervisorError> {
        let vm = self.shared.next_vm.fetch_add(1, Ordering::Relaxed);
        let label = label(vm);
        let (console, flush) = labelled(label.clone(), self.shared.config.lines.clone());
        let config = MachineConfig {
            mem_size,
            cmdline: cmdline.to_string(),
            console,
        };
        let machine = Machine::boot(self.shared.hv.as_ref(), image, &config)
            .map_err(SupervisorError::Start)?;
        self.shared.warm_up(mem_size);
        Ok(self.spawn_root(vm, machine, flush, 0, label))
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
        let vm = self.shared.next_vm.fetch_add(1, Ordering::Relaxed);
        let label = label(vm);
        let (console, flush) = labelled(label.clone(), self.shared.config.lines.clone());
        let machine =
            Machine::restore(self.shared.hv.as_ref(), &descriptor.machine, image, console)
                .map_err(SupervisorError::Start)?;
        self.shared.warm_up(descriptor.machine.mem_size);
        Ok(self.spawn_root(vm, machine, flush, descriptor.generation, label))
    }

    fn spawn_root(
        &self,
        vm: u64,
        machine: Machine,
        flush: ConsoleFlush,
        generation: u32,
        label: String,
    ) -> VmHandle {
        let (control, requests) = mpsc::channel();
        let kill = Arc::new(AtomicBool::new(false));
        let kicker = machine.kicker();
        let ctx = VmContext {
            shared: self.shared.clone(),
            vm,
            label,
            is_clone: false,
            kill: kill.clone(),
            requests: Some(requests),
            faults: None,
            flush,
            generation,
            tickets: HashMap::new(),
            checkpoints: HashMap::new(),
        };
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

    /// Clone operations so far, oldest first (each complete once joined).
    pub fn reports(&self) -> Vec<CloneReport> {
        self.shared
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// VMs prepared ahead of clone points (all memory sizes).
    pub fn warm_vms(&self) -> usize {
        self.shared
            .warm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// The VMs running on this host, by id.
    pub fn vms(&self) -> Vec<VmInfo> {
        let mut list: Vec<VmInfo> = self
            .shared
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&vm, e)| VmInfo {
                vm,
                label: e.label.clone(),
                role: e.role,
                mem_size: e.mem_size,
                uptime: e.started.elapsed(),
            })
            .collect();
        list.sort_by_key(|v| v.vm);
        list
    }

    /// Ends VM `vm` (and its clones); false if no such VM runs.
    pub fn kill_vm(&self, vm: u64) -> bool {
        let vms = self.shared.vms.lock().unwrap_or_else(|p| p.into_inner());
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
        self.shared.reserve(wanted)
    }

    /// Returns slots reserved with [`Supervisor::reserve_slots`] that will not be used.
    pub fn release_slots(&self, slots: u32) {
        self.shared.release(slots);
    }

    /// Prepares VMs for clones of `mem_size` bytes ahead of their arrival.
    pub fn prepare(&self, mem_size: u64) {
        self.shared.warm_up(mem_size);
    }

    /// Starts a hollow clone in one slot reserved with
    /// [`Supervisor::reserve_slots`]; the slot returns when it ends. Returns
    /// the new VM's id; its start and end go to `start.events`.
    pub fn start_hollow(&self, start: HollowStart) -> u64 {
        let vm = self.shared.next_vm.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vm{vm}"))
            .spawn(move || run_hollow(shared, vm, start));
        if let Err(e) = spawned {
            tracing::error!(vm, "cannot start a thread for a hollow clone: {e}");
            self.shared.release(1);
        }
        vm
    }

    /// Clone slots currently reserved.
    pub fn slots_in_use(&self) -> u32 {
        *self
            .shared
            .slots_in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// What a child shares with the parent that spawned it.
pub(crate) struct ChildCell {
    pub(crate) id: u32,
    vm: u64,
    pub(crate) label: String,
    /// Set for a clone on another host.
    remote: Option<RemoteTarget>,
    kill: Arc<AtomicBool>,
    kicker: Mutex<Option<Arc<dyn VcpuKicker>>>,
    first_run: Mutex<Option<Instant>>,
    restore: Mutex<Duration>,
    end: Mutex<Option<(VmOutcome, Duration)>>,
    done: Condvar,
}

impl ChildCell {
    pub(crate) fn new(id: u32, vm: u64, label: String, remote: Option<RemoteTarget>) -> Self {
        Self {
            id,
            vm,
            label,
            remote,
            kill: Arc::new(AtomicBool::new(false)),
            kicker: Mutex::new(None),
            first_run: Mutex::new(None),
            restore: Mutex::new(Duration::ZERO),
            end: Mutex::new(None),
            done: Condvar::new(),
        }
    }

    fn kill(&self) -> bool {
        if self.has_ended() {
            return false;
        }
        self.kill.store(true, Ordering::Release);
        if let Some(remote) = &self.remote {
            remote.cluster.kill(&remote.host, remote.family, self.id);
        }
        if let Some(kicker) = &*self.kicker.lock().unwrap_or_else(|p| p.into_inner()) {
            kicker.kick();
        }
        true
    }

    pub(crate) fn mark_started(&self, restore: Duration) {
        *self.restore.lock().unwrap_or_else(|p| p.into_inner()) = restore;
        self.first_run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
    }

    pub(crate) fn finish(&self, outcome: VmOutcome, runtime: Duration) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if end.is_none() {
            *end = Some((outcome, runtime));
            self.done.notify_all();
        }
    }

    pub(crate) fn has_ended(&self) -> bool {
        self.end.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

struct Ticket {
    granted: u32,
    /// Slots on this host reserved but not yet handed to running children.
    unused_slots: u32,
    /// Reservations on other hosts not yet used.
    remote: Vec<RemoteGrant>,
    spawned: Option<Spawned>,
}

struct Spawned {
    started: Instant,
    report: CloneReport,
    children: Vec<Arc<ChildCell>>,
    /// Starting the children on the launcher; yields their threads.
    launcher: Option<Job<Vec<JoinHandle<()>>>>,
    describer: Option<Described>,
    /// The clone point served to other hosts, retired once joined.
    served_family: Option<u64>,
    joined: bool,
}

/// What a completed descriptor says about its clone point.
#[derive(Debug, Clone, Copy, Default)]
struct Description {
    /// Encoded size.
    bytes: usize,
    /// Pages holding data (the memory the parent had touched).
    data_pages: u64,
}

/// A clone point's description, or the thread computing it.
enum Described {
    Pending(Job<Description>),
    Done(Description),
}

impl Described {
    fn get(self) -> Description {
        match self {
            Self::Pending(job) => job.wait().unwrap_or_default(),
            Self::Done(description) => description,
        }
    }
}

struct Checkpoint {
    descriptor: Descriptor,
    image: Arc<MemoryImage>,
    pause: Duration,
    describer: Option<Job<Description>>,
    description: Description,
}

/// Per-VM state owned by the VM's thread.
struct VmContext {
    shared: Arc<Shared>,
    vm: u64,
    label: String,
    is_clone: bool,
    kill: Arc<AtomicBool>,
    requests: Option<mpsc::Receiver<Control>>,
    /// The fault handler filling a hollow clone's memory from another host.
    faults: Option<Arc<FaultHandler>>,
    flush: ConsoleFlush,
    generation: u32,
    tickets: HashMap<u64, Ticket>,
    checkpoints: HashMap<u64, Checkpoint>,
}

/// An error and its sources, joined with `: `.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Fills in the descriptor's data page runs from the frozen image, encodes
/// it and saves it if the configuration asks to. This walks the image's
/// memfds, so clone paths run it off the parent's vCPU thread. Returns the
/// completed descriptor and its encoded size.
fn describe(
    shared: &Shared,
    mut descriptor: Descriptor,
    image: &MemoryImage,
) -> Result<(Descriptor, usize), String> {
    descriptor
        .machine
        .describe_memory(image)
        .map_err(|e| error_chain(&e))?;
    let encoded = descriptor.encode().map_err(|e| error_chain(&e))?;
    if let Some(dir) = &shared.config.descriptor_dir {
        let path = dir.join(format!(
            "vm{}-gen{}.sfdesc",
            descriptor.parent_vm, descriptor.generation
        ));
        if let Err(e) = std::fs::write(&path, &encoded) {
            tracing::warn!(path = %path.display(), "cannot save descriptor: {e}");
        }
    }
    Ok((descriptor, encoded.len()))
}

fn description(descriptor: &Descriptor, bytes: usize) -> Description {
    Description {
        bytes,
        data_pages: descriptor.machine.data_pages.pages(),
    }
}

fn describe_in_background(
    shared: &Arc<Shared>,
    descriptor: &Descriptor,
    image: &Arc<MemoryImage>,
) -> Job<Description> {
    let (shared, descriptor, image) = (shared.clone(), descriptor.clone(), image.clone());
    housekeeper().submit(move || match describe(&shared, descriptor, &image) {
        Ok((descriptor, bytes)) => description(&descriptor, bytes),
        Err(e) => {
            tracing::warn!("cannot describe the clone point: {e}");
            Description::default()
        }
    })
}

impl VmContext {
    /// Where the slots of a ticket for `wanted` clones come from.
    fn plan(&self, wanted: u32, mem_size: u64) -> Plan {
        match &self.shared.config.cluster {
            Some(cluster) => cluster.plan(wanted, mem_size, self.shared.free_slots()),
            None => Plan {
                local: wanted,
                remote: Vec::new(),
            },
        }
    }

    fn killed(&self) -> bool {
        self.kill.load(Ordering::Acquire)
    }

    /// Runs the VM to its end, then ends its clones and releases its slots.
    fn drive(mut self, mut machine: Machine) -> VmOutcome {
        self.shared
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                self.vm,
                VmEntry {
                    label: self.label.clone(),
                    role: if self.faults.is_some() {
                        VmRole::Hollow
                    } else if self.is_clone {
                        VmRole::Clone
                    } else {
                        VmRole::Root
                    },
                    mem_size: machine.memory().size(),
                    started: Instant::now(),
                    kill: self.kill.clone(),
                    kicker: machine.kicker(),
                },
            );
        let outcome = self.serve(&mut machine);
        self.shared
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.vm);
        self.flush.flush();
        self.end_all_tickets();
        for (_, cp) in self.checkpoints.drain() {
            cp.describer.and_then(Job::wait);
        }
        // The fault handler must be done with hollow memory before it is
        // unmapped: its address may soon hold another clone's memory.
        if let Some(faults) = &self.faults {
            faults.close();
        }
        drop(machine);
        if let VmOutcome::Failed(reason) = &outcome {
            tracing::warn!(vm = self.vm, %reason, "VM failed");
        }
        outcome
    }

    fn serve(&mut self, machine: &mut Machine) -> VmOutcome {
        loop {
            if self.killed() {
                return VmOutcome::Killed;
            }
            let run = machine.run();
            // A hollow clone whose pages stopped coming may have run on
            // zero-filled pages since: nothing it did after counts.
            if let Some(failure) = self.faults.as_ref().and_then(|f| f.failure()) {
                return VmOutcome::Failed(error_chain(&failure));
            }
            let stop = match run {
                Ok(stop) => stop,
                Err(e) => return VmOutcome::Failed(error_chain(&e)),
            };
            let stopped_at = Instant::now();
            let result = match stop {
                Stop::Exited(code) if self.is_clone && code == 0 => {
                    return VmOutcome::Result(Vec::new());
                }
                Stop::Exited(code) if self.is_clone => {
                    return VmOutcome::Failed(format!("clone exited with code {code}"));
                }
                Stop::Exited(code) => return VmOutcome::Exited(code),
                Stop::ChildExit(result) if self.is_clone => return VmOutcome::Result(result),
                Stop::ChildExit(_) => machine.reply(errno::encode(errno::EPERM), 0),
                Stop::Paused => {
                    self.serve_controls(machine);
                    Ok(())
                }
                Stop::Request(request) => self.serve_request(machine, request, stopped_at),
            };
            if let Err(e) = result {
                return VmOutcome::Failed(error_chain(&e));
            }
        }
    }

    fn serve_controls(&mut self, machine: &mut Machine) {
        let Some(requests) = &self.requests else {
            return;
        };
        let pending: Vec<Control> = requests.try_iter().collect();
        for control in pending {
            match control {
                Control::Capture(reply) => {
                    let captured = self
                        .capture(machine, CaptureKind::External)
                        .map_err(|e| error_chain(&e))
                        .and_then(|(descriptor, image)| {
                            describe(&self.shared, descriptor, &image).map(|(d, _)| (d, image))
                        });
                    let _ = reply.send(captured);
                }
            }
        }
    }

    /// Answers control requests that cannot be served while the vCPU sits in
    /// a blocking hypercall.
    fn refuse_controls(&self, why: &str) {
        if let Some(requests) = &self.requests {
            for control in requests.try_iter() {
                match control {
                    Control::Capture(reply) => {
                        let _ = reply.send(Err(why.to_string()));
                    }
                }
            }
        }
    }

    /// Captures the VM; the descriptor's data page runs are filled in later
    /// by [`describe`].
    fn capture(
        &mut self,
        machine: &mut Machine,
        kind: CaptureKind,
    ) -> Result<(Descriptor, Arc<MemoryImage>), MachineError> {
        let (snapshot, image) = machine.capture()?;
        self.generation += 1;
        let descriptor = Descriptor {
            family: std::hash::RandomState::new().hash_one((self.vm, self.generation)),
            generation: self.generation,
            parent_vm: self.vm,
            kind,
            captured_unix_ns: unix_ns(),
            machine: snapshot,
        };
        Ok((descriptor, image))
    }

    fn serve_request(
        &mut self,
        machine: &mut Machine,
        request: Request,
        stopped_at: Instant,
    ) -> Result<(), MachineError> {
        match request {
            Request::RequestTicket { .. } if self.faults.is_some() => {
                // A hollow clone's memory lives on another host; it cannot
                // be frozen and served again.
                machine.reply(errno::encode(errno::EPERM), 0)
            }
            Request::RequestTicket { clones } => {
                let plan = self.plan(clones, machine.memory().size());
                let local = self.shared.reserve(plan.local);
                let remote_slots: u32 = plan.remote.iter().map(|g| g.slots).sum();
                let granted = local + remote_slots;
                let id = self.shared.fresh_id();
                self.tickets.insert(
                    id,
                    Ticket {
                        granted,
                        unused_slots: local,
                        remote: plan.remote,
                        spawned: None,
                    },
                );
                machine.reply(id, u64::from(granted))
            }
            Request::Clone { ticket } => {
                let granted = match self.usable_ticket(ticket) {
                    Ok(granted) => granted,
                    Err(code) => return machine.reply(errno::encode(code), 0),
                };
                if granted == 0 {
                    self.mark_spawned(ticket, stopped_at, CaptureKind::Clone, None);
                    return machine.reply(0, 0);
                }
                let (descriptor, image) = self.capture(machine, CaptureKind::Clone)?;
                machine.reply(0, 0)?;
                let (launch, describer) = self.spawn_all(ticket, descriptor, image, 0, None);
                self.mark_spawned(
                    ticket,
                    stopped_at,
                    CaptureKind::Clone,
                    Some((launch, describer)),
                );
                self.set_pause(ticket, stopped_at.elapsed());
                Ok(())
            }
            Request::Checkpoint => {
                let (descriptor, image) = self.capture(machine, CaptureKind::Checkpoint)?;
                let describer = Some(describe_in_background(&self.shared, &descriptor, &image));
                let id = self.shared.fresh_id();
                self.checkpoints.insert(
                    id,
                    Checkpoint {
                        descriptor,
                        image,
                        pause: stopped_at.elapsed(),
                        describer,
                        description: Description::default(),
                    },
                );
                machine.reply(0, id)
            }
            Request::CreateClones { checkpoint, ticket } => {
                if !self.checkpoints.contains_key(&checkpoint) {
                    return machine.reply(errno::encode(errno::ENOENT), 0);
                }
                if let Err(code) = self.usable_ticket(ticket) {
                    return machine.reply(errno::encode(code), 0);
                }
                let cp = self
                    .checkpoints
                    .get_mut(&checkpoint)
                    .expect("checked above");
                if let Some(done) = cp.describer.take().and_then(Job::wait) {
                    cp.description = done;
                }
                let (descriptor, image, pause, bytes) = (
                    cp.descriptor.clone(),
                    cp.image.clone(),
                    cp.pause,
                    cp.description,
                );
                let (launch, describer) =
                    self.spawn_all(ticket, descriptor, image, checkpoint, Some(bytes));
                self.mark_spawned(
                    ticket,
                    stopped_at,
                    CaptureKind::Checkpoint,
                    Some((launch, describer)),
                );
                self.set_pause(ticket, pause);
                machine.reply(0, 0)
            }
            Request::Join { ticket } => match self.join(ticket) {
                Ok(count) => machine.reply(u64::from(count), 0),
                Err(JoinError::Errno(code)) => machine.reply(errno::encode(code), 0),
                Err(JoinError::Killed) => Ok(()),
            },
            Request::ChildResult {
                ticket,
                child,
                capacity: _,
            } => match self.child_outcome(ticket, child) {
                Ok(VmOutcome::Result(bytes)) => {
                    machine.reply_child_result(ChildStatus::Exited as u64, &bytes)
                }
                Ok(VmOutcome::Exited(code)) => machine.reply_child_result(
                    ChildStatus::Failed as u64,
                    format!("exited with code {code}").as_bytes(),
                ),
                Ok(VmOutcome::Failed(reason)) => {
                    machine.reply_child_result(ChildStatus::Failed as u64, reason.as_bytes())
                }
                Ok(VmOutcome::Killed) => {
                    machine.reply_child_result(ChildStatus::Killed as u64, b"killed")
                }
                Ok(VmOutcome::Lost(reason)) => {
                    machine.reply_child_result(ChildStatus::Lost as u64, reason.as_bytes())
                }
                Err(code) => machine.reply(errno::encode(code), 0),
            },
            Request::Kill { ticket } => {
                let Some(spawned) = self.tickets.get(&ticket).and_then(|t| t.spawned.as_ref())
                else {
                    return machine.reply(errno::encode(errno::ENOENT), 0);
                };
                let killed = spawned.children.iter().filter(|c| c.kill()).count();
                machine.reply(killed as u64, 0)
            }
        }
    }

    /// The granted count of an unused ticket of this VM, or an errno.
    fn usable_ticket(&self, ticket: u64) -> Result<u32, u64> {
        match self.tickets.get(&ticket) {
            None => Err(errno::ENOENT),
            Some(t) if t.spawned.is_some() => Err(errno::EBUSY),
            Some(t) => Ok(t.granted),
        }
    }

    fn mark_spawned(
        &mut self,
        ticket: u64,
        started: Instant,
        kind: CaptureKind,
        launched: Option<(Launch, Described)>,
    ) {
        let vm = self.vm;
        let t = self
            .tickets
            .get_mut(&ticket)
            .expect("ticket checked by caller");
        let (children, launcher, describer, served_family) = match launched {
            Some((launch, describer)) => (
                launch.cells,
                Some(launch.thread),
                Some(describer),
                launch.served_family,
            ),
            None => (Vec::new(), None, None, None),
        };
        // Each local child now owns one slot and returns it when it ends;
        // remote reservations were handed to their hosts.
        let local = children.iter().filter(|c| c.remote.is_none()).count() as u32;
        t.unused_slots -= local;
        t.spawned = Some(Spawned {
            started,
            report: CloneReport {
                parent_vm: vm,
                ticket,
                kind,
                clones: children.len() as u32,
                capture_pause: Duration::ZERO,
                descriptor_bytes: 0,
                data_pages: 0,
                all_running: None,
                children: Vec::new(),
            },
            children,
            launcher,
            describer,
            served_family,
            joined: false,
        });
    }

    fn set_pause(&mut self, ticket: u64, pause: Duration) {
        if let Some(spawned) = self
            .tickets
            .get_mut(&ticket)
            .and_then(|t| t.spawned.as_mut())
        {
            spawned.report.capture_pause = pause;
        }
    }

    fn child_label(&self, id: u32) -> String {
        if self.label.is_empty() {
            format!("clone {id}")
        } else {
            format!("{}.{id}", self.label)
        }
    }

    /// Starts every child of `ticket`: the local share on copy-on-write
    /// views of `image`, the rest on the hosts holding the ticket's remote
    /// reservations. Remote hosts need the finished descriptor, so it is
    /// completed and shipped on the launcher, after the local children
    /// started. `described` is the encoded size when already known.
    fn spawn_all(
        &mut self,
        ticket: u64,
        descriptor: Descriptor,
        image: Arc<MemoryImage>,
        checkpoint: u64,
        described: Option<Description>,
    ) -> (Launch, Described) {
        let t = self
            .tickets
            .get_mut(&ticket)
            .expect("ticket checked by caller");
        let local = t.unused_slots;
        let remote = std::mem::take(&mut t.remote);
        let mut launch = self.spawn_children(&descriptor, image.clone(), local, checkpoint);
        let cluster = match (&self.shared.config.cluster, remote.is_empty()) {
            (Some(cluster), false) => cluster.clone(),
            _ => {
                let describer = match described {
                    Some(bytes) => Described::Done(bytes),
                    None => Described::Pending(describe_in_background(
                        &self.shared,
                        &descriptor,
                        &image,
                    )),
                };
                return (launch, describer);
            }
        };
        let family = descriptor.family;
        let mut next_id = local + 1;
        let mut shares = Vec::with_capacity(remote.len());
        for grant in remote {
            let children: Vec<RemoteChild> = (0..grant.slots)
                .map(|_| {
                    let id = next_id;
                    next_id += 1;
                    let target = RemoteTarget {
                        cluster: cluster.clone(),
                        host: grant.host.clone(),
                        family,
                    };
                    RemoteChild(Arc::new(ChildCell::new(
                        id,
                        0,
                        self.child_label(id),
                        Some(target),
                    )))
                })
                .collect();
            launch.cells.extend(children.iter().map(|c| c.0.clone()));
            shares.push((grant, children));
        }
        launch.served_family = Some(family);
        cluster.serve_image(family, image.clone());
        let (shared, parent_label) = (self.shared.clone(), self.label.clone());
        let shipping =
            self.shared
                .launcher
                .submit(move || match describe(&shared, descriptor, &image) {
                    Ok((descriptor, bytes)) => {
                        let done = description(&descriptor, bytes);
                        let descriptor = Arc::new(descriptor);
                        for (grant, children) in shares {
                            cluster.launch(
                                grant,
                                RemoteLaunch {
                                    descriptor: descriptor.clone(),
                                    children,
                                    checkpoint,
                                    parent_label: parent_label.clone(),
                                    external: false,
                                },
                            );
                        }
                        done
                    }
                    Err(e) => {
                        for (grant, children) in shares {
                            cluster.release(grant);
                            for child in children {
                                child.ended(
                                    VmOutcome::Failed(format!(
                                        "describing the clone point failed: {e}"
                                    )),
                                    Duration::ZERO,
                                );
                            }
                        }
                        Description::default()
                    }
                });
        (launch, Described::Pending(shipping))
    }

    /// Starts `count` children from `descriptor`. The supervisor's launcher
    /// thread creates the children's threads, so the parent's pause neither
    /// grows with the number of clones nor waits to create a thread.
    fn spawn_children(
        &self,
        descriptor: &Descriptor,
        image: Arc<MemoryImage>,
        count: u32,
        checkpoint: u64,
    ) -> Launch {
        let snapshot = Arc::new(descriptor.machine.clone());
        let starts: Vec<ChildStart> = (1..=count)
            .map(|id| {
                let vm = self.shared.next_vm.fetch_add(1, Ordering::Relaxed);
                let label = self.child_label(id);
                ChildStart {
                    shared: self.shared.clone(),
                    prepared: None,
                    cell: Arc::new(ChildCell::new(id, vm, label.clone(), None)),
                    snapshot: snapshot.clone(),
                    image: image.clone(),
                    label,
                    checkpoint,
                    generation: descriptor.generation,
                }
            })
            .collect();
        let cells = starts.iter().map(|c| c.cell.clone()).collect();
        let (shared, mem_size) = (self.shared.clone(), descriptor.machine.mem_size);
        let thread = self.shared.launcher.submit(move || {
            let mut warm = shared.take_warm(mem_size, starts.len());
            let threads = starts
                .into_iter()
                .map(|mut child| {
                    child.prepared = warm.pop();
                    std::thread::Builder::new()
                        .name(format!("vm{}", child.cell.vm))
                        .spawn(move || child.run())
                        .expect("spawning a clone thread")
                })
                .collect();
            shared.warm_up(mem_size);
            threads
        });
        Launch {
            cells,
            thread,
            served_family: None,
        }
    }

    /// Waits for every child of `ticket`; returns how many there were.
    fn join(&mut self, ticket: u64) -> Result<u32, JoinError> {
        let Some(spawned) = self.tickets.get(&ticket).and_then(|t| t.spawned.as_ref()) else {
            return Err(JoinError::Errno(errno::ENOENT));
        };
        let cells = spawned.children.clone();
        for cell in &cells {
            let mut end = cell.end.lock().unwrap_or_else(|p| p.into_inner());
            while end.is_none() {
                if self.killed() {
                    return Err(JoinError::Killed);
                }
                self.refuse_controls("the VM is waiting in join");
                end = cell
                    .done
                    .wait_timeout(end, WAIT_SLICE)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let count = cells.len() as u32;
        self.finish_ticket(ticket);
        Ok(count)
    }

    /// Joins the threads of a ticket whose children all ended and files its report.
    fn finish_ticket(&mut self, ticket: u64) {
        let Some(t) = self.tickets.get_mut(&ticket) else {
            return;
        };
        self.shared.release(std::mem::take(&mut t.unused_slots));
        if let Some(cluster) = &self.shared.config.cluster {
            for grant in t.remote.drain(..) {
                cluster.release(grant);
            }
        }
        let Some(spawned) = t.spawned.as_mut() else {
            return;
        };
        if spawned.joined {
            return;
        }
        spawned.joined = true;
        for thread in spawned
            .launcher
            .take()
            .and_then(Job::wait)
            .unwrap_or_default()
        {
            let _ = thread.join();
        }
        let described = spawned
            .describer
            .take()
            .map_or_else(Description::default, Described::get);
        spawned.report.descriptor_bytes = described.bytes;
        spawned.report.data_pages = described.data_pages;
        let mut last_start = None;
        for cell in &spawned.children {
            let first_run = *cell.first_run.lock().unwrap_or_else(|p| p.into_inner());
            last_start = last_start.max(first_run);
            let (outcome, runtime) = cell
                .end
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or((VmOutcome::Failed("no outcome".into()), Duration::ZERO));
            spawned.report.children.push(ChildReport {
                id: cell.id,
                vm: cell.vm,
                host: cell.remote.as_ref().map(|r| r.host.clone()),
                restore: *cell.restore.lock().unwrap_or_else(|p| p.into_inner()),
                runtime,
                outcome,
            });
        }
        spawned.report.all_running = last_start.map(|t| t.duration_since(spawned.started));
        if let (Some(family), Some(cluster)) =
            (spawned.served_family.take(), &self.shared.config.cluster)
        {
            cluster.retire_image(family);
        }
        self.shared
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(spawned.report.clone());
    }

    /// A joined child's outcome; `EBUSY` while the ticket's children have not
    /// been joined, `ENOENT` for an unknown ticket or child.
    fn child_outcome(&self, ticket: u64, child: u32) -> Result<VmOutcome, u64> {
        let Some(spawned) = self.tickets.get(&ticket).and_then(|t| t.spawned.as_ref()) else {
            return Err(errno::ENOENT);
        };
        if child == 0 || child > spawned.report.clones {
            return Err(errno::ENOENT);
        }
        if !spawned.joined {
            return Err(errno::EBUSY);
        }
        spawned
            .report
            .children
            .iter()
            .find(|c| c.id == child)
            .map(|c| c.outcome.clone())
            .ok_or(errno::ENOENT)
    }

    /// At VM end: kill what still runs, wait for it, release every slot.
    fn end_all_tickets(&mut self) {
        for ticket in self.tickets.values() {
            if let Some(spawned) = &ticket.spawned {
                for cell in &spawned.children {
                    cell.kill();
                }
            }
        }
        let ids: Vec<u64> = self.tickets.keys().copied().collect();
        for id in ids {
            self.finish_ticket(id);
        }
        self.tickets.clear();
    }
}

/// Children being started: their cells now, their threads from the launcher.
struct Launch {
    cells: Vec<Arc<ChildCell>>,
    thread: Job<Vec<JoinHandle<()>>>,
    /// The clone point, when it is served to other hosts.
    served_family: Option<u64>,
}

enum JoinError {
    Errno(u64),
    /// This VM was killed while it waited.
    Killed,
}

/// Everything a child thread needs to restore and run its VM.
struct ChildStart {
    shared: Arc<Shared>,
    /// A VM prepared ahead of time, if the pool had one.
    prepared: Option<PreparedVm>,
    cell: Arc<ChildCell>,
    snapshot: Arc<MachineSnapshot>,
    image: Arc<MemoryImage>,
    label: String,
    checkpoint: u64,
    generation: u32,
}

impl ChildStart {
    fn run(self) {
        let begun = Instant::now();
        let (console, flush) = labelled(self.label.clone(), self.shared.config.lines.clone());
        let hv = self.shared.hv.as_ref();
        let restored = match self.prepared {
            Some(prepared) => {
                Machine::restore_prepared(hv, prepared, &self.snapshot, &self.image, console)
            }
            None => Machine::restore(hv, &self.snapshot, &self.image, console),
        }
        .and_then(|mut m| {
            m.set_return(u64::from(self.cell.id), self.checkpoint)?;
            Ok(m)
        });
        let restore = begun.elapsed();
        drop(self.image);
        let (outcome, runtime) = match restored {
            Err(e) => (VmOutcome::Failed(error_chain(&e)), Duration::ZERO),
            Ok(machine) => {
                *self.cell.kicker.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(machine.kicker());
                let started = Instant::now();
                self.cell.mark_started(restore);
                let ctx = VmContext {
                    shared: self.shared.clone(),
                    vm: self.cell.vm,
                    label: self.label,
                    is_clone: true,
                    kill: self.cell.kill.clone(),
                    requests: None,
                    faults: None,
                    flush,
                    generation: self.generation,
                    tickets: HashMap::new(),
                    checkpoints: HashMap::new(),
                };
                (ctx.drive(machine), started.elapsed())
            }
        };
        self.shared.release(1);
        self.cell.finish(outcome, runtime);
    }
}

/// Restores and runs one hollow clone; its memory comes from `start.family`.
fn run_hollow(shared: Arc<Shared>, vm: u64, start: HollowStart) {
    let begun = Instant::now();
    let snapshot = &start.descriptor.machine;
    let mem_size = snapshot.mem_size;
    let lines = start
        .lines
        .clone()
        .unwrap_or_else(|| shared.config.lines.clone());
    let (console, flush) = labelled(start.label.clone(), lines);
    let prepared = shared.take_warm(mem_size, 1).pop();
    shared.warm_up(mem_size);
    let kill = Arc::new(AtomicBool::new(false));
    let restored = (|| -> Result<(Machine, Arc<FaultHandler>), String> {
        let hv = shared.hv.as_ref();
        let prepared = match prepared {
            Some(prepared) => prepared,
            None => PreparedVm::new(hv, mem_size).map_err(|e| error_chain(&e))?,
        };
        let mut machine = Machine::restore_hollow(
            hv,
            prepared,
            snapshot,
            start.family.cache().memfd(),
            console,
        )
        .map_err(|e| error_chain(&e))?;
        let avoid = if start.avoidance {
            AvoidMap::new(
                mem_size / snowflock_vmm::memory::PAGE_SIZE,
                snapshot.data_pages.runs(),
                snapshot.free_pages.runs(),
            )
        } else {
            AvoidMap::none(mem_size / snowflock_vmm::memory::PAGE_SIZE)
        }
        .map_err(|e| error_chain(&e))?;
        let kicker = machine.kicker();
        let on_failure: Arc<dyn Fn(&snowflock_fault_handler::FaultError) + Send + Sync> =
            Arc::new(move |_| kicker.kick());
        // SAFETY: hollow memory is a private mapping of the whole of this
        // family's cache memfd that nothing has touched yet (restoring
        // writes only vCPU and VM state). It stays
        // mapped until `machine` drops, and `VmContext::drive` (or the error
        // path below) closes the handler before the machine drops.
        let handler = unsafe {
            FaultHandler::start(
                start.family.clone(),
                machine.memory().host_addr(),
                mem_size,
                avoid,
                on_failure,
            )
        }
        .map_err(|e| error_chain(&e))?;
        let handler = Arc::new(handler);
        if start.avoidance {
            let faults = handler.clone();
            machine.set_fresh_pages_hook(Arc::new(move |runs| faults.mark_fresh(runs)));
        }
        if !start.external
            && let Err(e) = machine.set_return(u64::from(start.child), start.checkpoint)
        {
            handler.close();
            return Err(error_chain(&e));
        }
        Ok((machine, handler))
    })();
    let restore = begun.elapsed();
    let (outcome, runtime, stats) = match restored {
        Err(reason) => (
            VmOutcome::Failed(reason),
            Duration::ZERO,
            CloneStats::default(),
        ),
        Ok((machine, handler)) => {
            start.events.started(vm, restore, handler.clone());
            let started = Instant::now();
            let ctx = VmContext {
                shared: shared.clone(),
                vm,
                label: start.label.clone(),
                is_clone: !start.external,
                kill,
                requests: None,
                faults: Some(handler.clone()),
                flush,
                generation: start.descriptor.generation,
                tickets: HashMap::new(),
                checkpoints: HashMap::new(),
            };
            let outcome = ctx.drive(machine);
            (outcome, started.elapsed(), handler.stats())
        }
    };
    shared.release(1);
    start.events.ended(vm, outcome, runtime, stats);
}
