//! Locks that survive a panicked holder (`snowflock_sync`), and why this crate may take them.
//!
//! What this crate keeps behind a lock (slot counts, maps of VMs, links and sessions, a child's
//! end and timings, partial console lines) is replaced or updated in single steps, so it is
//! valid after any panic and a poisoned lock is safe to use.

pub(crate) use snowflock_sync::{lock, read, wait_timeout, write};
