//! Mangling on the switch: duplication and corruption of the UDP datagrams (mcdist's traffic)
//! the switch forwards to each host, by an eBPF program (`mangle.bpf.c`) on the egress hook
//! (TCX) of every switch port. It runs before the port's queueing discipline, so loss and
//! reordering from [`crate::NetnsCluster::impair`] apply to the duplicates too.
//!
//! The program is attached through BPF links this process owns: dropping the [`Mangler`] (or
//! the process ending) removes it.

use std::fmt;
use std::thread;

use aya::maps::{Array, MapData};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::error::{MangleCountsError, MangleError};
use crate::impair::threshold;
use crate::netns;
use crate::record::ClusterRecord;

/// The program, compiled by `build.rs`.
static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mangle.bpf.o"));
const PROGRAM: &str = "mangle";
const COUNTERS: &str = "counters";
/// Indices of the program's `counters` map (`enum counter`).
const COUNTER_UDP: u32 = 0;
const COUNTER_DUPLICATED: u32 = 1;
const COUNTER_CORRUPTED: u32 = 2;

/// What the mangling program did, in packets as the switch sees them (a UDP GSO message counts
/// once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MangleCounts {
    /// UDP datagrams that passed the program (duplicates not counted again).
    pub udp: u64,
    /// Sent twice.
    pub duplicated: u64,
    /// Sent with one bit of their payload flipped and their UDP checksum updated to match.
    pub corrupted: u64,
}

/// The mangling program, loaded and attached to every switch port of a cluster.
pub(crate) struct Mangler {
    /// Holds the program and its links: dropping it detaches them.
    _ebpf: Ebpf,
    counters: Array<MapData, u64>,
}

impl fmt::Debug for Mangler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mangler").finish_non_exhaustive()
    }
}

impl Mangler {
    /// Loads the program to duplicate `duplicate_percent`% and corrupt `corrupt_percent`% of
    /// the UDP datagrams, and attaches it to the egress of each of `record`'s switch ports.
    pub(crate) fn attach(
        record: &ClusterRecord,
        duplicate_percent: u32,
        corrupt_percent: u32,
    ) -> Result<Mangler, MangleError> {
        let duplicate_below = threshold(duplicate_percent);
        let corrupt_below = threshold(corrupt_percent);
        let mut ebpf = EbpfLoader::new()
            // No CO-RE relocations: the kernel's BTF is not needed.
            .btf(None)
            .override_global("duplicate_below", &duplicate_below, true)
            .override_global("corrupt_below", &corrupt_below, true)
            .load(PROGRAM_OBJECT)
            .map_err(MangleError::Load)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or(MangleError::NoProgram)?
            .try_into()
            .map_err(MangleError::Program)?;
        program.load().map_err(MangleError::Program)?;
        let switch = record.switch.clone();
        let ports: Vec<(String, String)> = record
            .hosts
            .iter()
            .map(|h| (h.name.clone(), h.netns.clone()))
            .collect();
        // Interface names and the links' ifindex are those of the attaching thread's namespace.
        thread::scope(|s| {
            s.spawn(|| -> Result<(), MangleError> {
                netns::enter(&switch).map_err(|source| MangleError::EnterSwitch {
                    netns: switch.clone(),
                    source,
                })?;
                for (host, port) in &ports {
                    program
                        .attach(port, TcAttachType::Egress)
                        .map_err(|source| MangleError::Attach {
                            host: host.clone(),
                            source,
                        })?;
                }
                Ok(())
            })
            .join()
            .unwrap_or(Err(MangleError::AttachThread))
        })?;
        let map = ebpf.take_map(COUNTERS).ok_or(MangleError::NoCounters)?;
        let counters = Array::try_from(map).map_err(MangleError::Counters)?;
        Ok(Mangler {
            _ebpf: ebpf,
            counters,
        })
    }

    /// What the program did since it was attached, over every port.
    pub(crate) fn counts(&self) -> Result<MangleCounts, MangleCountsError> {
        let read = |index| self.counters.get(&index, 0).map_err(MangleCountsError);
        Ok(MangleCounts {
            udp: read(COUNTER_UDP)?,
            duplicated: read(COUNTER_DUPLICATED)?,
            corrupted: read(COUNTER_CORRUPTED)?,
        })
    }
}
