//! Frames of the page protocol.
//!
//! All integers are little-endian. Every frame starts with a one-byte type.
//!
//! ```text
//! REQUEST (client → server)   type=1 | family u64 | count u16 | count × page u64
//!                             count is 1..=MAX_PAGES_PER_REQUEST
//! PAGE    (server → client)   type=2 | family u64 | page u64 | PAGE_SIZE data bytes
//! ERROR   (server → client)   type=3 | family u64 | page u64 | code u8 | len u16 | len bytes UTF-8
//!                             len is 0..=MAX_ERROR_MESSAGE_LEN
//! ```
//!
//! A family is one clone point (a frozen memory image); a page is a guest page frame number
//! within it. The server answers every requested page with exactly one PAGE or ERROR frame.
//!
//! [`decode`] borrows from its input (no copies) and tells an incomplete frame
//! ([`WireError::Incomplete`]: read more and try again) from a malformed one (every other
//! [`WireError`]: the stream is unusable). It rejects a bad count or message length as soon as
//! the header is readable, before waiting for a body that may never come.

use std::fmt;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Most pages one REQUEST may name.
pub const MAX_PAGES_PER_REQUEST: usize = 256;
/// Longest message of an ERROR frame, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;

/// Type byte of a REQUEST.
pub const TYPE_REQUEST: u8 = 1;
/// Type byte of a PAGE reply.
pub const TYPE_PAGE: u8 = 2;
/// Type byte of an ERROR reply.
pub const TYPE_ERROR: u8 = 3;

/// REQUEST before its page list: type, family, count.
pub const REQUEST_HEADER_LEN: usize = 1 + 8 + 2;
/// The largest REQUEST.
pub const MAX_REQUEST_LEN: usize = REQUEST_HEADER_LEN + 8 * MAX_PAGES_PER_REQUEST;
/// PAGE before its data: type, family, page.
pub const PAGE_HEADER_LEN: usize = 1 + 8 + 8;
/// A PAGE reply (fixed size).
pub const PAGE_FRAME_LEN: usize = PAGE_HEADER_LEN + PAGE_SIZE;
/// ERROR before its message: type, family, page, code, message length.
pub const ERROR_HEADER_LEN: usize = 1 + 8 + 8 + 1 + 2;
/// The largest ERROR reply.
pub const MAX_ERROR_FRAME_LEN: usize = ERROR_HEADER_LEN + MAX_ERROR_MESSAGE_LEN;
/// The largest frame of any type.
pub const MAX_FRAME_LEN: usize = PAGE_FRAME_LEN;

const _: () = assert!(MAX_REQUEST_LEN <= MAX_FRAME_LEN);
const _: () = assert!(MAX_ERROR_FRAME_LEN <= MAX_FRAME_LEN);
const _: () = assert!(MAX_PAGES_PER_REQUEST <= u16::MAX as usize);
const _: () = assert!(MAX_ERROR_MESSAGE_LEN <= u16::MAX as usize);

/// Why the server could not send a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// The server does not serve this family (never did, or it was unregistered).
    UnknownFamily = 1,
    /// The page is beyond the end of the family's memory.
    OutOfRange = 2,
    /// Reading the page from the frozen image failed.
    ReadFailed = 3,
}

impl ErrorCode {
    /// The code for a byte, if it is one.
    pub fn from_byte(byte: u8) -> Option<ErrorCode> {
        match byte {
            1 => Some(ErrorCode::UnknownFamily),
            2 => Some(ErrorCode::OutOfRange),
            3 => Some(ErrorCode::ReadFailed),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorCode::UnknownFamily => "unknown family",
            ErrorCode::OutOfRange => "page out of range",
            ErrorCode::ReadFailed => "read failed",
        })
    }
}

/// A decoded frame, borrowing from the decoder's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Pages wanted by a client.
    Request(Request<'a>),
    /// One page's contents.
    Page(PageReply<'a>),
    /// Why one page cannot be sent.
    Error(ErrorReply<'a>),
}

/// A REQUEST: 1..=[`MAX_PAGES_PER_REQUEST`] pages of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The clone point.
    pub family: u64,
    pages: &'a [[u8; 8]],
}

impl Request<'_> {
    /// How many pages are requested.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether no page is requested (never true of a decoded request).
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The requested pages, in order.
    pub fn pages(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.pages.iter().map(|page| u64::from_le_bytes(*page))
    }
}

/// A PAGE reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageReply<'a> {
    /// The clone point.
    pub family: u64,
    /// The page frame number.
    pub page: u64,
    /// The page's contents.
    pub data: &'a [u8; PAGE_SIZE],
}

/// An ERROR reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorReply<'a> {
    /// The clone point.
    pub family: u64,
    /// The page that could not be sent.
    pub page: u64,
    /// Why.
    pub code: ErrorCode,
    /// Details for humans.
    pub message: &'a str,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes are the start of a frame that needs at least `needed` bytes; read more.
    #[error("incomplete frame: need at least {needed} bytes, have {have}")]
    Incomplete {
        /// Bytes needed (at least) for the frame.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The type byte is not a known frame type.
    #[error("unknown frame type {ty:#04x}")]
    UnknownType {
        /// The type byte.
        ty: u8,
    },
    /// A REQUEST names no pages or too many.
    #[error("request names {count} pages; it must name 1..={MAX_PAGES_PER_REQUEST}")]
    BadCount {
        /// The count in the frame.
        count: u16,
    },
    /// An ERROR frame has an unknown code.
    #[error("unknown error code {code:#04x}")]
    UnknownErrorCode {
        /// The code byte.
        code: u8,
    },
    /// An ERROR frame's message is longer than [`MAX_ERROR_MESSAGE_LEN`].
    #[error("error message is {len} bytes; at most {MAX_ERROR_MESSAGE_LEN} are allowed")]
    MessageTooLong {
        /// The length in the frame.
        len: u16,
    },
    /// An ERROR frame's message is not UTF-8.
    #[error("error message is not UTF-8 (valid up to byte {valid_up_to})")]
    BadUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
}

/// Why a REQUEST cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A request must name at least one page.
    #[error("a request must name at least one page")]
    NoPages,
    /// A request names more than [`MAX_PAGES_PER_REQUEST`] pages.
    #[error("a request names at most {MAX_PAGES_PER_REQUEST} pages, not {count}")]
    TooManyPages {
        /// Pages given.
        count: usize,
    },
}

/// Appends a REQUEST for `pages` of `family` to `out`.
pub fn encode_request(family: u64, pages: &[u64], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if pages.is_empty() {
        return Err(EncodeError::NoPages);
    }
    if pages.len() > MAX_PAGES_PER_REQUEST {
        return Err(EncodeError::TooManyPages { count: pages.len() });
    }
    push_request(family, pages, out);
    Ok(())
}

/// Appends REQUESTs for all of `pages` of `family` to `out`, at most
/// [`MAX_PAGES_PER_REQUEST`] pages each; returns how many. No pages, no frames.
pub fn encode_requests(family: u64, pages: &[u64], out: &mut Vec<u8>) -> usize {
    out.reserve(8 * pages.len() + pages.len().div_ceil(MAX_PAGES_PER_REQUEST) * REQUEST_HEADER_LEN);
    let chunks = pages.chunks(MAX_PAGES_PER_REQUEST);
    let frames = chunks.len();
    for chunk in chunks {
        push_request(family, chunk, out);
    }
    frames
}

/// Appends one REQUEST; `pages` holds 1..=MAX_PAGES_PER_REQUEST pages.
fn push_request(family: u64, pages: &[u64], out: &mut Vec<u8>) {
    out.reserve(REQUEST_HEADER_LEN + 8 * pages.len());
    out.push(TYPE_REQUEST);
    out.extend_from_slice(&family.to_le_bytes());
    // MAX_PAGES_PER_REQUEST fits in a u16 (asserted above).
    out.extend_from_slice(&(pages.len() as u16).to_le_bytes());
    for page in pages {
        out.extend_from_slice(&page.to_le_bytes());
    }
}

/// Appends a PAGE reply to `out`.
pub fn encode_page(family: u64, page: u64, data: &[u8; PAGE_SIZE], out: &mut Vec<u8>) {
    out.reserve(PAGE_FRAME_LEN);
    out.push(TYPE_PAGE);
    out.extend_from_slice(&family.to_le_bytes());
    out.extend_from_slice(&page.to_le_bytes());
    out.extend_from_slice(data);
}

/// Appends an ERROR reply to `out`.
///
/// A message longer than [`MAX_ERROR_MESSAGE_LEN`] bytes is cut at the last character boundary
/// that fits.
pub fn encode_error(family: u64, page: u64, code: ErrorCode, message: &str, out: &mut Vec<u8>) {
    let mut len = message.len().min(MAX_ERROR_MESSAGE_LEN);
    while !message.is_char_boundary(len) {
        len -= 1;
    }
    let message = &message.as_bytes()[..len];
    out.reserve(ERROR_HEADER_LEN + len);
    out.push(TYPE_ERROR);
    out.extend_from_slice(&family.to_le_bytes());
    out.extend_from_slice(&page.to_le_bytes());
    out.push(code as u8);
    // `len` is at most MAX_ERROR_MESSAGE_LEN, which fits in a u16.
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(message);
}

/// Reads fixed-size fields off the front of a slice.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn array<const N: usize>(&mut self) -> Option<&'a [u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|&[byte]| byte)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().copied().map(u16::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().copied().map(u64::from_le_bytes)
    }

    fn bytes(&mut self, len: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(len)?;
        self.rest = rest;
        Some(head)
    }
}

/// Decodes the frame at the start of `buf`; returns it and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<(Frame<'_>, usize), WireError> {
    let incomplete = |needed| WireError::Incomplete {
        needed,
        have: buf.len(),
    };
    let mut fields = Fields { rest: buf };
    let ty = fields.u8().ok_or(incomplete(1))?;
    match ty {
        TYPE_REQUEST => {
            let (Some(family), Some(count)) = (fields.u64(), fields.u16()) else {
                return Err(incomplete(REQUEST_HEADER_LEN));
            };
            if count == 0 || usize::from(count) > MAX_PAGES_PER_REQUEST {
                return Err(WireError::BadCount { count });
            }
            let len = REQUEST_HEADER_LEN + 8 * usize::from(count);
            let pages = fields
                .bytes(8 * usize::from(count))
                .ok_or(incomplete(len))?;
            let (pages, _) = pages.as_chunks::<8>();
            Ok((Frame::Request(Request { family, pages }), len))
        }
        TYPE_PAGE => {
            let (Some(family), Some(page), Some(data)) =
                (fields.u64(), fields.u64(), fields.array::<PAGE_SIZE>())
            else {
                return Err(incomplete(PAGE_FRAME_LEN));
            };
            Ok((
                Frame::Page(PageReply { family, page, data }),
                PAGE_FRAME_LEN,
            ))
        }
        TYPE_ERROR => {
            let (Some(family), Some(page), Some(code), Some(len)) =
                (fields.u64(), fields.u64(), fields.u8(), fields.u16())
            else {
                return Err(incomplete(ERROR_HEADER_LEN));
            };
            let code = ErrorCode::from_byte(code).ok_or(WireError::UnknownErrorCode { code })?;
            if usize::from(len) > MAX_ERROR_MESSAGE_LEN {
                return Err(WireError::MessageTooLong { len });
            }
            let frame_len = ERROR_HEADER_LEN + usize::from(len);
            let message = fields
                .bytes(usize::from(len))
                .ok_or(incomplete(frame_len))?;
            let message = std::str::from_utf8(message).map_err(|e| WireError::BadUtf8 {
                valid_up_to: e.valid_up_to(),
            })?;
            Ok((
                Frame::Error(ErrorReply {
                    family,
                    page,
                    code,
                    message,
                }),
                frame_len,
            ))
        }
        ty => Err(WireError::UnknownType { ty }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_data(seed: u8) -> [u8; PAGE_SIZE] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
    }

    fn expect_prefixes_incomplete(bytes: &[u8]) {
        for len in 0..bytes.len() {
            match decode(&bytes[..len]) {
                Err(WireError::Incomplete { needed, have }) => {
                    assert_eq!(have, len);
                    assert!(needed > len && needed <= bytes.len(), "{needed} for {len}");
                }
                other => panic!("prefix of {len} bytes decoded as {other:?}"),
            }
        }
    }

    #[test]
    fn request_round_trip() {
        let pages: Vec<u64> = (0..MAX_PAGES_PER_REQUEST as u64)
            .map(|i| i * 977 + (1 << 40))
            .collect();
        let mut out = vec![0xee];
        encode_request(42, &pages, &mut out).unwrap();
        assert_eq!(out.len(), 1 + MAX_REQUEST_LEN);
        let (frame, used) = decode(&out[1..]).unwrap();
        assert_eq!(used, MAX_REQUEST_LEN);
        let Frame::Request(request) = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(request.family, 42);
        assert_eq!(request.len(), pages.len());
        assert_eq!(request.pages().collect::<Vec<_>>(), pages);
        expect_prefixes_incomplete(&out[1..]);
    }

    #[test]
    fn requests_are_split_into_frames() {
        let pages: Vec<u64> = (0..2 * MAX_PAGES_PER_REQUEST as u64 + 3).collect();
        let mut out = Vec::new();
        assert_eq!(encode_requests(8, &[], &mut out), 0);
        assert!(out.is_empty());
        assert_eq!(encode_requests(8, &pages, &mut out), 3);
        let mut decoded = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let (Frame::Request(request), used) = decode(&out[at..]).unwrap() else {
                panic!("not a request")
            };
            assert_eq!(request.family, 8);
            assert!(request.len() <= MAX_PAGES_PER_REQUEST);
            decoded.extend(request.pages());
            at += used;
        }
        assert_eq!(decoded, pages);
    }

    #[test]
    fn request_counts_are_checked() {
        let mut out = Vec::new();
        assert_eq!(encode_request(1, &[], &mut out), Err(EncodeError::NoPages));
        assert_eq!(
            encode_request(1, &[0; MAX_PAGES_PER_REQUEST + 1], &mut out),
            Err(EncodeError::TooManyPages {
                count: MAX_PAGES_PER_REQUEST + 1
            })
        );
        assert!(out.is_empty());
        for count in [0u16, MAX_PAGES_PER_REQUEST as u16 + 1, u16::MAX] {
            let mut frame = vec![TYPE_REQUEST];
            frame.extend_from_slice(&7u64.to_le_bytes());
            frame.extend_from_slice(&count.to_le_bytes());
            // The count is refused from the header alone.
            assert_eq!(decode(&frame), Err(WireError::BadCount { count }));
        }
    }

    #[test]
    fn page_round_trip() {
        let data = page_data(3);
        let mut out = Vec::new();
        encode_page(9, 0xdead_beef, &data, &mut out);
        encode_page(9, 1, &page_data(4), &mut out);
        assert_eq!(out.len(), 2 * PAGE_FRAME_LEN);
        let (frame, used) = decode(&out).unwrap();
        assert_eq!(used, PAGE_FRAME_LEN);
        assert_eq!(
            frame,
            Frame::Page(PageReply {
                family: 9,
                page: 0xdead_beef,
                data: &data
            })
        );
        let (frame, _) = decode(&out[used..]).unwrap();
        assert!(matches!(frame, Frame::Page(PageReply { page: 1, .. })));
        expect_prefixes_incomplete(&out[..PAGE_FRAME_LEN]);
    }

    #[test]
    fn error_round_trip_and_truncation() {
        let mut out = Vec::new();
        encode_error(
            5,
            6,
            ErrorCode::OutOfRange,
            "page 0x6 is beyond 4 pages",
            &mut out,
        );
        let (frame, used) = decode(&out).unwrap();
        assert_eq!(used, out.len());
        assert_eq!(
            frame,
            Frame::Error(ErrorReply {
                family: 5,
                page: 6,
                code: ErrorCode::OutOfRange,
                message: "page 0x6 is beyond 4 pages"
            })
        );
        expect_prefixes_incomplete(&out);

        // 'é' is two bytes: a cut through it must back off to a character boundary.
        let long = format!("x{}", "é".repeat(MAX_ERROR_MESSAGE_LEN));
        out.clear();
        encode_error(5, 6, ErrorCode::ReadFailed, &long, &mut out);
        let (Frame::Error(reply), _) = decode(&out).unwrap() else {
            panic!("not an error frame")
        };
        assert_eq!(reply.message.len(), MAX_ERROR_MESSAGE_LEN - 1);
        assert!(long.starts_with(reply.message));
    }

    #[test]
    fn malformed_error_frames_are_refused() {
        let mut header = vec![TYPE_ERROR];
        header.extend_from_slice(&1u64.to_le_bytes());
        header.extend_from_slice(&2u64.to_le_bytes());

        let mut bad_code = header.clone();
        bad_code.extend_from_slice(&[9, 0, 0]);
        assert_eq!(
            decode(&bad_code),
            Err(WireError::UnknownErrorCode { code: 9 })
        );

        let mut too_long = header.clone();
        too_long.push(ErrorCode::ReadFailed as u8);
        too_long.extend_from_slice(&(MAX_ERROR_MESSAGE_LEN as u16 + 1).to_le_bytes());
        assert_eq!(
            decode(&too_long),
            Err(WireError::MessageTooLong {
                len: MAX_ERROR_MESSAGE_LEN as u16 + 1
            })
        );

        let mut bad_utf8 = header;
        bad_utf8.push(ErrorCode::ReadFailed as u8);
        bad_utf8.extend_from_slice(&3u16.to_le_bytes());
        bad_utf8.extend_from_slice(&[b'o', 0xff, b'k']);
        assert_eq!(
            decode(&bad_utf8),
            Err(WireError::BadUtf8 { valid_up_to: 1 })
        );

        for ty in [0u8, 4, 0x80, 0xff] {
            assert_eq!(decode(&[ty, 1, 2]), Err(WireError::UnknownType { ty }));
        }
    }

    /// Random and mutated byte strings never panic the decoder, and whatever it accepts is
    /// self-consistent: the length it reports is within the input and re-encodes identically.
    #[test]
    fn decoder_survives_random_bytes() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut seeds = Vec::new();
        encode_request(3, &[1, 2, 3], &mut seeds).unwrap();
        encode_page(3, 4, &page_data(1), &mut seeds);
        encode_error(3, 5, ErrorCode::UnknownFamily, "no such family", &mut seeds);

        let mut accepted = 0;
        for round in 0..100_000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                // Mutate a valid stream.
                let mut bytes = seeds.clone();
                bytes.truncate((next() % (seeds.len() as u64 + 1)) as usize);
                for _ in 0..next() % 8 {
                    if !bytes.is_empty() {
                        let at = (next() % bytes.len() as u64) as usize;
                        bytes[at] = next() as u8;
                    }
                }
                bytes
            } else {
                // Pure noise, with a plausible type byte most of the time.
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect()
            };
            if round % 4 == 1 && !bytes.is_empty() {
                bytes[0] = (next() % 4) as u8;
            }
            if let Ok((frame, used)) = decode(&bytes) {
                accepted += 1;
                assert!(used <= bytes.len());
                let mut again = Vec::new();
                match frame {
                    Frame::Request(request) => {
                        let pages: Vec<u64> = request.pages().collect();
                        encode_request(request.family, &pages, &mut again).unwrap();
                    }
                    Frame::Page(reply) => {
                        encode_page(reply.family, reply.page, reply.data, &mut again)
                    }
                    Frame::Error(reply) => encode_error(
                        reply.family,
                        reply.page,
                        reply.code,
                        reply.message,
                        &mut again,
                    ),
                }
                assert_eq!(again, bytes[..used]);
            }
        }
        assert!(accepted > 0, "the mutations never produced a valid frame");
    }
}
