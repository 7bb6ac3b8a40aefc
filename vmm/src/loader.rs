//! Loading flock images: static x86-64 ELF executables linked at `IMAGE_BASE`.
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

/// Parses and checks `bytes` as a flock image whose segments must fit in
/// `[IMAGE_BASE, limit)`, without touching guest memory.
pub fn check(bytes: &[u8], limit: u64) -> Result<LoadedImage, LoadError> {
    Ok(parse(bytes, limit)?.0)
}

/// Loads `bytes` into `memory`; segments must fit below `limit`.
pub fn load(bytes: &[u8], memory: &GuestMemory, limit: u64) -> Result<LoadedImage, LoadError> {
    let (loaded, segments) = parse(bytes, limit)?;
    for seg in segments {
        let data = &bytes[seg.offset as usize..(seg.offset + seg.filesz) as usize];
        memory.write(seg.vaddr, data).map_err(LoadError::Write)?;
        // Memory is fresh and zeroed, so the .bss tail needs no clearing.
    }
    Ok(loaded)
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    executable: bool,
}

fn parse(bytes: &[u8], limit: u64) -> Result<(LoadedImage, Vec<Segment>), LoadError> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(LoadError::TooLarge { len: bytes.len() });
    }
    let elf = Elf::parse(bytes).map_err(LoadError::Parse)?;
    if !elf.is_64 || !elf.little_endian || elf.header.e_machine != header::EM_X86_64 {
        return Err(LoadError::WrongArch);
    }
    if elf.header.e_type != header::ET_EXEC {
        return Err(LoadError::NotExecutable {
            kind: elf.header.e_type,
        });
    }
    let mut segments = Vec::new();
    for (index, ph) in elf.program_headers.iter().enumerate() {
        match ph.p_type {
            program_header::PT_INTERP | program_header::PT_DYNAMIC => {
                return Err(LoadError::Dynamic);
            }
            program_header::PT_LOAD if ph.p_memsz > 0 => {}
            _ => continue,
        }
        let in_area = ph.p_vaddr >= IMAGE_BASE
            && ph
                .p_vaddr
                .checked_add(ph.p_memsz)
                .is_some_and(|end| end <= limit);
        if !in_area {
            return Err(LoadError::SegmentOutOfRange {
                index,
                vaddr: ph.p_vaddr,
                memsz: ph.p_memsz,
                lo: IMAGE_BASE,
                hi: limit,
            });
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
            vaddr: ph.p_vaddr,
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
    let entry = elf.entry;
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
    ))
}
