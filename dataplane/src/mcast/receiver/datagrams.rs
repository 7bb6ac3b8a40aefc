//! What the core does with a batch of received datagrams, one function per kind: a FRAGMENT
//! is counted, dropped when its page is held, and completes its page from the batch's
//! buffers or through reassembly; a REJECT fails its family once; what does not decode is
//! counted by why; a REQUEST is not meant for a receiver.
//!
//! Decisions are taken under the state lock and gathered in a [`Batch`]; the pages are
//! delivered and the failures reported after it is released.

use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use super::config::ReceiverConfig;
use super::family::{Family, HeldPages};
use super::outgoing::Outgoing;
use super::repair_blocks::RepairBlocks;
use super::retry::admit;
use super::state::State;
use super::stats::{ReceiverStats, count};
use crate::client::PageSink;
use crate::mcast::bitmap::Bitmap;
use crate::mcast::reassembly::{Outcome, PageBuf, Reassembly};
use crate::mcast::repair::Shape;
use crate::mcast::wire::{
    self, Datagram, DecodeError, FRAGMENT_PUSH, FRAGMENT_UNICAST, Fragment, FragmentKey, Header,
    McastKey, Reject, Repair,
};
use crate::wire::PAGE_SIZE;

/// Where a family's completed pages go: its sink and its held-pages hook.
type Destination = (Arc<dyn PageSink>, Option<Arc<dyn HeldPages>>);

/// A completed page's bytes: reassembled, or the payloads of its fragments in the receive
/// buffers, in page order.
enum PageData<'a> {
    Buffer(PageBuf),
    Parts(Vec<&'a [u8]>),
}

/// Whose REQUEST a page's FRAGMENTs say queued it at the server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QueuedBy {
    /// Nobody's: pushed.
    Push,
    /// This receiver's.
    Us,
    /// Another host's (or this one's under an id it had before).
    Another,
}

/// A completed page on its way to a sink.
struct Ready<'a> {
    family: u64,
    page: u64,
    data: PageData<'a>,
}

/// Opens (checks the tag of, and decrypts in place) each datagram, with the FRAGMENT key of
/// its family if it is joined at that generation.
pub(super) fn open<'a>(
    key: &McastKey,
    fragment_keys: &HashMap<u64, (u32, FragmentKey)>,
    datagrams: impl IntoIterator<Item = &'a mut [u8]>,
) -> Vec<Result<Datagram<'a>, DecodeError>> {
    datagrams
        .into_iter()
        .map(|bytes| {
            wire::decode(key, bytes, |family, generation| {
                fragment_keys
                    .get(&family)
                    .filter(|(joined, _)| *joined == generation)
                    .map(|(_, key)| key)
            })
        })
        .collect()
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

/// What one batch of datagrams decided under the state lock, to act on after it.
pub(super) struct Batch<'a> {
    now: Instant,
    /// Pages all of whose fragments are in this batch: they complete from the receive
    /// buffers, without a reassembly copy.
    whole: HashMap<(u64, u64), Vec<&'a [u8]>>,
    /// Pages completed from this batch's buffers: the rest of their fragments is skipped.
    taken: HashSet<(u64, u64)>,
    ready: Vec<Ready<'a>>,
    failures: Vec<(Arc<dyn PageSink>, String)>,
    sinks: HashMap<u64, Destination>,
    /// Families whose completed requests made room for waiting pages.
    refill: Vec<u64>,
    /// How long an overtaken page waits before it counts as lost.
    reorder_window: Duration,
    /// The earliest retry time the batch brought forward.
    earliest_retry: Option<Instant>,
    /// This receiver's id: a FRAGMENT whose `sender` it is answers a REQUEST of this host
    /// that queued the page.
    receiver_id: u32,
}

impl<'a> Batch<'a> {
    /// A batch of the datagrams `decoded`, received by `now` by the receiver `receiver_id`.
    pub(super) fn new(
        decoded: &[Result<Datagram<'a>, DecodeError>],
        now: Instant,
        config: &ReceiverConfig,
        receiver_id: u32,
    ) -> Batch<'a> {
        Batch {
            receiver_id,
            reorder_window: config.reorder_window,
            earliest_retry: None,
            now,
            whole: whole_pages(decoded),
            taken: HashSet::new(),
            ready: Vec::new(),
            failures: Vec::new(),
            sinks: HashMap::new(),
            refill: Vec::new(),
        }
    }

    /// Takes one datagram of the batch into account.
    pub(super) fn handle(
        &mut self,
        state: &mut State,
        datagram: Result<Datagram<'a>, DecodeError>,
    ) {
        state.stats.datagrams += 1;
        match datagram {
            Err(error) => on_undecodable(state, error),
            Ok(Datagram::Fragment(header, fragment)) => self.on_fragment(state, &header, fragment),
            Ok(Datagram::Reject(header, reject)) => self.on_reject(state, &header, &reject),
            Ok(Datagram::Request(..)) => state.stats.malformed += 1,
            Ok(Datagram::Repair(header, repair)) => self.on_repair(state, &header, &repair),
        }
    }

    fn on_fragment(&mut self, state: &mut State, header: &Header, fragment: Fragment<'a>) {
        let Some(family) = live_family(&mut state.families, &mut state.stats, header) else {
            return;
        };
        if fragment.page >= family.join.pages {
            count(&mut state.stats, &mut family.stats, |s| s.malformed += 1);
            return;
        }
        // Pushed pages go after every requested one: only these say the queue moves.
        if header.flags & FRAGMENT_PUSH == 0 {
            family.loss.progressed(self.now);
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
        if self.taken.contains(&key) {
            return;
        }
        if family.held.get(fragment.page) {
            count(&mut state.stats, &mut family.stats, |s| {
                s.duplicate_fragments += 1;
            });
            return;
        }
        let (outcome, evicted) = self.assemble(&mut state.reassembly, header.family, &fragment);
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
                let queued_by = if header.flags & FRAGMENT_PUSH != 0 {
                    QueuedBy::Push
                } else if header.sender == self.receiver_id {
                    QueuedBy::Us
                } else {
                    QueuedBy::Another
                };
                self.complete(
                    &mut state.stats,
                    &mut state.repairs,
                    family,
                    fragment.page,
                    data,
                    queued_by,
                );
            }
        }
    }

    fn on_repair(&mut self, state: &mut State, header: &Header, repair: &Repair<'a>) {
        let Some(family) = live_family(&mut state.families, &mut state.stats, header) else {
            return;
        };
        let first = repair.first_page;
        let pages = u64::from(repair.pages);
        let Some(shape) = first
            .checked_add(pages)
            .filter(|&end| end <= family.join.pages)
            .map(|_| Shape {
                symbols_per_page: repair.symbols_per_page,
                symbol_len: repair.symbol_len,
            })
        else {
            count(&mut state.stats, &mut family.stats, |s| s.malformed += 1);
            return;
        };
        count(&mut state.stats, &mut family.stats, |s| {
            s.repair_symbols += 1
        });
        let key = (header.family, first, repair.pages);
        if (first..first + pages).all(|page| family.held.get(page)) {
            state.repairs.forget(key);
            return;
        }
        let held = &family.held;
        let rebuilt = state.repairs.add(
            key,
            shape,
            (repair.index, repair.count),
            repair.data,
            |page| held.get(page),
        );
        match rebuilt {
            Ok(None) => {}
            Ok(Some(rebuilt)) => {
                for (position, buf) in rebuilt {
                    let page = first + position as u64;
                    if family.held.get(page) {
                        continue;
                    }
                    count(&mut state.stats, &mut family.stats, |s| {
                        s.pages_repaired += 1
                    });
                    self.complete(
                        &mut state.stats,
                        &mut state.repairs,
                        family,
                        page,
                        PageData::Buffer(buf),
                        QueuedBy::Push,
                    );
                }
            }
            Err(error) => {
                count(&mut state.stats, &mut family.stats, |s| s.malformed += 1);
                tracing::debug!(%error, "mcdist receiver dropped a block's repairs");
            }
        }
    }

    /// Adds `fragment` to its page: from the batch's buffers if all its fragments are in the
    /// batch and none was received before, else through reassembly. Returns the outcome and
    /// the partial pages evicted to make room.
    fn assemble(
        &mut self,
        reassembly: &mut Reassembly,
        family: u64,
        fragment: &Fragment<'a>,
    ) -> (Outcome<PageData<'a>>, u64) {
        let key = (family, fragment.page);
        let whole = self
            .whole
            .remove(&key)
            .filter(|_| !reassembly.is_partial(key.0, key.1));
        match whole {
            Some(parts) => {
                self.taken.insert(key);
                (Outcome::Complete(PageData::Parts(parts)), 0)
            }
            None => {
                let (outcome, evicted) = reassembly.insert(family, fragment, self.now);
                (outcome.map(PageData::Buffer), evicted)
            }
        }
    }

    /// `page` of `family` is complete: marks it held, ends its request (sampling the RTT, growing
    /// the rate; where the server queued it for this host's request, the pages this host asked
    /// for before it are overtaken; where for another host's, the pages of its block sent
    /// since that host's previous one are passed) and queues it for delivery.
    fn complete(
        &mut self,
        global: &mut ReceiverStats,
        repairs: &mut RepairBlocks,
        family: &mut Family,
        page: u64,
        data: PageData<'a>,
        queued_by: QueuedBy,
    ) {
        let id = family.join.family;
        family.held.set(page);
        match &data {
            PageData::Buffer(buf) => repairs.completed(id, page, &[&buf[..]]),
            PageData::Parts(parts) => repairs.completed(id, page, parts),
        }
        let early = match family.outstanding.remove(&page) {
            Some(request) => {
                family.retry_order.remove(&(request.retry_at, page));
                // A page another host asked for first was served from that host's place in
                // the queue, and a re-requested one perhaps from its first place (a page is
                // not queued twice): neither arrival says where the server is in ours.
                if request.retries == 0 && queued_by == QueuedBy::Us {
                    self.bring_forward_overtaken(family, request.seq);
                } else {
                    family.loss.forget(request.seq);
                }
                // Karn: only pages never re-requested give a clean sample.
                if request.retries == 0 {
                    let rtt = self
                        .now
                        .saturating_duration_since(request.first_sent)
                        .saturating_sub(request.queued_for);
                    family.rtt.sample(rtt);
                    let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
                    count(global, &mut family.stats, |s| {
                        s.rtt_samples += 1;
                        s.rtt_total_us = s.rtt_total_us.saturating_add(micros);
                    });
                }
                false
            }
            None => true,
        };
        if queued_by == QueuedBy::Another {
            self.bring_forward_passed(family, page);
        }
        if !early {
            family.rate.on_completed();
            family.completed_in_interval = family.completed_in_interval.saturating_add(1);
            if !family.waiting.is_empty() && !self.refill.contains(&id) {
                self.refill.push(id);
            }
        }
        count(global, &mut family.stats, |s| {
            s.pages_completed += 1;
            if early {
                s.early_pages += 1;
            }
        });
        self.sinks
            .entry(id)
            .or_insert_with(|| (Arc::clone(&family.sink), family.hook.clone()));
        self.ready.push(Ready {
            family: id,
            page,
            data,
        });
    }

    /// `page` arrived for another host's request: the awaited pages of its block between it
    /// and the previous such page, if that was lower, were sent before it (see `loss`) and
    /// are due at the end of the reordering window, unless re-requested (their resend may
    /// come from anywhere in the queue).
    fn bring_forward_passed(&mut self, family: &mut Family, page: u64) {
        let Some(shift) = family.block_shift else {
            return;
        };
        let Some(previous) = family.last_for_another.insert(page >> shift, page) else {
            return;
        };
        if previous >= page {
            return;
        }
        let due = self.now + family.rtt.reorder_window(self.reorder_window);
        for skipped in previous + 1..page {
            let Some(request) = family.outstanding.get_mut(&skipped) else {
                continue;
            };
            if request.retries > 0 || request.passed {
                continue;
            }
            request.passed = true;
            self.due_by(family, skipped, due);
        }
    }

    /// The awaited page requested as `seq` arrived: the pages requested before it and still
    /// awaited are due at the end of the reordering window (see `LossDetector`).
    fn bring_forward_overtaken(&mut self, family: &mut Family, seq: u64) {
        let due = self.now + family.rtt.reorder_window(self.reorder_window);
        for page in family.loss.arrived(seq) {
            self.due_by(family, page, due);
        }
    }

    /// Brings the timer of awaited `page` forward to `due`, where it was later.
    fn due_by(&mut self, family: &mut Family, page: u64, due: Instant) {
        let Some(request) = family.outstanding.get_mut(&page) else {
            return;
        };
        if request.retry_at <= due {
            return;
        }
        family.retry_order.remove(&(request.retry_at, page));
        request.retry_at = due;
        family.retry_order.insert((due, page));
        self.earliest_retry = Some(self.earliest_retry.map_or(due, |e| e.min(due)));
    }

    fn on_reject(&mut self, state: &mut State, header: &Header, reject: &Reject) {
        let Some(family) = state.families.get_mut(&header.family) else {
            state.stats.not_ours += 1;
            return;
        };
        family.stats.datagrams += 1;
        if header.generation != family.join.generation {
            count(&mut state.stats, &mut family.stats, |s| s.not_ours += 1);
            return;
        }
        count(&mut state.stats, &mut family.stats, |s| s.rejects += 1);
        if family.failed {
            return;
        }
        family.failed = true;
        family.outstanding.clear();
        family.retry_order.clear();
        family.loss.clear();
        family.waiting.clear();
        family.queued = Bitmap::new(family.join.pages);
        let reason = format!(
            "mcdist server {} rejected page {:#x} of family {:#x} \
             (generation {:#x}): {}",
            family.join.server, reject.page, header.family, header.generation, reject.code
        );
        tracing::warn!(%reason, "mcdist family failed");
        self.failures.push((Arc::clone(&family.sink), reason));
    }

    /// Sends the waiting pages that the batch's completions made room for; returns the
    /// earliest retry time that set or the batch brought forward.
    pub(super) fn refill(
        &self,
        state: &mut State,
        config: &ReceiverConfig,
        outgoing: &Outgoing<'_>,
    ) -> Option<Instant> {
        let mut earliest = self.earliest_retry;
        for id in &self.refill {
            let Some(family) = state.families.get_mut(id) else {
                continue;
            };
            if family.failed {
                continue;
            }
            if let Some(at) = admit(
                config,
                outgoing,
                &mut state.scratch,
                &mut state.stats,
                family,
                self.now,
            ) {
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
        }
        earliest
    }

    /// Hands completed pages to their sinks, one batch per family, then to the hooks; then
    /// reports the failed families.
    pub(super) fn deliver(&mut self) {
        for (&family, (sink, hook)) in &self.sinks {
            let parts: Vec<(u64, Vec<&[u8]>)> = self
                .ready
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
        for (sink, reason) in self.failures.drain(..) {
            sink.failed(reason);
        }
    }

    /// Whether pages were completed (and so may have reassembly buffers to give back).
    pub(super) fn completed_any(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Gives the reassembled pages' buffers back for reuse.
    pub(super) fn recycle(self, reassembly: &mut Reassembly) {
        for page in self.ready {
            if let PageData::Buffer(buf) = page.data {
                reassembly.recycle(buf);
            }
        }
    }
}

/// Counts a datagram that did not decode, by why.
fn on_undecodable(state: &mut State, error: DecodeError) {
    match error {
        DecodeError::BadTag => state.stats.mac_failed += 1,
        DecodeError::NoKey { family, .. } => match state.families.get_mut(&family) {
            Some(family) => {
                family.stats.datagrams += 1;
                count(&mut state.stats, &mut family.stats, |s| s.not_ours += 1);
            }
            None => state.stats.not_ours += 1,
        },
        error => {
            state.stats.malformed += 1;
            tracing::trace!(%error, "dropped a malformed mcdist datagram");
        }
    }
}

/// The joined, not failed family of a datagram's `header`, counting the
/// datagram for it; `None` (counted as not ours) for a family not joined
/// here, another generation of it, or one that failed.
fn live_family<'s>(
    families: &'s mut HashMap<u64, Family>,
    stats: &mut ReceiverStats,
    header: &Header,
) -> Option<&'s mut Family> {
    let Some(family) = families.get_mut(&header.family) else {
        stats.not_ours += 1;
        return None;
    };
    family.stats.datagrams += 1;
    if header.generation != family.join.generation || family.failed {
        count(stats, &mut family.stats, |s| s.not_ours += 1);
        return None;
    }
    Some(family)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{
        FAMILY, GENERATION, decode_request, feed, fragments, header, key, setup,
    };
    use crate::auth::ClusterKey;
    use crate::mcast::wire::{
        self, Fragment, FragmentSealer, McastKey, REQUEST_JOIN, REQUEST_LEAVE, Reject, RejectCode,
    };
    use crate::wire::PAGE_SIZE;

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
    fn forged_and_foreign_datagrams_are_counted_and_dropped() {
        let (core, _, sink) = setup();
        let mut forged = fragments(FAMILY, GENERATION, 1, 9);
        let last = forged[0].len() - 1;
        forged[0][last] ^= 1;
        let other_key = {
            let sealer = FragmentSealer::new(
                McastKey::new(ClusterKey::from_bytes([4; 32])).fragment_key(FAMILY, GENERATION),
            );
            let mut out = Vec::new();
            let header = header(FAMILY, GENERATION);
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
    fn a_reject_fails_the_family_once() {
        let (core, recorder, sink) = setup();
        core.request(FAMILY, &[2]);
        let mkey = McastKey::new(key());
        let mut out = Vec::new();
        let header = header(FAMILY, GENERATION);
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
