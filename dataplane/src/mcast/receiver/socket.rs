//! The clone host's mcdist receiver on the kernel UDP socket path.
//!
//! One UDP socket bound to `0.0.0.0:port` (`SO_REUSEADDR`) joins the group of every family
//! the host runs clones of, on the interface of [`ReceiverConfig::local_addr`]. It receives
//! the families' multicast fragments, the server's unicast fragments and REJECTs, and sends
//! the REQUESTs (so the unicast answers come back to it).
//!
//! A loop thread runs io_uring: a multishot receive takes its buffers from a ring of
//! provided buffers, and every datagram completed since the last wait goes to the
//! [`ReceiverCore`] as one batch (the core does everything else); an eventfd read wakes the
//! loop for an earlier timer or to stop, and the wait's own timeout is the core's next
//! deadline.
//!
//! ```no_run
//! use std::net::{Ipv4Addr, SocketAddrV4};
//! use std::sync::Arc;
//! use snowflock_dataplane::{ClusterKey, PageSink};
//! use snowflock_dataplane::mcast::{FamilyJoin, McastReceiver, ReceiverConfig};
//!
//! struct Sink;
//! impl PageSink for Sink {
//!     fn deliver_batch(&self, pages: &[(u64, &[u8])]) { /* into the host page cache */ }
//!     fn failed(&self, reason: String) { eprintln!("{reason}") }
//! }
//!
//! let key = ClusterKey::generate();
//! let config = ReceiverConfig { local_addr: Ipv4Addr::new(10, 77, 0, 2), ..Default::default() };
//! let receiver = McastReceiver::start(config, &key)?;
//! receiver.join(
//!     FamilyJoin {
//!         family: 7,
//!         generation: 0x1234,
//!         // The key the family's server registered it under (its order says which).
//!         key: key.id(),
//!         group: Ipv4Addr::new(239, 255, 0, 7),
//!         server: SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7073),
//!         pages: 1 << 18,
//!         holding: false,
//!     },
//!     Arc::new(Sink),
//! )?;
//! receiver.request(7, &[0, 1, 2]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::config::ReceiverConfig;
use super::family::{FamilyJoin, HeldPages, JoinError};
use super::outgoing::RequestTransport;
use super::receiver_core::ReceiverCore;
use super::stats::ReceiverStats;
use super::uring::{self, PathCounters, SocketLoop};
use super::xdp_path::{XdpPath, XdpPathError, XdpReceiveConfig, XdpReceiveStatus};
use crate::client::PageSink;
use crate::keyring::KeyRing;
use crate::mcast::sys::EventFd;
use crate::sync::{Never, lock};

/// Receive buffer asked for the socket (the kernel caps it at `net.core.rmem_max`).
const SOCKET_RECEIVE_BUFFER: usize = 4 << 20;
/// How long dropping a receiver waits for its loop thread.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why [`McastReceiver::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// The UDP socket could not be created or configured.
    #[error("setting up the mcdist socket")]
    Socket {
        /// The I/O error.
        source: io::Error,
    },
    /// The UDP socket could not be bound.
    #[error("binding the mcdist socket to port {port}")]
    Bind {
        /// The port.
        port: u16,
        /// The I/O error.
        source: io::Error,
    },
    /// The eventfd could not be created.
    #[error("creating the mcdist receiver's eventfd")]
    EventFd {
        /// The I/O error.
        source: io::Error,
    },
    /// The io_uring loop could not be set up or its thread not started.
    #[error("starting the mcdist receive loop")]
    Loop {
        /// The I/O error.
        source: io::Error,
    },
    /// The AF_XDP path could not start.
    #[error("starting the AF_XDP receive path")]
    Xdp(#[source] Box<XdpPathError>),
}

/// Sends the core's REQUESTs from the receiving socket and wakes the loop.
struct SocketTransport {
    socket: Arc<UdpSocket>,
    wake: Arc<EventFd>,
}

impl RequestTransport for SocketTransport {
    fn send(&self, server: SocketAddrV4, datagram: &[u8]) -> io::Result<()> {
        self.socket.send_to(datagram, server).map(drop)
    }

    fn wake(&self) {
        self.wake.signal();
    }
}

/// One host's mcdist receiver on the kernel UDP socket path.
///
/// Dropping it leaves every family (sending LEAVE), stops the loop thread and closes the
/// socket.
pub struct McastReceiver {
    core: Arc<ReceiverCore>,
    socket: Arc<UdpSocket>,
    wake: Arc<EventFd>,
    counters: Arc<PathCounters>,
    stopping: Arc<AtomicBool>,
    /// Families per joined group (two families may share one).
    groups: Mutex<HashMap<Ipv4Addr, usize>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Disconnects when the loop thread exits.
    exited: Mutex<Receiver<Never>>,
    /// The AF_XDP path, when fragments arrive through it.
    xdp: Option<XdpPath>,
}

const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<McastReceiver>();
    send_and_sync::<ReceiverCore>();
};

impl std::fmt::Debug for McastReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McastReceiver")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

fn bind_socket(config: &ReceiverConfig) -> Result<UdpSocket, ReceiverError> {
    let setup = |source| ReceiverError::Socket { source };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(setup)?;
    socket.set_reuse_address(true).map_err(setup)?;
    socket
        .set_recv_buffer_size(SOCKET_RECEIVE_BUFFER)
        .map_err(setup)?;
    // Requests leave by the route to the server; only multicast needs the interface named.
    socket
        .set_multicast_if_v4(&config.local_addr)
        .map_err(setup)?;
    socket.set_multicast_loop_v4(false).map_err(setup)?;
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, config.port);
    socket
        .bind(&SockAddr::from(any))
        .map_err(|source| ReceiverError::Bind {
            port: config.port,
            source,
        })?;
    // Fault threads send from it: a full send buffer must not stall them.
    socket.set_nonblocking(true).map_err(setup)?;
    Ok(socket.into())
}

impl McastReceiver {
    /// Binds the socket and starts the receive loop thread.
    pub fn start(
        config: ReceiverConfig,
        key: impl Into<KeyRing>,
    ) -> Result<McastReceiver, ReceiverError> {
        let socket = Arc::new(bind_socket(&config)?);
        let wake = Arc::new(EventFd::new().map_err(|source| ReceiverError::EventFd { source })?);
        let transport = Arc::new(SocketTransport {
            socket: Arc::clone(&socket),
            wake: Arc::clone(&wake),
        });
        let local_addr = config.local_addr;
        let port = config.port;
        let core = Arc::new(ReceiverCore::new(config, key, transport));
        let counters = Arc::new(PathCounters::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let (alive, exited) = mpsc::channel();
        let thread = uring::spawn(
            SocketLoop {
                socket: Arc::clone(&socket),
                wake: Arc::clone(&wake),
                core: Arc::clone(&core),
                counters: Arc::clone(&counters),
                stopping: Arc::clone(&stopping),
            },
            alive,
        )
        .map_err(|source| ReceiverError::Loop { source })?;
        tracing::info!(%local_addr, port, id = format_args!("{:#x}", core.id()), "mcdist receiver started");
        Ok(McastReceiver {
            core,
            socket,
            wake,
            counters,
            stopping,
            groups: Mutex::new(HashMap::new()),
            thread: Mutex::new(Some(thread)),
            exited: Mutex::new(exited),
            xdp: None,
        })
    }

    /// [`McastReceiver::start`], with the families' fragments taken off the wire by the XDP
    /// program and AF_XDP sockets of [`XdpReceiveConfig`] (attached in the calling thread's
    /// network namespace). The kernel socket still holds the group memberships, sends the
    /// requests and receives everything the program passes.
    pub fn start_xdp(
        config: ReceiverConfig,
        key: impl Into<KeyRing>,
        xdp: &XdpReceiveConfig,
    ) -> Result<McastReceiver, ReceiverError> {
        let port = config.port;
        let mut receiver = McastReceiver::start(config, key)?;
        let path = XdpPath::start(&receiver.core, port, xdp)
            .map_err(|e| ReceiverError::Xdp(Box::new(e)))?;
        receiver.xdp = Some(path);
        Ok(receiver)
    }

    /// Whether fragments arrive through the AF_XDP path.
    pub fn uses_xdp(&self) -> bool {
        self.xdp.is_some()
    }

    /// The AF_XDP path's program, queues and counters; `None` on the socket path.
    pub fn xdp_status(&self) -> Option<XdpReceiveStatus> {
        self.xdp.as_ref().and_then(XdpPath::status)
    }

    /// Families joined.
    pub fn family_count(&self) -> usize {
        self.core.families().len()
    }

    /// Starts receiving `join.family` into `sink`: joins its group (`IP_ADD_MEMBERSHIP` on
    /// the local interface) and sends a JOIN report to its server.
    /// On the AF_XDP path the family is registered with the XDP program, which then drops
    /// fragments of the pages held.
    pub fn join(&self, join: FamilyJoin, sink: Arc<dyn PageSink>) -> Result<(), JoinError> {
        if self.core.families().iter().any(|f| f.family == join.family) {
            return Err(JoinError::AlreadyJoined {
                family: join.family,
            });
        }
        let hook = match &self.xdp {
            Some(path) => Some(path.register(&join)?),
            None => None,
        };
        let joined = self.join_with_hook(join, sink, hook);
        if joined.is_err()
            && let Some(path) = &self.xdp
        {
            path.unregister(join.family);
        }
        joined
    }

    /// [`McastReceiver::join`], also announcing every page held to `hook`.
    pub fn join_with_hook(
        &self,
        join: FamilyJoin,
        sink: Arc<dyn PageSink>,
        hook: Option<Arc<dyn HeldPages>>,
    ) -> Result<(), JoinError> {
        let mut groups = lock(&self.groups);
        if self.core.families().iter().any(|f| f.family == join.family) {
            return Err(JoinError::AlreadyJoined {
                family: join.family,
            });
        }
        let interface = self.core.config().local_addr;
        let members = groups.entry(join.group).or_insert(0);
        if *members == 0 {
            self.socket
                .join_multicast_v4(&join.group, &interface)
                .map_err(|source| JoinError::Membership {
                    group: join.group,
                    interface,
                    source,
                })?;
        }
        *members += 1;
        if let Err(error) = self.core.join(join, sink, hook) {
            self.release_group(&mut groups, join.group);
            return Err(error);
        }
        Ok(())
    }

    fn release_group(&self, groups: &mut HashMap<Ipv4Addr, usize>, group: Ipv4Addr) {
        let Some(members) = groups.get_mut(&group) else {
            return;
        };
        *members -= 1;
        if *members == 0 {
            groups.remove(&group);
            let interface = self.core.config().local_addr;
            if let Err(error) = self.socket.leave_multicast_v4(&group, &interface) {
                tracing::warn!(%group, %interface, %error, "leaving an mcdist group failed");
            }
        }
    }

    /// Stops receiving `family`: sends LEAVE, drops the group membership (unless another
    /// family uses the group) and forgets the family's state.
    pub fn leave(&self, family: u64) {
        let mut groups = lock(&self.groups);
        let Some(join) = self
            .core
            .families()
            .into_iter()
            .find(|f| f.family == family)
        else {
            return;
        };
        self.core.leave(family);
        if let Some(path) = &self.xdp {
            path.unregister(family);
        }
        self.release_group(&mut groups, join.group);
    }

    /// Requests `pages` of `family` now; see [`ReceiverCore::request`]. Never blocks on the
    /// network (the socket is non-blocking; a request that cannot be sent is retried on its
    /// timeout).
    pub fn request(&self, family: u64, pages: &[u64]) {
        self.core.request(family, pages);
    }

    /// Counters of all families, the socket path's included.
    pub fn stats(&self) -> ReceiverStats {
        let mut stats = self.core.stats();
        stats.truncated = self.counters.truncated.load(Ordering::Relaxed);
        stats.receive_errors = self.counters.receive_errors.load(Ordering::Relaxed);
        stats.buffers_exhausted = self.counters.buffers_exhausted.load(Ordering::Relaxed);
        stats
    }

    /// Counters of one joined family.
    pub fn family_stats(&self, family: u64) -> Option<ReceiverStats> {
        self.core.family_stats(family)
    }

    /// The receiver's core (for its id, [`ReceiverCore::holds`], and the like).
    pub fn core(&self) -> &Arc<ReceiverCore> {
        &self.core
    }

    /// Stops receiving: leaves every family (sending LEAVE), detaches the XDP program and
    /// closes the AF_XDP sockets, and stops the loop thread (waiting at most
    /// [`STOP_TIMEOUT`]). The socket closes when the receiver is dropped. Idempotent.
    pub fn shutdown(&self) {
        if let Some(path) = &self.xdp {
            path.stop();
        }
        self.core.leave_all();
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.signal();
        match lock(&self.exited).recv_timeout(STOP_TIMEOUT) {
            Ok(never) => match never {},
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(thread) = lock(&self.thread).take()
                    && thread.join().is_err()
                {
                    tracing::error!("the mcdist receive thread panicked");
                }
            }
            Err(RecvTimeoutError::Timeout) => tracing::warn!(
                timeout = ?STOP_TIMEOUT,
                "mcdist receive thread still busy (in a sink?); leaving it to finish"
            ),
        }
    }
}

impl Drop for McastReceiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}
