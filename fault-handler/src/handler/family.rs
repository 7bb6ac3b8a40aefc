//! A clone point on this host ([`Family`]) and what it owns: its page
//! cache, where missing pages come from ([`PageSource`]), its fetch
//! settings ([`FetchConfig`]), its outstanding requests (a `requests`
//! table) with their deadline, and the clones running on it.
//!
//! This is the policy side of serving faults: which pages to request for a
//! fault (with a prefetch window when faults look sequential) or a push,
//! which clones wait for a delivered page, and when the family gives up (a
//! request past the fetch timeout, a bad page, a lost source). Placing the
//! pages into each clone's memory is `install`'s job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::error::FaultError;
use super::install::{Arrivals, CloneState};
use super::requests::{DeadlineClock, RequestTable, Waiter};
use crate::PAGE_SIZE;
use crate::cache::{BLOCK_PAGES, CacheError, HugeBlocks, PageCache};
use crate::stats::FamilyStats;
use crate::sync;

/// Pages per `PageSource::request` call of a prefetch (every transport
/// takes this many in one request).
const PREFETCH_REQUEST_PAGES: usize = 128;

/// Asks the parent's memory server for pages of a clone point. Answers
/// come back through [`Family::deliver_batch`] or [`Family::fail`], from
/// any thread (usually the transport's receiver thread).
///
/// `request` is called on a clone's fault thread with no lock held. It may
/// answer synchronously (call `deliver_batch` or `fail` before returning);
/// it should not block for long, because that clone's other faults wait
/// meanwhile (a lost request is caught by the fetch timeout).
pub trait PageSource: Send + Sync {
    fn request(&self, family: u64, pages: &[u64]);
}

/// Fetch settings of a clone point.
#[derive(Debug, Clone, Copy)]
pub struct FetchConfig {
    /// A page not delivered within this time after a clone faulted on it
    /// fails every clone of the family (a page fetched ahead of need only
    /// counts from the first fault on it: a slow prefetch fails nobody).
    pub fetch_timeout: Duration,
    /// At most this many following data pages (not avoided, not here, not
    /// requested) are requested with a faulting page, when the clone's
    /// faults look sequential: the fault lies at most `prefetch_pages + 1`
    /// pages past the previous fault that went to the network. Random
    /// access gets no prefetch; 0 turns prefetch off.
    pub prefetch_pages: u32,
    /// A fault that goes to the network also requests the missing data
    /// pages (not avoided, not here, not requested) of its aligned block of
    /// this many pages (rounded down to a power of two; 0 or 1 turns it
    /// off), whatever the access pattern: pages of one block tend to be used
    /// together, and one request of a run costs the server and the network
    /// little more than one of a page, where every page faulted alone costs
    /// its clone a round trip.
    pub fault_around_pages: u32,
    /// Hold each aligned 2 MiB block of the host page cache in one huge
    /// page once all its pages are stored, so that a clone's first touch
    /// maps 2 MiB (under PVM one shadow-MMU fault instead of 512): when the
    /// cache's clones have all ended, and, where fault-around fetches whole
    /// 2 MiB blocks (`fault_around_pages` of 512 or more), as each block
    /// arrives, before its faults are woken ([`HugeBlocks`]).
    pub huge_blocks: bool,
}

impl FetchConfig {
    /// When the cache's complete blocks go to huge pages.
    fn huge_block_mode(&self) -> HugeBlocks {
        match (
            self.huge_blocks,
            u64::from(self.fault_around_pages) >= BLOCK_PAGES,
        ) {
            (false, _) => HugeBlocks::Off,
            (true, false) => HugeBlocks::WhenIdle,
            (true, true) => HugeBlocks::OnArrival,
        }
    }
}

/// What the family's lock guards.
#[derive(Default)]
struct FamilyState {
    requests: RequestTable,
    clones: Vec<Weak<CloneState>>,
}

/// One clone point on this host: its page cache, where missing pages come
/// from, which clones run on it and which of them wait for which pages.
///
/// Locking: one mutex guards the request table and the clone list. A
/// fault checks the cache and registers as a waiter under it; a delivery
/// stores pages in the cache first and then takes the waiters of stored
/// pages under it, so a page cannot arrive unseen between the two.
/// Userfaultfd ioctls, `request` and `on_failure` run without it.
pub struct Family {
    id: u64,
    cache: PageCache,
    source: Arc<dyn PageSource>,
    config: FetchConfig,
    state: Mutex<FamilyState>,
    failed: OnceLock<FaultError>,
    received: AtomicU64,
    deadlines: DeadlineClock,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field("id", &format_args!("{:#x}", self.id))
            .field("config", &self.config)
            .field("failed", &self.failed.get())
            .finish_non_exhaustive()
    }
}

impl Family {
    /// A clone point of `mem_size` bytes whose missing pages come from
    /// `source`.
    pub fn new(
        id: u64,
        mem_size: u64,
        source: Arc<dyn PageSource>,
        config: FetchConfig,
    ) -> Result<Arc<Self>, CacheError> {
        Ok(Arc::new(Self {
            id,
            cache: PageCache::new(id, mem_size, config.huge_block_mode())?,
            source,
            config,
            state: Mutex::new(FamilyState::default()),
            failed: OnceLock::new(),
            received: AtomicU64::new(0),
            deadlines: DeadlineClock::new(),
        }))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn cache(&self) -> &PageCache {
        &self.cache
    }

    /// Why the family failed, once it did.
    pub fn failure(&self) -> Option<FaultError> {
        self.failed.get().cloned()
    }

    /// Pages arrived (`(page, PAGE_SIZE bytes)`); see
    /// [`Family::deliver_parts`].
    pub fn deliver_batch(&self, pages: &[(u64, &[u8])]) {
        let parts: Vec<[&[u8]; 1]> = pages.iter().map(|&(_, data)| [data]).collect();
        let list: Vec<(u64, &[&[u8]])> = pages
            .iter()
            .zip(&parts)
            .map(|(&(page, _), parts)| (page, &parts[..]))
            .collect();
        self.deliver_parts(&list);
    }

    /// Pages arrived, each as the parts that make it up (the fragments it
    /// came in, say): each goes into the host cache once, in one write
    /// straight from the parts, which makes it part of every clone's
    /// memory; then each clone's faults on them get one `UFFDIO_WAKE` per
    /// contiguous run, and the kernel maps the pages as the faults retry.
    /// Pages nobody asked for stay in the cache, and the first touch of
    /// one never reaches the fault handler. A page of the wrong size or
    /// outside the memory fails the family. Pages arriving after the
    /// family failed are dropped.
    pub fn deliver_parts(&self, pages: &[(u64, &[&[u8]])]) {
        if self.failed.get().is_some() {
            return;
        }
        match self.cache.insert_batch(pages) {
            Ok(stored) => {
                self.received.fetch_add(stored, Ordering::Relaxed);
            }
            Err(error) => {
                self.fail_with(FaultError::BadDelivery(error));
                return;
            }
        }
        let mut work: Vec<(Arc<CloneState>, Arrivals)> = Vec::new();
        {
            let mut state = sync::lock(&self.state);
            for &(page, _) in pages {
                // Claimed by a concurrent delivery that is still writing
                // it: that delivery takes the waiters once it is stored.
                if !self.cache.contains(page) {
                    continue;
                }
                let Some(pending) = state.requests.take(page) else {
                    continue;
                };
                for waiter in pending.waiters {
                    let entry = (page, waiter.fault);
                    match work.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &waiter.clone)) {
                        Some((_, list)) => list.push(entry),
                        None => work.push((waiter.clone, vec![entry])),
                    }
                }
            }
        }
        for (clone, list) in work {
            clone.install_delivered(list);
        }
    }

    /// The page source is gone for good (`reason` says why): every clone of
    /// the family fails, and so does every clone started on it later.
    pub fn fail(&self, reason: String) {
        self.fail_with(FaultError::SourceLost {
            reason,
            pages_received: self.received.load(Ordering::Relaxed),
        });
    }

    pub(super) fn fail_with(&self, error: FaultError) {
        let mut first = false;
        let error = self
            .failed
            .get_or_init(|| {
                first = true;
                error
            })
            .clone();
        if first {
            tracing::warn!(family = self.id, "clone point failed: {error}");
        }
        let clones: Vec<Arc<CloneState>> = {
            let mut state = sync::lock(&self.state);
            state.requests.clear();
            state.clones.iter().filter_map(Weak::upgrade).collect()
        };
        for clone in clones {
            self.fail_clone(&clone, &error);
        }
    }

    /// Fails the family with `error` (its clones share the cache, see the
    /// crate docs), and `clone` too in case it already left the family.
    pub(super) fn fail_with_clone(&self, clone: &Arc<CloneState>, error: FaultError) {
        self.fail_with(error.clone());
        self.fail_clone(clone, &error);
    }

    /// Fails `clone` once: reports it, forgets its waits, and releases
    /// every fault of its region (see [`FaultError`]). Nothing happens
    /// after its handler was closed.
    fn fail_clone(&self, clone: &Arc<CloneState>, error: &FaultError) {
        if clone.mark_failed(self.id, error) {
            self.forget(clone, false);
            clone.release_region();
        }
    }

    /// Adds `clone` to the clones served by the family, unless the family
    /// failed already.
    pub(super) fn admit(&self, clone: &Arc<CloneState>) -> Result<(), FaultError> {
        let mut state = sync::lock(&self.state);
        if let Some(error) = self.failed.get() {
            return Err(error.clone());
        }
        state.clones.push(Arc::downgrade(clone));
        Ok(())
    }

    /// A fault of `clone` on `page`, a data page it has not installed:
    /// woken if the page reached the cache meanwhile; otherwise the clone
    /// waits for the request in flight for the page, or for a new one,
    /// which takes the following pages along when the clone's faults look
    /// sequential. Fails the clone if the family failed.
    pub(super) fn fetch(&self, clone: &Arc<CloneState>, page: u64, read_at: Instant) {
        let mut request = Vec::new();
        {
            let mut state = sync::lock(&self.state);
            if self.cache.contains(page) {
                drop(state);
                clone.install_cached(page, read_at);
                return;
            }
            if let Some(error) = self.failed.get() {
                let error = error.clone();
                drop(state);
                self.fail_clone(clone, &error);
                return;
            }
            if state.requests.wait_for(page, clone, Some(read_at)) {
                request.push(page);
                self.request_following(&mut state.requests, clone, page, &mut request);
                self.request_around(&mut state.requests, clone, page, &mut request);
            }
            self.cache.mark_requested(&request);
        }
        if !request.is_empty() {
            self.source.request(self.id, &request);
        }
    }

    /// Prefetch for a fault on `page` that went to the network: when it
    /// lies at most `prefetch_pages + 1` pages past the clone's previous
    /// one, requests the following data pages of the window that are not
    /// avoided, installed, cached or requested (see [`FetchConfig`]).
    fn request_following(
        &self,
        requests: &mut RequestTable,
        clone: &Arc<CloneState>,
        page: u64,
        request: &mut Vec<u64>,
    ) {
        let window = u64::from(self.config.prefetch_pages);
        let previous = clone.last_fetch.swap(page, Ordering::Relaxed);
        if page > previous && page - previous <= window + 1 {
            let last = page.saturating_add(window).min(clone.pages - 1);
            self.request_ahead(requests, clone, page + 1..=last, request);
        }
    }

    /// Fault-around for a fault on `page` that went to the network:
    /// requests the other pages of its aligned block that are data and
    /// missing (see [`FetchConfig::fault_around_pages`]).
    fn request_around(
        &self,
        requests: &mut RequestTable,
        clone: &Arc<CloneState>,
        page: u64,
        request: &mut Vec<u64>,
    ) {
        if let Some(block) = fault_around_block(page, self.config.fault_around_pages, clone.pages) {
            let others = block.filter(|&other| other != page);
            self.request_ahead(requests, clone, others, request);
        }
    }

    /// Adds the `pages` that are missing data pages of `clone` to `request`,
    /// each awaited by the clone without a fault.
    fn request_ahead(
        &self,
        requests: &mut RequestTable,
        clone: &Arc<CloneState>,
        pages: impl Iterator<Item = u64>,
        request: &mut Vec<u64>,
    ) {
        for page in pages {
            if !self.is_missing_data(requests, clone, page) {
                continue;
            }
            let waiter = Waiter {
                clone: clone.clone(),
                fault: None,
            };
            requests.add(page, waiter);
            request.push(page);
        }
    }

    /// Whether `page` is a data page of `clone` that is neither installed,
    /// cached nor requested: one worth requesting ahead of a fault.
    fn is_missing_data(&self, requests: &RequestTable, clone: &CloneState, page: u64) -> bool {
        clone.avoid.reason(page).is_none()
            && !clone.is_installed(page)
            && !self.cache.contains(page)
            && !requests.contains(page)
    }

    /// Requests `pages` for `clone` ahead of any fault (see
    /// [`FaultHandler::prefetch`](super::FaultHandler::prefetch)); returns
    /// how many pages went to the source.
    pub(super) fn prefetch_for(&self, clone: &Arc<CloneState>, pages: &[u64]) -> usize {
        if clone.failure.get().is_some() || self.failed.get().is_some() {
            return 0;
        }
        let mut request = Vec::new();
        {
            let mut state = sync::lock(&self.state);
            for &page in pages {
                if page >= clone.pages
                    || clone.avoid.reason(page).is_some()
                    || clone.is_installed(page)
                {
                    continue;
                }
                // Mapped by the kernel on first touch.
                if self.cache.contains(page) {
                    continue;
                }
                if state.requests.wait_for(page, clone, None) {
                    request.push(page);
                }
            }
            self.cache.mark_requested(&request);
        }
        for chunk in request.chunks(PREFETCH_REQUEST_PAGES) {
            self.source.request(self.id, chunk);
        }
        request.len()
    }

    /// Fails the family if a clone has waited for a page longer than the
    /// timeout.
    pub(super) fn check_deadlines(&self, now: Instant) {
        if !self.deadlines.due(now) {
            return;
        }
        let timeout = self.config.fetch_timeout;
        let late = sync::lock(&self.state).requests.overdue(now, timeout);
        if let Some(page) = late {
            self.fail_with(FaultError::Timeout { page, timeout });
        }
    }

    /// Drops `clone`'s waits (requests only it waited for are forgotten:
    /// their pages still go into the cache if they come) and, with
    /// `leave`, the clone itself.
    pub(super) fn forget(&self, clone: &Arc<CloneState>, leave: bool) {
        let mut state = sync::lock(&self.state);
        state.requests.forget(clone);
        if leave {
            state
                .clones
                .retain(|c| c.strong_count() > 0 && !std::ptr::eq(c.as_ptr(), Arc::as_ptr(clone)));
        }
    }

    pub fn stats(&self) -> FamilyStats {
        let state = sync::lock(&self.state);
        let received = self.received.load(Ordering::Relaxed);
        FamilyStats {
            family: self.id,
            pages_received: received,
            bytes_received: received * PAGE_SIZE,
            resident_pages: self.cache.resident_pages(),
            pages_pushed: self.cache.unrequested_pages(),
            huge_blocks: self.cache.huge_block_counts().0,
            outstanding: state.requests.len() as u64,
            clones: state.clones.iter().filter(|c| c.strong_count() > 0).count() as u64,
        }
    }
}

/// The aligned block of `around` pages (rounded down to a power of two)
/// holding `page`, within a clone of `pages` pages; `None` when fault-around
/// is off (`around` < 2).
fn fault_around_block(page: u64, around: u32, pages: u64) -> Option<std::ops::Range<u64>> {
    if around < 2 {
        return None;
    }
    let size = 1u64 << around.ilog2();
    let start = page & !(size - 1);
    Some(start..(start + size).min(pages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::install::tests::{PAGES, detached_clone};
    use crate::ring;

    const TIMEOUT: Duration = Duration::from_secs(5);
    const PAGE: [u8; PAGE_SIZE as usize] = [7; PAGE_SIZE as usize];

    /// A source that records the requests it gets.
    #[derive(Default)]
    struct Requests(Mutex<Vec<Vec<u64>>>);

    impl PageSource for Requests {
        fn request(&self, _family: u64, pages: &[u64]) {
            self.0.lock().unwrap().push(pages.to_vec());
        }
    }

    impl Requests {
        fn taken(&self) -> Vec<Vec<u64>> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn family(prefetch_pages: u32, fetch_timeout: Duration) -> (Arc<Family>, Arc<Requests>) {
        family_with(FetchConfig {
            fetch_timeout,
            prefetch_pages,
            fault_around_pages: 0,
            huge_blocks: false,
        })
    }

    fn family_with(config: FetchConfig) -> (Arc<Family>, Arc<Requests>) {
        let requests = Arc::new(Requests::default());
        let family = Family::new(7, PAGES * PAGE_SIZE, requests.clone(), config).unwrap();
        (family, requests)
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn an_overdue_request_fails_the_family_with_a_timeout() {
        let timeout = ms(100);
        let (family, requests) = family(0, timeout);
        let clone = detached_clone(&[]);
        let read_at = Instant::now();
        family.fetch(&clone, 9, read_at);
        assert_eq!(requests.taken(), [vec![9]]);
        family.check_deadlines(read_at + timeout);
        assert_eq!(family.failure(), None);
        assert_eq!(family.stats().outstanding, 1);
        family.check_deadlines(Instant::now() + timeout + ring::TICK);
        assert_eq!(
            family.failure(),
            Some(FaultError::Timeout { page: 9, timeout })
        );
        assert_eq!(family.stats().outstanding, 0);
    }

    #[test]
    fn a_fault_takes_the_missing_data_pages_of_its_block_along() {
        let (family, requests) = family_with(FetchConfig {
            fetch_timeout: TIMEOUT,
            prefetch_pages: 0,
            // Rounded down to 8.
            fault_around_pages: 12,
            huge_blocks: false,
        });
        let clone = detached_clone(&[(13, 1)]);
        family.deliver_batch(&[(9, &PAGE[..])]);
        let now = Instant::now();
        // Block 8..16 without the cached page 9 and the avoided page 13;
        // page 12 is in flight, so its fault joins; the last block ends
        // with the memory.
        for page in [10, 12, PAGES - 1] {
            family.fetch(&clone, page, now);
        }
        let last = PAGES - 1;
        let block_start = last & !7;
        let mut tail = vec![last];
        tail.extend(block_start..last);
        assert_eq!(requests.taken(), [vec![10, 8, 11, 12, 14, 15], tail]);
        assert_eq!(fault_around_block(5, 0, 64), None);
        assert_eq!(fault_around_block(5, 1, 64), None);
        assert_eq!(fault_around_block(70, 16, 72), Some(64..72));
    }

    #[test]
    fn blocks_are_collapsed_on_arrival_only_where_whole_blocks_are_fetched() {
        let config = |huge_blocks, fault_around_pages| FetchConfig {
            fetch_timeout: TIMEOUT,
            prefetch_pages: 0,
            fault_around_pages,
            huge_blocks,
        };
        assert_eq!(config(false, 512).huge_block_mode(), HugeBlocks::Off);
        assert_eq!(config(true, 16).huge_block_mode(), HugeBlocks::WhenIdle);
        assert_eq!(config(true, 511).huge_block_mode(), HugeBlocks::WhenIdle);
        assert_eq!(config(true, 512).huge_block_mode(), HugeBlocks::OnArrival);
    }

    #[test]
    fn sequential_faults_take_the_following_data_pages_along() {
        let (family, requests) = family(4, TIMEOUT);
        let clone = detached_clone(&[(13, 1)]);
        let now = Instant::now();
        // The first fault has no predecessor; the next follows within the
        // window (page 13 is avoided); one on a page in flight joins its
        // request; then one more window, and a distant fault goes alone.
        for page in [10, 11, 12, 16, 40] {
            family.fetch(&clone, page, now);
        }
        // The window ends with the memory.
        for page in [PAGES - 4, PAGES - 2] {
            family.fetch(&clone, page, now);
        }
        assert_eq!(
            requests.taken(),
            [
                vec![10],
                vec![11, 12, 14, 15],
                vec![16, 17, 18, 19, 20],
                vec![40],
                vec![PAGES - 4],
                vec![PAGES - 2, PAGES - 1],
            ]
        );
    }

    #[test]
    fn no_prefetch_window_when_it_is_off() {
        let (family, requests) = family(0, TIMEOUT);
        let clone = detached_clone(&[]);
        let now = Instant::now();
        for page in [10, 11, 12] {
            family.fetch(&clone, page, now);
        }
        assert_eq!(requests.taken(), [vec![10], vec![11], vec![12]]);
    }

    #[test]
    fn prefetch_requests_missing_data_pages_in_chunks() {
        let (family, requests) = family(0, TIMEOUT);
        let clone = detached_clone(&[(100, 10)]);
        let other = detached_clone(&[]);
        family.deliver_batch(&[(5, &PAGE)]);
        assert_eq!(family.prefetch_for(&other, &[7]), 1);
        requests.taken();
        let pages: Vec<u64> = (0..300).chain([PAGES, PAGES + 1]).collect();
        // Not the cached page, the one in flight, the avoided ones, or
        // those outside the memory.
        assert_eq!(family.prefetch_for(&clone, &pages), 288);
        let sent = requests.taken();
        let sizes: Vec<usize> = sent.iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 128, 32]);
        let sent = sent.concat();
        let expected: Vec<u64> = (0..300)
            .filter(|&p| p != 5 && p != 7 && !(100..110).contains(&p))
            .collect();
        assert_eq!(sent, expected);
        assert_eq!(family.prefetch_for(&clone, &pages), 0);
        assert_eq!(family.stats().outstanding, 289);
    }

    #[test]
    fn a_delivery_installs_each_page_once_for_its_waiters() {
        let (family, _requests) = family(0, TIMEOUT);
        let clone = detached_clone(&[]);
        assert_eq!(family.prefetch_for(&clone, &[20, 21]), 2);
        family.deliver_batch(&[(20, &PAGE)]);
        family.deliver_batch(&[(20, &PAGE)]);
        assert!(clone.is_installed(20));
        assert!(!clone.is_installed(21));
        let stats = family.stats();
        assert_eq!((stats.pages_received, stats.outstanding), (1, 1));
        let clone_stats = clone.stats.snapshot();
        assert_eq!((clone_stats.pages_fetched, clone_stats.prefetched), (1, 1));
        assert_eq!(family.prefetch_for(&clone, &[20]), 0);
    }

    #[test]
    fn a_failed_family_admits_no_clone_and_fetches_nothing() {
        let (family, requests) = family(0, TIMEOUT);
        let clone = detached_clone(&[]);
        family.fail("gone".into());
        let lost = FaultError::SourceLost {
            reason: "gone".into(),
            pages_received: 0,
        };
        assert_eq!(family.failure(), Some(lost.clone()));
        assert_eq!(family.admit(&clone), Err(lost));
        assert_eq!(family.prefetch_for(&clone, &[1, 2]), 0);
        family.deliver_batch(&[(1, &PAGE)]);
        assert_eq!(family.stats().pages_received, 0);
        assert!(requests.taken().is_empty());
    }
}
