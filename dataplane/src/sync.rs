//! Synchronisation helpers of the crate: locks that survive a panicked holder, and the
//! message type of "alive" channels.

use std::sync::{
    Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use std::time::Duration;

/// Locks `mutex`, even if a thread panicked while holding it.
///
/// Most of what this crate keeps behind a lock (maps of sockets and connections, a socket, an
/// optional string, a channel end) is valid after any partial update. The mcdist server's
/// families (queues, token buckets, receivers) and the receiver core's state (families,
/// reassembly, requests in flight) may be left with a stale entry by a panicking holder: a page
/// queued twice or requested again, a counter off by one, which the protocol's re-requests and
/// duplicate suppression absorb. So a poisoned lock is safe to use, and one panicking thread
/// does not stop the host serving every other family.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `rwlock`, even if a thread panicked while holding it (see [`lock`]).
pub(crate) fn read<T>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    rwlock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `rwlock`, even if a thread panicked while holding it (see [`lock`]).
pub(crate) fn write<T>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    rwlock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `condvar` with `guard`'s lock for at most `timeout`, and takes the lock back even
/// if a thread panicked while holding it (see [`lock`]).
pub(crate) fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    condvar
        .wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}

/// A type with no values.
///
/// Used as the message type of "alive" channels: each worker thread holds a `Sender<Never>`;
/// no message is ever sent, and the `Receiver` sees a disconnect once every worker has exited,
/// which gives a join with a timeout.
pub(crate) enum Never {}
