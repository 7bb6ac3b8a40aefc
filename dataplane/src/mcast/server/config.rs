//! The server's tunables ([`McastServerConfig`]).

use std::net::SocketAddrV4;
use std::time::Duration;

/// Tunables of a [`McastServer`](super::McastServer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McastServerConfig {
    /// Unicast address and port: REQUESTs arrive here, and multicast leaves from this
    /// interface (`IP_MULTICAST_IF` = this address, TTL 1, loopback off).
    pub bind: SocketAddrV4,
    /// The receivers' port: fragments go to the groups at this port. A host running a
    /// server and a receiver needs two ports, because unicast datagrams reach only the
    /// socket bound to the more specific address.
    pub group_port: u16,
    /// Path MTU: fragments are sized so their IP packets fit it, or
    /// [`MAX_FRAGMENT_MTU`](crate::mcast::wire::MAX_FRAGMENT_MTU) if that is smaller.
    pub mtu: u32,
    /// A page is sent at most once per this window and destination; requests for it in the
    /// window are answered by that send.
    pub suppression: Duration,
    /// Pages/s sent to a family none of whose receivers reported a rate yet.
    pub initial_rate: u32,
    /// Pages/s never exceeded per family, whatever the receivers report.
    pub max_rate: u32,
    /// A receiver silent this long is no longer active (its rate and presence stop counting).
    pub receiver_idle: Duration,
    /// Push pages nobody asked for yet, behind the requested ones: the store's push runs
    /// (its data pages) to the group once clone hosts join, and to a late JOINer the pages its
    /// siblings already requested.
    pub push: bool,
    /// Threads that take queued pages and send them (at least 1). One thread sent about
    /// 135 000 pages/s to a host that dropped them (`rx-path`'s delivery ceiling), two about
    /// 220 000 with a second core free; where the receivers share the cores (one machine),
    /// a second thread only competes with them. The request thread also sends the page at
    /// the head of the queue itself after each REQUEST, while no send thread is sending.
    pub send_threads: usize,
    /// Forward error correction of the push: every block of pushed pages multicast together
    /// is followed by REPAIRs, this many percent of its fragments (rounded up); 0 sends none.
    pub repair_percent: u32,
}

impl McastServerConfig {
    /// The defaults for serving at `bind` to receivers at the same port (on other hosts):
    /// 1500-byte MTU, 5 ms suppression, 20 000 pages/s
    /// before reports, at most 200 000 pages/s, receivers idle after 1 s, push on, one send
    /// thread, no REPAIRs.
    pub fn new(bind: SocketAddrV4) -> McastServerConfig {
        McastServerConfig {
            bind,
            group_port: bind.port(),
            mtu: 1500,
            suppression: Duration::from_millis(5),
            initial_rate: 20_000,
            max_rate: 200_000,
            receiver_idle: Duration::from_secs(1),
            push: true,
            send_threads: 1,
            repair_percent: 0,
        }
    }
}
