//! The snowflock hypervisor layer.
//!
//! It runs *flock images* (static x86-64 ELF guests built with the guest SDK)
//! on KVM at CPL3 in 64-bit long mode, serves their hypercalls, and saves and
//! restores complete VM state so that the control plane can clone a running VM.
//!
//! ```no_run
//! use snowflock_vmm::{KvmHypervisor, Machine, MachineConfig, Stop};
//!
//! let hv = KvmHypervisor::open()?;
//! let image = std::fs::read("guest.elf")?;
//! let mut vm = Machine::boot(&hv, &image, &MachineConfig::default())?;
//! match vm.run()? {
//!     Stop::Exited(code) => println!("guest exited with {code}"),
//!     other => println!("guest asked for {other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod background;
pub mod boot;
pub mod files;
pub mod hypercall;
pub mod hypervisor;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod linux;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod populate;
mod sync;

pub use hypervisor::{
    Hypervisor, Regs, StateError, Vcpu, VcpuExit, VcpuKicker, VcpuState, Vm, VmState,
};
#[cfg(feature = "kvm")]
pub use kvm::KvmHypervisor;
pub use machine::{Machine, MachineConfig, MachineError, Stop};
