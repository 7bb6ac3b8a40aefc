//! What the tests of the netns cluster share: stand-in daemons, a fixture making specs for
//! them, and observations of namespaces and processes.
//!
//! Needs root, iproute2 and python3; a missing one fails the test with a message saying so.
//! The stand-in daemon (a shell script + python3) only listens on `{state_dir}/sfd.sock`, so
//! tests using it test the namespace plumbing, not `sfd`. Each spec gets its own random prefix.
//!
//! Also compiled into the `sf` crate's tests of the cluster CLI and of the real `sfd`.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use snowflock_testkit::{ClusterSpec, NetnsCluster, random_prefix};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Environment and stand-in daemons

/// The python3 interpreter's real path (not a pyenv shim), after checking root and `ip`.
pub fn python() -> &'static Path {
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
pub const LISTENER: &str = r#"
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
pub enum StandIn {
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
pub fn stand_in(dir: &Path, kind: StandIn) -> PathBuf {
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

pub struct Fixture {
    pub tmp: TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        python();
        Fixture {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A spec for `hosts` hosts in `DIR/{name}` with a fresh prefix and a short ready bound.
    pub fn spec(&self, name: &str, hosts: usize, daemon: StandIn) -> ClusterSpec {
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
pub fn namespaces(prefix: &str) -> Vec<String> {
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
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Waits up to 5 s for `pid` to stop running.
pub fn gone_soon(pid: u32) -> bool {
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
pub fn in_netns(pid: u32, netns: &str) -> bool {
    let (Ok(a), Ok(b)) = (
        fs::metadata(format!("/proc/{pid}/ns/net")),
        fs::metadata(format!("/run/netns/{netns}")),
    ) else {
        return false;
    };
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

pub fn pids(cluster: &NetnsCluster) -> Vec<u32> {
    cluster
        .hosts()
        .iter()
        .map(|h| h.pid.expect("a running host has a pid"))
        .collect()
}

/// Checks that `up` left nothing: no namespaces, no daemons, no state directory.
pub fn assert_nothing_left(prefix: &str, pids: &[u32], dir: &Path) {
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
