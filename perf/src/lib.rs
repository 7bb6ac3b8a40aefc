//! snowflock benchmarks.
//!
//! Each scenario measures one part of the system on the real hypervisor and
//! reports JSON lines following the project's benchmark output contract
//! (see [`record`]). Times on the shared 2-core development machines are
//! noisy, so every scenario repeats its measurement and reports medians
//! (plus the spread), and measures its baseline in the same run, interleaved
//! with the measured runs, so both see the same machine state.
//!
//! The binary `sf-bench` is the entry point; `docs/benchmarks.md` explains the
//! scenarios, their metrics and targets.

pub mod clone_local;
pub mod cpu;
pub mod job;
pub mod mcast;
pub mod plot;
pub mod record;
pub mod remote;
pub mod rx_path;
pub mod soak;
pub mod stats;
mod sync;
pub mod syscall;
