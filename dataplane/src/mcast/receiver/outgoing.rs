//! How the core's REQUESTs leave: the transport it sends them through
//! ([`RequestTransport`]), and their encoding, one datagram per [`MAX_REQUEST_PAGES`] pages,
//! counted in the receiver's and the family's stats.

use std::io;
use std::net::SocketAddrV4;

use super::family::Family;
use super::stats::{ReceiverStats, count};
use crate::mcast::wire::{self, Header, MAX_REQUEST_PAGES, McastKey, REQUEST_UNICAST_REPLY};

/// How a [`ReceiverCore`](super::ReceiverCore) sends and asks to be ticked; implemented by the
/// transport.
pub trait RequestTransport: Send + Sync {
    /// Sends one REQUEST datagram to `server`. Must not block long (called from fault
    /// threads); a lost request is re-sent when its timeout expires.
    fn send(&self, server: SocketAddrV4, datagram: &[u8]) -> io::Result<()>;
    /// The core's next deadline moved before the one the last
    /// [`ReceiverCore::tick`](super::ReceiverCore::tick) returned: call `tick` soon.
    fn wake(&self);
}

/// What one REQUEST send needs, gathered under the lock.
pub(super) struct Outgoing<'a> {
    pub(super) key: &'a McastKey,
    pub(super) transport: &'a dyn RequestTransport,
    pub(super) id: u32,
}

impl Outgoing<'_> {
    /// Encodes and sends REQUESTs for `pages` (any number, split by [`MAX_REQUEST_PAGES`]; at
    /// least one datagram even without pages), counting them.
    pub(super) fn send(
        &self,
        scratch: &mut Vec<u8>,
        family: &mut Family,
        global: &mut ReceiverStats,
        flags: u16,
        pages: &[u64],
    ) {
        let header = Header {
            flags,
            family: family.join.family,
            generation: family.join.generation,
            sender: self.id,
        };
        let rate = family.rate.rate();
        let chunks: Vec<&[u64]> = if pages.is_empty() {
            vec![&[]]
        } else {
            pages.chunks(MAX_REQUEST_PAGES).collect()
        };
        for chunk in chunks {
            if let Err(error) = wire::encode_request(self.key, scratch, &header, rate, chunk) {
                // Unreachable: the flags are defined ones and chunks are small enough.
                tracing::error!(%error, "could not encode an mcdist request");
                continue;
            }
            let sent = self.transport.send(family.join.server, scratch);
            count(global, &mut family.stats, |s| {
                s.requests_sent += 1;
                if chunk.is_empty() {
                    s.reports_sent += 1;
                }
                if flags & REQUEST_UNICAST_REPLY != 0 {
                    s.unicast_requests += 1;
                }
            });
            if let Err(error) = sent {
                count(global, &mut family.stats, |s| s.send_errors += 1);
                tracing::debug!(
                    server = %family.join.server,
                    family = format_args!("{:#x}", family.join.family),
                    %error,
                    "sending an mcdist request failed"
                );
            }
        }
    }
}
