//! scan: a parent builds a large state, clones, and every child reads its
//! whole share of the state and writes a fraction of its pages: the memory
//! access pattern of a data-parallel job over inherited state, with little
//! computation per byte.
//!
//! Args `state_mib` (default 48), `write_every` (default 8: one page in
//! eight of each share is written; 1 = every page, 0 = read only), `clones`
//! (default 2), `seed` (default 1), `rounds` (default 1), `own_memory`
//! (default 1 when the children write, 0 when they only read: the ticket
//! tells the VMM that the children write their state,
//! `abi::ticket::CHILDREN_WRITE`, so those on the parent's host start on
//! memory of their own). The state is split into `m` contiguous shares of
//! whole pages, one per granted clone; child k checksums share k and exits
//! with the checksum.
//!
//! Once the ticket says how many shares there are, and before the clone
//! point, the parent does every share itself, timing each: its memory is
//! what it has just written, resident and mapped, so this is the resident
//! baseline (the slowest share is the job on workers that already hold the
//! state, for up to one share per core; the sum is the resident serial job).
//! It has to come before the clone point: a clone point moves the parent
//! too onto a fresh copy-on-write view of its frozen memory, where it
//! first-touches every page again, as a clone does. After the join the parent repeats
//! every share once more (the check pass) and checks each child's checksum
//! against its own. With no clone granted the parent does the one share
//! itself first.
//!
//! With `rounds=2` or more the parent takes a checkpoint instead of cloning
//! and starts the clones from it once per round (`create_clones`), joining
//! and checking each round against the check pass: later rounds find the
//! state where earlier rounds left it (a warm run of the same job).
//!
//! With `epochs=2` or more (default 1) the job is iterative: after the
//! rounds, per later epoch the parent moves its state on (rewrites the first
//! word of one page in 64), takes a new ticket and clones again, a new clone
//! point of the same VM, and checks the children's checksums of the new
//! state against its own.
//!
//! Prints `scan: build_ms=..`, one `scan: share=k resident_ms=..` per share,
//! `scan: resident_max_ms=.. resident_sum_ms=..`, `scan: clone_ms=..`,
//! `scan: join_ms=..`, `scan: check_ms=..` (the check pass), per later
//! round `scan: round=.. warm_clone_ms=.. warm_join_ms=..`, per later epoch
//! `scan: epoch=.. clone_ms=.. join_ms=..`, then
//! `scan: state_mib=.. write_every=.. clones=.. granted=.. checksum=..
//! check=ok`. Exit 0 iff every share matches and no child failed; 1 on a
//! mismatch or failed child, 2 on bad arguments, 3 when the VM has too
//! little memory.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::hint::black_box;
use snowflock_guest::abi::ticket;
use snowflock_guest::args::{arg_u32, arg_u64};
use snowflock_guest::rand::{SplitMix64, mix};
use snowflock_guest::rt::heap_capacity;
use snowflock_guest::time::{Millis, now_ns};
use snowflock_guest::{
    CheckpointOutcome, ChildOutcome, Fork, checkpoint_parent, clone, create_clones, exit, join,
    println, request_ticket_with, rounds,
};

snowflock_guest::entry!(main);

const PAGE_WORDS: usize = 4096 / 8;

/// Checksums pages `[lo, hi)` of `state` in order and writes the first word
/// of every page whose index is a multiple of `write_every` (0: none).
///
/// The write stores the word's own value back: a real store (in a clone the
/// page becomes its private copy, as any write would make it), but one that
/// leaves the contents unchanged, so every pass over the same memory gives
/// the same checksum and the parent can do a child's share on its own
/// memory before the clone point and again after the join.
fn scan_share(state: &mut [u64], lo: usize, hi: usize, write_every: usize) -> u64 {
    let mut sum = 0xcbf2_9ce4_8422_2325_u64;
    for page in lo..hi {
        let words = &mut state[page * PAGE_WORDS..(page + 1) * PAGE_WORDS];
        for &w in words.iter() {
            sum = (sum ^ w).wrapping_mul(0x0000_0100_0000_01b3);
        }
        if write_every != 0 && page.is_multiple_of(write_every) {
            let value = words[0];
            let first: *mut u64 = &mut words[0];
            // SAFETY: `first` points at a live, aligned u64 of `state`, which
            // this function borrows mutably; the volatile store keeps the
            // compiler from dropping a store of the value just read.
            unsafe { first.write_volatile(value) };
        }
    }
    sum
}

/// Each child's checksum in `outcomes`, in child order (`None` for a
/// child that failed, which is reported); clears `ok` unless every one of
/// the `shares` children answered.
fn checksums(outcomes: &[ChildOutcome], shares: usize, ok: &mut bool) -> Vec<Option<u64>> {
    *ok &= outcomes.len() == shares;
    outcomes
        .iter()
        .map(|child| match &child.result {
            Ok(r) => r.as_slice().try_into().ok().map(u64::from_le_bytes),
            Err(failure) => {
                println!("scan: child {}: {failure}", child.id);
                None
            }
        })
        .collect()
}

/// Pages `[lo, hi)` of share `k` (1-based) of `shares` over `pages` pages.
fn share_range(pages: usize, shares: usize, k: usize) -> (usize, usize) {
    (pages * (k - 1) / shares, pages * k / shares)
}

/// One later epoch of an iterative job: moves `state` on, clones it again
/// (a new clone point) and checks every child's share against the parent's
/// own pass. Returns whether all matched.
fn epoch(
    state: &mut [u64],
    epoch: u32,
    seed: u64,
    clones: u32,
    flags: u64,
    write_every: usize,
) -> bool {
    let pages = state.len() / PAGE_WORDS;
    let mut rng = SplitMix64::new(mix(seed, 0xe90c + u64::from(epoch)));
    for page in (0..pages).step_by(64) {
        state[page * PAGE_WORDS] = rng.next_u64();
    }
    let ticket = request_ticket_with(clones, flags).expect("request_ticket");
    if ticket.granted() == 0 {
        println!("scan: epoch={epoch}: no clone granted");
        return true;
    }
    let shares = ticket.granted() as usize;
    let t_clone = now_ns();
    if let Fork::Child(id) = clone(&ticket).expect("clone") {
        let (lo, hi) = share_range(pages, shares, id as usize);
        exit(&scan_share(state, lo, hi, write_every).to_le_bytes());
    }
    let t_cloned = now_ns();
    let mut ok = true;
    let parallel = checksums(&join(&ticket).expect("join"), shares, &mut ok);
    println!(
        "scan: epoch={epoch} clone_ms={} join_ms={}",
        Millis(t_cloned - t_clone),
        Millis(now_ns() - t_cloned)
    );
    for k in 1..=shares {
        let (lo, hi) = share_range(pages, shares, k);
        let own = scan_share(state, lo, hi, write_every);
        if parallel.get(k - 1).copied().flatten() != Some(own) {
            println!("scan: epoch {epoch}: share {k} differs from the parent's");
            ok = false;
        }
    }
    ok
}

fn main() -> i32 {
    let state_mib = arg_u64("state_mib", 48);
    let write_every = arg_u64("write_every", 8) as usize;
    let clones = arg_u32("clones", 2);
    let seed = arg_u64("seed", 1);
    let rounds = arg_u32("rounds", 1);
    let epochs = arg_u32("epochs", 1);
    let own_memory = arg_u32("own_memory", u32::from(write_every != 0)) != 0;
    let flags = if own_memory {
        ticket::CHILDREN_WRITE
    } else {
        0
    };
    if rounds == 0 || epochs == 0 {
        println!("scan: rounds and epochs must be at least 1");
        return 2;
    }
    if !(1..=65_536).contains(&state_mib) {
        println!("scan: state_mib must be in 1..=65536");
        return 2;
    }
    let pages = (state_mib as usize) << 8;

    // Build: one extra page so that the shares can start on a page boundary.
    let t_start = now_ns();
    let mut buffer = Vec::new();
    if buffer.try_reserve_exact((pages + 1) * PAGE_WORDS).is_err() {
        let heap_mib = heap_capacity() >> 20;
        println!(
            "scan: the {heap_mib} MiB heap cannot hold the state (state_mib={state_mib}): give the VM more memory"
        );
        return 3;
    }
    buffer.resize((pages + 1) * PAGE_WORDS, 0u64);
    let skip = buffer.as_ptr().align_offset(4096) / 8;
    let state = &mut buffer[skip..skip + pages * PAGE_WORDS];
    let mut rng = SplitMix64::new(mix(seed, 0x5ca9));
    for w in state.iter_mut() {
        *w = rng.next_u64();
    }
    let t_built = now_ns();
    println!("scan: build_ms={}", Millis(t_built - t_start));

    let ticket = request_ticket_with(clones, flags).expect("request_ticket");
    let shares = (ticket.granted() as usize).max(1);

    // Resident: every share here, before the clone point, on memory this VM
    // has just written. Only the time counts (the check pass below compares
    // checksums); `black_box` keeps a read-only pass (write_every=0) from
    // being optimized away.
    let mut resident_ns = Vec::with_capacity(shares);
    for k in 1..=shares {
        let (lo, hi) = share_range(pages, shares, k);
        let t_share = now_ns();
        black_box(scan_share(state, lo, hi, write_every));
        resident_ns.push(now_ns() - t_share);
    }
    // Printed after the loop: every console line is a VM exit, which the
    // share times should not include.
    for (k, ns) in resident_ns.iter().enumerate() {
        println!("scan: share={} resident_ms={}", k + 1, Millis(*ns));
    }
    println!(
        "scan: resident_max_ms={} resident_sum_ms={}",
        Millis(resident_ns.iter().copied().max().unwrap_or(0)),
        Millis(resident_ns.iter().sum())
    );

    let t_clone = now_ns();
    // Later rounds start from the same clone point, so it is a checkpoint.
    let checkpoint = if rounds > 1 && ticket.granted() > 0 {
        match checkpoint_parent().expect("checkpoint_parent") {
            CheckpointOutcome::Child { id, .. } => {
                let (lo, hi) = share_range(pages, shares, id as usize);
                exit(&scan_share(state, lo, hi, write_every).to_le_bytes());
            }
            CheckpointOutcome::Parent(checkpoint) => {
                create_clones(&checkpoint, &ticket).expect("create_clones");
                Some(checkpoint)
            }
        }
    } else {
        if let Fork::Child(id) = clone(&ticket).expect("clone") {
            let (lo, hi) = share_range(pages, shares, id as usize);
            exit(&scan_share(state, lo, hi, write_every).to_le_bytes());
        }
        None
    };
    let t_cloned = now_ns();
    let mut ok = true;
    let parallel: Vec<Option<u64>> = if ticket.granted() == 0 {
        alloc::vec![Some(scan_share(state, 0, pages, write_every))]
    } else {
        checksums(&join(&ticket).expect("join"), shares, &mut ok)
    };
    let t_joined = now_ns();
    println!("scan: clone_ms={}", Millis(t_cloned - t_clone));
    println!("scan: join_ms={}", Millis(t_joined - t_cloned));

    // Check: every share again, against each child's checksum. Its time is
    // no resident figure: the clone point moved this VM onto a fresh
    // copy-on-write view, so this pass first-touches every page again.
    let mut checksum = 0;
    let mut own_checksums = Vec::with_capacity(shares);
    for k in 1..=shares {
        let (lo, hi) = share_range(pages, shares, k);
        let own = scan_share(state, lo, hi, write_every);
        checksum = mix(checksum, own);
        if parallel.get(k - 1).copied().flatten() != Some(own) {
            println!(
                "scan: share {k} differs: parallel {:?}, parent {own:#x}",
                parallel.get(k - 1)
            );
            ok = false;
        }
        own_checksums.push(own);
    }
    println!("scan: check_ms={}", Millis(now_ns() - t_joined));
    if let Some(checkpoint) = &checkpoint {
        for round in 2..=rounds {
            let warm = match rounds::again(checkpoint, clones, shares as u32, flags) {
                Ok(warm) => warm,
                Err(e) => {
                    println!("scan: round {round}: {e}");
                    ok = false;
                    break;
                }
            };
            println!(
                "scan: round={round} warm_clone_ms={} warm_join_ms={}",
                Millis(warm.create_ns),
                Millis(warm.join_ns)
            );
            let expected = own_checksums.iter().map(|&own| Some(own));
            if !checksums(&warm.outcomes, shares, &mut ok)
                .into_iter()
                .eq(expected)
            {
                println!("scan: round {round}: a child's checksum differs from the parent's");
                ok = false;
            }
        }
    }
    for later in 2..=epochs {
        ok &= epoch(state, later, seed, clones, flags, write_every);
    }
    println!(
        "scan: state_mib={state_mib} write_every={write_every} clones={clones} granted={} checksum={checksum:#018x} check={}",
        ticket.granted(),
        if ok { "ok" } else { "FAILED" }
    );
    if ok { 0 } else { 1 }
}
