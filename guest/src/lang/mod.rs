//! What every guest executable needs from outside `core` (feature `lang`):
//! the panic handler and the C memory functions the compiler calls. The
//! flock image runtime (`rt`) and the Linux personality both build on it.

mod mem;
mod panic;

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
