//! Multicast page distribution between real `sfd` daemons in
//! network-namespace hosts: correct results under loss and reordering on
//! both receive paths, forged datagrams never installed, and the XDP
//! program and sockets gone when a daemon stops or crashes.
//!
//! Loss and reordering come from `Cluster::impair` on the switch ports (HTB
//! and a random classic-BPF classifier: this kernel has no netem).
//!
//! Every test makes its own cluster with a random prefix; the cluster (and
//! with it every qdisc on its links) is removed when the test ends, also
//! when it fails.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use snowflock_control::VmOutcome;
use snowflock_control::config::McdistSection;
use snowflock_control::protocol::{ApiRequest, ApiResponse, NetStatus, NetTune};
use snowflock_dataplane::auth::ClusterKey;
use snowflock_dataplane::mcast::wire::{self, Fragment, FragmentSealer, Header, McastKey};
use snowflock_testkit::ClusterSpec;

/// The receivers' port (`[mcdist] rx_port`): forged fragments go there.
const RX_PORT: u16 = 7074;
/// The servers' port (`[mcdist] port`).
const SERVER_PORT: u16 = 7073;

fn rx_path(path: &str) -> impl FnOnce(&mut ClusterSpec) {
    move |spec| {
        spec.mcdist
            .insert("rx_path".into(), toml::Value::String(path.into()));
    }
}

fn net_show(socket: &Path) -> NetStatus {
    match call(socket, &ApiRequest::NetShow) {
        ApiResponse::Net(status) => *status,
        other => panic!("sf net show answered {other:?}"),
    }
}

/// The demo job, smaller where loss makes every page cost several round trips.
fn job(ref_mib: u32) -> String {
    format!("ref_mib={ref_mib} queries={} clones=6", ref_mib * 250)
}

fn serial_hits(ref_mib: u32) -> String {
    let serial = local_run(
        "seqsearch",
        "512M",
        &format!("ref_mib={ref_mib} queries={} clones=0", ref_mib * 250),
    );
    field(&serial, "seqsearch: ref_mib", "hits")
}

/// Runs the job from h1 and checks it against the serial run.
fn run_and_check(socket: &Path, ref_mib: u32, expected_hits: &str) {
    let vm = start(socket, "seqsearch", 512 << 20, &job(ref_mib));
    let ended = wait(socket, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    let report = &ended.reports[0];
    assert_eq!(report.clones, 6, "{report:?}");
    assert!(
        report.children.iter().filter(|c| c.host.is_some()).count() >= 4,
        "too few clones on other hosts: {report:?}"
    );
    assert!(
        report
            .children
            .iter()
            .all(|c| matches!(c.outcome, VmOutcome::Result(_))),
        "{report:?}"
    );
    assert_eq!(field(&ended.lines, "seqsearch: ref_mib", "check"), "ok");
    assert_eq!(
        field(&ended.lines, "seqsearch: ref_mib", "hits"),
        expected_hits
    );
}

fn lossy_runs_stay_correct(path: &str) {
    // Correctness under loss, not speed: on a loaded 2-core machine a page
    // lost several times over can take longer than the default 5 s
    // (`fetch_timeout` failing clones is tested in multihost.rs).
    let (cluster, _dir) = cluster(4, 2, |spec| {
        rx_path(path)(spec);
        spec.fetch_timeout_ms = 20_000;
    });
    let h1 = cluster.host(0).unwrap().socket.clone();
    for (loss, ref_mib) in [(5, 16), (20, 8)] {
        let expected = serial_hits(ref_mib);
        cluster.impair(loss, 25).unwrap();
        run_and_check(&h1, ref_mib, &expected);
    }
    let parent = net_show(&h1);
    assert!(parent.tx.pages_sent > 0, "{parent:#?}");
    let mut re_requests = 0;
    for host in &cluster.hosts()[1..] {
        let status = net_show(&host.socket);
        assert_eq!(status.rx_path, path, "{status:#?}");
        assert_eq!(status.rx.mac_failed, 0, "{status:#?}");
        if path == "xdp" {
            let xdp = status.xdp.as_ref().expect("xdp status");
            assert!(xdp.redirected > 0, "{status:#?}");
        }
        re_requests += status.rx.re_requests;
    }
    assert!(
        re_requests > 0,
        "20% loss caused no re-request at all: {parent:#?}"
    );
    cluster.down().unwrap();
}

#[test]
fn clones_stay_correct_under_loss_and_reordering_on_kernel_sockets() {
    lossy_runs_stay_correct("sockets");
}

#[test]
fn clones_stay_correct_under_loss_and_reordering_on_af_xdp() {
    lossy_runs_stay_correct("xdp");
}

/// Real FRAGMENTs seen on the wire, by family: the latest one of each.
type Seen = Mutex<HashMap<u64, Vec<u8>>>;

/// Records the mcdist FRAGMENTs that the switch forwards out of port `port` (a switch port
/// of the switch namespace, where no XDP program runs) into `seen`, until `stop`. Runs in
/// the calling thread's network namespace.
fn sniff_until(stop: &AtomicBool, port: &str, seen: &Seen) {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(port).unwrap();
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex > 0, "no interface {port}");
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = ifindex as i32;
    // SAFETY: `address` is a valid sockaddr_ll of the length given.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: `timeout` is a valid timeval of the length given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(set, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    let mut frame = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(240);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: `frame` is writable for its whole length.
        let len = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                frame.as_mut_ptr().cast(),
                frame.len(),
                0,
            )
        };
        let Ok(len) = usize::try_from(len) else {
            continue;
        };
        // Ethernet, IPv4 without options (what the hosts send), UDP to the receivers' port.
        let frame = &frame[..len];
        if len < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14] != 0x45 {
            continue;
        }
        if frame[23] != 17 || u16::from_be_bytes([frame[36], frame[37]]) != RX_PORT {
            continue;
        }
        let datagram = &frame[42..];
        if datagram.len() > wire::FRAGMENT_HEADER_LEN + wire::TAG_LEN
            && datagram[5] == wire::Kind::Fragment as u8
            && let Some(family) = wire::peek_family(datagram)
        {
            seen.lock().unwrap().insert(family, datagram.to_vec());
        }
    }
}

/// A forger on the network: for every family whose FRAGMENTs it saw, sends to the family's
/// group and to each host FRAGMENTs of the right family and generation sealed with a wrong
/// key (filled with 0xEE), and copies of a real FRAGMENT with one payload bit flipped.
/// Returns how many it sent.
fn forge_until(stop: &AtomicBool, seen: &Seen, targets: &[Ipv4Addr], local: Ipv4Addr) -> u64 {
    let wrong_key = McastKey::new(ClusterKey::generate());
    let socket = UdpSocket::bind(SocketAddrV4::new(local, 0)).unwrap();
    socket.set_multicast_ttl_v4(1).unwrap();
    let groups = McdistSection::default();
    let garbage = [0xeeu8; 1400];
    let mut out = Vec::new();
    let mut sent = 0u64;
    let mut send = |datagram: &[u8], group: Ipv4Addr| {
        let _ = socket.send_to(datagram, SocketAddrV4::new(group, RX_PORT));
        for target in targets {
            let _ = socket.send_to(datagram, SocketAddrV4::new(*target, RX_PORT));
        }
        sent += 1;
    };
    let deadline = Instant::now() + Duration::from_secs(240);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let real: Vec<(u64, Vec<u8>)> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(family, datagram)| (*family, datagram.clone()))
            .collect();
        for (family, datagram) in real {
            let group = groups.group_of(family);
            let generation = u32::from_le_bytes(datagram[16..20].try_into().unwrap());
            let sealer = FragmentSealer::new(wrong_key.fragment_key(family, generation));
            for page in 0..512u64 {
                for (index, offset) in [(0u8, 0u16), (1, 1368), (2, 2736)] {
                    let len = if index == 2 { 1360 } else { 1368 };
                    let header = Header {
                        flags: 0,
                        family,
                        generation,
                        sender: 0,
                    };
                    let fragment = Fragment {
                        page,
                        index,
                        count: 3,
                        offset,
                        data: &garbage[..len],
                    };
                    wire::encode_fragment(&sealer, &mut out, &header, &fragment).unwrap();
                    send(&out, group);
                }
            }
            for bit in 0..64 {
                let mut corrupted = datagram.clone();
                corrupted[wire::FRAGMENT_HEADER_LEN + bit] ^= 1;
                send(&corrupted, group);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sent
}

#[test]
fn forged_datagrams_are_counted_and_never_installed() {
    let expected = serial_hits(16);
    let (cluster, _dir) = cluster(4, 3, rx_path("xdp"));
    let h1 = cluster.host(0).unwrap().socket.clone();
    // One host on each receive path.
    let tuned = call(
        &cluster.host(2).unwrap().socket,
        &ApiRequest::NetTune(NetTune {
            rx_path: Some(snowflock_control::config::RxPath::Sockets),
            ..NetTune::default()
        }),
    );
    match tuned {
        ApiResponse::Net(status) => assert_eq!(status.rx_path, "sockets", "{status:#?}"),
        other => panic!("sf net tune answered {other:?}"),
    }
    let forger = cluster.host(3).unwrap().clone();
    let targets = [
        cluster.host(1).unwrap().address,
        cluster.host(2).unwrap().address,
    ];
    let switch = cluster.switch_netns().to_owned();
    // The switch port towards h2: h2 receives the family's fragments.
    let port = cluster.host(1).unwrap().netns.clone();
    let stop = AtomicBool::new(false);
    let seen = Seen::default();
    let sent = std::thread::scope(|s| {
        let sniffing = s.spawn(|| in_netns(&switch, || sniff_until(&stop, &port, &seen)));
        let forging = s.spawn(|| {
            in_netns(&forger.netns, || {
                forge_until(&stop, &seen, &targets, forger.address)
            })
        });
        run_and_check(&h1, 16, &expected);
        stop.store(true, Ordering::Relaxed);
        sniffing.join().unwrap();
        forging.join().unwrap()
    });
    assert!(sent > 0, "the forger never saw a family's fragments");
    let mut mac_failed = 0;
    for host in &cluster.hosts()[1..3] {
        let status = net_show(&host.socket);
        mac_failed += status.rx.mac_failed;
    }
    assert!(mac_failed > 0, "no forged datagram was counted");
    cluster.down().unwrap();
}

/// Whether `eth0` of `netns` has an XDP program and whether a socket holds an mcdist port.
fn xdp_and_socket(netns: &str) -> (bool, bool) {
    let link = Command::new("ip")
        .args(["-n", netns, "-d", "link", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout).to_string();
    let sockets = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-uanH"])
        .output()
        .unwrap();
    let sockets = String::from_utf8_lossy(&sockets.stdout).to_string();
    (
        link.contains("prog/xdp"),
        [SERVER_PORT, RX_PORT]
            .iter()
            .any(|port| sockets.contains(&format!(":{port} "))),
    )
}

fn wait_until_released(netns: &str, how: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = xdp_and_socket(netns);
        if state == (false, false) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {how}, {netns} still has (xdp, socket) = {state:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_xdp_program_and_sockets_go_when_sfd_stops_or_crashes() {
    let (mut cluster, _dir) = cluster(2, 2, rx_path("xdp"));
    let netns = cluster.host(1).unwrap().netns.clone();
    assert_eq!(xdp_and_socket(&netns), (true, true));
    cluster.stop_host(1).unwrap();
    wait_until_released(&netns, "SIGTERM");
    cluster.start_host(1).unwrap();
    assert_eq!(xdp_and_socket(&netns), (true, true));
    cluster.kill_host(1).unwrap();
    wait_until_released(&netns, "SIGKILL");
    cluster.down().unwrap();
}
