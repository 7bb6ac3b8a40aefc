//! Datagrams of mcdist, version 2 (layout in `docs/mcdist.md`).
//!
//! Every datagram ends with a 16-byte tag.
//!
//! - A FRAGMENT is sealed with AES-128-GCM under its family's [`FragmentKey`] (derived from the
//!   [`McastKey`], the family and its generation): the header, the fragment fields and the
//!   nonce are authenticated, the page bytes are encrypted too. The nonce is carried in the
//!   datagram: a random prefix drawn per [`FragmentSealer`] and a counter, so no nonce repeats
//!   under a key. AES-GCM in one pass costs a fifth of an HMAC-SHA256 of the same bytes here,
//!   and page contents (a guest's memory) do not cross the network in the clear.
//! - REQUEST and REJECT carry the truncated HMAC-SHA256 of everything before the tag under the
//!   [`McastKey`].
//!
//! [`decode`] checks the header's shape first (cheap, rejects junk before any cryptography),
//! then the tag, then the body; nothing of a datagram whose tag is wrong is returned. A
//! FRAGMENT is decrypted in place, so decoding takes the datagram mutably and borrows from it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use sha2::Sha256;

use crate::auth::{ClusterKey, KeyId, KeySource};
use crate::keyring::KeyRing;
use crate::sync::{read, write};
use crate::wire::PAGE_SIZE;

/// First bytes of every datagram.
pub const MAGIC: [u8; 4] = *b"SFMC";
/// The wire format version this module speaks.
pub const VERSION: u8 = 2;
/// Bytes of the common header.
pub const HEADER_LEN: usize = 24;
/// Bytes of the trailing tag.
pub const TAG_LEN: usize = 16;
/// Bytes of a FRAGMENT's nonce.
pub const FRAGMENT_NONCE_LEN: usize = NONCE_LEN;
/// Where a FRAGMENT's nonce starts (after the header and the fragment fields).
pub const FRAGMENT_NONCE_OFFSET: usize = HEADER_LEN + 16;
/// Header, FRAGMENT fields and nonce: the authenticated part before the (encrypted) payload.
pub const FRAGMENT_HEADER_LEN: usize = FRAGMENT_NONCE_OFFSET + FRAGMENT_NONCE_LEN;
/// Most fragments one page may be split into.
pub const MAX_FRAGMENTS: u8 = 16;
/// Most pages one REQUEST may name.
pub const MAX_REQUEST_PAGES: usize = 128;
/// Header plus the REQUEST fields before its page list.
pub const REQUEST_HEADER_LEN: usize = HEADER_LEN + 8;
/// A REJECT datagram (fixed size).
pub const REJECT_LEN: usize = HEADER_LEN + 16 + TAG_LEN;
/// The largest datagram: a page in one fragment.
pub const MAX_DATAGRAM_LEN: usize = FRAGMENT_HEADER_LEN + PAGE_SIZE + TAG_LEN;
/// IPv4 and UDP headers, which the path MTU must also carry.
pub const IP_UDP_HEADER_LEN: usize = 20 + 8;
/// Bytes a copy-mode AF_XDP frame keeps before the packet (`XDP_PACKET_HEADROOM`).
pub const XDP_COPY_HEADROOM: u32 = 256;
/// The largest path MTU fragments are sized for: the Ethernet frame of such a fragment
/// (MTU + 14) fits the 3840 bytes a 4 KiB copy-mode AF_XDP frame holds after its headroom,
/// so every host can take a family on either receive path. On a larger MTU (jumbo frames) a
/// page still goes in 2 fragments.
pub const MAX_FRAGMENT_MTU: u32 = 4096 - XDP_COPY_HEADROOM - 14;
/// The label the mcdist key is derived from the cluster key with.
pub const KEY_LABEL: &[u8] = b"snowflock mcdist v1";
/// The label a family's [`FragmentKey`] is derived from the mcdist key with (followed by the
/// family and the generation, little-endian).
pub const FRAGMENT_KEY_LABEL: &[u8] = b"snowflock mcdist v2 fragment key";

const _: () = assert!(REQUEST_HEADER_LEN + 8 * MAX_REQUEST_PAGES + TAG_LEN <= 1472);
const _: () = assert!(PAGE_SIZE <= u16::MAX as usize);
const _: () = assert!(FRAGMENT_NONCE_LEN == 12 && FRAGMENT_HEADER_LEN == 52);

/// FRAGMENT flag: sent without a request (push).
pub const FRAGMENT_PUSH: u16 = 1 << 0;
/// FRAGMENT flag: sent to one receiver only (end game).
pub const FRAGMENT_UNICAST: u16 = 1 << 1;
const FRAGMENT_FLAGS: u16 = FRAGMENT_PUSH | FRAGMENT_UNICAST;

/// REQUEST flag: answer the sender only (end game).
pub const REQUEST_UNICAST_REPLY: u16 = 1 << 0;
/// REQUEST flag: a new receiver of the family.
pub const REQUEST_JOIN: u16 = 1 << 1;
/// REQUEST flag: the pages were requested before.
pub const REQUEST_RETRY: u16 = 1 << 2;
/// REQUEST flag: the receiver is done with the family.
pub const REQUEST_LEAVE: u16 = 1 << 3;
/// REQUEST flag: every entry names fragments of a page (see [`fragment_entry`]), not the
/// whole page: the receiver holds the others of a partly received page.
pub const REQUEST_FRAGMENTS: u16 = 1 << 4;
/// REQUEST flag, with JOIN: the receiver's host kept the pages it received of the family
/// before (it left and joins again): nothing is pushed again for it.
pub const REQUEST_HOLDING: u16 = 1 << 5;
const REQUEST_FLAGS: u16 = REQUEST_UNICAST_REPLY
    | REQUEST_JOIN
    | REQUEST_RETRY
    | REQUEST_LEAVE
    | REQUEST_FRAGMENTS
    | REQUEST_HOLDING;

/// Where a `REQUEST_FRAGMENTS` entry's fragment mask starts: page numbers stay below
/// 2^48 (a clone point's memory is far below 2^60 bytes).
const ENTRY_MASK_SHIFT: u32 = 48;
/// The page number bits of an entry.
const ENTRY_PAGE_BITS: u64 = (1 << ENTRY_MASK_SHIFT) - 1;
/// Every fragment of a page (what a whole-page entry asks for).
pub const ALL_FRAGMENTS: u16 = u16::MAX;

/// The entry of a `REQUEST_FRAGMENTS` REQUEST asking for the fragments of `page` whose bits
/// are set in `mask` (bit `i`: fragment index `i`).
pub fn fragment_entry(page: u64, mask: u16) -> u64 {
    (page & ENTRY_PAGE_BITS) | (u64::from(mask) << ENTRY_MASK_SHIFT)
}

type HmacSha256 = Hmac<Sha256>;

/// The keys that tag mcdist datagrams, derived from the host's cluster keys.
///
/// Datagrams are tagged under the cluster key the host sends with now and verified under any
/// key it accepts ([`KeyRing`]), so a rotation does not drop the datagrams of hosts that are a
/// half-window behind or ahead.
#[derive(Clone)]
pub struct McastKey {
    ring: KeyRing,
    /// The keyed HMAC state of each cluster key used so far, cloned for every datagram
    /// (cheaper than keying anew).
    keyed: Arc<RwLock<Vec<(KeyId, HmacSha256)>>>,
}

impl std::fmt::Debug for McastKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("McastKey(..)")
    }
}

impl McastKey {
    /// The mcdist keys of a host holding `keys` (a [`ClusterKey`], or its [`KeyRing`]).
    pub fn new(keys: impl Into<KeyRing>) -> McastKey {
        McastKey {
            ring: keys.into(),
            keyed: Arc::new(RwLock::new(Vec::new())),
        }
    }

    /// The HMAC state keyed with the mcdist key of `cluster`.
    fn keyed(&self, cluster: &ClusterKey) -> HmacSha256 {
        let id = cluster.id();
        if let Some((_, keyed)) = read(&self.keyed).iter().find(|(k, _)| *k == id) {
            return keyed.clone();
        }
        let keyed = <HmacSha256 as KeyInit>::new_from_slice(&cluster.derive(KEY_LABEL))
            .expect("HMAC takes keys of any length");
        let mut all = write(&self.keyed);
        all.retain(|(k, _)| self.ring.accepted(*k).is_some());
        all.push((id, keyed.clone()));
        keyed
    }

    fn tag(&self, bytes: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.keyed(&self.ring.sending());
        mac.update(bytes);
        let full: [u8; 32] = mac.finalize().into_bytes().into();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    fn verify(&self, bytes: &[u8], tag: &[u8]) -> bool {
        let (current, old) = self.ring.accepted_keys();
        std::iter::once(current).chain(old).any(|cluster| {
            let mut mac = self.keyed(&cluster);
            mac.update(bytes);
            mac.verify_truncated_left(tag).is_ok()
        })
    }

    /// The key that seals the FRAGMENTs of `family` at `generation` under the cluster key
    /// sent with now, and that key's id (receivers derive the same key with
    /// [`McastKey::fragment_key_under`]): the first 16 bytes of the HMAC of
    /// [`FRAGMENT_KEY_LABEL`], the family and the generation under the mcdist key. Every
    /// registration of a family draws a new random generation, so each gets its own key.
    pub fn sending_fragment_key(&self, family: u64, generation: u32) -> (KeyId, FragmentKey) {
        let cluster = self.ring.sending();
        (
            cluster.id(),
            self.fragment_key_of(&cluster, family, generation),
        )
    }

    /// [`McastKey::sending_fragment_key`]'s key alone.
    pub fn fragment_key(&self, family: u64, generation: u32) -> FragmentKey {
        self.sending_fragment_key(family, generation).1
    }

    /// The fragment key of `family` at `generation` under the cluster key `id`, if this host
    /// accepts that key.
    pub fn fragment_key_under(
        &self,
        id: KeyId,
        family: u64,
        generation: u32,
    ) -> Option<FragmentKey> {
        let cluster = self.ring.accepted(id)?;
        Some(self.fragment_key_of(&cluster, family, generation))
    }

    fn fragment_key_of(&self, cluster: &ClusterKey, family: u64, generation: u32) -> FragmentKey {
        let mut mac = self.keyed(cluster);
        mac.update(FRAGMENT_KEY_LABEL);
        mac.update(&family.to_le_bytes());
        mac.update(&generation.to_le_bytes());
        let full: [u8; 32] = mac.finalize().into_bytes().into();
        let unbound = UnboundKey::new(&AES_128_GCM, &full[..AES_128_GCM.key_len()])
            .expect("AES-128-GCM takes 16-byte keys");
        FragmentKey {
            aead: LessSafeKey::new(unbound),
        }
    }
}

/// The AES-128-GCM key of one family's FRAGMENTs (see [`McastKey::fragment_key`]).
pub struct FragmentKey {
    aead: LessSafeKey,
}

impl std::fmt::Debug for FragmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FragmentKey(..)")
    }
}

/// Seals one family's FRAGMENTs: its [`FragmentKey`] and the nonces it has not used yet.
///
/// A nonce is a prefix drawn at random when the sealer is made (4 bytes) and a counter (8
/// bytes, little-endian) that every sealed FRAGMENT takes the next value of: no nonce repeats
/// for the life of a sealer (2^64 datagrams), and two sealers of one key (a family registered
/// again under a generation it had, by another server process) share nonces only if they drew
/// the same prefix. May be used from several threads.
#[derive(Debug)]
pub struct FragmentSealer {
    key: FragmentKey,
    prefix: [u8; 4],
    counter: AtomicU64,
}

impl FragmentSealer {
    /// A sealer of `key` with a fresh random nonce prefix.
    pub fn new(key: FragmentKey) -> FragmentSealer {
        let prefix = getrandom::u32().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |t| t.subsec_nanos() ^ std::process::id().rotate_left(16))
        });
        FragmentSealer {
            key,
            prefix: prefix.to_le_bytes(),
            counter: AtomicU64::new(0),
        }
    }

    fn next_nonce(&self) -> [u8; FRAGMENT_NONCE_LEN] {
        // Relaxed: only uniqueness matters, which the atomic increment gives in any order.
        let count = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; FRAGMENT_NONCE_LEN];
        nonce[..4].copy_from_slice(&self.prefix);
        nonce[4..].copy_from_slice(&count.to_le_bytes());
        nonce
    }
}

/// What a datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A piece of a page.
    Fragment = 1,
    /// Pages wanted, and a rate report.
    Request = 2,
    /// A page the server cannot send.
    Reject = 3,
    /// A repair symbol of a block of pushed pages (forward error correction).
    Repair = 4,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Fragment),
            2 => Some(Kind::Request),
            3 => Some(Kind::Reject),
            4 => Some(Kind::Repair),
            _ => None,
        }
    }
}

/// The common header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Kind-specific flags.
    pub flags: u16,
    /// The clone point.
    pub family: u64,
    /// The serving daemon's generation of the family.
    pub generation: u32,
    /// A REQUEST's receiver id; a FRAGMENT's, the id of the receiver whose REQUEST queued
    /// the page (0: pushed); 0 otherwise.
    pub sender: u32,
}

/// A piece of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment<'a> {
    /// Page number in the clone point's memory.
    pub page: u64,
    /// This fragment's index, `< count`.
    pub index: u8,
    /// Fragments of the page.
    pub count: u8,
    /// Where `data` goes in the page.
    pub offset: u16,
    /// The payload; `offset + data.len() <= PAGE_SIZE`.
    pub data: &'a [u8],
}

/// Pages a receiver wants, with its rate report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// Pages per second the receiver can take now; 0 = no report.
    pub rate: u32,
    /// The entries, 8 bytes little-endian each: page numbers, or with `fragments` page
    /// numbers with a fragment mask (checked non-zero when decoded).
    page_bytes: &'a [u8],
    fragments: bool,
}

impl<'a> Request<'a> {
    /// The requested pages.
    pub fn pages(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.entries().map(|(page, _)| page)
    }

    /// The requested pages, each with the fragments wanted ([`ALL_FRAGMENTS`] for a whole
    /// page).
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (u64, u16)> + 'a {
        let fragments = self.fragments;
        self.page_bytes
            .as_chunks::<8>()
            .0
            .iter()
            .map(move |b| split_entry(u64::from_le_bytes(*b), fragments))
    }

    /// How many pages are requested.
    pub fn page_count(&self) -> usize {
        self.page_bytes.len() / 8
    }
}

/// Most pages in a block of pushed pages that REPAIRs cover.
pub const MAX_BLOCK_PAGES: u8 = 16;

/// A repair symbol of a block of pushed pages: the pages `first_page..first_page + pages`,
/// each cut into `symbols_per_page` source symbols of `symbol_len` bytes (its fragments,
/// the last one padded with zeros), are the originals of a Reed-Solomon code with `count`
/// recovery symbols; this is recovery symbol `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repair<'a> {
    /// The block's first page.
    pub first_page: u64,
    /// Pages in the block, `1..=MAX_BLOCK_PAGES`.
    pub pages: u8,
    /// Source symbols per page (the page's fragment count).
    pub symbols_per_page: u8,
    /// Bytes of every symbol: even, and the pieces of a page fit `symbols_per_page` of them.
    pub symbol_len: u16,
    /// This symbol's index among the block's recovery symbols, `< count`.
    pub index: u8,
    /// Recovery symbols of the block.
    pub count: u8,
    /// The symbol, `symbol_len` bytes.
    pub data: &'a [u8],
}

impl Repair<'_> {
    /// Whether the fields describe a block a receiver can decode.
    fn is_valid(&self) -> bool {
        let symbols = usize::from(self.symbols_per_page);
        let len = usize::from(self.symbol_len);
        (1..=MAX_BLOCK_PAGES).contains(&self.pages)
            && (1..=MAX_FRAGMENTS).contains(&self.symbols_per_page)
            && len > 0
            && len.is_multiple_of(2)
            && len <= PAGE_SIZE
            && (symbols - 1) * len < PAGE_SIZE
            && symbols * len >= PAGE_SIZE
            && self.index < self.count
            && self.data.len() == len
    }
}

/// Why the server cannot send a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[repr(u8)]
pub enum RejectCode {
    /// The server serves no such family.
    #[error("unknown family")]
    UnknownFamily = 1,
    /// The family's generation on the server differs.
    #[error("stale generation")]
    StaleGeneration = 2,
    /// The page lies past the family's memory.
    #[error("page out of range")]
    OutOfRange = 3,
    /// Reading the page from the image failed.
    #[error("reading the page failed")]
    ReadFailed = 4,
}

impl RejectCode {
    fn from_byte(byte: u8) -> Option<RejectCode> {
        match byte {
            1 => Some(RejectCode::UnknownFamily),
            2 => Some(RejectCode::StaleGeneration),
            3 => Some(RejectCode::OutOfRange),
            4 => Some(RejectCode::ReadFailed),
            _ => None,
        }
    }
}

/// A page the server cannot send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    /// The page.
    pub page: u64,
    /// Why.
    pub code: RejectCode,
}

/// A decoded, authenticated datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// A piece of a page.
    Fragment(Header, Fragment<'a>),
    /// Pages wanted.
    Request(Header, Request<'a>),
    /// A page that cannot be sent.
    Reject(Header, Reject),
    /// A repair symbol of pushed pages.
    Repair(Header, Repair<'a>),
}

impl Datagram<'_> {
    /// The common header.
    pub fn header(&self) -> &Header {
        match self {
            Datagram::Fragment(h, _)
            | Datagram::Request(h, _)
            | Datagram::Reject(h, _)
            | Datagram::Repair(h, _) => h,
        }
    }
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than its kind's fixed part, or than header plus tag.
    #[error("datagram of {len} bytes is too short")]
    Short {
        /// Its length.
        len: usize,
    },
    /// Not an mcdist datagram.
    #[error("bad magic")]
    Magic,
    /// Another wire format version.
    #[error("unsupported version {0}")]
    Version(u8),
    /// Unknown kind byte.
    #[error("unknown kind {0}")]
    Kind(u8),
    /// Flags this version does not define, or non-zero reserved bytes.
    #[error("undefined flags {flags:#06x} or reserved bytes set for a {kind:?}")]
    Reserved {
        /// The datagram's kind.
        kind: Kind,
        /// Its flags.
        flags: u16,
    },
    /// Body lengths that disagree with the datagram's length.
    #[error("{kind:?} body is inconsistent with its {len}-byte datagram")]
    Length {
        /// The datagram's kind.
        kind: Kind,
        /// Its length.
        len: usize,
    },
    /// Fragment fields out of range.
    #[error("fragment {index}/{count} at offset {offset} of {len} bytes does not fit a page")]
    Fragment {
        /// Index.
        index: u8,
        /// Count.
        count: u8,
        /// Offset.
        offset: u16,
        /// Payload length.
        len: u16,
    },
    /// A `REQUEST_FRAGMENTS` entry that names no fragment.
    #[error("fragment request entry {index} names no fragment of page {page:#x}")]
    EmptyFragmentMask {
        /// The entry's position in the REQUEST.
        index: usize,
        /// Its page.
        page: u64,
    },
    /// REPAIR fields that describe no decodable block.
    #[error(
        "repair symbol {index}/{count} of {pages} pages in {symbols} symbols of {symbol_len} bytes does not describe a block"
    )]
    Repair {
        /// Pages in the block.
        pages: u8,
        /// Symbols per page.
        symbols: u8,
        /// Symbol length.
        symbol_len: u16,
        /// Index.
        index: u8,
        /// Recovery symbols.
        count: u8,
    },
    /// Unknown REJECT code.
    #[error("unknown reject code {0}")]
    RejectCode(u8),
    /// A FRAGMENT of a family or generation this receiver has no key for: it cannot be
    /// authenticated, so nothing of it is trusted.
    #[error("no key for family {family:#x} generation {generation:#x}")]
    NoKey {
        /// The family the datagram claims.
        family: u64,
        /// The generation it claims.
        generation: u32,
    },
    /// The tag does not match: forged or corrupted.
    #[error("wrong tag: forged or corrupted")]
    BadTag,
}

/// An entry's page and fragment mask: with `fragments` as [`fragment_entry`] packs them,
/// else a whole page.
fn split_entry(entry: u64, fragments: bool) -> (u64, u16) {
    if fragments {
        (entry & ENTRY_PAGE_BITS, (entry >> ENTRY_MASK_SHIFT) as u16)
    } else {
        (entry, ALL_FRAGMENTS)
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The family a datagram claims to belong to, read without checking anything else: for
/// routing a datagram to its family's receiver before decoding it.
pub fn peek_family(bytes: &[u8]) -> Option<u64> {
    (bytes.len() >= HEADER_LEN && bytes[..4] == MAGIC).then(|| u64_at(bytes, 8))
}

/// Checks and decodes one datagram. A FRAGMENT is opened with the key `fragment_key` gives
/// for its family and generation, and its payload decrypted in place; without a key it is
/// [`DecodeError::NoKey`]. Whatever the outcome, `bytes` may have been changed.
pub fn decode<'a, 'k>(
    key: &McastKey,
    bytes: &'a mut [u8],
    fragment_key: impl FnOnce(u64, u32) -> Option<&'k FragmentKey>,
) -> Result<Datagram<'a>, DecodeError> {
    let len = bytes.len();
    if len < HEADER_LEN + TAG_LEN {
        return Err(DecodeError::Short { len });
    }
    if bytes[..4] != MAGIC {
        return Err(DecodeError::Magic);
    }
    if bytes[4] != VERSION {
        return Err(DecodeError::Version(bytes[4]));
    }
    let kind = Kind::from_byte(bytes[5]).ok_or(DecodeError::Kind(bytes[5]))?;
    let header = Header {
        flags: u16_at(bytes, 6),
        family: u64_at(bytes, 8),
        generation: u32_at(bytes, 16),
        sender: u32_at(bytes, 20),
    };
    let allowed = match kind {
        Kind::Fragment => FRAGMENT_FLAGS,
        Kind::Request => REQUEST_FLAGS,
        Kind::Reject | Kind::Repair => 0,
    };
    if header.flags & !allowed != 0 {
        return Err(DecodeError::Reserved {
            kind,
            flags: header.flags,
        });
    }
    let body_end = len - TAG_LEN;
    let fixed = match kind {
        Kind::Fragment | Kind::Repair => FRAGMENT_HEADER_LEN,
        Kind::Request => REQUEST_HEADER_LEN,
        Kind::Reject => REJECT_LEN - TAG_LEN,
    };
    if body_end < fixed {
        return Err(DecodeError::Short { len });
    }
    let reserved_error = DecodeError::Reserved {
        kind,
        flags: header.flags,
    };
    match kind {
        Kind::Fragment => {
            let key = fragment_key(header.family, header.generation).ok_or(DecodeError::NoKey {
                family: header.family,
                generation: header.generation,
            })?;
            open_fragment(key, header, bytes, reserved_error)
        }
        Kind::Repair => {
            let key = fragment_key(header.family, header.generation).ok_or(DecodeError::NoKey {
                family: header.family,
                generation: header.generation,
            })?;
            open_repair(key, header, bytes, reserved_error)
        }
        Kind::Request => {
            let bytes = verified(key, bytes)?;
            let rate = u32_at(bytes, 24);
            let count = usize::from(u16_at(bytes, 28));
            if u16_at(bytes, 30) != 0 {
                return Err(reserved_error);
            }
            if count > MAX_REQUEST_PAGES || REQUEST_HEADER_LEN + 8 * count != body_end {
                return Err(DecodeError::Length { kind, len });
            }
            let request = Request {
                rate,
                page_bytes: &bytes[REQUEST_HEADER_LEN..body_end],
                fragments: header.flags & REQUEST_FRAGMENTS != 0,
            };
            if let Some((index, (page, _))) = request
                .entries()
                .enumerate()
                .find(|(_, (_, mask))| *mask == 0)
            {
                return Err(DecodeError::EmptyFragmentMask { index, page });
            }
            Ok(Datagram::Request(header, request))
        }
        Kind::Reject => {
            let bytes = verified(key, bytes)?;
            if len != REJECT_LEN {
                return Err(DecodeError::Length { kind, len });
            }
            let page = u64_at(bytes, 24);
            let code =
                RejectCode::from_byte(bytes[32]).ok_or(DecodeError::RejectCode(bytes[32]))?;
            if bytes[33..40].iter().any(|&b| b != 0) {
                return Err(reserved_error);
            }
            Ok(Datagram::Reject(header, Reject { page, code }))
        }
    }
}

/// `bytes` if its HMAC tag (the last [`TAG_LEN`] bytes) is right under `key`.
fn verified<'a>(key: &McastKey, bytes: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    if key.verify(signed, tag) {
        Ok(bytes)
    } else {
        Err(DecodeError::BadTag)
    }
}

/// Opens a FRAGMENT whose header and length were checked: authenticates it, decrypts its
/// payload in place, then checks its fields.
/// Checks the AES-GCM tag of a FRAGMENT or REPAIR and decrypts its payload in place; returns
/// its authenticated fields (bytes `0..FRAGMENT_HEADER_LEN`) and its payload.
fn open_sealed<'a>(
    key: &FragmentKey,
    bytes: &'a mut [u8],
) -> Result<(&'a [u8], &'a [u8]), DecodeError> {
    let body_end = bytes.len() - TAG_LEN;
    let (authenticated, rest) = bytes.split_at_mut(FRAGMENT_HEADER_LEN);
    let (payload, tag) = rest.split_at_mut(body_end - FRAGMENT_HEADER_LEN);
    let tag = Tag::try_from(&tag[..]).map_err(|_| DecodeError::BadTag)?;
    let mut nonce = [0u8; FRAGMENT_NONCE_LEN];
    nonce.copy_from_slice(&authenticated[FRAGMENT_NONCE_OFFSET..]);
    key.aead
        .open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&authenticated[..]),
            tag,
            payload,
            0..,
        )
        .map_err(|_| DecodeError::BadTag)?;
    Ok((authenticated, payload))
}

fn open_repair<'a>(
    key: &FragmentKey,
    header: Header,
    bytes: &'a mut [u8],
    reserved_error: DecodeError,
) -> Result<Datagram<'a>, DecodeError> {
    let (fields, payload) = open_sealed(key, bytes)?;
    if u16_at(fields, 38) != 0 {
        return Err(reserved_error);
    }
    let repair = Repair {
        first_page: u64_at(fields, 24),
        pages: fields[32],
        symbols_per_page: fields[33],
        symbol_len: u16_at(fields, 34),
        index: fields[36],
        count: fields[37],
        data: payload,
    };
    if !repair.is_valid() {
        return Err(DecodeError::Repair {
            pages: repair.pages,
            symbols: repair.symbols_per_page,
            symbol_len: repair.symbol_len,
            index: repair.index,
            count: repair.count,
        });
    }
    Ok(Datagram::Repair(header, repair))
}

fn open_fragment<'a>(
    key: &FragmentKey,
    header: Header,
    bytes: &'a mut [u8],
    reserved_error: DecodeError,
) -> Result<Datagram<'a>, DecodeError> {
    let len = bytes.len();
    let (fields, payload) = open_sealed(key, bytes)?;
    let page = u64_at(fields, 24);
    let index = fields[32];
    let count = fields[33];
    let data_len = u16_at(fields, 34);
    let offset = u16_at(fields, 36);
    if u16_at(fields, 38) != 0 {
        return Err(reserved_error);
    }
    if usize::from(data_len) != payload.len() {
        return Err(DecodeError::Length {
            kind: Kind::Fragment,
            len,
        });
    }
    if count == 0
        || count > MAX_FRAGMENTS
        || index >= count
        || data_len == 0
        || usize::from(offset) + usize::from(data_len) > PAGE_SIZE
    {
        return Err(DecodeError::Fragment {
            index,
            count,
            offset,
            len: data_len,
        });
    }
    Ok(Datagram::Fragment(
        header,
        Fragment {
            page,
            index,
            count,
            offset,
            data: payload,
        },
    ))
}

/// Why a datagram could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// More pages than one REQUEST may name.
    #[error("{0} pages do not fit one request (at most {MAX_REQUEST_PAGES})")]
    TooManyPages(usize),
    /// Fragment fields out of range.
    #[error("fragment {index}/{count} at offset {offset} of {len} bytes does not fit a page")]
    Fragment {
        /// Index.
        index: u8,
        /// Count.
        count: u8,
        /// Offset.
        offset: usize,
        /// Payload length.
        len: usize,
    },
    /// Flags this version does not define for the kind.
    #[error("undefined flags {0:#06x}")]
    Flags(u16),
    /// A `REQUEST_FRAGMENTS` entry naming no fragment.
    #[error("fragment request entry {0:#x} names no fragment")]
    FragmentEntry(u64),
    /// REPAIR fields that describe no decodable block.
    #[error("repair fields describe no decodable block")]
    Repair,
}

fn put_header(out: &mut Vec<u8>, kind: Kind, header: &Header) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&header.flags.to_le_bytes());
    out.extend_from_slice(&header.family.to_le_bytes());
    out.extend_from_slice(&header.generation.to_le_bytes());
    out.extend_from_slice(&header.sender.to_le_bytes());
}

fn seal(key: &McastKey, out: &mut Vec<u8>) {
    let tag = key.tag(out);
    out.extend_from_slice(&tag);
}

/// Writes a FRAGMENT datagram into `out` (replacing its contents), sealed by `sealer` with
/// its next nonce.
pub fn encode_fragment(
    sealer: &FragmentSealer,
    out: &mut Vec<u8>,
    header: &Header,
    fragment: &Fragment<'_>,
) -> Result<(), EncodeError> {
    if header.flags & !FRAGMENT_FLAGS != 0 {
        return Err(EncodeError::Flags(header.flags));
    }
    let Fragment {
        page,
        index,
        count,
        offset,
        data,
    } = *fragment;
    if count == 0
        || count > MAX_FRAGMENTS
        || index >= count
        || data.is_empty()
        || usize::from(offset) + data.len() > PAGE_SIZE
    {
        return Err(EncodeError::Fragment {
            index,
            count,
            offset: usize::from(offset),
            len: data.len(),
        });
    }
    put_header(out, Kind::Fragment, header);
    out.extend_from_slice(&page.to_le_bytes());
    out.push(index);
    out.push(count);
    out.extend_from_slice(&(data.len() as u16).to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    seal_payload(sealer, out, data);
    Ok(())
}

/// Writes a REPAIR datagram into `out` (replacing its contents), sealed by `sealer` with its
/// next nonce.
pub fn encode_repair(
    sealer: &FragmentSealer,
    out: &mut Vec<u8>,
    header: &Header,
    repair: &Repair<'_>,
) -> Result<(), EncodeError> {
    if header.flags != 0 {
        return Err(EncodeError::Flags(header.flags));
    }
    if !repair.is_valid() {
        return Err(EncodeError::Repair);
    }
    put_header(out, Kind::Repair, header);
    out.extend_from_slice(&repair.first_page.to_le_bytes());
    out.push(repair.pages);
    out.push(repair.symbols_per_page);
    out.extend_from_slice(&repair.symbol_len.to_le_bytes());
    out.push(repair.index);
    out.push(repair.count);
    out.extend_from_slice(&0u16.to_le_bytes());
    seal_payload(sealer, out, repair.data);
    Ok(())
}

/// Appends the next nonce and `data` to the fields in `out`, encrypts `data` under the
/// fields (and nonce) as additional data, and appends the tag.
fn seal_payload(sealer: &FragmentSealer, out: &mut Vec<u8>, data: &[u8]) {
    let nonce = sealer.next_nonce();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(data);
    let (authenticated, payload) = out.split_at_mut(FRAGMENT_HEADER_LEN);
    let tag = sealer
        .key
        .aead
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&authenticated[..]),
            payload,
        )
        .expect("a fragment is far below AES-GCM's message limit");
    out.extend_from_slice(tag.as_ref());
}

/// Writes a REQUEST datagram into `out` (replacing its contents): `pages` are page numbers,
/// or with `REQUEST_FRAGMENTS` in the flags, [`fragment_entry`]s.
pub fn encode_request(
    key: &McastKey,
    out: &mut Vec<u8>,
    header: &Header,
    rate: u32,
    pages: &[u64],
) -> Result<(), EncodeError> {
    if header.flags & !REQUEST_FLAGS != 0 {
        return Err(EncodeError::Flags(header.flags));
    }
    if pages.len() > MAX_REQUEST_PAGES {
        return Err(EncodeError::TooManyPages(pages.len()));
    }
    if header.flags & REQUEST_FRAGMENTS != 0
        && let Some(&entry) = pages.iter().find(|&&entry| split_entry(entry, true).1 == 0)
    {
        return Err(EncodeError::FragmentEntry(entry));
    }
    put_header(out, Kind::Request, header);
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(pages.len() as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    for page in pages {
        out.extend_from_slice(&page.to_le_bytes());
    }
    seal(key, out);
    Ok(())
}

/// Writes a REJECT datagram into `out` (replacing its contents).
pub fn encode_reject(key: &McastKey, out: &mut Vec<u8>, header: &Header, reject: &Reject) {
    let header = Header {
        flags: 0,
        ..*header
    };
    put_header(out, Kind::Reject, &header);
    out.extend_from_slice(&reject.page.to_le_bytes());
    out.push(reject.code as u8);
    out.extend_from_slice(&[0u8; 7]);
    seal(key, out);
}

/// How a page is cut into fragments for a path MTU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragmentation {
    /// Fragments per page.
    pub count: u8,
    /// Payload bytes of every fragment but possibly the last.
    pub payload: u16,
}

impl Fragmentation {
    /// The fewest equal fragments (multiples of 8 bytes) whose datagrams fit `mtu`.
    ///
    /// MTUs too small for a page in [`MAX_FRAGMENTS`] pieces are raised to the smallest that
    /// fits (IPv4 requires 576 anyway).
    pub fn for_mtu(mtu: u32) -> Fragmentation {
        let overhead = IP_UDP_HEADER_LEN + FRAGMENT_HEADER_LEN + TAG_LEN;
        let room = (mtu as usize).saturating_sub(overhead).min(PAGE_SIZE);
        let min_room = PAGE_SIZE.div_ceil(usize::from(MAX_FRAGMENTS));
        let room = room.max(min_room);
        let count = PAGE_SIZE.div_ceil(room);
        let payload = PAGE_SIZE
            .div_ceil(count)
            .next_multiple_of(8)
            .min(room.max(8));
        let count = PAGE_SIZE.div_ceil(payload);
        Fragmentation {
            count: count as u8,
            payload: payload as u16,
        }
    }

    /// `(index, offset, len)` of each fragment.
    pub fn pieces(&self) -> impl Iterator<Item = (u8, u16, u16)> + use<> {
        let payload = usize::from(self.payload);
        (0..self.count).map(move |index| {
            let offset = usize::from(index) * payload;
            let len = payload.min(PAGE_SIZE - offset);
            (index, offset as u16, len as u16)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> McastKey {
        McastKey::new(ClusterKey::from_bytes([7; 32]))
    }

    fn header(flags: u16) -> Header {
        Header {
            flags,
            family: FAMILY,
            generation: GENERATION,
            sender: 42,
        }
    }

    const FAMILY: u64 = 0x1122_3344_5566_7788;
    const GENERATION: u32 = 9;

    /// A fragment of `page` that is its only one, at offset 0.
    fn single(page: u64, data: &[u8]) -> Fragment<'_> {
        Fragment {
            page,
            index: 0,
            count: 1,
            offset: 0,
            data,
        }
    }

    fn sealer(key: &McastKey) -> FragmentSealer {
        FragmentSealer::new(key.fragment_key(FAMILY, GENERATION))
    }

    #[test]
    fn fragment_round_trips_and_layout_matches_the_document() {
        let key = key();
        let sealer = sealer(&key);
        let data = [0xabu8; 1000];
        let mut out = Vec::new();
        let fragment = Fragment {
            page: 77,
            index: 1,
            count: 3,
            offset: 1368,
            data: &data,
        };
        encode_fragment(&sealer, &mut out, &header(FRAGMENT_PUSH), &fragment).unwrap();
        assert_eq!(out.len(), FRAGMENT_HEADER_LEN + 1000 + TAG_LEN);
        assert_eq!(&out[..4], b"SFMC");
        assert_eq!(out[4], 2);
        assert_eq!(out[5], 1);
        assert_eq!(u64_at(&out, 8), FAMILY);
        assert_eq!(u32_at(&out, 16), GENERATION);
        assert_eq!(u64_at(&out, 24), 77);
        assert_eq!(u16_at(&out, 34), 1000);
        assert_eq!(u16_at(&out, 36), 1368);
        assert_eq!(peek_family(&out), Some(FAMILY));
        // The payload is encrypted: the page's bytes are not on the wire.
        assert!(
            out[FRAGMENT_HEADER_LEN..FRAGMENT_HEADER_LEN + 1000]
                .windows(8)
                .all(|w| w != [0xab; 8])
        );
        let family_key = key.fragment_key(FAMILY, GENERATION);
        match decode(&key, &mut out.to_vec(), |_, _| Some(&family_key)).unwrap() {
            Datagram::Fragment(h, f) => {
                assert_eq!(h, header(FRAGMENT_PUSH));
                assert_eq!(f, fragment);
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn the_layout_is_the_one_the_xdp_program_reads() {
        use snowflock_ebpf::abi;
        assert_eq!(VERSION, abi::MCDIST_VERSION);
        assert_eq!(u32::from_le_bytes(MAGIC), abi::MCDIST_MAGIC);
        assert_eq!(Kind::Fragment as u8, abi::MCDIST_KIND_FRAGMENT);
        assert_eq!(FRAGMENT_HEADER_LEN, abi::MCDIST_FRAGMENT_OFFSET_PAYLOAD);
        assert_eq!(TAG_LEN, abi::MCDIST_TAG_LEN);
    }

    #[test]
    fn every_fragment_gets_a_new_nonce_and_sealers_draw_their_own_prefix() {
        let key = key();
        let sealer = sealer(&key);
        let data = [5u8; 64];
        let fragment = single(3, &data);
        let mut nonces = std::collections::HashSet::new();
        let mut out = Vec::new();
        for _ in 0..100 {
            encode_fragment(&sealer, &mut out, &header(0), &fragment).unwrap();
            assert!(nonces.insert(out[FRAGMENT_NONCE_OFFSET..FRAGMENT_HEADER_LEN].to_vec()));
        }
        // The same page sent twice does not look the same on the wire.
        let mut again = Vec::new();
        encode_fragment(&sealer, &mut again, &header(0), &fragment).unwrap();
        assert_ne!(out[FRAGMENT_HEADER_LEN..], again[FRAGMENT_HEADER_LEN..]);
        let prefixes: std::collections::HashSet<[u8; 4]> =
            (0..16).map(|_| self::sealer(&key).prefix).collect();
        assert!(prefixes.len() > 1, "16 sealers drew one prefix");
    }

    #[test]
    fn during_a_key_rotation_datagrams_of_either_key_verify_and_families_keep_their_key() {
        let (old, new, other) = (
            ClusterKey::from_bytes([1; 32]),
            ClusterKey::from_bytes([2; 32]),
            ClusterKey::from_bytes([3; 32]),
        );
        let ring = KeyRing::new(old.clone());
        let rotating = McastKey::new(&ring);
        // A family registered before the rotation is sealed under the old key.
        let (sealed_under, before) = rotating.sending_fragment_key(FAMILY, GENERATION);
        assert_eq!(sealed_under, old.id());
        ring.rotate(new.clone(), std::time::Duration::from_secs(60))
            .unwrap();
        let mut out = Vec::new();
        for (sender, accepted) in [(&old, true), (&new, true), (&other, false)] {
            encode_request(&McastKey::new(sender), &mut out, &header(0), 1, &[7]).unwrap();
            assert_eq!(
                decode(&rotating, &mut out.to_vec(), |_, _| None).is_ok(),
                accepted,
                "a REQUEST under {}",
                sender.id()
            );
        }
        // Its receivers derive the same fragment key from the id, while the key is accepted.
        let sealer = FragmentSealer::new(before);
        let data = [0x42; 64];
        encode_fragment(&sealer, &mut out, &header(0), &single(3, &data)).unwrap();
        let receiver_key = McastKey::new(&ring)
            .fragment_key_under(old.id(), FAMILY, GENERATION)
            .unwrap();
        assert!(decode(&rotating, &mut out, |_, _| Some(&receiver_key)).is_ok());
        assert!(
            rotating
                .fragment_key_under(other.id(), FAMILY, GENERATION)
                .is_none()
        );
    }

    #[test]
    fn request_and_reject_round_trip() {
        let key = key();
        let mut out = Vec::new();
        let pages: Vec<u64> = (0..MAX_REQUEST_PAGES as u64).map(|p| p * 3).collect();
        encode_request(&key, &mut out, &header(REQUEST_RETRY), 5000, &pages).unwrap();
        match decode(&key, &mut out.to_vec(), |_, _| None).unwrap() {
            Datagram::Request(h, r) => {
                assert_eq!(h.flags, REQUEST_RETRY);
                assert_eq!(r.rate, 5000);
                assert_eq!(r.pages().collect::<Vec<_>>(), pages);
            }
            other => panic!("decoded {other:?}"),
        }
        let reject = Reject {
            page: 5,
            code: RejectCode::OutOfRange,
        };
        encode_reject(&key, &mut out, &header(0), &reject);
        assert_eq!(out.len(), REJECT_LEN);
        assert_eq!(
            decode(&key, &mut out.to_vec(), |_, _| None).unwrap(),
            Datagram::Reject(header(0), reject)
        );
        assert_eq!(
            encode_request(&key, &mut out, &header(0), 0, &[0; MAX_REQUEST_PAGES + 1]),
            Err(EncodeError::TooManyPages(MAX_REQUEST_PAGES + 1))
        );
    }

    #[test]
    fn fragment_requests_name_pages_and_fragments_and_an_empty_mask_is_refused() {
        let key = key();
        let mut out = Vec::new();
        let entries = [
            fragment_entry(7, 0b100),
            fragment_entry(ENTRY_PAGE_BITS, 0b011),
            fragment_entry(0, ALL_FRAGMENTS),
        ];
        let flags = REQUEST_RETRY | REQUEST_FRAGMENTS;
        encode_request(&key, &mut out, &header(flags), 0, &entries).unwrap();
        match decode(&key, &mut out.to_vec(), |_, _| None).unwrap() {
            Datagram::Request(h, r) => {
                assert_eq!(h.flags, flags);
                assert_eq!(
                    r.entries().collect::<Vec<_>>(),
                    [(7, 0b100), (ENTRY_PAGE_BITS, 0b011), (0, ALL_FRAGMENTS)]
                );
                assert_eq!(r.pages().collect::<Vec<_>>(), [7, ENTRY_PAGE_BITS, 0]);
            }
            other => panic!("decoded {other:?}"),
        }
        // Every flipped bit, in the masks too, breaks the tag.
        for bit in 0..out.len() * 8 {
            let mut bad = out.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&key, &mut bad, |_, _| None).is_err(), "bit {bit}");
        }
        // A whole-page request's entries are whole pages, whatever their high bits.
        encode_request(&key, &mut out, &header(0), 0, &[fragment_entry(7, 1)]).unwrap();
        match decode(&key, &mut out.to_vec(), |_, _| None).unwrap() {
            Datagram::Request(_, r) => {
                assert_eq!(
                    r.entries().collect::<Vec<_>>(),
                    [(fragment_entry(7, 1), ALL_FRAGMENTS)]
                );
            }
            other => panic!("decoded {other:?}"),
        }
        // An entry naming no fragment is not encoded, and a forged one (tagged by a holder of
        // the key) is refused with the entry it names.
        assert_eq!(
            encode_request(
                &key,
                &mut out,
                &header(flags),
                0,
                &[fragment_entry(9, 1), 9]
            ),
            Err(EncodeError::FragmentEntry(9))
        );
        encode_request(
            &key,
            &mut out,
            &header(REQUEST_RETRY),
            0,
            &[fragment_entry(3, 1), 9],
        )
        .unwrap();
        out[6..8].copy_from_slice(&flags.to_le_bytes());
        let body = out.len() - TAG_LEN;
        let tag = key.tag(&out[..body]);
        out[body..].copy_from_slice(&tag);
        assert_eq!(
            decode(&key, &mut out, |_, _| None),
            Err(DecodeError::EmptyFragmentMask { index: 1, page: 9 })
        );
    }

    #[test]
    fn repairs_round_trip_and_forged_or_garbled_ones_are_refused() {
        let key = key();
        let family_key = key.fragment_key(FAMILY, GENERATION);
        let symbol = [9u8; 1368];
        let repair = Repair {
            first_page: 40,
            pages: 16,
            symbols_per_page: 3,
            symbol_len: 1368,
            index: 11,
            count: 12,
            data: &symbol,
        };
        let mut out = Vec::new();
        encode_repair(&sealer(&key), &mut out, &header(0), &repair).unwrap();
        assert_eq!(out.len(), FRAGMENT_HEADER_LEN + 1368 + TAG_LEN);
        assert_eq!(
            decode(&key, &mut out.clone(), |_, _| Some(&family_key)).unwrap(),
            Datagram::Repair(header(0), repair)
        );
        for bit in 0..out.len() * 8 {
            let mut bad = out.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode(&key, &mut bad, |_, _| Some(&family_key)).is_err(),
                "bit {bit} flipped was accepted"
            );
        }
        assert_eq!(
            decode(&key, &mut out.clone(), |_, _| None),
            Err(DecodeError::NoKey {
                family: FAMILY,
                generation: GENERATION
            })
        );
        // Fields that describe no block are refused when encoding, and when decoding even
        // under a valid tag (a holder of the key sealing nonsense).
        let nonsense = [
            Repair { pages: 0, ..repair },
            Repair {
                pages: MAX_BLOCK_PAGES + 1,
                ..repair
            },
            Repair {
                index: 12,
                ..repair
            },
            Repair {
                symbols_per_page: 2,
                ..repair
            },
            Repair {
                symbols_per_page: 4,
                ..repair
            },
            Repair {
                symbol_len: 1364,
                data: &symbol[..1364],
                ..repair
            },
            Repair {
                symbol_len: 1367,
                data: &symbol[..1367],
                ..repair
            },
            Repair {
                data: &symbol[..100],
                ..repair
            },
        ];
        for bad in nonsense {
            assert_eq!(
                encode_repair(&sealer(&key), &mut out, &header(0), &bad),
                Err(EncodeError::Repair),
                "{bad:?}"
            );
        }
        assert_eq!(
            encode_repair(&sealer(&key), &mut out, &header(FRAGMENT_PUSH), &repair),
            Err(EncodeError::Flags(FRAGMENT_PUSH))
        );
        encode_repair(&sealer(&key), &mut out, &header(0), &repair).unwrap();
        out[36] = 12;
        let sealer = sealer(&key);
        let body = out.len() - TAG_LEN;
        let (fields, payload) = out[..body].split_at(FRAGMENT_HEADER_LEN);
        let mut resealed = fields[..FRAGMENT_NONCE_OFFSET].to_vec();
        seal_payload(&sealer, &mut resealed, &vec![9u8; payload.len()]);
        assert_eq!(
            decode(&key, &mut resealed, |_, _| Some(&family_key)),
            Err(DecodeError::Repair {
                pages: 16,
                symbols: 3,
                symbol_len: 1368,
                index: 12,
                count: 12
            })
        );
    }

    #[test]
    fn every_flipped_bit_and_the_wrong_keys_are_refused() {
        let key = key();
        let family_key = key.fragment_key(FAMILY, GENERATION);
        let mut out = Vec::new();
        let data = [1u8; 64];
        let fragment = single(1, &data);
        encode_fragment(&sealer(&key), &mut out, &header(0), &fragment).unwrap();
        for bit in 0..out.len() * 8 {
            let mut bad = out.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode(&key, &mut bad.to_vec(), |_, _| Some(&family_key)).is_err(),
                "bit {bit} flipped was accepted"
            );
        }
        let other = McastKey::new(ClusterKey::from_bytes([8; 32]));
        let other_family_key = other.fragment_key(FAMILY, GENERATION);
        assert_eq!(
            decode(&other, &mut out.to_vec(), |_, _| Some(&other_family_key)),
            Err(DecodeError::BadTag)
        );
        let other_generation = key.fragment_key(FAMILY, GENERATION + 1);
        assert_eq!(
            decode(&key, &mut out.to_vec(), |_, _| Some(&other_generation)),
            Err(DecodeError::BadTag)
        );
        assert_eq!(
            decode(&key, &mut out.to_vec(), |_, _| None),
            Err(DecodeError::NoKey {
                family: FAMILY,
                generation: GENERATION
            })
        );
        for len in 0..out.len() {
            assert!(decode(&key, &mut out[..len].to_vec(), |_, _| Some(&family_key)).is_err());
        }
        let mut request = Vec::new();
        encode_request(&key, &mut request, &header(0), 0, &[1]).unwrap();
        assert_eq!(
            decode(&other, &mut request.to_vec(), |_, _| None),
            Err(DecodeError::BadTag)
        );
    }

    #[test]
    fn fragment_fields_are_checked_even_under_a_valid_tag() {
        let key = key();
        let family_key = key.fragment_key(FAMILY, GENERATION);
        let mut out = Vec::new();
        let data = [1u8; 64];
        let fragment = single(1, &data);
        // A sender with the key but bad arithmetic: offset past the page, sealed.
        let mut bad = Vec::new();
        put_header(&mut bad, Kind::Fragment, &header(0));
        bad.extend_from_slice(&1u64.to_le_bytes());
        bad.extend_from_slice(&[0, 1]);
        bad.extend_from_slice(&64u16.to_le_bytes());
        bad.extend_from_slice(&4090u16.to_le_bytes());
        bad.extend_from_slice(&[0, 0]);
        bad.extend_from_slice(&[7u8; FRAGMENT_NONCE_LEN]);
        bad.extend_from_slice(&data);
        let (authenticated, payload) = bad.split_at_mut(FRAGMENT_HEADER_LEN);
        let tag = family_key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([7u8; FRAGMENT_NONCE_LEN]),
                Aad::from(&authenticated[..]),
                payload,
            )
            .unwrap();
        bad.extend_from_slice(tag.as_ref());
        assert!(matches!(
            decode(&key, &mut bad.to_vec(), |_, _| Some(&family_key)),
            Err(DecodeError::Fragment { offset: 4090, .. })
        ));
        let bad = Fragment {
            index: 2,
            count: 2,
            ..fragment
        };
        assert!(encode_fragment(&sealer(&key), &mut out, &header(0), &bad).is_err());
    }

    #[test]
    fn the_largest_fragment_fits_a_copy_mode_xdp_frame() {
        let cut = Fragmentation::for_mtu(MAX_FRAGMENT_MTU);
        assert_eq!(cut.count, 2);
        let frame =
            14 + IP_UDP_HEADER_LEN + FRAGMENT_HEADER_LEN + usize::from(cut.payload) + TAG_LEN;
        assert!(frame <= (4096 - XDP_COPY_HEADROOM) as usize, "{frame}");
    }

    #[test]
    fn fragmentation_fits_the_mtu_and_covers_the_page() {
        for mtu in [576u32, 1280, 1500, 4000, 9000, 65535] {
            let f = Fragmentation::for_mtu(mtu);
            let pieces: Vec<_> = f.pieces().collect();
            assert_eq!(pieces.len(), usize::from(f.count));
            let mut next = 0usize;
            for (index, offset, len) in pieces {
                assert_eq!(usize::from(offset), next, "mtu {mtu} fragment {index}");
                assert!(
                    IP_UDP_HEADER_LEN + FRAGMENT_HEADER_LEN + usize::from(len) + TAG_LEN
                        <= mtu as usize,
                    "mtu {mtu}: fragment of {len} bytes too big"
                );
                next += usize::from(len);
            }
            assert_eq!(next, PAGE_SIZE, "mtu {mtu}");
        }
        assert_eq!(Fragmentation::for_mtu(1500).count, 3);
        assert_eq!(Fragmentation::for_mtu(9000).count, 1);
    }
}
