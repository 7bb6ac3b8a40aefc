//! Locks that survive a panicked holder (`snowflock_sync`), and why this crate may take them.
//!
//! What this crate keeps behind a mutex (a task channel's sender, the thread a vCPU runs on)
//! is a single value replaced whole, valid after any panic, so a poisoned lock is safe to use.

pub(crate) use snowflock_sync::lock;
