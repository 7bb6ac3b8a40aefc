//! The program's memory as the personality may touch it on the program's
//! behalf: every pointer and length a system call passes is checked here
//! against the guest's user ranges, and a bad one is `EFAULT` to the program.

use core::ops::Range;

use snowflock_guest::abi::IMAGE_BASE;

use crate::errno::{EFAULT, SysResult};

/// The ranges a program's pointer may point into.
#[derive(Debug, Clone)]
pub(crate) struct UserMemory {
    /// The program, its break and its mappings: `[IMAGE_BASE, personality heap)`.
    pub(crate) data: Range<u64>,
    /// The stack: `[stack_bottom, mem_size)`.
    pub(crate) stack: Range<u64>,
}

impl UserMemory {
    /// Whether `[addr, addr + len)` lies inside one user range.
    pub(crate) fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        [&self.data, &self.stack]
            .iter()
            .any(|r| addr >= r.start && end <= r.end)
    }

    /// The program's bytes at `[addr, addr + len)`.
    pub(crate) fn bytes(&self, addr: u64, len: u64) -> Result<&'static [u8], u64> {
        if len == 0 {
            return Ok(&[]);
        }
        if !self.contains(addr, len) {
            return Err(EFAULT);
        }
        // SAFETY: the range lies in identity-mapped guest memory the program
        // owns; the program is stopped in this system call, so nothing else
        // writes it while the slice lives (it never outlives the call).
        Ok(unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) })
    }

    /// The program's bytes at `[addr, addr + len)`, to be written.
    pub(crate) fn bytes_mut(&self, addr: u64, len: u64) -> Result<&'static mut [u8], u64> {
        if len == 0 {
            return Ok(&mut []);
        }
        if !self.contains(addr, len) {
            return Err(EFAULT);
        }
        // SAFETY: as in `bytes`; each system call takes at most one mutable
        // slice of a range at a time.
        Ok(unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len as usize) })
    }

    /// Writes `value`'s bytes at `addr`.
    pub(crate) fn write<T: Copy>(&self, addr: u64, value: &T) -> SysResult {
        let size = size_of::<T>();
        // SAFETY: `T: Copy` plain data; reading its bytes is always valid.
        let raw = unsafe { core::slice::from_raw_parts((value as *const T).cast::<u8>(), size) };
        self.bytes_mut(addr, size as u64)?.copy_from_slice(raw);
        Ok(0)
    }

    /// Reads a `T` at `addr` (any alignment).
    pub(crate) fn read<T: Copy>(&self, addr: u64) -> Result<T, u64> {
        let raw = self.bytes(addr, size_of::<T>() as u64)?;
        // SAFETY: `raw` holds exactly size_of::<T>() bytes; `T` is plain
        // data for which every bit pattern the callers read is valid.
        Ok(unsafe { core::ptr::read_unaligned(raw.as_ptr().cast::<T>()) })
    }

    /// A NUL-terminated path at `addr`, without the NUL (at most 4095 bytes).
    pub(crate) fn path(&self, addr: u64) -> Result<&'static [u8], u64> {
        const PATH_MAX: u64 = 4096;
        for len in 0..PATH_MAX {
            if self.bytes(addr + len, 1)?[0] == 0 {
                return self.bytes(addr, len);
            }
        }
        Err(crate::errno::ENAMETOOLONG)
    }
}

/// The lowest address the program's data range starts at.
pub(crate) const DATA_START: u64 = IMAGE_BASE;
