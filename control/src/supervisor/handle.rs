//! Handles on a running root VM: wait for its end, capture it, or kill it
//! from outside its thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use snowflock_vmm::VcpuKicker;
use snowflock_vmm::memory::MemoryImage;

use super::error::{CaptureError, SupervisorError};
use crate::descriptor::Descriptor;
use crate::outcome::VmOutcome;

/// Longest an external capture waits for the VM thread to stop.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests to a running VM's thread from outside.
pub(super) enum Control {
    Capture(mpsc::Sender<Result<(Descriptor, Arc<MemoryImage>), CaptureError>>),
}

/// A VM started by [`super::Supervisor::launch`] or [`super::Supervisor::resume`].
pub struct VmHandle {
    pub(super) vm: u64,
    pub(super) thread: JoinHandle<VmOutcome>,
    pub(super) control: mpsc::Sender<Control>,
    pub(super) kicker: Arc<dyn VcpuKicker>,
    pub(super) kill: Arc<AtomicBool>,
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
