//! The test cluster's Slurm (`ClusterSpec::slurm`) on real network namespaces, with the
//! distribution's Slurm and munge and stand-in `sfd` daemons (see `support`): it comes up with
//! every node idle, allocates and cancels jobs, and goes down without leaving a process, a
//! namespace or a file behind, whichever process takes it down.
//!
//! Needs, besides what `support` needs, Debian's `munge`, `slurmctld`, `slurmd` and
//! `slurm-client`; without them `up` fails saying so.

#[allow(dead_code)]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use snowflock_control::config::{AllocationBackend, DaemonConfig};
use snowflock_control::error_chain;
use snowflock_testkit::{
    ClusterRecord, ClusterSpec, NetnsCluster, SlurmCommandError, SlurmDaemonKind, StartSlurmError,
    UpError,
};
use support::*;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A spec for `hosts` stand-in hosts with Slurm.
fn slurm_spec(fixture: &Fixture, hosts: usize) -> ClusterSpec {
    let mut spec = fixture.spec("c", hosts, StandIn::Listens);
    spec.slurm = true;
    spec
}

/// Brings the cluster up, saying how long it took.
fn up(spec: ClusterSpec) -> NetnsCluster {
    let started = Instant::now();
    let cluster = match NetnsCluster::up(spec) {
        Ok(cluster) => cluster,
        Err(e) => panic!("up failed: {}", error_chain(&e)),
    };
    eprintln!(
        "cluster {} with Slurm up in {:?}",
        cluster.prefix(),
        started.elapsed()
    );
    cluster
}

/// Runs a Slurm command on the cluster; it must succeed. Returns its stdout.
fn slurm(cluster: &NetnsCluster, program: &str, args: &[&str]) -> String {
    let output = cluster
        .slurm(program, args)
        .unwrap_or_else(|e| panic!("{program} {args:?}: {}", error_chain(&e)));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        show(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn show(output: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// `salloc --no-shell --immediate=5 -n CPUS`: the id of the job it was granted.
fn allocate(cluster: &NetnsCluster, cpus: u32) -> String {
    let cpus = cpus.to_string();
    let output = cluster
        .slurm("salloc", &["--no-shell", "--immediate=5", "-n", &cpus])
        .unwrap();
    assert!(output.status.success(), "salloc: {}", show(&output));
    // salloc says `salloc: Granted job allocation 7` on stderr.
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr
        .lines()
        .find_map(|line| line.split("Granted job allocation ").nth(1))
        .map(|id| id.trim().to_owned())
        .unwrap_or_else(|| panic!("salloc granted nothing: {}", show(&output)))
}

/// `squeue`'s jobs as `ID STATE CPUS` lines.
fn jobs(cluster: &NetnsCluster) -> Vec<String> {
    slurm(cluster, "squeue", &["-h", "-o", "%i %T %C"])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits up to 10 s for `squeue` to no longer list job `id`.
fn wait_gone(cluster: &NetnsCluster, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = jobs(cluster);
        if !listed.iter().any(|job| job.split(' ').next() == Some(id)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still listed: {listed:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The recorded pids of the cluster's Slurm daemons, each running.
fn slurm_pids(record: &ClusterRecord) -> Vec<u32> {
    let slurm = record.slurm.as_ref().expect("the record has Slurm");
    slurm
        .daemons
        .iter()
        .map(|daemon| {
            let pid = daemon.pid.expect("a started Slurm daemon has a pid");
            assert!(alive(pid), "{} (pid {pid}) is not running", daemon.label());
            pid
        })
        .collect()
}

/// Running processes with an argument under `dir` (the cluster's daemons all have one: their
/// configuration, or munged's socket).
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let wanted = dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmdline
            .split(|&b| b == 0)
            .any(|arg| arg.starts_with(wanted))
            && alive(pid)
        {
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// Checks that a cluster with Slurm left nothing: no Slurm daemon (recorded or not), no
/// namespace, no `DIR/slurm`, no `DIR`.
fn assert_slurm_left_nothing(prefix: &str, pids: &[u32], dir: &Path) {
    let slurm_dir: PathBuf = dir.join("slurm");
    for &pid in pids {
        assert!(gone_soon(pid), "Slurm daemon {pid} still running");
    }
    let left = processes_under(dir);
    assert!(left.is_empty(), "processes of the cluster left: {left:?}");
    assert!(!slurm_dir.exists(), "{} left behind", slurm_dir.display());
    assert_nothing_left(prefix, &[], dir);
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn a_cluster_with_slurm_comes_up_allocates_and_goes_down() {
    let fixture = Fixture::new();
    let mut spec = slurm_spec(&fixture, 3);
    // Slurm's nodes declare the clone slots unless told otherwise.
    spec.clone_slots = 6;
    let (prefix, dir) = (spec.prefix.clone().unwrap(), spec.dir.clone());
    let cluster = up(spec);

    // Every node idle, with the declared CPUs, in the one partition.
    let nodes = slurm(&cluster, "sinfo", &["-h", "-N", "-o", "%N %T %c %P"]);
    let nodes: Vec<&str> = nodes.lines().collect();
    assert_eq!(
        nodes,
        [
            "h1 idle 6 snowflock*",
            "h2 idle 6 snowflock*",
            "h3 idle 6 snowflock*"
        ]
    );

    // The daemons: recorded, running in their hosts' namespaces, logging under DIR/slurm.
    let record = ClusterRecord::load(&dir).unwrap();
    assert_eq!(&record, cluster.record());
    let slurm_record = record.slurm.as_ref().unwrap();
    assert_eq!(Some(slurm_record.conf.as_path()), cluster.slurm_conf());
    assert_eq!(slurm_record.conf, dir.join("slurm/slurm.conf"));
    let pids = slurm_pids(&record);
    for daemon in &slurm_record.daemons {
        let netns = format!("{prefix}-{}", daemon.host);
        assert!(
            in_netns(daemon.pid.unwrap(), &netns),
            "{} not in {netns}",
            daemon.label()
        );
        assert!(daemon.log.starts_with(dir.join("slurm")));
        assert!(daemon.log.exists(), "{}", daemon.log.display());
    }
    let status = record.slurm_status();
    assert_eq!(status.len(), 5);
    assert!(status.iter().all(|daemon| daemon.running), "{status:?}");
    let key = dir.join("slurm/munge/munge.key");
    let mode = fs::metadata(&key).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o400
    );

    // Every daemon allocates from it.
    for host in cluster.hosts() {
        let config = DaemonConfig::load(&host.config).unwrap();
        assert_eq!(config.allocation.backend, AllocationBackend::Slurm);
        assert_eq!(
            config.allocation.slurm_conf.as_deref(),
            cluster.slurm_conf()
        );
    }

    // An allocation is granted, listed, and cancelled.
    let job = allocate(&cluster, 2);
    let listed = jobs(&cluster);
    assert_eq!(listed, [format!("{job} RUNNING 2")]);
    slurm(&cluster, "scancel", &[&job]);
    wait_gone(&cluster, &job);

    cluster.down().unwrap();
    assert_slurm_left_nothing(&prefix, &pids, &dir);
}

#[test]
fn another_process_takes_a_cluster_with_slurm_down() {
    let fixture = Fixture::new();
    let mut spec = slurm_spec(&fixture, 2);
    spec.slurm_cpus = Some(3);
    let (prefix, dir) = (spec.prefix.clone().unwrap(), spec.dir.clone());
    let record = up(spec).detach();
    let pids = slurm_pids(&record);

    // As `sf cluster down --dir` does it: from cluster.json alone.
    let cluster = NetnsCluster::load(&dir).unwrap();
    assert_eq!(cluster.record(), &record);
    let nodes = slurm(&cluster, "sinfo", &["-h", "-N", "-o", "%N %T %c"]);
    assert_eq!(
        nodes.lines().collect::<Vec<_>>(),
        ["h1 idle 3", "h2 idle 3"]
    );
    // A job still holding CPUs when the cluster goes down.
    let job = allocate(&cluster, 3);
    assert_eq!(jobs(&cluster), [format!("{job} RUNNING 3")]);
    let started = Instant::now();
    cluster.down().unwrap();
    eprintln!("down took {:?}", started.elapsed());
    assert_slurm_left_nothing(&prefix, &pids, &dir);
}

#[test]
fn a_slurm_daemon_that_exits_fails_up_and_leaves_nothing_behind() {
    let fixture = Fixture::new();
    let spec = slurm_spec(&fixture, 2);
    let (prefix, dir) = (spec.prefix.clone().unwrap(), spec.dir.clone());
    // A damaged controller state, which slurmctld refuses to start from.
    let state = dir.join("slurm/state");
    fs::create_dir_all(&state).unwrap();
    fs::write(state.join("node_state"), "not a node state").unwrap();
    let started = Instant::now();
    let err = NetnsCluster::up(spec).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20));
    let UpError::StartSlurm(StartSlurmError::DaemonExited {
        ref daemon,
        ref tail,
        ..
    }) = err
    else {
        panic!("expected DaemonExited, got {}", error_chain(&err));
    };
    assert_eq!(daemon, "slurmctld on h1");
    assert!(tail.contains("checkpoint file"), "{tail}");
    assert_slurm_left_nothing(&prefix, &[], &dir);
}

#[test]
fn slurm_commands_need_a_cluster_with_slurm() {
    let fixture = Fixture::new();
    let cluster = NetnsCluster::up(fixture.spec("c", 1, StandIn::Listens)).unwrap();
    assert_eq!(cluster.slurm_conf(), None);
    assert!(cluster.record().slurm_status().is_empty());
    let err = cluster.slurm("squeue", &[]).unwrap_err();
    assert!(matches!(err, SlurmCommandError::NoSlurm { .. }), "{err}");
    let config = DaemonConfig::load(&cluster.hosts()[0].config).unwrap();
    assert_eq!(config.allocation.backend, AllocationBackend::Static);
    cluster.down().unwrap();
}

#[test]
fn the_slurm_daemons_run_under_their_hosts_names() {
    let fixture = Fixture::new();
    let cluster = up(slurm_spec(&fixture, 2));
    let slurm_record = cluster.record().slurm.clone().unwrap();
    for daemon in &slurm_record.daemons {
        let pid = daemon.pid.unwrap().to_string();
        let output = std::process::Command::new("nsenter")
            .args(["--uts", "--target", &pid, "hostname"])
            .output()
            .unwrap();
        assert!(output.status.success(), "nsenter: {}", show(&output));
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            daemon.host,
            "{}",
            daemon.label()
        );
    }
    let kinds: Vec<SlurmDaemonKind> = slurm_record.daemons.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        [
            SlurmDaemonKind::Munged,
            SlurmDaemonKind::Slurmctld,
            SlurmDaemonKind::Slurmd,
            SlurmDaemonKind::Slurmd
        ]
    );
    cluster.down().unwrap();
}
