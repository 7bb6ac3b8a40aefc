//! Network namespaces as `ip netns` keeps them: which exist, which belong to a cluster, entering
//! one, and killing the processes inside one.
//!
//! Namespaces are found through their handles in [`NETNS_DIR`]; processes through `/proc`, each
//! pinned with a pidfd before it is checked and signalled.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::process;

/// Where `ip netns add` keeps its namespace handles (bind mounts of nsfs inodes).
const NETNS_DIR: &str = "/run/netns";

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

/// Whether `name` is one of the namespaces a cluster with `prefix` creates:
/// `{prefix}-sw` or `{prefix}-h{N}`.
fn belongs_to(prefix: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    rest == "sw"
        || rest
            .strip_prefix('h')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Existing namespaces (entries of `/run/netns`) that a cluster with `prefix` would create.
pub(crate) fn list(prefix: &str) -> io::Result<Vec<String>> {
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
pub(crate) fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// The nsfs identity (device, inode) of the namespace `name`, or `None` if it does not exist.
fn identity(name: &str) -> io::Result<Option<(u64, u64)>> {
    match fs::metadata(Path::new(NETNS_DIR).join(name)) {
        Ok(meta) => Ok(Some((meta.dev(), meta.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether process `pid` currently lives in the network namespace with identity `ns`.
fn process_in(pid: u32, ns: (u64, u64)) -> bool {
    fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == ns)
}

/// SIGKILLs every process inside namespace `name` and waits up to `timeout` for all to exit.
///
/// Each candidate is pinned with a pidfd *before* its namespace is checked, and signalled
/// through that pidfd, so a pid reused by an unrelated process is never signalled.
/// Returns the pids still alive at the deadline (empty on success, or if `name` is gone).
pub(crate) fn kill_processes_in(name: &str, timeout: Duration) -> io::Result<Vec<u32>> {
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
}
