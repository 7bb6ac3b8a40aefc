//! The local API: one request per Unix-socket connection from the CLI.

use crate::supervisor::StartOptions;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};

use crate::daemon::{Daemon, keys};
use crate::descriptor::Descriptor;
use crate::error_chain;
use crate::protocol::{
    ApiRequest, ApiResponse, ChildSummary, CloneSummary, HostRequest, HostResponse, HostStats,
    HostVms,
};
use crate::remote::{Cluster, Plan, RemoteChild, RemoteGrant, RemoteLaunch};
use crate::supervisor::{SupervisorError, VmController, VmHandle};
use crate::sync::lock;
use crate::wire;
use snowflock_vmm::memory::MemoryImage;

/// A VM started through the API.
#[derive(Debug)]
pub struct RootVm {
    label: String,
    mem_size: u64,
    controller: VmController,
    /// `Some(Ended)` once the VM has ended.
    done: watch::Receiver<Option<ApiResponse>>,
}

pub async fn serve_client(daemon: Arc<Daemon>, mut stream: UnixStream) {
    let request: ApiRequest = match wire::receive(&mut stream).await {
        Ok(r) => r,
        // A readiness probe connects and closes without a request.
        Err(wire::WireError::Closed) => return,
        Err(e) => {
            tracing::warn!("bad API request: {}", error_chain(&e));
            let _ = wire::send(
                &mut stream,
                &ApiResponse::Error {
                    message: format!("bad request: {}", error_chain(&e)),
                },
            )
            .await;
            return;
        }
    };
    let answer = match request {
        ApiRequest::Wait { vm } => return wait(&daemon, &mut stream, vm).await,
        ApiRequest::Start {
            name,
            image,
            mem_size,
            cmdline,
            linux,
            wait: true,
        } => {
            // Subscribed before the VM starts, so no line is missed.
            let lines = daemon.lines.subscribe();
            let started = start(&daemon, name, image, mem_size, cmdline, linux).await;
            let vm = match &started {
                ApiResponse::Started { vm } => Some(*vm),
                _ => None,
            };
            if wire::send(&mut stream, &started).await.is_err() {
                return;
            }
            if let Some(vm) = vm {
                follow(&daemon, &mut stream, vm, lines).await;
            }
            return;
        }
        ApiRequest::Start {
            name,
            image,
            mem_size,
            cmdline,
            linux,
            wait: false,
        } => start(&daemon, name, image, mem_size, cmdline, linux).await,
        ApiRequest::Clone { vm, clones } => clone(&daemon, vm, clones).await,
        ApiRequest::Ps => ps(&daemon).await,
        ApiRequest::Progress { vm } => match daemon.supervisor.progress(vm) {
            Some(progress) => ApiResponse::Progress(progress),
            None => error(format!("no VM {vm} runs here")),
        },
        ApiRequest::Kill { host, vm } => kill(&daemon, host, vm).await,
        ApiRequest::Stats => stats(&daemon).await,
        ApiRequest::NetShow => net_status(&daemon).await,
        ApiRequest::NetTune(tune) => net_tune(&daemon, tune).await,
        ApiRequest::KeyShow => ApiResponse::Keys(keys::status(&daemon)),
        ApiRequest::KeyRotate { key, window } => keys::rotate(&daemon, &key, window),
    };
    let _ = wire::send(&mut stream, &answer).await;
}

fn error(message: impl Into<String>) -> ApiResponse {
    ApiResponse::Error {
        message: message.into(),
    }
}

async fn start(
    daemon: &Arc<Daemon>,
    name: String,
    image: Vec<u8>,
    mem_size: u64,
    cmdline: String,
    linux: StartOptions,
) -> ApiResponse {
    let d = daemon.clone();
    let started = tokio::task::spawn_blocking(move || {
        d.supervisor
            .launch_labelled(&image, mem_size, &cmdline, linux, |vm| format!("vm{vm}"))
    })
    .await;
    let handle = match started {
        Ok(Ok(handle)) => handle,
        Ok(Err(e)) => return error(error_chain(&e)),
        Err(e) => return error(format!("start task failed: {e}")),
    };
    let vm = handle.id();
    tracing::info!(vm, %name, mem_size, "started VM");
    register_root(daemon, handle, format!("vm{vm}"), mem_size);
    ApiResponse::Started { vm }
}

/// Ended root VMs remembered for a `Wait` that comes after the end (a short
/// VM may end before its starter attaches); older ones are forgotten.
const ENDED_ROOTS_KEPT: usize = 256;

/// Tracks a root VM until it ends, and a while after.
fn register_root(daemon: &Arc<Daemon>, handle: VmHandle, label: String, mem_size: u64) {
    let vm = handle.id();
    let (done_tx, done) = watch::channel(None);
    {
        let mut roots = lock(&daemon.roots);
        forget_ended(&mut roots);
        roots.insert(
            vm,
            RootVm {
                label,
                mem_size,
                controller: handle.controller(),
                done,
            },
        );
    }
    let d = Arc::downgrade(daemon);
    let waiter = std::thread::Builder::new()
        .name(format!("wait-vm{vm}"))
        .spawn(move || {
            let outcome = handle.wait();
            tracing::info!(vm, ?outcome, "VM ended");
            let reports = d
                .upgrade()
                .map(|d| {
                    d.supervisor
                        .reports_of(vm)
                        .into_iter()
                        .map(|r| CloneSummary {
                            ticket: r.ticket,
                            clones: r.clones,
                            capture_pause: r.capture_pause,
                            descriptor_bytes: r.descriptor_bytes as u64,
                            data_pages: r.data_pages,
                            all_running: r.all_running,
                            slurm_job: r.slurm_job,
                            children: r
                                .children
                                .into_iter()
                                .map(|c| ChildSummary {
                                    id: c.id,
                                    host: c.host,
                                    runtime: c.runtime,
                                    outcome: c.outcome,
                                })
                                .collect(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let _ = done_tx.send(Some(ApiResponse::Ended { outcome, reports }));
        });
    if let Err(e) = waiter {
        tracing::error!(vm, "cannot start a waiter thread: {e}");
    }
}

/// Forgets the oldest ended root VMs beyond [`ENDED_ROOTS_KEPT`] (VM ids grow).
fn forget_ended(roots: &mut HashMap<u64, RootVm>) {
    let mut ended: Vec<u64> = roots
        .iter()
        .filter(|(_, root)| root.done.borrow().is_some())
        .map(|(&vm, _)| vm)
        .collect();
    if ended.len() > ENDED_ROOTS_KEPT {
        ended.sort_unstable();
        for vm in &ended[..ended.len() - ENDED_ROOTS_KEPT] {
            roots.remove(vm);
        }
    }
}

async fn wait(daemon: &Arc<Daemon>, stream: &mut UnixStream, vm: u64) {
    let lines = daemon.lines.subscribe();
    follow(daemon, stream, vm, lines).await;
}

/// Streams VM `vm`'s console (and its clones') from `lines` until it ends,
/// then its end.
async fn follow(
    daemon: &Arc<Daemon>,
    stream: &mut UnixStream,
    vm: u64,
    mut lines: broadcast::Receiver<(String, String)>,
) {
    let root = {
        let roots = lock(&daemon.roots);
        roots.get(&vm).map(|r| (r.label.clone(), r.done.clone()))
    };
    let Some((label, mut done)) = root else {
        let _ = wire::send(stream, &error(format!("no VM {vm} was started here"))).await;
        return;
    };
    let prefix = format!("{label}.");
    loop {
        let ended = done.borrow_and_update().clone();
        if let Some(ended) = ended {
            // Lines of the last moments may still be queued.
            while let Ok((l, line)) = lines.try_recv() {
                if l == label || l.starts_with(&prefix) {
                    let _ = wire::send(stream, &ApiResponse::Console { label: l, line }).await;
                }
            }
            let _ = wire::send(stream, &ended).await;
            return;
        }
        tokio::select! {
            line = lines.recv() => match line {
                Ok((l, line)) if l == label || l.starts_with(&prefix) => {
                    if wire::send(stream, &ApiResponse::Console { label: l, line }).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let note = format!("({n} console lines dropped)");
                    if wire::send(stream, &ApiResponse::Console { label: label.clone(), line: note }).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            changed = done.changed() => if changed.is_err() { return },
        }
    }
}

/// Failure of cloning a running VM from outside. The capture's failure reads
/// as it always has, so it is transparent.
#[derive(Debug, thiserror::Error)]
enum CloneVmError {
    #[error("no free clone slots in the cluster")]
    NoSlots,
    #[error(
        "copies from outside outlive any ticket, so Slurm cannot allocate them \
         ([allocation] backend = \"slurm\"): clone from inside the guest"
    )]
    UnderSlurm,
    #[error(transparent)]
    Capture(SupervisorError),
}

/// Clones a running VM from outside: capture, then start the copies as
/// new VMs of their own on this host.
async fn clone(daemon: &Arc<Daemon>, vm: u64, clones: u32) -> ApiResponse {
    let root = {
        let roots = lock(&daemon.roots);
        roots.get(&vm).map(|r| (r.controller.clone(), r.mem_size))
    };
    let Some((controller, mem_size)) = root else {
        return error(format!("no VM {vm} was started here"));
    };
    let d = daemon.clone();
    let result = tokio::task::spawn_blocking(move || {
        if d.links.slurm().is_some() {
            return Err(CloneVmError::UnderSlurm);
        }
        let free = d
            .config
            .limits
            .clone_slots
            .saturating_sub(d.supervisor.slots_in_use());
        let plan = d.links.plan(
            clones,
            mem_size,
            free,
            &format!("vm {vm}, cloned from outside"),
            None,
        );
        let local = d.supervisor.reserve_slots(plan.local);
        let release_all = |d: &Daemon, plan: Plan| {
            d.supervisor.release_slots(local);
            for grant in plan.remote {
                d.links.release(grant);
            }
        };
        if local == 0 && plan.remote.is_empty() {
            return Err(CloneVmError::NoSlots);
        }
        let paused = Instant::now();
        let captured = controller.capture();
        let pause = paused.elapsed();
        let (descriptor, image) = match captured {
            Ok(c) => c,
            Err(e) => {
                release_all(&d, plan);
                return Err(CloneVmError::Capture(e));
            }
        };
        let bytes = descriptor.encode().map(|b| b.len() as u64).unwrap_or(0);
        let mut started = Vec::new();
        for _ in 0..local {
            match d
                .supervisor
                .resume_labelled(&descriptor, &image, |vm| format!("vm{vm}"))
            {
                Ok(handle) => {
                    let id = handle.id();
                    register_root(&d, handle, format!("vm{id}"), mem_size);
                    started.push((d.config.host.name.clone(), format!("vm{id}")));
                }
                Err(e) => tracing::warn!("starting a clone failed: {}", error_chain(&e)),
            }
        }
        // Local copies run as VMs of their own, outside the slot accounting
        // of guest clones.
        d.supervisor.release_slots(local);
        if !plan.remote.is_empty() {
            started.extend(launch_remote_copies(
                &d,
                vm,
                descriptor,
                image,
                plan.remote,
                local,
            ));
        }
        Ok((pause, bytes, started))
    })
    .await;
    match result {
        Ok(Ok((pause, descriptor_bytes, clones))) => ApiResponse::Cloned {
            pause,
            descriptor_bytes,
            clones,
        },
        Ok(Err(e)) => error(error_chain(&e)),
        Err(e) => error(format!("clone task failed: {e}")),
    }
}

/// Starts copies of VM `vm` on other hosts; they are served from `image`
/// until every one has ended.
fn launch_remote_copies(
    daemon: &Arc<Daemon>,
    vm: u64,
    descriptor: Descriptor,
    image: Arc<MemoryImage>,
    grants: Vec<RemoteGrant>,
    first: u32,
) -> Vec<(String, String)> {
    let family = descriptor.family;
    let descriptor = Arc::new(descriptor);
    let links: Arc<dyn Cluster> = daemon.links.clone();
    links.serve_image(family, image, None);
    let mut started = Vec::new();
    let mut everyone = Vec::new();
    let mut id = first;
    for grant in grants {
        let children: Vec<RemoteChild> = (0..grant.slots)
            .map(|_| {
                id += 1;
                let label = format!("vm{vm}.copy{id}");
                started.push((grant.host.clone(), label.clone()));
                RemoteChild::new_remote(id, label, links.clone(), &grant.host, family)
            })
            .collect();
        everyone.extend(children.iter().cloned());
        links.launch(
            grant,
            RemoteLaunch {
                descriptor: descriptor.clone(),
                children,
                checkpoint: 0,
                parent_label: format!("vm{vm}"),
                external: true,
            },
        );
    }
    let waiter = std::thread::Builder::new()
        .name(format!("copies-vm{vm}"))
        .spawn(move || {
            while !everyone.iter().all(RemoteChild::has_ended) {
                std::thread::sleep(Duration::from_millis(200));
            }
            links.retire_image(family);
        });
    if let Err(e) = waiter {
        tracing::warn!("cannot watch remote copies; their image stays served: {e}");
    }
    started
}

async fn ps(daemon: &Arc<Daemon>) -> ApiResponse {
    let mut hosts = vec![HostVms {
        host: daemon.config.host.name.clone(),
        vms: Ok(daemon.supervisor.vms()),
    }];
    let asks = daemon.links.peer_names().into_iter().map(|host| {
        let d = daemon.clone();
        async move {
            let answer = d.links.call(&host, HostRequest::Ps).await;
            let vms = match answer {
                Ok(HostResponse::Ps { vms }) => Ok(vms),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(error_chain(&e)),
            };
            HostVms { host, vms }
        }
    });
    hosts.extend(futures::future::join_all(asks).await);
    ApiResponse::Ps { hosts }
}

async fn kill(daemon: &Arc<Daemon>, host: Option<String>, vm: u64) -> ApiResponse {
    match host {
        Some(host) if host != daemon.config.host.name => {
            match daemon.links.call(&host, HostRequest::KillVm { vm }).await {
                Ok(_) => ApiResponse::Killed,
                Err(e) => error(error_chain(&e)),
            }
        }
        _ => {
            if daemon.supervisor.kill_vm(vm) {
                ApiResponse::Killed
            } else {
                error(format!("no VM {vm} runs on {}", daemon.config.host.name))
            }
        }
    }
}

async fn stats(daemon: &Arc<Daemon>) -> ApiResponse {
    let mut hosts = vec![daemon.local_stats()];
    let asks = daemon.links.peer_names().into_iter().map(|host| {
        let d = daemon.clone();
        async move {
            match tokio::time::timeout(
                Duration::from_secs(5),
                d.links.call(&host, HostRequest::Stats),
            )
            .await
            {
                Ok(Ok(HostResponse::Stats(stats))) => stats,
                Ok(Ok(other)) => HostStats {
                    host,
                    error: Some(format!("unexpected answer {other:?}")),
                    ..HostStats::default()
                },
                Ok(Err(e)) => HostStats {
                    host,
                    error: Some(error_chain(&e)),
                    ..HostStats::default()
                },
                Err(_) => HostStats {
                    host,
                    error: Some("no answer within 5s".into()),
                    ..HostStats::default()
                },
            }
        }
    });
    hosts.extend(futures::future::join_all(asks).await);
    ApiResponse::Stats { hosts }
}

async fn net_status(daemon: &Arc<Daemon>) -> ApiResponse {
    let daemon = daemon.clone();
    match tokio::task::spawn_blocking(move || daemon.net.status(daemon.links.served_families()))
        .await
    {
        Ok(status) => ApiResponse::Net(Box::new(status)),
        Err(e) => ApiResponse::Error {
            message: format!("reading the network status failed: {e}"),
        },
    }
}

async fn net_tune(daemon: &Arc<Daemon>, tune: crate::protocol::NetTune) -> ApiResponse {
    let daemon = daemon.clone();
    let applied = tokio::task::spawn_blocking(move || {
        daemon
            .net
            .tune(&tune)
            .map(|()| daemon.net.status(daemon.links.served_families()))
    })
    .await;
    match applied {
        Ok(Ok(status)) => ApiResponse::Net(Box::new(status)),
        Ok(Err(e)) => ApiResponse::Error {
            message: crate::error_chain(&e),
        },
        Err(e) => ApiResponse::Error {
            message: format!("tuning the network failed: {e}"),
        },
    }
}
