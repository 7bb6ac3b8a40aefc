//! The guest/VMM binary interface: ports, hypercall numbers, memory map and
//! the structures the two sides exchange. `docs/hypercalls.md` is the prose
//! version of this file; both change together, and `ABI_VERSION` with them.
//! The guest SDK (`snowflock-guest`, a `no_std` workspace of its own) and the
//! host crates (`vmm`, `control`) depend on this crate alone for the ABI.
#![cfg_attr(not(test), no_std)]

/// Bumped on any incompatible change to this crate.
pub const ABI_VERSION: u32 = 2;

/// `out dx, eax` to this port with the hypercall number in `eax` is a hypercall.
pub const HYPERCALL_PORT: u16 = 0x5f0;
/// Port used only by the VMM's own exception stubs (never by guest code).
pub const EXCEPTION_PORT: u16 = 0x5f1;

/// Guest pages are 4 KiB; the VMM maps guest memory with 2 MiB pages where it can.
pub const PAGE_SIZE: u64 = 4096;
/// Flock images are linked at this address; everything below it belongs to the VMM.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// The boot information page (user-readable, read-only). `rdi` points here at entry.
pub const BOOT_INFO_ADDR: u64 = 0x6_0000;
/// Size of the stack the VMM maps at the top of guest memory.
pub const STACK_SIZE: u64 = 8 << 20;
/// Unmapped gap between the heap and the stack, so an overflow faults.
pub const STACK_GUARD_SIZE: u64 = 2 << 20;
/// Smallest guest memory the VMM accepts.
pub const MIN_MEM_SIZE: u64 = 32 << 20;

/// `BootInfo::magic`: "SFBOOT01" little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"SFBOOT01");

/// What the VMM tells the guest at entry. Lives at [`BOOT_INFO_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    pub magic: u64,
    pub abi_version: u32,
    /// 0 for a VM started from an image; clones learn their own id from `clone`.
    pub reserved: u32,
    /// Bytes of guest memory, mapped identity from 0.
    pub mem_size: u64,
    /// First byte the allocator may use (page aligned, after the image's segments).
    pub heap_start: u64,
    /// One past the last byte the allocator may use.
    pub heap_end: u64,
    /// Initial stack pointer (16-byte aligned).
    pub stack_top: u64,
    /// TSC frequency in kHz as the host measured it (0 if unknown).
    pub tsc_khz: u64,
    /// The image's argument string (UTF-8, space-separated `key=value` by
    /// convention), inside the boot information page.
    pub cmdline_ptr: u64,
    pub cmdline_len: u64,
}
const _: () = assert!(core::mem::size_of::<BootInfo>() == 72);

/// Longest argument string the boot information page holds.
pub const MAX_CMDLINE: u64 = 3072;

/// Hypercall numbers (`eax`). Arguments go in `rdi`, `rsi`, `r8`, `r9`;
/// results come back in `rax` (and `rdx` where noted).
pub mod nr {
    /// `(ptr, len) -> len`: write bytes to the VM console.
    pub const CONSOLE_WRITE: u32 = 1;
    /// `(code) -> !`: end this VM (a child that calls it fails with that code).
    pub const EXIT: u32 = 2;
    /// `(info: *const PanicReport) -> !`: report a guest panic and end the VM.
    pub const PANIC: u32 = 3;
    /// `(n, flags) -> rax: ticket id, rdx: granted m <= n`; `flags` from
    /// [`ticket`](super::ticket) (0: none).
    pub const REQUEST_TICKET: u32 = 4;
    /// `(ticket) -> 0 in the parent, 1..=m in each child`.
    pub const CLONE: u32 = 5;
    /// `() -> rax: 0 in the parent, 1..=m in children later created from it; rdx: checkpoint id`.
    pub const CHECKPOINT: u32 = 6;
    /// `(checkpoint, ticket) -> 0`: children resume at the `CHECKPOINT` call.
    pub const CREATE_CLONES: u32 = 7;
    /// `(ptr, len) -> !`: a child ends, handing `len` result bytes to its parent.
    pub const CHILD_EXIT: u32 = 8;
    /// `(ticket) -> m`: wait until every child of the ticket has ended.
    pub const JOIN: u32 = 9;
    /// `(ticket, child, buf, cap) -> rax: ChildStatus, rdx: full length of the payload`.
    /// Copies `min(len, cap)` bytes of the result (or failure text) to `buf`.
    pub const CHILD_RESULT: u32 = 10;
    /// `(ticket) -> number of children that were still running and are now killed`.
    pub const KILL: u32 = 11;
    /// `() -> host monotonic clock in nanoseconds`.
    pub const TIME_NS: u32 = 12;
    /// `(runs: *const PageRun, count, kind: PageReportKind) -> 0`: tells the
    /// VMM which heap pages hold nothing worth copying (see [`PageReportKind`]).
    pub const REPORT_PAGES: u32 = 13;
    /// `(base) -> 0`: sets the FS segment base (a Linux-ABI guest's
    /// `arch_prctl(ARCH_SET_FS)`; `base` must be canonical).
    pub const SET_FS_BASE: u32 = 14;
    /// `() -> rax: host monotonic ns, rdx: host real time in ns since the Unix epoch`.
    pub const CLOCKS: u32 = 15;
    /// `(ns) -> 0`: sleeps `min(ns, MAX_SLEEP_NS)` (a longer sleep is a loop).
    pub const SLEEP_NS: u32 = 16;
    /// `(op, request: *const HostFileRequest) -> rax (rdx)`: a Linux-ABI
    /// guest's access to host files, see [`linux::files`].
    pub const HOST_FILE: u32 = 17;
}

/// Longest sleep one `SLEEP_NS` takes, so that a sleeping VM can still be
/// paused for a capture promptly.
pub const MAX_SLEEP_NS: u64 = 10_000_000;

/// Linux-ABI guests: a static Linux executable run next to the personality
/// (`snowflock-linux`), which serves its system calls inside the guest.
///
/// The VMM loads the personality at [`PERSONALITY_BASE`](linux::PERSONALITY_BASE),
/// the program at its own addresses, builds the program's initial stack
/// (arguments, environment, auxiliary vector) and writes a
/// [`LinuxStart`](linux::LinuxStart) at [`START_ADDR`](linux::START_ADDR). A
/// `syscall` enters a CPL0 stub that reports it on [`SYSCALL_TRAP_PORT`](linux::SYSCALL_TRAP_PORT);
/// the VMM then enters the personality's syscall entry at CPL3 as if the
/// site had called it, and the personality rewrites the site into
/// `call *%rax`, which lands in the sled at address `rax` (page 0) and
/// reaches the entry without an exit from then on.
pub mod linux {
    /// `out imm8, al` from the syscall stub (CPL0): a port below 0x100.
    pub const SYSCALL_TRAP_PORT: u16 = 0xf5;
    /// The personality is linked here and must end by [`PERSONALITY_END`].
    pub const PERSONALITY_BASE: u64 = 0x10_0000;
    pub const PERSONALITY_END: u64 = 0x20_0000;
    /// Page 0 holds this many one-byte `nop`s, then a jump to the syscall
    /// entry: a patched site's `call *%rax` with `rax` = the system call
    /// number lands in them. Larger numbers are not patched.
    pub const SYSCALL_SLED_LEN: u64 = 512;
    /// The personality's symbol the sled and the trap enter.
    pub const SYSCALL_ENTRY_SYMBOL: &str = "sf_linux_syscall_entry";
    /// Where the VMM writes [`LinuxStart`] (user-readable, read-only).
    pub const START_ADDR: u64 = 0x6_1000;
    /// `LinuxStart::magic`: "SFLINUX1" little-endian.
    pub const START_MAGIC: u64 = u64::from_le_bytes(*b"SFLINUX1");
    /// Bytes at the top of the heap area kept for the personality's own heap.
    pub const PERSONALITY_HEAP: u64 = 8 << 20;

    /// What the VMM tells the personality about the program it loaded.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct LinuxStart {
        pub magic: u64,
        /// The program's entry point (load bias applied).
        pub program_entry: u64,
        /// The program's initial stack pointer: `argc`, `argv`, `envp`, auxv.
        pub initial_rsp: u64,
        /// First byte after the program's highest segment (page aligned): the initial break.
        pub brk_start: u64,
        /// The personality's own heap, `[personality_heap, heap_end)`.
        pub personality_heap: u64,
        /// One past the last byte of memory below the stack guard.
        pub heap_end: u64,
        /// The personality's syscall entry (what the sled jumps to).
        pub syscall_entry: u64,
        /// Lowest address of the program's stack area.
        pub stack_bottom: u64,
        /// [`START_STRACE`], [`START_NO_PATCH`].
        pub flags: u64,
    }
    const _: () = assert!(core::mem::size_of::<LinuxStart>() == 72);

    /// How the personality's line at a program's end that lists the system
    /// calls it made but the personality does not implement begins; each
    /// call follows as ` name (number) xcount`.
    pub const UNIMPLEMENTED_REPORT: &str = "sf-linux: unimplemented system calls:";

    /// `LinuxStart::flags`: print every system call with its result.
    pub const START_STRACE: u64 = 1;
    /// `LinuxStart::flags`: never patch a `syscall` site; every call traps
    /// to the VMM (for programs that checksum their code or keep data in
    /// the red zone across a system call).
    pub const START_NO_PATCH: u64 = 2;

    /// Host files: read-only mounts of host directories, and standard input.
    ///
    /// The VMM writes the mount table at [`MOUNTS_ADDR`](files::MOUNTS_ADDR)
    /// (user-readable, read-only): a `u64` count, then [`MountEntry`](files::MountEntry)s.
    /// The personality resolves a program's paths; a path under a mount goes
    /// to the VMM as the mount's index and a relative path (no `..`, no
    /// leading `/`), which the VMM opens beneath the mount's host directory
    /// (symlinks cannot leave it). Each request names its file: the VMM
    /// keeps no open-file state a clone would need.
    pub mod files {
        pub const MOUNTS_ADDR: u64 = 0x6_2000;
        pub const MAX_MOUNTS: u64 = 15;
        pub const MAX_GUEST_PATH: usize = 240;
        /// Longest relative path in a request.
        pub const MAX_PATH: u64 = 4096;

        /// `(mount, path, offset = STAT_NOFOLLOW or 0) -> 0`, a [`HostStat`]
        /// at `buf` (of a symlink itself with `STAT_NOFOLLOW`).
        pub const OP_STAT: u64 = 0;
        pub const STAT_NOFOLLOW: u64 = 1;
        /// `(mount, path, offset, buf, len) -> bytes read` (0 at the end).
        pub const OP_READ: u64 = 1;
        /// `(mount, path, offset = first entry, buf, len) -> rax: bytes
        /// written, rdx: the next entry`. Entries are `kind` (b'd', b'f',
        /// b'l', b'o'), the name, and a NUL byte.
        pub const OP_READDIR: u64 = 2;
        /// `(offset, buf, len) -> bytes read` from standard input (0: none or the end).
        pub const OP_STDIN: u64 = 3;
        /// `(path, offset, buf = data, len) -> 0`: writes a file of the
        /// guest's `/out` (path relative to it) into the VM's output
        /// directory, creating it (and its directories) at offset 0 (0
        /// without an output directory: nothing is kept).
        pub const OP_OUTPUT: u64 = 4;
        /// `(mount, path, buf, len) -> bytes`: the target of a symlink
        /// (as stored: following it is the personality's business, and
        /// never leaves the mount on the host).
        pub const OP_READLINK: u64 = 5;
        /// The private system call (not Linux's) by which a program asks the
        /// personality to flush its output and write `/out` to the host
        /// before it ends through the clone API (`sf_child_exit`).
        pub const SYSCALL_FINISH: u64 = 511;

        /// One entry of the mount table.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct MountEntry {
            /// Bytes of `path` used.
            pub len: u64,
            pub flags: u64,
            /// The guest path, absolute, without a trailing `/`.
            pub path: [u8; MAX_GUEST_PATH],
        }
        const _: () = assert!(core::mem::size_of::<MountEntry>() == 256);

        /// What a `HOST_FILE` call names.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct HostFileRequest {
            pub mount: u64,
            pub path_ptr: u64,
            pub path_len: u64,
            pub offset: u64,
            pub buf: u64,
            pub len: u64,
        }
        const _: () = assert!(core::mem::size_of::<HostFileRequest>() == 48);

        /// What `OP_STAT` writes.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct HostStat {
            pub size: u64,
            /// `st_mode`: file type and permissions.
            pub mode: u64,
            pub mtime_ns: u64,
            pub ino: u64,
            pub nlink: u64,
        }
        const _: () = assert!(core::mem::size_of::<HostStat>() == 40);
    }
}

/// `REQUEST_TICKET`'s flags: what the caller knows of the ticket's children.
pub mod ticket {
    /// The children will write much of the state they inherit: a clone on
    /// the parent's host gets memory of its own, a copy of the parent's made
    /// before it first runs, rather than a copy-on-write view, whose every
    /// first write to a page costs a hypervisor exit and a host fault.
    pub const CHILDREN_WRITE: u64 = 1;
    /// Every flag this ABI defines; any other bit is rejected.
    pub const KNOWN: u64 = CHILDREN_WRITE;
}

/// `CHILD_RESULT`'s status in `rax`.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildStatus {
    /// The child called `CHILD_EXIT`; the payload is its result.
    Exited = 0,
    /// The child faulted, panicked or misbehaved; the payload is the reason.
    Failed = 1,
    /// The parent killed it.
    Killed = 2,
    /// Its host went away (cross-host clones).
    Lost = 3,
}

impl ChildStatus {
    pub fn from_raw(raw: u64) -> Option<Self> {
        match raw {
            0 => Some(Self::Exited),
            1 => Some(Self::Failed),
            2 => Some(Self::Killed),
            3 => Some(Self::Lost),
            _ => None,
        }
    }
}

/// One run of whole guest pages in a `REPORT_PAGES` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRun {
    /// Guest address of the first page (page aligned).
    pub start: u64,
    /// Bytes: a non-zero multiple of [`PAGE_SIZE`].
    pub len: u64,
}
const _: () = assert!(core::mem::size_of::<PageRun>() == 16);

/// Most runs one `REPORT_PAGES` call may carry (a 64 KiB array).
pub const MAX_REPORT_RUNS: u64 = 4096;

/// What a `REPORT_PAGES` call says about its runs. Every run lies inside the
/// heap (`BootInfo::heap_start..heap_end`); the pages' contents do not matter
/// to the guest, so a clone need not receive them (it sees zeros instead).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageReportKind {
    /// The heap pages that are free right now. Replaces the VM's previous
    /// free report; only a `CLONE` or `CHECKPOINT` that is the VM's very next
    /// hypercall uses it (anything in between discards it).
    Free = 0,
    /// Pages a clone's allocator just handed out: whatever the clone point
    /// left in them will be overwritten, so they need not be fetched.
    Fresh = 1,
}

impl PageReportKind {
    pub fn from_raw(raw: u64) -> Option<Self> {
        match raw {
            0 => Some(Self::Free),
            1 => Some(Self::Fresh),
            _ => None,
        }
    }
}

/// Errors come back as `-errno` in `rax` (values in the top 4095 of `u64`).
pub mod errno {
    /// The caller may not do this (e.g. `CHILD_EXIT` from a VM that is not a clone).
    pub const EPERM: u64 = 1;
    /// No such ticket, checkpoint or child.
    pub const ENOENT: u64 = 2;
    /// The ticket was already used.
    pub const EBUSY: u64 = 16;
    /// An argument is out of range.
    pub const EINVAL: u64 = 22;
    /// The cluster could not run the clones it granted.
    pub const EAGAIN: u64 = 11;

    /// The raw `rax` value for `-errno`.
    pub const fn encode(errno: u64) -> u64 {
        errno.wrapping_neg()
    }

    /// `Some(errno)` when `rax` holds an error.
    pub const fn decode(rax: u64) -> Option<u64> {
        if rax > u64::MAX - 4095 {
            Some(rax.wrapping_neg())
        } else {
            None
        }
    }
}

/// Argument of `PANIC`: where and why the guest panicked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PanicReport {
    pub message_ptr: u64,
    pub message_len: u64,
    pub file_ptr: u64,
    pub file_len: u64,
    pub line: u32,
    pub column: u32,
}
const _: () = assert!(core::mem::size_of::<PanicReport>() == 40);

/// Longest console write, panic message or child result the VMM accepts.
pub const MAX_TRANSFER: u64 = 16 << 20;

/// The SDK's C header (`guest/include/snowflock.h`) must say what this crate says.
#[cfg(test)]
mod header_tests {
    use crate as abi;
    use crate::{ChildStatus, PageReportKind, errno, nr, ticket};

    fn define(name: &str) -> u64 {
        let header = include_str!("../../guest/include/snowflock.h");
        let line = header
            .lines()
            .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
            .unwrap_or_else(|| panic!("{name} not in snowflock.h"));
        let value = line
            .split_whitespace()
            .nth(2)
            .unwrap()
            .trim_end_matches(['U', 'L']);
        match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => value.parse(),
        }
        .unwrap_or_else(|_| panic!("{name}: cannot parse {value}"))
    }

    #[test]
    fn header_matches_abi() {
        let expect = [
            ("SF_ABI_VERSION", u64::from(abi::ABI_VERSION)),
            ("SF_HYPERCALL_PORT", u64::from(abi::HYPERCALL_PORT)),
            ("SF_EXCEPTION_PORT", u64::from(abi::EXCEPTION_PORT)),
            ("SF_PAGE_SIZE", abi::PAGE_SIZE),
            ("SF_IMAGE_BASE", abi::IMAGE_BASE),
            ("SF_BOOT_INFO_ADDR", abi::BOOT_INFO_ADDR),
            ("SF_STACK_SIZE", abi::STACK_SIZE),
            ("SF_STACK_GUARD_SIZE", abi::STACK_GUARD_SIZE),
            ("SF_MIN_MEM_SIZE", abi::MIN_MEM_SIZE),
            ("SF_BOOT_INFO_MAGIC", abi::BOOT_INFO_MAGIC),
            ("SF_MAX_CMDLINE", abi::MAX_CMDLINE),
            ("SF_MAX_TRANSFER", abi::MAX_TRANSFER),
            ("SF_NR_CONSOLE_WRITE", u64::from(nr::CONSOLE_WRITE)),
            ("SF_NR_EXIT", u64::from(nr::EXIT)),
            ("SF_NR_PANIC", u64::from(nr::PANIC)),
            ("SF_NR_REQUEST_TICKET", u64::from(nr::REQUEST_TICKET)),
            ("SF_NR_CLONE", u64::from(nr::CLONE)),
            ("SF_NR_CHECKPOINT", u64::from(nr::CHECKPOINT)),
            ("SF_NR_CREATE_CLONES", u64::from(nr::CREATE_CLONES)),
            ("SF_NR_CHILD_EXIT", u64::from(nr::CHILD_EXIT)),
            ("SF_NR_JOIN", u64::from(nr::JOIN)),
            ("SF_NR_CHILD_RESULT", u64::from(nr::CHILD_RESULT)),
            ("SF_NR_KILL", u64::from(nr::KILL)),
            ("SF_NR_TIME_NS", u64::from(nr::TIME_NS)),
            ("SF_NR_REPORT_PAGES", u64::from(nr::REPORT_PAGES)),
            ("SF_MAX_REPORT_RUNS", abi::MAX_REPORT_RUNS),
            ("SF_SYSCALL_FINISH", abi::linux::files::SYSCALL_FINISH),
            ("SF_PAGE_REPORT_FREE", PageReportKind::Free as u64),
            ("SF_PAGE_REPORT_FRESH", PageReportKind::Fresh as u64),
            ("SF_TICKET_CHILDREN_WRITE", ticket::CHILDREN_WRITE),
            ("SF_CHILD_EXITED", ChildStatus::Exited as u64),
            ("SF_CHILD_FAILED", ChildStatus::Failed as u64),
            ("SF_CHILD_KILLED", ChildStatus::Killed as u64),
            ("SF_CHILD_LOST", ChildStatus::Lost as u64),
            ("SF_EPERM", errno::EPERM),
            ("SF_ENOENT", errno::ENOENT),
            ("SF_EAGAIN", errno::EAGAIN),
            ("SF_EBUSY", errno::EBUSY),
            ("SF_EINVAL", errno::EINVAL),
        ];
        for (name, value) in expect {
            assert_eq!(define(name), value, "{name}");
        }
    }
}
