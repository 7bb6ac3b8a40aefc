//! `mcast-scale`: what N clones of example (a) cost the parent's host on the
//! wire, by mcdist and by unicast, measured in the same run on the same kind
//! of 4-host network-namespace cluster.
//!
//! "Bytes sent" is the parent host's `eth0` transmit counter across the job
//! (everything it sent: pages, fragments, control traffic), read from the
//! kernel, not from snowflock's own counters.

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use snowflock_testkit::{HostInfo, NetnsCluster};

use crate::record::Sink;
use crate::remote::{Setup, emit, number, run_job, seqsearch_args, up};

/// Clone slots per host: 32 clones fit 4 hosts.
const SLOTS: u32 = 8;
const HOSTS: usize = 4;

fn tx_bytes(host: &HostInfo) -> Result<u64> {
    let out = host
        .command("cat")
        .arg("/sys/class/net/eth0/statistics/tx_bytes")
        .output()
        .with_context(|| format!("reading {}'s transmit counter", host.name))?;
    if !out.status.success() {
        bail!(
            "reading {}'s transmit counter failed: {}",
            host.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("parsing tx_bytes")
}

fn measure(
    setup: &Setup,
    cluster: &NetnsCluster,
    distribution: &str,
    counts: &[u32],
    sink: &mut dyn Sink,
) -> Result<Vec<(u32, f64)>> {
    let parent = cluster.host(0)?;
    let mut medians = Vec::new();
    for &n in counts {
        let params: Map<String, Value> = [
            ("distribution".to_string(), json!(distribution)),
            ("clones".to_string(), json!(n)),
            ("hosts".to_string(), json!(HOSTS)),
            ("args".to_string(), json!(seqsearch_args(n))),
        ]
        .into_iter()
        .collect();
        let (mut sent, mut job) = (Vec::new(), Vec::new());
        for run in 0..setup.runs {
            eprintln!(
                "mcast-scale: {distribution}, {n} clones, run {}/{}",
                run + 1,
                setup.runs
            );
            let before = tx_bytes(parent)?;
            let end = run_job(&parent.socket, "seqsearch", 512 << 20, &seqsearch_args(n))?;
            let after = tx_bytes(parent)?;
            let report = end.reports.first().context("no clone report")?;
            if report.clones != n {
                bail!("granted {} of {n} clones", report.clones);
            }
            sent.push(after.saturating_sub(before) as f64 / f64::from(1 << 20));
            job.push(
                number(&end.lines, "seqsearch:", "clone_ms")?
                    + number(&end.lines, "seqsearch:", "join_ms")?,
            );
        }
        let median = emit(
            sink,
            "mcast-scale",
            "parent_bytes_sent",
            &sent,
            "MiB",
            &params,
        )?;
        emit(sink, "mcast-scale", "job_time", &job, "ms", &params)?;
        medians.push((n, median));
    }
    Ok(medians)
}

/// `mcast-scale`.
pub fn mcast_scale(
    setup: &Setup,
    counts: &[u32],
    rx_path: &str,
    sink: &mut dyn Sink,
) -> Result<()> {
    if counts.is_empty() {
        bail!("no clone counts");
    }
    let mut results = Vec::new();
    for distribution in ["mcdist", "unicast"] {
        let (cluster, _dir) = up(
            setup,
            HOSTS,
            SLOTS,
            &[],
            &[
                ("distribution", toml::Value::String(distribution.into())),
                ("rx_path", toml::Value::String(rx_path.into())),
            ],
        )?;
        let medians = measure(setup, &cluster, distribution, counts, sink)?;
        cluster.down()?;
        results.push((distribution, medians));
    }
    let first = counts[0];
    let last = counts[counts.len() - 1];
    for (distribution, medians) in &results {
        let at = |n: u32| medians.iter().find(|(c, _)| *c == n).map(|(_, b)| *b);
        if let (Some(one), Some(many)) = (at(first), at(last)) {
            let params: Map<String, Value> = [
                ("distribution".to_string(), json!(distribution)),
                ("from_clones".to_string(), json!(first)),
                ("to_clones".to_string(), json!(last)),
            ]
            .into_iter()
            .collect();
            sink.emit(crate::record::Record::new(
                "mcast-scale",
                "parent_bytes_growth",
                many / one.max(f64::MIN_POSITIVE),
                "ratio",
                &params,
            ))?;
        }
    }
    let (mcdist, unicast) = (&results[0].1, &results[1].1);
    for (&(n, m), &(_, u)) in mcdist.iter().zip(unicast) {
        let params: Map<String, Value> = [("clones".to_string(), json!(n))].into_iter().collect();
        sink.emit(crate::record::Record::new(
            "mcast-scale",
            "unicast_to_mcdist_bytes",
            u / m.max(f64::MIN_POSITIVE),
            "ratio",
            &params,
        ))?;
    }
    Ok(())
}
