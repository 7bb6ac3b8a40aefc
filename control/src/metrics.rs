//! What the control plane counts as things happen, for Prometheus: tickets
//! and what they were granted, clone operations, their latency and pause,
//! descriptors, and how clones ended. The daemon adds what it reads at each
//! scrape (faults, pages, bytes, the network) and serves them all
//! (`daemon::metrics`).
//!
//! Labels name kinds, never single clones or VMs: one series per clone would
//! grow without bound in a long-running daemon.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::outcome::CloneReport;

/// One label and its value.
pub type Label = [(&'static str, &'static str); 1];

/// Clone latencies, from a few milliseconds (one local clone) to seconds
/// (dozens of clones on loaded hosts).
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A parent's pause for a capture: hundreds of microseconds to tens of
/// milliseconds.
const PAUSE_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A ticket's wait for its grant: immediate for the static backend, up to
/// the allocation timeout for a scheduler's.
const WAIT_BUCKETS: [f64; 12] = [
    0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0,
];

/// The control plane's counters. Cheap to update (atomics); cloned handles
/// share their values.
#[derive(Debug)]
pub struct ControlMetrics {
    tickets: Counter,
    clones_requested: Counter,
    clones_granted: Family<Label, Counter>,
    allocation_wait: Histogram,
    clone_operations: Counter,
    clones_started: Family<Label, Counter>,
    clones_ended: Family<Label, Counter>,
    clone_latency: Histogram,
    clone_pause: Histogram,
    descriptor_bytes: Counter,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self {
            tickets: Counter::default(),
            clones_requested: Counter::default(),
            clones_granted: Family::default(),
            allocation_wait: Histogram::new(WAIT_BUCKETS),
            clone_operations: Counter::default(),
            clones_started: Family::default(),
            clones_ended: Family::default(),
            clone_latency: Histogram::new(LATENCY_BUCKETS),
            clone_pause: Histogram::new(PAUSE_BUCKETS),
            descriptor_bytes: Counter::default(),
        }
    }
}

/// Where a clone runs, as a label value.
pub(crate) fn placement(remote: bool) -> &'static str {
    if remote { "remote" } else { "local" }
}

impl ControlMetrics {
    /// A ticket for `requested` clones got `local` slots here and `remote`
    /// on other hosts after `waited`.
    pub(crate) fn ticket(&self, requested: u32, local: u32, remote: u32, waited: Duration) {
        self.tickets.inc();
        self.clones_requested.inc_by(u64::from(requested));
        for (slots, remote_host) in [(local, false), (remote, true)] {
            if slots > 0 {
                self.clones_granted
                    .get_or_create(&[("placement", placement(remote_host))])
                    .inc_by(u64::from(slots));
            }
        }
        self.allocation_wait.observe(waited.as_secs_f64());
    }

    /// Clones of one operation started: `local` here, `remote` elsewhere.
    pub(crate) fn clones_started(&self, local: u64, remote: u64) {
        for (count, remote_host) in [(local, false), (remote, true)] {
            if count > 0 {
                self.clones_started
                    .get_or_create(&[("placement", placement(remote_host))])
                    .inc_by(count);
            }
        }
    }

    /// A clone operation was joined (or its parent ended): its figures and
    /// how each child ended.
    pub(crate) fn operation_done(&self, report: &CloneReport) {
        self.clone_operations.inc();
        if report.clones == 0 {
            return;
        }
        if let Some(all_running) = report.all_running {
            self.clone_latency.observe(all_running.as_secs_f64());
        }
        self.clone_pause.observe(report.capture_pause.as_secs_f64());
        self.descriptor_bytes.inc_by(report.descriptor_bytes as u64);
        for child in &report.children {
            self.clones_ended
                .get_or_create(&[("outcome", child.outcome.kind())])
                .inc();
        }
    }

    /// Adds every metric to `registry` (its prefix is the caller's).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tickets",
            "Tickets requested by guests (clone slot allocations)",
            self.tickets.clone(),
        );
        registry.register(
            "allocation_requested_clones",
            "Clones asked for in tickets",
            self.clones_requested.clone(),
        );
        registry.register(
            "allocation_granted_clones",
            "Clone slots granted to tickets, by where they are",
            self.clones_granted.clone(),
        );
        registry.register_with_unit(
            "allocation_wait",
            "Time from a ticket request to its grant",
            Unit::Seconds,
            self.allocation_wait.clone(),
        );
        registry.register(
            "clone_operations",
            "Clone operations joined (clone and create-from-checkpoint)",
            self.clone_operations.clone(),
        );
        registry.register(
            "clones_started",
            "Clones started by this host's VMs, by where they run",
            self.clones_started.clone(),
        );
        registry.register(
            "clones_ended",
            "Clones of this host's VMs that ended, by outcome",
            self.clones_ended.clone(),
        );
        registry.register_with_unit(
            "clone_latency",
            "Time from a clone call to the last of its clones running guest code",
            Unit::Seconds,
            self.clone_latency.clone(),
        );
        registry.register_with_unit(
            "clone_pause",
            "Time a parent VM was stopped for the capture of a clone point",
            Unit::Seconds,
            self.clone_pause.clone(),
        );
        registry.register_with_unit(
            "descriptor",
            "Encoded size of the VM descriptors of clone points",
            Unit::Bytes,
            self.descriptor_bytes.clone(),
        );
    }
}
