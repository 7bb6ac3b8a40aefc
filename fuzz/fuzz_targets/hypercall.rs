//! The hypercall dispatcher of a real VM: random registers and guest memory
//! contents fed to `Machine::serve_hypercall` (what `Machine::run` does for
//! a hypercall exit) on one flock image VM and one Linux-ABI VM on KVM, made
//! once per process; `hypercall::decode`, `page_runs` and `panic_strings`
//! checked on their own alongside.
//!
//! The dispatcher returns `Ok` or a typed error and never panics; every
//! range the decoder lets through lies in guest memory the guest may use,
//! and guest memory is reached only through `GuestMemory`, whose bounds
//! checks keep it inside the mapping (an access beyond would fault).

#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use snowflock_abi::{IMAGE_BASE, PAGE_SIZE, PanicReport, nr};
use snowflock_fuzz::GUEST_MEMORY;
use snowflock_guest::images::{HELLO, LINUX_PERSONALITY, SYSCALLS};
use snowflock_vmm::boot::GuestLayout;
use snowflock_vmm::hypercall::{self, GuestRange, Hypercall};
use snowflock_vmm::{KvmHypervisor, Machine, MachineConfig, MachineError, Regs};

/// Where the fuzzer's bytes go in guest memory: the heap's top megabyte.
fn payload_addr(layout: &GuestLayout) -> u64 {
    layout.guard_start() - (1 << 20)
}

/// `SLEEP_NS` really sleeps; a fuzzer cannot wait 10 ms per input.
const MAX_FUZZ_SLEEP_NS: u64 = 1_000;

struct Vms {
    flock: Machine,
    linux: Machine,
}

fn boot(hv: &KvmHypervisor, image: &[u8]) -> Machine {
    let config = MachineConfig {
        mem_size: GUEST_MEMORY,
        console: Arc::new(|_: &[u8]| {}),
        personality: Some(LINUX_PERSONALITY.into()),
        ..MachineConfig::default()
    };
    Machine::boot(hv, image, &config).expect("the fuzz target's VM boots")
}

thread_local! {
    static VMS: RefCell<Vms> = RefCell::new({
        let hv = KvmHypervisor::open().expect("KVM for the hypercall fuzz target");
        Vms {
            flock: boot(&hv, HELLO),
            linux: boot(&hv, SYSCALLS),
        }
    });
}

/// A hypercall number: mostly one the VMM knows.
#[derive(Debug, Arbitrary)]
enum Number {
    Known(u8),
    Raw(u32),
}

/// A register argument.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Arg {
    Raw(u64),
    /// An address in the payload.
    Payload(u16),
    /// A length.
    Small(u16),
}

/// A piece of the payload written to guest memory.
#[derive(Debug, Arbitrary)]
enum Piece<'a> {
    Bytes(&'a [u8]),
    /// A page run (`PageRun`) of heap pages counted down from the payload.
    HeapRun {
        below: u16,
        pages: u8,
    },
    /// A pointer into the payload and a length (`PanicReport`, `HostFileRequest`).
    Pointer {
        offset: u16,
        len: u16,
    },
}

#[derive(Debug, Arbitrary)]
struct Call<'a> {
    linux: bool,
    number: Number,
    /// The `out`'s width; a hypercall is a 4-byte `out`.
    wide: Option<u8>,
    args: [Arg; 4],
    payload: Vec<Piece<'a>>,
}

const KNOWN: [u32; 17] = [
    nr::CONSOLE_WRITE,
    nr::EXIT,
    nr::PANIC,
    nr::REQUEST_TICKET,
    nr::CLONE,
    nr::CHECKPOINT,
    nr::CREATE_CLONES,
    nr::CHILD_EXIT,
    nr::JOIN,
    nr::CHILD_RESULT,
    nr::KILL,
    nr::TIME_NS,
    nr::REPORT_PAGES,
    nr::SET_FS_BASE,
    nr::CLOCKS,
    nr::SLEEP_NS,
    nr::HOST_FILE,
];

fn payload(pieces: &[Piece<'_>], base: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for piece in pieces {
        match *piece {
            Piece::Bytes(b) => bytes.extend_from_slice(b),
            Piece::HeapRun { below, pages } => {
                let start = base.wrapping_sub((u64::from(below) + 1) * PAGE_SIZE);
                bytes.extend_from_slice(&start.to_le_bytes());
                bytes.extend_from_slice(&(u64::from(pages) * PAGE_SIZE).to_le_bytes());
            }
            Piece::Pointer { offset, len } => {
                bytes.extend_from_slice(&(base + u64::from(offset)).to_le_bytes());
                bytes.extend_from_slice(&u64::from(len).to_le_bytes());
            }
        }
    }
    bytes.truncate(1 << 16);
    bytes
}

fn check_range(layout: &GuestLayout, range: GuestRange) {
    assert!(
        range.len == 0
            || range
                .addr
                .checked_add(range.len)
                .is_some_and(|end| end <= layout.mem_size),
        "{range:?} passed but is outside guest memory"
    );
}

/// Checks every range a decoded call carries.
fn check_decoded(layout: &GuestLayout, call: &Hypercall) {
    match *call {
        Hypercall::ConsoleWrite { data: r }
        | Hypercall::Panic { report: r }
        | Hypercall::ChildExit { result: r }
        | Hypercall::ChildResult { buf: r, .. }
        | Hypercall::HostFile { request: r, .. }
        | Hypercall::ReportPages { runs: r, .. } => check_range(layout, r),
        _ => {}
    }
}

fuzz_target!(|call: Call<'_>| {
    VMS.with_borrow_mut(|vms| {
        let machine = if call.linux {
            &mut vms.linux
        } else {
            &mut vms.flock
        };
        let mut layout = GuestLayout::new(GUEST_MEMORY).expect("a valid layout");
        layout.personality = call.linux;
        let base = payload_addr(&layout);
        let bytes = payload(&call.payload, base);
        machine
            .memory()
            .write(base, &bytes)
            .expect("the payload fits guest memory");

        let number = match call.number {
            Number::Known(i) => KNOWN[usize::from(i) % KNOWN.len()],
            Number::Raw(n) => n,
        };
        let [a0, a1, a2, a3] = call.args.map(|arg| match arg {
            Arg::Raw(value) => value,
            Arg::Payload(offset) => base + u64::from(offset),
            Arg::Small(value) => u64::from(value),
        });
        let a0 = if number == nr::SLEEP_NS {
            a0.min(MAX_FUZZ_SLEEP_NS)
        } else {
            a0
        };
        let regs = Regs {
            rax: u64::from(number),
            rdi: a0,
            rsi: a1,
            r8: a2,
            r9: a3,
            rip: IMAGE_BASE,
            rsp: layout.mem_size - 64,
            rflags: 0x202,
            ..Regs::default()
        };
        let decoded = hypercall::decode(number, &regs, &layout);
        if let Ok(decoded) = &decoded {
            check_decoded(&layout, decoded);
        }
        let heap = IMAGE_BASE..layout.guard_start();
        if let Ok(runs) = hypercall::page_runs(&bytes, heap.clone()) {
            let mut previous_end = None;
            for (start, pages) in runs {
                assert!(pages > 0, "an empty run");
                assert!(
                    previous_end.is_none_or(|end| start > end),
                    "runs unsorted, overlapping or not merged"
                );
                assert!(start * PAGE_SIZE >= heap.start && (start + pages) * PAGE_SIZE <= heap.end);
                previous_end = Some(start + pages);
            }
        }
        if let Some(report) = bytes.first_chunk::<{ size_of::<PanicReport>() }>()
            && let Ok((message, file, _, _)) = hypercall::panic_strings(report, &layout)
        {
            check_range(&layout, message);
            check_range(&layout, file);
        }

        let size = call.wide.unwrap_or(4);
        let served = machine.serve_hypercall(&regs, size, number);
        match (&decoded, &served) {
            (_, Err(MachineError::BadHypercall { .. })) => {}
            (Err(error), _) if size == 4 => {
                panic!("decode refused ({error}) but the dispatcher served: {served:?}")
            }
            _ => {}
        }
    });
});
