//! The hypervisor abstraction: object-safe traits that the KVM backend (and,
//! later, a Xen backend) implement. Everything above this module talks to
//! `dyn Hypervisor`, `dyn Vm` and `dyn Vcpu` only.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A virtualization backend on this host.
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Short backend name recorded in descriptors ("kvm").
    fn name(&self) -> &'static str;
    /// A new, empty VM.
    fn create_vm(&self) -> Result<Box<dyn Vm>, HypervisorError>;
    /// The TSC frequency guests run at, if the backend knows it.
    fn tsc_khz(&self) -> Option<u64>;
}

/// One virtual machine: memory slots and vCPUs.
pub trait Vm: Send + std::fmt::Debug {
    /// Maps `len` bytes of host memory at `host_addr` as guest-physical `guest_phys`.
    ///
    /// # Safety
    /// `host_addr..host_addr + len` must be a mapping that stays valid and
    /// readable/writable until the slot is replaced or the VM is dropped.
    unsafe fn map_memory(
        &mut self,
        slot: u32,
        guest_phys: u64,
        host_addr: *mut u8,
        len: u64,
    ) -> Result<(), HypervisorError>;
    /// Creates vCPU `id`, configured with the host's supported CPUID.
    fn create_vcpu(&mut self, id: u8) -> Result<Box<dyn Vcpu>, HypervisorError>;
    /// Saves VM-level device state (clock, interrupt controller).
    fn save_state(&self) -> Result<VmState, StateError>;
    /// Restores VM-level device state saved by [`Vm::save_state`].
    fn restore_state(&mut self, state: &VmState) -> Result<(), StateError>;
}

/// A virtual CPU. Runs on one thread at a time; [`Vcpu::kicker`] lets other
/// threads force it out of the guest.
pub trait Vcpu: Send + std::fmt::Debug {
    /// Enters the guest until the next exit.
    fn run(&mut self) -> Result<VcpuExit, HypervisorError>;
    /// General-purpose registers.
    fn regs(&self) -> Result<Regs, HypervisorError>;
    /// Sets general-purpose registers.
    fn set_regs(&mut self, regs: &Regs) -> Result<(), HypervisorError>;
    /// Control registers and EFER (read-only view, for fault reports).
    fn control_regs(&self) -> Result<ControlRegs, HypervisorError>;
    /// Puts the vCPU in 64-bit long mode at CPL3 as `boot` describes.
    fn set_long_mode_entry(&mut self, boot: &LongModeEntry) -> Result<(), HypervisorError>;
    /// Returns to CPL3 with `regs`, in the user code and data segments
    /// `selectors`, after an exit taken at CPL0 (the pending I/O is
    /// completed first, so that it cannot move `rip` afterwards).
    fn enter_user(&mut self, regs: &Regs, selectors: UserSelectors) -> Result<(), HypervisorError>;
    /// Sets the FS segment base.
    fn set_fs_base(&mut self, base: u64) -> Result<(), HypervisorError>;
    /// Saves the complete vCPU state. Completes a pending I/O exit first, so
    /// the saved RIP is past the instruction that exited.
    fn save_state(&mut self) -> Result<VcpuState, StateError>;
    /// Restores state saved by [`Vcpu::save_state`].
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), StateError>;
    /// A handle that interrupts [`Vcpu::run`] from another thread.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;
}

/// Interrupts a running vCPU; the next (or current) `run` returns
/// [`VcpuExit::Interrupted`].
pub trait VcpuKicker: Send + Sync + std::fmt::Debug {
    fn kick(&self);
}

/// Why the guest stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// `out` to `port`; `data` holds `size` bytes, little-endian.
    IoOut { port: u16, size: u8, data: u32 },
    /// `in` from `port` (flock guests never do this).
    IoIn { port: u16, size: u8 },
    /// Access to guest-physical memory that no slot backs.
    Mmio { addr: u64, write: bool },
    /// `hlt` with interrupts off (never at CPL3).
    Halt,
    /// Triple fault: the vCPU reset.
    Shutdown,
    /// A [`VcpuKicker`] interrupted the run.
    Interrupted,
    /// The hypervisor could not emulate or enter the guest.
    InternalError { reason: String },
    /// Any other exit the VMM does not handle.
    Unexpected { reason: String },
}

/// General-purpose registers, in a backend-neutral form.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// Control registers for diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlRegs {
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// The flat CPL3 segments a guest runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserSelectors {
    pub code: u16,
    pub data: u16,
}

/// The long-mode CPL3 entry state of a flock image, as the boot module builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongModeEntry {
    pub regs: Regs,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub idt_base: u64,
    pub idt_limit: u16,
    pub tss_base: u64,
    pub tss_limit: u32,
    pub tss_selector: u16,
    pub user_code_selector: u16,
    pub user_data_selector: u16,
    /// Requested XCR0 (x87|SSE|AVX); the backend masks it by what the CPU supports.
    pub xcr0: u64,
    /// `LSTAR`: where a `syscall` enters (at CPL0).
    pub syscall_entry: u64,
}

/// Saved vCPU state, one variant per backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VcpuState {
    #[cfg(feature = "kvm")]
    Kvm(Box<crate::kvm::KvmVcpuState>),
}

/// Saved VM-level state, one variant per backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmState {
    #[cfg(feature = "kvm")]
    Kvm(Box<crate::kvm::KvmVmState>),
}

impl VcpuState {
    /// The parts of the state an operator looks at.
    pub fn summary(&self) -> VcpuSummary {
        match *self {
            #[cfg(feature = "kvm")]
            Self::Kvm(ref state) => state.summary(),
        }
    }
}

impl VmState {
    /// The parts of the state an operator looks at.
    pub fn summary(&self) -> VmSummary {
        match *self {
            #[cfg(feature = "kvm")]
            Self::Kvm(ref state) => state.summary(),
        }
    }
}

/// A readable digest of a saved vCPU.
#[allow(missing_docs)]
#[derive(Debug, Clone, Serialize)]
pub struct VcpuSummary {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs_selector: u16,
    pub cpl: u16,
    pub xcr0: Option<u64>,
    pub mp_state: u32,
    pub msrs: usize,
    pub cpuid_entries: usize,
    pub pending_exception: bool,
}

/// A readable digest of saved VM-level state.
#[allow(missing_docs)]
#[derive(Debug, Clone, Serialize)]
pub struct VmSummary {
    pub clock_ns: u64,
    pub irqchips: usize,
}

/// Failure of a hypervisor operation.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot open the hypervisor device")]
    Open(#[source] std::io::Error),
    #[error("hypervisor lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Failure while saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("saving {what} failed")]
    Save {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("restoring {what} failed")]
    Restore {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("saved state is inconsistent: {0}")]
    Inconsistent(String),
}
