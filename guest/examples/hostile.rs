//! hostile: hypercalls with random and adversarial arguments, from a parent
//! and from its clones, so that tests can check that the VMM, the supervisor
//! and `sfd` stay up, that other VMs are unaffected and that nothing leaks.
//!
//! Args: `rounds` (default 4), `calls` per VM and round (default 2000),
//! `clones` per round (default 3), `seed` (default 1).
//!
//! The parent makes only calls that must return: ticket, checkpoint and
//! child ids it does not hold (small ones, which other VMs' tickets and its
//! clones' parent's have),
//! flags and counts out of range, page reports of random runs, canonical and
//! non-canonical FS bases, short sleeps, clocks; every buffer it passes lies
//! in its own scratch memory. Each round it also clones, and each clone makes
//! the same calls and then ends itself: by `exit`, or by one call that must
//! end it (a pointer past the end of memory, a length past the transfer
//! limit, an unknown number, a host-file request with wild pointers, a panic
//! report that is not one, ticket flags no version defines). The parent joins them, twice,
//! and checks that each ended one of those ways; it prints
//! `hostile: rounds=.. calls=.. errors=.. children=.. exited=.. ended=.. ok`
//! and exits 0 iff every call returned as documented.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use snowflock_guest::abi::{MAX_TRANSFER, errno, nr};
use snowflock_guest::args::{arg_u32, arg_u64};
use snowflock_guest::hypercall::call;
use snowflock_guest::rand::{SplitMix64, mix};
use snowflock_guest::{Fork, boot_info, clone, exit, join, println, request_ticket};

snowflock_guest::entry!(main);

/// Bytes of scratch memory every pointer of a call that returns points into.
const SCRATCH: usize = 64 * 1024;

/// An id of no ticket, checkpoint or child of this VM (`own` are its tickets'): small ones,
/// which other VMs' tickets have, large and random ones.
fn foreign_id(rng: &mut SplitMix64, own: &[u64]) -> u64 {
    loop {
        let id = match rng.below(4) {
            0 => rng.below(64),
            1 => u64::MAX - rng.below(4),
            2 => 1 << 40 | rng.next_u64() >> 24,
            _ => rng.next_u64(),
        };
        if !own.contains(&id) {
            return id;
        }
    }
}

/// Makes a call whose pointer arguments (if any) lie in this VM's scratch buffer, for
/// at most its length; returns `rax`.
fn scratch_call(nr: u32, a0: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    // SAFETY: callers pass pointers into `scratch` only, for at most its length; the VMM
    // writes nothing else, and no reference to `scratch` is used while the call runs.
    unsafe { call(nr, a0, a1, a2, a3).0 }
}

/// Makes a call the VMM must refuse by ending this VM; it never touches memory.
fn refused_call(nr: u32, a0: u64, a1: u64) {
    // SAFETY: the arguments are out of range on purpose: the VMM checks them before any
    // access and ends the VM instead.
    unsafe { call(nr, a0, a1, 0, 0) };
}

/// One call that must return. Returns whether it returned what the ABI says.
fn returning_call(rng: &mut SplitMix64, scratch: &mut [u8], own: &[u64]) -> (bool, bool) {
    let base = scratch.as_mut_ptr() as u64;
    let nr_kind = rng.below(10);
    let rax = match nr_kind {
        0 => scratch_call(nr::CLONE, foreign_id(rng, own), 0, 0, 0),
        1 => scratch_call(nr::JOIN, foreign_id(rng, own), 0, 0, 0),
        2 => scratch_call(nr::KILL, foreign_id(rng, own), 0, 0, 0),
        3 => {
            let cap = rng.below(SCRATCH as u64 + 1);
            let child = rng.below(8);
            scratch_call(nr::CHILD_RESULT, foreign_id(rng, own), child, base, cap)
        }
        4 => scratch_call(
            nr::CREATE_CLONES,
            foreign_id(rng, own),
            foreign_id(rng, own),
            0,
            0,
        ),
        5 => {
            let count = rng.below((SCRATCH / 16) as u64 + 1);
            for word in scratch.chunks_exact_mut(8).take(count as usize * 2) {
                word.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            let kind = rng.below(4);
            scratch_call(nr::REPORT_PAGES, base, count, kind, 0)
        }
        6 => {
            let fs = match rng.below(3) {
                0 => rng.next_u64() & 0x0000_7fff_ffff_f000,
                1 => 0x8000_0000_0000_0000 | rng.next_u64(),
                _ => 0,
            };
            scratch_call(nr::SET_FS_BASE, fs, 0, 0, 0)
        }
        7 => scratch_call(nr::SLEEP_NS, rng.below(100_000), 0, 0, 0),
        8 => scratch_call(nr::CLOCKS, 0, 0, 0, 0),
        _ => scratch_call(nr::TIME_NS, 0, 0, 0, 0),
    };
    // Calls on ids this VM does not hold fail; the others may succeed.
    let must_fail = matches!(nr_kind, 0..=4);
    let failed = errno::decode(rax).is_some();
    let expected = !must_fail || failed;
    (expected, failed)
}

/// One call that must end the VM making it.
fn ending_call(rng: &mut SplitMix64) -> ! {
    let mem_size = boot_info().mem_size;
    match rng.below(7) {
        0 => refused_call(nr::CONSOLE_WRITE, mem_size - 8, 64),
        1 => refused_call(nr::CONSOLE_WRITE, 0x1000, MAX_TRANSFER + 1),
        2 => refused_call(1000 + rng.below(1 << 20) as u32, 0, 0),
        3 => refused_call(nr::HOST_FILE, rng.below(8), mem_size + rng.below(1 << 30)),
        4 => refused_call(nr::PANIC, u64::MAX - 7, 0),
        5 => refused_call(nr::REQUEST_TICKET, 1, 1 << (8 + rng.below(56))),
        _ => refused_call(nr::CHILD_EXIT, mem_size - 4096, MAX_TRANSFER),
    }
    // Still here: the VMM accepted what it must refuse.
    println!("hostile: a call that must end the VM returned");
    exit(b"survived")
}

fn main() -> i32 {
    let rounds = arg_u32("rounds", 4);
    let calls = arg_u32("calls", 2000);
    let clones = arg_u32("clones", 3);
    let seed = arg_u64("seed", 1);
    let mut scratch = vec![0u8; SCRATCH];
    let mut rng = SplitMix64::new(seed);
    let (mut errors, mut unexpected) = (0u64, 0u64);
    let (mut children, mut exited, mut ended) = (0u32, 0u32, 0u32);
    let mut own = Vec::new();
    for round in 0..rounds {
        for _ in 0..calls {
            let (expected, failed) = returning_call(&mut rng, &mut scratch, &own);
            errors += u64::from(failed);
            unexpected += u64::from(!expected);
        }
        let ticket = match request_ticket(clones) {
            Ok(ticket) => ticket,
            Err(error) => {
                println!("hostile: request_ticket: {error:?}");
                return 1;
            }
        };
        own.push(ticket.id());
        if let Ok(Fork::Child(id)) = clone(&ticket) {
            // A clone holds no ticket of its own: its parent's are foreign to it.
            let mut rng = SplitMix64::new(mix(mix(seed, u64::from(round)), u64::from(id)));
            for _ in 0..calls {
                returning_call(&mut rng, &mut scratch, &[]);
            }
            if rng.below(3) == 0 {
                exit(&u64::from(id).to_le_bytes());
            }
            ending_call(&mut rng);
        }
        let outcomes: Vec<_> = match join(&ticket) {
            Ok(outcomes) => outcomes,
            Err(error) => {
                println!("hostile: join: {error:?}");
                return 1;
            }
        };
        // Joining again returns at once: the children's outcomes are in the report.
        let again = scratch_call(nr::JOIN, ticket.id(), 0, 0, 0);
        if again != outcomes.len() as u64 {
            println!("hostile: a second join answered {again:#x}");
            unexpected += 1;
        }
        for child in &outcomes {
            children += 1;
            match &child.result {
                Ok(bytes) if bytes.as_slice() == u64::from(child.id).to_le_bytes() => exited += 1,
                Ok(bytes) => {
                    println!("hostile: child {} returned {bytes:?}", child.id);
                    unexpected += 1;
                }
                Err(_) => ended += 1,
            }
        }
    }
    let ok = unexpected == 0;
    println!(
        "hostile: rounds={rounds} calls={} errors={errors} children={children} \
         exited={exited} ended={ended} {}",
        u64::from(rounds) * u64::from(calls),
        if ok { "ok" } else { "FAILED" }
    );
    if ok { 0 } else { 1 }
}
