//! Locking that survives a panicked holder.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, even if a thread panicked while holding it.
///
/// Everything this crate keeps behind a lock is valid at any point a holder
/// could panic: a family's request table (its order queue is checked
/// against the map lazily, so a half-made request is only a stale entry),
/// latency histograms (recorded one value at a time), a clone's open flag
/// and a fault thread's handle (single values replaced whole). A poisoned
/// lock is therefore safe to use, and a fault thread must keep serving.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `rwlock`, even if a thread panicked while holding it (see
/// [`lock`]).
pub(crate) fn read<T>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    rwlock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `rwlock`, even if a thread panicked while holding it (see
/// [`lock`]).
pub(crate) fn write<T>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    rwlock.write().unwrap_or_else(PoisonError::into_inner)
}
