//! Tickets from a real Slurm (`[allocation] backend = "slurm"`): a cluster
//! of real `sfd` daemons whose hosts also run munged, `slurmctld` and one
//! `slurmd` each (Debian's packages). Grants across nodes, partial grants,
//! release on join, kill, parent death and a killed daemon, and a batch job.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{cluster, field, start, wait};
use snowflock_control::VmOutcome;
use snowflock_control::protocol::{ApiRequest, ApiResponse};
use snowflock_testkit::NetnsCluster;
use tempfile::TempDir;

/// CPUs each Slurm node declares (and clone slots of each host).
const CPUS: u32 = 2;

fn slurm_cluster(hosts: usize) -> (NetnsCluster, TempDir) {
    cluster(hosts, CPUS, |spec| {
        spec.slurm = true;
        spec.slurm_cpus = Some(CPUS);
        spec.peer_timeout_ms = Some(2000);
    })
}

fn slurm(cluster: &NetnsCluster, program: &str, args: &[&str]) -> Output {
    let output = cluster
        .slurm(program, args)
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `squeue`'s jobs: (id, name, comment, nodes, CPUs).
fn jobs(cluster: &NetnsCluster) -> Vec<(u64, String, String, String, u32)> {
    let output = slurm(cluster, "squeue", &["-h", "-o", "%i|%j|%k|%N|%C"]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('|').collect();
            (
                f[0].trim().parse().unwrap(),
                f[1].to_string(),
                f[2].to_string(),
                f[3].to_string(),
                f[4].trim().parse().unwrap(),
            )
        })
        .collect()
}

/// Waits (bounded) until `pred` holds for the job list.
fn wait_for_jobs(
    cluster: &NetnsCluster,
    what: &str,
    pred: impl Fn(&[(u64, String, String, String, u32)]) -> bool,
) -> Vec<(u64, String, String, String, u32)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = jobs(cluster);
        if pred(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn slurm_jobs_of(socket: &Path, vm: u64) -> Vec<u64> {
    match common::call(socket, &ApiRequest::Ps) {
        ApiResponse::Ps { hosts } => hosts
            .into_iter()
            .filter_map(|h| h.vms.ok())
            .flatten()
            .find(|v| v.vm == vm)
            .map(|v| v.slurm_jobs)
            .unwrap_or_default(),
        other => panic!("ps answered {other:?}"),
    }
}

/// A job long enough to be watched: its clones compute for minutes.
const LONG_JOB: &str = "paths=4000000000 clones=4";

#[test]
fn tickets_are_slurm_allocations_spread_over_nodes_released_at_join_and_kill() {
    let (cluster, _dir) = slurm_cluster(3);
    let h1 = cluster.host(0).unwrap().socket.clone();

    // A job that ends by itself: 4 clones on the nodes Slurm chose, one per
    // CPU, and the allocation gone after the join.
    let vm = start(
        &h1,
        "seqsearch",
        256 << 20,
        "ref_mib=8 queries=4000 clones=4",
    );
    let ended = wait(&h1, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    assert_eq!(field(&ended.lines, "seqsearch: ref_mib", "check"), "ok");
    let report = &ended.reports[0];
    assert_eq!(report.clones, 4, "{report:?}");
    assert!(report.slurm_job.is_some(), "{report:?}");
    let mut hosts: Vec<String> = report
        .children
        .iter()
        .map(|c| c.host.clone().unwrap_or_else(|| "h1".into()))
        .collect();
    hosts.sort();
    hosts.dedup();
    assert!(hosts.len() >= 2, "Slurm spread the clones over {hosts:?}");
    wait_for_jobs(&cluster, "the joined ticket's allocation to go", |j| {
        j.is_empty()
    });

    // A job whose parent is killed: its allocation is listed while it runs
    // (named after the parent's host, the VM in its comment, in `sf ps`),
    // and goes with the VM.
    let vm = start(&h1, "montecarlo", 256 << 20, LONG_JOB);
    let list = wait_for_jobs(&cluster, "the ticket's allocation", |j| j.len() == 1);
    let (job, name, comment, _nodes, cpus) = &list[0];
    assert_eq!(name, "snowflock-h1");
    assert!(comment.contains(&format!("vm {vm}")), "{comment}");
    assert_eq!(*cpus, 4);
    let deadline = Instant::now() + Duration::from_secs(30);
    while slurm_jobs_of(&h1, vm) != vec![*job] {
        assert!(Instant::now() < deadline, "sf ps never showed job {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
    match common::call(&h1, &ApiRequest::Kill { host: None, vm }) {
        ApiResponse::Killed => {}
        other => panic!("kill answered {other:?}"),
    }
    let ended = wait(&h1, vm);
    assert_eq!(ended.outcome, VmOutcome::Killed);
    wait_for_jobs(&cluster, "the killed VM's allocation to go", |j| {
        j.is_empty()
    });
    cluster.down().unwrap();
}

/// Another user's job, named `other`, takes `cpus` CPUs.
fn hold_cpus(cluster: &NetnsCluster, cpus: u32) {
    let cpus = cpus.to_string();
    slurm(
        cluster,
        "salloc",
        &[
            "--no-shell",
            "--immediate=10",
            "-n",
            &cpus,
            "--job-name",
            "other",
        ],
    );
}

#[test]
fn a_ticket_gets_what_slurm_has_free_when_another_job_holds_cpus() {
    let (cluster, _dir) = slurm_cluster(3);
    let h1 = cluster.host(0).unwrap().socket.clone();
    // Another user's job holds 4 of the 6 CPUs.
    hold_cpus(&cluster, 4);
    let vm = start(&h1, "hello", 256 << 20, "clones=4");
    let ended = wait(&h1, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    let report = &ended.reports[0];
    assert_eq!(report.clones, 2, "granted what was free: {report:?}");
    let left = wait_for_jobs(&cluster, "only the other job to be left", |j| j.len() == 1);
    assert_eq!(left[0].1, "other");

    // Nothing free at all: the ticket gets no clone and the guest goes on.
    hold_cpus(&cluster, 2);
    let vm = start(&h1, "hello", 256 << 20, "clones=4");
    let ended = wait(&h1, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    assert_eq!(ended.reports[0].clones, 0, "{:?}", ended.reports);
    slurm(&cluster, "scancel", &["--name", "other"]);
    wait_for_jobs(&cluster, "an empty queue", |j| j.is_empty());
    cluster.down().unwrap();
}

#[test]
fn a_killed_parent_daemon_leaves_no_allocation_behind() {
    let (cluster, _dir) = slurm_cluster(3);
    let h1 = cluster.host(0).unwrap();
    start(&h1.socket, "montecarlo", 256 << 20, LONG_JOB);
    wait_for_jobs(&cluster, "the ticket's allocation", |j| j.len() == 1);
    let pid = h1.pid.expect("h1's sfd runs");
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    // The other members lose h1 and cancel its allocations.
    wait_for_jobs(&cluster, "the dead host's allocation to go", |j| {
        j.is_empty()
    });
    cluster.down().unwrap();
}

#[test]
fn a_batch_job_clones_only_inside_its_allocation() {
    let (cluster, dir) = slurm_cluster(3);
    let h1 = cluster.host(0).unwrap();
    let out = dir.path().join("job.out");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/snowflock.sbatch");
    let sf = format!("SF={}", env!("CARGO_BIN_EXE_sf"));
    let socket = format!("SNOWFLOCK_SOCKET={}", h1.socket.display());
    let output = format!("--output={}", out.display());
    slurm(
        &cluster,
        "env",
        &[
            &sf,
            &socket,
            "sbatch",
            "--parsable",
            "-N",
            "2",
            "-n",
            "4",
            "-w",
            "h1,h2",
            &output,
            script.to_str().unwrap(),
            "seqsearch",
            "--mem",
            "256M",
            "--",
            "ref_mib=8",
            "queries=4000",
            "clones=8",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    while !jobs(&cluster).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the batch job did not end: {:?}",
            std::fs::read_to_string(&out)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("check=ok"), "{text}");
    // 8 asked for, the job's 4 CPUs granted: 2 here, 2 on h2, none on h3.
    assert!(text.contains("granted=4"), "{text}");
    assert!(text.contains("4 clones (2 on other hosts)"), "{text}");
    let h3 = cluster.host(2).unwrap();
    let stats = common::stats(&h3.socket);
    let on_h3 = stats.iter().find(|h| h.host == "h3").unwrap();
    assert!(on_h3.clones.is_empty(), "{on_h3:#?}");
    cluster.down().unwrap();
}
