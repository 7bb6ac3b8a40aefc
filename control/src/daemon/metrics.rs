//! `GET /metrics`: the daemon's Prometheus endpoint (`[metrics] listen`).
//!
//! The control plane counts tickets and clone operations as they happen
//! ([`ControlMetrics`]); everything else is read at each scrape from the
//! counters the fault handlers, page caches, memory servers and receive
//! path keep anyway, so the hot paths pay nothing for metrics. Counters of
//! hollow clones that ended are folded into running totals
//! ([`FaultTotals`]) as they end, so a counter never goes back when an
//! ended clone's record is dropped.
//!
//! OpenMetrics text is served to scrapers that ask for it (Prometheus
//! does); others get the Prometheus text format 0.0.4.

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use snowflock_fault_handler::{AvoidedPages, CloneStats, LatencySummary};

use super::Daemon;
use crate::metrics::ControlMetrics;
use crate::supervisor::VmRole;
use crate::sync::lock;

/// The OpenMetrics text format's content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the fault latency buckets, in microseconds: powers of 4
/// from 1 µs to ~4 s. The fault handlers' histograms report powers of two,
/// so every one of their buckets falls into exactly one of these.
const FAULT_BUCKETS_US: [u64; 12] = [
    1, 4, 16, 64, 256, 1_024, 4_096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304,
];

/// A latency distribution summed over clones.
#[derive(Debug, Clone, Default)]
pub(crate) struct LatencyTotals {
    count: u64,
    sum_us: f64,
    /// Faults per bucket of [`FAULT_BUCKETS_US`], not cumulative; the rest
    /// are above the last bound.
    buckets: [u64; FAULT_BUCKETS_US.len()],
}

impl LatencyTotals {
    fn add(&mut self, summary: &LatencySummary) {
        self.count += summary.count;
        self.sum_us += summary.mean_us * summary.count as f64;
        for &(upper_us, faults) in &summary.buckets {
            if let Some(bucket) = FAULT_BUCKETS_US.iter().position(|&bound| bound >= upper_us) {
                self.buckets[bucket] += faults;
            }
        }
    }

    /// The buckets as the encoder takes them: per bucket, in seconds, with
    /// `+Inf` last.
    fn buckets(&self) -> Vec<(f64, u64)> {
        let counted: u64 = self.buckets.iter().sum();
        FAULT_BUCKETS_US
            .iter()
            .zip(self.buckets)
            .map(|(&bound, faults)| (bound as f64 / 1e6, faults))
            .chain([(f64::INFINITY, self.count.saturating_sub(counted))])
            .collect()
    }
}

/// Fault counters of hollow clones, summed.
#[derive(Debug, Clone, Default)]
pub(crate) struct FaultTotals {
    faults: u64,
    network_faults: u64,
    pages_fetched: u64,
    bytes_fetched: u64,
    prefetched: u64,
    cache_hits: u64,
    avoided: AvoidedPages,
    pushed_used: u64,
    populated: u64,
    latency: LatencyTotals,
    network_latency: LatencyTotals,
}

impl FaultTotals {
    pub(crate) fn add(&mut self, stats: &CloneStats) {
        self.faults += stats.faults;
        self.network_faults += stats.fetch_latency.count;
        self.pages_fetched += stats.pages_fetched;
        self.bytes_fetched += stats.bytes_fetched;
        self.prefetched += stats.prefetched;
        self.cache_hits += stats.cache_hits;
        self.avoided += stats.avoided.clone();
        self.pushed_used += stats.pages_pushed_used;
        self.populated += stats.pages_populated;
        self.latency.add(&stats.latency);
        self.network_latency.add(&stats.fetch_latency);
    }
}

/// Builds the registry `sfd` serves: the control plane's metrics and the
/// daemon's, under the `snowflock_` prefix.
pub(crate) fn registry(control: &ControlMetrics, daemon: &Arc<Daemon>) -> Registry {
    let mut registry = Registry::with_prefix("snowflock");
    control.register(&mut registry);
    registry.register_collector(Box::new(DaemonCollector {
        daemon: Arc::downgrade(daemon),
    }));
    registry
}

/// Serves `registry` at `GET /metrics` on `listener` until the runtime
/// stops.
pub(crate) async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    let app = Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let registry = registry.clone();
            async move { scrape(&registry, &headers) }
        }),
    );
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "the metrics endpoint stopped");
    }
}

/// The encoded registry, in the format the scraper asked for.
fn scrape(registry: &Registry, headers: &HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    let mut body = String::new();
    let (encoded, content_type) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut body, registry),
            OPENMETRICS,
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    match encoded {
        Ok(()) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "encoding the metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the metrics failed\n",
            )
                .into_response()
        }
    }
}

/// Reads the daemon's counters at each scrape.
#[derive(Debug)]
struct DaemonCollector {
    /// Weak: the registry lives in the endpoint's task, which must not keep
    /// a stopped daemon alive.
    daemon: std::sync::Weak<Daemon>,
}

/// Writes one metric without labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    match kind {
        MetricType::Counter => metric.encode_counter::<NoLabelSet, _, u64>(&value, None),
        _ => metric.encode_gauge(&(value as i64)),
    }
}

/// Writes one metric with one label, a sample per value.
fn labelled(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    label: &str,
    samples: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for &(value_label, value) in samples {
        let labels = [(label, value_label)];
        let mut sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
            _ => sample.encode_gauge(&(value as i64))?,
        }
    }
    Ok(())
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    totals: &LatencyTotals,
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(totals.sum_us / 1e6, totals.count, &totals.buckets(), None)
}

impl Collector for DaemonCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(daemon) = self.daemon.upgrade() else {
            return Ok(());
        };
        let counter = MetricType::Counter;
        let gauge = MetricType::Gauge;
        let bytes = Some(&Unit::Bytes);

        let vms = daemon.supervisor.vms();
        let running = |role: VmRole| vms.iter().filter(|vm| vm.role == role).count() as u64;
        labelled(
            &mut encoder,
            "vms_running",
            "VMs running on this host, by how they came to run here",
            None,
            gauge,
            "role",
            &[
                ("root", running(VmRole::Root)),
                ("clone", running(VmRole::Clone)),
                ("hollow", running(VmRole::Hollow)),
            ],
        )?;
        single(
            &mut encoder,
            "clone_slots",
            "Clones this host runs at once",
            None,
            gauge,
            u64::from(daemon.config.limits.clone_slots),
        )?;
        single(
            &mut encoder,
            "clone_slots_in_use",
            "Clone slots reserved or running now",
            None,
            gauge,
            u64::from(daemon.supervisor.slots_in_use()),
        )?;

        let faults = daemon.fault_totals();
        single(
            &mut encoder,
            "faults",
            "Missing-page faults of hollow clones on this host",
            None,
            counter,
            faults.faults,
        )?;
        single(
            &mut encoder,
            "network_faults",
            "Faults of hollow clones that waited for a page from the network",
            None,
            counter,
            faults.network_faults,
        )?;
        histogram(
            &mut encoder,
            "fault_latency",
            "Time to serve a hollow clone's fault, from its event to its wake",
            &faults.latency,
        )?;
        histogram(
            &mut encoder,
            "network_fault_latency",
            "Time to serve the faults that waited for the network",
            &faults.network_latency,
        )?;
        single(
            &mut encoder,
            "pages_fetched",
            "Pages hollow clones waited for and got from the network (prefetches included)",
            None,
            counter,
            faults.pages_fetched,
        )?;
        single(
            &mut encoder,
            "pages_prefetched",
            "Of the pages fetched, those installed with no fault waiting",
            None,
            counter,
            faults.prefetched,
        )?;
        single(
            &mut encoder,
            "page_cache_hits",
            "Faults served from the host page cache",
            None,
            counter,
            faults.cache_hits,
        )?;
        labelled(
            &mut encoder,
            "pages_avoided",
            "Pages zero-filled instead of fetched, by reason",
            None,
            counter,
            "reason",
            &[
                ("zero", faults.avoided.zero),
                ("free_heap", faults.avoided.free_heap),
                ("fresh", faults.avoided.fresh),
            ],
        )?;
        single(
            &mut encoder,
            "pages_pushed_used",
            "Pages that arrived unasked (pushed or multicast for another host) and a clone then touched",
            None,
            counter,
            faults.pushed_used,
        )?;
        single(
            &mut encoder,
            "pages_populated",
            "Pages of the host cache mapped into hollow clones as they started",
            None,
            counter,
            faults.populated,
        )?;

        let unicast = daemon.memory.stats();
        let multicast = daemon.net.server_stats();
        labelled(
            &mut encoder,
            "pages_served",
            "Pages this host's memory servers sent, by distribution",
            None,
            counter,
            "distribution",
            &[
                ("unicast", unicast.pages_served),
                ("mcdist", multicast.pages_sent),
            ],
        )?;
        single(
            &mut encoder,
            "pages_pushed",
            "Pages multicast before any clone asked for them",
            None,
            counter,
            multicast.pushed_pages,
        )?;
        labelled(
            &mut encoder,
            "sent",
            "Page bytes this host's memory servers sent, by distribution",
            bytes,
            counter,
            "distribution",
            &[
                ("unicast", unicast.bytes_served),
                ("mcdist", multicast.bytes_sent),
            ],
        )?;
        let received = daemon.caches.received_bytes();
        labelled(
            &mut encoder,
            "received",
            "Page bytes this host's page caches received, by distribution",
            bytes,
            counter,
            "distribution",
            &[
                ("unicast", received.unicast),
                ("mcdist", received.multicast),
            ],
        )?;
        single(
            &mut encoder,
            "memory_server_auth_failures",
            "Connections to the unicast memory server that failed authentication (or took too long)",
            None,
            counter,
            unicast.auth_failures,
        )?;
        labelled(
            &mut encoder,
            "memory_server_refused_connections",
            "Connections the unicast memory server closed at once, by which limit was reached",
            None,
            counter,
            "limit",
            &[
                ("authenticated", unicast.refused),
                ("authenticating", unicast.refused_unauthenticated),
            ],
        )?;

        let (rx, xdp) = daemon.net.receiving_counters();
        labelled(
            &mut encoder,
            "mcdist_retransmission_requests",
            "Pages this host asked for again, by why they were taken for lost",
            None,
            counter,
            "reason",
            &[
                ("overtaken", rx.lost_overtaken),
                ("passed", rx.lost_passed),
                ("stalled", rx.lost_stalled),
                ("deadline", rx.lost_deadline),
            ],
        )?;
        single(
            &mut encoder,
            "mcdist_requests_received",
            "REQUEST datagrams this host's mcdist server took",
            None,
            counter,
            multicast.requests,
        )?;
        single(
            &mut encoder,
            "mcdist_duplicates_suppressed",
            "Page requests the mcdist server did not send again within its suppression window",
            None,
            counter,
            multicast.duplicates_suppressed,
        )?;
        single(
            &mut encoder,
            "mcdist_repairs_sent",
            "Reed-Solomon repair fragments sent",
            None,
            counter,
            multicast.repairs_sent,
        )?;
        single(
            &mut encoder,
            "mcdist_send_rate",
            "Pages per second the mcdist server sends at now, summed over its families",
            None,
            gauge,
            multicast
                .families
                .iter()
                .map(|family| u64::from(family.rate))
                .sum(),
        )?;
        labelled(
            &mut encoder,
            "mcdist_rejected_datagrams",
            "Datagrams dropped unread, by where and why (a wrong tag is forged or corrupted)",
            None,
            counter,
            "reason",
            &[
                ("receiver_mac", rx.mac_failed),
                ("receiver_malformed", rx.malformed),
                ("server_mac", multicast.mac_failed),
                ("server_malformed", multicast.malformed),
            ],
        )?;
        if let Some(xdp) = xdp {
            labelled(
                &mut encoder,
                "xdp_packets",
                "Packets the XDP program saw, by what it did with them",
                None,
                counter,
                "action",
                &[
                    ("redirected", xdp.redirected),
                    ("duplicate_dropped", xdp.duplicate_dropped),
                    ("passed", xdp.passed),
                    ("malformed", xdp.malformed),
                ],
            )?;
            labelled(
                &mut encoder,
                "xdp_socket_drops",
                "Frames the AF_XDP sockets lost, by reason (kernel XDP_STATISTICS)",
                None,
                counter,
                "reason",
                &[
                    ("socket", xdp.socket_dropped),
                    ("rx_ring_full", xdp.rx_ring_full),
                    ("fill_ring_empty", xdp.fill_ring_empty),
                ],
            )?;
        }
        Ok(())
    }
}

impl Daemon {
    /// Fault counters of every hollow clone this daemon ran: those that
    /// ended, and those running now.
    fn fault_totals(&self) -> FaultTotals {
        let hollow = lock(&self.hollow);
        let mut totals = lock(&self.ended_faults).clone();
        for record in hollow.values() {
            if let Some(faults) = &record.faults {
                totals.add(&faults.stats());
            }
        }
        totals
    }
}
