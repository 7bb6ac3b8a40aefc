//! The daemon's protocols: frames of the local API (`wire::read_frame`, the
//! blocking twin of what `sfd` runs on its socket) and of the inter-host
//! control protocol (`FrameSealer::open`), for every message type either
//! end decodes; and the cluster-key handshake both protocols start with
//! (`hello_remaining_len`, `Hello::parse`, and both ends' handshakes with
//! the peer's messages from the fuzzer).
//!
//! A message that decodes re-encodes to a frame that decodes to the same
//! bytes; a sealed frame with one bit flipped never opens.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use snowflock_control::protocol::{ApiRequest, ApiResponse, FromHost, ToHost};
use snowflock_control::wire::{self, Direction, FrameSealer, WireError};
use snowflock_dataplane::auth::{
    self, ClientHandshake, HELLO_HEADER_LEN, Hello, hello_remaining_len,
};
use snowflock_dataplane::server::PAGES_CONTEXT;
use snowflock_fuzz::{
    ControlInput, ControlMessage, SESSION_KEY, ScriptedPeer, cluster_key, control_input,
};

fn framed(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

/// Reads frames of `T` off `bytes` until one fails, checking each.
fn stream<T: Serialize + DeserializeOwned + Debug>(mut bytes: &[u8]) {
    while let Ok(message) = wire::read_frame::<T>(&mut bytes) {
        round_trip(&message, 0);
    }
}

/// Re-encodes `message` and decodes it again, locally and sealed, and
/// checks that a sealed frame with bit `flip` flipped does not open.
fn round_trip<T: Serialize + DeserializeOwned + Debug>(message: &T, flip: u32) {
    let mut frame = Vec::new();
    wire::write_frame(&mut frame, message).expect("a decoded message encodes");
    let again: T = wire::read_frame(&mut frame.as_slice()).expect("a re-encoded frame decodes");
    let mut second = Vec::new();
    wire::write_frame(&mut second, &again).expect("encodes");
    assert_eq!(frame, second, "{message:?} and {again:?} encode apart");

    let mut sealer = FrameSealer::new(SESSION_KEY, Direction::FromServer);
    let mut opener = FrameSealer::new(SESSION_KEY, Direction::FromServer);
    let sealed = sealer.seal(message).expect("a decoded message seals");
    let opened: T = opener
        .open(&sealed[4..])
        .expect("a sealed frame opens at its sequence number");
    let mut third = Vec::new();
    wire::write_frame(&mut third, &opened).expect("encodes");
    assert_eq!(frame, third, "sealing changed {message:?}");

    let mut forged = sealer.seal(message).expect("seals");
    let bit = 32 + flip as usize % (8 * (forged.len() - 4));
    forged[bit / 8] ^= 1 << (bit % 8);
    match opener.open::<T>(&forged[4..]) {
        Err(WireError::BadTag { seq: 1 }) => {}
        other => panic!("a frame with bit {bit} flipped was {other:?}"),
    }
}

fn decode_body<T: Serialize + DeserializeOwned + Debug>(body: &[u8], flip: u32) {
    if let Ok(message) = wire::read_frame::<T>(&mut framed(body).as_slice()) {
        round_trip(&message, flip);
    }
}

fn sealed<T: DeserializeOwned>(frame: &[u8]) {
    let mut opener = FrameSealer::new(SESSION_KEY, Direction::FromClient);
    let _ = opener.open::<T>(frame);
}

/// Decodes frames of `message` as `decode` says, a function generic in
/// the message type.
macro_rules! each_message {
    ($message:expr, $decode:ident($($arg:expr),*)) => {
        match $message {
            ControlMessage::ApiRequest => $decode::<ApiRequest>($($arg),*),
            ControlMessage::ApiResponse => $decode::<ApiResponse>($($arg),*),
            ControlMessage::ToHost => $decode::<ToHost>($($arg),*),
            ControlMessage::FromHost => $decode::<FromHost>($($arg),*),
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let key = cluster_key();
    let (input, message) = control_input(mode);
    match input {
        ControlInput::Stream => each_message!(message, stream(bytes)),
        ControlInput::Body => {
            if let Some((flip, body)) = bytes.split_first_chunk::<4>() {
                let flip = u32::from_le_bytes(*flip);
                each_message!(message, decode_body(body, flip));
            }
        }
        ControlInput::Sealed => each_message!(message, sealed(bytes)),
        ControlInput::Hello => {
            if let Some(header) = bytes.first_chunk::<HELLO_HEADER_LEN>() {
                let _ = hello_remaining_len(header);
            }
            if let Ok(hello) = Hello::parse(bytes) {
                assert_eq!(hello.encode(), bytes, "{hello:?} re-encodes apart");
            }
        }
        ControlInput::ToServer => {
            let _ = auth::server_handshake(&mut ScriptedPeer::new(bytes), &key, PAGES_CONTEXT);
        }
        ControlInput::ProofToServer => {
            let client = ClientHandshake::new(&key, PAGES_CONTEXT).expect("a valid context");
            let mut messages = client.hello();
            messages.extend_from_slice(bytes);
            let served =
                auth::server_handshake(&mut ScriptedPeer::new(&messages), &key, PAGES_CONTEXT);
            assert!(
                served.is_err(),
                "a proof made without the server's nonce was accepted"
            );
        }
        ControlInput::ToClient => {
            let client = auth::client_handshake(&mut ScriptedPeer::new(bytes), &key, PAGES_CONTEXT);
            assert!(
                client.is_err(),
                "a challenge made without the client's nonce was accepted"
            );
        }
    }
});
