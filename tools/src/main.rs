//! `sf`: run flock images, watch them clone, inspect descriptors.

/// `eprintln!` that drops what cannot be written: `sf` must not panic because its stderr is
/// closed or on a full disk.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod cluster_cli;
mod daemon_cli;
mod files_cli;
mod key_cli;
mod net_cli;
mod progress;
mod report;
mod shell_cli;
mod slurm_cli;
mod status_line;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::ProgressBar;
use snowflock_control::config::{PopulateMode, host_cores};
use snowflock_control::console::{self, LineSink};
use snowflock_control::{Descriptor, StartOptions, Supervisor, SupervisorConfig, VmOutcome};
use snowflock_vmm::memory::HostPages;
use snowflock_vmm::{KvmHypervisor, loader};

use crate::report::{RunReport, Unimplemented};
use crate::status_line::spinner;
use snowflock_control::size::parse_size;

#[derive(Debug, Parser)]
#[command(
    name = "sf",
    version,
    about = "snowflock: clone running VMs in milliseconds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a flock image or a static Linux executable (a path, or the name
    /// of an embedded example) with its console on stdout.
    Run(RunArgs),
    /// Run the sequence-search demo: a VM builds a DNA index, clones itself, and merges the clones' hits.
    Demo(DemoArgs),
    /// Work with VM descriptor files.
    Descriptor {
        #[command(subcommand)]
        command: DescriptorCommand,
    },
    /// List the example images built into this binary, and their kind
    /// (flock image, or Linux-ABI program).
    Images,
    /// Run a local test cluster of sfd hosts in network namespaces.
    Cluster {
        #[command(subcommand)]
        command: cluster_cli::ClusterCommand,
    },
    /// Start a flock image on the host's sfd.
    Start {
        #[command(flatten)]
        target: daemon_cli::Target,
        #[command(flatten)]
        args: daemon_cli::StartArgs,
    },
    /// Follow a VM started with `sf start` until it ends.
    Wait {
        #[command(flatten)]
        target: daemon_cli::Target,
        vm: u64,
        #[arg(long)]
        json: bool,
    },
    /// Clone a running VM from outside.
    Clone {
        #[command(flatten)]
        target: daemon_cli::Target,
        vm: u64,
        /// Number of clones.
        #[arg(long, short = 'n', default_value_t = 1)]
        clones: u32,
    },
    /// List the VMs of every cluster host.
    Ps {
        #[command(flatten)]
        target: daemon_cli::Target,
        #[arg(long)]
        json: bool,
    },
    /// End a VM: `VM` on this host or `HOST/VM`.
    Kill {
        #[command(flatten)]
        target: daemon_cli::Target,
        vm: String,
    },
    /// Fault counters per hollow clone and per host.
    Stats {
        #[command(flatten)]
        target: daemon_cli::Target,
        #[arg(long)]
        json: bool,
    },
    /// The host's page transport: show it, or tune queues, rings and the receive path.
    Net {
        #[command(subcommand)]
        command: net_cli::NetCommand,
    },
    /// Cluster keys: generate one, show the host's, rotate the cluster to a new one.
    Key {
        #[command(subcommand)]
        command: key_cli::KeyCommand,
    },
    /// Print the completion script of a shell on stdout.
    Completions(shell_cli::CompletionsArgs),
    /// Print the man page on stdout, or write every page into a directory.
    Man(shell_cli::ManArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Image file, or embedded example name (see `sf images`).
    image: String,
    /// Guest memory (multiple of 2 MiB), e.g. 512M or 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Most clones that may run at once on this host [default: one per core].
    #[arg(long)]
    clone_limit: Option<u32>,
    /// Save every captured descriptor into this directory.
    #[arg(long)]
    descriptor_dir: Option<PathBuf>,
    /// How each local clone holds its parent's state: a copy of its own, or a view of the
    /// parent's pages mapped in the background as it starts.
    #[arg(long, value_enum, default_value_t = PopulateMode::Read)]
    populate: PopulateMode,
    /// Back guest memory with 4 KiB pages only. By default it is on 2 MiB huge
    /// pages where the kernel allows it: the hypervisor then maps 2 MiB per
    /// first touch instead of 4 KiB.
    #[arg(long)]
    no_huge_pages: bool,
    /// Print a JSON report on stdout (guest console goes to stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    files: files_cli::FileArgs,
    /// Print every system call of a Linux-ABI program with its result (on the console).
    #[arg(long)]
    strace: bool,
    /// Never patch a Linux-ABI program's system-call sites: every call exits
    /// to the VMM (~50 µs). For code that checksums itself or keeps data in
    /// the red zone across a system call.
    #[arg(long)]
    trap_syscalls: bool,
    /// Arguments for the guest, e.g. `-- clones=4 mib=64`.
    #[arg(last = true)]
    guest_args: Vec<String>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Clones to fork [default: one per core, what this host runs well].
    #[arg(long)]
    clones: Option<u32>,
    /// Size of the synthetic DNA reference in MiB.
    #[arg(long, default_value_t = 256)]
    ref_mib: u32,
    /// Number of query reads.
    #[arg(long, default_value_t = 200_000)]
    queries: u32,
    /// Guest memory.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    mem: u64,
    /// Save the clone descriptor into this directory.
    #[arg(long)]
    descriptor_dir: Option<PathBuf>,
    /// Print a JSON report on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum DescriptorCommand {
    /// Print a descriptor file in readable form.
    Inspect {
        file: PathBuf,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Demo(args) => demo(args),
        Command::Descriptor {
            command: DescriptorCommand::Inspect { file, json },
        } => inspect(&file, json),
        Command::Start { target, args } => {
            load_image(&args.image).and_then(|image| daemon_cli::start(&target.socket, args, image))
        }
        Command::Cluster { command } => cluster_cli::run(command),
        Command::Wait { target, vm, json } => daemon_cli::wait(&target.socket, vm, json),
        Command::Clone { target, vm, clones } => daemon_cli::clone(&target.socket, vm, clones),
        Command::Ps { target, json } => daemon_cli::ps(&target.socket, json),
        Command::Kill { target, vm } => daemon_cli::kill(&target.socket, &vm),
        Command::Stats { target, json } => daemon_cli::stats(&target.socket, json),
        Command::Net { command } => net_cli::run(command),
        Command::Key { command } => key_cli::run(command),
        Command::Completions(args) => shell_cli::completions(&args),
        Command::Man(args) => shell_cli::man(&args),
        Command::Images => {
            for (name, bytes) in snowflock_guest::images::ALL {
                let kind = loader::kind(bytes).map_or("unreadable", loader::ImageKind::name);
                println!("{name:<12} {:>8} bytes  {kind}", bytes.len());
            }
            Ok(ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|err| {
        note!("sf: error: {err:#}");
        ExitCode::FAILURE
    })
}

/// The argument string a guest starts with: its arguments, and for a
/// Linux-ABI program its `argv`, whose first word is the program's name.
pub(crate) fn guest_cmdline(name: &str, image: &[u8], args: &[String]) -> String {
    let linux = matches!(loader::kind(image), Ok(loader::ImageKind::Linux));
    let program = std::path::Path::new(name)
        .file_name()
        .map_or_else(|| name.to_string(), |n| n.to_string_lossy().into_owned());
    let words = linux.then_some(program.as_str()).into_iter();
    words
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

fn load_image(name: &str) -> Result<Vec<u8>> {
    let path = std::path::Path::new(name);
    if path.is_file() {
        return std::fs::read(path).with_context(|| format!("reading image {name}"));
    }
    match snowflock_guest::images::by_name(name) {
        Some(bytes) => Ok(bytes.to_vec()),
        None => {
            let known: Vec<&str> = snowflock_guest::images::ALL
                .iter()
                .map(|(n, _)| *n)
                .collect();
            bail!(
                "{name} is neither a file nor an embedded image (embedded: {})",
                known.join(", ")
            )
        }
    }
}

fn supervisor(
    clone_limit: u32,
    lines: LineSink,
    descriptor_dir: Option<PathBuf>,
    populate: PopulateMode,
    host_pages: HostPages,
) -> Result<Supervisor> {
    if let Some(dir) = &descriptor_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating descriptor directory {}", dir.display()))?;
    }
    let hv = KvmHypervisor::open().context("opening KVM (/dev/kvm)")?;
    Ok(Supervisor::new(
        Arc::new(hv),
        SupervisorConfig {
            clone_limit,
            lines,
            descriptor_dir,
            cluster: None,
            populate,
            host_pages,
            linux_personality: Some(snowflock_guest::images::LINUX_PERSONALITY.into()),
        },
    ))
}

/// A line sink writing guest lines to stdout or stderr, above the progress bar.
fn console_lines(to_stderr: bool, bar: Option<ProgressBar>) -> LineSink {
    Arc::new(move |label: &str, line: &str| {
        let text = console::line_text(label, line);
        let print = || {
            if to_stderr {
                note!("{text}");
            } else {
                println!("{text}");
            }
        };
        match &bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    })
}

/// Passes every line on to `sink`, keeping the Linux personality's reports
/// of system calls it does not implement for the run's report.
fn keeping_unimplemented(sink: LineSink, found: Arc<Mutex<Vec<Unimplemented>>>) -> LineSink {
    Arc::new(move |label: &str, line: &str| {
        if let Some(report) = Unimplemented::parse(label, line) {
            found
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(report);
        }
        sink(label, line);
    })
}

fn exit_code(outcome: &VmOutcome) -> ExitCode {
    match outcome {
        VmOutcome::Exited(0) => ExitCode::SUCCESS,
        VmOutcome::Exited(code) => {
            ExitCode::from(u8::try_from(*code).ok().filter(|&c| c != 0).unwrap_or(1))
        }
        _ => ExitCode::FAILURE,
    }
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let image = load_image(&args.image)?;
    let bar = spinner(format!("running {}", args.image));
    let unimplemented = Arc::new(Mutex::new(Vec::new()));
    let sup = supervisor(
        args.clone_limit.unwrap_or_else(host_cores),
        keeping_unimplemented(
            console_lines(args.json, Some(bar.clone())),
            unimplemented.clone(),
        ),
        args.descriptor_dir,
        args.populate,
        if args.no_huge_pages {
            HostPages::Base
        } else {
            HostPages::Huge
        },
    )?;
    let started = Instant::now();
    let vm = sup
        .launch_linux(
            &image,
            args.mem,
            &guest_cmdline(&args.image, &image, &args.guest_args),
            StartOptions {
                files: args.files.config()?,
                strace: args.strace,
                trap_syscalls: args.trap_syscalls,
                slurm_job: None,
            },
        )
        .context("starting the VM")?;
    let outcome = vm.wait();
    bar.finish_and_clear();
    let unimplemented =
        std::mem::take(&mut *unimplemented.lock().unwrap_or_else(PoisonError::into_inner));
    let report = RunReport::new(
        &args.image,
        &outcome,
        started.elapsed(),
        &sup.reports(),
        unimplemented,
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprint!("{}", report.brief());
    }
    Ok(exit_code(&outcome))
}

fn demo(args: DemoArgs) -> Result<ExitCode> {
    let image = snowflock_guest::images::by_name("seqsearch")
        .context("the seqsearch example is not embedded in this build")?;
    let clones = args.clones.unwrap_or_else(|| {
        let cores = host_cores();
        note!(
            "sf demo: {cores} workers, one per core of this host: more runnable clones than \
             cores slow every clone down (--clones N to choose)"
        );
        cores
    });
    let bar = spinner(format!(
        "building a {} MiB reference, then cloning {clones} workers",
        args.ref_mib
    ));
    let sup = supervisor(
        clones,
        console_lines(args.json, Some(bar.clone())),
        args.descriptor_dir,
        PopulateMode::Read,
        HostPages::Huge,
    )?;
    let cmdline = format!(
        "ref_mib={} queries={} clones={clones}",
        args.ref_mib, args.queries
    );
    let started = Instant::now();
    let vm = sup
        .launch(image, args.mem, &cmdline)
        .context("starting the VM")?;
    let outcome = vm.wait();
    bar.finish_and_clear();
    let report = RunReport::new(
        "seqsearch",
        &outcome,
        started.elapsed(),
        &sup.reports(),
        Vec::new(),
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.demo_table(&cmdline, args.mem));
    }
    Ok(exit_code(&outcome))
}

fn inspect(file: &std::path::Path, json: bool) -> Result<ExitCode> {
    let bytes = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    let descriptor = Descriptor::load(file)?;
    let summary = descriptor.summary(bytes as usize);
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{summary}");
    }
    Ok(ExitCode::SUCCESS)
}
