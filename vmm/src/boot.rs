//! Building the machine a flock image starts on: identity page tables, GDT,
//! IDT with exception stubs that report to the VMM, a TSS whose I/O bitmap
//! opens the hypercall port to CPL3, and the boot information page.
//!
//! Low memory (below `IMAGE_BASE`) belongs to the VMM and is not user-accessible,
//! except the read-only boot information page.

use snowflock_abi::linux::files::MOUNTS_ADDR;
use snowflock_abi::linux::{PERSONALITY_BASE, PERSONALITY_END, START_ADDR, SYSCALL_TRAP_PORT};
use snowflock_abi::{
    ABI_VERSION, BOOT_INFO_ADDR, BOOT_INFO_MAGIC, BootInfo, EXCEPTION_PORT, HYPERCALL_PORT,
    IMAGE_BASE, MAX_CMDLINE, MIN_MEM_SIZE, PAGE_SIZE, STACK_GUARD_SIZE, STACK_SIZE,
};

use crate::hypervisor::{LongModeEntry, Regs};
use crate::linux;
use crate::loader::{self, ImageKind, LoadError, LoadedImage};
use crate::memory::{GuestMemory, MemoryError};

/// Largest guest memory: one page-directory page per GiB must fit below the GDT.
pub const MAX_MEM_SIZE: u64 = 64 << 30;
const HUGE_PAGE: u64 = 2 << 20;

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
/// 4 KiB page table for the first 2 MiB, so page 0 can stay unmapped.
const LOW_PT: u64 = 0x3000;
const PD_BASE: u64 = 0x4000;
const GDT: u64 = 0x5_0000;
const IDT: u64 = 0x5_1000;
const TSS: u64 = 0x5_2000;
const STUBS: u64 = 0x5_3000;
/// The exception stack grows down from here to `STUBS + PAGE_SIZE`.
const EXCEPTION_STACK_TOP: u64 = 0x6_0000;
/// First and last VMM pages mapped (supervisor) in the low 2 MiB.
const VMM_PAGES: std::ops::Range<u64> = GDT..EXCEPTION_STACK_TOP;

const EXCEPTION_VECTORS: u64 = 32;
const STUB_SIZE: u64 = 16;
/// `LSTAR`: a CPL0 stub that reports a `syscall` on `SYSCALL_TRAP_PORT`
/// (`out imm8, al` keeps every register the system call passes).
pub(crate) const SYSCALL_STUB: u64 = STUBS + 0x400;
const _: () = assert!(STUBS + EXCEPTION_VECTORS * STUB_SIZE <= SYSCALL_STUB);

const KERNEL_CODE_SELECTOR: u16 = 0x08;
pub(crate) const USER_DATA_SELECTOR: u16 = 0x18 | 3;
pub(crate) const USER_CODE_SELECTOR: u16 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;
const GDT_ENTRIES: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // kernel code, 64-bit
    0x00cf_9300_0000_ffff, // kernel data
    0x00cf_f300_0000_ffff, // user data, DPL3
    0x00af_fb00_0000_ffff, // user code, 64-bit, DPL3
];

/// TSS: 104-byte header, then an I/O permission bitmap for ports
/// `0..IO_BITMAP_PORTS` and the mandatory trailing 0xff byte.
const TSS_HEADER: u64 = 104;
const IO_BITMAP_PORTS: u64 = 0x600;
const TSS_LIMIT: u32 = (TSS_HEADER + IO_BITMAP_PORTS / 8) as u32;
const _: () = assert!((HYPERCALL_PORT as u64) + 4 <= IO_BITMAP_PORTS);

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS: reserved bit 1 and IOPL=3 (PVM clears IOPL; the TSS bitmap is
/// what opens the port there, IOPL is what opens it on VT-x/AMD-V).
const RFLAGS_BOOT: u64 = 0x3002;
/// x87 | SSE | AVX.
const XCR0_BOOT: u64 = 0b111;

/// Why a VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "guest memory of {size:#x} bytes must be a multiple of 2 MiB between {MIN_MEM_SIZE:#x} and {MAX_MEM_SIZE:#x}"
    )]
    BadMemorySize { size: u64 },
    #[error("argument string is {len} bytes, more than {MAX_CMDLINE}")]
    CmdlineTooLong { len: usize },
    #[error("loading the image failed")]
    Load(#[from] LoadError),
    #[error("the program is a Linux-ABI program, and this VMM was given no personality to run it")]
    NoPersonality,
    #[error("loading the Linux personality failed")]
    Personality(#[source] LoadError),
    #[error("the Linux personality has no syscall entry symbol")]
    NoSyscallEntry,
    #[error("writing boot structures failed")]
    Memory(#[from] MemoryError),
}

/// Where things are in a guest of a given memory size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLayout {
    pub mem_size: u64,
    /// A Linux-ABI guest: the personality's pages are guest memory too.
    pub personality: bool,
}

impl GuestLayout {
    pub fn new(mem_size: u64) -> Result<Self, BootError> {
        if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem_size) || !mem_size.is_multiple_of(HUGE_PAGE)
        {
            return Err(BootError::BadMemorySize { size: mem_size });
        }
        Ok(Self {
            mem_size,
            personality: false,
        })
    }

    /// Lowest address of the stack.
    pub fn stack_bottom(&self) -> u64 {
        self.mem_size - STACK_SIZE
    }

    /// Start of the unmapped guard below the stack (= end of heap and image area).
    pub fn guard_start(&self) -> u64 {
        self.stack_bottom() - STACK_GUARD_SIZE
    }

    /// Whether `addr..addr+len` lies in memory the guest can access at CPL3
    /// (`writable`: the boot information page is read-only to the guest).
    pub fn is_guest_range(&self, addr: u64, len: u64, writable: bool) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let within = |lo: u64, hi: u64| addr >= lo && end <= hi;
        within(IMAGE_BASE, self.guard_start())
            || within(self.stack_bottom(), self.mem_size)
            || (self.personality && within(PERSONALITY_BASE, PERSONALITY_END))
            || (!writable && within(BOOT_INFO_ADDR, BOOT_INFO_ADDR + PAGE_SIZE))
    }

    /// Whether `addr` is in the guard gap below the stack.
    pub fn is_stack_guard(&self, addr: u64) -> bool {
        (self.guard_start()..self.stack_bottom()).contains(&addr)
    }
}

/// Loads `image` into fresh `memory` and builds everything around it.
/// A Linux-ABI program (see [`loader::kind`]) is started through
/// `personality`, with `cmdline`'s words as its `argv` and its system
/// calls treated as `flags` say. Returns the vCPU
/// entry state and the heap the guest's allocator owns (a flock image's).
pub fn setup(
    memory: &GuestMemory,
    image: &[u8],
    cmdline: &str,
    tsc_khz: Option<u64>,
    personality: Option<&[u8]>,
    flags: linux::LinuxFlags,
) -> Result<(LongModeEntry, LoadedImage), BootError> {
    let layout = GuestLayout::new(memory.size())?;
    if cmdline.len() as u64 > MAX_CMDLINE {
        return Err(BootError::CmdlineTooLong { len: cmdline.len() });
    }
    let kind = loader::kind(image)?;
    let (loaded, linux) = match kind {
        ImageKind::Flock => (loader::load(image, memory, layout.guard_start())?, None),
        ImageKind::Linux => {
            let personality = personality.ok_or(BootError::NoPersonality)?;
            let argv: Vec<&str> = cmdline.split_whitespace().collect();
            let boot = linux::setup(memory, &layout, image, personality, &argv, flags)?;
            let loaded = LoadedImage {
                entry: boot.start.program_entry,
                end: boot.start.brk_start,
            };
            (loaded, Some(boot))
        }
    };
    write_page_tables(memory, &layout, kind)?;
    write_descriptor_tables(memory)?;
    let cmdline_ptr = BOOT_INFO_ADDR + size_of::<BootInfo>() as u64;
    let info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        abi_version: ABI_VERSION,
        reserved: 0,
        mem_size: layout.mem_size,
        heap_start: loaded.end,
        heap_end: layout.guard_start(),
        stack_top: layout.mem_size,
        tsc_khz: tsc_khz.unwrap_or(0),
        cmdline_ptr,
        cmdline_len: cmdline.len() as u64,
    };
    memory.write(BOOT_INFO_ADDR, &boot_info_bytes(&info))?;
    memory.write(cmdline_ptr, cmdline.as_bytes())?;
    let regs = match &linux {
        None => Regs {
            rip: loaded.entry,
            rsp: layout.mem_size,
            rdi: BOOT_INFO_ADDR,
            rflags: RFLAGS_BOOT,
            ..Regs::default()
        },
        Some(boot) => Regs {
            rip: boot.personality_entry,
            rsp: boot.boot_rsp,
            rdi: BOOT_INFO_ADDR,
            rsi: START_ADDR,
            rflags: RFLAGS_BOOT,
            ..Regs::default()
        },
    };
    let entry = LongModeEntry {
        regs,
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG,
        cr3: PML4,
        cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE,
        efer: EFER_LME | EFER_LMA,
        gdt_base: GDT,
        gdt_limit: (8 * (GDT_ENTRIES.len() + 2) - 1) as u16,
        idt_base: IDT,
        idt_limit: (16 * EXCEPTION_VECTORS - 1) as u16,
        tss_base: TSS,
        tss_limit: TSS_LIMIT,
        tss_selector: TSS_SELECTOR,
        user_code_selector: USER_CODE_SELECTOR,
        user_data_selector: USER_DATA_SELECTOR,
        xcr0: XCR0_BOOT,
        syscall_entry: SYSCALL_STUB,
    };
    Ok((entry, loaded))
}

fn boot_info_bytes(info: &BootInfo) -> Vec<u8> {
    let fields = [
        info.magic,
        u64::from(info.abi_version) | (u64::from(info.reserved) << 32),
        info.mem_size,
        info.heap_start,
        info.heap_end,
        info.stack_top,
        info.tsc_khz,
        info.cmdline_ptr,
        info.cmdline_len,
    ];
    let bytes: Vec<u8> = fields.iter().flat_map(|f| f.to_le_bytes()).collect();
    debug_assert_eq!(bytes.len(), size_of::<BootInfo>());
    bytes
}

fn write_page_tables(
    memory: &GuestMemory,
    layout: &GuestLayout,
    kind: ImageKind,
) -> Result<(), MemoryError> {
    let table = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    memory.write_u64(PML4, PDPT | table)?;
    let gibs = layout.mem_size.div_ceil(1 << 30);
    for gib in 0..gibs {
        memory.write_u64(PDPT + gib * 8, (PD_BASE + gib * PAGE_SIZE) | table)?;
    }
    // The first 2 MiB: only the VMM's structures (supervisor) and the boot
    // information page (user, read-only) are mapped; page 0 stays a trap.
    memory.write_u64(PD_BASE, LOW_PT | table)?;
    for page in VMM_PAGES.step_by(PAGE_SIZE as usize) {
        memory.write_u64(
            LOW_PT + page / PAGE_SIZE * 8,
            page | PTE_PRESENT | PTE_WRITABLE,
        )?;
    }
    memory.write_u64(
        LOW_PT + BOOT_INFO_ADDR / PAGE_SIZE * 8,
        BOOT_INFO_ADDR | PTE_PRESENT | PTE_USER,
    )?;
    // Under PVM `syscall` enters LSTAR in the guest's user mode: the stub
    // page is user-readable (it holds only code; its `out`s are allowed at
    // CPL3 for the syscall port alone).
    memory.write_u64(
        LOW_PT + STUBS / PAGE_SIZE * 8,
        STUBS | PTE_PRESENT | PTE_USER,
    )?;
    if kind == ImageKind::Linux {
        // Page 0 (the syscall sled) and the start page, read-only; the
        // personality's own pages, writable.
        for page in [0, START_ADDR, MOUNTS_ADDR] {
            memory.write_u64(LOW_PT + page / PAGE_SIZE * 8, page | PTE_PRESENT | PTE_USER)?;
        }
        for page in (PERSONALITY_BASE..PERSONALITY_END).step_by(PAGE_SIZE as usize) {
            memory.write_u64(LOW_PT + page / PAGE_SIZE * 8, page | table)?;
        }
    }
    let user = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_HUGE;
    for addr in (HUGE_PAGE..layout.mem_size).step_by(HUGE_PAGE as usize) {
        if !layout.is_stack_guard(addr) {
            memory.write_u64(PD_BASE + addr / HUGE_PAGE * 8, addr | user)?;
        }
    }
    Ok(())
}

fn write_descriptor_tables(memory: &GuestMemory) -> Result<(), MemoryError> {
    for (i, entry) in GDT_ENTRIES.iter().enumerate() {
        memory.write_u64(GDT + 8 * i as u64, *entry)?;
    }
    // 64-bit TSS descriptor (16 bytes): base, limit, type 0xb (busy), present.
    let tss_low = u64::from(TSS_LIMIT & 0xffff)
        | ((TSS & 0xff_ffff) << 16)
        | (0x8b << 40)
        | ((u64::from(TSS_LIMIT) >> 16 & 0xf) << 48)
        | ((TSS >> 24 & 0xff) << 56);
    memory.write_u64(GDT + u64::from(TSS_SELECTOR), tss_low)?;
    memory.write_u64(GDT + u64::from(TSS_SELECTOR) + 8, TSS >> 32)?;

    // TSS: RSP0 for exceptions from CPL3, and the I/O bitmap.
    memory.write_u64(TSS + 4, EXCEPTION_STACK_TOP)?;
    memory.write(TSS + 102, &(TSS_HEADER as u16).to_le_bytes())?;
    let mut bitmap = vec![0xffu8; (IO_BITMAP_PORTS / 8 + 1) as usize];
    for port in (HYPERCALL_PORT..HYPERCALL_PORT + 4).chain([SYSCALL_TRAP_PORT]) {
        bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
    }
    memory.write(TSS + TSS_HEADER, &bitmap)?;

    // One interrupt gate and one stub per exception vector. Each stub reports
    // its vector on the exception port; the VMM ends the VM there.
    for vector in 0..EXCEPTION_VECTORS {
        let stub = STUBS + vector * STUB_SIZE;
        let gate_low = (stub & 0xffff)
            | (u64::from(KERNEL_CODE_SELECTOR) << 16)
            | (0x8e00 << 32)
            | ((stub >> 16 & 0xffff) << 48);
        memory.write_u64(IDT + vector * 16, gate_low)?;
        memory.write_u64(IDT + vector * 16 + 8, stub >> 32)?;
        let [port_lo, port_hi] = EXCEPTION_PORT.to_le_bytes();
        let code = [
            0xb8,
            vector as u8,
            0,
            0,
            0, // mov eax, vector
            0x66,
            0xba,
            port_lo,
            port_hi, // mov dx, EXCEPTION_PORT
            0xef,    // out dx, eax
            0xeb,
            0xfe, // jmp $
        ];
        memory.write(stub, &code)?;
    }
    let [trap_port, _] = SYSCALL_TRAP_PORT.to_le_bytes();
    memory.write(
        SYSCALL_STUB,
        &[
            0xe6, trap_port, // out SYSCALL_TRAP_PORT, al
            0xeb, 0xfe, // jmp $
        ],
    )?;
    Ok(())
}

/// The exception frame the CPU pushed, read back by the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExceptionFrame {
    pub vector: u8,
    pub error_code: Option<u64>,
    pub rip: u64,
    pub rsp: u64,
}

/// Vectors for which the CPU pushes an error code.
fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Reads the frame of exception `vector` at the exception stack pointer `rsp`.
pub fn read_exception_frame(
    memory: &GuestMemory,
    vector: u8,
    rsp: u64,
) -> Result<ExceptionFrame, MemoryError> {
    let mut at = rsp;
    let error_code = if has_error_code(vector) {
        at += 8;
        Some(memory.read_u64(rsp)?)
    } else {
        None
    };
    Ok(ExceptionFrame {
        vector,
        error_code,
        rip: memory.read_u64(at)?,
        rsp: memory.read_u64(at + 24)?,
    })
}

/// Human name of an exception vector.
pub fn exception_name(vector: u8) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "non-maskable interrupt",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection fault (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating-point error (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point exception (#XM)",
        20 => "virtualization exception (#VE)",
        21 => "control protection exception (#CP)",
        _ => "reserved exception",
    }
}
