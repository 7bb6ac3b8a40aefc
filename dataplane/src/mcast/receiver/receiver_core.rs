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
//! - Checks every datagram ([`wire::decode`](crate::mcast::wire::decode): shape, tag, fields) and drops, with a counter,
//!   anything forged, corrupted, of a family it has not joined or of another generation.
//! - Reassembles pages from fragments (a bounded number of partial pages, each with a
//!   timeout) and delivers each complete page once: pages already held are dropped. Pages
//!   nobody on this host asked for (early pages) are delivered too.
//! - Keeps the pages it requested and has not received in a table with a retransmission
//!   timeout adapted to the measured request-to-page time (like TCP's: smoothed RTT plus four
//!   deviations, within `rto_min..=rto_max`, growing linearly per retry), plus the time the server
//!   needs for the requested pages ahead of it, at the lower of the reported rate and the rate
//!   pages were measured to arrive at while requests were in flight. An expired page is
//!   requested again only if it is lost: a page requested after it arrived (its timer is
//!   then brought forward to `reorder_window` after that arrival), nothing requested of the
//!   family arrived for a timeout, or it waited past a deadline of a few timeouts; otherwise
//!   it is looked at again a timeout later. Lost pages are requested again with the `RETRY`
//!   flag; after `unicast_after` retries also with `UNICAST_REPLY`.
//! - Estimates the rate it can take (AIMD: grows while nothing is lost, halves when a page has
//!   to be re-requested) and reports it in every REQUEST and in a report every
//!   `report_interval` (which also keeps it in the server's set of active receivers).
//! - Turns a REJECT into one [`PageSink::failed`] call for the family; the family then stops
//!   requesting and reporting.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use foldhash::{HashMap, HashMapExt};

use super::config::ReceiverConfig;
use super::datagrams::{self, Batch};
use super::family::{Family, FamilyJoin, HeldPages, JoinError};
use super::outgoing::{Outgoing, RequestTransport};
use super::retry::{admit, run_timers};
use super::state::State;
use super::stats::{ReceiverStats, count};
use crate::client::PageSink;
use crate::keyring::KeyRing;
use crate::mcast::wire::{FragmentKey, McastKey, REQUEST_HOLDING, REQUEST_JOIN, REQUEST_LEAVE};
use crate::sync::{lock, read, write};

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

impl ReceiverCore {
    /// A core with no families, sending through `transport`.
    pub fn new(
        config: ReceiverConfig,
        key: impl Into<KeyRing>,
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
            state: Mutex::new(State::new(&config)),
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
        let fragment_key = self
            .key
            .fragment_key_under(join.key, join.family, join.generation)
            .ok_or(JoinError::UnknownKey {
                family: join.family,
                key: join.key,
            })?;
        write(&self.fragment_keys).insert(join.family, (join.generation, fragment_key));
        let long_run_loss = state.long_run_loss;
        let family = state.families.entry(join.family).or_insert_with(|| {
            Family::new(join, sink, hook, &self.config, now).with_long_run_loss(long_run_loss)
        });
        let next_report = family.next_report;
        let holding = if join.holding { REQUEST_HOLDING } else { 0 };
        self.outgoing().send(
            &mut state.scratch,
            family,
            &mut state.stats,
            REQUEST_JOIN | holding,
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
        state.repairs.leave(family);
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
        let requested = fam.enqueue(pages) as u64;
        if requested == 0 {
            return;
        }
        count(&mut state.stats, &mut fam.stats, |s| {
            s.pages_requested += requested;
        });
        let outgoing = self.outgoing();
        if let Some(earliest) = admit(
            &self.config,
            &outgoing,
            &mut state.scratch,
            &mut state.stats,
            fam,
            now,
        ) {
            self.wake_for(state, earliest);
        }
    }

    /// Processes received UDP payloads (each one mcdist datagram) and delivers the pages they
    /// complete. May be called from several threads at once.
    pub fn on_datagrams<'a>(&self, datagrams: impl IntoIterator<Item = &'a mut [u8]>) {
        // Opening (tag check and decryption) is the expensive part: done before taking the
        // state lock.
        let decoded = datagrams::open(&self.key, &read(&self.fragment_keys), datagrams);
        if decoded.is_empty() {
            return;
        }
        let mut batch = Batch::new(&decoded, Instant::now(), &self.config, self.id);
        {
            let mut guard = lock(&self.state);
            let state = &mut *guard;
            for datagram in decoded {
                batch.handle(state, datagram);
            }
            if let Some(earliest) = batch.refill(state, &self.config, &self.outgoing()) {
                self.wake_for(state, earliest);
            }
        }
        batch.deliver();
        if batch.completed_any() {
            batch.recycle(&mut lock(&self.state).reassembly);
        }
    }

    /// Runs the timers: re-requests pages whose timeout expired (halving the rate), sends
    /// rate reports, drops timed-out partial pages. Returns when it wants to run next.
    pub fn tick(&self) -> Instant {
        let now = Instant::now();
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let next = run_timers(state, &self.config, &self.outgoing(), now);
        state.armed = Some(next);
        next
    }

    /// Counters of all families, plus what could not be attributed to one.
    pub fn stats(&self) -> ReceiverStats {
        lock(&self.state).stats()
    }

    /// Counters of one joined family.
    pub fn family_stats(&self, family: u64) -> Option<ReceiverStats> {
        lock(&self.state).families.get(&family).map(Family::stats)
    }

    /// Whether `page` of `family` is held (was delivered).
    pub fn holds(&self, family: u64, page: u64) -> bool {
        lock(&self.state)
            .families
            .get(&family)
            .is_some_and(|f| f.held.get(page))
    }
}
