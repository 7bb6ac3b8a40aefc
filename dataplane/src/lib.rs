//! Page transport between hosts: the parent's memory server and the clones' page clients.
//!
//! A clone on another host starts without its memory. When its guest first touches a page,
//! the fault handler asks the parent host's [`MemoryServer`] for it through a [`PageClient`];
//! the server reads the page from the frozen (copy-on-write) image of the clone point, called
//! a *family*, and sends it back, while the parent VM keeps running.
//!
//! ```
//! use std::sync::{mpsc, Arc, Mutex};
//! use std::time::Duration;
//! use snowflock_dataplane::{ClusterKey, MemoryServer, PageClient, PageSink, PageStore, PAGE_SIZE};
//!
//! /// A frozen image of 16 pages; page n is filled with the byte n.
//! struct Image;
//! impl PageStore for Image {
//!     fn page_count(&self) -> u64 { 16 }
//!     fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> std::io::Result<()> {
//!         buf.fill(page as u8);
//!         Ok(())
//!     }
//! }
//!
//! /// Forwards pages to the test thread.
//! struct Sink(Mutex<mpsc::Sender<(u64, Vec<u8>)>>);
//! impl PageSink for Sink {
//!     fn deliver_batch(&self, pages: &[(u64, &[u8])]) {
//!         for (page, data) in pages {
//!             let _ = self.0.lock().unwrap().send((*page, data.to_vec()));
//!         }
//!     }
//!     fn failed(&self, reason: String) { eprintln!("failed: {reason}") }
//! }
//!
//! let key = ClusterKey::generate();
//! let server = MemoryServer::bind("127.0.0.1:0".parse()?, key.clone())?;
//! server.register(7, Arc::new(Image));
//!
//! let (tx, rx) = mpsc::channel();
//! let sink = Arc::new(Sink(Mutex::new(tx)));
//! let client = PageClient::connect(server.local_addr(), &key, 7, sink, Duration::from_secs(5))?;
//! client.request(&[3])?;
//! let (page, data) = rx.recv_timeout(Duration::from_secs(5))?;
//! assert_eq!(page, 3);
//! assert_eq!(data, vec![3u8; PAGE_SIZE]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Protocols
//!
//! Every connection starts with the cluster-key handshake of [`auth`] (context `b"pages"`):
//!
//! ```text
//! client → server  "SFAUTH1\0" | context_len u8 | context | client_nonce[32]
//! server → client  server_nonce[32] | server_proof[32]
//! client → server  client_proof[32]
//! server → client  0x01
//! ```
//!
//! then carries the frames of [`wire`] (little-endian):
//!
//! ```text
//! REQUEST  client → server  0x01 | family u64 | count u16 | count × page u64   (1..=256 pages)
//! PAGE     server → client  0x02 | family u64 | page u64 | 4096 bytes
//! ERROR    server → client  0x03 | family u64 | page u64 | code u8 | len u16 | UTF-8 (≤ 1 KiB)
//! ```
//!
//! Every requested page gets exactly one PAGE or ERROR reply, in request order per connection.
//!
//! # Threads
//!
//! - [`MemoryServer`]: one acceptor thread, plus one thread per connection (connections are
//!   few: one per clone host and family). A connection thread reads all the requests that have
//!   arrived, reads their pages from the [`PageStore`], and writes all the replies with one
//!   write. Shutdown (explicit or on drop) wakes and joins them, waiting a bounded time.
//! - [`PageClient`]: [`PageClient::request`] writes from the caller's thread (any thread); one
//!   receiver thread per client reads replies and hands each read's worth of pages to the
//!   [`PageSink`] in one [`PageSink::deliver_batch`] call.
//!
//! # What the authentication protects, and what not
//!
//! A peer without the cluster key gets nothing and changes nothing: the server reads no frame
//! before the client has proved it holds the key (mutual HMAC-SHA256 challenge-response with
//! fresh nonces from both sides, so recorded handshakes cannot be replayed), and a client sends
//! no request to a server that has not proved it holds the key. A proof for one protocol
//! (`"pages"`) is useless for another (`"control"`).
//!
//! There is **no confidentiality and no per-frame integrity**: frames are neither encrypted nor
//! MACed, so anyone who can watch the network between two hosts sees the guest memory that
//! crosses it, and an attacker able to inject into an established TCP connection could alter
//! pages. Run the page protocol on a trusted cluster network. ([`auth::session_key`] gives
//! callers a per-connection key to MAC frames with; the page protocol does not use it yet.)
//!
//! # Failures
//!
//! Malformed or forged input never panics: the server closes that one connection (logging why)
//! and keeps serving the others; the client reports the failure once through
//! [`PageSink::failed`].

pub mod auth;
pub mod client;
pub mod keyring;
pub mod mcast;
pub mod netdev;
pub mod sealed;
pub mod server;
mod sync;
pub mod wire;
pub mod xdp;

pub use auth::{AuthError, ClusterKey};
pub use client::{ClientStats, ConnectError, PageClient, PageSink, RequestError};
pub use server::{BindError, MemoryServer, PageStore, ServerConfig, ServerStats};
pub use wire::{MAX_PAGES_PER_REQUEST, PAGE_SIZE};
