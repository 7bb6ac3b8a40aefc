//! A process that attached the program and is then SIGKILLed leaves no program behind.
//!
//! Runs without the libtest harness: the same binary is the test and, with [`HELPER_ENV`] set,
//! the helper process that attaches the program and waits to be killed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{Datagrams, MCDIST_PORT, Testbed};
use snowflock_ebpf::{AttachConfig, McdistXdp, XdpMode};

/// Set to `<namespace> <interface>` in the helper process.
const HELPER_ENV: &str = "SNOWFLOCK_EBPF_TEST_ATTACH_HELPER";
const FAMILY: u64 = 0x5f00_0000_0000_0002;
const GENERATION: u32 = 1;
const HELD_PAGE: u64 = 3;
/// How long the helper waits to be killed before it gives up and exits.
const HELPER_LIFETIME: Duration = Duration::from_secs(60);
/// Longest wait for the helper to report that it attached.
const HELPER_START: Duration = Duration::from_secs(30);

fn main() {
    match std::env::var(HELPER_ENV) {
        Ok(target) => attach_and_wait(&target),
        Err(_) => {
            sigkilled_process_leaves_no_program_attached();
            println!("test sigkilled_process_leaves_no_program_attached ... ok");
        }
    }
}

/// The helper: attaches in the namespace, marks a page as held, reports the program id, waits.
fn attach_and_wait(target: &str) {
    let (ns, ifname) = target.split_once(' ').expect("`<namespace> <interface>`");
    // Still single-threaded: the whole process moves into the namespace.
    common::enter_netns(ns);
    let xdp = McdistXdp::attach(&AttachConfig {
        ifname: ifname.to_owned(),
        mode: XdpMode::Native,
        udp_port: MCDIST_PORT,
    })
    .expect("attach");
    let bits = xdp
        .add_family(FAMILY, GENERATION, 16)
        .expect("add the family");
    bits.mark(HELD_PAGE);
    println!("attached {}", xdp.info().program_id);
    thread::sleep(HELPER_LIFETIME);
}

/// Kills the helper if the test fails before it does.
struct HelperGuard(Child);

impl Drop for HelperGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigkilled_process_leaves_no_program_attached() {
    let bed = Testbed::new();
    let mut helper = HelperGuard(
        Command::new(std::env::current_exe().expect("the test binary"))
            .env(
                HELPER_ENV,
                format!("{} {}", bed.receiver_ns, bed.receiver_if),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the helper"),
    );
    let stdout = helper.0.stdout.take().expect("helper stdout");
    let (report, reports) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = report.send(line);
    });
    let line = reports
        .recv_timeout(HELPER_START)
        .expect("the helper reports in time");
    let program_id: u32 = line
        .strip_prefix("attached ")
        .and_then(|id| id.trim().parse().ok())
        .unwrap_or_else(|| panic!("helper said {line:?}"));
    assert_eq!(bed.attached_program(), Some((program_id, "xdp".to_owned())));

    // The helper's program drops fragments of the page it holds.
    let mut net = bed.endpoints();
    let mut datagrams = Datagrams::default();
    let held = datagrams.fragment(FAMILY, GENERATION, HELD_PAGE);
    let other = datagrams.fragment(FAMILY, GENERATION, HELD_PAGE + 1);
    net.send(MCDIST_PORT, &held);
    net.send(MCDIST_PORT, &other);
    assert!(net.mcdist.wait_for(&other));
    assert!(!net.mcdist.has_seen(&held));

    helper.0.kill().expect("SIGKILL the helper");
    helper.0.wait().expect("reap the helper");
    assert!(
        bed.wait_until_detached(),
        "program still attached after its process died: {:?}",
        bed.attached_program()
    );
    net.send(MCDIST_PORT, &held);
    assert!(net.mcdist.wait_for(&held));
}
