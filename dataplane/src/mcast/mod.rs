//! mcdist: multicast page distribution (design and wire format in `docs/mcdist.md`).
//!
//! The parent host's [`McastServer`] answers page requests by sending the page, cut into
//! MTU-sized fragments, to the family's multicast group; every clone host of the family
//! receives it and keeps it in its host page cache.
//!
//! - [`wire`]: the datagrams and their tags.
//! - [`server`]: the server (request handling, duplicate suppression, pacing, unicast end
//!   game, push).
//! - [`receiver_core`]: the receive side without its transport ([`ReceiverCore`]):
//!   authentication, reassembly, delivery, re-requests, flow-control reports. Both receive
//!   paths drive it.
//! - [`receiver`]: the kernel UDP socket path ([`McastReceiver`]), an io_uring loop.
//! - [`xdp_path`]: the AF_XDP path, which [`McastReceiver::start_xdp`] adds to it.

mod rate;
mod reassembly;
pub mod receiver;
pub mod receiver_core;
pub mod server;
mod sys;
mod uring;
pub mod wire;
pub mod xdp_path;

pub use receiver::{McastReceiver, ReceiverError};
pub use receiver_core::{
    DEFAULT_PORT, FamilyJoin, HeldPages, JoinError, ReceiverConfig, ReceiverCore, ReceiverStats,
    RequestTransport,
};
pub use server::{
    FamilyServerStats, McastBindError, McastServer, McastServerConfig, McastServerStats,
};
pub use xdp_path::{XdpPathError, XdpReceiveConfig, XdpReceiveStatus};
