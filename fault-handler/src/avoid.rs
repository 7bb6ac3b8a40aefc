//! Avoidance heuristics: which pages of a clone need not be fetched, because
//! their contents at the clone point do not matter, and why.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Why a page is zero-filled instead of fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AvoidReason {
    /// The page held only zeros at the clone point (from the descriptor).
    Zero,
    /// The guest allocator reported it free at the clone point.
    FreeHeap,
    /// The guest allocator handed it out fresh in the clone.
    Fresh,
}

/// Page runs that do not fit the memory.
#[derive(Debug, thiserror::Error)]
pub enum AvoidError {
    #[error("{what} run {start:#x}+{count:#x} is outside the {pages} pages of guest memory")]
    OutOfRange {
        what: &'static str,
        start: u64,
        count: u64,
        pages: u64,
    },
    #[error("the descriptor lists no data pages; refusing to treat all memory as zero")]
    NoDataPages,
}

/// Per-page avoidance state of one clone.
#[derive(Debug)]
pub struct AvoidMap {
    pages: u64,
    zero: Vec<u64>,
    free_heap: Vec<u64>,
    fresh: Vec<AtomicU64>,
    enabled: bool,
}

fn set_runs(
    bits: &mut [u64],
    pages: u64,
    runs: &[(u64, u64)],
    what: &'static str,
    value: bool,
) -> Result<(), AvoidError> {
    for &(start, count) in runs {
        let end = start.checked_add(count).filter(|&e| e <= pages);
        let Some(end) = end else {
            return Err(AvoidError::OutOfRange {
                what,
                start,
                count,
                pages,
            });
        };
        for p in start..end {
            let (w, b) = ((p / 64) as usize, p % 64);
            if value {
                bits[w] |= 1 << b;
            } else {
                bits[w] &= !(1 << b);
            }
        }
    }
    Ok(())
}

impl AvoidMap {
    /// Avoidance for a clone of `pages` pages: every page outside
    /// `data_runs` is zero; pages in `free_heap_runs` were free.
    pub fn new(
        pages: u64,
        data_runs: &[(u64, u64)],
        free_heap_runs: &[(u64, u64)],
    ) -> Result<Self, AvoidError> {
        if data_runs.is_empty() {
            return Err(AvoidError::NoDataPages);
        }
        let words = pages.div_ceil(64) as usize;
        let mut zero = vec![u64::MAX; words];
        set_runs(&mut zero, pages, data_runs, "data page", false)?;
        let mut free_heap = vec![0; words];
        set_runs(&mut free_heap, pages, free_heap_runs, "free heap", true)?;
        Ok(Self {
            pages,
            zero,
            free_heap,
            fresh: (0..words).map(|_| AtomicU64::new(0)).collect(),
            enabled: true,
        })
    }

    /// No avoidance: every page is fetched.
    pub fn none(pages: u64) -> Result<Self, AvoidError> {
        let words = pages.div_ceil(64) as usize;
        Ok(Self {
            pages,
            zero: vec![0; words],
            free_heap: vec![0; words],
            fresh: (0..words).map(|_| AtomicU64::new(0)).collect(),
            enabled: false,
        })
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks pages handed out fresh; ignored when avoidance is off.
    pub fn mark_fresh(&self, runs: &[(u64, u64)]) {
        if !self.enabled {
            return;
        }
        for &(start, count) in runs {
            let end = start.saturating_add(count).min(self.pages);
            for p in start..end {
                self.fresh[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
    }

    /// Why page `page` need not be fetched, if it need not.
    pub fn reason(&self, page: u64) -> Option<AvoidReason> {
        if page >= self.pages {
            return None;
        }
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        if self.zero[w] & bit != 0 {
            Some(AvoidReason::Zero)
        } else if self.free_heap[w] & bit != 0 {
            Some(AvoidReason::FreeHeap)
        } else if self.fresh[w].load(Ordering::Relaxed) & bit != 0 {
            Some(AvoidReason::Fresh)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_follow_precedence() {
        let map = AvoidMap::new(128, &[(0, 10), (64, 10)], &[(5, 10)]).unwrap();
        assert_eq!(map.reason(0), None);
        assert_eq!(map.reason(12), Some(AvoidReason::Zero));
        assert_eq!(map.reason(7), Some(AvoidReason::FreeHeap));
        assert_eq!(map.reason(65), None);
        map.mark_fresh(&[(65, 2), (9, 1)]);
        assert_eq!(map.reason(65), Some(AvoidReason::Fresh));
        assert_eq!(map.reason(9), Some(AvoidReason::FreeHeap));
        assert_eq!(map.reason(200), None);
    }

    #[test]
    fn bad_runs_are_errors() {
        assert!(matches!(
            AvoidMap::new(16, &[(0, 17)], &[]),
            Err(AvoidError::OutOfRange { .. })
        ));
        assert!(matches!(
            AvoidMap::new(16, &[(0, 1)], &[(u64::MAX, 2)]),
            Err(AvoidError::OutOfRange { .. })
        ));
        assert!(matches!(
            AvoidMap::new(16, &[], &[]),
            Err(AvoidError::NoDataPages)
        ));
        let off = AvoidMap::none(16).unwrap();
        off.mark_fresh(&[(0, 16)]);
        assert!((0..16).all(|p| off.reason(p).is_none()));
    }
}
