//! Per-clone installs: placing pages into one hollow clone's memory through
//! its userfaultfd ([`CloneState`]). Zero-filling avoided pages
//! (`UFFDIO_COPY` from a zero source or `UFFDIO_ZEROPAGE`), waking faults
//! on pages that reached the host cache (the retried fault maps them), and
//! releasing the region when the clone fails or closes.
//!
//! This is mechanism only: what to fetch, and when a family gives up, is
//! decided in `family`. Nothing here takes the family's lock; a fill the
//! kernel refuses is handed back as a [`FaultError`] for the caller to fail
//! the family with.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use super::error::FaultError;
use crate::PAGE_SIZE;
use crate::avoid::AvoidMap;
use crate::cache::PageCache;
use crate::pagemap::{self, Mapped};
use crate::stats::LiveStats;
use crate::sync;
use crate::sys::{self, Fill, PageFault};

/// A zero-fill window (one bitmap word) fits the zero copy source.
const _: () = assert!(sys::ZERO_SOURCE_LEN >= 64 * PAGE_SIZE);

/// Delivered pages for one clone: `(page, when its fault was read)`.
pub(super) type Arrivals = Vec<(u64, Option<Instant>)>;

/// Everything about one clone that its fault thread, deliveries and the
/// handle share.
pub(super) struct CloneState {
    pub(super) uffd: OwnedFd,
    pub(super) base: u64,
    pub(super) pages: u64,
    /// A bit per page, set by whoever installs the page (`fetch_or`, so
    /// exactly one thread installs each page) just before installing it.
    installed: Box<[AtomicU64]>,
    /// A bit per page mapped into the view ahead of the guest from the
    /// host cache: such a page is mapped whether or not the guest read it.
    populated: Box<[AtomicU64]>,
    pub(super) avoid: AvoidMap,
    pub(super) stats: LiveStats,
    pub(super) failure: OnceLock<FaultError>,
    on_failure: Arc<dyn Fn(&FaultError) + Send + Sync>,
    /// Whether the region may still be touched: every ioctl on it holds
    /// this for reading; closing sets it to false under the write lock,
    /// so no ioctl runs after [`FaultHandler::close`](super::FaultHandler::close)
    /// returns.
    open: RwLock<bool>,
    registered: AtomicBool,
    /// The page of the last fault that went to the network (prefetch
    /// pattern detection).
    pub(super) last_fetch: AtomicU64,
}

impl CloneState {
    /// The state of a clone whose `pages` pages at `base` were just
    /// registered with `uffd`: nothing installed, open, no fetch yet.
    pub(super) fn new(
        uffd: OwnedFd,
        base: u64,
        pages: u64,
        avoid: AvoidMap,
        on_failure: Arc<dyn Fn(&FaultError) + Send + Sync>,
    ) -> Self {
        Self {
            uffd,
            base,
            pages,
            installed: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            populated: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            avoid,
            stats: LiveStats::new(),
            failure: OnceLock::new(),
            on_failure,
            open: RwLock::new(true),
            registered: AtomicBool::new(true),
            last_fetch: AtomicU64::new(u64::MAX),
        }
    }

    fn addr(&self, page: u64) -> u64 {
        self.base + page * PAGE_SIZE
    }

    pub(super) fn page_of(&self, address: u64) -> Option<u64> {
        let page = address.checked_sub(self.base)? / PAGE_SIZE;
        (page < self.pages).then_some(page)
    }

    pub(super) fn is_installed(&self, page: u64) -> bool {
        self.installed[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Claims the pages of `mask` in word `word` for installing; returns
    /// those nobody had claimed.
    fn claim(&self, word: usize, mask: u64) -> u64 {
        mask & !self.installed[word].fetch_or(mask, Ordering::AcqRel)
    }

    fn claim_page(&self, page: u64) -> bool {
        self.claim((page / 64) as usize, 1 << (page % 64)) != 0
    }

    /// Runs `op` on the userfaultfd unless the handler was closed.
    fn ioctl<R>(&self, op: impl FnOnce(&OwnedFd) -> R) -> Option<R> {
        let open = sync::read(&self.open);
        (*open).then(|| op(&self.uffd))
    }

    pub(super) fn wake(&self, first: u64, count: u64) {
        let woken = self.ioctl(|fd| sys::wake(fd, self.addr(first), count * PAGE_SIZE));
        if let Some(Err(e)) = woken {
            tracing::debug!(page = first, count, "UFFDIO_WAKE failed: {e}");
        }
    }

    /// Fills pages `first..first + count` without waking: `Ok(false)` if
    /// the handler is closed, the error the family fails with if the
    /// kernel refused.
    fn fill(&self, fill: Fill, first: u64, count: u64) -> Result<bool, FaultError> {
        let filled = self.ioctl(|fd| {
            // SAFETY: the range lies inside this clone's region (callers
            // pass pages below `self.pages`), which `start`'s contract
            // keeps mapped and ours until close; the read lock held here
            // means close has not happened. A copy source is a run of
            // present cache pages, readable while the family lives, or (at
            // most 64 pages) the process-wide zero source, never unmapped.
            unsafe { sys::fill_range(fd, fill, self.addr(first), count * PAGE_SIZE, true) }
        });
        match filled {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => {
                let op = match fill {
                    Fill::Copy { .. } => "UFFDIO_COPY",
                    Fill::Zero => "UFFDIO_ZEROPAGE",
                };
                let errno = e.raw_os_error().unwrap_or(0);
                Err(FaultError::Install {
                    op,
                    page: first,
                    errno,
                })
            }
        }
    }

    /// A fault on a page that reached the host cache after the fault was
    /// raised: the retried fault maps it.
    pub(super) fn install_cached(&self, page: u64, read_at: Instant) {
        self.claim_page(page);
        self.stats.cache_hit();
        self.stats.latency(read_at.elapsed(), false);
        self.wake(page, 1);
    }

    /// A fault on an avoided page: zero-fills the avoided pages of its
    /// aligned 64-page window (one word of the bitmaps) that are not
    /// installed, then wakes the fault. Pages the guest is about to write
    /// (marked fresh, or the page of a write fault) get writable zero pages
    /// (`UFFDIO_COPY` from a zero source); the others the shared zero page
    /// (`UFFDIO_ZEROPAGE`), which costs no memory until written. Stops
    /// quietly once the handler is closed; a fill the kernel refused is
    /// returned for the caller to fail the family with.
    pub(super) fn zero_fill(
        &self,
        fault: PageFault,
        page: u64,
        read_at: Instant,
    ) -> Result<(), FaultError> {
        let word = (page / 64) as usize;
        let bit = 1u64 << (page % 64);
        let avoid = self.avoid.word(word);
        let claimed = self.claim(word, avoid.any() | bit);
        let writes = if fault.write { bit } else { 0 };
        let zeros = sys::zero_source();
        let copied = match zeros {
            Some(_) => claimed & (avoid.marked_fresh | writes),
            None => 0,
        };
        let fills = [
            (copied, zeros.map(|src| Fill::Copy { src })),
            (claimed & !copied, Some(Fill::Zero)),
        ];
        for (mask, fill) in fills {
            let Some(fill) = fill else { continue };
            let mut rest = mask;
            while rest != 0 {
                let start = rest.trailing_zeros();
                let len = (rest >> start).trailing_ones();
                let first = word as u64 * 64 + u64::from(start);
                if !self.fill(fill, first, u64::from(len))? {
                    return Ok(());
                }
                rest &= !(u64::MAX >> (64 - len) << start);
            }
        }
        self.stats.avoided(&avoid.count(claimed));
        self.stats.latency(read_at.elapsed(), false);
        self.wake(page, 1);
        Ok(())
    }

    /// After a failure the range is normally unregistered and faults no
    /// longer come here; one that was queued before (or all of them, if
    /// unregistering failed) gets a zero page.
    pub(super) fn zero_after_failure(&self, page: u64) {
        self.claim_page(page);
        let filled = self.ioctl(|fd| {
            // SAFETY: as in `fill`: a page of this clone's region, still
            // ours (read lock held, so not closed).
            unsafe { sys::fill_range(fd, Fill::Zero, self.addr(page), PAGE_SIZE, true) }
        });
        if let Some(Err(e)) = filled {
            tracing::debug!(page, "zero-filling after the failure failed: {e}");
        }
        self.wake(page, 1);
    }

    /// Pages this clone asked for arrived: they are in the cache, which is
    /// this clone's memory, so nothing is copied; its faults among them are
    /// woken and map them as they retry.
    pub(super) fn install_delivered(&self, mut list: Arrivals) {
        if self.failure.get().is_some() {
            return;
        }
        list.sort_unstable_by_key(|&(page, _)| page);
        let mut installed = 0u64;
        let mut prefetched = 0u64;
        for &(page, fault) in &list {
            if self.claim_page(page) {
                installed += 1;
                prefetched += u64::from(fault.is_none());
            }
        }
        self.stats.fetched(installed, prefetched);
        let now = Instant::now();
        for &(_, fault) in &list {
            if let Some(at) = fault {
                self.stats.latency(now.saturating_duration_since(at), true);
            }
        }
        let faulted = list.iter().filter(|(_, f)| f.is_some()).map(|&(p, _)| p);
        for_each_run(faulted, |first, count| self.wake(first, count));
    }

    /// The first step of failing the clone (see [`FaultError`]): records
    /// `error` and reports it through `on_failure`, once, and only while
    /// the handler is open. True when this call did so; the caller then
    /// forgets the clone's waits and calls [`CloneState::release_region`].
    pub(super) fn mark_failed(&self, family: u64, error: &FaultError) -> bool {
        if !*sync::read(&self.open) {
            return false;
        }
        if self.failure.set(error.clone()).is_err() {
            return false;
        }
        tracing::warn!(
            family,
            base = self.base,
            "hollow clone memory failed: {error}"
        );
        (self.on_failure)(error);
        true
    }

    /// Releases every fault of a failed clone's region: unregisters it,
    /// which wakes them and lets the kernel zero-fill its holes, or, if
    /// that fails, wakes them all to be zero-filled here.
    pub(super) fn release_region(&self) {
        let unregistered = self.ioctl(|fd| {
            if self.registered.load(Ordering::Acquire) {
                sys::unregister(fd, self.base, self.pages * PAGE_SIZE)?;
                self.registered.store(false, Ordering::Release);
            }
            Ok::<(), std::io::Error>(())
        });
        if let Some(Err(e)) = unregistered {
            tracing::error!(
                "unregistering failed hollow memory failed ({e}); waking its faults to zero-fill them"
            );
            self.wake(0, self.pages);
        }
    }

    /// Ends the region's registration by replacing it with private
    /// anonymous zero memory in one step (see
    /// [`FaultHandler::close`](super::FaultHandler::close)), under the open
    /// lock held for writing, so no ioctl of ours runs on it afterwards.
    /// False if it was closed already.
    /// Notes that pages `[first, first + count)` are being mapped into the
    /// view from the host cache ahead of the guest.
    pub(super) fn mark_populated(&self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.pages);
        for page in first..end {
            self.populated[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
        self.stats.populated(end.saturating_sub(first));
    }

    /// Pages of `cache` that arrived unasked (pushed) and that this clone
    /// touched: mapped in its view, read from the cache or written into a
    /// copy of its own. A populated page counts only once written (being
    /// mapped says nothing of a read). `None` once the region is closed.
    pub(super) fn pushed_pages_used(&self, cache: &PageCache) -> Option<u64> {
        let open = sync::read(&self.open);
        if !*open {
            return None;
        }
        let mapped = match pagemap::read(self.base, self.pages) {
            Ok(mapped) => mapped,
            Err(e) => {
                tracing::warn!("reading the page map of hollow memory failed: {e}");
                return None;
            }
        };
        let used = (0..self.pages)
            .filter(|&page| cache.arrived_unrequested(page))
            .filter(|&page| match mapped[page as usize] {
                Mapped::No => false,
                Mapped::Private => true,
                Mapped::File => {
                    self.populated[(page / 64) as usize].load(Ordering::Relaxed)
                        & (1 << (page % 64))
                        == 0
                }
            })
            .count() as u64;
        Some(used)
    }

    pub(super) fn close_region(&self) -> bool {
        let mut open = sync::write(&self.open);
        if !*open {
            return false;
        }
        self.registered.store(false, Ordering::Release);
        let len = self.pages * PAGE_SIZE;
        // SAFETY: the region is this clone's memory, which `start`'s
        // contract keeps mapped and ours until `close`, this function's
        // only caller; the open lock held for writing means no ioctl of
        // ours runs on it meanwhile.
        match unsafe { sys::replace_with_anonymous(self.base, len) } {
            // Waiting faults are not woken by the mapping going away.
            Ok(()) => {
                if let Err(e) = sys::wake(&self.uffd, self.base, len) {
                    tracing::warn!("waking the faults of replaced hollow memory failed: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("replacing hollow memory failed ({e}); unregistering it instead");
                if let Err(e) = sys::unregister(&self.uffd, self.base, len) {
                    tracing::warn!("unregistering hollow memory failed: {e}");
                }
            }
        }
        *open = false;
        true
    }
}

/// Calls `f(first, count)` for each run of consecutive pages in `sorted`.
fn for_each_run(sorted: impl IntoIterator<Item = u64>, mut f: impl FnMut(u64, u64)) {
    let mut run: Option<(u64, u64)> = None;
    for page in sorted {
        run = match run {
            Some((first, count)) if first + count == page => Some((first, count + 1)),
            Some((first, count)) => {
                f(first, count);
                Some((page, 1))
            }
            None => Some((page, 1)),
        };
    }
    if let Some((first, count)) = run {
        f(first, count);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Pages of a [`detached_clone`].
    pub(in crate::handler) const PAGES: u64 = 512;

    /// A clone of [`PAGES`] pages, all data but `free_heap`, for tests of
    /// what decides about installs. An eventfd stands in for its
    /// userfaultfd and its region is never mapped, so a test must not take
    /// a path that reaches an ioctl (a wake, a fill, a failure).
    pub(in crate::handler) fn detached_clone(free_heap: &[(u64, u64)]) -> Arc<CloneState> {
        let avoid = AvoidMap::new(PAGES, &[(0, PAGES)], free_heap).unwrap();
        let uffd = sys::eventfd().unwrap();
        let on_failure = Arc::new(|_: &FaultError| {});
        Arc::new(CloneState::new(
            uffd,
            0x7f00_0000_0000,
            PAGES,
            avoid,
            on_failure,
        ))
    }

    fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        for_each_run(pages.iter().copied(), |first, count| {
            runs.push((first, count))
        });
        runs
    }

    #[test]
    fn consecutive_pages_make_one_run() {
        assert_eq!(runs(&[1, 2, 3, 5, 7, 8]), [(1, 3), (5, 1), (7, 2)]);
        assert_eq!(runs(&[9]), [(9, 1)]);
        assert_eq!(runs(&[]), []);
    }
}
