//! The fault loop of a hollow clone ([`FaultHandler`]) and the clone point
//! ([`Family`]) its pages come from.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use foldhash::HashMap;

use crate::PAGE_SIZE;
use crate::avoid::AvoidMap;
use crate::cache::{CacheError, InsertError, PageCache};
use crate::ring;
use crate::stats::{CloneStats, FamilyStats, LiveStats};
use crate::sys::{self, Fill, PageFault};

/// A zero-fill window (one bitmap word) fits the zero copy source.
const _: () = assert!(sys::ZERO_SOURCE_LEN >= 64 * PAGE_SIZE);

/// Pages per `PageSource::request` call of a prefetch (every transport
/// takes this many in one request).
const PREFETCH_REQUEST_PAGES: usize = 128;

/// How long closing a handler waits for its fault thread to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// A page not delivered within this time after it was requested fails
    /// every clone of the family.
    pub fetch_timeout: Duration,
    /// At most this many following data pages (not avoided, not here, not
    /// requested) are requested with a faulting page, when the clone's
    /// faults look sequential: the fault lies at most `prefetch_pages + 1`
    /// pages past the previous fault that went to the network. Random
    /// access gets no prefetch; 0 turns prefetch off.
    pub prefetch_pages: u32,
}

/// Why a clone's memory can no longer be served.
///
/// Once a clone fails, its `on_failure` callback has run (once), its
/// region is unregistered from userfaultfd, which wakes every fault
/// waiting in it, and from then on its missing pages read as zeros (the
/// kernel fills them; any fault event still queued is zero-filled by the
/// fault thread). Nothing waits forever, and the VM must be discarded
/// (see [`FaultHandler::failure`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("memory server lost after {pages_received} pages: {reason}")]
    SourceLost { reason: String, pages_received: u64 },
    #[error("page {page:#x} was not delivered within {timeout:?}")]
    Timeout { page: u64, timeout: Duration },
    #[error("the memory server sent a bad page")]
    BadDelivery(#[source] InsertError),
    #[error("{op} at page {page:#x} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Install {
        op: &'static str,
        page: u64,
        errno: i32,
    },
    #[error("the fault thread died: {reason}")]
    HandlerDied { reason: String },
}

/// A failure to start a fault handler.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "region {addr:#x}+{len:#x} is not page aligned or does not match the family's {family_len:#x} bytes"
    )]
    BadRegion {
        addr: u64,
        len: u64,
        family_len: u64,
    },
    #[error("avoidance map covers {map} pages, the region {region}")]
    AvoidMismatch { map: u64, region: u64 },
    #[error("the clone point already failed")]
    FamilyFailed(#[source] FaultError),
    #[error("creating the userfaultfd failed")]
    Open(#[source] std::io::Error),
    #[error("the UFFDIO_API handshake failed")]
    Api(#[source] std::io::Error),
    #[error("userfaultfd {what} lacks needed ioctls: offered {offered:#x}, needed {needed:#x}")]
    MissingIoctls {
        what: &'static str,
        offered: u64,
        needed: u64,
    },
    #[error("registering region {addr:#x}+{len:#x} with userfaultfd failed")]
    Register {
        addr: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the stop eventfd failed")]
    EventFd(#[source] std::io::Error),
    #[error("creating the io_uring failed")]
    Ring(#[source] std::io::Error),
    #[error("starting the fault thread failed")]
    Thread(#[source] std::io::Error),
}

/// A clone waiting for a requested page: `fault` is when its fault was
/// read, `None` when it asked for the page as prefetch.
struct Waiter {
    clone: Arc<CloneState>,
    fault: Option<Instant>,
}

/// Delivered pages for one clone: `(page, when its fault was read)`.
type Arrivals = Vec<(u64, Option<Instant>)>;

/// A page requested from the source and not delivered yet.
struct Pending {
    since: Instant,
    waiters: Vec<Waiter>,
}

#[derive(Default)]
struct FamilyState {
    requested: HashMap<u64, Pending>,
    /// `(since, page)` of requests in the order they were made; entries
    /// whose request is gone (delivered, dropped) are skipped lazily.
    order: VecDeque<(Instant, u64)>,
    clones: Vec<Weak<CloneState>>,
}

impl FamilyState {
    fn add_request(&mut self, page: u64, now: Instant, waiter: Waiter) {
        self.requested.insert(
            page,
            Pending {
                since: now,
                waiters: vec![waiter],
            },
        );
        self.order.push_back((now, page));
    }

    /// The oldest outstanding request, dropping stale order entries.
    fn oldest(&mut self) -> Option<(Instant, u64)> {
        while let Some(&(since, page)) = self.order.front() {
            if self.requested.get(&page).is_some_and(|p| p.since == since) {
                return Some((since, page));
            }
            self.order.pop_front();
        }
        None
    }
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
    epoch: Instant,
    /// Nanoseconds after `epoch` before which no deadline check is due
    /// (every clone's fault thread ticks; one check per tick suffices).
    next_deadline_check: AtomicU64,
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
            cache: PageCache::new(id, mem_size)?,
            source,
            config,
            state: Mutex::new(FamilyState::default()),
            failed: OnceLock::new(),
            received: AtomicU64::new(0),
            epoch: Instant::now(),
            next_deadline_check: AtomicU64::new(0),
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

    fn lock(&self) -> MutexGuard<'_, FamilyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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
            let mut state = self.lock();
            for &(page, _) in pages {
                // Claimed by a concurrent delivery that is still writing
                // it: that delivery takes the waiters once it is stored.
                if !self.cache.contains(page) {
                    continue;
                }
                let Some(pending) = state.requested.remove(&page) else {
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

    fn fail_with(&self, error: FaultError) {
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
            let mut state = self.lock();
            state.requested.clear();
            state.order.clear();
            state.clones.iter().filter_map(Weak::upgrade).collect()
        };
        for clone in clones {
            clone.fail(self, error.clone());
        }
    }

    /// Fails the family if its oldest request is older than the timeout.
    fn check_deadlines(&self, now: Instant) {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let due = self.next_deadline_check.load(Ordering::Relaxed);
        let next = now_ns + ring::TICK.as_nanos() as u64 / 2;
        if now_ns < due
            || self
                .next_deadline_check
                .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let timeout = self.config.fetch_timeout;
        let late = self
            .lock()
            .oldest()
            .filter(|&(since, _)| now.saturating_duration_since(since) > timeout);
        if let Some((_, page)) = late {
            self.fail_with(FaultError::Timeout { page, timeout });
        }
    }

    /// Drops `clone`'s waits (requests only it waited for are forgotten:
    /// their pages still go into the cache if they come) and, with
    /// `leave`, the clone itself.
    fn forget(&self, clone: &Arc<CloneState>, leave: bool) {
        let mut state = self.lock();
        state.requested.retain(|_, pending| {
            pending.waiters.retain(|w| !Arc::ptr_eq(&w.clone, clone));
            !pending.waiters.is_empty()
        });
        if leave {
            state
                .clones
                .retain(|c| c.strong_count() > 0 && !std::ptr::eq(c.as_ptr(), Arc::as_ptr(clone)));
        }
    }

    pub fn stats(&self) -> FamilyStats {
        let state = self.lock();
        let received = self.received.load(Ordering::Relaxed);
        FamilyStats {
            family: self.id,
            pages_received: received,
            bytes_received: received * PAGE_SIZE,
            resident_pages: self.cache.resident_pages(),
            outstanding: state.requested.len() as u64,
            clones: state.clones.iter().filter(|c| c.strong_count() > 0).count() as u64,
        }
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

/// Everything about one clone that its fault thread, deliveries and the
/// handle share.
struct CloneState {
    uffd: OwnedFd,
    base: u64,
    pages: u64,
    /// A bit per page, set by whoever installs the page (`fetch_or`, so
    /// exactly one thread installs each page) just before installing it.
    installed: Box<[AtomicU64]>,
    avoid: AvoidMap,
    stats: LiveStats,
    failure: OnceLock<FaultError>,
    on_failure: Arc<dyn Fn(&FaultError) + Send + Sync>,
    /// Whether the region may still be touched: every ioctl on it holds
    /// this for reading; closing sets it to false under the write lock,
    /// so no ioctl runs after [`FaultHandler::close`] returns.
    open: RwLock<bool>,
    registered: AtomicBool,
    /// The page of the last fault that went to the network (prefetch
    /// pattern detection).
    last_fetch: AtomicU64,
}

impl CloneState {
    fn addr(&self, page: u64) -> u64 {
        self.base + page * PAGE_SIZE
    }

    fn page_of(&self, address: u64) -> Option<u64> {
        let page = address.checked_sub(self.base)? / PAGE_SIZE;
        (page < self.pages).then_some(page)
    }

    fn is_installed(&self, page: u64) -> bool {
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
        let open = self.open.read().unwrap_or_else(PoisonError::into_inner);
        (*open).then(|| op(&self.uffd))
    }

    fn wake(&self, first: u64, count: u64) {
        let woken = self.ioctl(|fd| sys::wake(fd, self.addr(first), count * PAGE_SIZE));
        if let Some(Err(e)) = woken {
            tracing::debug!(page = first, count, "UFFDIO_WAKE failed: {e}");
        }
    }

    /// Fills pages `first..first + count` without waking; false (and the
    /// clone failed) if the kernel refused, or the handler is closed.
    fn fill(self: &Arc<Self>, family: &Family, fill: Fill, first: u64, count: u64) -> bool {
        let filled = self.ioctl(|fd| {
            // SAFETY: the range lies inside this clone's region (callers
            // pass pages below `self.pages`), which `start`'s contract
            // keeps mapped and ours until close; the read lock held here
            // means close has not happened. A copy source is a run of
            // present cache pages, readable while `family` lives, or (at
            // most 64 pages) the process-wide zero source, never unmapped.
            unsafe { sys::fill_range(fd, fill, self.addr(first), count * PAGE_SIZE, true) }
        });
        match filled {
            None => false,
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                let op = match fill {
                    Fill::Copy { .. } => "UFFDIO_COPY",
                    Fill::Zero => "UFFDIO_ZEROPAGE",
                };
                let errno = e.raw_os_error().unwrap_or(0);
                family.fail_with(FaultError::Install {
                    op,
                    page: first,
                    errno,
                });
                false
            }
        }
    }

    /// Serves one fault read from the userfaultfd.
    fn handle_fault(self: &Arc<Self>, family: &Family, fault: PageFault, read_at: Instant) {
        let Some(page) = self.page_of(fault.address) else {
            tracing::warn!(
                address = fault.address,
                "fault outside the registered region ignored"
            );
            return;
        };
        self.stats.fault();
        if self.failure.get().is_some() {
            self.zero_after_failure(page);
            return;
        }
        if self.is_installed(page) {
            // Installed (or being installed) since the fault was raised.
            self.stats.latency(read_at.elapsed(), false);
            self.wake(page, 1);
            return;
        }
        if self.avoid.reason(page).is_some() {
            self.zero_fill(family, fault, page, read_at);
            return;
        }
        let mut request = Vec::new();
        {
            let mut state = family.lock();
            if family.cache.contains(page) {
                drop(state);
                self.install_cached(page, read_at);
                return;
            }
            if let Some(error) = family.failed.get() {
                let error = error.clone();
                drop(state);
                self.fail(family, error);
                return;
            }
            let now = Instant::now();
            if let Some(pending) = state.requested.get_mut(&page) {
                match pending
                    .waiters
                    .iter_mut()
                    .find(|w| Arc::ptr_eq(&w.clone, self))
                {
                    Some(waiter) => {
                        waiter.fault.get_or_insert(read_at);
                    }
                    None => pending.waiters.push(Waiter {
                        clone: self.clone(),
                        fault: Some(read_at),
                    }),
                }
            } else {
                let waiter = Waiter {
                    clone: self.clone(),
                    fault: Some(read_at),
                };
                state.add_request(page, now, waiter);
                request.push(page);
                let window = u64::from(family.config.prefetch_pages);
                let previous = self.last_fetch.swap(page, Ordering::Relaxed);
                if page > previous && page - previous <= window + 1 {
                    let last = page.saturating_add(window).min(self.pages - 1);
                    for next in page + 1..=last {
                        if self.avoid.reason(next).is_some()
                            || self.is_installed(next)
                            || family.cache.contains(next)
                            || state.requested.contains_key(&next)
                        {
                            continue;
                        }
                        let waiter = Waiter {
                            clone: self.clone(),
                            fault: None,
                        };
                        state.add_request(next, now, waiter);
                        request.push(next);
                    }
                }
            }
        }
        if !request.is_empty() {
            family.source.request(family.id, &request);
        }
    }

    /// A fault on a page that reached the host cache after the fault was
    /// raised: the retried fault maps it.
    fn install_cached(self: &Arc<Self>, page: u64, read_at: Instant) {
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
    /// (`UFFDIO_ZEROPAGE`), which costs no memory until written.
    fn zero_fill(self: &Arc<Self>, family: &Family, fault: PageFault, page: u64, read_at: Instant) {
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
                if !self.fill(family, fill, first, u64::from(len)) {
                    return;
                }
                rest &= !(u64::MAX >> (64 - len) << start);
            }
        }
        self.stats.avoided(&avoid.count(claimed));
        self.stats.latency(read_at.elapsed(), false);
        self.wake(page, 1);
    }

    /// After a failure the range is normally unregistered and faults no
    /// longer come here; one that was queued before (or all of them, if
    /// unregistering failed) gets a zero page.
    fn zero_after_failure(&self, page: u64) {
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
    fn install_delivered(self: &Arc<Self>, mut list: Arrivals) {
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

    /// Fails the family with `error` (its clones share the cache, see the
    /// crate docs), and this clone too in case it already left the family.
    fn fail_with_family(self: &Arc<Self>, family: &Family, error: FaultError) {
        family.fail_with(error.clone());
        self.fail(family, error);
    }

    /// Fails the clone once: reports it, forgets its waits, and releases
    /// every fault of its region (see [`FaultError`]). Nothing happens
    /// after the handler was closed.
    fn fail(self: &Arc<Self>, family: &Family, error: FaultError) {
        if !*self.open.read().unwrap_or_else(PoisonError::into_inner) {
            return;
        }
        if self.failure.set(error.clone()).is_err() {
            return;
        }
        tracing::warn!(
            family = family.id,
            base = self.base,
            "hollow clone memory failed: {error}"
        );
        (self.on_failure)(&error);
        family.forget(self, false);
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
}

/// Serves the missing-page faults of one hollow clone on a thread of its
/// own (see the crate docs for the threading model).
pub struct FaultHandler {
    clone: Arc<CloneState>,
    family: Arc<Family>,
    stop: OwnedFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for FaultHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultHandler")
            .field("family", &self.family)
            .field("base", &format_args!("{:#x}", self.clone.base))
            .field("pages", &self.clone.pages)
            .field("failure", &self.clone.failure.get())
            .finish_non_exhaustive()
    }
}

impl FaultHandler {
    /// Registers `[region_addr, region_addr + region_len)` with a new
    /// userfaultfd and starts serving its faults from `family`, zero-filling
    /// the pages `avoid` names. `on_failure` is called once, from whichever
    /// thread notices, if the clone's memory can no longer be served; it
    /// must be quick and must not close or drop this handler.
    ///
    /// # Safety
    /// The region must be a private mapping (`MAP_PRIVATE`) of the whole of
    /// `family.cache().memfd()`, from offset 0, that nothing has touched yet,
    /// into which no Rust reference points, and it must stay mapped at this
    /// address until [`FaultHandler::close`] returned or the handler was
    /// dropped; `close` replaces it with anonymous memory of the same size,
    /// which the caller then unmaps. Until then the handler writes
    /// into the range through userfaultfd ioctls, and the kernel applies
    /// those to whatever mapping is registered there at the time, even a
    /// different one (another clone's memory mapped at the same address).
    pub unsafe fn start(
        family: Arc<Family>,
        region_addr: *mut u8,
        region_len: u64,
        avoid: AvoidMap,
        on_failure: Arc<dyn Fn(&FaultError) + Send + Sync>,
    ) -> Result<Self, StartError> {
        let base = region_addr as u64;
        let family_len = family.cache.page_count() * PAGE_SIZE;
        if base == 0 || !base.is_multiple_of(PAGE_SIZE) || region_len != family_len {
            return Err(StartError::BadRegion {
                addr: base,
                len: region_len,
                family_len,
            });
        }
        let pages = region_len / PAGE_SIZE;
        if avoid.pages() != pages {
            return Err(StartError::AvoidMismatch {
                map: avoid.pages(),
                region: pages,
            });
        }
        let uffd = sys::open_userfaultfd().map_err(StartError::Open)?;
        let offered = sys::api_handshake(&uffd).map_err(StartError::Api)?;
        check_ioctls("handshake", offered, sys::NEEDED_API_IOCTLS)?;
        let stop = sys::eventfd().map_err(StartError::EventFd)?;
        let stop_for_thread = stop.try_clone().map_err(StartError::EventFd)?;
        let ring = ring::FaultRing::new().map_err(StartError::Ring)?;
        let offered =
            sys::register(&uffd, base, region_len).map_err(|source| StartError::Register {
                addr: base,
                len: region_len,
                source,
            })?;
        let clone = Arc::new(CloneState {
            uffd,
            base,
            pages,
            installed: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            avoid,
            stats: LiveStats::new(),
            failure: OnceLock::new(),
            on_failure,
            open: RwLock::new(true),
            registered: AtomicBool::new(true),
            last_fetch: AtomicU64::new(u64::MAX),
        });
        let handler = Self {
            clone: clone.clone(),
            family: family.clone(),
            stop,
            thread: Mutex::new(None),
        };
        // From here on, dropping `handler` undoes the registration.
        check_ioctls("range", offered, sys::NEEDED_RANGE_IOCTLS)?;
        {
            let mut state = family.lock();
            if let Some(error) = family.failed.get() {
                return Err(StartError::FamilyFailed(error.clone()));
            }
            state.clones.push(Arc::downgrade(&clone));
        }
        let thread = std::thread::Builder::new()
            .name(format!("sf-faults-{:x}", family.id))
            .spawn(move || fault_thread(ring, &clone, &family, &stop_for_thread))
            .map_err(StartError::Thread)?;
        *handler
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(thread);
        Ok(handler)
    }

    /// Pages the guest allocator handed out fresh since the clone point:
    /// zero-filled when first touched, never fetched.
    pub fn mark_fresh(&self, runs: &[(u64, u64)]) {
        self.clone.avoid.mark_fresh(runs);
    }

    /// Brings `pages` here ahead of any fault (push): pages not in the host
    /// cache are requested, or added to a request in flight, and stored in
    /// the cache when they arrive, where the clone's first touch finds
    /// them without a userfault. Avoided, cached, installed and
    /// out-of-range pages are skipped. Returns how many pages went to the
    /// source.
    pub fn prefetch(&self, pages: &[u64]) -> usize {
        let clone = &self.clone;
        let family = &self.family;
        if clone.failure.get().is_some() || family.failed.get().is_some() {
            return 0;
        }
        let mut request = Vec::new();
        {
            let mut state = family.lock();
            let now = Instant::now();
            for &page in pages {
                if page >= clone.pages
                    || clone.avoid.reason(page).is_some()
                    || clone.is_installed(page)
                {
                    continue;
                }
                // Mapped by the kernel on first touch.
                if family.cache.contains(page) {
                    continue;
                }
                let waiter = Waiter {
                    clone: clone.clone(),
                    fault: None,
                };
                match state.requested.get_mut(&page) {
                    Some(pending) => {
                        if !pending.waiters.iter().any(|w| Arc::ptr_eq(&w.clone, clone)) {
                            pending.waiters.push(waiter);
                        }
                    }
                    None => {
                        state.add_request(page, now, waiter);
                        request.push(page);
                    }
                }
            }
        }
        for chunk in request.chunks(PREFETCH_REQUEST_PAGES) {
            family.source.request(family.id, chunk);
        }
        request.len()
    }

    /// Counters so far; cheap enough to call while faults are served.
    pub fn stats(&self) -> CloneStats {
        self.clone.stats.snapshot()
    }

    /// Why this clone's memory could not be served, once it could not:
    /// then the VM has run on zero-filled pages and must be discarded.
    pub fn failure(&self) -> Option<FaultError> {
        self.clone.failure.get().cloned()
    }

    pub fn family(&self) -> &Arc<Family> {
        &self.family
    }

    /// Stops serving faults: replaces the region with private anonymous
    /// zero memory in one step (`MAP_FIXED`; a fault waiting in it retries
    /// there and reads zeros) and so ends its registration, stops the fault
    /// thread (waiting at most 2 s for it) and leaves the family. Replacing
    /// rather than unregistering keeps the family's cache out of reach: a
    /// fault on a hole of an unregistered view would make the kernel put a
    /// zero page into the cache, where every sibling would map it. After
    /// this returns, the handler never touches the region again, so it may
    /// be unmapped. Stats stay readable. Idempotent; `Drop` calls it.
    pub fn close(&self) {
        {
            let mut open = self
                .clone
                .open
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if !*open {
                return;
            }
            self.clone.registered.store(false, Ordering::Release);
            let len = self.clone.pages * PAGE_SIZE;
            // SAFETY: the region is this clone's memory, which `start`'s
            // contract keeps mapped and ours until this call; the open lock
            // held for writing means no ioctl of ours runs on it meanwhile.
            match unsafe { sys::replace_with_anonymous(self.clone.base, len) } {
                // Waiting faults are not woken by the mapping going away.
                Ok(()) => {
                    if let Err(e) = sys::wake(&self.clone.uffd, self.clone.base, len) {
                        tracing::warn!("waking the faults of replaced hollow memory failed: {e}");
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "replacing hollow memory failed ({e}); unregistering it instead"
                    );
                    if let Err(e) = sys::unregister(&self.clone.uffd, self.clone.base, len) {
                        tracing::warn!("unregistering hollow memory failed: {e}");
                    }
                }
            }
            *open = false;
        }
        if let Err(e) = sys::signal(&self.stop) {
            tracing::warn!("signalling the fault thread to stop failed: {e}");
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                // A panic was reported through the death guard already.
                let _ = thread.join();
            } else {
                tracing::warn!(
                    timeout = ?STOP_TIMEOUT,
                    "fault thread did not stop in time; left to end on its own"
                );
            }
        }
        self.family.forget(&self.clone, true);
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.close();
    }
}

fn check_ioctls(what: &'static str, offered: u64, needed: u64) -> Result<(), StartError> {
    if offered & needed == needed {
        Ok(())
    } else {
        Err(StartError::MissingIoctls {
            what,
            offered,
            needed,
        })
    }
}

/// Fails the clone if the fault thread unwinds.
struct DeathGuard<'a> {
    clone: &'a Arc<CloneState>,
    family: &'a Family,
}

impl Drop for DeathGuard<'_> {
    fn drop(&mut self) {
        self.clone.fail_with_family(
            self.family,
            FaultError::HandlerDied {
                reason: "the fault thread panicked".into(),
            },
        );
    }
}

fn fault_thread(ring: ring::FaultRing, clone: &Arc<CloneState>, family: &Family, stop: &OwnedFd) {
    let guard = DeathGuard { clone, family };
    let result = ring.run(&clone.uffd, stop, |event| match event {
        ring::Event::Faults { faults, read_at } => {
            for &fault in faults {
                clone.handle_fault(family, fault, read_at);
            }
        }
        ring::Event::Tick => family.check_deadlines(Instant::now()),
    });
    std::mem::forget(guard);
    if let Err(e) = result {
        clone.fail_with_family(
            family,
            FaultError::HandlerDied {
                reason: format!("reading faults failed: {e}"),
            },
        );
    }
}
