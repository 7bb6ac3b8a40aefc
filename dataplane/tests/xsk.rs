//! AF_XDP sockets on the real kernel: binding on a veth, and receiving the mcdist FRAGMENTs
//! that the `snowflock-ebpf` XDP program redirects to them, in a private pair of network
//! namespaces joined by a veth pair.
//!
//! Every test takes one lock: they count this process's open file descriptors, which a test
//! running alongside would disturb.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use snowflock_dataplane::xdp::{
    BusyPoll, XskConfig, XskError, XskMode, XskSocket, XskStats, ZeroCopy,
};
use snowflock_ebpf::{AttachConfig, McdistXdp, XdpCounters, XdpMode};

/// Serializes the tests of this file (see the module comment).
static SERIAL: Mutex<()> = Mutex::new(());

/// Longest time one `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time one exchange of datagrams may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);

const RECEIVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
const RECEIVER_MAC: [u8; 6] = [0x02, 0x53, 0x46, 0x00, 0x00, 0x01];
const SENDER_MAC: [u8; 6] = [0x02, 0x53, 0x46, 0x00, 0x00, 0x02];
const MCDIST_PORT: u16 = 7073;
const FAMILY: u64 = 0x5157_0000_0000_0001;
const GENERATION: u32 = 7;
/// Pages registered for `FAMILY`: fragment `n` carries page `n`.
const PAGES: u64 = 1 << 20;

/// Takes [`SERIAL`]. It guards nothing but the order of the tests, so a test that panicked
/// holding it leaves nothing half-done: the next one may go on.
fn serial() -> MutexGuard<'static, ()> {
    snowflock_sync::lock(&SERIAL)
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

/// Runs `ip ARGS`, killed after [`IP_TIMEOUT`].
fn ip(args: &[&str]) -> Result<String, String> {
    let line = format!("ip {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{line}: {e}"))?;
    let deadline = Instant::now() + IP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{line}: did not finish ({outcome:?})"));
            }
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{line}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{line}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Two network namespaces joined by a veth pair whose ends are named like their namespace:
/// `{prefix}r` (the receiver, 10.213.0.1) and `{prefix}s` (the sender, 10.213.0.2). Deleted
/// on drop.
struct VethPair {
    receiver: String,
    sender: String,
}

impl VethPair {
    fn create() -> VethPair {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "sfx{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pair = VethPair {
            receiver: format!("{prefix}r"),
            sender: format!("{prefix}s"),
        };
        let (r, s) = (pair.receiver.clone(), pair.sender.clone());
        let (r, s) = (r.as_str(), s.as_str());
        let (r_mac, s_mac) = (format_mac(RECEIVER_MAC), format_mac(SENDER_MAC));
        let (r_addr, s_addr) = (RECEIVER_ADDR.to_string(), SENDER_ADDR.to_string());
        let steps: [&[&str]; 10] = [
            &["netns", "add", r],
            &["netns", "add", s],
            &[
                "-n", r, "link", "add", r, "address", &r_mac, "type", "veth", "peer", "name", s,
                "address", &s_mac, "netns", s,
            ],
            &["-n", r, "addr", "add", &format!("{r_addr}/24"), "dev", r],
            &["-n", s, "addr", "add", &format!("{s_addr}/24"), "dev", s],
            &["-n", r, "link", "set", r, "up"],
            &["-n", s, "link", "set", s, "up"],
            // Static neighbours: no datagram waits for (or is lost to) address resolution.
            &[
                "-n",
                s,
                "neigh",
                "replace",
                &r_addr,
                "lladdr",
                &r_mac,
                "dev",
                s,
                "nud",
                "permanent",
            ],
            &[
                "-n",
                r,
                "neigh",
                "replace",
                &s_addr,
                "lladdr",
                &s_mac,
                "dev",
                r,
                "nud",
                "permanent",
            ],
            &["-n", r, "link", "set", "lo", "up"],
        ];
        for step in steps {
            if let Err(error) = ip(step) {
                drop(pair);
                panic!("setting up the veth pair: {error}");
            }
        }
        pair
    }

    /// Whether the receiving veth has an XDP program attached, as `ip link` shows it.
    fn receiver_has_xdp(&self) -> bool {
        let details = ip(&[
            "-n",
            &self.receiver,
            "-d",
            "link",
            "show",
            "dev",
            &self.receiver,
        ])
        .expect("ip link show");
        details.contains("xdp")
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the peer.
        for ns in [&self.receiver, &self.sender] {
            if let Err(error) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {error}");
            }
        }
    }
}

/// Runs `f` on a new thread that first joins network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            let handle = fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns changes only this thread's network namespace, to the one behind
            // `handle`, which is open for the call.
            let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
            f()
        })
        .expect("spawn a namespace thread")
}

/// Index of interface `name` in the calling thread's network namespace.
fn interface_index(name: &str) -> u32 {
    let name = CString::new(name).unwrap();
    // SAFETY: `name` is a NUL-terminated string that outlives the call, which only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "if_nametoindex: {}", io::Error::last_os_error());
    index
}

/// Binds like [`XskSocket::bind`], retrying for up to 5 s while the queue is busy: the kernel
/// frees a queue asynchronously after its previous socket is closed.
fn bind_when_free(ifindex: u32, config: &XskConfig) -> Result<XskSocket, XskError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match XskSocket::bind(ifindex, 0, config) {
            Err(XskError::Bind { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(5))
            }
            outcome => return outcome,
        }
    }
}

/// The integer socket option `name` (level `SOL_SOCKET`) of `socket`.
fn socket_option(socket: &XskSocket, name: libc::c_int) -> libc::c_int {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    let value_ptr: *mut libc::c_int = &mut value;
    // SAFETY: `value_ptr` and `len` point to live locals of the sizes the call is told; the
    // descriptor is open (borrowed from `socket`) for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            value_ptr.cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt {name}: {}", io::Error::last_os_error());
    value
}

/// The sockets and anonymous-inode objects (BPF programs and maps, eventfds) this process
/// holds, by target. Only kinds the sockets and programs under test own are counted: a
/// descriptor another thread holds for a moment (a pipe while it spawns `ip`, a `/proc` file
/// while a thread starts) is not a leak.
fn open_fds() -> Vec<String> {
    let mut targets: Vec<String> = fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| target.starts_with("socket:") || target.starts_with("anon_inode:"))
        .collect();
    targets.sort();
    targets
}

/// Mappings of socket memory (AF_XDP rings) in this process.
fn socket_mappings() -> usize {
    fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|line| line.contains("socket:["))
        .count()
}

/// Payload bytes of fragment `n`: 1 to 1400 bytes, depending on `n`.
fn payload_len(n: u64) -> usize {
    1 + (n * 97 % 1400) as usize
}

/// An mcdist FRAGMENT datagram (docs/mcdist.md) of `family`/`generation` for `page`, carrying
/// a made-up nonce, `payload_len(seed)` bytes that depend on `seed`, and a made-up tag (the
/// XDP program does not check tags).
fn fragment(family: u64, generation: u32, page: u64, seed: u64) -> Vec<u8> {
    let len = payload_len(seed);
    let mut datagram = Vec::with_capacity(52 + len + 16);
    datagram.extend_from_slice(b"SFMC");
    datagram.push(2); // version
    datagram.push(1); // kind FRAGMENT
    datagram.extend_from_slice(&0u16.to_le_bytes()); // flags
    datagram.extend_from_slice(&family.to_le_bytes());
    datagram.extend_from_slice(&generation.to_le_bytes());
    datagram.extend_from_slice(&0u32.to_le_bytes()); // sender
    datagram.extend_from_slice(&page.to_le_bytes());
    datagram.push(0); // index
    datagram.push(1); // count
    datagram.extend_from_slice(&(len as u16).to_le_bytes());
    datagram.extend_from_slice(&0u16.to_le_bytes()); // offset
    datagram.extend_from_slice(&0u16.to_le_bytes()); // reserved
    datagram.extend_from_slice(&seed.to_le_bytes()); // nonce
    datagram.extend_from_slice(&0u32.to_le_bytes());
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for _ in 0..len + 16 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        datagram.push(state as u8);
    }
    datagram
}

/// The fragment the test sends as number `n`.
fn matching_fragment(n: u64) -> Vec<u8> {
    fragment(FAMILY, GENERATION, n, n)
}

/// Datagrams the program must not redirect, by number: (destination port, bytes).
fn non_matching(n: u64) -> (u16, Vec<u8>) {
    match n % 7 {
        0 => (MCDIST_PORT + 1, matching_fragment(n)),
        1 => {
            let mut datagram = matching_fragment(n);
            datagram[0..4].copy_from_slice(b"SFMX");
            (MCDIST_PORT, datagram)
        }
        2 => {
            let mut datagram = matching_fragment(n);
            datagram[5] = 2; // REQUEST
            (MCDIST_PORT, datagram)
        }
        3 => (MCDIST_PORT, fragment(FAMILY + 1, GENERATION, n, n)),
        4 => (MCDIST_PORT, fragment(FAMILY, GENERATION + 1, n, n)),
        5 => (MCDIST_PORT, fragment(FAMILY, GENERATION, PAGES + n, n)),
        _ => (MCDIST_PORT, matching_fragment(n)[..50].to_vec()),
    }
}

/// What the receiving side saw of one exchange.
#[derive(Debug, Default)]
struct ReceiverReport {
    mode: Option<XskMode>,
    /// `seen[n]`: how many times fragment `n` arrived intact.
    seen: Vec<u32>,
    /// Frames that were not an intact matching fragment.
    unexpected: Vec<String>,
    /// Datagrams the kernel's UDP socket on the mcdist port got.
    kernel_datagrams: usize,
    stats: Option<XskStats>,
    counters: XdpCounters,
    /// Time from the first to the last fragment received.
    span: Duration,
}

/// What the sending side did.
#[derive(Debug, Default)]
struct SenderReport {
    matching: usize,
    /// Non-matching datagrams sent to the mcdist port (the others went to another port).
    non_matching_to_port: usize,
    error: Option<String>,
}

/// Checks `frame` is the Ethernet frame of an intact matching fragment, one of `fragments`;
/// returns its number.
fn check_frame(frame: &[u8], fragments: &[Vec<u8>]) -> Result<u64, String> {
    let too_short = || format!("{}-byte frame", frame.len());
    if frame.len() < 14 + 20 + 8 + 52 {
        return Err(too_short());
    }
    if frame[0..6] != RECEIVER_MAC || frame[6..12] != SENDER_MAC || frame[12..14] != [8, 0] {
        return Err(format!("Ethernet header {:02x?}", &frame[..14]));
    }
    let ip = &frame[14..];
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] != 0x45 || ip[9] != 17 || total_len != ip.len() {
        return Err(format!(
            "IPv4 header {:02x?} in {} bytes",
            &ip[..20],
            ip.len()
        ));
    }
    if ip[12..16] != SENDER_ADDR.octets() || ip[16..20] != RECEIVER_ADDR.octets() {
        return Err(format!("IPv4 addresses {:?}", &ip[12..20]));
    }
    let udp = &ip[20..];
    let port = u16::from_be_bytes([udp[2], udp[3]]);
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if port != MCDIST_PORT || udp_len != udp.len() {
        return Err(format!(
            "UDP to port {port}, length {udp_len} of {}",
            udp.len()
        ));
    }
    let payload = &udp[8..];
    let n = u64::from_le_bytes(payload[24..32].try_into().unwrap());
    match usize::try_from(n).ok().and_then(|n| fragments.get(n)) {
        Some(sent) if payload == sent.as_slice() => {}
        Some(_) => {
            return Err(format!(
                "payload of fragment {n} differs from what was sent"
            ));
        }
        None => return Err(format!("fragment {n} was never sent")),
    }
    Ok(n)
}

/// One run: attach the program in `xdp_mode` to the receiving veth, bind an [`XskSocket`]
/// with `config` to queue 0, send `count` matching fragments (with a non-matching datagram
/// every `every` of them, if set) keeping at most `window` unreceived, and receive.
struct Exchange {
    xdp_mode: XdpMode,
    config: XskConfig,
    count: usize,
    non_matching_every: Option<usize>,
    window: usize,
}

struct ExchangeResult {
    receiver: ReceiverReport,
    sender: SenderReport,
    xdp_left_attached: bool,
}

impl Exchange {
    fn run(self) -> ExchangeResult {
        let pair = VethPair::create();
        let received = Arc::new(AtomicUsize::new(0));
        let sender_done = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        // Made up front, so neither side spends its time making them.
        let fragments: Arc<Vec<Vec<u8>>> =
            Arc::new((0..self.count as u64).map(matching_fragment).collect());

        let receiver = {
            let ifname = pair.receiver.clone();
            let received = Arc::clone(&received);
            let sender_done = Arc::clone(&sender_done);
            let fragments = Arc::clone(&fragments);
            let (xdp_mode, config) = (self.xdp_mode, self.config.clone());
            in_netns(&pair.receiver, move || {
                receive_side(
                    &ifname,
                    xdp_mode,
                    &config,
                    &fragments,
                    &received,
                    &sender_done,
                    ready_tx,
                )
            })
        };
        let sender = {
            let received = Arc::clone(&received);
            let sender_done = Arc::clone(&sender_done);
            let (every, window) = (self.non_matching_every, self.window);
            in_netns(&pair.sender, move || {
                let report = match ready_rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(Ok(())) => send_side(&fragments, every, window, &received),
                    Ok(Err(error)) => SenderReport {
                        error: Some(format!("receiver failed: {error}")),
                        ..SenderReport::default()
                    },
                    Err(error) => SenderReport {
                        error: Some(format!("receiver not ready: {error}")),
                        ..SenderReport::default()
                    },
                };
                sender_done.store(true, Ordering::Release);
                report
            })
        };
        let sender = sender.join().expect("sender thread");
        let receiver = receiver.join().expect("receiver thread");
        let xdp_left_attached = pair.receiver_has_xdp();
        drop(pair);
        ExchangeResult {
            receiver,
            sender,
            xdp_left_attached,
        }
    }
}

fn receive_side(
    ifname: &str,
    xdp_mode: XdpMode,
    config: &XskConfig,
    fragments: &[Vec<u8>],
    received: &AtomicUsize,
    sender_done: &AtomicBool,
    ready: mpsc::Sender<Result<(), String>>,
) -> ReceiverReport {
    let setup = || -> Result<(McdistXdp, XskSocket, UdpSocket), String> {
        let xdp = McdistXdp::attach(&AttachConfig {
            ifname: ifname.to_owned(),
            mode: xdp_mode,
            udp_port: MCDIST_PORT,
        })
        .map_err(|e| format!("attach: {e:?}"))?;
        xdp.add_family(FAMILY, GENERATION, PAGES)
            .map_err(|e| format!("add_family: {e:?}"))?;
        let socket =
            XskSocket::bind(xdp.info().ifindex, 0, config).map_err(|e| format!("bind: {e:?}"))?;
        xdp.set_socket(0, socket.as_fd())
            .map_err(|e| format!("set_socket: {e:?}"))?;
        let kernel = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, MCDIST_PORT))
            .map_err(|e| format!("kernel UDP socket: {e}"))?;
        kernel.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok((xdp, socket, kernel))
    };
    let (xdp, mut socket, kernel) = match setup() {
        Ok(parts) => parts,
        Err(error) => {
            let _ = ready.send(Err(error.clone()));
            panic!("receiver setup: {error}");
        }
    };
    let mut report = ReceiverReport {
        mode: Some(socket.mode()),
        seen: vec![0; fragments.len()],
        ..ReceiverReport::default()
    };
    ready.send(Ok(())).expect("sender gone");

    let mut kernel_buf = vec![0u8; 2048];
    let mut drain_kernel = |report: &mut ReceiverReport| {
        while kernel.recv(&mut kernel_buf).is_ok() {
            report.kernel_datagrams += 1;
        }
    };
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let mut last_progress = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut matching = 0;
    let mut receive_some = |socket: &mut XskSocket, report: &mut ReceiverReport| {
        socket.receive(256, |frame| match check_frame(frame, fragments) {
            Ok(n) => match report.seen.get_mut(n as usize) {
                Some(times) => {
                    *times += 1;
                    matching += 1;
                    received.store(matching, Ordering::Release);
                    last = Instant::now();
                    first.get_or_insert(last);
                }
                None => report
                    .unexpected
                    .push(format!("fragment {n} was never sent")),
            },
            Err(problem) => report.unexpected.push(problem),
        })
    };
    while received.load(Ordering::Acquire) < fragments.len() && Instant::now() < deadline {
        // The sender gave up, or everything that will arrive has: stop after a quiet while.
        if sender_done.load(Ordering::Acquire) && last_progress.elapsed() > Duration::from_secs(3) {
            break;
        }
        socket.wait(Duration::from_millis(20)).expect("wait");
        if receive_some(&mut socket, &mut report) > 0 {
            last_progress = Instant::now();
        }
        drain_kernel(&mut report);
    }
    // Anything redirected by mistake was sent before the last fragment: it is there by now,
    // but give stragglers a moment anyway.
    let quiet = Instant::now() + Duration::from_millis(200);
    while Instant::now() < quiet {
        socket.wait(Duration::from_millis(20)).expect("wait");
        receive_some(&mut socket, &mut report);
        drain_kernel(&mut report);
    }
    report.span = first.map_or(Duration::ZERO, |first| last - first);
    report.stats = Some(socket.stats().expect("stats"));
    report.counters = xdp.counters();
    drop(socket);
    drop(xdp);
    report
}

fn send_side(
    fragments: &[Vec<u8>],
    non_matching_every: Option<usize>,
    window: usize,
    received: &AtomicUsize,
) -> SenderReport {
    let mut report = SenderReport::default();
    let socket = match UdpSocket::bind(SocketAddrV4::new(SENDER_ADDR, 0)) {
        Ok(socket) => socket,
        Err(error) => {
            report.error = Some(format!("sender socket: {error}"));
            return report;
        }
    };
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let send = |port: u16, datagram: &[u8]| -> Result<(), String> {
        let target = SocketAddrV4::new(RECEIVER_ADDR, port);
        // A full device queue shows as ENOBUFS: retry a bounded number of times.
        for _ in 0..1000 {
            match socket.send_to(datagram, target) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    thread::sleep(Duration::from_micros(100))
                }
                Err(e) => return Err(format!("send_to {target}: {e}")),
            }
        }
        Err(format!("send_to {target}: no buffer space for 100 ms"))
    };
    for (n, fragment) in fragments.iter().enumerate() {
        while n - received.load(Ordering::Acquire).min(n) >= window {
            if Instant::now() > deadline {
                report.error = Some(format!("receiver stalled after {n} fragments"));
                return report;
            }
            thread::yield_now();
        }
        if let Some(every) = non_matching_every
            && n % every == 0
        {
            let (port, datagram) = non_matching((n / every) as u64);
            if let Err(error) = send(port, &datagram) {
                report.error = Some(error);
                return report;
            }
            if port == MCDIST_PORT {
                report.non_matching_to_port += 1;
            }
        }
        if let Err(error) = send(MCDIST_PORT, fragment) {
            report.error = Some(error);
            return report;
        }
        report.matching += 1;
    }
    report
}

/// Runs `exchange` and checks that every fragment arrived intact exactly once through the
/// socket, nothing else did, the non-matching datagrams reached the kernel instead, and
/// nothing (descriptor, program) was left behind.
fn check_exchange(exchange: Exchange, expected_mode: XskMode) -> ExchangeResult {
    let fds_before = open_fds();
    let count = exchange.count;
    let result = exchange.run();
    let (receiver, sender) = (&result.receiver, &result.sender);
    assert_eq!(sender.error, None, "sender: {sender:?}");
    assert_eq!(receiver.mode, Some(expected_mode));
    assert!(
        receiver.unexpected.is_empty(),
        "{} unexpected frames on the socket, first: {:?}",
        receiver.unexpected.len(),
        receiver.unexpected.first()
    );
    let missing: Vec<usize> = (0..count).filter(|&n| receiver.seen[n] == 0).collect();
    let repeated: Vec<usize> = (0..count).filter(|&n| receiver.seen[n] > 1).collect();
    assert!(
        missing.is_empty() && repeated.is_empty(),
        "{} fragments missing (first {:?}), {} repeated; socket stats {:?}, program {:?}",
        missing.len(),
        missing.first(),
        repeated.len(),
        receiver.stats,
        receiver.counters
    );
    assert_eq!(receiver.counters.redirected, count as u64);
    assert_eq!(
        receiver.kernel_datagrams, sender.non_matching_to_port,
        "the non-matching datagrams to the mcdist port reach the kernel's socket"
    );
    let stats = receiver.stats.expect("stats");
    assert_eq!(stats.rejected_descs, 0);
    assert_eq!(stats.lost_frames, 0);
    assert_eq!(stats.rx_invalid_descs, 0);
    assert!(
        !result.xdp_left_attached,
        "the XDP program is still attached"
    );
    assert_eq!(open_fds(), fds_before, "file descriptors leaked");
    assert_eq!(socket_mappings(), 0, "ring mappings left behind");
    result
}

fn rate(result: &ExchangeResult) -> f64 {
    let secs = result.receiver.span.as_secs_f64();
    let received: u32 = result.receiver.seen.iter().sum();
    if secs > 0.0 {
        f64::from(received.saturating_sub(1)) / secs
    } else {
        0.0
    }
}

/// Sends a burst of `count` fragments with a window as large as the veth's receive queue
/// (256), and prints the receive rate (information for the benchmarks, not asserted).
fn measure_burst(xdp_mode: XdpMode, config: XskConfig, label: &str) {
    let count = 20_000;
    let result = Exchange {
        xdp_mode,
        config,
        count,
        non_matching_every: None,
        window: 256,
    }
    .run();
    let received: u32 = result.receiver.seen.iter().sum();
    println!(
        "AF_XDP burst, {label}: {received} of {count} fragments received at {:.0} datagrams/s \
         (socket {:?}; program {:?}; sender error {:?})",
        rate(&result),
        result.receiver.stats,
        result.receiver.counters,
        result.sender.error,
    );
    assert!(
        !result.xdp_left_attached,
        "the XDP program is still attached"
    );
}

#[test]
fn bind_on_veth_runs_in_copy_mode_and_reports_refusals() {
    let _serial = serial();
    let fds_before = open_fds();
    let pair = VethPair::create();
    let ifname = pair.receiver.clone();
    let outcome = in_netns(&pair.receiver, move || {
        let ifindex = interface_index(&ifname);

        let never = XskConfig {
            zero_copy: ZeroCopy::Never,
            ..XskConfig::default()
        };
        let mut socket = XskSocket::bind(ifindex, 0, &never).expect("bind in copy mode");
        assert_eq!(socket.mode(), XskMode::Copy);
        assert_eq!(
            (socket.ifindex(), socket.queue_id(), socket.config()),
            (ifindex, 0, &never)
        );
        assert_eq!(socket.stats().expect("stats"), XskStats::default());
        assert!(!socket.wait(Duration::from_millis(30)).expect("wait"));
        assert_eq!(socket.receive(64, |_| panic!("nothing was sent")), 0);
        assert!(format!("{socket:?}").contains("XskSocket"));
        assert_eq!(socket_option(&socket, libc::SO_PREFER_BUSY_POLL), 0);
        assert_eq!(socket_mappings(), 2, "the fill and RX rings are mapped");

        // One socket per queue.
        match XskSocket::bind(ifindex, 0, &never) {
            Err(XskError::Bind { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EBUSY), "{source}")
            }
            other => panic!("second bind to queue 0: {other:?}"),
        }
        drop(socket);

        // veth has no zero-copy support: Auto falls back to copy, Required fails.
        let auto = bind_when_free(ifindex, &XskConfig::default()).expect("bind (auto)");
        assert_eq!(auto.mode(), XskMode::Copy);
        drop(auto);
        let required = XskConfig {
            zero_copy: ZeroCopy::Required,
            ..XskConfig::default()
        };
        match bind_when_free(ifindex, &required) {
            Err(XskError::Bind {
                source, zero_copy, ..
            }) => {
                assert_eq!(zero_copy, ZeroCopy::Required);
                assert_eq!(source.raw_os_error(), Some(libc::EOPNOTSUPP), "{source}");
            }
            other => panic!("zero-copy bind on veth: {other:?}"),
        }

        // Busy polling is accepted, with small rings and frames.
        let busy = XskConfig {
            frame_count: 64,
            frame_size: 2048,
            fill_ring: 32,
            rx_ring: 32,
            busy_poll: Some(BusyPoll {
                timeout_us: 20,
                budget: 64,
            }),
            zero_copy: ZeroCopy::Never,
        };
        let socket = bind_when_free(ifindex, &busy).expect("bind with busy polling");
        assert_eq!(socket.mode(), XskMode::Copy);
        assert_eq!(socket_option(&socket, libc::SO_PREFER_BUSY_POLL), 1);
        assert_eq!(socket_option(&socket, libc::SO_BUSY_POLL), 20);
        // (The kernel does not report SO_BUSY_POLL_BUDGET back.)
        drop(socket);

        match XskSocket::bind(ifindex + 1000, 0, &never) {
            Err(XskError::Bind { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENODEV), "{source}")
            }
            other => panic!("bind to a missing interface: {other:?}"),
        }
        let odd = XskConfig {
            rx_ring: 1000,
            ..XskConfig::default()
        };
        assert!(matches!(
            XskSocket::bind(ifindex, 0, &odd),
            Err(XskError::InvalidConfig {
                field: "rx_ring",
                ..
            })
        ));
    })
    .join();
    drop(pair);
    outcome.expect("bind checks");
    assert_eq!(open_fds(), fds_before, "file descriptors leaked");
    assert_eq!(socket_mappings(), 0, "ring mappings left behind");
}

#[test]
fn xsk_socket_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<XskSocket>();
    assert_send::<XskError>();
}

#[test]
fn native_xdp_redirects_fragments_to_the_socket_intact() {
    let _serial = serial();
    let result = check_exchange(
        Exchange {
            xdp_mode: XdpMode::Native,
            config: XskConfig::default(),
            count: 2000,
            non_matching_every: Some(10),
            window: 64,
        },
        XskMode::Copy,
    );
    println!(
        "native, 2000 fragments paced: {:.0} datagrams/s",
        rate(&result)
    );

    let busy = XskConfig {
        busy_poll: Some(BusyPoll {
            timeout_us: 20,
            budget: 64,
        }),
        ..XskConfig::default()
    };
    check_exchange(
        Exchange {
            xdp_mode: XdpMode::Native,
            config: busy.clone(),
            count: 2000,
            non_matching_every: Some(25),
            window: 64,
        },
        XskMode::Copy,
    );

    measure_burst(XdpMode::Native, XskConfig::default(), "native XDP");
    measure_burst(XdpMode::Native, busy, "native XDP, busy polling");
}

#[test]
fn generic_xdp_redirects_fragments_to_the_socket_intact() {
    let _serial = serial();
    // Fewer frames than fragments and a fill ring smaller than the UMEM: frames are reused,
    // and some wait outside the fill ring for room.
    let small = XskConfig {
        frame_count: 1024,
        frame_size: 2048,
        fill_ring: 256,
        rx_ring: 256,
        busy_poll: None,
        zero_copy: ZeroCopy::Never,
    };
    let result = check_exchange(
        Exchange {
            xdp_mode: XdpMode::Generic,
            config: small.clone(),
            count: 2000,
            non_matching_every: Some(10),
            window: 64,
        },
        XskMode::Copy,
    );
    println!(
        "generic, 2000 fragments paced: {:.0} datagrams/s",
        rate(&result)
    );

    measure_burst(XdpMode::Generic, XskConfig::default(), "generic XDP");
}
