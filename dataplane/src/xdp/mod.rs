//! AF_XDP receive sockets: mcdist fragments straight from the NIC queue into user memory.
//!
//! An [`XskSocket`] owns a UMEM (page-aligned anonymous memory cut into equal frames) and the
//! two rings it receives through, shared with the kernel:
//!
//! - the **fill ring**, where we post free UMEM frames for the kernel to receive into;
//! - the **RX ring**, where the kernel posts a descriptor (address and length) for each
//!   packet it wrote into one of those frames.
//!
//! A socket only gets what an XDP program on its interface redirects to it (through an
//! XSKMAP entry for its queue; see the `snowflock-ebpf` crate). [`XskSocket::receive`] hands
//! the received Ethernet frames to a callback and returns their UMEM frames to the fill ring.
//! The socket only receives: it has a minimal completion ring (the kernel requires one with
//! a UMEM) and no TX ring.
//!
//! Descriptors from the kernel are checked to lie inside one UMEM frame before their bytes
//! are read; a bad one is skipped and counted ([`XskStats::rejected_descs`]).
//!
//! On veth (the test setup) and NICs without AF_XDP driver support, sockets run in copy mode;
//! [`ZeroCopy::Auto`] picks zero-copy where the driver offers it.

mod ring;
mod socket;
mod sys;
mod umem;

use std::io;

pub use ring::RingKind;
pub use socket::XskSocket;

/// Largest ring: the kernel takes ring sizes as a C `int`.
const MAX_RING_SIZE: u32 = 1 << 30;

/// Busy-polling settings (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL`, `SO_BUSY_POLL_BUDGET`): the
/// receiving thread drives the device queue itself from [`XskSocket::receive`] and
/// [`XskSocket::wait`] instead of waiting for interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusyPoll {
    /// How long one busy poll may spin, in microseconds (`SO_BUSY_POLL`).
    pub timeout_us: u32,
    /// Most packets the device handles per busy poll (`SO_BUSY_POLL_BUDGET`).
    pub budget: u16,
}

/// Whether to receive without copying (the NIC writes into the UMEM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Zero-copy where the driver supports it, else copy mode (logged at info). The kernel
    /// makes this choice itself when a bind asks for neither mode.
    #[default]
    Auto,
    /// Always copy mode (`XDP_COPY`).
    Never,
    /// Zero-copy or fail (`XDP_ZEROCOPY`).
    Required,
}

/// How a bound socket receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XskMode {
    /// The kernel copies each packet into the UMEM.
    Copy,
    /// The NIC writes packets into the UMEM directly.
    ZeroCopy,
}

/// Sizes and options of an [`XskSocket`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XskConfig {
    /// Frames of the UMEM; a power of two.
    pub frame_count: u32,
    /// Bytes per frame: 2048 or 4096. Copy mode puts the packet 256 bytes into its frame, so
    /// 2048 fits a 1500-byte MTU.
    pub frame_size: u32,
    /// Slots of the fill ring; a power of two. Frames beyond what it holds wait in the
    /// socket until the kernel has taken some.
    pub fill_ring: u32,
    /// Slots of the RX ring; a power of two.
    pub rx_ring: u32,
    /// Busy polling, applied when set; [`XskSocket::bind`] fails if the kernel refuses it.
    pub busy_poll: Option<BusyPoll>,
    /// Whether to receive without copying.
    pub zero_copy: ZeroCopy,
}

impl Default for XskConfig {
    fn default() -> XskConfig {
        XskConfig {
            frame_count: 4096,
            frame_size: 4096,
            fill_ring: 2048,
            rx_ring: 2048,
            busy_poll: None,
            zero_copy: ZeroCopy::Auto,
        }
    }
}

/// Kernel counters of a socket (`XDP_STATISTICS`) and the ones it keeps itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskStats {
    /// Packets the kernel dropped for this socket (no free frame, ring full, or too big).
    pub rx_dropped: u64,
    /// Invalid descriptors the kernel found in the fill ring.
    pub rx_invalid_descs: u64,
    /// Packets dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub rx_fill_ring_empty_descs: u64,
    /// RX descriptors this socket skipped because they did not lie inside one UMEM frame.
    pub rejected_descs: u64,
    /// UMEM frames that could not be reused: descriptors outside the UMEM, or naming a frame
    /// that was already free.
    pub lost_frames: u64,
}

/// Why an [`XskSocket`] could not be set up or queried.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// A configuration value is out of range.
    #[error("AF_XDP configuration: {field} = {value} must be {requirement}")]
    InvalidConfig {
        /// The [`XskConfig`] field.
        field: &'static str,
        /// Its value.
        value: u32,
        /// What it must be.
        requirement: &'static str,
    },
    /// The AF_XDP socket could not be created.
    #[error("creating an AF_XDP socket")]
    Socket {
        /// The I/O error.
        source: io::Error,
    },
    /// The UMEM memory could not be mapped.
    #[error("mapping {len} bytes of UMEM")]
    UmemMap {
        /// Bytes asked for.
        len: usize,
        /// The I/O error.
        source: io::Error,
    },
    /// The kernel refused the UMEM (`XDP_UMEM_REG`).
    #[error("registering the UMEM ({frame_count} frames of {frame_size} bytes)")]
    UmemRegister {
        /// Frames of the UMEM.
        frame_count: u32,
        /// Bytes per frame.
        frame_size: u32,
        /// The I/O error.
        source: io::Error,
    },
    /// The kernel refused a ring size.
    #[error("setting the {ring} ring to {size} slots")]
    RingSize {
        /// The ring.
        ring: RingKind,
        /// Slots asked for.
        size: u32,
        /// The I/O error.
        source: io::Error,
    },
    /// The ring layout (`XDP_MMAP_OFFSETS`) could not be read.
    #[error("reading the AF_XDP ring offsets")]
    RingOffsets {
        /// The I/O error.
        source: io::Error,
    },
    /// A ring could not be mapped.
    #[error("mapping the {ring} ring")]
    RingMap {
        /// The ring.
        ring: RingKind,
        /// The I/O error.
        source: io::Error,
    },
    /// The kernel's ring layout does not fit the mapping.
    #[error("the {ring} ring's layout is unusable: {reason}")]
    RingLayout {
        /// The ring.
        ring: RingKind,
        /// What is wrong with it.
        reason: String,
    },
    /// The kernel refused a busy-polling option.
    #[error("setting {option} to {value}")]
    BusyPoll {
        /// The socket option.
        option: &'static str,
        /// The value asked for.
        value: u32,
        /// The I/O error.
        source: io::Error,
    },
    /// The socket could not be bound to the queue (with [`ZeroCopy::Required`], also when
    /// the driver has no zero-copy support: `EOPNOTSUPP`).
    #[error("binding the AF_XDP socket to interface {ifindex} queue {queue_id} ({zero_copy:?})")]
    Bind {
        /// The interface.
        ifindex: u32,
        /// The queue.
        queue_id: u32,
        /// The zero-copy choice the bind asked for.
        zero_copy: ZeroCopy,
        /// The I/O error.
        source: io::Error,
    },
    /// The bound socket's mode (`XDP_OPTIONS`) could not be read.
    #[error("reading the AF_XDP socket's options")]
    Options {
        /// The I/O error.
        source: io::Error,
    },
    /// The kernel counters (`XDP_STATISTICS`) could not be read.
    #[error("reading the AF_XDP socket's statistics")]
    Statistics {
        /// The I/O error.
        source: io::Error,
    },
}

impl XskConfig {
    /// Checks every size against what the kernel and this socket support.
    pub fn validate(&self) -> Result<(), XskError> {
        let invalid = |field, value, requirement| {
            Err(XskError::InvalidConfig {
                field,
                value,
                requirement,
            })
        };
        if !self.frame_count.is_power_of_two() {
            return invalid("frame_count", self.frame_count, "a power of two");
        }
        if self.frame_size != 2048 && self.frame_size != 4096 {
            return invalid("frame_size", self.frame_size, "2048 or 4096");
        }
        let umem_len = u64::from(self.frame_count) * u64::from(self.frame_size);
        if usize::try_from(umem_len).is_err() {
            return invalid("frame_count", self.frame_count, "small enough to map");
        }
        if !self.fill_ring.is_power_of_two() || self.fill_ring > MAX_RING_SIZE {
            return invalid("fill_ring", self.fill_ring, "a power of two up to 2^30");
        }
        if !self.rx_ring.is_power_of_two() || self.rx_ring > MAX_RING_SIZE {
            return invalid("rx_ring", self.rx_ring, "a power of two up to 2^30");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        XskConfig::default().validate().unwrap();
    }

    #[test]
    fn config_sizes_must_be_powers_of_two_and_frames_2k_or_4k() {
        let cases: [(&str, XskConfig); 7] = [
            (
                "frame_count",
                XskConfig {
                    frame_count: 3000,
                    ..XskConfig::default()
                },
            ),
            (
                "frame_count",
                XskConfig {
                    frame_count: 0,
                    ..XskConfig::default()
                },
            ),
            (
                "frame_size",
                XskConfig {
                    frame_size: 1024,
                    ..XskConfig::default()
                },
            ),
            (
                "frame_size",
                XskConfig {
                    frame_size: 3072,
                    ..XskConfig::default()
                },
            ),
            (
                "fill_ring",
                XskConfig {
                    fill_ring: 1000,
                    ..XskConfig::default()
                },
            ),
            (
                "rx_ring",
                XskConfig {
                    rx_ring: 0,
                    ..XskConfig::default()
                },
            ),
            (
                "fill_ring",
                XskConfig {
                    fill_ring: 1 << 31,
                    ..XskConfig::default()
                },
            ),
        ];
        for (expected, config) in cases {
            match config.validate() {
                Err(XskError::InvalidConfig { field, .. }) => assert_eq!(field, expected),
                other => panic!("{config:?}: expected an invalid {expected}, got {other:?}"),
            }
        }
        let small = XskConfig {
            frame_count: 1,
            frame_size: 2048,
            fill_ring: 1,
            rx_ring: 1,
            ..XskConfig::default()
        };
        small.validate().unwrap();
    }
}
