//! Memory on demand for hollow clones. A clone started on another host than
//! its parent gets as its memory a private mapping of its clone point's
//! host page cache (a memfd, empty at first) registered with userfaultfd
//! for missing pages; this crate serves its page faults: zero-filling pages
//! whose contents do not matter and fetching the rest from the parent's
//! memory server into the cache. A page in the cache is mapped by the
//! kernel on a clone's first touch without any userfault, and all clones on
//! a host share one copy of it until they write it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use snowflock_fault_handler::{
//!     AvoidMap, Family, FaultError, FaultHandler, FetchConfig, PAGE_SIZE, PageSource,
//! };
//!
//! /// Asks the memory server for pages; its receiver thread later calls
//! /// `Family::deliver_batch` (or `Family::fail` when the connection dies).
//! struct Server;
//! impl PageSource for Server {
//!     fn request(&self, _family: u64, _pages: &[u64]) { /* send a request */ }
//! }
//!
//! let mem_size = 64 << 20;
//! let config = FetchConfig {
//!     fetch_timeout: Duration::from_secs(5),
//!     prefetch_pages: 8,
//!     fault_around_pages: 16,
//!     huge_blocks: true,
//! };
//! let family = Family::new(0x42, mem_size, Arc::new(Server), config)?;
//! // The clone's memory: a private view of the family's page cache, untouched.
//! // SAFETY: a new mapping at an address the kernel picks, of a memfd that is
//! // never truncated.
//! let memory = unsafe {
//!     memmap2::MmapOptions::new().len(mem_size as usize).no_reserve_swap()
//!         .map_copy(&family.cache().memfd())?
//! };
//! // Raw pointers only: the handler installs pages behind our back.
//! let memory = memmap2::MmapRaw::from(memory);
//! // Pages 0..1000 hold data at the clone point; 500..600 were free heap.
//! let avoid = AvoidMap::new(mem_size / PAGE_SIZE, &[(0, 1000)], &[(500, 100)])?;
//! let on_failure = Arc::new(|e: &FaultError| eprintln!("clone failed: {e}"));
//! // SAFETY: `memory` is a fresh private mapping of the whole cache memfd that
//! // stays mapped until the handler is closed below.
//! let handler = unsafe {
//!     FaultHandler::start(family, memory.as_mut_ptr(), mem_size, avoid, on_failure)?
//! };
//! // ... run the VM on `memory`; forward the guest's fresh-page reports:
//! handler.mark_fresh(&[(2000, 16)]);
//! println!("{:?}", handler.stats());
//! handler.close(); // before unmapping `memory`
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Threading model
//!
//! - One [`Family`] per clone point and host (shared through `Arc`): the
//!   [`PageCache`] (one memfd; each fetched page stored once for every
//!   clone of the family here), the [`PageSource`], and the table of
//!   outstanding requests (page → waiting clones, request time).
//! - One thread per clone ([`FaultHandler`]), running an io_uring loop:
//!   `Read`s of the clone's non-blocking userfaultfd (messages parsed here),
//!   a `Read` of a stop eventfd, and a 50 ms `Timeout` that checks request
//!   deadlines. A fault on a page
//!   - already installed in this clone is woken;
//!   - named by the [`AvoidMap`] (zero at the clone point, free in the
//!     guest heap then, or handed out fresh since) is zero-filled together
//!     with the other avoided, missing pages of its aligned 64-page window,
//!     and never fetched: pages the guest is about to write (marked fresh,
//!     or the page of a write fault) get writable zeroed pages
//!     (`UFFDIO_COPY` from a zero mapping), the rest the shared zero page
//!     (`UFFDIO_ZEROPAGE`), which costs no memory until written;
//!   - in the host cache (it arrived after the fault was raised) is woken:
//!     the retried fault maps it;
//!   - otherwise is requested from the source, with up to
//!     [`FetchConfig::prefetch_pages`] following data pages when the
//!     clone's faults look sequential, and the missing data pages of its
//!     aligned block of [`FetchConfig::fault_around_pages`].
//! - The transport's receiver thread calls [`Family::deliver_parts`] (or
//!   [`Family::deliver_batch`]): each page is written into the cache once,
//!   in one `pwritev` straight from the buffers it arrived in (the one copy
//!   of its bytes on this host), then each clone's faulting pages get one
//!   `UFFDIO_WAKE` per contiguous run. Nothing is copied per clone.
//! - A per-clone bitmap, claimed with `fetch_or`, makes exactly one thread
//!   zero-fill each avoided page of a clone, and counts each fetched page
//!   once.
//!
//! # Memory ordering of the page cache
//!
//! A page is claimed (`fetch_or`, `AcqRel`) by one inserter, which writes
//! it with one `pwritev` and then sets its present bit with `Release`.
//! Present pages are never written again. The kernel never maps a page
//! half written (see [`PageCache`]). A fault checks the cache and
//! registers as a waiter under the family's lock, and a delivery takes the
//! waiters of stored pages under the same lock after storing them, so no
//! page can arrive unseen between the check and the registration.
//!
//! # Failure
//!
//! A clone fails when its family fails ([`Family::fail`]: the transport is
//! gone; a request older than [`FetchConfig::fetch_timeout`]; a malformed
//! page). Zero-filling failing or a fault thread dying (a drop guard catches
//! panics) fails the whole family on this host too: its clones share the
//! cache, and once a region is unregistered the kernel fills its holes with
//! zero pages *in the cache*, where every sibling would see them. Then,
//! once per clone, `on_failure` runs
//! (the caller kicks the vCPU out of `KVM_RUN`), [`FaultHandler::failure`]
//! is set, and the region is unregistered, which wakes every waiting fault:
//! from then on every missing page of the clone reads as zeros, so no
//! thread (a vCPU stuck in a fault inside the kernel included) waits
//! forever. The VM has then run on wrong memory and must be discarded.
//!
//! Every wait is bounded: requests by the fetch timeout, closing by a 2 s
//! limit on the fault thread, the ring's shutdown by a 1 s drain.

mod avoid;
mod cache;
pub mod ceiling;
mod collapse;
mod handler;
mod pagemap;
mod ring;
mod shmem_policy;
mod stats;
mod sync;
mod sys;

pub use avoid::{AvoidError, AvoidMap, AvoidReason};
pub use cache::{CacheError, HugeBlocks, InsertError, PageCache};
pub use handler::{Family, FaultError, FaultHandler, FetchConfig, PageSource, StartError};
pub use stats::{AvoidedPages, CloneStats, FamilyStats, LatencySummary};

/// Page size of guest memory.
pub const PAGE_SIZE: u64 = 4096;
