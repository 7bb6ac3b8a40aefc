//! Chaos on real daemons in network-namespace hosts: daemons killed mid-transfer while several
//! clone families run, a host's link down during a transfer, a switch that loses, reorders,
//! duplicates and corrupts datagrams, a full disk under a daemon, guest memory larger than the
//! host, and a hostile guest beside a well-behaved one.
//!
//! Every scenario checks four things: the job ends (or is refused) within a stated bound, a
//! failure says what failed, the surviving daemons' fds, threads and clone slots return to
//! what they were before, and the daemons still run a job afterwards. Bounds are generous: they
//! hold on a loaded 2-core machine. Each scenario prints what it measured (`chaos: ...`).
//!
//! Every test makes its own cluster with a random prefix; the cluster is removed when the test
//! ends, also when it fails.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use snowflock_control::VmOutcome;
use snowflock_control::protocol::{ApiRequest, ApiResponse, ChildSummary, HostStats};
use snowflock_testkit::{ClusterSpec, HostInfo, NetnsCluster};

/// Guest memory of every job: one size, so the daemons' pools of prepared VMs look the same
/// before and after.
const MEM: u64 = 128 << 20;
const MEM_ARG: &str = "128M";
/// Each daemon's metrics port (for `snowflock_clone_slots_in_use`).
const METRICS_PORT: u16 = 9464;
/// A slow faulter: each child reads 600 pages of its parent's 32 MiB, one every 5 ms, for 3 s
/// or more (two such jobs at once take ~12 s on 2 cores): a transfer still running when the
/// chaos starts. With two slots per host, three clones from one host put one on each of three
/// hosts, and so do three more from another host (see [`start_two_families`]).
const FETCHER: &str = "mib=32 clones=3 pages=600 interval_ms=5";
/// A short job to show a daemon still serves.
const CHECK_JOB: &str = "mib=8 clones=4";
/// Bound on a daemon's fds, threads and slots returning to their baseline (tokio's idle
/// blocking threads linger 10 s).
const SETTLE: Duration = Duration::from_secs(45);

fn chaos_cluster(hosts: usize, slots: u32, tune: impl FnOnce(&mut ClusterSpec)) -> ClusterGuard {
    let (cluster, dir) = cluster(hosts, slots, |spec| {
        spec.metrics_port = Some(METRICS_PORT);
        tune(spec);
    });
    ClusterGuard { cluster, _dir: dir }
}

/// A cluster and its state directory.
struct ClusterGuard {
    cluster: NetnsCluster,
    _dir: tempfile::TempDir,
}

impl ClusterGuard {
    fn host(&self, index: usize) -> HostInfo {
        self.cluster.host(index).unwrap().clone()
    }

    fn socket(&self, index: usize) -> PathBuf {
        self.host(index).socket
    }
}

/// A wait for a VM's end, on a thread of its own.
struct Waiting {
    socket: PathBuf,
    vm: u64,
    began: Instant,
    ended: mpsc::Receiver<(Ended, Instant)>,
}

impl Waiting {
    /// Starts waiting for VM `vm` of `socket`.
    fn on(socket: &Path, vm: u64) -> Waiting {
        let (tx, rx) = mpsc::channel();
        let waited = socket.to_path_buf();
        std::thread::spawn(move || {
            let ended = wait(&waited, vm);
            let _ = tx.send((ended, Instant::now()));
        });
        Waiting {
            socket: socket.to_path_buf(),
            vm,
            began: Instant::now(),
            ended: rx,
        }
    }

    /// How the VM ended and when, failing the test if it has not `bound` after the wait began.
    fn within(self, bound: Duration) -> (Ended, Instant) {
        let left = bound.saturating_sub(self.began.elapsed());
        match self.ended.recv_timeout(left) {
            Ok(ended) => ended,
            Err(_) => panic!(
                "vm {} did not end within {bound:?}; VMs: {:#?}\nclones: {:#?}",
                self.vm,
                call(&self.socket, &ApiRequest::Ps),
                stats(&self.socket)
                    .iter()
                    .map(|h| (
                        &h.host,
                        &h.error,
                        h.clones
                            .iter()
                            .map(|c| (c.family, &c.label, c.running, &c.outcome))
                            .collect::<Vec<_>>()
                    ))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

/// Waits for VM `vm` of `socket` to end, failing the test after `bound`; returns how it ended
/// and how long the wait took.
fn wait_within(socket: &Path, vm: u64, bound: Duration) -> (Ended, Duration) {
    let waiting = Waiting::on(socket, vm);
    let began = waiting.began;
    let (ended, at) = waiting.within(bound);
    (ended, at - began)
}

/// Runs `sf ARGS` against the daemon at `socket` (none: no daemon), killed after `bound`.
fn sf(socket: Option<&Path>, args: &[&str], bound: Duration) -> (Output, Duration) {
    let began = Instant::now();
    let mut command = Command::new("timeout");
    command
        .args(["--signal=KILL", &bound.as_secs().to_string()])
        .arg(env!("CARGO_BIN_EXE_sf"))
        .args(args)
        .stdin(Stdio::null());
    if let Some(socket) = socket {
        command.env("SNOWFLOCK_SOCKET", socket);
    }
    let output = command.output().unwrap();
    // timeout(1) exits 128 + 9 when it had to kill.
    assert_ne!(
        output.status.code(),
        Some(137),
        "sf {args:?} did not end within {bound:?}: {output:?}"
    );
    (output, began.elapsed())
}

/// Runs the short check job from `socket` and asserts every clone returned.
fn check_job_succeeds(socket: &Path) {
    let vm = start(socket, "touch", MEM, CHECK_JOB);
    let (ended, _) = wait_within(socket, vm, Duration::from_secs(120));
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    let report = &ended.reports[0];
    assert!(
        report
            .children
            .iter()
            .all(|c| matches!(c.outcome, VmOutcome::Result(_))),
        "{report:#?}"
    );
}

/// What a daemon holds: open fds, threads, clone slots in use, VMs, page caches of clone
/// points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holdings {
    fds: usize,
    threads: usize,
    slots_in_use: u64,
    vms: usize,
    caches: usize,
}

fn entries(dir: String) -> usize {
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .count()
}

/// `GET /metrics` of `host`'s daemon, from inside its namespace.
fn metrics(host: &HostInfo) -> String {
    let address = std::net::SocketAddr::new(host.control.ip(), METRICS_PORT);
    in_netns(&host.netns, move || {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: sfd\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    })
}

/// The sum of every sample of metric `name` (any labels).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn holdings(host: &HostInfo) -> Holdings {
    let pid = host.pid.expect("a running daemon");
    let vms = match call(&host.socket, &ApiRequest::Ps) {
        ApiResponse::Ps { hosts } => hosts
            .iter()
            .filter(|h| h.host == host.name)
            .map(|h| h.vms.as_ref().map_or(0, Vec::len))
            .sum(),
        other => panic!("sf ps answered {other:?}"),
    };
    let slots_in_use = metric_sum(&metrics(host), "snowflock_clone_slots_in_use") as u64;
    let caches = stats(&host.socket)
        .iter()
        .filter(|h| h.host == host.name)
        .map(|h| h.families.len())
        .sum();
    Holdings {
        fds: entries(format!("/proc/{pid}/fd")),
        threads: entries(format!("/proc/{pid}/task")),
        slots_in_use,
        vms,
        caches,
    }
}

/// What each open fd of process `pid` refers to.
fn fd_targets(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|target| target.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The TCP and UDP sockets in `host`'s namespace, as `ss` lists them.
fn sockets(host: &HostInfo) -> String {
    Command::new("ip")
        .args(["netns", "exec", &host.netns, "ss", "-tuanp"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Waits (bounded by [`SETTLE`]) until `host`'s daemon holds no more fds and threads than at
/// `baseline`, no slot, no VM and no page cache.
fn assert_back_to_baseline(host: &HostInfo, baseline: Holdings) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = holdings(host);
        if now.fds <= baseline.fds
            && now.threads <= baseline.threads
            && now.slots_in_use == 0
            && now.vms == 0
            && now.caches == 0
        {
            eprintln!("chaos: {} baseline {baseline:?}, after {now:?}", host.name);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}'s daemon still holds {now:?} {SETTLE:?} after the chaos; baseline {baseline:?}; \
             its fds: {:#?}\nits sockets:\n{}",
            host.name,
            fd_targets(host.pid.unwrap()),
            sockets(host)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs the check job from every host (warming pools and worker threads, and opening every
/// host's links to the others), then takes the baselines of `hosts`.
fn warm_up_and_baseline(guard: &ClusterGuard, hosts: &[usize]) -> Vec<Holdings> {
    for i in 0..guard.cluster.hosts().len() {
        check_job_succeeds(&guard.socket(i));
    }
    hosts
        .iter()
        .map(|&i| {
            let host = guard.host(i);
            let deadline = Instant::now() + SETTLE;
            // The pools refill in the background: wait until no VM and no slot is held.
            loop {
                let now = holdings(&host);
                if now.slots_in_use == 0 && now.vms == 0 && now.caches == 0 {
                    std::thread::sleep(Duration::from_millis(500));
                    return holdings(&host);
                }
                assert!(
                    Instant::now() < deadline,
                    "{} never settled: {now:?}",
                    host.name
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .collect()
}

/// Waits until `host` runs clones of `families` distinct families that have fetched pages.
fn wait_for_fetching_families(socket: &Path, host: &str, families: usize) {
    wait_for_stats(
        socket,
        &format!("{families} families fetching on {host}"),
        |hosts| {
            hosts.iter().any(|h| {
                let mut fetching: Vec<u64> = h
                    .clones
                    .iter()
                    .filter(|c| c.running && c.stats.pages_fetched > 0)
                    .map(|c| c.family)
                    .collect();
                fetching.sort_unstable();
                fetching.dedup();
                h.host == host && fetching.len() >= families
            })
        },
    );
}

/// Starts [`FETCHER`] on h1 (family A), waits until its clone on h3 fetches, then on h2
/// (family B), and waits until h3 has B's clone fetching too. Returns the two VMs.
fn start_two_families(h1: &Path, h2: &Path) -> (u64, u64) {
    let a = start(h1, "touch", MEM, FETCHER);
    wait_for_fetching_families(h1, "h3", 1);
    let b = start(h2, "touch", MEM, FETCHER);
    wait_for_fetching_families(h1, "h3", 2);
    (a, b)
}

/// Asserts that the children of `report` on `lost_hosts` were lost with a reason naming their
/// host, and every other child returned its result; returns how many were lost.
fn assert_lost_only_on(children: &[ChildSummary], lost_hosts: &[&str]) -> usize {
    let mut lost = 0;
    for child in children {
        match (&child.host, &child.outcome) {
            (Some(host), VmOutcome::Lost(reason)) if lost_hosts.contains(&host.as_str()) => {
                assert!(reason.contains(host.as_str()), "{child:?}: {reason}");
                lost += 1;
            }
            (host, VmOutcome::Result(_))
                if !host.as_deref().is_some_and(|h| lost_hosts.contains(&h)) => {}
            _ => panic!("child ended unexpectedly (lost hosts {lost_hosts:?}): {child:?}"),
        }
    }
    lost
}

#[test]
fn killing_a_clone_host_mid_transfer_loses_only_its_clones_in_every_family() {
    let mut guard = chaos_cluster(3, 2, |spec| {
        spec.peer_timeout_ms = Some(2000);
        spec.fetch_timeout_ms = 2000;
    });
    let baseline = warm_up_and_baseline(&guard, &[0, 1]);
    let (h1, h2) = (guard.socket(0), guard.socket(1));
    let (a, b) = start_two_families(&h1, &h2);
    let killed_at = Instant::now();
    guard.cluster.kill_host(2).unwrap();
    let bound = Duration::from_secs(60);
    for (socket, vm) in [(&h1, a), (&h2, b)] {
        let (ended, _) = wait_within(socket, vm, bound);
        // touch exits non-zero when a child did not exit normally.
        assert!(
            matches!(ended.outcome, VmOutcome::Exited(code) if code != 0),
            "{:#?}",
            ended.lines
        );
        let lost = assert_lost_only_on(&ended.reports[0].children, &["h3"]);
        assert!(lost > 0, "{:#?}", ended.reports);
    }
    let elapsed = killed_at.elapsed();
    eprintln!("chaos: clone host killed mid-transfer, both families ended {elapsed:?} after");
    assert!(elapsed < bound);
    guard.cluster.start_host(2).unwrap();
    check_job_succeeds(&h1);
    for (i, baseline) in [0, 1].into_iter().zip(baseline) {
        assert_back_to_baseline(&guard.host(i), baseline);
    }
    guard.cluster.down().unwrap();
}

#[test]
fn killing_the_parent_host_then_a_clone_host_in_turn_with_several_families() {
    let mut guard = chaos_cluster(3, 2, |spec| {
        spec.peer_timeout_ms = Some(2000);
        spec.fetch_timeout_ms = 2000;
    });
    let baseline = warm_up_and_baseline(&guard, &[1]);
    let (h1, h2) = (guard.socket(0), guard.socket(1));
    let (_, b) = start_two_families(&h1, &h2);
    let a_family = family_of_parent(&stats(&h2), "h1");

    // The parent of family A goes: its clones on h2 and h3 fail, naming the lost parent.
    let killed_at = Instant::now();
    guard.cluster.kill_host(0).unwrap();
    wait_for_stats(&h2, "family A's clones to end", |hosts| {
        hosts.iter().filter(|h| h.host != "h1").all(|h| {
            h.error.is_none()
                && h.clones
                    .iter()
                    .filter(|c| c.family == a_family)
                    .all(|c| !c.running)
        })
    });
    let parent_failure = killed_at.elapsed();
    let mut failed = 0;
    for host in stats(&h2).iter().filter(|h| h.host != "h1") {
        for c in host.clones.iter().filter(|c| c.family == a_family) {
            match &c.outcome {
                Some(VmOutcome::Failed(reason)) => {
                    assert!(reason.contains("lost"), "{reason}");
                    failed += 1;
                }
                other => panic!("clone {} on {} ended {other:?}", c.label, host.host),
            }
        }
    }
    assert!(failed > 0, "family A had no clone on h2 or h3");

    // Then a clone host of family B: B loses its clones on h1 and h3, the rest return.
    guard.cluster.kill_host(2).unwrap();
    let bound = Duration::from_secs(60);
    let (ended, _) = wait_within(&h2, b, bound);
    let both = killed_at.elapsed();
    assert!(
        matches!(ended.outcome, VmOutcome::Exited(code) if code != 0),
        "{:#?}",
        ended.lines
    );
    let lost = assert_lost_only_on(&ended.reports[0].children, &["h1", "h3"]);
    assert!(lost > 0, "{:#?}", ended.reports);
    eprintln!(
        "chaos: parent host killed mid-transfer, its remote clones failed after {parent_failure:?}; \
         then a clone host killed, the other family ended {both:?} after the first kill"
    );
    assert!(parent_failure < Duration::from_secs(30));
    assert!(both < bound);
    guard.cluster.start_host(0).unwrap();
    guard.cluster.start_host(2).unwrap();
    check_job_succeeds(&guard.socket(0));
    assert_back_to_baseline(&guard.host(1), baseline[0]);
    guard.cluster.down().unwrap();
}

/// The family of the clone point whose parent runs on `parent`.
fn family_of_parent(hosts: &[HostStats], parent: &str) -> u64 {
    hosts
        .iter()
        .flat_map(|h| &h.families)
        .find(|f| f.parent_host == parent)
        .unwrap_or_else(|| panic!("no family of {parent}: {hosts:#?}"))
        .family
}

/// Takes h2's link down for `down_for` while the clones of a job from h1 fetch, then up again.
/// The job either completes with every result right (touch checks every byte it reads) or
/// h2's clones end with a reason naming h2, the others returning; within the bound either way.
fn link_down_during_a_transfer(distribution: &str, down_for: Duration) {
    let guard = chaos_cluster(3, 2, |spec| {
        spec.mcdist.insert(
            "distribution".into(),
            toml::Value::String(distribution.into()),
        );
    });
    let baseline = warm_up_and_baseline(&guard, &[0, 1]);
    let h1 = guard.socket(0);
    let vm = start(&h1, "touch", MEM, FETCHER);
    wait_for_fetching_families(&h1, "h2", 1);
    let waiting = Waiting::on(&h1, vm);
    let began = Instant::now();
    guard.cluster.set_link(1, false).unwrap();
    std::thread::sleep(down_for);
    guard.cluster.set_link(1, true).unwrap();
    let bound = Duration::from_secs(120);
    let (ended, at) = waiting.within(bound);
    let elapsed = at - began;
    let children = &ended.reports[0].children;
    let lost = children
        .iter()
        .filter(|c| !matches!(c.outcome, VmOutcome::Result(_)))
        .count();
    eprintln!(
        "chaos: {distribution}, h2's link down {down_for:?}: job ended {elapsed:?} after the \
         link went down, {lost} of {} clones not returned; (host, runtime, outcome): {:?}",
        children.len(),
        children
            .iter()
            .map(|c| (&c.host, c.runtime, &c.outcome))
            .collect::<Vec<_>>()
    );
    if lost == 0 {
        assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    } else {
        for child in children {
            match (&child.host, &child.outcome) {
                (_, VmOutcome::Result(_)) => {}
                (Some(host), VmOutcome::Lost(reason) | VmOutcome::Failed(reason)) => {
                    assert_eq!(host, "h2", "{child:?}");
                    assert!(
                        reason.contains("h2") || reason.contains("timed out"),
                        "{child:?}"
                    );
                }
                _ => panic!("{child:?}"),
            }
        }
    }
    assert!(elapsed < bound);
    check_job_succeeds(&h1);
    for (i, baseline) in [0, 1].into_iter().zip(baseline) {
        assert_back_to_baseline(&guard.host(i), baseline);
    }
    guard.cluster.down().unwrap();
}

#[test]
fn a_clone_hosts_link_down_for_1s_during_an_mcdist_transfer() {
    link_down_during_a_transfer("mcdist", Duration::from_secs(1));
}

#[test]
fn a_clone_hosts_link_down_for_10s_during_an_mcdist_transfer() {
    link_down_during_a_transfer("mcdist", Duration::from_secs(10));
}

#[test]
fn a_clone_hosts_link_down_for_1s_during_a_unicast_transfer() {
    link_down_during_a_transfer("unicast", Duration::from_secs(1));
}

#[test]
fn a_clone_hosts_link_down_for_10s_during_a_unicast_transfer() {
    link_down_during_a_transfer("unicast", Duration::from_secs(10));
}

#[test]
fn corrupted_and_duplicated_datagrams_under_loss_are_never_installed() {
    let ref_mib = 8;
    let args = format!("ref_mib={ref_mib} queries={} clones=6", ref_mib * 250);
    let serial = local_run(
        "seqsearch",
        "512M",
        &format!("ref_mib={ref_mib} queries={} clones=0", ref_mib * 250),
    );
    let expected = field(&serial, "seqsearch: ref_mib", "hits");
    // A page lost several times over can take longer than the default 5 s here.
    let mut guard = chaos_cluster(3, 2, |spec| spec.fetch_timeout_ms = 20_000);
    let baseline = warm_up_and_baseline(&guard, &[0, 1, 2]);
    let h1 = guard.socket(0);
    guard.cluster.impair(20, 25).unwrap();
    guard.cluster.mangle(5, 1).unwrap();
    let vm = start(&h1, "seqsearch", MEM, &args);
    let bound = Duration::from_secs(180);
    let (ended, elapsed) = wait_within(&h1, vm, bound);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    assert_eq!(field(&ended.lines, "seqsearch: ref_mib", "check"), "ok");
    assert_eq!(field(&ended.lines, "seqsearch: ref_mib", "hits"), expected);
    let report = &ended.reports[0];
    assert!(
        report.children.iter().filter(|c| c.host.is_some()).count() >= 2
            && report
                .children
                .iter()
                .all(|c| matches!(c.outcome, VmOutcome::Result(_))),
        "{report:#?}"
    );
    let mangled = guard.cluster.mangle_counts().unwrap();
    let impaired = guard.cluster.impairment_counts().unwrap();
    let rejected: f64 = guard
        .cluster
        .hosts()
        .iter()
        .map(|h| metric_sum(&metrics(h), "snowflock_mcdist_rejected_datagrams_total"))
        .sum();
    eprintln!(
        "chaos: 20% loss, 25% held back, 5% duplicated, 1% corrupted: job took {elapsed:?}; \
         switch {mangled:?} {impaired:?}; daemons rejected {rejected} datagrams"
    );
    assert!(elapsed < bound);
    assert!(
        mangled.duplicated > 0 && mangled.corrupted > 0,
        "{mangled:?}"
    );
    assert!(impaired.lost > 0, "{impaired:?}");
    assert!(rejected > 0.0, "no corrupted datagram was rejected");
    // Only corrupted datagrams were: duplicates are sent before the corruption.
    assert!(rejected <= mangled.corrupted as f64, "{rejected} rejected");
    guard.cluster.mangle(0, 0).unwrap();
    guard.cluster.impair(0, 0).unwrap();
    check_job_succeeds(&h1);
    for (i, baseline) in [0, 1, 2].into_iter().zip(baseline) {
        assert_back_to_baseline(&guard.host(i), baseline);
    }
    guard.cluster.down().unwrap();
}

/// A small tmpfs mounted over a directory; unmounted (lazily, so open files do not keep it)
/// on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts a `size` tmpfs at `path` (which must exist) and copies `path`'s files onto it.
    fn mount(path: &Path, size: &str) -> SmallDisk {
        let saved: Vec<(std::ffi::OsString, Vec<u8>)> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
            .collect();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "chaos",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs on {}", path.display());
        let disk = SmallDisk {
            path: path.to_path_buf(),
        };
        for (name, bytes) in saved {
            std::fs::write(path.join(name), bytes).unwrap();
        }
        disk
    }

    /// Fills the disk with one file until a write fails for lack of space, then the last page
    /// of `log` (which a writer could otherwise still append to) with newlines. Returns the
    /// file.
    fn fill(&self, log: &Path) -> PathBuf {
        let filler = self.path.join("filler");
        let block = vec![0xa5u8; 64 << 10];
        fill_up(&mut std::fs::File::create(&filler).unwrap(), &block);
        let mut log = std::fs::OpenOptions::new().append(true).open(log).unwrap();
        fill_up(&mut log, b"\n");
        filler
    }
}

/// Writes `block` to `file` until the disk is full, then single bytes until none fits.
fn fill_up(file: &mut std::fs::File, block: &[u8]) {
    for chunk in [block, &block[..1]] {
        loop {
            match file.write(chunk) {
                Ok(n) if n > 0 => {}
                Err(e) if e.raw_os_error() != Some(libc::ENOSPC) => panic!("filling: {e}"),
                _ => break,
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(&self.path)
            .status();
    }
}

#[test]
fn a_full_disk_under_the_daemons_state_directory_leaves_it_serving() {
    let mut guard = chaos_cluster(2, 4, |_| {});
    let h1 = guard.host(0);
    guard.cluster.stop_host(0).unwrap();
    let disk = SmallDisk::mount(&h1.state_dir, "4M");
    guard.cluster.start_host(0).unwrap();
    let h1 = guard.host(0);
    let baseline = warm_up_and_baseline(&guard, &[0]);
    let filler = disk.fill(&h1.log);
    let log_before = std::fs::metadata(&h1.log).unwrap().len();

    // sfd keeps nothing of a job on disk: the job runs; its log lines are lost.
    let (output, elapsed) = sf(
        Some(&h1.socket),
        &[
            "start", "--wait", "--mem", MEM_ARG, "touch", "--", "mib=8", "clones=4",
        ],
        Duration::from_secs(120),
    );
    eprintln!("chaos: sf start with the state directory's disk full took {elapsed:?}");
    assert!(
        output.status.success(),
        "{output:?}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        status_alive(h1.pid.unwrap()),
        "sfd died with its disk full; log:\n{}",
        std::fs::read_to_string(&h1.log).unwrap_or_default()
    );
    assert_back_to_baseline(&h1, baseline[0]);

    // `sf run` saving descriptors onto the full disk: the job completes, the warning names
    // the full disk.
    let descriptors = h1.state_dir.join("descriptors");
    std::fs::remove_file(&filler).unwrap();
    std::fs::create_dir(&descriptors).unwrap();
    let filler = disk.fill(&h1.log);
    let descriptor_dir = descriptors.to_string_lossy().into_owned();
    let (output, elapsed) = sf(
        None,
        &[
            "run",
            "--mem",
            MEM_ARG,
            "--descriptor-dir",
            &descriptor_dir,
            "hello",
            "--",
            "clones=2",
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("chaos: sf run saving descriptors onto a full disk took {elapsed:?}");
    assert!(output.status.success(), "{output:?}\n{stderr}");
    assert!(
        stderr.contains("cannot save descriptor") && stderr.contains("No space left on device"),
        "{stderr}"
    );

    // Space back: the daemon logs and serves as before.
    std::fs::remove_file(&filler).unwrap();
    check_job_succeeds(&h1.socket);
    assert!(std::fs::metadata(&h1.log).unwrap().len() > log_before);
    // Unmounted first: the teardown removes the state directory.
    drop(disk);
    guard.cluster.down().unwrap();
}

fn status_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Guest memory no host here can hold: 64 GiB, or twice the host's memory if that is more.
fn too_much_memory() -> String {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let gib = ((total_kib * 2) >> 20).max(64);
    format!("{gib}G")
}

#[test]
fn guest_memory_larger_than_the_host_is_refused_by_sf_run_and_by_sfd() {
    let mem = too_much_memory();
    let (output, local) = sf(
        None,
        &["run", "--mem", &mem, "hello", "--", "clones=2"],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains("more than this host can hold"), "{stderr}");

    let guard = chaos_cluster(2, 4, |_| {});
    let baseline = warm_up_and_baseline(&guard, &[0]);
    let h1 = guard.host(0);
    let (output, daemon) = sf(
        Some(&h1.socket),
        &["start", "--wait", "--mem", &mem, "hello", "--", "clones=2"],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("chaos: --mem {mem} refused by sf run in {local:?}, by sfd in {daemon:?}: {stderr}");
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains("more than this host can hold"), "{stderr}");
    assert!(status_alive(h1.pid.unwrap()), "sfd is gone");
    check_job_succeeds(&h1.socket);
    assert_back_to_baseline(&h1, baseline[0]);
    guard.cluster.down().unwrap();
}

#[test]
fn a_hostile_guest_through_sfd_leaves_both_daemons_serving_and_nothing_behind() {
    let guard = chaos_cluster(2, 4, |_| {});
    let baseline = warm_up_and_baseline(&guard, &[0, 1]);
    let (h1, h2) = (guard.host(0), guard.host(1));
    let began = Instant::now();
    let bound = Duration::from_secs(180);
    let (hostile, behaved) = std::thread::scope(|s| {
        let hostile = s.spawn(|| {
            sf(
                Some(&h1.socket),
                &[
                    "start",
                    "--wait",
                    "--mem",
                    MEM_ARG,
                    "hostile",
                    "--",
                    "rounds=3",
                    "calls=1000",
                    "clones=3",
                    "seed=11",
                ],
                bound,
            )
        });
        let vm = start(
            &h2.socket,
            "touch",
            MEM,
            "mib=32 clones=4 pages=1500 interval_ms=2",
        );
        let behaved = wait_within(&h2.socket, vm, bound);
        (hostile.join().unwrap(), behaved)
    });
    let elapsed = began.elapsed();
    let (output, hostile_took) = hostile;
    let console = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "chaos: hostile took {hostile_took:?}, the well-behaved job {:?}, both within {elapsed:?}",
        behaved.1
    );
    assert!(
        output.status.success() && console.contains("hostile: rounds=3"),
        "{:?}\n{console}",
        output.status
    );
    let (ended, _) = behaved;
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    assert!(elapsed < bound);
    for (host, baseline) in [&h1, &h2].into_iter().zip(baseline) {
        assert!(
            status_alive(host.pid.unwrap()),
            "{}'s sfd is gone",
            host.name
        );
        assert_back_to_baseline(host, baseline);
    }
    check_job_succeeds(&h2.socket);
    guard.cluster.down().unwrap();
}
