//! `sf key generate|show|rotate`: cluster keys, and moving a running cluster to a new one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use snowflock_control::client::ApiClient;
use snowflock_control::protocol::{ApiRequest, ApiResponse, KeyStatus};
use snowflock_dataplane::auth::ClusterKey;

use crate::daemon_cli::Target;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new random cluster key (64 hex digits, mode 0600) to FILE.
    Generate {
        file: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// The host's cluster keys (by fingerprint) and any rotation under way.
    Show {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Move the host to the key in FILE without a restart. Run it on every host, each within
    /// half the window of the first: for the first half the new key is accepted and the old
    /// one still used, for the second half the new one is used and the old one still
    /// accepted; then the old key is dropped. The new key replaces the host's key file.
    Rotate {
        #[command(flatten)]
        target: Target,
        /// The new key file (as `sf key generate` writes).
        file: PathBuf,
        /// Seconds both keys are accepted.
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
        window_secs: u64,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: KeyCommand) -> Result<ExitCode> {
    match command {
        KeyCommand::Generate { file, force } => {
            if !force && file.exists() {
                bail!("{} exists; pass --force to replace it", file.display());
            }
            let key = ClusterKey::generate();
            key.save(&file)?;
            println!("{} {}", key.fingerprint(), file.display());
        }
        KeyCommand::Show { target, json } => {
            print(&call(&target.socket, &ApiRequest::KeyShow)?, json)?;
        }
        KeyCommand::Rotate {
            target,
            file,
            window_secs,
            json,
        } => {
            let key = ClusterKey::load(&file)
                .with_context(|| format!("reading the new key from {}", file.display()))?;
            let request = ApiRequest::KeyRotate {
                key: key.to_hex(),
                window: Duration::from_secs(window_secs),
            };
            print(&call(&target.socket, &request)?, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn call(socket: &Path, request: &ApiRequest) -> Result<KeyStatus> {
    match ApiClient::new(socket, Some(CALL_TIMEOUT)).call(request)? {
        ApiResponse::Keys(status) => Ok(status),
        ApiResponse::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from sfd: {other:?}"),
    }
}

fn print(status: &KeyStatus, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(status)?);
        return Ok(());
    }
    println!("key file  {}", status.key_file.display());
    println!("current   {}", status.current);
    println!("sending   {}", status.sending);
    match &status.retiring {
        Some(old) => println!(
            "phase     {} (old key {old}, {} s left)",
            status.phase,
            status.remaining.as_secs()
        ),
        None => println!("phase     {}", status.phase),
    }
    Ok(())
}
