//! Network namespaces and links, made with iproute2's `ip`, and the processes inside them.
//!
//! Every `ip` invocation runs with a time bound ([`IP_TIMEOUT`]). Nothing here touches the root
//! namespace: links are created from inside a cluster namespace (`ip -n NS link add ...`) with
//! their peer placed directly in another cluster namespace.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use super::process;

/// Where `ip netns add` keeps its namespace handles (bind mounts of nsfs inodes).
pub(super) const NETNS_DIR: &str = "/run/netns";

/// Moves the calling thread (only it) into network namespace `name`: its
/// sockets, XDP attachments and interface lookups from then on are that
/// namespace's. Run it on a thread of its own.
pub fn enter(name: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let handle = fs::File::open(Path::new(NETNS_DIR).join(name))?;
    // SAFETY: setns only changes the calling thread's network namespace; the
    // descriptor is an open nsfs handle we own for the duration of the call.
    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Longest time one `ip` command may take before it is killed and reported as failed.
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// A helper command that failed: the command line, how it ended, and what it printed on stderr.
#[derive(Debug)]
pub struct CommandError {
    /// The command line, e.g. `ip netns add sfab12cd-h1`.
    pub command: String,
    /// How it ended: an exit status, a timeout, or why it could not start.
    pub outcome: String,
    /// Its standard error, trimmed.
    pub stderr: String,
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed ({})", self.command, self.outcome)?;
        if !self.stderr.is_empty() {
            write!(f, ": {}", self.stderr)?;
        }
        Ok(())
    }
}

impl std::error::Error for CommandError {}

/// The `ip` binary: the first on `PATH`, else `/usr/sbin/ip` or `/sbin/ip` (a `PATH` without
/// the sbin directories is common).
pub(super) fn ip_program() -> &'static Path {
    static IP: OnceLock<PathBuf> = OnceLock::new();
    IP.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join("ip"))
            .chain(["/usr/sbin/ip", "/sbin/ip"].map(PathBuf::from))
            .find(|candidate| candidate.is_file())
            .unwrap_or_else(|| PathBuf::from("ip"))
    })
}

/// Runs `ip ARGS...`, bounded by [`IP_TIMEOUT`]; returns its stdout.
pub(super) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String, CommandError> {
    let mut command = Command::new(ip_program());
    command.args(args);
    run_bounded(&mut command, IP_TIMEOUT)
}

/// Runs `tc -n NETNS ARGS...`, bounded by [`IP_TIMEOUT`]; returns its stdout.
pub(super) fn tc<S: AsRef<OsStr>>(netns: &str, args: &[S]) -> Result<String, CommandError> {
    let tc = ip_program().with_file_name("tc");
    let mut command = Command::new(if tc.is_file() {
        tc
    } else {
        PathBuf::from("tc")
    });
    command.args(["-n", netns]).args(args);
    run_bounded(&mut command, IP_TIMEOUT)
}

/// Runs `command` to completion with piped output, killing it after `timeout`.
fn run_bounded(command: &mut Command, timeout: Duration) -> Result<String, CommandError> {
    let line = render(command);
    let fail = |outcome: String, stderr: String| CommandError {
        command: line.clone(),
        outcome,
        stderr: stderr.trim().to_owned(),
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("could not start: {e}"), String::new()))?;
    // Drain both pipes on threads so a chatty command cannot block on a full pipe.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status: Result<ExitStatus, String> = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("killed after {timeout:?}"));
            }
            Ok(None) => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("waiting for it failed: {e}"));
            }
        }
    };
    let collect = |reader: Option<thread::JoinHandle<String>>| {
        reader.and_then(|r| r.join().ok()).unwrap_or_default()
    };
    let out = collect(stdout);
    let err = collect(stderr);
    match status {
        Ok(status) if status.success() => Ok(out),
        Ok(status) => Err(fail(status.to_string(), err)),
        Err(outcome) => Err(fail(outcome, err)),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The command line as a user would type it (the program by its file name).
fn render(command: &Command) -> String {
    let program = Path::new(command.get_program());
    let mut line = program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Whether `name` is one of the namespaces a cluster with `prefix` creates:
/// `{prefix}-sw` or `{prefix}-h{N}`.
pub(super) fn belongs_to(prefix: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    rest == "sw"
        || rest
            .strip_prefix('h')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Existing namespaces (entries of `/run/netns`) that a cluster with `prefix` would create.
pub(super) fn list(prefix: &str) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(name) = name.to_str()
            && belongs_to(prefix, name)
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Whether the namespace `name` exists.
pub(super) fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// The nsfs identity (device, inode) of the namespace `name`, or `None` if it does not exist.
pub(super) fn identity(name: &str) -> io::Result<Option<(u64, u64)>> {
    match fs::metadata(Path::new(NETNS_DIR).join(name)) {
        Ok(meta) => Ok(Some((meta.dev(), meta.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether process `pid` currently lives in the network namespace with identity `ns`.
pub(super) fn process_in(pid: u32, ns: (u64, u64)) -> bool {
    fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == ns)
}

/// SIGKILLs every process inside namespace `name` and waits up to `timeout` for all to exit.
///
/// Each candidate is pinned with a pidfd *before* its namespace is checked, and signalled
/// through that pidfd, so a pid reused by an unrelated process is never signalled.
/// Returns the pids still alive at the deadline (empty on success, or if `name` is gone).
pub(super) fn kill_processes_in(name: &str, timeout: Duration) -> io::Result<Vec<u32>> {
    let Some(ns) = identity(name)? else {
        return Ok(Vec::new());
    };
    let me = std::process::id();
    let mut victims: Vec<(u32, OwnedFd)> = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || !process_in(pid, ns) {
            continue;
        }
        let Ok(pidfd) = process::pidfd_open(pid) else {
            continue;
        };
        // Checked again now that the pidfd pins the process: the pid may have been reused.
        if process_in(pid, ns) && process::pidfd_signal(&pidfd, libc::SIGKILL).is_ok() {
            victims.push((pid, pidfd));
        }
    }
    let deadline = Instant::now() + timeout;
    let mut alive = Vec::new();
    for (pid, pidfd) in victims {
        let left = deadline.saturating_duration_since(Instant::now());
        if !process::pidfd_wait(&pidfd, left)? {
            alive.push(pid);
        }
    }
    Ok(alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_the_cluster_namespace_pattern() {
        assert!(belongs_to("sfab12cd", "sfab12cd-sw"));
        assert!(belongs_to("sfab12cd", "sfab12cd-h1"));
        assert!(belongs_to("sfab12cd", "sfab12cd-h32"));
        assert!(!belongs_to("sfab12cd", "sfab12cd-h"));
        assert!(!belongs_to("sfab12cd", "sfab12cd-hx"));
        assert!(!belongs_to("sfab12cd", "sfab12cd-sw2"));
        assert!(!belongs_to("sfab12cd", "sfab12cde-h1"));
        assert!(!belongs_to("sfab12cd", "sfab12cdh1"));
        assert!(!belongs_to("sf", "sfab12cd-h1"));
    }

    #[test]
    fn a_failed_command_reports_its_line_status_and_stderr() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo oops >&2; exit 3"]);
        let err = run_bounded(&mut command, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.command, "sh -c echo oops >&2; exit 3");
        assert_eq!(err.stderr, "oops");
        assert!(err.to_string().contains("exit status: 3"), "{err}");
    }

    #[test]
    fn a_hanging_command_is_killed_at_its_bound() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let started = Instant::now();
        let err = run_bounded(&mut command, Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.outcome.contains("killed after"), "{err}");
    }
}
