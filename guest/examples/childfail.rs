//! childfail: a panicking child is reported as failed, with its message.
//!
//! Three children: child 2 panics with `child two fails on purpose`, children
//! 1 and 3 exit with `fine`. Prints `childfail: ok` and exits 0 iff join
//! reports exactly that.
#![no_std]
#![no_main]

use snowflock_guest::{FailureStatus, Fork, clone, exit, join, println, request_ticket};

snowflock_guest::entry!(main);

const MESSAGE: &str = "child two fails on purpose";

fn main() -> i32 {
    let ticket = request_ticket(3).expect("request_ticket");
    if ticket.granted() != 3 {
        println!("childfail: needs 3 clones, granted {}", ticket.granted());
        return 1;
    }
    if let Fork::Child(id) = clone(&ticket).expect("clone") {
        if id == 2 {
            panic!("{MESSAGE}");
        }
        exit(b"fine");
    }
    let outcomes = join(&ticket).expect("join");
    let mut ok = outcomes.len() == 3;
    for child in &outcomes {
        let good = match (&child.result, child.id) {
            (Err(f), 2) => f.status == FailureStatus::Failed && f.message.contains(MESSAGE),
            (Ok(r), 1 | 3) => r.as_slice() == b"fine",
            _ => false,
        };
        if !good {
            println!(
                "childfail: child {}: unexpected {:?}",
                child.id, child.result
            );
        }
        ok &= good;
    }
    println!("childfail: {}", if ok { "ok" } else { "FAILED" });
    if ok { 0 } else { 1 }
}
