//! End-to-end tests of the memory server and the page client over loopback TCP.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    BrokenStore, MemfdStore, RecordingSink, SlowStore, TIMEOUT, VecStore, pattern, wait_until,
};
use snowflock_dataplane::auth::{self, AuthError, Hello, KeySource, Step};
use snowflock_dataplane::keyring::KeyRing;
use snowflock_dataplane::sealed::{self, End, Opener, Sealer};
use snowflock_dataplane::wire::{self, ErrorCode, Frame, WireError};
use snowflock_dataplane::{
    ClusterKey, ConnectError, MemoryServer, PAGE_SIZE, PageClient, RequestError, ServerConfig,
};

fn key(byte: u8) -> ClusterKey {
    ClusterKey::from_bytes([byte; 32])
}

fn server(key: ClusterKey) -> MemoryServer {
    server_with(key, ServerConfig::default())
}

fn server_with(key: ClusterKey, config: ServerConfig) -> MemoryServer {
    MemoryServer::bind_with_config("127.0.0.1:0".parse().unwrap(), key, config).unwrap()
}

fn client(
    server: &MemoryServer,
    key: &ClusterKey,
    family: u64,
) -> (PageClient, Arc<RecordingSink>) {
    let sink = Arc::new(RecordingSink::default());
    let client = PageClient::connect(server.local_addr(), key, family, sink.clone(), TIMEOUT)
        .expect("connect");
    (client, sink)
}

fn raw_connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// A raw connection that has passed the handshake, with its record keys.
struct Authenticated {
    stream: TcpStream,
    sealer: Sealer,
    opener: Opener,
    /// Bytes read and not yet opened.
    raw: Vec<u8>,
    /// Frame bytes opened and not yet read.
    frames: Vec<u8>,
}

fn raw_authenticated(addr: SocketAddr, key: &ClusterKey) -> Authenticated {
    let mut stream = raw_connect(addr);
    let session = auth::client_handshake(&mut stream, key, b"pages").unwrap();
    let (sealer, opener) = sealed::record_keys(&session, End::Client);
    Authenticated {
        stream,
        sealer,
        opener,
        raw: Vec::new(),
        frames: Vec::new(),
    }
}

impl Authenticated {
    /// Sends `plaintext` as one sealed record, whatever it holds.
    fn send_record(&mut self, plaintext: &[u8]) {
        let mut record = Vec::new();
        self.sealer.seal(plaintext, &mut record);
        self.stream.write_all(&record).unwrap();
    }

    /// Opens the records read so far.
    fn open(&mut self) {
        while let Some((range, used)) = self.opener.open_in_place(&mut self.raw).unwrap() {
            self.frames.extend_from_slice(&self.raw[range]);
            self.raw.drain(..used);
        }
    }

    /// Reads one frame; returns an owned copy of its bytes.
    fn read_frame(&mut self) -> Vec<u8> {
        loop {
            match wire::decode(&self.frames) {
                Ok((_, used)) => return self.frames.drain(..used).collect(),
                Err(WireError::Incomplete { .. }) => {}
                Err(error) => panic!("server sent a malformed frame: {error}"),
            }
            let mut chunk = [0u8; 4096];
            let read = self.stream.read(&mut chunk).unwrap();
            assert!(read > 0, "server closed the connection");
            self.raw.extend_from_slice(&chunk[..read]);
            self.open();
        }
    }

    /// Reads until the server closes; returns the frame bytes it sent.
    fn read_until_closed(&mut self) -> Vec<u8> {
        let rest = read_until_closed(&mut self.stream);
        self.raw.extend_from_slice(&rest);
        self.open();
        assert!(self.raw.is_empty(), "a record cut short");
        std::mem::take(&mut self.frames)
    }
}

/// Reads until the server closes; returns everything it sent.
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        // The server closed with our bytes unread: a reset is a close too.
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(error) => panic!("server did not close the connection: {error}"),
    }
    rest
}

/// A good client can still fetch pages: the server survived whatever came before.
fn assert_still_serving(server: &MemoryServer, key: &ClusterKey, family: u64) {
    let (client, sink) = client(server, key, family);
    client.request(&[0, 1]).unwrap();
    sink.wait_for_pages(2);
    assert_eq!(sink.page(1).unwrap(), pattern(family, 1));
}

#[test]
fn fetches_pages_from_a_memfd_image() {
    let key = ClusterKey::generate();
    let server = server(key.clone());
    server.register(1, Arc::new(MemfdStore::new(1, 64)));
    let (client, sink) = client(&server, &key, 1);
    for page in [0, 63, 17, 5] {
        client.request(&[page]).unwrap();
        assert_eq!(sink.wait_take(page), pattern(1, page));
    }
    let all: Vec<u64> = (0..64).collect();
    client.request(&all).unwrap();
    sink.wait_for_pages(64);
    for page in all {
        assert_eq!(sink.page(page).unwrap(), pattern(1, page), "page {page}");
    }
    assert!(sink.failures().is_empty());
    let stats = client.stats();
    assert_eq!(stats.pages_received, 68);
    assert_eq!(stats.requests_sent, 5);
    assert_eq!(stats.pages_requested, 68);
    assert_eq!(server.stats().pages_served, 68);
}

#[test]
fn many_pages_in_one_request_call() {
    let key = key(1);
    let server = server(key.clone());
    server.register(2, Arc::new(VecStore::new(2, 4096)));
    let (client, sink) = client(&server, &key, 2);
    // Not a multiple of the per-frame limit, and out of order.
    let pages: Vec<u64> = (0..1000).map(|i| (i * 7919) % 4096).collect();
    client.request(&pages).unwrap();
    sink.wait_for_pages(1000);
    for &page in &pages {
        assert_eq!(sink.page(page).unwrap(), pattern(2, page));
    }
    let stats = client.stats();
    assert_eq!(stats.requests_sent, 4);
    assert_eq!(stats.pages_received, 1000);
    // Every byte is a page frame or a record's header and tag.
    let overhead = stats.bytes_received - 1000 * wire::PAGE_FRAME_LEN as u64;
    let per_record = (sealed::RECORD_HEADER_LEN + sealed::RECORD_TAG_LEN) as u64;
    assert_eq!(overhead % per_record, 0, "{stats:?}");
    assert!(overhead / per_record <= 100, "{stats:?}");
    // Pages are delivered in batches, not one call each.
    assert!(
        sink.batches() < 1000,
        "{} batches for 1000 pages",
        sink.batches()
    );
    wait_until("server stats", || server.stats().pages_served == 1000);
    assert_eq!(server.stats().bytes_served, stats.bytes_received);
}

#[test]
fn serves_two_families_at_once() {
    let key = key(2);
    let server = server(key.clone());
    server.register(10, Arc::new(VecStore::new(10, 32)));
    server.register(11, Arc::new(MemfdStore::new(11, 16)));
    let (client10, sink10) = client(&server, &key, 10);
    let (client11, sink11) = client(&server, &key, 11);
    let pages: Vec<u64> = (0..16).collect();
    client10.request(&pages).unwrap();
    client11.request(&pages).unwrap();
    sink10.wait_for_pages(16);
    sink11.wait_for_pages(16);
    for page in pages {
        assert_eq!(sink10.page(page).unwrap(), pattern(10, page));
        assert_eq!(sink11.page(page).unwrap(), pattern(11, page));
        assert_ne!(pattern(10, page), pattern(11, page));
    }
}

#[test]
fn concurrent_clients_and_concurrent_requests_on_one_client() {
    let key = key(3);
    let server = Arc::new(server(key.clone()));
    server.register(3, Arc::new(VecStore::new(3, 512)));
    let workers: Vec<_> = (0..6u64)
        .map(|worker| {
            let server = Arc::clone(&server);
            let key = key.clone();
            thread::spawn(move || {
                let (client, sink) = client(&server, &key, 3);
                for round in 0..20u64 {
                    let pages: Vec<u64> = (0..10)
                        .map(|i| (worker * 83 + round * 10 + i) % 512)
                        .collect();
                    client.request(&pages).unwrap();
                }
                let expected: std::collections::HashSet<u64> = (0..20u64)
                    .flat_map(|round| (0..10).map(move |i| (worker * 83 + round * 10 + i) % 512))
                    .collect();
                sink.wait_for_pages(expected.len());
                for page in expected {
                    assert_eq!(sink.page(page).unwrap(), pattern(3, page));
                }
            })
        })
        .collect();
    // One client shared by several threads.
    let (shared_client, shared_sink) = client(&server, &key, 3);
    thread::scope(|scope| {
        for t in 0..4u64 {
            let client = &shared_client;
            scope.spawn(move || {
                for page in (t * 128)..(t * 128 + 128) {
                    client.request(&[page]).unwrap();
                }
            });
        }
    });
    shared_sink.wait_for_pages(512);
    for page in 0..512 {
        assert_eq!(shared_sink.page(page).unwrap(), pattern(3, page));
    }
    assert_eq!(shared_sink.deliveries(), 512, "each page exactly once");
    for worker in workers {
        worker.join().unwrap();
    }
    assert_eq!(server.stats().connections, 7);
}

#[test]
fn client_with_the_wrong_key_gets_nothing() {
    let server = server(key(4));
    server.register(4, Arc::new(VecStore::new(4, 8)));
    let sink = Arc::new(RecordingSink::default());
    let error = PageClient::connect(server.local_addr(), &key(5), 4, sink.clone(), TIMEOUT)
        .expect_err("a client with another key must be refused");
    // The server does not hold the key the hello names: it closes without a challenge.
    assert!(
        matches!(
            error,
            ConnectError::Handshake {
                source: AuthError::Rejected {
                    step: Step::ReadChallenge
                },
                ..
            }
        ),
        "{error:?}"
    );
    wait_until("the auth failure to be counted", || {
        server.stats().auth_failures == 1
    });
    let stats = server.stats();
    assert_eq!(stats.pages_served, 0);
    assert_eq!(stats.bytes_served, 0);
    assert_eq!(sink.deliveries(), 0);
    assert!(sink.failures().is_empty());
}

#[test]
fn forged_proof_then_requests_get_no_page_data() {
    let key = key(6);
    let server = server(key.clone());
    server.register(6, Arc::new(VecStore::new(6, 8)));
    let mut stream = raw_connect(server.local_addr());
    stream
        .write_all(
            &Hello::new(b"pages", key.id(), auth::nonce())
                .unwrap()
                .encode(),
        )
        .unwrap();
    let mut challenge = [0u8; auth::CHALLENGE_LEN];
    stream.read_exact(&mut challenge).unwrap();
    // A forged proof, followed at once by a request as if we had been accepted.
    let mut attack = vec![0x5a; auth::PROOF_LEN];
    wire::encode_request(6, &[0, 1, 2], &mut attack).unwrap();
    stream.write_all(&attack).unwrap();
    let rest = read_until_closed(&mut stream);
    assert!(rest.is_empty(), "server sent {} bytes", rest.len());
    wait_until("the auth failure to be counted", || {
        server.stats().auth_failures == 1
    });
    let stats = server.stats();
    assert_eq!(stats.pages_served, 0);
    assert_eq!(stats.bytes_served, 0);
    assert_still_serving(&server, &key, 6);
}

#[test]
fn a_server_in_a_key_rotation_serves_clients_of_either_key_and_no_other() {
    let ring = KeyRing::new(key(7));
    let server = MemoryServer::bind("127.0.0.1:0".parse().unwrap(), &ring).unwrap();
    server.register(7, Arc::new(VecStore::new(7, 8)));
    ring.rotate(key(8), Duration::from_secs(60)).unwrap();
    // The ring still proves with the old key for the first half of the window.
    assert_eq!(ring.sending(), key(7));
    assert_still_serving(&server, &key(7), 7);
    assert_still_serving(&server, &key(8), 7);
    let sink = Arc::new(RecordingSink::default());
    let error = PageClient::connect(server.local_addr(), &key(9), 7, sink, TIMEOUT).unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::Handshake {
                source: AuthError::Rejected { .. },
                ..
            }
        ),
        "{error:?}"
    );
    wait_until("the auth failure to be counted", || {
        server.stats().auth_failures == 1
    });
}

#[test]
fn garbage_truncated_and_oversized_input_close_only_that_connection() {
    let key = key(9);
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = server_with(key.clone(), config);
    server.register(9, Arc::new(VecStore::new(9, 8)));
    let addr = server.local_addr();
    // A good client stays connected throughout.
    let (bystander, bystander_sink) = client(&server, &key, 9);

    // Garbage instead of a hello.
    let mut garbage = raw_connect(addr);
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(read_until_closed(&mut garbage).is_empty());

    // A hello cut short, then the write side closed.
    let hello = Hello::new(b"pages", key.id(), auth::nonce())
        .unwrap()
        .encode();
    let mut truncated = raw_connect(addr);
    truncated.write_all(&hello[..hello.len() / 2]).unwrap();
    truncated.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_closed(&mut truncated).is_empty());

    // A hello cut short, and then silence: the handshake timeout closes it.
    let started = Instant::now();
    let mut silent = raw_connect(addr);
    silent.write_all(&hello[..10]).unwrap();
    assert!(read_until_closed(&mut silent).is_empty());
    assert!(started.elapsed() < TIMEOUT);

    // A hello with a huge context length.
    let mut oversized_hello = raw_connect(addr);
    let mut bad = hello.clone();
    bad[8] = 255;
    oversized_hello.write_all(&bad).unwrap();
    assert!(read_until_closed(&mut oversized_hello).is_empty());

    wait_until("four auth failures", || server.stats().auth_failures == 4);

    // After authentication: a request with an oversized count, sealed.
    let mut oversized = raw_authenticated(addr, &key);
    let mut frame = vec![wire::TYPE_REQUEST];
    frame.extend_from_slice(&9u64.to_le_bytes());
    frame.extend_from_slice(&1000u16.to_le_bytes());
    oversized.send_record(&frame);
    assert!(oversized.read_until_closed().is_empty());

    // After authentication: a valid request, then an unknown frame type in the next record.
    // The valid request is still answered before the connection closes.
    let mut mixed = raw_authenticated(addr, &key);
    let mut bytes = Vec::new();
    wire::encode_request(9, &[3], &mut bytes).unwrap();
    mixed.send_record(&bytes);
    mixed.send_record(&[0xee; 32]);
    let reply = mixed.read_until_closed();
    let (Frame::Page(page), used) = wire::decode(&reply).unwrap() else {
        panic!("expected a page")
    };
    assert_eq!((page.page, used), (3, reply.len()));
    assert_eq!(page.data.as_slice(), pattern(9, 3));

    // After authentication: a client sending a PAGE frame, then closing mid-record.
    let mut wrong_direction = raw_authenticated(addr, &key);
    let mut page_frame = Vec::new();
    wire::encode_page(9, 0, &[0; PAGE_SIZE], &mut page_frame);
    wrong_direction.send_record(&page_frame);
    assert!(wrong_direction.read_until_closed().is_empty());
    let mut cut = raw_authenticated(addr, &key);
    let mut record = Vec::new();
    cut.sealer.seal(&bytes, &mut record);
    cut.stream.write_all(&record[..10]).unwrap();
    cut.stream.shutdown(Shutdown::Write).unwrap();
    assert!(cut.read_until_closed().is_empty());

    // After authentication: a request not sealed (as before records), and a sealed one
    // altered on the way. Neither is answered.
    let mut unsealed = raw_authenticated(addr, &key);
    unsealed.stream.write_all(&bytes).unwrap();
    assert!(unsealed.read_until_closed().is_empty());
    let mut altered = raw_authenticated(addr, &key);
    let mut record = Vec::new();
    altered.sealer.seal(&bytes, &mut record);
    record[6] ^= 0x01;
    altered.stream.write_all(&record).unwrap();
    assert!(altered.read_until_closed().is_empty());

    wait_until("six protocol errors", || {
        server.stats().protocol_errors == 6
    });
    assert_eq!(server.stats().auth_failures, 4);

    // The server kept serving the connection that was already open, and new ones.
    bystander.request(&[7]).unwrap();
    bystander_sink.wait_for_pages(1);
    assert_eq!(bystander_sink.page(7).unwrap(), pattern(9, 7));
    assert!(bystander_sink.failures().is_empty());
    assert_still_serving(&server, &key, 9);
}

#[test]
fn client_reports_a_server_that_goes_away_mid_stream() {
    let key = key(10);
    let server = server(key.clone());
    server.register(
        10,
        Arc::new(SlowStore {
            inner: VecStore::new(10, 4096),
            delay: Duration::from_micros(500),
        }),
    );
    let (client, sink) = client(&server, &key, 10);
    let pages: Vec<u64> = (0..4096).collect();
    client.request(&pages).unwrap();
    sink.wait_for_pages(1);
    let dropped = Instant::now();
    drop(server);
    let reason = sink.wait_for_failure();
    println!(
        "failure reported {:?} after the server was dropped: {reason}",
        dropped.elapsed()
    );
    assert!(
        reason.contains("closed the connection") || reason.contains("reading from memory server"),
        "{reason}"
    );
    assert!(sink.deliveries() < 4096, "the stream was not cut");
    // Exactly once, and later requests fail with the same reason.
    thread::sleep(Duration::from_millis(50));
    assert_eq!(sink.failures().len(), 1);
    match client.request(&[1]) {
        Err(RequestError::Failed { reason: later, .. }) => assert_eq!(later, reason),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_family_out_of_range_and_read_failures_are_reported() {
    let key = key(11);
    let server = server(key.clone());
    server.register(1, Arc::new(VecStore::new(1, 4)));
    server.register(2, Arc::new(BrokenStore));

    let (unknown, unknown_sink) = client(&server, &key, 99);
    unknown.request(&[5]).unwrap();
    let reason = unknown_sink.wait_for_failure();
    assert!(reason.contains("page 0x5"), "{reason}");
    assert!(reason.contains("unknown family"), "{reason}");

    let (beyond, beyond_sink) = client(&server, &key, 1);
    beyond.request(&[0, 1, 4]).unwrap();
    let reason = beyond_sink.wait_for_failure();
    assert!(reason.contains("page out of range"), "{reason}");
    // The pages before the bad one were delivered first.
    assert_eq!(beyond_sink.page(1).unwrap(), pattern(1, 1));

    let (broken, broken_sink) = client(&server, &key, 2);
    broken.request(&[3]).unwrap();
    let reason = broken_sink.wait_for_failure();
    assert!(reason.contains("read failed: disk on fire"), "{reason}");

    wait_until("three error frames", || server.stats().errors == 3);
    assert_eq!(server.stats().protocol_errors, 0);
}

#[test]
fn error_replies_keep_the_connection_open() {
    let key = key(12);
    let server = server(key.clone());
    server.register(12, Arc::new(VecStore::new(12, 4)));
    let mut stream = raw_authenticated(server.local_addr(), &key);
    let mut bytes = Vec::new();
    wire::encode_request(77, &[1, 2], &mut bytes).unwrap();
    wire::encode_request(12, &[9, 2], &mut bytes).unwrap();
    stream.send_record(&bytes);

    let expected = [
        (77, 1, Some(ErrorCode::UnknownFamily)),
        (77, 2, Some(ErrorCode::UnknownFamily)),
        (12, 9, Some(ErrorCode::OutOfRange)),
        (12, 2, None),
    ];
    for (family, page, code) in expected {
        let frame = stream.read_frame();
        match (wire::decode(&frame).unwrap().0, code) {
            (Frame::Error(reply), Some(code)) => {
                assert_eq!((reply.family, reply.page, reply.code), (family, page, code));
            }
            (Frame::Page(reply), None) => {
                assert_eq!((reply.family, reply.page), (family, page));
                assert_eq!(reply.data.as_slice(), pattern(12, 2));
            }
            (frame, _) => panic!("unexpected {frame:?}"),
        }
    }

    // Withdrawn families answer UnknownFamily, on the same connection.
    assert!(server.unregister(12));
    assert!(!server.unregister(12));
    bytes.clear();
    wire::encode_request(12, &[0], &mut bytes).unwrap();
    stream.send_record(&bytes);
    let frame = stream.read_frame();
    assert!(matches!(
        wire::decode(&frame).unwrap().0,
        Frame::Error(wire::ErrorReply {
            code: ErrorCode::UnknownFamily,
            ..
        })
    ));
}

#[test]
fn shutdown_closes_everything_promptly() {
    let key = key(13);
    let server = server(key.clone());
    server.register(13, Arc::new(VecStore::new(13, 4)));
    let (_idle, idle_sink) = client(&server, &key, 13);
    let mut unauthenticated = raw_connect(server.local_addr());
    wait_until("both connections accepted", || {
        server.stats().active_connections == 2
    });
    let started = Instant::now();
    server.shutdown();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert_eq!(server.stats().active_connections, 0);
    assert!(read_until_closed(&mut unauthenticated).is_empty());
    idle_sink.wait_for_failure();
    // Nothing listens any more.
    assert!(TcpStream::connect_timeout(&server.local_addr(), TIMEOUT).is_err());
    // A second shutdown (and the drop) is harmless.
    server.shutdown();
}

#[test]
fn connection_limit_refuses_extra_connections() {
    let key = key(14);
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let server = server_with(key.clone(), config);
    server.register(14, Arc::new(VecStore::new(14, 4)));
    let (first, first_sink) = client(&server, &key, 14);
    let sink = Arc::new(RecordingSink::default());
    let error = PageClient::connect(server.local_addr(), &key, 14, sink, TIMEOUT).unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::Handshake {
                source: AuthError::Rejected { .. },
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(server.stats().refused, 1);
    first.request(&[2]).unwrap();
    first_sink.wait_for_pages(1);
    drop(first);
    wait_until("the first connection to end", || {
        server.stats().active_connections == 0
    });
    assert_still_serving(&server, &key, 14);
}

#[test]
fn dropping_a_client_is_quiet_and_bounded() {
    let key = key(15);
    let server = server(key.clone());
    server.register(15, Arc::new(VecStore::new(15, 4)));
    let (client, sink) = client(&server, &key, 15);
    client.request(&[0]).unwrap();
    sink.wait_for_pages(1);
    let started = Instant::now();
    drop(client);
    assert!(started.elapsed() < Duration::from_secs(1));
    wait_until("the server to see the close", || {
        server.stats().active_connections == 0
    });
    assert!(sink.failures().is_empty());
    assert_eq!(server.stats().protocol_errors, 0);
}

/// Loopback round trip of one single-page request, as the fault handler would see it.
/// Printed, not asserted: run with `--nocapture` (and `--release` for meaningful numbers).
#[test]
fn round_trip_latency() {
    const ROUNDS: usize = 2000;
    let key = key(16);
    let server = server(key.clone());
    server.register(16, Arc::new(MemfdStore::new(16, 1024)));
    let (client, sink) = client(&server, &key, 16);
    for page in 0..100 {
        client.request(&[page]).unwrap();
        sink.wait_take(page);
    }
    let mut samples = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS as u64 {
        let page = round * 37 % 1024;
        let started = Instant::now();
        client.request(&[page]).unwrap();
        let data = sink.wait_take(page);
        samples.push(started.elapsed());
        assert_eq!(data.len(), PAGE_SIZE);
    }
    samples.sort();
    let percentile = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!(
        "page round trip over loopback ({ROUNDS} requests, {} build): p50 {:?}, p99 {:?}, max {:?}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        percentile(50),
        percentile(99),
        samples[samples.len() - 1]
    );

    // Bulk: 64 MiB in 256-page requests.
    let started = Instant::now();
    let pages: Vec<u64> = (0..1024).collect();
    for _ in 0..16 {
        client.request(&pages).unwrap();
        sink.wait_for_pages(1024);
        for &page in &pages {
            assert!(sink.take(page).is_some());
        }
    }
    let elapsed = started.elapsed();
    println!(
        "bulk fetch over loopback: 64 MiB in {elapsed:?} ({:.0} MiB/s)",
        64.0 / elapsed.as_secs_f64()
    );
}

/// A connection to `server` from `source` (another loopback address than the clients').
fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect_timeout(&server.into(), TIMEOUT).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

#[test]
fn half_open_connections_are_bounded_per_peer_and_in_time_and_never_stop_clients() {
    let key = key(15);
    let handshake_timeout = Duration::from_millis(400);
    let config = ServerConfig {
        handshake_timeout,
        max_connections: 4,
        max_unauthenticated: 16,
        max_unauthenticated_per_peer: 4,
        ..ServerConfig::default()
    };
    let server = server_with(key.clone(), config);
    server.register(15, Arc::new(VecStore::new(15, 4)));
    let addr = server.local_addr();

    // A flood from one address, more connections than any limit: one sends a valid hello
    // and then a proof a byte every 100 ms (each read ends well within a per-read timeout,
    // and the whole exchange would take seconds), the rest nothing.
    let started = Instant::now();
    let mut dribbler = connect_from("127.0.0.2", addr);
    let flood: Vec<TcpStream> = (0..20).map(|_| connect_from("127.0.0.2", addr)).collect();
    wait_until("all but the peer's 4 handshakes to be refused", || {
        server.stats().refused_unauthenticated >= 17
    });
    // Meanwhile a client from another address authenticates and is served.
    assert_still_serving(&server, &key, 15);

    // The dribbler is closed at the handshake's deadline, however often it sends.
    let mut bytes = Hello::new(b"pages", key.id(), auth::nonce())
        .unwrap()
        .encode();
    bytes.extend([0x5a; auth::PROOF_LEN]);
    let exchange = Duration::from_millis(100) * bytes.len() as u32;
    let mut sent = 0;
    let closed_after = loop {
        let byte = bytes.get(sent).copied().unwrap_or(0x5a);
        if dribbler.write(&[byte]).is_err() || started.elapsed() > exchange * 2 {
            break started.elapsed();
        }
        sent += 1;
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        closed_after < exchange / 2,
        "a byte at a time kept a handshake open for {closed_after:?} ({sent} bytes; the \
         whole exchange takes {exchange:?})"
    );
    // Every other half-open connection is closed too, and nothing leaks.
    for mut stream in flood {
        read_until_closed(&mut stream);
    }
    wait_until("the half-open connections to be gone", || {
        server.stats().active_connections == 0
    });
    let stats = server.stats();
    assert_eq!(stats.refused, 0, "{stats:?}");
    assert!(stats.auth_failures >= 4, "timed-out handshakes: {stats:?}");
    assert_still_serving(&server, &key, 15);
}
