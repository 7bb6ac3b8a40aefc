//! Mapping clones' memory ahead of their guests, for a view of the
//! parent's image: when, in what order and how much at a time. The
//! mechanism is `snowflock_vmm::populate`; a local clone on a copy of its
//! own (`GuestMemory::copy_of_image_in`) needs none.
//!
//! A local clone's first touch of each page of its parent's state takes a
//! host page fault on the clone's private view although the page is in
//! memory already. Right after a clone starts, one host thread maps its
//! view of the image's data pages into its page tables, a few MiB at a
//! time, in address order, so that the guest's first touch finds the page
//! mapped. The clone never waits for this: it runs from the start, and a
//! page it touches first is faulted in as before. Clones are populated one
//! after the other, in the order they started.
//!
//! A hollow clone's view is populated read-only over the pages its host
//! page cache holds as the populate starts (pages fetched or pushed for
//! earlier clones of the clone point): a page in the cache stays there, so
//! no populate reaches a hole, whose read fault would put a zero page into
//! the cache every sibling maps. Pages arriving later are mapped by the
//! guest's touch as before.

use std::time::Instant;

use std::sync::Arc;

use snowflock_fault_handler::FaultHandler;
use snowflock_vmm::populate::{PopulateAccess, Populated, Populator};

use super::host::HostState;
use crate::config::PopulateMode;
use crate::error_chain;

/// Pages mapped per call (4 MiB): the call keeps the clone's memory from
/// being unmapped and takes the process's mmap lock for reading, so a clone
/// that ends, or a thread that maps memory, waits at most this long.
const CHUNK_PAGES: u64 = 1024;

impl HostState {
    /// Maps the data pages of a local clone's view in the background, if
    /// the configuration asks for it; stops when the clone's memory goes.
    pub(super) fn populate_clone(&self, populator: Populator, vm: u64) {
        let access = match self.config.populate {
            PopulateMode::Off | PopulateMode::Copy => return,
            PopulateMode::Read => PopulateAccess::Read,
            PopulateMode::Write => PopulateAccess::Write,
        };
        self.populating
            .submit(move || populate_view(&populator, access, vm));
    }

    /// Maps a hollow clone's view of the pages already in its host page
    /// cache, read-only, in the background; stops when its memory goes.
    pub(super) fn populate_hollow(&self, populator: Populator, faults: Arc<FaultHandler>, vm: u64) {
        self.populating
            .submit(move || populate_hollow_view(&populator, &faults, vm));
    }
}

fn populate_view(populator: &Populator, access: PopulateAccess, vm: u64) {
    match populator.data_runs() {
        Ok(runs) => populate_runs(populator, runs.runs(), access, vm, |_, _| {}),
        Err(e) => tracing::warn!(vm, "cannot populate a clone's memory: {}", error_chain(&e)),
    }
}

/// Maps a hollow clone's view of the pages in its host cache now, marking
/// each chunk in its fault handler first (for its pushed-page counts).
fn populate_hollow_view(populator: &Populator, faults: &FaultHandler, vm: u64) {
    let runs = faults.family().cache().present_runs();
    populate_runs(
        populator,
        &runs,
        PopulateAccess::Read,
        vm,
        |first, count| faults.mark_populated(first, count),
    );
}

/// Maps `runs` of the view, [`CHUNK_PAGES`] at a time, calling `before`
/// with each chunk first; stops when the view goes.
fn populate_runs(
    populator: &Populator,
    runs: &[(u64, u64)],
    access: PopulateAccess,
    vm: u64,
    before: impl Fn(u64, u64),
) {
    let begun = Instant::now();
    let mut mapped = 0;
    for &(start, count) in runs {
        let end = start + count;
        let mut page = start;
        while page < end {
            let pages = CHUNK_PAGES.min(end - page);
            before(page, pages);
            match populator.populate(page, pages, access) {
                Ok(Populated::Mapped) => mapped += pages,
                Ok(Populated::Gone) => {
                    tracing::debug!(vm, mapped, "clone ended before its memory was populated");
                    return;
                }
                Err(e) => {
                    tracing::warn!(vm, "cannot populate a clone's memory: {}", error_chain(&e));
                    return;
                }
            }
            page += pages;
        }
    }
    tracing::debug!(
        vm,
        mapped,
        us = begun.elapsed().as_micros() as u64,
        "populated a clone's memory"
    );
}
