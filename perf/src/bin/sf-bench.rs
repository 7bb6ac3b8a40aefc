//! `sf-bench`: runs a snowflock benchmark scenario on this host.
//!
//! Results go to stdout as JSON lines (the benchmark output contract in
//! DESIGN.md); progress and errors go to stderr. `sf-bench plot` draws such
//! results as SVG charts and prints the paths it wrote.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use snowflock_control::size::parse_size;
use snowflock_perf::record::JsonLines;
use snowflock_perf::{clone_local, job, mcast, plot, remote, rx_path, soak, syscall};

#[derive(Debug, Parser)]
#[command(
    name = "sf-bench",
    version,
    about = "snowflock benchmarks (JSON lines on stdout)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Clone a VM with built-up state N times on this host; baseline: boot N
    /// fresh VMs and build the same state.
    CloneLocal(CloneLocal),
    /// Fault service latency of a clone on another netns host; baseline: the
    /// same clone's faults served from the frozen image on this host.
    FaultRemote(FaultRemote),
    /// Bytes fetched by remote clones with avoidance heuristics on and off.
    Avoidance(Remote),
    /// N clones over 4 netns hosts: clone call to all running, and job time
    /// against the same job on clones whose state is already in memory.
    CloneRemote(CloneRemote),
    /// N clones of example (a) over 4 netns hosts: bytes the parent's host
    /// sends and job time, by mcdist and by unicast in the same run.
    McastScale(McastScale),
    /// Pages per second received and installed into guest memory on one host:
    /// AF_XDP against kernel sockets, and the bulk UFFDIO_COPY ceiling.
    RxPath(RxPathArgs),
    /// Cloned jobs (`scan`, `seqsearch`) against the same work on state
    /// already in memory and against the serial job, on one host and on 4
    /// netns hosts.
    Job(JobArgs),
    /// Clone-and-join cycles against real daemons, on one host and across
    /// hosts, sampling each sfd's memory, descriptors, threads and clone
    /// slots: they must stay flat. Fails if a result is wrong or one grows.
    Soak(SoakArgs),
    /// SVG charts of results files (JSON lines), one or more per bench,
    /// named after the file; prints the paths it wrote.
    Plot(PlotArgs),
    /// System calls of a static Linux program served in the guest by the
    /// personality, against the same program run natively.
    Syscall(SyscallArgs),
}

#[derive(Debug, Args)]
struct SyscallArgs {
    /// Measured runs (each native and as a guest); the figures are their medians.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Calls per timed loop.
    #[arg(long, default_value_t = 20000)]
    rounds: u32,
}

/// Options of every multi-host scenario.
#[derive(Debug, Args)]
struct Remote {
    /// The sfd binary (default: next to sf-bench).
    #[arg(long)]
    sfd: Option<std::path::PathBuf>,
    /// Measured runs; the figures are their medians.
    #[arg(long, default_value_t = 3)]
    runs: u32,
}

#[derive(Debug, Args)]
struct FaultRemote {
    #[command(flatten)]
    remote: Remote,
    /// Pages the clone reads, one fault each.
    #[arg(long, default_value_t = 2000)]
    pages: u32,
}

#[derive(Debug, Args)]
struct CloneRemote {
    #[command(flatten)]
    remote: Remote,
    /// Clone counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
    clones: Vec<u32>,
}

#[derive(Debug, Args)]
struct McastScale {
    #[command(flatten)]
    remote: Remote,
    /// Clone counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16, 32])]
    clones: Vec<u32>,
    /// mcdist receive path of the hosts: sockets, xdp or auto.
    #[arg(long, default_value = "auto")]
    rx_path: String,
}

#[derive(Debug, Args)]
struct RxPathArgs {
    /// Measured runs; the figures are their medians.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Pages sent per run (a multiple of 64).
    #[arg(long, default_value_t = 65536)]
    pages: u32,
    /// MTU of the two hosts' links (up to 9000: jumbo frames); fragments are sized for it.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Send threads of the mcdist server.
    #[arg(long, default_value_t = 1)]
    send_threads: usize,
    /// What to measure (comma-separated; all by default), e.g. `--measure sockets` to
    /// profile one receive path alone.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = rx_path::Measure::ALL)]
    measure: Vec<rx_path::Measure>,
}

#[derive(Debug, Args)]
struct JobArgs {
    #[command(flatten)]
    remote: Remote,
    /// Modes (comma-separated): clones on this host, or over 4 netns hosts.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [job::Mode::Local, job::Mode::Remote])]
    mode: Vec<job::Mode>,
    /// Clone counts of every mode (comma-separated; default 1,2 local and 1,8,32 remote).
    #[arg(long, value_delimiter = ',')]
    clones: Option<Vec<u32>>,
    /// Jobs (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [job::Job::Scan, job::Job::Seqsearch])]
    job: Vec<job::Job>,
    /// Remote fault-service mechanisms to measure against a cluster with each switched the
    /// other way: off, or on for those off by default (comma-separated; none by default).
    #[arg(long, value_enum, value_delimiter = ',')]
    mechanisms: Vec<job::Mechanism>,
    /// State of the `scan` job, MiB.
    #[arg(long, default_value_t = 48)]
    state_mib: u64,
    /// `scan` writes one page in this many of each share (1: every page, 0: none).
    #[arg(long, default_value_t = 8)]
    write_every: u32,
    /// Loss percentages of mcdist's datagrams on the switch (comma-separated, remote mode):
    /// every job also runs without loss, back to back, for `loss_to_lossless`.
    #[arg(long, value_delimiter = ',')]
    loss: Vec<u32>,
    /// Percentage of mcdist's datagrams held back (reordered) while a loss is on.
    #[arg(long, default_value_t = 25)]
    reorder: u32,
}

#[derive(Debug, Args)]
struct SoakArgs {
    /// The sfd binary (default: next to sf-bench).
    #[arg(long)]
    sfd: Option<std::path::PathBuf>,
    /// Variants (comma-separated): clones on the parent's host, or on other hosts.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [soak::Variant::Local, soak::Variant::Remote])]
    variant: Vec<soak::Variant>,
    /// Clone-and-join cycles of every variant.
    #[arg(long, default_value_t = 1000)]
    cycles: u32,
    /// Cycles between samples of the daemons.
    #[arg(long, default_value_t = 25)]
    every: u32,
    /// Cycles before the sample that descriptors and threads must come back to.
    #[arg(long, default_value_t = 50)]
    warmup: u32,
    /// Hosts of the remote variant; each cycle runs one clone on every host but the parent's.
    #[arg(long, default_value_t = 2)]
    hosts: usize,
    /// Clones a cycle of the local variant.
    #[arg(long, default_value_t = 2)]
    clones: u32,
    /// Guest memory of the job's VM.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
}

#[derive(Debug, Args)]
struct PlotArgs {
    /// Results files (JSON lines).
    #[arg(required = true)]
    results: Vec<std::path::PathBuf>,
    /// Directory for the charts (created if missing).
    #[arg(short, long)]
    out: std::path::PathBuf,
}

fn setup(remote: &Remote) -> anyhow::Result<remote::Setup> {
    Ok(remote::Setup {
        sfd: match &remote.sfd {
            Some(path) => path.clone(),
            None => remote::default_sfd()?,
        },
        runs: remote.runs,
    })
}

#[derive(Debug, Args)]
struct CloneLocal {
    /// Clone counts to measure (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
    clones: Vec<u32>,
    /// Guest memory of every VM (e.g. 512M, 1G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    mem: u64,
    /// Memory the parent writes before it clones (whole MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    touch: u64,
    /// Measured runs per clone count; the figures are their medians.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Unreported runs per clone count before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Skip the cold-start baseline (and the speedup ratio).
    #[arg(long)]
    no_baseline: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line; a backtrace says nothing to a
            // user who chose bad options or whose guest failed.
            eprintln!("sf-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // Warnings of the control plane (e.g. a failed VM) go to stderr with the progress.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let mut out = JsonLines(std::io::stdout().lock());
    match cli.scenario {
        Scenario::CloneLocal(args) => {
            let config = clone_local::Config {
                clones: args.clones,
                mem: args.mem,
                touch: args.touch,
                runs: args.runs,
                warmup: args.warmup,
                baseline: !args.no_baseline,
            };
            clone_local::run(&config, &mut out)?;
        }
        Scenario::FaultRemote(args) => {
            remote::fault_remote(&setup(&args.remote)?, args.pages, &mut out)?;
        }
        Scenario::Avoidance(args) => remote::avoidance(&setup(&args)?, &mut out)?,
        Scenario::CloneRemote(args) => {
            remote::clone_remote(&setup(&args.remote)?, &args.clones, &mut out)?;
        }
        Scenario::McastScale(args) => {
            mcast::mcast_scale(&setup(&args.remote)?, &args.clones, &args.rx_path, &mut out)?;
        }
        Scenario::Job(args) => {
            let config = job::Config {
                modes: args.mode,
                clones: args.clones,
                jobs: args.job,
                mechanisms: args.mechanisms,
                state_mib: args.state_mib,
                write_every: args.write_every,
                loss: args.loss,
                reorder: args.reorder,
                setup: setup(&args.remote)?,
            };
            job::run(&config, &mut out)?;
        }
        Scenario::Soak(args) => {
            let config = soak::Config {
                variants: args.variant,
                cycles: args.cycles,
                every: args.every,
                warmup: args.warmup,
                hosts: args.hosts,
                clones: args.clones,
                mem: args.mem,
                sfd: match args.sfd {
                    Some(path) => path,
                    None => remote::default_sfd()?,
                },
            };
            soak::run(&config, &mut out)?;
        }
        Scenario::Plot(args) => {
            let outcome = plot::plot_files(&args.results, &args.out)?;
            for skipped in &outcome.skipped {
                eprintln!("sf-bench: {skipped}");
            }
            for path in &outcome.written {
                writeln!(out.0, "{}", path.display()).context("writing the chart paths")?;
            }
        }
        Scenario::Syscall(args) => syscall::run(args.runs, args.rounds, &mut out)?,
        Scenario::RxPath(args) => rx_path::run(
            args.runs,
            args.pages,
            args.mtu,
            args.send_threads,
            &args.measure,
            &mut out,
        )?,
    }
    out.0.flush().context("writing results")
}
