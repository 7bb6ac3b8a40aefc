//! The memory server: serves the frozen memory of clone points to clone hosts.
//!
//! One acceptor thread accepts connections; each connection gets its own thread, which
//! authenticates the peer (context `b"pages"`, bounded by [`ServerConfig::handshake_timeout`])
//! and then answers REQUEST frames until the peer closes. Connections are few (one per clone
//! host and family), so a thread each is cheap and keeps a slow store read on one connection
//! from delaying the others. Connections still authenticating are bounded apart from the
//! authenticated ones, in all and per peer address, and a handshake's whole time is bounded:
//! half-open connections from anyone who can reach the port never take an authenticated
//! client's place.
//!
//! After the handshake every frame travels in records sealed under the session key
//! ([`crate::sealed`]); a record that fails to open closes the connection.
//!
//! For each REQUEST the server reads every page from the family's [`PageStore`] into one reply
//! buffer, and writes the replies to all the requests received so far with one `write` call
//! (or one per 256 KiB of replies, so the first pages of a long stream go out early). An
//! unknown family, a page beyond the end or a failed read is answered with an ERROR frame and
//! the connection stays open; a malformed frame closes the connection.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::auth;
use crate::keyring::KeyRing;
use crate::sealed;
use crate::sync::{Never, lock, read, write};
use crate::wire::{self, ErrorCode, Frame, PAGE_SIZE, WireError};

/// Protocol context of the page protocol's handshake.
pub const PAGES_CONTEXT: &[u8] = b"pages";

/// The frozen memory of one clone point.
///
/// Implemented by the control plane over its copy-on-write memory image. Called from the
/// connection threads, concurrently.
pub trait PageStore: Send + Sync {
    /// Number of pages in the image; pages `0..page_count()` can be read.
    fn page_count(&self) -> u64;
    /// Copies page `page` (less than [`PageStore::page_count`]) into `buf`.
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> io::Result<()>;
    /// Runs `(first page, count)` worth sending to the clone hosts before their clones ask,
    /// in the order to send them: the mcdist server pushes them when clone hosts join the
    /// family. Called once per registration. The default, for a store that cannot tell which
    /// pages hold data, pushes nothing.
    fn push_runs(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

/// Tunables of a [`MemoryServer`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// How long a new connection may take to authenticate, in all, before it is closed
    /// (a peer sending a byte at a time does not extend it).
    pub handshake_timeout: Duration,
    /// How long one write of replies may block (a client that stops reading) before the
    /// connection is closed.
    pub write_timeout: Duration,
    /// Most authenticated connections served at once; a new connection while they are all
    /// taken is closed at once.
    pub max_connections: usize,
    /// Most connections still authenticating at once, and from one peer address: more are
    /// closed at once. Connections that have not proved the cluster key never take an
    /// authenticated client's place, and one peer cannot take every handshake's.
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_peer: usize,
    /// How long [`MemoryServer::shutdown`] waits for its threads to finish.
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_unauthenticated: 64,
            max_unauthenticated_per_peer: 8,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters of a [`MemoryServer`], since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub active_connections: u64,
    /// PAGE frames sent.
    pub pages_served: u64,
    /// Bytes written to authenticated clients (all frames).
    pub bytes_served: u64,
    /// ERROR frames sent.
    pub errors: u64,
    /// Connections closed after authentication for a malformed frame or an I/O error.
    pub protocol_errors: u64,
    /// Connections closed because the handshake failed (wrong key, wrong protocol, garbage,
    /// timeout).
    pub auth_failures: u64,
    /// Connections refused because [`ServerConfig::max_connections`] were open.
    pub refused: u64,
    /// Connections refused because [`ServerConfig::max_unauthenticated`] (or as many from
    /// their peer's address) were still authenticating.
    pub refused_unauthenticated: u64,
}

/// Why [`MemoryServer::bind`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The listening socket could not be bound.
    #[error("binding the memory server to {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// The bound address could not be read back.
    #[error("reading the memory server's local address")]
    LocalAddr {
        /// The I/O error.
        source: io::Error,
    },
    /// The acceptor thread could not be started.
    #[error("starting the memory server's acceptor thread")]
    Spawn {
        /// The I/O error.
        source: io::Error,
    },
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    active_connections: AtomicU64,
    pages_served: AtomicU64,
    bytes_served: AtomicU64,
    errors: AtomicU64,
    protocol_errors: AtomicU64,
    auth_failures: AtomicU64,
    refused: AtomicU64,
    refused_unauthenticated: AtomicU64,
}

/// An open connection, as the acceptor and shutdown see it.
struct Tracked {
    /// A handle on its socket, to close it on shutdown.
    handle: TcpStream,
    peer: IpAddr,
    authenticated: bool,
}

/// A running memory server: the listener, the families served, the open connections and the
/// counters, shared by the front end, the acceptor and the connection threads.
struct MemoryService {
    key: KeyRing,
    config: ServerConfig,
    listener: TcpListener,
    families: RwLock<HashMap<u64, Arc<dyn PageStore>>>,
    /// The open connections; `None` once shut down.
    connections: Mutex<Option<HashMap<u64, Tracked>>>,
    stopping: AtomicBool,
    next_connection: AtomicU64,
    counters: Counters,
}

/// Serves the frozen memory of any number of clone points (families) at once.
///
/// Dropping it shuts it down (see [`MemoryServer::shutdown`]).
pub struct MemoryServer {
    service: Arc<MemoryService>,
    local_addr: SocketAddr,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// Disconnects once the acceptor and every connection thread have exited.
    threads_exited: Mutex<Receiver<Never>>,
}

const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<MemoryServer>();
};

impl std::fmt::Debug for MemoryServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryServer")
            .field("local_addr", &self.local_addr)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl MemoryServer {
    /// Binds `addr` and starts serving with the default [`ServerConfig`], accepting the keys of
    /// `key` (a [`crate::auth::ClusterKey`], or a host's [`KeyRing`]).
    pub fn bind(addr: SocketAddr, key: impl Into<KeyRing>) -> Result<MemoryServer, BindError> {
        MemoryServer::bind_with_config(addr, key, ServerConfig::default())
    }

    /// Binds `addr` and starts serving.
    pub fn bind_with_config(
        addr: SocketAddr,
        key: impl Into<KeyRing>,
        config: ServerConfig,
    ) -> Result<MemoryServer, BindError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| BindError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| BindError::LocalAddr { source })?;
        let service = Arc::new(MemoryService {
            key: key.into(),
            config,
            listener,
            families: RwLock::new(HashMap::new()),
            connections: Mutex::new(Some(HashMap::new())),
            stopping: AtomicBool::new(false),
            next_connection: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let (alive, threads_exited) = mpsc::channel();
        let acceptor = {
            let service = Arc::clone(&service);
            thread::Builder::new()
                .name("sf-mem-accept".into())
                .spawn(move || accept_loop(&service, alive))
                .map_err(|source| BindError::Spawn { source })?
        };
        tracing::info!(%local_addr, key = ?service.key, "memory server listening");
        Ok(MemoryServer {
            service,
            local_addr,
            acceptor: Mutex::new(Some(acceptor)),
            threads_exited: Mutex::new(threads_exited),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts serving `family` from `store`, replacing any store it had.
    pub fn register(&self, family: u64, store: Arc<dyn PageStore>) {
        let pages = store.page_count();
        let previous = write(&self.service.families).insert(family, store);
        tracing::info!(
            family = format_args!("{family:#x}"),
            pages,
            replaced = previous.is_some(),
            "serving family"
        );
    }

    /// Stops serving `family`; later requests for it get [`ErrorCode::UnknownFamily`].
    /// Returns whether it was served.
    pub fn unregister(&self, family: u64) -> bool {
        let removed = write(&self.service.families).remove(&family).is_some();
        tracing::info!(
            family = format_args!("{family:#x}"),
            removed,
            "family withdrawn"
        );
        removed
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        let c = &self.service.counters;
        ServerStats {
            connections: c.connections.load(Ordering::Relaxed),
            active_connections: c.active_connections.load(Ordering::Relaxed),
            pages_served: c.pages_served.load(Ordering::Relaxed),
            bytes_served: c.bytes_served.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            refused_unauthenticated: c.refused_unauthenticated.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, closes every connection and waits (at most
    /// [`ServerConfig::shutdown_timeout`]) for the threads to finish. Threads still busy
    /// after that (a [`PageStore::read_page`] that does not return) are left to finish on
    /// their own, and a warning is logged. Calling it again does nothing.
    pub fn shutdown(&self) {
        if self.service.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: the listener's fd stays open for this call: `self.service` holds the
        // `TcpListener` that owns it. shutdown(2) does not close the fd, it only wakes the
        // acceptor's blocked accept(2), which then fails with EINVAL.
        let rc = unsafe { libc::shutdown(self.service.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if rc != 0 {
            tracing::warn!(
                error = %io::Error::last_os_error(),
                "could not shut down the memory server's listening socket"
            );
        }
        let connections = lock(&self.service.connections).take().unwrap_or_default();
        for connection in connections.values() {
            // The connection may already be closing; its thread handles the outcome.
            let _ = connection.handle.shutdown(Shutdown::Both);
        }
        let all_exited =
            match lock(&self.threads_exited).recv_timeout(self.service.config.shutdown_timeout) {
                Ok(never) => match never {},
                Err(RecvTimeoutError::Disconnected) => true,
                Err(RecvTimeoutError::Timeout) => false,
            };
        if let Some(acceptor) = lock(&self.acceptor).take() {
            // Every thread has dropped its `_alive` sender: the acceptor is returning.
            if all_exited || acceptor.is_finished() {
                if acceptor.join().is_err() {
                    tracing::error!("the memory server's acceptor thread panicked");
                }
            } else {
                tracing::warn!("the memory server's acceptor thread did not stop in time");
            }
        }
        if !all_exited {
            tracing::warn!(
                timeout = ?self.service.config.shutdown_timeout,
                "memory server connection threads still running after shutdown"
            );
        }
        tracing::info!(
            local_addr = %self.local_addr,
            stats = ?self.stats(),
            "memory server stopped"
        );
    }
}

impl Drop for MemoryServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(service: &Arc<MemoryService>, alive: Sender<Never>) {
    loop {
        let accepted = service.listener.accept();
        if service.stopping.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => start_connection(service, stream, peer, &alive),
            Err(error) => {
                tracing::warn!(%error, "memory server accept failed");
                // Out of fds or memory: back off instead of spinning on the same error.
                if !matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) {
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

fn start_connection(
    service: &Arc<MemoryService>,
    stream: TcpStream,
    peer: SocketAddr,
    alive: &Sender<Never>,
) {
    let counters = &service.counters;
    counters.connections.fetch_add(1, Ordering::Relaxed);
    let id = service.next_connection.fetch_add(1, Ordering::Relaxed);
    let handle = match stream.try_clone() {
        Ok(handle) => handle,
        Err(error) => {
            tracing::warn!(%peer, %error, "could not track a memory server connection; closing it");
            return;
        }
    };
    {
        let mut connections = lock(&service.connections);
        let Some(connections) = connections.as_mut() else {
            return;
        };
        let authenticated = connections.values().filter(|c| c.authenticated).count();
        if authenticated >= service.config.max_connections {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %peer,
                max = service.config.max_connections,
                "memory server at its connection limit; closing the new connection"
            );
            return;
        }
        let authenticating = connections.values().filter(|c| !c.authenticated);
        let (all, from_peer) = authenticating.fold((0, 0), |(all, from_peer), c| {
            (all + 1, from_peer + usize::from(c.peer == peer.ip()))
        });
        if all >= service.config.max_unauthenticated
            || from_peer >= service.config.max_unauthenticated_per_peer
        {
            counters
                .refused_unauthenticated
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %peer,
                authenticating = all,
                from_peer,
                "too many memory connections still authenticating; closing the new one"
            );
            return;
        }
        connections.insert(
            id,
            Tracked {
                handle,
                peer: peer.ip(),
                authenticated: false,
            },
        );
    }
    counters.active_connections.fetch_add(1, Ordering::Relaxed);
    let thread_service = Arc::clone(service);
    let alive = alive.clone();
    let spawned = thread::Builder::new()
        .name(format!("sf-mem-conn-{id}"))
        .spawn(move || {
            let _alive = alive;
            serve_connection(&thread_service, stream, peer, id);
            end_connection(&thread_service, id);
        });
    if let Err(error) = spawned {
        tracing::warn!(%peer, %error, "could not start a memory server connection thread");
        end_connection(service, id);
    }
}

fn end_connection(service: &MemoryService, id: u64) {
    if let Some(connections) = lock(&service.connections).as_mut() {
        connections.remove(&id);
    }
    service
        .counters
        .active_connections
        .fetch_sub(1, Ordering::Relaxed);
}

/// Reads this much at a time: a whole record of pipelined REQUESTs.
const READ_BUFFER_LEN: usize = sealed::MAX_RECORD_LEN;
/// Replies are written once this many bytes are pending, even mid-way through the requests
/// already received, so the reply buffer stays bounded.
const MAX_PENDING_REPLY_LEN: usize = 256 * 1024;

/// Why a connection ended; logged once.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("authentication failed")]
    Auth(#[source] auth::AuthError),
    #[error("authenticated, but {max} authenticated connections are open")]
    Full { max: usize },
    #[error("configuring the socket")]
    Configure(#[source] io::Error),
    #[error("reading requests")]
    Read(#[source] io::Error),
    #[error("writing replies")]
    Write(#[source] io::Error),
    #[error("malformed frame")]
    Malformed(#[source] WireError),
    #[error("refused a record")]
    Record(#[source] sealed::RecordError),
    #[error("unexpected {kind} frame from a client")]
    UnexpectedFrame { kind: &'static str },
}

fn serve_connection(service: &MemoryService, mut stream: TcpStream, peer: SocketAddr, id: u64) {
    let span = tracing::debug_span!("memory_connection", %peer);
    let _entered = span.enter();
    let result = authenticate(service, &mut stream).and_then(|session| {
        admit_authenticated(service, id)?;
        tracing::debug!("client authenticated");
        let mut records = sealed::record_keys(&session, sealed::End::Server);
        serve_requests(service, &mut stream, &mut records)
    });
    let counters = &service.counters;
    match result {
        Ok(()) => tracing::debug!("client closed the connection"),
        Err(_) if service.stopping.load(Ordering::SeqCst) => {
            tracing::debug!("connection closed by shutdown");
        }
        Err(error @ ConnectionError::Full { .. }) => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "closing memory connection"
            );
        }
        Err(ConnectionError::Auth(error)) => {
            counters.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "refused a memory client"
            );
        }
        Err(error) => {
            counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "closing memory connection"
            );
        }
    }
}

/// Counts connection `id` as authenticated, unless the authenticated ones are all taken
/// (several handshakes may have finished since it was accepted).
fn admit_authenticated(service: &MemoryService, id: u64) -> Result<(), ConnectionError> {
    let mut connections = lock(&service.connections);
    let Some(connections) = connections.as_mut() else {
        // Shutting down: the socket is closed already.
        return Ok(());
    };
    let max = service.config.max_connections;
    if connections.values().filter(|c| c.authenticated).count() >= max {
        return Err(ConnectionError::Full { max });
    }
    if let Some(connection) = connections.get_mut(&id) {
        connection.authenticated = true;
    }
    Ok(())
}

/// Runs the handshake; returns the session key the records are sealed under.
fn authenticate(
    service: &MemoryService,
    stream: &mut TcpStream,
) -> Result<[u8; auth::SESSION_KEY_LEN], ConnectionError> {
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_write_timeout(Some(service.config.write_timeout)))
        .map_err(ConnectionError::Configure)?;
    let mut bounded = Deadline {
        stream,
        at: Instant::now() + service.config.handshake_timeout,
    };
    let session = auth::server_handshake(&mut bounded, &service.key, PAGES_CONTEXT)
        .map_err(ConnectionError::Auth)?;
    // Authenticated clients ask for pages whenever their guests fault: no read deadline.
    stream
        .set_read_timeout(None)
        .map_err(ConnectionError::Configure)?;
    Ok(session)
}

/// A stream whose reads all end by one deadline: each read waits at most what is left.
struct Deadline<'a> {
    stream: &'a mut TcpStream,
    at: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake's time is up",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

fn serve_requests(
    service: &MemoryService,
    stream: &mut TcpStream,
    (sealer, opener): &mut (sealed::Sealer, sealed::Opener),
) -> Result<(), ConnectionError> {
    let mut input = vec![0u8; READ_BUFFER_LEN];
    let mut filled = 0;
    let mut replies = Vec::with_capacity(wire::MAX_REQUEST_LEN);
    let mut records = Vec::new();
    let mut page = [0u8; PAGE_SIZE];
    loop {
        let read = stream
            .read(&mut input[filled..])
            .map_err(ConnectionError::Read)?;
        if read == 0 {
            return if filled == 0 {
                Ok(())
            } else {
                Err(ConnectionError::Read(io::ErrorKind::UnexpectedEof.into()))
            };
        }
        filled += read;
        let mut consumed = 0;
        let outcome = loop {
            let (frames, used) = match opener.open_in_place(&mut input[consumed..filled]) {
                Ok(Some(opened)) => opened,
                Ok(None) => break Ok(()),
                Err(error) => break Err(ConnectionError::Record(error)),
            };
            let frames = consumed + frames.start..consumed + frames.end;
            consumed += used;
            if let Err(error) = answer_frames(
                service,
                &input[frames],
                &mut page,
                &mut replies,
                |replies| send(service, stream, sealer, replies, &mut records),
            ) {
                break Err(error);
            }
        };
        // Replies to the well-formed requests before a bad frame still go out.
        send(service, stream, sealer, &mut replies, &mut records)?;
        outcome?;
        input.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
}

/// Answers the REQUEST frames of one opened record, sending replies whenever
/// [`MAX_PENDING_REPLY_LEN`] bytes are pending.
fn answer_frames(
    service: &MemoryService,
    mut frames: &[u8],
    page: &mut [u8; PAGE_SIZE],
    replies: &mut Vec<u8>,
    mut send: impl FnMut(&mut Vec<u8>) -> Result<(), ConnectionError>,
) -> Result<(), ConnectionError> {
    while !frames.is_empty() {
        let (frame, used) = wire::decode(frames).map_err(ConnectionError::Malformed)?;
        match frame {
            Frame::Request(request) => {
                answer(service, &request, page, replies);
                if replies.len() >= MAX_PENDING_REPLY_LEN {
                    send(replies)?;
                }
            }
            Frame::Page(_) => return Err(ConnectionError::UnexpectedFrame { kind: "PAGE" }),
            Frame::Error(_) => return Err(ConnectionError::UnexpectedFrame { kind: "ERROR" }),
        }
        frames = &frames[used..];
    }
    Ok(())
}

/// Appends one reply per requested page to `replies`.
fn answer(
    service: &MemoryService,
    request: &wire::Request<'_>,
    page_buf: &mut [u8; PAGE_SIZE],
    replies: &mut Vec<u8>,
) {
    let family = request.family;
    let store = read(&service.families).get(&family).cloned();
    let counters = &service.counters;
    let Some(store) = store else {
        tracing::debug!(
            family = format_args!("{family:#x}"),
            "request for an unknown family"
        );
        for page in request.pages() {
            wire::encode_error(
                family,
                page,
                ErrorCode::UnknownFamily,
                &format!("family {family:#x} is not served here"),
                replies,
            );
        }
        counters
            .errors
            .fetch_add(request.len() as u64, Ordering::Relaxed);
        return;
    };
    let page_count = store.page_count();
    for page in request.pages() {
        if page >= page_count {
            wire::encode_error(
                family,
                page,
                ErrorCode::OutOfRange,
                &format!(
                    "page {page:#x} is beyond the {page_count:#x} pages of family {family:#x}"
                ),
                replies,
            );
            counters.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match store.read_page(page, page_buf) {
            Ok(()) => {
                wire::encode_page(family, page, page_buf, replies);
                counters.pages_served.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::warn!(
                    family = format_args!("{family:#x}"),
                    page = format_args!("{page:#x}"),
                    %error,
                    "reading a page of a frozen image failed"
                );
                wire::encode_error(
                    family,
                    page,
                    ErrorCode::ReadFailed,
                    &error.to_string(),
                    replies,
                );
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Seals `replies` into records (`records` is scratch) and writes them.
fn send(
    service: &MemoryService,
    stream: &mut TcpStream,
    sealer: &mut sealed::Sealer,
    replies: &mut Vec<u8>,
    records: &mut Vec<u8>,
) -> Result<(), ConnectionError> {
    if replies.is_empty() {
        return Ok(());
    }
    records.clear();
    sealer.seal_frames(replies, records);
    stream.write_all(records).map_err(ConnectionError::Write)?;
    service
        .counters
        .bytes_served
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    replies.clear();
    Ok(())
}
