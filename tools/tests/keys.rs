//! Rotating the cluster key of running daemons: `sf key rotate` on each host
//! in turn, with jobs across hosts (multicast pages, control and page
//! connections) before, during and after, and the old key refused once the
//! window is over.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use snowflock_control::VmOutcome;
use snowflock_control::protocol::{ApiRequest, ApiResponse, KeyStatus};
use snowflock_dataplane::auth::{self, ClusterKey};

/// Long enough that one job fits between the two hosts' rotations, which
/// must come within half of it.
const WINDOW: Duration = Duration::from_secs(40);

fn keys(socket: &Path) -> KeyStatus {
    match call(socket, &ApiRequest::KeyShow) {
        ApiResponse::Keys(status) => status,
        other => panic!("sf key show answered {other:?}"),
    }
}

fn rotate_with_sf(socket: &Path, key_file: &Path) -> KeyStatus {
    let out = Command::new(env!("CARGO_BIN_EXE_sf"))
        .args(["key", "rotate", "--json", "--window-secs"])
        .arg(WINDOW.as_secs().to_string())
        .arg("--socket")
        .arg(socket)
        .arg(key_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sf key rotate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A job parented on `socket`'s host whose clones also run on the other host;
/// every clone must compute the right result.
fn cross_host_job(socket: &Path, when: &str) {
    let vm = start(
        socket,
        "seqsearch",
        256 << 20,
        "ref_mib=8 queries=4000 clones=4",
    );
    let ended = wait(socket, vm);
    assert_eq!(
        ended.outcome,
        VmOutcome::Exited(0),
        "{when}: {:#?}",
        ended.lines
    );
    assert_eq!(
        field(&ended.lines, "seqsearch: ref_mib", "check"),
        "ok",
        "{when}"
    );
    let report = &ended.reports[0];
    assert!(
        report.children.iter().any(|c| c.host.is_some()),
        "{when}: no clone ran on the other host: {report:?}"
    );
    assert!(
        report
            .children
            .iter()
            .all(|c| matches!(c.outcome, VmOutcome::Result(_))),
        "{when}: {report:?}"
    );
}

/// Waits (bounded) until `socket`'s host is in `phase`.
fn wait_for_phase(socket: &Path, phase: &str) -> KeyStatus {
    let deadline = Instant::now() + WINDOW * 2;
    loop {
        let status = keys(socket);
        if status.phase == phase {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "still {status:?}, waiting for {phase}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_cluster_moves_to_a_new_key_without_stopping_and_then_refuses_the_old_one() {
    let (cluster, dir) = cluster(2, 2, |_| {});
    let h1 = cluster.host(0).unwrap().clone();
    let h2 = cluster.host(1).unwrap().clone();
    let old = ClusterKey::load(cluster.key_file()).unwrap();
    let new_file = dir.path().join("next.key");
    let generated = Command::new(env!("CARGO_BIN_EXE_sf"))
        .args(["key", "generate"])
        .arg(&new_file)
        .output()
        .unwrap();
    assert!(generated.status.success());
    let new = ClusterKey::load(&new_file).unwrap();
    assert_ne!(new, old);
    let settled = keys(&h1.socket);
    assert_eq!(settled.phase, "settled");
    assert_eq!(settled.current, old.fingerprint());

    // h1 first: it accepts the new key and still uses the old one, which h2
    // (not rotated) holds.
    let rotated = rotate_with_sf(&h1.socket, &new_file);
    assert_eq!(rotated.phase, "introducing");
    assert_eq!(rotated.current, new.fingerprint());
    assert_eq!(rotated.sending, old.fingerprint());
    assert_eq!(rotated.retiring, Some(old.fingerprint()));
    // The host's key file holds the new key at once, for a restart.
    assert_eq!(ClusterKey::load(cluster.key_file()).unwrap(), new);
    // A second rotation while this one runs is refused, and changes nothing.
    let again = client(&h1.socket).call(&ApiRequest::KeyRotate {
        key: ClusterKey::generate().to_hex(),
        window: WINDOW,
    });
    match again {
        Err(e) => assert!(e.to_string().contains("under way"), "{e}"),
        Ok(answer) => panic!("a second rotation was not refused: {answer:?}"),
    }
    assert_eq!(keys(&h1.socket).current, new.fingerprint());
    cross_host_job(&h2.socket, "h2 not rotated, parent of a job on both");

    // h2 within half the window; then h1 moves to the new key while h2 may
    // still send with the old one.
    rotate_with_sf(&h2.socket, &new_file);
    cross_host_job(&h1.socket, "both introducing");
    let retiring = wait_for_phase(&h1.socket, "retiring");
    assert_eq!(retiring.sending, new.fingerprint());
    cross_host_job(&h1.socket, "h1 sending with the new key");
    cross_host_job(&h2.socket, "h2 in its rotation");

    // Both done: the new key alone.
    wait_for_phase(&h1.socket, "settled");
    let done = wait_for_phase(&h2.socket, "settled");
    assert_eq!(done.retiring, None);
    assert_eq!(done.sending, new.fingerprint());
    cross_host_job(&h1.socket, "after the rotation");

    let (control, pages) = (h2.control, h1.pages);
    let (old_control, old_pages, new_control) = in_netns(&h1.netns, move || {
        let attempt = |addr, key: &ClusterKey, context: &[u8]| {
            let mut s =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            auth::client_handshake(&mut s, key, context).map(|_| ())
        };
        (
            attempt(control, &old, b"control"),
            attempt(pages, &old, b"pages"),
            attempt(control, &new, b"control"),
        )
    });
    assert!(old_control.is_err(), "the retired key still opens control");
    assert!(old_pages.is_err(), "the retired key still opens pages");
    assert!(
        new_control.is_ok(),
        "the new key was refused: {new_control:?}"
    );
    cluster.down().unwrap();
}
