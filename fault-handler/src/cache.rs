//! The host page cache of one clone point: each page fetched from the
//! parent's memory server is stored once per host, for all its clones here.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{PAGE_SIZE, sys};

/// A failure to create a page cache.
#[derive(Debug, thiserror::Error)]
#[error("creating a {len}-byte page cache failed")]
pub struct CacheError {
    len: u64,
    #[source]
    source: std::io::Error,
}

/// Pages of one clone point on this host: a memfd mapped shared and
/// read-write here, and a presence bit per page.
///
/// Memory ordering: a page's bytes are written before its bit is set with
/// `Release`; readers test the bit with `Acquire` before reading the bytes
/// (as the source of `UFFDIO_COPY`). Two threads inserting the same page
/// both write the same bytes (pages of a frozen image never change), so a
/// double insert is harmless.
#[derive(Debug)]
pub struct PageCache {
    _memfd: OwnedFd,
    base: *mut u8,
    pages: u64,
    present: Vec<AtomicU64>,
    resident: AtomicU64,
}

// SAFETY: the mapping is plain shared memory; every access goes through
// `insert` (writes a page not yet marked present) and `page_ptr` (reads of
// present pages, which are never written again).
unsafe impl Send for PageCache {}
// SAFETY: as above.
unsafe impl Sync for PageCache {}

impl PageCache {
    pub fn new(mem_size: u64) -> Result<Self, CacheError> {
        let (memfd, base) = sys::memfd_mapping(mem_size).map_err(|source| CacheError {
            len: mem_size,
            source,
        })?;
        let pages = mem_size / PAGE_SIZE;
        Ok(Self {
            _memfd: memfd,
            base,
            pages,
            present: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            resident: AtomicU64::new(0),
        })
    }

    pub fn page_count(&self) -> u64 {
        self.pages
    }

    pub fn contains(&self, page: u64) -> bool {
        page < self.pages
            && self.present[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Stores `data` (one page) as page `page`; false if it was already
    /// there or the page is out of range or the data is not one page.
    pub fn insert(&self, page: u64, data: &[u8]) -> bool {
        if page >= self.pages || data.len() != PAGE_SIZE as usize || self.contains(page) {
            return false;
        }
        // SAFETY: the page lies inside the mapping (checked above) and is
        // not present, so no reader uses it yet; see the type's doc for
        // concurrent inserts.
        unsafe { sys::write_page(self.base.wrapping_add((page * PAGE_SIZE) as usize), data) };
        let bit = 1 << (page % 64);
        let old = self.present[(page / 64) as usize].fetch_or(bit, Ordering::Release);
        if old & bit == 0 {
            self.resident.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Where present page `page` lies in this process.
    pub fn page_ptr(&self, page: u64) -> Option<*const u8> {
        self.contains(page).then(|| {
            self.base
                .wrapping_add((page * PAGE_SIZE) as usize)
                .cast_const()
        })
    }

    /// Pages held.
    pub fn resident_pages(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }
}

impl Drop for PageCache {
    fn drop(&mut self) {
        // SAFETY: `base` is this cache's own mapping; with `&mut self` no
        // reader remains.
        unsafe { sys::unmap(self.base, self.pages * PAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_stored_once() {
        let cache = PageCache::new(16 * PAGE_SIZE).unwrap();
        let page = vec![7u8; PAGE_SIZE as usize];
        assert!(!cache.contains(3));
        assert!(cache.insert(3, &page));
        assert!(!cache.insert(3, &page));
        assert!(!cache.insert(16, &page));
        assert!(!cache.insert(4, &page[..10]));
        assert_eq!(cache.resident_pages(), 1);
        let ptr = cache.page_ptr(3).unwrap();
        // SAFETY: page 3 is present and never written again.
        let byte = unsafe { *ptr.wrapping_add(100) };
        assert_eq!(byte, 7);
        assert!(cache.page_ptr(4).is_none());
    }
}
