//! The local test cluster (`snowflock_testkit`) on real network namespaces, with stand-in
//! daemons (see `support`). Every test uses its own random prefix, and traffic goes only between
//! the namespaces it created. The tests that need the real `sfd` or the `sf cluster` commands
//! are the `sf` crate's (`tools/tests/netns_cluster.rs`).

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use snowflock_control::config::DaemonConfig;
use snowflock_control::error_chain;
use snowflock_testkit::{
    self as testkit, ClusterRecord, HostError, HostInfo, NetnsCluster, NoSuchHost,
    StartDaemonError, UpError, UpProgress,
};
use support::*;

// ---------------------------------------------------------------------------------------------
// Observations

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// has no `ping` binary). True if a reply came.
const PING: &str = r#"
import os, socket, struct, sys, time
dst = sys.argv[1]
def checksum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff
ident = os.getpid() & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(0.2)
for seq in range(1, 4):
    payload = b"snowflock-ping"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    s.sendto(struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq) + payload, (dst, 0))
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            continue
        ihl = (data[0] & 0xf) * 4
        kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if addr[0] == dst and kind == 0 and rid == ident and rseq == seq:
            sys.exit(0)
sys.exit(1)
"#;

fn ping(from: &HostInfo, to: &str) -> bool {
    from.command(python())
        .args(["-c", PING, to])
        .status()
        .unwrap()
        .success()
}

/// Reads `child`'s stdout lines on a thread; lines arrive on the returned channel.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits up to 5 s for `child` to exit, then kills it.
fn reap(mut child: Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn up_builds_the_topology_and_down_removes_everything() {
    let fixture = Fixture::new();
    let mut spec = fixture.spec("c", 3, StandIn::Listens);
    let steps = Arc::new(Mutex::new(Vec::new()));
    spec.progress = Some(UpProgress(Arc::new({
        let steps = steps.clone();
        move |step: &str| steps.lock().unwrap().push(step.to_string())
    })));
    let dir = spec.dir.clone();
    let cluster = NetnsCluster::up(spec).unwrap();
    let prefix = cluster.prefix().to_owned();

    // `up` said what it did, in order, and ended with every daemon ready.
    let steps = steps.lock().unwrap().clone();
    assert_eq!(
        steps[0], "building 3 host namespaces and the switch",
        "{steps:?}"
    );
    assert_eq!(steps[1], "starting 3 daemons", "{steps:?}");
    assert_eq!(steps.last().unwrap(), "3 of 3 daemons ready", "{steps:?}");

    // Namespaces: a switch and one per host.
    let mut expected = vec![
        format!("{prefix}-h1"),
        format!("{prefix}-h2"),
        format!("{prefix}-h3"),
    ];
    expected.push(format!("{prefix}-sw"));
    assert_eq!(namespaces(&prefix), expected);

    // The bridge floods multicast; every host is a port.
    let switch = cluster.switch_netns().to_owned();
    let bridge = ip(&["-n", &switch, "-d", "link", "show", "br0"]);
    assert!(bridge.contains("mcast_snooping 0"), "{bridge}");
    assert!(
        bridge.contains("state UP") || bridge.contains(",UP"),
        "{bridge}"
    );
    let ports = ip(&["-n", &switch, "link", "show", "master", "br0"]);
    for host in cluster.hosts() {
        assert!(
            ports.contains(&host.netns),
            "{} not on the bridge: {ports}",
            host.netns
        );
    }

    for (i, host) in cluster.hosts().iter().enumerate() {
        let n = i + 1;
        assert_eq!(host.name, format!("h{n}"));
        assert_eq!(host.address.to_string(), format!("10.77.0.{n}"));
        assert_eq!(host.control.to_string(), format!("10.77.0.{n}:7070"));
        assert_eq!(host.pages.to_string(), format!("10.77.0.{n}:7071"));
        // Addresses, routes: eth0 on the subnet, a multicast route, no way out.
        let addrs = ip(&["-n", &host.netns, "-4", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains(&format!("inet 10.77.0.{n}/24")), "{addrs}");
        let routes = ip(&["-n", &host.netns, "route", "show", "table", "all"]);
        assert!(routes.contains("224.0.0.0/4 dev eth0"), "{routes}");
        assert!(!routes.contains("default"), "{routes}");
        let lo = ip(&["-n", &host.netns, "link", "show", "lo"]);
        assert!(lo.contains("UP"), "{lo}");

        // The daemon: running in its namespace, with RUST_LOG, its socket accepting.
        let pid = host.pid.unwrap();
        assert!(alive(pid));
        assert!(
            in_netns(pid, &host.netns),
            "daemon of {} not in {}",
            host.name,
            host.netns
        );
        UnixStream::connect(&host.socket).unwrap();
        let log = fs::read_to_string(&host.log).unwrap();
        assert!(log.contains("RUST_LOG=snowflock=debug"), "{log}");

        // Its configuration is what the real daemon reads.
        let config = DaemonConfig::load(&host.config).unwrap();
        assert_eq!(config.host.name, host.name);
        assert_eq!(config.host.state_dir, host.state_dir);
        assert_eq!(config.listen.control, host.control);
        assert_eq!(config.listen.pages, host.pages);
        assert_eq!(config.cluster.key_file, cluster.key_file());
        let members: Vec<_> = config
            .cluster
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.control))
            .collect();
        let hosts: Vec<_> = cluster
            .hosts()
            .iter()
            .map(|h| (h.name.as_str(), h.control))
            .collect();
        assert_eq!(members, hosts);
        assert_eq!(config.limits.clone_slots, 16);
        assert_eq!(config.limits.fetch_timeout_ms, 5000);
    }

    // The key: 64 hex digits, owner-only.
    let key = fs::read_to_string(cluster.key_file()).unwrap();
    assert_eq!(key.trim().len(), 64);
    assert!(key.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        fs::metadata(cluster.key_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // The state file describes it all.
    let record = ClusterRecord::load(&dir).unwrap();
    assert_eq!(&record, cluster.record());
    assert!(
        cluster
            .status()
            .iter()
            .all(|h| h.running && h.accepting && h.netns_exists)
    );

    let pids = pids(&cluster);
    cluster.down().unwrap();
    assert_nothing_left(&prefix, &pids, &dir);
}

#[test]
fn hosts_reach_each_other_over_the_bridge() {
    let fixture = Fixture::new();
    let cluster = NetnsCluster::up(fixture.spec("c", 3, StandIn::Listens)).unwrap();
    for from in cluster.hosts() {
        for to in cluster.hosts() {
            if from.name != to.name {
                let to = to.address.to_string();
                assert!(ping(from, &to), "{} cannot reach {to}", from.name);
            }
        }
    }
    // Nothing answers outside the cluster's hosts.
    assert!(!ping(&cluster.hosts()[0], "10.77.0.99"));
    cluster.down().unwrap();
}

const MCAST_RECEIVE: &str = r#"
import socket, struct, sys
group, port, local = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((group, port))
mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(local))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
s.settimeout(10)
print("ready", flush=True)
data, addr = s.recvfrom(1500)
print(data.decode(), addr[0], flush=True)
"#;

const MCAST_SEND: &str = r#"
import socket, sys, time
group, port, local, message = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
for _ in range(20):
    s.sendto(message.encode(), (group, port))
    time.sleep(0.1)
"#;

#[test]
fn multicast_from_one_host_reaches_every_other_host() {
    const GROUP: &str = "239.77.0.1";
    const PORT: &str = "7077";
    let fixture = Fixture::new();
    let cluster = NetnsCluster::up(fixture.spec("c", 3, StandIn::Listens)).unwrap();
    let hosts = cluster.hosts();

    let mut receivers = Vec::new();
    for host in &hosts[1..] {
        let mut child = host
            .command(python())
            .args(["-c", MCAST_RECEIVE, GROUP, PORT, &host.address.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = lines(&mut child);
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(first, "ready", "{}", host.name);
        receivers.push((host.name.clone(), child, rx));
    }
    let sent = hosts[0]
        .command(python())
        .args([
            "-c",
            MCAST_SEND,
            GROUP,
            PORT,
            &hosts[0].address.to_string(),
            "hello-from-h1",
        ])
        .status()
        .unwrap();
    assert!(sent.success());
    for (name, child, rx) in receivers {
        let got = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(
            got.as_deref(),
            Ok("hello-from-h1 10.77.0.1"),
            "{name} missed the datagram"
        );
        reap(child);
    }
    cluster.down().unwrap();
}

#[test]
fn a_daemon_that_fails_at_once_fails_up_and_leaves_nothing_behind() {
    let fixture = Fixture::new();
    let spec = fixture.spec("c", 2, StandIn::FailsAtOnce);
    let (prefix, dir) = (spec.prefix.clone().unwrap(), spec.dir.clone());
    let started = Instant::now();
    let err = NetnsCluster::up(spec).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    let UpError::StartDaemon(StartDaemonError::DaemonExited {
        ref host, ref tail, ..
    }) = err
    else {
        panic!("expected DaemonExited, got {}", error_chain(&err));
    };
    assert!(host == "h1" || host == "h2", "{host}");
    assert!(tail.contains("refusing to start with"), "{tail}");
    assert!(err.to_string().contains("refusing to start"), "{err}");
    assert_nothing_left(&prefix, &[], &dir);
}

#[test]
fn a_daemon_that_never_listens_fails_up_at_the_ready_bound() {
    let fixture = Fixture::new();
    let mut spec = fixture.spec("c", 1, StandIn::NeverListens);
    spec.ready_timeout = Duration::from_millis(500);
    let (prefix, dir) = (spec.prefix.clone().unwrap(), spec.dir.clone());
    let started = Instant::now();
    let err = NetnsCluster::up(spec).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            UpError::StartDaemon(StartDaemonError::DaemonNotReady { .. })
        ),
        "{}",
        error_chain(&err)
    );
    assert!(
        err.to_string().contains("stand-in sfd: state_dir="),
        "{err}"
    );
    assert_nothing_left(&prefix, &[], &dir);
}

#[test]
fn dropping_during_a_panic_cleans_up() {
    let fixture = Fixture::new();
    let spec = fixture.spec("c", 2, StandIn::Listens);
    let (prefix, dir) = (spec.prefix.clone().unwrap(), spec.dir.clone());
    let mut seen = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = NetnsCluster::up(spec).unwrap();
        seen = pids(&cluster);
        panic!("a test failing while its cluster is up");
    }));
    assert!(outcome.is_err());
    assert_eq!(seen.len(), 2);
    assert_nothing_left(&prefix, &seen, &dir);
}

#[test]
fn two_clusters_run_side_by_side() {
    let fixture = Fixture::new();
    let a = NetnsCluster::up(fixture.spec("a", 2, StandIn::Listens)).unwrap();
    let b = NetnsCluster::up(fixture.spec("b", 2, StandIn::Listens)).unwrap();
    assert_ne!(a.prefix(), b.prefix());
    assert_eq!(namespaces(a.prefix()).len(), 3);
    assert_eq!(namespaces(b.prefix()).len(), 3);
    // Same addresses, separate networks.
    assert!(ping(&a.hosts()[0], "10.77.0.2"));
    assert!(ping(&b.hosts()[1], "10.77.0.1"));

    let (b_prefix, b_pids, b_dir) = (b.prefix().to_owned(), pids(&b), b.dir().to_owned());
    b.down().unwrap();
    assert_nothing_left(&b_prefix, &b_pids, &b_dir);
    // Taking one down leaves the other working.
    assert!(a.status().iter().all(|h| h.running && h.accepting));
    assert!(ping(&a.hosts()[1], "10.77.0.1"));
    a.down().unwrap();
}

#[test]
fn a_taken_prefix_or_directory_is_refused_and_the_first_cluster_survives() {
    let fixture = Fixture::new();
    let first = NetnsCluster::up(fixture.spec("a", 1, StandIn::Listens)).unwrap();

    let mut same_prefix = fixture.spec("b", 1, StandIn::Listens);
    same_prefix.prefix = Some(first.prefix().to_owned());
    let err = NetnsCluster::up(same_prefix).unwrap_err();
    assert!(
        matches!(err, UpError::PrefixInUse { .. }),
        "{}",
        error_chain(&err)
    );
    assert!(!fixture.dir("b").exists());

    let mut same_dir = fixture.spec("a", 1, StandIn::Listens);
    same_dir.dir = first.dir().to_owned();
    let err = NetnsCluster::up(same_dir).unwrap_err();
    assert!(
        matches!(err, UpError::StateExists { .. }),
        "{}",
        error_chain(&err)
    );

    assert_eq!(namespaces(first.prefix()).len(), 2);
    assert!(first.status().iter().all(|h| h.running && h.accepting));
    assert!(first.dir().join(testkit::STATE_FILE).exists());
    first.down().unwrap();
}

#[test]
fn kill_stop_and_start_a_host() {
    let fixture = Fixture::new();
    let mut cluster = NetnsCluster::up(fixture.spec("c", 2, StandIn::Listens)).unwrap();
    let [h1, h2] = pids(&cluster)[..] else {
        unreachable!()
    };

    cluster.kill_host(1).unwrap();
    assert!(!alive(h2), "SIGKILLed daemon still running");
    assert!(alive(h1));
    assert_eq!(cluster.hosts()[1].pid, None);
    let status = cluster.status();
    assert!(status[0].running && status[0].accepting);
    assert!(!status[1].running && !status[1].accepting && status[1].netns_exists);
    assert_eq!(
        ClusterRecord::load(cluster.dir()).unwrap().hosts[1].pid,
        None
    );

    cluster.start_host(1).unwrap();
    let again = cluster.hosts()[1].pid.unwrap();
    assert_ne!(again, h2);
    assert!(cluster.status().iter().all(|h| h.running && h.accepting));
    assert!(matches!(
        cluster.start_host(1),
        Err(HostError::AlreadyRunning { .. })
    ));

    cluster.stop_host(0).unwrap();
    assert!(!alive(h1));
    assert!(matches!(
        cluster.kill_host(2),
        Err(HostError::NoSuchHost(NoSuchHost { index: 2, hosts: 2 }))
    ));
    // A stopped host is simply skipped by down.
    cluster.down().unwrap();
    assert!(gone_soon(again));
}

#[test]
fn a_daemon_ignoring_sigterm_is_killed_after_the_stop_timeout() {
    let fixture = Fixture::new();
    let mut spec = fixture.spec("c", 2, StandIn::IgnoresSigterm);
    spec.stop_timeout = Duration::from_millis(300);
    let (prefix, dir) = (spec.prefix.clone().unwrap(), spec.dir.clone());
    let mut cluster = NetnsCluster::up(spec).unwrap();
    let pids = pids(&cluster);

    let started = Instant::now();
    cluster.stop_host(0).unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(!alive(pids[0]));

    cluster.down().unwrap();
    assert_nothing_left(&prefix, &pids, &dir);
}

#[test]
fn down_kills_stray_processes_in_the_namespaces() {
    let fixture = Fixture::new();
    let cluster = NetnsCluster::up(fixture.spec("c", 1, StandIn::Listens)).unwrap();
    let stray = cluster.hosts()[0]
        .command("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let stray_pid = stray.id();
    // `ip netns exec` execs sleep in place: wait for it to be inside the namespace.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !in_netns(stray_pid, &cluster.hosts()[0].netns) {
        assert!(
            Instant::now() < deadline,
            "stray process never entered the namespace"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    cluster.down().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(gone_soon(stray_pid));
    reap(stray);
}

#[test]
fn the_largest_cluster_comes_up() {
    let fixture = Fixture::new();
    let cluster =
        NetnsCluster::up(fixture.spec("c", testkit::MAX_HOSTS, StandIn::Listens)).unwrap();
    assert_eq!(cluster.prefix().len(), testkit::MAX_PREFIX_LEN);
    assert_eq!(namespaces(cluster.prefix()).len(), testkit::MAX_HOSTS + 1);
    let last = &cluster.hosts()[testkit::MAX_HOSTS - 1];
    assert_eq!(
        (last.name.as_str(), last.address.to_string()),
        ("h32", "10.77.0.32".into())
    );
    assert!(ping(&cluster.hosts()[0], "10.77.0.32"));
    cluster.down().unwrap();
}
