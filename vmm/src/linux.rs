//! Starting a static Linux executable (a Linux-ABI guest): the personality
//! and the program loaded, page 0's syscall sled, the program's initial
//! stack (arguments, environment, auxiliary vector) and the [`LinuxStart`]
//! page the personality reads.
//!
//! The program's system calls are served by the personality inside the
//! guest. Its `syscall` instructions enter the CPL0 stub at `LSTAR`, which
//! reports on [`SYSCALL_TRAP_PORT`](snowflock_abi::linux::SYSCALL_TRAP_PORT);
//! the VMM enters the personality as if the site had called it
//! ([`trap_entry`]), and the personality patches the site so that later
//! calls go through the sled without an exit.

use goblin::elf::Elf;
use snowflock_abi::linux::{
    LinuxStart, PERSONALITY_BASE, PERSONALITY_END, PERSONALITY_HEAP, START_ADDR, START_MAGIC,
    START_NO_PATCH, START_STRACE, SYSCALL_ENTRY_SYMBOL, SYSCALL_SLED_LEN,
};
use snowflock_abi::{IMAGE_BASE, PAGE_SIZE};

use crate::boot::{BootError, GuestLayout};
use crate::loader::{self, LoadError, Placement, ProgramHeaders};
use crate::memory::{GuestMemory, MemoryError};

/// The environment a Linux-ABI program starts with.
const ENVIRONMENT: [&str; 3] = ["PATH=/usr/bin:/bin", "HOME=/", "LANG=C.UTF-8"];
const PLATFORM: &str = "x86_64";
/// `sysconf(_SC_CLK_TCK)`.
const CLOCK_TICKS: u64 = 100;
/// `jmp rel32`.
const JMP_REL32: u8 = 0xe9;
const NOP: u8 = 0x90;
const INT3: u8 = 0xcc;

/// How the personality treats the program's system calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinuxFlags {
    /// Print every call with its result.
    pub strace: bool,
    /// Never patch a site: every call traps to the VMM.
    pub trap_syscalls: bool,
}

/// Where the personality and the program went, and how the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinuxBoot {
    pub(crate) personality_entry: u64,
    /// The personality starts on the program's stack, below its initial frame.
    pub(crate) boot_rsp: u64,
    pub(crate) start: LinuxStart,
}

/// Loads `program` and `personality` into fresh `memory` and writes the
/// sled, the initial stack and [`LinuxStart`]. `argv[0]` is the program's name.
pub(crate) fn setup(
    memory: &GuestMemory,
    layout: &GuestLayout,
    program: &[u8],
    personality: &[u8],
    argv: &[&str],
    options: LinuxFlags,
) -> Result<LinuxBoot, BootError> {
    let syscall_entry = syscall_entry(personality)?;
    let (own, _) = loader::load_placed(
        personality,
        memory,
        &Placement {
            range: PERSONALITY_BASE..PERSONALITY_END,
            position_independent: false,
        },
    )
    .map_err(BootError::Personality)?;
    let heap_end = layout.guard_start();
    let personality_heap = heap_end - PERSONALITY_HEAP;
    let (loaded, headers) = loader::load_placed(
        program,
        memory,
        &Placement {
            range: IMAGE_BASE..personality_heap,
            position_independent: true,
        },
    )?;
    memory.write(0, &sled(syscall_entry))?;

    let random: [u8; 16] = rand_bytes();
    let auxv = auxiliary_vector(&headers, loaded.entry);
    let stack = initial_stack(layout.mem_size, argv, &ENVIRONMENT, &auxv, random);
    memory.write(stack.rsp, &stack.bytes)?;
    let start = LinuxStart {
        magic: START_MAGIC,
        program_entry: loaded.entry,
        initial_rsp: stack.rsp,
        brk_start: loaded.end,
        personality_heap,
        heap_end,
        syscall_entry,
        stack_bottom: layout.stack_bottom(),
        flags: if options.strace { START_STRACE } else { 0 }
            | if options.trap_syscalls {
                START_NO_PATCH
            } else {
                0
            },
    };
    memory.write(START_ADDR, &start_bytes(&start))?;
    Ok(LinuxBoot {
        personality_entry: own.entry,
        boot_rsp: (stack.rsp - 512) & !15,
        start,
    })
}

/// The [`LinuxStart`] a Linux-ABI guest's memory holds, `None` for a flock image.
pub(crate) fn read_start(memory: &GuestMemory) -> Result<Option<LinuxStart>, MemoryError> {
    let mut raw = [0u8; size_of::<LinuxStart>()];
    memory.read(START_ADDR, &mut raw)?;
    let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if word(0) != START_MAGIC {
        return Ok(None);
    }
    Ok(Some(LinuxStart {
        magic: word(0),
        program_entry: word(1),
        initial_rsp: word(2),
        brk_start: word(3),
        personality_heap: word(4),
        heap_end: word(5),
        syscall_entry: word(6),
        stack_bottom: word(7),
        flags: word(8),
    }))
}

fn start_bytes(start: &LinuxStart) -> Vec<u8> {
    [
        start.magic,
        start.program_entry,
        start.initial_rsp,
        start.brk_start,
        start.personality_heap,
        start.heap_end,
        start.syscall_entry,
        start.stack_bottom,
        start.flags,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect()
}

/// The personality's syscall entry, from its symbol table.
fn syscall_entry(personality: &[u8]) -> Result<u64, BootError> {
    let elf = Elf::parse(personality).map_err(|e| BootError::Personality(LoadError::Parse(e)))?;
    elf.syms
        .iter()
        .find(|sym| elf.strtab.get_at(sym.st_name) == Some(SYSCALL_ENTRY_SYMBOL))
        .map(|sym| sym.st_value)
        .filter(|entry| (PERSONALITY_BASE..PERSONALITY_END).contains(entry))
        .ok_or(BootError::NoSyscallEntry)
}

/// Page 0: `SYSCALL_SLED_LEN` `nop`s, a jump to the syscall entry, `int3` after it.
fn sled(syscall_entry: u64) -> Vec<u8> {
    let mut page = vec![INT3; PAGE_SIZE as usize];
    let len = SYSCALL_SLED_LEN as usize;
    page[..len].fill(NOP);
    let after_jump = SYSCALL_SLED_LEN + 5;
    // The entry lies in the low 2 MiB, so the displacement fits in 32 bits.
    let displacement = (syscall_entry as i64 - after_jump as i64) as i32;
    page[len] = JMP_REL32;
    page[len + 1..len + 5].copy_from_slice(&displacement.to_le_bytes());
    page
}

fn rand_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    // The kernel's CSPRNG never fails for 16 bytes after boot; zeros would
    // only weaken the program's stack protector, not break it.
    if getrandom::fill(&mut bytes).is_err() {
        tracing::warn!("no random bytes for AT_RANDOM");
    }
    bytes
}

/// The auxiliary vector, without the entries that point into the stack
/// (`AT_RANDOM`, `AT_PLATFORM`, `AT_EXECFN`), which [`initial_stack`] adds.
fn auxiliary_vector(headers: &ProgramHeaders, entry: u64) -> Vec<(u64, u64)> {
    // Linux's AT_HWCAP on x86-64 is CPUID.1:EDX.
    let hwcap = u64::from(std::arch::x86_64::__cpuid(1).edx);
    vec![
        (libc::AT_PHDR, headers.address),
        (libc::AT_PHENT, headers.entry_size),
        (libc::AT_PHNUM, headers.count),
        (libc::AT_PAGESZ, PAGE_SIZE),
        (libc::AT_BASE, 0),
        (libc::AT_FLAGS, 0),
        (libc::AT_ENTRY, entry),
        (libc::AT_UID, 0),
        (libc::AT_EUID, 0),
        (libc::AT_GID, 0),
        (libc::AT_EGID, 0),
        (libc::AT_HWCAP, hwcap),
        (libc::AT_HWCAP2, 0),
        (libc::AT_CLKTCK, CLOCK_TICKS),
        (libc::AT_SECURE, 0),
    ]
}

/// The top of a new process's stack, to be written at `rsp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InitialStack {
    pub(crate) rsp: u64,
    pub(crate) bytes: Vec<u8>,
}

/// Builds the stack Linux gives a new process below `stack_top`: `argc`,
/// the `argv` and `envp` pointer arrays (each ending in null), the
/// auxiliary vector (ending in `AT_NULL`), then the strings and the 16
/// random bytes. `rsp` is 16-byte aligned and points at `argc`.
pub(crate) fn initial_stack(
    stack_top: u64,
    argv: &[&str],
    envp: &[&str],
    auxv: &[(u64, u64)],
    random: [u8; 16],
) -> InitialStack {
    // Strings and random bytes, packed downward from the top (8 bytes of
    // zeros at the very top, as Linux leaves).
    let mut strings: Vec<u8> = Vec::new();
    let mut offsets_argv = Vec::with_capacity(argv.len());
    let mut offsets_envp = Vec::with_capacity(envp.len());
    let mut push = |bytes: &[u8], nul: bool| -> usize {
        let at = strings.len();
        strings.extend_from_slice(bytes);
        if nul {
            strings.push(0);
        }
        at
    };
    let random_at = push(&random, false);
    let platform_at = push(PLATFORM.as_bytes(), true);
    for arg in argv {
        offsets_argv.push(push(arg.as_bytes(), true));
    }
    for var in envp {
        offsets_envp.push(push(var.as_bytes(), true));
    }
    let strings_start = (stack_top - 8 - strings.len() as u64) & !15;
    let address = |offset: usize| strings_start + offset as u64;

    let mut auxv: Vec<(u64, u64)> = auxv.to_vec();
    auxv.push((libc::AT_RANDOM, address(random_at)));
    auxv.push((libc::AT_PLATFORM, address(platform_at)));
    if let Some(&first) = offsets_argv.first() {
        auxv.push((libc::AT_EXECFN, address(first)));
    }
    auxv.push((libc::AT_NULL, 0));

    let mut words: Vec<u64> = Vec::new();
    words.push(argv.len() as u64);
    words.extend(offsets_argv.iter().map(|&o| address(o)));
    words.push(0);
    words.extend(offsets_envp.iter().map(|&o| address(o)));
    words.push(0);
    for (key, value) in &auxv {
        words.push(*key);
        words.push(*value);
    }
    let rsp = (strings_start - 8 * words.len() as u64) & !15;

    let mut bytes = vec![0u8; (stack_top - rsp) as usize];
    for (i, word) in words.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
    let at = (strings_start - rsp) as usize;
    bytes[at..at + strings.len()].copy_from_slice(&strings);
    InitialStack { rsp, bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(stack: &InitialStack, address: u64) -> u64 {
        let at = (address - stack.rsp) as usize;
        u64::from_le_bytes(stack.bytes[at..at + 8].try_into().unwrap())
    }

    fn string(stack: &InitialStack, address: u64) -> String {
        let at = (address - stack.rsp) as usize;
        let end = stack.bytes[at..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8(stack.bytes[at..at + end].to_vec()).unwrap()
    }

    #[test]
    fn the_initial_stack_is_what_linux_gives_a_process() {
        let top = 0x4000_0000;
        let auxv = [(libc::AT_PAGESZ, 4096), (libc::AT_ENTRY, 0x401000)];
        let random = *b"0123456789abcdef";
        let stack = initial_stack(
            top,
            &["prog", "-x", "input"],
            &["A=1", "B=two"],
            &auxv,
            random,
        );
        assert_eq!(stack.rsp % 16, 0, "rsp 16-byte aligned at argc");
        assert_eq!(stack.rsp + stack.bytes.len() as u64, top);
        assert_eq!(word(&stack, stack.rsp), 3, "argc");
        let argv: Vec<String> = (0..3)
            .map(|i| string(&stack, word(&stack, stack.rsp + 8 + 8 * i)))
            .collect();
        assert_eq!(argv, ["prog", "-x", "input"]);
        assert_eq!(word(&stack, stack.rsp + 32), 0, "argv ends in null");
        let envp_at = stack.rsp + 40;
        assert_eq!(string(&stack, word(&stack, envp_at)), "A=1");
        assert_eq!(string(&stack, word(&stack, envp_at + 8)), "B=two");
        assert_eq!(word(&stack, envp_at + 16), 0, "envp ends in null");
        let mut at = envp_at + 24;
        let mut found = std::collections::HashMap::new();
        loop {
            let (key, value) = (word(&stack, at), word(&stack, at + 8));
            at += 16;
            if key == libc::AT_NULL {
                break;
            }
            found.insert(key, value);
        }
        assert_eq!(found[&libc::AT_PAGESZ], 4096);
        assert_eq!(found[&libc::AT_ENTRY], 0x401000);
        assert_eq!(string(&stack, found[&libc::AT_PLATFORM]), "x86_64");
        assert_eq!(string(&stack, found[&libc::AT_EXECFN]), "prog");
        let random_at = (found[&libc::AT_RANDOM] - stack.rsp) as usize;
        assert_eq!(&stack.bytes[random_at..random_at + 16], &random);
        assert_eq!(word(&stack, top - 8), 0, "the top 8 bytes stay zero");
    }

    #[test]
    fn the_sled_jumps_to_the_entry() {
        let entry = PERSONALITY_BASE + 0x1234;
        let page = sled(entry);
        assert!(page[..SYSCALL_SLED_LEN as usize].iter().all(|&b| b == NOP));
        let at = SYSCALL_SLED_LEN as usize;
        assert_eq!(page[at], JMP_REL32);
        let displacement = i32::from_le_bytes(page[at + 1..at + 5].try_into().unwrap());
        assert_eq!(
            (SYSCALL_SLED_LEN as i64 + 5 + i64::from(displacement)) as u64,
            entry
        );
        assert_eq!(page[at + 5], INT3);
    }
}
