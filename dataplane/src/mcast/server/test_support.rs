//! Fixtures of the server's unit tests: a family of [`PAGES`] blank pages and REQUESTs to
//! apply to it, without a socket.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use super::config::McastServerConfig;
use super::family::FamilyState;
use super::stats::Counters;
use crate::auth::ClusterKey;
use crate::mcast::wire::{self, Datagram, FragmentSealer, Header, McastKey, Reject};
use crate::server::PageStore;
use crate::wire::PAGE_SIZE;

pub(super) const FAMILY: u64 = 0xfa;
pub(super) const GENERATION: u32 = 3;
/// Pages of the test family.
pub(super) const PAGES: u64 = 8;

/// A store of zeroed pages.
struct Blank;

impl PageStore for Blank {
    fn page_count(&self) -> u64 {
        PAGES
    }

    fn read_page(&self, _page: u64, buf: &mut [u8; PAGE_SIZE]) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

fn key() -> McastKey {
    McastKey::new(ClusterKey::from_bytes([9; 32]))
}

/// A server configuration at a documentation address.
pub(super) fn config() -> McastServerConfig {
    McastServerConfig::new(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 7073))
}

/// Receiver `n`'s address.
pub(super) fn receiver(n: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10 + n), 7073)
}

/// The test family as `register` sets it up at `now`, with nothing to push at the clone
/// point.
pub(super) fn family(config: &McastServerConfig, now: Instant) -> FamilyState {
    family_pushing(config, now, Vec::new())
}

/// The test family as `register` sets it up at `now` for a store whose push runs are
/// `push_runs`.
pub(super) fn family_pushing(
    config: &McastServerConfig,
    now: Instant,
    push_runs: Vec<(u64, u64)>,
) -> FamilyState {
    FamilyState::new(
        GENERATION,
        FragmentSealer::new(key().fragment_key(FAMILY, GENERATION)),
        SocketAddrV4::new(Ipv4Addr::new(239, 255, 0, 3), config.group_port),
        Arc::new(Blank),
        (push_runs, 0),
        config,
        now,
    )
}

/// Applies to `family` a REQUEST for `pages` with `flags`, sent by receiver `from` (its id
/// is its number) at `now`, going through the wire encoding as a real one does.
pub(super) fn apply(
    family: &mut FamilyState,
    config: &McastServerConfig,
    counters: &Counters,
    (from, flags): (u8, u16),
    pages: &[u64],
    now: Instant,
) -> (Vec<Reject>, bool) {
    let header = Header {
        flags,
        family: FAMILY,
        generation: GENERATION,
        sender: u32::from(from),
    };
    let mut bytes = Vec::new();
    wire::encode_request(&key(), &mut bytes, &header, 0, pages).unwrap();
    match wire::decode(&key(), &mut bytes, |_, _| None).unwrap() {
        Datagram::Request(header, request) => {
            family.apply_request(config, counters, &header, &request, receiver(from), now)
        }
        other => panic!("not a request: {other:?}"),
    }
}

/// The test family at `now`, after receiver 1, alone (so answered by unicast), asked for
/// `pages`.
pub(super) fn family_asked(
    config: &McastServerConfig,
    counters: &Counters,
    pages: &[u64],
    now: Instant,
) -> FamilyState {
    let mut family = family(config, now);
    apply(&mut family, config, counters, (1, 0), pages, now);
    family
}
