//! Locks that survive a panicked holder.
//!
//! A poisoned `std` lock says that a thread panicked while holding it. A daemon that serves many
//! VMs must not let one thread's panic end every thread that touches the same state, so the
//! crates take such a lock anyway, where what it guards stays valid after any partial update.
//! That condition is a property of each crate's state, not of these functions: every crate that
//! uses them says in its own `sync` module why its locked state meets it.
//!
//! ```
//! use std::sync::Mutex;
//!
//! let counter = Mutex::new(0);
//! *snowflock_sync::lock(&counter) += 1;
//! assert_eq!(*snowflock_sync::lock(&counter), 1);
//! ```

use std::sync::{
    Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    TryLockError,
};
use std::time::Duration;

/// Locks `mutex`, even if a thread panicked while holding it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `rwlock`, even if a thread panicked while holding it.
pub fn read<T>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    rwlock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `rwlock` if no one holds it, even if a thread panicked while holding it;
/// `None` while it is held.
pub fn try_write<T>(rwlock: &RwLock<T>) -> Option<RwLockWriteGuard<'_, T>> {
    match rwlock.try_write() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Write-locks `rwlock`, even if a thread panicked while holding it.
pub fn write<T>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    rwlock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `condvar` with `guard`'s lock for at most `timeout`, and takes the lock back even if
/// a thread panicked while holding it.
pub fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    condvar
        .wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex, RwLock};
    use std::thread;
    use std::time::Duration;

    /// Runs `hold` on another thread, which panics while `hold` holds a lock.
    fn panic_holding(hold: impl FnOnce() + Send) {
        thread::scope(|scope| {
            assert!(scope.spawn(hold).join().is_err());
        });
    }

    #[test]
    fn a_poisoned_mutex_is_still_locked_and_keeps_its_value() {
        let mutex = Mutex::new(5);
        panic_holding(|| {
            let mut guard = mutex.lock().unwrap();
            *guard = 7;
            panic!("panics with the lock held");
        });
        assert!(mutex.is_poisoned());
        assert_eq!(*super::lock(&mutex), 7);
    }

    #[test]
    fn a_poisoned_rwlock_is_still_read_and_written() {
        let rwlock = RwLock::new(1);
        panic_holding(|| {
            let _guard = rwlock.write().unwrap();
            panic!("panics with the lock held");
        });
        assert!(rwlock.is_poisoned());
        *super::write(&rwlock) += 1;
        assert_eq!(*super::read(&rwlock), 2);
        *super::try_write(&rwlock).expect("no one holds it") += 1;
        let reader = super::read(&rwlock);
        assert!(super::try_write(&rwlock).is_none(), "a reader holds it");
        assert_eq!(*reader, 3);
    }

    #[test]
    fn waiting_on_a_poisoned_lock_times_out_and_returns_the_guard() {
        let mutex = Mutex::new(3);
        panic_holding(|| {
            let _guard = mutex.lock().unwrap();
            panic!("panics with the lock held");
        });
        let condvar = Condvar::new();
        let guard = super::wait_timeout(&condvar, super::lock(&mutex), Duration::from_millis(1));
        assert_eq!(*guard, 3);
    }
}
