//! What the receiver keeps per family (clone point) it has joined: the launch order's
//! description of it ([`FamilyJoin`]), where its pages go, the pages held, the pages
//! requested and awaited or waiting for room in the window, and its rate estimate.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use foldhash::{HashMap, HashMapExt};

use super::config::ReceiverConfig;
use super::loss::LossDetector;
use super::rtt::{Outstanding, RttEstimate};
use super::stats::ReceiverStats;
use crate::auth::KeyId;
use crate::client::PageSink;
use crate::mcast::bitmap::Bitmap;
use crate::mcast::rate::AimdRate;

/// A family (clone point) this host runs clones of, as the launch order describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyJoin {
    /// The clone point's id.
    pub family: u64,
    /// The serving daemon's generation of it.
    pub generation: u32,
    /// The cluster key its fragments are sealed under (the one its server sent with when it
    /// registered the family).
    pub key: KeyId,
    /// Its multicast group.
    pub group: Ipv4Addr,
    /// Where its server takes REQUESTs.
    pub server: SocketAddrV4,
    /// Pages in its memory; fragments of pages beyond are dropped as malformed.
    pub pages: u64,
    /// The host kept what it received of the family before (its page cache outlived its
    /// clones): the JOIN says so, and the server pushes nothing again for it.
    pub holding: bool,
}

/// Learns each page the host now holds (the AF_XDP path sets its presence bitmap with it).
///
/// Called after the page was delivered to the family's sink, from the thread that delivered
/// it.
pub trait HeldPages: Send + Sync {
    /// `page` of `family` is now held.
    fn held(&self, family: u64, page: u64);
}

/// Why joining a family failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The family is joined already.
    #[error("family {family:#x} is already joined")]
    AlreadyJoined {
        /// The family.
        family: u64,
    },
    /// The multicast group could not be joined.
    #[error("joining multicast group {group} on {interface}")]
    Membership {
        /// The group.
        group: Ipv4Addr,
        /// The interface address.
        interface: Ipv4Addr,
        /// The I/O error.
        source: io::Error,
    },
    /// The family is sealed under a cluster key this host does not hold.
    #[error(
        "family {family:#x} is sealed under cluster key {key}, which this host does not hold \
         (a key rotation not done on every host?)"
    )]
    UnknownKey {
        /// The family.
        family: u64,
        /// The key it is sealed under.
        key: KeyId,
    },
    /// The receiver was shut down.
    #[error("the mcdist receiver is shut down")]
    Stopped,
    /// The XDP program could not take the family.
    #[error("registering family {family:#x} with the XDP program")]
    Xdp {
        /// The family.
        family: u64,
        /// What failed.
        source: snowflock_ebpf::FamilyError,
    },
}

/// A joined family's state.
pub(super) struct Family {
    pub(super) join: FamilyJoin,
    pub(super) sink: Arc<dyn PageSink>,
    pub(super) hook: Option<Arc<dyn HeldPages>>,
    pub(super) held: Bitmap,
    /// Pages sent to the server and awaited.
    pub(super) outstanding: HashMap<u64, Outstanding>,
    /// (retry_at, page) of every outstanding page.
    pub(super) retry_order: BTreeSet<(Instant, u64)>,
    /// The order of the requests, and what arrived of them: which expired pages are lost.
    pub(super) loss: LossDetector,
    /// log2 of `ReceiverConfig::request_block_pages` (`None`: no blocks), and per block the
    /// last page that arrived for another host's request (see `loss`).
    pub(super) block_shift: Option<u32>,
    pub(super) last_for_another: HashMap<u64, u64>,
    /// Pages requested beyond `max_in_flight`, in request order, and their bits.
    pub(super) waiting: VecDeque<u64>,
    pub(super) queued: Bitmap,
    /// Pages per second measured to arrive while requests were in flight (smoothed).
    pub(super) goodput: Option<f64>,
    /// Requested pages completed since the last report, and whether pages waited for room in
    /// the window when that interval began.
    pub(super) completed_in_interval: u32,
    pub(super) busy_since_report: bool,
    pub(super) last_report: Instant,
    pub(super) rtt: RttEstimate,
    pub(super) rate: AimdRate,
    pub(super) next_report: Instant,
    pub(super) failed: bool,
    pub(super) stats: ReceiverStats,
}

/// Weight of the newest interval in the smoothed goodput.
const GOODPUT_WEIGHT: f64 = 0.5;

impl Family {
    /// A family just joined: nothing held, requested or measured yet; its first report is
    /// due one `report_interval` from `now`.
    pub(super) fn new(
        join: FamilyJoin,
        sink: Arc<dyn PageSink>,
        hook: Option<Arc<dyn HeldPages>>,
        config: &ReceiverConfig,
        now: Instant,
    ) -> Family {
        Family {
            join,
            sink,
            hook,
            held: Bitmap::new(join.pages),
            outstanding: HashMap::new(),
            retry_order: BTreeSet::new(),
            loss: LossDetector::new(now),
            block_shift: (config.request_block_pages >= 2)
                .then(|| config.request_block_pages.ilog2()),
            last_for_another: HashMap::new(),
            waiting: VecDeque::new(),
            queued: Bitmap::new(join.pages),
            goodput: None,
            completed_in_interval: 0,
            busy_since_report: false,
            last_report: now,
            rtt: RttEstimate::default(),
            rate: AimdRate::new(config.initial_rate, config.min_rate, config.max_rate),
            next_report: now + config.report_interval,
            failed: false,
            stats: ReceiverStats::default(),
        }
    }

    /// Queues the `pages` neither held, nor queued or awaited already, nor past the family's
    /// end, in order, to be sent as the window has room; returns how many it queued.
    pub(super) fn enqueue(&mut self, pages: &[u64]) -> usize {
        let before = self.waiting.len();
        for &page in pages {
            if page >= self.join.pages
                || self.held.get(page)
                || self.queued.get(page)
                || self.outstanding.contains_key(&page)
            {
                continue;
            }
            self.queued.set(page);
            self.waiting.push_back(page);
        }
        self.waiting.len() - before
    }

    /// Starts its rate control from the long-run loss share `share` of the host's path.
    pub(super) fn with_long_run_loss(mut self, share: f64) -> Family {
        self.rate = self.rate.with_long_run_loss(share);
        self
    }

    /// The rate the server is expected to serve this family at: the reported rate, or the
    /// measured one when that is lower (the server or the path cannot keep up).
    pub(super) fn pace(&self) -> u32 {
        let rate = self.rate.rate();
        match self.goodput {
            Some(measured) => rate.min(measured.max(1.0) as u32),
            None => rate,
        }
    }

    /// At a report: if pages waited for room in the window at both ends of the interval
    /// (the window was full: more was wanted than the server delivered), its completions per
    /// second are a sample of what the server delivers. Otherwise they measure the demand
    /// (clones faulting a page at a time), which says nothing about the server.
    pub(super) fn sample_goodput(&mut self, now: Instant) {
        let interval = now
            .saturating_duration_since(self.last_report)
            .as_secs_f64();
        let backlogged = !self.waiting.is_empty();
        if self.busy_since_report && backlogged && interval > 0.0 {
            let sample = f64::from(self.completed_in_interval) / interval;
            if sample > 0.0 {
                self.goodput = Some(match self.goodput {
                    Some(old) => old + GOODPUT_WEIGHT * (sample - old),
                    None => sample,
                });
            }
        }
        self.completed_in_interval = 0;
        self.busy_since_report = backlogged;
        self.last_report = now;
    }

    /// The family's counters, with its rate and its requested pages now.
    pub(super) fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            rate: self.rate.rate(),
            outstanding: (self.outstanding.len() + self.waiting.len()) as u64,
            queued: self.waiting.len() as u64,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::sync::Arc;
    use std::time::Instant;

    use super::super::config::ReceiverConfig;
    use super::{Family, FamilyJoin};
    use crate::client::PageSink;

    struct Discard;

    impl PageSink for Discard {
        fn deliver_batch(&self, _pages: &[(u64, &[u8])]) {}
        fn failed(&self, _reason: String) {}
    }

    #[test]
    fn only_pages_neither_held_nor_asked_for_are_queued_in_order() {
        let join = FamilyJoin {
            family: 1,
            generation: 1,
            key: crate::auth::ClusterKey::from_bytes([1; 32]).id(),
            group: Ipv4Addr::new(239, 255, 0, 1),
            server: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 7073),
            pages: 8,
            holding: false,
        };
        let config = ReceiverConfig::default();
        let mut family = Family::new(join, Arc::new(Discard), None, &config, Instant::now());
        assert_eq!(family.enqueue(&[1, 2, 2, 8, 3]), 3, "8 is past the end");
        family.held.set(4);
        assert_eq!(family.enqueue(&[4, 1, 5]), 1, "4 is held, 1 queued");
        assert_eq!(family.waiting, [1, 2, 3, 5]);
        assert_eq!(family.stats().outstanding, 4);
        assert_eq!(family.stats().queued, 4);
    }
}
