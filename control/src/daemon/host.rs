//! The clone-host side of the inter-host protocol: a parent host connects,
//! proves it holds the cluster key, reserves slots and launches hollow
//! clones here. Everything a connection reserved or started ends with it:
//! a parent that is gone cannot take its clones' results.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snowflock_dataplane::auth;
use snowflock_fault_handler::{CloneStats, FaultHandler, FetchConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::daemon::caches::CacheUse;
use crate::daemon::links::handshake;
use crate::daemon::{Daemon, HollowRecord};
use crate::descriptor::Descriptor;
use crate::error_chain;
use crate::outcome::VmOutcome;
use crate::protocol::{CloneOrder, FromHost, HostRequest, HostResponse, ToHost};
use crate::remote::{HollowEvents, HollowStart};
use crate::sync::lock;
use crate::wire::{self, Direction, FrameSealer};

/// What one parent connection holds on this host.
#[derive(Default)]
struct Session {
    /// Reservation id → slots not yet used.
    reservations: HashMap<u64, u32>,
    /// (family, child) → VM of clones started by this connection.
    clones: HashMap<(u64, u32), u64>,
    /// Clones of launches received but not started yet. Requests are served
    /// concurrently, so a kill may overtake the launch it follows on the
    /// wire: it is kept here and applied as the clone starts.
    launching: HashMap<(u64, u32), bool>,
    /// Set when the connection to the parent's host is gone: why.
    lost: Option<String>,
}

/// Serves one inbound control connection until it closes.
pub async fn serve_peer(daemon: Arc<Daemon>, stream: TcpStream, peer: std::net::SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (stream, session_key) = match handshake(stream, &daemon.key, auth::Role::Server).await {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(%peer, "refused a control connection: {e:?}");
            return;
        }
    };
    let (mut reader, mut writer) = stream.into_split();
    let mut opener = FrameSealer::new(session_key, Direction::FromClient);
    let mut sealer = FrameSealer::new(session_key, Direction::FromServer);
    let (out, mut queue) = mpsc::unbounded_channel::<FromHost>();
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = queue.recv().await {
            let Ok(frame) = sealer.seal(&msg) else { break };
            if writer.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let _ = out.send(FromHost::Hello {
        host: daemon.config.host.name.clone(),
    });
    let session = Arc::new(Mutex::new(Session::default()));
    let mut parent = peer.to_string();
    let timeout = daemon.config.limits.peer_timeout();
    let reason = loop {
        let msg = match tokio::time::timeout(
            timeout,
            wire::receive_sealed::<ToHost>(&mut reader, &mut opener),
        )
        .await
        {
            Ok(Ok(msg)) => msg,
            Ok(Err(e)) => break error_chain(&e),
            Err(_) => break format!("silent for {timeout:?}"),
        };
        match msg {
            ToHost::Hello { host } => parent = host,
            ToHost::Ping => {
                let _ = out.send(FromHost::Pong);
            }
            ToHost::Request { id, request } => {
                if let HostRequest::Launch { order, .. } = &request {
                    let mut s = lock(&session);
                    for &(child, _) in &order.children {
                        s.launching.insert((order.family, child), false);
                    }
                }
                let (daemon, out, session, parent) =
                    (daemon.clone(), out.clone(), session.clone(), parent.clone());
                tokio::spawn(async move {
                    let response = handle(&daemon, &out, &session, &parent, request).await;
                    let _ = out.send(FromHost::Response { id, response });
                });
            }
        }
    };
    tracing::info!(%parent, %reason, "control connection closed");
    let (unused, orphans) = {
        let mut s = lock(&session);
        s.lost = Some(format!("parent host {parent} lost: {reason}"));
        let unused: u32 = std::mem::take(&mut s.reservations).values().sum();
        (unused, s.clones.values().copied().collect::<Vec<u64>>())
    };
    daemon.supervisor.release_slots(unused);
    daemon.caches.parent_lost(&parent);
    if let Some(slurm) = daemon.links.slurm()
        && !parent.is_empty()
    {
        // Its VMs cannot release their allocations any more; their clones
        // here were just killed.
        slurm.release_all_of(&parent).await;
    }
    // Nobody can take their results any more.
    for vm in orphans {
        daemon.supervisor.kill_vm(vm);
    }
    drop(out);
    let _ = writer_task.await;
}

async fn handle(
    daemon: &Arc<Daemon>,
    out: &mpsc::UnboundedSender<FromHost>,
    session: &Arc<Mutex<Session>>,
    parent: &str,
    request: HostRequest,
) -> HostResponse {
    match request {
        HostRequest::Capacity => HostResponse::Capacity {
            free: daemon
                .config
                .limits
                .clone_slots
                .saturating_sub(daemon.supervisor.slots_in_use()),
            total: daemon.config.limits.clone_slots,
        },
        HostRequest::Reserve { slots, mem_size } => {
            let granted = daemon.supervisor.reserve_slots(slots);
            if granted > 0 {
                daemon.supervisor.prepare(mem_size);
            }
            let reservation = daemon.fresh_id();
            lock(session).reservations.insert(reservation, granted);
            HostResponse::Reserved {
                reservation,
                granted,
            }
        }
        HostRequest::Release { reservation } => {
            let slots = lock(session).reservations.remove(&reservation).unwrap_or(0);
            daemon.supervisor.release_slots(slots);
            HostResponse::Done
        }
        HostRequest::Launch { reservation, order } => {
            let daemon = daemon.clone();
            let (out, session, parent) = (out.clone(), session.clone(), parent.to_string());
            tokio::task::spawn_blocking(move || {
                launch(&daemon, &out, &session, &parent, reservation, order)
            })
            .await
            .unwrap_or_else(|e| HostResponse::Error {
                message: format!("launch task failed: {e}"),
            })
        }
        HostRequest::KillClone { family, child } => {
            let vm = {
                let mut s = lock(session);
                if let Some(killed) = s.launching.get_mut(&(family, child)) {
                    *killed = true;
                }
                s.clones.get(&(family, child)).copied()
            };
            if let Some(vm) = vm {
                daemon.supervisor.kill_vm(vm);
            }
            HostResponse::Done
        }
        HostRequest::KillVm { vm } => {
            if daemon.supervisor.kill_vm(vm) {
                HostResponse::Done
            } else {
                HostResponse::Error {
                    message: format!("no VM {vm} runs here"),
                }
            }
        }
        HostRequest::EndFamily { family } => {
            let cached = daemon.caches.end_family(parent, family);
            tracing::debug!(family, cached, "parent host ended a family");
            HostResponse::Done
        }
        HostRequest::Ps => HostResponse::Ps {
            vms: daemon.supervisor.vms(),
        },
        HostRequest::Stats => HostResponse::Stats(daemon.local_stats()),
    }
}

/// Starts the clones of `order` in `reservation`.
fn launch(
    daemon: &Arc<Daemon>,
    out: &mpsc::UnboundedSender<FromHost>,
    session: &Arc<Mutex<Session>>,
    parent: &str,
    reservation: u64,
    order: CloneOrder,
) -> HostResponse {
    let family = order.family;
    let children: Vec<u32> = order.children.iter().map(|&(child, _)| child).collect();
    let error = |message: String| {
        let mut s = lock(session);
        for &child in &children {
            s.launching.remove(&(family, child));
        }
        HostResponse::Error { message }
    };
    let slots = {
        let mut s = lock(session);
        match s.reservations.remove(&reservation) {
            Some(slots) => slots,
            None => return error(format!("no reservation {reservation}")),
        }
    };
    let wanted = order.children.len() as u32;
    if wanted > slots {
        daemon.supervisor.release_slots(slots);
        return error(format!(
            "{wanted} clones do not fit a reservation of {slots} slots"
        ));
    }
    daemon.supervisor.release_slots(slots - wanted);
    let descriptor = match Descriptor::decode(&order.descriptor) {
        Ok(d) if d.family == order.family => Arc::new(d),
        Ok(d) => {
            daemon.supervisor.release_slots(wanted);
            return error(format!(
                "descriptor is of family {:#x}, the order says {:#x}",
                d.family, order.family
            ));
        }
        Err(e) => {
            daemon.supervisor.release_slots(wanted);
            return error(error_chain(&e));
        }
    };
    let fetch = match daemon.fetch_link(parent, &order, &descriptor) {
        Ok(hold) => Arc::new(hold),
        Err(e) => {
            daemon.supervisor.release_slots(wanted);
            return error(error_chain(&e));
        }
    };
    let mut vms = Vec::with_capacity(order.children.len());
    for (child, label) in order.children {
        let events = Arc::new(CloneEvents {
            daemon: Arc::downgrade(daemon),
            out: out.clone(),
            session: session.clone(),
            family: order.family,
            child,
            label: label.clone(),
            _fetch: fetch.clone(),
        });
        let lines_out = out.clone();
        let output = descriptor.machine.files.out.is_some().then(|| {
            let output_out = out.clone();
            let family = order.family;
            let sink: snowflock_vmm::files::OutputSink =
                Arc::new(move |path: &[u8], offset: u64, data: &[u8]| {
                    // Frames stay well under the control protocol's limit.
                    const CHUNK: usize = 4 << 20;
                    let mut at = 0;
                    loop {
                        let end = data.len().min(at + CHUNK);
                        output_out
                            .send(FromHost::ChildOutput {
                                family,
                                child,
                                path: path.to_vec(),
                                offset: offset + at as u64,
                                data: data[at..end].to_vec(),
                            })
                            .map_err(|_| libc::EPIPE as u64)?;
                        at = end;
                        if at >= data.len() {
                            return Ok(());
                        }
                    }
                });
            sink
        });
        let vm = daemon.supervisor.start_hollow(HollowStart {
            descriptor: descriptor.clone(),
            family: fetch.link().family.clone(),
            avoidance: daemon.config.limits.avoidance,
            populate: daemon.config.limits.populate_hollow,
            child,
            checkpoint: order.checkpoint,
            external: order.external,
            label,
            lines: Some(Arc::new(move |label: &str, line: &str| {
                let _ = lines_out.send(FromHost::ChildConsole {
                    label: label.to_string(),
                    line: line.to_string(),
                });
            })),
            output,
            events,
        });
        let killed = {
            let mut s = lock(session);
            s.clones.insert((order.family, child), vm);
            s.launching.remove(&(order.family, child)) == Some(true)
        };
        if killed {
            daemon.supervisor.kill_vm(vm);
        }
        vms.push(vm);
    }
    HostResponse::Launched { vms }
}

/// Reports a hollow clone's start and end to its parent's host.
struct CloneEvents {
    daemon: std::sync::Weak<Daemon>,
    out: mpsc::UnboundedSender<FromHost>,
    session: Arc<Mutex<Session>>,
    family: u64,
    child: u32,
    label: String,
    /// Keeps the family's page cache and connection while the clone runs.
    _fetch: Arc<CacheUse>,
}

impl HollowEvents for CloneEvents {
    fn started(&self, vm: u64, restore: Duration, faults: Arc<FaultHandler>) {
        if let Some(daemon) = self.daemon.upgrade() {
            daemon.hollow_started(vm, &self.label, self.family, faults);
        }
        let _ = self.out.send(FromHost::ChildStarted {
            family: self.family,
            child: self.child,
            vm,
            restore,
        });
    }

    fn ended(&self, vm: u64, outcome: VmOutcome, runtime: Duration, stats: CloneStats) {
        let outcome = {
            let mut session = lock(&self.session);
            session.clones.remove(&(self.family, self.child));
            match (outcome, &session.lost) {
                (VmOutcome::Killed, Some(lost)) => VmOutcome::Failed(lost.clone()),
                (outcome, _) => outcome,
            }
        };
        tracing::info!(
            vm,
            family = self.family,
            child = self.child,
            ?outcome,
            pages_fetched = stats.pages_fetched,
            "hollow clone ended"
        );
        if let Some(daemon) = self.daemon.upgrade() {
            daemon.hollow_ended(HollowRecord {
                vm,
                label: self.label.clone(),
                family: self.family,
                faults: None,
                final_stats: Some(stats),
                outcome: Some(outcome.clone()),
            });
        }
        let _ = self.out.send(FromHost::ChildEnded {
            family: self.family,
            child: self.child,
            outcome,
            runtime,
        });
    }
}

/// Fetch settings from the daemon's limits.
pub fn fetch_config(limits: &crate::config::Limits) -> FetchConfig {
    FetchConfig {
        fetch_timeout: limits.fetch_timeout(),
        prefetch_pages: limits.prefetch_pages,
        fault_around_pages: limits.fault_around_pages,
        huge_blocks: limits.huge_cache,
    }
}
