//! SnowFlock's clone API: tickets, `clone`, checkpoints, `exit`, `join`, `kill`.
//!
//! ```ignore
//! let ticket = request_ticket(8)?;            // m = ticket.granted() <= 8
//! match clone(&ticket)? {
//!     Fork::Child(id) => exit(&work(id)),     // id in 1..=m
//!     Fork::Parent => {}
//! }
//! for child in join(&ticket)? { /* child.id, child.result */ }
//! ```

use crate::abi::{ChildStatus, errno};
use crate::hypercall;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// A hypercall failed with `-errno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// `EPERM`: not allowed here (e.g. `exit` in a VM that is not a clone).
    NotPermitted,
    /// `ENOENT`: no such ticket, checkpoint or child.
    NotFound,
    /// `EBUSY`: the ticket was already used.
    Busy,
    /// `EAGAIN`: the cluster could not run the clones it granted.
    Again,
    /// `EINVAL`: an argument is out of range.
    InvalidArgument,
    /// Any other errno.
    Errno(u64),
    /// `CHILD_RESULT` returned a status this SDK does not know.
    UnknownStatus(u64),
}

impl Error {
    pub fn from_errno(e: u64) -> Self {
        match e {
            errno::EPERM => Self::NotPermitted,
            errno::ENOENT => Self::NotFound,
            errno::EBUSY => Self::Busy,
            errno::EAGAIN => Self::Again,
            errno::EINVAL => Self::InvalidArgument,
            other => Self::Errno(other),
        }
    }

    /// The errno this error came from (`None` for [`Error::UnknownStatus`]).
    pub fn errno(&self) -> Option<u64> {
        match *self {
            Self::NotPermitted => Some(errno::EPERM),
            Self::NotFound => Some(errno::ENOENT),
            Self::Busy => Some(errno::EBUSY),
            Self::Again => Some(errno::EAGAIN),
            Self::InvalidArgument => Some(errno::EINVAL),
            Self::Errno(e) => Some(e),
            Self::UnknownStatus(_) => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotPermitted => f.write_str("not permitted (EPERM)"),
            Self::NotFound => f.write_str("no such ticket, checkpoint or child (ENOENT)"),
            Self::Busy => f.write_str("ticket already used (EBUSY)"),
            Self::Again => f.write_str("cluster could not run the clones (EAGAIN)"),
            Self::InvalidArgument => f.write_str("invalid argument (EINVAL)"),
            Self::Errno(e) => write!(f, "errno {e}"),
            Self::UnknownStatus(s) => write!(f, "unknown child status {s}"),
        }
    }
}

impl core::error::Error for Error {}

/// `rax` as a value, or the error it encodes.
fn check(rax: u64) -> Result<u64, Error> {
    match errno::decode(rax) {
        Some(e) => Err(Error::from_errno(e)),
        None => Ok(rax),
    }
}

/// Clone slots reserved by [`request_ticket`]: use it once, with [`clone()`]
/// or [`create_clones`], then [`join`] or [`kill`] it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    id: u64,
    granted: u32,
}

impl Ticket {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many clones the cluster granted (m <= the n asked for; may be 0).
    pub fn granted(&self) -> u32 {
        self.granted
    }
}

/// Which side of a [`clone()`] this VM is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fork {
    Parent,
    /// A clone, numbered `1..=ticket.granted()`.
    Child(u32),
}

/// An immutable snapshot of this VM, made by [`checkpoint_parent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    id: u64,
}

impl Checkpoint {
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The two ways [`checkpoint_parent`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointOutcome {
    /// In the VM that made the checkpoint, right away.
    Parent(Checkpoint),
    /// In a clone that [`create_clones`] started from the checkpoint, later.
    Child { id: u32, checkpoint: u64 },
}

/// How a child ended when it did not hand back a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureStatus {
    /// It faulted, panicked, exited with `exit_vm` or broke the ABI.
    Failed,
    /// [`kill`] ended it.
    Killed,
    /// Its host went away.
    Lost,
}

/// Why a child has no result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildFailure {
    pub status: FailureStatus,
    /// The VMM's explanation (e.g. the panic message).
    pub message: String,
}

impl fmt::Display for ChildFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.status, self.message)
    }
}

/// One child's end, as [`join`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildOutcome {
    /// `1..=m`.
    pub id: u32,
    /// The bytes it passed to [`exit`], or why there are none.
    pub result: Result<Vec<u8>, ChildFailure>,
}

/// Reserves up to `n` clones. The ticket says how many were granted.
pub fn request_ticket(n: u32) -> Result<Ticket, Error> {
    request_ticket_with(n, 0)
}

/// Like [`request_ticket`], telling the VMM what it may count on about the
/// children: `flags` from [`abi::ticket`](crate::abi::ticket), e.g.
/// `CHILDREN_WRITE` when they will write much of the state they inherit
/// (clones on this host then start on a copy of the parent's memory).
pub fn request_ticket_with(n: u32, flags: u64) -> Result<Ticket, Error> {
    let (rax, rdx) = hypercall::request_ticket(u64::from(n), flags);
    let id = check(rax)?;
    let granted = u32::try_from(rdx).map_err(|_| Error::InvalidArgument)?;
    Ok(Ticket { id, granted })
}

/// Clones this VM into `ticket.granted()` children. Returns
/// [`Fork::Parent`] here and [`Fork::Child`] in each child, which continues
/// from this point with a copy-on-write view of memory as it is now.
///
/// With the runtime (`rt`), the heap's free pages are reported to the VMM
/// first (children need not receive them), and each child reports the pages
/// its allocator hands out from then on (it need not receive their old
/// contents either); see `rt::report_free_pages`.
pub fn clone(ticket: &Ticket) -> Result<Fork, Error> {
    before_clone_point();
    Ok(match check(hypercall::clone(ticket.id))? {
        0 => Fork::Parent,
        id => {
            let id = child_id(id)?;
            in_child();
            Fork::Child(id)
        }
    })
}

/// Freezes an immutable checkpoint of this VM to clone from later with
/// [`create_clones`]. Children resume here, seeing memory as it is now.
/// Page reports as for [`clone()`].
pub fn checkpoint_parent() -> Result<CheckpointOutcome, Error> {
    before_clone_point();
    let (rax, rdx) = hypercall::checkpoint();
    Ok(match check(rax)? {
        0 => CheckpointOutcome::Parent(Checkpoint { id: rdx }),
        id => {
            let id = child_id(id)?;
            in_child();
            CheckpointOutcome::Child {
                id,
                checkpoint: rdx,
            }
        }
    })
}

/// Right before `CLONE`/`CHECKPOINT`: nothing may allocate between this and
/// the hypercall, or the free report would describe another heap.
fn before_clone_point() {
    #[cfg(feature = "rt")]
    crate::rt::report_free_pages();
}

/// In a child, right after the clone point.
fn in_child() {
    #[cfg(feature = "rt")]
    crate::rt::enter_clone();
}

/// Starts `ticket.granted()` children from `checkpoint`; this VM goes on.
pub fn create_clones(checkpoint: &Checkpoint, ticket: &Ticket) -> Result<(), Error> {
    check(hypercall::create_clones(checkpoint.id, ticket.id)).map(drop)
}

/// Ends this child, handing `result` (at most `MAX_TRANSFER` bytes) to the parent.
///
/// # Panics
/// If this VM is not a clone: the VMM refuses, and a `-> !` cannot go on.
pub fn exit(result: &[u8]) -> ! {
    #[cfg(feature = "hosted")]
    hypercall::linux_finish();
    let rax = hypercall::child_exit(result);
    match errno::decode(rax) {
        Some(e) => panic!(
            "exit(): the VMM refused ({}): is this VM a clone?",
            Error::from_errno(e)
        ),
        None => panic!("exit(): CHILD_EXIT returned {rax}"),
    }
}

/// Ends this VM with `code` (the exit status of a top-level VM; a child that
/// calls it counts as failed).
pub fn exit_vm(code: i32) -> ! {
    #[cfg(feature = "hosted")]
    hypercall::linux_finish();
    hypercall::exit(u64::from(code as u32))
}

/// Waits until every child of `ticket` has ended and collects their outcomes,
/// ordered by child id.
pub fn join(ticket: &Ticket) -> Result<Vec<ChildOutcome>, Error> {
    let m = check(hypercall::join(ticket.id))?;
    let mut outcomes = Vec::new();
    for child in 1..=m {
        let mut buf = alloc::vec![0; 256];
        let (status, len) = loop {
            let (rax, len) = hypercall::child_result(ticket.id, child, &mut buf);
            let status = check(rax)?;
            // The payload did not fit: grow to its full length and ask again.
            match usize::try_from(len) {
                Ok(len) if len > buf.len() => buf.resize(len, 0),
                Ok(len) => break (status, len),
                Err(_) => return Err(Error::InvalidArgument),
            }
        };
        buf.truncate(len);
        let failed = match ChildStatus::from_raw(status) {
            Some(ChildStatus::Exited) => None,
            Some(ChildStatus::Failed) => Some(FailureStatus::Failed),
            Some(ChildStatus::Killed) => Some(FailureStatus::Killed),
            Some(ChildStatus::Lost) => Some(FailureStatus::Lost),
            None => return Err(Error::UnknownStatus(status)),
        };
        let result = match failed {
            None => Ok(buf),
            Some(status) => Err(ChildFailure {
                status,
                message: String::from_utf8_lossy(&buf).into_owned(),
            }),
        };
        outcomes.push(ChildOutcome {
            id: child_id(child)?,
            result,
        });
    }
    Ok(outcomes)
}

/// Ends every child of `ticket` that is still running; returns how many.
/// [`join`] then reports them as [`FailureStatus::Killed`].
pub fn kill(ticket: &Ticket) -> Result<u32, Error> {
    let n = check(hypercall::kill(ticket.id))?;
    u32::try_from(n).map_err(|_| Error::InvalidArgument)
}

fn child_id(raw: u64) -> Result<u32, Error> {
    u32::try_from(raw).map_err(|_| Error::InvalidArgument)
}
