//! Clocks without exits: the TSC, calibrated by the host at boot
//! (`BootInfo::tsc_khz`), extrapolates from an anchor the VMM gives
//! (`CLOCKS`: host monotonic and real time). The anchor is renewed after a
//! second of TSC time, and whenever the TSC went backwards (a clone resumed
//! on another host), so the error stays small and readings never go back.

use snowflock_guest::abi::nr;
use snowflock_guest::hypercall;

const NS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug)]
pub(crate) struct Clock {
    tsc_khz: u64,
    anchor_tsc: u64,
    anchor_monotonic: u64,
    anchor_real: u64,
    last_monotonic: u64,
}

/// Monotonic and real time, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub(crate) monotonic: u64,
    pub(crate) real: u64,
}

fn host_clocks() -> (u64, u64) {
    // SAFETY: CLOCKS takes no arguments and touches no guest memory.
    unsafe { hypercall::call(nr::CLOCKS, 0, 0, 0, 0) }
}

impl Clock {
    pub(crate) fn new(tsc_khz: u64) -> Self {
        let mut clock = Self {
            tsc_khz,
            anchor_tsc: 0,
            anchor_monotonic: 0,
            anchor_real: 0,
            last_monotonic: 0,
        };
        clock.anchor();
        clock
    }

    fn anchor(&mut self) {
        self.anchor_tsc = snowflock_guest::time::cycles();
        (self.anchor_monotonic, self.anchor_real) = host_clocks();
    }

    pub(crate) fn now(&mut self) -> Now {
        let elapsed = if self.tsc_khz == 0 {
            self.anchor();
            0
        } else {
            let mut cycles = snowflock_guest::time::cycles().wrapping_sub(self.anchor_tsc);
            if cycles > self.tsc_khz * 1000 {
                self.anchor();
                cycles = 0;
            }
            (u128::from(cycles) * 1_000_000 / u128::from(self.tsc_khz)) as u64
        };
        let monotonic = (self.anchor_monotonic + elapsed).max(self.last_monotonic);
        self.last_monotonic = monotonic;
        Now {
            monotonic,
            real: self.anchor_real + elapsed,
        }
    }
}

/// `struct timespec`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timespec {
    pub(crate) sec: i64,
    pub(crate) nsec: i64,
}

impl Timespec {
    pub(crate) fn from_ns(ns: u64) -> Self {
        Self {
            sec: (ns / NS_PER_SEC) as i64,
            nsec: (ns % NS_PER_SEC) as i64,
        }
    }

    /// Nanoseconds, or `None` for a negative or malformed value.
    pub(crate) fn to_ns(self) -> Option<u64> {
        if self.sec < 0 || !(0..NS_PER_SEC as i64).contains(&self.nsec) {
            return None;
        }
        (self.sec as u64)
            .checked_mul(NS_PER_SEC)
            .and_then(|ns| ns.checked_add(self.nsec as u64))
    }
}

/// Sleeps `ns` through `SLEEP_NS`, which sleeps at most `MAX_SLEEP_NS` a call.
pub(crate) fn sleep(clock: &mut Clock, ns: u64) {
    let until = clock.now().monotonic.saturating_add(ns);
    loop {
        let now = clock.now().monotonic;
        if now >= until {
            return;
        }
        // SAFETY: SLEEP_NS takes a number and touches no guest memory.
        unsafe { hypercall::call(nr::SLEEP_NS, until - now, 0, 0, 0) };
    }
}
