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
/// Random loss is not congestion: on a lossy link a share of the pages is lost whatever the
/// rate, and sending slower would not lower it, only starve the clones. So an interval is
/// taken for overload only when its loss share is well above the long-run loss rate: by more
/// than [`LOSS_MARGIN`] and by more than [`SIGMAS`] standard deviations of what random loss
/// at that rate gives over the interval's pages, with at least [`MIN_LOST`] pages lost. Then
/// the rate drops to 70%; otherwise it grows additively.
#[derive(Debug)]
pub(crate) struct AimdRate {
    rate: u32,
    min: u32,
    max: u32,
    step: u32,
    completed: u32,
    lost: u32,
    /// Long-run loss share: a slow running average over intervals with requests. Starts at
    /// the receiver's own long-run share (see [`AimdRate::with_long_run_loss`]), so a new
    /// family on a lossy link does not take the link's usual loss for overload.
    long_run_loss: f64,
}

/// The rate grows from `min` to `max` in this many report intervals without rising loss.
const INCREASE_STEPS: u32 = 32;
/// An overloaded interval's loss share is at least this much above the long-run share...
const LOSS_MARGIN: f64 = 0.05;
/// ...and this many standard deviations of random loss at the long-run share above it...
const SIGMAS: f64 = 3.0;
/// ...with at least this many pages lost (a few retries of slow pages are no signal).
const MIN_LOST: u32 = 4;
/// What an overloaded interval leaves of the rate.
const CUT: f64 = 0.7;
/// Weight of the newest interval in the long-run share: about the last 16 intervals.
const LONG_RUN_WEIGHT: f64 = 1.0 / 16.0;
/// The long-run share is never taken above this: losing nearly everything (an overrun
/// receiver, a dead path) stays overload however long it lasts.
const LONG_RUN_CAP: f64 = 0.75;

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
            long_run_loss: 0.0,
        }
    }

    /// Starts from the long-run loss share `share` (clamped to `0..=`[`LONG_RUN_CAP`]) seen
    /// elsewhere on the same path.
    pub(crate) fn with_long_run_loss(mut self, share: f64) -> AimdRate {
        self.long_run_loss = share.clamp(0.0, LONG_RUN_CAP);
        self
    }

    /// The long-run loss share.
    pub(crate) fn long_run_loss(&self) -> f64 {
        self.long_run_loss
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

    /// A report interval ended: cuts the rate if its loss share rose well above the long-run
    /// share, grows it otherwise. Returns whether it cut.
    pub(crate) fn on_interval(&mut self) -> bool {
        let (lost, total) = (self.lost, self.completed.saturating_add(self.lost));
        self.completed = 0;
        self.lost = 0;
        if total == 0 {
            self.rate = self.rate.saturating_add(self.step).min(self.max);
            return false;
        }
        let share = f64::from(lost) / f64::from(total);
        let usual = self.long_run_loss;
        let deviation = (usual * (1.0 - usual) / f64::from(total)).sqrt();
        let overloaded = lost >= MIN_LOST && share > usual + LOSS_MARGIN.max(SIGMAS * deviation);
        self.long_run_loss = (usual + LONG_RUN_WEIGHT * (share - usual)).min(LONG_RUN_CAP);
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

    /// A fixed-seed xorshift draw in `0..1`, so the tests see the same "random" loss each run.
    struct Draw(u64);

    impl Draw {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// One report interval in which `pages` requested pages each were lost with probability
    /// `loss`; returns whether the rate was cut.
    fn interval(rate: &mut AimdRate, draw: &mut Draw, pages: u32, loss: f64) -> bool {
        for _ in 0..pages {
            if draw.next() < loss {
                rate.on_loss(1);
            } else {
                rate.on_completed();
            }
        }
        rate.on_interval()
    }

    #[test]
    fn random_loss_is_not_taken_for_congestion() {
        let mut draw = Draw(0x9e37_79b9_7f4a_7c15);
        // A receiver that knows its path loses a fifth of the pages: never a cut, and the
        // rate grows to its maximum as on a clean path.
        let mut seeded = AimdRate::new(20_000, 2_000, 200_000).with_long_run_loss(0.2);
        let cuts: u32 = (0..300)
            .map(|_| u32::from(interval(&mut seeded, &mut draw, 100, 0.2)))
            .sum();
        assert_eq!(cuts, 0, "steady random loss cut the rate");
        assert_eq!(seeded.rate(), 200_000);
        assert!((seeded.long_run_loss() - 0.2).abs() < 0.05);
        // A receiver new to the path takes the first lossy intervals for overload, then learns
        // the usual share and stops cutting.
        let mut fresh = AimdRate::new(20_000, 2_000, 200_000);
        let early: u32 = (0..40)
            .map(|_| u32::from(interval(&mut fresh, &mut draw, 100, 0.2)))
            .sum();
        let late: u32 = (0..260)
            .map(|_| u32::from(interval(&mut fresh, &mut draw, 100, 0.2)))
            .sum();
        assert!(early >= 1, "no cut when loss first appeared");
        assert_eq!(late, 0, "cuts once the share is the usual one");
        // Few pages, few losses: a handful of slow pages is no signal.
        let mut quiet = AimdRate::new(20_000, 2_000, 200_000);
        quiet.on_completed();
        quiet.on_loss(MIN_LOST - 1);
        assert!(!quiet.on_interval());
    }

    #[test]
    fn loss_that_grows_with_the_rate_is_congestion_and_cuts_it_to_the_capacity() {
        let mut draw = Draw(0x2545_f491_4f6c_dd1d);
        // A path that takes 30 000 pages/s and drops what is sent beyond it, on top of 5%
        // random loss the receiver already knows about.
        let capacity = 30_000.0;
        let mut rate = AimdRate::new(150_000, 2_000, 200_000).with_long_run_loss(0.05);
        let mut cuts = 0;
        let mut rates = Vec::new();
        for _ in 0..300 {
            let sent = f64::from(rate.rate());
            let overflow = ((sent - capacity) / sent).max(0.0);
            let loss = 1.0 - (1.0 - overflow) * 0.95;
            cuts += u32::from(interval(&mut rate, &mut draw, 200, loss));
            rates.push(f64::from(rate.rate()));
        }
        assert!(cuts >= 3, "{cuts} cuts");
        let settled = rates[150..].iter().sum::<f64>() / 150.0;
        assert!(
            (capacity * 0.5..=capacity * 1.5).contains(&settled),
            "settled at {settled} pages/s against a capacity of {capacity}"
        );
        // Never below the minimum, whatever the loss.
        for _ in 0..100 {
            rate.on_loss(1000);
            rate.on_interval();
        }
        assert_eq!(rate.rate(), 2_000);
        assert_eq!(AimdRate::new(5, 100, 50).rate(), 100);
    }
}
