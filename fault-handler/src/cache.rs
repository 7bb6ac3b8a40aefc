//! The host page cache of one clone point: each page fetched from the
//! parent's memory server is stored once per host, for all its clones here.
//! The cache is a memfd, and every hollow clone of the clone point on this
//! host maps it privately as its guest memory: a stored page *is* the
//! clones' memory until one of them writes it (copy-on-write).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::collapse::{self, CollapseTarget};
use crate::{PAGE_SIZE, shmem_policy, sys};

/// Pages of one 2 MiB block.
pub(crate) const BLOCK_PAGES: u64 = sys::HUGE_BLOCK / PAGE_SIZE;

/// When the complete 2 MiB blocks of a host page cache move into huge pages
/// (see `collapse`): a clone's first touch of a huge page maps all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugeBlocks {
    /// Never: the cache stays in 4 KiB pages.
    Off,
    /// When the cache's clones have all ended
    /// ([`PageCache::collapse_complete_blocks`]), for the next clones.
    WhenIdle,
    /// Also each block as it completes, by the thread that stored its last
    /// page, before that thread's caller wakes the faults waiting for it:
    /// for caches that fetch whole blocks, whose clones then never map a
    /// block in 4 KiB pages first (collapsing a block clones have mapped
    /// unmaps it from each of them).
    OnArrival,
}

/// A failure to create a page cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "family {family:#x}: memory size {mem_size:#x} is not a positive multiple of the page size"
    )]
    BadSize { family: u64, mem_size: u64 },
    #[error(
        "family {family:#x}: the kernel's THP policy ({policy}) would store a page written into \
         a host page cache in a larger folio and zero the rest, which clones would read instead \
         of their missing pages; set it to advise or never (scripts/deps.sh sets advise)"
    )]
    LargeFolioWrites { family: u64, policy: String },
    #[error("family {family:#x}: creating a {mem_size:#x}-byte memfd failed")]
    Memfd {
        family: u64,
        mem_size: u64,
        #[source]
        source: std::io::Error,
    },
}

/// A page that cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    #[error("page {page:#x} is outside the {pages:#x} pages of the clone point")]
    OutOfRange { page: u64, pages: u64 },
    #[error("page {page:#x} has {len} bytes, not {PAGE_SIZE}")]
    BadLength { page: u64, len: usize },
    #[error("writing page {page:#x} into the cache failed: {reason}")]
    Write { page: u64, reason: String },
}

/// Pages of one clone point on this host: a memfd whose holes are the pages
/// not here yet, and two bits per page.
///
/// **Why pages are written with `pwritev`.** Clones map the memfd
/// `MAP_PRIVATE`, so the kernel maps a page that is in the memfd into a
/// clone on its first touch, without asking the fault handler; a page must
/// therefore never be visible half written. `pwritev` of a whole page at a
/// page-aligned offset allocates the page locked and not up to date, copies
/// all of it, then marks it up to date and unlocks it; a concurrent fault
/// waits on the page lock and sees the complete page. (A short copy, which
/// could expose a partly zero page, happens only if a source page is not
/// resident; sources are UMEM frames, receive buffers and heap buffers,
/// resident by construction.) A page is written as one `pwritev` of its
/// parts, so the parts may be the fragments of a page as they arrived: the
/// kernel copies each byte once, from the receive buffer into the page.
///
/// Memory ordering: an inserter first *claims* the page (`fetch_or` on the
/// claim bit, `AcqRel`); only the thread that set the bit writes the page,
/// so no two threads write it. After writing it sets the *present* bit with
/// `Release`; [`PageCache::contains`] tests it with `Acquire`. Present pages
/// are never written again. A second inserter of a page that is claimed but
/// not present yet gets `false` at once, without waiting.
#[derive(Debug)]
pub struct PageCache {
    family: u64,
    memfd: OwnedFd,
    pages: u64,
    claimed: Box<[AtomicU64]>,
    present: Box<[AtomicU64]>,
    /// Pages this host asked the parent's server for (any clone, any
    /// time): a present page without the bit arrived unasked (pushed).
    requested: Box<[AtomicU64]>,
    resident: AtomicU64,
    /// Present pages per whole 2 MiB block, when complete blocks are to be
    /// held in huge pages (see `collapse`); empty otherwise. A block handed
    /// to the collapse worker, or collapsed on arrival, counts one more than
    /// its pages.
    block_present: Box<[AtomicU32]>,
    collapse: Option<Arc<CollapseTarget>>,
    collapse_on_arrival: bool,
}

/// Claims a complete block for its collapse: its count moves past
/// [`BLOCK_PAGES`] once, so only one caller gets true; no page is counted
/// after its block is complete.
fn take_complete(count: &AtomicU32) -> bool {
    let complete = BLOCK_PAGES as u32;
    count
        .compare_exchange(complete, complete + 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Most parts one `pwritev` of [`PageCache::insert_batch`] takes (the
/// kernel's `IOV_MAX`).
pub const MAX_RUN_IOVECS: usize = 1024;

fn bit(page: u64) -> (usize, u64) {
    ((page / 64) as usize, 1 << (page % 64))
}

impl PageCache {
    /// An empty cache for clone point `family` of `mem_size` bytes, whose
    /// complete 2 MiB blocks go to huge pages as `huge_blocks` says (where
    /// the kernel allows it).
    pub fn new(family: u64, mem_size: u64, huge_blocks: HugeBlocks) -> Result<Self, CacheError> {
        if mem_size == 0 || !mem_size.is_multiple_of(PAGE_SIZE) {
            return Err(CacheError::BadSize { family, mem_size });
        }
        if let Some(policy) = shmem_policy::large_write_folios() {
            return Err(CacheError::LargeFolioWrites { family, policy });
        }
        let memfd =
            sys::memfd(c"snowflock-page-cache", mem_size).map_err(|source| CacheError::Memfd {
                family,
                mem_size,
                source,
            })?;
        let pages = mem_size / PAGE_SIZE;
        let words = || (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let collapse = if huge_blocks != HugeBlocks::Off && pages >= BLOCK_PAGES {
            match sys::SharedView::new(&memfd, mem_size) {
                Ok(view) => Some(Arc::new(CollapseTarget::new(view))),
                Err(e) => {
                    tracing::warn!(family, "the page cache stays in 4 KiB pages: {e}");
                    None
                }
            }
        } else {
            None
        };
        let blocks = if collapse.is_some() {
            pages / BLOCK_PAGES
        } else {
            0
        };
        Ok(Self {
            family,
            memfd,
            pages,
            claimed: words(),
            present: words(),
            requested: words(),
            resident: AtomicU64::new(0),
            block_present: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            collapse,
            collapse_on_arrival: huge_blocks == HugeBlocks::OnArrival,
        })
    }

    /// Counts a newly present page in its block; collapses the block here
    /// if the page completed it and blocks are collapsed on arrival.
    fn count_in_block(&self, page: u64) {
        let block = page / BLOCK_PAGES;
        let Some(count) = self.block_present.get(block as usize) else {
            return;
        };
        let stored = count.fetch_add(1, Ordering::AcqRel) + 1;
        if stored == BLOCK_PAGES as u32
            && self.collapse_on_arrival
            && let Some(target) = &self.collapse
            && take_complete(count)
        {
            collapse::collapse_now(target, block);
        }
    }

    /// Hands every complete 2 MiB block not handed over before to the
    /// collapse worker, which moves it into a huge page in the background
    /// (see `collapse`); returns how many it handed over. For a cache whose
    /// clones have all ended: collapsing unmaps the block from every clone
    /// that mapped it.
    pub fn collapse_complete_blocks(&self) -> u64 {
        let Some(target) = &self.collapse else {
            return 0;
        };
        let mut handed = 0;
        for (block, count) in self.block_present.iter().enumerate() {
            if take_complete(count) {
                collapse::submit(target, block as u64);
                handed += 1;
            }
        }
        handed
    }

    /// 2 MiB blocks held in huge pages, blocks the kernel kept in 4 KiB
    /// pages, and complete blocks the collapse worker had no room for.
    pub fn huge_block_counts(&self) -> (u64, u64, u64) {
        self.collapse.as_ref().map_or((0, 0, 0), |t| {
            (
                t.collapsed.load(Ordering::Relaxed),
                t.refused.load(Ordering::Relaxed),
                t.dropped.load(Ordering::Relaxed),
            )
        })
    }

    pub fn family(&self) -> u64 {
        self.family
    }

    /// The memfd that clones map `MAP_PRIVATE` (whole, from offset 0) as
    /// their guest memory. Nobody may write it but this cache.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Pages of the clone point (present or not).
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// Whether page `page` is stored.
    pub fn contains(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (word, mask) = bit(page);
        self.present[word].load(Ordering::Acquire) & mask != 0
    }

    /// Stores several pages, each the concatenation of its parts (exactly
    /// one page): the pages this call claims are written in runs of
    /// consecutive pages, one `pwritev` per run (at most [`MAX_RUN_IOVECS`]
    /// parts), so a batch of neighbouring pages costs one system call. Each
    /// page is still written whole by the kernel before anyone can map it
    /// (see the type's docs). Returns how many pages this call stored: a
    /// page already stored, or being stored by another thread right now, is
    /// skipped without waiting. On an error, no page of the failing run is
    /// stored.
    pub fn insert_batch(&self, pages: &[(u64, &[&[u8]])]) -> Result<u64, InsertError> {
        for &(page, parts) in pages {
            if page >= self.pages {
                return Err(InsertError::OutOfRange {
                    page,
                    pages: self.pages,
                });
            }
            let len: usize = parts.iter().map(|p| p.len()).sum();
            if len != PAGE_SIZE as usize {
                return Err(InsertError::BadLength { page, len });
            }
        }
        let mut claimed: Vec<(u64, &[&[u8]])> = pages
            .iter()
            .filter(|&&(page, _)| {
                let (word, mask) = bit(page);
                self.claimed[word].fetch_or(mask, Ordering::AcqRel) & mask == 0
            })
            .copied()
            .collect();
        claimed.sort_unstable_by_key(|&(page, _)| page);
        let mut stored = 0u64;
        let mut rest = &claimed[..];
        while let Some(&(first, _)) = rest.first() {
            let mut end = 1;
            let mut iovecs = rest[0].1.len();
            while end < rest.len()
                && rest[end].0 == first + end as u64
                && iovecs + rest[end].1.len() <= MAX_RUN_IOVECS
            {
                iovecs += rest[end].1.len();
                end += 1;
            }
            let (run, tail) = rest.split_at(end);
            rest = tail;
            let parts: Vec<&[u8]> = run
                .iter()
                .flat_map(|&(_, parts)| parts.iter().copied())
                .collect();
            if let Err(error) = sys::write_parts_at(&self.memfd, &parts, first * PAGE_SIZE) {
                for &(page, _) in run.iter().chain(rest) {
                    let (word, mask) = bit(page);
                    self.claimed[word].fetch_and(!mask, Ordering::AcqRel);
                }
                return Err(InsertError::Write {
                    page: first,
                    reason: error.to_string(),
                });
            }
            for &(page, _) in run {
                let (word, mask) = bit(page);
                self.present[word].fetch_or(mask, Ordering::Release);
                self.count_in_block(page);
            }
            stored += run.len() as u64;
        }
        self.resident.fetch_add(stored, Ordering::Relaxed);
        Ok(stored)
    }

    /// A copy of present page `page`, or `None` if it is not stored.
    pub fn read_page(&self, page: u64) -> Option<Vec<u8>> {
        if !self.contains(page) {
            return None;
        }
        let mut data = vec![0u8; PAGE_SIZE as usize];
        sys::read_exact_at(&self.memfd, &mut data, page * PAGE_SIZE).ok()?;
        Some(data)
    }

    /// Pages stored.
    pub fn resident_pages(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    /// Notes that this host asked for `pages` (called before the request
    /// goes out, so a page that arrives for it is never taken as pushed).
    pub fn mark_requested(&self, pages: &[u64]) {
        for &page in pages.iter().filter(|&&p| p < self.pages) {
            let (word, mask) = bit(page);
            self.requested[word].fetch_or(mask, Ordering::Relaxed);
        }
    }

    /// Whether page `page` is stored and arrived without this host asking
    /// for it.
    pub fn arrived_unrequested(&self, page: u64) -> bool {
        if !self.contains(page) {
            return false;
        }
        let (word, mask) = bit(page);
        self.requested[word].load(Ordering::Relaxed) & mask == 0
    }

    /// Pages stored that arrived without this host asking for them.
    pub fn unrequested_pages(&self) -> u64 {
        self.present
            .iter()
            .zip(&self.requested)
            .map(|(present, requested)| {
                let present = present.load(Ordering::Acquire);
                (present & !requested.load(Ordering::Relaxed)).count_ones() as u64
            })
            .sum()
    }

    /// The stored pages as runs `(first page, count)` in address order: a
    /// page in a run stays stored for the cache's life, so mapping these
    /// into a clone's view never touches a hole.
    pub fn present_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, word) in self.present.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == page => *count += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;

    /// Stores one page from its parts; whether this call stored it.
    fn store(cache: &PageCache, page: u64, parts: &[&[u8]]) -> Result<bool, InsertError> {
        Ok(cache.insert_batch(&[(page, parts)])? == 1)
    }

    #[test]
    fn pages_are_stored_once_and_bad_pages_refused() {
        let cache = PageCache::new(9, 16 * PAGE_SIZE, HugeBlocks::Off).unwrap();
        let page = vec![7u8; PAGE_SIZE as usize];
        assert!(!cache.contains(3));
        assert!(cache.read_page(3).is_none());
        assert_eq!(store(&cache, 3, &[&page]), Ok(true));
        assert_eq!(store(&cache, 3, &[&[1u8; PAGE_SIZE as usize]]), Ok(false));
        assert_eq!(cache.read_page(3).unwrap(), page);
        assert_eq!(
            store(&cache, 16, &[&page]),
            Err(InsertError::OutOfRange {
                page: 16,
                pages: 16
            })
        );
        assert_eq!(
            store(&cache, 4, &[&page[..10]]),
            Err(InsertError::BadLength { page: 4, len: 10 })
        );
        assert!(!cache.contains(u64::MAX));
        assert_eq!(cache.resident_pages(), 1);
        assert_eq!(cache.family(), 9);
    }

    #[test]
    fn a_page_is_stored_from_its_parts() {
        let cache = PageCache::new(1, 4 * PAGE_SIZE, HugeBlocks::Off).unwrap();
        let first = vec![1u8; 1416];
        let second = vec![2u8; 1416];
        let third = vec![3u8; PAGE_SIZE as usize - 2 * 1416];
        assert_eq!(store(&cache, 2, &[&first, &second, &third]), Ok(true));
        let expected = [first, second, third].concat();
        assert_eq!(cache.read_page(2).unwrap(), expected);
        assert_eq!(
            store(&cache, 1, &[&expected[..100], &expected[..100]]),
            Err(InsertError::BadLength { page: 1, len: 200 })
        );
        assert!(!cache.contains(1));
    }

    #[test]
    fn a_batch_is_written_in_runs_and_each_page_once() {
        let cache = PageCache::new(1, 16 * PAGE_SIZE, HugeBlocks::Off).unwrap();
        let data: Vec<Vec<u8>> = (0..16u8).map(|p| vec![p; PAGE_SIZE as usize]).collect();
        let halves = |p: usize| -> Vec<&[u8]> {
            let (a, b) = data[p].split_at(1000);
            vec![a, b]
        };
        assert_eq!(store(&cache, 5, &[&data[5]]), Ok(true));
        let parts: Vec<(u64, Vec<&[u8]>)> = [9, 4, 5, 6, 12, 7]
            .iter()
            .map(|&p| (p, halves(p as usize)))
            .collect();
        let batch: Vec<(u64, &[&[u8]])> = parts.iter().map(|(p, v)| (*p, &v[..])).collect();
        assert_eq!(cache.insert_batch(&batch), Ok(5), "page 5 was there");
        for p in [4, 5, 6, 7, 9, 12] {
            assert_eq!(cache.read_page(p).unwrap(), data[p as usize], "page {p}");
        }
        assert!(!cache.contains(8));
        assert_eq!(cache.resident_pages(), 6);
        let bad: Vec<(u64, &[&[u8]])> = vec![(2, &batch[0].1[..1])];
        assert!(matches!(
            cache.insert_batch(&bad),
            Err(InsertError::BadLength { page: 2, .. })
        ));
        assert!(!cache.contains(2));
    }

    #[test]
    fn present_runs_and_unrequested_pages() {
        let cache = PageCache::new(1, 200 * PAGE_SIZE, HugeBlocks::Off).unwrap();
        let page = vec![1u8; PAGE_SIZE as usize];
        cache.mark_requested(&[3, 64, 500]);
        for p in [3, 4, 5, 63, 64, 65, 130] {
            assert_eq!(store(&cache, p, &[&page]), Ok(true));
        }
        assert_eq!(
            cache.present_runs(),
            vec![(3, 3), (63, 3), (130, 1)],
            "runs cross word boundaries"
        );
        assert!(!cache.arrived_unrequested(3));
        assert!(cache.arrived_unrequested(4));
        assert!(!cache.arrived_unrequested(6), "not stored");
        assert_eq!(cache.unrequested_pages(), 5);
    }

    /// Page `p`'s contents in the block tests.
    fn pattern(p: u64) -> Vec<u8> {
        vec![(p % 251) as u8 + 1; PAGE_SIZE as usize]
    }

    /// Stores `range` in one batch, each page holding its [`pattern`].
    fn insert_pattern(cache: &PageCache, range: std::ops::Range<u64>) {
        let pages: Vec<(u64, Vec<u8>)> = range.map(|p| (p, pattern(p))).collect();
        let parts: Vec<[&[u8]; 1]> = pages.iter().map(|(_, d)| [&d[..]]).collect();
        let batch: Vec<(u64, &[&[u8]])> = pages
            .iter()
            .zip(&parts)
            .map(|((p, _), v)| (*p, &v[..]))
            .collect();
        cache.insert_batch(&batch).unwrap();
    }

    #[test]
    fn only_complete_blocks_go_to_huge_pages_and_keep_their_contents() {
        let cache = PageCache::new(1, 2 * BLOCK_PAGES * PAGE_SIZE, HugeBlocks::WhenIdle).unwrap();
        // All of block 0, in two batches; block 1 with holes.
        for range in [0..300, 300..BLOCK_PAGES, BLOCK_PAGES..BLOCK_PAGES + 100] {
            insert_pattern(&cache, range);
        }
        assert_eq!(cache.collapse_complete_blocks(), 1, "block 0 only");
        assert_eq!(cache.collapse_complete_blocks(), 0, "handed over once");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let handled = || {
            let (collapsed, refused, dropped) = cache.huge_block_counts();
            assert_eq!(dropped, 0);
            collapsed + refused
        };
        while handled() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(handled(), 1, "block 0 was handed over, block 1 never");
        for p in (0..BLOCK_PAGES + 100).step_by(37) {
            assert_eq!(cache.read_page(p), Some(pattern(p)), "page {p}");
        }
        assert!(!cache.contains(BLOCK_PAGES + 100));
        assert!(cache.read_page(2 * BLOCK_PAGES - 1).is_none());
        let small = PageCache::new(1, 16 * PAGE_SIZE, HugeBlocks::WhenIdle).unwrap();
        assert_eq!(small.collapse_complete_blocks(), 0, "no whole block");
        assert_eq!(small.huge_block_counts(), (0, 0, 0));
    }

    #[test]
    fn a_block_collapsed_on_arrival_is_whole_when_its_last_page_is_stored() {
        let cache = PageCache::new(1, 2 * BLOCK_PAGES * PAGE_SIZE, HugeBlocks::OnArrival).unwrap();
        let insert = |range| insert_pattern(&cache, range);
        insert(1..BLOCK_PAGES);
        insert(BLOCK_PAGES..BLOCK_PAGES + 7);
        assert_eq!(
            cache.huge_block_counts(),
            (0, 0, 0),
            "no block complete yet"
        );
        insert(0..1);
        // Handled before the insert returned, on this thread.
        let (collapsed, refused, dropped) = cache.huge_block_counts();
        assert_eq!((collapsed + refused, dropped), (1, 0));
        assert_eq!(cache.collapse_complete_blocks(), 0, "not handed over again");
        for p in (0..BLOCK_PAGES + 7).step_by(29) {
            assert_eq!(cache.read_page(p), Some(pattern(p)), "page {p}");
        }
        assert!(!cache.contains(BLOCK_PAGES + 7));
    }

    #[test]
    fn sizes_that_are_not_whole_pages_are_errors() {
        for size in [0, 100, PAGE_SIZE + 1] {
            assert!(matches!(
                PageCache::new(1, size, HugeBlocks::Off),
                Err(CacheError::BadSize { .. })
            ));
        }
    }

    #[test]
    fn concurrent_inserts_of_the_same_pages_store_each_once() {
        const THREADS: usize = 4;
        const PAGES: u64 = 256;
        let cache = PageCache::new(1, PAGES * PAGE_SIZE, HugeBlocks::Off).unwrap();
        let barrier = Barrier::new(THREADS);
        let stored: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        (0..PAGES)
                            .filter(|&p| {
                                let data = vec![p as u8; PAGE_SIZE as usize];
                                store(&cache, p, &[&data]).unwrap()
                            })
                            .count() as u64
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(stored, PAGES);
        assert_eq!(cache.resident_pages(), PAGES);
        for p in 0..PAGES {
            assert_eq!(
                cache.read_page(p).unwrap(),
                vec![p as u8; PAGE_SIZE as usize]
            );
        }
    }
}
