//! Fault counters of a clone and of a clone point's page cache.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::sync;

/// Pages zero-filled instead of fetched, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvoidedPages {
    pub zero: u64,
    pub free_heap: u64,
    pub fresh: u64,
}

impl AvoidedPages {
    pub fn total(&self) -> u64 {
        self.zero + self.free_heap + self.fresh
    }
}

impl std::ops::AddAssign for AvoidedPages {
    fn add_assign(&mut self, other: Self) {
        self.zero += other.zero;
        self.free_heap += other.free_heap;
        self.fresh += other.fresh;
    }
}

/// A latency distribution in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// `(upper bound in µs, faults)` per power-of-two bucket.
    pub buckets: Vec<(u64, u64)>,
}

/// Fault counters of one hollow clone.
///
/// Every fault event read is counted in `faults` and resolved exactly one
/// way: from the host cache (`cache_hits`), over the network (one of the
/// `pages_fetched - prefetched` pages), by zero-filling (its page is one
/// of `avoided`, which also counts the window pages filled with it), or,
/// for a fault on a page installed meanwhile, by a plain wake.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CloneStats {
    /// Missing-page fault events read.
    pub faults: u64,
    /// Pages installed that came over the network while this clone waited
    /// for them (its own faults and prefetches, or another clone's request
    /// it joined).
    pub pages_fetched: u64,
    pub bytes_fetched: u64,
    /// Of those, pages installed with no fault waiting (prefetch).
    pub prefetched: u64,
    /// Faults served from the host page cache (fetched earlier, for any
    /// clone of the family).
    pub cache_hits: u64,
    /// Pages zero-filled instead of fetched, by reason.
    pub avoided: AvoidedPages,
    /// Every fault, from reading its event to issuing its wake.
    pub latency: LatencySummary,
    /// Only the faults that waited for the network.
    pub fetch_latency: LatencySummary,
    /// Pages that arrived in the host cache without this host asking for
    /// them (pushed, or multicast for another host) and that this clone
    /// then touched, counted when it ends (see
    /// [`FaultHandler::close`](crate::FaultHandler::close)).
    #[serde(default)]
    pub pages_pushed_used: u64,
    /// Pages of the host cache mapped into this clone's view as it started.
    #[serde(default)]
    pub pages_populated: u64,
}

/// Counters of a clone point's page cache on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyStats {
    pub family: u64,
    /// Pages received from the memory server and stored (duplicates not
    /// counted).
    pub pages_received: u64,
    pub bytes_received: u64,
    /// Pages held in the host page cache.
    pub resident_pages: u64,
    /// Of those, pages that arrived without this host asking for them:
    /// pushed by the parent's host, or multicast for another host.
    #[serde(default)]
    pub pages_pushed: u64,
    /// 2 MiB blocks of the cache held in huge pages (`[limits] huge_cache`).
    #[serde(default)]
    pub huge_blocks: u64,
    /// Pages requested and not yet delivered.
    pub outstanding: u64,
    /// Clones registered on it now.
    pub clones: u64,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("static histogram bounds are valid")
}

fn summary(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    LatencySummary {
        count: h.len(),
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
        mean_us: h.mean(),
        buckets: h
            .iter_log(1, 2.0)
            .filter(|v| v.count_since_last_iteration() > 0)
            .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
            .collect(),
    }
}

/// Live counters, cheap to update from the fault and delivery paths
/// (relaxed atomics; the histograms behind one mutex, held for a record or
/// a snapshot only). A snapshot may see a fault counted whose latency is
/// not recorded yet.
#[derive(Debug)]
pub(crate) struct LiveStats {
    faults: AtomicU64,
    fetched: AtomicU64,
    prefetched: AtomicU64,
    cache_hits: AtomicU64,
    zero: AtomicU64,
    free_heap: AtomicU64,
    fresh: AtomicU64,
    pushed_used: AtomicU64,
    populated: AtomicU64,
    latency: Mutex<(Histogram<u64>, Histogram<u64>)>,
}

impl LiveStats {
    pub(crate) fn new() -> Self {
        Self {
            faults: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            free_heap: AtomicU64::new(0),
            fresh: AtomicU64::new(0),
            pushed_used: AtomicU64::new(0),
            populated: AtomicU64::new(0),
            latency: Mutex::new((new_histogram(), new_histogram())),
        }
    }

    pub(crate) fn fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn fetched(&self, pages: u64, prefetched: u64) {
        self.fetched.fetch_add(pages, Ordering::Relaxed);
        self.prefetched.fetch_add(prefetched, Ordering::Relaxed);
    }

    pub(crate) fn avoided(&self, pages: &AvoidedPages) {
        self.zero.fetch_add(pages.zero, Ordering::Relaxed);
        self.free_heap.fetch_add(pages.free_heap, Ordering::Relaxed);
        self.fresh.fetch_add(pages.fresh, Ordering::Relaxed);
    }

    pub(crate) fn pushed_used(&self, pages: u64) {
        self.pushed_used.store(pages, Ordering::Relaxed);
    }

    pub(crate) fn populated(&self, pages: u64) {
        self.populated.fetch_add(pages, Ordering::Relaxed);
    }

    /// Records a served fault; `fetched` when it waited for the network.
    pub(crate) fn latency(&self, took: Duration, fetched: bool) {
        let us = (took.as_micros() as u64).clamp(1, 60_000_000);
        let mut h = sync::lock(&self.latency);
        // Values are clamped into the histogram's bounds above.
        let _ = h.0.record(us);
        if fetched {
            let _ = h.1.record(us);
        }
    }

    pub(crate) fn snapshot(&self) -> CloneStats {
        let fetched = self.fetched.load(Ordering::Relaxed);
        let h = sync::lock(&self.latency);
        CloneStats {
            faults: self.faults.load(Ordering::Relaxed),
            pages_fetched: fetched,
            bytes_fetched: fetched * crate::PAGE_SIZE,
            prefetched: self.prefetched.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            avoided: AvoidedPages {
                zero: self.zero.load(Ordering::Relaxed),
                free_heap: self.free_heap.load(Ordering::Relaxed),
                fresh: self.fresh.load(Ordering::Relaxed),
            },
            latency: summary(&h.0),
            fetch_latency: summary(&h.1),
            pages_pushed_used: self.pushed_used.load(Ordering::Relaxed),
            pages_populated: self.populated.load(Ordering::Relaxed),
        }
    }
}
