//! The guest runtime (feature `rt`): `_start`, the global allocator, the panic
//! handler and the C memory functions the compiler calls.
//!
//! A guest names its `fn main() -> i32` with [`entry!`](crate::entry); `_start`
//! validates the boot information, sets up the heap, runs `main` and ends the
//! VM with its return value as the `EXIT` code.

mod mem;
mod panic;

use crate::abi::{ABI_VERSION, BOOT_INFO_ADDR, BOOT_INFO_MAGIC, BootInfo, MAX_CMDLINE, PAGE_SIZE};
use crate::heap::LockedHeap;
use core::sync::atomic::Ordering;

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

// The prebuilt `core`/`alloc` for this target were compiled for unwinding, so
// their cleanup paths name these two symbols. Images are panic=abort: no
// unwind ever starts, these are never reached, and only the linker needs them.

#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    // SAFETY: `ud2` only raises #UD, which ends the VM with a clear error.
    unsafe { core::arch::asm!("ud2", options(noreturn, nostack)) }
}

#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
