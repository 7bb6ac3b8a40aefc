//! The presence bitmap: one bit per page of every registered family, in the memory-mapped
//! `presence` array the XDP program reads. Each family owns a range of whole words, so clearing
//! a range never touches a neighbour's bits.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use crate::sys::SharedWords;

/// First-fit allocator of word ranges in the bitmap.
#[derive(Debug)]
pub(crate) struct RangeAllocator {
    capacity_words: u64,
    /// Ranges in use: first word → number of words.
    used: BTreeMap<u64, u64>,
}

impl RangeAllocator {
    pub(crate) fn new(capacity_words: u64) -> Self {
        Self {
            capacity_words,
            used: BTreeMap::new(),
        }
    }

    /// Reserves `words` consecutive words at the lowest free position; `None` if no gap fits.
    pub(crate) fn allocate(&mut self, words: u64) -> Option<u64> {
        let mut cursor = 0;
        for (&start, &len) in &self.used {
            if start - cursor >= words {
                break;
            }
            cursor = start + len;
        }
        if self.capacity_words.checked_sub(cursor)? < words {
            return None;
        }
        self.used.insert(cursor, words);
        Some(cursor)
    }

    /// Returns the range starting at `first_word` to the free space.
    pub(crate) fn free(&mut self, first_word: u64) {
        self.used.remove(&first_word);
    }
}

/// The bitmap mapping and its allocator, shared by the loader and every [`FamilyBits`].
#[derive(Debug)]
pub(crate) struct PresenceBitmap {
    words: SharedWords,
    allocator: Mutex<RangeAllocator>,
}

impl PresenceBitmap {
    pub(crate) fn new(words: SharedWords) -> Arc<Self> {
        let capacity_words = words.len() as u64;
        Arc::new(Self {
            words,
            allocator: Mutex::new(RangeAllocator::new(capacity_words)),
        })
    }

    /// Pages the bitmap can hold over all families.
    pub(crate) fn capacity_pages(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// Reserves a zeroed range for `pages` pages (`pages > 0`); `None` if no free range fits.
    /// The range returns to the free space when the last clone of the handle is dropped.
    pub(crate) fn allocate(self: &Arc<Self>, pages: u64) -> Option<FamilyBits> {
        let words = pages.div_ceil(64);
        let first_word = lock(&self.allocator).allocate(words)?;
        // A freed range may still hold bits of its previous family.
        for index in first_word..first_word + words {
            if let Some(word) = usize::try_from(index).ok().and_then(|i| self.words.word(i)) {
                word.store(0, Ordering::Relaxed);
            }
        }
        Some(FamilyBits {
            range: Arc::new(FamilyRange {
                bitmap: Arc::clone(self),
                first_word,
                pages,
            }),
        })
    }
}

/// One family's reservation; frees it on drop.
struct FamilyRange {
    bitmap: Arc<PresenceBitmap>,
    first_word: u64,
    pages: u64,
}

impl Drop for FamilyRange {
    fn drop(&mut self) {
        lock(&self.bitmap.allocator).free(self.first_word);
    }
}

/// Shared handle to one family's bit range in the memory-mapped presence bitmap: bit `page` set
/// means this host holds the page, and the XDP program drops further fragments of it.
///
/// Clones share the range. The range stays reserved (and the mapping alive) until the last
/// clone is dropped, even after [`crate::McdistXdp::remove_family`] or the drop of the
/// [`crate::McdistXdp`], so a late `mark` never touches another family's bits.
#[derive(Clone)]
pub struct FamilyBits {
    range: Arc<FamilyRange>,
}

impl FamilyBits {
    /// Marks `page` present. Returns `false` (and marks nothing) if `page` is out of the
    /// family's range.
    pub fn mark(&self, page: u64) -> bool {
        let Some((word, mask)) = self.locate(page) else {
            return false;
        };
        // Release: whoever observes the bit also observes the page written before it.
        word.fetch_or(mask, Ordering::Release);
        true
    }

    /// Whether `page` is marked present; `false` out of range.
    pub fn contains(&self, page: u64) -> bool {
        self.locate(page)
            .is_some_and(|(word, mask)| word.load(Ordering::Acquire) & mask != 0)
    }

    /// Number of pages in the family's range.
    pub fn pages(&self) -> u64 {
        self.range.pages
    }

    /// First bit of the range in the bitmap: the `base_bit` the XDP program adds pages to.
    pub(crate) fn base_bit(&self) -> u64 {
        self.range.first_word * 64
    }

    fn locate(&self, page: u64) -> Option<(&AtomicU64, u64)> {
        if page >= self.range.pages {
            return None;
        }
        let bit = self.base_bit() + page;
        let word = self
            .range
            .bitmap
            .words
            .word(usize::try_from(bit / 64).ok()?)?;
        Some((word, 1 << (bit % 64)))
    }
}

impl fmt::Debug for FamilyBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FamilyBits")
            .field("base_bit", &self.base_bit())
            .field("pages", &self.range.pages)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::RangeAllocator;

    #[test]
    fn allocates_first_fit_and_reuses_freed_ranges() {
        let mut allocator = RangeAllocator::new(10);
        assert_eq!(allocator.allocate(3), Some(0));
        assert_eq!(allocator.allocate(4), Some(3));
        assert_eq!(allocator.allocate(3), Some(7));
        assert_eq!(allocator.allocate(1), None);
        allocator.free(3);
        assert_eq!(allocator.allocate(5), None);
        assert_eq!(allocator.allocate(2), Some(3));
        assert_eq!(allocator.allocate(2), Some(5));
        assert_eq!(allocator.allocate(1), None);
        allocator.free(0);
        allocator.free(7);
        assert_eq!(allocator.allocate(4), None);
        assert_eq!(allocator.allocate(3), Some(0));
        assert_eq!(allocator.allocate(3), Some(7));
    }

    #[test]
    fn refuses_ranges_larger_than_the_bitmap() {
        let mut allocator = RangeAllocator::new(4);
        assert_eq!(allocator.allocate(5), None);
        assert_eq!(allocator.allocate(4), Some(0));
    }
}
