//! The snowflock XDP program and its loader: steers mcdist page FRAGMENTs (docs/mcdist.md) to
//! AF_XDP sockets and drops fragments of pages the host already holds.
//!
//! # The program
//!
//! `src/mcdist.bpf.c`, compiled with clang by the build script and embedded in this crate,
//! looks at every frame received on one interface. An IPv4 UDP datagram (IP options honoured,
//! IP fragments left alone) to the mcdist port whose payload starts with the mcdist magic,
//! version 2 and kind FRAGMENT is matched against the registered families:
//!
//! - family registered, same generation, page in range, page's bit set in the presence bitmap:
//!   the host already holds the page, the frame is dropped;
//! - otherwise it is redirected to the AF_XDP socket of its RX queue, or passed to the kernel
//!   when that queue has no socket.
//!
//! Everything else passes to the kernel unchanged: other traffic, REQUESTs and REJECTs,
//! fragments of unknown families or generations. The program does not check tags; whoever
//! receives a datagram (AF_XDP or kernel socket) verifies it.
//!
//! # Maps
//!
//! - `families` (hash, [`FAMILIES_MAX`] entries): family id → generation,
//!   page count and first bit of the family's range in `presence`
//!   ([`McdistXdp::add_family`], [`McdistXdp::remove_family`]).
//! - `presence` (array of `u64` words, memory-mapped): one bit per page; the receiver sets a
//!   page's bit through [`FamilyBits::mark`] once the page is in its page cache.
//! - `xsks` (XSKMAP, [`XSKS_MAX`] entries): RX queue → AF_XDP socket
//!   ([`McdistXdp::set_socket`]).
//! - `counters` (array of `u64`, memory-mapped): see [`XdpCounters`].
//!
//! # Lifetime
//!
//! [`McdistXdp::attach`] loads the program and attaches it with a BPF link in the calling
//! thread's network namespace. The link belongs to this process: dropping the [`McdistXdp`]
//! detaches the program, and so does the process's exit, however it ends (the kernel closes the
//! link's file descriptor), so a crashed daemon leaves no program behind. (Kernels older than
//! 5.9 have no XDP links; there aya falls back to a netlink attachment, which outlives a killed
//! process.)

pub mod abi;
mod presence;
mod sync;
mod sys;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError, XskMap};
use aya::programs::links::Link as _;
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, Xdp};
use aya::{Ebpf, EbpfError, EbpfLoader};

use crate::abi::{FAMILIES_MAX, FamilyEntry, PRESENCE_WORDS, XSKS_MAX};
pub use crate::presence::FamilyBits;
use crate::presence::PresenceBitmap;
use crate::sync::lock;
use crate::sys::SharedWords;

/// The compiled XDP program (built by `build.rs`).
static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcdist.bpf.o"));
/// The XDP function in the object.
const PROGRAM_NAME: &str = "mcdist_steer";
/// The `const volatile` global holding the UDP port.
const PORT_GLOBAL: &str = "mcdist_port";
/// `BPF_F_MMAPABLE` from `linux/bpf.h`: the array map can be memory-mapped.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_NOEXIST` from `linux/bpf.h`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// How the program is attached to the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdpMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): the fast path, needs driver support (veth has it).
    Native,
    /// In the kernel's generic receive path (`XDP_FLAGS_SKB_MODE`): works on every interface,
    /// after the socket buffer is allocated.
    Generic,
}

impl XdpMode {
    fn aya_mode(self) -> aya::programs::XdpMode {
        match self {
            Self::Native => aya::programs::XdpMode::Driver,
            Self::Generic => aya::programs::XdpMode::Skb,
        }
    }
}

/// Where and how to attach the program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachConfig {
    /// Interface name, resolved in the calling thread's network namespace.
    pub ifname: String,
    /// Native or generic XDP.
    pub mode: XdpMode,
    /// The mcdist UDP port (`[mcdist] port`).
    pub udp_port: u16,
}

/// What the program counted since it was attached.
///
/// `received` = `redirected + duplicate_dropped + passed + passed_not_ours + malformed`, up to
/// datagrams in flight while the counters are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// Whole IPv4 UDP datagrams to the mcdist port.
    pub received: u64,
    /// Fragments redirected to an AF_XDP socket.
    pub redirected: u64,
    /// Fragments of pages whose presence bit was set, dropped.
    pub duplicate_dropped: u64,
    /// Fragments of a registered family passed to the kernel: their RX queue has no AF_XDP
    /// socket, or the datagram holds more than one fragment (a UDP GSO batch, which generic
    /// XDP on a virtual link sees whole and the kernel's UDP stack cuts).
    pub passed: u64,
    /// mcdist datagrams passed to the kernel untouched: other kinds than FRAGMENT, and
    /// fragments of an unregistered family, another generation or a page out of range.
    pub passed_not_ours: u64,
    /// Datagrams to the port too short for the mcdist header or a FRAGMENT, or with another
    /// magic or version; passed to the kernel, which drops them and counts them too.
    pub malformed: u64,
}

/// What was attached where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpInfo {
    /// Interface name.
    pub ifname: String,
    /// Interface index in the namespace the program was attached in.
    pub ifindex: u32,
    /// Attach mode.
    pub mode: XdpMode,
    /// The kernel's id of the loaded program (as `bpftool prog` and `ip link` show it).
    pub program_id: u32,
    /// The mcdist UDP port the program matches.
    pub udp_port: u16,
    /// Pages the presence bitmap holds over all families.
    pub presence_capacity_pages: u64,
}

/// Loading or attaching the program failed; nothing stays attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The interface does not exist in the calling thread's network namespace.
    #[error("interface {ifname:?} not found")]
    UnknownInterface {
        /// The interface name.
        ifname: String,
        /// Why the lookup failed.
        #[source]
        source: io::Error,
    },
    /// The embedded object could not be parsed or its maps created.
    #[error("loading the mcdist XDP object failed")]
    Load(#[source] EbpfError),
    /// The object lacks a program or map this crate expects (a build mismatch).
    #[error("the mcdist XDP object has no {0}")]
    Missing(&'static str),
    /// A map of the object does not have the type, flags or size this crate expects.
    #[error("map {name} of the mcdist XDP object has an unexpected layout: {detail}")]
    MapLayout {
        /// Map name.
        name: &'static str,
        /// What differs.
        detail: String,
    },
    /// Reading a map's kernel information failed.
    #[error("inspecting map {name} failed")]
    MapInfo {
        /// Map name.
        name: &'static str,
        /// The error.
        #[source]
        source: MapError,
    },
    /// Memory-mapping an array map failed.
    #[error("memory-mapping map {name} failed")]
    Mmap {
        /// Map name.
        name: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the program (verifier) or its information could not be read.
    #[error("loading the mcdist XDP program into the kernel failed")]
    Program(#[source] ProgramError),
    /// Attaching to the interface failed (e.g. another XDP program is attached, or the driver
    /// has no native XDP).
    #[error("attaching the mcdist XDP program to {ifname:?} in {mode:?} mode failed")]
    Attach {
        /// The interface name.
        ifname: String,
        /// The requested mode.
        mode: XdpMode,
        /// The error.
        #[source]
        source: ProgramError,
    },
}

/// Registering or removing a family failed.
#[derive(Debug, thiserror::Error)]
pub enum FamilyError {
    /// The family is already registered.
    #[error("family {family:#x} is already registered")]
    AlreadyRegistered {
        /// Family id.
        family: u64,
    },
    /// The family is not registered.
    #[error("family {family:#x} is not registered")]
    NotRegistered {
        /// Family id.
        family: u64,
    },
    /// A family needs at least one page.
    #[error("family {family:#x} has no pages")]
    NoPages {
        /// Family id.
        family: u64,
    },
    /// The `families` map is full.
    #[error("{FAMILIES_MAX} families are registered already")]
    TooManyFamilies,
    /// No free range of the presence bitmap fits the family.
    #[error("no free range of {pages} pages for family {family:#x} in the presence bitmap")]
    NoSpace {
        /// Family id.
        family: u64,
        /// Pages requested.
        pages: u64,
    },
    /// Updating the `families` map failed.
    #[error("updating the families map for family {family:#x} failed")]
    Map {
        /// Family id.
        family: u64,
        /// The error.
        #[source]
        source: MapError,
    },
}

/// Updating the `xsks` map failed.
#[derive(Debug, thiserror::Error)]
pub enum SocketMapError {
    /// Only RX queues below [`XSKS_MAX`] can have a socket.
    #[error("RX queue {queue} is beyond the {XSKS_MAX} queues the XDP program serves")]
    QueueOutOfRange {
        /// The queue.
        queue: u32,
    },
    /// The kernel refused the update (e.g. the fd is not a bound AF_XDP socket).
    #[error("updating the AF_XDP socket of RX queue {queue} failed")]
    Map {
        /// The queue.
        queue: u32,
        /// The error.
        #[source]
        source: MapError,
    },
}

/// The maps updated from user space, behind one lock.
struct MapState {
    families: BpfHashMap<MapData, u64, FamilyEntry>,
    xsks: XskMap<MapData>,
    registered: HashMap<u64, FamilyBits>,
}

impl fmt::Debug for MapState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapState")
            .field("registered", &self.registered)
            .finish_non_exhaustive()
    }
}

/// The mcdist XDP program attached to one interface, with its maps.
///
/// Dropping it detaches the program. [`FamilyBits`] handles stay usable afterwards (they mark
/// a bitmap no program reads any more).
#[derive(Debug)]
pub struct McdistXdp {
    link: Option<XdpLink>,
    maps: Mutex<MapState>,
    presence: Arc<PresenceBitmap>,
    counters: SharedWords,
    info: XdpInfo,
}

impl McdistXdp {
    /// Loads the program with `config.udp_port` and attaches it to `config.ifname` in the
    /// calling thread's network namespace.
    pub fn attach(config: &AttachConfig) -> Result<McdistXdp, AttachError> {
        let ifindex = sys::interface_index(&config.ifname).map_err(|source| {
            AttachError::UnknownInterface {
                ifname: config.ifname.clone(),
                source,
            }
        })?;
        let mut ebpf = EbpfLoader::new()
            // The program uses no CO-RE relocations: the kernel's BTF is not needed.
            .btf(None)
            .override_global(PORT_GLOBAL, &config.udp_port, true)
            .load(PROGRAM_OBJECT)
            .map_err(AttachError::Load)?;

        let program_id = {
            let program = xdp_program(&mut ebpf)?;
            program.load().map_err(AttachError::Program)?;
            program.info().map_err(AttachError::Program)?.id()
        };

        // Taken only now: the maps' fds had to stay open while the program was loaded.
        let families = BpfHashMap::try_from(take_map(&mut ebpf, "families")?).map_err(|e| {
            AttachError::MapLayout {
                name: "families",
                detail: e.to_string(),
            }
        })?;
        let xsks =
            XskMap::try_from(take_map(&mut ebpf, "xsks")?).map_err(|e| AttachError::MapLayout {
                name: "xsks",
                detail: e.to_string(),
            })?;
        let presence = map_words(&mut ebpf, "presence", PRESENCE_WORDS)?;
        let counters = map_words(&mut ebpf, "counters", abi::COUNTER_COUNT)?;

        let program = xdp_program(&mut ebpf)?;
        let attach_error = |source| AttachError::Attach {
            ifname: config.ifname.clone(),
            mode: config.mode,
            source,
        };
        let link_id = program
            .attach_to_if_index(ifindex, config.mode.aya_mode())
            .map_err(attach_error)?;
        // Owning the link (rather than leaving it to `ebpf`, dropped below) ties the attachment
        // to `Self`; the link keeps the program loaded.
        let link = program.take_link(link_id).map_err(attach_error)?;

        let presence = PresenceBitmap::new(presence);
        let info = XdpInfo {
            ifname: config.ifname.clone(),
            ifindex,
            mode: config.mode,
            program_id,
            udp_port: config.udp_port,
            presence_capacity_pages: presence.capacity_pages(),
        };
        tracing::info!(
            ifname = %info.ifname,
            ifindex,
            mode = ?info.mode,
            program_id,
            udp_port = info.udp_port,
            "attached the mcdist XDP program"
        );
        Ok(McdistXdp {
            link: Some(link),
            maps: Mutex::new(MapState {
                families,
                xsks,
                registered: HashMap::new(),
            }),
            presence,
            counters,
            info,
        })
    }

    /// Registers `family` at `generation` with `pages` pages: reserves and clears a range of
    /// the presence bitmap (first fit), then lets the program match the family's fragments.
    pub fn add_family(
        &self,
        family: u64,
        generation: u32,
        pages: u64,
    ) -> Result<FamilyBits, FamilyError> {
        if pages == 0 {
            return Err(FamilyError::NoPages { family });
        }
        let mut maps = lock(&self.maps);
        if maps.registered.contains_key(&family) {
            return Err(FamilyError::AlreadyRegistered { family });
        }
        if maps.registered.len() >= FAMILIES_MAX {
            return Err(FamilyError::TooManyFamilies);
        }
        let bits = self
            .presence
            .allocate(pages)
            .ok_or(FamilyError::NoSpace { family, pages })?;
        let entry = FamilyEntry {
            generation,
            reserved: 0,
            base_bit: bits.base_bit(),
            pages,
        };
        // On failure `bits` is dropped here, which frees its range.
        maps.families
            .insert(family, entry, BPF_NOEXIST)
            .map_err(|source| FamilyError::Map { family, source })?;
        maps.registered.insert(family, bits.clone());
        tracing::debug!(
            family,
            generation,
            pages,
            base_bit = entry.base_bit,
            "registered an mcdist family with the XDP program"
        );
        Ok(bits)
    }

    /// Unregisters `family`: the program passes its fragments to the kernel from now on. Its
    /// bitmap range is freed once every [`FamilyBits`] clone of it is dropped.
    pub fn remove_family(&self, family: u64) -> Result<(), FamilyError> {
        let mut maps = lock(&self.maps);
        if !maps.registered.contains_key(&family) {
            return Err(FamilyError::NotRegistered { family });
        }
        maps.families
            .remove(&family)
            .map_err(|source| FamilyError::Map { family, source })?;
        maps.registered.remove(&family);
        tracing::debug!(family, "unregistered an mcdist family from the XDP program");
        Ok(())
    }

    /// Sends fragments arriving on RX queue `queue` to the AF_XDP socket `fd` (bound to this
    /// interface and queue), replacing any previous socket of that queue.
    pub fn set_socket(&self, queue: u32, fd: BorrowedFd<'_>) -> Result<(), SocketMapError> {
        if queue >= XSKS_MAX {
            return Err(SocketMapError::QueueOutOfRange { queue });
        }
        lock(&self.maps)
            .xsks
            .set(queue, fd.as_fd(), 0)
            .map_err(|source| SocketMapError::Map { queue, source })?;
        tracing::debug!(queue, "AF_XDP socket set for an RX queue");
        Ok(())
    }

    /// Removes the AF_XDP socket of RX queue `queue`: its fragments pass to the kernel again.
    /// Clearing a queue without a socket is not an error.
    pub fn clear_socket(&self, queue: u32) -> Result<(), SocketMapError> {
        if queue >= XSKS_MAX {
            return Err(SocketMapError::QueueOutOfRange { queue });
        }
        lock(&self.maps)
            .xsks
            .unset(queue)
            .map_err(|source| SocketMapError::Map { queue, source })?;
        tracing::debug!(queue, "AF_XDP socket cleared for an RX queue");
        Ok(())
    }

    /// The program's counters now.
    pub fn counters(&self) -> XdpCounters {
        let read = |index| {
            self.counters
                .word(index)
                .map_or(0, |word| word.load(std::sync::atomic::Ordering::Relaxed))
        };
        XdpCounters {
            received: read(abi::COUNTER_RECEIVED),
            redirected: read(abi::COUNTER_REDIRECTED),
            duplicate_dropped: read(abi::COUNTER_DUPLICATE_DROPPED),
            passed: read(abi::COUNTER_PASSED),
            passed_not_ours: read(abi::COUNTER_PASSED_NOT_OURS),
            malformed: read(abi::COUNTER_MALFORMED),
        }
    }

    /// What was attached where.
    pub fn info(&self) -> XdpInfo {
        self.info.clone()
    }
}

impl Drop for McdistXdp {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        match link.detach() {
            Ok(()) => tracing::info!(
                ifname = %self.info.ifname,
                program_id = self.info.program_id,
                "detached the mcdist XDP program"
            ),
            Err(error) => tracing::warn!(
                ifname = %self.info.ifname,
                program_id = self.info.program_id,
                %error,
                "detaching the mcdist XDP program failed"
            ),
        }
    }
}

/// The XDP program of the object.
fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, AttachError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or(AttachError::Missing(PROGRAM_NAME))?
        .try_into()
        .map_err(AttachError::Program)
}

/// Takes map `name` out of the loaded object.
fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, AttachError> {
    ebpf.take_map(name).ok_or(AttachError::Missing(name))
}

/// Takes the `u64` array map `name` out of the object, checks it is memory-mappable with
/// `entries` entries, and maps it.
fn map_words(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: usize,
) -> Result<SharedWords, AttachError> {
    let layout_error = |detail: String| AttachError::MapLayout { name, detail };
    let data = match take_map(ebpf, name)? {
        Map::Array(data) => data,
        other => return Err(layout_error(format!("not an array: {other:?}"))),
    };
    let info = data
        .info()
        .map_err(|source| AttachError::MapInfo { name, source })?;
    if info.map_flags() & BPF_F_MMAPABLE == 0 {
        return Err(layout_error("not memory-mappable".to_owned()));
    }
    if info.value_size() as usize != size_of::<u64>() {
        return Err(layout_error(format!("value size {}", info.value_size())));
    }
    if info.max_entries() as usize != entries {
        return Err(layout_error(format!(
            "{} entries, expected {entries}",
            info.max_entries()
        )));
    }
    // The mapping holds its own reference to the map: `data` (the fd) may go.
    SharedWords::map(data.fd().as_fd(), entries)
        .map_err(|source| AttachError::Mmap { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_can_be_shared_between_threads() {
        assert_send_sync::<McdistXdp>();
        assert_send_sync::<FamilyBits>();
        assert_send_sync::<AttachError>();
        assert_send_sync::<FamilyError>();
        assert_send_sync::<SocketMapError>();
    }
}
