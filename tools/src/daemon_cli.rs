//! `sf start|wait|clone|ps|kill|stats`: talk to the host's `sfd` over its
//! local API socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use snowflock_control::client::{ApiClient, VmEnd};
use snowflock_control::console::line_text;
use snowflock_control::protocol::{ApiRequest, ApiResponse, HostStats};
use snowflock_control::size::parse_size;
use snowflock_control::{StartOptions, VmOutcome, VmRole};
use snowflock_tools::text::parse_vm_ref;

use crate::progress::{ProgressOutput, ProgressWatch};
use crate::report::Unimplemented;

/// Where the daemon's socket is.
#[derive(Debug, Args)]
pub struct Target {
    /// The daemon's local API socket.
    #[arg(
        long,
        env = "SNOWFLOCK_SOCKET",
        default_value = "/run/snowflock/sfd.sock",
        global = true
    )]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Image file, or embedded example name (see `sf images`).
    pub image: String,
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Stay attached: print the console until the VM ends, exit with its status.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: print the outcome and clone reports as JSON on stdout
    /// (console lines go to stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub files: crate::files_cli::FileArgs,
    /// Print every system call of a Linux-ABI program with its result (on the console).
    #[arg(long)]
    pub strace: bool,
    /// Never patch a Linux-ABI program's system-call sites: every call exits to the VMM.
    #[arg(long)]
    pub trap_syscalls: bool,
    /// Run as part of the Slurm job this runs in (a batch script): clones go only to the
    /// job's nodes, at most one per CPU it holds there (SLURM_JOB_ID, SLURM_JOB_NODELIST,
    /// SLURM_JOB_CPUS_PER_NODE).
    #[arg(long)]
    pub slurm_job: bool,
    /// With --wait: print the job's progress (clones requested, granted, running, ended;
    /// pages fetched) as lines on stderr; without it, a terminal shows it in a status line.
    #[arg(long)]
    pub progress: bool,
    #[arg(last = true)]
    pub guest_args: Vec<String>,
}

/// Answers to single requests come within a minute.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn one(socket: &Path, request: &ApiRequest) -> Result<ApiResponse> {
    Ok(ApiClient::new(socket, Some(CALL_TIMEOUT)).call(request)?)
}

pub fn start(socket: &Path, args: StartArgs, image: Vec<u8>) -> Result<ExitCode> {
    let cmdline = crate::guest_cmdline(&args.image, &image, &args.guest_args);
    let linux = StartOptions {
        files: args.files.config()?,
        strace: args.strace,
        trap_syscalls: args.trap_syscalls,
        slurm_job: match args.slurm_job {
            true => Some(crate::slurm_cli::job_scope()?),
            false => None,
        },
    };
    if !args.wait {
        let vm = ApiClient::new(socket, Some(CALL_TIMEOUT)).start(
            &args.image,
            image,
            args.mem,
            &cmdline,
            linux,
        )?;
        println!("{vm}");
        return Ok(ExitCode::SUCCESS);
    }
    // One connection from the start, so that a short VM's lines are not
    // missed; a job runs as long as it runs: no read timeout.
    let vm = Arc::new(AtomicU64::new(0));
    let (output, bar) = if args.progress {
        (Some(ProgressOutput::Lines), None)
    } else if args.json {
        (None, None)
    } else {
        let bar = crate::status_line::spinner(format!("starting {}", args.image));
        (Some(ProgressOutput::Bar(bar.clone())), Some(bar))
    };
    let watch = output.map(|output| ProgressWatch::start(socket.to_path_buf(), vm.clone(), output));
    let mut console = Console::new(args.json);
    console.bar = bar.clone();
    let end = ApiClient::new(socket, None).start_and_wait(
        &args.image,
        image,
        args.mem,
        &cmdline,
        linux,
        |id| vm.store(id, Ordering::Release),
        |label, line| console.line(label, line),
    );
    if let Some(watch) = watch {
        watch.stop();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    console.end(vm.load(Ordering::Acquire), end?)
}

pub fn wait(socket: &Path, vm: u64, json: bool) -> Result<ExitCode> {
    // A job runs as long as it runs: no read timeout.
    let mut console = Console::new(json);
    let end = ApiClient::new(socket, None).wait(vm, |label, line| console.line(label, line))?;
    console.end(vm, end)
}

/// What `sf start --wait` and `sf wait` print of a VM they follow.
struct Console {
    json: bool,
    unimplemented: Vec<Unimplemented>,
    /// The status line lines are printed above, if one is shown.
    bar: Option<indicatif::ProgressBar>,
}

impl Console {
    fn new(json: bool) -> Self {
        Self {
            json,
            unimplemented: Vec::new(),
            bar: None,
        }
    }

    fn line(&mut self, label: &str, line: &str) {
        if let Some(report) = Unimplemented::parse(label, line) {
            self.unimplemented.push(report);
        }
        let text = line_text(label, line);
        let print = || {
            if self.json {
                note!("{text}");
            } else {
                println!("{text}");
            }
        };
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }

    fn end(self, vm: u64, end: VmEnd) -> Result<ExitCode> {
        let VmEnd { outcome, reports } = end;
        let (json, unimplemented) = (self.json, self.unimplemented);
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "vm": vm, "outcome": outcome, "clones": reports,
                    "unimplemented_syscalls": unimplemented,
                }))?
            );
        } else {
            for r in &reports {
                let remote = r.children.iter().filter(|c| c.host.is_some()).count();
                note!(
                    "sf: ticket {}: {} clones ({} on other hosts), paused {:.2} ms, all running after {}{}",
                    r.ticket,
                    r.clones,
                    remote,
                    r.capture_pause.as_secs_f64() * 1e3,
                    r.all_running
                        .map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3)),
                    r.slurm_job
                        .map_or(String::new(), |job| format!(", Slurm job {job}"))
                );
            }
            for report in &unimplemented {
                note!("sf: {}", report.describe());
            }
            note!("sf: vm {vm}: {outcome:?}");
        }
        Ok(match outcome {
            VmOutcome::Exited(0) => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        })
    }
}

pub fn clone(socket: &Path, vm: u64, clones: u32) -> Result<ExitCode> {
    let ApiResponse::Cloned {
        pause,
        descriptor_bytes,
        clones,
    } = one(socket, &ApiRequest::Clone { vm, clones })?
    else {
        bail!("unexpected answer to clone");
    };
    note!(
        "sf: vm {vm} paused {:.2} ms, descriptor {descriptor_bytes} bytes",
        pause.as_secs_f64() * 1e3
    );
    for (host, label) in clones {
        println!("{host} {label}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn ps(socket: &Path, json: bool) -> Result<ExitCode> {
    let ApiResponse::Ps { hosts } = one(socket, &ApiRequest::Ps)? else {
        bail!("unexpected answer to ps");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&hosts)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:>6} {:<8} {:>8} {:>10} {:<12} LABEL",
        "HOST", "VM", "ROLE", "MEM", "UPTIME", "SLURM JOBS"
    );
    for host in hosts {
        match host.vms {
            Err(e) => println!("{:<10} unreachable: {e}", host.host),
            Ok(vms) => {
                for v in vms {
                    let role = match v.role {
                        VmRole::Root => "root",
                        VmRole::Clone => "clone",
                        VmRole::Hollow => "hollow",
                    };
                    let jobs = if v.slurm_jobs.is_empty() {
                        "-".to_string()
                    } else {
                        v.slurm_jobs
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    println!(
                        "{:<10} {:>6} {:<8} {:>7}M {:>9.1}s {:<12} {}",
                        host.host,
                        v.vm,
                        role,
                        v.mem_size >> 20,
                        v.uptime.as_secs_f64(),
                        jobs,
                        v.label
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn kill(socket: &Path, target: &str) -> Result<ExitCode> {
    let (host, vm) = parse_vm_ref(target)?;
    one(socket, &ApiRequest::Kill { host, vm })?;
    Ok(ExitCode::SUCCESS)
}

pub fn stats(socket: &Path, json: bool) -> Result<ExitCode> {
    let hosts = ApiClient::new(socket, Some(CALL_TIMEOUT)).stats()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&hosts)?);
    } else {
        print!("{}", stats_table(&hosts));
    }
    Ok(ExitCode::SUCCESS)
}

fn stats_table(hosts: &[HostStats]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>5} {:<14} {:>7} {:>7} {:>8} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8}",
        "HOST",
        "VM",
        "LABEL",
        "FAULTS",
        "WAITED",
        "FETCHED",
        "PUSH-USED",
        "CACHE-HIT",
        "ZERO",
        "FREE",
        "FRESH",
        "P50(us)",
        "P99(us)"
    );
    for host in hosts {
        if let Some(e) = &host.error {
            let _ = writeln!(out, "{:<8} unreachable: {e}", host.host);
            continue;
        }
        for c in &host.clones {
            let s = &c.stats;
            // Counted when the clone ends.
            let push_used = if c.running {
                "-".to_string()
            } else {
                s.pages_pushed_used.to_string()
            };
            let _ = writeln!(
                out,
                "{:<8} {:>5} {:<14} {:>7} {:>7} {:>8} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8}",
                host.host,
                c.vm,
                c.label,
                s.faults,
                s.fetch_latency.count,
                s.pages_fetched,
                push_used,
                s.cache_hits,
                s.avoided.zero,
                s.avoided.free_heap,
                s.avoided.fresh,
                s.latency.p50_us,
                s.latency.p99_us
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<8} {:>12} {:>12} {:>9} {:>14} {:>10} {:>14} {:>14} {:>11} {:>11}",
        "HOST",
        "SERVED-PAGES",
        "PUSHED-PAGES",
        "PUSH-LED",
        "SERVED-BYTES",
        "FAMILIES",
        "CACHED-PAGES",
        "PUSHED-CACHED",
        "IDLE-CACHES",
        "HUGE-BLOCKS"
    );
    for host in hosts.iter().filter(|h| h.error.is_none()) {
        let cached: u64 = host.families.iter().map(|f| f.stats.resident_pages).sum();
        let pushed: u64 = host.families.iter().map(|f| f.stats.pages_pushed).sum();
        let idle = host.families.iter().filter(|f| f.idle).count();
        let huge: u64 = host.families.iter().map(|f| f.stats.huge_blocks).sum();
        let _ = writeln!(
            out,
            "{:<8} {:>12} {:>12} {:>9} {:>14} {:>10} {:>14} {:>14} {:>11} {:>11}",
            host.host,
            host.served_pages,
            host.pushed_pages,
            host.push_led_pages,
            host.served_bytes,
            host.served_families,
            cached,
            pushed,
            idle,
            huge
        );
    }
    out
}
