//! What the server's front end ([`McastServer`](super::McastServer)) and its threads share:
//! the socket, the keys and configuration, the families' state behind one lock with the
//! condition variable the send threads wait on, and the counters.

use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex, RwLock};

use super::config::McastServerConfig;
use super::family::ServerState;
use super::stats::Counters;
use crate::mcast::sys::EventFd;
use crate::mcast::wire::{Fragmentation, McastKey};

/// A running server: everything its threads work with.
pub(super) struct McastService {
    pub(super) key: McastKey,
    pub(super) config: McastServerConfig,
    pub(super) local_addr: SocketAddrV4,
    pub(super) socket: UdpSocket,
    pub(super) fragmentation: Fragmentation,
    pub(super) stop: EventFd,
    pub(super) stopping: AtomicBool,
    pub(super) state: Mutex<ServerState>,
    /// Signalled when work is queued or the server stops.
    pub(super) work: Condvar,
    /// Held for reading by a send thread from taking a batch until it is sent, and for
    /// writing by the request thread while it sends pages itself, which it only does when no
    /// send thread holds it: pages it took from the queue's head would otherwise leave ahead
    /// of the batch a send thread took before them, and receivers would take the pages so
    /// overtaken for lost. Taken while `state` is held (never the other way round).
    pub(super) sending: RwLock<()>,
    pub(super) counters: Counters,
    /// Whether pages go out as UDP GSO messages (until the kernel refuses one).
    pub(super) segmentation: AtomicBool,
}
