//! Forcing a vCPU thread out of `KVM_RUN`.
//!
//! A kick sets a pending flag and sends a real-time signal to the thread that
//! is running the vCPU, if any. The signal handler sets `immediate_exit` in
//! that thread's `kvm_run` page, so a kick that lands just before `KVM_RUN`
//! is entered is not lost: KVM returns `EINTR` at once. The run loop checks
//! the pending flag after publishing its thread, which closes the other race.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::hypervisor::VcpuKicker;
use crate::sync::lock;

thread_local! {
    /// The `immediate_exit` byte of the vCPU running on this thread, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: `flag` was set by `KickState::enter_run` on this thread to
        // the `immediate_exit` byte of a kvm_run mapping that outlives the
        // `RunGuard`, which clears it before that mapping can go away.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub(super) fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            tracing::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Shared between a vCPU and its kickers.
#[derive(Debug, Default)]
pub(super) struct KickState {
    pending: AtomicBool,
    /// The pthread running the vCPU; set only while it is inside a run, so a
    /// kicker holding the lock never signals a thread that has exited.
    running_thread: Mutex<Option<libc::pthread_t>>,
}

impl KickState {
    /// Takes a pending kick, if there is one.
    pub(super) fn take_pending(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }

    /// Publishes the current thread as the one running the vCPU.
    ///
    /// # Safety
    /// `immediate_exit` must stay valid for writes until the returned guard is
    /// dropped, and the guard must be dropped on this thread.
    pub(super) unsafe fn enter_run(&self, immediate_exit: *mut u8) -> RunGuard<'_> {
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *lock(&self.running_thread) = Some(me);
        RunGuard { state: self }
    }
}

/// Ends a run: the thread is no longer a kick target.
pub(super) struct RunGuard<'a> {
    state: &'a KickState,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.state.running_thread) = None;
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

impl VcpuKicker for KickState {
    fn kick(&self) {
        self.pending.store(true, Ordering::Release);
        let running = lock(&self.running_thread);
        if let Some(thread) = *running {
            // SAFETY: `thread` is alive: it is cleared under this lock before
            // the run (and so the thread's use of the vCPU) ends; the signal
            // has a handler installed by `install_handler`.
            let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
            if rc != 0 {
                tracing::warn!(rc, "kicking the vCPU thread failed");
            }
        }
    }
}
