//! The page client: one authenticated connection from a clone host to a memory server, for one
//! family.
//!
//! After the handshake every frame travels in sealed records ([`crate::sealed`]).
//! [`PageClient::request`] may be called from any thread; it seals and writes REQUEST frames
//! under a lock. A receiver thread reads the replies. Each `read` returns whatever has arrived
//! (up to [`RECEIVE_BUFFER_LEN`] bytes); the whole records in it are opened in place and their
//! PAGE frames handed to [`PageSink::deliver_batch`] in one call, straight out of the receive
//! buffer (no copy). A record that fails to open (forged, altered, replayed) fails the
//! connection, and none of its pages are delivered.
//!
//! The connection fails, and [`PageSink::failed`] is called exactly once, when the server
//! closes it, a read fails, a frame is malformed or belongs to another family, or the server
//! answers with an ERROR frame (a page that cannot be fetched leaves the clone unable to run).
//! Pages received before the failure are delivered first. Dropping the client closes the
//! connection without calling `failed`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::auth::{self, AuthError, KeySource};
use crate::sealed::{self, End, Opener, Sealer};
use crate::server::PAGES_CONTEXT;
use crate::sync::{Never, lock};
use crate::wire::{self, Frame};

/// Receive buffer of the receiver thread: the largest batch is this many bytes of records.
pub const RECEIVE_BUFFER_LEN: usize = 256 * 1024;
/// How long one write of requests may block before [`PageClient::request`] fails.
pub const REQUEST_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping a client waits for its receiver thread.
pub const DROP_TIMEOUT: Duration = Duration::from_secs(2);

// A whole record fits, so its frames are opened and delivered in place.
const _: () = assert!(RECEIVE_BUFFER_LEN >= sealed::MAX_RECORD_LEN);

/// Where received pages go; implemented by the fault handler.
///
/// Called from the client's receiver thread. While a call runs, no more replies are read.
/// The sink must not own the [`PageClient`] that calls it (that would be a reference cycle).
pub trait PageSink: Send + Sync {
    /// Pages received, as `(page number, PAGE_SIZE bytes)`, in arrival order.
    fn deliver_batch(&self, pages: &[(u64, &[u8])]);
    /// Pages received, each as the parts (in order) that make up its `PAGE_SIZE` bytes: the
    /// fragments it arrived in, still in the receive buffers. A sink that can store a page
    /// from its parts saves a copy; by default they are joined and passed to
    /// [`PageSink::deliver_batch`].
    fn deliver_parts(&self, pages: &[(u64, &[&[u8]])]) {
        let joined: Vec<(u64, Vec<u8>)> = pages
            .iter()
            .map(|(page, parts)| (*page, parts.concat()))
            .collect();
        let batch: Vec<(u64, &[u8])> = joined
            .iter()
            .map(|(page, data)| (*page, &data[..]))
            .collect();
        self.deliver_batch(&batch);
    }
    /// The connection failed; no more pages will come. Called at most once, never after the
    /// client was dropped.
    fn failed(&self, reason: String);
}

/// Counters of a [`PageClient`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientStats {
    /// REQUEST frames sent.
    pub requests_sent: u64,
    /// Pages named in them.
    pub pages_requested: u64,
    /// PAGE frames received.
    pub pages_received: u64,
    /// Bytes received after the handshake (all frames).
    pub bytes_received: u64,
    /// Calls to [`PageSink::deliver_batch`].
    pub batches_delivered: u64,
}

/// Why [`PageClient::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection could not be made.
    #[error("connecting to memory server {addr}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// The socket could not be configured.
    #[error("configuring the connection to memory server {addr}")]
    Configure {
        /// The server.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// Authentication failed.
    #[error("authenticating with memory server {addr}")]
    Handshake {
        /// The server.
        addr: SocketAddr,
        /// What went wrong.
        source: AuthError,
    },
    /// The receiver thread could not be started.
    #[error("starting the receiver thread for memory server {addr}")]
    Spawn {
        /// The server.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
}

/// Why [`PageClient::request`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The connection already failed.
    #[error("the connection to memory server {addr} failed: {reason}")]
    Failed {
        /// The server.
        addr: SocketAddr,
        /// The reason given to [`PageSink::failed`].
        reason: String,
    },
    /// Writing the request failed.
    #[error("sending a page request to memory server {addr}")]
    Send {
        /// The server.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
}

/// One connection's state, shared by the client and its receiver thread: the socket's
/// writing end, why the connection failed, and the counters.
struct Connection {
    addr: SocketAddr,
    family: u64,
    /// The socket requests are written to, and the sealer of their records: one lock, so
    /// records go out in the order they were sealed.
    writer: Mutex<(TcpStream, Sealer)>,
    /// Set by `Drop`: the connection is being closed on purpose, not failing.
    closing: AtomicBool,
    /// Why the connection failed, once it has.
    failure: Mutex<Option<String>>,
    requests_sent: AtomicU64,
    pages_requested: AtomicU64,
    pages_received: AtomicU64,
    bytes_received: AtomicU64,
    batches_delivered: AtomicU64,
}

/// One authenticated connection to a memory server, for one family.
pub struct PageClient {
    connection: Arc<Connection>,
    /// Used to shut the socket down without taking the writer lock.
    socket: TcpStream,
    receiver: Option<JoinHandle<()>>,
    /// Disconnects when the receiver thread exits. In a `Mutex` only to make the client `Sync`.
    receiver_exited: Mutex<Receiver<Never>>,
}

const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<PageClient>();
};

impl std::fmt::Debug for PageClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageClient")
            .field("addr", &self.connection.addr)
            .field("family", &format_args!("{:#x}", self.connection.family))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl PageClient {
    /// Connects to the memory server at `addr`, authenticates with `key` and starts receiving
    /// pages of `family` into `sink`. `connect_timeout` bounds the connection and, separately,
    /// each read and write of the handshake.
    pub fn connect(
        addr: SocketAddr,
        key: &impl KeySource,
        family: u64,
        sink: Arc<dyn PageSink>,
        connect_timeout: Duration,
    ) -> Result<PageClient, ConnectError> {
        let mut stream = TcpStream::connect_timeout(&addr, connect_timeout)
            .map_err(|source| ConnectError::Connect { addr, source })?;
        let configure = |source| ConnectError::Configure { addr, source };
        stream.set_nodelay(true).map_err(configure)?;
        stream
            .set_read_timeout(Some(connect_timeout))
            .map_err(configure)?;
        stream
            .set_write_timeout(Some(connect_timeout))
            .map_err(configure)?;
        let session = auth::client_handshake(&mut stream, key, PAGES_CONTEXT)
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        let (sealer, opener) = sealed::record_keys(&session, End::Client);
        // Replies come whenever requests are made: no read deadline from here on.
        stream.set_read_timeout(None).map_err(configure)?;
        stream
            .set_write_timeout(Some(REQUEST_WRITE_TIMEOUT))
            .map_err(configure)?;
        let reader = stream.try_clone().map_err(configure)?;
        let socket = stream.try_clone().map_err(configure)?;
        let connection = Arc::new(Connection {
            addr,
            family,
            writer: Mutex::new((stream, sealer)),
            closing: AtomicBool::new(false),
            failure: Mutex::new(None),
            requests_sent: AtomicU64::new(0),
            pages_requested: AtomicU64::new(0),
            pages_received: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            batches_delivered: AtomicU64::new(0),
        });
        let (alive, receiver_exited) = mpsc::channel();
        let receiver = {
            let connection = Arc::clone(&connection);
            thread::Builder::new()
                .name(format!("sf-pages-{family:x}"))
                .spawn(move || receive(&connection, reader, opener, sink.as_ref(), alive))
                .map_err(|source| ConnectError::Spawn { addr, source })?
        };
        tracing::debug!(%addr, family = format_args!("{family:#x}"), "page client connected");
        Ok(PageClient {
            connection,
            socket,
            receiver: Some(receiver),
            receiver_exited: Mutex::new(receiver_exited),
        })
    }

    /// Asks for `pages`; their replies go to the sink. Splits them into REQUEST frames of at
    /// most [`wire::MAX_PAGES_PER_REQUEST`] pages and writes them with one write. Thread-safe.
    pub fn request(&self, pages: &[u64]) -> Result<(), RequestError> {
        let connection = &self.connection;
        if let Some(reason) = lock(&connection.failure).clone() {
            return Err(RequestError::Failed {
                addr: connection.addr,
                reason,
            });
        }
        if pages.is_empty() {
            return Ok(());
        }
        let mut frames = Vec::new();
        let requests = wire::encode_requests(connection.family, pages, &mut frames);
        let mut records = Vec::with_capacity(frames.len() + sealed::RECORD_TAG_LEN * 2);
        let mut writer = lock(&connection.writer);
        let (stream, sealer) = &mut *writer;
        sealer.seal_frames(&frames, &mut records);
        stream
            .write_all(&records)
            .map_err(|source| RequestError::Send {
                addr: connection.addr,
                source,
            })?;
        connection
            .requests_sent
            .fetch_add(requests as u64, Ordering::Relaxed);
        connection
            .pages_requested
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The server's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.connection.addr
    }

    /// The family this client fetches.
    pub fn family(&self) -> u64 {
        self.connection.family
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ClientStats {
        let connection = &self.connection;
        ClientStats {
            requests_sent: connection.requests_sent.load(Ordering::Relaxed),
            pages_requested: connection.pages_requested.load(Ordering::Relaxed),
            pages_received: connection.pages_received.load(Ordering::Relaxed),
            bytes_received: connection.bytes_received.load(Ordering::Relaxed),
            batches_delivered: connection.batches_delivered.load(Ordering::Relaxed),
        }
    }
}

impl Drop for PageClient {
    fn drop(&mut self) {
        self.connection.closing.store(true, Ordering::SeqCst);
        // Wakes the receiver thread out of its read; it may already have closed the socket.
        let _ = self.socket.shutdown(Shutdown::Both);
        match lock(&self.receiver_exited).recv_timeout(DROP_TIMEOUT) {
            Ok(never) => match never {},
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(receiver) = self.receiver.take()
                    && receiver.join().is_err()
                {
                    tracing::error!(addr = %self.connection.addr, "page receiver thread panicked");
                }
            }
            Err(RecvTimeoutError::Timeout) => tracing::warn!(
                addr = %self.connection.addr,
                timeout = ?DROP_TIMEOUT,
                "page receiver thread still busy in the sink; leaving it to finish"
            ),
        }
    }
}

/// The receiver thread: reads replies until the connection ends, then reports why.
fn receive(
    connection: &Connection,
    mut stream: TcpStream,
    mut opener: Opener,
    sink: &dyn PageSink,
    _alive: Sender<Never>,
) {
    let reason = receive_until_failure(connection, &mut stream, &mut opener, sink);
    if connection.closing.load(Ordering::SeqCst) {
        return;
    }
    tracing::warn!(
        addr = %connection.addr,
        family = format_args!("{:#x}", connection.family),
        %reason,
        "page connection failed"
    );
    *lock(&connection.failure) = Some(reason.clone());
    // Later requests fail at once instead of writing into a dead connection.
    let _ = stream.shutdown(Shutdown::Both);
    sink.failed(reason);
}

/// Reads and delivers pages; returns why it stopped.
fn receive_until_failure(
    connection: &Connection,
    stream: &mut TcpStream,
    opener: &mut Opener,
    sink: &dyn PageSink,
) -> String {
    let addr = connection.addr;
    let mut buf = vec![0u8; RECEIVE_BUFFER_LEN];
    let mut filled = 0;
    loop {
        let read = match stream.read(&mut buf[filled..]) {
            Ok(0) => return format!("memory server {addr} closed the connection"),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return format!("reading from memory server {addr}: {error}"),
        };
        connection
            .bytes_received
            .fetch_add(read as u64, Ordering::Relaxed);
        filled += read;
        // Open every whole record in place first, so that the batch borrows their frames.
        let mut consumed = 0;
        let mut opened = Vec::new();
        let mut refused = None;
        loop {
            match opener.open_in_place(&mut buf[consumed..filled]) {
                Ok(Some((frames, used))) => {
                    opened.push(consumed + frames.start..consumed + frames.end);
                    consumed += used;
                }
                Ok(None) => break,
                Err(error) => {
                    refused = Some(format!("memory server {addr}: {error}"));
                    break;
                }
            }
        }
        let mut batch: Vec<(u64, &[u8])> = Vec::new();
        let mut stop = None;
        'records: for range in opened {
            let mut frames = &buf[range];
            while !frames.is_empty() {
                let (frame, used) = match wire::decode(frames) {
                    Ok(decoded) => decoded,
                    Err(error) => {
                        stop = Some(format!(
                            "malformed frame from memory server {addr}: {error}"
                        ));
                        break 'records;
                    }
                };
                frames = &frames[used..];
                match frame {
                    Frame::Page(reply) if reply.family == connection.family => {
                        batch.push((reply.page, reply.data));
                    }
                    Frame::Error(reply) if reply.family == connection.family => {
                        stop = Some(format!(
                            "server error for page {:#x} of family {:#x}: {}: {}",
                            reply.page, reply.family, reply.code, reply.message
                        ));
                        break 'records;
                    }
                    Frame::Page(wire::PageReply { family, .. })
                    | Frame::Error(wire::ErrorReply { family, .. }) => {
                        stop = Some(format!(
                            "memory server {addr} sent a reply for family {family:#x}, not {:#x}",
                            connection.family
                        ));
                        break 'records;
                    }
                    Frame::Request(_) => {
                        stop = Some(format!("memory server {addr} sent a REQUEST frame"));
                        break 'records;
                    }
                }
            }
        }
        if !batch.is_empty() {
            connection
                .pages_received
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            connection.batches_delivered.fetch_add(1, Ordering::Relaxed);
            sink.deliver_batch(&batch);
        }
        if let Some(reason) = stop.or(refused) {
            return reason;
        }
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
}
