//! killer: `kill` ends running children and `join` reports them killed.
//!
//! Four children busy-loop (giving up after 60 s, so a broken kill cannot
//! hang a test forever); the parent waits ~100 ms, kills the ticket and joins.
//! Prints `killer: killed=<n>` and `killer: ok`; exits 0 iff all four
//! children were reported Killed.
#![no_std]
#![no_main]

use core::hint::black_box;
use snowflock_guest::time::{now_ns, since_ns, spin_ns};
use snowflock_guest::{FailureStatus, Fork, clone, exit, join, kill, println, request_ticket};

snowflock_guest::entry!(main);

const GIVE_UP_NS: u64 = 60_000_000_000;

fn main() -> i32 {
    let ticket = request_ticket(4).expect("request_ticket");
    if ticket.granted() != 4 {
        println!("killer: needs 4 clones, granted {}", ticket.granted());
        return 1;
    }
    if let Fork::Child(_) = clone(&ticket).expect("clone") {
        let start = now_ns();
        let mut x = 1u64;
        while since_ns(start) < GIVE_UP_NS {
            for _ in 0..1_000_000 {
                x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        exit(b"never killed");
    }
    spin_ns(100_000_000);
    let killed = kill(&ticket).expect("kill");
    let outcomes = join(&ticket).expect("join");
    println!("killer: killed={killed}");
    let mut ok = outcomes.len() == 4;
    for child in &outcomes {
        let good = matches!(&child.result, Err(f) if f.status == FailureStatus::Killed);
        if !good {
            println!("killer: child {}: unexpected {:?}", child.id, child.result);
        }
        ok &= good;
    }
    println!("killer: {}", if ok { "ok" } else { "FAILED" });
    if ok { 0 } else { 1 }
}
