//! Avoidance: which pages of a clone need not be fetched, because their
//! contents at the clone point do not matter, and why.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::stats::AvoidedPages;

/// Why a page is zero-filled instead of fetched. When several reasons
/// apply, the first one listed here counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AvoidReason {
    /// The page held only zeros at the clone point: no data run covers it.
    Zero,
    /// The guest allocator reported it free at the clone point.
    FreeHeap,
    /// The guest allocator handed it out fresh in the clone, after the
    /// clone point, so the guest overwrites whatever it held.
    Fresh,
}

/// Page runs that do not fit the memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AvoidError {
    #[error("guest memory of 0 pages")]
    NoPages,
    #[error("{what} run {start:#x}+{count:#x} is outside the {pages:#x} pages of guest memory")]
    OutOfRange {
        what: &'static str,
        start: u64,
        count: u64,
        pages: u64,
    },
    #[error("the descriptor lists no data pages; refusing to treat all memory as zero")]
    NoDataPages,
}

/// Per-page avoidance state of one clone: two bitmaps fixed at the clone
/// point and one that grows while the clone runs ([`AvoidMap::mark_fresh`]).
///
/// Memory ordering: fresh bits are set with `Release` and read with
/// `Acquire`. The guest reports pages fresh (through the VMM, which calls
/// `mark_fresh`) before it touches them, so by the time a fault on such a
/// page is read from the userfaultfd the bit is visible; a page marked
/// fresh after its fault was read is simply fetched.
#[derive(Debug)]
pub struct AvoidMap {
    pages: u64,
    zero: Box<[u64]>,
    free_heap: Box<[u64]>,
    fresh: Box<[AtomicU64]>,
    enabled: bool,
}

/// The avoided pages of one 64-page word of an [`AvoidMap`], one mask per
/// reason, disjoint (precedence applied), and every page marked fresh
/// (whatever else applies: the guest is about to write those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AvoidWord {
    pub zero: u64,
    pub free_heap: u64,
    pub fresh: u64,
    pub marked_fresh: u64,
}

impl AvoidWord {
    /// Every avoided page of the word.
    pub fn any(&self) -> u64 {
        self.zero | self.free_heap | self.fresh
    }

    /// How many of the pages in `mask` are avoided, by reason.
    pub fn count(&self, mask: u64) -> AvoidedPages {
        AvoidedPages {
            zero: u64::from((self.zero & mask).count_ones()),
            free_heap: u64::from((self.free_heap & mask).count_ones()),
            fresh: u64::from((self.fresh & mask).count_ones()),
        }
    }
}

/// Calls `f(word, mask)` for the bits of pages `start..start + count`.
fn for_each_word(start: u64, count: u64, mut f: impl FnMut(usize, u64)) {
    let end = start + count;
    let mut page = start;
    while page < end {
        let offset = page % 64;
        let n = (64 - offset).min(end - page);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << offset
        };
        f((page / 64) as usize, mask);
        page += n;
    }
}

/// Checks that every run lies within `pages`.
fn check_runs(runs: &[(u64, u64)], pages: u64, what: &'static str) -> Result<(), AvoidError> {
    for &(start, count) in runs {
        if start.checked_add(count).is_none_or(|end| end > pages) {
            return Err(AvoidError::OutOfRange {
                what,
                start,
                count,
                pages,
            });
        }
    }
    Ok(())
}

/// The mask of the pages that exist in word `word` of a map of `pages`.
fn valid_mask(pages: u64, word: usize) -> u64 {
    let first = word as u64 * 64;
    match pages.saturating_sub(first) {
        n if n >= 64 => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

impl AvoidMap {
    /// Avoidance for a clone of `pages` pages: every page outside
    /// `data_runs` (`(first page, count)`) is [`AvoidReason::Zero`]; pages
    /// in `free_heap_runs` are [`AvoidReason::FreeHeap`]. Runs may overlap
    /// and come in any order; a run outside the memory is an error.
    pub fn new(
        pages: u64,
        data_runs: &[(u64, u64)],
        free_heap_runs: &[(u64, u64)],
    ) -> Result<Self, AvoidError> {
        if pages == 0 {
            return Err(AvoidError::NoPages);
        }
        if data_runs.iter().all(|&(_, count)| count == 0) {
            return Err(AvoidError::NoDataPages);
        }
        check_runs(data_runs, pages, "data page")?;
        check_runs(free_heap_runs, pages, "free heap")?;
        let words = pages.div_ceil(64) as usize;
        let mut zero: Box<[u64]> = (0..words).map(|w| valid_mask(pages, w)).collect();
        for &(start, count) in data_runs {
            for_each_word(start, count, |w, mask| zero[w] &= !mask);
        }
        let mut free_heap = vec![0u64; words].into_boxed_slice();
        for &(start, count) in free_heap_runs {
            for_each_word(start, count, |w, mask| free_heap[w] |= mask);
        }
        Ok(Self {
            pages,
            zero,
            free_heap,
            fresh: (0..words).map(|_| AtomicU64::new(0)).collect(),
            enabled: true,
        })
    }

    /// No avoidance: every page is fetched, and fresh reports are ignored.
    pub fn none(pages: u64) -> Result<Self, AvoidError> {
        if pages == 0 {
            return Err(AvoidError::NoPages);
        }
        let words = pages.div_ceil(64) as usize;
        Ok(Self {
            pages,
            zero: vec![0; words].into_boxed_slice(),
            free_heap: vec![0; words].into_boxed_slice(),
            fresh: (0..words).map(|_| AtomicU64::new(0)).collect(),
            enabled: false,
        })
    }

    /// Pages of guest memory the map covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks pages the guest allocator handed out fresh; safe to call while
    /// faults are served. Runs reach past the memory are clipped (the guest
    /// supplies them; the VMM validates them first) and logged. Ignored
    /// when avoidance is off.
    pub fn mark_fresh(&self, runs: &[(u64, u64)]) {
        if !self.enabled {
            return;
        }
        for &(start, count) in runs {
            let end = start.saturating_add(count).min(self.pages);
            if end - start.min(end) != count {
                tracing::warn!(
                    start,
                    count,
                    pages = self.pages,
                    "fresh page run outside guest memory clipped"
                );
            }
            if start < end {
                for_each_word(start, end - start, |w, mask| {
                    self.fresh[w].fetch_or(mask, Ordering::Release);
                });
            }
        }
    }

    /// Why page `page` need not be fetched, if it need not.
    pub fn reason(&self, page: u64) -> Option<AvoidReason> {
        if page >= self.pages {
            return None;
        }
        let word = self.word((page / 64) as usize);
        let bit = 1u64 << (page % 64);
        if word.zero & bit != 0 {
            Some(AvoidReason::Zero)
        } else if word.free_heap & bit != 0 {
            Some(AvoidReason::FreeHeap)
        } else if word.fresh & bit != 0 {
            Some(AvoidReason::Fresh)
        } else {
            None
        }
    }

    /// The avoided pages of pages `64 * word .. 64 * word + 64`.
    pub(crate) fn word(&self, word: usize) -> AvoidWord {
        let Some(zero) = self.zero.get(word) else {
            return AvoidWord {
                zero: 0,
                free_heap: 0,
                fresh: 0,
                marked_fresh: 0,
            };
        };
        let free_heap = self.free_heap[word] & !zero;
        let marked_fresh = self.fresh[word].load(Ordering::Acquire);
        AvoidWord {
            zero: *zero,
            free_heap,
            fresh: marked_fresh & !zero & !free_heap,
            marked_fresh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_follow_precedence() {
        let map = AvoidMap::new(130, &[(0, 10), (64, 10), (129, 1)], &[(5, 10)]).unwrap();
        assert_eq!(map.reason(0), None);
        assert_eq!(map.reason(12), Some(AvoidReason::Zero));
        assert_eq!(map.reason(7), Some(AvoidReason::FreeHeap));
        assert_eq!(map.reason(65), None);
        assert_eq!(map.reason(128), Some(AvoidReason::Zero));
        assert_eq!(map.reason(129), None);
        map.mark_fresh(&[(65, 2), (9, 1), (12, 1)]);
        assert_eq!(map.reason(65), Some(AvoidReason::Fresh));
        assert_eq!(map.reason(9), Some(AvoidReason::FreeHeap));
        assert_eq!(map.reason(12), Some(AvoidReason::Zero));
        assert_eq!(map.reason(130), None);
        assert_eq!(map.reason(u64::MAX), None);
        let word = map.word(0);
        assert_eq!(word.zero, !0x3ff);
        assert_eq!(word.free_heap, 0x3e0);
        assert_eq!(word.fresh, 0);
        assert_eq!(word.marked_fresh, 1 << 9 | 1 << 12);
        assert_eq!(word.count(0xffff).zero, 6);
        // Bits past the end of memory are never avoided.
        assert_eq!(map.word(2).any(), 0b01);
        assert_eq!(map.word(3).any(), 0);
    }

    #[test]
    fn runs_spanning_words_set_every_page() {
        let map = AvoidMap::new(300, &[(0, 300)], &[(60, 200)]).unwrap();
        let free: Vec<u64> = (0..300)
            .filter(|&p| map.reason(p) == Some(AvoidReason::FreeHeap))
            .collect();
        assert_eq!(free, (60..260).collect::<Vec<_>>());
        map.mark_fresh(&[(0, 64), (270, 1000)]);
        let fresh: Vec<u64> = (0..300)
            .filter(|&p| map.reason(p) == Some(AvoidReason::Fresh))
            .collect();
        assert_eq!(fresh, (0..60).chain(270..300).collect::<Vec<_>>());
    }

    #[test]
    fn bad_runs_are_errors() {
        let out = |what, start, count| {
            Err(AvoidError::OutOfRange {
                what,
                start,
                count,
                pages: 16,
            })
        };
        assert_eq!(
            AvoidMap::new(16, &[(0, 17)], &[]).map(|_| ()),
            out("data page", 0, 17)
        );
        assert_eq!(
            AvoidMap::new(16, &[(0, 1)], &[(u64::MAX, 2)]).map(|_| ()),
            out("free heap", u64::MAX, 2)
        );
        assert_eq!(
            AvoidMap::new(16, &[], &[]).map(|_| ()),
            Err(AvoidError::NoDataPages)
        );
        assert_eq!(
            AvoidMap::new(16, &[(3, 0)], &[]).map(|_| ()),
            Err(AvoidError::NoDataPages)
        );
        assert_eq!(
            AvoidMap::new(0, &[(0, 0)], &[]).map(|_| ()),
            Err(AvoidError::NoPages)
        );
        assert_eq!(AvoidMap::none(0).map(|_| ()), Err(AvoidError::NoPages));
        let map = AvoidMap::new(16, &[(0, 16)], &[]).unwrap();
        map.mark_fresh(&[(u64::MAX, u64::MAX), (20, 5), (15, u64::MAX)]);
        assert_eq!(map.reason(15), Some(AvoidReason::Fresh));
        assert!((0..15).all(|p| map.reason(p).is_none()));
    }

    #[test]
    fn no_avoidance_ignores_fresh_reports() {
        let off = AvoidMap::none(16).unwrap();
        off.mark_fresh(&[(0, 16)]);
        assert!((0..16).all(|p| off.reason(p).is_none()));
        assert_eq!(off.word(0).any(), 0);
    }
}
