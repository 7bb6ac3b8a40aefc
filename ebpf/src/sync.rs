//! Locks that survive a panicked holder (`snowflock_sync`), and why this crate may take them.
//!
//! Every update of what this crate keeps behind a mutex (the program's maps and the families
//! registered in them, the presence bitmap's range allocator) leaves it consistent, so a lock
//! poisoned by a panic elsewhere guards nothing broken and is safe to use.

pub(crate) use snowflock_sync::lock;
