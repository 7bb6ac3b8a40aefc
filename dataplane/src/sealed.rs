//! Sealed records: how the unicast page protocol's frames travel after the handshake.
//!
//! The cluster-key handshake ([`crate::auth`]) proves both ends and yields a session key; from
//! then on every byte either side sends is in a record sealed with AES-128-GCM, so that an
//! attacker on the path can neither read pages nor forge, alter, replay, drop or reorder
//! frames (mcdist's FRAGMENTs are sealed the same way, `mcast::wire`).
//!
//! A record is a 4-byte big-endian length (of what follows), the ciphertext of whole frames
//! and a 16-byte tag; the length is the associated data. Each direction has its own key,
//! derived from the session key with HMAC-SHA256 and a direction label, and a nonce that is
//! the count of records sent before in that direction: both ends count, so a record out of
//! place fails to open and the connection closes. A record holds at most
//! [`MAX_RECORD_PLAINTEXT`] bytes of whole frames, so a receiver with a buffer of
//! [`MAX_RECORD_LEN`] bytes always holds a whole record.

use std::ops::Range;

use hmac::{Hmac, Mac};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use sha2::Sha256;

use crate::auth::SESSION_KEY_LEN;
use crate::wire;

/// Bytes of a record's length prefix.
pub const RECORD_HEADER_LEN: usize = 4;
/// Bytes of a record's tag.
pub const RECORD_TAG_LEN: usize = 16;
/// Most frame bytes in one record.
pub const MAX_RECORD_PLAINTEXT: usize = 128 * 1024;
/// The longest record on the wire.
pub const MAX_RECORD_LEN: usize = RECORD_HEADER_LEN + MAX_RECORD_PLAINTEXT + RECORD_TAG_LEN;

const CLIENT_TO_SERVER: &[u8] = b"snowflock pages: client to server";
const SERVER_TO_CLIENT: &[u8] = b"snowflock pages: server to client";

/// Which end of a connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Client,
    Server,
}

/// Why a record could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("a record of {len} bytes is longer than {MAX_RECORD_LEN}")]
    TooLong { len: usize },
    #[error("a record of {len} bytes is shorter than its tag")]
    TooShort { len: usize },
    #[error("record {sequence} failed authentication (forged, altered, replayed or out of order)")]
    Forged { sequence: u64 },
}

/// One direction's key and the number of records sealed or opened with it so far.
struct Direction {
    key: LessSafeKey,
    sequence: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction")
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Direction {
    fn new(session_key: &[u8; SESSION_KEY_LEN], label: &[u8]) -> Direction {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(session_key)
            .expect("HMAC takes keys of any length");
        mac.update(label);
        let derived: [u8; 32] = mac.finalize().into_bytes().into();
        let unbound = UnboundKey::new(&AES_128_GCM, &derived[..AES_128_GCM.key_len()])
            .expect("AES-128-GCM takes 16-byte keys");
        Direction {
            key: LessSafeKey::new(unbound),
            sequence: 0,
        }
    }

    /// The next record's nonce; each is used once (2^64 records per connection).
    fn next_nonce(&mut self) -> (u64, Nonce) {
        let sequence = self.sequence;
        self.sequence += 1;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[NONCE_LEN - 8..].copy_from_slice(&sequence.to_be_bytes());
        (sequence, Nonce::assume_unique_for_key(nonce))
    }
}

/// Seals what one end sends.
#[derive(Debug)]
pub struct Sealer(Direction);

/// Opens what one end receives.
#[derive(Debug)]
pub struct Opener(Direction);

/// The sealer and opener of `end` of a connection whose handshake gave `session_key`.
pub fn record_keys(session_key: &[u8; SESSION_KEY_LEN], end: End) -> (Sealer, Opener) {
    let (send, receive) = match end {
        End::Client => (CLIENT_TO_SERVER, SERVER_TO_CLIENT),
        End::Server => (SERVER_TO_CLIENT, CLIENT_TO_SERVER),
    };
    (
        Sealer(Direction::new(session_key, send)),
        Opener(Direction::new(session_key, receive)),
    )
}

impl Sealer {
    /// Appends `frames` (whole frames, as `wire` encodes them) to `out` as records of at most
    /// [`MAX_RECORD_PLAINTEXT`] bytes, each cut at a frame boundary.
    ///
    /// # Panics
    /// If `frames` does not decode as whole frames, or one frame is longer than a record:
    /// the caller encoded them.
    pub fn seal_frames(&mut self, frames: &[u8], out: &mut Vec<u8>) {
        let mut start = 0;
        while start < frames.len() {
            let mut end = start;
            while end < frames.len() {
                let (_, used) = wire::decode(&frames[end..]).expect("whole frames to seal");
                if end + used - start > MAX_RECORD_PLAINTEXT {
                    break;
                }
                end += used;
            }
            assert!(end > start, "a frame longer than a record");
            self.seal(&frames[start..end], out);
            start = end;
        }
    }

    /// Appends one record of `plaintext` (at most [`MAX_RECORD_PLAINTEXT`] bytes) to `out`.
    /// It should be whole frames: the peer refuses a record that is not.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        assert!(plaintext.len() <= MAX_RECORD_PLAINTEXT, "a record too long");
        let len = (plaintext.len() + RECORD_TAG_LEN) as u32;
        let header = len.to_be_bytes();
        out.extend_from_slice(&header);
        let body = out.len();
        out.extend_from_slice(plaintext);
        let (_, nonce) = self.0.next_nonce();
        let tag: Tag = self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[body..])
            .expect("a record is far below AES-GCM's limit");
        out.extend_from_slice(tag.as_ref());
    }
}

impl Opener {
    /// Opens the record at the start of `buf` in place. `Ok(None)` while it is incomplete;
    /// otherwise where its frames are in `buf` and how many bytes of `buf` it took. The
    /// frames are the caller's to decode (and to refuse, if they do not decode).
    pub fn open_in_place(
        &mut self,
        buf: &mut [u8],
    ) -> Result<Option<(Range<usize>, usize)>, RecordError> {
        let Some(header) = buf.get(..RECORD_HEADER_LEN) else {
            return Ok(None);
        };
        let header: [u8; RECORD_HEADER_LEN] = header.try_into().expect("4 bytes");
        let len = u32::from_be_bytes(header) as usize;
        if RECORD_HEADER_LEN + len > MAX_RECORD_LEN {
            return Err(RecordError::TooLong {
                len: RECORD_HEADER_LEN + len,
            });
        }
        if len < RECORD_TAG_LEN {
            return Err(RecordError::TooShort { len });
        }
        let total = RECORD_HEADER_LEN + len;
        let Some(record) = buf.get_mut(RECORD_HEADER_LEN..total) else {
            return Ok(None);
        };
        let (sequence, nonce) = self.0.next_nonce();
        let plaintext = self
            .0
            .key
            .open_in_place(nonce, Aad::from(header), record)
            .map_err(|_| RecordError::Forged { sequence })?;
        let frames = RECORD_HEADER_LEN..RECORD_HEADER_LEN + plaintext.len();
        Ok(Some((frames, total)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PAGE_SIZE;

    fn pages(count: u64) -> Vec<u8> {
        let mut frames = Vec::new();
        for page in 0..count {
            wire::encode_page(7, page, &[page as u8; PAGE_SIZE], &mut frames);
        }
        frames
    }

    fn pair() -> (Sealer, Opener) {
        let session = [9u8; SESSION_KEY_LEN];
        let (client_sealer, _) = record_keys(&session, End::Client);
        let (_, server_opener) = record_keys(&session, End::Server);
        (client_sealer, server_opener)
    }

    /// Opens every record of `wire` in turn; returns the frames' bytes.
    fn open_all(opener: &mut Opener, mut wire: Vec<u8>) -> Result<Vec<u8>, RecordError> {
        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let (range, used) = opener
                .open_in_place(&mut wire[at..])?
                .expect("whole records");
            frames.extend_from_slice(&wire[at..][range]);
            at += used;
        }
        Ok(frames)
    }

    #[test]
    fn frames_go_through_in_records_of_bounded_size() {
        let (mut sealer, mut opener) = pair();
        let frames = pages(100);
        let mut wire = Vec::new();
        sealer.seal_frames(&frames, &mut wire);
        // 100 pages of 4 KiB do not fit in one record.
        let first = u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize;
        assert!(first + RECORD_HEADER_LEN <= MAX_RECORD_LEN && first < wire.len());
        assert!(
            !wire.windows(PAGE_SIZE).any(|w| w == [5u8; PAGE_SIZE]),
            "sealed"
        );
        assert_eq!(open_all(&mut opener, wire).unwrap(), frames);
    }

    #[test]
    fn an_incomplete_record_waits_for_more() {
        let (mut sealer, mut opener) = pair();
        let mut wire = Vec::new();
        sealer.seal_frames(&pages(1), &mut wire);
        let cut = wire.len() - 1;
        assert_eq!(opener.open_in_place(&mut wire[..cut]), Ok(None));
        assert!(opener.open_in_place(&mut wire).unwrap().is_some());
    }

    #[test]
    fn altered_replayed_reordered_and_foreign_records_are_refused() {
        let mut wire = Vec::new();
        let (mut sealer, _) = pair();
        sealer.seal_frames(&pages(1), &mut wire);
        let one = wire.len();
        sealer.seal_frames(&pages(2), &mut wire);

        // A bit flipped anywhere: header, ciphertext, tag.
        for at in [2, 100, one - 1] {
            let mut altered = wire.clone();
            altered[at] ^= 0x10;
            let (_, mut opener) = pair();
            assert!(
                matches!(
                    open_all(&mut opener, altered),
                    Err(RecordError::Forged { .. }
                        | RecordError::TooLong { .. }
                        | RecordError::TooShort { .. })
                ),
                "bit at {at}"
            );
        }
        // The first record twice: the replay is out of place.
        let mut replayed = wire[..one].to_vec();
        replayed.extend_from_slice(&wire[..one]);
        let (_, mut opener) = pair();
        assert_eq!(
            open_all(&mut opener, replayed),
            Err(RecordError::Forged { sequence: 1 })
        );
        // The second record first.
        let (_, mut opener) = pair();
        assert_eq!(
            open_all(&mut opener, wire[one..].to_vec()),
            Err(RecordError::Forged { sequence: 0 })
        );
        // Sealed under another session, or in the other direction.
        let (mut other, _) = record_keys(&[8u8; SESSION_KEY_LEN], End::Client);
        let mut foreign = Vec::new();
        other.seal_frames(&pages(1), &mut foreign);
        let (_, mut opener) = pair();
        assert!(open_all(&mut opener, foreign).is_err());
        let session = [9u8; SESSION_KEY_LEN];
        let (mut server_sealer, _) = record_keys(&session, End::Server);
        let mut reflected = Vec::new();
        server_sealer.seal_frames(&pages(1), &mut reflected);
        let (_, mut opener) = pair();
        assert!(open_all(&mut opener, reflected).is_err());
        // A length no record may have.
        let (_, mut opener) = pair();
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend([0u8; 64]);
        assert!(matches!(
            opener.open_in_place(&mut huge),
            Err(RecordError::TooLong { .. })
        ));
    }
}
