//! A cloned job run again from the same checkpoint: each later round
//! requests a ticket, creates the clones from the checkpoint and joins them,
//! timing both steps. Every child's share of the job depends on how many
//! clones the first round had, so a later round must be granted as many.

use alloc::vec::Vec;
use core::fmt;

use crate::clone::{Checkpoint, ChildOutcome, Error, create_clones, join, request_ticket_with};
use crate::time::now_ns;

/// One round of clones created from a checkpoint and joined.
#[derive(Debug)]
pub struct Round {
    /// The children's outcomes, in child order.
    pub outcomes: Vec<ChildOutcome>,
    /// The `create_clones` call, ns.
    pub create_ns: u64,
    /// From its return to the joined children, ns.
    pub join_ns: u64,
}

/// Why a round did not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundError {
    /// The round's ticket granted `granted` clones, not the first round's `wanted`.
    Granted { granted: u32, wanted: u32 },
    /// A clone call failed.
    Call(Error),
}

impl fmt::Display for RoundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Granted { granted, wanted } => write!(
                f,
                "granted {granted} clones, not the {wanted} of the first round"
            ),
            Self::Call(e) => write!(f, "{e}"),
        }
    }
}

impl From<Error> for RoundError {
    fn from(e: Error) -> Self {
        Self::Call(e)
    }
}

/// Asks for `clones` clones with ticket `flags` (see
/// [`request_ticket_with`]), which must be granted `shares`, creates them
/// from `checkpoint` and joins them.
pub fn again(
    checkpoint: &Checkpoint,
    clones: u32,
    shares: u32,
    flags: u64,
) -> Result<Round, RoundError> {
    let ticket = request_ticket_with(clones, flags)?;
    if ticket.granted() != shares {
        return Err(RoundError::Granted {
            granted: ticket.granted(),
            wanted: shares,
        });
    }
    let started = now_ns();
    create_clones(checkpoint, &ticket)?;
    let created = now_ns();
    let outcomes = join(&ticket)?;
    Ok(Round {
        outcomes,
        create_ns: created - started,
        join_ns: now_ns() - created,
    })
}
