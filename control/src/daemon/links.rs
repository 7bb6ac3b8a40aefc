//! The parent side of the inter-host protocol: one authenticated connection
//! to each member this host sends clones to, and the [`Cluster`] the
//! supervisor uses to plan tickets, ship descriptors and hear back.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snowflock_dataplane::auth;
use snowflock_dataplane::keyring::KeyRing;
use snowflock_dataplane::mcast::{McastServer, Recording};
use snowflock_dataplane::server::MemoryServer;
use snowflock_vmm::files::{clone_output_dir, write_beneath};
use snowflock_vmm::memory::MemoryImage;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use super::slurm::Slurm;
use crate::config::{AllocationBackend, DaemonConfig, McdistSection, Member};
use crate::daemon::memory::ImageStore;
use crate::outcome::VmOutcome;
use crate::protocol::{CloneOrder, FromHost, HostRequest, HostResponse, McastOrder, ToHost};
use crate::remote::{Cluster, JobScope, Plan, RemoteChild, RemoteGrant, RemoteLaunch};
use crate::sync::lock;
use crate::wire::{self, Direction, FrameSealer};
use crate::working_sets::{ClonePointKey, WorkingSets};

/// Protocol context of the cluster-key handshake on control connections.
pub const CONTROL_CONTEXT: &[u8] = b"control";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed exchange with another host.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no cluster member named {0}")]
    UnknownHost(String),
    #[error("connecting to {host} ({addr}) failed")]
    Connect {
        host: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("authenticating with {host} failed")]
    Auth {
        host: String,
        #[source]
        source: auth::AuthError,
    },
    #[error("host {host} did not answer within {timeout:?}")]
    Timeout { host: String, timeout: Duration },
    #[error("connection to {host} lost: {reason}")]
    Lost { host: String, reason: String },
    #[error("host {host}: {message}")]
    Refused { host: String, message: String },
}

/// One open connection to a member.
struct Link {
    host: String,
    out: mpsc::UnboundedSender<ToHost>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<HostResponse>>>,
    /// Clones running there for parents on this host.
    children: Mutex<HashMap<(u64, u32), RemoteChild>>,
    /// Where the `/out` of each of those clones that has one is written.
    outputs: Mutex<HashMap<(u64, u32), PathBuf>>,
    /// Bytes of that output written (shared by every link of the host).
    output_bytes: Arc<AtomicU64>,
    /// Why the link closed, once it has.
    closed: Mutex<Option<String>>,
    /// Told once the link closes: the writer task then ends, and with it the connection. (The
    /// task holds the link, whose `out` keeps its queue open: it would otherwise wait for
    /// frames forever and keep the socket of a dead peer.)
    shutdown: tokio::sync::Notify,
}

impl Link {
    async fn call(&self, request: HostRequest) -> Result<HostResponse, LinkError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // The entry goes in before the closed check: `close` sets the reason
        // and then clears the entries, so no call waits on a dead link.
        lock(&self.pending).insert(id, tx);
        let closed = lock(&self.closed).clone();
        let refused = match closed {
            Some(reason) => Some(reason),
            None => self
                .out
                .send(ToHost::Request { id, request })
                .err()
                .map(|_| "connection closed".to_string()),
        };
        if let Some(reason) = refused {
            lock(&self.pending).remove(&id);
            return Err(self.lost(reason));
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(HostResponse::Error { message })) => Err(LinkError::Refused {
                host: self.host.clone(),
                message,
            }),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(self.lost(
                lock(&self.closed)
                    .clone()
                    .unwrap_or_else(|| "connection closed".into()),
            )),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(LinkError::Timeout {
                    host: self.host.clone(),
                    timeout: REQUEST_TIMEOUT,
                })
            }
        }
    }

    fn lost(&self, reason: String) -> LinkError {
        LinkError::Lost {
            host: self.host.clone(),
            reason,
        }
    }

    /// Marks the link dead: pending calls fail and every clone still
    /// running there is reported lost.
    fn close(&self, reason: String) {
        {
            let mut closed = lock(&self.closed);
            if closed.is_some() {
                return;
            }
            *closed = Some(reason.clone());
        }
        tracing::warn!(host = %self.host, %reason, "link to host closed");
        // A permit is kept if the writer is not waiting yet.
        self.shutdown.notify_one();
        lock(&self.pending).clear();
        lock(&self.outputs).clear();
        let children: Vec<RemoteChild> = lock(&self.children).drain().map(|(_, c)| c).collect();
        for child in children {
            child.ended(
                VmOutcome::Lost(format!("host {} lost: {reason}", self.host)),
                Duration::ZERO,
            );
        }
    }

    fn deliver(&self, msg: FromHost, lines: &crate::console::LineSink) {
        match msg {
            FromHost::Response { id, response } => {
                if let Some(tx) = lock(&self.pending).remove(&id) {
                    // The caller may have timed out and gone.
                    let _ = tx.send(response);
                }
            }
            FromHost::ChildStarted {
                family,
                child,
                restore,
                ..
            } => {
                if let Some(c) = lock(&self.children).get(&(family, child)) {
                    c.started(restore);
                }
            }
            FromHost::ChildConsole { label, line } => lines(&label, &line),
            FromHost::ChildOutput {
                family,
                child,
                path,
                offset,
                data,
            } => {
                let dir = lock(&self.outputs).get(&(family, child)).cloned();
                match dir {
                    Some(dir) => {
                        let written = write_beneath(&dir, &path, offset, &data);
                        if written.is_ok() {
                            self.output_bytes
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        if let Err(errno) = written {
                            tracing::warn!(
                                host = %self.host,
                                child,
                                path = %String::from_utf8_lossy(&path),
                                errno,
                                "writing a clone's output failed"
                            );
                        }
                    }
                    None => tracing::warn!(
                        host = %self.host,
                        child,
                        "output from a clone without an output directory dropped"
                    ),
                }
            }
            FromHost::ChildEnded {
                family,
                child,
                outcome,
                runtime,
            } => {
                lock(&self.outputs).remove(&(family, child));
                if let Some(c) = lock(&self.children).remove(&(family, child)) {
                    c.ended(outcome, runtime);
                }
            }
            FromHost::Hello { .. } | FromHost::Pong => {}
        }
    }
}

/// Connections to the other members, opened on first use.
pub struct Links {
    rt: Handle,
    me: String,
    members: Vec<Member>,
    key: KeyRing,
    peer_timeout: Duration,
    open: Mutex<HashMap<String, Arc<Link>>>,
    /// Held while connecting, so that two callers do not both connect.
    connecting: tokio::sync::Mutex<()>,
    memory: Arc<MemoryServer>,
    pages_addr: SocketAddr,
    /// The multicast sender, when this host distributes by mcdist.
    mcast: Option<Arc<McastServer>>,
    mcdist: McdistSection,
    served: Mutex<HashMap<u64, ServedImage>>,
    /// What the clones of clone points served before asked for.
    working_sets: Mutex<WorkingSets>,
    lines: crate::console::LineSink,
    /// Bytes of clones' `/out` received from other hosts and written here.
    output_bytes: Arc<AtomicU64>,
    /// Where tickets come from when Slurm allocates them.
    slurm: Option<Slurm>,
}

/// A frozen image this host serves, with the clones (and checkpoints)
/// that still need it.
struct ServedImage {
    users: usize,
    /// Where its pages are multicast.
    mcast: Option<McastOrder>,
    /// Hosts that ran clones of it: told when it ends.
    hosts: HashSet<String>,
    /// The clone point across jobs, for its recorded working set.
    key: Option<ClonePointKey>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("me", &self.me)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl Links {
    pub fn new(
        rt: Handle,
        config: &DaemonConfig,
        key: KeyRing,
        memory: Arc<MemoryServer>,
        mcast: Option<Arc<McastServer>>,
        lines: crate::console::LineSink,
    ) -> Self {
        Self {
            rt,
            me: config.host.name.clone(),
            members: config.peers().cloned().collect(),
            key,
            peer_timeout: config.limits.peer_timeout(),
            open: Mutex::new(HashMap::new()),
            connecting: tokio::sync::Mutex::new(()),
            memory,
            pages_addr: config.listen.pages,
            mcast,
            mcdist: config.mcdist.clone(),
            served: Mutex::new(HashMap::new()),
            working_sets: Mutex::new(WorkingSets::new(
                config.mcdist.recorded_working_sets as usize,
            )),
            lines,
            output_bytes: Arc::new(AtomicU64::new(0)),
            slurm: (config.allocation.backend == AllocationBackend::Slurm)
                .then(|| Slurm::new(&config.allocation)),
        }
    }

    /// The Slurm commands, when tickets come from Slurm.
    pub fn slurm(&self) -> Option<&Slurm> {
        self.slurm.as_ref()
    }

    /// Names of the other members.
    pub fn peer_names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// Families served and their reference counts.
    /// Bytes of clones' `/out` files received from other hosts and written here.
    pub fn clone_output_bytes(&self) -> u64 {
        self.output_bytes.load(Ordering::Relaxed)
    }

    pub fn served_families(&self) -> u32 {
        lock(&self.served).len() as u32
    }

    fn live_link(&self, host: &str) -> Option<Arc<Link>> {
        let open = lock(&self.open);
        open.get(host)
            .filter(|l| lock(&l.closed).is_none())
            .cloned()
    }

    async fn link(&self, host: &str) -> Result<Arc<Link>, LinkError> {
        if let Some(link) = self.live_link(host) {
            return Ok(link);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(link) = self.live_link(host) {
            return Ok(link);
        }
        let member = self
            .members
            .iter()
            .find(|m| m.name == host)
            .ok_or_else(|| LinkError::UnknownHost(host.to_string()))?;
        let link = self.connect(member).await?;
        lock(&self.open).insert(host.to_string(), link.clone());
        Ok(link)
    }

    async fn connect(&self, member: &Member) -> Result<Arc<Link>, LinkError> {
        let (host, addr) = (member.name.clone(), member.control);
        let connect_err = |source| LinkError::Connect {
            host: host.clone(),
            addr,
            source,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        let (stream, session) = handshake(stream, &self.key, auth::Role::Client)
            .await
            .map_err(|source| match source {
                HandshakeError::Io(e) => connect_err(e),
                HandshakeError::Auth(source) => LinkError::Auth {
                    host: host.clone(),
                    source,
                },
            })?;
        let (mut reader, mut writer) = stream.into_split();
        let mut sealer = FrameSealer::new(session, Direction::FromClient);
        let mut opener = FrameSealer::new(session, Direction::FromServer);
        let (out, mut queue) = mpsc::unbounded_channel::<ToHost>();
        let link = Arc::new(Link {
            host: host.clone(),
            out: out.clone(),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            children: Mutex::new(HashMap::new()),
            outputs: Mutex::new(HashMap::new()),
            output_bytes: self.output_bytes.clone(),
            closed: Mutex::new(None),
            shutdown: tokio::sync::Notify::new(),
        });
        // Hello first; the writer task sends everything else in order.
        out.send(ToHost::Hello {
            host: self.me.clone(),
        })
        .map_err(|_| connect_err(std::io::ErrorKind::BrokenPipe.into()))?;
        let writer_link = link.clone();
        self.rt.spawn(async move {
            loop {
                let msg = tokio::select! {
                    msg = queue.recv() => msg,
                    () = writer_link.shutdown.notified() => None,
                };
                let Some(msg) = msg else { break };
                let sent = match sealer.seal(&msg) {
                    Ok(frame) => writer.write_all(&frame).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(reason) = sent {
                    writer_link.close(format!("sending failed: {reason}"));
                    break;
                }
            }
        });
        let reader_link = link.clone();
        let (lines, peer_timeout) = (self.lines.clone(), self.peer_timeout);
        self.rt.spawn(async move {
            loop {
                match tokio::time::timeout(
                    peer_timeout,
                    wire::receive_sealed::<FromHost>(&mut reader, &mut opener),
                )
                .await
                {
                    Ok(Ok(msg)) => reader_link.deliver(msg, &lines),
                    Ok(Err(e)) => {
                        reader_link.close(crate::error_chain(&e));
                        break;
                    }
                    Err(_) => {
                        reader_link.close(format!("silent for {peer_timeout:?}"));
                        break;
                    }
                }
            }
        });
        let pinger = Arc::downgrade(&link);
        self.rt.spawn(async move {
            let mut tick = tokio::time::interval(peer_timeout / 4);
            loop {
                tick.tick().await;
                let Some(link) = pinger.upgrade() else { break };
                if lock(&link.closed).is_some() || link.out.send(ToHost::Ping).is_err() {
                    break;
                }
            }
        });
        tracing::info!(%host, %addr, "connected to cluster member");
        Ok(link)
    }

    /// Sends `request` to `host` and waits for the answer.
    pub async fn call(&self, host: &str, request: HostRequest) -> Result<HostResponse, LinkError> {
        self.link(host).await?.call(request).await
    }

    async fn plan_async(
        &self,
        wanted: u32,
        mem_size: u64,
        local_free: u32,
        owner: &str,
        scope: Option<&JobScope>,
    ) -> Plan {
        if scope.is_none()
            && let Some(slurm) = &self.slurm
        {
            return self.plan_from_slurm(slurm, wanted, mem_size, owner).await;
        }
        // Inside a Slurm job: only its nodes, at most its CPUs on each.
        let allowed = |host: &str| -> Option<u32> {
            match scope {
                None => Some(u32::MAX),
                Some(scope) => scope
                    .cpus
                    .iter()
                    .find(|(node, _)| node == host)
                    .map(|&(_, cpus)| cpus),
            }
        };
        let members = self.members.iter().filter(|m| allowed(&m.name).is_some());
        let asks = members.map(|m| async move {
            let free = match self.call(&m.name, HostRequest::Capacity).await {
                Ok(HostResponse::Capacity { free, .. }) => free,
                Ok(other) => {
                    tracing::warn!(host = %m.name, "unexpected answer to Capacity: {other:?}");
                    0
                }
                Err(e) => {
                    tracing::warn!(host = %m.name, "no capacity from host: {}", crate::error_chain(&e));
                    0
                }
            };
            (m.name.clone(), free)
        });
        let mut hosts: Vec<(String, u32)> = vec![(self.me.clone(), local_free)];
        hosts.extend(futures::future::join_all(asks).await);
        for (host, free) in &mut hosts {
            *free = (*free).min(allowed(host).unwrap_or(0));
        }
        let shares = spread(wanted, &hosts);
        self.reserve(&shares, mem_size).await
    }

    /// A plan of what Slurm grants now for `wanted` clones: one clone per
    /// CPU, on the nodes it chose (member names).
    async fn plan_from_slurm(
        &self,
        slurm: &Slurm,
        wanted: u32,
        mem_size: u64,
        owner: &str,
    ) -> Plan {
        let comment = format!("snowflock: clones of {owner} on {}", self.me);
        let grant = match slurm.allocate(&self.me, wanted, &comment).await {
            Ok(Some(grant)) => grant,
            Ok(None) => {
                tracing::info!(wanted, "Slurm has no free CPU: the ticket gets none");
                return Plan::default();
            }
            Err(error) => {
                tracing::warn!(
                    wanted,
                    "no Slurm allocation: {}",
                    crate::error_chain(&error)
                );
                return Plan::default();
            }
        };
        tracing::info!(job = grant.job, wanted, cpus = ?grant.cpus, "Slurm granted an allocation");
        let mut shares = Vec::new();
        for (node, cpus) in &grant.cpus {
            if *node == self.me || self.members.iter().any(|m| m.name == *node) {
                shares.push((node.clone(), *cpus));
            } else {
                tracing::warn!(%node, job = grant.job, "Slurm granted a node that is no member: not used");
            }
        }
        let mut plan = self.reserve(&shares, mem_size).await;
        plan.slurm_job = Some(grant.job);
        plan
    }

    /// Reserves each share on its host (this host's is taken by the
    /// supervisor).
    async fn reserve(&self, shares: &[(String, u32)], mem_size: u64) -> Plan {
        let mut plan = Plan::default();
        let reserving =
            shares
                .iter()
                .filter(|(h, n)| *h != self.me && *n > 0)
                .map(|(host, slots)| {
                    let host = host.clone();
                    let slots = *slots;
                    async move {
                        let answer = self
                            .call(&host, HostRequest::Reserve { slots, mem_size })
                            .await;
                        (host, answer)
                    }
                });
        for (host, answer) in futures::future::join_all(reserving).await {
            match answer {
                Ok(HostResponse::Reserved {
                    reservation,
                    granted,
                }) if granted > 0 => plan.remote.push(RemoteGrant {
                    host,
                    reservation,
                    slots: granted,
                }),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%host, "reserving slots failed: {}", crate::error_chain(&e))
                }
            }
        }
        plan.local = shares
            .iter()
            .find(|(h, _)| *h == self.me)
            .map_or(0, |(_, n)| *n);
        plan
    }
}

/// The spread policy: one slot at a time to the host with the most free
/// slots left, so clones go wide before they go deep. `hosts[0]` is this
/// host, which runs the parent: on a tie it comes last; others keep member
/// order.
pub fn spread(wanted: u32, hosts: &[(String, u32)]) -> Vec<(String, u32)> {
    let mut free: Vec<u32> = hosts.iter().map(|(_, f)| *f).collect();
    let mut given = vec![0u32; hosts.len()];
    for _ in 0..wanted {
        let best = (0..hosts.len())
            .filter(|&i| free[i] > 0)
            .max_by_key(|&i| (free[i], i != 0, std::cmp::Reverse(i)));
        let Some(i) = best else { break };
        free[i] -= 1;
        given[i] += 1;
    }
    hosts
        .iter()
        .zip(given)
        .map(|((h, _), n)| (h.clone(), n))
        .collect()
}

impl Cluster for Links {
    fn plan(
        &self,
        wanted: u32,
        mem_size: u64,
        local_free: u32,
        owner: &str,
        scope: Option<&JobScope>,
    ) -> Plan {
        self.rt
            .block_on(self.plan_async(wanted, mem_size, local_free, owner, scope))
    }

    fn release_allocation(&self, slurm_job: u64) {
        if let Some(slurm) = self.slurm.clone() {
            // Waited for: a job that ends right after its join must find its
            // CPUs free again.
            self.rt.block_on(slurm.release(slurm_job));
        }
    }

    fn release(&self, grant: RemoteGrant) {
        let link = self.live_link(&grant.host);
        self.rt.spawn(async move {
            if let Some(link) = link
                && let Err(e) = link
                    .call(HostRequest::Release {
                        reservation: grant.reservation,
                    })
                    .await
            {
                tracing::warn!(host = %grant.host, "releasing a reservation failed: {e}");
            }
        });
    }

    fn serve_image(&self, family: u64, image: Arc<MemoryImage>, key: Option<ClonePointKey>) {
        let mut served = lock(&self.served);
        let entry = served.entry(family).or_insert_with(|| {
            let store: Arc<ImageStore> = Arc::new(ImageStore(image));
            self.memory.register(family, store.clone());
            let mcast = self.mcast.as_ref().map(|server| {
                let group = self.mcdist.group_of(family);
                let sets = lock(&self.working_sets);
                let recording = Recording {
                    lead: key.as_ref().and_then(|key| sets.get(key)),
                    record: key.is_some() && sets.capacity() > 0,
                };
                let registration = server.register_led(family, group, store, recording);
                McastOrder {
                    server: server.local_addr(),
                    group,
                    generation: registration.generation,
                    key: registration.key.0,
                }
            });
            ServedImage {
                users: 0,
                mcast,
                hosts: HashSet::new(),
                key,
            }
        });
        entry.users += 1;
    }

    fn retire_image(&self, family: u64) {
        let ended = {
            let mut served = lock(&self.served);
            let Some(entry) = served.get_mut(&family) else {
                return;
            };
            entry.users -= 1;
            if entry.users > 0 {
                return;
            }
            let Some(ended) = served.remove(&family) else {
                return;
            };
            self.memory.unregister(family);
            if let Some(server) = &self.mcast {
                if let Some(key) = ended.key
                    && let Some(set) = server.working_set(family)
                {
                    tracing::debug!(
                        family = format_args!("{family:#x}"),
                        hosts = set.hosts(),
                        runs = set.runs(),
                        "working set recorded"
                    );
                    lock(&self.working_sets).record(key, set);
                }
                server.unregister(family);
            }
            ended.hosts
        };
        for host in ended {
            let Some(link) = self.live_link(&host) else {
                continue;
            };
            self.rt.spawn(async move {
                if let Err(e) = link.call(HostRequest::EndFamily { family }).await {
                    tracing::warn!(%host, "telling a host that a family ended failed: {e}");
                }
            });
        }
    }

    fn launch(&self, grant: RemoteGrant, launch: RemoteLaunch) {
        let link = self.live_link(&grant.host);
        let pages = self.pages_addr;
        let mcdist = lock(&self.served)
            .get_mut(&launch.descriptor.family)
            .and_then(|served| {
                served.hosts.insert(grant.host.clone());
                served.mcast
            });
        self.rt.spawn(async move {
            let fail = |children: &[RemoteChild], reason: String| {
                for child in children {
                    child.ended(VmOutcome::Lost(reason.clone()), Duration::ZERO);
                }
            };
            let Some(link) = link else {
                fail(&launch.children, format!("host {} unreachable", grant.host));
                return;
            };
            let descriptor = match launch.descriptor.encode() {
                Ok(bytes) => bytes,
                Err(e) => {
                    fail(&launch.children, crate::error_chain(&e));
                    return;
                }
            };
            let family = launch.descriptor.family;
            {
                let mut children = lock(&link.children);
                for child in &launch.children {
                    children.insert((family, child.id()), child.clone());
                }
            }
            if let Some(out) = &launch.descriptor.machine.files.out {
                let mut outputs = lock(&link.outputs);
                for child in &launch.children {
                    let dir = clone_output_dir(out, launch.descriptor.generation, child.id());
                    outputs.insert((family, child.id()), dir);
                }
            }
            let order = CloneOrder {
                family,
                descriptor,
                pages,
                mcdist,
                checkpoint: launch.checkpoint,
                external: launch.external,
                children: launch
                    .children
                    .iter()
                    .map(|c| (c.id(), c.label().to_string()))
                    .collect(),
            };
            let answer = link
                .call(HostRequest::Launch {
                    reservation: grant.reservation,
                    order,
                })
                .await;
            if let Err(e) = answer {
                let reason = crate::error_chain(&e);
                let mut children = lock(&link.children);
                for child in &launch.children {
                    children.remove(&(family, child.id()));
                    child.ended(
                        VmOutcome::Failed(format!("launch failed: {reason}")),
                        Duration::ZERO,
                    );
                }
            }
        });
    }

    fn kill(&self, host: &str, family: u64, child: u32) {
        let link = self.live_link(host);
        self.rt.spawn(async move {
            if let Some(link) = link {
                let _ = link.call(HostRequest::KillClone { family, child }).await;
            }
        });
    }
}

#[derive(Debug)]
pub enum HandshakeError {
    Io(std::io::Error),
    Auth(auth::AuthError),
}

/// Runs the cluster-key handshake on a fresh connection (blocking, on the
/// blocking pool, with a bound on a silent peer) and returns the connection
/// and the session key.
pub async fn handshake(
    stream: TcpStream,
    key: &KeyRing,
    role: auth::Role,
) -> Result<(TcpStream, [u8; 32]), HandshakeError> {
    let std_stream = stream.into_std().map_err(HandshakeError::Io)?;
    let key = key.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut s = std_stream;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        s.set_write_timeout(Some(CONNECT_TIMEOUT))?;
        let session = match role {
            auth::Role::Client => auth::client_handshake(&mut s, &key, CONTROL_CONTEXT),
            auth::Role::Server => auth::server_handshake(&mut s, &key, CONTROL_CONTEXT),
        };
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>((s, session))
    })
    .await
    .map_err(|e| HandshakeError::Io(std::io::Error::other(e)))?
    .map_err(HandshakeError::Io)?;
    let (s, session) = done;
    let session = session.map_err(HandshakeError::Auth)?;
    Ok((TcpStream::from_std(s).map_err(HandshakeError::Io)?, session))
}

#[cfg(test)]
mod tests {
    use super::spread;

    fn hosts(free: &[u32]) -> Vec<(String, u32)> {
        free.iter()
            .enumerate()
            .map(|(i, &f)| (format!("h{}", i + 1), f))
            .collect()
    }

    #[test]
    fn spread_goes_wide_first_and_respects_capacity() {
        let shares: Vec<u32> = spread(8, &hosts(&[16, 16, 16]))
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(shares, [2, 3, 3]);
        let shares: Vec<u32> = spread(8, &hosts(&[1, 16, 0]))
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(shares, [0, 8, 0]);
        let shares: Vec<u32> = spread(40, &hosts(&[4, 4, 4]))
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(shares, [4, 4, 4]);
    }
}
