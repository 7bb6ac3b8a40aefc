//! Errors of the supervisor's operations, one enum per operation. Failures
//! that end up as the text of a [`crate::VmOutcome`] or of an API reply are
//! formatted with [`crate::error_chain`] where they cross that boundary.

use std::time::Duration;

use snowflock_fault_handler::{AvoidError, StartError};
use snowflock_vmm::MachineError;
use snowflock_vmm::memory::MemoryError;

use super::admission::MemoryShortage;
use crate::descriptor::DescriptorError;

/// Failure of a supervisor operation requested from outside a VM.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("admitting the VM failed")]
    Admit(#[source] MemoryShortage),
    #[error("starting the VM failed")]
    Start(#[source] MachineError),
    #[error("the VM is no longer running")]
    Gone,
    #[error("the VM did not stop for the capture within {0:?}")]
    CaptureTimeout(Duration),
    #[error("capturing the VM failed")]
    Capture(#[source] CaptureError),
}

/// Failure of a capture requested from outside the VM, as its thread saw it.
///
/// The variants are transparent: the reason reads as the failing step's own
/// error, exactly as the capture's caller has always shown it.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Pausing the vCPU and freezing the memory failed.
    #[error(transparent)]
    Snapshot(MachineError),
    #[error(transparent)]
    Describe(DescribeError),
    /// The vCPU sits in a hypercall that blocks until its clones end.
    #[error("the VM is waiting in join")]
    Joining,
}

/// Failure to complete a clone point's descriptor.
#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    /// Walking the frozen image for its data pages failed.
    #[error(transparent)]
    Memory(MemoryError),
    #[error(transparent)]
    Encode(DescriptorError),
}

/// Failure to restore a hollow clone; it becomes the clone's failed outcome.
#[derive(Debug, thiserror::Error)]
pub(super) enum HollowError {
    /// No VM was prepared ahead and preparing one failed.
    #[error(transparent)]
    Prepare(MachineError),
    #[error(transparent)]
    Restore(MachineError),
    /// The map of pages not to fetch could not be built.
    #[error(transparent)]
    Avoid(AvoidError),
    #[error(transparent)]
    FaultHandler(StartError),
    /// Setting the clone's return value from `clone` failed.
    #[error(transparent)]
    SetReturn(MachineError),
}
