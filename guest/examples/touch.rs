//! touch: dirties `mib` MiB of heap, then clones; children read a few bytes
//! and exit at once with an empty result. For the clone-local benchmark.
//!
//! Args `mib` (default 64), `clones` (default 1), `pages` (default 0),
//! `interval_ms` (default 0). With `pages` > 0 each child is a slow
//! faulter instead, for failure tests (e.g. the memory server dies while
//! children still fault): it reads `pages` pages of the buffer one at a
//! time, spread evenly over it, checks each, and waits `interval_ms`
//! between reads; a wrong byte makes it panic. It times each read with the
//! TSC and prints `touch: child N reads=.. read_p50_us=.. read_p99_us=..`
//! (the page-fault service time the guest sees). Prints `touch: mib=..
//! clones=.. granted=.. clone_ms=.. join_ms=..`; exits 0 iff every child
//! exited normally.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::hint::black_box;
use snowflock_guest::args::{arg_u32, arg_u64};
use snowflock_guest::time::{Millis, cycles, cycles_to_ns, now_ns, spin_ns};
use snowflock_guest::{Fork, clone, exit, join, println, request_ticket};

snowflock_guest::entry!(main);

fn main() -> i32 {
    let mib = arg_u64("mib", 64) as usize;
    let clones = arg_u32("clones", 1);
    let pages = arg_u64("pages", 0);
    let interval_ns = arg_u64("interval_ms", 0).saturating_mul(1_000_000);
    let mut buf = alloc::vec![0u8; (mib << 20).max(1)];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = expected(i);
    }
    let ticket = request_ticket(clones).expect("request_ticket");
    let t0 = now_ns();
    if let Fork::Child(id) = clone(&ticket).expect("clone") {
        let len = buf.len();
        black_box((buf[0], buf[len / 2], buf[len - 1]));
        let total = len.div_ceil(4096) as u64;
        let mut took = Vec::with_capacity(pages as usize);
        for k in 0..pages {
            if k > 0 {
                spin_ns(interval_ns);
            }
            let page = if pages <= total {
                k * total / pages
            } else {
                k % total
            };
            let at = (page as usize * 4096).min(len - 1);
            let before = cycles();
            let seen = black_box(&buf)[at];
            took.push(cycles().wrapping_sub(before));
            assert!(
                seen == expected(at),
                "child {id}: byte {at:#x} is {seen:#x}, expected {:#x}",
                expected(at)
            );
        }
        if !took.is_empty() {
            took.sort_unstable();
            let us = |q: usize| {
                let c = took[(took.len() - 1) * q / 100];
                cycles_to_ns(c).map_or(0, |ns| ns / 1000)
            };
            println!(
                "touch: child {id} reads={} read_p50_us={} read_p99_us={}",
                took.len(),
                us(50),
                us(99)
            );
        }
        exit(&[]);
    }
    let t1 = now_ns();
    let outcomes = join(&ticket).expect("join");
    let t2 = now_ns();
    let ok = outcomes.len() == ticket.granted() as usize
        && outcomes
            .iter()
            .all(|c| c.result.as_ref().is_ok_and(|r| r.is_empty()));
    for c in &outcomes {
        if let Err(failure) = &c.result {
            println!("touch: child {}: {failure}", c.id);
        }
    }
    println!(
        "touch: mib={mib} clones={clones} granted={} clone_ms={} join_ms={} {}",
        ticket.granted(),
        Millis(t1 - t0),
        Millis(t2 - t1),
        if ok { "ok" } else { "FAILED" }
    );
    if ok { 0 } else { 1 }
}

/// The byte at offset `i` of the buffer.
fn expected(i: usize) -> u8 {
    (i >> 12) as u8 ^ 0x5a
}
