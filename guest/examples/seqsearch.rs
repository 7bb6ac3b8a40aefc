//! seqsearch: the main demo job. A parent builds a large in-memory state (a
//! synthetic DNA reference and its k-mer index), clones, and every child
//! searches its shard of the reads against the state it inherited.
//!
//! Args `ref_mib` (default 256), `queries` (default 200_000), `clones`
//! (default 8), `seed` (default 1), `resident` (default 0), `rounds`
//! (default 1). Reads are 100
//! bases: 90% copied from random reference positions with 0-4 substitutions,
//! 10% random. A read's hit is its best match with Hamming distance <= 8,
//! found by looking up 12-mer seeds (the index samples every 8th reference
//! position) and verifying candidates. Child i searches shard i and exits
//! with (reads searched, hits, hash of its hits in order). The parent
//! merges, then searches every read itself without cloning (the check pass)
//! and compares shard by shard. If no clone is granted, the parent also
//! computes the "parallel" side.
//!
//! With `resident=1` the parent first searches every shard before the clone
//! point, timing each: its state is what it has just built, resident and
//! mapped, so the slowest shard is the job on workers that already hold the
//! state (for up to one shard per core) and the sum the resident serial
//! job. Once a clone is granted, the clone point moves the parent too onto
//! a fresh copy-on-write view of its frozen memory, so the check pass
//! first-touches the state again, as a clone does, and `serial_ms` includes
//! those faults.
//!
//! With `rounds=2` or more the parent takes a checkpoint instead of cloning
//! and starts the job's clones from it (`create_clones`) once per round,
//! joining and checking each round against the check pass: the first round
//! finds the state on no clone host, later rounds find it where earlier
//! rounds left it (a warm run of the same job from the same checkpoint).
//!
//! Prints timing lines (`seqsearch: build_ms=..`, with `resident=1`
//! `resident_max_ms=.. resident_sum_ms=..`, then `clone_ms=..`, `join_ms=..`,
//! `serial_ms=..`: the check pass; per later round `round=.. warm_clone_ms=..
//! warm_join_ms=..`), then `seqsearch: ref_mib=.. queries=..
//! clones=.. granted=.. hits=.. check=ok`. Exit 0 iff every shard matches and
//! no child failed; 1 on a mismatch or failed child, 2 on bad arguments, 3
//! when the VM has too little memory.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
use core::hint::black_box;
use snowflock_guest::args::{arg_u32, arg_u64};
use snowflock_guest::rand::{SplitMix64, mix};
use snowflock_guest::rt::heap_capacity;
use snowflock_guest::time::{Millis, now_ns};
use snowflock_guest::{
    CheckpointOutcome, ChildOutcome, Fork, checkpoint_parent, clone, create_clones, exit, join,
    println, request_ticket, rounds,
};

snowflock_guest::entry!(main);

/// Seed length: 4^12 = 16.7 M buckets, about one sampled position each at 256 MiB.
const K: usize = 12;
/// The index keeps every STRIDE-th reference position.
const STRIDE: usize = 8;
const READ_LEN: usize = 100;
const MAX_DIST: u32 = 8;
/// Seeds are looked up at STRIDE consecutive read offsets from each of these,
/// so each window holds exactly one sampled position of a planted read.
const WINDOWS: [usize; 3] = [0, 44, READ_LEN - K - STRIDE + 1];
const BASES: &[u8; 4] = b"ACGT";

/// A base's 2-bit code (A=0 C=1 T=2 G=3): bits 1-2 of its ASCII value.
fn code(b: u8) -> u32 {
    u32::from(b >> 1) & 3
}

fn kmer(bases: &[u8]) -> usize {
    bases[..K]
        .iter()
        .fold(0, |c, &b| (c << 2) | code(b) as usize)
}

/// Vec with exactly `n` elements, or None if the heap is too small.
fn try_vec<T: Clone>(n: usize, value: T) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, value);
    Some(v)
}

fn random_bases(rng: &mut SplitMix64, out: &mut [u8]) {
    for chunk in out.chunks_mut(32) {
        let mut bits = rng.next_u64();
        for b in chunk {
            *b = BASES[(bits & 3) as usize];
            bits >>= 2;
        }
    }
}

/// Calls `f(position, code, starts)` for every sampled position in order,
/// prefetching `starts[code + offset]` a few samples early: the counting
/// sort's accesses to the 64 MiB bucket array are random cache misses, and
/// prefetching overlaps them.
fn for_each_sample(
    reference: &[u8],
    sampled: usize,
    starts: &mut [u32],
    offset: usize,
    mut f: impl FnMut(usize, usize, &mut [u32]),
) {
    const AHEAD: usize = 32;
    let code_at = |i: usize| kmer(&reference[i * STRIDE..]);
    let mut ring = [0; AHEAD];
    for (i, code) in ring.iter_mut().enumerate().take(sampled) {
        *code = code_at(i);
    }
    for i in 0..sampled {
        let code = ring[i % AHEAD];
        if i + AHEAD < sampled {
            let next = code_at(i + AHEAD);
            prefetch(&starts[next + offset]);
            ring[i % AHEAD] = next;
        }
        f(i * STRIDE, code, starts);
    }
}

fn prefetch<T>(x: &T) {
    // SAFETY: a prefetch is only a hint: no memory effects, never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T0>((x as *const T).cast()) }
}

/// The reference and its sampled k-mer index (a counting sort: bucket c's
/// positions are `positions[starts[c]..starts[c + 1]]`).
struct Index {
    reference: Vec<u8>,
    starts: Vec<u32>,
    positions: Vec<u32>,
}

impl Index {
    fn build(reference: Vec<u8>) -> Option<Self> {
        let sampled = (reference.len() - K) / STRIDE + 1;
        // Count into starts[c + 2], prefix-sum, then place each position at
        // starts[c + 1]++: afterwards starts[c] is where bucket c begins.
        let mut starts = try_vec(1 + (1 << (2 * K)) + 1, 0u32)?;
        for_each_sample(&reference, sampled, &mut starts, 2, |_, c, starts| {
            starts[c + 2] += 1
        });
        for c in 1..starts.len() {
            starts[c] += starts[c - 1];
        }
        let mut positions = try_vec(sampled, 0u32)?;
        for_each_sample(&reference, sampled, &mut starts, 1, |p, c, starts| {
            positions[starts[c + 1] as usize] = p as u32;
            starts[c + 1] += 1;
        });
        Some(Self {
            reference,
            starts,
            positions,
        })
    }

    /// The best hit of `read`: (distance, position), lowest distance first,
    /// then lowest position.
    fn search(&self, read: &[u8], candidates: &mut Vec<u32>) -> Option<(u32, u32)> {
        candidates.clear();
        for w in WINDOWS {
            for offset in w..w + STRIDE {
                let c = kmer(&read[offset..]);
                let bucket = &self.positions[self.starts[c] as usize..self.starts[c + 1] as usize];
                candidates.extend(bucket.iter().filter_map(|&p| p.checked_sub(offset as u32)));
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut best: Option<(u32, u32)> = None;
        for &start in candidates.iter() {
            let Some(window) = self
                .reference
                .get(start as usize..start as usize + READ_LEN)
            else {
                continue;
            };
            let bound = best.map_or(MAX_DIST, |(d, _)| d.saturating_sub(1));
            if let Some(d) = hamming_within(read, window, bound) {
                best = Some((d, start));
            }
        }
        best
    }
}

/// The Hamming distance of two equal-length strings if it is <= `bound`,
/// comparing eight bytes at a time and giving up early.
fn hamming_within(a: &[u8], b: &[u8], bound: u32) -> Option<u32> {
    let mut d = 0;
    let (a8, a_rest) = a.as_chunks::<8>();
    let (b8, b_rest) = b.as_chunks::<8>();
    for (x, y) in a8.iter().zip(b8) {
        let diff = u64::from_le_bytes(*x) ^ u64::from_le_bytes(*y);
        // Fold each byte's bits into its lowest bit, then count bytes.
        let mut t = diff | (diff >> 4);
        t |= t >> 2;
        t |= t >> 1;
        d += (t & 0x0101_0101_0101_0101).count_ones();
        if d > bound {
            return None;
        }
    }
    d += a_rest.iter().zip(b_rest).filter(|(x, y)| x != y).count() as u32;
    (d <= bound).then_some(d)
}

/// What a shard of reads produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ShardResult {
    searched: u64,
    hits: u64,
    /// Order-dependent hash of every (read, position, distance) hit.
    hash: u64,
}

impl ShardResult {
    fn to_bytes(self) -> [u8; 24] {
        let mut out = [0; 24];
        for (i, w) in [self.searched, self.hits, self.hash]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 24] = b.try_into().ok()?;
        let (words, _) = b.as_chunks::<8>();
        let w = |i: usize| u64::from_le_bytes(words[i]);
        Some(Self {
            searched: w(0),
            hits: w(1),
            hash: w(2),
        })
    }
}

/// Reads `[lo, hi)` of `reads`; also counts planted reads found at their origin.
fn search_shard(
    index: &Index,
    reads: &[u8],
    truth: &[u32],
    lo: usize,
    hi: usize,
) -> (ShardResult, u64) {
    let mut r = ShardResult {
        searched: (hi - lo) as u64,
        hits: 0,
        hash: 0,
    };
    let mut found_origin = 0;
    let mut candidates = Vec::new();
    for q in lo..hi {
        if let Some((dist, pos)) = index.search(&reads[q * READ_LEN..][..READ_LEN], &mut candidates)
        {
            r.hits += 1;
            r.hash = mix(
                r.hash,
                (q as u64) << 40 ^ u64::from(pos) << 8 ^ u64::from(dist),
            );
            found_origin += u64::from(truth[q] == pos);
        }
    }
    (r, found_origin)
}

/// Each child's result in `outcomes`, in child order (`None` for a child
/// that failed, which is reported); clears `ok` unless every one of the
/// `shards` children answered.
fn results(outcomes: &[ChildOutcome], shards: usize, ok: &mut bool) -> Vec<Option<ShardResult>> {
    *ok &= outcomes.len() == shards;
    outcomes
        .iter()
        .map(|child| match &child.result {
            Ok(r) => ShardResult::from_bytes(r),
            Err(failure) => {
                println!("seqsearch: child {}: {failure}", child.id);
                None
            }
        })
        .collect()
}

/// Query shard `j` (1-based) of `shards`.
fn shard_range(queries: usize, shards: usize, j: usize) -> (usize, usize) {
    (queries * (j - 1) / shards, queries * j / shards)
}

fn main() -> i32 {
    let ref_mib = arg_u64("ref_mib", 256);
    let queries = arg_u64("queries", 200_000) as usize;
    let clones = arg_u32("clones", 8);
    let seed = arg_u64("seed", 1);
    let resident = arg_u64("resident", 0) != 0;
    let rounds = arg_u32("rounds", 1);
    if rounds == 0 {
        println!("seqsearch: rounds must be at least 1");
        return 2;
    }
    if !(1..=4095).contains(&ref_mib) {
        println!("seqsearch: ref_mib must be in 1..=4095 (positions are 32-bit)");
        return 2;
    }
    let ref_len = (ref_mib as usize) << 20;
    let out_of_memory = |what: &str| {
        let heap_mib = heap_capacity() >> 20;
        println!(
            "seqsearch: the {heap_mib} MiB heap cannot hold the {what} (ref_mib={ref_mib}): give the VM more memory"
        );
        3
    };

    // Build: reference, index, reads (with each planted read's origin).
    let t_start = now_ns();
    let mut rng = SplitMix64::new(mix(seed, 0x5e9));
    let Some(mut reference) = try_vec(ref_len, 0u8) else {
        return out_of_memory("reference");
    };
    random_bases(&mut rng, &mut reference);
    let t_ref = now_ns();
    let Some(index) = Index::build(reference) else {
        return out_of_memory("index");
    };
    let t_index = now_ns();
    let Some(mut reads) = try_vec(queries * READ_LEN, 0u8) else {
        return out_of_memory("reads");
    };
    let Some(mut truth) = try_vec(queries, u32::MAX) else {
        return out_of_memory("reads");
    };
    for (read, origin) in reads.chunks_exact_mut(READ_LEN).zip(truth.iter_mut()) {
        if rng.below(10) == 0 {
            random_bases(&mut rng, read);
            continue;
        }
        let pos = rng.below((ref_len - READ_LEN + 1) as u64) as usize;
        read.copy_from_slice(&index.reference[pos..pos + READ_LEN]);
        for _ in 0..rng.below(5) {
            let at = rng.below(READ_LEN as u64) as usize;
            let old = BASES.iter().position(|&b| b == read[at]).unwrap_or(0);
            read[at] = BASES[(old + 1 + rng.below(3) as usize) % 4];
        }
        *origin = pos as u32;
    }
    let t_built = now_ns();
    println!(
        "seqsearch: build_ms={} reference_ms={} index_ms={} reads_ms={}",
        Millis(t_built - t_start),
        Millis(t_ref - t_start),
        Millis(t_index - t_ref),
        Millis(t_built - t_index)
    );

    // Parallel: one shard per granted clone.
    let ticket = request_ticket(clones).expect("request_ticket");
    let shards = (ticket.granted() as usize).max(1);
    if resident {
        // Only the time counts (the check pass compares every shard);
        // `black_box` keeps the otherwise unused search from being dropped.
        let (mut resident_max, mut resident_sum) = (0, 0);
        for j in 1..=shards {
            let (lo, hi) = shard_range(queries, shards, j);
            let t_shard = now_ns();
            black_box(search_shard(&index, &reads, &truth, lo, hi));
            let took = now_ns() - t_shard;
            resident_max = resident_max.max(took);
            resident_sum += took;
        }
        println!(
            "seqsearch: resident_max_ms={} resident_sum_ms={}",
            Millis(resident_max),
            Millis(resident_sum)
        );
    }
    let t_clone = now_ns();
    // Later rounds start from the same clone point, so it is a checkpoint.
    let checkpoint = if rounds > 1 && ticket.granted() > 0 {
        match checkpoint_parent().expect("checkpoint_parent") {
            CheckpointOutcome::Child { id, .. } => {
                let (lo, hi) = shard_range(queries, shards, id as usize);
                exit(&search_shard(&index, &reads, &truth, lo, hi).0.to_bytes());
            }
            CheckpointOutcome::Parent(checkpoint) => {
                create_clones(&checkpoint, &ticket).expect("create_clones");
                Some(checkpoint)
            }
        }
    } else {
        if let Fork::Child(id) = clone(&ticket).expect("clone") {
            let (lo, hi) = shard_range(queries, shards, id as usize);
            exit(&search_shard(&index, &reads, &truth, lo, hi).0.to_bytes());
        }
        None
    };
    let t_cloned = now_ns();
    let mut ok = true;
    let parallel: Vec<Option<ShardResult>> = if ticket.granted() == 0 {
        alloc::vec![Some(search_shard(&index, &reads, &truth, 0, queries).0)]
    } else {
        results(&join(&ticket).expect("join"), shards, &mut ok)
    };
    let t_joined = now_ns();
    println!("seqsearch: clone_ms={}", Millis(t_cloned - t_clone));
    println!("seqsearch: join_ms={}", Millis(t_joined - t_cloned));

    // Serial: the same shards, searched here without cloning, as the check.
    let mut hits = 0;
    let mut found_origin = 0;
    let mut serial_results = Vec::with_capacity(shards);
    for j in 1..=shards {
        let (lo, hi) = shard_range(queries, shards, j);
        let (serial, found) = search_shard(&index, &reads, &truth, lo, hi);
        hits += serial.hits;
        found_origin += found;
        if parallel.get(j - 1).copied().flatten() != Some(serial) {
            println!(
                "seqsearch: shard {j} differs: parallel {:?}, serial {serial:?}",
                parallel.get(j - 1)
            );
            ok = false;
        }
        serial_results.push(serial);
    }
    println!("seqsearch: serial_ms={}", Millis(now_ns() - t_joined));
    if let Some(checkpoint) = &checkpoint {
        for round in 2..=rounds {
            let warm = match rounds::again(checkpoint, clones, shards as u32, 0) {
                Ok(warm) => warm,
                Err(e) => {
                    println!("seqsearch: round {round}: {e}");
                    ok = false;
                    break;
                }
            };
            println!(
                "seqsearch: round={round} warm_clone_ms={} warm_join_ms={}",
                Millis(warm.create_ns),
                Millis(warm.join_ns)
            );
            let expected = serial_results.iter().map(|&serial| Some(serial));
            if !results(&warm.outcomes, shards, &mut ok)
                .into_iter()
                .eq(expected)
            {
                println!("seqsearch: round {round}: a shard differs from the serial pass");
                ok = false;
            }
        }
    }
    let planted = truth.iter().filter(|&&t| t != u32::MAX).count();
    println!("seqsearch: planted={planted} found_at_origin={found_origin}");
    println!(
        "seqsearch: ref_mib={ref_mib} queries={queries} clones={clones} granted={} hits={hits} check={}",
        ticket.granted(),
        if ok { "ok" } else { "FAILED" }
    );
    if ok { 0 } else { 1 }
}
