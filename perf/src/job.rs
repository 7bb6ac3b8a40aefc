//! `job`: how long a cloned job takes against workers that already hold
//! its state.
//!
//! Two jobs: `scan` (children read their whole share of a large state and
//! write a fraction of its pages) and the demo's `seqsearch`. Before the
//! clone point, both guests do every child's work in the parent, on memory
//! the parent has just built and so holds resident and mapped, timing each
//! share: the slowest share is what the job would take on workers started
//! ahead of time with the state loaded (for N up to the host's cores), and
//! the sum is the serial job. After the join the parent does every share
//! again to check the children's results; that pass first-touches the state
//! through the parent's own fresh copy-on-write view, and is reported apart.
//! All come from the same run as the cloned job.
//!
//! Modes: `local` (clones of an in-process supervisor on this host) and
//! `remote` (4 network-namespace hosts with real `sfd` daemons, jobs through
//! h1's API, fault counters from the daemons). Remote jobs run twice from
//! one checkpoint (`rounds=2`): the first round is the cold job, the second
//! the warm baseline, with every page its hosts fetched or were pushed
//! still in their page caches (and mapped as its clones start). In remote mode each
//! `--mechanisms` entry adds a cluster with that mechanism off; every run
//! goes over the default cluster and each mechanism-off cluster in turn, so
//! a mechanism's effect is a ratio of job times from the same run.
//!
//! With `--loss`, every remote job runs once on the clean switch and once per
//! loss percentage with the switch impaired (that loss and `--reorder`% of
//! mcdist's datagrams held back), back to back on the same cluster, so each
//! `loss_to_lossless` is a ratio of job times from the same run; the clone
//! hosts' receiver counters say where the time went.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use snowflock_control::VmOutcome;
use snowflock_control::client::ApiClient;
use snowflock_control::config::PopulateMode;
use snowflock_control::protocol::{ApiRequest, ApiResponse};
use snowflock_control::{Supervisor, SupervisorConfig};
use snowflock_dataplane::mcast::receiver::ReceiverStats;
use snowflock_testkit::ImpairmentCounts;
use snowflock_vmm::KvmHypervisor;
use snowflock_vmm::memory::HostPages;

use crate::cpu::{CpuTimes, VmThreadWatch};
use crate::record::Sink;
use crate::remote::{Setup, collected_lines, emit, number, run_job, up};
use crate::sync::lock;

pub const BENCH: &str = "job";

/// Hosts and clone slots per host of the remote mode (as `clone-remote`).
const HOSTS: usize = 4;
const SLOTS: u32 = 8;
/// Guest memory of a `seqsearch` VM.
const SEQSEARCH_MEM: u64 = 512 << 20;
/// `seqsearch`'s job: the 32 MiB reference of `clone-remote` (its ~100 MiB
/// of state keeps a cold remote run within seconds), with 4x its queries, so
/// that the resident serial job (~0.4 s) is long beside a clone's start and
/// a warm round measures work rather than start-up.
const SEQSEARCH_ARGS: &str = "ref_mib=32 queries=128000";
/// Guest memory a `scan` VM gets beyond its state: image, allocator, stack.
const SCAN_HEADROOM_MIB: u64 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Mode {
    Local,
    Remote,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Remote => "remote",
        }
    }

    fn default_clones(self) -> &'static [u32] {
        match self {
            Self::Local => &[1, 2],
            Self::Remote => &[1, 8, 32],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Job {
    Scan,
    Seqsearch,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Self::Scan => "scan",
            Self::Seqsearch => "seqsearch",
        }
    }

    /// The guest's key for the time of its check pass after the join
    /// (`seqsearch` keeps the `serial_ms` that `sf demo` shows).
    fn check_key(self) -> &'static str {
        match self {
            Self::Scan => "check_ms",
            Self::Seqsearch => "serial_ms",
        }
    }
}

/// `sfd.toml` keys of one section, with their values.
type Settings = Vec<(&'static str, toml::Value)>;

/// A daemon setting that changes how remote faults are served; measured on
/// a cluster of its own where it is switched the other way: off where it is on
/// by default, on where it is off by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Mechanism {
    /// `[limits] prefetch_pages` (default 3) against 0.
    Prefetch,
    /// `[limits] fault_around_pages` (default 512: whole 2 MiB blocks) against 0.
    FaultAround,
    /// Whole 2 MiB blocks (`fault_around_pages` 512, the default) against 64 KiB blocks
    /// (16 pages).
    WholeBlocks,
    /// `[limits] huge_cache = true` (complete 2 MiB blocks of host page caches in huge
    /// pages) against `false`.
    HugeCache,
    /// `[limits] avoidance` (zero, free and fresh pages not fetched) against off.
    Avoidance,
    /// `[mcdist] distribution = "mcdist"` against `"unicast"`.
    Mcdist,
    /// `[mcdist] rx_path = "auto"` (AF_XDP where it attaches) against `"sockets"`.
    Xdp,
    /// `[mcdist] push = true` (the clone point's data pages multicast ahead of demand, and
    /// late joiners sent what their siblings asked for) against `false`.
    Push,
    /// `[limits] populate_hollow = true` (a hollow clone's view of the pages already in
    /// its host cache mapped as it starts) against `false`.
    Populate,
    /// `[limits] idle_cache_mib` (page caches kept after their clones ended, for the next
    /// clones from the same checkpoint) against 0.
    Linger,
    /// `[mcdist] recorded_working_sets = 64` (the pages the clones of the same clone point
    /// of an earlier job of the same image asked for pushed first) against the default 0.
    /// Each measured job then follows an unmeasured run of the same job on its cluster,
    /// which records.
    RecordedSets,
    /// `[mcdist] repair_percent = 20` (REPAIRs after each block of pushed pages) against
    /// the default 0.
    Repair,
}

impl Mechanism {
    fn name(self) -> &'static str {
        match self {
            Self::Prefetch => "prefetch",
            Self::FaultAround => "fault-around",
            Self::WholeBlocks => "whole-blocks",
            Self::HugeCache => "huge-cache",
            Self::Avoidance => "avoidance",
            Self::Mcdist => "mcdist",
            Self::Xdp => "xdp",
            Self::Push => "push",
            Self::Populate => "populate",
            Self::Linger => "linger",
            Self::RecordedSets => "recorded-sets",
            Self::Repair => "repair",
        }
    }

    /// Whether the daemons run it unless configured otherwise.
    fn on_by_default(self) -> bool {
        !matches!(self, Self::RecordedSets | Self::Repair)
    }

    /// The `[limits]` and `[mcdist]` keys of the cluster it is measured on: it off when it
    /// is on by default, else on.
    fn switched(self) -> (Settings, Settings) {
        match self {
            Self::Prefetch => (vec![("prefetch_pages", toml::Value::Integer(0))], vec![]),
            Self::FaultAround => (
                vec![("fault_around_pages", toml::Value::Integer(0))],
                vec![],
            ),
            Self::WholeBlocks => (
                vec![("fault_around_pages", toml::Value::Integer(16))],
                vec![],
            ),
            Self::HugeCache => (vec![("huge_cache", toml::Value::Boolean(false))], vec![]),
            Self::Avoidance => (vec![("avoidance", toml::Value::Boolean(false))], vec![]),
            Self::Mcdist => (
                vec![],
                vec![("distribution", toml::Value::String("unicast".into()))],
            ),
            Self::Xdp => (
                vec![],
                vec![("rx_path", toml::Value::String("sockets".into()))],
            ),
            Self::Push => (vec![], vec![("push", toml::Value::Boolean(false))]),
            Self::Populate => (
                vec![("populate_hollow", toml::Value::Boolean(false))],
                vec![],
            ),
            Self::Linger => (vec![("idle_cache_mib", toml::Value::Integer(0))], vec![]),
            Self::RecordedSets => (
                vec![],
                vec![("recorded_working_sets", toml::Value::Integer(64))],
            ),
            Self::Repair => (vec![], vec![("repair_percent", toml::Value::Integer(20))]),
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Config {
    pub modes: Vec<Mode>,
    /// Clone counts of every mode; `None`: each mode's defaults.
    pub clones: Option<Vec<u32>>,
    pub jobs: Vec<Job>,
    pub mechanisms: Vec<Mechanism>,
    pub state_mib: u64,
    pub write_every: u32,
    /// Loss percentages on the switch (remote mode): each job runs without loss and with
    /// each of these; empty: without loss only.
    pub loss: Vec<u32>,
    /// Percentage of datagrams held back (reordered) while a loss is on.
    pub reorder: u32,
    /// The daemons and the number of measured runs.
    pub setup: Setup,
}

impl Config {
    fn counts(&self, mode: Mode) -> &[u32] {
        self.clones.as_deref().unwrap_or(mode.default_clones())
    }

    /// The image's arguments and guest memory for `n` clones in `mode`
    /// (remote jobs run a cold and a warm round).
    fn args(&self, mode: Mode, job: Job, n: u32) -> (String, u64) {
        let rounds = match mode {
            Mode::Local => "",
            Mode::Remote => " rounds=2",
        };
        match job {
            Job::Scan => (
                format!(
                    "state_mib={} write_every={} clones={n}{rounds}",
                    self.state_mib, self.write_every
                ),
                (self.state_mib + SCAN_HEADROOM_MIB).next_multiple_of(2) << 20,
            ),
            Job::Seqsearch => (
                format!("{SEQSEARCH_ARGS} clones={n} resident=1{rounds}"),
                SEQSEARCH_MEM,
            ),
        }
    }
}

/// One job's figures: the guest's own timings and, for remote jobs, the
/// daemons' counters over the job.
#[derive(Debug, Clone, Default)]
struct Sample {
    job_ms: f64,
    /// The slowest share, timed before the clone point.
    resident_ms: f64,
    /// Every share, timed before the clone point: the resident serial job.
    serial_ms: f64,
    /// The parent's check pass after the join (every share, first touches
    /// through its fresh copy-on-write view included).
    check_serial_ms: f64,
    /// The second round from the same checkpoint (`create_clones` to
    /// joined), when the job ran two.
    warm_ms: Option<f64>,
    remote: Option<Counters>,
    /// The daemons' counters over the warm round's clones.
    warm_remote: Option<Counters>,
    /// What the impaired switch did during the job (lossy remote runs).
    switch: Option<ImpairmentCounts>,
}

#[derive(Debug, Clone, Default)]
struct Counters {
    /// Clones that ran on other hosts (the rest ran beside the parent).
    remote_children: u64,
    faults: u64,
    /// Faults that waited for a page from the network.
    waited_faults: u64,
    /// How long they waited, in all (µs).
    waited_us: f64,
    pages_fetched: u64,
    pages_prefetched: u64,
    /// Bytes every memory server sent (unicast and multicast pages).
    served_bytes: u64,
    /// Pages the memory servers multicast before any clone asked (push).
    pushed_pages: u64,
    /// Pages recorded working sets put at the head of the push.
    push_led_pages: u64,
    /// What the clone hosts' mcdist receivers counted over the job.
    rx: RxCounters,
    /// CPU seconds the job cost (both rounds), by who spent them.
    cpu: CpuTimes,
    /// Its wall time, from the start request to the VM's end (both rounds).
    wall_s: f64,
}

/// Loss recovery and rate control on the clone hosts (every host but h1).
#[derive(Debug, Clone, Copy, Default)]
struct RxCounters {
    pages_requested: u64,
    re_requests: u64,
    fragment_re_requests: u64,
    pages_repaired: u64,
    unicast_requests: u64,
    rate_cuts: u64,
    partials_dropped: u64,
    duplicate_fragments: u64,
    rtt_samples: u64,
    rtt_total_us: u64,
    retry_wait_total_us: u64,
    lost_overtaken: u64,
    lost_passed: u64,
    lost_stalled: u64,
    lost_deadline: u64,
    retries_deferred: u64,
}

impl RxCounters {
    fn since(after: &ReceiverStats, before: &ReceiverStats) -> RxCounters {
        RxCounters {
            pages_requested: after.pages_requested.saturating_sub(before.pages_requested),
            re_requests: after.re_requests.saturating_sub(before.re_requests),
            fragment_re_requests: after
                .fragment_re_requests
                .saturating_sub(before.fragment_re_requests),
            pages_repaired: after.pages_repaired.saturating_sub(before.pages_repaired),
            unicast_requests: after
                .unicast_requests
                .saturating_sub(before.unicast_requests),
            rate_cuts: after.rate_cuts.saturating_sub(before.rate_cuts),
            partials_dropped: after
                .partials_dropped
                .saturating_sub(before.partials_dropped),
            duplicate_fragments: after
                .duplicate_fragments
                .saturating_sub(before.duplicate_fragments),
            rtt_samples: after.rtt_samples.saturating_sub(before.rtt_samples),
            rtt_total_us: after.rtt_total_us.saturating_sub(before.rtt_total_us),
            retry_wait_total_us: after
                .retry_wait_total_us
                .saturating_sub(before.retry_wait_total_us),
            lost_overtaken: after.lost_overtaken.saturating_sub(before.lost_overtaken),
            lost_passed: after.lost_passed.saturating_sub(before.lost_passed),
            lost_stalled: after.lost_stalled.saturating_sub(before.lost_stalled),
            lost_deadline: after.lost_deadline.saturating_sub(before.lost_deadline),
            retries_deferred: after
                .retries_deferred
                .saturating_sub(before.retries_deferred),
        }
    }

    fn add(&mut self, other: RxCounters) {
        self.pages_requested += other.pages_requested;
        self.re_requests += other.re_requests;
        self.fragment_re_requests += other.fragment_re_requests;
        self.pages_repaired += other.pages_repaired;
        self.unicast_requests += other.unicast_requests;
        self.rate_cuts += other.rate_cuts;
        self.partials_dropped += other.partials_dropped;
        self.duplicate_fragments += other.duplicate_fragments;
        self.rtt_samples += other.rtt_samples;
        self.rtt_total_us += other.rtt_total_us;
        self.retry_wait_total_us += other.retry_wait_total_us;
        self.lost_overtaken += other.lost_overtaken;
        self.lost_passed += other.lost_passed;
        self.lost_stalled += other.lost_stalled;
        self.lost_deadline += other.lost_deadline;
        self.retries_deferred += other.retries_deferred;
    }
}

/// What every host's memory server sent so far.
#[derive(Debug, Clone, Copy)]
struct Served {
    bytes: u64,
    pushed_pages: u64,
    push_led_pages: u64,
}

impl Sample {
    fn parse(job: Job, lines: &[String]) -> Result<Self> {
        let prefix = format!("{}:", job.name());
        let get = |key: &str| number(lines, &prefix, key);
        Ok(Self {
            job_ms: get("clone_ms")? + get("join_ms")?,
            resident_ms: get("resident_max_ms")?,
            serial_ms: get("resident_sum_ms")?,
            check_serial_ms: get(job.check_key())?,
            warm_ms: get("warm_clone_ms")
                .and_then(|clone| Ok(clone + get("warm_join_ms")?))
                .ok(),
            remote: None,
            warm_remote: None,
            switch: None,
        })
    }
}

/// Samples by (mode, variant, job, clones, loss percentage), in run order.
type Samples = BTreeMap<(Mode, &'static str, Job, u32, u32), Vec<Sample>>;

/// The variant of a cluster with every mechanism at its default.
const DEFAULT_VARIANT: &str = "default";

/// Runs the scenario and emits its records into `sink`; progress goes to stderr.
pub fn run(config: &Config, sink: &mut dyn Sink) -> Result<()> {
    if config.setup.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if config
        .clones
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.contains(&0))
    {
        bail!("--clones needs counts of at least 1");
    }
    if !config.loss.is_empty() && !config.modes.contains(&Mode::Remote) {
        bail!("--loss impairs the switch of the remote mode: add --mode remote");
    }
    if config
        .loss
        .iter()
        .any(|&l| l == 0 || l + config.reorder > 100)
    {
        bail!("--loss needs percentages of at least 1, and loss + reorder at most 100");
    }
    let mut samples = Samples::new();
    for run in 1..=config.setup.runs {
        for &mode in &config.modes {
            match mode {
                Mode::Local => local_run(config, run, &mut samples)?,
                Mode::Remote => remote_run(config, run, &mut samples)?,
            }
        }
    }
    report(config, &samples, sink)
}

fn local_run(config: &Config, run: u32, samples: &mut Samples) -> Result<()> {
    let counts = config.counts(Mode::Local);
    let hv = KvmHypervisor::open().context("opening /dev/kvm")?;
    let (lines_sink, lines) = collected_lines();
    let supervisor = Supervisor::new(
        std::sync::Arc::new(hv),
        SupervisorConfig {
            clone_limit: counts.iter().copied().max().unwrap_or(1),
            lines: lines_sink,
            descriptor_dir: None,
            cluster: None,
            populate: PopulateMode::default(),
            host_pages: HostPages::Base,
            linux_personality: None,
        },
    );
    for &job in &config.jobs {
        for &n in counts {
            eprintln!("{BENCH}: local {} {n} clones, run {run}", job.name());
            let (args, mem) = config.args(Mode::Local, job, n);
            let image = snowflock_guest::images::by_name(job.name())
                .with_context(|| format!("no embedded image {}", job.name()))?;
            lock(&lines).clear();
            let outcome = supervisor.launch(image, mem, &args)?.wait();
            let seen = std::mem::take(&mut *lock(&lines));
            if outcome != VmOutcome::Exited(0) {
                bail!(
                    "local {} {args} ended {outcome:?}:\n{}",
                    job.name(),
                    seen.join("\n")
                );
            }
            samples
                .entry((Mode::Local, DEFAULT_VARIANT, job, n, 0))
                .or_default()
                .push(Sample::parse(job, &seen)?);
        }
    }
    Ok(())
}

fn remote_run(config: &Config, run: u32, samples: &mut Samples) -> Result<()> {
    let mut variants: Vec<(&'static str, Option<Mechanism>)> = vec![(DEFAULT_VARIANT, None)];
    variants.extend(config.mechanisms.iter().map(|&m| (m.name(), Some(m))));
    for (variant, switched) in variants {
        let (limits, mcdist) = switched.map(Mechanism::switched).unwrap_or_default();
        let (cluster, _dir) = up(&config.setup, HOSTS, SLOTS, &limits, &mcdist)?;
        let sockets: Vec<PathBuf> = cluster.hosts().iter().map(|h| h.socket.clone()).collect();
        let pids: Vec<u32> = cluster.hosts().iter().filter_map(|h| h.pid).collect();
        let daemons = Daemons {
            sockets: &sockets,
            pids: &pids,
        };
        let losses: Vec<u32> = std::iter::once(0)
            .chain(config.loss.iter().copied())
            .collect();
        for &job in &config.jobs {
            for &n in config.counts(Mode::Remote) {
                if config.mechanisms.contains(&Mechanism::RecordedSets) || !config.loss.is_empty() {
                    // Every measured job then has an earlier run of itself to be led by (or,
                    // with recordings off, not): the first lossless run has no advantage over
                    // the lossy ones that follow it.
                    eprintln!("{BENCH}: remote {} {n} clones, recording run", job.name());
                    remote_job(config, &daemons, job, n)?;
                }
                for &loss in &losses {
                    let mut label = match switched {
                        None => String::new(),
                        Some(m) if m.on_by_default() => format!(" ({} off)", m.name()),
                        Some(m) => format!(" ({} on)", m.name()),
                    };
                    if loss > 0 {
                        label += &format!(" at {loss}% loss, {}% reordered", config.reorder);
                    }
                    eprintln!(
                        "{BENCH}: remote {} {n} clones{label}, run {run}",
                        job.name()
                    );
                    cluster.impair(loss, if loss > 0 { config.reorder } else { 0 })?;
                    let sample = remote_job(config, &daemons, job, n);
                    let switch = if loss > 0 {
                        Some(cluster.impairment_counts())
                    } else {
                        None
                    };
                    cluster.impair(0, 0)?;
                    let mut sample = sample?;
                    sample.switch = switch.transpose()?;
                    samples
                        .entry((Mode::Remote, variant, job, n, loss))
                        .or_default()
                        .push(sample);
                }
            }
        }
        cluster.down()?;
    }
    Ok(())
}

/// The daemons' counters of every host: hollow clones seen (host, vm) and
/// what their memory servers sent.
fn snapshot(
    socket: &Path,
) -> Result<(
    Vec<(String, snowflock_control::protocol::CloneStatsEntry)>,
    Served,
)> {
    let hosts = ApiClient::new(socket, Some(std::time::Duration::from_secs(60))).stats()?;
    let served = Served {
        bytes: hosts.iter().map(|h| h.served_bytes).sum(),
        pushed_pages: hosts.iter().map(|h| h.pushed_pages).sum(),
        push_led_pages: hosts.iter().map(|h| h.push_led_pages).sum(),
    };
    let clones = hosts
        .into_iter()
        .flat_map(|h| {
            let host = h.host;
            h.clones.into_iter().map(move |c| (host.clone(), c))
        })
        .collect();
    Ok((clones, served))
}

/// Every clone host's receiver counters (all hosts but h1, the parent's).
fn receivers(sockets: &[PathBuf]) -> Result<Vec<ReceiverStats>> {
    sockets[1..]
        .iter()
        .map(|socket| {
            match ApiClient::new(socket, Some(std::time::Duration::from_secs(60)))
                .call(&ApiRequest::NetShow)?
            {
                ApiResponse::Net(status) => Ok(status.rx),
                other => bail!("sf net show answered {other:?}"),
            }
        })
        .collect()
}

/// This machine's cores (every netns host shares them).
fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// A cluster's daemons: their API sockets (h1's first) and process ids.
struct Daemons<'a> {
    sockets: &'a [PathBuf],
    pids: &'a [u32],
}

fn remote_job(config: &Config, daemons: &Daemons<'_>, job: Job, n: u32) -> Result<Sample> {
    let (args, mem) = config.args(Mode::Remote, job, n);
    let sockets = daemons.sockets;
    let socket = sockets.first().context("a cluster without hosts")?;
    let rx_before = receivers(sockets)?;
    let (before, served_before) = snapshot(socket)?;
    let seen: HashSet<(String, u64)> = before.into_iter().map(|(h, c)| (h, c.vm)).collect();
    let watch = VmThreadWatch::start(daemons.pids)?;
    let started = Instant::now();
    let end = run_job(socket, job.name(), mem, &args)?;
    let wall_s = started.elapsed().as_secs_f64();
    let cpu = watch.finish()?;
    let [cold, warm] = &end.reports[..] else {
        bail!("{} clone reports, not one per round", end.reports.len());
    };
    if cold.clones != n || warm.clones != n {
        bail!("granted {} and {} of {n} clones", cold.clones, warm.clones);
    }
    let (after, served_after) = snapshot(socket)?;
    let mut rx = RxCounters::default();
    for (after, before) in receivers(sockets)?.iter().zip(&rx_before) {
        rx.add(RxCounters::since(after, before));
    }
    let mut counters = Counters {
        rx,
        cpu,
        wall_s,
        served_bytes: served_after.bytes.saturating_sub(served_before.bytes),
        pushed_pages: served_after
            .pushed_pages
            .saturating_sub(served_before.pushed_pages),
        push_led_pages: served_after
            .push_led_pages
            .saturating_sub(served_before.push_led_pages),
        ..Counters::default()
    };
    let mut warm_counters = Counters::default();
    // Per host, the first round's clones are the ones started first (lower
    // VM ids): the second round starts after the first was joined.
    let mut by_host: BTreeMap<String, Vec<snowflock_control::protocol::CloneStatsEntry>> =
        BTreeMap::new();
    for (host, entry) in after
        .into_iter()
        .filter(|(h, c)| !seen.contains(&(h.clone(), c.vm)))
    {
        by_host.entry(host).or_default().push(entry);
    }
    for (host, mut entries) in by_host {
        entries.sort_by_key(|e| e.vm);
        let first_round = cold
            .children
            .iter()
            .filter(|c| c.host.as_deref() == Some(host.as_str()))
            .count();
        for (i, entry) in entries.into_iter().enumerate() {
            let target = if i < first_round {
                &mut counters
            } else {
                &mut warm_counters
            };
            target.add(&entry.stats);
        }
    }
    let mut sample = Sample::parse(job, &end.lines)?;
    sample.remote = Some(counters);
    sample.warm_remote = Some(warm_counters);
    Ok(sample)
}

impl Counters {
    /// Adds one remote clone's counters.
    fn add(&mut self, s: &snowflock_fault_handler::CloneStats) {
        self.remote_children += 1;
        self.faults += s.faults;
        self.waited_faults += s.fetch_latency.count;
        self.waited_us += s.fetch_latency.count as f64 * s.fetch_latency.mean_us;
        self.pages_fetched += s.pages_fetched;
        self.pages_prefetched += s.prefetched;
    }
}

fn report(config: &Config, samples: &Samples, sink: &mut dyn Sink) -> Result<()> {
    for (&(mode, variant, job, n, loss), list) in samples {
        let (args, _) = config.args(mode, job, n);
        let mut params = Map::new();
        params.insert("mode".into(), json!(mode.name()));
        params.insert("job".into(), json!(job.name()));
        params.insert("clones".into(), json!(n));
        params.insert(
            "hosts".into(),
            json!(if mode == Mode::Remote { HOSTS } else { 1 }),
        );
        params.insert("variant".into(), json!(variant));
        params.insert("args".into(), json!(args));
        if mode == Mode::Remote && !config.loss.is_empty() {
            insert_loss(&mut params, loss, config.reorder);
        }
        let series = |f: fn(&Sample) -> f64| -> Vec<f64> { list.iter().map(f).collect() };
        let times: [(&str, &str, Vec<f64>); 6] = [
            ("job_ms", "ms", series(|s| s.job_ms)),
            ("resident_ms", "ms", series(|s| s.resident_ms)),
            (
                "job_to_resident",
                "ratio",
                series(|s| s.job_ms / s.resident_ms.max(f64::MIN_POSITIVE)),
            ),
            ("serial_ms", "ms", series(|s| s.serial_ms)),
            (
                "speedup_vs_serial",
                "ratio",
                series(|s| s.serial_ms / s.job_ms.max(f64::MIN_POSITIVE)),
            ),
            ("check_serial_ms", "ms", series(|s| s.check_serial_ms)),
        ];
        for (metric, unit, values) in times {
            emit(sink, BENCH, metric, &values, unit, &params)?;
        }
        let warm: Vec<(f64, f64)> = list
            .iter()
            .filter_map(|s| s.warm_ms.map(|warm| (s.job_ms, warm)))
            .collect();
        if !warm.is_empty() {
            let warm_ms: Vec<f64> = warm.iter().map(|&(_, warm)| warm).collect();
            let cold_to_warm: Vec<f64> = warm
                .iter()
                .map(|&(cold, warm)| cold / warm.max(f64::MIN_POSITIVE))
                .collect();
            emit(sink, BENCH, "warm_ms", &warm_ms, "ms", &params)?;
            emit(sink, BENCH, "cold_to_warm", &cold_to_warm, "ratio", &params)?;
        }
        let counters: Vec<&Counters> = list.iter().filter_map(|s| s.remote.as_ref()).collect();
        if counters.is_empty() {
            continue;
        }
        let per_child = |c: &Counters, v: u64| v as f64 / c.remote_children.max(1) as f64;
        let rx = |f: fn(&RxCounters) -> u64| -> Vec<f64> {
            counters.iter().map(|c| f(&c.rx) as f64).collect()
        };
        let mean = |total: fn(&RxCounters) -> u64, n: fn(&RxCounters) -> u64| -> Vec<f64> {
            counters
                .iter()
                .map(|c| total(&c.rx) as f64 / 1000.0 / n(&c.rx).max(1) as f64)
                .collect()
        };
        let cpu = |f: fn(&Counters) -> f64| -> Vec<f64> { counters.iter().map(|c| f(c)).collect() };
        let remote: [(&str, &str, Vec<f64>); 29] = [
            ("job_wall_s", "s", cpu(|c| c.wall_s)),
            ("cpu_vcpus_s", "s", cpu(|c| c.cpu.vcpus)),
            ("cpu_daemons_s", "s", cpu(|c| c.cpu.daemons)),
            ("cpu_machine_busy_s", "s", cpu(|c| c.cpu.machine_busy)),
            (
                "cpu_busy_share",
                "ratio",
                cpu(|c| c.cpu.machine_busy / (c.wall_s * cores()).max(f64::MIN_POSITIVE)),
            ),
            (
                "remote_children",
                "clones",
                counters.iter().map(|c| c.remote_children as f64).collect(),
            ),
            (
                "faults_per_child",
                "faults",
                counters.iter().map(|c| per_child(c, c.faults)).collect(),
            ),
            (
                "waited_faults_per_child",
                "faults",
                counters
                    .iter()
                    .map(|c| per_child(c, c.waited_faults))
                    .collect(),
            ),
            (
                "fault_wait_ms_per_child",
                "ms",
                counters
                    .iter()
                    .map(|c| c.waited_us / 1000.0 / c.remote_children.max(1) as f64)
                    .collect(),
            ),
            (
                "pages_fetched",
                "pages",
                counters.iter().map(|c| c.pages_fetched as f64).collect(),
            ),
            (
                "pages_prefetched",
                "pages",
                counters.iter().map(|c| c.pages_prefetched as f64).collect(),
            ),
            (
                "pages_pushed",
                "pages",
                counters.iter().map(|c| c.pushed_pages as f64).collect(),
            ),
            (
                "pages_push_led",
                "pages",
                counters.iter().map(|c| c.push_led_pages as f64).collect(),
            ),
            (
                "wire_mib",
                "MiB",
                counters
                    .iter()
                    .map(|c| c.served_bytes as f64 / f64::from(1 << 20))
                    .collect(),
            ),
            ("pages_requested", "pages", rx(|r| r.pages_requested)),
            ("re_requests", "pages", rx(|r| r.re_requests)),
            ("lost_overtaken", "pages", rx(|r| r.lost_overtaken)),
            ("lost_passed", "pages", rx(|r| r.lost_passed)),
            ("lost_stalled", "pages", rx(|r| r.lost_stalled)),
            ("lost_deadline", "pages", rx(|r| r.lost_deadline)),
            ("retries_deferred", "timers", rx(|r| r.retries_deferred)),
            ("pages_repaired", "pages", rx(|r| r.pages_repaired)),
            (
                "fragment_re_requests",
                "pages",
                rx(|r| r.fragment_re_requests),
            ),
            ("unicast_requests", "requests", rx(|r| r.unicast_requests)),
            ("rate_cuts", "cuts", rx(|r| r.rate_cuts)),
            ("partials_dropped", "pages", rx(|r| r.partials_dropped)),
            (
                "duplicate_fragments",
                "fragments",
                rx(|r| r.duplicate_fragments),
            ),
            (
                "mean_rtt_ms",
                "ms",
                mean(|r| r.rtt_total_us, |r| r.rtt_samples),
            ),
            (
                "mean_retry_wait_ms",
                "ms",
                mean(|r| r.retry_wait_total_us, |r| r.re_requests),
            ),
        ];
        for (metric, unit, values) in remote {
            emit(sink, BENCH, metric, &values, unit, &params)?;
        }
        let switch: Vec<&ImpairmentCounts> =
            list.iter().filter_map(|s| s.switch.as_ref()).collect();
        if !switch.is_empty() {
            let series = |count: fn(&ImpairmentCounts) -> u64| -> Vec<f64> {
                switch.iter().map(|c| count(c) as f64).collect()
            };
            let impairment = [
                ("switch_lost", series(|c| c.lost)),
                ("switch_held_back", series(|c| c.held_back)),
                ("switch_overflowed", series(|c| c.overflowed)),
            ];
            for (metric, values) in impairment {
                emit(sink, BENCH, metric, &values, "packets", &params)?;
            }
        }
        let warm: Vec<&Counters> = list.iter().filter_map(|s| s.warm_remote.as_ref()).collect();
        if warm.is_empty() {
            continue;
        }
        let warm_remote: [(&str, &str, Vec<f64>); 3] = [
            (
                "warm_faults_per_child",
                "faults",
                warm.iter().map(|c| per_child(c, c.faults)).collect(),
            ),
            (
                "warm_waited_faults_per_child",
                "faults",
                warm.iter().map(|c| per_child(c, c.waited_faults)).collect(),
            ),
            (
                "warm_pages_fetched",
                "pages",
                warm.iter().map(|c| c.pages_fetched as f64).collect(),
            ),
        ];
        for (metric, unit, values) in warm_remote {
            emit(sink, BENCH, metric, &values, unit, &params)?;
        }
    }
    mechanism_ratios(config, samples, sink)?;
    loss_ratios(config, samples, sink)
}

/// `params.loss` and `params.reorder` of a record measured with `loss`% loss (0: none).
fn insert_loss(params: &mut Map<String, Value>, loss: u32, reorder: u32) {
    params.insert("loss".into(), json!(loss));
    params.insert("reorder".into(), json!(if loss > 0 { reorder } else { 0 }));
}

/// Per variant, job, clone count and loss: job time with the loss over job time
/// without it, run by run (the two ran back to back on the same cluster).
fn loss_ratios(config: &Config, samples: &Samples, sink: &mut dyn Sink) -> Result<()> {
    for (&(mode, variant, job, n, loss), lossy) in samples {
        if loss == 0 {
            continue;
        }
        let Some(lossless) = samples.get(&(mode, variant, job, n, 0)) else {
            continue;
        };
        let ratios: Vec<f64> = lossy
            .iter()
            .zip(lossless)
            .map(|(lossy, lossless)| lossy.job_ms / lossless.job_ms.max(f64::MIN_POSITIVE))
            .collect();
        let mut params = Map::new();
        params.insert("mode".into(), json!(mode.name()));
        params.insert("job".into(), json!(job.name()));
        params.insert("clones".into(), json!(n));
        params.insert("variant".into(), json!(variant));
        insert_loss(&mut params, loss, config.reorder);
        emit(sink, BENCH, "loss_to_lossless", &ratios, "ratio", &params)?;
    }
    Ok(())
}

/// Per mechanism, job and clone count: job time with the mechanism off over
/// job time with it on, run by run.
fn mechanism_ratios(config: &Config, samples: &Samples, sink: &mut dyn Sink) -> Result<()> {
    for &mechanism in &config.mechanisms {
        for &job in &config.jobs {
            for (&n, loss) in config.counts(Mode::Remote).iter().flat_map(|n| {
                std::iter::once(0)
                    .chain(config.loss.iter().copied())
                    .map(move |l| (n, l))
            }) {
                let mut on = samples.get(&(Mode::Remote, DEFAULT_VARIANT, job, n, loss));
                let mut off = samples.get(&(Mode::Remote, mechanism.name(), job, n, loss));
                if !mechanism.on_by_default() {
                    std::mem::swap(&mut on, &mut off);
                }
                let (Some(on), Some(off)) = (on, off) else {
                    continue;
                };
                let ratios: Vec<f64> = on
                    .iter()
                    .zip(off)
                    .map(|(on, off)| off.job_ms / on.job_ms.max(f64::MIN_POSITIVE))
                    .collect();
                let mut params = Map::new();
                params.insert("mode".into(), json!(Mode::Remote.name()));
                params.insert("job".into(), json!(job.name()));
                params.insert("clones".into(), json!(n));
                params.insert("mechanism".into(), json!(mechanism.name()));
                if !config.loss.is_empty() {
                    insert_loss(&mut params, loss, config.reorder);
                }
                emit(sink, BENCH, "off_to_on_job_ms", &ratios, "ratio", &params)?;
                let warm_ratios: Vec<f64> = on
                    .iter()
                    .zip(off)
                    .filter_map(|(on, off)| Some(off.warm_ms? / on.warm_ms?.max(f64::MIN_POSITIVE)))
                    .collect();
                if !warm_ratios.is_empty() {
                    emit(
                        sink,
                        BENCH,
                        "off_to_on_warm_ms",
                        &warm_ratios,
                        "ratio",
                        &params,
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (job, resident, serial, check serial) of a guest's lines.
    fn times(job: Job, lines: &[&str]) -> (f64, f64, f64, f64) {
        let lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let s = Sample::parse(job, &lines).unwrap();
        (s.job_ms, s.resident_ms, s.serial_ms, s.check_serial_ms)
    }

    #[test]
    fn parses_the_guests_lines() {
        let scan = [
            "scan: build_ms=10.0",
            "scan: share=1 resident_ms=40.0",
            "scan: share=2 resident_ms=41.0",
            "scan: resident_max_ms=41.0 resident_sum_ms=81.0",
            "scan: clone_ms=1.5",
            "scan: join_ms=98.5",
            "scan: check_ms=120.0",
        ];
        assert_eq!(times(Job::Scan, &scan), (100.0, 41.0, 81.0, 120.0));
        let seqsearch = [
            "seqsearch: resident_max_ms=500.0 resident_sum_ms=990.0",
            "seqsearch: clone_ms=2.0",
            "seqsearch: join_ms=600.0",
            "seqsearch: serial_ms=1400.0",
        ];
        assert_eq!(
            times(Job::Seqsearch, &seqsearch),
            (602.0, 500.0, 990.0, 1400.0)
        );
        let lines: Vec<String> = seqsearch.iter().map(|l| l.to_string()).collect();
        assert_eq!(Sample::parse(Job::Seqsearch, &lines).unwrap().warm_ms, None);
        let mut two_rounds = lines.clone();
        two_rounds.push("seqsearch: round=2 warm_clone_ms=1.5 warm_join_ms=300.0".into());
        let warm = Sample::parse(Job::Seqsearch, &two_rounds).unwrap().warm_ms;
        assert_eq!(warm, Some(301.5));
    }
}
