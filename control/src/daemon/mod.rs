//! `sfd`, the per-host daemon: runs VMs for the local API, serves their
//! frozen memory to other hosts, and runs hollow clones for parents on
//! other hosts.
//!
//! Threads and tasks: a tokio runtime serves the local API (Unix socket),
//! the inter-host control protocol (TCP, cluster-key authenticated) and the
//! links to other members; VMs run on their own threads under the
//! [`Supervisor`]; the memory server and page clients run blocking threads
//! of their own (see `snowflock-dataplane`), and each hollow clone has a
//! fault-handling thread (see `snowflock-fault-handler`).

pub mod api;
pub mod caches;
pub mod host;
mod keys;
pub mod links;
pub mod memory;
mod metrics;
pub mod net;
pub mod slurm;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use snowflock_dataplane::auth::ClusterKey;
use snowflock_dataplane::keyring::KeyRing;
use snowflock_dataplane::server::MemoryServer;
use snowflock_fault_handler::{CloneStats, FaultHandler};
use snowflock_vmm::Hypervisor;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::broadcast;

use crate::config::DaemonConfig;
use crate::console::LineSink;
use crate::descriptor::Descriptor;
use crate::protocol::{CloneOrder, CloneStatsEntry, FamilyEntry, HostStats};
use crate::supervisor::{Supervisor, SupervisorConfig};
use crate::sync::lock;
use caches::{CacheUse, FamilyCaches};
use links::Links;
use memory::{FetchLink, FetchLinkError};

/// Ended hollow clones kept for `sf stats`.
const RECENT_CLONES: usize = 256;

/// A failure to start the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("loading the cluster key from {path} failed")]
    Key {
        path: std::path::PathBuf,
        #[source]
        source: snowflock_dataplane::auth::LoadKeyError,
    },
    #[error("creating the state directory {path} failed")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {what} {addr} failed")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the memory server failed")]
    MemoryServer(#[source] snowflock_dataplane::server::BindError),
    #[error("starting multicast page distribution failed")]
    Net(#[source] net::NetError),
    #[error("starting the async runtime failed")]
    Runtime(#[source] std::io::Error),
}

/// A hollow clone on this host, running or ended.
#[derive(Debug)]
pub struct HollowRecord {
    pub vm: u64,
    pub label: String,
    pub family: u64,
    pub faults: Option<Arc<FaultHandler>>,
    pub final_stats: Option<CloneStats>,
    /// How it ended, once it has.
    pub outcome: Option<crate::outcome::VmOutcome>,
}

/// Shared state of a running daemon.
pub struct Daemon {
    pub(crate) config: DaemonConfig,
    pub(crate) key: KeyRing,
    pub(crate) supervisor: Supervisor,
    pub(crate) links: Arc<Links>,
    memory: Arc<MemoryServer>,
    pub(crate) net: Arc<net::NetPlane>,
    next_id: AtomicU64,
    /// Page caches and connections of clone points, in use or idle.
    pub(crate) caches: Arc<FamilyCaches>,
    hollow: Mutex<HashMap<u64, HollowRecord>>,
    recent: Mutex<VecDeque<HollowRecord>>,
    /// Fault counters of the hollow clones that ended, summed.
    ended_faults: Mutex<metrics::FaultTotals>,
    pub(crate) roots: Mutex<HashMap<u64, api::RootVm>>,
    pub(crate) lines: broadcast::Sender<(String, String)>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("host", &self.config.host.name)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    pub(crate) fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A hold on the page cache and memory-server connection of `order`'s
    /// clone point, shared by all its clones on this host (and kept idle
    /// after them, see [`caches`]).
    pub(crate) fn fetch_link(
        &self,
        parent: &str,
        order: &CloneOrder,
        descriptor: &Descriptor,
    ) -> Result<CacheUse, FetchLinkError> {
        let receiver = self.net.receiver();
        self.caches
            .acquire(parent, (order.pages, order.family), order.mcdist, || {
                FetchLink::connect(
                    order.family,
                    descriptor.machine.mem_size,
                    order.pages,
                    &self.key,
                    host::fetch_config(&self.config.limits),
                    receiver.as_ref().zip(order.mcdist),
                )
            })
    }

    pub(crate) fn hollow_started(
        &self,
        vm: u64,
        label: &str,
        family: u64,
        faults: Arc<FaultHandler>,
    ) {
        lock(&self.hollow).insert(
            vm,
            HollowRecord {
                vm,
                label: label.to_string(),
                family,
                faults: Some(faults),
                final_stats: None,
                outcome: None,
            },
        );
    }

    pub(crate) fn hollow_ended(&self, record: HollowRecord) {
        {
            // Under the lock of the running ones, as a scrape reads both: a
            // clone is counted in one or the other, never both or neither.
            let mut hollow = lock(&self.hollow);
            hollow.remove(&record.vm);
            if let Some(stats) = &record.final_stats {
                lock(&self.ended_faults).add(stats);
            }
        }
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_CLONES {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// Fault counters of this host.
    pub(crate) fn local_stats(&self) -> HostStats {
        let mut clones: Vec<CloneStatsEntry> = lock(&self.hollow)
            .values()
            .map(|r| CloneStatsEntry {
                vm: r.vm,
                label: r.label.clone(),
                family: r.family,
                running: true,
                outcome: None,
                stats: r.faults.as_ref().map(|f| f.stats()).unwrap_or_default(),
            })
            .collect();
        clones.extend(lock(&self.recent).iter().map(|r| CloneStatsEntry {
            vm: r.vm,
            label: r.label.clone(),
            family: r.family,
            running: false,
            outcome: r.outcome.clone(),
            stats: r.final_stats.clone().unwrap_or_default(),
        }));
        clones.sort_by_key(|c| c.vm);
        let families = self
            .caches
            .families()
            .into_iter()
            .map(|cached| FamilyEntry {
                family: cached.family,
                parent_host: cached.parent,
                stats: cached.stats,
                idle: cached.idle,
            })
            .collect();
        let served = self.memory.stats();
        let multicast = self.net.server().map(|s| s.stats());
        HostStats {
            host: self.config.host.name.clone(),
            error: None,
            clones,
            families,
            served_pages: served.pages_served + multicast.as_ref().map_or(0, |m| m.pages_sent),
            served_bytes: served.bytes_served + multicast.as_ref().map_or(0, |m| m.bytes_sent),
            pushed_pages: multicast.as_ref().map_or(0, |m| m.pushed_pages),
            push_led_pages: multicast.as_ref().map_or(0, |m| m.push_led_pages),
            served_families: self.links.served_families(),
            clone_output_bytes: self.links.clone_output_bytes(),
        }
    }
}

/// Starts a daemon from `config` and serves until SIGTERM or SIGINT.
pub fn run(
    config: DaemonConfig,
    hv: Arc<dyn Hypervisor>,
    personality: Option<Arc<[u8]>>,
) -> Result<(), DaemonError> {
    let key = ClusterKey::load(&config.cluster.key_file).map_err(|source| DaemonError::Key {
        path: config.cluster.key_file.clone(),
        source,
    })?;
    tracing::info!(key = %key.id(), "cluster key loaded");
    let key = KeyRing::new(key);
    std::fs::create_dir_all(&config.host.state_dir).map_err(|source| DaemonError::StateDir {
        path: config.host.state_dir.clone(),
        source,
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sfd-io")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let memory = Arc::new(
        MemoryServer::bind(config.listen.pages, key.clone()).map_err(DaemonError::MemoryServer)?,
    );
    let net = Arc::new(net::NetPlane::start(&config, &key).map_err(DaemonError::Net)?);
    let (lines_tx, _) = broadcast::channel(4096);
    let line_sender = lines_tx.clone();
    let host_name = config.host.name.clone();
    let lines: LineSink = Arc::new(move |label: &str, line: &str| {
        tracing::info!(target: "console", host = %host_name, vm = label, "{line}");
        // Nobody may be waiting; the line is in the log either way.
        let _ = line_sender.send((label.to_string(), line.to_string()));
    });
    let links = Arc::new(Links::new(
        rt.handle().clone(),
        &config,
        key.clone(),
        memory.clone(),
        net.server().cloned(),
        lines.clone(),
    ));
    let supervisor = Supervisor::new(
        hv,
        SupervisorConfig {
            clone_limit: config.limits.clone_slots,
            lines,
            descriptor_dir: None,
            cluster: Some(links.clone()),
            populate: config.limits.populate,
            host_pages: config.limits.host_pages,
            linux_personality: personality,
        },
    );
    let caches = FamilyCaches::new(config.limits.idle_cache_bytes());
    let daemon = Arc::new(Daemon {
        config,
        key,
        supervisor,
        links,
        memory: memory.clone(),
        net: net.clone(),
        next_id: AtomicU64::new(1),
        caches,
        hollow: Mutex::new(HashMap::new()),
        recent: Mutex::new(VecDeque::new()),
        ended_faults: Mutex::new(metrics::FaultTotals::default()),
        roots: Mutex::new(HashMap::new()),
        lines: lines_tx,
    });
    rt.block_on(serve(daemon.clone()))?;
    tracing::info!("shutting down: stopping VMs");
    daemon.stop_all_vms();
    tracing::info!("shutting down: stopping the page transport");
    net.shutdown();
    tracing::info!("shutting down: stopping the memory server");
    memory.shutdown();
    tracing::info!("shutting down: stopping the runtime");
    drop(rt);
    let _ = std::fs::remove_file(daemon.config.socket_path());
    tracing::info!("stopped");
    Ok(())
}

impl Daemon {
    /// Kills every VM on this host and waits (bounded) for them to end.
    /// Each round kills what is listed then: a VM whose thread had not
    /// registered it yet when shutdown began (one just started by a request,
    /// a copy from `sf clone`) is killed as it appears.
    fn stop_all_vms(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let vms = self.supervisor.vms();
            if vms.is_empty() || std::time::Instant::now() >= deadline {
                break;
            }
            for vm in vms {
                self.supervisor.kill_vm(vm.vm);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let left = self.supervisor.vms().len();
        if left > 0 {
            tracing::warn!(left, "VMs still running at shutdown");
        }
    }
}

async fn serve(daemon: Arc<Daemon>) -> Result<(), DaemonError> {
    let socket = daemon.config.socket_path();
    // A socket left by a daemon that died; a live one would still own it,
    // but then binding the TCP ports below fails anyway.
    let _ = std::fs::remove_file(&socket);
    let api = UnixListener::bind(&socket).map_err(|source| DaemonError::Listen {
        what: "local API socket",
        addr: socket.display().to_string(),
        source,
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Only root (the owner) may drive the daemon.
        let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
    }
    let control_addr = daemon.config.listen.control;
    let control = TcpListener::bind(control_addr)
        .await
        .map_err(|source| DaemonError::Listen {
            what: "control address",
            addr: control_addr.to_string(),
            source,
        })?;
    tracing::info!(
        host = %daemon.config.host.name,
        control = %control_addr,
        pages = %daemon.config.listen.pages,
        socket = %socket.display(),
        slots = daemon.config.limits.clone_slots,
        "sfd ready"
    );
    if let Some(slurm) = daemon.links.slurm() {
        // Allocations a crashed daemon of this host left behind: its VMs
        // are gone.
        slurm.release_all_of(&daemon.config.host.name).await;
    }
    if let Some(addr) = daemon.config.metrics.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Listen {
                what: "metrics address",
                addr: addr.to_string(),
                source,
            })?;
        let registry = metrics::registry(daemon.supervisor.metrics(), &daemon);
        tracing::info!(metrics = %addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(metrics::serve(listener, Arc::new(registry)));
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| DaemonError::Listen {
        what: "signal",
        addr: "SIGTERM".into(),
        source,
    })?;
    loop {
        tokio::select! {
            accepted = api.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(api::serve_client(daemon.clone(), stream)); }
                Err(e) => tracing::warn!("accepting an API connection failed: {e}"),
            },
            accepted = control.accept() => match accepted {
                Ok((stream, peer)) => { tokio::spawn(host::serve_peer(daemon.clone(), stream, peer)); }
                Err(e) => tracing::warn!("accepting a control connection failed: {e}"),
            },
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(())
}
