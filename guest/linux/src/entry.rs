//! The way in and out: `_start` (from the VMM), the jump to the program, and
//! the syscall entry that the sled and the VMM's trap both reach.

use core::arch::{asm, naked_asm};
use core::cell::UnsafeCell;

use snowflock_guest::abi::linux::{LinuxStart, START_ADDR, START_MAGIC};
use snowflock_guest::abi::{BOOT_INFO_ADDR, BOOT_INFO_MAGIC, BootInfo};

use crate::dispatch::{self, Personality};

/// The personality's own stack: system calls run on it, not on the program's.
const STACK_SIZE: usize = 256 << 10;

#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; STACK_SIZE]>);

// SAFETY: only the syscall entry uses the stack, and the guest has one vCPU
// and never enters it twice (the personality makes no system calls itself).
unsafe impl Sync for Stack {}

static STACK: Stack = Stack(UnsafeCell::new([0; STACK_SIZE]));

/// The program's stack pointer while a system call runs on [`STACK`].
#[unsafe(no_mangle)]
static mut SF_LINUX_USER_RSP: u64 = 0;

struct StateCell(UnsafeCell<Option<Personality>>);

// SAFETY: as for `Stack`: one vCPU, and the cell is touched only by `start`
// (before the program runs) and by one system call at a time.
unsafe impl Sync for StateCell {}

static STATE: StateCell = StateCell(UnsafeCell::new(None));

/// What a system call arrives with, laid out by the syscall entry on [`STACK`].
#[repr(C)]
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) user_rsp: u64,
    /// Where the call returns: the site + 2.
    pub(crate) return_address: u64,
    pub(crate) rflags: u64,
    pub(crate) nr: u64,
    pub(crate) args: [u64; 6],
}

/// The ELF entry. The VMM starts here with `rdi` = the boot information and
/// `rsi` = the [`LinuxStart`] page, on a scratch stack below the program's.
///
/// # Safety
/// Only the VMM jumps here, once.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _start() -> ! {
    naked_asm!(
        "lea rsp, [rip + {stack} + {size}]",
        "xor ebp, ebp",
        "call {start}",
        "ud2",
        stack = sym STACK,
        size = const STACK_SIZE,
        start = sym start,
    )
}

extern "C" fn start(boot: *const BootInfo, linux: *const LinuxStart) -> ! {
    assert!(
        boot as u64 == BOOT_INFO_ADDR && linux as u64 == START_ADDR,
        "started with boot info at {boot:p} and Linux start at {linux:p}"
    );
    // SAFETY: the VMM maps the boot page read-only at this address before
    // starting the guest and never changes it.
    let boot = unsafe { &*boot };
    // SAFETY: likewise for the Linux start page.
    let linux = unsafe { &*linux };
    assert!(
        boot.magic == BOOT_INFO_MAGIC && linux.magic == START_MAGIC,
        "bad boot or Linux start magic"
    );
    // SAFETY: the VMM reserved [personality_heap, heap_end) for this heap,
    // zero-filled, and the memory manager never hands it to the program.
    unsafe {
        crate::HEAP.init(linux.personality_heap as usize, linux.heap_end as usize);
    }
    let personality = Personality::new(boot, linux);
    // SAFETY: nothing else references the cell yet (see `StateCell`).
    unsafe { *STATE.0.get() = Some(personality) };
    // SAFETY: the VMM built the program's initial stack at `initial_rsp`
    // and loaded it with its entry at `program_entry`; Linux starts a
    // process with rdx = 0 (no function for atexit) and rbp = 0.
    unsafe {
        asm!(
            "mov rsp, {rsp}",
            "xor ebp, ebp",
            "xor edx, edx",
            "jmp {entry}",
            rsp = in(reg) linux.initial_rsp,
            entry = in(reg) linux.program_entry,
            options(noreturn),
        )
    }
}

/// Where a system call comes in: from the sled (a patched site's `call
/// *%rax`) or from the VMM's trap, both with the return address on the
/// program's stack, `rax` = the number, and the arguments in `rdi`, `rsi`,
/// `rdx`, `r10`, `r8`, `r9`. Every register but `rax` (the result), `rcx`
/// and `r11` (which `syscall` clobbers) is preserved, and so are the flags
/// and the x87/SSE state; the program's red zone below its stack pointer
/// is untouched except the 8 bytes the call's return address took.
///
/// # Safety
/// Only a `syscall` site (through the sled or the trap) enters here.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sf_linux_syscall_entry() {
    naked_asm!(
        "mov [rip + {user_rsp}], rsp",
        "lea rsp, [rip + {stack} + {size}]",
        "push r9",
        "push r8",
        "push r10",
        "push rdx",
        "push rsi",
        "push rdi",
        "push rax",
        "pushfq",
        "mov rax, [rip + {user_rsp}]",
        "push qword ptr [rax]",
        "push rax",
        // rsp is 16-byte aligned here: the frame is 10 words.
        "mov rdi, rsp",
        "sub rsp, 512",
        "fxsave64 [rsp]",
        "cld",
        "call {dispatch}",
        "fxrstor64 [rsp]",
        "lea rsp, [rsp + 512 + 16]",
        "popfq",
        "lea rsp, [rsp + 8]",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "pop r10",
        "pop r8",
        "pop r9",
        "mov rsp, [rip + {user_rsp}]",
        "ret",
        user_rsp = sym SF_LINUX_USER_RSP,
        stack = sym STACK,
        size = const STACK_SIZE,
        dispatch = sym dispatch_entry,
    )
}

extern "C" fn dispatch_entry(frame: &mut Frame) -> u64 {
    // SAFETY: `start` filled the cell before the program ran, and system
    // calls do not nest (see `StateCell`), so this is the only reference.
    let state = unsafe { (*STATE.0.get()).as_mut() };
    let personality = state.expect("system call before the personality started");
    dispatch::dispatch(personality, frame)
}

/// Nothing in the personality calls the syscall entry (the sled and the VMM
/// reach it by address); this keeps the linker from dropping it.
#[used]
static KEEP_SYSCALL_ENTRY: unsafe extern "C" fn() = sf_linux_syscall_entry;
