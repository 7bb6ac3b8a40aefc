//! A running flock VM: one vCPU, its memory, and the hypercalls the VMM
//! answers itself. Hypercalls that need the control plane (tickets, clones,
//! join) come back from [`Machine::run`] as a [`Request`]; the caller answers
//! with [`Machine::reply`] (or [`Machine::reply_child_result`]) and runs again.
//!
//! Page reports (`REPORT_PAGES`) are answered here too: the latest *free*
//! report goes into the snapshot of the capture that follows it
//! ([`MachineSnapshot::free_pages`]), *fresh* reports go to the hook set with
//! [`Machine::set_fresh_pages_hook`].

use std::io::Write;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use snowflock_abi::linux::SYSCALL_TRAP_PORT;
use snowflock_abi::linux::files::{
    HostFileRequest, MOUNTS_ADDR, OP_OUTPUT, OP_READ, OP_READDIR, OP_READLINK, OP_STAT, OP_STDIN,
    STAT_NOFOLLOW,
};
use snowflock_abi::{
    BOOT_INFO_ADDR, BOOT_INFO_MAGIC, BootInfo, EXCEPTION_PORT, HYPERCALL_PORT, IMAGE_BASE,
    PAGE_SIZE, PageReportKind, PanicReport, errno, nr, ticket,
};

use crate::boot::{self, BootError, GuestLayout};
use crate::files::{FilesConfig, FilesError, HostFiles};
use crate::hypercall::{self, GuestRange, Hypercall, HypercallError};
use crate::hypervisor::{
    Hypervisor, HypervisorError, StateError, UserSelectors, Vcpu, VcpuExit, VcpuKicker, VcpuState,
    Vm, VmState,
};
use crate::linux;
use crate::memory::{
    GuestMemory, HostPages, MemoryError, MemoryImage, PageRuns, ReservedMemory, RestoredMemory,
};

/// Receives console bytes of a VM.
pub type ConsoleSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Receives the runs `(first page, page count)` of a `REPORT_PAGES(Fresh)`:
/// guest pages whose contents the guest will overwrite, so a hollow clone
/// need not fetch them. Called on the vCPU thread before the guest resumes.
pub type FreshPagesHook = Arc<dyn Fn(&[(u64, u64)]) + Send + Sync>;

/// Counters of the `REPORT_PAGES` calls a VM made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageReportStats {
    /// Free reports accepted.
    pub free_reports: u64,
    /// Runs and pages in the free reports accepted, summed.
    pub free_runs: u64,
    pub free_pages: u64,
    /// Free reports that went into a capture's snapshot.
    pub free_reports_captured: u64,
    /// Fresh reports accepted, and their pages.
    pub fresh_reports: u64,
    pub fresh_pages: u64,
    /// Fresh pages passed to the hook (the rest were ignored: no hook set).
    pub fresh_pages_forwarded: u64,
    /// Reports refused with `-EINVAL` (bad runs, count or kind).
    pub refused: u64,
}

const MEMORY_SLOT: u32 = 0;

/// How to start a VM from an image.
#[derive(Clone)]
pub struct MachineConfig {
    /// Guest memory in bytes (multiple of 2 MiB, at least 32 MiB).
    pub mem_size: u64,
    /// The image's argument string.
    pub cmdline: String,
    /// Where console output goes.
    pub console: ConsoleSink,
    /// The host pages behind guest memory, and behind every clone's view.
    pub host_pages: HostPages,
    /// The Linux personality (`snowflock-linux`), needed to run a static
    /// Linux executable; flock images run without it.
    pub personality: Option<Arc<[u8]>>,
    /// A Linux-ABI program's host mounts and standard input.
    pub files: FilesConfig,
    /// A Linux-ABI program's system calls are printed with their results.
    pub strace: bool,
    /// A Linux-ABI program's `syscall` sites are never patched: every call
    /// traps to the VMM (tens of microseconds each).
    pub trap_syscalls: bool,
}

impl std::fmt::Debug for MachineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineConfig")
            .field("mem_size", &self.mem_size)
            .field("cmdline", &self.cmdline)
            .field("host_pages", &self.host_pages)
            .finish_non_exhaustive()
    }
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            mem_size: 256 << 20,
            cmdline: String::new(),
            console: stdout_console(),
            host_pages: HostPages::Base,
            personality: None,
            files: FilesConfig::default(),
            strace: false,
            trap_syscalls: false,
        }
    }
}

/// A console sink that copies guest output to this process's stdout.
pub fn stdout_console() -> ConsoleSink {
    Arc::new(|bytes| {
        let mut out = std::io::stdout().lock();
        // Console output is best effort: a closed stdout must not stop the guest.
        let _ = out.write_all(bytes).and_then(|()| out.flush());
    })
}

/// Why [`Machine::run`] returned without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The guest called `EXIT` with this code.
    Exited(i32),
    /// The guest called `CHILD_EXIT` with this result. A clone ends here; for
    /// any other VM the caller replies (with `-EPERM`) and runs it again.
    ChildExit(Vec<u8>),
    /// The guest needs the control plane; answer before running again.
    Request(Request),
    /// A [`VcpuKicker`] paused the VM; run again to resume.
    Paused,
}

/// A hypercall only the control plane can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    RequestTicket {
        clones: u32,
        /// The children will write much of their state (`abi::ticket::CHILDREN_WRITE`).
        children_write: bool,
    },
    Clone {
        ticket: u64,
    },
    Checkpoint,
    CreateClones {
        checkpoint: u64,
        ticket: u64,
    },
    Join {
        ticket: u64,
    },
    ChildResult {
        ticket: u64,
        child: u32,
        capacity: u64,
    },
    Kill {
        ticket: u64,
    },
}

/// What ended a VM, or made an operation on it fail.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("setting up the VM failed")]
    Boot(#[from] BootError),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("hypervisor")]
    Hypervisor(#[from] HypervisorError),
    #[error("vCPU state")]
    State(#[from] StateError),
    #[error("guest {name} at rip={rip:#x}{detail}")]
    GuestException {
        vector: u8,
        name: &'static str,
        rip: u64,
        error_code: Option<u64>,
        fault_addr: Option<u64>,
        detail: String,
    },
    #[error("guest triple fault (the vCPU reset) at rip={rip:#x}")]
    TripleFault { rip: u64 },
    #[error("bad hypercall at rip={rip:#x}")]
    BadHypercall {
        rip: u64,
        #[source]
        source: HypercallError,
    },
    #[error("guest panicked at {location} (rip={rip:#x}): {message}")]
    GuestPanic {
        message: String,
        location: String,
        rip: u64,
    },
    #[error("guest stopped with an unexpected exit at rip={rip:#x}: {exit}")]
    UnexpectedExit { rip: u64, exit: String },
    #[error("the VM has a pending request; reply before running it")]
    ReplyPending,
    #[error("reply without a pending request")]
    NoPendingRequest,
    #[error(
        "guest executed `syscall` at {site:#x}: a flock image makes hypercalls, not Linux system calls (a static Linux program runs as one with its personality)"
    )]
    SyscallInFlockImage { site: u64 },
    #[error("`syscall` at {site:#x} with the stack pointer {rsp:#x} outside guest memory")]
    SyscallStack { site: u64, rsp: u64 },
    #[error("host files")]
    Files(#[from] FilesError),
    #[error("mounts and standard input are for Linux-ABI programs; this is a flock image")]
    FilesForFlockImage,
}

/// The saved state of a VM, without memory contents: the part of a clone
/// descriptor this crate produces.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineSnapshot {
    pub hypervisor: String,
    pub mem_size: u64,
    pub tsc_khz: Option<u64>,
    pub vcpu: VcpuState,
    pub vm: VmState,
    /// Pages holding data; every other page is zero. Empty until
    /// [`MachineSnapshot::describe_memory`] fills it in.
    pub data_pages: PageRuns,
    /// Heap pages the guest reported free right before this capture
    /// (`REPORT_PAGES(Free)`): their contents do not matter, so clones may
    /// get zeros instead. Sorted, disjoint, inside the heap; empty without
    /// a report.
    pub free_pages: PageRuns,
    /// A Linux-ABI guest (a static Linux executable with the personality),
    /// not a flock image.
    pub linux: bool,
    /// A Linux-ABI guest's host files (its clones open the same mounts).
    pub files: FilesConfig,
}

impl MachineSnapshot {
    /// Records which pages of `image` hold data. This walks the image's
    /// memfds (about 10 ms for 500 MiB of data), so it is separate from the
    /// capture, which keeps the VM paused.
    pub fn describe_memory(&mut self, image: &MemoryImage) -> Result<(), MemoryError> {
        self.data_pages = PageRuns::from_bitmap(&image.data_pages()?);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Reply,
    ChildResult(GuestRange),
}

/// A VM made ahead of time: vCPU created and its memory slot pointing at
/// reserved, still empty host memory. Creating the first memory slot of a
/// fresh KVM VM waits several milliseconds (mostly idle), so clone paths
/// prepare VMs in advance and only fill in memory and state when cloning.
pub struct PreparedVm {
    // Field order is drop order: the VM goes before the memory its slot points at.
    vm: Box<dyn Vm>,
    vcpu: Box<dyn Vcpu>,
    reserved: ReservedMemory,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("mem_size", &self.reserved.size())
            .finish_non_exhaustive()
    }
}

impl PreparedVm {
    /// A VM for `mem_size` bytes of guest memory.
    pub fn new(hv: &dyn Hypervisor, mem_size: u64) -> Result<Self, MachineError> {
        GuestLayout::new(mem_size)?;
        // Started now so that no clone point has to create its thread.
        crate::background::housekeeper();
        let reserved = ReservedMemory::new(mem_size)?;
        let mut vm = hv.create_vm()?;
        // SAFETY: the reserved range stays mapped at this address for as long
        // as the VM: it moves into the GuestMemory of the Machine that takes
        // over this VM, whose fields drop the VM first, and freezing keeps the
        // address.
        unsafe { vm.map_memory(MEMORY_SLOT, 0, reserved.host_addr(), mem_size)? };
        let vcpu = vm.create_vcpu(0)?;
        Ok(Self { vm, vcpu, reserved })
    }

    /// Guest memory size this VM was prepared for.
    pub fn mem_size(&self) -> u64 {
        self.reserved.size()
    }
}

/// One VM with one vCPU.
pub struct Machine {
    vm: Box<dyn Vm>,
    vcpu: Box<dyn Vcpu>,
    memory: GuestMemory,
    layout: GuestLayout,
    console: ConsoleSink,
    pending: Option<Pending>,
    hypervisor: &'static str,
    tsc_khz: Option<u64>,
    /// Unmapping of memory this VM no longer uses, on the housekeeper;
    /// awaited on drop so that a dropped Machine has released everything.
    retiring: Vec<crate::background::Job<()>>,
    /// The heap range from the boot information (read on first need in
    /// restored VMs).
    heap: Option<Range<u64>>,
    /// The latest free report, while the next capture may use it.
    free_report: Option<PageRuns>,
    fresh_hook: Option<FreshPagesHook>,
    report_stats: PageReportStats,
    syscall_traps: u64,
    files: HostFiles,
    /// Whether `layout.personality` was read from memory yet (on the first
    /// hypercall, not at restore: a hollow clone's memory is not readable
    /// before its fault handler runs).
    kind_known: bool,
}

impl Drop for Machine {
    fn drop(&mut self) {
        for job in self.retiring.drain(..) {
            job.wait();
        }
    }
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("layout", &self.layout)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

fn monotonic_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The host's `CLOCK_MONOTONIC` (shared by every VM and host daemon on the
/// machine, unlike [`monotonic_ns`], which counts from this process's start).
fn host_monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer given.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } == 0;
    if ok {
        now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
    } else {
        monotonic_ns()
    }
}

impl Machine {
    /// Loads `image` into a new VM, ready to run from its entry point.
    pub fn boot(
        hv: &dyn Hypervisor,
        image: &[u8],
        config: &MachineConfig,
    ) -> Result<Self, MachineError> {
        let prepared = PreparedVm::new(hv, config.mem_size)?;
        let memory = GuestMemory::new_in(prepared.reserved, config.host_pages)?;
        let (entry, loaded) = boot::setup(
            &memory,
            image,
            &config.cmdline,
            hv.tsc_khz(),
            config.personality.as_deref(),
            linux::LinuxFlags {
                strace: config.strace,
                trap_syscalls: config.trap_syscalls,
            },
        )?;
        let files = HostFiles::open(&config.files)?;
        if linux::read_start(&memory)?.is_some() {
            memory.write(MOUNTS_ADDR, &files.mount_table())?;
        } else if config.files != FilesConfig::default() {
            return Err(MachineError::FilesForFlockImage);
        }
        let mut machine = Self::assemble(
            hv,
            prepared.vm,
            prepared.vcpu,
            memory,
            config.console.clone(),
            files,
        )?;
        machine.heap = Some(loaded.end..machine.layout.guard_start());
        machine.vcpu.set_long_mode_entry(&entry)?;
        Ok(machine)
    }

    /// A new VM resuming `snapshot` on a private view of `image`.
    pub fn restore(
        hv: &dyn Hypervisor,
        snapshot: &MachineSnapshot,
        image: &Arc<MemoryImage>,
        console: ConsoleSink,
    ) -> Result<Self, MachineError> {
        let prepared = PreparedVm::new(hv, snapshot.mem_size)?;
        Self::restore_prepared(hv, prepared, snapshot, image, RestoredMemory::View, console)
    }

    /// Like [`Machine::restore`], in a VM prepared ahead of time, on memory
    /// held as `memory` says.
    pub fn restore_prepared(
        hv: &dyn Hypervisor,
        prepared: PreparedVm,
        snapshot: &MachineSnapshot,
        image: &Arc<MemoryImage>,
        memory: RestoredMemory,
        console: ConsoleSink,
    ) -> Result<Self, MachineError> {
        if image.size() != snapshot.mem_size || prepared.reserved.size() != snapshot.mem_size {
            return Err(StateError::Inconsistent(format!(
                "descriptor says {:#x} bytes of memory, image has {:#x}, prepared VM {:#x}",
                snapshot.mem_size,
                image.size(),
                prepared.reserved.size()
            ))
            .into());
        }
        let memory = match memory {
            RestoredMemory::View => GuestMemory::from_image_in(image, prepared.reserved)?,
            RestoredMemory::Copy => GuestMemory::copy_of_image_in(image, prepared.reserved)?,
        };
        let files = HostFiles::open(&snapshot.files)?;
        let mut machine = Self::assemble(hv, prepared.vm, prepared.vcpu, memory, console, files)?;
        machine.vm.restore_state(&snapshot.vm)?;
        machine.vcpu.restore_state(&snapshot.vcpu)?;
        Ok(machine)
    }

    /// A VM resuming `snapshot` on hollow memory, a private view of the
    /// host page cache `cache` (see [`GuestMemory::hollow_in`]): nothing is
    /// read or written in guest memory here, so the caller can register it
    /// with a userfaultfd handler before the vCPU first runs.
    pub fn restore_hollow(
        hv: &dyn Hypervisor,
        prepared: PreparedVm,
        snapshot: &MachineSnapshot,
        cache: std::os::fd::BorrowedFd<'_>,
        console: ConsoleSink,
    ) -> Result<Self, MachineError> {
        if prepared.reserved.size() != snapshot.mem_size {
            return Err(StateError::Inconsistent(format!(
                "descriptor says {:#x} bytes of memory, prepared VM has {:#x}",
                snapshot.mem_size,
                prepared.reserved.size()
            ))
            .into());
        }
        let memory = GuestMemory::hollow_in(prepared.reserved, cache)?;
        let files = HostFiles::open(&snapshot.files)?;
        let mut machine = Self::assemble(hv, prepared.vm, prepared.vcpu, memory, console, files)?;
        machine.vm.restore_state(&snapshot.vm)?;
        machine.vcpu.restore_state(&snapshot.vcpu)?;
        Ok(machine)
    }

    fn assemble(
        hv: &dyn Hypervisor,
        vm: Box<dyn Vm>,
        vcpu: Box<dyn Vcpu>,
        memory: GuestMemory,
        console: ConsoleSink,
        files: HostFiles,
    ) -> Result<Self, MachineError> {
        Ok(Self {
            files,
            vm,
            vcpu,
            layout: GuestLayout::new(memory.size())?,
            memory,
            console,
            pending: None,
            hypervisor: hv.name(),
            tsc_khz: hv.tsc_khz(),
            retiring: Vec::new(),
            heap: None,
            free_report: None,
            fresh_hook: None,
            report_stats: PageReportStats::default(),
            syscall_traps: 0,
            kind_known: false,
        })
    }

    /// Sends this VM's fresh page reports to `hook` from now on (the control
    /// plane forwards them to the fault handler of a hollow clone). Without
    /// a hook they are counted and ignored.
    pub fn set_fresh_pages_hook(&mut self, hook: FreshPagesHook) {
        self.fresh_hook = Some(hook);
    }

    /// Counters of the page reports this VM made.
    pub fn page_reports(&self) -> PageReportStats {
        self.report_stats
    }

    /// Guest memory of this VM.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// A handle that pauses this VM from another thread.
    pub fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.vcpu.kicker()
    }

    /// Sets the hypercall return registers of a restored clone (its id in
    /// `rax`), without needing a pending request.
    pub fn set_return(&mut self, rax: u64, rdx: u64) -> Result<(), MachineError> {
        let mut regs = self.vcpu.regs()?;
        regs.rax = rax;
        regs.rdx = rdx;
        self.vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Answers the pending request with `rax` (and `rdx`).
    pub fn reply(&mut self, rax: u64, rdx: u64) -> Result<(), MachineError> {
        match self.pending.take() {
            Some(_) => self.set_return(rax, rdx),
            None => Err(MachineError::NoPendingRequest),
        }
    }

    /// Answers a pending [`Request::ChildResult`]: copies as much of
    /// `payload` as fits into the guest's buffer.
    pub fn reply_child_result(&mut self, status: u64, payload: &[u8]) -> Result<(), MachineError> {
        match self.pending.take() {
            Some(Pending::ChildResult(buf)) => {
                let n = payload.len().min(buf.len as usize);
                self.memory.write(buf.addr, &payload[..n])?;
                self.set_return(status, payload.len() as u64)
            }
            Some(Pending::Reply) => {
                self.pending = Some(Pending::Reply);
                Err(MachineError::NoPendingRequest)
            }
            None => Err(MachineError::NoPendingRequest),
        }
    }

    /// Captures the VM for cloning: complete vCPU and VM state, and its
    /// memory frozen into an image that this VM also continues on. The vCPU
    /// must be stopped (between runs), e.g. at a request or after a pause.
    /// The snapshot's data page runs are left for
    /// [`MachineSnapshot::describe_memory`]; its free pages are those of the
    /// guest's free report if the capture follows it at once (the guest's
    /// next hypercall after the report was this `CLONE` or `CHECKPOINT`),
    /// and the report is used up.
    pub fn capture(&mut self) -> Result<(MachineSnapshot, Arc<MemoryImage>), MachineError> {
        let started = Instant::now();
        let vcpu = self.vcpu.save_state()?;
        let vm = self.vm.save_state()?;
        let saved = started.elapsed();
        let frozen = self.memory.freeze()?;
        let froze = started.elapsed();
        // Unmapping a large populated range takes milliseconds; the parent
        // need not wait for it.
        let retired = frozen.retired;
        self.retiring.retain(|job| !job.is_finished());
        self.retiring
            .push(crate::background::housekeeper().submit(move || retired.unmap_gradually()));
        tracing::debug!(
            save_us = saved.as_micros() as u64,
            freeze_us = (froze - saved).as_micros() as u64,
            "captured"
        );
        let snapshot = MachineSnapshot {
            hypervisor: self.hypervisor.to_string(),
            mem_size: self.memory.size(),
            tsc_khz: self.tsc_khz,
            vcpu,
            vm,
            data_pages: PageRuns::default(),
            free_pages: self.take_free_report(),
            linux: linux::read_start(&self.memory)?.is_some(),
            files: self.files.config().clone(),
        };
        Ok((snapshot, frozen.image))
    }

    /// Runs the guest until it exits, needs the control plane, is paused, or fails.
    pub fn run(&mut self) -> Result<Stop, MachineError> {
        if self.pending.is_some() {
            return Err(MachineError::ReplyPending);
        }
        loop {
            match self.vcpu.run()? {
                VcpuExit::IoOut {
                    port: HYPERCALL_PORT,
                    size,
                    data,
                } => {
                    if let Some(stop) = self.hypercall(size, data)? {
                        return Ok(stop);
                    }
                }
                VcpuExit::IoOut {
                    port: EXCEPTION_PORT,
                    data,
                    ..
                } => return Err(self.exception(data as u8)),
                VcpuExit::IoOut {
                    port: SYSCALL_TRAP_PORT,
                    ..
                } => self.syscall_trap()?,
                VcpuExit::Interrupted => {
                    // The guest may go on and reuse free pages before a
                    // capture of this pause: it cannot use the report.
                    self.free_report = None;
                    return Ok(Stop::Paused);
                }
                VcpuExit::Shutdown => {
                    return Err(MachineError::TripleFault {
                        rip: self.vcpu.regs()?.rip,
                    });
                }
                other => {
                    return Err(MachineError::UnexpectedExit {
                        rip: self.vcpu.regs()?.rip,
                        exit: format!("{other:?}"),
                    });
                }
            }
        }
    }

    /// A `syscall` reached the CPL0 stub (a site not patched yet, or one the
    /// personality leaves unpatched): enter the personality's syscall entry
    /// at CPL3 as if the site had called it, with the return address
    /// (`rcx`, the site + 2) pushed and the flags `syscall` saved in `r11`.
    fn syscall_trap(&mut self) -> Result<(), MachineError> {
        let mut regs = self.vcpu.regs()?;
        let site = regs.rcx.wrapping_sub(2);
        let Some(start) = linux::read_start(&self.memory)? else {
            return Err(MachineError::SyscallInFlockImage { site });
        };
        let rsp = regs.rsp.wrapping_sub(8);
        if !self.layout.is_guest_range(rsp, 8, true) {
            return Err(MachineError::SyscallStack {
                site,
                rsp: regs.rsp,
            });
        }
        self.memory.write_u64(rsp, regs.rcx)?;
        regs.rsp = rsp;
        regs.rip = start.syscall_entry;
        regs.rflags = regs.r11;
        self.syscall_traps += 1;
        self.vcpu.enter_user(
            &regs,
            UserSelectors {
                code: boot::USER_CODE_SELECTOR,
                data: boot::USER_DATA_SELECTOR,
            },
        )?;
        Ok(())
    }

    /// Serves `HOST_FILE`; a failing host operation is `-errno` to the guest,
    /// a bad request ends the VM.
    fn host_file(&mut self, op: u64, request: GuestRange) -> Result<(u64, u64), MachineError> {
        let raw = self.read_range(request)?;
        let word =
            |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let request = HostFileRequest {
            mount: word(0),
            path_ptr: word(1),
            path_len: word(2),
            offset: word(3),
            buf: word(4),
            len: word(5),
        };
        let rip = self.vcpu.regs()?.rip;
        let (path, buf) = hypercall::host_file_ranges(&request, &self.layout)
            .map_err(|source| MachineError::BadHypercall { rip, source })?;
        let path = self.read_range(path)?;
        if op == OP_OUTPUT {
            let data = self.read_range(buf)?;
            let written = self.files.write_output(&path, request.offset, &data);
            return Ok(written.map_or_else(|errno| (errno::encode(errno), 0), |()| (0, 0)));
        }
        let mut data = vec![0u8; buf.len as usize];
        let result = match op {
            OP_STAT => {
                let follow = request.offset & STAT_NOFOLLOW == 0;
                self.files.stat(request.mount, &path, follow).map(|stat| {
                    let bytes: Vec<u8> =
                        [stat.size, stat.mode, stat.mtime_ns, stat.ino, stat.nlink]
                            .iter()
                            .flat_map(|w| w.to_le_bytes())
                            .collect();
                    let n = bytes.len().min(data.len());
                    data[..n].copy_from_slice(&bytes[..n]);
                    (0, 0, n)
                })
            }
            OP_READ => self
                .files
                .read(request.mount, &path, request.offset, &mut data)
                .map(|n| (n as u64, 0, n)),
            OP_READDIR => self
                .files
                .readdir(request.mount, &path, request.offset, &mut data)
                .map(|(n, next)| (n as u64, next, n)),
            OP_READLINK => self
                .files
                .readlink(request.mount, &path, &mut data)
                .map(|n| (n as u64, 0, n)),
            OP_STDIN => self
                .files
                .read_stdin(request.offset, &mut data)
                .map(|n| (n as u64, 0, n)),
            _ => Err(errno::EINVAL),
        };
        match result {
            Ok((rax, rdx, written)) => {
                self.memory.write(buf.addr, &data[..written])?;
                Ok((rax, rdx))
            }
            Err(errno) => Ok((errno::encode(errno), 0)),
        }
    }

    /// This VM is clone `id` of clone point `generation` (its `/out` goes to
    /// its own directory).
    pub fn set_clone(&mut self, generation: u32, id: u32) {
        self.files.set_clone(generation, id);
    }

    /// Hands this VM's `/out` to `sink` instead of writing it on this host
    /// (a clone on another host than the job's).
    pub fn forward_output(&mut self, sink: crate::files::OutputSink) {
        self.files.forward_output(sink);
    }

    /// `syscall`s that exited to the VMM (each site's first, and every call
    /// of a site the personality does not patch).
    pub fn syscall_traps(&self) -> u64 {
        self.syscall_traps
    }

    fn bad(&self, source: HypercallError) -> MachineError {
        let rip = self.vcpu.regs().map(|r| r.rip).unwrap_or(0);
        MachineError::BadHypercall { rip, source }
    }

    /// Serves one hypercall; `Some` when the caller must act.
    fn hypercall(&mut self, size: u8, number: u32) -> Result<Option<Stop>, MachineError> {
        if size != 4 {
            return Err(self.bad(HypercallError::BadAccessSize { size }));
        }
        if !self.kind_known {
            self.layout.personality = linux::read_start(&self.memory)?.is_some();
            self.kind_known = true;
        }
        let regs = self.vcpu.regs()?;
        let call = hypercall::decode(number, &regs, &self.layout).map_err(|source| {
            MachineError::BadHypercall {
                rip: regs.rip,
                source,
            }
        })?;
        // A free report is good only for a capture at the very next hypercall.
        if !matches!(call, Hypercall::Clone { .. } | Hypercall::Checkpoint) {
            self.free_report = None;
        }
        let request = match call {
            Hypercall::ReportPages { runs, kind } => {
                let rax = self.report_pages(runs, kind)?;
                self.set_return(rax, 0)?;
                return Ok(None);
            }
            Hypercall::Invalid {
                nr: call,
                what,
                value,
            } => {
                tracing::debug!(call, what, value, "hypercall refused with EINVAL");
                if call == nr::REPORT_PAGES {
                    self.report_stats.refused += 1;
                }
                self.set_return(errno::encode(errno::EINVAL), 0)?;
                return Ok(None);
            }
            Hypercall::ConsoleWrite { data } => {
                let bytes = self.read_range(data)?;
                (self.console)(&bytes);
                self.set_return(data.len, 0)?;
                return Ok(None);
            }
            Hypercall::TimeNs => {
                self.set_return(monotonic_ns(), 0)?;
                return Ok(None);
            }
            Hypercall::Clocks => {
                let real = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                self.set_return(host_monotonic_ns(), real)?;
                return Ok(None);
            }
            Hypercall::HostFile { op, request } => {
                let (rax, rdx) = self.host_file(op, request)?;
                self.set_return(rax, rdx)?;
                return Ok(None);
            }
            Hypercall::SleepNs { ns } => {
                std::thread::sleep(std::time::Duration::from_nanos(ns));
                self.set_return(0, 0)?;
                return Ok(None);
            }
            Hypercall::SetFsBase { base } => {
                self.vcpu.set_fs_base(base)?;
                self.set_return(0, 0)?;
                return Ok(None);
            }
            Hypercall::Exit { code } => return Ok(Some(Stop::Exited(code))),
            Hypercall::ChildExit { result } => {
                // A VM that is not a clone gets an error reply instead of ending.
                self.pending = Some(Pending::Reply);
                return Ok(Some(Stop::ChildExit(self.read_range(result)?)));
            }
            Hypercall::Panic { report } => return Err(self.guest_panic(report, regs.rip)),
            Hypercall::RequestTicket { clones, flags } => Request::RequestTicket {
                clones,
                children_write: flags & ticket::CHILDREN_WRITE != 0,
            },
            Hypercall::Clone { ticket } => Request::Clone { ticket },
            Hypercall::Checkpoint => Request::Checkpoint,
            Hypercall::CreateClones { checkpoint, ticket } => {
                Request::CreateClones { checkpoint, ticket }
            }
            Hypercall::Join { ticket } => Request::Join { ticket },
            Hypercall::Kill { ticket } => Request::Kill { ticket },
            Hypercall::ChildResult { ticket, child, buf } => {
                self.pending = Some(Pending::ChildResult(buf));
                return Ok(Some(Stop::Request(Request::ChildResult {
                    ticket,
                    child,
                    capacity: buf.len,
                })));
            }
        };
        self.pending = Some(Pending::Reply);
        Ok(Some(Stop::Request(request)))
    }

    /// Serves one hypercall as [`Machine::run`] does for an `out` of `size`
    /// bytes carrying `number`, with the vCPU's registers set to `regs`
    /// first: the dispatcher without guest code in between, for fuzzing.
    /// A reply still owed from an earlier call is dropped.
    #[cfg(feature = "fuzzing")]
    pub fn serve_hypercall(
        &mut self,
        regs: &crate::Regs,
        size: u8,
        number: u32,
    ) -> Result<Option<Stop>, MachineError> {
        self.pending = None;
        self.vcpu.set_regs(regs)?;
        self.hypercall(size, number)
    }

    /// Serves `REPORT_PAGES`: `rax` is 0 or `-EINVAL`.
    fn report_pages(
        &mut self,
        runs: GuestRange,
        kind: PageReportKind,
    ) -> Result<u64, MachineError> {
        let raw = self.read_range(runs)?;
        let heap = self.heap_range()?;
        let runs = match hypercall::page_runs(&raw, heap) {
            Ok(runs) => runs,
            Err(error) => {
                tracing::debug!(%error, ?kind, "page report refused");
                self.report_stats.refused += 1;
                return Ok(errno::encode(errno::EINVAL));
            }
        };
        let runs = PageRuns::new(runs);
        let stats = &mut self.report_stats;
        match kind {
            PageReportKind::Free => {
                stats.free_reports += 1;
                stats.free_runs += runs.runs().len() as u64;
                stats.free_pages += runs.pages();
                self.free_report = Some(runs);
            }
            PageReportKind::Fresh => {
                stats.fresh_reports += 1;
                stats.fresh_pages += runs.pages();
                if let Some(hook) = &self.fresh_hook {
                    stats.fresh_pages_forwarded += runs.pages();
                    hook(runs.runs());
                }
            }
        }
        Ok(0)
    }

    /// The latest free report, if the next capture may use it; used up.
    fn take_free_report(&mut self) -> PageRuns {
        match self.free_report.take() {
            Some(runs) => {
                self.report_stats.free_reports_captured += 1;
                runs
            }
            None => PageRuns::default(),
        }
    }

    /// `BootInfo::heap_start..heap_end`. A restored VM reads it from its boot
    /// information page, which the guest cannot write.
    fn heap_range(&mut self) -> Result<Range<u64>, MachineError> {
        if let Some(heap) = &self.heap {
            return Ok(heap.clone());
        }
        let mut raw = [0u8; size_of::<BootInfo>()];
        self.memory.read(BOOT_INFO_ADDR, &mut raw)?;
        let word = |offset: usize| {
            u64::from_le_bytes(raw[offset..offset + 8].try_into().expect("8 bytes"))
        };
        let (magic, start, end) = (
            word(std::mem::offset_of!(BootInfo, magic)),
            word(std::mem::offset_of!(BootInfo, heap_start)),
            word(std::mem::offset_of!(BootInfo, heap_end)),
        );
        if magic != BOOT_INFO_MAGIC
            || start < IMAGE_BASE
            || start > end
            || end != self.layout.guard_start()
            || !start.is_multiple_of(PAGE_SIZE)
        {
            return Err(StateError::Inconsistent(format!(
                "boot information page is corrupt (magic {magic:#x}, heap {start:#x}..{end:#x})"
            ))
            .into());
        }
        self.heap = Some(start..end);
        Ok(start..end)
    }

    fn read_range(&self, range: GuestRange) -> Result<Vec<u8>, MachineError> {
        let mut buf = vec![0; range.len as usize];
        self.memory.read(range.addr, &mut buf)?;
        Ok(buf)
    }

    fn guest_panic(&self, report: GuestRange, rip: u64) -> MachineError {
        let decode = || -> Result<MachineError, MachineError> {
            let mut raw = [0u8; size_of::<PanicReport>()];
            self.memory.read(report.addr, &mut raw)?;
            let (message, file, line, column) = hypercall::panic_strings(&raw, &self.layout)
                .map_err(|source| MachineError::BadHypercall { rip, source })?;
            let text = |r| -> Result<String, MachineError> {
                Ok(String::from_utf8_lossy(&self.read_range(r)?).into_owned())
            };
            Ok(MachineError::GuestPanic {
                message: text(message)?,
                location: format!("{}:{line}:{column}", text(file)?),
                rip,
            })
        };
        decode().unwrap_or_else(|e| e)
    }

    /// Builds the error for exception `vector`, reported by a VMM stub.
    fn exception(&self, vector: u8) -> MachineError {
        let describe = || -> Result<MachineError, MachineError> {
            let regs = self.vcpu.regs()?;
            let frame = boot::read_exception_frame(&self.memory, vector, regs.rsp)?;
            let fault_addr = if vector == 14 {
                Some(self.vcpu.control_regs()?.cr2)
            } else {
                None
            };
            let detail = match (fault_addr, frame.error_code) {
                (Some(addr), Some(code)) => {
                    let access = if code & 2 != 0 { "write to" } else { "read of" };
                    let access = if code & 16 != 0 {
                        "instruction fetch at"
                    } else {
                        access
                    };
                    let what = if addr < PAGE_SIZE {
                        " (null pointer)"
                    } else if self.layout.is_stack_guard(addr) {
                        " (stack overflow)"
                    } else if code & 1 == 0 {
                        " (not mapped)"
                    } else {
                        " (protection violation)"
                    };
                    format!(": {access} {addr:#x}{what}")
                }
                (_, Some(code)) if code != 0 => format!(": error code {code:#x}"),
                _ => String::new(),
            };
            Ok(MachineError::GuestException {
                vector,
                name: boot::exception_name(vector),
                rip: frame.rip,
                error_code: frame.error_code,
                fault_addr,
                detail: format!("{detail} (rsp={:#x})", frame.rsp),
            })
        };
        describe().unwrap_or_else(|e| e)
    }
}
