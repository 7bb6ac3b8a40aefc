//! The snowflock control plane.
//!
//! This crate turns the VMM's clone hypercalls into clones: it captures VM
//! descriptors, hands out tickets for clone slots, restores children onto
//! copy-on-write views of the parent's frozen memory, and collects their
//! results for `join`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use snowflock_control::config::PopulateMode;
//! use snowflock_control::{Supervisor, SupervisorConfig, VmOutcome, console};
//! use snowflock_vmm::KvmHypervisor;
//! use snowflock_vmm::memory::HostPages;
//!
//! let hv = Arc::new(KvmHypervisor::open()?);
//! let supervisor = Supervisor::new(hv, SupervisorConfig {
//!     clone_limit: 8,
//!     lines: console::stdout_lines(),
//!     descriptor_dir: None,
//!     cluster: None,
//!     populate: PopulateMode::Read,
//!     host_pages: HostPages::Base,
//!     linux_personality: None,
//! });
//! let image = std::fs::read("guest.elf")?;
//! let vm = supervisor.launch(&image, 512 << 20, "clones=8")?;
//! assert_eq!(vm.wait(), VmOutcome::Exited(0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod child;
pub mod client;
pub mod config;
pub mod console;
pub mod daemon;
pub mod descriptor;
mod error_chain;
pub mod metrics;
pub mod outcome;
pub mod protocol;
pub mod remote;
pub mod size;
pub mod supervisor;
mod sync;
pub mod wire;
pub mod working_sets;

pub use descriptor::{CaptureKind, Descriptor, DescriptorError};
pub use error_chain::error_chain;
pub use outcome::{ChildReport, CloneReport, VmOutcome};
pub use supervisor::{
    CaptureError, DescribeError, MemoryShortage, StartOptions, Supervisor, SupervisorConfig,
    SupervisorError, VmController, VmHandle, VmInfo, VmRole,
};
