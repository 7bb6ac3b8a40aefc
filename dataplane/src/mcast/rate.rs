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

/// A receiver's estimate of the rate it can take, updated once per report interval from the
/// share of its requested pages that had to be re-requested (lost).
///
/// A loss share well above its running average means the receiver (or the path to it) is
/// overrun: the rate drops to 70%. A steady share, however high (random loss on a lossy
/// link), cuts nothing: lowering the rate would not lower it, and would starve the clones;
/// then the rate grows additively, as it does without loss.
#[derive(Debug)]
pub(crate) struct AimdRate {
    rate: u32,
    min: u32,
    max: u32,
    step: u32,
    completed: u32,
    lost: u32,
    /// Running average of the loss share; starts at 0 (a path is assumed clean until seen).
    average_loss: f64,
}

/// The rate grows from `min` to `max` in this many report intervals without rising loss.
const INCREASE_STEPS: u32 = 32;
/// A loss share this much above twice its running average is taken for overload.
const LOSS_MARGIN: f64 = 0.05;
/// What an overloaded interval leaves of the rate.
const CUT: f64 = 0.7;
/// Weight of the newest interval in the running average.
const AVERAGE_WEIGHT: f64 = 0.25;

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
            completed: 0,
            lost: 0,
            average_loss: 0.0,
        }
    }

    /// The current estimate.
    pub(crate) fn rate(&self) -> u32 {
        self.rate
    }

    /// A requested page arrived.
    pub(crate) fn on_completed(&mut self) {
        self.completed = self.completed.saturating_add(1);
    }

    /// `pages` requested pages had to be re-requested.
    pub(crate) fn on_loss(&mut self, pages: u32) {
        self.lost = self.lost.saturating_add(pages);
    }

    /// A report interval ended: cuts the rate if its loss share rose well above the usual,
    /// grows it otherwise. Returns whether it cut.
    pub(crate) fn on_interval(&mut self) -> bool {
        let total = self.completed + self.lost;
        let share = if total == 0 {
            0.0
        } else {
            f64::from(self.lost) / f64::from(total)
        };
        self.completed = 0;
        self.lost = 0;
        let overloaded = share > LOSS_MARGIN + 2.0 * self.average_loss;
        if total > 0 {
            self.average_loss += AVERAGE_WEIGHT * (share - self.average_loss);
        }
        if overloaded {
            let cut = ((f64::from(self.rate) * CUT) as u32).max(self.min);
            let changed = cut < self.rate;
            self.rate = cut;
            changed
        } else {
            self.rate = self.rate.saturating_add(self.step).min(self.max);
            false
        }
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
    fn rising_loss_cuts_the_rate_and_steady_loss_does_not() {
        let mut rate = AimdRate::new(32_000, 1000, 33_000);
        // Clean intervals grow it.
        for _ in 0..3 {
            rate.on_completed();
            assert!(!rate.on_interval());
        }
        assert_eq!(rate.rate(), 33_000, "never above the maximum");
        // Loss appears: overload.
        for _ in 0..10 {
            rate.on_completed();
        }
        rate.on_loss(10);
        assert!(rate.on_interval());
        assert_eq!(rate.rate(), 23_100);
        // The same share again and again becomes the usual one: no more cuts, growth again.
        let mut cuts = 0;
        for _ in 0..40 {
            for _ in 0..10 {
                rate.on_completed();
            }
            rate.on_loss(10);
            cuts += u32::from(rate.on_interval());
        }
        assert!(cuts <= 4, "{cuts} cuts for a steady loss share");
        assert_eq!(rate.rate(), 33_000);
        // A jump above the usual share cuts again, never below the minimum.
        for _ in 0..100 {
            rate.on_loss(1000);
            rate.on_interval();
        }
        assert!(rate.rate() >= 1000);
        assert_eq!(AimdRate::new(5, 100, 50).rate(), 100);
    }
}
