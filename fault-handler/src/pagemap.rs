//! How pages of this process's memory are mapped, from `/proc/self/pagemap`:
//! one 64-bit entry per page (see the kernel's `pagemap.rst`).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::PAGE_SIZE;

/// The page is mapped (in memory).
const PRESENT: u64 = 1 << 63;
/// The page is a page of a file (or shared anonymous memory), not a private
/// anonymous page: for a private mapping of the page cache, still the cache's
/// page rather than a copy the process wrote.
const FILE_PAGE: u64 = 1 << 61;

/// The mapping state of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapped {
    /// Not mapped: never touched (or dropped).
    No,
    /// Mapped to the file's page (read, never written).
    File,
    /// Mapped to a private copy (written).
    Private,
}

/// The mapping state of `pages` pages from `addr` (page-aligned).
pub(crate) fn read(addr: u64, pages: u64) -> std::io::Result<Vec<Mapped>> {
    let file = File::open("/proc/self/pagemap")?;
    let mut bytes = vec![0u8; pages as usize * 8];
    file.read_exact_at(&mut bytes, addr / PAGE_SIZE * 8)?;
    Ok(bytes
        .as_chunks::<8>()
        .0
        .iter()
        .map(|entry| {
            let entry = u64::from_le_bytes(*entry);
            match (entry & PRESENT != 0, entry & FILE_PAGE != 0) {
                (false, _) => Mapped::No,
                (true, true) => Mapped::File,
                (true, false) => Mapped::Private,
            }
        })
        .collect())
}
