//! `clone-local`: how fast one host clones a VM that has built up state.
//!
//! The measured VM runs the `touch` guest: it writes a pattern over
//! `--touch` bytes of its heap (the "state"), then clones itself N times; the
//! children exit at once and the parent joins them. The supervisor's
//! [`CloneReport`] of that clone gives the parent's pause, the descriptor size
//! and the time until every child runs guest code.
//!
//! Baseline: the same state built without cloning, i.e. N fresh `touch` VMs
//! (with `clones=0`) booted on the same supervisor at once, timed from the
//! first launch until the last one has written its memory. Each measured
//! run is followed by a baseline run, so both see the same machine state.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Map, Value};
use snowflock_control::config::PopulateMode;
use snowflock_control::console::LineSink;
use snowflock_control::{CloneReport, Supervisor, SupervisorConfig, VmHandle, VmOutcome};
use snowflock_vmm::KvmHypervisor;
use snowflock_vmm::memory::HostPages;

use crate::record::{Record, Sink};
use crate::stats::Summary;
use crate::sync::lock;

pub const BENCH: &str = "clone-local";

/// The guest every run boots.
const IMAGE: &str = "touch";
/// Host memory a VM costs beyond what its guest touches (page tables, image,
/// stack, VMM structures); only used to refuse baselines that cannot fit.
const VM_OVERHEAD: u64 = 16 << 20;
/// Console lines kept for the error message of a failed run.
const KEPT_LINES: usize = 40;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Config {
    /// Clone counts; each is measured separately.
    pub clones: Vec<u32>,
    /// Guest memory of every VM, in bytes.
    pub mem: u64,
    /// Bytes the parent writes before it clones (whole MiB).
    pub touch: u64,
    /// Measured runs per clone count.
    pub runs: u32,
    /// Runs per clone count before the measured ones, whose results are
    /// dropped (first-run costs: page cache, thread and KVM start-up).
    pub warmup: u32,
    /// Whether to measure the cold-start baseline.
    pub baseline: bool,
}

impl Config {
    fn touch_mib(&self) -> u64 {
        self.touch >> 20
    }

    /// Rejects settings the guest or the VMM would fail on later, with a
    /// message that says which option to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(!self.clones.is_empty(), "--clones needs at least one count");
        ensure!(
            self.clones.iter().all(|&n| n > 0),
            "--clones must be at least 1 (0 clones is not a clone)"
        );
        ensure!(self.runs > 0, "--runs must be at least 1");
        ensure!(
            self.mem.is_multiple_of(2 << 20) && self.mem >= 32 << 20,
            "--mem must be a multiple of 2 MiB and at least 32 MiB"
        );
        ensure!(
            self.touch.is_multiple_of(1 << 20),
            "--touch must be whole MiB"
        );
        ensure!(
            self.touch + VM_OVERHEAD <= self.mem,
            "--touch must leave at least {} MiB of --mem for the guest's image, heap bookkeeping and stack",
            VM_OVERHEAD >> 20
        );
        Ok(())
    }

    fn params(&self, clones: u32) -> Map<String, Value> {
        let mut p = Map::new();
        p.insert("clones".into(), clones.into());
        p.insert("mem_mib".into(), (self.mem >> 20).into());
        p.insert("touch_mib".into(), self.touch_mib().into());
        p.insert("runs".into(), self.runs.into());
        p
    }
}

/// One measured clone operation.
#[derive(Debug, Clone)]
struct CloneSample {
    capture_pause: Duration,
    descriptor_bytes: usize,
    all_running: Duration,
    restores: Vec<Duration>,
}

/// Console output of the VMs of one run, and when each root VM printed
/// touch's final line, i.e. had built its state and finished.
#[derive(Default)]
struct Console {
    state: Mutex<ConsoleState>,
}

#[derive(Default)]
struct ConsoleState {
    lines: Vec<String>,
    finished: Vec<Instant>,
}

impl Console {
    fn sink(self: &Arc<Self>) -> LineSink {
        let console = self.clone();
        Arc::new(move |label: &str, line: &str| console.record(label, line))
    }

    fn record(&self, label: &str, line: &str) {
        // Taken first: this runs on the VM's thread as the guest writes the
        // line, which is the moment the baseline's clock stops.
        let now = Instant::now();
        let mut state = lock(&self.state);
        // Root VMs have an empty label; clones are labelled `clone N`.
        if label.is_empty() && line.starts_with("touch:") {
            state.finished.push(now);
        }
        if state.lines.len() == KEPT_LINES {
            state.lines.remove(0);
        }
        state.lines.push(if label.is_empty() {
            line.to_string()
        } else {
            format!("[{label}] {line}")
        });
    }

    /// Everything recorded since the last call.
    fn take(&self) -> ConsoleState {
        std::mem::take(&mut *lock(&self.state))
    }
}

impl ConsoleState {
    fn tail(&self) -> String {
        if self.lines.is_empty() {
            "(no console output)".into()
        } else {
            self.lines.join("\n")
        }
    }
}

/// Runs the scenario and emits its records into `sink`; progress goes to stderr.
pub fn run(config: &Config, sink: &mut dyn Sink) -> anyhow::Result<()> {
    config.validate()?;
    let image = snowflock_guest::images::by_name(IMAGE)
        .with_context(|| format!("the guest image {IMAGE:?} is not embedded"))?;
    if config.baseline {
        check_memory_for_baseline(config)?;
    }
    let hv = KvmHypervisor::open().context("opening /dev/kvm")?;
    let console = Arc::new(Console::default());
    let clone_limit = config.clones.iter().copied().max().unwrap_or(1);
    let supervisor = Supervisor::new(
        Arc::new(hv),
        SupervisorConfig {
            clone_limit,
            lines: console.sink(),
            descriptor_dir: None,
            cluster: None,
            populate: PopulateMode::Read,
            host_pages: HostPages::Base,
            linux_personality: None,
        },
    );
    for &n in &config.clones {
        measure(config, &supervisor, &console, image, n, sink)?;
    }
    Ok(())
}

fn measure(
    config: &Config,
    supervisor: &Supervisor,
    console: &Console,
    image: &[u8],
    n: u32,
    sink: &mut dyn Sink,
) -> anyhow::Result<()> {
    let mut clones = Vec::new();
    let mut colds = Vec::new();
    let total = config.warmup + config.runs;
    for i in 0..total {
        let label = if i < config.warmup {
            format!("warm-up {}/{}", i + 1, config.warmup)
        } else {
            format!("run {}/{}", i + 1 - config.warmup, config.runs)
        };
        let sample = clone_run(config, supervisor, console, image, n)
            .with_context(|| format!("{n} clones, {label}"))?;
        let mut progress = format!(
            "{BENCH} clones={n} {label}: pause {:.2} ms, descriptor {} B, all running {:.2} ms",
            ms(sample.capture_pause),
            sample.descriptor_bytes,
            ms(sample.all_running)
        );
        if config.baseline {
            let cold = cold_run(config, supervisor, console, image, n)
                .with_context(|| format!("cold start of {n} VMs, {label}"))?;
            progress.push_str(&format!(", cold start {:.1} ms", ms(cold)));
            if i >= config.warmup {
                colds.push(cold);
            }
        }
        eprintln!("{progress}");
        if i >= config.warmup {
            clones.push(sample);
        }
    }
    emit(config, n, &clones, &colds, sink)
}

/// Boots `touch` with `clones=n` and returns the report of its clone.
fn clone_run(
    config: &Config,
    supervisor: &Supervisor,
    console: &Console,
    image: &[u8],
    n: u32,
) -> anyhow::Result<CloneSample> {
    let before = supervisor.reports().len();
    console.take();
    let args = format!("mib={} clones={n}", config.touch_mib());
    let outcome = supervisor.launch(image, config.mem, &args)?.wait();
    let seen = console.take();
    if outcome != VmOutcome::Exited(0) {
        bail!(
            "the parent ended with {outcome:?}; its console:\n{}",
            seen.tail()
        );
    }
    let reports = supervisor.reports();
    ensure!(
        reports.len() == before + 1,
        "expected one clone report, got {}",
        reports.len() - before
    );
    let report: CloneReport = reports.into_iter().nth(before).expect("length checked");
    ensure!(
        report.clones == n,
        "the supervisor granted {} of {n} clones",
        report.clones
    );
    for child in &report.children {
        ensure!(
            child.outcome == VmOutcome::Result(Vec::new()),
            "clone {} ended with {:?}",
            child.id,
            child.outcome
        );
    }
    let all_running = report
        .all_running
        .context("the clone report has no all-running time")?;
    Ok(CloneSample {
        capture_pause: report.capture_pause,
        descriptor_bytes: report.descriptor_bytes,
        all_running,
        restores: report.children.iter().map(|c| c.restore).collect(),
    })
}

/// Boots `n` fresh `touch` VMs that do not clone, and returns the time from
/// the first launch until the last of them has written its memory.
fn cold_run(
    config: &Config,
    supervisor: &Supervisor,
    console: &Console,
    image: &[u8],
    n: u32,
) -> anyhow::Result<Duration> {
    console.take();
    let args = format!("mib={} clones=0", config.touch_mib());
    let start = Instant::now();
    let mut vms: Vec<VmHandle> = Vec::with_capacity(n as usize);
    for _ in 0..n {
        match supervisor.launch(image, config.mem, &args) {
            Ok(vm) => vms.push(vm),
            Err(e) => {
                // Do not leave the others running into the next measurement.
                for vm in &vms {
                    vm.kill();
                }
                for vm in vms {
                    vm.wait();
                }
                return Err(e.into());
            }
        }
    }
    let outcomes: Vec<VmOutcome> = vms.into_iter().map(VmHandle::wait).collect();
    let seen = console.take();
    if let Some(bad) = outcomes.iter().find(|o| **o != VmOutcome::Exited(0)) {
        bail!("a VM ended with {bad:?}; console:\n{}", seen.tail());
    }
    ensure!(
        seen.finished.len() == n as usize,
        "{} of {n} VMs printed their final line",
        seen.finished.len()
    );
    let last = seen.finished.iter().max().expect("n > 0");
    Ok(last.duration_since(start))
}

/// Refuses a baseline whose N concurrent VMs would not fit in memory: the
/// kernel would start reclaiming or killing, and the numbers would be wrong.
fn check_memory_for_baseline(config: &Config) -> anyhow::Result<()> {
    let Some(available) = mem_available() else {
        return Ok(());
    };
    let max_n = u64::from(config.clones.iter().copied().max().unwrap_or(1));
    let needed = max_n * (config.touch + VM_OVERHEAD);
    ensure!(
        needed <= available / 10 * 8,
        "the cold-start baseline runs {max_n} VMs touching {} MiB each at once: about {} MiB, \
         more than 80% of the {} MiB available; use a smaller --touch or --no-baseline",
        config.touch_mib(),
        needed >> 20,
        available >> 20
    );
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Emits the medians (as `metric`) and ranges (`metric_min`, `metric_max`).
fn emit(
    config: &Config,
    n: u32,
    clones: &[CloneSample],
    colds: &[Duration],
    sink: &mut dyn Sink,
) -> anyhow::Result<()> {
    let params = config.params(n);
    let mut out = Emitter {
        params: &params,
        sink,
    };
    let pause: Vec<f64> = clones.iter().map(|s| us(s.capture_pause)).collect();
    out.spread("capture_pause_us", "us", &pause)?;
    let descriptor: Vec<f64> = clones.iter().map(|s| s.descriptor_bytes as f64).collect();
    if let Some(s) = Summary::of(&descriptor) {
        out.one("descriptor_bytes", "bytes", s.median)?;
    }
    let running: Vec<f64> = clones.iter().map(|s| ms(s.all_running)).collect();
    let running = out.spread("all_running_ms", "ms", &running)?;
    // Per-child restores, pooled over the runs: where all_running goes.
    let restores: Vec<f64> = clones
        .iter()
        .flat_map(|s| s.restores.iter().map(|&d| us(d)))
        .collect();
    if let Some(s) = Summary::of(&restores) {
        out.one("restore_us", "us", s.median)?;
        out.one("restore_us_max", "us", s.max)?;
    }
    if config.baseline {
        let cold: Vec<f64> = colds.iter().map(|&d| ms(d)).collect();
        let cold = out.spread("cold_start_ms", "ms", &cold)?;
        if let (Some(cold), Some(running)) = (cold, running)
            && running.median > 0.0
        {
            out.one("clone_speedup", "ratio", cold.median / running.median)?;
        }
    }
    Ok(())
}

struct Emitter<'a> {
    params: &'a Map<String, Value>,
    sink: &'a mut dyn Sink,
}

impl Emitter<'_> {
    fn one(&mut self, metric: &str, unit: &str, value: f64) -> anyhow::Result<()> {
        self.sink
            .emit(Record::new(BENCH, metric, value, unit, self.params))
            .context("writing results")
    }

    fn spread(
        &mut self,
        metric: &str,
        unit: &str,
        samples: &[f64],
    ) -> anyhow::Result<Option<Summary>> {
        let Some(s) = Summary::of(samples) else {
            return Ok(None);
        };
        for (suffix, value) in [("", s.median), ("_min", s.min), ("_max", s.max)] {
            self.one(&format!("{metric}{suffix}"), unit, value)?;
        }
        Ok(Some(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Every metric the scenario emits, with its unit.
    fn metrics(baseline: bool) -> BTreeMap<&'static str, &'static str> {
        let mut m = BTreeMap::from([
            ("capture_pause_us", "us"),
            ("capture_pause_us_min", "us"),
            ("capture_pause_us_max", "us"),
            ("descriptor_bytes", "bytes"),
            ("all_running_ms", "ms"),
            ("all_running_ms_min", "ms"),
            ("all_running_ms_max", "ms"),
            ("restore_us", "us"),
            ("restore_us_max", "us"),
        ]);
        if baseline {
            m.extend([
                ("cold_start_ms", "ms"),
                ("cold_start_ms_min", "ms"),
                ("cold_start_ms_max", "ms"),
                ("clone_speedup", "ratio"),
            ]);
        }
        m
    }

    fn config() -> Config {
        Config {
            clones: vec![1, 8],
            mem: 1 << 30,
            touch: 256 << 20,
            runs: 3,
            warmup: 0,
            baseline: true,
        }
    }

    fn sample(pause_us: u64, running_ms: u64) -> CloneSample {
        CloneSample {
            capture_pause: Duration::from_micros(pause_us),
            descriptor_bytes: 12_000,
            all_running: Duration::from_millis(running_ms),
            restores: vec![Duration::from_micros(900), Duration::from_micros(1100)],
        }
    }

    #[test]
    fn validation_names_the_option() {
        assert!(config().validate().is_ok());
        let bad = |f: fn(&mut Config)| {
            let mut c = config();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.clones = vec![0]).contains("--clones"));
        assert!(bad(|c| c.runs = 0).contains("--runs"));
        assert!(bad(|c| c.mem = 33 << 20).contains("--mem"));
        assert!(bad(|c| c.touch = c.mem).contains("--touch"));
        assert!(bad(|c| c.touch = 1000).contains("--touch"));
    }

    #[test]
    fn emits_every_metric_with_medians_and_the_ratio() {
        let mut out: Vec<Record> = Vec::new();
        let samples = [sample(900, 20), sample(1000, 10), sample(3000, 30)];
        let colds = [
            Duration::from_millis(400),
            Duration::from_millis(200),
            Duration::from_millis(300),
        ];
        emit(&config(), 8, &samples, &colds, &mut out).unwrap();
        let got: BTreeMap<&str, &str> = out
            .iter()
            .map(|r| (r.metric.as_str(), r.unit.as_str()))
            .collect();
        assert_eq!(got, metrics(true));
        let value = |m: &str| out.iter().find(|r| r.metric == m).unwrap().value;
        assert_eq!(value("capture_pause_us"), 1000.0);
        assert_eq!(value("all_running_ms"), 20.0);
        assert_eq!(value("all_running_ms_max"), 30.0);
        assert_eq!(value("cold_start_ms"), 300.0);
        assert_eq!(value("clone_speedup"), 15.0);
        assert_eq!(value("restore_us"), 1000.0);
        let r = &out[0];
        assert_eq!(r.bench, BENCH);
        assert_eq!(r.params["clones"], 8);
        assert_eq!(r.params["mem_mib"], 1024);
        assert_eq!(r.params["touch_mib"], 256);
        assert_eq!(r.params["runs"], 3);
    }

    #[test]
    fn without_baseline_there_is_no_ratio() {
        let mut out: Vec<Record> = Vec::new();
        let c = Config {
            baseline: false,
            ..config()
        };
        emit(&c, 1, &[sample(1, 1)], &[], &mut out).unwrap();
        let got: BTreeMap<&str, &str> = out
            .iter()
            .map(|r| (r.metric.as_str(), r.unit.as_str()))
            .collect();
        assert_eq!(got, metrics(false));
    }

    #[test]
    fn console_times_only_the_root_vms_final_lines() {
        let console = Arc::new(Console::default());
        let sink = console.sink();
        sink("", "hello");
        sink("clone 1", "touch: not a root VM");
        sink("", "touch: mib=1 clones=0 ok");
        let seen = console.take();
        assert_eq!(seen.finished.len(), 1);
        assert_eq!(seen.lines.len(), 3);
        assert!(console.take().lines.is_empty());
    }
}
