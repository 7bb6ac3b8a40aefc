//! Locks that survive a panicked holder (`snowflock_sync`), and why this crate may take them.
//!
//! Everything this crate keeps behind a lock is valid at any point a holder
//! could panic: a family's request table (its order queue is checked
//! against the map lazily, so a half-made request is only a stale entry),
//! latency histograms (recorded one value at a time), a clone's open flag
//! and a fault thread's handle (single values replaced whole). A poisoned
//! lock is therefore safe to use, and a fault thread must keep serving.

pub(crate) use snowflock_sync::{lock, read, write};
