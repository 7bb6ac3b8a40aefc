//! The system calls aya does not wrap: memory-mapping a BPF array map as shared `u64` words, and
//! resolving an interface name in the calling thread's network namespace.
//!
//! All `unsafe` of the crate except one `Pod` impl (in `abi`) lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicU64;

use memmap2::{MmapOptions, MmapRaw};

/// A `MAP_SHARED` mapping of a `BPF_F_MMAPABLE` array map whose values are `u64`: the same
/// memory the XDP program reads and updates, seen as atomic words. Unmapped on drop.
#[derive(Debug)]
pub(crate) struct SharedWords {
    map: MmapRaw,
    words: usize,
}

impl SharedWords {
    /// Maps the first `words` values of the array map `map_fd` (value size 8) read-write.
    ///
    /// The caller checks that the map is an array with `BPF_F_MMAPABLE`, 8-byte values and at
    /// least `words` entries; the kernel refuses the mapping otherwise.
    pub(crate) fn map(map_fd: BorrowedFd<'_>, words: usize) -> io::Result<Self> {
        let len = words
            .checked_mul(size_of::<u64>())
            .filter(|&len| len > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad mapping size"))?;
        let map = MmapOptions::new().len(len).map_raw(&map_fd)?;
        Ok(Self { map, words })
    }

    /// The word at `index`, or `None` past the end of the mapping.
    pub(crate) fn word(&self, index: usize) -> Option<&AtomicU64> {
        if index >= self.words {
            return None;
        }
        let word = self.map.as_ptr().cast::<AtomicU64>().wrapping_add(index);
        // SAFETY: `index < words`, so the word lies inside the mapping, which is page-aligned
        // (hence 8-byte aligned, as `AtomicU64` needs) and stays mapped until `self` is dropped,
        // which the returned borrow of `self` outlives; a BPF array map cannot be resized, so
        // every mapped page stays backed. The memory is shared with the kernel and BPF
        // programs, which access it only with aligned 8-byte loads and atomic operations, so
        // treating it as `AtomicU64` races with nothing non-atomic.
        Some(unsafe { &*word })
    }

    /// Number of words mapped.
    pub(crate) fn len(&self) -> usize {
        self.words
    }
}

/// The index of interface `name` in the calling thread's network namespace.
pub(crate) fn interface_index(name: &str) -> io::Result<u32> {
    let c_name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name contains NUL"))?;
    // SAFETY: `c_name` is a valid NUL-terminated string that lives across the call;
    // if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}
