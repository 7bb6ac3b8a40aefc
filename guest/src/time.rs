//! Time from the host's monotonic clock (`TIME_NS`).
//!
//! Each reading is a hypercall (a VM exit): cheap enough for phase timings and
//! waiting loops, too slow for the inside of a hot loop.

use crate::hypercall;

/// The host's monotonic clock in nanoseconds. Clones read the same clock, so
/// values are comparable across a clone family on one host.
pub fn now_ns() -> u64 {
    hypercall::time_ns()
}

/// Nanoseconds since `start` (a value of [`now_ns`]).
pub fn since_ns(start: u64) -> u64 {
    now_ns().saturating_sub(start)
}

/// Busy-waits for `ns` nanoseconds (guests have no timer interrupt to sleep on).
pub fn spin_ns(ns: u64) {
    let start = now_ns();
    while since_ns(start) < ns {
        core::hint::spin_loop();
    }
}

/// The CPU's time-stamp counter: no VM exit, so it can time single memory
/// accesses (a clone's page faults). Clones keep their parent's TSC rate.
pub fn cycles() -> u64 {
    // SAFETY: `rdtsc` only reads the time-stamp counter; the VMM leaves
    // CR4.TSD clear, so it is allowed at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Converts a [`cycles`] difference to nanoseconds with the TSC rate the
/// host reported at boot; `None` if it did not report one.
pub fn cycles_to_ns(cycles: u64) -> Option<u64> {
    let khz = crate::boot_info().tsc_khz;
    (khz > 0).then(|| (u128::from(cycles) * 1_000_000 / u128::from(khz)) as u64)
}

/// Formats nanoseconds as milliseconds with three decimals, e.g. `12.345`.
#[derive(Clone, Copy, Debug)]
pub struct Millis(pub u64);

impl core::fmt::Display for Millis {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1_000_000, self.0 / 1_000 % 1_000)
    }
}
