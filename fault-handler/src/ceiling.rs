//! The kernel's bulk install rate, the ceiling a page transport is measured
//! against: `UFFDIO_COPY` of whole chunks from resident memory into a fresh
//! registered region, with no fault, no network and no page cache.

use std::time::{Duration, Instant};

use memmap2::{MmapMut, MmapOptions, MmapRaw};

use crate::{PAGE_SIZE, sys};

/// A failure to measure the bulk install rate.
#[derive(Debug, thiserror::Error)]
pub enum CeilingError {
    #[error("chunks of {chunk_pages} pages do not tile {pages} pages")]
    BadShape { pages: u64, chunk_pages: u64 },
    #[error("mapping the measured region failed")]
    Map(#[source] std::io::Error),
    #[error("setting up the userfaultfd failed")]
    Userfaultfd(#[source] std::io::Error),
    #[error("UFFDIO_COPY failed")]
    Copy(#[source] std::io::Error),
    #[error("page {page:#x} does not hold the copied bytes")]
    Verify { page: u64 },
}

/// `len` bytes of private anonymous memory where the kernel picks, without
/// swap reservation (`MAP_NORESERVE`), unmapped on drop.
fn anonymous(len: usize) -> std::io::Result<MmapMut> {
    MmapOptions::new().len(len).no_reserve_swap().map_anon()
}

/// Installs `pages` pages into a fresh registered region with one
/// `UFFDIO_COPY` per `chunk_pages`-page chunk, from a resident source
/// chunk; returns the time the copies took, after checking that pages
/// hold the copied bytes.
pub fn bulk_copy(pages: u64, chunk_pages: u64) -> Result<Duration, CeilingError> {
    if pages == 0 || chunk_pages == 0 || !pages.is_multiple_of(chunk_pages) {
        return Err(CeilingError::BadShape { pages, chunk_pages });
    }
    let chunk = (chunk_pages * PAGE_SIZE) as usize;
    let mut source = anonymous(chunk).map_err(CeilingError::Map)?;
    source.fill(0x5a);
    // Raw pointers only: the kernel installs the region's pages behind our back.
    let region = MmapRaw::from(anonymous((pages * PAGE_SIZE) as usize).map_err(CeilingError::Map)?);
    let uffd = sys::open_userfaultfd().map_err(CeilingError::Userfaultfd)?;
    sys::api_handshake(&uffd).map_err(CeilingError::Userfaultfd)?;
    let base = region.as_ptr() as u64;
    sys::register(&uffd, base, pages * PAGE_SIZE).map_err(CeilingError::Userfaultfd)?;
    let started = Instant::now();
    for first in (0..pages).step_by(chunk_pages as usize) {
        // SAFETY: the source is a resident chunk of ours of the copied
        // length; the destination is a chunk of `region`, registered with
        // `uffd` above and ours until it is dropped after this loop.
        unsafe {
            sys::fill_range(
                &uffd,
                sys::Fill::Copy {
                    src: source.as_ptr(),
                },
                base + first * PAGE_SIZE,
                chunk_pages * PAGE_SIZE,
                true,
            )
        }
        .map_err(CeilingError::Copy)?;
    }
    let took = started.elapsed();
    for page in [0, pages / 2, pages - 1] {
        let at = region
            .as_ptr()
            .wrapping_add((page * PAGE_SIZE + PAGE_SIZE - 1) as usize);
        // SAFETY: inside `region`, whose pages were all installed above, so
        // the read does not wait on the userfaultfd.
        if unsafe { at.read_volatile() } != 0x5a {
            return Err(CeilingError::Verify { page });
        }
    }
    drop(uffd);
    drop(region);
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_copies_fill_the_region_and_bad_shapes_are_refused() {
        assert!(bulk_copy(1024, 64).unwrap() > Duration::ZERO);
        assert!(matches!(
            bulk_copy(100, 64),
            Err(CeilingError::BadShape { .. })
        ));
        assert!(matches!(
            bulk_copy(0, 1),
            Err(CeilingError::BadShape { .. })
        ));
    }
}
