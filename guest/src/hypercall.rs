//! Raw hypercalls: `out dx, eax` with `dx` = [`HYPERCALL_PORT`], `eax` = the
//! number, arguments in `rdi`, `rsi`, `r8`, `r9`, results in `rax` (and `rdx`).
//!
//! This is the only place that talks to the VMM. The wrappers return raw
//! register values; [`mod@crate::clone`] and [`crate::console`] turn them into types.

use crate::abi::{
    HYPERCALL_PORT, MAX_REPORT_RUNS, MAX_TRANSFER, PageReportKind, PageRun, PanicReport, nr,
};
use core::arch::asm;

/// Issues hypercall `nr` and returns `(rax, rdx)`.
///
/// The VMM preserves every register except `rax` and `rdx`; it may read and
/// write guest memory through pointer arguments, hence no `nomem`.
///
/// # Safety
/// The arguments must satisfy the hypercall's contract (docs/hypercalls.md):
/// every pointer must be valid for the reads or writes the VMM performs on it,
/// for the given length, and no Rust reference may alias memory the VMM writes.
#[inline(always)]
pub unsafe fn call(nr: u32, a0: u64, a1: u64, a2: u64, a3: u64) -> (u64, u64) {
    let rax: u64;
    let rdx: u64;
    // SAFETY: port I/O to the hypercall port is allowed at CPL3 (IOPL=3) and
    // only exits to the VMM; the caller vouches for the pointer arguments.
    unsafe {
        asm!(
            "out dx, eax",
            inlateout("rax") u64::from(nr) => rax,
            inlateout("rdx") u64::from(HYPERCALL_PORT) => rdx,
            in("rdi") a0,
            in("rsi") a1,
            in("r8") a2,
            in("r9") a3,
            options(nostack),
        );
    }
    (rax, rdx)
}

/// Issues a hypercall that never returns (`EXIT`, `PANIC`). Should the VMM
/// resume the guest anyway, `ud2` ends the VM with an exception.
///
/// # Safety
/// As for [`call`]: `a0` must satisfy the hypercall's contract.
#[inline(always)]
unsafe fn call_noreturn(nr: u32, a0: u64) -> ! {
    // SAFETY: as in `call`; control never comes back to Rust code.
    unsafe {
        asm!(
            "out dx, eax",
            "ud2",
            in("eax") nr,
            in("dx") HYPERCALL_PORT,
            in("rdi") a0,
            options(noreturn, nostack),
        )
    }
}

/// `CONSOLE_WRITE`: writes `bytes` (at most [`MAX_TRANSFER`]) to the console.
pub fn console_write(bytes: &[u8]) -> u64 {
    assert!(
        bytes.len() as u64 <= MAX_TRANSFER,
        "console write over MAX_TRANSFER"
    );
    // SAFETY: the VMM reads `bytes.len()` bytes at a valid slice.
    unsafe {
        call(
            nr::CONSOLE_WRITE,
            bytes.as_ptr() as u64,
            bytes.len() as u64,
            0,
            0,
        )
        .0
    }
}

/// `EXIT`: ends this VM with `code`.
pub fn exit(code: u64) -> ! {
    // SAFETY: EXIT takes no pointer.
    unsafe { call_noreturn(nr::EXIT, code) }
}

/// `PANIC`: reports a panic and ends this VM.
pub fn panic(report: &PanicReport) -> ! {
    assert!(report.message_len <= MAX_TRANSFER && report.file_len <= MAX_TRANSFER);
    // SAFETY: `report` is a valid PanicReport whose (ptr, len) pairs the caller
    // built from live byte slices; the VMM only reads them.
    unsafe { call_noreturn(nr::PANIC, report as *const PanicReport as u64) }
}

/// `REQUEST_TICKET(n, flags)`: `(ticket id or -errno, granted m)`.
pub fn request_ticket(n: u64, flags: u64) -> (u64, u64) {
    // SAFETY: no pointer arguments.
    unsafe { call(nr::REQUEST_TICKET, n, flags, 0, 0) }
}

/// `CLONE(ticket)`: 0 in the parent, the child id in each child, or -errno.
///
/// Returns once in the parent and once in every child, each in its own VM
/// with a private copy of memory, like `fork()` in a single-threaded process.
pub fn clone(ticket: u64) -> u64 {
    // SAFETY: no pointer arguments; every VM that returns here owns its memory.
    unsafe { call(nr::CLONE, ticket, 0, 0, 0).0 }
}

/// `CHECKPOINT()`: `(0 in the parent or the child id, checkpoint id)`, or -errno.
///
/// Returns again, later, in each child that `CREATE_CLONES` starts from it.
pub fn checkpoint() -> (u64, u64) {
    // SAFETY: no pointer arguments; as for `clone`.
    unsafe { call(nr::CHECKPOINT, 0, 0, 0, 0) }
}

/// `CREATE_CLONES(checkpoint, ticket)`: 0 or -errno.
pub fn create_clones(checkpoint: u64, ticket: u64) -> u64 {
    // SAFETY: no pointer arguments.
    unsafe { call(nr::CREATE_CLONES, checkpoint, ticket, 0, 0).0 }
}

/// `CHILD_EXIT(result)`: ends this child; returns (-errno) only if it is not a child.
pub fn child_exit(result: &[u8]) -> u64 {
    assert!(
        result.len() as u64 <= MAX_TRANSFER,
        "child result over MAX_TRANSFER"
    );
    // SAFETY: the VMM reads `result.len()` bytes at a valid slice.
    unsafe {
        call(
            nr::CHILD_EXIT,
            result.as_ptr() as u64,
            result.len() as u64,
            0,
            0,
        )
        .0
    }
}

/// `JOIN(ticket)`: waits for every child; m or -errno.
pub fn join(ticket: u64) -> u64 {
    // SAFETY: no pointer arguments.
    unsafe { call(nr::JOIN, ticket, 0, 0, 0).0 }
}

/// `CHILD_RESULT(ticket, child, buf)`: `(status or -errno, full payload length)`;
/// the first `min(length, buf.len())` bytes of the payload land in `buf`.
pub fn child_result(ticket: u64, child: u64, buf: &mut [u8]) -> (u64, u64) {
    let cap = buf.len().min(MAX_TRANSFER as usize) as u64;
    // SAFETY: the VMM writes at most `cap` bytes into the exclusively borrowed `buf`.
    unsafe {
        call(
            nr::CHILD_RESULT,
            ticket,
            child,
            buf.as_mut_ptr() as u64,
            cap,
        )
    }
}

/// `KILL(ticket)`: the number of children killed, or -errno.
pub fn kill(ticket: u64) -> u64 {
    // SAFETY: no pointer arguments.
    unsafe { call(nr::KILL, ticket, 0, 0, 0).0 }
}

/// `TIME_NS()`: the host's monotonic clock in nanoseconds.
pub fn time_ns() -> u64 {
    // SAFETY: no pointer arguments.
    unsafe { call(nr::TIME_NS, 0, 0, 0, 0).0 }
}

/// `REPORT_PAGES(runs, kind)`: 0 or -errno (`EINVAL` for runs outside the
/// heap, unaligned, empty or overlapping).
pub fn report_pages(runs: &[PageRun], kind: PageReportKind) -> u64 {
    assert!(
        runs.len() as u64 <= MAX_REPORT_RUNS,
        "page report over MAX_REPORT_RUNS"
    );
    // SAFETY: the VMM reads `runs.len()` runs from a valid slice.
    unsafe {
        call(
            nr::REPORT_PAGES,
            runs.as_ptr() as u64,
            runs.len() as u64,
            kind as u64,
            0,
        )
        .0
    }
}

/// In a Linux-ABI program (feature `hosted`): asks the personality to flush
/// its console buffers and write `/out` to the host, as `exit` would, before
/// the program ends through the clone API. Elsewhere it is an unknown
/// system call (`ENOSYS`), harmless.
#[cfg(feature = "hosted")]
pub fn linux_finish() {
    // SAFETY: a `syscall` with a number the personality serves without
    // touching the program's memory; `syscall` clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") crate::abi::linux::files::SYSCALL_FINISH => _,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
}
