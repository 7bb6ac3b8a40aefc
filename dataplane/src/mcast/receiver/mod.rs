//! The clone host's mcdist receiver: [`McastReceiver`] receives the families' fragments,
//! delivers their pages to the families' sinks and requests the pages the fault handler asks
//! for.
//!
//! The protocol lives in [`ReceiverCore`], which does no I/O: a transport hands it received
//! datagrams, ticks it when it asks, and sends the REQUESTs it gives
//! ([`RequestTransport`]). Two transports drive it:
//!
//! - the kernel UDP socket path ([`McastReceiver::start`]): one socket joined to the
//!   families' groups, received by an io_uring loop;
//! - the AF_XDP path ([`McastReceiver::start_xdp`]): the XDP program steers the fragments to
//!   AF_XDP sockets, one thread per RX queue; the kernel socket stays for the memberships,
//!   the requests and what the program passes.
//!
//! Rooms:
//!
//! - `receiver_core`: [`ReceiverCore`], the state machine's entry points;
//! - `datagrams`: what a batch of datagrams does, one function per kind;
//! - `retry`: the request window, re-requests and the timers; `rtt`: the retransmission
//!   timeout's parts; `loss`: when an expired page counts as lost;
//! - `family`: per-family state ([`FamilyJoin`]); `state`: what the core keeps behind its
//!   lock; `outgoing`: REQUEST encoding and [`RequestTransport`]; `stats`:
//!   [`ReceiverStats`]; `config`: [`ReceiverConfig`];
//! - `socket` + `uring`: the kernel socket path; `xdp_path`: the AF_XDP path.

mod config;
mod datagrams;
mod family;
mod loss;
mod outgoing;
mod receiver_core;
mod repair_blocks;
mod retry;
mod rtt;
mod socket;
mod state;
mod stats;
#[cfg(test)]
mod test_support;
mod uring;
mod xdp_path;

pub use config::{DEFAULT_PORT, ReceiverConfig};
pub use family::{FamilyJoin, HeldPages, JoinError};
pub use outgoing::RequestTransport;
pub use receiver_core::ReceiverCore;
pub use socket::{McastReceiver, ReceiverError, STOP_TIMEOUT};
pub use stats::ReceiverStats;
pub use xdp_path::{XdpPathError, XdpReceiveConfig, XdpReceiveStatus};
