//! Flow control: the server's token bucket and the receiver's AIMD rate estimate.
//!
//! Rates are in pages per second; one page is one token, whatever its fragment count.

use std::time::{Duration, Instant};

/// Burst a bucket allows: this long at its rate...
const BURST_TIME: Duration = Duration::from_millis(5);
/// ...but at least this many pages (so slow rates still send a page at once)...
const MIN_BURST: f64 = 4.0;
/// ...and at most this many (so a burst fits a receiver's socket buffer).
const MAX_BURST: f64 = 64.0;

/// Paces a family's sends at a rate that may change at any time.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    rate: u32,
    last: Instant,
}

fn burst(rate: u32) -> f64 {
    (f64::from(rate) * BURST_TIME.as_secs_f64()).clamp(MIN_BURST, MAX_BURST)
}

impl TokenBucket {
    /// A full bucket at `rate`.
    pub(crate) fn new(rate: u32, now: Instant) -> TokenBucket {
        let rate = rate.max(1);
        TokenBucket {
            tokens: burst(rate),
            rate,
            last: now,
        }
    }

    /// Adds the tokens earned since the last refill at the old rate, then switches to `rate`.
    pub(crate) fn refill(&mut self, now: Instant, rate: u32) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.rate = rate.max(1);
        self.tokens = (self.tokens + elapsed * f64::from(self.rate)).min(burst(self.rate));
    }

    /// Whole tokens available now.
    pub(crate) fn available(&self) -> u32 {
        self.tokens.max(0.0) as u32
    }

    /// Spends `pages` tokens.
    pub(crate) fn take(&mut self, pages: u32) {
        self.tokens -= f64::from(pages);
    }

    /// How long until `pages` tokens are available at the current rate.
    pub(crate) fn wait_for(&self, pages: u32) -> Duration {
        let missing = f64::from(pages) - self.tokens;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / f64::from(self.rate))
        }
    }
}

/// A receiver's estimate of the rate it can take: additive increase while nothing is lost,
/// multiplicative (halving) decrease on loss.
#[derive(Debug)]
pub(crate) struct AimdRate {
    rate: u32,
    min: u32,
    max: u32,
    step: u32,
    lost_this_interval: bool,
    last_cut: Option<Instant>,
}

/// The rate grows from `min` to `max` in this many loss-free report intervals.
const INCREASE_STEPS: u32 = 32;

impl AimdRate {
    /// Starts at `initial`, kept within `min..=max` (`min` at least 1).
    pub(crate) fn new(initial: u32, min: u32, max: u32) -> AimdRate {
        let min = min.max(1);
        let max = max.max(min);
        AimdRate {
            rate: initial.clamp(min, max),
            min,
            max,
            step: ((max - min) / INCREASE_STEPS).max(1),
            lost_this_interval: false,
            last_cut: None,
        }
    }

    /// The current estimate.
    pub(crate) fn rate(&self) -> u32 {
        self.rate
    }

    /// A page had to be re-requested. Halves the rate unless it was already halved less than
    /// `holdoff` ago (one loss event often costs several pages). Returns whether it halved.
    pub(crate) fn on_loss(&mut self, now: Instant, holdoff: Duration) -> bool {
        self.lost_this_interval = true;
        if self
            .last_cut
            .is_some_and(|cut| now.saturating_duration_since(cut) < holdoff)
        {
            return false;
        }
        self.last_cut = Some(now);
        let halved = (self.rate / 2).max(self.min);
        let cut = halved < self.rate;
        self.rate = halved;
        cut
    }

    /// A report interval ended: grows the rate if nothing was lost in it.
    pub(crate) fn on_interval(&mut self) {
        if !self.lost_this_interval {
            self.rate = self.rate.saturating_add(self.step).min(self.max);
        }
        self.lost_this_interval = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_at_its_rate_and_caps_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, start);
        assert_eq!(bucket.available(), 5);
        bucket.take(5);
        assert_eq!(bucket.available(), 0);
        let wait = bucket.wait_for(2);
        assert!(wait > Duration::from_micros(1990) && wait < Duration::from_micros(2010));
        bucket.refill(start + Duration::from_micros(3500), 1000);
        assert_eq!(bucket.available(), 3);
        // A long idle time earns no more than the burst.
        bucket.refill(start + Duration::from_secs(10), 1000);
        assert_eq!(bucket.available(), 5);
        // A rate change applies from the refill on.
        bucket.take(5);
        bucket.refill(start + Duration::from_secs(10), 100_000);
        let wait = bucket.wait_for(10);
        assert!(wait > Duration::from_micros(99) && wait < Duration::from_micros(101));
        let slow = TokenBucket::new(10, start);
        assert_eq!(slow.available(), 4);
        let fast = TokenBucket::new(10_000_000, start);
        assert_eq!(fast.available(), 64);
    }

    #[test]
    fn aimd_halves_on_loss_once_per_holdoff_and_grows_without_loss() {
        let start = Instant::now();
        let holdoff = Duration::from_millis(50);
        let mut rate = AimdRate::new(32_000, 1000, 33_000);
        assert!(rate.on_loss(start, holdoff));
        assert_eq!(rate.rate(), 16_000);
        assert!(!rate.on_loss(start + Duration::from_millis(10), holdoff));
        assert_eq!(rate.rate(), 16_000);
        rate.on_interval();
        assert_eq!(rate.rate(), 16_000, "no growth in an interval with loss");
        rate.on_interval();
        assert_eq!(rate.rate(), 17_000);
        assert!(rate.on_loss(start + Duration::from_millis(60), holdoff));
        assert_eq!(rate.rate(), 8_500);
        for _ in 0..100 {
            rate.on_loss(start + Duration::from_secs(100), Duration::ZERO);
        }
        assert_eq!(rate.rate(), 1000, "never below the minimum");
        for _ in 0..100 {
            rate.on_interval();
        }
        assert_eq!(rate.rate(), 33_000, "never above the maximum");
        assert_eq!(AimdRate::new(5, 100, 50).rate(), 100);
    }
}
