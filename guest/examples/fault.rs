//! fault: raises a CPU exception, which the VMM must turn into a clean VM error.
//!
//! Arg `kind`: `ud2` (#UD), `null` (write to address 0: #PF), `gp` (`hlt` at
//! CPL3: #GP; `cli` would not fault, the VMM grants IOPL=3), `stack` (recurse
//! into the guard gap below the stack: #PF). Prints `fault: about to <kind>`.
//! Exit code 2 for an unknown kind, 1 if the fault did not happen.
#![no_std]
#![no_main]

use core::arch::asm;
use core::hint::black_box;
use snowflock_guest::args::arg_str;
use snowflock_guest::println;

snowflock_guest::entry!(main);

fn main() -> i32 {
    let kind = arg_str("kind", "ud2");
    if !matches!(kind, "ud2" | "null" | "gp" | "stack") {
        println!("fault: unknown kind {kind} (ud2|null|gp|stack)");
        return 2;
    }
    println!("fault: about to {kind}");
    match kind {
        // SAFETY: raises #UD on purpose; the VMM ends the VM.
        "ud2" => unsafe { asm!("ud2", options(nostack)) },
        // SAFETY: page 0 is unmapped, so the store faults before touching
        // anything; done in asm because a null write in Rust is UB.
        "null" => unsafe {
            asm!("mov qword ptr [{0}], {1}", in(reg) 0usize, in(reg) 0xdeadu64, options(nostack))
        },
        // SAFETY: `hlt` is privileged and raises #GP at CPL3.
        "gp" => unsafe { asm!("hlt", options(nostack)) },
        _ => println!("fault: depth {}", recurse(0)),
    }
    println!("fault: {kind} did not fault");
    1
}

/// Eats 4 KiB of stack per level until it runs into the unmapped guard gap.
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 4096];
    frame[0] = depth as u8;
    black_box(&mut frame);
    if black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + u64::from(frame[0])
}
