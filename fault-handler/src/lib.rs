//! Memory on demand for hollow clones: a clone on another host than its
//! parent starts with empty memory registered with userfaultfd; this crate
//! serves its page faults.
//!
//! - Each clone has a fault thread running an io_uring loop: `Read`s of the
//!   non-blocking userfaultfd (messages parsed here, see `sys`), a stop
//!   eventfd, and a periodic `Timeout` that checks request deadlines.
//! - A fault on a page the avoidance map names ([`AvoidMap`]: zero at the
//!   clone point, free in the guest heap, or handed out fresh since) is
//!   zero-filled locally (`UFFDIO_ZEROPAGE`, a window of pages at once) and
//!   never fetched.
//! - Otherwise the page comes from the host page cache of its clone point
//!   ([`PageCache`], one memfd per [`Family`] and host, each page stored
//!   once for all clones here) with `UFFDIO_COPY`, or is requested from the
//!   parent's memory server through a [`PageSource`] together with a few
//!   following data pages (prefetch). The transport's receiver thread hands
//!   arrivals to [`Family::deliver_batch`], which copies each page into every
//!   clone that asked for it with `DONTWAKE` and then wakes each clone's
//!   faulting pages once.
//! - Failure: when the source fails ([`Family::fail`]), a request outlives
//!   the fetch timeout, or a fault thread dies, every affected clone gets
//!   its `on_failure` callback once and its range is unregistered, which
//!   wakes every waiting fault; from then on its faults fill with zeros, so
//!   nothing waits forever, and [`FaultHandler::failure`] tells the VMM to
//!   discard the VM.
//!
//! The cache's presence bits are set with `Release` after a page's bytes
//! are written and tested with `Acquire` before they are read; a clone's
//! installed bits are claimed with `fetch_or` so exactly one thread copies
//! each page into it.

mod avoid;
mod cache;
mod handler;
mod stats;
mod sys;

pub use avoid::{AvoidError, AvoidMap, AvoidReason};
pub use cache::{CacheError, PageCache};
pub use handler::{Family, FaultError, FaultHandler, FetchConfig, PageSource, StartError};
pub use stats::{AvoidedPages, CloneStats, FamilyStats, LatencySummary};

/// Page size of guest memory.
pub const PAGE_SIZE: u64 = 4096;
