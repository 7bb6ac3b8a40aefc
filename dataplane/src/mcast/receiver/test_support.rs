//! Fixtures of the core's unit tests: a transport that records the REQUESTs, a sink that
//! collects the pages, one joined family, and its FRAGMENTs.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{DEFAULT_PORT, FamilyJoin, HeldPages, ReceiverConfig, ReceiverCore, RequestTransport};
use crate::auth::ClusterKey;
use crate::client::PageSink;
use crate::mcast::wire::{
    self, Datagram, Fragment, FragmentSealer, Fragmentation, Header, McastKey,
};
use crate::wire::PAGE_SIZE;

/// Records the requests a core sends (the transport is the unit under test's boundary;
/// the real sockets are exercised in tests/mcast.rs).
#[derive(Default)]
pub(super) struct Recorder {
    pub(super) sent: Mutex<Vec<Vec<u8>>>,
    pub(super) wakes: Mutex<u32>,
}

impl RequestTransport for Recorder {
    fn send(&self, _server: SocketAddrV4, datagram: &[u8]) -> io::Result<()> {
        self.sent.lock().unwrap().push(datagram.to_vec());
        Ok(())
    }
    fn wake(&self) {
        *self.wakes.lock().unwrap() += 1;
    }
}

#[derive(Default)]
pub(super) struct Collect {
    pub(super) pages: Mutex<Vec<(u64, Vec<u8>)>>,
    /// How many parts each delivered page came in.
    pub(super) parts: Mutex<Vec<usize>>,
    pub(super) failures: Mutex<Vec<String>>,
    pub(super) held: Mutex<Vec<(u64, u64)>>,
}

impl PageSink for Collect {
    fn deliver_batch(&self, pages: &[(u64, &[u8])]) {
        let mut all = self.pages.lock().unwrap();
        all.extend(pages.iter().map(|(p, d)| (*p, d.to_vec())));
    }
    fn deliver_parts(&self, pages: &[(u64, &[&[u8]])]) {
        let mut all = self.pages.lock().unwrap();
        all.extend(pages.iter().map(|(p, parts)| (*p, parts.concat())));
        let mut counts = self.parts.lock().unwrap();
        counts.extend(pages.iter().map(|(_, parts)| parts.len()));
    }
    fn failed(&self, reason: String) {
        self.failures.lock().unwrap().push(reason);
    }
}

impl HeldPages for Collect {
    fn held(&self, family: u64, page: u64) {
        self.held.lock().unwrap().push((family, page));
    }
}

pub(super) const FAMILY: u64 = 0xf00d;
pub(super) const GENERATION: u32 = 77;

pub(super) fn key() -> ClusterKey {
    ClusterKey::from_bytes([3; 32])
}

pub(super) fn config() -> ReceiverConfig {
    ReceiverConfig {
        rto_min: Duration::from_millis(1),
        rto_max: Duration::from_millis(4),
        unicast_after: 2,
        report_interval: Duration::from_secs(3600),
        ..ReceiverConfig::default()
    }
}

pub(super) fn join() -> FamilyJoin {
    FamilyJoin {
        family: FAMILY,
        generation: GENERATION,
        key: key().id(),
        group: Ipv4Addr::new(239, 255, 0, 1),
        server: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), DEFAULT_PORT),
        pages: 16,
        holding: false,
    }
}

pub(super) fn setup() -> (ReceiverCore, Arc<Recorder>, Arc<Collect>) {
    let recorder = Arc::new(Recorder::default());
    let core = ReceiverCore::new(config(), key(), recorder.clone());
    let sink = Arc::new(Collect::default());
    core.join(join(), sink.clone(), Some(sink.clone())).unwrap();
    (core, recorder, sink)
}

/// Hands copies of `datagrams` to `core` as one batch (opening decrypts in place).
pub(super) fn feed<'d>(core: &ReceiverCore, datagrams: impl IntoIterator<Item = &'d [u8]>) {
    let mut copies: Vec<Vec<u8>> = datagrams.into_iter().map(<[u8]>::to_vec).collect();
    core.on_datagrams(copies.iter_mut().map(Vec::as_mut_slice));
}

/// The header of a datagram from the server of `family` at `generation`.
pub(super) fn header(family: u64, generation: u32) -> Header {
    Header {
        flags: 0,
        family,
        generation,
        sender: 0,
    }
}

pub(super) fn fragments(family: u64, generation: u32, page: u64, fill: u8) -> Vec<Vec<u8>> {
    fragments_asked_by(0, family, generation, page, fill)
}

/// The FRAGMENTs of `page` as the server sends them for the REQUEST of receiver `asked_by`.
pub(super) fn fragments_asked_by(
    asked_by: u32,
    family: u64,
    generation: u32,
    page: u64,
    fill: u8,
) -> Vec<Vec<u8>> {
    let header = Header {
        sender: asked_by,
        ..header(family, generation)
    };
    let sealer = FragmentSealer::new(McastKey::new(key()).fragment_key(family, generation));
    let data = [fill; PAGE_SIZE];
    let cut = Fragmentation::for_mtu(1500);
    cut.pieces()
        .map(|(index, offset, len)| {
            let mut out = Vec::new();
            let fragment = Fragment {
                page,
                index,
                count: cut.count,
                offset,
                data: &data[usize::from(offset)..usize::from(offset + len)],
            };
            wire::encode_fragment(&sealer, &mut out, &header, &fragment).unwrap();
            out
        })
        .collect()
}

pub(super) fn decode_request(bytes: &[u8]) -> (u16, Vec<u64>) {
    let (flags, entries) = decode_request_entries(bytes);
    (flags, entries.into_iter().map(|(page, _)| page).collect())
}

/// A REQUEST's flags and its pages, each with the fragments it asks for.
pub(super) fn decode_request_entries(bytes: &[u8]) -> (u16, Vec<(u64, u16)>) {
    let mut bytes = bytes.to_vec();
    match wire::decode(&McastKey::new(key()), &mut bytes, |_, _| None).unwrap() {
        Datagram::Request(h, r) => (h.flags, r.entries().collect()),
        other => panic!("not a request: {other:?}"),
    }
}
