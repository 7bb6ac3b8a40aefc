//! Scenarios with clones on other hosts: real `sfd` daemons in
//! network-namespace hosts (`snowflock_testkit`), jobs started
//! through the local API, figures from the daemons' clone reports and fault
//! counters.
//!
//! - `fault-remote`: fault service latency of a clone on another host, next
//!   to the same clone served by a fault handler whose pages come from the
//!   frozen image on the same host (the local userfaultfd round trip).
//! - `avoidance`: bytes the children fetch with the avoidance heuristics on
//!   and off, for the demo job and for an allocation-heavy guest.
//! - `clone-remote`: N clones over 4 hosts: clone call to all running, and
//!   total job time against the same job on clones of the same host, whose
//!   state is already in memory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use snowflock_control::client::ApiClient;
use snowflock_control::config::PopulateMode;
use snowflock_control::console::LineSink;
use snowflock_control::daemon::memory::LocalImageSource;
use snowflock_control::protocol::CloneSummary;
use snowflock_control::remote::{
    Cluster, HollowEvents, HollowStart, JobScope, Plan, RemoteChild, RemoteGrant, RemoteLaunch,
};
use snowflock_control::working_sets::ClonePointKey;
use snowflock_control::{Supervisor, SupervisorConfig, VmOutcome};
use snowflock_fault_handler::{CloneStats, FaultHandler, FetchConfig};
use snowflock_testkit::{ClusterSpec, NetnsCluster};
use snowflock_vmm::KvmHypervisor;
use snowflock_vmm::memory::{HostPages, MemoryImage};

use crate::record::{Record, Sink};
use crate::stats::Summary;
use crate::sync::lock;

/// Where the daemons come from and how often to measure.
#[derive(Debug, Clone)]
pub struct Setup {
    pub sfd: PathBuf,
    pub runs: u32,
}

/// The `sfd` next to this executable.
pub fn default_sfd() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating sf-bench")?;
    Ok(exe.with_file_name("sfd"))
}

pub(crate) fn up(
    setup: &Setup,
    hosts: usize,
    slots: u32,
    limits: &[(&str, toml::Value)],
    mcdist: &[(&str, toml::Value)],
) -> Result<(NetnsCluster, tempfile::TempDir)> {
    let dir = tempfile::tempdir().context("creating a cluster directory")?;
    let mut spec = ClusterSpec::new(hosts, dir.path(), &setup.sfd);
    spec.clone_slots = slots;
    spec.log_filter = "warn".into();
    for (key, value) in limits {
        spec.extra_limits.insert((*key).to_string(), value.clone());
    }
    for (key, value) in mcdist {
        spec.mcdist.insert((*key).to_string(), value.clone());
    }
    let cluster = NetnsCluster::up(spec).context("starting the test cluster")?;
    Ok((cluster, dir))
}

/// Every answer, a whole job included, comes within this bound.
fn client(socket: &Path) -> ApiClient {
    ApiClient::new(socket, Some(Duration::from_secs(600)))
}

/// A job's console lines, outcome and clone reports.
pub(crate) struct JobEnd {
    pub(crate) lines: Vec<String>,
    pub(crate) reports: Vec<CloneSummary>,
}

pub(crate) fn run_job(socket: &Path, image: &str, mem: u64, args: &str) -> Result<JobEnd> {
    let bytes = snowflock_guest::images::by_name(image)
        .with_context(|| format!("no embedded image {image}"))?
        .to_vec();
    let api = client(socket);
    let vm = api.start(image, bytes, mem, args, Default::default())?;
    let mut lines = Vec::new();
    let end = api.wait(vm, |_, line| lines.push(line.to_string()))?;
    if end.outcome != VmOutcome::Exited(0) {
        bail!(
            "{image} {args} ended {:?}:\n{}",
            end.outcome,
            lines.join("\n")
        );
    }
    Ok(JobEnd {
        lines,
        reports: end.reports,
    })
}

/// Stats of the hollow clones of the last job (all clones seen so far).
fn clone_stats(socket: &Path) -> Result<Vec<CloneStats>> {
    Ok(client(socket)
        .stats()?
        .into_iter()
        .flat_map(|h| h.clones.into_iter().map(|c| c.stats))
        .collect())
}

/// `key=value` of the first line with `prefix` holding `key`, as a number.
pub(crate) fn number(lines: &[String], prefix: &str, key: &str) -> Result<f64> {
    let pat = format!(" {key}=");
    let line = lines
        .iter()
        .find(|l| l.starts_with(prefix) && l.contains(&pat))
        .with_context(|| format!("no `{prefix}` line with {key}= in:\n{}", lines.join("\n")))?;
    let start = line.find(&pat).map(|i| i + pat.len()).unwrap_or(0);
    let text = line[start..].split_whitespace().next().unwrap_or("");
    text.parse()
        .with_context(|| format!("{key}={text} is not a number"))
}

pub(crate) fn emit(
    sink: &mut dyn Sink,
    bench: &str,
    metric: &str,
    samples: &[f64],
    unit: &str,
    params: &Map<String, Value>,
) -> Result<f64> {
    let s = Summary::of(samples).with_context(|| format!("no samples of {metric}"))?;
    let mut p = params.clone();
    p.insert("runs".into(), json!(s.count));
    p.insert("min".into(), json!(s.min));
    p.insert("max".into(), json!(s.max));
    sink.emit(Record::new(bench, metric, s.median, unit, &p))?;
    Ok(s.median)
}

/// Runs clones as hollow clones on this host: their pages come from the
/// frozen image through a fault handler, without a network. The baseline of
/// `fault-remote`.
struct LoopbackCluster {
    supervisor: OnceLock<Weak<Supervisor>>,
    images: Mutex<Vec<(u64, Arc<MemoryImage>)>>,
    stats: Arc<Mutex<Vec<CloneStats>>>,
}

struct LoopbackChild {
    child: RemoteChild,
    stats: Arc<Mutex<Vec<CloneStats>>>,
}

impl HollowEvents for LoopbackChild {
    fn started(&self, _vm: u64, restore: Duration, _faults: Arc<FaultHandler>) {
        self.child.started(restore);
    }

    fn ended(&self, _vm: u64, outcome: VmOutcome, runtime: Duration, stats: CloneStats) {
        lock(&self.stats).push(stats);
        self.child.ended(outcome, runtime);
    }
}

impl Cluster for LoopbackCluster {
    fn plan(
        &self,
        wanted: u32,
        _mem_size: u64,
        _local_free: u32,
        _owner: &str,
        _scope: Option<&JobScope>,
    ) -> Plan {
        Plan {
            local: 0,
            remote: vec![RemoteGrant {
                host: "loopback".into(),
                reservation: 0,
                slots: wanted,
            }],
            slurm_job: None,
        }
    }

    fn release(&self, _grant: RemoteGrant) {}

    fn release_allocation(&self, _slurm_job: u64) {}

    fn serve_image(&self, family: u64, image: Arc<MemoryImage>, _key: Option<ClonePointKey>) {
        lock(&self.images).push((family, image));
    }

    fn retire_image(&self, family: u64) {
        lock(&self.images).retain(|(f, _)| *f != family);
    }

    fn launch(&self, _grant: RemoteGrant, launch: RemoteLaunch) {
        let family_id = launch.descriptor.family;
        let image = lock(&self.images)
            .iter()
            .find(|(f, _)| *f == family_id)
            .map(|(_, i)| i.clone());
        let supervisor = self.supervisor.get().and_then(Weak::upgrade);
        let (Some(image), Some(supervisor)) = (image, supervisor) else {
            for child in launch.children {
                child.ended(
                    VmOutcome::Failed("no image or supervisor".into()),
                    Duration::ZERO,
                );
            }
            return;
        };
        let config = FetchConfig {
            fetch_timeout: Duration::from_secs(10),
            prefetch_pages: 0,
            fault_around_pages: 0,
            huge_blocks: false,
        };
        let family = match LocalImageSource::family(image, family_id, config) {
            Ok(family) => family,
            Err(e) => {
                for child in launch.children {
                    child.ended(VmOutcome::Failed(e.to_string()), Duration::ZERO);
                }
                return;
            }
        };
        for child in launch.children {
            supervisor.reserve_slots(1);
            supervisor.start_hollow(HollowStart {
                descriptor: launch.descriptor.clone(),
                family: family.clone(),
                avoidance: true,
                populate: false,
                child: child.id(),
                checkpoint: launch.checkpoint,
                external: launch.external,
                label: child.label().to_string(),
                lines: None,
                output: None,
                events: Arc::new(LoopbackChild {
                    child,
                    stats: self.stats.clone(),
                }),
            });
        }
    }

    fn kill(&self, _host: &str, _family: u64, _child: u32) {}
}

/// The touch job whose single clone reads `pages` pages of the parent's
/// memory one at a time.
fn touch_args(pages: u32) -> String {
    format!("mib=64 clones=1 pages={pages} interval_ms=0")
}

/// A console sink keeping every line, and the lines it kept.
pub(crate) fn collected_lines() -> (LineSink, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let kept = lines.clone();
    let sink: LineSink = Arc::new(move |_, line: &str| {
        lock(&kept).push(line.to_string());
    });
    (sink, lines)
}

/// The guest's own timing of its page reads: (p50, p99) in µs.
fn guest_read_latency(lines: &[String]) -> Result<(f64, f64)> {
    Ok((
        number(lines, "touch: child", "read_p50_us")?,
        number(lines, "touch: child", "read_p99_us")?,
    ))
}

/// The local baseline: handler-side stats and the guest's console lines.
fn local_fault_latency(pages: u32) -> Result<(CloneStats, Vec<String>)> {
    let hv = Arc::new(KvmHypervisor::open().context("opening KVM")?);
    let loopback = Arc::new(LoopbackCluster {
        supervisor: OnceLock::new(),
        images: Mutex::new(Vec::new()),
        stats: Arc::new(Mutex::new(Vec::new())),
    });
    let (sink, lines) = collected_lines();
    let supervisor = Arc::new(Supervisor::new(
        hv,
        SupervisorConfig {
            clone_limit: 4,
            lines: sink,
            descriptor_dir: None,
            cluster: Some(loopback.clone()),
            populate: PopulateMode::Read,
            host_pages: HostPages::Base,
            linux_personality: None,
        },
    ));
    let _ = loopback.supervisor.set(Arc::downgrade(&supervisor));
    let image = snowflock_guest::images::by_name("touch").context("touch image")?;
    let vm = supervisor.launch(image, 256 << 20, &touch_args(pages))?;
    let outcome = vm.wait();
    if outcome != VmOutcome::Exited(0) {
        bail!("local touch job ended {outcome:?}");
    }
    let stats = lock(&loopback.stats).pop();
    let lines = lock(&lines).clone();
    Ok((
        stats.context("the local hollow clone reported no stats")?,
        lines,
    ))
}

/// `fault-remote`.
pub fn fault_remote(setup: &Setup, pages: u32, sink: &mut dyn Sink) -> Result<()> {
    let params: Map<String, Value> = [("pages".to_string(), json!(pages))].into_iter().collect();
    let (cluster, _dir) = up(
        setup,
        2,
        4,
        &[
            ("prefetch_pages", toml::Value::Integer(0)),
            ("fault_around_pages", toml::Value::Integer(0)),
        ],
        &[],
    )?;
    let h1 = cluster.host(0)?.socket.clone();
    // Guest-side: each read timed with the TSC in the guest, i.e. the whole
    // fault as the VM sees it. Handler-side: from reading the fault event to
    // waking the vCPU, i.e. the part the transport changes.
    let mut samples: [Vec<f64>; 10] = Default::default();
    for run in 0..setup.runs {
        eprintln!("fault-remote: run {}/{}", run + 1, setup.runs);
        let end = run_job(&h1, "touch", 256 << 20, &touch_args(pages))?;
        let (remote_guest_p50, remote_guest_p99) = guest_read_latency(&end.lines)?;
        let remote = clone_stats(&h1)?
            .pop()
            .context("no hollow clone stats from the cluster")?
            .fetch_latency;
        let (local_stats, local_lines) = local_fault_latency(pages)?;
        let (local_guest_p50, local_guest_p99) = guest_read_latency(&local_lines)?;
        let local = local_stats.fetch_latency;
        let values = [
            remote_guest_p50,
            remote_guest_p99,
            local_guest_p50,
            local_guest_p99,
            remote_guest_p50 / local_guest_p50.max(1.0),
            remote.p50_us as f64,
            remote.p99_us as f64,
            local.p50_us as f64,
            local.p99_us as f64,
            remote.p50_us as f64 / local.p50_us.max(1) as f64,
        ];
        for (list, value) in samples.iter_mut().zip(values) {
            list.push(value);
        }
    }
    let names = [
        ("remote_fault_p50", "us"),
        ("remote_fault_p99", "us"),
        ("local_fault_p50", "us"),
        ("local_fault_p99", "us"),
        ("remote_to_local_p50_ratio", "ratio"),
        ("remote_handler_p50", "us"),
        ("remote_handler_p99", "us"),
        ("local_handler_p50", "us"),
        ("local_handler_p99", "us"),
        ("remote_to_local_handler_p50_ratio", "ratio"),
    ];
    for ((metric, unit), list) in names.iter().zip(&samples) {
        emit(sink, "fault-remote", metric, list, unit, &params)?;
    }
    cluster.down()?;
    Ok(())
}

/// The jobs of `avoidance`: (name, image, memory, arguments).
const AVOIDANCE_JOBS: [(&str, &str, u64, &str); 2] = [
    (
        "seqsearch",
        "seqsearch",
        512 << 20,
        "ref_mib=32 queries=8000 clones=2",
    ),
    (
        "allocheavy",
        "allocheavy",
        256 << 20,
        "clones=2 churn_mib=128 table_mib=4 work_mib=64",
    ),
];

fn fetched_bytes(setup: &Setup, avoidance: bool, image: &str, mem: u64, args: &str) -> Result<f64> {
    let (cluster, _dir) = up(
        setup,
        2,
        4,
        &[("avoidance", toml::Value::Boolean(avoidance))],
        &[],
    )?;
    let h1 = cluster.host(0)?.socket.clone();
    run_job(&h1, image, mem, args)?;
    let bytes: u64 = clone_stats(&h1)?.iter().map(|s| s.bytes_fetched).sum();
    cluster.down()?;
    Ok(bytes as f64)
}

/// `avoidance`.
pub fn avoidance(setup: &Setup, sink: &mut dyn Sink) -> Result<()> {
    for (name, image, mem, args) in AVOIDANCE_JOBS {
        let params: Map<String, Value> = [
            ("job".to_string(), json!(name)),
            ("args".to_string(), json!(args)),
        ]
        .into_iter()
        .collect();
        let (mut on, mut off, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..setup.runs {
            eprintln!("avoidance: {name} run {}/{}", run + 1, setup.runs);
            let with = fetched_bytes(setup, true, image, mem, args)?;
            let without = fetched_bytes(setup, false, image, mem, args)?;
            on.push(with / (1 << 20) as f64);
            off.push(without / (1 << 20) as f64);
            ratio.push(without / with.max(1.0));
        }
        emit(
            sink,
            "avoidance",
            "fetched_heuristics_on",
            &on,
            "MiB",
            &params,
        )?;
        emit(
            sink,
            "avoidance",
            "fetched_heuristics_off",
            &off,
            "MiB",
            &params,
        )?;
        emit(
            sink,
            "avoidance",
            "off_to_on_ratio",
            &ratio,
            "ratio",
            &params,
        )?;
    }
    Ok(())
}

pub(crate) fn seqsearch_args(clones: u32) -> String {
    format!("ref_mib=32 queries=32000 clones={clones}")
}

/// Job time (clone call to joined) of the same job on clones of the
/// parent's own host, whose memory is already there.
fn local_job_ms(clones: u32) -> Result<f64> {
    let hv = Arc::new(KvmHypervisor::open().context("opening KVM")?);
    let (sink, lines) = collected_lines();
    let supervisor = Supervisor::new(
        hv,
        SupervisorConfig {
            clone_limit: clones,
            lines: sink,
            descriptor_dir: None,
            cluster: None,
            populate: PopulateMode::Read,
            host_pages: HostPages::Base,
            linux_personality: None,
        },
    );
    let image = snowflock_guest::images::by_name("seqsearch").context("seqsearch image")?;
    let vm = supervisor.launch(image, 512 << 20, &seqsearch_args(clones))?;
    let outcome = vm.wait();
    let lines = lock(&lines).clone();
    if outcome != VmOutcome::Exited(0) {
        bail!("local seqsearch ended {outcome:?}:\n{}", lines.join("\n"));
    }
    Ok(number(&lines, "seqsearch:", "clone_ms")? + number(&lines, "seqsearch:", "join_ms")?)
}

/// `clone-remote`.
pub fn clone_remote(setup: &Setup, counts: &[u32], sink: &mut dyn Sink) -> Result<()> {
    let (cluster, _dir) = up(setup, 4, 8, &[], &[])?;
    let h1 = cluster.host(0)?.socket.clone();
    for &n in counts {
        let params: Map<String, Value> = [
            ("clones".to_string(), json!(n)),
            ("hosts".to_string(), json!(4)),
            ("args".to_string(), json!(seqsearch_args(n))),
        ]
        .into_iter()
        .collect();
        let (mut running, mut job, mut local, mut ratio) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..setup.runs {
            eprintln!("clone-remote: {n} clones, run {}/{}", run + 1, setup.runs);
            let end = run_job(&h1, "seqsearch", 512 << 20, &seqsearch_args(n))?;
            let report = end.reports.first().context("no clone report")?;
            if report.clones != n {
                bail!("granted {} of {n} clones", report.clones);
            }
            let all = report.all_running.context("children never all ran")?;
            let job_ms = number(&end.lines, "seqsearch:", "clone_ms")?
                + number(&end.lines, "seqsearch:", "join_ms")?;
            let local_ms = local_job_ms(n)?;
            running.push(all.as_secs_f64() * 1e3);
            job.push(job_ms);
            local.push(local_ms);
            ratio.push(job_ms / local_ms);
        }
        emit(sink, "clone-remote", "all_running", &running, "ms", &params)?;
        emit(sink, "clone-remote", "job_time_remote", &job, "ms", &params)?;
        emit(
            sink,
            "clone-remote",
            "job_time_state_resident",
            &local,
            "ms",
            &params,
        )?;
        emit(
            sink,
            "clone-remote",
            "remote_to_resident_job_ratio",
            &ratio,
            "ratio",
            &params,
        )?;
    }
    cluster.down()?;
    Ok(())
}
