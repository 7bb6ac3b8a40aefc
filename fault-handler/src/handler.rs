//! The fault loop of a hollow clone and the clone point ([`Family`]) its
//! pages come from.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};

use crate::avoid::AvoidMap;
use crate::cache::{CacheError, PageCache};
use crate::stats::{CloneStats, FamilyStats, LiveStats};
use crate::{PAGE_SIZE, sys};

/// How often the fault loop checks request deadlines.
const DEADLINE_TICK: Duration = Duration::from_millis(50);
/// Avoided pages are zero-filled in aligned windows of this many pages
/// around a fault, so that a run of fresh or zero pages costs one fault.
const ZERO_WINDOW: u64 = 64;
/// Fault messages read at once.
const MSGS_PER_READ: usize = 32;

/// Asks the parent's memory server for pages. Answers come back through
/// [`Family::deliver_batch`] or [`Family::fail`]; `request` must not call
/// either itself (it runs under no lock, but on the fault thread).
pub trait PageSource: Send + Sync {
    fn request(&self, family: u64, pages: &[u64]);
}

/// Fetch settings of a clone point.
#[derive(Debug, Clone, Copy)]
pub struct FetchConfig {
    /// A page not delivered within this time fails every clone of the family.
    pub fetch_timeout: Duration,
    /// Data pages requested after a faulting page when missing here.
    pub prefetch_pages: u32,
}

/// Why a clone's memory can no longer be served. Once set, the clone's
/// range is unregistered: its faults no longer wait, and the VM must be
/// discarded (see [`FaultHandler::failure`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("memory server lost: {0}")]
    SourceLost(String),
    #[error("page {page:#x} was not delivered within {timeout:?}")]
    Timeout { page: u64, timeout: Duration },
    #[error("the fault handler thread ended: {0}")]
    HandlerDied(String),
    #[error("installing page {page:#x} failed: {reason}")]
    Install { page: u64, reason: String },
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
    #[error("creating the userfaultfd failed")]
    Userfaultfd(#[source] std::io::Error),
    #[error("registering the region with userfaultfd failed")]
    Register(#[source] std::io::Error),
    #[error("creating the stop eventfd failed")]
    EventFd(#[source] std::io::Error),
    #[error("starting the fault thread failed")]
    Thread(#[source] std::io::Error),
}

struct Pending {
    since: Instant,
    waiters: Vec<Arc<CloneState>>,
}

#[derive(Default)]
struct FamilyState {
    requested: HashMap<u64, Pending>,
    clones: Vec<Weak<CloneState>>,
}

/// One clone point on this host: its page cache, where missing pages come
/// from, and which clones wait for which pages.
pub struct Family {
    id: u64,
    cache: PageCache,
    source: Arc<dyn PageSource>,
    config: FetchConfig,
    state: Mutex<FamilyState>,
    failed: OnceLock<FaultError>,
    received: AtomicU64,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field("id", &format_args!("{:#x}", self.id))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Family {
    pub fn new(
        id: u64,
        mem_size: u64,
        source: Arc<dyn PageSource>,
        config: FetchConfig,
    ) -> Result<Arc<Self>, CacheError> {
        Ok(Arc::new(Self {
            id,
            cache: PageCache::new(mem_size)?,
            source,
            config,
            state: Mutex::new(FamilyState::default()),
            failed: OnceLock::new(),
            received: AtomicU64::new(0),
        }))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn cache(&self) -> &PageCache {
        &self.cache
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FamilyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pages arrived: each goes into the host cache once, then into every
    /// clone that asked for it, with `UFFDIO_COPY` and `DONTWAKE`; each
    /// clone's faulting pages are woken after its whole batch is in.
    pub fn deliver_batch(&self, pages: &[(u64, &[u8])]) {
        for &(page, data) in pages {
            if self.cache.insert(page, data) {
                self.received.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut installs: Vec<(Arc<CloneState>, Vec<u64>)> = Vec::new();
        {
            let mut state = self.lock();
            for &(page, _) in pages {
                let Some(pending) = state.requested.remove(&page) else {
                    continue;
                };
                for waiter in pending.waiters {
                    match installs.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &waiter)) {
                        Some((_, list)) => list.push(page),
                        None => installs.push((waiter, vec![page])),
                    }
                }
            }
        }
        for (clone, list) in installs {
            clone.install_fetched(&self.cache, &list);
        }
    }

    /// The page source is gone: every clone of the family fails.
    pub fn fail(&self, reason: String) {
        self.fail_with(FaultError::SourceLost(reason));
    }

    fn fail_with(&self, error: FaultError) {
        let _ = self.failed.set(error.clone());
        let clones: Vec<Arc<CloneState>> = {
            let mut state = self.lock();
            state.requested.clear();
            state.clones.iter().filter_map(Weak::upgrade).collect()
        };
        for clone in clones {
            clone.fail(error.clone());
        }
    }

    fn check_deadlines(&self) {
        let timeout = self.config.fetch_timeout;
        let late = {
            let state = self.lock();
            state
                .requested
                .iter()
                .find(|(_, p)| p.since.elapsed() > timeout)
                .map(|(&page, _)| page)
        };
        if let Some(page) = late {
            tracing::warn!(
                family = self.id,
                page,
                ?timeout,
                "page not delivered in time"
            );
            self.fail_with(FaultError::Timeout { page, timeout });
        }
    }

    pub fn stats(&self) -> FamilyStats {
        let state = self.lock();
        FamilyStats {
            family: self.id,
            pages_received: self.received.load(Ordering::Relaxed),
            resident_pages: self.cache.resident_pages(),
            outstanding: state.requested.len() as u64,
            clones: state.clones.iter().filter(|c| c.strong_count() > 0).count() as u64,
        }
    }
}

/// Everything about one clone the fault thread and the deliverers share.
struct CloneState {
    uffd: OwnedFd,
    base: u64,
    pages: u64,
    installed: Vec<AtomicU64>,
    avoid: AvoidMap,
    /// Pages with a fault waiting for the network, and when it was read.
    faulted: Mutex<HashMap<u64, Instant>>,
    stats: LiveStats,
    failure: OnceLock<FaultError>,
    on_failure: Arc<dyn Fn(&FaultError) + Send + Sync>,
    registered: AtomicBool,
    /// The page of the last fault that went to the network.
    last_fetch: AtomicU64,
}

impl CloneState {
    fn addr(&self, page: u64) -> u64 {
        self.base + page * PAGE_SIZE
    }

    fn is_installed(&self, page: u64) -> bool {
        self.installed[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Claims `page` for installing; false if someone already did.
    fn claim(&self, page: u64) -> bool {
        let bit = 1 << (page % 64);
        self.installed[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn wake(&self, page: u64, count: u64) {
        if let Err(e) = sys::wake(&self.uffd, self.addr(page), count * PAGE_SIZE) {
            tracing::debug!(page, "wake failed: {e}");
        }
    }

    /// Copies a cached page into the clone.
    fn install_from_cache(&self, cache: &PageCache, page: u64, wake: bool) {
        if !self.claim(page) {
            if wake {
                self.wake(page, 1);
            }
            return;
        }
        let Some(src) = cache.page_ptr(page) else {
            return;
        };
        // SAFETY: `src` is a present page of the cache, which lives as long
        // as the family and is never written again.
        let done = unsafe { sys::copy(&self.uffd, self.addr(page), src, PAGE_SIZE, wake) };
        if let Err(e) = done {
            self.fail(FaultError::Install {
                page,
                reason: e.to_string(),
            });
        }
    }

    fn install_fetched(&self, cache: &PageCache, pages: &[u64]) {
        if self.failure.get().is_some() {
            return;
        }
        for &page in pages {
            self.install_from_cache(cache, page, false);
        }
        let woken: Vec<(u64, Instant)> = {
            let mut faulted = self.faulted.lock().unwrap_or_else(|p| p.into_inner());
            pages
                .iter()
                .filter_map(|p| faulted.remove(p).map(|at| (*p, at)))
                .collect()
        };
        // Counted before waking, so that a woken guest sees its own stats.
        self.stats
            .fetched(pages.len() as u64, (pages.len() - woken.len()) as u64);
        for &(page, at) in &woken {
            self.stats.latency(at.elapsed(), true);
            self.wake(page, 1);
        }
    }

    /// Zero-fills the avoided, not yet installed pages of `page`'s window
    /// without waking `page`'s fault.
    fn zero_fill(&self, page: u64) -> u64 {
        let start = page / ZERO_WINDOW * ZERO_WINDOW;
        let end = (start + ZERO_WINDOW).min(self.pages);
        let mut filled = 0;
        let mut run: Option<(u64, u64)> = None;
        let flush = |run: (u64, u64)| {
            if let Err(e) = sys::zeropage(&self.uffd, self.addr(run.0), run.1 * PAGE_SIZE, false) {
                tracing::debug!(page = run.0, "zero-fill failed: {e}");
            }
        };
        for p in start..end {
            let avoided = p == page || self.avoid.reason(p).is_some();
            if avoided && !self.is_installed(p) && self.claim(p) {
                filled += 1;
                run = match run {
                    Some((s, n)) if s + n == p => Some((s, n + 1)),
                    Some(r) => {
                        flush(r);
                        Some((p, 1))
                    }
                    None => Some((p, 1)),
                };
            } else if let Some(r) = run.take() {
                flush(r);
            }
        }
        if let Some(r) = run {
            flush(r);
        }
        filled
    }

    fn handle_fault(self: &Arc<Self>, family: &Family, addr: u64, read_at: Instant) {
        let Some(offset) = addr.checked_sub(self.base) else {
            return;
        };
        let page = offset / PAGE_SIZE;
        if page >= self.pages {
            return;
        }
        self.stats.fault();
        if self.is_installed(page) {
            self.wake(page, 1);
            return;
        }
        if let Some(reason) = self.avoid.reason(page) {
            let filled = self.zero_fill(page);
            self.stats.avoided(reason, filled);
            self.stats.latency(read_at.elapsed(), false);
            self.wake(page, 1);
            return;
        }
        let mut request = Vec::new();
        {
            let mut state = family.lock();
            if family.cache.contains(page) {
                drop(state);
                self.stats.cache_hit();
                self.stats.latency(read_at.elapsed(), false);
                self.install_from_cache(&family.cache, page, true);
                return;
            }
            if let Some(error) = family.failed.get() {
                drop(state);
                self.fail(error.clone());
                return;
            }
            self.faulted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(page, read_at);
            match state.requested.get_mut(&page) {
                Some(pending) => {
                    if !pending.waiters.iter().any(|w| Arc::ptr_eq(w, self)) {
                        pending.waiters.push(self.clone());
                    }
                }
                None => {
                    state.requested.insert(
                        page,
                        Pending {
                            since: read_at,
                            waiters: vec![self.clone()],
                        },
                    );
                    request.push(page);
                    // Prefetch only for a sequential pattern: this fault lies
                    // just past the previous fetched fault's window.
                    let window = u64::from(family.config.prefetch_pages);
                    let previous = self.last_fetch.swap(page, Ordering::Relaxed);
                    let sequential = page > previous && page - previous <= window + 1;
                    let last = if sequential {
                        (page + window).min(self.pages - 1)
                    } else {
                        page
                    };
                    for next in page + 1..=last {
                        if self.avoid.reason(next).is_some()
                            || self.is_installed(next)
                            || family.cache.contains(next)
                            || state.requested.contains_key(&next)
                        {
                            continue;
                        }
                        state.requested.insert(
                            next,
                            Pending {
                                since: read_at,
                                waiters: vec![self.clone()],
                            },
                        );
                        request.push(next);
                    }
                }
            }
        }
        if !request.is_empty() {
            family.source.request(family.id, &request);
        }
    }

    /// Fails the clone once: reports it, then unregisters the range so no
    /// fault of this clone waits any longer.
    fn fail(&self, error: FaultError) {
        if self.failure.set(error.clone()).is_err() {
            return;
        }
        tracing::warn!("hollow clone memory failed: {error}");
        (self.on_failure)(&error);
        self.unregister();
    }

    fn unregister(&self) {
        if self.registered.swap(false, Ordering::AcqRel)
            && let Err(e) = sys::unregister(&self.uffd, self.base, self.pages * PAGE_SIZE)
        {
            tracing::debug!("unregistering hollow memory failed: {e}");
        }
    }
}

/// Serves the missing-page faults of one hollow clone on a thread of its own.
pub struct FaultHandler {
    clone: Arc<CloneState>,
    family: Arc<Family>,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultHandler")
            .field("family", &self.family)
            .field("base", &format_args!("{:#x}", self.clone.base))
            .finish_non_exhaustive()
    }
}

impl FaultHandler {
    /// Registers `[region_addr, region_addr + region_len)` with a new
    /// userfaultfd and starts serving its faults from `family`, zero-filling
    /// the pages `avoid` names. `on_failure` is called once if the clone's
    /// memory can no longer be served (then the range is unregistered).
    ///
    /// # Safety
    /// The region must be a private anonymous mapping of this process that
    /// nothing has touched yet. The handler writes to it only through
    /// userfaultfd ioctls, which the kernel checks, so the region may be
    /// unmapped before the handler drops (its ioctls then fail harmlessly).
    pub unsafe fn start(
        family: Arc<Family>,
        region_addr: *mut u8,
        region_len: u64,
        avoid: AvoidMap,
        on_failure: Arc<dyn Fn(&FaultError) + Send + Sync>,
    ) -> Result<Self, StartError> {
        let base = region_addr as u64;
        let family_len = family.cache.page_count() * PAGE_SIZE;
        if !base.is_multiple_of(PAGE_SIZE) || region_len != family_len {
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
        let uffd = sys::open_userfaultfd().map_err(StartError::Userfaultfd)?;
        sys::register(&uffd, base, region_len).map_err(StartError::Register)?;
        let clone = Arc::new(CloneState {
            uffd,
            base,
            pages,
            installed: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            avoid,
            faulted: Mutex::new(HashMap::new()),
            stats: LiveStats::new(),
            failure: OnceLock::new(),
            on_failure,
            registered: AtomicBool::new(true),
            last_fetch: AtomicU64::new(u64::MAX),
        });
        family.lock().clones.push(Arc::downgrade(&clone));
        if let Some(error) = family.failed.get() {
            clone.fail(error.clone());
        }
        let stop = sys::eventfd().map_err(StartError::EventFd)?;
        let stop_for_thread = stop.try_clone().map_err(StartError::EventFd)?;
        let (c, f) = (clone.clone(), family.clone());
        let thread = std::thread::Builder::new()
            .name("sf-faults".into())
            .spawn(move || {
                let guard = DeathGuard(c.clone());
                let result = fault_loop(&c, &f, &stop_for_thread);
                if let Err(e) = result {
                    c.fail(FaultError::HandlerDied(e.to_string()));
                }
                std::mem::forget(guard);
            })
            .map_err(StartError::Thread)?;
        Ok(Self {
            clone,
            family,
            stop,
            thread: Some(thread),
        })
    }

    /// Pages the guest allocator handed out fresh: zero-filled, not fetched.
    pub fn mark_fresh(&self, runs: &[(u64, u64)]) {
        self.clone.avoid.mark_fresh(runs);
    }

    pub fn stats(&self) -> CloneStats {
        self.clone.stats.snapshot()
    }

    /// Why this clone's memory could not be served, once it could not.
    pub fn failure(&self) -> Option<FaultError> {
        self.clone.failure.get().cloned()
    }

    pub fn family(&self) -> &Arc<Family> {
        &self.family
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        sys::signal(&self.stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.clone.unregister();
        let mut state = self.family.lock();
        state.clones.retain(|c| {
            c.strong_count() > 0 && !std::ptr::eq(c.as_ptr(), Arc::as_ptr(&self.clone))
        });
        for pending in state.requested.values_mut() {
            pending.waiters.retain(|w| !Arc::ptr_eq(w, &self.clone));
        }
    }
}

/// Fails the clone if the fault thread unwinds.
struct DeathGuard(Arc<CloneState>);

impl Drop for DeathGuard {
    fn drop(&mut self) {
        self.0
            .fail(FaultError::HandlerDied("the fault thread panicked".into()));
    }
}

const READ_FAULTS: u64 = 1;
const READ_STOP: u64 = 2;
const TICK: u64 = 3;

fn fault_loop(clone: &Arc<CloneState>, family: &Family, stop: &OwnedFd) -> std::io::Result<()> {
    let mut ring = IoUring::new(8)?;
    let mut msgs = [sys::UffdMsg::default(); MSGS_PER_READ];
    let mut stop_buf = [0u8; 8];
    let tick = types::Timespec::from(DEADLINE_TICK);
    let read_faults = |msgs: &mut [sys::UffdMsg; MSGS_PER_READ]| {
        opcode::Read::new(
            types::Fd(clone.uffd.as_raw_fd()),
            msgs.as_mut_ptr().cast(),
            (MSGS_PER_READ * sys::MSG_SIZE) as u32,
        )
        .build()
        .user_data(READ_FAULTS)
    };
    let entries = [
        read_faults(&mut msgs),
        opcode::Read::new(types::Fd(stop.as_raw_fd()), stop_buf.as_mut_ptr(), 8)
            .build()
            .user_data(READ_STOP),
        opcode::Timeout::new(&tick).build().user_data(TICK),
    ];
    for entry in &entries {
        // SAFETY: every buffer and the timespec named by these entries live
        // on this stack frame until the loop returns, and each is reused
        // only after its completion was reaped.
        unsafe { ring.submission().push(entry) }.map_err(std::io::Error::other)?;
    }
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (what, result) in done {
            let next = match what {
                READ_STOP => return Ok(()),
                READ_FAULTS => {
                    if result > 0 {
                        let read_at = Instant::now();
                        let count = result as usize / sys::MSG_SIZE;
                        for msg in &msgs[..count] {
                            if msg.event == sys::EVENT_PAGEFAULT {
                                clone.handle_fault(family, msg.address, read_at);
                            }
                        }
                    } else if result != -libc::EAGAIN && result != -libc::EINTR {
                        return Err(std::io::Error::from_raw_os_error(-result));
                    }
                    read_faults(&mut msgs)
                }
                _ => {
                    family.check_deadlines();
                    opcode::Timeout::new(&tick).build().user_data(TICK)
                }
            };
            // SAFETY: as above; the entry's buffer is free again because its
            // previous operation completed just now.
            unsafe { ring.submission().push(&next) }.map_err(std::io::Error::other)?;
        }
    }
}
