//! `sfd`: the snowflock per-host daemon. See `snowflock_control::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use snowflock_control::config::DaemonConfig;
use snowflock_control::{daemon, error_chain};
use snowflock_vmm::KvmHypervisor;

#[derive(Debug, Parser)]
#[command(name = "sfd", version, about = "snowflock per-host daemon")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, default_value = "/etc/snowflock/sfd.toml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (the log's disk is full) is lost. Reporting it
        // would print to the same stderr, and printing to a stderr that fails panics: the
        // thread that logged would die with whatever it was serving.
        .log_internal_errors(false)
        .init();
    let args = Args::parse();
    let config = match DaemonConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let hv = match KvmHypervisor::open() {
        Ok(hv) => Arc::new(hv),
        Err(e) => {
            tracing::error!("opening KVM (/dev/kvm) failed: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let personality = Some(snowflock_guest::images::LINUX_PERSONALITY.into());
    match daemon::run(config, hv, personality) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
