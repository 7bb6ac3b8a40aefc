//! End-to-end tests of mcdist: a server and receivers on real UDP sockets in private network
//! namespaces, joined by a bridge like the project's test cluster.
//!
//! Each test builds its own namespaces (`sm<pid>x<n>-sw` with bridge `br0` and its ports
//! `sm<pid>x<n>-p<i>`, `sm<pid>x<n>-h<i>` with `eth0` at `10.78.0.<i>/24` and a route
//! `224.0.0.0/4 dev eth0`), removes them on drop
//! (also when the test fails), and runs the server (host 1) and the receivers (hosts 2..) in
//! this process: each is created on a thread that entered its host's namespace, so its socket
//! lives there. Traffic never leaves those namespaces. The tests run one at a time (they count
//! this process's threads and fds, and share nothing else).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use snowflock_dataplane::mcast::wire::{
    self, Datagram, Fragment, FragmentSealer, Fragmentation, Header, McastKey, RejectCode,
};
use snowflock_dataplane::mcast::{
    FamilyJoin, McastReceiver, McastServer, McastServerConfig, McastServerStats, ReceiverConfig,
    ReceiverError, XdpPathError, XdpReceiveConfig,
};
use snowflock_dataplane::xdp::XskConfig;
use snowflock_dataplane::{ClusterKey, PAGE_SIZE, PageSink, PageStore};

/// The mcdist port inside the test namespaces.
const PORT: u16 = 7073;
/// Bound of every wait for pages on a clean network.
const WAIT: Duration = Duration::from_secs(30);
/// Bound of one `ip`/`tc` command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Serializes the tests of this file.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes [`SERIAL`]. It guards nothing but the order of the tests, so a test that panicked
/// holding it leaves nothing half-done: the next one may go on.
fn serial() -> MutexGuard<'static, ()> {
    snowflock_sync::lock(&SERIAL)
}

fn key() -> ClusterKey {
    ClusterKey::from_bytes([0x5a; 32])
}

fn host_addr(host: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, 0, host as u8)
}

/// The program `name` from PATH, or from the sbin directories a PATH often lacks.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `name args...`, killed after [`COMMAND_TIMEOUT`].
fn run(name: &str, args: &[&str]) -> Result<(), String> {
    let line = format!("{name} {}", args.join(" "));
    let mut child = Command::new(program(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("`{line}` did not start: {e}"))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("`{line}` failed ({status}): {}", stderr.trim()))
                };
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{line}` killed after {COMMAND_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("`{line}`: waiting failed: {e}")),
        }
    }
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// Hosts 1..=n on one bridge, each in a namespace of its own; removed on drop.
struct Net {
    prefix: String,
    namespaces: Vec<String>,
}

impl Net {
    fn new(hosts: usize) -> Net {
        let prefix = format!(
            "sm{:x}x{:x}",
            std::process::id(),
            NEXT_NET.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = Net {
            prefix,
            namespaces: Vec::new(),
        };
        let switch = format!("{}-sw", net.prefix);
        net.add_namespace(&switch);
        net.ip(&[
            "-n",
            &switch,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ]);
        net.ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for host in 1..=hosts {
            let ns = net.host(host);
            let port = net.port(host);
            net.add_namespace(&ns);
            net.ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &switch,
            ]);
            net.ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
            let address = format!("{}/24", host_addr(host));
            net.ip(&["-n", &ns, "link", "set", "lo", "up"]);
            net.ip(&["-n", &ns, "addr", "add", &address, "dev", "eth0"]);
            net.ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            net.ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
        }
        net
    }

    fn add_namespace(&mut self, name: &str) {
        self.ip(&["netns", "add", name]);
        self.namespaces.push(name.to_owned());
    }

    fn ip(&self, args: &[&str]) {
        if let Err(error) = run("ip", args) {
            panic!("building the test network: {error}");
        }
    }

    fn host(&self, host: usize) -> String {
        format!("{}-h{host}", self.prefix)
    }

    /// The bridge port toward `host` (in the switch namespace).
    fn port(&self, host: usize) -> String {
        format!("{}-p{host}", self.prefix)
    }

    /// Makes the bridge port toward `host` lose 20% of the IPv4 packets and delay 25% behind
    /// the others (reordering them). The kernel here has no netem, so: an HTB root whose
    /// classic-BPF classifier draws a random number per packet and picks class 1:3 (a
    /// zero-length FIFO: dropped), 1:2 (a 200 Mbit/s class with a one-packet burst and a
    /// queue long enough to lose nothing: queued behind the others) or 1:1 (unlimited).
    fn impair(&self, host: usize) {
        let switch = format!("{}-sw", self.prefix);
        let port = self.port(host);
        let tc = |args: &[&str]| {
            let mut full = vec!["-n", &switch];
            full.extend_from_slice(args);
            if let Err(error) = run("tc", &full) {
                panic!("impairing the test network: {error}");
            }
        };
        let dev = port.as_str();
        tc(&[
            "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
        ]);
        for class in ["1:1", "1:3"] {
            tc(&[
                "class", "add", "dev", dev, "parent", "1:", "classid", class, "htb", "rate",
                "10gbit", "burst", "256k", "cburst", "256k",
            ]);
        }
        tc(&[
            "class", "add", "dev", dev, "parent", "1:", "classid", "1:2", "htb", "rate", "200mbit",
            "burst", "1600", "cburst", "1600",
        ]);
        tc(&[
            "qdisc", "add", "dev", dev, "parent", "1:3", "handle", "30:", "pfifo", "limit", "0",
        ]);
        tc(&[
            "qdisc", "add", "dev", dev, "parent", "1:2", "handle", "20:", "pfifo", "limit", "2000",
        ]);
        // A = random u32; A < 0.20 * 2^32 → class 1:3; A < 0.45 * 2^32 → 1:2; else 1:1.
        let program = "6,32 0 0 4294963256,53 1 0 858993459,6 0 0 65539,\
                       53 1 0 1932735283,6 0 0 65538,6 0 0 65537";
        tc(&[
            "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "bpf",
            "bytecode", program,
        ]);
    }

    /// Runs `work` on a thread inside `host`'s namespace (sockets it creates live there).
    fn in_host<T: Send>(&self, host: usize, work: impl FnOnce() -> T + Send) -> T {
        let ns = self.host(host);
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    let handle = File::open(format!("/run/netns/{ns}"))
                        .unwrap_or_else(|e| panic!("opening namespace {ns}: {e}"));
                    // SAFETY: `handle` is an open namespace file for the whole call; setns only
                    // moves this thread, which ends after `work`.
                    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {ns}: {}", io::Error::last_os_error());
                    work()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(error) = run("ip", &["netns", "del", ns]) {
                eprintln!("cleaning up the test network: {error}");
            }
        }
    }
}

/// Deterministic contents of `page` of `family`.
fn pattern(family: u64, page: u64) -> Vec<u8> {
    let mut state = (family.rotate_left(32) ^ page).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(PAGE_SIZE);
    for _ in 0..PAGE_SIZE / 8 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out
}

/// A frozen image whose pages are [`pattern`]s.
struct PatternStore {
    family: u64,
    pages: u64,
}

impl PageStore for PatternStore {
    fn page_count(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        buf.copy_from_slice(&pattern(self.family, page));
        Ok(())
    }
}

#[derive(Default)]
struct Received {
    pages: HashMap<u64, Vec<u8>>,
    /// Pages delivered a second time (must stay 0).
    repeated: u64,
    failures: Vec<String>,
}

/// Records what a receiver delivers for one family.
#[derive(Default)]
struct Pages {
    received: Mutex<Received>,
    changed: Condvar,
}

impl PageSink for Pages {
    fn deliver_batch(&self, pages: &[(u64, &[u8])]) {
        let mut received = self.received.lock().unwrap();
        for (page, data) in pages {
            if received.pages.insert(*page, data.to_vec()).is_some() {
                received.repeated += 1;
            }
        }
        self.changed.notify_all();
    }

    fn failed(&self, reason: String) {
        self.received.lock().unwrap().failures.push(reason);
        self.changed.notify_all();
    }
}

impl Pages {
    fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&Received) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut received = self.received.lock().unwrap();
        while !done(&received) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?} waiting for {what}: {} pages, failures {:?}",
                received.pages.len(),
                received.failures
            );
            received = self.changed.wait_timeout(received, left).unwrap().0;
        }
    }

    fn wait_pages(&self, count: usize, timeout: Duration) {
        self.wait(&format!("{count} pages"), timeout, |r| {
            r.pages.len() >= count
        });
    }

    fn wait_failure(&self) -> String {
        self.wait("a failure", WAIT, |r| !r.failures.is_empty());
        self.received.lock().unwrap().failures[0].clone()
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().pages.len()
    }

    /// Asserts that pages `0..pages` of `family` arrived intact, each once.
    fn assert_complete(&self, family: u64, pages: u64) {
        let received = self.received.lock().unwrap();
        assert_eq!(received.repeated, 0, "a page was delivered twice");
        assert!(received.failures.is_empty(), "{:?}", received.failures);
        for page in 0..pages {
            let data = received
                .pages
                .get(&page)
                .unwrap_or_else(|| panic!("page {page} missing"));
            assert!(
                *data == pattern(family, page),
                "page {page} arrived corrupted"
            );
        }
    }
}

/// Polls `condition` every 5 ms until it holds; panics after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn server_config() -> McastServerConfig {
    McastServerConfig {
        initial_rate: 20_000,
        max_rate: 100_000,
        receiver_idle: Duration::from_secs(3),
        ..McastServerConfig::new(SocketAddrV4::new(host_addr(1), PORT))
    }
}

fn receiver_config(host: usize) -> ReceiverConfig {
    ReceiverConfig {
        local_addr: host_addr(host),
        port: PORT,
        initial_rate: 20_000,
        min_rate: 2_000,
        max_rate: 100_000,
        report_interval: Duration::from_millis(50),
        ..ReceiverConfig::default()
    }
}

fn start_server(net: &Net, config: McastServerConfig) -> McastServer {
    net.in_host(1, || {
        McastServer::bind(config, key()).expect("binding the server")
    })
}

fn start_receiver(net: &Net, host: usize) -> McastReceiver {
    net.in_host(host, || {
        McastReceiver::start(receiver_config(host), key()).expect("starting a receiver")
    })
}

/// A family served by `server`: registers a [`PatternStore`] of `pages` pages.
fn serve(server: &McastServer, family: u64, group: Ipv4Addr, pages: u64) -> FamilyJoin {
    let generation = server.register(family, group, Arc::new(PatternStore { family, pages }));
    FamilyJoin {
        family,
        generation,
        key: key().id(),
        group,
        server: server.local_addr(),
        pages,
        holding: false,
    }
}

fn join(receiver: &McastReceiver, family: FamilyJoin) -> Arc<Pages> {
    let pages = Arc::new(Pages::default());
    receiver
        .join(family, pages.clone())
        .expect("joining the family");
    pages
}

/// Waits until the server's counters say `what`: a send thread counts a batch after sending it,
/// and the request thread may still hold REQUESTs the receivers no longer need, so the
/// receivers can hold every page before the counters are final.
fn wait_counted(server: &McastServer, what: &str, done: impl Fn(&McastServerStats) -> bool) {
    wait_until(what, WAIT, || done(&server.stats()));
}

fn wait_active(server: &McastServer, family: u64, receivers: usize) {
    wait_until(
        &format!("{receivers} active receivers of family {family:#x}"),
        WAIT,
        || {
            server
                .stats()
                .families
                .iter()
                .any(|f| f.family == family && f.active_receivers == receivers)
        },
    );
}

fn family_rate(server: &McastServer, family: u64) -> u32 {
    server
        .stats()
        .families
        .iter()
        .find(|f| f.family == family)
        .map_or(0, |f| f.rate)
}

#[test]
fn siblings_get_by_multicast_the_pages_one_of_them_requested() {
    let _serial = serial();
    let net = Net::new(4);
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x51;
    const PAGES: u64 = 300;
    let family = serve(&server, FAMILY, Ipv4Addr::new(239, 255, 1, 1), PAGES);
    let receivers: Vec<McastReceiver> = (2..=4).map(|host| start_receiver(&net, host)).collect();
    let sinks: Vec<Arc<Pages>> = receivers.iter().map(|r| join(r, family)).collect();
    wait_active(&server, FAMILY, 3);

    // Each page is requested by exactly one receiver.
    for (index, receiver) in receivers.iter().enumerate() {
        let share: Vec<u64> = (0..PAGES).filter(|p| p % 3 == index as u64).collect();
        receiver.request(FAMILY, &share);
    }
    for sink in &sinks {
        sink.wait_pages(PAGES as usize, WAIT);
        sink.assert_complete(FAMILY, PAGES);
    }
    for receiver in &receivers {
        let stats = receiver.family_stats(FAMILY).unwrap();
        assert_eq!(stats.pages_requested, PAGES / 3, "{stats:?}");
        assert_eq!(stats.pages_completed, PAGES, "{stats:?}");
        // Everything it did not ask for came early, by multicast.
        assert_eq!(stats.early_pages, PAGES - PAGES / 3, "{stats:?}");
        assert_eq!(stats.mac_failed + stats.malformed + stats.not_ours, 0);
        assert_eq!(stats.outstanding, 0);
    }
    wait_counted(&server, "every page sent", |stats| {
        stats.pages_sent >= PAGES
    });
    let stats = server.stats();
    assert!(stats.pages_sent >= PAGES, "{stats:?}");
    let re_requests: u64 = receivers.iter().map(|r| r.stats().re_requests).sum();
    assert!(
        stats.pages_sent <= PAGES + re_requests,
        "each page is sent once per (re-)request at most: {stats:?}"
    );
    assert_eq!(
        stats.fragments_sent,
        stats.pages_sent * u64::from(Fragmentation::for_mtu(1500).count)
    );
    assert_eq!(stats.mac_failed + stats.malformed + stats.stale, 0);
}

#[test]
fn pages_another_host_asked_for_first_are_not_taken_for_a_loss() {
    let _serial = serial();
    let net = Net::new(3);
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x57;
    let family = serve(&server, FAMILY, Ipv4Addr::new(239, 255, 1, 7), 2048);
    let first = start_receiver(&net, 2);
    let second = start_receiver(&net, 3);
    let first_sink = join(&first, family);
    let second_sink = join(&second, family);
    wait_active(&server, FAMILY, 2);

    // The first host's pages are queued ahead of the second's own: the second receives
    // them before the pages it asked for first, at the server's initial rate (~20 ms).
    let shared: Vec<u64> = (1000..1400).collect();
    first.request(FAMILY, &shared);
    let own: Vec<u64> = (0..100).collect();
    second.request(FAMILY, &own);
    second.request(FAMILY, &shared);
    first_sink.wait_pages(shared.len(), WAIT);
    second_sink.wait_pages(shared.len() + own.len(), WAIT);
    let stats = second.family_stats(FAMILY).unwrap();
    assert_eq!(stats.lost_overtaken, 0, "{stats:?}");
    assert_eq!(stats.mac_failed + stats.malformed + stats.not_ours, 0);
}

#[test]
fn duplicate_requests_within_the_window_are_suppressed() {
    let _serial = serial();
    let net = Net::new(3);
    let config = McastServerConfig {
        // Long enough that a loaded machine still delivers the copies inside it.
        suppression: Duration::from_millis(500),
        ..server_config()
    };
    let server = start_server(&net, config);
    const FAMILY: u64 = 0x52;
    const PAGES: u64 = 32;
    let family = serve(&server, FAMILY, Ipv4Addr::new(239, 255, 1, 2), PAGES);
    let receivers: Vec<McastReceiver> = (2..=3).map(|host| start_receiver(&net, host)).collect();
    let sinks: Vec<Arc<Pages>> = receivers.iter().map(|r| join(r, family)).collect();
    wait_active(&server, FAMILY, 2);

    // Another requester (a third receiver, from the test's own socket) sends the same
    // REQUEST three times in a row.
    let requester = net.in_host(2, || UdpSocket::bind((host_addr(2), 0)).unwrap());
    let mut request = Vec::new();
    let header = Header {
        flags: 0,
        family: FAMILY,
        generation: family.generation,
        sender: 0xdead,
    };
    let pages: Vec<u64> = (0..PAGES).collect();
    wire::encode_request(&McastKey::new(key()), &mut request, &header, 0, &pages).unwrap();
    for _ in 0..3 {
        requester.send_to(&request, family.server).unwrap();
    }
    for sink in &sinks {
        sink.wait_pages(PAGES as usize, WAIT);
        sink.assert_complete(FAMILY, PAGES);
    }
    wait_counted(&server, "three REQUESTs heard, every page sent", |stats| {
        stats.pages_requested >= 3 * PAGES && stats.pages_sent >= PAGES
    });
    let stats = server.stats();
    assert_eq!(stats.pages_requested, 3 * PAGES, "{stats:?}");
    assert_eq!(stats.duplicates_suppressed, 2 * PAGES, "{stats:?}");
    assert_eq!(stats.pages_sent, PAGES, "{stats:?}");
    assert_eq!(stats.unicast_pages, 0, "three active receivers: multicast");
    for receiver in &receivers {
        let stats = receiver.family_stats(FAMILY).unwrap();
        assert_eq!(stats.pages_requested, 0);
        assert_eq!(stats.early_pages, PAGES);
    }
}

#[test]
fn a_single_active_receiver_is_answered_by_unicast() {
    let _serial = serial();
    let net = Net::new(3);
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x53;
    const PAGES: u64 = 64;
    let group = Ipv4Addr::new(239, 255, 1, 3);
    let family = serve(&server, FAMILY, group, PAGES);
    let staying = start_receiver(&net, 2);
    let sink = join(&staying, family);
    let leaving = start_receiver(&net, 3);
    join(&leaving, family);
    wait_active(&server, FAMILY, 2);
    // Dropping a receiver sends LEAVE: the family is down to one receiver at once.
    drop(leaving);
    wait_active(&server, FAMILY, 1);

    // A finished sibling's host still in the group must not see the end game's traffic.
    let observer = net.in_host(3, || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap();
        socket.join_multicast_v4(&group, &host_addr(3)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        socket
    });
    let pages: Vec<u64> = (0..PAGES).collect();
    staying.request(FAMILY, &pages);
    sink.wait_pages(PAGES as usize, WAIT);
    sink.assert_complete(FAMILY, PAGES);
    let stats = staying.family_stats(FAMILY).unwrap();
    assert!(stats.fragments >= PAGES * 3, "{stats:?}");
    assert_eq!(stats.unicast_fragments, stats.fragments, "{stats:?}");
    // Every page sent went by unicast (a page sent to the group never is counted unicast, so
    // this would not come true).
    wait_counted(&server, "every page sent, by unicast", |s| {
        s.unicast_pages == s.pages_sent && s.unicast_pages >= PAGES
    });
    let mut buf = [0u8; 2048];
    let seen = observer.recv_from(&mut buf);
    assert!(
        seen.is_err(),
        "the end game's pages reached another host: {seen:?}"
    );
    // The observer does receive what is sent to the group.
    net.in_host(1, || {
        let probe = UdpSocket::bind((host_addr(1), 0)).unwrap();
        probe
            .send_to(b"probe", SocketAddrV4::new(group, PORT))
            .unwrap();
    });
    let (len, _) = observer
        .recv_from(&mut buf)
        .expect("the observer is in the group");
    assert_eq!(&buf[..len], b"probe");
}

#[test]
fn a_late_joiner_is_pushed_the_pages_its_siblings_requested() {
    let _serial = serial();
    let net = Net::new(3);
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x54;
    const PAGES: u64 = 100;
    let family = serve(&server, FAMILY, Ipv4Addr::new(239, 255, 1, 4), PAGES);
    let early = start_receiver(&net, 2);
    let early_sink = join(&early, family);
    wait_active(&server, FAMILY, 1);
    early.request(FAMILY, &(0..PAGES).collect::<Vec<_>>());
    early_sink.wait_pages(PAGES as usize, WAIT);

    let late = start_receiver(&net, 3);
    let late_sink = join(&late, family);
    late_sink.wait_pages(PAGES as usize, WAIT);
    late_sink.assert_complete(FAMILY, PAGES);
    let stats = late.family_stats(FAMILY).unwrap();
    assert_eq!(stats.pages_requested, 0, "{stats:?}");
    assert_eq!(stats.early_pages, PAGES, "{stats:?}");
    assert!(stats.pushed_fragments >= PAGES * 3, "{stats:?}");
    assert_eq!(server.stats().pushed_pages, PAGES);
}

/// A [`PatternStore`] whose data pages are `push_runs` (in their push order), the rest zero.
struct PushingStore {
    pattern: PatternStore,
    push_runs: Vec<(u64, u64)>,
}

impl PageStore for PushingStore {
    fn page_count(&self) -> u64 {
        self.pattern.pages
    }

    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        self.pattern.read_page(page, buf)
    }

    fn push_runs(&self) -> Vec<(u64, u64)> {
        self.push_runs.clone()
    }
}

/// A family served by `server` from a [`PushingStore`].
fn serve_pushing(
    server: &McastServer,
    family: u64,
    group: Ipv4Addr,
    pages: u64,
    push_runs: Vec<(u64, u64)>,
) -> FamilyJoin {
    let store = PushingStore {
        pattern: PatternStore { family, pages },
        push_runs,
    };
    let generation = server.register(family, group, Arc::new(store));
    FamilyJoin {
        family,
        generation,
        key: key().id(),
        group,
        server: server.local_addr(),
        pages,
        holding: false,
    }
}

#[test]
fn the_clone_point_is_pushed_to_every_joined_host_without_requests() {
    let _serial = serial();
    let net = Net::new(3);
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x58;
    const PAGES: u64 = 400;
    // Pages 300.. are zero: never pushed.
    let family = serve_pushing(
        &server,
        FAMILY,
        Ipv4Addr::new(239, 255, 1, 8),
        PAGES,
        vec![(200, 100), (0, 200)],
    );
    let hosts = [start_receiver(&net, 2), start_receiver(&net, 3)];
    let sinks: Vec<Arc<Pages>> = hosts.iter().map(|host| join(host, family)).collect();
    for (host, sink) in hosts.iter().zip(&sinks) {
        sink.wait_pages(300, WAIT);
        sink.assert_complete(FAMILY, 300);
        let stats = host.family_stats(FAMILY).unwrap();
        assert_eq!(stats.pages_requested, 0, "{stats:?}");
        assert_eq!(stats.early_pages, 300, "{stats:?}");
    }
    wait_counted(&server, "the push to finish", |stats| {
        stats.families[0].push_remaining == 0
    });
    // The host that joined second got the pages pushed before it joined on a second round.
    let stats = server.stats();
    assert!((300..=600).contains(&stats.pushed_pages), "{stats:?}");
    for sink in &sinks {
        assert_eq!(sink.count(), 300, "zero pages are not pushed");
    }
}

#[test]
fn pushed_pages_lost_on_the_way_are_rebuilt_from_repairs() {
    let _serial = serial();
    let net = Net::new(2);
    net.impair(2);
    let config = McastServerConfig {
        repair_percent: 100,
        ..server_config()
    };
    let server = start_server(&net, config);
    const FAMILY: u64 = 0x5a;
    const PAGES: u64 = 512;
    let family = serve_pushing(
        &server,
        FAMILY,
        Ipv4Addr::new(239, 255, 1, 10),
        PAGES,
        vec![(0, PAGES)],
    );
    let receiver = start_receiver(&net, 2);
    let sink = join(&receiver, family);
    wait_counted(&server, "the push to finish", |stats| {
        stats.pushed_pages >= PAGES && stats.families[0].push_remaining == 0
    });
    assert!(server.stats().repairs_sent > 0);
    // What neither the push nor its repairs brought comes by demand.
    let pages: Vec<u64> = (0..PAGES).collect();
    receiver.request(FAMILY, &pages);
    sink.wait_pages(PAGES as usize, Duration::from_secs(120));
    sink.assert_complete(FAMILY, PAGES);
    let stats = receiver.family_stats(FAMILY).unwrap();
    assert!(stats.repair_symbols > 0, "{stats:?}");
    assert!(
        stats.pages_repaired > 0,
        "20% loss and no page rebuilt: {stats:?}"
    );
    assert_eq!(stats.mac_failed + stats.malformed, 0, "{stats:?}");
}

#[test]
fn a_push_pauses_when_its_hosts_leave_and_stops_with_the_family() {
    let _serial = serial();
    let net = Net::new(2);
    // 1000 pages/s: the push of 5000 pages would take 5 s.
    let server = start_server(
        &net,
        McastServerConfig {
            max_rate: 1000,
            ..server_config()
        },
    );
    const FAMILY: u64 = 0x59;
    const PAGES: u64 = 5000;
    let family = serve_pushing(
        &server,
        FAMILY,
        Ipv4Addr::new(239, 255, 1, 9),
        PAGES,
        vec![(0, PAGES)],
    );
    let pushed = || server.stats().pushed_pages;
    let assert_stopped = |why: &str| {
        // A batch taken before may still be under way.
        thread::sleep(Duration::from_millis(100));
        let before = pushed();
        thread::sleep(Duration::from_millis(300));
        assert_eq!(pushed(), before, "{why}");
    };
    let host = start_receiver(&net, 2);
    let sink = join(&host, family);
    sink.wait_pages(50, WAIT);
    // Its last clone ended: the host leaves, and nobody is left to push to.
    host.leave(FAMILY);
    assert_stopped("pushed with no host in the family");
    let resumed = pushed();
    let sink = join(&host, family);
    sink.wait_pages(50, WAIT);
    assert!(pushed() > resumed, "a host joining again resumes the push");
    server.unregister(FAMILY);
    assert_stopped("pushed after the family was unregistered");
    assert!(pushed() < PAGES, "the push stopped before its end");
    assert!(server.stats().families.is_empty());
}

#[test]
fn every_page_arrives_through_loss_and_reordering() {
    let _serial = serial();
    let net = Net::new(4);
    for host in 1..=4 {
        net.impair(host);
    }
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x55;
    const PAGES: u64 = 256;
    let family = serve(&server, FAMILY, Ipv4Addr::new(239, 255, 1, 5), PAGES);
    // Receivers start at their highest rate, so their reports can only lower it.
    let receivers: Vec<McastReceiver> = (2..=4)
        .map(|host| {
            net.in_host(host, || {
                let config = ReceiverConfig {
                    initial_rate: 100_000,
                    ..receiver_config(host)
                };
                McastReceiver::start(config, key()).expect("starting a receiver")
            })
        })
        .collect();
    let sinks: Vec<Arc<Pages>> = receivers.iter().map(|r| join(r, family)).collect();
    // JOIN reports may be lost: the periodic reports follow.
    wait_active(&server, FAMILY, 3);
    let initial_rate = family_rate(&server, FAMILY);
    assert_eq!(initial_rate, 100_000);

    let pages: Vec<u64> = (0..PAGES).collect();
    for receiver in &receivers {
        receiver.request(FAMILY, &pages);
    }
    wait_until(
        "every page at every receiver",
        Duration::from_secs(120),
        || sinks.iter().all(|s| s.count() == PAGES as usize),
    );
    for sink in &sinks {
        sink.assert_complete(FAMILY, PAGES);
    }
    let mut unicast_requests = 0;
    for receiver in &receivers {
        let stats = receiver.family_stats(FAMILY).unwrap();
        assert!(stats.re_requests > 0, "{stats:?}");
        assert!(stats.rate_cuts > 0, "{stats:?}");
        assert!(stats.reports_sent > 0, "{stats:?}");
        assert_eq!(stats.outstanding, 0, "{stats:?}");
        unicast_requests += stats.unicast_requests;
    }
    assert!(
        unicast_requests > 0,
        "some pages needed the unicast end game"
    );
    // Every receiver cut its rate; the reports that followed reach the server.
    let lowest_rate = || {
        server
            .stats()
            .families
            .iter()
            .find(|f| f.family == FAMILY)
            .map_or(u32::MAX, |f| f.lowest_rate)
    };
    wait_until(
        "the receivers' reports to lower the family's rate",
        Duration::from_secs(10),
        || lowest_rate() < initial_rate,
    );
    assert!(server.stats().duplicates_suppressed > 0);
}

#[test]
fn pages_partly_lost_are_completed_by_their_missing_fragments() {
    let _serial = serial();
    let net = Net::new(2);
    // The server's link cuts its UDP GSO messages into datagrams itself, so the impaired
    // switch port loses fragments one by one (a GSO message crosses the bridge whole and
    // would be lost or kept as a page).
    net.ip(&[
        "-n",
        &net.host(1),
        "link",
        "set",
        "dev",
        "eth0",
        "gso_max_segs",
        "1",
    ]);
    net.impair(2);
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x56;
    const PAGES: u64 = 256;
    let family = serve(&server, FAMILY, Ipv4Addr::new(239, 255, 1, 6), PAGES);
    let receiver = start_receiver(&net, 2);
    let sink = join(&receiver, family);
    wait_active(&server, FAMILY, 1);
    let pages: Vec<u64> = (0..PAGES).collect();
    receiver.request(FAMILY, &pages);
    wait_until("every page", Duration::from_secs(120), || {
        sink.count() == PAGES as usize
    });
    sink.assert_complete(FAMILY, PAGES);
    let stats = receiver.family_stats(FAMILY).unwrap();
    assert!(stats.fragment_re_requests > 0, "{stats:?}");
    assert!(stats.re_requests >= stats.fragment_re_requests, "{stats:?}");
    assert_eq!(stats.mac_failed + stats.malformed, 0, "{stats:?}");
}

#[test]
fn forged_datagrams_are_counted_and_never_delivered() {
    let _serial = serial();
    let net = Net::new(3);
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x56;
    const PAGES: u64 = 16;
    let group = Ipv4Addr::new(239, 255, 1, 6);
    let family = serve(&server, FAMILY, group, PAGES);
    let receivers: Vec<McastReceiver> = (2..=3).map(|host| start_receiver(&net, host)).collect();
    let sinks: Vec<Arc<Pages>> = receivers.iter().map(|r| join(r, family)).collect();
    wait_active(&server, FAMILY, 2);

    let forger = net.in_host(1, || {
        let socket = UdpSocket::bind((host_addr(1), 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket
    });
    let to_group = SocketAddrV4::new(group, PORT);
    let bogus = [0xeeu8; PAGE_SIZE];
    let fragments = |key: &McastKey, family: u64, generation: u32, page: u64| -> Vec<Vec<u8>> {
        let cut = Fragmentation::for_mtu(1500);
        let sealer = FragmentSealer::new(key.fragment_key(family, generation));
        cut.pieces()
            .map(|(index, offset, len)| {
                let mut out = Vec::new();
                let header = Header {
                    flags: 0,
                    family,
                    generation,
                    sender: 0,
                };
                let fragment = Fragment {
                    page,
                    index,
                    count: cut.count,
                    offset,
                    data: &bogus[usize::from(offset)..usize::from(offset + len)],
                };
                wire::encode_fragment(&sealer, &mut out, &header, &fragment).unwrap();
                out
            })
            .collect()
    };
    let real_key = McastKey::new(key());
    let wrong_key = McastKey::new(ClusterKey::from_bytes([0x66; 32]));
    let mut forged: Vec<Vec<u8>> = Vec::new();
    // Another cluster's key: 3 tag failures.
    forged.extend(fragments(&wrong_key, FAMILY, family.generation, 5));
    // One flipped bit in a page's payload: 1 tag failure...
    let mut flipped = fragments(&real_key, FAMILY, family.generation, 6);
    flipped[1][wire::FRAGMENT_HEADER_LEN + 10] ^= 0x04;
    forged.push(flipped[1].clone());
    // ...and one in its header.
    flipped[2][24] ^= 0x01;
    forged.push(flipped[2].clone());
    // Sealed with the real key for another generation and for another family, which these
    // receivers hold no key for: 6 not ours.
    forged.extend(fragments(&real_key, FAMILY, family.generation ^ 1, 7));
    forged.extend(fragments(&real_key, FAMILY + 1, family.generation, 7));
    // Junk, and a valid REQUEST (receivers take none): 2 malformed.
    forged.push(b"SFMC but not really".to_vec());
    let mut request = Vec::new();
    let header = Header {
        flags: 0,
        family: FAMILY,
        generation: family.generation,
        sender: 1,
    };
    wire::encode_request(&real_key, &mut request, &header, 0, &[1]).unwrap();
    forged.push(request);
    for datagram in &forged {
        forger.send_to(datagram, to_group).unwrap();
    }
    for receiver in &receivers {
        wait_until("the forged datagrams to be counted", WAIT, || {
            let stats = receiver.stats();
            stats.mac_failed + stats.not_ours + stats.malformed >= 13
        });
        let stats = receiver.stats();
        assert_eq!(stats.mac_failed, 5, "{stats:?}");
        assert_eq!(stats.not_ours, 6, "{stats:?}");
        assert_eq!(stats.malformed, 2, "{stats:?}");
        assert_eq!(stats.fragments, 0, "{stats:?}");
    }
    for sink in &sinks {
        assert_eq!(sink.count(), 0, "a forged page was delivered");
    }
    // The forged pages, requested for real, arrive with their real contents.
    receivers[0].request(FAMILY, &[5, 6, 7]);
    for sink in &sinks {
        sink.wait_pages(3, WAIT);
        let received = sink.received.lock().unwrap();
        for page in [5, 6, 7] {
            assert!(received.pages[&page] == pattern(FAMILY, page));
        }
    }

    // The server: a forged REQUEST is counted, a stale one is answered with a REJECT.
    let mut forged_request = Vec::new();
    wire::encode_request(&wrong_key, &mut forged_request, &header, 0, &[1]).unwrap();
    forger.send_to(&forged_request, family.server).unwrap();
    let stale = Header {
        generation: family.generation ^ 1,
        ..header
    };
    let mut stale_request = Vec::new();
    wire::encode_request(&real_key, &mut stale_request, &stale, 0, &[1]).unwrap();
    forger.send_to(&stale_request, family.server).unwrap();
    let mut buf = [0u8; 256];
    let (len, from) = forger.recv_from(&mut buf).expect("a REJECT");
    assert_eq!(from, std::net::SocketAddr::V4(family.server));
    match wire::decode(&real_key, &mut buf[..len], |_, _| None).unwrap() {
        Datagram::Reject(header, reject) => {
            assert_eq!(header.family, FAMILY);
            assert_eq!(reject.code, RejectCode::StaleGeneration);
        }
        other => panic!("expected a REJECT, got {other:?}"),
    }
    // The REJECT may arrive before the server counted it.
    wait_until("the REJECT to be counted", WAIT, || {
        server.stats().rejects_sent == 1
    });
    let stats = server.stats();
    assert_eq!(stats.mac_failed, 1, "{stats:?}");
    assert_eq!(stats.stale, 1, "{stats:?}");
}

/// A family received on the AF_XDP path in `mode` from a server that sends each page as one
/// UDP GSO message: every page arrives intact, in native mode through the AF_XDP socket; in
/// generic mode, which sees a GSO message on a veth whole, through the kernel's UDP stack.
fn af_xdp_receives_a_gso_sender(mode: snowflock_ebpf::XdpMode) {
    let _serial = serial();
    let net = Net::new(2);
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x58;
    const PAGES: u64 = 200;
    let family = serve(&server, FAMILY, Ipv4Addr::new(239, 255, 1, 8), PAGES);
    let xdp = XdpReceiveConfig {
        ifname: "eth0".into(),
        mode,
        queues: Vec::new(),
        socket: XskConfig::default(),
    };
    let receiver = net.in_host(2, || {
        McastReceiver::start_xdp(receiver_config(2), key(), &xdp).expect("starting AF_XDP")
    });
    let sink = join(&receiver, family);
    receiver.request(FAMILY, &(0..PAGES).collect::<Vec<_>>());
    sink.wait_pages(PAGES as usize, WAIT);
    sink.assert_complete(FAMILY, PAGES);
    let stats = receiver.family_stats(FAMILY).unwrap();
    assert_eq!(
        stats.mac_failed + stats.malformed + stats.not_ours,
        0,
        "{stats:?}"
    );
    let counters = receiver.xdp_status().expect("the AF_XDP path").counters;
    let messages = server.stats().pages_sent;
    match mode {
        snowflock_ebpf::XdpMode::Native => {
            assert!(counters.redirected >= 3 * PAGES, "{counters:?}");
            assert_eq!(counters.passed, 0, "{counters:?}");
        }
        snowflock_ebpf::XdpMode::Generic => {
            assert_eq!(counters.redirected, 0, "{counters:?}");
            assert_eq!(counters.passed, messages, "{counters:?}");
        }
    }
    receiver.shutdown();
}

#[test]
fn native_af_xdp_receives_a_gso_sender_through_its_sockets() {
    af_xdp_receives_a_gso_sender(snowflock_ebpf::XdpMode::Native);
}

#[test]
fn generic_af_xdp_leaves_gso_messages_to_the_kernel() {
    af_xdp_receives_a_gso_sender(snowflock_ebpf::XdpMode::Generic);
}

#[test]
fn af_xdp_frames_too_small_for_the_mtu_are_refused_before_anything_attaches() {
    let _serial = serial();
    let net = Net::new(1);
    net.ip(&["-n", &net.host(1), "link", "set", "eth0", "mtu", "3000"]);
    let xdp = XdpReceiveConfig {
        ifname: "eth0".into(),
        mode: snowflock_ebpf::XdpMode::Generic,
        queues: Vec::new(),
        socket: XskConfig {
            frame_size: 2048,
            ..XskConfig::default()
        },
    };
    let started = net.in_host(1, || {
        McastReceiver::start_xdp(receiver_config(1), key(), &xdp)
    });
    match started {
        Err(ReceiverError::Xdp(error)) => {
            assert!(
                matches!(
                    *error,
                    XdpPathError::FrameTooSmall {
                        frame_size: 2048,
                        mtu: 3000,
                        ..
                    }
                ),
                "{error}"
            );
            assert!(
                error.to_string().contains("use 4096-byte frames"),
                "{error}"
            );
        }
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("2048-byte frames accepted for a 3000-byte MTU"),
    }
    let link = Command::new("ip")
        .args(["-n", &net.host(1), "link", "show", "dev", "eth0"])
        .output()
        .expect("running ip");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("mtu 3000"), "{link}");
    assert!(!link.contains("xdp"), "a program stayed attached: {link}");
}

#[test]
fn rejected_pages_fail_the_sink_with_the_reason() {
    let _serial = serial();
    let net = Net::new(2);
    let server = start_server(&net, server_config());
    const FAMILY: u64 = 0x57;
    const PAGES: u64 = 32;
    let family = serve(&server, FAMILY, Ipv4Addr::new(239, 255, 1, 7), PAGES);
    let receiver = start_receiver(&net, 2);
    // The receiver believes the family is larger than the server's image.
    let sink = join(
        &receiver,
        FamilyJoin {
            pages: 2 * PAGES,
            holding: false,
            ..family
        },
    );
    receiver.request(FAMILY, &[3, PAGES + 8]);
    let reason = sink.wait_failure();
    assert!(reason.contains("page out of range"), "{reason}");
    assert!(reason.contains("page 0x28"), "{reason}");
    assert!(reason.contains(&format!("{}", family.server)), "{reason}");
    assert_eq!(receiver.family_stats(FAMILY).unwrap().rejects, 1);

    // A family the server does not serve.
    let unknown = FamilyJoin {
        family: 0x99,
        generation: 1,
        group: Ipv4Addr::new(239, 255, 1, 8),
        ..family
    };
    let unknown_sink = join(&receiver, unknown);
    receiver.request(0x99, &[0]);
    let reason = unknown_sink.wait_failure();
    assert!(reason.contains("unknown family"), "{reason}");
    // Each family failed once.
    assert_eq!(sink.received.lock().unwrap().failures.len(), 1);
    // The REJECTs may arrive before the server counted them.
    wait_until("the REJECTs to be counted", WAIT, || {
        server.stats().rejects_sent >= 2
    });
    assert!(server.stats().stale >= 1);
}

fn count_entries(dir: &str) -> usize {
    fs::read_dir(dir).map_or(0, |entries| entries.count())
}

/// The sockets and anonymous-inode objects (io_uring, eventfd, BPF) this process holds, by
/// target: the kinds servers and receivers own. A descriptor another thread holds for a
/// moment (a pipe while it spawns a program, a `/proc` file) is not a leak.
fn owned_fds() -> Vec<String> {
    let mut targets: Vec<String> = fs::read_dir("/proc/self/fd")
        .map(|entries| {
            entries
                .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
                .map(|target| target.to_string_lossy().into_owned())
                .filter(|target| target.starts_with("socket:") || target.starts_with("anon_inode:"))
                .collect()
        })
        .unwrap_or_default();
    targets.sort();
    targets
}

#[test]
fn shutdown_leaves_no_threads_or_fds() {
    let _serial = serial();
    let net = Net::new(3);
    let fds_before = owned_fds();
    let tasks_before = count_entries("/proc/self/task");
    {
        let server = start_server(&net, server_config());
        let family = serve(&server, 0x58, Ipv4Addr::new(239, 255, 1, 9), 64);
        let receivers: Vec<McastReceiver> =
            (2..=3).map(|host| start_receiver(&net, host)).collect();
        let sinks: Vec<Arc<Pages>> = receivers.iter().map(|r| join(r, family)).collect();
        receivers[0].request(0x58, &(0..64).collect::<Vec<_>>());
        for sink in &sinks {
            sink.wait_pages(64, WAIT);
        }
        assert!(count_entries("/proc/self/task") >= tasks_before + 4);
        server.shutdown();
        server.shutdown();
        drop(receivers);
    }
    // io_uring's kernel workers, if any were started, exit shortly after their ring closes.
    wait_until(
        "threads and fds to be released",
        Duration::from_secs(10),
        || owned_fds() == fds_before && count_entries("/proc/self/task") == tasks_before,
    );
}
