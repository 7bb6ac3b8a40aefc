//! `soak`: many clone-and-join cycles against real `sfd` daemons, checking
//! that what each daemon holds stays flat.
//!
//! Each variant brings up a network-namespace cluster and runs the `hello`
//! job again and again through h1's API: the parent clones, every child exits
//! with its id squared, the parent joins and checks, and the VM ends. Every
//! cycle's output, outcome, grant and placement are checked. `local` is one
//! host, its clones beside the parent. `remote` has `hosts` hosts and one
//! clone per host other than h1: the spread policy gives h1, the parent's
//! host, a clone only once every other host has one, so all of them run on
//! other hosts.
//!
//! Every `every` cycles, each daemon is sampled: resident memory, page tables
//! (`VmPTE`, kernel memory it causes), open descriptors, threads, clone slots
//! in use and VMs running, and the machine's kernel slab (every process's,
//! reported and not judged). The first sample, the one after the warm-up
//! (the reference) and the last are taken at rest: no VM running, and
//! descriptors and threads steady for a second (a daemon refills its pool of
//! prepared VMs and ends the threads of ended VMs after a job). The summary judges
//! each resource: memory by its fitted growth over the second half of the
//! cycles, descriptors and threads by their last value against the one after
//! the warm-up, slots and VMs by being zero at the end.

mod probe;
mod verdict;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use snowflock_control::VmOutcome;
use snowflock_control::client::{ApiClient, ApiError, VmEnd};
use snowflock_testkit::{ClusterSpec, NetnsCluster, TeardownError, UpError};

use crate::record::{Record, Sink};
use crate::stats::Summary;
use probe::{Daemon, ProbeError, Usage};
use verdict::Rule;

pub const BENCH: &str = "soak";

/// The guest every cycle runs.
const IMAGE: &str = "hello";
/// Where every daemon serves its metrics, on its control address.
const METRICS_PORT: u16 = 9464;
/// One cycle's bound: a job of a few milliseconds that takes this long is stuck.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the daemons get to come to rest after a cycle (their pools of
/// prepared VMs refilled, the threads of ended VMs gone).
const REST_TIMEOUT: Duration = Duration::from_secs(20);
const REST_POLL: Duration = Duration::from_millis(250);
/// Equal readings in a row that make a rest.
const REST_READINGS: u32 = 4;
/// Wrong results quoted in the error (all are counted).
const QUOTED_WRONG: usize = 5;

/// Where the clones run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Variant {
    /// One host: clones beside the parent.
    Local,
    /// Clones on the other hosts, one each.
    Remote,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Remote => "remote",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub variants: Vec<Variant>,
    pub cycles: u32,
    /// Cycles between samples.
    pub every: u32,
    /// The cycle whose sample is the reference of descriptors and threads.
    pub warmup: u32,
    /// Hosts of the remote variant (it runs `hosts - 1` clones a cycle).
    pub hosts: usize,
    /// Clones a cycle of the local variant.
    pub clones: u32,
    /// Guest memory of the job's VM.
    pub mem: u64,
    pub sfd: PathBuf,
}

impl Config {
    fn check(&self) -> Result<(), SoakError> {
        let problem = if self.every == 0 || self.cycles < 2 * self.every {
            "--cycles must be at least twice --every, which must be positive"
        } else if !self.warmup.is_multiple_of(self.every) || self.warmup > self.cycles / 2 {
            "--warmup must be a multiple of --every within the first half"
        } else if self.hosts < 2 {
            "the remote variant needs 2 hosts at least"
        } else if self.clones == 0 {
            "--clones must be positive"
        } else if self.variants.is_empty() {
            "no variant to run"
        } else {
            return Ok(());
        };
        Err(SoakError::Options(problem))
    }

    fn hosts(&self, variant: Variant) -> usize {
        match variant {
            Variant::Local => 1,
            Variant::Remote => self.hosts,
        }
    }

    fn clones(&self, variant: Variant) -> u32 {
        match variant {
            Variant::Local => self.clones,
            Variant::Remote => self.hosts as u32 - 1,
        }
    }
}

/// Why a soak failed.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("{0}")]
    Options(&'static str),
    #[error("no embedded image {IMAGE}")]
    NoImage,
    #[error("creating the cluster directory")]
    ClusterDir(#[source] std::io::Error),
    #[error("bringing up the {variant} cluster")]
    Up {
        variant: &'static str,
        #[source]
        source: Box<UpError>,
    },
    #[error("{host} of the {variant} cluster has no daemon")]
    NoDaemon { variant: &'static str, host: String },
    #[error("{variant} cycle {cycle}: the API of h1 failed")]
    Api {
        variant: &'static str,
        cycle: u32,
        #[source]
        source: ApiError,
    },
    #[error("{variant}: sampling {host}'s daemon at cycle {cycle}")]
    Probe {
        variant: &'static str,
        host: String,
        cycle: u32,
        #[source]
        source: ProbeError,
    },
    #[error("writing results")]
    Emit(#[from] std::io::Error),
    #[error("tearing down the {variant} cluster")]
    Down {
        variant: &'static str,
        #[source]
        source: TeardownError,
    },
    #[error("the soak failed: {}", .0.join("; "))]
    Failed(Vec<String>),
}

/// Why one cycle's result is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum Wrong {
    #[error("the parent ended {0:?}")]
    Outcome(VmOutcome),
    #[error("the parent did not print `{0}`")]
    Output(String),
    #[error("{0} clone reports, not 1")]
    Reports(usize),
    #[error("granted {granted} clones with {children} children, not {wanted}")]
    Granted {
        granted: u32,
        children: usize,
        wanted: u32,
    },
    #[error("child {id} ended {outcome:?}")]
    Child { id: u32, outcome: VmOutcome },
    #[error("child {id} ran on {}", .host.as_deref().unwrap_or("the parent's host"))]
    Placement { id: u32, host: Option<String> },
}

/// One resource of a daemon: its metric, unit, reading and rule.
struct Resource {
    metric: &'static str,
    unit: &'static str,
    read: fn(&Usage) -> f64,
    rule: Rule,
}

const RESOURCES: [Resource; 6] = [
    Resource {
        metric: "rss",
        unit: "MiB",
        read: |u| u.rss_kib as f64 / 1024.0,
        rule: Rule::Growth {
            percent: 10.0,
            floor: 8.0,
        },
    },
    Resource {
        metric: "vm_pte",
        unit: "KiB",
        read: |u| u.pte_kib as f64,
        rule: Rule::Growth {
            percent: 10.0,
            floor: 256.0,
        },
    },
    Resource {
        metric: "fds",
        unit: "fds",
        read: |u| u.fds as f64,
        rule: Rule::Reference,
    },
    Resource {
        metric: "threads",
        unit: "threads",
        read: |u| u.threads as f64,
        rule: Rule::Reference,
    },
    Resource {
        metric: "slots_in_use",
        unit: "slots",
        read: |u| u.slots_in_use as f64,
        rule: Rule::Zero,
    },
    Resource {
        metric: "vms_running",
        unit: "VMs",
        read: |u| u.vms_running as f64,
        rule: Rule::Zero,
    },
];

/// A reading of the machine's slab, MiB.
type SlabReading = fn(&probe::Slab) -> f64;

/// The machine's slab: (metric, reading).
const SLAB: [(&str, SlabReading); 2] = [
    ("slab", |s| s.total_kib as f64 / 1024.0),
    ("slab_unreclaimable", |s| {
        s.unreclaimable_kib as f64 / 1024.0
    }),
];

/// Runs every variant, emitting samples and summaries into `sink` (progress
/// on stderr); fails if any result was wrong or any resource exceeded its
/// limit, after reporting everything.
pub fn run(config: &Config, sink: &mut dyn Sink) -> Result<(), SoakError> {
    config.check()?;
    let mut failures = Vec::new();
    for &variant in &config.variants {
        failures.extend(soak(config, variant, sink)?);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(SoakError::Failed(failures))
    }
}

/// A variant's samples: per daemon and resource, and the machine's slab,
/// each as (cycle, value).
struct Series {
    daemons: Vec<Vec<Vec<(f64, f64)>>>,
    slab: Vec<Vec<(f64, f64)>>,
}

/// One variant on a cluster of its own; returns its failures.
fn soak(config: &Config, variant: Variant, sink: &mut dyn Sink) -> Result<Vec<String>, SoakError> {
    let name = variant.name();
    let image = snowflock_guest::images::by_name(IMAGE).ok_or(SoakError::NoImage)?;
    let dir = tempfile::tempdir().map_err(SoakError::ClusterDir)?;
    let mut spec = ClusterSpec::new(config.hosts(variant), dir.path(), &config.sfd);
    spec.clone_slots = config.clones(variant).max(4);
    spec.metrics_port = Some(METRICS_PORT);
    spec.log_filter = "warn".into();
    let cluster = NetnsCluster::up(spec).map_err(|source| SoakError::Up {
        variant: name,
        source: Box::new(source),
    })?;
    let daemons = cluster
        .hosts()
        .iter()
        .map(|h| {
            Ok(Daemon {
                host: h.name.clone(),
                pid: h.pid.ok_or_else(|| SoakError::NoDaemon {
                    variant: name,
                    host: h.name.clone(),
                })?,
                netns: h.netns.clone(),
                metrics: std::net::SocketAddr::new(h.control.ip(), METRICS_PORT),
            })
        })
        .collect::<Result<Vec<_>, SoakError>>()?;
    let api = ApiClient::new(&cluster.hosts()[0].socket, Some(CYCLE_TIMEOUT));
    let clones = config.clones(variant);
    let mut params = Map::new();
    params.insert("variant".into(), json!(name));
    params.insert("hosts".into(), json!(daemons.len()));
    params.insert("clones".into(), json!(clones));
    params.insert("cycles".into(), json!(config.cycles));
    params.insert("job".into(), json!(format!("{IMAGE} clones={clones}")));

    let mut sampler = Sampler {
        variant: name,
        daemons: &daemons,
        params: &params,
        series: Series {
            daemons: vec![vec![Vec::new(); RESOURCES.len()]; daemons.len()],
            slab: vec![Vec::new(); SLAB.len()],
        },
    };
    let usage = sampler.rest(0, None)?;
    sampler.record(0, &usage, &[], sink)?;
    // The reference of descriptors and threads: the rest after the warm-up.
    let mut reference = usage;
    let (mut wrong, mut quoted) = (0u32, Vec::new());
    let (mut cycle_ms, mut all_ms) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for cycle in 1..=config.cycles {
        let began = Instant::now();
        let mut printed = Vec::new();
        let end = api
            .start_and_wait(
                IMAGE,
                image.to_vec(),
                config.mem,
                &format!("clones={clones}"),
                Default::default(),
                |_| {},
                |_, line| printed.push(line.to_string()),
            )
            .map_err(|source| SoakError::Api {
                variant: name,
                cycle,
                source,
            })?;
        cycle_ms.push(began.elapsed().as_secs_f64() * 1e3);
        if let Err(e) = check(variant, clones, &end, &printed) {
            eprintln!("{BENCH}: {name} cycle {cycle}: {e}");
            wrong += 1;
            if quoted.len() < QUOTED_WRONG {
                quoted.push(format!("{name} cycle {cycle}: {e}"));
            }
        }
        if cycle.is_multiple_of(config.every) && cycle < config.cycles {
            let usage = if cycle == config.warmup {
                reference = sampler.rest(cycle, None)?;
                reference.clone()
            } else {
                sampler.read(cycle)?
            };
            sampler.record(cycle, &usage, &cycle_ms, sink)?;
            all_ms.append(&mut cycle_ms);
            eprintln!(
                "{BENCH}: {name} {cycle}/{} cycles, h1 rss {:.1} MiB, {} fds, {} threads",
                config.cycles,
                usage[0].rss_kib as f64 / 1024.0,
                usage[0].fds,
                usage[0].threads
            );
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let resting = Instant::now();
    let last = sampler.rest(config.cycles, Some(&reference))?;
    let rest_s = resting.elapsed().as_secs_f64();
    sampler.record(config.cycles, &last, &cycle_ms, sink)?;
    all_ms.append(&mut cycle_ms);

    let mut failures = sampler.summarize(config.warmup, sink)?;
    if wrong > 0 {
        failures.push(format!("{name}: {wrong} wrong results"));
    }
    failures.extend(quoted);
    sink.emit(Record::new(BENCH, "wall_s", wall_s, "s", &params))?;
    if let Some(s) = Summary::of(&all_ms) {
        let mut p = params.clone();
        p.insert("min".into(), json!(s.min));
        p.insert("max".into(), json!(s.max));
        sink.emit(Record::new(BENCH, "cycle_ms", s.median, "ms", &p))?;
    }
    let mut p = params.clone();
    p.insert("wrong_results".into(), json!(wrong));
    p.insert("rest_s".into(), json!((rest_s * 1000.0).round() / 1000.0));
    p.insert("failures".into(), json!(failures));
    let pass = if failures.is_empty() { 1.0 } else { 0.0 };
    sink.emit(Record::new(BENCH, "pass", pass, "bool", &p))?;
    eprintln!(
        "{BENCH}: {name}: {} cycles in {wall_s:.1} s, {}",
        config.cycles,
        if failures.is_empty() { "pass" } else { "FAIL" }
    );
    cluster.down().map_err(|source| SoakError::Down {
        variant: name,
        source,
    })?;
    Ok(failures)
}

/// Checks one cycle's end and console lines: the parent exited 0 having
/// checked every child, one ticket granted every clone, each child returned
/// its id squared, and each ran where the variant puts it.
fn check(variant: Variant, clones: u32, end: &VmEnd, printed: &[String]) -> Result<(), Wrong> {
    if end.outcome != VmOutcome::Exited(0) {
        return Err(Wrong::Outcome(end.outcome.clone()));
    }
    let verdict = format!("hello: granted={clones} ok");
    if !printed.iter().any(|line| line.trim_end() == verdict) {
        return Err(Wrong::Output(verdict));
    }
    let [report] = end.reports.as_slice() else {
        return Err(Wrong::Reports(end.reports.len()));
    };
    if report.clones != clones || report.children.len() != clones as usize {
        return Err(Wrong::Granted {
            granted: report.clones,
            children: report.children.len(),
            wanted: clones,
        });
    }
    for child in &report.children {
        let expected = (u64::from(child.id) * u64::from(child.id)).to_le_bytes();
        if child.outcome != VmOutcome::Result(expected.to_vec()) {
            return Err(Wrong::Child {
                id: child.id,
                outcome: child.outcome.clone(),
            });
        }
        let placed = match variant {
            Variant::Local => child.host.is_none(),
            Variant::Remote => child.host.is_some(),
        };
        if !placed {
            return Err(Wrong::Placement {
                id: child.id,
                host: child.host.clone(),
            });
        }
    }
    Ok(())
}

/// Samples a variant's daemons and keeps their series.
struct Sampler<'a> {
    variant: &'static str,
    daemons: &'a [Daemon],
    params: &'a Map<String, Value>,
    series: Series,
}

impl Sampler<'_> {
    /// Every daemon's usage now.
    fn read(&self, cycle: u32) -> Result<Vec<Usage>, SoakError> {
        self.daemons
            .iter()
            .map(|d| {
                d.usage().map_err(|source| SoakError::Probe {
                    variant: self.variant,
                    host: d.host.clone(),
                    cycle,
                    source,
                })
            })
            .collect()
    }

    /// Keeps and emits the sample of `cycle`, with the times of the cycles
    /// since the last one.
    fn record(
        &mut self,
        cycle: u32,
        usage: &[Usage],
        cycle_ms: &[f64],
        sink: &mut dyn Sink,
    ) -> Result<(), SoakError> {
        let x = f64::from(cycle);
        let mut params = self.params.clone();
        params.insert("cycle".into(), json!(cycle));
        for ((daemon, usage), series) in
            self.daemons.iter().zip(usage).zip(&mut self.series.daemons)
        {
            let mut p = params.clone();
            p.insert("host".into(), json!(daemon.host));
            for (resource, points) in RESOURCES.iter().zip(series.iter_mut()) {
                let value = (resource.read)(usage);
                points.push((x, value));
                sink.emit(Record::new(
                    BENCH,
                    resource.metric,
                    value,
                    resource.unit,
                    &p,
                ))?;
            }
        }
        let slab = probe::slab().map_err(|source| SoakError::Probe {
            variant: self.variant,
            host: "this machine".into(),
            cycle,
            source,
        })?;
        for ((metric, read), points) in SLAB.iter().zip(&mut self.series.slab) {
            let value = read(&slab);
            points.push((x, value));
            sink.emit(Record::new(BENCH, *metric, value, "MiB", &params))?;
        }
        if let Some(s) = Summary::of(cycle_ms) {
            params.insert("min".into(), json!(s.min));
            params.insert("max".into(), json!(s.max));
            sink.emit(Record::new(BENCH, "cycle_ms", s.median, "ms", &params))?;
        }
        Ok(())
    }

    /// Reads the daemons until they are at rest (no VM running, no slot in
    /// use, descriptors and threads unchanged over `REST_READINGS` readings)
    /// and, given a `target`, back at its descriptors and threads; or until
    /// `REST_TIMEOUT` passed. Returns the last reading.
    fn rest(&self, cycle: u32, target: Option<&[Usage]>) -> Result<Vec<Usage>, SoakError> {
        let deadline = Instant::now() + REST_TIMEOUT;
        let counts = |usage: &[Usage]| -> Vec<(u64, u64)> {
            usage.iter().map(|u| (u.fds, u.threads)).collect()
        };
        let (mut last, mut same) = (Vec::new(), 0);
        loop {
            let usage = self.read(cycle)?;
            let idle = usage
                .iter()
                .all(|u| u.slots_in_use == 0 && u.vms_running == 0);
            same = if idle && counts(&usage) == last {
                same + 1
            } else {
                0
            };
            last = counts(&usage);
            let on_target = target.is_none_or(|t| counts(t) == last);
            if (same + 1 >= REST_READINGS && on_target) || Instant::now() >= deadline {
                return Ok(usage);
            }
            std::thread::sleep(REST_POLL);
        }
    }

    /// Emits a summary of every series; returns the resources over their limits.
    fn summarize(&self, warmup: u32, sink: &mut dyn Sink) -> Result<Vec<String>, SoakError> {
        let warmup = f64::from(warmup);
        let mut failures = Vec::new();
        for (daemon, series) in self.daemons.iter().zip(&self.series.daemons) {
            for (resource, points) in RESOURCES.iter().zip(series) {
                let Some(s) = verdict::summarize(points, warmup, resource.rule) else {
                    continue;
                };
                let what = format!("{} {} {}", self.variant, daemon.host, resource.metric);
                if s.pass == Some(false) {
                    failures.push(match resource.rule {
                        Rule::Growth { .. } => format!(
                            "{what} grew {:.1} {} over the second half (limit {:.1})",
                            s.growth,
                            resource.unit,
                            s.limit.unwrap_or(0.0)
                        ),
                        _ => format!(
                            "{what} is {} at the end, not {}",
                            s.last,
                            s.limit.unwrap_or(0.0)
                        ),
                    });
                }
                let mut p = self.params.clone();
                p.insert("host".into(), json!(daemon.host));
                emit_summary(sink, resource.metric, resource.unit, &s, p)?;
            }
        }
        for ((metric, _), points) in SLAB.iter().zip(&self.series.slab) {
            if let Some(s) = verdict::summarize(points, warmup, Rule::None) {
                let mut p = self.params.clone();
                p.insert("host".into(), json!("machine"));
                emit_summary(sink, metric, "MiB", &s, p)?;
            }
        }
        Ok(failures)
    }
}

/// `{metric}_slope`: the fitted slope per 1000 cycles, with the summary in
/// its params.
fn emit_summary(
    sink: &mut dyn Sink,
    metric: &str,
    unit: &str,
    s: &verdict::Summary,
    mut params: Map<String, Value>,
) -> std::io::Result<()> {
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    for (key, value) in [
        ("first", s.first),
        ("reference", s.reference),
        ("last", s.last),
        ("max", s.max),
        ("growth", s.growth),
    ] {
        params.insert(key.into(), json!(round(value)));
    }
    params.insert("limit".into(), json!(s.limit.map(round)));
    params.insert("pass".into(), json!(s.pass));
    sink.emit(Record::new(
        BENCH,
        format!("{metric}_slope"),
        s.slope_per_1000,
        &format!("{unit}/1000 cycles"),
        &params,
    ))
}
