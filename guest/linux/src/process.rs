//! The process itself: identity, limits, the FS base, the calls it made
//! that the personality does not implement, and its end.

use snowflock_guest::abi::linux::UNIMPLEMENTED_REPORT;
use snowflock_guest::abi::nr;
use snowflock_guest::hypercall;

use crate::errno::{EINVAL, SysResult};
use crate::names;
use crate::user::UserMemory;

const ARCH_SET_GS: u64 = 0x1001;
const ARCH_SET_FS: u64 = 0x1002;
const ARCH_GET_FS: u64 = 0x1003;
const ARCH_GET_GS: u64 = 0x1004;

const RLIMIT_STACK: u64 = 3;
const RLIMIT_NOFILE: u64 = 7;
const RLIM_INFINITY: u64 = u64::MAX;
/// Distinct unimplemented call numbers remembered for the report.
const UNIMPLEMENTED_SLOTS: usize = 32;

#[derive(Debug)]
pub(crate) struct Process {
    fs_base: u64,
    name: [u8; 16],
    unimplemented: [(u64, u64); UNIMPLEMENTED_SLOTS],
}

/// `struct utsname`: six fields of 65 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct Utsname([[u8; 65]; 6]);

fn field(text: &str) -> [u8; 65] {
    let mut out = [0u8; 65];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
}

impl Process {
    pub(crate) fn new() -> Self {
        Self {
            fs_base: 0,
            name: *b"program\0\0\0\0\0\0\0\0\0",
            unimplemented: [(0, 0); UNIMPLEMENTED_SLOTS],
        }
    }

    pub(crate) fn arch_prctl(&mut self, user: &UserMemory, code: u64, addr: u64) -> SysResult {
        match code {
            ARCH_SET_FS => {
                // SAFETY: SET_FS_BASE takes a number; the VMM checks it is canonical.
                let (rax, _) = unsafe { hypercall::call(nr::SET_FS_BASE, addr, 0, 0, 0) };
                if rax != 0 {
                    return Err(EINVAL);
                }
                self.fs_base = addr;
                Ok(0)
            }
            ARCH_GET_FS => user.write(addr, &self.fs_base),
            ARCH_SET_GS | ARCH_GET_GS => Err(EINVAL),
            _ => Err(EINVAL),
        }
    }

    /// `prctl`: the thread's name (kept, as Linux keeps 16 bytes of it);
    /// other options are refused.
    pub(crate) fn prctl(&mut self, user: &UserMemory, option: u64, arg: u64) -> SysResult {
        const PR_SET_NAME: u64 = 15;
        const PR_GET_NAME: u64 = 16;
        match option {
            PR_SET_NAME => {
                let name: [u8; 16] = user.read(arg)?;
                self.name = name;
                self.name[15] = 0;
                Ok(0)
            }
            PR_GET_NAME => user.write(arg, &self.name),
            _ => Err(EINVAL),
        }
    }

    pub(crate) fn uname(user: &UserMemory, buf: u64) -> SysResult {
        let names = Utsname([
            field("Linux"),
            field("snowflock"),
            field("6.1.0-snowflock"),
            field("#1 SMP snowflock Linux personality"),
            field("x86_64"),
            field("(none)"),
        ]);
        user.write(buf, &names)
    }

    /// `prlimit64`: limits can be read; setting them is accepted and ignored.
    pub(crate) fn prlimit(user: &UserMemory, resource: u64, old: u64) -> SysResult {
        if old != 0 {
            let limit: [u64; 2] = match resource {
                RLIMIT_STACK => [8 << 20, RLIM_INFINITY],
                RLIMIT_NOFILE => [1024, 1024],
                _ => [RLIM_INFINITY, RLIM_INFINITY],
            };
            user.write(old, &limit)?;
        }
        Ok(0)
    }

    /// `kill`, `tkill`, `tgkill` to itself: signal 0 checks, any other ends
    /// the program as its default action would (no handlers run), with the
    /// status a shell shows (128 + the signal).
    pub(crate) fn signal_self(&self, target: u64, signal: u64) -> Result<u64, u64> {
        if target != 1 && target != 0 {
            return Err(crate::errno::ESRCH);
        }
        if signal == 0 {
            return Ok(0);
        }
        if signal > 64 {
            return Err(EINVAL);
        }
        let line = alloc::format!("sf-linux: the program raised signal {signal}\n");
        hypercall::console_write(line.as_bytes());
        self.exit(128 + signal)
    }

    /// Counts an unimplemented call (the caller returns `ENOSYS`).
    pub(crate) fn unimplemented(&mut self, nr: u64) {
        for slot in &mut self.unimplemented {
            if slot.1 == 0 {
                *slot = (nr, 1);
                return;
            }
            if slot.0 == nr {
                slot.1 += 1;
                return;
            }
        }
    }

    /// Ends the VM with the program's exit status, after reporting the
    /// unimplemented calls it made.
    pub(crate) fn exit(&self, status: u64) -> ! {
        let made: alloc::vec::Vec<alloc::string::String> = self
            .unimplemented
            .iter()
            .filter(|s| s.1 > 0)
            .map(|&(nr, count)| {
                alloc::format!(" {} ({nr}) x{count}", names::name(nr).unwrap_or("?"))
            })
            .collect();
        if !made.is_empty() {
            let line = alloc::format!("{UNIMPLEMENTED_REPORT}{}\n", made.concat());
            hypercall::console_write(line.as_bytes());
        }
        hypercall::exit(status & 0xff)
    }
}
