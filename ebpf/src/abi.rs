//! What the XDP program and this loader agree on: the mcdist header fields the program reads,
//! the counter indices, the map sizes and the `families` value layout.
//!
//! Every constant mirrors a `#define` of `include/mcdist.h`; a test parses that header and
//! checks both sides agree.

/// `"SFMC"` read as a little-endian `u32`.
pub const MCDIST_MAGIC: u32 = u32::from_le_bytes(*b"SFMC");
/// The mcdist wire format version the program matches.
pub const MCDIST_VERSION: u8 = 2;
/// The `kind` of a FRAGMENT datagram.
pub const MCDIST_KIND_FRAGMENT: u8 = 1;

/// Offset of the magic in the UDP payload.
pub const MCDIST_OFFSET_MAGIC: usize = 0;
/// Offset of the version byte.
pub const MCDIST_OFFSET_VERSION: usize = 4;
/// Offset of the kind byte.
pub const MCDIST_OFFSET_KIND: usize = 5;
/// Offset of the family id (`u64`, little-endian).
pub const MCDIST_OFFSET_FAMILY: usize = 8;
/// Offset of the generation (`u32`, little-endian).
pub const MCDIST_OFFSET_GENERATION: usize = 16;
/// Offset of a FRAGMENT's page number (`u64`, little-endian).
pub const MCDIST_OFFSET_PAGE: usize = 24;
/// Offset of a FRAGMENT's payload (after its fields and its 12-byte nonce).
pub const MCDIST_FRAGMENT_OFFSET_PAYLOAD: usize = 52;
/// Length of the tag that ends every datagram.
pub const MCDIST_TAG_LEN: usize = 16;
/// Bytes the program needs to tell a FRAGMENT from the other kinds.
pub const MCDIST_KIND_END: usize = MCDIST_OFFSET_KIND + 1;
/// Shortest FRAGMENT datagram: the fixed header, one payload byte and the tag. Shorter ones
/// count as malformed.
pub const MCDIST_FRAGMENT_MIN_LEN: usize = MCDIST_FRAGMENT_OFFSET_PAYLOAD + 1 + MCDIST_TAG_LEN;

/// Index of [`crate::XdpCounters::received`] in the `counters` map.
pub(crate) const COUNTER_RECEIVED: usize = 0;
/// Index of [`crate::XdpCounters::redirected`].
pub(crate) const COUNTER_REDIRECTED: usize = 1;
/// Index of [`crate::XdpCounters::duplicate_dropped`].
pub(crate) const COUNTER_DUPLICATE_DROPPED: usize = 2;
/// Index of [`crate::XdpCounters::passed`].
pub(crate) const COUNTER_PASSED: usize = 3;
/// Index of [`crate::XdpCounters::passed_not_ours`].
pub(crate) const COUNTER_PASSED_NOT_OURS: usize = 4;
/// Index of [`crate::XdpCounters::malformed`].
pub(crate) const COUNTER_MALFORMED: usize = 5;
/// Entries of the `counters` map.
pub(crate) const COUNTER_COUNT: usize = 6;

/// Words (`u64`) of the `presence` bitmap.
pub const PRESENCE_WORDS: usize = 1 << 18;
/// Pages the `presence` bitmap can hold, over all registered families.
pub const PRESENCE_CAPACITY_PAGES: u64 = PRESENCE_WORDS as u64 * 64;
/// Entries of the `families` map: at most this many families at once.
pub const FAMILIES_MAX: usize = 1024;
/// Entries of the `xsks` map: RX queues `0..XSKS_MAX` can have an AF_XDP socket.
pub const XSKS_MAX: u32 = 64;

/// Value of the `families` map (`struct family_entry` in the C program).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FamilyEntry {
    pub(crate) generation: u32,
    pub(crate) reserved: u32,
    /// First bit of the family's range in `presence`.
    pub(crate) base_bit: u64,
    pub(crate) pages: u64,
}

// SAFETY: `FamilyEntry` is `repr(C)`, `Copy` and `'static`, made only of integers laid out
// without padding (4 + 4 + 8 + 8 bytes, every field naturally aligned), so every byte pattern
// is a valid value and its bytes are exactly what the kernel stores for the C struct.
unsafe impl aya::Pod for FamilyEntry {}

const _: () = assert!(size_of::<FamilyEntry>() == 24);
const _: () = assert!(PRESENCE_WORDS.is_power_of_two());

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const HEADER: &str = include_str!("../include/mcdist.h");

    /// The `#define NAME VALUE` lines of the header with a numeric value.
    fn header_defines() -> HashMap<&'static str, u64> {
        HEADER
            .lines()
            .filter_map(|line| {
                let mut words = line.strip_prefix("#define ")?.split_whitespace();
                let name = words.next()?;
                let value = words.next()?;
                let parsed = match value.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => value.parse(),
                };
                Some((name, parsed.ok()?))
            })
            .collect()
    }

    #[test]
    fn rust_constants_match_the_c_header() {
        let defines = header_defines();
        let expected: [(&str, u64); 23] = [
            ("MCDIST_MAGIC", MCDIST_MAGIC.into()),
            ("MCDIST_VERSION", MCDIST_VERSION.into()),
            ("MCDIST_KIND_FRAGMENT", MCDIST_KIND_FRAGMENT.into()),
            ("MCDIST_OFFSET_MAGIC", MCDIST_OFFSET_MAGIC as u64),
            ("MCDIST_OFFSET_VERSION", MCDIST_OFFSET_VERSION as u64),
            ("MCDIST_OFFSET_KIND", MCDIST_OFFSET_KIND as u64),
            ("MCDIST_OFFSET_FAMILY", MCDIST_OFFSET_FAMILY as u64),
            ("MCDIST_OFFSET_GENERATION", MCDIST_OFFSET_GENERATION as u64),
            ("MCDIST_OFFSET_PAGE", MCDIST_OFFSET_PAGE as u64),
            (
                "MCDIST_FRAGMENT_OFFSET_PAYLOAD",
                MCDIST_FRAGMENT_OFFSET_PAYLOAD as u64,
            ),
            ("MCDIST_TAG_LEN", MCDIST_TAG_LEN as u64),
            ("MCDIST_KIND_END", MCDIST_KIND_END as u64),
            ("MCDIST_FRAGMENT_MIN_LEN", MCDIST_FRAGMENT_MIN_LEN as u64),
            ("COUNTER_RECEIVED", COUNTER_RECEIVED as u64),
            ("COUNTER_REDIRECTED", COUNTER_REDIRECTED as u64),
            (
                "COUNTER_DUPLICATE_DROPPED",
                COUNTER_DUPLICATE_DROPPED as u64,
            ),
            ("COUNTER_PASSED", COUNTER_PASSED as u64),
            ("COUNTER_PASSED_NOT_OURS", COUNTER_PASSED_NOT_OURS as u64),
            ("COUNTER_MALFORMED", COUNTER_MALFORMED as u64),
            ("COUNTER_COUNT", COUNTER_COUNT as u64),
            ("PRESENCE_WORDS", PRESENCE_WORDS as u64),
            ("FAMILIES_MAX", FAMILIES_MAX as u64),
            ("XSKS_MAX", XSKS_MAX.into()),
        ];
        for (name, value) in expected {
            assert_eq!(
                defines.get(name),
                Some(&value),
                "{name} in include/mcdist.h"
            );
        }
        let mirrored: Vec<&str> = expected.iter().map(|(name, _)| *name).collect();
        for name in defines.keys() {
            assert!(
                mirrored.contains(name),
                "{name} of include/mcdist.h has no Rust mirror"
            );
        }
    }

    #[test]
    fn magic_spells_sfmc_on_the_wire() {
        assert_eq!(MCDIST_MAGIC.to_le_bytes(), *b"SFMC");
        assert_eq!(MCDIST_MAGIC, 0x434d_4653);
    }
}
