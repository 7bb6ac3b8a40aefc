//! The receive side of mcdist without its transport: what a clone host does with datagrams,
//! page requests and time, whichever path (kernel UDP socket or AF_XDP) brings the datagrams.
//!
//! A transport drives a [`ReceiverCore`]:
//!
//! - it hands over received UDP payloads with [`ReceiverCore::on_datagrams`] (a batch at a
//!   time; each call delivers the pages it completed to their families' sinks, one
//!   [`PageSink::deliver_batch`] per family and call);
//! - it calls [`ReceiverCore::tick`] no later than the instant the previous call returned, and
//!   whenever the core asks through [`RequestTransport::wake`];
//! - it sends the REQUEST datagrams the core gives it ([`RequestTransport::send`]), from the
//!   address the server's unicast answers should come back to.
//!
//! Fault threads call [`ReceiverCore::request`] directly; it sends at once while fewer than
//! `max_in_flight` pages of the family are awaited, and queues the rest here, sending them
//! as earlier pages arrive.
//!
//! # What the core does
//!
//! - Checks every datagram ([`wire::decode`]: shape, tag, fields) and drops, with a counter,
//!   anything forged, corrupted, of a family it has not joined or of another generation.
//! - Reassembles pages from fragments (a bounded number of partial pages, each with a
//!   timeout) and delivers each complete page once: pages already held are dropped. Pages
//!   nobody on this host asked for (early pages) are delivered too.
//! - Keeps the pages it requested and has not received in a table with a retransmission
//!   timeout adapted to the measured request-to-page time (like TCP's: smoothed RTT plus four
//!   deviations, within `rto_min..=rto_max`, growing linearly per retry), plus the time the server
//!   needs for the requested pages ahead of it, at the lower of the reported rate and the rate
//!   pages were measured to arrive at while requests were in flight. Expired pages are
//!   requested again with the `RETRY` flag; after `unicast_after` retries also with
//!   `UNICAST_REPLY`.
//! - Estimates the rate it can take (AIMD: grows while nothing is lost, halves when a page has
//!   to be re-requested) and reports it in every REQUEST and in a report every
//!   `report_interval` (which also keeps it in the server's set of active receivers).
//! - Turns a REJECT into one [`PageSink::failed`] call for the family; the family then stops
//!   requesting and reporting.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use crate::auth::ClusterKey;
use crate::client::PageSink;
use crate::mcast::rate::AimdRate;
use crate::mcast::reassembly::{Outcome, PageBuf, Reassembly};
use crate::mcast::wire::{
    self, Datagram, DecodeError, FRAGMENT_PUSH, FRAGMENT_UNICAST, Fragment, FragmentKey, Header,
    MAX_REQUEST_PAGES, McastKey, REQUEST_JOIN, REQUEST_LEAVE, REQUEST_RETRY, REQUEST_UNICAST_REPLY,
};
use crate::sync::{lock, read, write};
use crate::wire::PAGE_SIZE;

/// The mcdist UDP port of every host unless configured otherwise.
pub const DEFAULT_PORT: u16 = 7073;

/// How long [`ReceiverCore::tick`] lets the transport sleep when nothing is pending.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Tunables of a receiver (both paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// The address of the interface on the cluster network: group memberships are made on it.
    pub local_addr: Ipv4Addr,
    /// The mcdist UDP port (the same on every host).
    pub port: u16,
    /// Smallest retransmission timeout.
    pub rto_min: Duration,
    /// Largest retransmission timeout (also the cap of the per-retry growth).
    pub rto_max: Duration,
    /// Re-requests of a page after which it is requested with `UNICAST_REPLY`.
    pub unicast_after: u32,
    /// Rate reported (pages/s) before anything was measured.
    pub initial_rate: u32,
    /// The rate never drops below this (pages/s): halving on random, non-congestion loss
    /// must not starve the family.
    pub min_rate: u32,
    /// The rate never grows above this (pages/s).
    pub max_rate: u32,
    /// How often each family's rate is reported (and grown when nothing was lost). Keep it
    /// well below the server's `receiver_idle`.
    pub report_interval: Duration,
    /// Most pages partly received at once (each holds a 4 KiB buffer).
    pub max_partial_pages: usize,
    /// A page partly received for this long is dropped.
    pub partial_timeout: Duration,
    /// Most pages of a family requested and awaited at once; further requested pages wait
    /// here, in order, and are sent as earlier ones arrive. Bounds the server's queue for this
    /// receiver, so a timeout measures the network, not a deep queue, and a fault asked for
    /// after a large prefetch waits behind at most this many pages.
    pub max_in_flight: usize,
}

impl Default for ReceiverConfig {
    fn default() -> ReceiverConfig {
        ReceiverConfig {
            local_addr: Ipv4Addr::UNSPECIFIED,
            port: DEFAULT_PORT,
            rto_min: Duration::from_millis(10),
            rto_max: Duration::from_millis(500),
            unicast_after: 3,
            initial_rate: 20_000,
            min_rate: 2_000,
            max_rate: 200_000,
            report_interval: Duration::from_millis(100),
            max_partial_pages: 1024,
            partial_timeout: Duration::from_secs(2),
            max_in_flight: 512,
        }
    }
}

/// A family (clone point) this host runs clones of, as the launch order describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyJoin {
    /// The clone point's id.
    pub family: u64,
    /// The serving daemon's generation of it.
    pub generation: u32,
    /// Its multicast group.
    pub group: Ipv4Addr,
    /// Where its server takes REQUESTs.
    pub server: SocketAddrV4,
    /// Pages in its memory; fragments of pages beyond are dropped as malformed.
    pub pages: u64,
}

/// Learns each page the host now holds (the AF_XDP path sets its presence bitmap with it).
///
/// Called after the page was delivered to the family's sink, from the thread that delivered
/// it.
pub trait HeldPages: Send + Sync {
    /// `page` of `family` is now held.
    fn held(&self, family: u64, page: u64);
}

/// How a [`ReceiverCore`] sends and asks to be ticked; implemented by the transport.
pub trait RequestTransport: Send + Sync {
    /// Sends one REQUEST datagram to `server`. Must not block long (called from fault
    /// threads); a lost request is re-sent when its timeout expires.
    fn send(&self, server: SocketAddrV4, datagram: &[u8]) -> io::Result<()>;
    /// The core's next deadline moved before the one the last [`ReceiverCore::tick`]
    /// returned: call `tick` soon.
    fn wake(&self);
}

/// Counters of a receiver (all families) or of one family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiverStats {
    /// Datagrams handed to the core (family stats: those that decoded as this family's).
    pub datagrams: u64,
    /// Authenticated fragments of a joined family and generation.
    pub fragments: u64,
    /// Pages completed and delivered.
    pub pages_completed: u64,
    /// Of those, pages this host had not requested (arrived for a sibling, or pushed).
    pub early_pages: u64,
    /// Fragments dropped because their page was already held or the fragment had arrived.
    pub duplicate_fragments: u64,
    /// Datagrams with a wrong tag (forged or corrupted).
    pub mac_failed: u64,
    /// Datagrams that were short, of another version, kind or shape, inconsistent with the
    /// other fragments of their page, for a page past the family's end, or not meant for a
    /// receiver.
    pub malformed: u64,
    /// Authenticated datagrams of a family this host has not joined, or of another generation.
    pub not_ours: u64,
    /// Partial pages dropped (timed out or evicted by newer ones).
    pub partials_dropped: u64,
    /// REQUEST datagrams sent (page requests, re-requests, reports, JOIN, LEAVE).
    pub requests_sent: u64,
    /// Pages requested for the first time.
    pub pages_requested: u64,
    /// Pages requested again after their timeout.
    pub re_requests: u64,
    /// REQUEST datagrams sent with `UNICAST_REPLY`.
    pub unicast_requests: u64,
    /// Report-only REQUESTs sent (no pages).
    pub reports_sent: u64,
    /// REQUESTs the transport failed to send.
    pub send_errors: u64,
    /// REJECTs received for a joined family.
    pub rejects: u64,
    /// Fragments that came with the `UNICAST` flag.
    pub unicast_fragments: u64,
    /// Fragments that came with the `PUSH` flag.
    pub pushed_fragments: u64,
    /// Times the rate was halved.
    pub rate_cuts: u64,
    /// The current rate estimate, pages/s (receiver stats: the lowest of its families; 0
    /// without families).
    pub rate: u32,
    /// Pages requested and not yet received.
    pub outstanding: u64,
    /// Of those, pages waiting to be sent to the server (beyond `max_in_flight`).
    #[serde(default)]
    pub queued: u64,
    /// Pages partly received now (receiver stats only).
    pub partial_pages: u64,
    /// Datagrams longer than any mcdist datagram (socket path).
    pub truncated: u64,
    /// Failed receives (socket path).
    pub receive_errors: u64,
    /// Times the receive buffers ran out before the loop returned them (socket path).
    pub buffers_exhausted: u64,
}

/// Why joining a family failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The family is joined already.
    #[error("family {family:#x} is already joined")]
    AlreadyJoined {
        /// The family.
        family: u64,
    },
    /// The multicast group could not be joined.
    #[error("joining multicast group {group} on {interface}")]
    Membership {
        /// The group.
        group: Ipv4Addr,
        /// The interface address.
        interface: Ipv4Addr,
        /// The I/O error.
        source: io::Error,
    },
    /// The receiver was shut down.
    #[error("the mcdist receiver is shut down")]
    Stopped,
    /// The XDP program could not take the family.
    #[error("registering family {family:#x} with the XDP program")]
    Xdp {
        /// The family.
        family: u64,
        /// What failed.
        source: snowflock_ebpf::FamilyError,
    },
}

/// Request-to-page time estimate (RFC 6298's smoothing), for the retransmission timeout.
#[derive(Debug, Default)]
struct RttEstimate {
    smoothed: Option<Duration>,
    variation: Duration,
}

impl RttEstimate {
    fn sample(&mut self, rtt: Duration) {
        match self.smoothed {
            None => {
                self.smoothed = Some(rtt);
                self.variation = rtt / 2;
            }
            Some(smoothed) => {
                self.variation = (self.variation * 3 + smoothed.abs_diff(rtt)) / 4;
                self.smoothed = Some((smoothed * 7 + rtt) / 8);
            }
        }
    }

    fn rto(&self, min: Duration, max: Duration) -> Duration {
        let rto = match self.smoothed {
            Some(smoothed) => smoothed + self.variation * 4,
            // Before any sample: a quarter of the maximum, so a first loss costs little but a
            // server still queueing at its initial rate is not flooded with retries.
            None => max / 4,
        };
        rto.clamp(min, max.max(min))
    }
}

#[derive(Debug)]
struct Outstanding {
    first_sent: Instant,
    /// The part of its wait that is its place in the server's queue (see [`queueing`]).
    queued_for: Duration,
    retry_at: Instant,
    retries: u32,
}

/// How long the server takes to send `pages` pages to a receiver that reported `rate`: it
/// never sends the family faster, so a page with `pages - 1` requested pages ahead of it
/// cannot arrive sooner. Added to its timeout, so that a long request is not re-requested
/// while it is still being served, and taken off its request-to-page time, so that the
/// timeout stays a measure of the network.
fn queueing(pages: usize, rate: u32) -> Duration {
    Duration::from_secs_f64(pages as f64 / f64::from(rate.max(1)))
}

/// Pages held, one bit each.
#[derive(Debug)]
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn new(bits: u64) -> Bitmap {
        Bitmap(vec![0; bits.div_ceil(64) as usize])
    }

    fn get(&self, bit: u64) -> bool {
        self.0
            .get((bit / 64) as usize)
            .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }

    fn set(&mut self, bit: u64) {
        if let Some(word) = self.0.get_mut((bit / 64) as usize) {
            *word |= 1 << (bit % 64);
        }
    }

    fn clear(&mut self, bit: u64) {
        if let Some(word) = self.0.get_mut((bit / 64) as usize) {
            *word &= !(1 << (bit % 64));
        }
    }
}

struct Family {
    join: FamilyJoin,
    sink: Arc<dyn PageSink>,
    hook: Option<Arc<dyn HeldPages>>,
    held: Bitmap,
    /// Pages sent to the server and awaited.
    outstanding: HashMap<u64, Outstanding>,
    /// (retry_at, page) of every outstanding page.
    retry_order: BTreeSet<(Instant, u64)>,
    /// Pages requested beyond `max_in_flight`, in request order, and their bits.
    waiting: VecDeque<u64>,
    queued: Bitmap,
    /// Pages per second measured to arrive while requests were in flight (smoothed).
    goodput: Option<f64>,
    /// Requested pages completed since the last report, and whether pages waited for room in
    /// the window when that interval began.
    completed_in_interval: u32,
    busy_since_report: bool,
    last_report: Instant,
    rtt: RttEstimate,
    rate: AimdRate,
    next_report: Instant,
    failed: bool,
    stats: ReceiverStats,
}

/// Weight of the newest interval in the smoothed goodput.
const GOODPUT_WEIGHT: f64 = 0.5;

impl Family {
    /// The rate the server is expected to serve this family at: the reported rate, or the
    /// measured one when that is lower (the server or the path cannot keep up).
    fn pace(&self) -> u32 {
        let rate = self.rate.rate();
        match self.goodput {
            Some(measured) => rate.min(measured.max(1.0) as u32),
            None => rate,
        }
    }

    /// At a report: if pages waited for room in the window at both ends of the interval
    /// (the window was full: more was wanted than the server delivered), its completions per
    /// second are a sample of what the server delivers. Otherwise they measure the demand
    /// (clones faulting a page at a time), which says nothing about the server.
    fn sample_goodput(&mut self, now: Instant) {
        let interval = now
            .saturating_duration_since(self.last_report)
            .as_secs_f64();
        let backlogged = !self.waiting.is_empty();
        if self.busy_since_report && backlogged && interval > 0.0 {
            let sample = f64::from(self.completed_in_interval) / interval;
            if sample > 0.0 {
                self.goodput = Some(match self.goodput {
                    Some(old) => old + GOODPUT_WEIGHT * (sample - old),
                    None => sample,
                });
            }
        }
        self.completed_in_interval = 0;
        self.busy_since_report = backlogged;
        self.last_report = now;
    }
}

/// Where a family's completed pages go: its sink and its held-pages hook.
type Destination = (Arc<dyn PageSink>, Option<Arc<dyn HeldPages>>);

/// A completed page's bytes: reassembled, or the payloads of its fragments in the receive
/// buffers, in page order.
enum PageData<'a> {
    Buffer(PageBuf),
    Parts(Vec<&'a [u8]>),
}

/// A completed page on its way to a sink.
struct Ready<'a> {
    family: u64,
    page: u64,
    data: PageData<'a>,
}

/// The pages of `decoded` all of whose fragments it holds, consistently (one count, distinct
/// indices, payloads that tile the page): their payloads in page order. Tags are checked
/// already; family, generation and range are checked by the caller as for any fragment.
fn whole_pages<'a>(
    decoded: &[Result<Datagram<'a>, DecodeError>],
) -> HashMap<(u64, u64), Vec<&'a [u8]>> {
    let mut groups: HashMap<(u64, u64), Vec<Fragment<'a>>> = HashMap::new();
    for datagram in decoded {
        if let Ok(Datagram::Fragment(header, fragment)) = datagram
            && fragment.count > 1
        {
            groups
                .entry((header.family, fragment.page))
                .or_default()
                .push(*fragment);
        }
    }
    groups
        .into_iter()
        .filter_map(|(key, mut fragments)| {
            let count = usize::from(fragments[0].count);
            if fragments.len() != count || fragments.iter().any(|f| usize::from(f.count) != count) {
                return None;
            }
            fragments.sort_unstable_by_key(|f| f.offset);
            let mut next = 0usize;
            let mut indices = 0u32;
            for fragment in &fragments {
                if usize::from(fragment.offset) != next {
                    return None;
                }
                next += fragment.data.len();
                indices |= 1 << fragment.index;
            }
            (next == PAGE_SIZE && indices.count_ones() as usize == count)
                .then(|| (key, fragments.iter().map(|f| f.data).collect()))
        })
        .collect()
}

struct State {
    families: HashMap<u64, Family>,
    reassembly: Reassembly,
    stats: ReceiverStats,
    /// The deadline the last `tick` gave the transport.
    armed: Option<Instant>,
    /// Scratch for encoding REQUESTs.
    scratch: Vec<u8>,
}

/// The path-independent receiver: see the module documentation.
pub struct ReceiverCore {
    key: McastKey,
    /// The FRAGMENT key of each joined family, with its generation: apart from the state so
    /// that datagrams are opened outside the state lock.
    fragment_keys: RwLock<HashMap<u64, (u32, FragmentKey)>>,
    /// This receiver's id in its REQUESTs (random, fixed for its life).
    id: u32,
    config: ReceiverConfig,
    transport: Arc<dyn RequestTransport>,
    state: Mutex<State>,
}

impl std::fmt::Debug for ReceiverCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverCore")
            .field("id", &format_args!("{:#x}", self.id))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Adds to both the receiver's and the family's counters.
fn count(global: &mut ReceiverStats, family: &mut ReceiverStats, add: impl Fn(&mut ReceiverStats)) {
    add(global);
    add(family);
}

/// What one REQUEST send needs, gathered under the lock.
struct Outgoing<'a> {
    key: &'a McastKey,
    transport: &'a dyn RequestTransport,
    id: u32,
}

impl Outgoing<'_> {
    /// Encodes and sends REQUESTs for `pages` (any number, split by [`MAX_REQUEST_PAGES`]; at
    /// least one datagram even without pages), counting them.
    fn send(
        &self,
        scratch: &mut Vec<u8>,
        family: &mut Family,
        global: &mut ReceiverStats,
        flags: u16,
        pages: &[u64],
    ) {
        let header = Header {
            flags,
            family: family.join.family,
            generation: family.join.generation,
            sender: self.id,
        };
        let rate = family.rate.rate();
        let chunks: Vec<&[u64]> = if pages.is_empty() {
            vec![&[]]
        } else {
            pages.chunks(MAX_REQUEST_PAGES).collect()
        };
        for chunk in chunks {
            if let Err(error) = wire::encode_request(self.key, scratch, &header, rate, chunk) {
                // Unreachable: the flags are defined ones and chunks are small enough.
                tracing::error!(%error, "could not encode an mcdist request");
                continue;
            }
            let sent = self.transport.send(family.join.server, scratch);
            count(global, &mut family.stats, |s| {
                s.requests_sent += 1;
                if chunk.is_empty() {
                    s.reports_sent += 1;
                }
                if flags & REQUEST_UNICAST_REPLY != 0 {
                    s.unicast_requests += 1;
                }
            });
            if let Err(error) = sent {
                count(global, &mut family.stats, |s| s.send_errors += 1);
                tracing::debug!(
                    server = %family.join.server,
                    family = format_args!("{:#x}", family.join.family),
                    %error,
                    "sending an mcdist request failed"
                );
            }
        }
    }
}

impl ReceiverCore {
    /// A core with no families, sending through `transport`.
    pub fn new(
        config: ReceiverConfig,
        key: &ClusterKey,
        transport: Arc<dyn RequestTransport>,
    ) -> ReceiverCore {
        let id = getrandom::u32().unwrap_or_else(|_| {
            // Only needs to differ between the receivers of one family; the time does that.
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |t| t.subsec_nanos() ^ std::process::id())
        });
        ReceiverCore {
            key: McastKey::new(key),
            fragment_keys: RwLock::new(HashMap::new()),
            id,
            state: Mutex::new(State {
                families: HashMap::new(),
                reassembly: Reassembly::new(config.max_partial_pages, config.partial_timeout),
                stats: ReceiverStats::default(),
                armed: None,
                scratch: Vec::new(),
            }),
            config,
            transport,
        }
    }

    /// This receiver's id, the `sender` of its REQUESTs.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The configuration.
    pub fn config(&self) -> &ReceiverConfig {
        &self.config
    }

    fn outgoing(&self) -> Outgoing<'_> {
        Outgoing {
            key: &self.key,
            transport: self.transport.as_ref(),
            id: self.id,
        }
    }

    /// Asks the transport for a tick if `deadline` comes before the one it has.
    fn wake_for(&self, state: &mut State, deadline: Instant) {
        if state.armed.is_none_or(|armed| deadline < armed) {
            state.armed = Some(deadline);
            self.transport.wake();
        }
    }

    /// Starts receiving `join.family`: its pages go to `sink`, and each page held is also
    /// announced to `hook`. Sends a JOIN report to the family's server. The transport must
    /// already receive the family's group.
    pub fn join(
        &self,
        join: FamilyJoin,
        sink: Arc<dyn PageSink>,
        hook: Option<Arc<dyn HeldPages>>,
    ) -> Result<(), JoinError> {
        let now = Instant::now();
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        if state.families.contains_key(&join.family) {
            return Err(JoinError::AlreadyJoined {
                family: join.family,
            });
        }
        let next_report = now + self.config.report_interval;
        write(&self.fragment_keys).insert(
            join.family,
            (
                join.generation,
                self.key.fragment_key(join.family, join.generation),
            ),
        );
        let family = state.families.entry(join.family).or_insert(Family {
            join,
            sink,
            hook,
            held: Bitmap::new(join.pages),
            outstanding: HashMap::new(),
            retry_order: BTreeSet::new(),
            waiting: VecDeque::new(),
            queued: Bitmap::new(join.pages),
            goodput: None,
            completed_in_interval: 0,
            busy_since_report: false,
            last_report: now,
            rtt: RttEstimate::default(),
            rate: AimdRate::new(
                self.config.initial_rate,
                self.config.min_rate,
                self.config.max_rate,
            ),
            next_report,
            failed: false,
            stats: ReceiverStats::default(),
        });
        self.outgoing().send(
            &mut state.scratch,
            family,
            &mut state.stats,
            REQUEST_JOIN,
            &[],
        );
        tracing::debug!(
            family = format_args!("{:#x}", join.family),
            generation = join.generation,
            group = %join.group,
            server = %join.server,
            "joined mcdist family"
        );
        self.wake_for(state, next_report);
        Ok(())
    }

    /// Stops receiving `family`: sends LEAVE and forgets its state (partial pages, requests).
    /// Returns whether it was joined. A delivery already under way may still reach its sink.
    pub fn leave(&self, family: u64) -> bool {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let Some(mut left) = state.families.remove(&family) else {
            return false;
        };
        write(&self.fragment_keys).remove(&family);
        state.reassembly.forget_family(family);
        self.outgoing().send(
            &mut state.scratch,
            &mut left,
            &mut state.stats,
            REQUEST_LEAVE,
            &[],
        );
        tracing::debug!(family = format_args!("{family:#x}"), "left mcdist family");
        true
    }

    /// Leaves every family (see [`ReceiverCore::leave`]).
    pub fn leave_all(&self) {
        let families: Vec<u64> = lock(&self.state).families.keys().copied().collect();
        for family in families {
            self.leave(family);
        }
    }

    /// The families joined now.
    pub fn families(&self) -> Vec<FamilyJoin> {
        lock(&self.state)
            .families
            .values()
            .map(|f| f.join)
            .collect()
    }

    /// Requests `pages` of `family` now (from any thread). Pages already held (delivered) or
    /// already requested and not yet received are skipped; the rest get a timeout and are
    /// re-requested until they arrive. Does nothing for a family not joined or failed.
    pub fn request(&self, family: u64, pages: &[u64]) {
        let now = Instant::now();
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let Some(fam) = state.families.get_mut(&family) else {
            tracing::debug!(
                family = format_args!("{family:#x}"),
                "request for a family not joined"
            );
            return;
        };
        if fam.failed {
            return;
        }
        let mut fresh = Vec::with_capacity(pages.len());
        for &page in pages {
            if page >= fam.join.pages
                || fam.held.get(page)
                || fam.queued.get(page)
                || fam.outstanding.contains_key(&page)
            {
                continue;
            }
            fam.queued.set(page);
            fresh.push(page);
        }
        if fresh.is_empty() {
            return;
        }
        let requested = fresh.len() as u64;
        count(&mut state.stats, &mut fam.stats, |s| {
            s.pages_requested += requested;
        });
        fam.waiting.extend(fresh);
        let outgoing = self.outgoing();
        if let Some(earliest) =
            self.admit(&outgoing, &mut state.scratch, &mut state.stats, fam, now)
        {
            self.wake_for(state, earliest);
        }
    }

    /// Sends waiting pages of `family` while fewer than `max_in_flight` are awaited; returns
    /// the earliest retry time it set.
    fn admit(
        &self,
        outgoing: &Outgoing<'_>,
        scratch: &mut Vec<u8>,
        global: &mut ReceiverStats,
        fam: &mut Family,
        now: Instant,
    ) -> Option<Instant> {
        let room = self
            .config
            .max_in_flight
            .max(1)
            .saturating_sub(fam.outstanding.len());
        if room == 0 || fam.waiting.is_empty() {
            return None;
        }
        let rto = fam.rtt.rto(self.config.rto_min, self.config.rto_max);
        let pace = fam.pace();
        let mut wanted = Vec::with_capacity(room.min(fam.waiting.len()));
        let mut earliest = None;
        while wanted.len() < room {
            let Some(page) = fam.waiting.pop_front() else {
                break;
            };
            fam.queued.clear(page);
            if fam.held.get(page) {
                continue;
            }
            let queued_for = queueing(fam.outstanding.len() + 1, pace);
            let retry_at = now + rto + queued_for;
            earliest.get_or_insert(retry_at);
            fam.outstanding.insert(
                page,
                Outstanding {
                    first_sent: now,
                    queued_for,
                    retry_at,
                    retries: 0,
                },
            );
            fam.retry_order.insert((retry_at, page));
            wanted.push(page);
        }
        if !wanted.is_empty() {
            outgoing.send(scratch, fam, global, 0, &wanted);
        }
        earliest
    }

    /// Processes received UDP payloads (each one mcdist datagram) and delivers the pages they
    /// complete. May be called from several threads at once.
    pub fn on_datagrams<'a>(&self, datagrams: impl IntoIterator<Item = &'a mut [u8]>) {
        // Opening (tag check and decryption) is the expensive part: done before taking the
        // state lock.
        let decoded: Vec<Result<Datagram<'a>, DecodeError>> = {
            let keys = read(&self.fragment_keys);
            datagrams
                .into_iter()
                .map(|bytes| {
                    wire::decode(&self.key, bytes, |family, generation| {
                        keys.get(&family)
                            .filter(|(joined, _)| *joined == generation)
                            .map(|(_, key)| key)
                    })
                })
                .collect()
        };
        if decoded.is_empty() {
            return;
        }
        // Pages all of whose fragments are in this batch complete from the receive buffers,
        // without a reassembly copy.
        let mut whole = whole_pages(&decoded);
        let mut taken: HashSet<(u64, u64)> = HashSet::new();
        let now = Instant::now();
        let mut ready: Vec<Ready> = Vec::new();
        let mut failures: Vec<(Arc<dyn PageSink>, String)> = Vec::new();
        let mut sinks: HashMap<u64, Destination> = HashMap::new();
        // Families whose completed requests made room for waiting pages.
        let mut refill: Vec<u64> = Vec::new();
        {
            let mut guard = lock(&self.state);
            let state = &mut *guard;
            for datagram in decoded {
                state.stats.datagrams += 1;
                match datagram {
                    Err(DecodeError::BadTag) => state.stats.mac_failed += 1,
                    Err(DecodeError::NoKey { family, .. }) => match state.families.get_mut(&family)
                    {
                        Some(family) => {
                            family.stats.datagrams += 1;
                            count(&mut state.stats, &mut family.stats, |s| s.not_ours += 1);
                        }
                        None => state.stats.not_ours += 1,
                    },
                    Err(error) => {
                        state.stats.malformed += 1;
                        tracing::trace!(%error, "dropped a malformed mcdist datagram");
                    }
                    Ok(Datagram::Fragment(header, fragment)) => {
                        let Some(family) = state.families.get_mut(&header.family) else {
                            state.stats.not_ours += 1;
                            continue;
                        };
                        family.stats.datagrams += 1;
                        if header.generation != family.join.generation || family.failed {
                            count(&mut state.stats, &mut family.stats, |s| s.not_ours += 1);
                            continue;
                        }
                        if fragment.page >= family.join.pages {
                            count(&mut state.stats, &mut family.stats, |s| s.malformed += 1);
                            continue;
                        }
                        count(&mut state.stats, &mut family.stats, |s| {
                            s.fragments += 1;
                            if header.flags & FRAGMENT_PUSH != 0 {
                                s.pushed_fragments += 1;
                            }
                            if header.flags & FRAGMENT_UNICAST != 0 {
                                s.unicast_fragments += 1;
                            }
                        });
                        let key = (header.family, fragment.page);
                        // The rest of a page completed from this batch's buffers.
                        if taken.contains(&key) {
                            continue;
                        }
                        if family.held.get(fragment.page) {
                            count(&mut state.stats, &mut family.stats, |s| {
                                s.duplicate_fragments += 1;
                            });
                            continue;
                        }
                        let whole = whole
                            .remove(&key)
                            .filter(|_| !state.reassembly.is_partial(key.0, key.1));
                        let (outcome, evicted) = match whole {
                            Some(parts) => {
                                taken.insert(key);
                                (Outcome::Complete(PageData::Parts(parts)), 0)
                            }
                            None => {
                                let (outcome, evicted) =
                                    state.reassembly.insert(header.family, &fragment, now);
                                (outcome.map(PageData::Buffer), evicted)
                            }
                        };
                        state.stats.partials_dropped += evicted;
                        match outcome {
                            Outcome::Partial => {}
                            Outcome::Duplicate => count(&mut state.stats, &mut family.stats, |s| {
                                s.duplicate_fragments += 1;
                            }),
                            Outcome::Inconsistent => {
                                count(&mut state.stats, &mut family.stats, |s| s.malformed += 1);
                            }
                            Outcome::Complete(data) => {
                                family.held.set(fragment.page);
                                let early = match family.outstanding.remove(&fragment.page) {
                                    Some(request) => {
                                        family
                                            .retry_order
                                            .remove(&(request.retry_at, fragment.page));
                                        // Karn: only pages never re-requested give a clean
                                        // sample.
                                        if request.retries == 0 {
                                            family.rtt.sample(
                                                now.saturating_duration_since(request.first_sent)
                                                    .saturating_sub(request.queued_for),
                                            );
                                        }
                                        false
                                    }
                                    None => true,
                                };
                                if !early {
                                    family.rate.on_completed();
                                    family.completed_in_interval =
                                        family.completed_in_interval.saturating_add(1);
                                    if !family.waiting.is_empty()
                                        && !refill.contains(&header.family)
                                    {
                                        refill.push(header.family);
                                    }
                                }
                                count(&mut state.stats, &mut family.stats, |s| {
                                    s.pages_completed += 1;
                                    if early {
                                        s.early_pages += 1;
                                    }
                                });
                                sinks.entry(header.family).or_insert_with(|| {
                                    (Arc::clone(&family.sink), family.hook.clone())
                                });
                                ready.push(Ready {
                                    family: header.family,
                                    page: fragment.page,
                                    data,
                                });
                            }
                        }
                    }
                    Ok(Datagram::Reject(header, reject)) => {
                        let Some(family) = state.families.get_mut(&header.family) else {
                            state.stats.not_ours += 1;
                            continue;
                        };
                        family.stats.datagrams += 1;
                        if header.generation != family.join.generation {
                            count(&mut state.stats, &mut family.stats, |s| s.not_ours += 1);
                            continue;
                        }
                        count(&mut state.stats, &mut family.stats, |s| s.rejects += 1);
                        if family.failed {
                            continue;
                        }
                        family.failed = true;
                        family.outstanding.clear();
                        family.retry_order.clear();
                        family.waiting.clear();
                        family.queued = Bitmap::new(family.join.pages);
                        let reason = format!(
                            "mcdist server {} rejected page {:#x} of family {:#x} \
                             (generation {:#x}): {}",
                            family.join.server,
                            reject.page,
                            header.family,
                            header.generation,
                            reject.code
                        );
                        tracing::warn!(%reason, "mcdist family failed");
                        failures.push((Arc::clone(&family.sink), reason));
                    }
                    Ok(Datagram::Request(..)) => state.stats.malformed += 1,
                }
            }
            let outgoing = self.outgoing();
            let mut earliest: Option<Instant> = None;
            for id in refill {
                let Some(family) = state.families.get_mut(&id) else {
                    continue;
                };
                if family.failed {
                    continue;
                }
                if let Some(at) =
                    self.admit(&outgoing, &mut state.scratch, &mut state.stats, family, now)
                {
                    earliest = Some(earliest.map_or(at, |e| e.min(at)));
                }
            }
            if let Some(earliest) = earliest {
                self.wake_for(state, earliest);
            }
        }
        self.deliver(&ready, &sinks);
        for (sink, reason) in failures {
            sink.failed(reason);
        }
        if !ready.is_empty() {
            let mut state = lock(&self.state);
            for page in ready {
                if let PageData::Buffer(buf) = page.data {
                    state.reassembly.recycle(buf);
                }
            }
        }
    }

    /// Hands completed pages to their sinks, one batch per family, then to the hooks.
    fn deliver(&self, ready: &[Ready<'_>], sinks: &HashMap<u64, Destination>) {
        for (&family, (sink, hook)) in sinks {
            let parts: Vec<(u64, Vec<&[u8]>)> = ready
                .iter()
                .filter(|r| r.family == family)
                .map(|r| match &r.data {
                    PageData::Buffer(buf) => (r.page, vec![&buf[..]]),
                    PageData::Parts(parts) => (r.page, parts.clone()),
                })
                .collect();
            let batch: Vec<(u64, &[&[u8]])> = parts.iter().map(|(p, v)| (*p, &v[..])).collect();
            sink.deliver_parts(&batch);
            if let Some(hook) = hook {
                for (page, _) in &batch {
                    hook.held(family, *page);
                }
            }
        }
    }

    /// Runs the timers: re-requests pages whose timeout expired (halving the rate), sends
    /// rate reports, drops timed-out partial pages. Returns when it wants to run next.
    pub fn tick(&self) -> Instant {
        let now = Instant::now();
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        state.stats.partials_dropped += state.reassembly.expire(now);
        let mut next = now + IDLE_TICK;
        let outgoing = self.outgoing();
        for family in state.families.values_mut() {
            // A failed family waits to be left: it neither requests nor reports.
            if family.failed {
                continue;
            }
            self.retry_due(&outgoing, &mut state.scratch, &mut state.stats, family, now);
            self.admit(&outgoing, &mut state.scratch, &mut state.stats, family, now);
            if now >= family.next_report {
                family.sample_goodput(now);
                if family.rate.on_interval() {
                    count(&mut state.stats, &mut family.stats, |s| s.rate_cuts += 1);
                }
                outgoing.send(&mut state.scratch, family, &mut state.stats, 0, &[]);
                family.next_report = now + self.config.report_interval;
            }
            next = next.min(family.next_report);
            if let Some(&(retry_at, _)) = family.retry_order.first() {
                next = next.min(retry_at);
            }
        }
        if let Some(expiry) = state.reassembly.next_expiry() {
            next = next.min(expiry);
        }
        state.armed = Some(next);
        next
    }

    /// Re-requests the pages of `family` whose timeout expired by `now`.
    fn retry_due(
        &self,
        outgoing: &Outgoing<'_>,
        scratch: &mut Vec<u8>,
        global: &mut ReceiverStats,
        family: &mut Family,
        now: Instant,
    ) {
        let mut due = Vec::new();
        while let Some(&(retry_at, page)) = family.retry_order.first() {
            if retry_at > now {
                break;
            }
            family.retry_order.pop_first();
            due.push(page);
        }
        if due.is_empty() {
            return;
        }
        let rto = family.rtt.rto(self.config.rto_min, self.config.rto_max);
        family
            .rate
            .on_loss(u32::try_from(due.len()).unwrap_or(u32::MAX));
        let mut multicast = Vec::new();
        let mut unicast = Vec::new();
        let rate = family.pace();
        // The pages still awaited in time are served before these.
        let mut ahead = family.outstanding.len().saturating_sub(due.len());
        for page in due {
            let Some(request) = family.outstanding.get_mut(&page) else {
                continue;
            };
            request.retries += 1;
            ahead += 1;
            // Linear, not exponential: losses here are mostly random, and a page someone
            // faults on should not wait out a long backoff; overload is what the rate is for.
            let backoff = rto
                .saturating_mul(1 + request.retries.min(64))
                .min(self.config.rto_max.max(rto));
            request.retry_at = now + backoff + queueing(ahead, rate);
            family.retry_order.insert((request.retry_at, page));
            if request.retries >= self.config.unicast_after {
                unicast.push(page);
            } else {
                multicast.push(page);
            }
        }
        let retried = (multicast.len() + unicast.len()) as u64;
        count(global, &mut family.stats, |s| s.re_requests += retried);
        if !multicast.is_empty() {
            outgoing.send(scratch, family, global, REQUEST_RETRY, &multicast);
        }
        if !unicast.is_empty() {
            outgoing.send(
                scratch,
                family,
                global,
                REQUEST_RETRY | REQUEST_UNICAST_REPLY,
                &unicast,
            );
        }
    }

    /// Counters of all families, plus what could not be attributed to one.
    pub fn stats(&self) -> ReceiverStats {
        let state = lock(&self.state);
        let mut stats = state.stats;
        stats.rate = state
            .families
            .values()
            .map(|f| f.rate.rate())
            .min()
            .unwrap_or(0);
        stats.outstanding = state
            .families
            .values()
            .map(|f| (f.outstanding.len() + f.waiting.len()) as u64)
            .sum();
        stats.queued = state
            .families
            .values()
            .map(|f| f.waiting.len() as u64)
            .sum();
        stats.partial_pages = state.reassembly.partial_pages() as u64;
        stats
    }

    /// Counters of one joined family.
    pub fn family_stats(&self, family: u64) -> Option<ReceiverStats> {
        let state = lock(&self.state);
        state.families.get(&family).map(|f| ReceiverStats {
            rate: f.rate.rate(),
            outstanding: (f.outstanding.len() + f.waiting.len()) as u64,
            queued: f.waiting.len() as u64,
            ..f.stats
        })
    }

    /// Whether `page` of `family` is held (was delivered).
    pub fn holds(&self, family: u64, page: u64) -> bool {
        lock(&self.state)
            .families
            .get(&family)
            .is_some_and(|f| f.held.get(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcast::wire::{Fragment, FragmentSealer, Fragmentation, Reject, RejectCode};
    use crate::wire::PAGE_SIZE;
    use std::sync::Mutex;

    /// Records the requests a core sends (the transport is the unit under test's boundary;
    /// the real sockets are exercised in tests/mcast.rs).
    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<Vec<u8>>>,
        wakes: Mutex<u32>,
    }

    impl RequestTransport for Recorder {
        fn send(&self, _server: SocketAddrV4, datagram: &[u8]) -> io::Result<()> {
            self.sent.lock().unwrap().push(datagram.to_vec());
            Ok(())
        }
        fn wake(&self) {
            *self.wakes.lock().unwrap() += 1;
        }
    }

    #[derive(Default)]
    struct Collect {
        pages: Mutex<Vec<(u64, Vec<u8>)>>,
        /// How many parts each delivered page came in.
        parts: Mutex<Vec<usize>>,
        failures: Mutex<Vec<String>>,
        held: Mutex<Vec<(u64, u64)>>,
    }

    impl PageSink for Collect {
        fn deliver_batch(&self, pages: &[(u64, &[u8])]) {
            let mut all = self.pages.lock().unwrap();
            all.extend(pages.iter().map(|(p, d)| (*p, d.to_vec())));
        }
        fn deliver_parts(&self, pages: &[(u64, &[&[u8]])]) {
            let mut all = self.pages.lock().unwrap();
            all.extend(pages.iter().map(|(p, parts)| (*p, parts.concat())));
            let mut counts = self.parts.lock().unwrap();
            counts.extend(pages.iter().map(|(_, parts)| parts.len()));
        }
        fn failed(&self, reason: String) {
            self.failures.lock().unwrap().push(reason);
        }
    }

    impl HeldPages for Collect {
        fn held(&self, family: u64, page: u64) {
            self.held.lock().unwrap().push((family, page));
        }
    }

    const FAMILY: u64 = 0xf00d;
    const GENERATION: u32 = 77;

    fn key() -> ClusterKey {
        ClusterKey::from_bytes([3; 32])
    }

    fn config() -> ReceiverConfig {
        ReceiverConfig {
            rto_min: Duration::from_millis(1),
            rto_max: Duration::from_millis(4),
            unicast_after: 2,
            report_interval: Duration::from_secs(3600),
            ..ReceiverConfig::default()
        }
    }

    fn join() -> FamilyJoin {
        FamilyJoin {
            family: FAMILY,
            generation: GENERATION,
            group: Ipv4Addr::new(239, 255, 0, 1),
            server: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), DEFAULT_PORT),
            pages: 16,
        }
    }

    fn setup() -> (ReceiverCore, Arc<Recorder>, Arc<Collect>) {
        let recorder = Arc::new(Recorder::default());
        let core = ReceiverCore::new(config(), &key(), recorder.clone());
        let sink = Arc::new(Collect::default());
        core.join(join(), sink.clone(), Some(sink.clone())).unwrap();
        (core, recorder, sink)
    }

    /// Hands copies of `datagrams` to `core` as one batch (opening decrypts in place).
    fn feed<'d>(core: &ReceiverCore, datagrams: impl IntoIterator<Item = &'d [u8]>) {
        let mut copies: Vec<Vec<u8>> = datagrams.into_iter().map(<[u8]>::to_vec).collect();
        core.on_datagrams(copies.iter_mut().map(Vec::as_mut_slice));
    }

    fn fragments(family: u64, generation: u32, page: u64, fill: u8) -> Vec<Vec<u8>> {
        let sealer = FragmentSealer::new(McastKey::new(&key()).fragment_key(family, generation));
        let data = [fill; PAGE_SIZE];
        let cut = Fragmentation::for_mtu(1500);
        cut.pieces()
            .map(|(index, offset, len)| {
                let mut out = Vec::new();
                let fragment = Fragment {
                    page,
                    index,
                    count: cut.count,
                    offset,
                    data: &data[usize::from(offset)..usize::from(offset + len)],
                };
                let header = Header {
                    flags: 0,
                    family,
                    generation,
                    sender: 0,
                };
                wire::encode_fragment(&sealer, &mut out, &header, &fragment).unwrap();
                out
            })
            .collect()
    }

    fn decode_request(bytes: &[u8]) -> (u16, Vec<u64>) {
        let mut bytes = bytes.to_vec();
        match wire::decode(&McastKey::new(&key()), &mut bytes, |_, _| None).unwrap() {
            Datagram::Request(h, r) => (h.flags, r.pages().collect()),
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn pages_are_delivered_once_and_announced_as_held() {
        let (core, recorder, sink) = setup();
        assert_eq!(
            decode_request(&recorder.sent.lock().unwrap()[0]).0,
            REQUEST_JOIN
        );
        core.request(FAMILY, &[3, 4, 3]);
        let sent = recorder.sent.lock().unwrap().clone();
        assert_eq!(decode_request(&sent[1]), (0, vec![3, 4]));
        let page3 = fragments(FAMILY, GENERATION, 3, 0x33);
        let page5 = fragments(FAMILY, GENERATION, 5, 0x55);
        // Interleaved and repeated.
        let order = [
            &page3[2], &page5[0], &page3[0], &page3[2], &page5[1], &page3[1],
        ];
        feed(&core, order.iter().map(|d| d.as_slice()));
        feed(&core, page5[2..].iter().map(|d| d.as_slice()));
        feed(&core, page3.iter().map(|d| d.as_slice()));
        let pages = sink.pages.lock().unwrap().clone();
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[0], (3, vec![0x33; PAGE_SIZE]));
        assert_eq!(pages[1], (5, vec![0x55; PAGE_SIZE]));
        assert_eq!(*sink.held.lock().unwrap(), vec![(FAMILY, 3), (FAMILY, 5)]);
        let stats = core.family_stats(FAMILY).unwrap();
        assert_eq!(stats.pages_completed, 2);
        assert_eq!(stats.early_pages, 1, "page 5 was never requested");
        assert_eq!(stats.duplicate_fragments, 4);
        assert_eq!(stats.outstanding, 1, "page 4 is still awaited");
        assert!(core.holds(FAMILY, 5));
        // A held page is not requested again.
        core.request(FAMILY, &[3]);
        assert_eq!(recorder.sent.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_page_whose_fragments_share_a_batch_is_delivered_from_them() {
        let (core, _, sink) = setup();
        let mut page7 = fragments(FAMILY, GENERATION, 7, 0x77);
        page7.reverse();
        let page8 = fragments(FAMILY, GENERATION, 8, 0x88);
        // Page 7 whole and out of order, page 8 split over two batches.
        let first: Vec<&[u8]> = page7
            .iter()
            .chain(&page8[..1])
            .map(|d| d.as_slice())
            .collect();
        feed(&core, first);
        feed(&core, page8[1..].iter().map(|d| d.as_slice()));
        let pages = sink.pages.lock().unwrap().clone();
        assert_eq!(
            pages,
            vec![(7, vec![0x77; PAGE_SIZE]), (8, vec![0x88; PAGE_SIZE])]
        );
        assert_eq!(
            *sink.parts.lock().unwrap(),
            vec![3, 1],
            "7 from the buffers, 8 reassembled"
        );
        // A whole page again, and a page whose fragments contradict each other.
        feed(&core, page7.iter().map(|d| d.as_slice()));
        let mut forged_count = fragments(FAMILY, GENERATION, 9, 0x99);
        forged_count.push(forged_count[0].clone());
        feed(&core, forged_count.iter().map(|d| d.as_slice()));
        let stats = core.family_stats(FAMILY).unwrap();
        assert_eq!(stats.duplicate_fragments, 3 + 1, "{stats:?}");
        assert_eq!(stats.pages_completed, 3, "{stats:?}");
        assert_eq!(sink.pages.lock().unwrap()[2], (9, vec![0x99; PAGE_SIZE]));
    }

    #[test]
    fn requests_beyond_the_window_wait_and_go_out_as_pages_arrive() {
        let recorder = Arc::new(Recorder::default());
        let windowed = ReceiverConfig {
            max_in_flight: 3,
            ..config()
        };
        let core = ReceiverCore::new(windowed, &key(), recorder.clone());
        let sink = Arc::new(Collect::default());
        core.join(join(), sink.clone(), None).unwrap();
        core.request(FAMILY, &[1, 2, 3, 4, 5, 6, 16]);
        let requested = |from: usize| -> Vec<Vec<u64>> {
            recorder.sent.lock().unwrap()[from..]
                .iter()
                .map(|d| decode_request(d).1)
                .collect()
        };
        assert_eq!(requested(1), vec![vec![1, 2, 3]], "page 16 is out of range");
        let stats = core.family_stats(FAMILY).unwrap();
        assert_eq!((stats.outstanding, stats.queued), (6, 3));
        // Page 5 arrives early (a sibling asked): it is not requested when its turn comes.
        for page in [5, 1] {
            feed(
                &core,
                fragments(FAMILY, GENERATION, page, 1)
                    .iter()
                    .map(|d| d.as_slice()),
            );
        }
        assert_eq!(requested(2), vec![vec![4]], "one arrival, one more request");
        feed(
            &core,
            fragments(FAMILY, GENERATION, 2, 2)
                .iter()
                .map(|d| d.as_slice()),
        );
        assert_eq!(
            requested(3),
            vec![vec![6]],
            "page 5 is held, so page 6 goes"
        );
        let stats = core.family_stats(FAMILY).unwrap();
        assert_eq!((stats.outstanding, stats.queued), (3, 0));
        core.request(FAMILY, &[4, 5, 6]);
        assert_eq!(recorder.sent.lock().unwrap().len(), 4, "awaited or held");
    }

    #[test]
    fn forged_and_foreign_datagrams_are_counted_and_dropped() {
        let (core, _, sink) = setup();
        let mut forged = fragments(FAMILY, GENERATION, 1, 9);
        let last = forged[0].len() - 1;
        forged[0][last] ^= 1;
        let other_key = {
            let sealer = FragmentSealer::new(
                McastKey::new(&ClusterKey::from_bytes([4; 32])).fragment_key(FAMILY, GENERATION),
            );
            let mut out = Vec::new();
            let header = Header {
                flags: 0,
                family: FAMILY,
                generation: GENERATION,
                sender: 0,
            };
            let data = [1u8; PAGE_SIZE];
            let fragment = Fragment {
                page: 1,
                index: 0,
                count: 1,
                offset: 0,
                data: &data,
            };
            wire::encode_fragment(&sealer, &mut out, &header, &fragment).unwrap();
            out
        };
        let stale = fragments(FAMILY, GENERATION + 1, 1, 9);
        let foreign = fragments(FAMILY + 1, GENERATION, 1, 9);
        let beyond = fragments(FAMILY, GENERATION, 16, 9);
        let all: Vec<&[u8]> = [&forged[0], &other_key, &stale[0], &foreign[0], &beyond[0]]
            .into_iter()
            .map(|d| d.as_slice())
            .chain([&b"junk"[..]])
            .collect();
        feed(&core, all);
        let stats = core.stats();
        assert_eq!(stats.datagrams, 6);
        assert_eq!(stats.mac_failed, 2);
        assert_eq!(stats.not_ours, 2);
        assert_eq!(stats.malformed, 2);
        assert_eq!(stats.fragments, 0);
        assert!(sink.pages.lock().unwrap().is_empty());
    }

    #[test]
    fn expired_requests_are_retried_then_asked_unicast_and_the_rate_drops() {
        let recorder = Arc::new(Recorder::default());
        let reporting = ReceiverConfig {
            report_interval: Duration::from_millis(20),
            ..config()
        };
        let core = ReceiverCore::new(reporting, &key(), recorder.clone());
        let sink = Arc::new(Collect::default());
        core.join(join(), sink.clone(), Some(sink)).unwrap();
        let initial = core.stats().rate;
        core.request(FAMILY, &[1, 2]);
        let mut flags_seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while flags_seen.len() < 2 && Instant::now() < deadline {
            let next = core.tick();
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let sent = recorder.sent.lock().unwrap().clone();
            for datagram in &sent[2..] {
                let (flags, pages) = decode_request(datagram);
                if pages.is_empty() {
                    // A rate report.
                    continue;
                }
                assert_eq!(pages, vec![1, 2]);
                if !flags_seen.contains(&flags) {
                    flags_seen.push(flags);
                }
            }
        }
        assert_eq!(
            flags_seen,
            vec![REQUEST_RETRY, REQUEST_RETRY | REQUEST_UNICAST_REPLY]
        );
        // The cut comes with the next report interval.
        while core.stats().rate_cuts == 0 && Instant::now() < deadline {
            let next = core.tick();
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let stats = core.stats();
        assert!(stats.re_requests >= 4);
        assert!(stats.unicast_requests >= 1);
        assert!(stats.rate_cuts >= 1);
        assert!(stats.rate < initial);
    }

    #[test]
    fn a_reject_fails_the_family_once() {
        let (core, recorder, sink) = setup();
        core.request(FAMILY, &[2]);
        let mkey = McastKey::new(&key());
        let mut out = Vec::new();
        let header = Header {
            flags: 0,
            family: FAMILY,
            generation: GENERATION,
            sender: 0,
        };
        let reject = Reject {
            page: 2,
            code: RejectCode::OutOfRange,
        };
        wire::encode_reject(&mkey, &mut out, &header, &reject);
        feed(&core, [out.as_slice(), out.as_slice()]);
        let failures = sink.failures.lock().unwrap().clone();
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("page out of range"), "{}", failures[0]);
        assert_eq!(core.stats().rejects, 2);
        assert_eq!(core.stats().outstanding, 0);
        let before = recorder.sent.lock().unwrap().len();
        core.request(FAMILY, &[3]);
        assert_eq!(recorder.sent.lock().unwrap().len(), before);
        assert!(core.leave(FAMILY));
        let sent = recorder.sent.lock().unwrap().clone();
        assert_eq!(decode_request(sent.last().unwrap()).0, REQUEST_LEAVE);
        assert!(core.family_stats(FAMILY).is_none());
    }
}
