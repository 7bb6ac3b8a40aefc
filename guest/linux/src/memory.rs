//! The program's address space: the break growing up from the end of the
//! program, anonymous mappings growing down from the personality's heap.
//!
//! Guest memory is identity-mapped and all of it readable and writable, so
//! `mprotect` changes nothing and a mapping is a range handed out. Memory
//! that was never handed out is still the zero pages the VM started with
//! (or that its clone point had), so only reused ranges are zeroed: a large
//! fresh mapping costs no writes, and no host memory until it is touched.

use alloc::vec::Vec;
use core::ops::Range;

use snowflock_guest::abi::PAGE_SIZE;

use crate::errno::{EINVAL, ENOMEM, SysResult};

/// Kept free between the break and the lowest mapping.
const GAP: u64 = 1 << 20;

pub(crate) const MAP_FIXED: u64 = 0x10;
pub(crate) const MAP_ANONYMOUS: u64 = 0x20;
pub(crate) const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
pub(crate) const MREMAP_MAYMOVE: u64 = 1;
pub(crate) const MADV_DONTNEED: u64 = 4;

#[derive(Debug)]
pub(crate) struct Memory {
    brk_start: u64,
    brk: u64,
    /// The highest break ever set: above it the break's pages are untouched.
    brk_high: u64,
    /// The lowest address ever mapped: below it (down to `brk_high`) untouched.
    floor: u64,
    top: u64,
    /// Unmapped ranges in `[floor, top)`, sorted and disjoint.
    holes: Vec<Range<u64>>,
}

fn page_up(len: u64) -> Option<u64> {
    len.checked_add(PAGE_SIZE - 1).map(|l| l & !(PAGE_SIZE - 1))
}

fn zero(range: Range<u64>) {
    if range.is_empty() {
        return;
    }
    // SAFETY: callers pass ranges of the program's own memory, inside the
    // break or the mapping area, which nothing else references during the call.
    unsafe {
        core::ptr::write_bytes(
            range.start as *mut u8,
            0,
            (range.end - range.start) as usize,
        )
    };
}

impl Memory {
    pub(crate) fn new(brk_start: u64, top: u64) -> Self {
        Self {
            brk_start,
            brk: brk_start,
            brk_high: brk_start,
            floor: top,
            top,
            holes: Vec::new(),
        }
    }

    /// `brk(addr)`: the new break, or the current one if `addr` cannot be it.
    pub(crate) fn brk(&mut self, addr: u64) -> u64 {
        if addr < self.brk_start || addr.saturating_add(GAP) > self.floor {
            return self.brk;
        }
        if addr > self.brk {
            // Pages between the old break and the highest one were used before.
            zero(self.brk..addr.min(self.brk_high));
        }
        self.brk = addr;
        self.brk_high = self.brk_high.max(addr);
        self.brk
    }

    /// An anonymous mapping of `len` bytes (`addr` with `MAP_FIXED`).
    pub(crate) fn map(&mut self, addr: u64, len: u64, flags: u64) -> SysResult {
        let len = page_up(len).filter(|&l| l > 0).ok_or(EINVAL)?;
        if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE) != 0 {
            return self.map_fixed(addr, len);
        }
        if let Some(start) = self.take_hole(len) {
            zero(start..start + len);
            return Ok(start);
        }
        let start = self.floor.checked_sub(len).ok_or(ENOMEM)?;
        if start < self.brk_high.saturating_add(GAP) {
            return Err(ENOMEM);
        }
        self.floor = start;
        Ok(start)
    }

    fn map_fixed(&mut self, addr: u64, len: u64) -> SysResult {
        let end = addr.checked_add(len).ok_or(EINVAL)?;
        if !addr.is_multiple_of(PAGE_SIZE)
            || end > self.top
            || addr < self.brk_high.saturating_add(GAP)
        {
            return Err(EINVAL);
        }
        if addr < self.floor {
            // Below the floor nothing was used; the part up to it is a hole.
            let gap = end.min(self.floor)..self.floor;
            self.floor = addr;
            self.release(gap);
        }
        self.remove_holes(addr..end);
        zero(addr..end);
        Ok(addr)
    }

    /// `munmap`: the range becomes a hole (its pages are zeroed when reused).
    pub(crate) fn unmap(&mut self, addr: u64, len: u64) -> SysResult {
        let len = page_up(len).filter(|&l| l > 0).ok_or(EINVAL)?;
        let end = addr.checked_add(len).ok_or(EINVAL)?;
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(EINVAL);
        }
        let start = addr.max(self.floor);
        let end = end.min(self.top);
        if start < end {
            self.release(start..end);
        }
        Ok(0)
    }

    /// `mremap`: shrinks in place, grows into a new mapping (with `MREMAP_MAYMOVE`).
    pub(crate) fn remap(&mut self, old: u64, old_len: u64, new_len: u64, flags: u64) -> SysResult {
        let old_len = page_up(old_len).ok_or(EINVAL)?;
        let new_len = page_up(new_len).filter(|&l| l > 0).ok_or(EINVAL)?;
        if !old.is_multiple_of(PAGE_SIZE)
            || old < self.floor
            || old.saturating_add(old_len) > self.top
        {
            return Err(EINVAL);
        }
        if new_len <= old_len {
            self.unmap(old + new_len, old_len - new_len)?;
            return Ok(old);
        }
        if flags & MREMAP_MAYMOVE == 0 {
            return Err(ENOMEM);
        }
        let new = self.map(0, new_len, 0)?;
        // SAFETY: both ranges are the program's mappings and do not overlap
        // (the new one came from a hole or below the floor).
        unsafe {
            core::ptr::copy_nonoverlapping(old as *const u8, new as *mut u8, old_len as usize);
        }
        self.unmap(old, old_len)?;
        Ok(new)
    }

    /// `madvise(MADV_DONTNEED)`: the range reads as zeros afterwards.
    pub(crate) fn discard(&mut self, addr: u64, len: u64) -> SysResult {
        let len = page_up(len).ok_or(EINVAL)?;
        let end = addr.checked_add(len).ok_or(EINVAL)?;
        let in_break = addr >= self.brk_start && end <= self.brk_high;
        let in_maps = addr >= self.floor && end <= self.top;
        if !addr.is_multiple_of(PAGE_SIZE) || !(in_break || in_maps) {
            return Err(EINVAL);
        }
        zero(addr..end);
        Ok(0)
    }

    fn take_hole(&mut self, len: u64) -> Option<u64> {
        let index = self.holes.iter().position(|h| h.end - h.start >= len)?;
        let hole = &mut self.holes[index];
        let start = hole.start;
        hole.start += len;
        if hole.is_empty() {
            self.holes.remove(index);
        }
        Some(start)
    }

    fn remove_holes(&mut self, range: Range<u64>) {
        let mut kept = Vec::with_capacity(self.holes.len() + 1);
        for hole in self.holes.drain(..) {
            if hole.end <= range.start || hole.start >= range.end {
                kept.push(hole);
                continue;
            }
            if hole.start < range.start {
                kept.push(hole.start..range.start);
            }
            if hole.end > range.end {
                kept.push(range.end..hole.end);
            }
        }
        self.holes = kept;
    }

    fn release(&mut self, range: Range<u64>) {
        self.remove_holes(range.clone());
        let at = self.holes.partition_point(|h| h.start < range.start);
        self.holes.insert(at, range);
        // Merge neighbours.
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(self.holes.len());
        for hole in self.holes.drain(..) {
            match merged.last_mut() {
                Some(last) if last.end == hole.start => last.end = hole.end,
                _ => merged.push(hole),
            }
        }
        self.holes = merged;
    }
}
