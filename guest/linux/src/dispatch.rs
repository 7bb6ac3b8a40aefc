//! The system call table: what each call does, in the guest.

use snowflock_guest::abi::BootInfo;
use snowflock_guest::abi::linux::LinuxStart;

use crate::clock::{self, Clock, Timespec};
use crate::console::Stream;
use crate::entry::Frame;
use crate::errno::{
    EAGAIN, EBADF, EINVAL, ENODEV, ENOENT, ENOSYS, ENOTTY, ESPIPE, SysResult, to_rax,
};
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
    stdout: Stream,
    stderr: Stream,
}

const STDIN: u64 = 0;
const STDOUT: u64 = 1;
const STDERR: u64 = 2;
const AT_EMPTY_PATH: u64 = 0x1000;
const S_IFIFO: u32 = 0o010_000;
const TIMER_ABSTIME: u64 = 1;
const CLOCK_REALTIME: u64 = 0;
const CLOCK_REALTIME_COARSE: u64 = 5;
const CLONE_THREAD: u64 = 0x1_0000;
const FUTEX_CMD_MASK: u64 = 0x7f;
const FUTEX_WAKE: u64 = 1;
const F_GETFD: u64 = 1;
const F_SETFD: u64 = 2;
const F_GETFL: u64 = 3;
const O_RDWR: u64 = 2;
const MAX_IOVECS: u64 = 1024;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const AT_PHDR: u64 = 3;
const AT_PHNUM: u64 = 5;

/// `struct stat` on x86-64.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Stat {
    dev: u64,
    ino: u64,
    nlink: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    pad: u32,
    rdev: u64,
    size: i64,
    blksize: i64,
    blocks: i64,
    times: [i64; 6],
    reserved: [i64; 3],
}
const _: () = assert!(size_of::<Stat>() == 144);

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
        let mut sites = Sites::new();
        for (start, end) in code_ranges(&user, start.initial_rsp) {
            sites.add_code(start, end);
        }
        Self {
            memory: Memory::new(start.brk_start, start.personality_heap),
            clock: Clock::new(boot.tsc_khz),
            sites,
            process: Process::new(),
            mem_size: boot.mem_size,
            user,
            stdout: Stream::default(),
            stderr: Stream::default(),
        }
    }

    fn write(&mut self, fd: u64, buf: u64, len: u64) -> SysResult {
        let bytes = self.user.bytes(buf, len)?;
        match fd {
            STDOUT => self.stdout.write(bytes),
            STDERR => self.stderr.write(bytes),
            _ => return Err(EBADF),
        }
        Ok(len)
    }

    fn exit(&mut self, status: u64) -> ! {
        self.stdout.flush();
        self.stderr.flush();
        self.process.exit(status)
    }

    fn writev(&mut self, fd: u64, iov: u64, count: u64) -> SysResult {
        if count > MAX_IOVECS {
            return Err(EINVAL);
        }
        let mut total = 0;
        for i in 0..count {
            let [base, len]: [u64; 2] = self.user.read(iov + 16 * i)?;
            total += self.write(fd, base, len)?;
        }
        Ok(total)
    }

    fn fstat(&self, fd: u64, buf: u64) -> SysResult {
        if fd > STDERR {
            return Err(EBADF);
        }
        // Standard streams are pipes to the console: libc buffers stdout fully.
        let stat = Stat {
            mode: S_IFIFO | 0o600,
            nlink: 1,
            blksize: 4096,
            ino: fd + 1,
            ..Stat::default()
        };
        self.user.write(buf, &stat)
    }

    fn newfstatat(&self, dirfd: u64, path: u64, buf: u64, flags: u64) -> SysResult {
        let empty = self.user.read::<u8>(path)? == 0;
        if empty && flags & AT_EMPTY_PATH != 0 {
            return self.fstat(dirfd, buf);
        }
        Err(ENOENT)
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

    fn mmap(&mut self, addr: u64, len: u64, flags: u64) -> SysResult {
        if flags & MAP_ANONYMOUS == 0 {
            return Err(ENODEV);
        }
        self.memory.map(addr, len, flags)
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
    if p.sites.arrive(frame.return_address, nr) == Arrival::Wild {
        panic!(
            "the program called address {nr:#x} from {:#x} (a null function pointer?)",
            frame.return_address
        );
    }
    to_rax(serve(p, nr, frame.args))
}

fn serve(p: &mut Personality, nr: u64, args: [u64; 6]) -> SysResult {
    let [a0, a1, a2, a3, _, _] = args;
    match nr {
        0 => match a0 {
            STDIN => Ok(0),
            STDOUT | STDERR => Err(EBADF),
            _ => Err(EBADF),
        },
        1 => p.write(a0, a1, a2),
        3 => {
            if a0 <= STDERR {
                Ok(0)
            } else {
                Err(EBADF)
            }
        }
        5 => p.fstat(a0, a1),
        8 | 17 | 18 => {
            if a0 <= STDERR {
                Err(ESPIPE)
            } else {
                Err(EBADF)
            }
        }
        9 => p.mmap(a0, a1, a3),
        10 => Ok(0),
        11 => p.memory.unmap(a0, a1),
        12 => Ok(p.memory.brk(a0)),
        13 => p.clear::<[u64; 4]>(a2),
        14 => p.clear::<u64>(a2),
        16 => {
            if a0 <= STDERR {
                Err(ENOTTY)
            } else {
                Err(EBADF)
            }
        }
        20 => p.writev(a0, a1, a2),
        24 => Ok(0),
        25 => p.memory.remap(a0, a1, a2, a3),
        28 => {
            if a2 == MADV_DONTNEED {
                p.memory.discard(a0, a1)
            } else {
                Ok(0)
            }
        }
        35 => p.sleep(1, 0, a0),
        39 | 186 => Ok(1),
        56 if a0 & CLONE_THREAD != 0 => Err(EAGAIN),
        56 | 57 | 58 | 59 | 435 => Err(ENOSYS),
        60 | 231 => p.exit(a0),
        63 => Process::uname(&p.user, a0),
        72 => match a1 {
            F_GETFD | F_SETFD if a0 <= STDERR => Ok(0),
            F_GETFL if a0 <= STDERR => Ok(O_RDWR),
            _ if a0 > STDERR => Err(EBADF),
            _ => Err(EINVAL),
        },
        79 => {
            let out = p.user.bytes_mut(a0, a1.min(2))?;
            if out.len() < 2 {
                Err(crate::errno::ERANGE)
            } else {
                out.copy_from_slice(b"/\0");
                Ok(2)
            }
        }
        89 | 267 | 257 | 2 => Err(ENOENT),
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
        97 => Process::prlimit(&p.user, a0, a1),
        99 => p.sysinfo(a0),
        102 | 104 | 107 | 108 | 110 => Ok(0),
        131 => p.clear::<[u64; 3]>(a1),
        158 => p.process.arch_prctl(&p.user, a0, a1),
        201 => {
            let secs = p.clock.now().real / 1_000_000_000;
            if a0 != 0 {
                p.user.write(a0, &secs)?;
            }
            Ok(secs)
        }
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
        228 => p.clock_gettime(a0, a1),
        229 => {
            if a1 != 0 {
                p.user.write(a1, &Timespec::from_ns(1))?;
            }
            Ok(0)
        }
        230 => p.sleep(a0, a1, a2),
        262 => p.newfstatat(a0, a1, a2, a3),
        273 => Ok(0),
        302 => Process::prlimit(&p.user, a1, a3),
        318 => p.getrandom(a0, a1),
        334 | 332 => Err(ENOSYS),
        _ => {
            p.process.unimplemented(nr);
            Err(ENOSYS)
        }
    }
}
