//! What the server keeps per family it serves: its store, generation and group, the
//! receivers heard from (liveness, reported rate), the queue of pages to send with the
//! duplicate suppression around it, the pages requested so far and the pushes to late
//! joiners, the push of the clone point's pages, and the token bucket pacing it.

use std::collections::VecDeque;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use super::config::McastServerConfig;
use super::stats::{Counters, FamilyServerStats, bump};
use super::working_set::{WorkingSet, WorkingSetRecorder};
use crate::mcast::rate::TokenBucket;
use crate::mcast::wire::{
    ALL_FRAGMENTS, FragmentSealer, Header, REQUEST_FRAGMENTS, REQUEST_HOLDING, REQUEST_JOIN,
    REQUEST_LEAVE, REQUEST_RETRY, REQUEST_UNICAST_REPLY, Reject, RejectCode, Request,
};
use crate::server::PageStore;

/// Where a page goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Destination {
    Group,
    Unicast(SocketAddrV4),
}

/// A receiver: the address its REQUESTs come from and its `sender` id.
pub(super) type ReceiverId = (SocketAddrV4, u32);

struct ReceiverInfo {
    last_heard: Instant,
    /// Its last reported rate; 0 = none yet.
    rate: u32,
}

/// A page to send.
#[derive(Clone, Copy)]
pub(super) struct Job {
    pub(super) page: u64,
    pub(super) destination: Destination,
    /// Who asked first (gets the REJECT if the read fails; its id goes in the FRAGMENTs'
    /// `sender`); `None` for the clone point's push, which nobody asked for.
    pub(super) requester: Option<ReceiverId>,
    pub(super) push: bool,
    /// The fragments to send (bit `i`: fragment `i`); [`ALL_FRAGMENTS`] for the whole page.
    pub(super) fragments: u16,
}

/// The pages siblings requested before `receiver` joined, still to push to it.
struct PushCursor {
    receiver: ReceiverId,
    joined: Instant,
    next: usize,
    end: usize,
}

/// The push of a clone point's pages to its group: the store's push runs, walked in order
/// and round again, so that every clone host that joined gets each page once without asking.
struct ClonePointPush {
    runs: Vec<(u64, u64)>,
    pages: u64,
    /// Where the walk is: the run, and the page within it.
    run: usize,
    offset: u64,
    /// Pages still to visit (sent or skipped) before the push stops.
    remaining: u64,
    /// When the last receiver new to the family joined: a page multicast since then reached
    /// every receiver, so the push skips it.
    last_join: Option<Instant>,
}

impl ClonePointPush {
    fn new(runs: Vec<(u64, u64)>, limit: u64) -> ClonePointPush {
        // A store's runs past the family's end would only be rejected by every receiver.
        let runs: Vec<(u64, u64)> = runs
            .into_iter()
            .filter(|&(start, _)| start < limit)
            .map(|(start, count)| (start, count.min(limit - start)))
            .filter(|&(_, count)| count > 0)
            .collect();
        ClonePointPush {
            pages: runs.iter().map(|&(_, count)| count).sum(),
            runs,
            run: 0,
            offset: 0,
            remaining: 0,
            last_join: None,
        }
    }

    /// A receiver new to the family joined at `now`: the push goes on until it has visited
    /// every page once more from where it stands, so the newcomer gets the pages sent before
    /// it joined too (for the first receiver, the whole walk from the start).
    fn joined(&mut self, now: Instant) {
        self.remaining = self.pages;
        self.last_join = Some(now);
    }

    /// The next page of the walk, or `None` once it has visited what it must.
    fn next_page(&mut self) -> Option<u64> {
        if self.remaining == 0 {
            return None;
        }
        let (start, count) = self.runs[self.run];
        let page = start + self.offset;
        self.offset += 1;
        if self.offset == count {
            self.offset = 0;
            self.run = (self.run + 1) % self.runs.len();
        }
        self.remaining -= 1;
        Some(page)
    }
}

/// A served family.
pub(super) struct FamilyState {
    pub(super) generation: u32,
    /// Seals the family's FRAGMENTs (its key follows the generation).
    pub(super) sealer: Arc<FragmentSealer>,
    pub(super) group: SocketAddrV4,
    pub(super) store: Arc<dyn PageStore>,
    pages: u64,
    receivers: HashMap<ReceiverId, ReceiverInfo>,
    pub(super) queue: VecDeque<Job>,
    /// The pages in `queue` by destination, with the fragments to send: requests for a page
    /// already queued add theirs, and the send takes them from here.
    pub(super) queued: HashMap<(u64, Destination), u16>,
    last_group_send: HashMap<u64, Instant>,
    last_unicast_send: HashMap<(u64, SocketAddrV4), Instant>,
    /// Every page requested so far, in request order (for push), and its set.
    requested_order: Vec<u64>,
    requested: HashSet<u64>,
    pushes: VecDeque<PushCursor>,
    /// The push of the clone point's pages; `None` with push off.
    clone_point_push: Option<ClonePointPush>,
    /// Pages at the head of that push that a recorded working set put there.
    push_led: u64,
    /// What each clone host asked for, for the next registration of this clone point;
    /// `None` when the registration did not ask for a recording.
    recorder: Option<WorkingSetRecorder>,
    pub(super) bucket: TokenBucket,
    pub(super) pages_sent: u64,
    /// Of those, pages pushed without a request (to late joiners and at the clone point).
    pub(super) pages_pushed: u64,
    /// The lowest `rate` any report has produced; 0 before any.
    lowest_rate: u32,
}

impl FamilyState {
    /// `store` served as generation `generation` of a family to `group`: no receivers,
    /// nothing requested, a full bucket at the initial rate. With push on, `push_runs` wait
    /// for the first receiver to join; the first `push_led` of their pages come from a
    /// recorded working set.
    pub(super) fn new(
        generation: u32,
        sealer: FragmentSealer,
        group: SocketAddrV4,
        store: Arc<dyn PageStore>,
        (push_runs, push_led): (Vec<(u64, u64)>, u64),
        config: &McastServerConfig,
        now: Instant,
    ) -> FamilyState {
        let pages = store.page_count();
        FamilyState {
            generation,
            sealer: Arc::new(sealer),
            group,
            pages,
            receivers: HashMap::new(),
            queue: VecDeque::new(),
            queued: HashMap::new(),
            last_group_send: HashMap::new(),
            last_unicast_send: HashMap::new(),
            requested_order: Vec::new(),
            requested: HashSet::new(),
            pushes: VecDeque::new(),
            clone_point_push: config
                .push
                .then(|| ClonePointPush::new(push_runs, pages))
                .filter(|push| push.pages > 0),
            push_led: if config.push { push_led } else { 0 },
            recorder: None,
            store,
            bucket: TokenBucket::new(config.initial_rate, now),
            pages_sent: 0,
            pages_pushed: 0,
            lowest_rate: 0,
        }
    }

    /// Records what the clone hosts ask for from now on ([`FamilyState::working_set`]).
    pub(super) fn recording(self) -> FamilyState {
        FamilyState {
            recorder: Some(WorkingSetRecorder::default()),
            ..self
        }
    }

    fn active_receivers(&self, now: Instant, idle: Duration) -> usize {
        self.receivers
            .values()
            .filter(|r| now.saturating_duration_since(r.last_heard) < idle)
            .count()
    }

    pub(super) fn rate(&self, now: Instant, config: &McastServerConfig) -> u32 {
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

    pub(super) fn has_work(&self) -> bool {
        !self.queue.is_empty()
            || !self.pushes.is_empty()
            || self
                .clone_point_push
                .as_ref()
                .is_some_and(|push| push.remaining > 0)
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

    /// Notes that `job` left at `now`; only a whole page answers later requests for it.
    pub(super) fn mark_sent(&mut self, job: &Job, now: Instant) {
        if job.fragments != ALL_FRAGMENTS {
            return;
        }
        match job.destination {
            Destination::Group => {
                self.last_group_send.insert(job.page, now);
            }
            Destination::Unicast(addr) => {
                self.last_unicast_send.insert((job.page, addr), now);
            }
        }
    }

    /// The next page to send that no receiver asked for: first the pages a late joiner's
    /// siblings requested before it joined, then the clone point's pages.
    pub(super) fn next_push(&mut self, now: Instant, idle: Duration) -> Option<Job> {
        self.next_late_join_push(now, idle)
            .or_else(|| self.next_clone_point_push(now, idle))
    }

    /// The next page of the clone point's push to the group, skipping the pages queued and
    /// those multicast since the last receiver joined; none while no receiver is active
    /// (nobody would receive it).
    fn next_clone_point_push(&mut self, now: Instant, idle: Duration) -> Option<Job> {
        if self.active_receivers(now, idle) == 0 {
            return None;
        }
        let push = self.clone_point_push.as_mut()?;
        while let Some(page) = push.next_page() {
            let multicast_since_join = push.last_join.is_some_and(|joined| {
                self.last_group_send
                    .get(&page)
                    .is_some_and(|sent| *sent >= joined)
            });
            if multicast_since_join || self.queued.contains_key(&(page, Destination::Group)) {
                continue;
            }
            return Some(Job {
                page,
                destination: Destination::Group,
                requester: None,
                push: true,
                fragments: ALL_FRAGMENTS,
            });
        }
        None
    }

    /// The next page to push to a late joiner, skipping those the receiver got since it
    /// joined.
    fn next_late_join_push(&mut self, now: Instant, idle: Duration) -> Option<Job> {
        while let Some(cursor) = self.pushes.front_mut() {
            let receiver = cursor.receiver;
            let (addr, _) = receiver;
            let alive = self
                .receivers
                .get(&receiver)
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
                || self.queued.contains_key(&(page, destination))
                || self.queued.contains_key(&(page, Destination::Group))
            {
                continue;
            }
            return Some(Job {
                page,
                destination,
                requester: Some(receiver),
                push: true,
                fragments: ALL_FRAGMENTS,
            });
        }
        None
    }

    /// Applies a REQUEST of this family's generation from `from`: updates its receiver
    /// (liveness, rate, LEAVE, a push for a late JOIN) and queues the pages not sent or
    /// queued to the same destination within the suppression window. Returns the REJECTs to
    /// send to its sender, and whether it queued pages (or pushes) to send.
    pub(super) fn apply_request(
        &mut self,
        config: &McastServerConfig,
        counters: &Counters,
        header: &Header,
        request: &Request<'_>,
        from: SocketAddrV4,
        now: Instant,
    ) -> (Vec<Reject>, bool) {
        let receiver: ReceiverId = (from, header.sender);
        if header.flags & REQUEST_LEAVE != 0 {
            self.receivers.remove(&receiver);
            self.pushes.retain(|p| p.receiver != receiver);
            return (Vec::new(), false);
        }
        self.hear(receiver, header.flags, request.rate, config, now);
        if let Some(recorder) = &mut self.recorder
            && header.flags & (REQUEST_RETRY | REQUEST_FRAGMENTS) == 0
        {
            let pages = self.pages;
            let asked = request.entries().map(|(page, _)| page);
            recorder.record(*from.ip(), asked.filter(|&page| page < pages));
        }
        let destination = if header.flags & REQUEST_UNICAST_REPLY != 0
            || self.active_receivers(now, config.receiver_idle) == 1
        {
            Destination::Unicast(from)
        } else {
            Destination::Group
        };
        // A retry says the last send did not arrive: suppressing it would make the receiver
        // wait out the window (milliseconds) where it noticed the loss within a round trip.
        // Its retransmission timeout, not the window, keeps retries from flooding.
        let suppress_since = (header.flags & REQUEST_RETRY == 0)
            .then(|| now.checked_sub(config.suppression).unwrap_or(now));
        let (rejects, queued_any) =
            self.queue_pages(request, destination, receiver, suppress_since, counters);
        let pushing = !self.pushes.is_empty()
            || self
                .clone_point_push
                .as_ref()
                .is_some_and(|push| push.remaining > 0);
        (rejects, queued_any || pushing)
    }

    /// Notes that `receiver` was heard at `now`, with the rate it `reported` (0 = none); a
    /// receiver JOINing while not active is pushed the pages requested so far, unless its
    /// JOIN says it holds what it was sent before (`REQUEST_HOLDING`).
    fn hear(
        &mut self,
        receiver: ReceiverId,
        flags: u16,
        reported: u32,
        config: &McastServerConfig,
        now: Instant,
    ) {
        let known = self
            .receivers
            .get(&receiver)
            .is_some_and(|r| now.saturating_duration_since(r.last_heard) < config.receiver_idle);
        let newcomer = !known && flags & REQUEST_JOIN != 0 && flags & REQUEST_HOLDING == 0;
        let info = self.receivers.entry(receiver).or_insert(ReceiverInfo {
            last_heard: now,
            rate: 0,
        });
        info.last_heard = now;
        if reported != 0 {
            info.rate = reported;
            let rate = self.rate(now, config);
            if self.lowest_rate == 0 || rate < self.lowest_rate {
                self.lowest_rate = rate;
            }
        }
        if newcomer && let Some(push) = &mut self.clone_point_push {
            push.joined(now);
        }
        if newcomer && config.push && !self.requested_order.is_empty() {
            self.pushes.push_back(PushCursor {
                receiver,
                joined: now,
                next: 0,
                end: self.requested_order.len(),
            });
        }
    }

    /// Queues the pages (or the fragments) of `request` from `requester` for `destination`,
    /// but those queued already (a page queued gets the fragments asked for added) and those
    /// sent since `suppress_since` (`None`: whenever sent); returns the REJECTs of pages past
    /// the end, and whether it queued any.
    fn queue_pages(
        &mut self,
        request: &Request<'_>,
        destination: Destination,
        requester: ReceiverId,
        suppress_since: Option<Instant>,
        counters: &Counters,
    ) -> (Vec<Reject>, bool) {
        let mut rejects = Vec::new();
        let mut queued_any = false;
        for (page, fragments) in request.entries() {
            bump(&counters.pages_requested, 1);
            if page >= self.pages {
                rejects.push(Reject {
                    page,
                    code: RejectCode::OutOfRange,
                });
                continue;
            }
            if self.requested.insert(page) {
                self.requested_order.push(page);
            }
            let key = if self.queued.contains_key(&(page, Destination::Group)) {
                (page, Destination::Group)
            } else {
                (page, destination)
            };
            if let Some(queued) = self.queued.get_mut(&key) {
                if *queued | fragments == *queued {
                    bump(&counters.duplicates_suppressed, 1);
                }
                *queued |= fragments;
                continue;
            }
            if suppress_since.is_some_and(|since| self.recently_sent(page, destination, since)) {
                bump(&counters.duplicates_suppressed, 1);
                continue;
            }
            self.queued.insert((page, destination), fragments);
            self.queue.push_back(Job {
                page,
                destination,
                requester: Some(requester),
                push: false,
                fragments,
            });
            queued_any = true;
        }
        (rejects, queued_any)
    }

    /// The working set recorded so far; `None` before any page was asked for, or when not
    /// recording.
    pub(super) fn working_set(&self) -> Option<WorkingSet> {
        self.recorder
            .as_ref()
            .and_then(WorkingSetRecorder::snapshot)
    }

    /// Forgets the receivers idle for `receiver_idle` and the unicast sends older than the
    /// suppression window.
    pub(super) fn forget_stale(&mut self, now: Instant, config: &McastServerConfig) {
        self.receivers
            .retain(|_, r| now.saturating_duration_since(r.last_heard) < config.receiver_idle);
        self.last_unicast_send
            .retain(|_, sent| now.saturating_duration_since(*sent) < config.suppression);
    }

    /// The family's view in the server's stats.
    pub(super) fn stats(
        &self,
        family: u64,
        now: Instant,
        config: &McastServerConfig,
    ) -> FamilyServerStats {
        FamilyServerStats {
            family,
            generation: self.generation,
            group: *self.group.ip(),
            rate: self.rate(now, config),
            lowest_rate: self.lowest_rate,
            active_receivers: self.active_receivers(now, config.receiver_idle),
            queued_pages: self.queue.len()
                + self.pushes.iter().map(|p| p.end - p.next).sum::<usize>(),
            pages_sent: self.pages_sent,
            pages_pushed: self.pages_pushed,
            push_remaining: self
                .clone_point_push
                .as_ref()
                .map_or(0, |push| push.remaining),
            push_led: self.push_led,
        }
    }
}

/// Every family served (behind the server's state lock).
#[derive(Default)]
pub(super) struct ServerState {
    pub(super) families: HashMap<u64, FamilyState>,
    /// Where the send threads' round robin over families continues.
    pub(super) turn: usize,
}

/// A new generation for a family: random, non-zero, never `previous`.
pub(super) fn new_generation(previous: Option<u32>) -> u32 {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::super::stats::Counters;
    use super::super::test_support::{PAGES, apply, config, family, family_pushing, receiver};
    use super::super::working_set::led_push_runs;
    use super::{Destination, Job};
    use crate::mcast::wire::{
        ALL_FRAGMENTS, REQUEST_FRAGMENTS, REQUEST_HOLDING, REQUEST_JOIN, REQUEST_LEAVE,
        REQUEST_RETRY, RejectCode, fragment_entry,
    };

    /// A send of `page` to `destination`, asked for by receiver 1.
    fn send_of(page: u64, destination: Destination) -> Job {
        Job {
            page,
            destination,
            requester: Some((receiver(1), 1)),
            push: false,
            fragments: ALL_FRAGMENTS,
        }
    }

    fn queued(family: &super::FamilyState) -> Vec<(u64, Destination)> {
        family
            .queue
            .iter()
            .map(|job| (job.page, job.destination))
            .collect()
    }

    #[test]
    fn pages_queued_or_sent_in_the_window_are_not_queued_again() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut family = family(&config, now);
        // A single active receiver is answered by unicast; a page past the end is rejected.
        let (rejects, queued_any) =
            apply(&mut family, &config, &counters, (1, 0), &[1, 2, PAGES], now);
        assert!(queued_any);
        assert_eq!(rejects.len(), 1);
        assert_eq!(rejects[0].page, PAGES);
        assert_eq!(rejects[0].code, RejectCode::OutOfRange);
        let to_one = Destination::Unicast(receiver(1));
        assert_eq!(queued(&family), vec![(1, to_one), (2, to_one)]);
        // With two active receivers pages go to the group: once, however often asked.
        apply(&mut family, &config, &counters, (2, 0), &[1, 3], now);
        apply(&mut family, &config, &counters, (1, 0), &[1, 3], now);
        assert_eq!(
            queued(&family)[2..],
            [(1, Destination::Group), (3, Destination::Group)]
        );
        assert_eq!(counters.duplicates_suppressed.load(Ordering::Relaxed), 2);
        assert_eq!(counters.pages_requested.load(Ordering::Relaxed), 7);
        // A page sent to the group answers requests for it during the suppression window.
        let sent = send_of(5, Destination::Group);
        family.mark_sent(&sent, now);
        let (_, queued_any) = apply(&mut family, &config, &counters, (1, 0), &[5], now);
        assert!(!queued_any);
        let later = now + config.suppression + Duration::from_millis(1);
        let (_, queued_any) = apply(&mut family, &config, &counters, (1, 0), &[5], later);
        assert!(queued_any);
        assert_eq!(counters.duplicates_suppressed.load(Ordering::Relaxed), 3);
        // A retry says the send did not arrive: it is sent again within the window, but a
        // page still queued is not queued twice.
        let sent = send_of(6, Destination::Group);
        family.mark_sent(&sent, now);
        let (_, queued_any) = apply(
            &mut family,
            &config,
            &counters,
            (1, REQUEST_RETRY),
            &[6],
            now,
        );
        assert!(queued_any, "a retry within the window is served");
        let (_, queued_any) = apply(
            &mut family,
            &config,
            &counters,
            (2, REQUEST_RETRY),
            &[6],
            now,
        );
        assert!(!queued_any, "already queued");
        assert_eq!(counters.duplicates_suppressed.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn fragment_requests_queue_the_fragments_asked_for_and_add_up_on_a_queued_page() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut family = family(&config, now);
        let flags = REQUEST_RETRY | REQUEST_FRAGMENTS;
        let to_one = Destination::Unicast(receiver(1));
        apply(
            &mut family,
            &config,
            &counters,
            (1, flags),
            &[fragment_entry(4, 0b010)],
            now,
        );
        assert_eq!(family.queued.get(&(4, to_one)), Some(&0b010));
        // The same page asked for again: the fragments add up, still one send.
        apply(
            &mut family,
            &config,
            &counters,
            (1, flags),
            &[fragment_entry(4, 0b100)],
            now,
        );
        apply(
            &mut family,
            &config,
            &counters,
            (1, flags),
            &[fragment_entry(4, 0b100)],
            now,
        );
        assert_eq!(family.queued.get(&(4, to_one)), Some(&0b110));
        assert_eq!(queued(&family), vec![(4, to_one)]);
        assert_eq!(counters.duplicates_suppressed.load(Ordering::Relaxed), 1);
        // A whole-page request makes it the whole page.
        apply(
            &mut family,
            &config,
            &counters,
            (1, REQUEST_RETRY),
            &[4],
            now,
        );
        assert_eq!(family.queued.get(&(4, to_one)), Some(&ALL_FRAGMENTS));
        // A part of a page sent does not answer whole-page requests for it.
        let part = Job {
            fragments: 0b001,
            ..send_of(6, to_one)
        };
        family.mark_sent(&part, now);
        let (_, queued_any) = apply(&mut family, &config, &counters, (1, 0), &[6], now);
        assert!(queued_any);
    }

    #[test]
    fn a_late_joiner_is_pushed_what_its_siblings_asked_for_and_it_missed() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut family = family(&config, now);
        apply(&mut family, &config, &counters, (1, 0), &[1, 2, 3], now);
        let (rejects, work) = apply(&mut family, &config, &counters, (2, REQUEST_JOIN), &[], now);
        assert!(rejects.is_empty());
        assert!(work, "the pushes are work");
        assert_eq!(family.stats(0, now, &config).queued_pages, 3 + 3);
        // Page 2 reached the group after receiver 2 joined: it is not pushed.
        let multicast = send_of(2, Destination::Group);
        family.mark_sent(&multicast, now);
        let mut pushed = Vec::new();
        while let Some(job) = family.next_push(now, config.receiver_idle) {
            assert!(job.push);
            assert_eq!(job.destination, Destination::Unicast(receiver(2)));
            pushed.push(job.page);
        }
        assert_eq!(pushed, vec![1, 3]);
        // A receiver that leaves is forgotten, with what was still to push to it.
        apply(&mut family, &config, &counters, (2, REQUEST_JOIN), &[], now);
        apply(
            &mut family,
            &config,
            &counters,
            (2, REQUEST_LEAVE),
            &[],
            now,
        );
        assert!(family.next_push(now, config.receiver_idle).is_none());
        assert_eq!(family.stats(0, now, &config).active_receivers, 1);
    }

    /// Pages `next_push` gives now, and where they go.
    fn pushes(family: &mut super::FamilyState, now: Instant) -> Vec<(u64, Destination)> {
        let mut pages = Vec::new();
        while let Some(job) = family.next_push(now, config().receiver_idle) {
            assert!(job.push);
            pages.push((job.page, job.destination));
        }
        pages
    }

    /// Pages `next_push` gives now, all of which must be clone-point pushes to the group.
    fn clone_point_pushes(family: &mut super::FamilyState, now: Instant) -> Vec<u64> {
        let mut pages = Vec::new();
        while let Some(job) = family.next_push(now, config().receiver_idle) {
            assert!(job.push);
            assert_eq!(job.destination, Destination::Group);
            assert_eq!(job.requester, None, "nobody asked: no REJECT to send");
            pages.push(job.page);
        }
        pages
    }

    #[test]
    fn the_clone_point_push_starts_at_the_first_join_and_goes_round_for_a_newcomer() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        // The newest pages first, then the rest; a run past the end is cut.
        let mut family = family_pushing(&config, now, vec![(6, 1), (1, 2), (7, 5)]);
        assert!(!family.has_work(), "nobody to push to before a JOIN");
        for receiver in [1, 2] {
            let (_, work) = apply(
                &mut family,
                &config,
                &counters,
                (receiver, REQUEST_JOIN),
                &[],
                now,
            );
            assert!(work);
        }
        assert_eq!(family.stats(0, now, &config).push_remaining, 4);
        // Pages queued for the group (requested) are not pushed as well.
        apply(&mut family, &config, &counters, (1, 0), &[2], now);
        apply(&mut family, &config, &counters, (2, 0), &[1], now);
        assert_eq!(
            queued(&family),
            vec![(2, Destination::Group), (1, Destination::Group)]
        );
        assert_eq!(clone_point_pushes(&mut family, now), vec![6, 7]);
        assert!(
            !family.queue.is_empty(),
            "the requested pages are still to send"
        );
        while let Some(job) = family.queue.pop_front() {
            family.queued.remove(&(job.page, job.destination));
            family.mark_sent(&job, now);
        }
        // A newcomer makes the walk go round once more from where it stands, but for the
        // pages multicast since it joined; the pages its siblings requested come first.
        let later = now + Duration::from_millis(1);
        apply(
            &mut family,
            &config,
            &counters,
            (3, REQUEST_JOIN),
            &[],
            later,
        );
        family.mark_sent(&send_of(2, Destination::Group), later);
        let group = Destination::Group;
        assert_eq!(
            pushes(&mut family, later),
            vec![
                (1, Destination::Unicast(receiver(3))),
                (6, group),
                (1, group),
                (7, group)
            ]
        );
        // A receiver heard again is no newcomer.
        apply(
            &mut family,
            &config,
            &counters,
            (3, REQUEST_JOIN),
            &[],
            later,
        );
        assert_eq!(family.stats(0, later, &config).push_remaining, 0);
        assert!(clone_point_pushes(&mut family, later).is_empty());
    }

    #[test]
    fn the_clone_point_push_waits_while_no_receiver_is_active() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut family = family_pushing(&config, now, vec![(0, PAGES)]);
        apply(&mut family, &config, &counters, (1, REQUEST_JOIN), &[], now);
        apply(
            &mut family,
            &config,
            &counters,
            (1, REQUEST_LEAVE),
            &[],
            now,
        );
        assert!(clone_point_pushes(&mut family, now).is_empty());
        assert_eq!(family.stats(0, now, &config).push_remaining, PAGES);
        let silent = now + config.receiver_idle;
        apply(&mut family, &config, &counters, (2, REQUEST_JOIN), &[], now);
        assert!(clone_point_pushes(&mut family, silent).is_empty());
        assert_eq!(clone_point_pushes(&mut family, now).len() as u64, PAGES);
    }

    #[test]
    fn each_hosts_first_requests_are_recorded_but_not_retries_or_pages_past_the_end() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut plain = family(&config, now);
        apply(&mut plain, &config, &counters, (1, 0), &[2], now);
        assert!(plain.working_set().is_none(), "not recording");
        let mut family = family(&config, now).recording();
        assert!(family.working_set().is_none());
        apply(&mut family, &config, &counters, (1, 0), &[2, 3, PAGES], now);
        apply(&mut family, &config, &counters, (2, 0), &[5], now);
        apply(
            &mut family,
            &config,
            &counters,
            (1, REQUEST_RETRY),
            &[7],
            now,
        );
        let set = family.working_set().expect("pages were asked for");
        assert_eq!((set.hosts(), set.runs()), (2, 2));
        let (order, led) = led_push_runs(&set, &[(0, PAGES)], PAGES);
        assert_eq!(led, 3);
        assert_eq!(order, vec![(2, 2), (5, 1), (0, 2), (4, 1), (6, 2)]);
    }

    #[test]
    fn a_receiver_joining_again_holding_its_pages_is_pushed_nothing_again() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut family = family_pushing(&config, now, vec![(0, PAGES)]);
        apply(&mut family, &config, &counters, (1, REQUEST_JOIN), &[], now);
        apply(&mut family, &config, &counters, (2, REQUEST_JOIN), &[], now);
        apply(&mut family, &config, &counters, (1, 0), &[3], now);
        assert_eq!(clone_point_pushes(&mut family, now).len() as u64, PAGES - 1);
        let leave = (2, REQUEST_LEAVE);
        apply(&mut family, &config, &counters, leave, &[], now);
        let holding = (2, REQUEST_JOIN | REQUEST_HOLDING);
        let (_, work) = apply(&mut family, &config, &counters, holding, &[], now);
        assert!(!work, "neither the walk nor the siblings' pages go again");
        assert_eq!(family.stats(0, now, &config).push_remaining, 0);
        assert!(pushes(&mut family, now).is_empty());
        assert_eq!(family.stats(0, now, &config).active_receivers, 2);
        // One that dropped what it held joins as a newcomer: the walk goes round again.
        apply(&mut family, &config, &counters, leave, &[], now);
        apply(&mut family, &config, &counters, (2, REQUEST_JOIN), &[], now);
        assert_eq!(family.stats(0, now, &config).push_remaining, PAGES);
    }

    #[test]
    fn no_clone_point_push_with_push_off() {
        let config = super::super::config::McastServerConfig {
            push: false,
            ..config()
        };
        let counters = Counters::default();
        let now = Instant::now();
        let mut family = family_pushing(&config, now, vec![(0, PAGES)]);
        let (_, work) = apply(&mut family, &config, &counters, (1, REQUEST_JOIN), &[], now);
        assert!(!work);
        assert!(!family.has_work());
        assert_eq!(family.stats(0, now, &config).push_remaining, 0);
    }

    #[test]
    fn idle_receivers_and_old_unicast_sends_are_forgotten() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut family = family(&config, now);
        apply(&mut family, &config, &counters, (1, 0), &[1], now);
        let sent = send_of(1, Destination::Unicast(receiver(1)));
        family.mark_sent(&sent, now);
        family.forget_stale(now, &config);
        assert_eq!(family.stats(0, now, &config).active_receivers, 1);
        assert_eq!(family.last_unicast_send.len(), 1);
        let later = now + config.receiver_idle;
        family.forget_stale(later, &config);
        assert_eq!(family.stats(0, later, &config).active_receivers, 0);
        assert!(family.last_unicast_send.is_empty());
    }
}
