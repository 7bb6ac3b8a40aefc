//! The local test cluster (`snowflock_tools::cluster`) on real network namespaces.
//!
//! Needs root, iproute2 and python3; a missing one fails the test with a message saying so.
//! Most tests run a stand-in daemon (a shell script + python3) that only listens on
//! `{state_dir}/sfd.sock`, so they test the namespace plumbing, not `sfd`; one test runs the
//! real `sfd`. Every test uses its own random prefix, and traffic goes only between the
//! namespaces it created.

#[allow(dead_code)]
#[path = "../src/cluster_cli.rs"]
mod cluster_cli;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use snowflock_control::config::DaemonConfig;
use snowflock_tools::cluster::{
    self, Cluster, ClusterError, ClusterRecord, ClusterSpec, HostInfo, random_prefix,
};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Environment and stand-in daemons

/// The python3 interpreter's real path (not a pyenv shim), after checking root and `ip`.
fn python() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = PYTHON.get_or_init(|| {
        if fs::metadata("/proc/self").map_err(|e| e.to_string())?.uid() != 0 {
            return Err("these tests create network namespaces and must run as root".into());
        }
        let ip = Command::new("ip").arg("-V").output();
        if !ip.is_ok_and(|o| o.status.success()) {
            return Err("iproute2's `ip` is required".into());
        }
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .map_err(|e| format!("python3 is required: {e}"))?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || path.is_empty() {
            return Err("python3 is required and must report sys.executable".into());
        }
        Ok(PathBuf::from(path))
    });
    match found {
        Ok(path) => path,
        Err(problem) => panic!("test environment: {problem}"),
    }
}

/// Listens on `{state_dir}/sfd.sock` until SIGTERM (or ignores SIGTERM if argv[2] says so).
/// The config path stays on its command line, as on the real daemon's.
const LISTENER: &str = r#"
import os, signal, socket, sys
state_dir, on_term = sys.argv[1], sys.argv[2]
if on_term == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
path = os.path.join(state_dir, "sfd.sock")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(64)
print("stand-in sfd listening on", path, flush=True)
while True:
    conn, _ = s.accept()
    conn.close()
"#;

#[derive(Clone, Copy, Debug)]
enum StandIn {
    /// Listens; exits on SIGTERM.
    Listens,
    /// Listens; ignores SIGTERM (only SIGKILL ends it).
    IgnoresSigterm,
    /// Prints a complaint and exits 1 at once.
    FailsAtOnce,
    /// Runs but never listens.
    NeverListens,
}

/// Writes a stand-in `sfd` (`sfd --config FILE`) into `dir` and returns its path.
fn stand_in(dir: &Path, kind: StandIn) -> PathBuf {
    let python = python().display();
    let run = match kind {
        StandIn::Listens => {
            format!("exec {python} -c '{LISTENER}' \"$state_dir\" exit --config \"$2\"")
        }
        StandIn::IgnoresSigterm => {
            format!("exec {python} -c '{LISTENER}' \"$state_dir\" ignore --config \"$2\"")
        }
        StandIn::FailsAtOnce => {
            "echo \"stand-in sfd: refusing to start with $2\" >&2; exit 1".into()
        }
        StandIn::NeverListens => {
            format!("exec {python} -c 'import time; time.sleep(60)' --config \"$2\"")
        }
    };
    let script = format!(
        "#!/bin/sh\n\
         # Stand-in for sfd: `sfd --config FILE`.\n\
         set -eu\n\
         [ \"$1\" = --config ] || {{ echo \"usage: $0 --config FILE\" >&2; exit 2; }}\n\
         state_dir=$(sed -n 's/^state_dir = \"\\(.*\\)\"$/\\1/p' \"$2\")\n\
         echo \"stand-in sfd: state_dir=$state_dir RUST_LOG=${{RUST_LOG-}}\"\n\
         {run}\n"
    );
    let path = dir.join(format!("sfd-{kind:?}").to_lowercase());
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

struct Fixture {
    tmp: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        python();
        Fixture {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A spec for `hosts` hosts in `DIR/{name}` with a fresh prefix and a short ready bound.
    fn spec(&self, name: &str, hosts: usize, daemon: StandIn) -> ClusterSpec {
        let mut spec = ClusterSpec::new(hosts, self.dir(name), stand_in(self.tmp.path(), daemon));
        spec.prefix = Some(random_prefix().unwrap());
        spec.log_filter = "snowflock=debug".into();
        spec.ready_timeout = Duration::from_secs(15);
        spec
    }
}

// ---------------------------------------------------------------------------------------------
// Observations

/// Namespaces in /run/netns whose names start with `{prefix}-`.
fn namespaces(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Waits up to 5 s for `pid` to stop running.
fn gone_soon(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Whether `pid` lives in network namespace `netns`.
fn in_netns(pid: u32, netns: &str) -> bool {
    let (Ok(a), Ok(b)) = (
        fs::metadata(format!("/proc/{pid}/ns/net")),
        fs::metadata(format!("/run/netns/{netns}")),
    ) else {
        return false;
    };
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

fn pids(cluster: &Cluster) -> Vec<u32> {
    cluster
        .hosts()
        .iter()
        .map(|h| h.pid.expect("a running host has a pid"))
        .collect()
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks that `up` left nothing: no namespaces, no daemons, no state directory.
fn assert_nothing_left(prefix: &str, pids: &[u32], dir: &Path) {
    assert_eq!(
        namespaces(prefix),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    for &pid in pids {
        assert!(gone_soon(pid), "daemon {pid} still running");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// One ICMP echo (3 tries, 1 s each) from inside `from` to `to`, with a raw socket (this machine
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
    let spec = fixture.spec("c", 3, StandIn::Listens);
    let dir = spec.dir.clone();
    let cluster = Cluster::up(spec).unwrap();
    let prefix = cluster.prefix().to_owned();

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
    let cluster = Cluster::up(fixture.spec("c", 3, StandIn::Listens)).unwrap();
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
    let cluster = Cluster::up(fixture.spec("c", 3, StandIn::Listens)).unwrap();
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
    let err = Cluster::up(spec).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    let ClusterError::DaemonExited {
        ref host, ref tail, ..
    } = err
    else {
        panic!("expected DaemonExited, got {}", cluster::chain(&err));
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
    let err = Cluster::up(spec).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, ClusterError::DaemonNotReady { .. }),
        "{}",
        cluster::chain(&err)
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
        let cluster = Cluster::up(spec).unwrap();
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
    let a = Cluster::up(fixture.spec("a", 2, StandIn::Listens)).unwrap();
    let b = Cluster::up(fixture.spec("b", 2, StandIn::Listens)).unwrap();
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
    let first = Cluster::up(fixture.spec("a", 1, StandIn::Listens)).unwrap();

    let mut same_prefix = fixture.spec("b", 1, StandIn::Listens);
    same_prefix.prefix = Some(first.prefix().to_owned());
    let err = Cluster::up(same_prefix).unwrap_err();
    assert!(
        matches!(err, ClusterError::PrefixInUse { .. }),
        "{}",
        cluster::chain(&err)
    );
    assert!(!fixture.dir("b").exists());

    let mut same_dir = fixture.spec("a", 1, StandIn::Listens);
    same_dir.dir = first.dir().to_owned();
    let err = Cluster::up(same_dir).unwrap_err();
    assert!(
        matches!(err, ClusterError::StateExists { .. }),
        "{}",
        cluster::chain(&err)
    );

    assert_eq!(namespaces(first.prefix()).len(), 2);
    assert!(first.status().iter().all(|h| h.running && h.accepting));
    assert!(first.dir().join(cluster::STATE_FILE).exists());
    first.down().unwrap();
}

#[test]
fn kill_stop_and_start_a_host() {
    let fixture = Fixture::new();
    let mut cluster = Cluster::up(fixture.spec("c", 2, StandIn::Listens)).unwrap();
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
        Err(ClusterError::AlreadyRunning { .. })
    ));

    cluster.stop_host(0).unwrap();
    assert!(!alive(h1));
    assert!(matches!(
        cluster.kill_host(2),
        Err(ClusterError::NoSuchHost { index: 2, hosts: 2 })
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
    let mut cluster = Cluster::up(spec).unwrap();
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
    let cluster = Cluster::up(fixture.spec("c", 1, StandIn::Listens)).unwrap();
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
fn the_cli_brings_a_cluster_up_reports_it_and_takes_it_down() {
    let fixture = Fixture::new();
    let dir = fixture.dir("cli");
    let prefix = random_prefix().unwrap();
    let up = cluster_cli::UpArgs {
        hosts: 2,
        dir: dir.clone(),
        prefix: Some(prefix.clone()),
        slots: 4,
        fetch_timeout_ms: 2500,
        sfd: Some(stand_in(fixture.tmp.path(), StandIn::Listens)),
        log: "debug".into(),
        distribution: snowflock_control::config::Distribution::Unicast,
        rx_path: snowflock_control::config::RxPath::Sockets,
        json: false,
    };
    assert_eq!(cluster_cli::up(up).unwrap(), ExitCode::SUCCESS);

    // `up` returned and the cluster keeps running, described by its state file.
    let record = ClusterRecord::load(&dir).unwrap();
    assert_eq!(record.prefix, prefix);
    let pids: Vec<u32> = record.hosts.iter().map(|h| h.pid.unwrap()).collect();
    assert!(pids.iter().all(|&p| alive(p)));
    let config = DaemonConfig::load(&record.hosts[0].config).unwrap();
    assert_eq!(
        config.mcdist.distribution,
        snowflock_control::config::Distribution::Unicast
    );
    assert_eq!(
        (config.limits.clone_slots, config.limits.fetch_timeout_ms),
        (4, 2500)
    );
    let status = |json| {
        cluster_cli::status(cluster_cli::StatusArgs {
            dir: dir.clone(),
            json,
        })
    };
    assert_eq!(status(false).unwrap(), ExitCode::SUCCESS);
    assert_eq!(status(true).unwrap(), ExitCode::SUCCESS);

    // A daemon dying shows in the status.
    Command::new("kill")
        .args(["-KILL", &pids[1].to_string()])
        .status()
        .unwrap();
    assert!(gone_soon(pids[1]));
    assert_eq!(status(false).unwrap(), ExitCode::FAILURE);

    // `down` from the state file alone (as another `sf` process would).
    let down = cluster_cli::DownArgs {
        dir: dir.clone(),
        prefix: None,
    };
    assert_eq!(cluster_cli::down(down).unwrap(), ExitCode::SUCCESS);
    assert_nothing_left(&prefix, &pids, &dir);
    assert!(
        cluster_cli::status(cluster_cli::StatusArgs {
            dir: dir.clone(),
            json: false
        })
        .is_err()
    );
}

#[test]
fn down_by_prefix_cleans_up_a_cluster_whose_state_file_is_lost() {
    let fixture = Fixture::new();
    let cluster = Cluster::up(fixture.spec("c", 2, StandIn::Listens)).unwrap();
    let (prefix, pids) = (cluster.prefix().to_owned(), pids(&cluster));
    let record = cluster.detach();
    fs::remove_file(record.dir.join(cluster::STATE_FILE)).unwrap();

    let down = cluster_cli::DownArgs {
        dir: record.dir.clone(),
        prefix: Some(prefix.clone()),
    };
    assert_eq!(cluster_cli::down(down).unwrap(), ExitCode::SUCCESS);
    assert_eq!(namespaces(&prefix), Vec::<String>::new());
    for pid in pids {
        assert!(gone_soon(pid), "daemon {pid} survived");
    }
}

/// Opens (and closes) a TCP connection to argv[1]:argv[2] within 2 s.
const TCP_CONNECT: &str = r#"
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
"#;

#[test]
fn the_real_sfd_comes_up_on_every_host() {
    let fixture = Fixture::new();
    let mut spec = ClusterSpec::new(2, fixture.dir("real"), env!("CARGO_BIN_EXE_sfd"));
    spec.prefix = Some(random_prefix().unwrap());
    let (prefix, dir) = (spec.prefix.clone().unwrap(), spec.dir.clone());
    let cluster = match Cluster::up(spec) {
        Ok(cluster) => cluster,
        Err(e) => panic!("the real sfd did not come up: {}", cluster::chain(&e)),
    };
    let pids = pids(&cluster);
    for host in cluster.hosts() {
        assert!(in_netns(host.pid.unwrap(), &host.netns));
        UnixStream::connect(&host.socket).unwrap();
    }
    // Each daemon serves its control and pages ports on its own address, reachable from the
    // other host.
    let [h1, h2] = cluster.hosts() else {
        unreachable!()
    };
    for port in [h2.control.port(), h2.pages.port()] {
        let connected = h1
            .command(python())
            .args([
                "-c",
                TCP_CONNECT,
                &h2.address.to_string(),
                &port.to_string(),
            ])
            .status()
            .unwrap();
        assert!(
            connected.success(),
            "h1 cannot connect to {}:{port}",
            h2.address
        );
    }
    // The daemons end on SIGTERM, without needing SIGKILL.
    let started = Instant::now();
    cluster.down().unwrap();
    assert!(
        started.elapsed() < cluster::DEFAULT_STOP_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    assert_nothing_left(&prefix, &pids, &dir);
}

#[test]
fn the_largest_cluster_comes_up() {
    let fixture = Fixture::new();
    let cluster = Cluster::up(fixture.spec("c", cluster::MAX_HOSTS, StandIn::Listens)).unwrap();
    assert_eq!(cluster.prefix().len(), cluster::MAX_PREFIX_LEN);
    assert_eq!(namespaces(cluster.prefix()).len(), cluster::MAX_HOSTS + 1);
    let last = &cluster.hosts()[cluster::MAX_HOSTS - 1];
    assert_eq!(
        (last.name.as_str(), last.address.to_string()),
        ("h32", "10.77.0.32".into())
    );
    assert!(ping(&cluster.hosts()[0], "10.77.0.32"));
    cluster.down().unwrap();
}
