//! The request thread: receives REQUESTs on the server's socket, checks them, applies them
//! to their family (see `FamilyState::apply_request`), answers what cannot be served with a
//! unicast REJECT, and sends the first page a REQUEST queued itself (see
//! [`send_inline`]).

use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::time::Instant;

use super::send::{SendScratch, send_inline, send_reject};
use super::service::McastService;
use super::stats::bump;
use crate::mcast::sys;
use crate::mcast::wire::{
    self, Datagram, DecodeError, Header, MAX_DATAGRAM_LEN, REQUEST_LEAVE, Reject, RejectCode,
    Request,
};
use crate::sync::{Never, lock};

/// The request thread: receives until the server stops.
pub(super) fn request_loop(service: &McastService, _alive: Sender<Never>) {
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN + 1];
    let mut scratch = SendScratch::default();
    loop {
        match sys::wait_readable(service.socket.as_fd(), service.stop.as_fd()) {
            Ok((_, true)) => return,
            Ok((false, false)) => continue,
            Ok((true, false)) => {}
            Err(error) => {
                tracing::error!(%error, "mcdist server: waiting for requests failed");
                return;
            }
        }
        if service.stopping.load(Ordering::SeqCst) {
            return;
        }
        match service.socket.recv_from(&mut buf) {
            Ok((len, SocketAddr::V4(from))) => {
                handle_datagram(service, &mut buf[..len], from, &mut scratch);
            }
            Ok((_, SocketAddr::V6(_))) => bump(&service.counters.malformed, 1),
            Err(error) => tracing::debug!(%error, "mcdist server receive failed"),
        }
    }
}

fn handle_datagram(
    service: &McastService,
    bytes: &mut [u8],
    from: SocketAddrV4,
    scratch: &mut SendScratch,
) {
    // The server opens no FRAGMENTs: receivers do not send them.
    match wire::decode(&service.key, bytes, |_, _| None) {
        Ok(Datagram::Request(header, request)) => {
            bump(&service.counters.requests, 1);
            let (rejects, queued) = handle_request(service, &header, &request, from);
            for reject in rejects {
                send_reject(service, &header, reject, from, &mut scratch.reply);
            }
            if queued {
                send_inline(service, scratch);
            }
        }
        Ok(_) => bump(&service.counters.malformed, 1),
        Err(DecodeError::BadTag) => bump(&service.counters.mac_failed, 1),
        Err(error) => {
            bump(&service.counters.malformed, 1);
            tracing::trace!(%from, %error, "mcdist server dropped a malformed datagram");
        }
    }
}

/// Applies one REQUEST; returns the REJECTs to send to its sender, and whether it queued
/// pages (or pushes) to send.
fn handle_request(
    service: &McastService,
    header: &Header,
    request: &Request<'_>,
    from: SocketAddrV4,
) -> (Vec<Reject>, bool) {
    let config = &service.config;
    let counters = &service.counters;
    let now = Instant::now();
    let mut state = lock(&service.state);
    let leaving = header.flags & REQUEST_LEAVE != 0;
    let first_page = request.pages().next().unwrap_or(0);
    // A LEAVE needs no answer; anything else learns why it is not served.
    let stale = |code| {
        bump(&counters.stale, 1);
        let rejects = if leaving {
            Vec::new()
        } else {
            vec![Reject {
                page: first_page,
                code,
            }]
        };
        (rejects, false)
    };
    let Some(family) = state.families.get_mut(&header.family) else {
        return stale(RejectCode::UnknownFamily);
    };
    if header.generation != family.generation {
        return stale(RejectCode::StaleGeneration);
    }
    family.apply_request(config, counters, header, request, from, now)
}
