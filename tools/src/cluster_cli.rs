//! `sf cluster up|down|status`: a local test cluster of network-namespace hosts
//! (see `snowflock_testkit`).
//!
//! `up` returns once every daemon accepts connections and leaves the cluster running: the
//! daemons run in sessions of their own, so they outlive `sf`. `down` reads the state file the
//! cluster left in its directory and removes everything; `status` only looks.
//!
//! Wiring in `main.rs`:
//!
//! ```ignore
//! /// Run a local test cluster of sfd hosts in network namespaces.
//! Cluster {
//!     #[command(subcommand)]
//!     command: cluster_cli::ClusterCommand,
//! },
//! // ...
//! Command::Cluster { command } => cluster_cli::run(command),
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use snowflock_control::config::{Distribution, RxPath};
use snowflock_testkit::{
    self as testkit, ClusterRecord, ClusterSpec, DEFAULT_CLONE_SLOTS, DEFAULT_FETCH_TIMEOUT_MS,
    HostInfo, NetnsCluster, UpProgress,
};

/// Where `sf cluster` keeps a cluster's state unless told otherwise.
pub const DEFAULT_DIR: &str = "/run/snowflock/cluster";

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start N sfd hosts, each in its own network namespace on one bridge (10.77.0.1..N),
    /// optionally with a Slurm cluster on them; returns once every daemon accepts connections,
    /// leaving them running.
    Up(UpArgs),
    /// Stop a cluster's daemons (Slurm's too) and remove its namespaces and runtime files
    /// (set SF_KEEP_LOGS=1 to keep each host's sfd.log and the Slurm logs).
    Down(DownArgs),
    /// Show which daemons of a cluster (and of its Slurm) are alive; exits 1 unless all are
    /// running and the sfd daemons accept connections.
    Status(StatusArgs),
    /// Make the switch lose and reorder UDP datagrams on their way to every host (0 0 removes it).
    Impair(ImpairArgs),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of hosts (1 to 32).
    #[arg(long)]
    pub hosts: usize,
    /// State directory: cluster.json, cluster.key, and h1/, h2/... (config, socket, log).
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Namespace and link name prefix, 1 to 8 characters from [a-z0-9]
    /// (default: sf + 6 random hex digits).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Clone slots per host.
    #[arg(long, default_value_t = DEFAULT_CLONE_SLOTS)]
    pub slots: u32,
    /// Page fetch timeout of every host, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_FETCH_TIMEOUT_MS)]
    pub fetch_timeout_ms: u64,
    /// The daemon binary (default: `sfd` next to this `sf`).
    #[arg(long)]
    pub sfd: Option<PathBuf>,
    /// RUST_LOG of the daemons.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// How clone hosts get pages: mcdist (multicast) or unicast.
    #[arg(long, value_enum, default_value = "mcdist")]
    pub distribution: Distribution,
    /// mcdist receive path of every host: sockets, xdp, or auto.
    #[arg(long, value_enum, default_value = "auto")]
    pub rx_path: RxPath,
    /// Every daemon serves Prometheus metrics at http://ADDRESS:PORT/metrics, ADDRESS its
    /// control address in the cluster.
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Also run a Slurm cluster on the hosts (munged and slurmctld on h1, a slurmd on every
    /// host, nodes named like the hosts) and have every daemon allocate clone slots from it.
    /// Needs munge and Slurm installed (Debian: munge slurmctld slurmd slurm-client).
    #[arg(long)]
    pub slurm: bool,
    /// CPUs each Slurm node declares (default: --slots).
    #[arg(long, requires = "slurm")]
    pub slurm_cpus: Option<u32>,
    /// Print the cluster's state (as in cluster.json) as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// State directory of the cluster.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Also delete every namespace named PREFIX-sw / PREFIX-hN, killing the processes in them
    /// (for a cluster whose state file is lost).
    #[arg(long)]
    pub prefix: Option<String>,
}

#[derive(Debug, Args)]
pub struct ImpairArgs {
    /// State directory of the cluster.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Percent of packets lost.
    #[arg(long, default_value_t = 0)]
    pub loss: u32,
    /// Percent of packets held back behind later ones.
    #[arg(long, default_value_t = 0)]
    pub reorder: u32,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// State directory of the cluster.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs one `sf cluster` subcommand.
pub fn run(command: ClusterCommand) -> Result<ExitCode> {
    match command {
        ClusterCommand::Up(args) => up(args),
        ClusterCommand::Down(args) => down(args),
        ClusterCommand::Status(args) => status(args),
        ClusterCommand::Impair(args) => impair(args),
    }
}

/// `sf cluster impair`: loss and reordering on the switch ports; the cluster keeps running.
pub fn impair(args: ImpairArgs) -> Result<ExitCode> {
    if args.loss + args.reorder > 100 {
        anyhow::bail!("loss and reorder add up to more than 100%");
    }
    let cluster = NetnsCluster::load(&args.dir).context("loading the cluster")?;
    let result = cluster.impair(args.loss, args.reorder);
    cluster.detach();
    result.context("impairing the switch ports")?;
    Ok(ExitCode::SUCCESS)
}

/// The `[mcdist]` keys of every host.
fn mcdist_table(distribution: Distribution, rx_path: RxPath) -> toml::Table {
    fn name<T: clap::ValueEnum>(value: &T) -> String {
        value
            .to_possible_value()
            .map(|p| p.get_name().to_owned())
            .unwrap_or_default()
    }
    let mut table = toml::Table::new();
    table.insert(
        "distribution".into(),
        toml::Value::String(name(&distribution)),
    );
    table.insert("rx_path".into(), toml::Value::String(name(&rx_path)));
    table
}

/// `sf cluster up`: builds the cluster, prints its hosts, and leaves it running.
pub fn up(args: UpArgs) -> Result<ExitCode> {
    let sfd = match args.sfd {
        Some(sfd) => sfd,
        None => default_sfd()?,
    };
    let mut spec = ClusterSpec::new(args.hosts, &args.dir, sfd);
    spec.prefix = args.prefix;
    spec.clone_slots = args.slots;
    spec.fetch_timeout_ms = args.fetch_timeout_ms;
    spec.log_filter = args.log;
    spec.mcdist = mcdist_table(args.distribution, args.rx_path);
    spec.metrics_port = args.metrics_port;
    spec.slurm = args.slurm;
    spec.slurm_cpus = args.slurm_cpus;
    let bar = crate::status_line::spinner(format!("cluster of {} hosts", args.hosts));
    spec.progress = Some(UpProgress(Arc::new({
        let bar = bar.clone();
        move |step: &str| bar.set_message(step.to_string())
    })));
    let cluster = NetnsCluster::up(spec);
    bar.finish_and_clear();
    let cluster = cluster.context("starting the cluster")?;
    let record = cluster.detach();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        print_hosts(&record);
        if let Some(first) = record.hosts.first() {
            println!();
            println!(
                "talk to a host:  SNOWFLOCK_SOCKET={} sf ps",
                first.socket.display()
            );
            println!("run on a host:   ip netns exec {} COMMAND", first.netns);
            if let Some(slurm) = &record.slurm {
                println!(
                    "slurm commands:  SLURM_CONF={} ip netns exec {} squeue",
                    slurm.conf.display(),
                    first.netns
                );
            }
            if let Some(port) = args.metrics_port {
                println!(
                    "metrics:         ip netns exec {} curl -s http://{}:{port}/metrics",
                    first.netns,
                    first.control.ip()
                );
            }
            println!(
                "tear down:       sf cluster down --dir {}",
                record.dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sf cluster down`: stops the daemons, deletes the namespaces, removes the runtime files.
pub fn down(args: DownArgs) -> Result<ExitCode> {
    let state = args.dir.join(testkit::STATE_FILE);
    if state.exists() {
        let cluster = NetnsCluster::load(&args.dir)?;
        let prefix = cluster.prefix().to_owned();
        let hosts = cluster.hosts().len();
        cluster.down()?;
        println!("cluster {prefix} ({hosts} hosts) is down");
    } else if args.prefix.is_none() {
        anyhow::bail!(
            "no cluster state at {} (nothing to tear down; --prefix P removes namespaces P-* \
             left without one)",
            state.display()
        );
    }
    if let Some(prefix) = args.prefix {
        let removed = testkit::purge_prefix(&prefix)?;
        if !removed.is_empty() {
            println!("deleted namespaces {}", removed.join(" "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sf cluster status`: which daemons are alive and accepting connections.
pub fn status(args: StatusArgs) -> Result<ExitCode> {
    let record = ClusterRecord::load(&args.dir)?;
    let hosts = record.status();
    let slurm = record.slurm_status();
    let healthy = hosts.iter().all(|h| h.running && h.accepting) && slurm.iter().all(|d| d.running);
    if args.json {
        let report = serde_json::json!({
            "prefix": record.prefix,
            "dir": record.dir,
            "healthy": healthy,
            "hosts": hosts,
            "slurm": record.slurm.as_ref().map(|s| serde_json::json!({
                "conf": s.conf,
                "daemons": slurm,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("cluster {} in {}", record.prefix, record.dir.display());
        println!(
            "{:<5} {:<14} {:<10} {:>8}  STATE",
            "HOST", "NETNS", "ADDRESS", "PID"
        );
        for (host, info) in hosts.iter().zip(&record.hosts) {
            let state = match (host.netns_exists, host.running, host.accepting) {
                (false, _, _) => "namespace missing",
                (true, true, true) => "ready",
                (true, true, false) => "running, socket not accepting",
                (true, false, _) => "not running",
            };
            let pid = host.pid.map_or("-".to_owned(), |p| p.to_string());
            println!(
                "{:<5} {:<14} {:<10} {:>8}  {state}",
                host.name,
                host.netns,
                info.address.to_string(),
                pid
            );
        }
        if let Some(conf) = record.slurm.as_ref().map(|s| &s.conf) {
            println!();
            println!("slurm {}", conf.display());
            println!("{:<10} {:<5} {:>8}  STATE", "DAEMON", "HOST", "PID");
            for daemon in &slurm {
                let pid = daemon.pid.map_or("-".to_owned(), |p| p.to_string());
                let state = if daemon.running {
                    "running"
                } else {
                    "not running"
                };
                println!(
                    "{:<10} {:<5} {:>8}  {state}",
                    daemon.kind.program(),
                    daemon.host,
                    pid
                );
            }
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_hosts(record: &ClusterRecord) {
    let slurm = if record.slurm.is_some() {
        ", Slurm"
    } else {
        ""
    };
    println!(
        "cluster {} up: {} hosts, switch {}{slurm}",
        record.prefix,
        record.hosts.len(),
        record.switch
    );
    println!(
        "{:<5} {:<14} {:<15} {:<15} {:>8}  SOCKET",
        "HOST", "NETNS", "CONTROL", "PAGES", "PID"
    );
    for host in &record.hosts {
        print_host(host);
    }
}

fn print_host(host: &HostInfo) {
    let pid = host.pid.map_or("-".to_owned(), |p| p.to_string());
    println!(
        "{:<5} {:<14} {:<15} {:<15} {:>8}  {}",
        host.name,
        host.netns,
        host.control.to_string(),
        host.pages.to_string(),
        pid,
        host.socket.display()
    );
}

/// `sfd` in the directory of the running executable.
fn default_sfd() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the sf executable")?;
    Ok(exe.parent().unwrap_or(Path::new("/")).join("sfd"))
}
