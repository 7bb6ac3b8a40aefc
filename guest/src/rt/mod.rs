//! The guest runtime (feature `rt`): `_start` and the global allocator; the
//! panic handler and the C memory functions come from `lang`.
//!
//! A guest names its `fn main() -> i32` with [`entry!`](crate::entry); `_start`
//! validates the boot information, sets up the heap, runs `main` and ends the
//! VM with its return value as the `EXIT` code.

use crate::abi::{
    ABI_VERSION, BOOT_INFO_ADDR, BOOT_INFO_MAGIC, BootInfo, MAX_CMDLINE, PAGE_SIZE, PageReportKind,
    PageRun, errno,
};
use crate::heap::{FreeRuns, FreshStats, LockedHeap};
use crate::hypercall;
use core::sync::atomic::{AtomicU64, Ordering};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

unsafe extern "Rust" {
    /// Defined by [`entry!`](crate::entry): the guest's `main`.
    safe fn __snowflock_main() -> i32;
}

/// The ELF entry point. The VMM starts here at CPL3 with `rdi` = the boot
/// information and `rsp` = `stack_top` (16-byte aligned).
///
/// # Safety
/// Only the VMM jumps here, once, in the state docs/hypercalls.md describes.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _start() -> ! {
    core::arch::naked_asm!(
        // A zero frame pointer ends frame-pointer stack walks here.
        "xor ebp, ebp",
        // The ABI wants rsp 16-byte aligned before a call; the VMM promises
        // it, this keeps a sloppy VMM from causing misaligned SSE faults.
        "and rsp, -16",
        // rdi (the boot info pointer) passes straight through.
        "call {start}",
        "ud2",
        start = sym start,
    )
}

extern "C" fn start(boot: *const BootInfo) -> ! {
    assert!(
        boot as u64 == BOOT_INFO_ADDR,
        "boot info at {boot:p}, expected {BOOT_INFO_ADDR:#x}"
    );
    // SAFETY: the VMM maps the boot page user-readable at BOOT_INFO_ADDR
    // before starting the guest and never changes it afterwards.
    let info = unsafe { &*boot };
    assert!(
        info.magic == BOOT_INFO_MAGIC,
        "bad boot info magic {:#018x} (not started by a snowflock VMM?)",
        info.magic
    );
    assert!(
        info.abi_version == ABI_VERSION,
        "VMM speaks ABI version {}, this guest was built for {ABI_VERSION}",
        info.abi_version
    );
    let page = BOOT_INFO_ADDR..BOOT_INFO_ADDR + PAGE_SIZE;
    let cmd_end = info.cmdline_ptr.checked_add(info.cmdline_len);
    assert!(
        info.cmdline_len <= MAX_CMDLINE
            && page.contains(&info.cmdline_ptr)
            && cmd_end.is_some_and(|end| end <= page.end),
        "argument string outside the boot page"
    );
    assert!(
        info.heap_start <= info.heap_end && info.heap_end <= info.mem_size,
        "bad heap range"
    );
    crate::BOOT_INFO.store(boot.cast_mut(), Ordering::Relaxed);
    // SAFETY: the VMM reserves [heap_start, heap_end) for the allocator,
    // zero-filled, and nothing else in the guest touches it.
    unsafe { HEAP.init(info.heap_start as usize, info.heap_end as usize) };
    crate::exit_vm(__snowflock_main())
}

/// Bytes of heap the allocator manages.
pub fn heap_capacity() -> usize {
    HEAP.capacity()
}

/// `REPORT_PAGES(Free)` calls made, and how many the VMM refused.
static FREE_REPORTS: AtomicU64 = AtomicU64::new(0);
static FREE_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Reports the heap's free pages to the VMM (`REPORT_PAGES(Free)`): the free
/// page runs and the never-used top, never slab or side-table pages. The
/// clone API calls it right before `CLONE` and `CHECKPOINT`, which use the
/// report only when they are the next hypercall: call those next if you call
/// it yourself. Allocates nothing: the runs go through a static buffer of
/// `MAX_REPORT_RUNS` (4096) runs; with more free runs than that, the
/// shortest are left out (the returned [`FreeRuns`] counts them), and their
/// pages are copied to clones like live ones.
pub fn report_free_pages() -> FreeRuns {
    let (found, rax) =
        HEAP.report_free_pages(|runs| hypercall::report_pages(runs, PageReportKind::Free));
    FREE_REPORTS.fetch_add(1, Ordering::Relaxed);
    if errno::decode(rax).is_some() {
        FREE_REFUSED.fetch_add(1, Ordering::Relaxed);
    }
    found
}

fn report_fresh(runs: &[PageRun]) -> bool {
    errno::decode(hypercall::report_pages(runs, PageReportKind::Fresh)).is_none()
}

/// Turns on fresh page reports (`REPORT_PAGES(Fresh)`) for the rest of this
/// VM's life: the clone API calls it in a child right after the clone point.
pub(crate) fn enter_clone() {
    HEAP.start_fresh_reports(report_fresh);
}

/// What this guest told the VMM about its pages so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageReportStats {
    /// `REPORT_PAGES(Free)` calls, and how many the VMM refused (a bug if any).
    pub free_reports: u64,
    pub free_refused: u64,
    /// Fresh reports (only in clones).
    pub fresh: FreshStats,
}

/// Counters of the page reports this guest made.
pub fn page_report_stats() -> PageReportStats {
    PageReportStats {
        free_reports: FREE_REPORTS.load(Ordering::Relaxed),
        free_refused: FREE_REFUSED.load(Ordering::Relaxed),
        fresh: HEAP.fresh_stats(),
    }
}

/// Names the guest's `fn main() -> i32`; its return value becomes the VM's
/// `EXIT` code. Use once, at the top level of a `#![no_std] #![no_main]` binary:
///
/// ```ignore
/// snowflock_guest::entry!(main);
/// fn main() -> i32 { 0 }
/// ```
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        fn __snowflock_main() -> i32 {
            let main: fn() -> i32 = $main;
            main()
        }

        // Nothing else references the runtime's entry point: this keeps the
        // linker from dropping it.
        #[used]
        static __SNOWFLOCK_START: unsafe extern "C" fn() -> ! = $crate::rt::_start;
    };
}
