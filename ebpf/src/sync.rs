//! Locking that survives a panicked holder.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, even if a thread panicked while holding it.
///
/// Every update of what this crate keeps behind a mutex (the program's maps and the families
/// registered in them, the presence bitmap's range allocator) leaves it consistent, so a lock
/// poisoned by a panic elsewhere guards nothing broken and is safe to use.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
