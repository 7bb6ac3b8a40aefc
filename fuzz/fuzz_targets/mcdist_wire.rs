//! mcdist datagrams off the network: `mcast::wire::decode`, on raw bytes
//! and on FRAGMENT, REPAIR, REQUEST and REJECT datagrams built by the real
//! encoders under the fixed keys (so the fuzzer gets past the tag), then
//! mutated. A datagram that decodes is the one encoded; one with any byte
//! changed, cut or appended never decodes.

#![no_main]

use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use snowflock_dataplane::mcast::wire::{
    self, Datagram, Fragment, FragmentKey, FragmentSealer, Header, McastKey, Reject, RejectCode,
    Repair,
};
use snowflock_fuzz::{FAMILY, GENERATION, McdistInput, mcast_key};

static KEY: LazyLock<McastKey> = LazyLock::new(mcast_key);
static FRAGMENT_KEY: LazyLock<FragmentKey> = LazyLock::new(|| KEY.fragment_key(FAMILY, GENERATION));
static SEALER: LazyLock<FragmentSealer> =
    LazyLock::new(|| FragmentSealer::new(KEY.fragment_key(FAMILY, GENERATION)));

#[derive(Debug, Arbitrary)]
struct ArbHeader {
    flags: u16,
    /// Most datagrams are of the family the receiver holds a key for.
    foreign: Option<(u64, u32)>,
    sender: u32,
}

impl ArbHeader {
    fn header(&self) -> Header {
        let (family, generation) = self.foreign.unwrap_or((FAMILY, GENERATION));
        Header {
            flags: self.flags,
            family,
            generation,
            sender: self.sender,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Body<'a> {
    Fragment {
        page: u64,
        index: u8,
        count: u8,
        offset: u16,
        data: &'a [u8],
    },
    Repair {
        first_page: u64,
        pages: u8,
        symbols_per_page: u8,
        symbol_len: u16,
        index: u8,
        count: u8,
        data: &'a [u8],
    },
    Request {
        rate: u32,
        pages: Vec<u64>,
    },
    Reject {
        page: u64,
        code: u8,
    },
}

#[derive(Debug, Arbitrary)]
enum Mutation<'a> {
    Xor { at: u16, mask: u8 },
    Truncate { len: u16 },
    Append(&'a [u8]),
}

/// A datagram built by the encoders, then mutated.
#[derive(Debug, Arbitrary)]
struct Built<'a> {
    header: ArbHeader,
    body: Body<'a>,
    mutations: Vec<Mutation<'a>>,
}

const REJECT_CODES: [RejectCode; 4] = [
    RejectCode::UnknownFamily,
    RejectCode::StaleGeneration,
    RejectCode::OutOfRange,
    RejectCode::ReadFailed,
];

/// The family key of the datagram's family, if the receiver holds it.
fn lookup(family: u64, generation: u32) -> Option<&'static FragmentKey> {
    (family == FAMILY && generation == GENERATION).then(|| &*FRAGMENT_KEY)
}

/// Encodes `body` with the real encoder; `None` when the encoder refuses it.
fn encode(header: &Header, body: &Body<'_>, out: &mut Vec<u8>) -> Option<()> {
    match *body {
        Body::Fragment {
            page,
            index,
            count,
            offset,
            data,
        } => {
            let fragment = Fragment {
                page,
                index,
                count,
                offset,
                data,
            };
            wire::encode_fragment(&SEALER, out, header, &fragment).ok()
        }
        Body::Repair {
            first_page,
            pages,
            symbols_per_page,
            symbol_len,
            index,
            count,
            data,
        } => {
            let repair = Repair {
                first_page,
                pages,
                symbols_per_page,
                symbol_len,
                index,
                count,
                data,
            };
            wire::encode_repair(&SEALER, out, header, &repair).ok()
        }
        Body::Request { rate, ref pages } => {
            wire::encode_request(&KEY, out, header, rate, pages).ok()
        }
        Body::Reject { page, code } => {
            let code = REJECT_CODES[usize::from(code) % REJECT_CODES.len()];
            wire::encode_reject(&KEY, out, header, &Reject { page, code });
            Some(())
        }
    }
}

/// Whether `datagram` is what `body` encoded under `header`.
fn matches(datagram: &Datagram<'_>, header: &Header, body: &Body<'_>) -> bool {
    match (datagram, body) {
        (
            Datagram::Fragment(h, f),
            Body::Fragment {
                page,
                index,
                count,
                offset,
                data,
            },
        ) => {
            h == header
                && f.page == *page
                && f.index == *index
                && f.count == *count
                && f.offset == *offset
                && f.data == *data
        }
        (
            Datagram::Repair(h, r),
            Body::Repair {
                first_page,
                pages,
                symbols_per_page,
                symbol_len,
                index,
                count,
                data,
            },
        ) => {
            h == header
                && r.first_page == *first_page
                && r.pages == *pages
                && r.symbols_per_page == *symbols_per_page
                && r.symbol_len == *symbol_len
                && r.index == *index
                && r.count == *count
                && r.data == *data
        }
        (Datagram::Request(h, r), Body::Request { rate, pages }) => {
            let fragments = header.flags & wire::REQUEST_FRAGMENTS != 0;
            h == header
                && r.rate == *rate
                && r.entries().len() == pages.len()
                && r.entries().zip(pages).all(|((page, mask), &entry)| {
                    entry
                        == if fragments {
                            wire::fragment_entry(page, mask)
                        } else {
                            page
                        }
                })
        }
        (Datagram::Reject(h, r), Body::Reject { page, .. }) => {
            h.family == header.family
                && h.generation == header.generation
                && h.sender == header.sender
                && r.page == *page
        }
        _ => false,
    }
}

fn raw(bytes: &[u8]) {
    let mut bytes = bytes.to_vec();
    let _ = wire::peek_family(&bytes);
    let _ = wire::decode(&KEY, &mut bytes, lookup);
}

fn built(
    Built {
        header,
        body,
        mutations,
    }: Built<'_>,
) {
    let header = header.header();
    let mut encoded = Vec::new();
    if encode(&header, &body, &mut encoded).is_none() {
        return;
    }
    assert_eq!(wire::peek_family(&encoded), Some(header.family));
    let mut mutated = encoded.clone();
    for mutation in &mutations {
        match *mutation {
            Mutation::Xor { at, mask } => {
                if let Some(byte) = mutated.get_mut(usize::from(at)) {
                    *byte ^= mask;
                }
            }
            Mutation::Truncate { len } => mutated.truncate(usize::from(len)),
            Mutation::Append(tail) => mutated.extend_from_slice(tail),
        }
    }
    let changed = mutated != encoded;
    let decoded = wire::decode(&KEY, &mut mutated, lookup);
    match decoded {
        Ok(datagram) => {
            assert!(!changed, "an altered datagram decoded: {datagram:?}");
            assert!(
                matches(&datagram, &header, &body),
                "decoded {datagram:?}, encoded {header:?} {body:?}"
            );
        }
        Err(error) => {
            let sealed = matches!(body, Body::Fragment { .. } | Body::Repair { .. });
            let keyless = sealed && lookup(header.family, header.generation).is_none();
            assert!(
                changed || keyless,
                "a datagram the encoder made does not decode: {error}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match McdistInput::of(mode) {
        McdistInput::Raw => raw(rest),
        McdistInput::Built => {
            if let Ok(input) = Built::arbitrary_take_rest(Unstructured::new(rest)) {
                built(input);
            }
        }
    }
});
