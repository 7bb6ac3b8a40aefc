//! mcdist: multicast page distribution (design and wire format in `docs/mcdist.md`).
//!
//! The parent host's [`McastServer`] answers page requests by sending the page, cut into
//! MTU-sized fragments, to the family's multicast group; every clone host of the family
//! receives it and keeps it in its host page cache.
//!
//! - [`wire`]: the datagrams and their tags.
//! - `repair`: forward error correction of the push stream (Reed-Solomon over fragments).
//! - [`server`]: the server (request handling, duplicate suppression, pacing, unicast end
//!   game, push).
//! - [`receiver`]: the receive side: the transport-free [`ReceiverCore`] (authentication,
//!   reassembly, delivery, re-requests, flow-control reports) and the two paths that drive
//!   it, the kernel UDP socket ([`McastReceiver`], an io_uring loop) and AF_XDP
//!   ([`McastReceiver::start_xdp`]).

mod bitmap;
mod rate;
mod reassembly;
pub mod receiver;
mod repair;
pub mod server;
mod sys;
pub mod wire;

pub use receiver::{
    DEFAULT_PORT, FamilyJoin, HeldPages, JoinError, McastReceiver, ReceiverConfig, ReceiverCore,
    ReceiverError, ReceiverStats, RequestTransport, XdpPathError, XdpReceiveConfig,
    XdpReceiveStatus,
};
pub use server::{
    FamilyServerStats, McastBindError, McastServer, McastServerConfig, McastServerStats, Recording,
    Registration, WorkingSet,
};
