//! The system calls aya does not wrap: memory-mapping a BPF array map as shared `u64` words, and
//! resolving an interface name in the calling thread's network namespace.
//!
//! All `unsafe` of the crate except one `Pod` impl (in `abi`) lives here.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// A `MAP_SHARED` mapping of a `BPF_F_MMAPABLE` array map whose values are `u64`: the same
/// memory the XDP program reads and updates, seen as atomic words.
pub(crate) struct SharedWords {
    base: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is plain shared memory, only ever accessed through `&AtomicU64`, which is
// `Sync`; nothing in `SharedWords` is tied to the thread that created it.
unsafe impl Send for SharedWords {}
// SAFETY: as above: concurrent access goes through atomics only.
unsafe impl Sync for SharedWords {}

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
        // SAFETY: a fresh shared mapping chosen by the kernel (null hint, no MAP_FIXED) replaces
        // no existing memory; the fd is valid for the duration of the call (borrowed).
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map_fd.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(address.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self { base, words })
    }

    /// The word at `index`, or `None` past the end of the mapping.
    pub(crate) fn word(&self, index: usize) -> Option<&AtomicU64> {
        if index >= self.words {
            return None;
        }
        let word = self.base.as_ptr().wrapping_add(index);
        // SAFETY: `index < words`, so the word lies inside the mapping, which is page-aligned
        // (hence 8-byte aligned, as `AtomicU64` needs) and stays mapped until `self` is dropped,
        // which the returned borrow of `self` outlives. The memory is shared with the kernel and
        // BPF programs, which access it only with aligned 8-byte loads and atomic operations, so
        // treating it as `AtomicU64` races with nothing non-atomic.
        Some(unsafe { &*word })
    }

    /// Number of words mapped.
    pub(crate) fn len(&self) -> usize {
        self.words
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: `base`/`words` describe exactly the mapping made in `map`, and no borrow of it
        // outlives `self` (`word` borrows from `self`).
        let result = unsafe { libc::munmap(self.base.as_ptr().cast(), self.words * 8) };
        if result != 0 {
            tracing::warn!(
                error = %io::Error::last_os_error(),
                "unmapping a BPF array map failed"
            );
        }
    }
}

impl fmt::Debug for SharedWords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedWords")
            .field("base", &self.base)
            .field("words", &self.words)
            .finish()
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
