//! `REPORT_PAGES` on the real /dev/kvm: a hand-assembled flock image makes
//! free and fresh reports, good and bad, around `CLONE` requests; the test
//! checks the return values, what the captures' snapshots say, the fresh
//! hook, the counters, and that a restored clone can report too.

use std::sync::{Arc, Mutex};

use snowflock_abi::{IMAGE_BASE, PAGE_SIZE, PageReportKind, errno, nr};
use snowflock_vmm::hypercall::HypercallError;
use snowflock_vmm::machine::{MachineConfig, PageReportStats, Request};
use snowflock_vmm::memory::HostPages;
use snowflock_vmm::{KvmHypervisor, Machine, MachineError, Stop};

const MEM: u64 = 64 << 20;
/// The image is one page of code and data; the heap starts right after it.
const HEAP: u64 = IMAGE_BASE + PAGE_SIZE;
const DATA: u64 = IMAGE_BASE + 0x800;
const RESULTS: u64 = IMAGE_BASE + 0xf00;

/// Two overlapping runs.
const BAD_RUNS: u64 = DATA;
/// Three runs in no order, two of them adjacent.
const GOOD_RUNS: u64 = DATA + 0x40;
const GOOD: [(u64, u64); 3] = [
    (HEAP + 0x10000, 0x3000),
    (HEAP + 0x4000, 0x1000),
    (HEAP + 0x5000, 0x2000),
];
/// What GOOD becomes as page runs: sorted, the adjacent ones merged.
const GOOD_PAGES: [(u64, u64); 2] = [(HEAP / PAGE_SIZE + 4, 3), (HEAP / PAGE_SIZE + 16, 3)];

/// A tiny x86-64 assembler for the few instructions the test image needs.
#[derive(Default)]
struct Code(Vec<u8>);

impl Code {
    fn mov32(&mut self, opcode: &[u8], imm: u64) -> &mut Self {
        self.0.extend_from_slice(opcode);
        self.0
            .extend_from_slice(&u32::try_from(imm).expect("imm32").to_le_bytes());
        self
    }

    /// `REPORT_PAGES(runs, count, kind)`, `rax` stored at `RESULTS + 8 * slot`.
    fn report(&mut self, runs: u64, count: u64, kind: u64, slot: u64) -> &mut Self {
        self.mov32(&[0xbf], runs) // mov edi, runs
            .mov32(&[0xbe], count) // mov esi, count
            .mov32(&[0x41, 0xb8], kind) // mov r8d, kind
            .call(nr::REPORT_PAGES)
            .mov32(&[0x48, 0x89, 0x04, 0x25], RESULTS + 8 * slot) // mov [abs], rax
    }

    /// Hypercall `number` with `rdi` as set before.
    fn call(&mut self, number: u32) -> &mut Self {
        self.mov32(&[0xb8], u64::from(number)) // mov eax, nr
            .mov32(&[0xba], 0x5f0) // mov edx, HYPERCALL_PORT
            .byte(0xef) // out dx, eax
    }

    fn clone(&mut self, ticket: u64) -> &mut Self {
        self.mov32(&[0xbf], ticket).call(nr::CLONE)
    }

    fn byte(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }
}

/// A flock image: one RWX segment (a page at IMAGE_BASE) holding `code`
/// and, at DATA, the run arrays.
fn image(code: &Code) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    assert!(code.0.len() <= (DATA - IMAGE_BASE) as usize);
    page[..code.0.len()].copy_from_slice(&code.0);
    let bad = [(HEAP + 0x4000, 0x2000), (HEAP + 0x5000, 0x1000)];
    let runs = |at: u64, runs: &[(u64, u64)]| -> Vec<(usize, u64)> {
        runs.iter()
            .enumerate()
            .flat_map(|(i, &(start, len))| {
                let off = (at - IMAGE_BASE) as usize + 16 * i;
                [(off, start), (off + 8, len)]
            })
            .collect()
    };
    for (off, word) in runs(BAD_RUNS, &bad)
        .into_iter()
        .chain(runs(GOOD_RUNS, &GOOD))
    {
        page[off..off + 8].copy_from_slice(&word.to_le_bytes());
    }
    let mut elf = vec![0u8; PAGE_SIZE as usize];
    let put = |elf: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        elf[off..off + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut elf, 0, b"\x7fELF\x02\x01\x01");
    put(&mut elf, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut elf, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut elf, 20, &1u32.to_le_bytes());
    put(&mut elf, 24, &IMAGE_BASE.to_le_bytes()); // e_entry
    put(&mut elf, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut elf, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut elf, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut elf, 56, &1u16.to_le_bytes()); // e_phnum
    put(&mut elf, 58, &64u16.to_le_bytes()); // e_shentsize
    put(&mut elf, 64, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut elf, 68, &7u32.to_le_bytes()); // RWX
    for (off, value) in [
        (72, PAGE_SIZE),  // p_offset
        (80, IMAGE_BASE), // p_vaddr
        (88, IMAGE_BASE), // p_paddr
        (96, PAGE_SIZE),  // p_filesz
        (104, PAGE_SIZE), // p_memsz
        (112, PAGE_SIZE), // p_align
    ] {
        put(&mut elf, off, &value.to_le_bytes());
    }
    elf.extend_from_slice(&page);
    elf
}

fn boot(code: &Code) -> (KvmHypervisor, Machine) {
    let hv = KvmHypervisor::open().expect("KVM must be available for these tests");
    let config = MachineConfig {
        mem_size: MEM,
        cmdline: String::new(),
        console: Arc::new(|_: &[u8]| {}),
        host_pages: HostPages::Base,
        personality: None,
        files: Default::default(),
        strace: false,
        trap_syscalls: false,
    };
    let machine = Machine::boot(&hv, &image(code), &config).expect("boot");
    (hv, machine)
}

fn results(machine: &Machine, slots: usize) -> Vec<u64> {
    (0..slots as u64)
        .map(|i| machine.memory().read_u64(RESULTS + 8 * i).unwrap())
        .collect()
}

fn expect_clone(machine: &mut Machine, ticket: u64) {
    match machine.run().expect("run") {
        Stop::Request(Request::Clone { ticket: t }) if t == ticket => {}
        other => panic!("expected CLONE({ticket}), got {other:?}"),
    }
}

const EINVAL: u64 = errno::encode(errno::EINVAL);
const FREE: u64 = PageReportKind::Free as u64;
const FRESH: u64 = PageReportKind::Fresh as u64;

#[test]
fn free_reports_reach_the_next_capture_only() {
    let mut code = Code::default();
    code.report(BAD_RUNS, 2, FREE, 0) // overlapping: -EINVAL
        .report(GOOD_RUNS, 3, FREE, 1)
        .clone(1) // capture 1: has the report
        .clone(2) // capture 2: the report was used up
        .report(GOOD_RUNS, 3, FREE, 2)
        .call(nr::TIME_NS) // any other hypercall discards the report
        .clone(3) // capture 3: nothing
        .report(GOOD_RUNS, 3, 7, 3) // unknown kind: -EINVAL
        .report(GOOD_RUNS, 4097, FREE, 4) // too many runs: -EINVAL
        .report(GOOD_RUNS, 3, FREE, 5)
        .call(nr::CHECKPOINT); // capture 4: has it
    code.mov32(&[0xbf], 0).call(nr::EXIT);
    let (_hv, mut vm) = boot(&code);

    let mut captured = Vec::new();
    for ticket in 1..=3 {
        expect_clone(&mut vm, ticket);
        let (snapshot, _image) = vm.capture().expect("capture");
        captured.push(snapshot.free_pages.runs().to_vec());
        vm.reply(0, 0).unwrap();
    }
    assert_eq!(vm.run().unwrap(), Stop::Request(Request::Checkpoint));
    let (snapshot, _image) = vm.capture().expect("capture");
    captured.push(snapshot.free_pages.runs().to_vec());
    vm.reply(0, 1).unwrap();
    assert_eq!(vm.run().unwrap(), Stop::Exited(0));

    assert_eq!(results(&vm, 6), [EINVAL, 0, 0, EINVAL, EINVAL, 0]);
    assert_eq!(
        captured,
        [GOOD_PAGES.to_vec(), vec![], vec![], GOOD_PAGES.to_vec()]
    );
    assert_eq!(
        vm.page_reports(),
        PageReportStats {
            free_reports: 3,
            free_runs: 6,
            free_pages: 18,
            free_reports_captured: 2,
            refused: 3,
            ..PageReportStats::default()
        }
    );
}

#[test]
fn fresh_reports_go_to_the_hook_in_a_restored_clone() {
    let mut code = Code::default();
    code.report(GOOD_RUNS, 3, FRESH, 0) // no hook yet: counted, ignored
        .clone(1)
        .report(GOOD_RUNS, 3, FRESH, 1)
        .report(BAD_RUNS, 2, FRESH, 2);
    code.mov32(&[0xbf], 0).call(nr::EXIT);
    let (hv, mut vm) = boot(&code);
    expect_clone(&mut vm, 1);
    let (snapshot, image) = vm.capture().expect("capture");
    assert!(snapshot.free_pages.runs().is_empty());
    assert_eq!(vm.page_reports().fresh_pages, 6);
    assert_eq!(vm.page_reports().fresh_pages_forwarded, 0);

    // The clone reads its heap range from the boot information page.
    let mut clone =
        Machine::restore(&hv, &snapshot, &image, Arc::new(|_: &[u8]| {})).expect("restore");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    clone.set_fresh_pages_hook(Arc::new(move |runs: &[(u64, u64)]| {
        sink.lock().unwrap().push(runs.to_vec());
    }));
    clone.set_return(1, 0).unwrap();
    assert_eq!(clone.run().unwrap(), Stop::Exited(0));
    assert_eq!(results(&clone, 3)[1..], [0, EINVAL]);
    assert_eq!(*seen.lock().unwrap(), [GOOD_PAGES.to_vec()]);
    let stats = clone.page_reports();
    assert_eq!(
        (
            stats.fresh_reports,
            stats.fresh_pages_forwarded,
            stats.refused
        ),
        (1, 6, 1),
        "{stats:?}"
    );
}

#[test]
fn a_run_array_outside_guest_memory_ends_the_vm() {
    let mut code = Code::default();
    code.report(MEM - 8, 1, FREE, 0);
    code.mov32(&[0xbf], 0).call(nr::EXIT);
    let (_hv, mut vm) = boot(&code);
    match vm.run() {
        Err(MachineError::BadHypercall {
            source: HypercallError::BadPointer { what, .. },
            ..
        }) => assert_eq!(what, "page run array"),
        other => panic!("expected a bad pointer, got {other:?}"),
    }
}
