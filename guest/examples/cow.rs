//! cow: copy-on-write isolation, both ways.
//!
//! Args `clones` (default 4), `mib` (default 16). The parent fills a buffer
//! with pattern A and clones, then at once overwrites it with pattern B. Each
//! child checks it sees A everywhere, writes its own pattern, waits ~50 ms
//! while its siblings do the same, checks it still sees exactly its own
//! pattern, and exits with result byte 1 (all good) or 0. The parent then
//! checks its buffer is still all B and every child said 1. Prints `cow: ok`
//! and exits 0 iff all is well.
#![no_std]
#![no_main]

extern crate alloc;

use snowflock_guest::args::{arg_u32, arg_u64};
use snowflock_guest::time::spin_ns;
use snowflock_guest::{Fork, clone, exit, join, println, request_ticket};

snowflock_guest::entry!(main);

/// Pattern `tag` at word `i`: different in every word and for every tag.
fn pattern(tag: u64, i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tag.wrapping_mul(0xff51_afd7_ed55_8ccd)
}

const A: u64 = 0xa;
const B: u64 = 0xb;
/// Child `id` writes pattern `CHILD + id`.
const CHILD: u64 = 0x100;

fn fill(buf: &mut [u64], tag: u64) {
    for (i, w) in buf.iter_mut().enumerate() {
        *w = pattern(tag, i);
    }
}

/// The index of the first word that is not pattern `tag`.
fn mismatch(buf: &[u64], tag: u64) -> Option<usize> {
    buf.iter()
        .enumerate()
        .position(|(i, &w)| w != pattern(tag, i))
}

fn main() -> i32 {
    let clones = arg_u32("clones", 4);
    let words = (arg_u64("mib", 16) as usize) << 17;
    let mut buf = alloc::vec![0u64; words];
    fill(&mut buf, A);
    let ticket = request_ticket(clones).expect("request_ticket");
    match clone(&ticket).expect("clone") {
        Fork::Child(id) => {
            let saw_a = mismatch(&buf, A).is_none();
            let own = CHILD + u64::from(id);
            fill(&mut buf, own);
            spin_ns(50_000_000);
            let kept_own = mismatch(&buf, own).is_none();
            exit(&[u8::from(saw_a && kept_own)]);
        }
        Fork::Parent => fill(&mut buf, B),
    }
    let outcomes = join(&ticket).expect("join");
    let mut ok = outcomes.len() == ticket.granted() as usize;
    for child in &outcomes {
        match &child.result {
            Ok(r) if r.as_slice() == [1] => {}
            Ok(r) => {
                println!("cow: child {} saw foreign data (result {r:?})", child.id);
                ok = false;
            }
            Err(failure) => {
                println!("cow: child {}: {failure}", child.id);
                ok = false;
            }
        }
    }
    if let Some(i) = mismatch(&buf, B) {
        println!("cow: parent's word {i} changed behind its back");
        ok = false;
    }
    println!("cow: granted={} mib={}", ticket.granted(), words >> 17);
    println!("cow: {}", if ok { "ok" } else { "FAILED" });
    if ok { 0 } else { 1 }
}
