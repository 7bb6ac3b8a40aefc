//! `sf net show|tune`: the host's page transport (receive path, XDP program,
//! AF_XDP queues and rings, NIC rings and channels, mcdist counters).

use std::fmt::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use snowflock_control::client::ApiClient;
use snowflock_control::config::{RxPath, XdpAttachMode};
use snowflock_control::protocol::{ApiRequest, ApiResponse, NetStatus, NetTune};
use snowflock_tools::text::queue_list;

use crate::daemon_cli::Target;

/// Re-attaching the XDP program and binding sockets takes well under this.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Subcommand)]
pub enum NetCommand {
    /// Receive path, XDP program, queues, rings and counters of the host.
    Show {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Change the receive path, AF_XDP queues and rings, or the NIC's rings and channels.
    Tune {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        tune: TuneArgs,
    },
}

#[derive(Debug, Args)]
pub struct TuneArgs {
    /// Receive path: sockets, xdp, or auto (xdp, else sockets).
    #[arg(long, value_enum)]
    rx_path: Option<RxPath>,
    /// Attach the XDP program in the driver (native) or the generic stack.
    #[arg(long, value_enum)]
    xdp_mode: Option<XdpAttachMode>,
    /// RX queues that get an AF_XDP socket, comma-separated; "all" for every queue.
    #[arg(long)]
    queues: Option<String>,
    /// UMEM frames per AF_XDP socket (power of two).
    #[arg(long)]
    umem_frames: Option<u32>,
    /// AF_XDP fill ring size (power of two).
    #[arg(long)]
    fill_ring: Option<u32>,
    /// AF_XDP RX ring size (power of two).
    #[arg(long)]
    rx_ring: Option<u32>,
    /// Busy-poll budget in microseconds (0 = off).
    #[arg(long)]
    busy_poll_us: Option<u32>,
    /// The NIC's RX descriptor ring size (as `ethtool -G rx`).
    #[arg(long)]
    nic_rx_ring: Option<u32>,
    /// The NIC's TX descriptor ring size (as `ethtool -G tx`).
    #[arg(long)]
    nic_tx_ring: Option<u32>,
    /// The NIC's combined channels (as `ethtool -L combined`).
    #[arg(long)]
    nic_channels: Option<u32>,
}

pub fn run(command: NetCommand) -> Result<ExitCode> {
    match command {
        NetCommand::Show { target, json } => {
            let status = call(&target.socket, &ApiRequest::NetShow)?;
            print_status(&status, json)?;
        }
        NetCommand::Tune { target, tune } => {
            let tune = tune_request(tune)?;
            let status = call(&target.socket, &ApiRequest::NetTune(tune))?;
            print_status(&status, false)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn call(socket: &Path, request: &ApiRequest) -> Result<NetStatus> {
    match ApiClient::new(socket, Some(CALL_TIMEOUT)).call(request)? {
        ApiResponse::Net(status) => Ok(*status),
        ApiResponse::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from sfd: {other:?}"),
    }
}

fn tune_request(args: TuneArgs) -> Result<NetTune> {
    let queues = match args.queues.as_deref() {
        None => None,
        Some("all") => Some(Vec::new()),
        Some(list) => Some(queue_list(list)?),
    };
    let tune = NetTune {
        rx_path: args.rx_path,
        xdp_mode: args.xdp_mode,
        queues,
        umem_frames: args.umem_frames,
        fill_ring: args.fill_ring,
        rx_ring: args.rx_ring,
        busy_poll_us: args.busy_poll_us,
        nic_rx_ring: args.nic_rx_ring,
        nic_tx_ring: args.nic_tx_ring,
        nic_channels: args.nic_channels,
    };
    Ok(tune)
}

fn print_status(status: &NetStatus, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
    } else {
        print!("{}", status_text(status));
    }
    Ok(())
}

fn status_text(s: &NetStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "host          {}", s.host);
    let _ = writeln!(out, "distribution  {:?}", s.distribution);
    let _ = write!(out, "interface     {}", s.interface);
    if let Some(d) = &s.device {
        let _ = write!(
            out,
            " (ifindex {}, mtu {}, {} rx / {} tx queues",
            d.ifindex, d.mtu, d.rx_queues, d.tx_queues
        );
        if let Some((current, max)) = d.channels {
            let _ = write!(out, ", rx channels {current}/{max}");
        }
        if let Some((rx, tx, rx_max, tx_max)) = d.rings {
            let _ = write!(out, ", rings rx {rx}/{rx_max} tx {tx}/{tx_max}");
        }
        let _ = write!(out, ", xdp {})", d.xdp);
    }
    out.push('\n');
    let _ = write!(out, "rx path       {}", s.rx_path);
    if let Some(why) = &s.fallback {
        let _ = write!(out, " (AF_XDP unavailable: {why})");
    }
    out.push('\n');
    if let Some(x) = &s.xdp {
        let queues: Vec<String> = x.queues.iter().map(u32::to_string).collect();
        let _ = writeln!(
            out,
            "xdp           {:?} mode, program {}, queues [{}], {} copy",
            x.mode,
            x.program_id,
            queues.join(","),
            if x.zero_copy { "zero" } else { "kernel" }
        );
        let _ = writeln!(
            out,
            "af_xdp        umem {} x {} B, fill ring {}, rx ring {}, busy poll {} us",
            x.umem_frames, x.frame_size, x.fill_ring, x.rx_ring, x.busy_poll_us
        );
        let _ = writeln!(
            out,
            "xdp counters  received {}, redirected {}, duplicate-dropped {}, passed {}, malformed {}",
            x.received, x.redirected, x.duplicate_dropped, x.passed, x.malformed
        );
        let _ = writeln!(
            out,
            "xsk counters  dropped {}, rx ring full {}, fill ring empty {}",
            x.socket_dropped, x.rx_ring_full, x.fill_ring_empty
        );
    }
    let r = &s.rx;
    let _ = writeln!(
        out,
        "received      {} datagrams, {} fragments ({} duplicate), {} pages ({} before a request), {} MAC-failed, {} malformed, {} not ours",
        r.datagrams,
        r.fragments,
        r.duplicate_fragments,
        r.pages_completed,
        r.early_pages,
        r.mac_failed,
        r.malformed,
        r.not_ours
    );
    let _ = writeln!(
        out,
        "requests out {} re-requests ({} by missing fragments), {} unicast end-game requests, {} rejects; {} pages awaited ({} waiting for the window), rate {} pages/s ({} cuts)",
        r.re_requests,
        r.fragment_re_requests,
        r.unicast_requests,
        r.rejects,
        r.outstanding,
        r.queued,
        r.rate,
        r.rate_cuts
    );
    let t = &s.tx;
    let _ = writeln!(
        out,
        "served        {} requests for {} pages, {} suppressed duplicates, {} pages sent ({} unicast, {} pushed) in {} fragments, {} bytes, {} MAC-failed",
        t.requests,
        t.pages_requested,
        t.duplicates_suppressed,
        t.pages_sent,
        t.unicast_pages,
        t.pushed_pages,
        t.fragments_sent,
        t.bytes_sent,
        t.mac_failed
    );
    let _ = writeln!(
        out,
        "families      {} receiving, {} serving",
        s.families_receiving, s.families_serving
    );
    out
}
