//! allocheavy: an allocation-heavy job, for the avoidance heuristics (free
//! and fresh page reports).
//!
//! Args `clones` (default 4), `churn_mib` (default 256), `table_mib`
//! (default 16), `work_mib` (default 64), `seed` (default 1).
//!
//! The parent builds `table_mib` MiB of tables in 256 KiB chunks; for each
//! chunk it builds and reads a temporary buffer (`churn_mib` MiB of them in
//! all, keeping up to three alive for a while, so they leave holes between
//! the chunks when they go) and a few hundred small blocks, some of which it
//! keeps. Then it reports its free pages (timed; `clone` reports them again),
//! asks for `clones` and clones. Child i allocates `work_mib` MiB of working
//! buffers three ways (zeroed, uninitialised then extended, grown by push),
//! checks that the zeroed one reads zero, fills them from a seed of its own
//! and the tables, times a few `REPORT_PAGES` calls (and, for comparison,
//! `TIME_NS` calls), and exits with its checksum and counters. The parent recomputes every child's checksum
//! serially and compares.
//!
//! Prints `allocheavy: build_ms=.. free_runs=.. free_mib=.. omitted_runs=..
//! report_us=..`, a line per child (`fresh_calls=.. fresh_mib=.. work_ms=..
//! report_ns=.. exit_ns=..`), `allocheavy: clone_ms=.. join_ms=.. serial_ms=..` and
//! finally `allocheavy: PASS clones=.. granted=.. checksum=..` (or `FAIL`).
//! Exit 0 on PASS, 1 on a mismatch or a failed child, 3 when the heap is too
//! small for the arguments.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::alloc::Layout;
use snowflock_guest::abi::{PageReportKind, PageRun, errno};
use snowflock_guest::args::{arg_u32, arg_u64};
use snowflock_guest::hypercall::report_pages;
use snowflock_guest::rand::{SplitMix64, mix};
use snowflock_guest::rt::{heap_capacity, page_report_stats, report_free_pages};
use snowflock_guest::time::{Millis, now_ns};
use snowflock_guest::{Fork, clone, exit, join, println, request_ticket};

snowflock_guest::entry!(main);

/// Words per table chunk (256 KiB).
const CHUNK: usize = 32 << 10;
const WORDS_PER_MIB: usize = 1 << 17;
/// `REPORT_PAGES` calls each child times.
const TIMED_REPORTS: u64 = 64;

/// The parent's live data set.
struct State {
    chunks: Vec<Box<[u64]>>,
    /// Small blocks kept from the churn (they live in slabs).
    small: Vec<Box<[u8]>>,
}

impl State {
    fn words(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    /// A table word, chosen by a scattered walk over all chunks.
    fn table(&self, i: usize) -> u64 {
        let w = i.wrapping_mul(0x9e37_79b1) % self.words();
        self.chunks[w / CHUNK][w % CHUNK]
    }

    fn digest(&self) -> u64 {
        let smalls = self
            .small
            .iter()
            .fold(0u64, |acc, b| mix(acc, b.len() as u64 ^ u64::from(b[0])));
        self.chunks
            .iter()
            .fold(smalls, |acc, c| mix(acc, c[0] ^ c[CHUNK - 1]))
    }
}

fn build(seed: u64, table_mib: usize, churn_mib: usize) -> State {
    let nchunks = (table_mib * 4).max(1);
    let share = churn_mib * WORDS_PER_MIB / nchunks;
    let mut rng = SplitMix64::new(mix(seed, 0));
    let mut pending: Vec<Vec<u64>> = Vec::new();
    let mut state = State {
        chunks: Vec::new(),
        small: Vec::new(),
    };
    for c in 0..nchunks {
        // A temporary of share/2..3*share/2 words, written then read.
        let len = (share / 2 + rng.below(share as u64 + 1) as usize).max(1);
        let tmp: Vec<u64> = (0..len).map(|j| mix(seed ^ c as u64, j as u64)).collect();
        let chunk: Box<[u64]> = (0..CHUNK)
            .map(|j| tmp[j % len] ^ tmp[(j * 13 + 7) % len].rotate_left(17))
            .collect();
        state.chunks.push(chunk);
        if rng.below(2) == 0 {
            pending.push(tmp);
        }
        if pending.len() > 3 {
            pending.swap_remove(rng.below(pending.len() as u64) as usize);
        }
        for k in 0..256u64 {
            let size = 16 + rng.below(2033) as usize;
            let block = alloc::vec![(c as u64 ^ k) as u8; size].into_boxed_slice();
            if k % 8 == 0 {
                state.small.push(block);
            }
        }
    }
    state
}

/// What a child computes: a checksum over its working buffers, and whether
/// the zeroed one read zero.
fn work(seed: u64, id: u32, state: &State, work_words: usize) -> (u64, bool) {
    let s = mix(seed, u64::from(id));
    let n = (work_words / 3).max(1);
    let mut zeroed: Vec<u64> = alloc::vec![0; n];
    let zero_ok = zeroed.iter().all(|&w| w == 0);
    let mut extended: Vec<u64> = Vec::with_capacity(n);
    extended.extend((0..n).map(|i| mix(s, i as u64) ^ state.table(i)));
    let mut pushed: Vec<u64> = Vec::new();
    for i in 0..n {
        pushed.push(extended[n - 1 - i].rotate_left(11) ^ state.table(i + n));
    }
    for (i, w) in zeroed.iter_mut().enumerate() {
        *w = extended[i] ^ pushed[i].rotate_left(i as u32 % 64);
    }
    let sum = zeroed.iter().fold(s, |acc, &w| {
        (acc ^ w)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(23)
    });
    (sum, zero_ok)
}

/// Nanoseconds per `TIME_NS` call: the cost of any hypercall, for comparison.
fn time_exits() -> u64 {
    let t0 = now_ns();
    for _ in 0..TIMED_REPORTS {
        core::hint::black_box(now_ns());
    }
    (now_ns() - t0) / (TIMED_REPORTS + 1)
}

/// Nanoseconds per `REPORT_PAGES(Fresh)` call: reports a scratch page (its
/// contents are never read) `TIMED_REPORTS` times.
fn time_reports() -> u64 {
    let layout = Layout::from_size_align(4096, 4096).expect("page layout");
    // SAFETY: a non-zero size; freed below with the same layout.
    let page = unsafe { alloc::alloc::alloc(layout) };
    if page.is_null() {
        return 0;
    }
    let run = [PageRun {
        start: page as u64,
        len: 4096,
    }];
    let t0 = now_ns();
    for _ in 0..TIMED_REPORTS {
        let rax = report_pages(&run, PageReportKind::Fresh);
        assert!(
            errno::decode(rax).is_none(),
            "REPORT_PAGES refused: {rax:#x}"
        );
    }
    let per_call = (now_ns() - t0) / TIMED_REPORTS;
    // SAFETY: allocated above with `layout`.
    unsafe { alloc::alloc::dealloc(page, layout) };
    per_call
}

/// A child's result: checksum, zero check, fresh reports, timings.
const RESULT_WORDS: usize = 7;

fn main() -> i32 {
    let clones = arg_u32("clones", 4);
    let churn_mib = arg_u64("churn_mib", 256) as usize;
    let table_mib = arg_u64("table_mib", 16) as usize;
    let work_mib = arg_u64("work_mib", 64) as usize;
    let seed = arg_u64("seed", 1);
    // Tables, kept small blocks, up to four temporaries of 1.5 shares, and
    // the three working buffers (the pushed one may reach twice its size).
    let share_mib = churn_mib.div_ceil((table_mib * 4).max(1));
    let need_mib = table_mib * 2 + share_mib * 6 + work_mib * 2 + 4;
    if heap_capacity() < need_mib << 20 {
        println!(
            "allocheavy: needs about {need_mib} MiB of heap, has {} MiB",
            heap_capacity() >> 20
        );
        return 3;
    }
    let work_words = work_mib * WORDS_PER_MIB;

    let t0 = now_ns();
    let state = build(seed, table_mib, churn_mib);
    let t1 = now_ns();
    let free = report_free_pages();
    let t2 = now_ns();
    println!(
        "allocheavy: build_ms={} free_runs={} free_mib={} omitted_runs={} report_us={}",
        Millis(t1 - t0),
        free.runs,
        free.pages >> 8,
        free.omitted_runs,
        (t2 - t1) / 1000
    );

    let ticket = request_ticket(clones).expect("request_ticket");
    let t3 = now_ns();
    if let Fork::Child(id) = clone(&ticket).expect("clone") {
        let start = now_ns();
        let (sum, zero_ok) = work(seed, id, &state, work_words);
        let work_ns = now_ns() - start;
        let fresh = page_report_stats().fresh;
        let result: [u64; RESULT_WORDS] = [
            sum,
            u64::from(zero_ok),
            fresh.calls,
            fresh.pages,
            work_ns,
            time_reports(),
            time_exits(),
        ];
        let bytes: Vec<u8> = result.iter().flat_map(|w| w.to_le_bytes()).collect();
        exit(&bytes);
    }
    let t4 = now_ns();
    let outcomes = join(&ticket).expect("join");
    let t5 = now_ns();

    let mut ok = outcomes.len() == ticket.granted() as usize;
    let mut checksum = state.digest();
    for child in &outcomes {
        let (want, _) = work(seed, child.id, &state, work_words);
        checksum = mix(checksum, want);
        let words: Option<Vec<u64>> = match &child.result {
            Ok(bytes) if bytes.len() == RESULT_WORDS * 8 => Some(
                bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            Ok(bytes) => {
                println!(
                    "allocheavy: child {}: {}-byte result",
                    child.id,
                    bytes.len()
                );
                None
            }
            Err(failure) => {
                println!("allocheavy: child {}: {failure}", child.id);
                None
            }
        };
        let Some(w) = words else {
            ok = false;
            continue;
        };
        println!(
            "allocheavy: child {}: fresh_calls={} fresh_mib={} work_ms={} report_ns={} exit_ns={}",
            child.id,
            w[2],
            w[3] >> 8,
            Millis(w[4]),
            w[5],
            w[6]
        );
        if w[0] != want || w[1] != 1 {
            println!(
                "allocheavy: child {}: checksum {:#x}, expected {want:#x}; zeroed buffer read zero: {}",
                child.id,
                w[0],
                w[1] == 1
            );
            ok = false;
        }
    }
    let t6 = now_ns();
    println!(
        "allocheavy: clone_ms={} join_ms={} serial_ms={}",
        Millis(t4 - t3),
        Millis(t5 - t4),
        Millis(t6 - t5)
    );
    println!(
        "allocheavy: {} clones={clones} granted={} checksum={checksum:016x}",
        if ok { "PASS" } else { "FAIL" },
        ticket.granted()
    );
    if ok { 0 } else { 1 }
}
