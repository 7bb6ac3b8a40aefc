//! What the core keeps behind its lock: the joined families, the partial pages, the
//! receiver's counters and the deadline the transport was last given.

use std::time::Instant;

use foldhash::{HashMap, HashMapExt};

use super::config::ReceiverConfig;
use super::family::Family;
use super::repair_blocks::RepairBlocks;
use super::stats::ReceiverStats;
use crate::mcast::reassembly::Reassembly;

/// The core's state (one lock).
pub(super) struct State {
    pub(super) families: HashMap<u64, Family>,
    pub(super) reassembly: Reassembly,
    /// Recent pages and the REPAIRs of blocks still missing pages.
    pub(super) repairs: RepairBlocks,
    pub(super) stats: ReceiverStats,
    /// The long-run loss share of this host's path, as the family that last ended a report
    /// interval saw it: a family joined later starts from it, so it does not take the path's
    /// usual loss for overload.
    pub(super) long_run_loss: f64,
    /// The deadline the last `tick` gave the transport.
    pub(super) armed: Option<Instant>,
    /// Scratch for encoding REQUESTs.
    pub(super) scratch: Vec<u8>,
}

impl State {
    /// No families, no partial pages, nothing counted.
    pub(super) fn new(config: &ReceiverConfig) -> State {
        State {
            families: HashMap::new(),
            reassembly: Reassembly::new(config.max_partial_pages, config.partial_timeout),
            repairs: RepairBlocks::new(config.repair_cache_pages),
            stats: ReceiverStats::default(),
            long_run_loss: 0.0,
            armed: None,
            scratch: Vec::new(),
        }
    }

    /// Counters of all families, plus what could not be attributed to one, with the rate,
    /// the requested pages and the partial pages now.
    pub(super) fn stats(&self) -> ReceiverStats {
        let mut stats = self.stats;
        stats.rate = self
            .families
            .values()
            .map(|f| f.rate.rate())
            .min()
            .unwrap_or(0);
        stats.outstanding = self
            .families
            .values()
            .map(|f| (f.outstanding.len() + f.waiting.len()) as u64)
            .sum();
        stats.queued = self.families.values().map(|f| f.waiting.len() as u64).sum();
        stats.partial_pages = self.reassembly.partial_pages() as u64;
        stats
    }
}
