//! Hollow clones on the real /dev/kvm: the guest's memory accesses fault
//! into the handler from kernel context (KVM resolving guest pages), which
//! is why the userfaultfd must not be user-mode-only.
//!
//! A hand-assembled flock image writes a pattern over 256 pages and asks to
//! be cloned; parent and clone then sum the pattern, read untouched pages,
//! write and read back a page the host marks fresh in the clone, and exit
//! with the sum.
//! The clone runs on hollow memory whose pages come from a server thread
//! reading the frozen image.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use snowflock_abi::{HYPERCALL_PORT, IMAGE_BASE, nr};
use snowflock_fault_handler::{
    AvoidMap, Family, FaultError, FaultHandler, FetchConfig, PAGE_SIZE, PageSource,
};
use snowflock_vmm::machine::{MachineConfig, PreparedVm, Request};
use snowflock_vmm::memory::{HostPages, MemoryImage};
use snowflock_vmm::populate::{PopulateAccess, Populated};
use snowflock_vmm::{KvmHypervisor, Machine, MachineError, Stop, VcpuKicker};

const MEM: u64 = 64 << 20;
/// The pattern: `PATTERN_PAGES` pages from here, two words in each.
const PATTERN: u64 = IMAGE_BASE + 0x10_0000;
const PATTERN_PAGES: u32 = 256;
/// Pages nobody wrote before the clone point (zero, avoided).
const UNTOUCHED: u64 = PATTERN + 0x20_0000;
/// A page the parent writes before the clone point and the host marks
/// fresh in the clone (as if the guest allocator had handed it out); the
/// guest writes it and reads it back.
const FRESH: u64 = UNTOUCHED + 0x10_0000;
const BOUND: Duration = Duration::from_secs(20);

/// A tiny x86-64 assembler for the instructions the image needs.
#[derive(Default)]
struct Code(Vec<u8>);

impl Code {
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    fn imm32(&mut self, opcode: &[u8], imm: u64) -> &mut Self {
        let imm = u32::try_from(imm).expect("imm32");
        self.bytes(opcode).bytes(&imm.to_le_bytes())
    }

    fn here(&self) -> usize {
        self.0.len()
    }

    /// `jne` back to `target`.
    fn jne(&mut self, target: usize) -> &mut Self {
        let rel = i8::try_from(target as isize - (self.here() as isize + 2)).expect("rel8");
        self.bytes(&[0x75, rel as u8])
    }

    /// Hypercall `number` with `edi` as set before.
    fn hypercall(&mut self, number: u32) -> &mut Self {
        self.imm32(&[0xb8], u64::from(number)) // mov eax, number
            .imm32(&[0xba], u64::from(HYPERCALL_PORT)) // mov edx, port
            .bytes(&[0xef]) // out dx, eax
    }

    /// The whole program.
    fn program() -> Self {
        let mut c = Self::default();
        // for rcx in 0..PATTERN_PAGES: [rbx] = [rbx + 0x800] = rcx * 0x1111 + 7
        c.imm32(&[0xb9], 0) // mov ecx, 0
            .imm32(&[0xbb], PATTERN); // mov ebx, PATTERN
        let fill = c.here();
        c.imm32(&[0x48, 0x69, 0xc1], 0x1111) // imul rax, rcx, 0x1111
            .bytes(&[0x48, 0x83, 0xc0, 0x07]) // add rax, 7
            .bytes(&[0x48, 0x89, 0x03]) // mov [rbx], rax
            .imm32(&[0x48, 0x89, 0x83], 0x800) // mov [rbx + 0x800], rax
            .imm32(&[0x48, 0x81, 0xc3], PAGE_SIZE) // add rbx, 4096
            .bytes(&[0x48, 0xff, 0xc1]) // inc rcx
            .imm32(&[0x48, 0x81, 0xf9], u64::from(PATTERN_PAGES)) // cmp rcx, N
            .jne(fill);
        // The fresh page holds data at the clone point.
        c.imm32(&[0x48, 0x89, 0x1c, 0x25], FRESH) // mov [FRESH], rbx
            .imm32(&[0xbf], 1)
            .hypercall(nr::CLONE); // clone(ticket 1)
        // r9 = sum of both words of every pattern page
        c.bytes(&[0x45, 0x31, 0xc9]) // xor r9d, r9d
            .imm32(&[0xb9], 0) // mov ecx, 0
            .imm32(&[0xbb], PATTERN); // mov ebx, PATTERN
        let sum = c.here();
        c.bytes(&[0x4c, 0x03, 0x0b]) // add r9, [rbx]
            .imm32(&[0x4c, 0x03, 0x8b], 0x800) // add r9, [rbx + 0x800]
            .imm32(&[0x48, 0x81, 0xc3], PAGE_SIZE) // add rbx, 4096
            .bytes(&[0x48, 0xff, 0xc1]) // inc rcx
            .imm32(&[0x48, 0x81, 0xf9], u64::from(PATTERN_PAGES)) // cmp rcx, N
            .jne(sum);
        // r9 += untouched pages (zeros), one word in each of 32 pages
        for page in 0..32 {
            c.imm32(&[0x4c, 0x03, 0x0c, 0x25], UNTOUCHED + page * 5 * PAGE_SIZE); // add r9, [abs]
        }
        // the fresh page: store r9, load it back
        c.imm32(&[0x4c, 0x89, 0x0c, 0x25], FRESH) // mov [abs], r9
            .imm32(&[0x4c, 0x8b, 0x0c, 0x25], FRESH); // mov r9, [abs]
        c.bytes(&[0x44, 0x89, 0xcf]) // mov edi, r9d
            .hypercall(nr::EXIT);
        c
    }
}

/// What the guest exits with.
fn expected_sum() -> i32 {
    let sum: u64 = (0..u64::from(PATTERN_PAGES))
        .map(|i| 2 * (i * 0x1111 + 7))
        .sum();
    i32::try_from(sum).expect("the sum fits an exit code")
}

/// A flock image: one RWX page at IMAGE_BASE holding `code`.
fn elf(code: &Code) -> Vec<u8> {
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
    let mut page = code.0.clone();
    assert!(page.len() <= PAGE_SIZE as usize);
    page.resize(PAGE_SIZE as usize, 0);
    elf.extend_from_slice(&page);
    elf
}

/// Serves pages of a frozen image from a thread of its own.
struct ImageServer {
    requests: Mutex<mpsc::Sender<Vec<u64>>>,
    seen: Mutex<Vec<u64>>,
}

impl PageSource for ImageServer {
    fn request(&self, _family: u64, pages: &[u64]) {
        self.seen.lock().unwrap().extend_from_slice(pages);
        let _ = self.requests.lock().unwrap().send(pages.to_vec());
    }
}

fn image_family(image: Arc<MemoryImage>, config: FetchConfig) -> (Arc<Family>, Arc<ImageServer>) {
    let (tx, rx) = mpsc::channel::<Vec<u64>>();
    let server = Arc::new(ImageServer {
        requests: Mutex::new(tx),
        seen: Mutex::new(Vec::new()),
    });
    let family = Family::new(0x4b, image.size(), server.clone(), config).unwrap();
    let weak: Weak<Family> = Arc::downgrade(&family);
    std::thread::spawn(move || {
        while let Ok(pages) = rx.recv() {
            let Some(family) = weak.upgrade() else { return };
            deliver_from_image(&family, &image, &pages);
        }
    });
    (family, server)
}

/// Reads `pages` from `image` and delivers them to `family`, as the
/// parent's memory server would.
fn deliver_from_image(family: &Family, image: &MemoryImage, pages: &[u64]) {
    let data: Vec<(u64, Vec<u8>)> = pages
        .iter()
        .map(|&p| {
            let mut buf = vec![0u8; PAGE_SIZE as usize];
            image.read(p * PAGE_SIZE, &mut buf).unwrap();
            (p, buf)
        })
        .collect();
    let batch: Vec<(u64, &[u8])> = data.iter().map(|(p, d)| (*p, d.as_slice())).collect();
    family.deliver_batch(&batch);
}

/// Runs `machine` on a thread of its own; kicks it out after [`BOUND`].
fn run_bounded(mut machine: Machine) -> (Machine, Result<Stop, MachineError>) {
    let kicker: Arc<dyn VcpuKicker> = machine.kicker();
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let stop = machine.run();
        let _ = tx.send(());
        (machine, stop)
    });
    if rx.recv_timeout(BOUND).is_err() {
        kicker.kick();
    }
    thread.join().unwrap()
}

/// Starts a hollow clone of `snapshot` served by `family`.
fn hollow_clone(
    hv: &KvmHypervisor,
    snapshot: &snowflock_vmm::machine::MachineSnapshot,
    family: &Arc<Family>,
) -> (Machine, FaultHandler, Arc<Mutex<Vec<FaultError>>>) {
    let prepared = PreparedVm::new(hv, MEM).expect("prepared VM");
    let mut clone = Machine::restore_hollow(
        hv,
        prepared,
        snapshot,
        family.cache().memfd(),
        Arc::new(|_: &[u8]| {}),
    )
    .expect("restore");
    let avoid = AvoidMap::new(
        MEM / PAGE_SIZE,
        snapshot.data_pages.runs(),
        snapshot.free_pages.runs(),
    )
    .unwrap();
    let failures = Arc::new(Mutex::new(Vec::new()));
    let (sink, kicker) = (failures.clone(), clone.kicker());
    // SAFETY: hollow memory is a private mapping of the family's whole
    // cache memfd that nothing touched (restoring wrote only vCPU and VM
    // state); the handler is closed
    // before the machine (and its memory) is dropped.
    let handler = unsafe {
        FaultHandler::start(
            family.clone(),
            clone.memory().host_addr(),
            MEM,
            avoid,
            Arc::new(move |e: &FaultError| {
                sink.lock().unwrap().push(e.clone());
                kicker.kick();
            }),
        )
    }
    .expect("fault handler");
    handler.mark_fresh(&[(FRESH / PAGE_SIZE, 1)]);
    clone.set_return(1, 0).unwrap();
    (clone, handler, failures)
}

/// Boots the test program and runs it to its clone call; returns the
/// stopped parent, its described snapshot and its frozen memory.
fn parent_at_clone_point(
    hv: &KvmHypervisor,
) -> (
    Machine,
    snowflock_vmm::machine::MachineSnapshot,
    Arc<MemoryImage>,
) {
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
    let parent = Machine::boot(hv, &elf(&Code::program()), &config).expect("boot");
    let (mut parent, stop) = run_bounded(parent);
    assert_eq!(stop.unwrap(), Stop::Request(Request::Clone { ticket: 1 }));
    let (mut snapshot, image) = parent.capture().expect("capture");
    snapshot.describe_memory(&image).unwrap();
    (parent, snapshot, image)
}

#[test]
fn hollow_kvm_clones_fault_in_their_memory() {
    let hv = KvmHypervisor::open().expect("KVM must be available for this test");
    let (mut parent, snapshot, image) = parent_at_clone_point(&hv);
    let data_pages: u64 = snapshot.data_pages.runs().iter().map(|r| r.1).sum();
    parent.reply(0, 0).unwrap();
    let (_parent, stop) = run_bounded(parent);
    assert_eq!(
        stop.unwrap(),
        Stop::Exited(expected_sum()),
        "the parent's own result"
    );

    let (family, server) = image_family(
        image,
        FetchConfig {
            fetch_timeout: Duration::from_secs(5),
            prefetch_pages: 8,
            fault_around_pages: 0,
            huge_blocks: false,
        },
    );
    let (clone, handler, failures) = hollow_clone(&hv, &snapshot, &family);
    let (clone, stop) = run_bounded(clone);
    let first = handler.stats();
    assert_eq!(stop.unwrap(), Stop::Exited(expected_sum()), "{first:?}");
    assert!(failures.lock().unwrap().is_empty());
    assert!(handler.failure().is_none());
    let requested = server.seen.lock().unwrap().len() as u64;
    // The pattern at least, and never more than the image holds.
    assert!(first.pages_fetched >= u64::from(PATTERN_PAGES), "{first:?}");
    assert!(
        first.pages_fetched <= data_pages,
        "{first:?} of {data_pages}"
    );
    assert_eq!(requested, first.pages_fetched);
    assert!(first.avoided.zero >= 32, "{first:?}");
    assert!(first.avoided.fresh >= 1, "{first:?}");
    assert!(first.prefetched > 0, "{first:?}");
    drop(handler);
    drop(clone);

    // A second clone on this host finds every page in the cache it maps: the
    // kernel maps them on first touch, so its only userfaults are avoided
    // pages (zero-filled) and none is a cache hit or a fetch.
    let (clone, handler, failures) = hollow_clone(&hv, &snapshot, &family);
    let (clone, stop) = run_bounded(clone);
    let second = handler.stats();
    assert_eq!(stop.unwrap(), Stop::Exited(expected_sum()), "{second:?}");
    assert!(failures.lock().unwrap().is_empty());
    assert_eq!(second.pages_fetched, 0, "{second:?}");
    assert_eq!(second.cache_hits, 0, "{second:?}");
    assert!(second.faults < first.faults, "{second:?} vs {first:?}");
    assert_eq!(server.seen.lock().unwrap().len() as u64, requested);
    eprintln!(
        "KVM hollow clone: {} faults, {} fetched ({} prefetched), {} zero-filled; fetched faults p50 {} us p99 {} us. \
         Second clone: {} faults, {} cache hits, p50 {} us p99 {} us",
        first.faults,
        first.pages_fetched,
        first.prefetched,
        first.avoided.total(),
        first.fetch_latency.p50_us,
        first.fetch_latency.p99_us,
        second.faults,
        second.cache_hits,
        second.latency.p50_us,
        second.latency.p99_us
    );
    drop(handler);
    drop(clone);
}

#[test]
fn a_kvm_clone_whose_pages_stop_coming_is_released() {
    struct Silent;
    impl PageSource for Silent {
        fn request(&self, _family: u64, _pages: &[u64]) {}
    }
    let hv = KvmHypervisor::open().expect("KVM must be available for this test");
    let (_parent, snapshot, _image) = parent_at_clone_point(&hv);
    let family = Family::new(
        0x4c,
        MEM,
        Arc::new(Silent),
        FetchConfig {
            fetch_timeout: Duration::from_millis(300),
            prefetch_pages: 0,
            fault_around_pages: 0,
            huge_blocks: false,
        },
    )
    .unwrap();
    let (clone, handler, failures) = hollow_clone(&hv, &snapshot, &family);
    // The vCPU waits in the kernel for its first page, the request times
    // out, on_failure kicks the vCPU and the unregistered memory lets its
    // fault complete: the run returns (kicked, or stopped by the zeros it
    // ran on) well before the test's bound instead of hanging.
    let began = std::time::Instant::now();
    let (clone, stop) = run_bounded(clone);
    assert!(began.elapsed() < BOUND / 2, "{:?}", began.elapsed());
    let failure = handler.failure().expect("the clone failed");
    assert!(matches!(failure, FaultError::Timeout { .. }), "{failure}");
    assert_eq!(*failures.lock().unwrap(), [failure]);
    assert!(!matches!(stop, Ok(Stop::Exited(_))), "{stop:?}");
    eprintln!("failed KVM clone stopped with {stop:?}");
    drop(handler);
    drop(clone);
}

/// A clone point whose family has pages in its cache that nobody asked
/// for, as a push would leave them.
struct PushedFamily {
    _parent: Machine,
    snapshot: snowflock_vmm::machine::MachineSnapshot,
    family: Arc<Family>,
    server: Arc<ImageServer>,
    /// The pages pushed: the first 64 pattern pages and the 32 untouched
    /// pages the guest reads, then 32 pages nobody touches, in 16-page
    /// windows of their own (the kernel maps up to 16 cached neighbours of
    /// a faulting page along with it, 64 KiB fault-around).
    pushed: Vec<u64>,
    /// How many of them the clone reads.
    read: u64,
}

fn pushed_family(hv: &KvmHypervisor) -> PushedFamily {
    let (parent, snapshot, image) = parent_at_clone_point(hv);
    let config = FetchConfig {
        fetch_timeout: Duration::from_secs(5),
        prefetch_pages: 0,
        fault_around_pages: 0,
        huge_blocks: false,
    };
    let (family, server) = image_family(image.clone(), config);
    let untouched = UNTOUCHED / PAGE_SIZE;
    let mut pushed: Vec<u64> = (0..64).map(|p| PATTERN / PAGE_SIZE + p).collect();
    pushed.extend((0..32).map(|k| untouched + 5 * k));
    let read = pushed.len() as u64;
    pushed.extend(untouched + 192..untouched + 224);
    deliver_from_image(&family, &image, &pushed);
    PushedFamily {
        _parent: parent,
        snapshot,
        family,
        server,
        pushed,
        read,
    }
}

/// Bytes the kernel allocated for `family`'s cache memfd.
fn cache_bytes(family: &Family) -> u64 {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let fd = family.cache().memfd().as_raw_fd();
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .unwrap()
        .blocks()
        * 512
}

#[test]
fn pushed_pages_a_kvm_clone_touches_are_counted_as_used() {
    let hv = KvmHypervisor::open().expect("KVM must be available for this test");
    let PushedFamily {
        snapshot,
        family,
        server,
        pushed,
        read,
        ..
    } = pushed_family(&hv);
    assert_eq!(family.stats().pages_pushed, pushed.len() as u64);
    let (clone, handler, failures) = hollow_clone(&hv, &snapshot, &family);
    let (clone, stop) = run_bounded(clone);
    assert_eq!(stop.unwrap(), Stop::Exited(expected_sum()));
    assert!(failures.lock().unwrap().is_empty());
    assert!(
        server
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|p| !pushed.contains(p)),
        "a pushed page was requested"
    );
    handler.close();
    let stats = handler.stats();
    assert_eq!(stats.pages_pushed_used, read, "{stats:?}");
    assert_eq!(stats.pages_populated, 0);
    let pushed_after = family.stats().pages_pushed;
    assert_eq!(
        pushed_after,
        pushed.len() as u64,
        "fetched pages are no pushes"
    );
    drop(handler);
    drop(clone);
}

#[test]
fn populating_a_kvm_clone_maps_cached_pages_only() {
    let hv = KvmHypervisor::open().expect("KVM must be available for this test");
    let PushedFamily {
        snapshot,
        family,
        pushed,
        ..
    } = pushed_family(&hv);
    let allocated = cache_bytes(&family);
    assert_eq!(allocated, pushed.len() as u64 * PAGE_SIZE);
    let (clone, handler, failures) = hollow_clone(&hv, &snapshot, &family);
    let populator = clone.memory().populator().expect("a hollow view populates");
    assert!(populator.data_runs().is_err(), "a hollow view has no image");
    let runs = family.cache().present_runs();
    assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), pushed.len() as u64);
    for &(first, count) in &runs {
        handler.mark_populated(first, count);
        assert_eq!(
            populator
                .populate(first, count, PopulateAccess::Read)
                .unwrap(),
            Populated::Mapped
        );
    }
    // No hole was touched: the cache allocated nothing, and no fault came.
    assert_eq!(cache_bytes(&family), allocated);
    assert_eq!(handler.stats().faults, 0);
    let (clone, stop) = run_bounded(clone);
    assert_eq!(stop.unwrap(), Stop::Exited(expected_sum()));
    assert!(failures.lock().unwrap().is_empty());
    handler.close();
    let stats = handler.stats();
    assert_eq!(stats.pages_populated, pushed.len() as u64, "{stats:?}");
    // Populated pages the clone only read cannot be told from untouched ones.
    assert_eq!(stats.pages_pushed_used, 0, "{stats:?}");
    drop(handler);
    drop(clone);
}
