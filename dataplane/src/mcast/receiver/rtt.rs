//! What the retransmission timeout of a requested page is made of: the request-to-page time
//! estimate, each awaited page's record, and the server's queueing time.

use std::time::{Duration, Instant};

/// Request-to-page time estimate (RFC 6298's smoothing), for the retransmission timeout.
#[derive(Debug, Default)]
pub(super) struct RttEstimate {
    smoothed: Option<Duration>,
    variation: Duration,
}

impl RttEstimate {
    pub(super) fn sample(&mut self, rtt: Duration) {
        match self.smoothed {
            None => {
                self.smoothed = Some(rtt);
                self.variation = rtt / 2;
            }
            Some(smoothed) => {
                self.variation = (self.variation * 3 + smoothed.abs_diff(rtt)) / 4;
                self.smoothed = Some((smoothed * 7 + rtt) / 8);
            }
        }
    }

    pub(super) fn rto(&self, min: Duration, max: Duration) -> Duration {
        let rto = match self.smoothed {
            Some(smoothed) => smoothed + self.variation * 4,
            // Before any sample: a quarter of the maximum, so a first loss costs little but a
            // server still queueing at its initial rate is not flooded with retries.
            None => max / 4,
        };
        rto.clamp(min, max.max(min))
    }

    /// How long an overtaken page may still arrive before it counts as lost: a quarter of the
    /// round trip (as RACK's reordering window), at least `floor`: the path may reorder (the
    /// server's send threads, a datagram held back on the way).
    pub(super) fn reorder_window(&self, floor: Duration) -> Duration {
        self.smoothed
            .map_or(floor, |smoothed| (smoothed / 4).max(floor))
    }
}

/// A page requested and awaited.
#[derive(Debug)]
pub(super) struct Outstanding {
    /// The number of its last request in the family's order (see `LossDetector`).
    pub(super) seq: u64,
    pub(super) first_sent: Instant,
    /// When it was last asked for (first or re-requested).
    pub(super) last_sent: Instant,
    /// The part of its wait that is its place in the server's queue (see [`queueing`]).
    pub(super) queued_for: Duration,
    /// When its timer next expires: it is then re-requested if it is lost.
    pub(super) retry_at: Instant,
    /// When it counts as lost even while the family progresses.
    pub(super) deadline: Instant,
    pub(super) retries: u32,
    /// Pages of its block sent after it for another host's request arrived since it was
    /// last asked for (see `loss`): it is lost when its timer next expires.
    pub(super) passed: bool,
}

/// How long the server takes to send `pages` pages to a receiver that reported `rate`: it
/// never sends the family faster, so a page with `pages - 1` requested pages ahead of it
/// cannot arrive sooner. Added to its timeout, so that a long request is not re-requested
/// while it is still being served, and taken off its request-to-page time, so that the
/// timeout stays a measure of the network.
pub(super) fn queueing(pages: usize, rate: u32) -> Duration {
    Duration::from_secs_f64(pages as f64 / f64::from(rate.max(1)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{RttEstimate, queueing};

    const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_millis(500);

    #[test]
    fn the_timeout_follows_the_smoothed_rtt_and_its_variation_within_bounds() {
        let mut rtt = RttEstimate::default();
        assert_eq!(rtt.rto(MIN, MAX), MAX / 4, "before any sample");
        rtt.sample(Duration::from_millis(40));
        assert_eq!(rtt.rto(MIN, MAX), Duration::from_millis(40 + 4 * 20));
        rtt.sample(Duration::from_millis(48));
        // Variation (3 × 20 + 8) / 4 = 17, smoothed (7 × 40 + 48) / 8 = 41.
        assert_eq!(rtt.rto(MIN, MAX), Duration::from_millis(41 + 4 * 17));
        let mut fast = RttEstimate::default();
        fast.sample(Duration::from_millis(1));
        assert_eq!(fast.rto(MIN, MAX), MIN);
        let mut slow = RttEstimate::default();
        slow.sample(Duration::from_secs(1));
        assert_eq!(slow.rto(MIN, MAX), MAX);
    }

    #[test]
    fn queueing_is_the_pages_ahead_at_the_rate() {
        assert_eq!(queueing(100, 1000), Duration::from_millis(100));
        assert_eq!(
            queueing(1, 0),
            Duration::from_secs(1),
            "a zero rate counts as 1"
        );
        assert_eq!(queueing(0, 1000), Duration::ZERO);
    }
}
