//! Locking that survives a panicked holder.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, even if a thread panicked while holding it.
///
/// What the scenarios keep behind a mutex (console lines, clone stats, served images, a failure
/// note) is only ever pushed to, filtered, taken or replaced whole, so it is valid after any
/// panic and a poisoned lock is safe to use.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
