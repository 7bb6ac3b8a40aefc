//! The helper commands a cluster is built with, iproute2's `ip` and `tc`, each run with a time
//! bound ([`IP_TIMEOUT`]) and, when it fails, reported with its command line, how it ended and
//! what it printed on stderr; and the bounded runner they share with the Slurm commands.

use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

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

/// The `ip` binary: the first on `PATH`, else in the sbin directories (see [`find_program`]).
pub(crate) fn ip_program() -> &'static Path {
    static IP: OnceLock<PathBuf> = OnceLock::new();
    IP.get_or_init(|| find_program("ip").unwrap_or_else(|| PathBuf::from("ip")))
}

/// The program `name`: the first on `PATH`, else in `/usr/sbin`, `/sbin`, `/usr/bin` or `/bin`
/// (a `PATH` without the sbin directories is common, and daemons live there).
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs `ip ARGS...`, bounded by [`IP_TIMEOUT`]; returns its stdout.
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String, CommandError> {
    let mut command = Command::new(ip_program());
    command.args(args);
    run_bounded(&mut command, IP_TIMEOUT)
}

/// Runs `tc -n NETNS ARGS...`, bounded by [`IP_TIMEOUT`]; returns its stdout.
pub(crate) fn tc<S: AsRef<OsStr>>(netns: &str, args: &[S]) -> Result<String, CommandError> {
    let tc = ip_program().with_file_name("tc");
    let mut command = Command::new(if tc.is_file() {
        tc
    } else {
        PathBuf::from("tc")
    });
    command.args(["-n", netns]).args(args);
    run_bounded(&mut command, IP_TIMEOUT)
}

/// Runs `command` to completion with piped output, killing it after `timeout`; returns its
/// stdout if it succeeded.
fn run_bounded(command: &mut Command, timeout: Duration) -> Result<String, CommandError> {
    let output = output_bounded(command, timeout)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    Err(CommandError {
        command: render(command),
        outcome: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// Runs `command` to completion with stdin `/dev/null` and piped output, killing it after
/// `timeout`; returns how it ended and what it printed, whatever its exit status. Fails only if
/// it cannot start, cannot be waited for, or runs past `timeout`.
pub(crate) fn output_bounded(
    command: &mut Command,
    timeout: Duration,
) -> Result<Output, CommandError> {
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
    let collect = |reader: Option<thread::JoinHandle<Vec<u8>>>| {
        reader.and_then(|r| r.join().ok()).unwrap_or_default()
    };
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    match status {
        Ok(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        Err(outcome) => Err(fail(outcome, String::from_utf8_lossy(&stderr).into_owned())),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
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

#[cfg(test)]
mod tests {
    use super::*;

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
