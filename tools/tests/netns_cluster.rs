//! The local test cluster driven through `sf cluster` (the CLI's functions, compiled in), and
//! brought up with the real `sfd`: the tests of `snowflock_testkit` that need this crate's
//! code or binaries. The fixture tests with stand-in daemons are the testkit's own.

#[allow(dead_code)]
#[path = "../src/cluster_cli.rs"]
mod cluster_cli;
#[path = "../src/status_line.rs"]
mod status_line;
#[allow(dead_code)]
#[path = "../../testkit/tests/support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode};
use std::time::Instant;

use snowflock_control::config::DaemonConfig;
use snowflock_control::error_chain;
use snowflock_testkit::{self as testkit, ClusterRecord, ClusterSpec, NetnsCluster, random_prefix};
use support::*;

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
        metrics_port: Some(9464),
        slurm: false,
        slurm_cpus: None,
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
    assert_eq!(
        config.metrics.listen,
        Some(std::net::SocketAddr::new(
            record.hosts[0].control.ip(),
            9464
        ))
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
    let cluster = NetnsCluster::up(fixture.spec("c", 2, StandIn::Listens)).unwrap();
    let (prefix, pids) = (cluster.prefix().to_owned(), pids(&cluster));
    let record = cluster.detach();
    fs::remove_file(record.dir.join(testkit::STATE_FILE)).unwrap();

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
    let cluster = match NetnsCluster::up(spec) {
        Ok(cluster) => cluster,
        Err(e) => panic!("the real sfd did not come up: {}", error_chain(&e)),
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
        started.elapsed() < testkit::DEFAULT_STOP_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    assert_nothing_left(&prefix, &pids, &dir);
}
