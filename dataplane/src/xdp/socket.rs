//! [`XskSocket`]: setting up an AF_XDP socket and receiving through it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use super::ring::{FillRing, RingKind, RxRing};
use super::sys::{self, Mapping};
use super::umem::{FreeFrames, UmemLayout};
use super::{XskConfig, XskError, XskMode, XskStats, ZeroCopy};

/// Slots of the completion ring. The kernel requires one with every UMEM, but a socket that
/// never transmits never gets a completion, so the smallest ring does.
const COMPLETION_RING_SIZE: u32 = 1;

/// An AF_XDP socket bound to one queue of one interface, receiving into its own UMEM.
///
/// Dropping it closes the socket (which unbinds it from the queue) and unmaps its rings and
/// UMEM.
#[derive(Debug)]
pub struct XskSocket {
    // Declared first so it is dropped first: the socket is unbound before the rings and the
    // UMEM are unmapped. (Either order is memory-safe: the kernel holds its own references
    // to the ring memory and pins the UMEM pages until the socket is gone.)
    fd: OwnedFd,
    rx: RxRing,
    fill: FillRing,
    free: FreeFrames,
    mode: XskMode,
    config: XskConfig,
    ifindex: u32,
    queue_id: u32,
    rejected_descs: u64,
    lost_frames: u64,
}

impl XskSocket {
    /// Creates an AF_XDP socket with a UMEM and rings sized by `config`, posts every UMEM
    /// frame the fill ring has room for, and binds it to queue `queue_id` of interface
    /// `ifindex` (of the calling thread's network namespace).
    ///
    /// A queue takes one socket at a time (`EBUSY` otherwise), and the kernel frees it
    /// asynchronously, shortly after the previous socket is dropped.
    pub fn bind(ifindex: u32, queue_id: u32, config: &XskConfig) -> Result<XskSocket, XskError> {
        config.validate()?;
        let layout = UmemLayout::new(config.frame_size, config.frame_count);
        let fd = sys::xdp_socket().map_err(|source| XskError::Socket { source })?;

        let umem_len = usize::try_from(layout.len()).map_err(|_| XskError::InvalidConfig {
            field: "frame_count",
            value: config.frame_count,
            requirement: "small enough to map",
        })?;
        let umem = Mapping::anonymous(umem_len).map_err(|source| XskError::UmemMap {
            len: umem_len,
            source,
        })?;
        let registration = libc::xdp_umem_reg {
            addr: umem.as_ptr() as u64,
            len: layout.len(),
            chunk_size: layout.frame_size(),
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        sys::set_option(fd.as_fd(), libc::SOL_XDP, libc::XDP_UMEM_REG, &registration).map_err(
            |source| XskError::UmemRegister {
                frame_count: config.frame_count,
                frame_size: config.frame_size,
                source,
            },
        )?;

        let ring_sizes = [
            (RingKind::Fill, libc::XDP_UMEM_FILL_RING, config.fill_ring),
            (
                RingKind::Completion,
                libc::XDP_UMEM_COMPLETION_RING,
                COMPLETION_RING_SIZE,
            ),
            (RingKind::Rx, libc::XDP_RX_RING, config.rx_ring),
        ];
        for (ring, option, size) in ring_sizes {
            // Validated sizes fit; were one not to, the kernel refuses the (odd) maximum.
            let slots = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
            sys::set_option(fd.as_fd(), libc::SOL_XDP, option, &slots)
                .map_err(|source| XskError::RingSize { ring, size, source })?;
        }

        let mut offsets = libc::xdp_mmap_offsets {
            rx: empty_ring_offset(),
            tx: empty_ring_offset(),
            fr: empty_ring_offset(),
            cr: empty_ring_offset(),
        };
        sys::get_option(
            fd.as_fd(),
            libc::SOL_XDP,
            libc::XDP_MMAP_OFFSETS,
            &mut offsets,
        )
        .map_err(|source| XskError::RingOffsets { source })?;

        let fill_mapping = map_ring(
            fd.as_fd(),
            RingKind::Fill,
            FillRing::mapping_len(&offsets.fr, config.fill_ring),
            libc::XDP_UMEM_PGOFF_FILL_RING,
        )?;
        let mut fill =
            FillRing::new(fill_mapping, &offsets.fr, config.fill_ring).map_err(|reason| {
                XskError::RingLayout {
                    ring: RingKind::Fill,
                    reason,
                }
            })?;
        let rx_mapping = map_ring(
            fd.as_fd(),
            RingKind::Rx,
            RxRing::mapping_len(&offsets.rx, config.rx_ring),
            libc::XDP_PGOFF_RX_RING as u64,
        )?;
        let rx = RxRing::new(rx_mapping, &offsets.rx, config.rx_ring, umem, layout).map_err(
            |reason| XskError::RingLayout {
                ring: RingKind::Rx,
                reason,
            },
        )?;

        let mut free = FreeFrames::all(&layout);
        fill.produce(&mut free);

        if let Some(busy_poll) = config.busy_poll {
            let options = [
                ("SO_PREFER_BUSY_POLL", libc::SO_PREFER_BUSY_POLL, 1),
                ("SO_BUSY_POLL", libc::SO_BUSY_POLL, busy_poll.timeout_us),
                (
                    "SO_BUSY_POLL_BUDGET",
                    libc::SO_BUSY_POLL_BUDGET,
                    u32::from(busy_poll.budget),
                ),
            ];
            for (option, name, value) in options {
                let value_int = libc::c_int::try_from(value).map_err(|_| XskError::BusyPoll {
                    option,
                    value,
                    source: io::Error::from(io::ErrorKind::InvalidInput),
                })?;
                sys::set_option(fd.as_fd(), libc::SOL_SOCKET, name, &value_int).map_err(
                    |source| XskError::BusyPoll {
                        option,
                        value,
                        source,
                    },
                )?;
            }
        }

        let mode_flag = match config.zero_copy {
            ZeroCopy::Auto => 0,
            ZeroCopy::Never => libc::XDP_COPY,
            ZeroCopy::Required => libc::XDP_ZEROCOPY,
        };
        sys::bind(
            fd.as_fd(),
            ifindex,
            queue_id,
            mode_flag | libc::XDP_USE_NEED_WAKEUP,
        )
        .map_err(|source| XskError::Bind {
            ifindex,
            queue_id,
            zero_copy: config.zero_copy,
            source,
        })?;

        let mut options = libc::xdp_options { flags: 0 };
        sys::get_option(fd.as_fd(), libc::SOL_XDP, libc::XDP_OPTIONS, &mut options)
            .map_err(|source| XskError::Options { source })?;
        let mode = if options.flags & libc::XDP_OPTIONS_ZEROCOPY != 0 {
            XskMode::ZeroCopy
        } else {
            XskMode::Copy
        };
        if config.zero_copy == ZeroCopy::Auto && mode == XskMode::Copy {
            tracing::info!(
                ifindex,
                queue_id,
                "zero-copy AF_XDP is not available on this interface; using copy mode"
            );
        }
        tracing::debug!(ifindex, queue_id, ?mode, ?config, "AF_XDP socket bound");

        Ok(XskSocket {
            fd,
            rx,
            fill,
            free,
            mode,
            config: config.clone(),
            ifindex,
            queue_id,
            rejected_descs: 0,
            lost_frames: 0,
        })
    }

    /// How the socket receives.
    pub fn mode(&self) -> XskMode {
        self.mode
    }

    /// The socket's descriptor, for an XSKMAP entry or an event loop.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Hands up to `max` received packets to `f`, each as the Ethernet frame received, then
    /// returns their UMEM frames to the fill ring (waking the kernel if it asked for that,
    /// and always with busy polling, which is what drives the device queue). Returns how
    /// many packets `f` got; descriptors that do not lie inside one UMEM frame are skipped
    /// and counted in [`XskStats::rejected_descs`].
    pub fn receive(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        self.receive_batch(max, |packets| {
            for packet in packets {
                f(packet);
            }
        })
    }

    /// [`XskSocket::receive`], handing all packets of the call to `f` at once, writable (the
    /// frames are this side's until they go back to the fill ring).
    pub fn receive_batch(&mut self, max: usize, f: impl FnOnce(&mut [&mut [u8]])) -> usize {
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        let consumed = self.rx.consume(max, &mut self.free, f);
        if consumed.invalid > 0 || consumed.not_returned > 0 {
            self.rejected_descs += u64::from(consumed.invalid);
            self.lost_frames += u64::from(consumed.not_returned);
            tracing::warn!(
                invalid = consumed.invalid,
                lost_frames = consumed.not_returned,
                "skipped AF_XDP RX descriptors that do not lie in one free UMEM frame"
            );
        }
        if self.free.len() > 0 {
            self.fill.produce(&mut self.free);
        }
        if self.config.busy_poll.is_some() || self.fill.needs_wakeup() {
            sys::wake_receive(self.fd.as_fd());
        }
        (consumed.descriptors - consumed.invalid) as usize
    }

    /// Waits until packets are ready to receive or `timeout` passes; `Ok(true)` when ready.
    /// A signal ends the wait early with `Ok(false)`.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        if self.rx.has_entries() {
            return Ok(true);
        }
        sys::poll_readable(self.fd.as_fd(), timeout)
    }

    /// The kernel's counters for this socket and the socket's own.
    pub fn stats(&self) -> Result<XskStats, XskError> {
        let mut kernel = libc::xdp_statistics {
            rx_dropped: 0,
            rx_invalid_descs: 0,
            tx_invalid_descs: 0,
            rx_ring_full: 0,
            rx_fill_ring_empty_descs: 0,
            tx_ring_empty_descs: 0,
        };
        sys::get_option(
            self.fd.as_fd(),
            libc::SOL_XDP,
            libc::XDP_STATISTICS,
            &mut kernel,
        )
        .map_err(|source| XskError::Statistics { source })?;
        Ok(XskStats {
            rx_dropped: kernel.rx_dropped,
            rx_invalid_descs: kernel.rx_invalid_descs,
            rx_ring_full: kernel.rx_ring_full,
            rx_fill_ring_empty_descs: kernel.rx_fill_ring_empty_descs,
            rejected_descs: self.rejected_descs,
            lost_frames: self.lost_frames,
        })
    }

    /// The configuration the socket was bound with.
    pub fn config(&self) -> &XskConfig {
        &self.config
    }

    /// The interface the socket is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The interface queue the socket is bound to.
    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }
}

impl AsFd for XskSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn empty_ring_offset() -> libc::xdp_ring_offset {
    libc::xdp_ring_offset {
        producer: 0,
        consumer: 0,
        desc: 0,
        flags: 0,
    }
}

/// Maps `len` bytes of `ring` at page offset `offset`.
fn map_ring(
    fd: BorrowedFd<'_>,
    ring: RingKind,
    len: Option<usize>,
    offset: u64,
) -> Result<Mapping, XskError> {
    let len = len.ok_or_else(|| XskError::RingLayout {
        ring,
        reason: "the ring's size overflows".to_owned(),
    })?;
    Mapping::socket_ring(fd, len, offset).map_err(|source| XskError::RingMap { ring, source })
}
