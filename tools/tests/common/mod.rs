//! Helpers of the multi-host tests: a cluster of real `sfd` daemons in
//! network-namespace hosts, and calls to their local API.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use snowflock_control::VmOutcome;
use snowflock_control::client::ApiClient;
use snowflock_control::protocol::{ApiRequest, ApiResponse, CloneSummary, HostStats};
use snowflock_testkit::{ClusterSpec, NetnsCluster};
use tempfile::TempDir;

pub fn cluster(
    hosts: usize,
    slots: u32,
    tune: impl FnOnce(&mut ClusterSpec),
) -> (NetnsCluster, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(hosts, dir.path(), env!("CARGO_BIN_EXE_sfd"));
    spec.clone_slots = slots;
    spec.log_filter = "info,snowflock_control=debug".into();
    tune(&mut spec);
    let cluster = NetnsCluster::up(spec).expect("cluster up");
    (cluster, dir)
}

/// Every answer, a whole job included, comes within this bound.
pub fn client(socket: &Path) -> ApiClient {
    ApiClient::new(socket, Some(Duration::from_secs(240)))
}

pub fn call(socket: &Path, req: &ApiRequest) -> ApiResponse {
    client(socket).call(req).unwrap()
}

pub fn start(socket: &Path, image: &str, mem: u64, args: &str) -> u64 {
    start_with_files(socket, image, mem, args, Default::default())
}

/// Like [`start`], for a Linux-ABI program with host files.
pub fn start_with_files(
    socket: &Path,
    image: &str,
    mem: u64,
    args: &str,
    files: snowflock_vmm::files::FilesConfig,
) -> u64 {
    let image = snowflock_guest::images::by_name(image).unwrap().to_vec();
    client(socket)
        .start(
            "test",
            image,
            mem,
            args,
            snowflock_control::StartOptions {
                files,
                ..Default::default()
            },
        )
        .unwrap()
}

/// Console lines and the end of a VM.
pub struct Ended {
    pub lines: Vec<String>,
    pub outcome: VmOutcome,
    pub reports: Vec<CloneSummary>,
}

pub fn wait(socket: &Path, vm: u64) -> Ended {
    let mut lines = Vec::new();
    let end = client(socket)
        .wait(vm, |label, line| lines.push(format!("[{label}] {line}")))
        .expect("waiting for the VM");
    Ended {
        lines,
        outcome: end.outcome,
        reports: end.reports,
    }
}

pub fn stats(socket: &Path) -> Vec<HostStats> {
    client(socket).stats().unwrap()
}

/// The value of `key=` in the line of `lines` that starts with `prefix`.
pub fn field(lines: &[String], prefix: &str, key: &str) -> String {
    let line = lines
        .iter()
        .find(|l| l.contains(prefix) && l.contains(&format!(" {key}=")))
        .unwrap_or_else(|| panic!("no {prefix} line with {key}= in {lines:#?}"));
    let start = line.find(&format!(" {key}=")).unwrap() + key.len() + 2;
    line[start..].split_whitespace().next().unwrap().to_string()
}

/// The same job run in-process on this host with `sf run`.
pub fn local_run(image: &str, mem: &str, args: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_sf"))
        .args(["run", image, "--mem", mem, "--"])
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            snowflock_testkit::enter_netns(ns).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// Waits (bounded) until `pred` holds for the cluster's stats as seen from `socket`.
pub fn wait_for_stats(socket: &Path, what: &str, pred: impl Fn(&[HostStats]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hosts = stats(socket);
        if pred(&hosts) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {hosts:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A static C program (glibc) that calls `pipe()`, which the Linux
/// personality does not implement (glibc makes it `pipe2`), built with gcc
/// into a temporary directory (kept alive by the returned handle).
pub fn pipe_program() -> (TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("pipe.c");
    let program = dir.path().join("pipe");
    std::fs::write(
        &source,
        "#include <unistd.h>\nint main(void) { int fds[2]; return pipe(fds) == 0; }\n",
    )
    .unwrap();
    let gcc = Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(&program)
        .arg(&source)
        .status()
        .unwrap();
    assert!(gcc.success());
    (dir, program)
}
