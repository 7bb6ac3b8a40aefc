//! Loading flock images (static x86-64 ELF executables linked at
//! `IMAGE_BASE`) and static Linux executables, and telling them apart.
//!
//! Everything about the file is checked before a byte reaches guest memory:
//! class, machine, type, every segment's file range and guest range, and the
//! entry point. A bad image is an error naming what is wrong, never a panic.

use goblin::elf::{Elf, header, program_header};
use snowflock_abi::{IMAGE_BASE, PAGE_SIZE};

use crate::memory::GuestMemory;

/// Largest image file accepted.
pub const MAX_IMAGE_BYTES: usize = 256 << 20;

/// Why an image cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("image is {len} bytes, more than the {MAX_IMAGE_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("not a valid ELF file")]
    Parse(#[source] goblin::error::Error),
    #[error("ELF is not 64-bit little-endian x86-64")]
    WrongArch,
    #[error("ELF type {kind} is not a static executable (ET_EXEC)")]
    NotExecutable { kind: u16 },
    #[error("ELF needs a dynamic loader (PT_INTERP/PT_DYNAMIC); flock images must be static")]
    Dynamic,
    #[error(
        "the program is dynamically linked (it names the loader {interpreter}); link it with -static"
    )]
    DynamicLinux { interpreter: String },
    #[error("ELF OS/ABI {osabi} is neither System V nor GNU/Linux")]
    ForeignAbi { osabi: u8 },
    #[error("ELF has no loadable segment")]
    NoSegments,
    #[error(
        "segment {index} ({vaddr:#x}+{memsz:#x}) is outside the guest image area {lo:#x}..{hi:#x}"
    )]
    SegmentOutOfRange {
        index: usize,
        vaddr: u64,
        memsz: u64,
        lo: u64,
        hi: u64,
    },
    #[error("segment {index}: file range {offset:#x}+{filesz:#x} is beyond the {len}-byte file")]
    SegmentBeyondFile {
        index: usize,
        offset: u64,
        filesz: u64,
        len: usize,
    },
    #[error("segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    FileSizeExceedsMemSize {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    #[error("segments {a} and {b} overlap")]
    Overlap { a: usize, b: usize },
    #[error("entry point {entry:#x} is not inside an executable segment")]
    BadEntry { entry: u64 },
    #[error("writing the image into guest memory failed")]
    Write(#[source] crate::memory::MemoryError),
}

/// Where an image landed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    pub entry: u64,
    /// First page-aligned address after the highest segment.
    pub end: u64,
}

/// What a program file is, which decides how the VMM starts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// Built with the guest SDK: linked at `IMAGE_BASE`, no notes, no TLS.
    Flock,
    /// A static Linux executable (ET_EXEC, or static-PIE), run with the personality.
    Linux,
}

impl ImageKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Flock => "flock image",
            Self::Linux => "Linux-ABI program",
        }
    }
}

/// Where a static-PIE program is placed (its lowest address).
pub const PIE_BASE: u64 = 0x40_0000;

/// Tells a flock image from a static Linux executable. A flock image is an
/// ET_EXEC whose lowest segment starts at `IMAGE_BASE` and which has neither
/// notes nor TLS (the SDK's linker script discards notes); a static Linux
/// executable is linked elsewhere (0x400000 by default), carries notes or
/// TLS, or is position independent. A dynamically linked program is an error
/// naming the fix.
pub fn kind(bytes: &[u8]) -> Result<ImageKind, LoadError> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(LoadError::TooLarge { len: bytes.len() });
    }
    let elf = Elf::parse(bytes).map_err(LoadError::Parse)?;
    if !elf.is_64 || !elf.little_endian || elf.header.e_machine != header::EM_X86_64 {
        return Err(LoadError::WrongArch);
    }
    if let Some(interpreter) = elf.interpreter {
        return Err(LoadError::DynamicLinux {
            interpreter: interpreter.chars().take(256).collect(),
        });
    }
    let osabi = elf.header.e_ident[header::EI_OSABI];
    if osabi != header::ELFOSABI_NONE && osabi != header::ELFOSABI_GNU {
        return Err(LoadError::ForeignAbi { osabi });
    }
    match elf.header.e_type {
        header::ET_DYN => return Ok(ImageKind::Linux),
        header::ET_EXEC => {}
        kind => return Err(LoadError::NotExecutable { kind }),
    }
    let lowest = elf
        .program_headers
        .iter()
        .filter(|ph| ph.p_type == program_header::PT_LOAD && ph.p_memsz > 0)
        .map(|ph| ph.p_vaddr)
        .min()
        .ok_or(LoadError::NoSegments)?;
    let marked = elf.program_headers.iter().any(|ph| {
        matches!(
            ph.p_type,
            program_header::PT_NOTE | program_header::PT_TLS | program_header::PT_GNU_RELRO
        )
    });
    Ok(if lowest == IMAGE_BASE && !marked {
        ImageKind::Flock
    } else {
        ImageKind::Linux
    })
}

/// Parses and checks `bytes` as a flock image whose segments must fit in
/// `[IMAGE_BASE, limit)`, without touching guest memory.
pub fn check(bytes: &[u8], limit: u64) -> Result<LoadedImage, LoadError> {
    Ok(parse(bytes, &Placement::flock(limit))?.0)
}

/// Loads `bytes` into `memory`; segments must fit below `limit`.
pub fn load(bytes: &[u8], memory: &GuestMemory, limit: u64) -> Result<LoadedImage, LoadError> {
    load_placed(bytes, memory, &Placement::flock(limit)).map(|(loaded, _)| loaded)
}

/// Where an ELF may go: its segments (moved by `bias` for a position
/// independent file) must fit in `range`.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub(crate) range: std::ops::Range<u64>,
    /// Whether ET_DYN (static-PIE) and its PT_DYNAMIC are accepted.
    pub(crate) position_independent: bool,
}

impl Placement {
    fn flock(limit: u64) -> Self {
        Self {
            range: IMAGE_BASE..limit,
            position_independent: false,
        }
    }
}

/// What the Linux start needs to know of a loaded program's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProgramHeaders {
    /// Guest address of the program header table (`AT_PHDR`), 0 if not loaded.
    pub(crate) address: u64,
    pub(crate) count: u64,
    pub(crate) entry_size: u64,
}

/// Loads `bytes` placed as `placement` says.
pub(crate) fn load_placed(
    bytes: &[u8],
    memory: &GuestMemory,
    placement: &Placement,
) -> Result<(LoadedImage, ProgramHeaders), LoadError> {
    let (loaded, segments, headers) = parse(bytes, placement)?;
    for seg in segments {
        let data = &bytes[seg.offset as usize..(seg.offset + seg.filesz) as usize];
        memory.write(seg.vaddr, data).map_err(LoadError::Write)?;
        // Memory is fresh and zeroed, so the .bss tail needs no clearing.
    }
    Ok((loaded, headers))
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    executable: bool,
}

type Parsed = (LoadedImage, Vec<Segment>, ProgramHeaders);

fn parse(bytes: &[u8], placement: &Placement) -> Result<Parsed, LoadError> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(LoadError::TooLarge { len: bytes.len() });
    }
    let elf = Elf::parse(bytes).map_err(LoadError::Parse)?;
    if !elf.is_64 || !elf.little_endian || elf.header.e_machine != header::EM_X86_64 {
        return Err(LoadError::WrongArch);
    }
    let pie = placement.position_independent && elf.header.e_type == header::ET_DYN;
    if elf.header.e_type != header::ET_EXEC && !pie {
        return Err(LoadError::NotExecutable {
            kind: elf.header.e_type,
        });
    }
    // A static-PIE relocates itself; it is placed so its lowest page is at PIE_BASE.
    let bias = if pie {
        let lowest = elf
            .program_headers
            .iter()
            .filter(|ph| ph.p_type == program_header::PT_LOAD && ph.p_memsz > 0)
            .map(|ph| ph.p_vaddr & !(PAGE_SIZE - 1))
            .min()
            .ok_or(LoadError::NoSegments)?;
        PIE_BASE.wrapping_sub(lowest)
    } else {
        0
    };
    let mut segments = Vec::new();
    let mut headers = ProgramHeaders {
        address: 0,
        count: u64::from(elf.header.e_phnum),
        entry_size: u64::from(elf.header.e_phentsize),
    };
    for (index, ph) in elf.program_headers.iter().enumerate() {
        match ph.p_type {
            program_header::PT_INTERP => return Err(LoadError::Dynamic),
            program_header::PT_DYNAMIC if !pie => return Err(LoadError::Dynamic),
            program_header::PT_PHDR => {
                headers.address = ph.p_vaddr.wrapping_add(bias);
                continue;
            }
            program_header::PT_LOAD if ph.p_memsz > 0 => {}
            _ => continue,
        }
        let vaddr = ph.p_vaddr.wrapping_add(bias);
        let in_area = vaddr >= placement.range.start
            && vaddr
                .checked_add(ph.p_memsz)
                .is_some_and(|end| end <= placement.range.end);
        if !in_area {
            return Err(LoadError::SegmentOutOfRange {
                index,
                vaddr,
                memsz: ph.p_memsz,
                lo: placement.range.start,
                hi: placement.range.end,
            });
        }
        let header_table = elf.header.e_phoff;
        if headers.address == 0
            && header_table >= ph.p_offset
            && header_table < ph.p_offset.saturating_add(ph.p_filesz)
        {
            headers.address = vaddr + (header_table - ph.p_offset);
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(LoadError::FileSizeExceedsMemSize {
                index,
                filesz: ph.p_filesz,
                memsz: ph.p_memsz,
            });
        }
        let in_file = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .is_some_and(|end| end <= bytes.len() as u64);
        if !in_file {
            return Err(LoadError::SegmentBeyondFile {
                index,
                offset: ph.p_offset,
                filesz: ph.p_filesz,
                len: bytes.len(),
            });
        }
        let seg = Segment {
            vaddr,
            memsz: ph.p_memsz,
            offset: ph.p_offset,
            filesz: ph.p_filesz,
            executable: ph.is_executable(),
        };
        segments.push((index, seg));
    }
    if segments.is_empty() {
        return Err(LoadError::NoSegments);
    }
    for (i, &(a, sa)) in segments.iter().enumerate() {
        for &(b, sb) in &segments[i + 1..] {
            if sa.vaddr < sb.vaddr + sb.memsz && sb.vaddr < sa.vaddr + sa.memsz {
                return Err(LoadError::Overlap { a, b });
            }
        }
    }
    let entry = elf.entry.wrapping_add(bias);
    let entry_ok = segments
        .iter()
        .any(|(_, s)| s.executable && entry >= s.vaddr && entry < s.vaddr + s.memsz);
    if !entry_ok {
        return Err(LoadError::BadEntry { entry });
    }
    let end = segments
        .iter()
        .map(|(_, s)| s.vaddr + s.memsz)
        .max()
        .expect("at least one segment")
        .next_multiple_of(PAGE_SIZE);
    Ok((
        LoadedImage { entry, end },
        segments.into_iter().map(|(_, s)| s).collect(),
        headers,
    ))
}
