//! The daemons of a cluster (`sfd`, and the Slurm daemons): starting them detached, signalling
//! them through pidfds, and stopping them with a bound.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::record::HostInfo;

/// Bound on waiting for a process to exit after SIGKILL.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a pidfd for `pid` (`pidfd_open(2)`): a handle that keeps naming this very process even
/// if its pid is later reused.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and a flags word by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process behind `pidfd` (`pidfd_send_signal(2)`).
///
/// A process that has already exited gives `ESRCH`.
pub(crate) fn pidfd_signal(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: `pidfd` is an open pidfd for the call's duration; a null `info` asks the kernel to
    // fill in the siginfo itself, so no memory of ours is read or written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout` for the process behind `pidfd` to exit; returns whether it has.
///
/// A pidfd becomes readable when its process exits (whether or not it has been reaped).
pub(crate) fn pidfd_wait(pidfd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let millis =
            libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
        let mut fds = [libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd that outlives the call, and the count
        // passed is its length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, millis) };
        if rc > 0 {
            return Ok(true);
        }
        if rc == 0 {
            if Instant::now() >= deadline {
                return Ok(false);
            }
            continue;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One host's `sfd` process.
///
/// Signals always go through the pidfd, so they can never reach a process that reused the pid.
#[derive(Debug)]
pub(crate) struct Daemon {
    pid: u32,
    pidfd: OwnedFd,
    /// Present when this process started the daemon: used to reap it and read its status.
    child: Option<Child>,
    /// How it ended, once known.
    ended: Option<String>,
}

impl Daemon {
    /// Starts `ip netns exec {netns} {sfd} --config {config}` for `host` (see [`Daemon::start`]),
    /// stdout and stderr appended to the host's log, `RUST_LOG=log_filter`.
    pub(crate) fn spawn(host: &HostInfo, sfd: &Path, log_filter: &str) -> io::Result<Daemon> {
        let mut command = host.command(sfd);
        command
            .arg("--config")
            .arg(&host.config)
            .env("RUST_LOG", log_filter);
        Daemon::start(command, &host.log)
    }

    /// Starts `command` in a session of its own (so it outlives the caller and ignores the
    /// caller's terminal), stdin from `/dev/null`, stdout and stderr appended to `log`.
    ///
    /// Commands are `ip netns exec ...`, which execs the program in place, so the pid is the
    /// daemon's.
    pub(crate) fn start(mut command: Command, log: &Path) -> io::Result<Daemon> {
        let log = OpenOptions::new().create(true).append(true).open(log)?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: `new_session` only calls setsid(2), which is async-signal-safe and allocates
        // nothing, as code running between fork and exec must be.
        unsafe { command.pre_exec(new_session) };
        let mut child = command.spawn()?;
        // The child is not reaped until we wait for it, so its pid cannot be reused yet.
        match pidfd_open(child.id()) {
            Ok(pidfd) => Ok(Daemon {
                pid: child.id(),
                pidfd,
                child: Some(child),
                ended: None,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Takes hold of a daemon started by another process, if `pid` is still running with
    /// `identity` (a path only it has as an argument, e.g. its configuration file) on its
    /// command line. `Ok(None)`: it is gone (or the pid now names something else, which is then
    /// left alone).
    pub(crate) fn adopt(pid: u32, identity: &Path) -> io::Result<Option<Daemon>> {
        let pidfd = match pidfd_open(pid) {
            Ok(pidfd) => pidfd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        // Checked after the pidfd pins the process: if the pid was reused in between, the
        // command line read here is the newcomer's and does not match.
        if !runs_with_argument(pid, identity) || pidfd_wait(&pidfd, Duration::ZERO)? {
            return Ok(None);
        }
        Ok(Some(Daemon {
            pid,
            pidfd,
            child: None,
            ended: None,
        }))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// How the daemon ended, or `None` while it runs. Never blocks.
    pub(crate) fn exit_status(&mut self) -> io::Result<Option<String>> {
        if self.ended.is_none() {
            self.ended = match self.child.as_mut() {
                Some(child) => child.try_wait()?.map(|status| status.to_string()),
                None => pidfd_wait(&self.pidfd, Duration::ZERO)?
                    .then(|| "exited (status unknown: started by another process)".to_owned()),
            };
        }
        Ok(self.ended.clone())
    }

    /// Sends `signal` unless the daemon has already ended.
    pub(crate) fn signal(&mut self, signal: libc::c_int) -> io::Result<()> {
        if self.exit_status()?.is_some() {
            return Ok(());
        }
        match pidfd_signal(&self.pidfd, signal) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }
}

/// A daemon [`stop`] could not stop.
#[derive(Debug)]
pub(crate) enum StopFailure {
    /// Sending it a signal failed.
    Signal {
        slot: usize,
        pid: u32,
        source: io::Error,
    },
    /// It still ran [`KILL_TIMEOUT`] after SIGKILL.
    Survived { slot: usize, pid: u32 },
}

/// Stops the daemons in `slots` at positions `which`: SIGTERM and up to `grace` (skipped when
/// zero), then SIGKILL for survivors and up to [`KILL_TIMEOUT`]; one deadline per phase for
/// all of them. Daemons that ended are taken out of their slot; empty slots are skipped.
/// Returns the failures.
pub(crate) fn stop(
    slots: &mut [Option<Daemon>],
    which: &[usize],
    grace: Duration,
) -> Vec<StopFailure> {
    let mut failures = Vec::new();
    let mut phases = vec![(libc::SIGKILL, KILL_TIMEOUT)];
    if !grace.is_zero() {
        phases.insert(0, (libc::SIGTERM, grace));
    }
    for (signal, bound) in phases {
        let mut signalled = Vec::new();
        for &slot in which {
            let Some(daemon) = slots[slot].as_mut() else {
                continue;
            };
            match daemon.signal(signal) {
                Ok(()) => signalled.push(slot),
                Err(source) => failures.push(StopFailure::Signal {
                    slot,
                    pid: daemon.pid(),
                    source,
                }),
            }
        }
        let deadline = Instant::now() + bound;
        let mut pause = Duration::from_millis(5);
        loop {
            signalled.retain(
                |&slot| match slots[slot].as_mut().map(Daemon::exit_status) {
                    Some(Ok(None)) => true,
                    _ => {
                        slots[slot] = None;
                        false
                    }
                },
            );
            let now = Instant::now();
            if signalled.is_empty() || now >= deadline {
                break;
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
    for &slot in which {
        if let Some(daemon) = &slots[slot] {
            failures.push(StopFailure::Survived {
                slot,
                pid: daemon.pid(),
            });
        }
    }
    failures
}

/// Puts the calling process in a new session (runs in the forked child before exec).
fn new_session() -> io::Result<()> {
    // SAFETY: setsid takes no arguments and touches no memory.
    if unsafe { libc::setsid() } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether process `pid` has `argument` as one of its arguments.
fn runs_with_argument(pid: u32, argument: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let wanted = argument.as_os_str().as_encoded_bytes();
    cmdline.split(|&b| b == 0).any(|arg| arg == wanted)
}

/// The last `lines` lines of the file at `path` (reading at most its last 8 KiB), for error
/// messages. A missing or unreadable file gives a note saying so.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 8192;
    let read = || -> io::Result<String> {
        let mut file = fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut bytes = Vec::new();
        file.take(MAX).read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => "(log is empty)".to_owned(),
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(log unreadable: {e})"),
    }
}
