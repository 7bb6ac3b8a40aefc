//! The receiver's counters ([`ReceiverStats`]), kept for the whole receiver and per family.

/// Counters of a receiver (all families) or of one family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiverStats {
    /// Datagrams handed to the core (family stats: those that decoded as this family's).
    pub datagrams: u64,
    /// Authenticated fragments of a joined family and generation.
    pub fragments: u64,
    /// Pages completed and delivered.
    pub pages_completed: u64,
    /// Of those, pages this host had not requested (arrived for a sibling, or pushed).
    pub early_pages: u64,
    /// Fragments dropped because their page was already held or the fragment had arrived.
    pub duplicate_fragments: u64,
    /// Datagrams with a wrong tag (forged or corrupted).
    pub mac_failed: u64,
    /// Datagrams that were short, of another version, kind or shape, inconsistent with the
    /// other fragments of their page, for a page past the family's end, or not meant for a
    /// receiver.
    pub malformed: u64,
    /// Authenticated datagrams of a family this host has not joined, or of another generation.
    pub not_ours: u64,
    /// Partial pages dropped (timed out or evicted by newer ones).
    pub partials_dropped: u64,
    /// REQUEST datagrams sent (page requests, re-requests, reports, JOIN, LEAVE).
    pub requests_sent: u64,
    /// Pages requested for the first time.
    pub pages_requested: u64,
    /// Pages requested again after their timeout.
    pub re_requests: u64,
    /// Of those, pages partly received, asked for by their missing fragments only.
    #[serde(default)]
    pub fragment_re_requests: u64,
    /// Re-requested pages by why they were taken for lost: a page requested after them
    /// arrived, nothing requested arrived for a timeout, or they waited past their deadline.
    #[serde(default)]
    pub lost_overtaken: u64,
    /// ... or pages of their block sent after them for another host arrived.
    #[serde(default)]
    pub lost_passed: u64,
    #[serde(default)]
    pub lost_stalled: u64,
    #[serde(default)]
    pub lost_deadline: u64,
    /// Expired timers of pages not taken for lost (the family was still being served).
    #[serde(default)]
    pub retries_deferred: u64,
    /// REQUEST datagrams sent with `UNICAST_REPLY`.
    pub unicast_requests: u64,
    /// Report-only REQUESTs sent (no pages).
    pub reports_sent: u64,
    /// REQUESTs the transport failed to send.
    pub send_errors: u64,
    /// REJECTs received for a joined family.
    pub rejects: u64,
    /// Fragments that came with the `UNICAST` flag.
    pub unicast_fragments: u64,
    /// Fragments that came with the `PUSH` flag.
    pub pushed_fragments: u64,
    /// REPAIRs (recovery symbols of pushed pages) of a joined family and generation.
    #[serde(default)]
    pub repair_symbols: u64,
    /// Pages rebuilt from REPAIRs.
    #[serde(default)]
    pub pages_repaired: u64,
    /// Times the rate was cut.
    pub rate_cuts: u64,
    /// Request-to-page times sampled (pages never re-requested), and their sum in µs: their
    /// mean is what the retransmission timeout is built from.
    #[serde(default)]
    pub rtt_samples: u64,
    #[serde(default)]
    pub rtt_total_us: u64,
    /// The retransmission timeouts that expired (one per re-requested page), summed in µs:
    /// with `re_requests`, the mean time a lost page waited before it was asked again.
    #[serde(default)]
    pub retry_wait_total_us: u64,
    /// The current rate estimate, pages/s (receiver stats: the lowest of its families; 0
    /// without families).
    pub rate: u32,
    /// Pages requested and not yet received.
    pub outstanding: u64,
    /// Of those, pages waiting to be sent to the server (beyond `max_in_flight`).
    #[serde(default)]
    pub queued: u64,
    /// Pages partly received now (receiver stats only).
    pub partial_pages: u64,
    /// Datagrams longer than any mcdist datagram (socket path).
    pub truncated: u64,
    /// Failed receives (socket path).
    pub receive_errors: u64,
    /// Times the receive buffers ran out before the loop returned them (socket path).
    pub buffers_exhausted: u64,
}

/// Adds to both the receiver's and the family's counters.
pub(super) fn count(
    global: &mut ReceiverStats,
    family: &mut ReceiverStats,
    add: impl Fn(&mut ReceiverStats),
) {
    add(global);
    add(family);
}
