//! The parent host's mcdist server: answers page REQUESTs by sending the pages, cut into
//! fragments, to the family's multicast group.
//!
//! One UDP socket bound to the pages address serves every family, with a request thread and
//! [`McastServerConfig::send_threads`] send threads:
//!
//! - the *request thread* receives REQUESTs, checks them, updates the family's receivers
//!   (liveness, reported rate, JOIN, LEAVE), answers what cannot be served with a unicast
//!   REJECT, and queues the rest (dropping duplicates of pages queued or sent within the
//!   suppression window);
//! - each *send thread* takes queued pages family by family (a batch at a time, under the
//!   state lock), each family paced by a token bucket at the lowest rate its active
//!   receivers report, reads them from the family's [`PageStore`] and sends their fragments,
//!   each page as one UDP GSO message. After each REQUEST the request thread sends the page
//!   at the head of the queue itself (the REQUEST's first page when nothing was queued
//!   before it: a fault's page leaves without a thread wakeup), but only while no send
//!   thread is sending, so that it never overtakes a batch taken before it; it leaves the
//!   rest to the send threads. Pages of one family may leave two send threads out of order,
//!   which receivers take as they take reordering on the network.
//!
//! A page goes to the group unless the family has a single active receiver or the request
//! asked for `UNICAST_REPLY` (end game): then it goes to the requester only, flagged
//! `UNICAST`. With push on, a receiver that JOINs late is sent, by unicast and behind the
//! requested pages, every page its siblings requested before, except those multicast since
//! it joined; and from the first JOIN on, the family's own push runs
//! ([`PageStore::push_runs`]) go to the group in the background, behind every requested page
//! of every family, paced by the family's token bucket, until each receiver that joined has
//! had every page once (a receiver new to the family makes the walk go round once more from
//! where it is, skipping pages multicast since it joined). The push ends with the family's
//! registration, and pauses while no receiver is active.
//!
//! Rooms: `config` ([`McastServerConfig`]), `family` (a served family's state: receivers,
//! queue and duplicate suppression, pushes, pacing), `service` (what the front end and the
//! threads share), `request` (the request thread), `send` (the send threads, and the
//! sending the request thread does itself), `stats` ([`McastServerStats`]).
//!
//! ```no_run
//! use std::net::{Ipv4Addr, SocketAddrV4};
//! use std::sync::Arc;
//! use snowflock_dataplane::{ClusterKey, PageStore, PAGE_SIZE};
//! use snowflock_dataplane::mcast::{McastServer, McastServerConfig};
//!
//! struct Image;
//! impl PageStore for Image {
//!     fn page_count(&self) -> u64 { 1 << 18 }
//!     fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> std::io::Result<()> {
//!         buf.fill(page as u8);
//!         Ok(())
//!     }
//! }
//!
//! let key = ClusterKey::generate();
//! let bind = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7073);
//! let server = McastServer::bind(McastServerConfig::new(bind), &key)?;
//! let generation = server.register(7, Ipv4Addr::new(239, 255, 0, 7), Arc::new(Image));
//! // Send (7, generation, group, server.local_addr()) to the clone hosts.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod config;
mod family;
mod repairs;
mod request;
mod send;
mod service;
mod stats;
#[cfg(test)]
mod test_support;
mod working_set;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub use config::McastServerConfig;
pub use stats::{FamilyServerStats, McastServerStats};
pub use working_set::{Recording, WorkingSet};

use family::{FamilyState, ServerState, new_generation};
use request::request_loop;
use send::send_loop;
use service::McastService;
use stats::Counters;

use crate::auth::KeyId;
use crate::keyring::KeyRing;
use crate::mcast::sys::EventFd;
use crate::mcast::wire::{self, FragmentSealer, Fragmentation, McastKey};
use crate::server::PageStore;
use crate::sync::{Never, lock};

/// How long [`McastServer::shutdown`] waits for its threads.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Send buffer asked for the socket (the kernel caps it at `net.core.wmem_max`).
const SOCKET_SEND_BUFFER: usize = 4 << 20;

/// Why [`McastServer::bind`] failed.
#[derive(Debug, thiserror::Error)]
pub enum McastBindError {
    /// The UDP socket could not be created or configured.
    #[error("setting up the mcdist server socket")]
    Socket {
        /// The I/O error.
        source: io::Error,
    },
    /// The UDP socket could not be bound.
    #[error("binding the mcdist server to {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddrV4,
        /// The I/O error.
        source: io::Error,
    },
    /// The eventfd could not be created.
    #[error("creating the mcdist server's eventfd")]
    EventFd {
        /// The I/O error.
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("starting an mcdist server thread")]
    Spawn {
        /// The I/O error.
        source: io::Error,
    },
}

/// A family's registration with [`McastServer::register_led`]: what its clone hosts need to
/// open its fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The family's new generation.
    pub generation: u32,
    /// The cluster key its fragments are sealed under.
    pub key: KeyId,
}

/// Serves the frozen memory of clone points to their clone hosts by multicast.
///
/// Dropping it shuts it down (see [`McastServer::shutdown`]).
pub struct McastServer {
    service: Arc<McastService>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Disconnects once every thread has exited.
    threads_exited: Mutex<Receiver<Never>>,
}

const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<McastServer>();
};

impl std::fmt::Debug for McastServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McastServer")
            .field("local_addr", &self.service.local_addr)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn bind_socket(config: &McastServerConfig) -> Result<(UdpSocket, SocketAddrV4), McastBindError> {
    let setup = |source| McastBindError::Socket { source };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(setup)?;
    // A receiver on the same host binds 0.0.0.0 at the same port.
    socket.set_reuse_address(true).map_err(setup)?;
    socket
        .set_multicast_if_v4(config.bind.ip())
        .map_err(setup)?;
    socket.set_multicast_ttl_v4(1).map_err(setup)?;
    socket.set_multicast_loop_v4(false).map_err(setup)?;
    socket
        .set_send_buffer_size(SOCKET_SEND_BUFFER)
        .map_err(setup)?;
    socket
        .bind(&SockAddr::from(config.bind))
        .map_err(|source| McastBindError::Bind {
            addr: config.bind,
            source,
        })?;
    let local = socket.local_addr().map_err(setup)?;
    let Some(SocketAddr::V4(local)) = local.as_socket() else {
        return Err(setup(io::Error::other("bound to a non-IPv4 address")));
    };
    Ok((socket.into(), local))
}

impl McastServer {
    /// Binds `config.bind` and starts the request and send threads.
    pub fn bind(
        config: McastServerConfig,
        key: impl Into<KeyRing>,
    ) -> Result<McastServer, McastBindError> {
        let (socket, local_addr) = bind_socket(&config)?;
        let stop = EventFd::new().map_err(|source| McastBindError::EventFd { source })?;
        let service = Arc::new(McastService {
            key: McastKey::new(key),
            fragmentation: Fragmentation::for_mtu(config.mtu.min(wire::MAX_FRAGMENT_MTU)),
            config,
            local_addr,
            socket,
            stop,
            stopping: AtomicBool::new(false),
            state: Mutex::new(ServerState::default()),
            work: Condvar::new(),
            sending: RwLock::new(()),
            counters: Counters::default(),
            segmentation: AtomicBool::new(true),
        });
        let (alive, threads_exited) = mpsc::channel();
        let server = McastServer {
            service: Arc::clone(&service),
            threads: Mutex::new(Vec::new()),
            threads_exited: Mutex::new(threads_exited),
        };
        type Body = fn(&McastService, Sender<Never>);
        let senders = service.config.send_threads.max(1);
        let bodies = std::iter::once(("sf-mcast-req".to_owned(), request_loop as Body))
            .chain((0..senders).map(|i| (format!("sf-mcast-send{i}"), send_loop as Body)));
        for (name, body) in bodies {
            let thread_service = Arc::clone(&service);
            let thread_alive = alive.clone();
            let handle = thread::Builder::new()
                .name(name)
                .spawn(move || body(&thread_service, thread_alive))
                .map_err(|source| McastBindError::Spawn { source })?;
            lock(&server.threads).push(handle);
        }
        drop(alive);
        tracing::info!(
            %local_addr,
            fragments_per_page = service.fragmentation.count,
            send_threads = senders,
            "mcdist server listening"
        );
        Ok(server)
    }

    /// The address REQUESTs go to.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.service.local_addr
    }

    /// Serves `store` as `family` to `group` (at the receivers' port), replacing what the
    /// family had. Returns the family's new generation: random, non-zero, never the previous
    /// one, so requests and fragments of an earlier registration are told apart.
    pub fn register(&self, family: u64, group: Ipv4Addr, store: Arc<dyn PageStore>) -> u32 {
        self.register_led(family, group, store, Recording::default())
            .generation
    }

    /// [`McastServer::register`], recording what the clone hosts ask for if
    /// `recording.record` ([`McastServer::working_set`]), with the push led by
    /// `recording.lead`, a working set recorded while the same clone point was served before:
    /// its pages go first, in the order its clone hosts asked for them, then the rest of the
    /// store's push runs. Only pages of the store's push runs are pushed, whatever the
    /// recording holds.
    pub fn register_led(
        &self,
        family: u64,
        group: Ipv4Addr,
        store: Arc<dyn PageStore>,
        recording: Recording<'_>,
    ) -> Registration {
        let lead = recording.lead;
        let now = Instant::now();
        let pages = store.page_count();
        // Finding the runs may walk the image: not under the lock the send threads take.
        let (push_runs, push_led) = match (self.service.config.push, lead) {
            (false, _) => (Vec::new(), 0),
            (true, None) => (store.push_runs(), 0),
            (true, Some(lead)) => working_set::led_push_runs(lead, &store.push_runs(), pages),
        };
        let push_pages: u64 = push_runs.iter().map(|&(_, count)| count).sum();
        stats::bump(&self.service.counters.push_led_pages, push_led);
        let mut state = lock(&self.service.state);
        let previous = state.families.get(&family).map(|f| f.generation);
        let generation = new_generation(previous);
        let (key, fragment_key) = self.service.key.sending_fragment_key(family, generation);
        let sealer = FragmentSealer::new(fragment_key);
        let group_addr = SocketAddrV4::new(group, self.service.config.group_port);
        let served = FamilyState::new(
            generation,
            sealer,
            group_addr,
            store,
            (push_runs, push_led),
            &self.service.config,
            now,
        );
        let served = if recording.record {
            served.recording()
        } else {
            served
        };
        state.families.insert(family, served);
        tracing::info!(
            family = format_args!("{family:#x}"),
            generation = format_args!("{generation:#x}"),
            %group,
            pages,
            push_pages,
            push_led,
            replaced = previous.is_some(),
            %key,
            "mcdist serving family"
        );
        Registration { generation, key }
    }

    /// What the clone hosts of `family` asked for since it was registered, per host in the
    /// order of their first requests; `None` when it is not served or nothing was asked.
    pub fn working_set(&self, family: u64) -> Option<WorkingSet> {
        lock(&self.service.state)
            .families
            .get(&family)
            .and_then(|f| f.working_set())
    }

    /// Stops serving `family`; its queued pages are dropped and later requests get REJECT
    /// (unknown family).
    pub fn unregister(&self, family: u64) {
        let removed = lock(&self.service.state).families.remove(&family).is_some();
        tracing::info!(
            family = format_args!("{family:#x}"),
            removed,
            "mcdist family withdrawn"
        );
    }

    /// A snapshot of the counters and of every family's rate and receivers.
    pub fn stats(&self) -> McastServerStats {
        let now = Instant::now();
        let config = &self.service.config;
        let families: Vec<FamilyServerStats> = lock(&self.service.state)
            .families
            .iter()
            .map(|(&family, f)| f.stats(family, now, config))
            .collect();
        self.service.counters.snapshot(families)
    }

    /// Stops the request thread and the send threads and waits for them (at most
    /// [`SHUTDOWN_TIMEOUT`]; a store read that does not return is left to finish, with a
    /// warning). Calling it again does nothing.
    pub fn shutdown(&self) {
        if self.service.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.service.stop.signal();
        // Taking the lock orders the flag before the send threads' next check.
        drop(lock(&self.service.state));
        self.service.work.notify_all();
        let all_exited = match lock(&self.threads_exited).recv_timeout(SHUTDOWN_TIMEOUT) {
            Ok(never) => match never {},
            Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => false,
        };
        for handle in lock(&self.threads).drain(..) {
            // Once every thread has dropped its `_alive` sender it is returning: joining
            // waits only for that.
            if all_exited || handle.is_finished() {
                if handle.join().is_err() {
                    tracing::error!("an mcdist server thread panicked");
                }
            } else {
                tracing::warn!("an mcdist server thread did not stop in time");
            }
        }
        if !all_exited {
            tracing::warn!(timeout = ?SHUTDOWN_TIMEOUT, "mcdist server threads still running");
        }
        tracing::info!(local_addr = %self.service.local_addr, "mcdist server stopped");
    }
}

impl Drop for McastServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
