//! hello: the smallest clone round trip.
//!
//! Args: `clones` (default 4). Each child exits with its id squared (u64 LE);
//! the parent prints `child <id>: <value>` and exits 0 iff every value is right.
#![no_std]
#![no_main]

use snowflock_guest::args::arg_u32;
use snowflock_guest::{Fork, clone, exit, join, println, request_ticket};

snowflock_guest::entry!(main);

fn main() -> i32 {
    println!("hello from snowflock");
    let ticket = request_ticket(arg_u32("clones", 4)).expect("request_ticket");
    if let Fork::Child(id) = clone(&ticket).expect("clone") {
        exit(&(u64::from(id) * u64::from(id)).to_le_bytes());
    }
    let outcomes = join(&ticket).expect("join");
    let mut ok = outcomes.len() == ticket.granted() as usize;
    for (expected_id, child) in (1..).zip(&outcomes) {
        match &child.result {
            Ok(bytes) => match <[u8; 8]>::try_from(bytes.as_slice()).map(u64::from_le_bytes) {
                Ok(value) => {
                    println!("child {}: {value}", child.id);
                    ok &= child.id == expected_id && value == u64::from(child.id).pow(2);
                }
                Err(_) => {
                    println!(
                        "child {}: result of {} bytes, expected 8",
                        child.id,
                        bytes.len()
                    );
                    ok = false;
                }
            },
            Err(failure) => {
                println!("child {}: {failure}", child.id);
                ok = false;
            }
        }
    }
    println!(
        "hello: granted={} {}",
        ticket.granted(),
        if ok { "ok" } else { "FAILED" }
    );
    if ok { 0 } else { 1 }
}
