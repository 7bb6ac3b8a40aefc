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
}

/// A page requested and awaited.
#[derive(Debug)]
pub(super) struct Outstanding {
    pub(super) first_sent: Instant,
    /// The part of its wait that is its place in the server's queue (see [`queueing`]).
    pub(super) queued_for: Duration,
    pub(super) retry_at: Instant,
    pub(super) retries: u32,
}

/// How long the server takes to send `pages` pages to a receiver that reported `rate`: it
/// never sends the family faster, so a page with `pages - 1` requested pages ahead of it
/// cannot arrive sooner. Added to its timeout, so that a long request is not re-requested
/// while it is still being served, and taken off its request-to-page time, so that the
/// timeout stays a measure of the network.
pub(super) fn queueing(pages: usize, rate: u32) -> Duration {
    Duration::from_secs_f64(pages as f64 / f64::from(rate.max(1)))
}
