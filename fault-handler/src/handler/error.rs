//! How serving a clone's memory fails ([`FaultError`]) and how starting a
//! fault handler fails ([`StartError`]).

use std::time::Duration;

use crate::cache::InsertError;

/// Why a clone's memory can no longer be served.
///
/// Once a clone fails, its `on_failure` callback has run (once), its
/// region is unregistered from userfaultfd, which wakes every fault
/// waiting in it, and from then on its missing pages read as zeros (the
/// kernel fills them; any fault event still queued is zero-filled by the
/// fault thread). Nothing waits forever, and the VM must be discarded
/// (see [`FaultHandler::failure`](super::FaultHandler::failure)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("memory server lost after {pages_received} pages: {reason}")]
    SourceLost { reason: String, pages_received: u64 },
    #[error("page {page:#x} was not delivered within {timeout:?}")]
    Timeout { page: u64, timeout: Duration },
    #[error("the memory server sent a bad page")]
    BadDelivery(#[source] InsertError),
    #[error("{op} at page {page:#x} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Install {
        op: &'static str,
        page: u64,
        errno: i32,
    },
    #[error("the fault thread died: {reason}")]
    HandlerDied { reason: String },
}

/// A failure to start a fault handler.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "region {addr:#x}+{len:#x} is not page aligned or does not match the family's {family_len:#x} bytes"
    )]
    BadRegion {
        addr: u64,
        len: u64,
        family_len: u64,
    },
    #[error("avoidance map covers {map} pages, the region {region}")]
    AvoidMismatch { map: u64, region: u64 },
    #[error("the clone point already failed")]
    FamilyFailed(#[source] FaultError),
    #[error("creating the userfaultfd failed")]
    Open(#[source] std::io::Error),
    #[error("the UFFDIO_API handshake failed")]
    Api(#[source] std::io::Error),
    #[error("userfaultfd {what} lacks needed ioctls: offered {offered:#x}, needed {needed:#x}")]
    MissingIoctls {
        what: &'static str,
        offered: u64,
        needed: u64,
    },
    #[error("registering region {addr:#x}+{len:#x} with userfaultfd failed")]
    Register {
        addr: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the stop eventfd failed")]
    EventFd(#[source] std::io::Error),
    #[error("creating the io_uring failed")]
    Ring(#[source] std::io::Error),
    #[error("starting the fault thread failed")]
    Thread(#[source] std::io::Error),
}
