//! Decoding hypercalls: the number comes from the `out` data, arguments from
//! registers. Every pointer and length is checked against the guest layout
//! here, before any host code touches guest memory.

use std::ops::Range;

use snowflock_abi::linux::files::{HostFileRequest, MAX_PATH};
use snowflock_abi::{
    MAX_REPORT_RUNS, MAX_SLEEP_NS, MAX_TRANSFER, PAGE_SIZE, PageReportKind, PageRun, PanicReport,
    nr, ticket,
};

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
        /// `abi::ticket` flags, unknown bits rejected.
        flags: u64,
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
    Clocks,
    /// `HOST_FILE`: the request struct passed validation as a guest range;
    /// its pointers are checked by [`host_file_ranges`] once read.
    HostFile {
        op: u64,
        request: GuestRange,
    },
    SleepNs {
        ns: u64,
    },
    /// `SET_FS_BASE`: a canonical address (anything else is `Invalid`).
    SetFsBase {
        base: u64,
    },
    /// `REPORT_PAGES`: the run array passed validation as a guest range; the
    /// runs themselves are checked by [`page_runs`] once read.
    ReportPages {
        runs: GuestRange,
        kind: PageReportKind,
    },
    /// Arguments out of range in a way the guest can handle: answered with
    /// `-EINVAL`, and the VM goes on.
    Invalid {
        nr: u32,
        what: &'static str,
        value: u64,
    },
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

/// The path (read) and buffer (written) ranges of a host file request.
pub fn host_file_ranges(
    request: &HostFileRequest,
    layout: &GuestLayout,
) -> Result<(GuestRange, GuestRange), HypercallError> {
    if request.path_len > MAX_PATH {
        return Err(HypercallError::TooLong {
            what: "host file path",
            len: request.path_len,
        });
    }
    let path = range(
        layout,
        "host file path",
        request.path_ptr,
        request.path_len,
        false,
    )?;
    let buf = range(layout, "host file buffer", request.buf, request.len, true)?;
    Ok((path, buf))
}

fn narrow(what: &'static str, value: u64) -> Result<u32, HypercallError> {
    u32::try_from(value).map_err(|_| HypercallError::BadValue { what, value })
}

fn ticket_flags(value: u64) -> Result<u64, HypercallError> {
    if value & !ticket::KNOWN != 0 {
        return Err(HypercallError::BadValue {
            what: "ticket flags",
            value,
        });
    }
    Ok(value)
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
            flags: ticket_flags(a1)?,
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
        nr::SET_FS_BASE => set_fs_base(a0),
        nr::CLOCKS => Hypercall::Clocks,
        nr::HOST_FILE => Hypercall::HostFile {
            op: a0,
            request: range(
                layout,
                "host file request",
                a1,
                size_of::<HostFileRequest>() as u64,
                false,
            )?,
        },
        nr::SLEEP_NS => Hypercall::SleepNs {
            ns: a0.min(MAX_SLEEP_NS),
        },
        nr::REPORT_PAGES => report_pages(layout, a0, a1, a2)?,
        nr => return Err(HypercallError::UnknownNumber { nr }),
    })
}

/// An address is canonical when bits 63..47 are all equal (48-bit virtual addresses).
fn set_fs_base(base: u64) -> Hypercall {
    let top = base >> 47;
    if top == 0 || top == (1 << 17) - 1 {
        Hypercall::SetFsBase { base }
    } else {
        Hypercall::Invalid {
            nr: nr::SET_FS_BASE,
            what: "non-canonical FS base",
            value: base,
        }
    }
}

fn report_pages(
    layout: &GuestLayout,
    runs: u64,
    count: u64,
    kind: u64,
) -> Result<Hypercall, HypercallError> {
    let invalid = |what, value| Hypercall::Invalid {
        nr: nr::REPORT_PAGES,
        what,
        value,
    };
    if count > MAX_REPORT_RUNS {
        return Ok(invalid("page run count", count));
    }
    let runs = range(
        layout,
        "page run array",
        runs,
        count * size_of::<PageRun>() as u64,
        false,
    )?;
    Ok(match PageReportKind::from_raw(kind) {
        Some(kind) => Hypercall::ReportPages { runs, kind },
        None => invalid("page report kind", kind),
    })
}

/// Why a `REPORT_PAGES` run array was refused (answered with `-EINVAL`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageRunError {
    #[error("page run array of {len} bytes is not a whole number of runs")]
    Truncated { len: usize },
    #[error("page run {index} ({start:#x}+{len:#x}) is empty or not page aligned")]
    Unaligned { index: usize, start: u64, len: u64 },
    #[error("page run {index} ({start:#x}+{len:#x}) is outside the heap {heap:#x?}")]
    OutsideHeap {
        index: usize,
        start: u64,
        len: u64,
        heap: Range<u64>,
    },
    #[error("page runs overlap at {addr:#x}")]
    Overlap { addr: u64 },
}

/// Decodes a `REPORT_PAGES` run array (`count` little-endian [`PageRun`]s, in
/// any order) into sorted, disjoint `(first page, page count)` runs, adjacent
/// ones merged. Every run must be non-empty, page aligned and inside `heap`
/// (`BootInfo::heap_start..heap_end`), and no two may overlap.
pub fn page_runs(raw: &[u8], heap: Range<u64>) -> Result<Vec<(u64, u64)>, PageRunError> {
    const RUN: usize = size_of::<PageRun>();
    if !raw.len().is_multiple_of(RUN) {
        return Err(PageRunError::Truncated { len: raw.len() });
    }
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let mut runs = Vec::with_capacity(raw.len() / RUN);
    for (index, chunk) in raw.chunks_exact(RUN).enumerate() {
        let (start, len) = (word(&chunk[..8]), word(&chunk[8..]));
        if len == 0 || !start.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(PageRunError::Unaligned { index, start, len });
        }
        let inside = start >= heap.start && start.checked_add(len).is_some_and(|e| e <= heap.end);
        if !inside {
            return Err(PageRunError::OutsideHeap {
                index,
                start,
                len,
                heap,
            });
        }
        runs.push((start / PAGE_SIZE, len / PAGE_SIZE));
    }
    runs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (start, count) in runs {
        match merged.last_mut() {
            Some((prev, n)) if *prev + *n > start => {
                return Err(PageRunError::Overlap {
                    addr: start * PAGE_SIZE,
                });
            }
            Some((prev, n)) if *prev + *n == start => *n += count,
            _ => merged.push((start, count)),
        }
    }
    Ok(merged)
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
    use snowflock_abi::IMAGE_BASE;

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
        use snowflock_abi::BOOT_INFO_ADDR;
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

    #[test]
    fn ticket_flags_are_known_ones_or_rejected() {
        let l = layout();
        assert_eq!(
            decode(
                nr::REQUEST_TICKET,
                &regs(4, ticket::CHILDREN_WRITE, 0, 0),
                &l
            ),
            Ok(Hypercall::RequestTicket {
                clones: 4,
                flags: ticket::CHILDREN_WRITE
            })
        );
        assert_eq!(
            decode(nr::REQUEST_TICKET, &regs(4, 0, 0, 0), &l),
            Ok(Hypercall::RequestTicket {
                clones: 4,
                flags: 0
            })
        );
        for wild in [2, 1 << 63, u64::MAX] {
            assert_eq!(
                decode(nr::REQUEST_TICKET, &regs(4, wild, 0, 0), &l),
                Err(HypercallError::BadValue {
                    what: "ticket flags",
                    value: wild
                })
            );
        }
    }

    const HEAP: Range<u64> = 0x40_0000..0x100_0000;

    fn raw_runs(runs: &[(u64, u64)]) -> Vec<u8> {
        runs.iter()
            .flat_map(|&(start, len)| [start.to_le_bytes(), len.to_le_bytes()])
            .flatten()
            .collect()
    }

    #[test]
    fn report_pages_validates_pointer_count_and_kind() {
        let l = layout();
        let free = PageReportKind::Free as u64;
        assert_eq!(
            decode(nr::REPORT_PAGES, &regs(IMAGE_BASE, 3, free, 0), &l),
            Ok(Hypercall::ReportPages {
                runs: GuestRange {
                    addr: IMAGE_BASE,
                    len: 48
                },
                kind: PageReportKind::Free
            })
        );
        // No runs: any pointer will do.
        assert!(matches!(
            decode(nr::REPORT_PAGES, &regs(0, 0, 1, 0), &l),
            Ok(Hypercall::ReportPages {
                kind: PageReportKind::Fresh,
                ..
            })
        ));
        // A bad pointer ends the VM, like for any hypercall.
        for (addr, count) in [(0, 1), (l.mem_size - 16, 2), (u64::MAX - 8, 1)] {
            let err = decode(nr::REPORT_PAGES, &regs(addr, count, free, 0), &l).unwrap_err();
            assert!(matches!(err, HypercallError::BadPointer { .. }), "{err}");
        }
        // Too many runs or an unknown kind: -EINVAL, the VM goes on.
        for (count, kind) in [(MAX_REPORT_RUNS + 1, free), (u64::MAX, free), (1, 2)] {
            let call = decode(nr::REPORT_PAGES, &regs(IMAGE_BASE, count, kind, 0), &l).unwrap();
            assert!(matches!(call, Hypercall::Invalid { .. }), "{call:?}");
        }
    }

    #[test]
    fn page_runs_are_sorted_merged_and_turned_into_page_indices() {
        let raw = raw_runs(&[
            (0x80_0000, 0x2000),
            (0x40_0000, 0x1000),
            (0x80_2000, 0x1000),
            (0xff_f000, 0x1000),
        ]);
        assert_eq!(
            page_runs(&raw, HEAP),
            Ok(vec![(0x400, 1), (0x800, 3), (0xfff, 1)])
        );
        assert_eq!(page_runs(&[], HEAP), Ok(vec![]));
    }

    #[test]
    fn bad_page_runs_are_refused() {
        for (runs, what) in [
            (vec![(0x40_0800, 0x1000)], "unaligned start"),
            (vec![(0x40_0000, 0x800)], "unaligned length"),
            (vec![(0x40_0000, 0)], "empty"),
            (vec![(0x3f_f000, 0x2000)], "below the heap"),
            (vec![(0xff_f000, 0x2000)], "past the heap"),
            (vec![(u64::MAX - 0xfff, 0x1000)], "past the end of memory"),
            (vec![(0x40_0000, u64::MAX - 0xfff)], "wrapping"),
            (
                vec![(0x80_0000, 0x3000), (0x80_2000, 0x1000)],
                "overlapping",
            ),
            (vec![(0x80_0000, 0x1000), (0x80_0000, 0x1000)], "duplicate"),
        ] {
            assert!(page_runs(&raw_runs(&runs), HEAP).is_err(), "{what}");
        }
        assert_eq!(
            page_runs(&[0; 20], HEAP),
            Err(PageRunError::Truncated { len: 20 })
        );
    }
}
