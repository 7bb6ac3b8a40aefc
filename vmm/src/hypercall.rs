//! Decoding hypercalls: the number comes from the `out` data, arguments from
//! registers. Every pointer and length is checked against the guest layout
//! here, before any host code touches guest memory.

use snowflock_guest::abi::{MAX_TRANSFER, PanicReport, nr};

use crate::boot::GuestLayout;
use crate::hypervisor::Regs;

/// A guest buffer that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: u64,
    pub len: u64,
}

/// A decoded, validated hypercall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hypercall {
    ConsoleWrite {
        data: GuestRange,
    },
    Exit {
        code: i32,
    },
    Panic {
        report: GuestRange,
    },
    RequestTicket {
        clones: u32,
    },
    Clone {
        ticket: u64,
    },
    Checkpoint,
    CreateClones {
        checkpoint: u64,
        ticket: u64,
    },
    ChildExit {
        result: GuestRange,
    },
    Join {
        ticket: u64,
    },
    ChildResult {
        ticket: u64,
        child: u32,
        buf: GuestRange,
    },
    Kill {
        ticket: u64,
    },
    TimeNs,
}

/// A hypercall the VMM refuses; it ends the calling VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypercallError {
    #[error("unknown hypercall number {nr}")]
    UnknownNumber { nr: u32 },
    #[error("hypercall must be a 4-byte `out` (got {size} bytes)")]
    BadAccessSize { size: u8 },
    #[error("{what} pointer {addr:#x}+{len:#x} is outside guest memory the guest may use")]
    BadPointer {
        what: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("{what} of {len} bytes exceeds the {MAX_TRANSFER}-byte limit")]
    TooLong { what: &'static str, len: u64 },
    #[error("{what} = {value} is out of range")]
    BadValue { what: &'static str, value: u64 },
}

fn range(
    layout: &GuestLayout,
    what: &'static str,
    addr: u64,
    len: u64,
    writable: bool,
) -> Result<GuestRange, HypercallError> {
    if len > MAX_TRANSFER {
        return Err(HypercallError::TooLong { what, len });
    }
    if len > 0 && !layout.is_guest_range(addr, len, writable) {
        return Err(HypercallError::BadPointer { what, addr, len });
    }
    Ok(GuestRange { addr, len })
}

fn narrow(what: &'static str, value: u64) -> Result<u32, HypercallError> {
    u32::try_from(value).map_err(|_| HypercallError::BadValue { what, value })
}

/// Decodes hypercall `number` with arguments in `regs` (rdi, rsi, r8, r9).
pub fn decode(number: u32, regs: &Regs, layout: &GuestLayout) -> Result<Hypercall, HypercallError> {
    let (a0, a1, a2, a3) = (regs.rdi, regs.rsi, regs.r8, regs.r9);
    Ok(match number {
        nr::CONSOLE_WRITE => Hypercall::ConsoleWrite {
            data: range(layout, "console buffer", a0, a1, false)?,
        },
        nr::EXIT => Hypercall::Exit { code: a0 as i32 },
        nr::PANIC => Hypercall::Panic {
            report: range(
                layout,
                "panic report",
                a0,
                size_of::<PanicReport>() as u64,
                false,
            )?,
        },
        nr::REQUEST_TICKET => Hypercall::RequestTicket {
            clones: narrow("clone count", a0)?,
        },
        nr::CLONE => Hypercall::Clone { ticket: a0 },
        nr::CHECKPOINT => Hypercall::Checkpoint,
        nr::CREATE_CLONES => Hypercall::CreateClones {
            checkpoint: a0,
            ticket: a1,
        },
        nr::CHILD_EXIT => Hypercall::ChildExit {
            result: range(layout, "result buffer", a0, a1, false)?,
        },
        nr::JOIN => Hypercall::Join { ticket: a0 },
        nr::CHILD_RESULT => Hypercall::ChildResult {
            ticket: a0,
            child: narrow("child id", a1)?,
            buf: range(layout, "result buffer", a2, a3, true)?,
        },
        nr::KILL => Hypercall::Kill { ticket: a0 },
        nr::TIME_NS => Hypercall::TimeNs,
        nr => return Err(HypercallError::UnknownNumber { nr }),
    })
}

/// Decodes a [`PanicReport`]'s raw bytes and validates its two strings.
pub fn panic_strings(
    raw: &[u8; size_of::<PanicReport>()],
    layout: &GuestLayout,
) -> Result<(GuestRange, GuestRange, u32, u32), HypercallError> {
    let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let line_col = word(4);
    Ok((
        range(layout, "panic message", word(0), word(1), false)?,
        range(layout, "panic file name", word(2), word(3), false)?,
        line_col as u32,
        (line_col >> 32) as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use snowflock_guest::abi::IMAGE_BASE;

    fn layout() -> GuestLayout {
        GuestLayout::new(64 << 20).unwrap()
    }

    fn regs(rdi: u64, rsi: u64, r8: u64, r9: u64) -> Regs {
        Regs {
            rdi,
            rsi,
            r8,
            r9,
            ..Regs::default()
        }
    }

    #[test]
    fn console_write_inside_image_area_is_accepted() {
        let call = decode(nr::CONSOLE_WRITE, &regs(IMAGE_BASE, 16, 0, 0), &layout()).unwrap();
        assert_eq!(
            call,
            Hypercall::ConsoleWrite {
                data: GuestRange {
                    addr: IMAGE_BASE,
                    len: 16
                }
            }
        );
    }

    #[test]
    fn pointers_outside_guest_memory_are_rejected() {
        let l = layout();
        for (addr, len) in [
            (l.mem_size, 1),
            (l.mem_size - 8, 16),
            (u64::MAX - 4, 16),
            (0, 8),
            (0x5_0000, 8),
            (l.guard_start(), 8),
        ] {
            let err = decode(nr::CONSOLE_WRITE, &regs(addr, len, 0, 0), &l).unwrap_err();
            assert!(
                matches!(err, HypercallError::BadPointer { .. }),
                "{addr:#x}+{len:#x}: {err}"
            );
        }
    }

    #[test]
    fn boot_info_page_is_readable_but_not_writable() {
        use snowflock_guest::abi::BOOT_INFO_ADDR;
        let l = layout();
        assert!(decode(nr::CONSOLE_WRITE, &regs(BOOT_INFO_ADDR, 8, 0, 0), &l).is_ok());
        let err = decode(nr::CHILD_RESULT, &regs(1, 1, BOOT_INFO_ADDR, 8), &l).unwrap_err();
        assert!(matches!(err, HypercallError::BadPointer { .. }));
    }

    #[test]
    fn oversized_transfers_and_unknown_numbers_are_rejected() {
        let l = layout();
        let err = decode(
            nr::CONSOLE_WRITE,
            &regs(IMAGE_BASE, MAX_TRANSFER + 1, 0, 0),
            &l,
        );
        assert!(matches!(err, Err(HypercallError::TooLong { .. })));
        assert_eq!(
            decode(999, &regs(0, 0, 0, 0), &l),
            Err(HypercallError::UnknownNumber { nr: 999 })
        );
        let err = decode(nr::REQUEST_TICKET, &regs(u64::MAX, 0, 0, 0), &l);
        assert!(matches!(err, Err(HypercallError::BadValue { .. })));
    }
}
