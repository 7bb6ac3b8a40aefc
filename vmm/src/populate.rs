//! Mapping a clone's view of its image ahead of the guest.
//!
//! A clone's memory is a private view of a frozen image: every page is in
//! the host's memory already (in the image's memfds), but not in the
//! clone's page tables, so the guest's first touch of each page takes a
//! host page fault on top of the hypervisor's own fault. `madvise` with
//! `MADV_POPULATE_READ` or `MADV_POPULATE_WRITE` takes those host faults
//! ahead of the guest, from another thread, a range at a time.
//!
//! Kernel semantics this relies on (Linux 5.14+): populating faults pages
//! in exactly as a read (or write) by this process would, without changing
//! any contents. A page already present in the view is left alone (for a
//! write, if it is already writable), so a page the clone has written (its
//! private copy) is never replaced by the image's page. For a read, a page
//! not present is mapped read-only from the image's memfd, and a later
//! guest write copies it as before; for a write, it is copied into a
//! private page of the clone at once, with the image's contents. A
//! populate fault and a concurrent guest fault on the same page are
//! serialised by the page-table lock, and each installs its entry only if
//! the other has not. Holes (zero pages) are not populated: a read fault
//! on a hole of a shared-memory file allocates a page in that file, that
//! is, in the image every clone shares.
//!
//! What it buys depends on the hypervisor's MMU: on a shadow MMU the guest's
//! first touch of a page still exits for the hypervisor's own fault, but
//! KVM then also maps up to 7 neighbouring pages, and only those whose host
//! entries are present *and writable*, which a write populate makes them.
//!
//! A [`ViewLease`] keeps the range mapped while a populate runs: the
//! memory revokes it (waiting for a running call) before its view goes
//! away or is replaced, so a populate never reaches a range that another
//! mapping may have taken.

use std::sync::{Arc, Mutex};

use crate::memory::{MemoryError, MemoryImage, PAGE_SIZE, PageRuns};
use crate::sync::lock;

/// A failed populate.
#[derive(Debug, thiserror::Error)]
pub enum PopulateError {
    #[error("finding the image's data pages failed")]
    DataPages(#[source] MemoryError),
    #[error("a hollow view has no image: its data pages are those of its host page cache")]
    Hollow,
    #[error("guest pages {first:#x}+{count:#x} are outside guest memory ({pages:#x} pages)")]
    OutOfRange { first: u64, count: u64, pages: u64 },
    #[error("populating guest pages {first:#x}+{count:#x} failed")]
    Madvise {
        first: u64,
        count: u64,
        #[source]
        source: std::io::Error,
    },
}

/// The host range of a view of guest memory, while it is mapped.
#[derive(Debug, Clone, Copy)]
struct MappedView {
    addr: usize,
    pages: u64,
}

/// Shared by a view of guest memory and the populates of that view: holds
/// the range while it is mapped, and nothing once the memory revoked it.
#[derive(Debug)]
pub(crate) struct ViewLease {
    view: Mutex<Option<MappedView>>,
}

impl ViewLease {
    /// A lease on `pages` pages mapped at `addr`, valid until revoked.
    pub(crate) fn new(addr: *mut u8, pages: u64) -> Arc<Self> {
        Arc::new(Self {
            view: Mutex::new(Some(MappedView {
                addr: addr as usize,
                pages,
            })),
        })
    }

    /// Ends the lease; returns once no populate of the range runs, and no
    /// later one will start.
    pub(crate) fn revoke(&self) {
        *lock(&self.view) = None;
    }
}

/// How a populate maps pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopulateAccess {
    /// Mapped read-only, shared with the image until the guest writes.
    Read,
    /// Copied into private pages of the VM, as the guest's first write would.
    Write,
}

/// What [`Populator::populate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populated {
    /// The pages are mapped in the view.
    Mapped,
    /// The view is gone (its VM ended or was frozen again): nothing was done,
    /// and nothing more ever will be.
    Gone,
}

/// Populates one VM's view of the image (or, for a hollow clone, of the
/// host page cache) it runs on. Holds the image, so it can be used on any
/// thread while the VM runs, and the view's lease, so it stops doing
/// anything once the view is gone.
#[derive(Debug)]
pub struct Populator {
    /// `None` for a hollow view: its caller knows which pages of the
    /// cache hold data (only those may be populated, see the module doc).
    image: Option<Arc<MemoryImage>>,
    lease: Arc<ViewLease>,
}

impl Populator {
    pub(crate) fn new(image: Option<Arc<MemoryImage>>, lease: Arc<ViewLease>) -> Self {
        Self { image, lease }
    }

    /// The pages of the image that hold data: the only ones worth
    /// populating. Walks the image's memfds (milliseconds per GiB), so call
    /// it off the VM's critical path.
    pub fn data_runs(&self) -> Result<PageRuns, PopulateError> {
        let image = self.image.as_ref().ok_or(PopulateError::Hollow)?;
        let data = image.data_pages().map_err(PopulateError::DataPages)?;
        Ok(PageRuns::from_bitmap(&data))
    }

    /// Maps `count` pages from guest page `first` into the view, unless the
    /// view is gone. Holds the lease meanwhile, so the VM's memory waits for
    /// the call before unmapping: keep ranges to a few MiB.
    pub fn populate(
        &self,
        first: u64,
        count: u64,
        access: PopulateAccess,
    ) -> Result<Populated, PopulateError> {
        let view = lock(&self.lease.view);
        let Some(MappedView { addr, pages }) = *view else {
            return Ok(Populated::Gone);
        };
        if first.checked_add(count).is_none_or(|end| end > pages) {
            return Err(PopulateError::OutOfRange {
                first,
                count,
                pages,
            });
        }
        let start = addr.wrapping_add((first * PAGE_SIZE) as usize);
        let advice = match access {
            PopulateAccess::Read => libc::MADV_POPULATE_READ,
            PopulateAccess::Write => libc::MADV_POPULATE_WRITE,
        };
        // SAFETY: the range lies inside the view (checked above), which
        // stays mapped while the lease is held (the memory revokes it before
        // unmapping or replacing the view). Populating changes no contents
        // and replaces no page the VM wrote (see the module doc).
        let rc = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                (count * PAGE_SIZE) as usize,
                advice,
            )
        };
        if rc != 0 {
            return Err(PopulateError::Madvise {
                first,
                count,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Populated::Mapped)
    }
}
