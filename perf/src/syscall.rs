//! Scenario `syscall`: system calls of a static Linux program (the embedded
//! `syscalls` example) served inside the guest by the personality, against
//! the same program run natively on this host in the same run, interleaved.
//!
//! The program times each call itself (the median over its own repetitions
//! of the mean per call), so both sides measure the same loop with the same
//! clock. Per call: `guest_ns`, `native_ns`, `guest_to_native`; and the
//! guest's `first_call_ns`, the call that trapped to the VMM before its site
//! was patched. `write1` writes one byte to standard error (in the guest,
//! into the personality's line buffer). `getpid_unpatched` calls from
//! writable memory, which the personality never patches: the cost of the
//! path that exits every time. `read_mib_s`: a 256 MiB host file read
//! whole in 1 MiB reads, from a mount in the guest and directly natively
//! (both from the host's page cache). `clonesum_*`: the `clonesum`
//! example (a static C program) clones itself into 2 local clones that
//! sort and sum halves of a table, against its own serial pass over the
//! same halves, timed by the program (`speedup_vs_serial`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};
use snowflock_control::config::PopulateMode;
use snowflock_control::{StartOptions, Supervisor, SupervisorConfig, VmOutcome};
use snowflock_guest::images;
use snowflock_vmm::files::{FilesConfig, MountSpec};
use snowflock_vmm::machine::MachineConfig;
use snowflock_vmm::memory::HostPages;
use snowflock_vmm::{KvmHypervisor, Machine, Stop};

use crate::record::{Record, Sink};
use crate::stats::Summary;

const BENCH: &str = "syscall";

/// One run's figures: per call, (mean ns per call, first call ns); the
/// read rate as call `read` with (MiB/s, 0).
type Figures = BTreeMap<String, (f64, f64)>;

const READ_FILE_MIB: usize = 256;

fn parse(output: &str) -> anyhow::Result<Figures> {
    let mut figures = Figures::new();
    for line in output
        .lines()
        .filter_map(|l| l.find("syscall=").map(|at| &l[at..]))
    {
        let field = |key: &str| -> anyhow::Result<&str> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .with_context(|| format!("no {key} in {line:?}"))
        };
        let name = field("syscall=")?.to_string();
        let ns: f64 = field("ns=")?.parse()?;
        let first: f64 = field("first_ns=")?.parse()?;
        figures.insert(name, (ns, first));
    }
    if let Some(line) = output
        .lines()
        .find_map(|l| l.find("read_mib_s=").map(|at| &l[at..]))
    {
        let rate: f64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("read_mib_s="))
            .context("no rate")?
            .parse()?;
        figures.insert("read".to_string(), (rate, 0.0));
    }
    if figures.is_empty() {
        bail!("the program printed no figures: {output:?}");
    }
    Ok(figures)
}

fn native(program: &std::path::Path, args: &[String]) -> anyhow::Result<Figures> {
    let output = Command::new(program)
        .args(args)
        .output()
        .context("running the program natively")?;
    if !output.status.success() {
        bail!("the native run failed: {:?}", output.status);
    }
    parse(&String::from_utf8_lossy(&output.stdout))
}

fn guest(hv: &KvmHypervisor, args: &[String], files: &FilesConfig) -> anyhow::Result<Figures> {
    let console = Arc::new(Mutex::new(Vec::new()));
    let sink = console.clone();
    let config = MachineConfig {
        mem_size: 256 << 20,
        cmdline: std::iter::once("syscalls".to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
        console: Arc::new(move |bytes: &[u8]| snowflock_sync::lock(&sink).extend_from_slice(bytes)),
        host_pages: HostPages::Base,
        personality: Some(images::LINUX_PERSONALITY.into()),
        files: files.clone(),
        strace: false,
        trap_syscalls: false,
    };
    let mut machine = Machine::boot(hv, images::SYSCALLS, &config)?;
    match machine.run()? {
        Stop::Exited(0) => {}
        other => bail!("the guest stopped with {other:?}"),
    }
    let text = String::from_utf8_lossy(&snowflock_sync::lock(&console)).into_owned();
    parse(&text)
}

/// Values `clonesum` sorts, over 2 clones.
const CLONESUM_VALUES: u32 = 4_000_000;

/// One `clonesum` run on local clones: (job ms, serial ms).
fn clonesum(
    supervisor: &Supervisor,
    lines: &Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<(f64, f64)> {
    snowflock_sync::lock(lines).clear();
    let outcome = supervisor
        .launch_linux(
            images::CLONESUM,
            512 << 20,
            &format!("clonesum {CLONESUM_VALUES} 2"),
            StartOptions::default(),
        )?
        .wait();
    let lines = snowflock_sync::lock(lines).clone();
    if outcome != VmOutcome::Exited(0) {
        bail!("clonesum ended with {outcome:?}: {lines:?}");
    }
    let line = lines
        .iter()
        .find(|l| l.starts_with("clonesum: job_ms="))
        .with_context(|| format!("no timing line in {lines:?}"))?;
    let field = |key: &str| -> anyhow::Result<f64> {
        Ok(line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .with_context(|| format!("no {key} in {line}"))?
            .parse()?)
    };
    Ok((field("job_ms=")?, field("serial_ms=")?))
}

/// Runs the program `runs` times natively and as a guest, interleaved.
pub fn run(runs: u32, rounds: u32, out: &mut dyn Sink) -> anyhow::Result<()> {
    let hv = KvmHypervisor::open().context("opening KVM")?;
    let dir = tempfile::tempdir()?;
    let program = dir.path().join("syscalls");
    std::fs::write(&program, images::SYSCALLS)?;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data)?;
    let file = data.join("read.bin");
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&file, block.repeat(READ_FILE_MIB))?;
    let files = FilesConfig {
        mounts: vec![MountSpec {
            host: data.clone(),
            guest: "/data".into(),
            identity: None,
        }],
        stdin: None,
        out: None,
    };
    let args = |path: &str| vec![rounds.to_string(), "5".to_string(), path.to_string()];
    let native_args = args(&file.display().to_string());
    let guest_args = args("/data/read.bin");
    let mut guest_runs = Vec::new();
    let mut native_runs = Vec::new();
    for run in 1..=runs {
        eprintln!("syscall: run {run}");
        native_runs.push(native(&program, &native_args)?);
        guest_runs.push(guest(&hv, &guest_args, &files)?);
    }
    emit_calls(&guest_runs, &native_runs, rounds, runs, out)?;

    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let supervisor = Supervisor::new(
        Arc::new(hv),
        SupervisorConfig {
            clone_limit: 2,
            lines: Arc::new(move |_label: &str, line: &str| {
                snowflock_sync::lock(&sink).push(line.to_string())
            }),
            descriptor_dir: None,
            cluster: None,
            populate: PopulateMode::Read,
            host_pages: HostPages::Huge,
            linux_personality: Some(images::LINUX_PERSONALITY.into()),
        },
    );
    let mut jobs = Vec::new();
    for run in 1..=runs {
        eprintln!("syscall: clonesum run {run}");
        jobs.push(clonesum(&supervisor, &lines)?);
    }
    let params: Map<String, Value> = [
        ("values".to_string(), json!(CLONESUM_VALUES)),
        ("clones".to_string(), json!(2)),
        ("runs".to_string(), json!(runs)),
    ]
    .into_iter()
    .collect();
    let job: Vec<f64> = jobs.iter().map(|j| j.0).collect();
    let serial: Vec<f64> = jobs.iter().map(|j| j.1).collect();
    let speedup: Vec<f64> = jobs.iter().map(|j| j.1 / j.0).collect();
    for (metric, samples, unit) in [
        ("clonesum_job_ms", &job, "ms"),
        ("clonesum_serial_ms", &serial, "ms"),
        ("speedup_vs_serial", &speedup, "ratio"),
    ] {
        if let Some(summary) = Summary::of(samples) {
            let mut params = params.clone();
            params.insert("min".into(), json!(summary.min));
            params.insert("max".into(), json!(summary.max));
            out.emit(Record::new(BENCH, metric, summary.median, unit, &params))?;
        }
    }
    Ok(())
}

fn emit_calls(
    guest_runs: &[Figures],
    native_runs: &[Figures],
    rounds: u32,
    runs: u32,
    out: &mut dyn Sink,
) -> anyhow::Result<()> {
    for name in guest_runs[0].keys() {
        let params: Map<String, Value> = [
            ("call".to_string(), json!(name)),
            ("rounds".to_string(), json!(rounds)),
            ("runs".to_string(), json!(runs)),
        ]
        .into_iter()
        .collect();
        let of = |figures: &[Figures], pick: fn(&(f64, f64)) -> f64| -> Vec<f64> {
            figures
                .iter()
                .filter_map(|f| f.get(name).map(pick))
                .collect()
        };
        let guest_ns = of(guest_runs, |f| f.0);
        let native_ns = of(native_runs, |f| f.0);
        let first = of(guest_runs, |f| f.1);
        let ratios: Vec<f64> = guest_ns
            .iter()
            .zip(&native_ns)
            .map(|(g, n)| g / n)
            .collect();
        let metrics = if name == "read" {
            [
                ("guest_read_mib_s", &guest_ns, "MiB/s"),
                ("native_read_mib_s", &native_ns, "MiB/s"),
                ("guest_to_native", &ratios, "ratio"),
            ]
            .to_vec()
        } else {
            [
                ("guest_ns", &guest_ns, "ns"),
                ("native_ns", &native_ns, "ns"),
                ("guest_to_native", &ratios, "ratio"),
                ("first_call_ns", &first, "ns"),
            ]
            .to_vec()
        };
        for (metric, samples, unit) in metrics {
            let Some(summary) = Summary::of(samples) else {
                continue;
            };
            let mut params = params.clone();
            params.insert("min".into(), json!(summary.min));
            params.insert("max".into(), json!(summary.max));
            out.emit(Record::new(BENCH, metric, summary.median, unit, &params))?;
        }
    }
    Ok(())
}
