//! Classic BPF programs in the form `tc filter ... bpf bytecode` reads: the instruction count,
//! then `code jt jf k` for each instruction, comma-separated. Instructions are made by one
//! constructor per kind, with the opcode fields named as in `linux/filter.h`.

use std::fmt::Write as _;

// Instruction classes.
const BPF_LD: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
// Load sizes.
const BPF_W: u16 = 0x00;
const BPF_B: u16 = 0x10;
// Load mode: the operand is an absolute offset into the packet.
const BPF_ABS: u16 = 0x20;
// Jump tests.
const BPF_JEQ: u16 = 0x10;
const BPF_JGE: u16 = 0x30;
// Source: the operand is the constant `k`.
const BPF_K: u16 = 0x00;

/// Start of the ancillary area: absolute loads from here read values the kernel supplies,
/// not packet bytes (`SKF_AD_OFF`, -0x1000 as an unsigned offset).
const SKF_AD_OFF: u32 = 0xffff_f000;
/// The ancillary value that is a fresh random number at each load.
const SKF_AD_RANDOM: u32 = 56;

/// One classic-BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Instruction {
    code: u16,
    /// Instructions skipped when a jump's test holds.
    jt: u8,
    /// Instructions skipped when it does not.
    jf: u8,
    k: u32,
}

impl Instruction {
    /// A = the byte at packet offset `offset`.
    pub(crate) fn ldb_abs(offset: u32) -> Instruction {
        Instruction::new(BPF_LD | BPF_B | BPF_ABS, 0, 0, offset)
    }

    /// A = a random 32-bit number, drawn afresh for every packet.
    pub(crate) fn ld_random() -> Instruction {
        Instruction::new(BPF_LD | BPF_W | BPF_ABS, 0, 0, SKF_AD_OFF + SKF_AD_RANDOM)
    }

    /// Skips `jt` instructions if A == `k`, else `jf`.
    pub(crate) fn jeq(k: u32, jt: u8, jf: u8) -> Instruction {
        Instruction::new(BPF_JMP | BPF_JEQ | BPF_K, jt, jf, k)
    }

    /// Skips `jt` instructions if A >= `k`, else `jf`.
    pub(crate) fn jge(k: u32, jt: u8, jf: u8) -> Instruction {
        Instruction::new(BPF_JMP | BPF_JGE | BPF_K, jt, jf, k)
    }

    /// Ends the program with result `k` (for a tc classifier, the class id).
    pub(crate) fn ret(k: u32) -> Instruction {
        Instruction::new(BPF_RET | BPF_K, 0, 0, k)
    }

    fn new(code: u16, jt: u8, jf: u8, k: u32) -> Instruction {
        Instruction { code, jt, jf, k }
    }
}

/// `program` as `tc ... bpf bytecode` takes it.
pub(crate) fn bytecode(program: &[Instruction]) -> String {
    let mut text = program.len().to_string();
    for Instruction { code, jt, jf, k } in program {
        // Writing to a String cannot fail.
        let _ = write!(text, ",{code} {jt} {jf} {k}");
    }
    text
}
