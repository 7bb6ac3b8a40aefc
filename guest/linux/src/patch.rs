//! Rewriting `syscall` sites into calls through the sled (zpoline's
//! trampoline). A site that trapped is known to be a real `syscall`
//! instruction; if it lies in the program's code (an executable segment that
//! is not writable) and its number has a sled slot, its two bytes `0f 05`
//! become `ff d0` (`call *%rax`), which lands at address `rax` in page 0 and
//! slides into the syscall entry. Other sites keep trapping every time.
//!
//! The entry checks how it was reached: `0f 05` before the return address
//! is a trap; `ff d0` must be a site patched here, or the program called a
//! small address (a null function pointer) and ends with that report.

use snowflock_guest::abi::linux::SYSCALL_SLED_LEN;

const SYSCALL: [u8; 2] = [0x0f, 0x05];
const CALL_RAX: [u8; 2] = [0xff, 0xd0];
/// Patched sites remembered (open addressing); beyond this, sites trap.
const TABLE: usize = 4096;
const MAX_CODE_RANGES: usize = 8;

/// How a system call came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Through the VMM's trap (first call of a site, or a site left unpatched).
    Trap { patched_now: bool },
    /// Through the sled from a patched site.
    Sled,
    /// Not from a `syscall` site: a call into page 0.
    Wild,
}

#[derive(Debug)]
pub(crate) struct Sites {
    code: [(u64, u64); MAX_CODE_RANGES],
    code_ranges: usize,
    table: [u64; TABLE],
    patched: usize,
    /// Off (`START_NO_PATCH`): every site keeps trapping.
    patching: bool,
}

impl Sites {
    pub(crate) fn new(patching: bool) -> Self {
        Self {
            code: [(0, 0); MAX_CODE_RANGES],
            code_ranges: 0,
            table: [0; TABLE],
            patched: 0,
            patching,
        }
    }

    /// Adds a range of the program's code (an executable, read-only segment).
    pub(crate) fn add_code(&mut self, start: u64, end: u64) {
        if self.code_ranges < MAX_CODE_RANGES {
            self.code[self.code_ranges] = (start, end);
            self.code_ranges += 1;
        }
    }

    fn in_code(&self, site: u64) -> bool {
        self.code[..self.code_ranges]
            .iter()
            .any(|&(start, end)| site >= start && site.saturating_add(2) <= end)
    }

    fn slot(&self, site: u64) -> (usize, bool) {
        let mut index = (site.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52) as usize % TABLE;
        for _ in 0..TABLE {
            match self.table[index] {
                0 => return (index, false),
                s if s == site => return (index, true),
                _ => index = (index + 1) % TABLE,
            }
        }
        (TABLE, false)
    }

    /// Classifies the call that returns to `return_address` with number
    /// `nr`, patching the site if it trapped and may be patched.
    pub(crate) fn arrive(&mut self, return_address: u64, nr: u64) -> Arrival {
        let site = return_address.wrapping_sub(2);
        if !self.in_code(site) {
            // Sites outside the program's code (e.g. generated code) trap.
            return Arrival::Trap { patched_now: false };
        }
        // SAFETY: `site..site + 2` lies in the program's code segment, which is
        // mapped and readable.
        let bytes = unsafe { core::ptr::read_unaligned(site as *const [u8; 2]) };
        match bytes {
            SYSCALL => {
                let patchable = self.patching && nr < SYSCALL_SLED_LEN && self.patched * 2 < TABLE;
                if !patchable {
                    return Arrival::Trap { patched_now: false };
                }
                let (index, _) = self.slot(site);
                self.table[index] = site;
                self.patched += 1;
                // SAFETY: as above, and the page is writable (all guest
                // memory is); the vCPU is not executing these bytes now, and
                // it returns past them.
                unsafe { core::ptr::write_unaligned(site as *mut [u8; 2], CALL_RAX) };
                Arrival::Trap { patched_now: true }
            }
            CALL_RAX if self.slot(site).1 => Arrival::Sled,
            _ => Arrival::Wild,
        }
    }
}
