//! A family's request table ([`RequestTable`]): which pages were requested
//! from the source and not delivered yet, which clones wait for each, and
//! since when a clone faults on each, oldest first, for the fetch deadline
//! (a page fetched ahead of need has none until a clone faults on it: a
//! slow prefetch fails nobody). And the clock that spaces the family's
//! deadline checks ([`DeadlineClock`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use foldhash::HashMap;

use super::install::CloneState;
use crate::ring;

/// A clone waiting for a requested page: `fault` is when its fault was
/// read, `None` when it asked for the page as prefetch.
pub(super) struct Waiter {
    pub(super) clone: Arc<CloneState>,
    pub(super) fault: Option<Instant>,
}

/// A page requested from the source and not delivered yet.
pub(super) struct Pending {
    /// The first fault on it; `None` while it is only fetched ahead of need.
    faulted: Option<Instant>,
    pub(super) waiters: Vec<Waiter>,
}

impl Pending {
    /// Adds `clone` to the waiters, once: a clone already waiting keeps
    /// its entry, which records `fault` unless it had a fault already.
    /// Returns the page's first fault if `fault` is it.
    fn join(&mut self, clone: &Arc<CloneState>, fault: Option<Instant>) -> Option<Instant> {
        let first_fault = match (self.faulted, fault) {
            (None, Some(at)) => {
                self.faulted = Some(at);
                Some(at)
            }
            _ => None,
        };
        match self
            .waiters
            .iter_mut()
            .find(|w| Arc::ptr_eq(&w.clone, clone))
        {
            Some(waiter) => {
                if let Some(at) = fault {
                    waiter.fault.get_or_insert(at);
                }
            }
            None => self.waiters.push(Waiter {
                clone: clone.clone(),
                fault,
            }),
        }
        first_fault
    }
}

/// The outstanding requests of a family.
#[derive(Default)]
pub(super) struct RequestTable {
    pending: HashMap<u64, Pending>,
    /// `(first fault, page)` of the faulted requests, in fault order
    /// (faults are read in order, give or take the fault threads'
    /// interleaving); entries whose request is gone (delivered, dropped)
    /// are skipped lazily.
    order: VecDeque<(Instant, u64)>,
}

impl RequestTable {
    /// A new request of `page`, for `waiter`.
    pub(super) fn add(&mut self, page: u64, waiter: Waiter) {
        if let Some(at) = waiter.fault {
            self.order.push_back((at, page));
        }
        self.pending.insert(
            page,
            Pending {
                faulted: waiter.fault,
                waiters: vec![waiter],
            },
        );
    }

    /// Makes `clone` wait for `page` (faulting on it at `fault`, or ahead
    /// of need): joins the request in flight for it, or adds one. True when
    /// the page is to be requested.
    pub(super) fn wait_for(
        &mut self,
        page: u64,
        clone: &Arc<CloneState>,
        fault: Option<Instant>,
    ) -> bool {
        match self.pending.get_mut(&page) {
            Some(pending) => {
                if let Some(at) = pending.join(clone, fault) {
                    self.order.push_back((at, page));
                }
                false
            }
            None => {
                let waiter = Waiter {
                    clone: clone.clone(),
                    fault,
                };
                self.add(page, waiter);
                true
            }
        }
    }

    pub(super) fn contains(&self, page: u64) -> bool {
        self.pending.contains_key(&page)
    }

    /// Ends the request of `page` (it was delivered), handing back its
    /// waiters.
    pub(super) fn take(&mut self, page: u64) -> Option<Pending> {
        self.pending.remove(&page)
    }

    /// Drops `clone`'s waits; requests only it waited for are forgotten.
    pub(super) fn forget(&mut self, clone: &Arc<CloneState>) {
        self.pending.retain(|_, pending| {
            pending.waiters.retain(|w| !Arc::ptr_eq(&w.clone, clone));
            !pending.waiters.is_empty()
        });
    }

    pub(super) fn clear(&mut self) {
        self.pending.clear();
        self.order.clear();
    }

    /// Outstanding requests.
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// The outstanding request first faulted on, dropping stale order
    /// entries.
    fn oldest(&mut self) -> Option<(Instant, u64)> {
        while let Some(&(at, page)) = self.order.front() {
            if self
                .pending
                .get(&page)
                .is_some_and(|p| p.faulted == Some(at))
            {
                return Some((at, page));
            }
            self.order.pop_front();
        }
        None
    }

    /// The page of the oldest faulted request if a clone has waited for it
    /// longer than `timeout` at `now`.
    pub(super) fn overdue(&mut self, now: Instant, timeout: Duration) -> Option<u64> {
        self.oldest()
            .filter(|&(since, _)| now.saturating_duration_since(since) > timeout)
            .map(|(_, page)| page)
    }
}

/// When a family's deadlines are next checked: every clone's fault thread
/// ticks, and one check per half tick suffices.
pub(super) struct DeadlineClock {
    epoch: Instant,
    /// Nanoseconds after `epoch` before which no deadline check is due.
    next_check: AtomicU64,
}

impl DeadlineClock {
    pub(super) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            next_check: AtomicU64::new(0),
        }
    }

    /// Whether a deadline check is due at `now`; when it is, exactly one
    /// caller gets true and the next check is due half a tick later.
    pub(super) fn due(&self, now: Instant) -> bool {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let due = self.next_check.load(Ordering::Relaxed);
        let next = now_ns + ring::TICK.as_nanos() as u64 / 2;
        now_ns >= due
            && self
                .next_check
                .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::install::tests::detached_clone;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A table holding a request of `page` faulted on `after` ms past the
    /// returned instant for each `(page, after)`.
    fn table(requests: &[(u64, u64)]) -> (RequestTable, Instant) {
        let clone = detached_clone(&[]);
        let t0 = Instant::now();
        let mut table = RequestTable::default();
        for &(page, after) in requests {
            assert!(table.wait_for(page, &clone, Some(t0 + ms(after))));
        }
        (table, t0)
    }

    #[test]
    fn the_oldest_request_skips_those_that_are_gone() {
        let (mut table, t0) = table(&[(1, 0), (2, 1)]);
        assert_eq!(table.oldest(), Some((t0, 1)));
        table.take(1);
        assert_eq!(table.oldest(), Some((t0 + ms(1), 2)));
        assert_eq!(table.order.len(), 1);
        table.take(2);
        assert_eq!(table.oldest(), None);
        assert!(table.order.is_empty());
    }

    #[test]
    fn a_page_requested_again_counts_from_its_new_fault() {
        let (mut table, t0) = table(&[(5, 0), (6, 1)]);
        let mut waiter = table.take(5).unwrap().waiters.remove(0);
        waiter.fault = Some(t0 + ms(2));
        table.add(5, waiter);
        assert_eq!(table.oldest(), Some((t0 + ms(1), 6)));
        table.take(6);
        assert_eq!(table.oldest(), Some((t0 + ms(2), 5)));
    }

    #[test]
    fn a_page_fetched_ahead_is_overdue_only_once_a_clone_waited_for_it_too_long() {
        let first = detached_clone(&[]);
        let second = detached_clone(&[]);
        let t0 = Instant::now();
        let mut table = RequestTable::default();
        assert!(table.wait_for(7, &first, None));
        assert_eq!(table.overdue(t0 + ms(1000), ms(100)), None, "nobody waits");
        assert!(!table.wait_for(7, &second, Some(t0 + ms(900))));
        assert_eq!(table.overdue(t0 + ms(1000), ms(100)), None);
        assert_eq!(table.overdue(t0 + ms(1001), ms(100)), Some(7));
    }

    #[test]
    fn a_request_is_overdue_only_past_the_timeout() {
        let (mut table, t0) = table(&[(3, 0)]);
        assert_eq!(table.overdue(t0 + ms(100), ms(100)), None);
        assert_eq!(table.overdue(t0 + ms(101), ms(100)), Some(3));
        table.clear();
        assert_eq!(table.overdue(t0 + ms(101), ms(100)), None);
    }

    #[test]
    fn a_clone_waits_once_and_keeps_its_first_fault() {
        let first = detached_clone(&[]);
        let second = detached_clone(&[]);
        let early = Instant::now();
        let late = early + ms(5);
        let mut table = RequestTable::default();
        assert!(table.wait_for(30, &first, None));
        assert!(!table.wait_for(30, &second, Some(early)));
        assert!(!table.wait_for(30, &first, Some(late)));
        assert!(!table.wait_for(30, &second, Some(late)));
        assert!(!table.wait_for(30, &second, None));
        let faults: Vec<Option<Instant>> =
            table.pending[&30].waiters.iter().map(|w| w.fault).collect();
        // A prefetch that faults gets its fault time; a fault keeps its
        // first one.
        assert_eq!(faults, [Some(late), Some(early)]);
        assert_eq!(table.oldest(), Some((early, 30)));
    }

    #[test]
    fn forgetting_a_clone_drops_the_requests_only_it_waited_for() {
        let first = detached_clone(&[]);
        let second = detached_clone(&[]);
        let mut table = RequestTable::default();
        table.wait_for(1, &first, None);
        table.wait_for(2, &first, None);
        table.wait_for(2, &second, None);
        table.forget(&first);
        assert_eq!(table.len(), 1);
        assert!(!table.contains(1));
        let waiters = table.take(2).unwrap().waiters;
        assert_eq!(waiters.len(), 1);
        assert!(Arc::ptr_eq(&waiters[0].clone, &second));
    }

    #[test]
    fn deadlines_are_due_once_per_half_tick() {
        let clock = DeadlineClock::new();
        let start = clock.epoch;
        let half = ring::TICK / 2;
        assert!(clock.due(start));
        assert!(!clock.due(start));
        assert!(!clock.due(start + half - ms(1)));
        assert!(clock.due(start + half));
        assert!(!clock.due(start + half));
        // After a long pause, one check, then half a tick from there.
        assert!(clock.due(start + ring::TICK * 10));
        assert!(!clock.due(start + ring::TICK * 10 + ms(1)));
        assert!(clock.due(start + ring::TICK * 10 + half));
    }
}
