//! Recorded working sets (as REAP records a function's): the pages each clone host of a
//! family asked for, in the order of its first requests, kept as runs of consecutive pages;
//! and the push order a recording gives the next registration of the same clone point.

use std::net::Ipv4Addr;

use crate::mcast::bitmap::Bitmap;

/// Runs one family records at most, over all its hosts (16 bytes each): a host asking for
/// pages in a scattered order cannot grow a recording without bound.
pub(super) const MAX_RECORDED_RUNS: usize = 1 << 16;

/// What a registration ([`McastServer::register_led`](super::McastServer::register_led))
/// does with recorded working sets.
#[derive(Clone, Copy, Debug, Default)]
pub struct Recording<'a> {
    /// A set recorded while the same clone point was served before: its pages lead the push.
    pub lead: Option<&'a WorkingSet>,
    /// Record what the clone hosts ask for.
    pub record: bool,
}

/// What the clone hosts of one family asked for: per host, the runs of consecutive pages
/// in the order it first asked for them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    hosts: Vec<HostRuns>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct HostRuns {
    host: Ipv4Addr,
    runs: Vec<(u64, u64)>,
}

impl WorkingSet {
    /// Clone hosts that asked for pages.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Runs recorded, over all hosts.
    pub fn runs(&self) -> usize {
        self.hosts.iter().map(|h| h.runs.len()).sum()
    }

    /// The order in which to push these pages: the hosts' runs taken in turn (each host's
    /// first-asked pages early), each page once, pages not in `wanted` (not data of the
    /// image served now, or past its end) left out; as runs, adjacent ones merged.
    pub(super) fn push_order(&self, wanted: &Bitmap, pages: u64) -> Vec<(u64, u64)> {
        let mut taken = Bitmap::new(pages);
        let mut order: Vec<(u64, u64)> = Vec::new();
        let longest = self.hosts.iter().map(|h| h.runs.len()).max().unwrap_or(0);
        for index in 0..longest {
            for host in &self.hosts {
                let Some(&(start, count)) = host.runs.get(index) else {
                    continue;
                };
                let end = start.saturating_add(count).min(pages);
                for page in start..end {
                    if taken.get(page) || !wanted.get(page) {
                        continue;
                    }
                    taken.set(page);
                    if !extend_last(&mut order, page) {
                        order.push((page, 1));
                    }
                }
            }
        }
        order
    }
}

/// The push runs of a registration led by `lead`: the recorded pages that are in the
/// store's push runs, in the recording's order, then the rest of the store's runs in their
/// order. Also returns how many pages the lead contributed.
pub(super) fn led_push_runs(
    lead: &WorkingSet,
    store_runs: &[(u64, u64)],
    pages: u64,
) -> (Vec<(u64, u64)>, u64) {
    let mut data = Bitmap::new(pages);
    for &(start, count) in store_runs {
        (start..start.saturating_add(count).min(pages)).for_each(|page| data.set(page));
    }
    let mut runs = lead.push_order(&data, pages);
    let led: u64 = runs.iter().map(|&(_, count)| count).sum();
    runs.iter()
        .for_each(|&(start, count)| (start..start + count).for_each(|page| data.clear(page)));
    for &(start, count) in store_runs {
        for page in start..start.saturating_add(count).min(pages) {
            if !data.get(page) {
                continue;
            }
            data.clear(page);
            if !extend_last(&mut runs, page) {
                runs.push((page, 1));
            }
        }
    }
    (runs, led)
}

/// Extends the last of `runs` by `page` if the page follows it; false if it does not.
fn extend_last(runs: &mut [(u64, u64)], page: u64) -> bool {
    match runs.last_mut() {
        Some((start, count)) if *start + *count == page => {
            *count += 1;
            true
        }
        _ => false,
    }
}

/// Records a family's [`WorkingSet`] as its REQUESTs arrive: the hosts in the order they
/// first asked (a host is added with its first run, so none is empty).
#[derive(Default)]
pub(super) struct WorkingSetRecorder {
    set: WorkingSet,
    runs: usize,
}

impl WorkingSetRecorder {
    /// `host` asked for `pages` (not as a retry): each extends the host's last run when it
    /// follows it, else starts a run while the family is under [`MAX_RECORDED_RUNS`].
    pub(super) fn record(&mut self, host: Ipv4Addr, pages: impl IntoIterator<Item = u64>) {
        let at = match self.set.hosts.iter().position(|h| h.host == host) {
            Some(at) => at,
            None => {
                self.set.hosts.push(HostRuns {
                    host,
                    runs: Vec::new(),
                });
                self.set.hosts.len() - 1
            }
        };
        let runs = &mut self.set.hosts[at].runs;
        for page in pages {
            if !extend_last(runs, page) && self.runs < MAX_RECORDED_RUNS {
                runs.push((page, 1));
                self.runs += 1;
            }
        }
        if runs.is_empty() {
            self.set.hosts.remove(at);
        }
    }

    /// What was recorded so far; `None` when nothing was.
    pub(super) fn snapshot(&self) -> Option<WorkingSet> {
        (!self.set.hosts.is_empty()).then(|| self.set.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{MAX_RECORDED_RUNS, WorkingSetRecorder, led_push_runs};
    use crate::mcast::bitmap::Bitmap;

    const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
    const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);

    fn all(pages: u64) -> Bitmap {
        let mut bits = Bitmap::new(pages);
        (0..pages).for_each(|page| bits.set(page));
        bits
    }

    #[test]
    fn consecutive_requests_of_a_host_make_one_run() {
        let mut recorder = WorkingSetRecorder::default();
        assert!(recorder.snapshot().is_none());
        for page in [10, 11, 12, 3, 4, 40] {
            recorder.record(A, [page]);
        }
        let set = recorder.snapshot().unwrap();
        assert_eq!((set.hosts(), set.runs()), (1, 3));
        assert_eq!(set.push_order(&all(64), 64), vec![(10, 3), (3, 2), (40, 1)]);
    }

    #[test]
    fn hosts_take_turns_and_each_page_is_pushed_once() {
        let mut recorder = WorkingSetRecorder::default();
        for page in [20, 21, 5] {
            recorder.record(A, [page]);
        }
        for page in [30, 20, 21, 22] {
            recorder.record(B, [page]);
        }
        let set = recorder.snapshot().unwrap();
        assert_eq!(set.hosts(), 2);
        // A's first run, B's first run, A's second, B's second minus what A's first took.
        assert_eq!(
            set.push_order(&all(64), 64),
            vec![(20, 2), (30, 1), (5, 1), (22, 1)]
        );
    }

    #[test]
    fn pages_not_wanted_or_past_the_end_are_left_out() {
        let mut recorder = WorkingSetRecorder::default();
        for page in [1, 2, 3, 4, 60, 61, 100] {
            recorder.record(A, [page]);
        }
        let mut wanted = all(62);
        wanted.clear(3);
        let set = recorder.snapshot().unwrap();
        assert_eq!(set.push_order(&wanted, 62), vec![(1, 2), (4, 1), (60, 2)]);
    }

    #[test]
    fn a_recording_stops_growing_at_its_run_limit() {
        let mut recorder = WorkingSetRecorder::default();
        // Every other page: each request starts a run.
        for page in 0..(MAX_RECORDED_RUNS as u64 + 10) {
            recorder.record(A, [page * 2]);
        }
        recorder.record(B, [7]);
        let set = recorder.snapshot().unwrap();
        assert_eq!((set.hosts(), set.runs()), (1, MAX_RECORDED_RUNS));
        // The last run can still grow: it costs nothing more.
        recorder.record(A, [(MAX_RECORDED_RUNS as u64 - 1) * 2 + 1]);
        assert_eq!(recorder.snapshot().unwrap().runs(), MAX_RECORDED_RUNS);
    }

    #[test]
    fn a_led_push_goes_through_the_recording_then_the_rest_of_the_store() {
        let mut recorder = WorkingSetRecorder::default();
        // Page 9 is not data of the store any more: the lead skips it.
        for page in [40, 41, 9, 2] {
            recorder.record(A, [page]);
        }
        let set = recorder.snapshot().unwrap();
        let store = [(0, 4), (40, 4)];
        let (runs, led) = led_push_runs(&set, &store, 64);
        assert_eq!(led, 3);
        assert_eq!(runs, vec![(40, 2), (2, 1), (0, 2), (3, 1), (42, 2)]);
        let pushed: u64 = runs.iter().map(|&(_, count)| count).sum();
        assert_eq!(pushed, 8);
    }
}
