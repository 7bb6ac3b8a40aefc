//! The receiver's tunables, shared by both receive paths and the core.

use std::net::Ipv4Addr;
use std::time::Duration;

/// The mcdist UDP port of every host unless configured otherwise.
pub const DEFAULT_PORT: u16 = 7073;

/// Tunables of a receiver (both paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// The address of the interface on the cluster network: group memberships are made on it.
    pub local_addr: Ipv4Addr,
    /// The mcdist UDP port (the same on every host).
    pub port: u16,
    /// Smallest retransmission timeout: of the order of the link's round trip (a veth round
    /// trip is 0.1-0.2 ms), so a lost page costs about a round trip and not a fixed wait; the
    /// measured request-to-page time raises the timeout wherever the path or the server is
    /// slower.
    pub rto_min: Duration,
    /// Largest retransmission timeout (also the cap of the per-retry growth).
    pub rto_max: Duration,
    /// The least time an awaited page may trail a page requested after it before it counts
    /// as lost (the window is a quarter of the round trip where that is longer): the
    /// reordering allowed without a re-request.
    pub reorder_window: Duration,
    /// Pages of the aligned blocks whose missing pages each page fault requests together
    /// (fault-around; 0 or 1: none). Such a request asks for its block's pages in ascending
    /// runs (the faulted page, the ones after it, then the rest from the block's start), so
    /// two pages of a block arriving one after the other for another host's request, the
    /// second higher, say the pages between them were sent (see `loss`).
    pub request_block_pages: u64,
    /// Re-requests of a page after which it is requested with `UNICAST_REPLY`.
    pub unicast_after: u32,
    /// Rate reported (pages/s) before anything was measured.
    pub initial_rate: u32,
    /// The rate never drops below this (pages/s): halving on random, non-congestion loss
    /// must not starve the family.
    pub min_rate: u32,
    /// The rate never grows above this (pages/s).
    pub max_rate: u32,
    /// How often each family's rate is reported (and grown when nothing was lost). Keep it
    /// well below the server's `receiver_idle`.
    pub report_interval: Duration,
    /// Most pages partly received at once (each holds a 4 KiB buffer).
    pub max_partial_pages: usize,
    /// A page partly received for this long is dropped.
    pub partial_timeout: Duration,
    /// Most pages of a family requested and awaited at once; further requested pages wait
    /// here, in order, and are sent as earlier ones arrive. Bounds the server's queue for this
    /// receiver, so a timeout measures the network, not a deep queue, and a fault asked for
    /// after a large prefetch waits behind at most this many pages.
    pub max_in_flight: usize,
    /// Completed pages of which a copy is kept for the push stream's REPAIRs (the pages of a
    /// block that arrived are what rebuilds the others); 0 keeps none.
    pub repair_cache_pages: usize,
}

impl Default for ReceiverConfig {
    fn default() -> ReceiverConfig {
        ReceiverConfig {
            local_addr: Ipv4Addr::UNSPECIFIED,
            port: DEFAULT_PORT,
            rto_min: Duration::from_micros(500),
            rto_max: Duration::from_millis(500),
            reorder_window: Duration::from_millis(1),
            request_block_pages: 0,
            unicast_after: 3,
            initial_rate: 20_000,
            min_rate: 2_000,
            max_rate: 200_000,
            report_interval: Duration::from_millis(100),
            max_partial_pages: 1024,
            partial_timeout: Duration::from_secs(2),
            max_in_flight: 512,
            repair_cache_pages: 1024,
        }
    }
}
