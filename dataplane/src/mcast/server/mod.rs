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
//!   each page as one UDP GSO message. The request thread sends the first page a REQUEST
//!   queued itself (a fault's page leaves without a thread wakeup) and leaves the rest to
//!   the send threads. Pages of one family may leave two send threads out of order, which
//!   receivers take as they take reordering on the network.
//!
//! A page goes to the group unless the family has a single active receiver or the request
//! asked for `UNICAST_REPLY` (end game): then it goes to the requester only, flagged
//! `UNICAST`. With push on, a receiver that JOINs late is sent, by unicast and behind the
//! requested pages, every page its siblings requested before, except those multicast since
//! it joined.
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

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::auth::ClusterKey;
use crate::mcast::rate::TokenBucket;
use crate::mcast::sys::{self, EventFd};
use crate::mcast::wire::{
    self, Datagram, DecodeError, FRAGMENT_PUSH, FRAGMENT_UNICAST, Fragment, FragmentSealer,
    Fragmentation, Header, MAX_DATAGRAM_LEN, McastKey, REQUEST_JOIN, REQUEST_LEAVE,
    REQUEST_UNICAST_REPLY, Reject, RejectCode, Request,
};
use crate::server::PageStore;
use crate::sync::{Never, lock};
use crate::wire::PAGE_SIZE;

/// How long [`McastServer::shutdown`] waits for its threads.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most pages the send thread takes from the queues at once.
const MAX_BATCH_PAGES: u32 = 16;
/// Pages the request thread sends itself right after a REQUEST (the first one queued: a
/// fault's page leads its request); the send threads take the rest. Sending a page also runs
/// its receiving host's receive path when both share a machine (veth), so under load two
/// sending threads keep both cores busy: with the request thread sending up to a whole batch
/// instead, the AF_XDP path received ~25% fewer pages per second in `rx-path`.
const INLINE_PAGES: u32 = 1;
/// How often the send thread forgets idle receivers and old unicast sends.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);
/// Send buffer asked for the socket (the kernel caps it at `net.core.wmem_max`).
const SOCKET_SEND_BUFFER: usize = 4 << 20;

/// Tunables of a [`McastServer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McastServerConfig {
    /// Unicast address and port: REQUESTs arrive here, and multicast leaves from this
    /// interface (`IP_MULTICAST_IF` = this address, TTL 1, loopback off).
    pub bind: SocketAddrV4,
    /// The receivers' port: fragments go to the groups at this port. A host running a
    /// server and a receiver needs two ports, because unicast datagrams reach only the
    /// socket bound to the more specific address.
    pub group_port: u16,
    /// Path MTU: fragments are sized so their IP packets fit it, or
    /// [`MAX_FRAGMENT_MTU`](crate::mcast::wire::MAX_FRAGMENT_MTU) if that is smaller.
    pub mtu: u32,
    /// A page is sent at most once per this window and destination; requests for it in the
    /// window are answered by that send.
    pub suppression: Duration,
    /// Pages/s sent to a family none of whose receivers reported a rate yet.
    pub initial_rate: u32,
    /// Pages/s never exceeded per family, whatever the receivers report.
    pub max_rate: u32,
    /// A receiver silent this long is no longer active (its rate and presence stop counting).
    pub receiver_idle: Duration,
    /// Send late JOINers the pages their siblings already requested.
    pub push: bool,
    /// Threads that take queued pages and send them (at least 1). One thread sent about
    /// 135 000 pages/s to a host that dropped them (`rx-path`'s delivery ceiling), two about
    /// 220 000 with a second core free; where the receivers share the cores (one machine),
    /// a second thread only competes with them. The request thread sends each REQUEST's
    /// first page itself whatever this is.
    pub send_threads: usize,
}

impl McastServerConfig {
    /// The defaults for serving at `bind` to receivers at the same port (on other hosts):
    /// 1500-byte MTU, 5 ms suppression, 20 000 pages/s
    /// before reports, at most 200 000 pages/s, receivers idle after 1 s, push on, one send
    /// thread.
    pub fn new(bind: SocketAddrV4) -> McastServerConfig {
        McastServerConfig {
            bind,
            group_port: bind.port(),
            mtu: 1500,
            suppression: Duration::from_millis(5),
            initial_rate: 20_000,
            max_rate: 200_000,
            receiver_idle: Duration::from_secs(1),
            push: true,
            send_threads: 1,
        }
    }
}

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

/// One family's view in [`McastServerStats`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FamilyServerStats {
    /// The family.
    pub family: u64,
    /// Its generation.
    pub generation: u32,
    /// Its group.
    pub group: Ipv4Addr,
    /// The rate it is sent at now, pages/s.
    pub rate: u32,
    /// The lowest rate its receivers' reports have set since it was registered, pages/s;
    /// 0 before any report.
    #[serde(default)]
    pub lowest_rate: u32,
    /// Receivers heard from within `receiver_idle`.
    pub active_receivers: usize,
    /// Pages waiting to be sent (requested and pushed).
    pub queued_pages: usize,
    /// Pages taken from its queues for sending so far.
    pub pages_sent: u64,
}

/// Counters of a [`McastServer`], since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct McastServerStats {
    /// Valid REQUEST datagrams received (reports, JOIN and LEAVE included).
    pub requests: u64,
    /// Pages named in them.
    pub pages_requested: u64,
    /// Requested pages not queued because the same page was queued, or sent within the
    /// suppression window, to the same destination.
    pub duplicates_suppressed: u64,
    /// Pages sent (all fragments handed to the kernel).
    pub pages_sent: u64,
    /// Fragments sent.
    pub fragments_sent: u64,
    /// UDP payload bytes sent (fragments and REJECTs).
    pub bytes_sent: u64,
    /// Of the pages sent, those sent to one receiver only.
    pub unicast_pages: u64,
    /// Of the pages sent, those pushed without a request.
    pub pushed_pages: u64,
    /// REJECTs sent.
    pub rejects_sent: u64,
    /// Datagrams with a wrong tag.
    pub mac_failed: u64,
    /// Datagrams malformed, or not REQUESTs.
    pub malformed: u64,
    /// REQUESTs for a family not served, or of another generation.
    pub stale: u64,
    /// Pages whose read from the store failed.
    pub read_failures: u64,
    /// Datagrams the kernel refused to send.
    pub send_errors: u64,
    /// Every family served, by id.
    pub families: Vec<FamilyServerStats>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    pages_requested: AtomicU64,
    duplicates_suppressed: AtomicU64,
    pages_sent: AtomicU64,
    fragments_sent: AtomicU64,
    bytes_sent: AtomicU64,
    unicast_pages: AtomicU64,
    pushed_pages: AtomicU64,
    rejects_sent: AtomicU64,
    mac_failed: AtomicU64,
    malformed: AtomicU64,
    stale: AtomicU64,
    read_failures: AtomicU64,
    send_errors: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Where a page goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Destination {
    Group,
    Unicast(SocketAddrV4),
}

/// A receiver: its address and the id in its REQUESTs.
type ReceiverId = (SocketAddrV4, u32);

struct ReceiverInfo {
    last_heard: Instant,
    /// Its last reported rate; 0 = none yet.
    rate: u32,
}

/// A page to send.
#[derive(Clone, Copy)]
struct Job {
    page: u64,
    destination: Destination,
    /// Who asked (gets the REJECT if the read fails).
    requester: SocketAddrV4,
    push: bool,
}

/// The pages siblings requested before `receiver` joined, still to push to it.
struct PushCursor {
    receiver: ReceiverId,
    joined: Instant,
    next: usize,
    end: usize,
}

struct FamilyState {
    generation: u32,
    /// Seals the family's FRAGMENTs (its key follows the generation).
    sealer: Arc<FragmentSealer>,
    group: SocketAddrV4,
    store: Arc<dyn PageStore>,
    pages: u64,
    receivers: HashMap<ReceiverId, ReceiverInfo>,
    queue: VecDeque<Job>,
    queued: HashSet<(u64, Destination)>,
    last_group_send: HashMap<u64, Instant>,
    last_unicast_send: HashMap<(u64, SocketAddrV4), Instant>,
    /// Every page requested so far, in request order (for push), and its set.
    requested_order: Vec<u64>,
    requested: HashSet<u64>,
    pushes: VecDeque<PushCursor>,
    bucket: TokenBucket,
    pages_sent: u64,
    /// The lowest `rate` any report has produced; 0 before any.
    lowest_rate: u32,
}

impl FamilyState {
    fn active_receivers(&self, now: Instant, idle: Duration) -> usize {
        self.receivers
            .values()
            .filter(|r| now.saturating_duration_since(r.last_heard) < idle)
            .count()
    }

    fn rate(&self, now: Instant, config: &McastServerConfig) -> u32 {
        self.receivers
            .values()
            .filter(|r| now.saturating_duration_since(r.last_heard) < config.receiver_idle)
            .filter(|r| r.rate != 0)
            .map(|r| r.rate)
            .min()
            .unwrap_or(config.initial_rate)
            .min(config.max_rate)
            .max(1)
    }

    fn has_work(&self) -> bool {
        !self.queue.is_empty() || !self.pushes.is_empty()
    }

    fn recently_sent(&self, page: u64, destination: Destination, since: Instant) -> bool {
        let group_since = self.last_group_send.get(&page).is_some_and(|t| *t >= since);
        match destination {
            Destination::Group => group_since,
            Destination::Unicast(addr) => {
                group_since
                    || self
                        .last_unicast_send
                        .get(&(page, addr))
                        .is_some_and(|t| *t >= since)
            }
        }
    }

    fn mark_sent(&mut self, job: &Job, now: Instant) {
        match job.destination {
            Destination::Group => {
                self.last_group_send.insert(job.page, now);
            }
            Destination::Unicast(addr) => {
                self.last_unicast_send.insert((job.page, addr), now);
            }
        }
    }

    /// The next page to push, skipping those the receiver got since it joined.
    fn next_push(&mut self, now: Instant, idle: Duration) -> Option<Job> {
        while let Some(cursor) = self.pushes.front_mut() {
            let (addr, _) = cursor.receiver;
            let alive = self
                .receivers
                .get(&cursor.receiver)
                .is_some_and(|r| now.saturating_duration_since(r.last_heard) < idle);
            if !alive || cursor.next >= cursor.end {
                self.pushes.pop_front();
                continue;
            }
            let page = self.requested_order[cursor.next];
            cursor.next += 1;
            let joined = cursor.joined;
            let destination = Destination::Unicast(addr);
            // Round robin between the receivers being pushed to.
            self.pushes.rotate_left(1);
            if self.recently_sent(page, destination, joined)
                || self.queued.contains(&(page, destination))
                || self.queued.contains(&(page, Destination::Group))
            {
                continue;
            }
            return Some(Job {
                page,
                destination,
                requester: addr,
                push: true,
            });
        }
        None
    }
}

#[derive(Default)]
struct ServerState {
    families: HashMap<u64, FamilyState>,
    /// Where the send thread's round robin over families continues.
    turn: usize,
}

/// A page taken for sending, with what the send thread needs outside the lock.
struct Outgoing {
    family: u64,
    generation: u32,
    store: Arc<dyn PageStore>,
    sealer: Arc<FragmentSealer>,
    to: SocketAddrV4,
    flags: u16,
    job: Job,
}

struct Shared {
    key: McastKey,
    config: McastServerConfig,
    local_addr: SocketAddrV4,
    socket: UdpSocket,
    fragmentation: Fragmentation,
    stop: EventFd,
    stopping: AtomicBool,
    state: Mutex<ServerState>,
    /// Signalled when work is queued or the server stops.
    work: Condvar,
    counters: Counters,
    /// Whether pages go out as UDP GSO messages (until the kernel refuses one).
    segmentation: AtomicBool,
}

/// Serves the frozen memory of clone points to their clone hosts by multicast.
///
/// Dropping it shuts it down (see [`McastServer::shutdown`]).
pub struct McastServer {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Disconnects once both threads have exited.
    threads_exited: Mutex<Receiver<Never>>,
}

const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<McastServer>();
};

impl std::fmt::Debug for McastServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McastServer")
            .field("local_addr", &self.shared.local_addr)
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

fn new_generation(previous: Option<u32>) -> u32 {
    loop {
        let candidate = getrandom::u32().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |t| t.subsec_nanos() ^ std::process::id())
        });
        if candidate != 0 && Some(candidate) != previous {
            return candidate;
        }
    }
}

impl McastServer {
    /// Binds `config.bind` and starts the request and send threads.
    pub fn bind(
        config: McastServerConfig,
        key: &ClusterKey,
    ) -> Result<McastServer, McastBindError> {
        let (socket, local_addr) = bind_socket(&config)?;
        let stop = EventFd::new().map_err(|source| McastBindError::EventFd { source })?;
        let shared = Arc::new(Shared {
            key: McastKey::new(key),
            fragmentation: Fragmentation::for_mtu(config.mtu.min(wire::MAX_FRAGMENT_MTU)),
            config,
            local_addr,
            socket,
            stop,
            stopping: AtomicBool::new(false),
            state: Mutex::new(ServerState::default()),
            work: Condvar::new(),
            counters: Counters::default(),
            segmentation: AtomicBool::new(true),
        });
        let (alive, threads_exited) = mpsc::channel();
        let server = McastServer {
            shared: Arc::clone(&shared),
            threads: Mutex::new(Vec::new()),
            threads_exited: Mutex::new(threads_exited),
        };
        type Body = fn(&Shared, Sender<Never>);
        let senders = shared.config.send_threads.max(1);
        let bodies = std::iter::once(("sf-mcast-req".to_owned(), request_loop as Body))
            .chain((0..senders).map(|i| (format!("sf-mcast-send{i}"), send_loop as Body)));
        for (name, body) in bodies {
            let thread_shared = Arc::clone(&shared);
            let thread_alive = alive.clone();
            let handle = thread::Builder::new()
                .name(name)
                .spawn(move || body(&thread_shared, thread_alive))
                .map_err(|source| McastBindError::Spawn { source })?;
            lock(&server.threads).push(handle);
        }
        drop(alive);
        tracing::info!(
            %local_addr,
            fragments_per_page = shared.fragmentation.count,
            send_threads = senders,
            "mcdist server listening"
        );
        Ok(server)
    }

    /// The address REQUESTs go to.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.shared.local_addr
    }

    /// Serves `store` as `family` to `group` (at the receivers' port), replacing what the
    /// family had. Returns the family's new generation: random, non-zero, never the previous
    /// one, so requests and fragments of an earlier registration are told apart.
    pub fn register(&self, family: u64, group: Ipv4Addr, store: Arc<dyn PageStore>) -> u32 {
        let now = Instant::now();
        let pages = store.page_count();
        let mut state = lock(&self.shared.state);
        let previous = state.families.get(&family).map(|f| f.generation);
        let generation = new_generation(previous);
        state.families.insert(
            family,
            FamilyState {
                generation,
                sealer: Arc::new(FragmentSealer::new(
                    self.shared.key.fragment_key(family, generation),
                )),
                group: SocketAddrV4::new(group, self.shared.config.group_port),
                store,
                pages,
                receivers: HashMap::new(),
                queue: VecDeque::new(),
                queued: HashSet::new(),
                last_group_send: HashMap::new(),
                last_unicast_send: HashMap::new(),
                requested_order: Vec::new(),
                requested: HashSet::new(),
                pushes: VecDeque::new(),
                bucket: TokenBucket::new(self.shared.config.initial_rate, now),
                pages_sent: 0,
                lowest_rate: 0,
            },
        );
        tracing::info!(
            family = format_args!("{family:#x}"),
            generation = format_args!("{generation:#x}"),
            %group,
            pages,
            replaced = previous.is_some(),
            "mcdist serving family"
        );
        generation
    }

    /// Stops serving `family`; its queued pages are dropped and later requests get REJECT
    /// (unknown family).
    pub fn unregister(&self, family: u64) {
        let removed = lock(&self.shared.state).families.remove(&family).is_some();
        tracing::info!(
            family = format_args!("{family:#x}"),
            removed,
            "mcdist family withdrawn"
        );
    }

    /// A snapshot of the counters and of every family's rate and receivers.
    pub fn stats(&self) -> McastServerStats {
        let c = &self.shared.counters;
        let now = Instant::now();
        let config = &self.shared.config;
        let mut families: Vec<FamilyServerStats> = lock(&self.shared.state)
            .families
            .iter()
            .map(|(&family, f)| FamilyServerStats {
                family,
                generation: f.generation,
                group: *f.group.ip(),
                rate: f.rate(now, config),
                lowest_rate: f.lowest_rate,
                active_receivers: f.active_receivers(now, config.receiver_idle),
                queued_pages: f.queue.len()
                    + f.pushes.iter().map(|p| p.end - p.next).sum::<usize>(),
                pages_sent: f.pages_sent,
            })
            .collect();
        families.sort_by_key(|f| f.family);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        McastServerStats {
            requests: load(&c.requests),
            pages_requested: load(&c.pages_requested),
            duplicates_suppressed: load(&c.duplicates_suppressed),
            pages_sent: load(&c.pages_sent),
            fragments_sent: load(&c.fragments_sent),
            bytes_sent: load(&c.bytes_sent),
            unicast_pages: load(&c.unicast_pages),
            pushed_pages: load(&c.pushed_pages),
            rejects_sent: load(&c.rejects_sent),
            mac_failed: load(&c.mac_failed),
            malformed: load(&c.malformed),
            stale: load(&c.stale),
            read_failures: load(&c.read_failures),
            send_errors: load(&c.send_errors),
            families,
        }
    }

    /// Stops both threads and waits for them (at most [`SHUTDOWN_TIMEOUT`]; a store read that
    /// does not return is left to finish, with a warning). Calling it again does nothing.
    pub fn shutdown(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.shared.stop.signal();
        // Taking the lock orders the flag before the send thread's next check.
        drop(lock(&self.shared.state));
        self.shared.work.notify_all();
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
        tracing::info!(local_addr = %self.shared.local_addr, "mcdist server stopped");
    }
}

impl Drop for McastServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The request thread: receives until the server stops.
fn request_loop(shared: &Shared, _alive: Sender<Never>) {
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN + 1];
    let mut scratch = SendScratch::default();
    loop {
        match sys::wait_readable(shared.socket.as_fd(), shared.stop.as_fd()) {
            Ok((_, true)) => return,
            Ok((false, false)) => continue,
            Ok((true, false)) => {}
            Err(error) => {
                tracing::error!(%error, "mcdist server: waiting for requests failed");
                return;
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match shared.socket.recv_from(&mut buf) {
            Ok((len, SocketAddr::V4(from))) => {
                handle_datagram(shared, &mut buf[..len], from, &mut scratch);
            }
            Ok((_, SocketAddr::V6(_))) => bump(&shared.counters.malformed, 1),
            Err(error) => tracing::debug!(%error, "mcdist server receive failed"),
        }
    }
}

fn handle_datagram(
    shared: &Shared,
    bytes: &mut [u8],
    from: SocketAddrV4,
    scratch: &mut SendScratch,
) {
    // The server opens no FRAGMENTs: receivers do not send them.
    match wire::decode(&shared.key, bytes, |_, _| None) {
        Ok(Datagram::Request(header, request)) => {
            bump(&shared.counters.requests, 1);
            let (rejects, queued) = handle_request(shared, &header, &request, from);
            for reject in rejects {
                send_reject(shared, &header, reject, from, &mut scratch.reply);
            }
            if queued {
                send_inline(shared, scratch);
            }
        }
        Ok(_) => bump(&shared.counters.malformed, 1),
        Err(DecodeError::BadTag) => bump(&shared.counters.mac_failed, 1),
        Err(error) => {
            bump(&shared.counters.malformed, 1);
            tracing::trace!(%from, %error, "mcdist server dropped a malformed datagram");
        }
    }
}

fn send_reject(
    shared: &Shared,
    header: &Header,
    reject: Reject,
    to: SocketAddrV4,
    reply: &mut Vec<u8>,
) {
    let header = Header {
        flags: 0,
        sender: 0,
        ..*header
    };
    wire::encode_reject(&shared.key, reply, &header, &reject);
    match shared.socket.send_to(reply, to) {
        Ok(sent) => {
            bump(&shared.counters.rejects_sent, 1);
            bump(&shared.counters.bytes_sent, sent as u64);
        }
        Err(error) => {
            bump(&shared.counters.send_errors, 1);
            tracing::debug!(%to, %error, "sending an mcdist REJECT failed");
        }
    }
}

/// Applies one REQUEST; returns the REJECTs to send to its sender, and whether it queued
/// pages (or pushes) to send.
fn handle_request(
    shared: &Shared,
    header: &Header,
    request: &Request<'_>,
    from: SocketAddrV4,
) -> (Vec<Reject>, bool) {
    let config = &shared.config;
    let counters = &shared.counters;
    let now = Instant::now();
    let mut state = lock(&shared.state);
    let leaving = header.flags & REQUEST_LEAVE != 0;
    let first_page = request.pages().next().unwrap_or(0);
    let Some(family) = state.families.get_mut(&header.family) else {
        bump(&counters.stale, 1);
        let rejects = if leaving {
            Vec::new()
        } else {
            vec![Reject {
                page: first_page,
                code: RejectCode::UnknownFamily,
            }]
        };
        return (rejects, false);
    };
    if header.generation != family.generation {
        bump(&counters.stale, 1);
        let rejects = if leaving {
            Vec::new()
        } else {
            vec![Reject {
                page: first_page,
                code: RejectCode::StaleGeneration,
            }]
        };
        return (rejects, false);
    }
    let receiver: ReceiverId = (from, header.sender);
    if leaving {
        family.receivers.remove(&receiver);
        family.pushes.retain(|p| p.receiver != receiver);
        return (Vec::new(), false);
    }
    let known = family
        .receivers
        .get(&receiver)
        .is_some_and(|r| now.saturating_duration_since(r.last_heard) < config.receiver_idle);
    let info = family.receivers.entry(receiver).or_insert(ReceiverInfo {
        last_heard: now,
        rate: 0,
    });
    info.last_heard = now;
    if request.rate != 0 {
        info.rate = request.rate;
        let rate = family.rate(now, config);
        if family.lowest_rate == 0 || rate < family.lowest_rate {
            family.lowest_rate = rate;
        }
    }
    if !known
        && header.flags & REQUEST_JOIN != 0
        && config.push
        && !family.requested_order.is_empty()
    {
        family.pushes.push_back(PushCursor {
            receiver,
            joined: now,
            next: 0,
            end: family.requested_order.len(),
        });
    }
    let destination = if header.flags & REQUEST_UNICAST_REPLY != 0
        || family.active_receivers(now, config.receiver_idle) == 1
    {
        Destination::Unicast(from)
    } else {
        Destination::Group
    };
    let window_start = now.checked_sub(config.suppression).unwrap_or(now);
    let mut rejects = Vec::new();
    let mut queued_any = false;
    for page in request.pages() {
        bump(&counters.pages_requested, 1);
        if page >= family.pages {
            rejects.push(Reject {
                page,
                code: RejectCode::OutOfRange,
            });
            continue;
        }
        if family.requested.insert(page) {
            family.requested_order.push(page);
        }
        if family.queued.contains(&(page, destination))
            || family.queued.contains(&(page, Destination::Group))
            || family.recently_sent(page, destination, window_start)
        {
            bump(&counters.duplicates_suppressed, 1);
            continue;
        }
        family.queued.insert((page, destination));
        family.queue.push_back(Job {
            page,
            destination,
            requester: from,
            push: false,
        });
        queued_any = true;
    }
    let pushing = !family.pushes.is_empty();
    drop(state);
    (rejects, queued_any || pushing)
}

/// Buffers for reading, fragmenting and sending pages.
struct SendScratch {
    batch: Vec<Outgoing>,
    datagrams: Vec<Vec<u8>>,
    page: Box<[u8; PAGE_SIZE]>,
    reply: Vec<u8>,
}

impl Default for SendScratch {
    fn default() -> Self {
        Self {
            batch: Vec::new(),
            datagrams: Vec::new(),
            page: Box::new([0u8; PAGE_SIZE]),
            reply: Vec::new(),
        }
    }
}

/// Right after a REQUEST queued work: sends the first [`INLINE_PAGES`] queued pages from the
/// request thread if tokens allow (a fault's page leaves without waking the send thread), and
/// hands whatever is left (more pages, pacing, pushes) to the send thread.
fn send_inline(shared: &Shared, scratch: &mut SendScratch) {
    let more = {
        let mut state = lock(&shared.state);
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let taken = take_batch(
            &mut state,
            &shared.config,
            Instant::now(),
            INLINE_PAGES,
            &mut scratch.batch,
        );
        matches!(taken, Next::Wait(_)) || state.families.values().any(FamilyState::has_work)
    };
    if more {
        shared.work.notify_one();
    }
    if !scratch.batch.is_empty() {
        send_pages(shared, scratch);
    }
}

/// What the send thread should do next.
enum Next {
    /// `batch` was filled.
    Send,
    /// Nothing can be sent before this long (or until notified).
    Wait(Duration),
}

/// Fills `batch` from one family with work and tokens, round robin over the families.
fn take_batch(
    state: &mut ServerState,
    config: &McastServerConfig,
    now: Instant,
    max_pages: u32,
    batch: &mut Vec<Outgoing>,
) -> Next {
    let mut ids: Vec<u64> = state.families.keys().copied().collect();
    ids.sort_unstable();
    let mut wait = HOUSEKEEPING_INTERVAL;
    for step in 0..ids.len() {
        let index = (state.turn + step) % ids.len();
        let id = ids[index];
        let Some(family) = state.families.get_mut(&id) else {
            continue;
        };
        if !family.has_work() {
            continue;
        }
        let rate = family.rate(now, config);
        family.bucket.refill(now, rate);
        let available = family.bucket.available();
        if available == 0 {
            wait = wait.min(family.bucket.wait_for(1));
            continue;
        }
        let mut taken = 0;
        while taken < available.min(max_pages) {
            let job = match family.queue.pop_front() {
                Some(job) => {
                    family.queued.remove(&(job.page, job.destination));
                    job
                }
                None => match family.next_push(now, config.receiver_idle) {
                    Some(job) => job,
                    None => break,
                },
            };
            family.mark_sent(&job, now);
            let (to, mut flags) = match job.destination {
                Destination::Group => (family.group, 0),
                Destination::Unicast(addr) => (addr, FRAGMENT_UNICAST),
            };
            if job.push {
                flags |= FRAGMENT_PUSH;
            }
            batch.push(Outgoing {
                family: id,
                generation: family.generation,
                store: Arc::clone(&family.store),
                sealer: Arc::clone(&family.sealer),
                to,
                flags,
                job,
            });
            taken += 1;
        }
        family.bucket.take(taken);
        family.pages_sent += u64::from(taken);
        if taken > 0 {
            state.turn = index + 1;
            return Next::Send;
        }
    }
    Next::Wait(wait)
}

fn housekeeping(state: &mut ServerState, config: &McastServerConfig, now: Instant) {
    for family in state.families.values_mut() {
        family
            .receivers
            .retain(|_, r| now.saturating_duration_since(r.last_heard) < config.receiver_idle);
        family
            .last_unicast_send
            .retain(|_, sent| now.saturating_duration_since(*sent) < config.suppression);
    }
}

fn wait_on<'a>(
    shared: &'a Shared,
    state: MutexGuard<'a, ServerState>,
    timeout: Duration,
) -> MutexGuard<'a, ServerState> {
    shared
        .work
        .wait_timeout(state, timeout)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}

/// A send thread: sends queued pages, paced, until the server stops.
fn send_loop(shared: &Shared, _alive: Sender<Never>) {
    let mut scratch = SendScratch::default();
    let mut next_housekeeping = Instant::now() + HOUSEKEEPING_INTERVAL;
    loop {
        {
            let mut state = lock(&shared.state);
            loop {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let now = Instant::now();
                if now >= next_housekeeping {
                    housekeeping(&mut state, &shared.config, now);
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL;
                }
                match take_batch(
                    &mut state,
                    &shared.config,
                    now,
                    MAX_BATCH_PAGES,
                    &mut scratch.batch,
                ) {
                    Next::Send => break,
                    Next::Wait(wait) => {
                        let until_housekeeping = next_housekeeping.saturating_duration_since(now);
                        state = wait_on(shared, state, wait.min(until_housekeeping));
                    }
                }
            }
        }
        send_pages(shared, &mut scratch);
    }
}

/// Sends `list`, each page's fragments (`pages`: where each page's datagrams end) as one
/// UDP GSO message while the kernel takes those, else datagram by datagram.
fn send_list(
    shared: &Shared,
    list: &[(SocketAddrV4, &[u8])],
    pages: &[(usize, &Outgoing)],
) -> sys::BatchSent {
    if !shared.segmentation.load(Ordering::Relaxed) {
        return sys::send_batch(&shared.socket, list);
    }
    let datagrams: Vec<&[u8]> = list.iter().map(|(_, d)| *d).collect();
    let mut messages: Vec<(SocketAddrV4, &[&[u8]])> = Vec::with_capacity(pages.len());
    let mut start = 0;
    for &(end, outgoing) in pages {
        if end > start {
            messages.push((outgoing.to, &datagrams[start..end]));
        }
        start = end;
    }
    let outcome = sys::send_segmented(&shared.socket, &messages);
    let refused = outcome
        .error
        .as_ref()
        .and_then(io::Error::raw_os_error)
        .is_some_and(|errno| {
            [libc::EIO, libc::EINVAL, libc::EOPNOTSUPP, libc::ENOPROTOOPT].contains(&errno)
        });
    if !refused {
        return outcome;
    }
    shared.segmentation.store(false, Ordering::Relaxed);
    tracing::info!(
        error = ?outcome.error,
        "mcdist server: the kernel refuses UDP segmentation offload; sending datagram by datagram"
    );
    let rest = sys::send_batch(&shared.socket, &list[outcome.sent..]);
    sys::BatchSent {
        sent: outcome.sent + rest.sent,
        error: rest.error,
    }
}

/// Reads, fragments and sends the pages of `batch` (emptying it).
fn send_pages(shared: &Shared, scratch: &mut SendScratch) {
    let SendScratch {
        batch,
        datagrams,
        page,
        reply,
    } = scratch;
    let page: &mut [u8; PAGE_SIZE] = page;
    let counters = &shared.counters;
    let cut = shared.fragmentation;
    let mut used = 0;
    // Destination and page-sent accounting per datagram, in order.
    let mut sent_pages: Vec<(usize, &Outgoing)> = Vec::new();
    let mut destinations: Vec<SocketAddrV4> = Vec::new();
    for outgoing in batch.iter() {
        if let Err(error) = outgoing.store.read_page(outgoing.job.page, page) {
            bump(&counters.read_failures, 1);
            tracing::warn!(
                family = format_args!("{:#x}", outgoing.family),
                page = format_args!("{:#x}", outgoing.job.page),
                %error,
                "mcdist server: reading a page failed"
            );
            let header = Header {
                flags: 0,
                family: outgoing.family,
                generation: outgoing.generation,
                sender: 0,
            };
            let reject = Reject {
                page: outgoing.job.page,
                code: RejectCode::ReadFailed,
            };
            send_reject(shared, &header, reject, outgoing.job.requester, reply);
            continue;
        }
        let header = Header {
            flags: outgoing.flags,
            family: outgoing.family,
            generation: outgoing.generation,
            sender: 0,
        };
        for (index, offset, len) in cut.pieces() {
            if datagrams.len() <= used {
                datagrams.push(Vec::with_capacity(MAX_DATAGRAM_LEN));
            }
            let start = usize::from(offset);
            let fragment = Fragment {
                page: outgoing.job.page,
                index,
                count: cut.count,
                offset,
                data: &page[start..start + usize::from(len)],
            };
            if let Err(error) =
                wire::encode_fragment(&outgoing.sealer, &mut datagrams[used], &header, &fragment)
            {
                // Unreachable: the fragmentation covers the page with valid pieces.
                tracing::error!(%error, "mcdist server: encoding a fragment failed");
                continue;
            }
            destinations.push(outgoing.to);
            used += 1;
        }
        sent_pages.push((used, outgoing));
    }
    let list: Vec<(SocketAddrV4, &[u8])> = destinations
        .iter()
        .zip(datagrams.iter())
        .map(|(to, datagram)| (*to, datagram.as_slice()))
        .collect();
    let outcome = send_list(shared, &list, &sent_pages);
    if let Some(error) = &outcome.error {
        bump(&counters.send_errors, (list.len() - outcome.sent) as u64);
        tracing::debug!(%error, unsent = list.len() - outcome.sent, "mcdist server: send failed");
    }
    bump(&counters.fragments_sent, outcome.sent as u64);
    bump(
        &counters.bytes_sent,
        list[..outcome.sent]
            .iter()
            .map(|(_, d)| d.len() as u64)
            .sum(),
    );
    for (end, outgoing) in sent_pages {
        // A page counts as sent when all its fragments were.
        if end > outcome.sent {
            continue;
        }
        bump(&counters.pages_sent, 1);
        if outgoing.flags & FRAGMENT_UNICAST != 0 {
            bump(&counters.unicast_pages, 1);
        }
        if outgoing.job.push {
            bump(&counters.pushed_pages, 1);
        }
    }
    batch.clear();
}
