//! Synchronisation helpers of the crate: locks that survive a panicked holder
//! (`snowflock_sync`) with why this crate may take them, and the message type of "alive"
//! channels.
//!
//! Most of what this crate keeps behind a lock (maps of sockets and connections, a socket, an
//! optional string, a channel end) is valid after any partial update. The mcdist server's
//! families (queues, token buckets, receivers) and the receiver core's state (families,
//! reassembly, requests in flight) may be left with a stale entry by a panicking holder: a page
//! queued twice or requested again, a counter off by one, which the protocol's re-requests and
//! duplicate suppression absorb. So a poisoned lock is safe to use, and one panicking thread
//! does not stop the host serving every other family.

pub(crate) use snowflock_sync::{lock, read, try_write, wait_timeout, write};

/// A type with no values.
///
/// Used as the message type of "alive" channels: each worker thread holds a `Sender<Never>`;
/// no message is ever sent, and the `Receiver` sees a disconnect once every worker has exited,
/// which gives a join with a timeout.
pub(crate) enum Never {}
