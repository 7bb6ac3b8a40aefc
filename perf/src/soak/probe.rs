//! Reading what one `sfd` holds: its memory, descriptors and threads from
//! `/proc`, the machine's kernel slab from `/proc/meminfo`, and its clone
//! slots and VMs from its Prometheus endpoint (scraped from inside its host's
//! network namespace, where the endpoint listens).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use procfs::Current;
use procfs::Meminfo;
use procfs::process::Process;

/// How long one scrape of a daemon's metrics may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// A daemon's resources at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// Resident memory (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Its page tables (`VmPTE`): kernel memory that grows with what it maps, KiB.
    pub pte_kib: u64,
    /// Open file descriptors (entries of `/proc/PID/fd`).
    pub fds: u64,
    pub threads: u64,
    /// Clone slots reserved or running (`snowflock_clone_slots_in_use`).
    pub slots_in_use: u64,
    /// VMs running on its host, of every role (`snowflock_vms_running`).
    pub vms_running: u64,
}

/// The machine's kernel slab, every process's: noisy where other work runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slab {
    /// `Slab`, KiB.
    pub total_kib: u64,
    /// `SUnreclaim`, KiB.
    pub unreclaimable_kib: u64,
}

/// Why a daemon could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("reading /proc/{pid}")]
    Proc {
        pid: u32,
        #[source]
        source: procfs::ProcError,
    },
    #[error("/proc/{pid}/status has no {field}")]
    Missing { pid: u32, field: &'static str },
    #[error("reading /proc/meminfo")]
    Meminfo(#[source] procfs::ProcError),
    #[error("entering network namespace {netns}")]
    Netns {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("scraping http://{addr}/metrics")]
    Scrape {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the scrape of http://{addr}/metrics has no {metric}")]
    NoMetric {
        addr: SocketAddr,
        metric: &'static str,
    },
    #[error("the scraping thread panicked")]
    Panicked,
}

/// Where one daemon is found.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Its host's name (`h1`, ...).
    pub host: String,
    pub pid: u32,
    pub netns: String,
    /// Its Prometheus endpoint, inside `netns`.
    pub metrics: SocketAddr,
}

impl Daemon {
    /// Its resources now. `/proc` is read first, so that the scrape's
    /// connection is not among the descriptors counted.
    pub fn usage(&self) -> Result<Usage, ProbeError> {
        let pid = self.pid;
        let proc_error = |source| ProbeError::Proc { pid, source };
        let process = Process::new(pid as i32).map_err(proc_error)?;
        let status = process.status().map_err(proc_error)?;
        let fds = process.fd_count().map_err(proc_error)? as u64;
        let text = self.scrape()?;
        let metric = |metric: &'static str| {
            gauge(&text, metric).ok_or(ProbeError::NoMetric {
                addr: self.metrics,
                metric,
            })
        };
        Ok(Usage {
            rss_kib: status.vmrss.ok_or(ProbeError::Missing {
                pid,
                field: "VmRSS",
            })?,
            pte_kib: status.vmpte.ok_or(ProbeError::Missing {
                pid,
                field: "VmPTE",
            })?,
            fds,
            threads: status.threads,
            slots_in_use: metric("snowflock_clone_slots_in_use")?,
            vms_running: metric("snowflock_vms_running")?,
        })
    }

    /// The daemon's metrics page, fetched by a thread of its own inside the
    /// daemon's namespace (entering one changes only the calling thread).
    fn scrape(&self) -> Result<String, ProbeError> {
        let (netns, addr) = (self.netns.clone(), self.metrics);
        std::thread::spawn(move || {
            snowflock_testkit::enter_netns(&netns)
                .map_err(|source| ProbeError::Netns { netns, source })?;
            fetch(addr).map_err(|source| ProbeError::Scrape { addr, source })
        })
        .join()
        .map_err(|_| ProbeError::Panicked)?
    }
}

/// `GET /metrics` over one HTTP/1.1 connection, closed after the answer.
fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!(
            "not a successful answer: {}",
            answer.lines().next().unwrap_or("")
        ))),
    }
}

/// The sum of the samples of gauge `metric` (every label set) in a
/// Prometheus text page; `None` if it has none.
fn gauge(text: &str, metric: &str) -> Option<u64> {
    let samples: Vec<u64> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            // `metric{labels} value` or `metric value`, not a longer name.
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once('}')?.1,
                None if rest.starts_with(' ') => rest,
                None => return None,
            };
            value.trim().parse().ok()
        })
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// The machine's slab now.
pub fn slab() -> Result<Slab, ProbeError> {
    let meminfo = Meminfo::current().map_err(ProbeError::Meminfo)?;
    Ok(Slab {
        total_kib: meminfo.slab / 1024,
        unreclaimable_kib: meminfo.s_unreclaim.unwrap_or(0) / 1024,
    })
}

#[cfg(test)]
mod tests {
    use super::gauge;

    #[test]
    fn gauges_of_a_metrics_page() {
        let page = "# HELP snowflock_vms_running VMs running\n\
                    # TYPE snowflock_vms_running gauge\n\
                    snowflock_vms_running{role=\"root\"} 1\n\
                    snowflock_vms_running{role=\"clone\"} 2\n\
                    snowflock_vms_running{role=\"hollow\"} 0\n\
                    snowflock_clone_slots 16\n\
                    snowflock_clone_slots_in_use 3\n";
        assert_eq!(gauge(page, "snowflock_vms_running"), Some(3));
        assert_eq!(gauge(page, "snowflock_clone_slots"), Some(16));
        assert_eq!(gauge(page, "snowflock_clone_slots_in_use"), Some(3));
        assert_eq!(gauge(page, "snowflock_faults"), None);
    }
}
