//! badptr: a hypercall with a pointer outside guest memory ends that VM.
//!
//! Two children: child 1 calls CONSOLE_WRITE on `mem_size + 0x1000` (16
//! bytes), child 2 exits with `fine`. Prints `badptr: ok` and exits 0 iff
//! child 1 is reported Failed and child 2 Exited with `fine`. With `self=1`
//! the parent makes the bad call itself: its VM must end with an error
//! (exit code 1 if the VMM lets it return).
#![no_std]
#![no_main]

use snowflock_guest::abi::nr;
use snowflock_guest::args::arg_u64;
use snowflock_guest::request_ticket;
use snowflock_guest::{FailureStatus, Fork, boot_info, clone, exit, hypercall, join, println};

snowflock_guest::entry!(main);

/// CONSOLE_WRITE with a pointer past the end of guest memory; returns rax if
/// the VMM (wrongly) lets the guest go on.
fn bad_call() -> u64 {
    let bad = boot_info().mem_size + 0x1000;
    // SAFETY: deliberately invalid: the VMM must check the pointer and end
    // the VM without accessing anything; the guest never touches it.
    unsafe { hypercall::call(nr::CONSOLE_WRITE, bad, 16, 0, 0).0 }
}

fn main() -> i32 {
    if arg_u64("self", 0) != 0 {
        println!("badptr: parent makes a bad call");
        println!("badptr: VMM returned {:#x}: FAILED", bad_call());
        return 1;
    }
    let ticket = request_ticket(2).expect("request_ticket");
    if ticket.granted() != 2 {
        println!("badptr: needs 2 clones, granted {}", ticket.granted());
        return 1;
    }
    match clone(&ticket).expect("clone") {
        Fork::Child(1) => {
            bad_call();
            exit(b"survived a bad pointer");
        }
        Fork::Child(_) => exit(b"fine"),
        Fork::Parent => {}
    }
    let outcomes = join(&ticket).expect("join");
    let mut ok = outcomes.len() == 2;
    for child in &outcomes {
        let good = match (&child.result, child.id) {
            (Err(f), 1) => f.status == FailureStatus::Failed,
            (Ok(r), 2) => r.as_slice() == b"fine",
            _ => false,
        };
        println!("badptr: child {}: {:?}", child.id, child.result);
        ok &= good;
    }
    println!("badptr: {}", if ok { "ok" } else { "FAILED" });
    if ok { 0 } else { 1 }
}
