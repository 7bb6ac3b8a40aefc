//! checkpoint: children created from a checkpoint see memory as it was then.
//!
//! Arg `clones` (default 3). The parent sets a scalar and a 1 MiB buffer to
//! state X and calls `checkpoint_parent`; then changes both to state Y, asks
//! for a ticket and starts children from the checkpoint. Each child checks it
//! sees X and exits with `digest(X) + id` (u64 LE), or 0 if it did not see X.
//! The parent checks every result and that it still sees Y. Prints
//! `checkpoint: ok` and exits 0 iff all is well.
#![no_std]
#![no_main]

extern crate alloc;

use core::hint::black_box;
use snowflock_guest::args::arg_u32;
use snowflock_guest::rand::mix;
use snowflock_guest::{
    CheckpointOutcome, checkpoint_parent, create_clones, exit, join, println, request_ticket,
};

snowflock_guest::entry!(main);

const WORDS: usize = 1 << 17;
const X: u64 = 0x5eed_0000_0000_0001;
const Y: u64 = 0x5eed_0000_0000_0002;

fn fill(buf: &mut [u64], state: u64) {
    for (i, w) in buf.iter_mut().enumerate() {
        *w = mix(state, i as u64);
    }
}

/// A digest of the state as it looks now, or `None` if it is not all `state`.
fn digest(scalar: u64, buf: &[u64], state: u64) -> Option<u64> {
    let intact = scalar == state
        && buf
            .iter()
            .enumerate()
            .all(|(i, &w)| w == mix(state, i as u64));
    intact.then(|| buf.iter().fold(scalar, |acc, &w| mix(acc, w)))
}

fn main() -> i32 {
    let clones = arg_u32("clones", 3);
    let mut buf = alloc::vec![0u64; WORDS];
    // Keep the scalar in memory, as a real program's state would be.
    let mut scalar = black_box(X);
    fill(&mut buf, X);
    let expected = digest(X, &buf, X).expect("state X");

    let checkpoint = match checkpoint_parent().expect("checkpoint_parent") {
        CheckpointOutcome::Child { id, .. } => {
            let seen = digest(black_box(scalar), &buf, X);
            exit(
                &seen
                    .map_or(0, |d| d.wrapping_add(u64::from(id)))
                    .to_le_bytes(),
            );
        }
        CheckpointOutcome::Parent(cp) => cp,
    };
    scalar = black_box(Y);
    fill(&mut buf, Y);

    let ticket = request_ticket(clones).expect("request_ticket");
    create_clones(&checkpoint, &ticket).expect("create_clones");
    let outcomes = join(&ticket).expect("join");
    let mut ok = outcomes.len() == ticket.granted() as usize;
    for child in &outcomes {
        let want = expected.wrapping_add(u64::from(child.id));
        match &child.result {
            Ok(r) if r.as_slice() == want.to_le_bytes() => {}
            Ok(r) => {
                println!(
                    "checkpoint: child {} did not see state X (result {r:?})",
                    child.id
                );
                ok = false;
            }
            Err(failure) => {
                println!("checkpoint: child {}: {failure}", child.id);
                ok = false;
            }
        }
    }
    if digest(black_box(scalar), &buf, Y).is_none() {
        println!("checkpoint: parent lost state Y");
        ok = false;
    }
    println!("checkpoint: granted={}", ticket.granted());
    println!("checkpoint: {}", if ok { "ok" } else { "FAILED" });
    if ok { 0 } else { 1 }
}
