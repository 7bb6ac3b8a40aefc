//! Clones across hosts: real `sfd` daemons in network-namespace hosts (the
//! same cluster code as `sf cluster up`), real KVM clones whose memory is
//! fetched on demand from the parent's host.
//!
//! Every test makes its own cluster with a random prefix; the cluster is
//! removed when the test ends, also when it fails.

mod common;

use std::time::{Duration, Instant};

use common::*;
use snowflock_control::VmOutcome;
use snowflock_control::protocol::{ApiRequest, ApiResponse};
use snowflock_dataplane::auth::{self, ClusterKey};
use snowflock_vmm::files::{FilesConfig, MountSpec};

#[test]
fn eight_clones_on_three_hosts_match_the_local_and_the_serial_run() {
    let (cluster, _dir) = cluster(3, 4, |_| {});
    let h1 = cluster.host(0).unwrap().socket.clone();
    let args = "ref_mib=48 queries=16000 clones=8";
    let vm = start(&h1, "seqsearch", 512 << 20, args);
    let ended = wait(&h1, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    let report = &ended.reports[0];
    assert_eq!(report.clones, 8);
    let remote: Vec<_> = report
        .children
        .iter()
        .filter(|c| c.host.is_some())
        .collect();
    assert!(
        remote.len() >= 4,
        "spread put too few clones on other hosts: {report:?}"
    );
    assert!(
        report
            .children
            .iter()
            .all(|c| matches!(c.outcome, VmOutcome::Result(_)))
    );
    let cluster_hits = field(&ended.lines, "seqsearch: ref_mib", "hits");
    assert_eq!(field(&ended.lines, "seqsearch: ref_mib", "check"), "ok");

    let local = local_run("seqsearch", "512M", args);
    let serial = local_run("seqsearch", "512M", "ref_mib=48 queries=16000 clones=0");
    assert_eq!(field(&local, "seqsearch: ref_mib", "hits"), cluster_hits);
    assert_eq!(field(&serial, "seqsearch: ref_mib", "hits"), cluster_hits);

    // The remote children fetched pages, each less than the parent had
    // touched. (A child that starts late may find every page it touches
    // already cached by its siblings' faults and the push: it fetches none.)
    let hosts = stats(&h1);
    let clones: Vec<_> = hosts.iter().flat_map(|h| h.clones.iter()).collect();
    assert_eq!(clones.len(), remote.len(), "{hosts:#?}");
    assert!(report.data_pages > 48 << 8, "{report:?}");
    assert!(
        clones.iter().any(|c| c.stats.pages_fetched > 0),
        "{hosts:#?}"
    );
    for c in &clones {
        assert!(
            c.stats.pages_fetched < report.data_pages,
            "{c:?} vs {} data pages",
            report.data_pages
        );
    }
    // Multicast: pages sent once reached both clone hosts' caches.
    let served: u64 = hosts.iter().map(|h| h.served_pages).sum();
    let received: u64 = cluster.hosts()[1..]
        .iter()
        .map(|h| match call(&h.socket, &ApiRequest::NetShow) {
            ApiResponse::Net(status) => status.rx.pages_completed,
            other => panic!("sf net show answered {other:?}"),
        })
        .sum();
    assert!(
        served > 0 && served < received,
        "served {served}, received by the clone hosts {received}"
    );
    cluster.down().unwrap();
}

#[test]
fn a_peer_without_the_cluster_key_gets_nothing() {
    let (cluster, _dir) = cluster(2, 4, |_| {});
    let h1 = cluster.host(0).unwrap().clone();
    let h2 = cluster.host(1).unwrap().clone();
    let right = ClusterKey::load(cluster.key_file()).unwrap();
    let wrong = ClusterKey::generate();
    let (control, pages) = (h2.control, h1.pages);
    let outcomes = in_netns(&h1.netns, move || {
        let attempt = |addr, key: &ClusterKey, context: &[u8]| {
            let mut s =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            auth::client_handshake(&mut s, key, context).map(|_| ())
        };
        (
            attempt(control, &wrong, b"control"),
            attempt(pages, &wrong, b"pages"),
            attempt(control, &right, b"control"),
        )
    });
    assert!(
        outcomes.0.is_err(),
        "control handshake with a wrong key passed"
    );
    assert!(outcomes.1.is_err(), "memory server accepted a wrong key");
    assert!(
        outcomes.2.is_ok(),
        "the right key was refused: {:?}",
        outcomes.2
    );
    // The refused peer changed nothing: the host still runs a full job.
    let vm = start(&h1.socket, "touch", 128 << 20, "mib=8 clones=4");
    let ended = wait(&h1.socket, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    let log = std::fs::read_to_string(&h2.log).unwrap();
    assert!(log.contains("refused a control connection"), "{log}");
    cluster.down().unwrap();
}

#[test]
fn killing_a_child_host_reports_its_clones_lost_and_the_others_finish() {
    let (mut cluster, _dir) = cluster(3, 2, |s| s.peer_timeout_ms = Some(2000));
    let h1 = cluster.host(0).unwrap().socket.clone();
    let h2 = cluster.host(1).unwrap().socket.clone();
    // 6 clones over 3 hosts with 2 slots each; each runs a few seconds.
    let vm = start(&h1, "montecarlo", 128 << 20, "paths=6000000 clones=6");
    wait_for_stats(&h2, "clones running on h3", |hosts| {
        hosts
            .iter()
            .any(|h| h.host == "h3" && h.clones.iter().any(|c| c.running))
    });
    let killed_at = Instant::now();
    cluster.kill_host(2).unwrap();
    let ended = wait(&h1, vm);
    assert!(killed_at.elapsed() < Duration::from_secs(120));
    let report = &ended.reports[0];
    let lost: Vec<_> = report
        .children
        .iter()
        .filter(|c| matches!(c.outcome, VmOutcome::Lost(_)))
        .collect();
    assert_eq!(lost.len(), 2, "{report:#?}");
    assert!(lost.iter().all(|c| c.host.as_deref() == Some("h3")));
    let finished = report
        .children
        .iter()
        .filter(|c| matches!(c.outcome, VmOutcome::Result(_)))
        .count();
    assert_eq!(finished, 4, "{report:#?}");
    if let VmOutcome::Lost(reason) = &lost[0].outcome {
        assert!(reason.contains("h3"), "{reason}");
    }
    cluster.down().unwrap();
}

#[test]
fn killing_the_parent_host_fails_its_clones_with_a_clear_error_in_bounded_time() {
    let (mut cluster, _dir) = cluster(3, 2, |s| {
        s.peer_timeout_ms = Some(2000);
        s.fetch_timeout_ms = 2000;
    });
    let h1 = cluster.host(0).unwrap().socket.clone();
    let h2 = cluster.host(1).unwrap().socket.clone();
    // Children read 4000 pages of the parent's memory, one every 5 ms.
    let vm = start(
        &h1,
        "touch",
        128 << 20,
        "mib=32 clones=6 pages=4000 interval_ms=5",
    );
    wait_for_stats(&h2, "clones fetching on h2", |hosts| {
        hosts.iter().any(|h| {
            h.host == "h2"
                && h.clones
                    .iter()
                    .any(|c| c.running && c.stats.pages_fetched > 0)
        })
    });
    let _ = vm;
    let killed_at = Instant::now();
    cluster.kill_host(0).unwrap();
    // h2 and h3 see their clones fail, with a reason, within the bounds.
    wait_for_stats(&h2, "clones of the dead parent to end", |hosts| {
        hosts.iter().filter(|h| h.host != "h1").all(|h| {
            h.error.is_none() && !h.clones.is_empty() && h.clones.iter().all(|c| !c.running)
        })
    });
    assert!(killed_at.elapsed() < Duration::from_secs(30));
    for host in stats(&h2).iter().filter(|h| h.host != "h1") {
        for c in &host.clones {
            match &c.outcome {
                Some(VmOutcome::Failed(reason)) => {
                    eprintln!("{} on {}: {reason}", c.label, host.host);
                    assert!(reason.contains("lost"), "{reason}");
                }
                other => panic!("clone {} on {} ended {other:?}", c.label, host.host),
            }
        }
    }
    cluster.down().unwrap();
}

#[test]
fn a_running_vm_is_cloned_from_outside_onto_other_hosts() {
    let (cluster, _dir) = cluster(3, 4, |_| {});
    let h1 = cluster.host(0).unwrap().socket.clone();
    let vm = start(&h1, "spin", 128 << 20, "iters=600000000");
    let clones = match call(&h1, &ApiRequest::Clone { vm, clones: 3 }) {
        ApiResponse::Cloned { clones, .. } => clones,
        other => panic!("clone failed: {other:?}"),
    };
    let hosts: Vec<&str> = clones.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(clones.len(), 3, "{clones:?}");
    assert!(hosts.contains(&"h2") && hosts.contains(&"h3"), "{clones:?}");
    // The copies run the same guest from the same point as VMs of their
    // own and end as it does.
    wait_for_stats(&h1, "remote copies to end", |hosts| {
        let copies: Vec<_> = hosts.iter().flat_map(|h| h.clones.iter()).collect();
        copies.len() == 2 && copies.iter().all(|c| c.outcome.is_some())
    });
    for host in stats(&h1) {
        for c in &host.clones {
            assert_eq!(c.outcome, Some(VmOutcome::Exited(0)), "{c:?}");
        }
    }
    let ended = wait(&h1, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0));
    cluster.down().unwrap();
}

#[test]
fn avoidance_skips_free_and_fresh_heap_pages_and_results_stay_right() {
    let (cluster, _dir) = cluster(2, 4, |_| {});
    let h1 = cluster.host(0).unwrap().socket.clone();
    let vm = start(
        &h1,
        "allocheavy",
        256 << 20,
        "clones=2 churn_mib=64 table_mib=4 work_mib=32",
    );
    let ended = wait(&h1, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    assert!(
        ended.lines.iter().any(|l| l.contains("allocheavy: PASS")),
        "{:#?}",
        ended.lines
    );
    let hosts = stats(&h1);
    let clones: Vec<_> = hosts.iter().flat_map(|h| h.clones.iter()).collect();
    assert!(
        !clones.is_empty(),
        "no clone ran on another host: {hosts:#?}"
    );
    for c in clones {
        let s = &c.stats;
        // The children's working memory comes out of heap that was free at
        // the clone point (or fresh since): zero-filled, never fetched.
        assert!(s.avoided.free_heap + s.avoided.fresh > 2048, "{c:?}");
        assert!(s.bytes_fetched < 16 << 20, "{c:?}");
    }
    cluster.down().unwrap();
}

#[test]
fn sigterm_stops_the_daemons_vms_and_the_daemon_exits_cleanly() {
    let (mut cluster, _dir) = cluster(2, 4, |_| {});
    let h1 = cluster.host(0).unwrap().clone();
    start(&h1.socket, "spin", 128 << 20, "iters=100000000000");
    let vm2 = start(&h1.socket, "spin", 128 << 20, "iters=100000000000");
    match call(&h1.socket, &ApiRequest::Clone { vm: vm2, clones: 2 }) {
        ApiResponse::Cloned { clones, .. } => assert_eq!(clones.len(), 2),
        other => panic!("clone failed: {other:?}"),
    }
    let stopping = Instant::now();
    cluster.stop_host(0).unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(15));
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(log.contains("shutting down: stopping VMs"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains("VMs still running at shutdown"), "{log}");
    assert!(!h1.socket.exists(), "the API socket was left behind");
    cluster.down().unwrap();
}

#[test]
fn a_second_round_from_a_checkpoint_reuses_the_clone_hosts_caches_until_the_parent_ends() {
    let (cluster, _dir) = cluster(3, 4, |_| {});
    let h1 = cluster.host(0).unwrap().socket.clone();
    let vm = start(
        &h1,
        "scan",
        176 << 20,
        "state_mib=16 write_every=8 clones=4 rounds=2",
    );
    let ended = wait(&h1, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    assert_eq!(field(&ended.lines, "scan: state_mib", "check"), "ok");
    assert!(
        field(&ended.lines, "scan: round=2", "warm_join_ms")
            .parse::<f64>()
            .is_ok()
    );
    let [cold, warm] = &ended.reports[..] else {
        panic!("one report per round: {:#?}", ended.reports);
    };
    assert_eq!((cold.clones, warm.clones), (4, 4));
    // Per clone host, the first round's clones started first.
    let hosts = stats(&h1);
    let (mut cold_fetched, mut warm_fetched, mut warm_clones) = (0, 0, 0);
    for host in &hosts {
        let first_round = cold
            .children
            .iter()
            .filter(|c| c.host.as_deref() == Some(host.host.as_str()))
            .count();
        let mut clones: Vec<_> = host.clones.iter().collect();
        clones.sort_by_key(|c| c.vm);
        for (i, c) in clones.into_iter().enumerate() {
            if i < first_round {
                cold_fetched += c.stats.pages_fetched;
            } else {
                warm_fetched += c.stats.pages_fetched;
                warm_clones += 1;
            }
        }
    }
    assert!(warm_clones >= 2, "{hosts:#?}");
    assert!(cold_fetched > 0, "{hosts:#?}");
    // The second round found every page its hosts had fetched or been
    // pushed for the first (each child reads the same share on the same host).
    assert!(
        warm_fetched * 20 <= cold_fetched,
        "warm round fetched {warm_fetched} pages, cold {cold_fetched}: {hosts:#?}"
    );
    let reused = cluster.hosts()[1..].iter().any(|h| {
        let log = std::fs::read_to_string(&h.log).unwrap();
        log.contains("reusing an idle page cache")
    });
    assert!(reused, "no clone host reused its idle cache");
    // The parent VM ended, and with it its checkpoint: every cache goes.
    wait_for_stats(&h1, "the clone hosts dropping their caches", |hosts| {
        hosts.iter().all(|h| h.families.is_empty())
    });
    cluster.down().unwrap();
}

#[test]
fn the_next_job_of_an_image_pushes_what_its_clones_asked_for_first_never_to_a_newer_generation() {
    let (cluster, _dir) = cluster(2, 2, |spec| {
        spec.mcdist
            .insert("recorded_working_sets".into(), toml::Value::Integer(8));
    });
    let h1 = cluster.host(0).unwrap().socket.clone();
    // Two clone points per job: the state, then the state moved on.
    let args = "state_mib=8 write_every=8 clones=4 epochs=2";
    let run = || {
        let vm = start(&h1, "scan", 128 << 20, args);
        let ended = wait(&h1, vm);
        assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
        assert_eq!(field(&ended.lines, "scan: state_mib", "check"), "ok");
        assert_eq!(ended.reports.len(), 2, "{:#?}", ended.reports);
        for report in &ended.reports {
            assert!(
                report.children.iter().any(|c| c.host.is_some()),
                "no clone on the other host: {report:?}"
            );
        }
    };
    let led = || stats(&h1).iter().map(|h| h.push_led_pages).sum::<u64>();
    run();
    // The first job's second clone point was served while the recording of its
    // first was kept: an older generation's, so it led nothing.
    assert_eq!(led(), 0, "{:#?}", stats(&h1));
    run();
    assert!(
        led() > 0,
        "the second job's pushes were not led by the first's recordings: {:#?}",
        stats(&h1)
    );
    cluster.down().unwrap();
}

#[test]
fn a_static_linux_program_clones_onto_other_hosts_which_read_its_mount_and_write_their_own_output()
{
    let (cluster, _dir) = cluster(3, 2, |_| {});
    let h1 = cluster.host(0).unwrap().socket.clone();
    let input = tempfile::tempdir().unwrap();
    let text: String = (1..=300_000u64).map(|i| format!("{i}\n")).collect();
    std::fs::write(input.path().join("numbers.txt"), text).unwrap();
    let out = tempfile::tempdir().unwrap();
    let files = FilesConfig {
        mounts: vec![MountSpec {
            host: input.path().to_path_buf(),
            guest: "/data".into(),
            identity: None,
        }],
        stdin: None,
        out: Some(out.path().to_path_buf()),
    };
    let vm = start_with_files(
        &h1,
        "partsum",
        256 << 20,
        "partsum /data/numbers.txt 6",
        files,
    );
    let ended = wait(&h1, vm);
    assert_eq!(ended.outcome, VmOutcome::Exited(0), "{:#?}", ended.lines);
    let report = &ended.reports[0];
    assert_eq!(report.clones, 6);
    let remote = report.children.iter().filter(|c| c.host.is_some()).count();
    assert!(remote >= 2, "no clone ran on another host: {report:?}");
    assert!(
        ended
            .lines
            .iter()
            .any(|l| l.ends_with("clones=6 total=45000150000 match=1 inherited=1 kept=1")),
        "{:#?}",
        ended.lines
    );
    // Every clone, wherever it ran, wrote its part into its own directory.
    let mut parts = 0u64;
    let mut clones = 0;
    for entry in std::fs::read_dir(out.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(id) = name
            .rsplit('-')
            .next()
            .filter(|_| name.starts_with("clone-"))
        {
            let part = std::fs::read_to_string(entry.path().join(format!("part-{id}"))).unwrap();
            parts += part.trim().parse::<u64>().unwrap();
            clones += 1;
        }
    }
    assert_eq!((clones, parts), (6, 45_000_150_000));
    // The remote clones' files came back over the control connections:
    // the parent's host wrote exactly their bytes.
    let remote_bytes: u64 = report
        .children
        .iter()
        .filter(|c| c.host.is_some())
        .map(|c| {
            let dir = std::fs::read_dir(out.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with(&format!("-{}", c.id)))
                .unwrap();
            std::fs::metadata(dir.join(format!("part-{}", c.id)))
                .unwrap()
                .len()
        })
        .sum();
    let hosts = stats(&h1);
    let parent_host = hosts.iter().find(|h| h.host == "h1").expect("h1's stats");
    assert_eq!(parent_host.clone_output_bytes, remote_bytes, "{hosts:#?}");
    assert!(
        hosts
            .iter()
            .filter(|h| h.host != "h1")
            .all(|h| h.clone_output_bytes == 0),
        "{hosts:#?}"
    );
    // The remote clones faulted the personality, the program and its
    // in-VM state in from the parent's host.
    let fetched: Vec<_> = hosts.iter().flat_map(|h| h.clones.iter()).collect();
    assert_eq!(fetched.len(), remote, "{hosts:#?}");
    assert!(
        fetched.iter().any(|c| c.stats.pages_fetched > 0),
        "{hosts:#?}"
    );
}

#[test]
fn sf_start_runs_a_linux_program_with_strace_and_reports_its_unimplemented_calls() {
    let (cluster, _dir) = cluster(2, 2, |_| {});
    let socket = cluster.host(0).unwrap().socket.clone();
    let (_dir, program) = pipe_program();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sf"))
        .env("SNOWFLOCK_SOCKET", &socket)
        .args(["start", "--wait", "--json", "--strace"])
        .arg(&program)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{:?}\nstdout: {}\nstderr: {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    // glibc's pipe() is pipe2.
    assert!(
        stderr.contains("[strace] pipe2(") && stderr.contains(") = -38"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["unimplemented_syscalls"],
        serde_json::json!([{"vm": "vm1", "calls": ["pipe2 (293) x1"]}]),
        "{report:#}"
    );
}

#[test]
fn sf_start_wait_reports_the_jobs_progress() {
    let (cluster, _dir) = cluster(2, 2, |_| {});
    let socket = cluster.host(0).unwrap().socket.clone();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sf"))
        .env("SNOWFLOCK_SOCKET", &socket)
        .args([
            "start",
            "--wait",
            "--progress",
            "--mem",
            "256M",
            "seqsearch",
        ])
        .args(["--", "ref_mib=16", "queries=32000", "clones=3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\nstderr: {stderr}", out.status);
    let progress: Vec<&str> = stderr
        .lines()
        .filter_map(|line| line.strip_prefix("sf: progress: vm1: "))
        .collect();
    // Figures only grow, and the ticket's grant shows while the clones run.
    assert!(
        progress
            .iter()
            .any(|line| line.starts_with("clones 3 requested, 3 granted")),
        "{stderr}"
    );
    let ended: Vec<u64> = progress
        .iter()
        .map(|line| {
            let (_, rest) = line.split_once(" running, ").unwrap();
            rest.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(ended.windows(2).all(|w| w[0] <= w[1]), "{stderr}");
    cluster.down().unwrap();
}
