//! VM descriptors: the condensed image of a VM at a clone point. vCPU and
//! VM-level state, the memory layout and which pages hold data, but no page
//! contents. Small enough to send to every host of a clone family.
//!
//! On disk (and on the wire) a descriptor is a fixed header followed by a
//! postcard payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `SFLOCKD\0` |
//! | 8..10 | format version (little-endian u16) |
//! | 10..12 | reserved, zero |
//! | 12..16 | CRC-32 of the payload |
//! | 16..24 | payload length |
//! | 24.. | payload |
//!
//! Loading checks all four (magic, version, size cap, checksum) before
//! decoding, then validates what the payload says.

use serde::{Deserialize, Serialize};
use snowflock_vmm::boot::GuestLayout;
use snowflock_vmm::hypervisor::{VcpuSummary, VmSummary};
use snowflock_vmm::machine::MachineSnapshot;
use snowflock_vmm::memory::PAGE_SIZE;

/// `SFLOCKD\0`.
pub const MAGIC: [u8; 8] = *b"SFLOCKD\0";
/// Current format version; bump on any incompatible payload change.
pub const FORMAT_VERSION: u16 = 2;
/// Largest payload accepted. A 1 GiB guest's descriptor is ~15 KiB.
pub const MAX_PAYLOAD: u64 = 16 << 20;
const HEADER_LEN: usize = 24;

/// Why a descriptor could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("descriptor is {len} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("not a snowflock descriptor (bad magic {found:02x?})")]
    BadMagic { found: [u8; 8] },
    #[error(
        "descriptor format version {found} is not supported (this build reads {FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u16 },
    #[error("descriptor payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte cap")]
    TooLarge { len: u64 },
    #[error("descriptor is truncated: header promises {expected} payload bytes, file has {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("descriptor has {extra} bytes after its payload")]
    TrailingBytes { extra: u64 },
    #[error("descriptor checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("descriptor payload does not decode")]
    Decode(#[source] postcard::Error),
    #[error("encoding the descriptor failed")]
    Encode(#[source] postcard::Error),
    #[error("descriptor is inconsistent: {0}")]
    Invalid(String),
    #[error("reading or writing descriptor file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How the clone point was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaptureKind {
    /// The guest called `clone(ticket)`.
    Clone,
    /// The guest called `checkpoint_parent()`.
    Checkpoint,
    /// The VM was paused from outside while it ran.
    External,
}

/// A VM descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Descriptor {
    /// Identifies the clone family (the frozen image) across hosts.
    pub family: u64,
    /// Freeze count of the parent VM (1 for its first clone point).
    pub generation: u32,
    /// The VM that was captured.
    pub parent_vm: u64,
    pub kind: CaptureKind,
    /// Wall-clock capture time, nanoseconds since the Unix epoch.
    pub captured_unix_ns: u64,
    pub machine: MachineSnapshot,
}

impl Descriptor {
    /// Serializes into the file format.
    pub fn encode(&self) -> Result<Vec<u8>, DescriptorError> {
        let payload = postcard::to_stdvec(self).map_err(DescriptorError::Encode)?;
        if payload.len() as u64 > MAX_PAYLOAD {
            return Err(DescriptorError::TooLarge {
                len: payload.len() as u64,
            });
        }
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Parses and validates the file format.
    pub fn decode(bytes: &[u8]) -> Result<Self, DescriptorError> {
        if bytes.len() < HEADER_LEN {
            return Err(DescriptorError::TooShort { len: bytes.len() });
        }
        let magic: [u8; 8] = bytes[0..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(DescriptorError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes(bytes[8..10].try_into().expect("2 bytes"));
        if version != FORMAT_VERSION {
            return Err(DescriptorError::UnsupportedVersion { found: version });
        }
        let stored = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if len > MAX_PAYLOAD {
            return Err(DescriptorError::TooLarge { len });
        }
        let found = (bytes.len() - HEADER_LEN) as u64;
        if found < len {
            return Err(DescriptorError::Truncated {
                expected: len,
                found,
            });
        }
        if found > len {
            return Err(DescriptorError::TrailingBytes { extra: found - len });
        }
        let payload = &bytes[HEADER_LEN..];
        let computed = crc32fast::hash(payload);
        if computed != stored {
            return Err(DescriptorError::Checksum { stored, computed });
        }
        let descriptor: Self = postcard::from_bytes(payload).map_err(DescriptorError::Decode)?;
        descriptor.validate()?;
        Ok(descriptor)
    }

    /// Writes the encoded descriptor to `path`.
    pub fn save(&self, path: &std::path::Path) -> Result<usize, DescriptorError> {
        let bytes = self.encode()?;
        std::fs::write(path, &bytes).map_err(|source| DescriptorError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(bytes.len())
    }

    /// Reads and validates a descriptor file; files larger than the cap are
    /// refused before they are read whole.
    pub fn load(path: &std::path::Path) -> Result<Self, DescriptorError> {
        let io = |source| DescriptorError::Io {
            path: path.display().to_string(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_PAYLOAD + HEADER_LEN as u64 {
            return Err(DescriptorError::TooLarge {
                len: len - HEADER_LEN as u64,
            });
        }
        Self::decode(&std::fs::read(path).map_err(io)?)
    }

    /// Checks what the payload claims against itself.
    fn validate(&self) -> Result<(), DescriptorError> {
        let m = &self.machine;
        GuestLayout::new(m.mem_size)
            .map_err(|e| DescriptorError::Invalid(format!("memory size: {e}")))?;
        if !m.data_pages.is_valid(m.mem_size / PAGE_SIZE) {
            return Err(DescriptorError::Invalid(
                "data page runs are unsorted, overlapping or beyond guest memory".into(),
            ));
        }
        if !m.free_pages.is_valid(m.mem_size / PAGE_SIZE) {
            return Err(DescriptorError::Invalid(
                "free heap page runs are unsorted, overlapping or beyond guest memory".into(),
            ));
        }
        if m.hypervisor.is_empty() || m.hypervisor.len() > 16 {
            return Err(DescriptorError::Invalid(format!(
                "hypervisor name {:?}",
                m.hypervisor
            )));
        }
        Ok(())
    }

    /// A readable digest for operators.
    pub fn summary(&self, encoded_bytes: usize) -> Summary {
        let m = &self.machine;
        let total = m.mem_size / PAGE_SIZE;
        let data = m.data_pages.pages();
        Summary {
            format_version: FORMAT_VERSION,
            encoded_bytes,
            family: format!("{:016x}", self.family),
            generation: self.generation,
            parent_vm: self.parent_vm,
            kind: self.kind,
            captured_unix_ns: self.captured_unix_ns,
            hypervisor: m.hypervisor.clone(),
            tsc_khz: m.tsc_khz,
            memory: MemorySummary {
                bytes: m.mem_size,
                pages: total,
                data_pages: data,
                zero_pages: total - data,
                data_runs: m.data_pages.runs().len(),
            },
            guest: if m.linux {
                "Linux-ABI program"
            } else {
                "flock image"
            },
            mounts: m
                .files
                .mounts
                .iter()
                .map(|mount| format!("{} at {}", mount.host.display(), mount.guest))
                .collect(),
            vcpu: m.vcpu.summary(),
            vm: m.vm.summary(),
        }
    }
}

/// [`Descriptor::summary`]'s result, printable and serializable.
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct Summary {
    pub format_version: u16,
    pub encoded_bytes: usize,
    pub family: String,
    pub generation: u32,
    pub parent_vm: u64,
    pub kind: CaptureKind,
    pub captured_unix_ns: u64,
    pub hypervisor: String,
    pub tsc_khz: Option<u64>,
    /// What runs in the VM: a flock image or a Linux-ABI program.
    pub guest: &'static str,
    /// A Linux-ABI program's read-only host mounts (host at guest path).
    pub mounts: Vec<String>,
    pub memory: MemorySummary,
    pub vcpu: VcpuSummary,
    pub vm: VmSummary,
}

#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct MemorySummary {
    pub bytes: u64,
    pub pages: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub data_runs: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "snowflock VM descriptor (format v{}, {} bytes)",
            self.format_version, self.encoded_bytes
        )?;
        writeln!(
            f,
            "  family        {} generation {}",
            self.family, self.generation
        )?;
        writeln!(
            f,
            "  captured      {:?} of vm {} at {} ns (unix)",
            self.kind, self.parent_vm, self.captured_unix_ns
        )?;
        writeln!(
            f,
            "  hypervisor    {} (tsc {} kHz)",
            self.hypervisor,
            self.tsc_khz.map_or("unknown".into(), |k| k.to_string())
        )?;
        writeln!(f, "  guest         {}", self.guest)?;
        for mount in &self.mounts {
            writeln!(f, "  mount         {mount} (read-only)")?;
        }
        let m = &self.memory;
        writeln!(
            f,
            "  memory        {:.0} MiB, {} pages: {} with data ({:.1} MiB) in {} runs, {} zero",
            mib(m.bytes),
            m.pages,
            m.data_pages,
            mib(m.data_pages * PAGE_SIZE),
            m.data_runs,
            m.zero_pages
        )?;
        let v = &self.vcpu;
        writeln!(
            f,
            "  vcpu 0        rip={:#x} rsp={:#x} rflags={:#x} rax={:#x}",
            v.rip, v.rsp, v.rflags, v.rax
        )?;
        writeln!(
            f,
            "                cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (cpl {})",
            v.cr0, v.cr3, v.cr4, v.efer, v.cs_selector, v.cpl
        )?;
        writeln!(
            f,
            "                xcr0={} mp_state={} msrs={} cpuid={} pending exception={}",
            v.xcr0.map_or("-".into(), |x| format!("{x:#x}")),
            v.mp_state,
            v.msrs,
            v.cpuid_entries,
            v.pending_exception
        )?;
        write!(
            f,
            "  vm            clock={} ns irqchips={}",
            self.vm.clock_ns, self.vm.irqchips
        )
    }
}
