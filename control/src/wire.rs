//! Framing of the daemon's two protocols: the local API on a Unix socket and
//! the inter-host control protocol over TCP.
//!
//! A frame is a little-endian `u32` length followed by that many bytes of
//! postcard. On inter-host connections every frame also carries a 16-byte
//! tag, HMAC-SHA256 over (direction, sequence number, payload) with the
//! session key both ends derived during the cluster-key handshake, so a
//! peer without the key can neither inject, replay nor reorder frames.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either protocol accepts (a descriptor plus headroom).
pub const MAX_FRAME: usize = 32 << 20;
const TAG_LEN: usize = 16;

/// A failed frame read or write.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge { len: usize },
    #[error("frame does not decode")]
    Decode(#[source] postcard::Error),
    #[error("encoding a frame failed")]
    Encode(#[source] postcard::Error),
    #[error("frame {seq} failed authentication")]
    BadTag { seq: u64 },
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let body = postcard::to_stdvec(msg).map_err(WireError::Encode)?;
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge { len: body.len() });
    }
    Ok(body)
}

fn with_length(body: &[u8], tag: Option<&[u8]>) -> Vec<u8> {
    let total = body.len() + tag.map_or(0, <[u8]>::len);
    let mut frame = Vec::with_capacity(4 + total);
    frame.extend_from_slice(&(total as u32).to_le_bytes());
    frame.extend_from_slice(body);
    if let Some(tag) = tag {
        frame.extend_from_slice(tag);
    }
    frame
}

fn check_len(len: usize) -> Result<(), WireError> {
    if len > MAX_FRAME + TAG_LEN {
        return Err(WireError::TooLarge { len });
    }
    Ok(())
}

fn eof_is_closed(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Closed
    } else {
        WireError::Io(e)
    }
}

/// Writes one unauthenticated frame (local API, blocking side).
pub fn write_frame<T: Serialize>(out: &mut impl Write, msg: &T) -> Result<(), WireError> {
    out.write_all(&with_length(&encode(msg)?, None))?;
    Ok(out.flush()?)
}

/// Reads one unauthenticated frame (local API, blocking side).
pub fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> Result<T, WireError> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).map_err(eof_is_closed)?;
    let len = u32::from_le_bytes(len) as usize;
    check_len(len)?;
    let mut body = vec![0u8; len];
    input.read_exact(&mut body).map_err(eof_is_closed)?;
    postcard::from_bytes(&body).map_err(WireError::Decode)
}

/// Writes one unauthenticated frame (local API, daemon side).
pub async fn send<T: Serialize>(
    out: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), WireError> {
    out.write_all(&with_length(&encode(msg)?, None)).await?;
    Ok(())
}

async fn read_body(input: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).await.map_err(eof_is_closed)?;
    let len = u32::from_le_bytes(len) as usize;
    check_len(len)?;
    let mut body = vec![0u8; len];
    input.read_exact(&mut body).await.map_err(eof_is_closed)?;
    Ok(body)
}

/// Reads one unauthenticated frame (local API, daemon side).
pub async fn receive<T: DeserializeOwned>(
    input: &mut (impl AsyncRead + Unpin),
) -> Result<T, WireError> {
    postcard::from_bytes(&read_body(input).await?).map_err(WireError::Decode)
}

/// Which end of an inter-host connection a frame comes from; part of the
/// tag, so that a frame cannot be reflected back to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the host that opened the connection.
    FromClient,
    FromServer,
}

/// Tags and checks the frames of one direction of an authenticated connection.
#[derive(Debug)]
pub struct FrameSealer {
    key: [u8; 32],
    direction: Direction,
    seq: u64,
}

impl FrameSealer {
    pub fn new(session_key: [u8; 32], direction: Direction) -> Self {
        Self {
            key: session_key,
            direction,
            seq: 0,
        }
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&[self.direction as u8]);
        mac.update(&self.seq.to_le_bytes());
        mac.update(body);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// Encodes `msg` as the next frame of this direction.
    pub fn seal<T: Serialize>(&mut self, msg: &T) -> Result<Vec<u8>, WireError> {
        let body = encode(msg)?;
        let tag = self.tag(&body);
        self.seq += 1;
        Ok(with_length(&body, Some(&tag)))
    }

    /// Checks and decodes the next frame of this direction.
    pub fn open<T: DeserializeOwned>(&mut self, frame: &[u8]) -> Result<T, WireError> {
        let seq = self.seq;
        let Some(split) = frame.len().checked_sub(TAG_LEN) else {
            return Err(WireError::BadTag { seq });
        };
        let (body, tag) = frame.split_at(split);
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&[self.direction as u8]);
        mac.update(&seq.to_le_bytes());
        mac.update(body);
        mac.verify_truncated_left(tag)
            .map_err(|_| WireError::BadTag { seq })?;
        self.seq += 1;
        postcard::from_bytes(body).map_err(WireError::Decode)
    }
}

/// Reads one authenticated frame.
pub async fn receive_sealed<T: DeserializeOwned>(
    input: &mut (impl AsyncRead + Unpin),
    opener: &mut FrameSealer,
) -> Result<T, WireError> {
    let frame = read_body(input).await?;
    opener.open(&frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_frames_round_trip_and_reject_tampering_and_replay() {
        let key = [7u8; 32];
        let mut sealer = FrameSealer::new(key, Direction::FromClient);
        let mut opener = FrameSealer::new(key, Direction::FromClient);
        let first = sealer.seal(&("hello", 1u32)).unwrap();
        let second = sealer.seal(&("again", 2u32)).unwrap();
        let got: (String, u32) = opener.open(&first[4..]).unwrap();
        assert_eq!(got, ("hello".to_string(), 1));
        // Replaying the first frame fails: its sequence number is used up.
        assert!(matches!(
            opener.open::<(String, u32)>(&first[4..]),
            Err(WireError::BadTag { seq: 1 })
        ));
        let mut tampered = second.clone();
        tampered[6] ^= 1;
        assert!(opener.open::<(String, u32)>(&tampered[4..]).is_err());
        let got: (String, u32) = opener.open(&second[4..]).unwrap();
        assert_eq!(got.1, 2);
        // A frame reflected in the other direction does not verify.
        let mut reflected = FrameSealer::new(key, Direction::FromServer);
        assert!(reflected.open::<(String, u32)>(&first[4..]).is_err());
        // Another key does not verify.
        let mut stranger = FrameSealer::new([8u8; 32], Direction::FromClient);
        assert!(stranger.open::<(String, u32)>(&first[4..]).is_err());
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame::<u32>(&mut huge.as_slice()),
            Err(WireError::TooLarge { .. })
        ));
        let mut short = Vec::new();
        short.extend_from_slice(&10u32.to_le_bytes());
        short.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            read_frame::<u32>(&mut short.as_slice()),
            Err(WireError::Closed)
        ));
    }
}
