//! A blocking client of `sfd`'s local API (see [`crate::protocol`]), for the
//! CLI, the multi-host tests and the benchmarks.

use crate::supervisor::StartOptions;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::outcome::VmOutcome;
use crate::protocol::{ApiRequest, ApiResponse, CloneSummary, HostStats, VmProgress};
use crate::wire::{self, WireError};

/// A failed API exchange.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connecting to sfd at {path} failed (is it running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to sfd failed")]
    Wire(#[from] WireError),
    #[error("setting the read timeout failed")]
    Timeout(#[source] std::io::Error),
    #[error("sfd: {0}")]
    Refused(String),
    #[error("unexpected answer from sfd: {0}")]
    Unexpected(String),
}

/// Talks to the daemon behind one socket; each request opens a connection.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    /// Longest wait for any one answer; `None` waits as long as it takes.
    read_timeout: Option<Duration>,
}

/// How a waited-for VM ended.
#[derive(Debug, Clone)]
pub struct VmEnd {
    pub outcome: VmOutcome,
    pub reports: Vec<CloneSummary>,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>, read_timeout: Option<Duration>) -> Self {
        Self {
            socket: socket.into(),
            read_timeout,
        }
    }

    fn send(&self, request: &ApiRequest) -> Result<UnixStream, ApiError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|source| ApiError::Connect {
            path: self.socket.clone(),
            source,
        })?;
        stream
            .set_read_timeout(self.read_timeout)
            .map_err(ApiError::Timeout)?;
        wire::write_frame(&mut stream, request)?;
        Ok(stream)
    }

    fn answer(stream: &mut UnixStream) -> Result<ApiResponse, ApiError> {
        match wire::read_frame(stream)? {
            ApiResponse::Error { message } => Err(ApiError::Refused(message)),
            other => Ok(other),
        }
    }

    /// Sends a request with a single answer; an error answer is [`ApiError::Refused`].
    pub fn call(&self, request: &ApiRequest) -> Result<ApiResponse, ApiError> {
        Self::answer(&mut self.send(request)?)
    }

    /// Boots an image on the daemon's host (a Linux-ABI program with
    /// `linux`'s files and options); returns the VM id.
    pub fn start(
        &self,
        name: &str,
        image: Vec<u8>,
        mem_size: u64,
        cmdline: &str,
        linux: StartOptions,
    ) -> Result<u64, ApiError> {
        let request = ApiRequest::Start {
            name: name.to_string(),
            image,
            mem_size,
            cmdline: cmdline.to_string(),
            linux,
            wait: false,
        };
        match self.call(&request)? {
            ApiResponse::Started { vm } => Ok(vm),
            other => Err(ApiError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Like [`ApiClient::start`], then follows the VM until it ends as
    /// [`ApiClient::wait`] does, on one connection, from its first console
    /// line. `on_start` gets the VM id first.
    #[allow(clippy::too_many_arguments)]
    pub fn start_and_wait(
        &self,
        name: &str,
        image: Vec<u8>,
        mem_size: u64,
        cmdline: &str,
        linux: StartOptions,
        on_start: impl FnOnce(u64),
        on_line: impl FnMut(&str, &str),
    ) -> Result<VmEnd, ApiError> {
        let request = ApiRequest::Start {
            name: name.to_string(),
            image,
            mem_size,
            cmdline: cmdline.to_string(),
            linux,
            wait: true,
        };
        let mut stream = self.send(&request)?;
        match Self::answer(&mut stream)? {
            ApiResponse::Started { vm } => on_start(vm),
            other => return Err(ApiError::Unexpected(format!("{other:?}"))),
        }
        Self::follow(&mut stream, on_line)
    }

    /// Follows VM `vm` until it ends, passing each console line (label,
    /// line) of it and its clones to `on_line`.
    pub fn wait(&self, vm: u64, on_line: impl FnMut(&str, &str)) -> Result<VmEnd, ApiError> {
        let mut stream = self.send(&ApiRequest::Wait { vm })?;
        Self::follow(&mut stream, on_line)
    }

    fn follow(
        stream: &mut std::os::unix::net::UnixStream,
        mut on_line: impl FnMut(&str, &str),
    ) -> Result<VmEnd, ApiError> {
        loop {
            match Self::answer(stream)? {
                ApiResponse::Console { label, line } => on_line(&label, &line),
                ApiResponse::Ended { outcome, reports } => return Ok(VmEnd { outcome, reports }),
                other => return Err(ApiError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// What VM `vm`'s clone operations got so far.
    pub fn progress(&self, vm: u64) -> Result<VmProgress, ApiError> {
        match self.call(&ApiRequest::Progress { vm })? {
            ApiResponse::Progress(progress) => Ok(progress),
            other => Err(ApiError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Fault counters of every host of the cluster.
    pub fn stats(&self) -> Result<Vec<HostStats>, ApiError> {
        match self.call(&ApiRequest::Stats)? {
            ApiResponse::Stats { hosts } => Ok(hosts),
            other => Err(ApiError::Unexpected(format!("{other:?}"))),
        }
    }
}
