//! The fault handler of a hollow clone ([`FaultHandler`]) and the clone
//! point ([`Family`]) its pages come from, with mechanism apart from
//! policy:
//!
//! - `family`: the policy. What a fault or a push requests (prefetch
//!   window included), which clones a delivery serves, and when the
//!   family fails: a lost source, a bad page, a request past the fetch
//!   timeout.
//! - `requests`: the family's request table (who waits for which page
//!   since when, oldest first) and the clock spacing its deadline checks.
//! - `install`: the mechanism. Per-clone installs through the userfaultfd
//!   (zero fills, wakes) and releasing a clone's region.
//! - `thread`: the fault thread's lifecycle. [`FaultHandler::start`], the
//!   io_uring fault loop serving each fault read, and
//!   [`FaultHandler::close`].
//! - `error`: [`FaultError`] and [`StartError`].
//!
//! Imports run one way, `thread` → `family` → `requests` → `install` →
//! `error`, each file using only files further along. This hub holds the
//! handle; `thread`, which starts and closes it, is the only file using it.

mod error;
mod family;
mod install;
mod requests;
mod thread;

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use error::{FaultError, StartError};
pub use family::{Family, FetchConfig, PageSource};

use crate::stats::CloneStats;
use install::CloneState;

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
        self.family.prefetch_for(&self.clone, pages)
    }

    /// Notes that pages `[first, first + count)`, all present in the host
    /// cache, are about to be mapped into the clone's view ahead of the
    /// guest (see [`CloneStats::pages_populated`]).
    pub fn mark_populated(&self, first: u64, count: u64) {
        self.clone.mark_populated(first, count);
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
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.close();
    }
}
