//! Locks that survive a panicked holder (`snowflock_sync`), and why this crate may take them.
//!
//! What the scenarios keep behind a mutex (console lines, clone stats, served images, a failure
//! note) is only ever pushed to, filtered, taken or replaced whole, so it is valid after any
//! panic and a poisoned lock is safe to use.

pub(crate) use snowflock_sync::lock;
