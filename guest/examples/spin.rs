//! spin: a deterministic pure-CPU loop with no hypercalls inside, for pausing
//! a running VM from outside, saving it and resuming it elsewhere.
//!
//! Arg `iters` (default 300M: about 1-2 s natively). State lives both in
//! registers and in a 64 KiB table on the heap, so a restore must bring back
//! both. Prints `spin: checksum=<16 hex digits>` and exits 0.
#![no_std]
#![no_main]

extern crate alloc;

use snowflock_guest::args::arg_u64;
use snowflock_guest::println;
use snowflock_guest::time::{Millis, now_ns};

snowflock_guest::entry!(main);

const TABLE: usize = 8192;

fn main() -> i32 {
    let iters = arg_u64("iters", 300_000_000);
    println!("spin: start iters={iters}");
    let start = now_ns();
    let mut table = alloc::vec![0u64; TABLE];
    let mut x: u64 = 0x0123_4567_89ab_cdef;
    for i in 0..iters {
        let slot = (x >> 51) as usize % TABLE;
        x = (x ^ table[slot])
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(23)
            ^ i;
        table[(x as usize) % TABLE] = x;
    }
    let checksum = table.iter().fold(x, |acc, &t| acc.rotate_left(7) ^ t);
    println!("spin: elapsed_ms={}", Millis(now_ns() - start));
    println!("spin: checksum={checksum:016x}");
    0
}
