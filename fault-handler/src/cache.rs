//! The host page cache of one clone point: each page fetched from the
//! parent's memory server is stored once per host, for all its clones here.

use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{PAGE_SIZE, sys};

/// A failure to create a page cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "family {family:#x}: memory size {mem_size:#x} is not a positive multiple of the page size"
    )]
    BadSize { family: u64, mem_size: u64 },
    #[error("family {family:#x}: creating and mapping a {mem_size:#x}-byte memfd failed")]
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
}

/// Pages of one clone point on this host: a memfd mapped shared and
/// read-write here, and two bits per page.
///
/// Memory ordering: an inserter first *claims* the page (`fetch_or` on the
/// claim bit, `AcqRel`); only the thread that set the bit writes the page,
/// so no two threads ever write the same bytes concurrently. After writing
/// it sets the *present* bit with `Release`. Readers test the present bit
/// with `Acquire` ([`PageCache::contains`], [`PageCache::page_ptr`]) before
/// reading the bytes (as the source of `UFFDIO_COPY`), so they see the
/// whole page. Present pages are never written again.
///
/// A second inserter of a page that is claimed but not present yet gets
/// `false` at once, without waiting: it must not assume the page is
/// readable until `contains` says so.
#[derive(Debug)]
pub struct PageCache {
    family: u64,
    /// Keeps the memory alive (the mapping would too; this also names it in
    /// `/proc/self/fd` for inspection).
    _memfd: OwnedFd,
    base: NonNull<u8>,
    pages: u64,
    claimed: Box<[AtomicU64]>,
    present: Box<[AtomicU64]>,
    resident: AtomicU64,
}

// SAFETY: the mapping is plain shared memory owned by this value. Its bytes
// are written only by the thread that claimed a page, before the page is
// published with `Release`, and read only after an `Acquire` of that bit
// (see the type's docs); nothing in it is tied to a thread.
unsafe impl Send for PageCache {}
// SAFETY: as above; every method takes `&self` and follows that protocol.
unsafe impl Sync for PageCache {}

fn bit(page: u64) -> (usize, u64) {
    ((page / 64) as usize, 1 << (page % 64))
}

impl PageCache {
    /// An empty cache for clone point `family` of `mem_size` bytes.
    pub fn new(family: u64, mem_size: u64) -> Result<Self, CacheError> {
        if mem_size == 0 || !mem_size.is_multiple_of(PAGE_SIZE) {
            return Err(CacheError::BadSize { family, mem_size });
        }
        let (memfd, base) =
            sys::memfd_mapping(c"snowflock-page-cache", mem_size).map_err(|source| {
                CacheError::Memfd {
                    family,
                    mem_size,
                    source,
                }
            })?;
        let pages = mem_size / PAGE_SIZE;
        let words = || (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(Self {
            family,
            _memfd: memfd,
            base,
            pages,
            claimed: words(),
            present: words(),
            resident: AtomicU64::new(0),
        })
    }

    pub fn family(&self) -> u64 {
        self.family
    }

    /// Pages of the clone point (present or not).
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// Whether page `page` is stored and readable.
    pub fn contains(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (word, mask) = bit(page);
        self.present[word].load(Ordering::Acquire) & mask != 0
    }

    /// Stores `data` (exactly one page) as page `page`. `Ok(false)` if the
    /// page was already stored, or another thread is storing it right now
    /// (see the type's docs).
    pub fn insert(&self, page: u64, data: &[u8]) -> Result<bool, InsertError> {
        if page >= self.pages {
            return Err(InsertError::OutOfRange {
                page,
                pages: self.pages,
            });
        }
        if data.len() != PAGE_SIZE as usize {
            return Err(InsertError::BadLength {
                page,
                len: data.len(),
            });
        }
        let (word, mask) = bit(page);
        if self.claimed[word].fetch_or(mask, Ordering::AcqRel) & mask != 0 {
            return Ok(false);
        }
        let dst = self.base.as_ptr().wrapping_add((page * PAGE_SIZE) as usize);
        // SAFETY: the page lies inside the mapping (checked above); this
        // thread set its claim bit, so no other thread writes it, and its
        // present bit is clear, so no reader reads it; `data` is a Rust
        // slice, which cannot overlap the mapping we own.
        unsafe { sys::write_bytes(dst, data) };
        self.present[word].fetch_or(mask, Ordering::Release);
        self.resident.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Where present page `page` lies in this process; its `PAGE_SIZE`
    /// bytes stay readable and unchanged as long as the cache lives.
    pub fn page_ptr(&self, page: u64) -> Option<*const u8> {
        self.contains(page).then(|| {
            self.base
                .as_ptr()
                .wrapping_add((page * PAGE_SIZE) as usize)
                .cast_const()
        })
    }

    /// Where `count` present pages from `first` lie in this process, if
    /// they all are present.
    pub(crate) fn run_ptr(&self, first: u64, count: u64) -> Option<*const u8> {
        let end = first.checked_add(count)?;
        (first..end)
            .all(|p| self.contains(p))
            .then(|| self.page_ptr(first))
            .flatten()
    }

    /// Pages stored.
    pub fn resident_pages(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }
}

impl Drop for PageCache {
    fn drop(&mut self) {
        // SAFETY: `base` is this cache's own mapping of `pages` pages; with
        // `&mut self` no reader or writer remains, and pointers handed out
        // by `page_ptr` are documented to be valid only while it lives.
        unsafe { sys::unmap(self.base, self.pages * PAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;

    fn read(cache: &PageCache, page: u64) -> Vec<u8> {
        let ptr = cache.page_ptr(page).expect("present");
        // SAFETY: a present page stays readable and unchanged while the
        // cache lives, which it does for this borrow.
        unsafe { std::slice::from_raw_parts(ptr, PAGE_SIZE as usize) }.to_vec()
    }

    #[test]
    fn pages_are_stored_once_and_bad_pages_refused() {
        let cache = PageCache::new(9, 16 * PAGE_SIZE).unwrap();
        let page = vec![7u8; PAGE_SIZE as usize];
        assert!(!cache.contains(3));
        assert!(cache.page_ptr(3).is_none());
        assert_eq!(cache.insert(3, &page), Ok(true));
        assert_eq!(cache.insert(3, &[1u8; PAGE_SIZE as usize]), Ok(false));
        assert_eq!(read(&cache, 3), page);
        assert_eq!(
            cache.insert(16, &page),
            Err(InsertError::OutOfRange {
                page: 16,
                pages: 16
            })
        );
        assert_eq!(
            cache.insert(4, &page[..10]),
            Err(InsertError::BadLength { page: 4, len: 10 })
        );
        assert!(!cache.contains(u64::MAX));
        assert_eq!(cache.resident_pages(), 1);
        assert_eq!(cache.family(), 9);
        assert!(cache.run_ptr(3, 1).is_some());
        assert!(cache.run_ptr(3, 2).is_none());
        assert!(cache.run_ptr(u64::MAX, 2).is_none());
    }

    #[test]
    fn sizes_that_are_not_whole_pages_are_errors() {
        for size in [0, 100, PAGE_SIZE + 1] {
            assert!(matches!(
                PageCache::new(1, size),
                Err(CacheError::BadSize { .. })
            ));
        }
    }

    #[test]
    fn concurrent_inserts_of_the_same_pages_store_each_once() {
        const THREADS: usize = 4;
        const PAGES: u64 = 256;
        let cache = PageCache::new(1, PAGES * PAGE_SIZE).unwrap();
        let barrier = Barrier::new(THREADS);
        let stored: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        (0..PAGES)
                            .filter(|&p| {
                                let data = vec![p as u8; PAGE_SIZE as usize];
                                cache.insert(p, &data).unwrap()
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
            assert_eq!(read(&cache, p), vec![p as u8; PAGE_SIZE as usize]);
        }
    }
}
