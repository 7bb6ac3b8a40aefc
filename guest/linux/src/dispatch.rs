//! The system call table: what each call does, in the guest.

use snowflock_guest::abi::BootInfo;
use snowflock_guest::abi::linux::LinuxStart;
use snowflock_guest::abi::linux::files::SYSCALL_FINISH;
use snowflock_guest::abi::linux::{START_NO_PATCH, START_STRACE};
use snowflock_guest::hypercall;

use crate::clock::{self, Clock, Timespec};
use crate::entry::Frame;
use crate::errno::{EAGAIN, EINVAL, ENODEV, ENOSYS, SysResult, to_rax};
use crate::files::{AT_FDCWD, AT_REMOVEDIR, AT_SYMLINK_NOFOLLOW, Env, Files};
use crate::memory::{MADV_DONTNEED, MAP_ANONYMOUS, Memory};
use crate::patch::{Arrival, Sites};
use crate::process::Process;
use crate::user::{DATA_START, UserMemory};

/// Everything the personality keeps for the program.
#[derive(Debug)]
pub(crate) struct Personality {
    user: UserMemory,
    memory: Memory,
    clock: Clock,
    sites: Sites,
    process: Process,
    mem_size: u64,
    files: Files,
    strace: bool,
}

const TIMER_ABSTIME: u64 = 1;
const CLOCK_REALTIME: u64 = 0;
const CLOCK_REALTIME_COARSE: u64 = 5;
const CLONE_THREAD: u64 = 0x1_0000;
const FUTEX_CMD_MASK: u64 = 0x7f;
const FUTEX_WAKE: u64 = 1;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const AT_PHDR: u64 = 3;
const AT_PHNUM: u64 = 5;

/// `struct sysinfo` on x86-64.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Sysinfo {
    uptime: i64,
    loads: [u64; 3],
    totalram: u64,
    freeram: u64,
    sharedram: u64,
    bufferram: u64,
    totalswap: u64,
    freeswap: u64,
    procs: u16,
    pad: [u16; 3],
    totalhigh: u64,
    freehigh: u64,
    mem_unit: u32,
    tail: [u32; 1],
}
const _: () = assert!(size_of::<Sysinfo>() == 112);

/// One program header (`Elf64_Phdr`).
#[repr(C)]
#[derive(Clone, Copy)]
struct ProgramHeader {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

impl Personality {
    pub(crate) fn new(boot: &BootInfo, start: &LinuxStart) -> Self {
        let user = UserMemory {
            data: DATA_START..start.personality_heap,
            stack: start.stack_bottom..boot.mem_size,
        };
        let mut clock = Clock::new(boot.tsc_khz);
        let mut sites = Sites::new(start.flags & START_NO_PATCH == 0);
        for (start, end) in code_ranges(&user, start.initial_rsp) {
            sites.add_code(start, end);
        }
        Self {
            memory: Memory::new(start.brk_start, start.personality_heap),
            sites,
            process: Process::new(),
            mem_size: boot.mem_size,
            files: Files::new(clock.now().real),
            strace: start.flags & START_STRACE != 0,
            clock,
            user,
        }
    }

    fn exit(&mut self, status: u64) -> ! {
        self.files.finish();
        self.process.exit(status)
    }

    fn clock_gettime(&mut self, clock_id: u64, out: u64) -> SysResult {
        let now = self.clock.now();
        let ns = match clock_id {
            CLOCK_REALTIME | CLOCK_REALTIME_COARSE => now.real,
            0..=11 => now.monotonic,
            _ => return Err(EINVAL),
        };
        self.user.write(out, &Timespec::from_ns(ns))
    }

    fn sleep(&mut self, clock_id: u64, flags: u64, request: u64) -> SysResult {
        let ns = self.user.read::<Timespec>(request)?.to_ns().ok_or(EINVAL)?;
        let ns = if flags & TIMER_ABSTIME != 0 {
            let now = self.clock.now();
            let now = if clock_id == CLOCK_REALTIME {
                now.real
            } else {
                now.monotonic
            };
            ns.saturating_sub(now)
        } else {
            ns
        };
        clock::sleep(&mut self.clock, ns);
        Ok(0)
    }

    fn getrandom(&self, buf: u64, len: u64) -> SysResult {
        let bytes = self.user.bytes_mut(buf, len)?;
        for chunk in bytes.chunks_mut(8) {
            let word = random_word().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        Ok(len)
    }

    fn sysinfo(&mut self, buf: u64) -> SysResult {
        let info = Sysinfo {
            uptime: (self.clock.now().monotonic / 1_000_000_000) as i64,
            totalram: self.mem_size,
            freeram: self.mem_size / 2,
            procs: 1,
            mem_unit: 1,
            ..Sysinfo::default()
        };
        self.user.write(buf, &info)
    }

    /// `mmap`: anonymous memory, or a private copy of a file's bytes (a
    /// shared mapping only read-only: writes to it could not reach the file).
    fn mmap(
        &mut self,
        addr: u64,
        len: u64,
        prot: u64,
        flags: u64,
        fd: u64,
        offset: u64,
    ) -> SysResult {
        const PROT_WRITE: u64 = 2;
        const MAP_SHARED: u64 = 1;
        if flags & MAP_ANONYMOUS != 0 {
            return self.memory.map(addr, len, flags);
        }
        if flags & MAP_SHARED != 0 && prot & PROT_WRITE != 0 {
            return Err(ENODEV);
        }
        if !offset.is_multiple_of(4096) {
            return Err(EINVAL);
        }
        let start = self.memory.map(addr, len, flags)?;
        let out = self.user.bytes_mut(start, len)?;
        if let Err(errno) = self.files.map_file(fd, offset, out) {
            let _ = self.memory.unmap(start, len);
            return Err(errno);
        }
        Ok(start)
    }

    fn clear<T: Copy + Default>(&self, addr: u64) -> SysResult {
        if addr != 0 {
            self.user.write(addr, &T::default())?;
        }
        Ok(0)
    }
}

/// The program's executable, read-only segments, from its program headers
/// (found through the auxiliary vector on its initial stack).
fn code_ranges(user: &UserMemory, initial_rsp: u64) -> impl Iterator<Item = (u64, u64)> {
    let auxv = (|| -> Result<(u64, u64), u64> {
        let argc: u64 = user.read(initial_rsp)?;
        let mut at = initial_rsp + 8 * (argc + 2);
        while user.read::<u64>(at)? != 0 {
            at += 8;
        }
        at += 8;
        let (mut phdr, mut phnum) = (0, 0);
        loop {
            let [key, value]: [u64; 2] = user.read(at)?;
            match key {
                0 => return Ok((phdr, phnum)),
                AT_PHDR => phdr = value,
                AT_PHNUM => phnum = value,
                _ => {}
            }
            at += 16;
        }
    })()
    .unwrap_or((0, 0));
    let (phdr, phnum) = auxv;
    (0..phnum.min(64)).filter_map(move |i| {
        let header: ProgramHeader = user
            .read(phdr + i * size_of::<ProgramHeader>() as u64)
            .ok()?;
        let code = header.kind == PT_LOAD && header.flags & PF_X != 0 && header.flags & PF_W == 0;
        code.then(|| (header.vaddr, header.vaddr + header.memsz))
    })
}

/// A random word: RDRAND where the CPU has it, else mixed from the TSC.
fn random_word() -> u64 {
    let cpu = core::arch::x86_64::__cpuid(1);
    if cpu.ecx & (1 << 30) != 0 {
        for _ in 0..10 {
            let mut value = 0u64;
            // SAFETY: the CPU reports RDRAND (CPUID.1:ECX bit 30).
            let ok = unsafe { core::arch::x86_64::_rdrand64_step(&mut value) };
            if ok == 1 {
                return value;
            }
        }
    }
    let mut x = snowflock_guest::time::cycles() ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Serves one system call; returns `rax`.
pub(crate) fn dispatch(p: &mut Personality, frame: &mut Frame) -> u64 {
    let nr = frame.nr;
    let arrival = p.sites.arrive(frame.return_address, nr);
    if arrival == Arrival::Wild {
        panic!(
            "the program called address {nr:#x} from {:#x} (a null function pointer?)",
            frame.return_address
        );
    }
    if !p.strace {
        return to_rax(serve(p, nr, frame.args));
    }
    let trapped = matches!(arrival, Arrival::Trap { .. });
    if matches!(nr, 60 | 231) {
        trace(nr, &frame.args, None, trapped);
    }
    let result = serve(p, nr, frame.args);
    trace(nr, &frame.args, Some(result), trapped);
    to_rax(result)
}

/// One `--strace` line: the call, its first arguments, and its result
/// (`None`: a call that does not return), straight to the console.
fn trace(nr: u64, args: &[u64; 6], result: Option<SysResult>, trapped: bool) {
    let name = crate::names::name(nr);
    let mut line = match name {
        Some(name) => alloc::format!("[strace] {name}("),
        None => alloc::format!("[strace] syscall_{nr}("),
    };
    let shown = args
        .iter()
        .take(4)
        .map(|a| alloc::format!("{a:#x}"))
        .collect::<alloc::vec::Vec<_>>()
        .join(", ");
    line.push_str(&shown);
    match result {
        None => line.push_str(") = ?"),
        Some(Ok(value)) => line.push_str(&alloc::format!(") = {value}")),
        Some(Err(errno)) => line.push_str(&alloc::format!(") = -{errno}")),
    }
    if matches!(nr, 56 | 57 | 58 | 59 | 435) && matches!(result, Some(Err(_))) {
        line.push_str(" (one process per VM: threads, fork and exec are not supported)");
    }
    if trapped {
        line.push_str(" [trapped]");
    }
    line.push('\n');
    hypercall::console_write(line.as_bytes());
}

/// The personality's parts a file call needs, borrowed apart from its files.
fn split(p: &mut Personality) -> (&mut Files, Env<'_>) {
    let now_ns = p.clock.now().real;
    (
        &mut p.files,
        Env {
            user: &p.user,
            memory: &mut p.memory,
            now_ns,
        },
    )
}

fn serve(p: &mut Personality, nr: u64, args: [u64; 6]) -> SysResult {
    let [a0, a1, a2, a3, a4, a5] = args;
    match nr {
        // Files.
        0 => p.files.read(&p.user, a0, a1, a2, None),
        1 => {
            let (files, mut env) = split(p);
            files.write(&mut env, a0, a1, a2, None)
        }
        2 => {
            let (files, mut env) = split(p);
            files.openat(&mut env, AT_FDCWD, a0, a1, a2)
        }
        257 => {
            let (files, mut env) = split(p);
            files.openat(&mut env, a0, a1, a2, a3)
        }
        3 => p.files.close(&mut p.memory, a0),
        4 => p.files.fstatat(&p.user, AT_FDCWD, a0, a1, 0),
        6 => p
            .files
            .fstatat(&p.user, AT_FDCWD, a0, a1, AT_SYMLINK_NOFOLLOW),
        5 => p.files.fstat(&p.user, a0, a1),
        262 => p.files.fstatat(&p.user, a0, a1, a2, a3),
        8 => p.files.lseek(a0, a1, a2),
        16 => p.files.ioctl(a0),
        7 | 271 => p.files.poll(&p.user, a0, a1),
        62 | 200 | 234 => {
            let (target, signal) = if nr == 234 { (a1, a2) } else { (a0, a1) };
            if signal != 0 {
                p.files.finish();
            }
            p.process.signal_self(target, signal)
        }
        17 => p.files.read(&p.user, a0, a1, a2, Some(a3)),
        18 => {
            let (files, mut env) = split(p);
            files.write(&mut env, a0, a1, a2, Some(a3))
        }
        19 | 20 => {
            let (files, mut env) = split(p);
            files.vectored(&mut env, a0, a1, a2, nr == 20)
        }
        40 => {
            let (files, mut env) = split(p);
            files.sendfile(&mut env, a0, a1, a2, a3)
        }
        21 => p.files.access(&p.user, AT_FDCWD, a0, a1),
        269 | 439 => p.files.access(&p.user, a0, a1, a2),
        32 => p.files.dup(a0, 0, false),
        33 => p.files.dup3(&mut p.memory, a0, a1, 0),
        292 if a0 == a1 => Err(EINVAL),
        292 => p.files.dup3(&mut p.memory, a0, a1, a2),
        72 => p.files.fcntl(a0, a1, a2),
        74 | 75 => p.files.check(a0),
        76 => {
            let now = p.clock.now().real;
            p.files.truncate(&p.user, &mut p.memory, a0, a1, now)
        }
        77 => {
            let now = p.clock.now().real;
            p.files.ftruncate(&mut p.memory, a0, a1, now)
        }
        79 => p.files.getcwd(&p.user, a0, a1),
        80 => p.files.chdir(&p.user, a0),
        81 => p.files.fchdir(a0),
        82 => p
            .files
            .renameat(&p.user, &mut p.memory, AT_FDCWD, a0, AT_FDCWD, a1),
        264 | 316 => p.files.renameat(&p.user, &mut p.memory, a0, a1, a2, a3),
        83 => {
            let now = p.clock.now().real;
            p.files.mkdirat(&p.user, AT_FDCWD, a0, a1, now)
        }
        258 => {
            let now = p.clock.now().real;
            p.files.mkdirat(&p.user, a0, a1, a2, now)
        }
        84 => p
            .files
            .unlinkat(&p.user, &mut p.memory, AT_FDCWD, a0, AT_REMOVEDIR),
        87 => p.files.unlinkat(&p.user, &mut p.memory, AT_FDCWD, a0, 0),
        263 => p.files.unlinkat(&p.user, &mut p.memory, a0, a1, a2),
        89 => p.files.readlinkat(&p.user, AT_FDCWD, a0, a1, a2),
        267 => p.files.readlinkat(&p.user, a0, a1, a2, a3),
        217 => p.files.getdents64(&p.user, a0, a1, a2),
        // Memory.
        9 => p.mmap(a0, a1, a2, a3, a4, a5),
        10 => Ok(0),
        11 => p.memory.unmap(a0, a1),
        12 => Ok(p.memory.brk(a0)),
        25 => p.memory.remap(a0, a1, a2, a3),
        28 => {
            if a2 == MADV_DONTNEED {
                p.memory.discard(a0, a1)
            } else {
                Ok(0)
            }
        }
        // Signals, as far as a single-threaded program needs them.
        13 => p.clear::<[u64; 4]>(a2),
        14 => p.clear::<u64>(a2),
        131 => p.clear::<[u64; 3]>(a1),
        // Time.
        35 => p.sleep(1, 0, a0),
        96 => {
            let now = p.clock.now().real;
            if a0 != 0 {
                p.user.write(
                    a0,
                    &[
                        (now / 1_000_000_000) as i64,
                        ((now / 1000) % 1_000_000) as i64,
                    ],
                )?;
            }
            Ok(0)
        }
        201 => {
            let secs = p.clock.now().real / 1_000_000_000;
            if a0 != 0 {
                p.user.write(a0, &secs)?;
            }
            Ok(secs)
        }
        228 => p.clock_gettime(a0, a1),
        229 => {
            if a1 != 0 {
                p.user.write(a1, &Timespec::from_ns(1))?;
            }
            Ok(0)
        }
        230 => p.sleep(a0, a1, a2),
        // The process.
        24 => Ok(0),
        39 | 186 => Ok(1),
        56 if a0 & CLONE_THREAD != 0 => Err(EAGAIN),
        56 | 57 | 58 | 59 | 435 => Err(ENOSYS),
        60 | 231 => p.exit(a0),
        SYSCALL_FINISH => {
            p.files.finish();
            Ok(0)
        }
        63 => Process::uname(&p.user, a0),
        97 => Process::prlimit(&p.user, a0, a1),
        302 => Process::prlimit(&p.user, a1, a3),
        99 => p.sysinfo(a0),
        102 | 104 | 107 | 108 | 110 => Ok(0),
        158 => p.process.arch_prctl(&p.user, a0, a1),
        157 => p.process.prctl(&p.user, a0, a1),
        202 => {
            if a1 & FUTEX_CMD_MASK == FUTEX_WAKE {
                Ok(0)
            } else {
                Err(EAGAIN)
            }
        }
        204 => {
            if a1 < 8 {
                Err(EINVAL)
            } else {
                p.user.write(a2, &1u64)?;
                Ok(8)
            }
        }
        218 => Ok(1),
        273 => Ok(0),
        318 => p.getrandom(a0, a1),
        332 => p.files.statx(&p.user, a0, a1, a2, a4),
        // Deliberately absent: rseq (glibc runs without it).
        334 => Err(ENOSYS),
        _ => {
            p.process.unimplemented(nr);
            Err(ENOSYS)
        }
    }
}
