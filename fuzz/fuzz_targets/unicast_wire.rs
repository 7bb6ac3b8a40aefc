//! The unicast page protocol: `wire::decode` of the frames a peer sends
//! (a decoded frame re-encodes to exactly the bytes it took), and sealed
//! records: `Opener::open_in_place` on raw bytes, and records sealed here
//! with one bit flipped, which never open.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use snowflock_dataplane::sealed::{End, RecordError, record_keys};
use snowflock_dataplane::wire::{self, Frame, WireError};
use snowflock_fuzz::{SESSION_KEY, UnicastInput};

/// A record sealed here, then bit `bit` flipped.
#[derive(Debug, Arbitrary)]
struct Flipped<'a> {
    bit: u32,
    plaintext: &'a [u8],
}

/// Re-encodes `frame` with the real encoder.
fn encode(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    match *frame {
        Frame::Request(ref request) => {
            let pages: Vec<u64> = request.pages().collect();
            wire::encode_request(request.family, &pages, &mut out)
                .expect("a decoded request encodes");
        }
        Frame::Page(page) => wire::encode_page(page.family, page.page, page.data, &mut out),
        Frame::Error(error) => wire::encode_error(
            error.family,
            error.page,
            error.code,
            error.message,
            &mut out,
        ),
    }
    out
}

/// Decodes the whole frames at the start of `bytes`, checking each; returns
/// how many bytes they took.
fn decode_frames(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match wire::decode(&bytes[at..]) {
            Ok((frame, used)) => {
                assert!(used > 0 && at + used <= bytes.len());
                assert_eq!(encode(&frame), bytes[at..at + used], "{frame:?}");
                at += used;
            }
            Err(WireError::Incomplete { needed, have }) => {
                assert!(needed > have, "incomplete with {have} of {needed} bytes");
                return at;
            }
            Err(_) => return at,
        }
    }
}

/// A peer's frames, as the server and client decode them: whole frames
/// also seal into records that open to the same frames.
fn frames(bytes: &[u8]) {
    let whole = decode_frames(bytes);
    if whole == 0 {
        return;
    }
    let (mut sealer, _) = record_keys(&SESSION_KEY, End::Client);
    let (_, mut opener) = record_keys(&SESSION_KEY, End::Server);
    let mut records = Vec::new();
    sealer.seal_frames(&bytes[..whole], &mut records);
    let mut opened = Vec::new();
    let mut at = 0;
    while at < records.len() {
        let (frames, used) = opener
            .open_in_place(&mut records[at..])
            .expect("a sealed record opens")
            .expect("a sealed record is whole");
        opened.extend_from_slice(&records[at..][frames]);
        at += used;
    }
    assert_eq!(opened, bytes[..whole]);
}

/// A peer's records, as they arrive.
fn records(bytes: &[u8]) {
    let (_, mut opener) = record_keys(&SESSION_KEY, End::Server);
    let mut buf = bytes.to_vec();
    let mut at = 0;
    while let Ok(Some((frames, used))) = opener.open_in_place(&mut buf[at..]) {
        assert!(frames.end <= used);
        decode_frames(&buf[at..][frames]);
        at += used;
    }
}

fn flipped(Flipped { bit, plaintext }: Flipped<'_>) {
    let plaintext = &plaintext[..plaintext.len().min(1 << 16)];
    let (mut sealer, _) = record_keys(&SESSION_KEY, End::Client);
    let (_, mut opener) = record_keys(&SESSION_KEY, End::Server);
    let mut record = Vec::new();
    sealer.seal(plaintext, &mut record);
    let bit = bit as usize % (8 * record.len());
    record[bit / 8] ^= 1 << (bit % 8);
    match opener.open_in_place(&mut record) {
        Ok(Some(opened)) => panic!("a record with bit {bit} flipped opened: {opened:?}"),
        // A flipped length: the record looks longer than what arrived.
        Ok(None) => assert!(bit < 32),
        Err(RecordError::Forged { sequence }) => assert_eq!(sequence, 0),
        Err(RecordError::TooLong { .. } | RecordError::TooShort { .. }) => assert!(bit < 32),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match UnicastInput::of(mode) {
        UnicastInput::Frames => frames(rest),
        UnicastInput::Records => records(rest),
        UnicastInput::Flipped => {
            if let Ok(input) = Flipped::arbitrary_take_rest(Unstructured::new(rest)) {
                flipped(input);
            }
        }
    }
});
