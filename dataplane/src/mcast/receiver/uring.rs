//! The receiver's kernel-socket path: one thread running an io_uring loop.
//!
//! A multishot receive (`RecvMulti`) on the UDP socket takes its buffers from a provided-buffer
//! ring of [`BUFFER_COUNT`] buffers; every datagram completed since the last wait is handed to
//! the [`ReceiverCore`] as one batch, and the buffers go back to the ring right after. A read
//! on an eventfd wakes the loop (for an earlier timer, or to stop), and the wait's own timeout
//! is the core's next deadline.
//!
//! On stop the loop cancels its pending operations and waits for their last completions
//! before the ring and the buffers are freed, so the kernel never writes into freed memory.

use std::alloc::{self, Layout};
use std::io;
use std::mem::{offset_of, size_of};
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, types};

use super::receiver_core::ReceiverCore;
use crate::mcast::sys::EventFd;
use crate::mcast::wire::MAX_DATAGRAM_LEN;
use crate::sync::Never;

/// Receive buffers in the ring (a power of two).
pub(crate) const BUFFER_COUNT: u16 = 256;
/// Bytes per receive buffer: room for the largest mcdist datagram and one byte more, so a
/// longer (invalid) datagram shows up as filling the buffer.
const BUFFER_LEN: usize = (MAX_DATAGRAM_LEN + 1).next_multiple_of(64);
/// Submission queue entries (a few operations are ever pending).
const RING_ENTRIES: u32 = 16;
/// Completion queue entries: room for a completion per receive buffer and then some, so a
/// burst never overflows it (which would end the multishot receive).
const COMPLETION_ENTRIES: u32 = 2 * BUFFER_COUNT as u32;
/// The buffer group id of the provided-buffer ring.
const BUFFER_GROUP: u16 = 0x5f;
/// How long stopping waits for the kernel to finish the cancelled operations.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive receive errors after which the loop pauses before re-arming.
const ERROR_BURST: u32 = 8;
/// The pause.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

const RECV: u64 = 1;
const WAKE: u64 = 2;
const CANCEL: u64 = 3;

/// Counters of the socket path itself (the core counts the rest).
#[derive(Debug, Default)]
pub(crate) struct PathCounters {
    pub(crate) truncated: AtomicU64,
    pub(crate) receive_errors: AtomicU64,
    pub(crate) buffers_exhausted: AtomicU64,
}

/// The kernel's `struct io_uring_buf`: one entry of a provided-buffer ring. The `resv` field of
/// entry 0 is the ring's tail.
#[repr(C)]
struct RingEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// A provided-buffer ring and its buffers, in memory of their own.
struct BufferRing {
    entries: NonNull<RingEntry>,
    buffers: NonNull<u8>,
    /// The tail as this side has advanced it (published with [`BufferRing::publish`]).
    tail: u16,
}

fn entries_layout() -> Layout {
    // The kernel wants the ring page-aligned.
    Layout::from_size_align(usize::from(BUFFER_COUNT) * size_of::<RingEntry>(), 4096)
        .expect("a small power-of-two layout")
}

fn buffers_layout() -> Layout {
    Layout::from_size_align(usize::from(BUFFER_COUNT) * BUFFER_LEN, 4096)
        .expect("a small power-of-two layout")
}

impl BufferRing {
    fn new() -> io::Result<BufferRing> {
        // SAFETY: the layout has a non-zero size.
        let entries = unsafe { alloc::alloc_zeroed(entries_layout()) };
        let Some(entries) = NonNull::new(entries.cast::<RingEntry>()) else {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        // SAFETY: the layout has a non-zero size.
        let buffers = unsafe { alloc::alloc_zeroed(buffers_layout()) };
        let Some(buffers) = NonNull::new(buffers) else {
            // SAFETY: `entries` was allocated just above with this layout and is not used
            // after this.
            unsafe { alloc::dealloc(entries.as_ptr().cast(), entries_layout()) };
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        let mut ring = BufferRing {
            entries,
            buffers,
            tail: 0,
        };
        for bid in 0..BUFFER_COUNT {
            ring.provide(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Puts buffer `bid` at the (unpublished) tail.
    fn provide(&mut self, bid: u16) {
        let index = usize::from(self.tail & (BUFFER_COUNT - 1));
        let entry = self.entries.as_ptr().wrapping_add(index).cast::<u8>();
        let addr = self
            .buffers
            .as_ptr()
            .wrapping_add(usize::from(bid) * BUFFER_LEN) as u64;
        // The fields are written one by one: `resv` of entry 0 is the tail, which the kernel
        // reads concurrently and only `publish` writes.
        let addr_field = entry
            .wrapping_add(offset_of!(RingEntry, addr))
            .cast::<u64>();
        let len_field = entry.wrapping_add(offset_of!(RingEntry, len)).cast::<u32>();
        let bid_field = entry.wrapping_add(offset_of!(RingEntry, bid)).cast::<u16>();
        // SAFETY: `index < BUFFER_COUNT`, so the field lies inside the entries allocation and
        // is aligned (entries are 16-byte `repr(C)` structs in a page-aligned block). The
        // kernel does not read entries past the published tail, and this one is past it.
        unsafe { addr_field.write(addr) };
        // SAFETY: as above.
        unsafe { len_field.write(BUFFER_LEN as u32) };
        // SAFETY: as above.
        unsafe { bid_field.write(bid) };
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries provided so far visible to the kernel.
    fn publish(&self) {
        let tail = self
            .entries
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(offset_of!(RingEntry, resv))
            .cast::<u16>();
        // SAFETY: `tail` points to the aligned `resv` field of entry 0, inside the entries
        // allocation, which lives as long as `self`; the kernel only reads it, and every
        // access from this side goes through atomics.
        let tail = unsafe { AtomicU16::from_ptr(tail) };
        tail.store(self.tail, Ordering::Release);
    }

    /// The bytes the kernel received into each buffer of `received` (`(bid, len)`),
    /// writable: FRAGMENTs are decrypted where they lie. A buffer listed twice is handed out
    /// once.
    fn datagrams(&mut self, received: &[(u16, usize)]) -> Vec<&mut [u8]> {
        let mut seen = [0u64; BUFFER_COUNT.div_ceil(64) as usize];
        let mut datagrams = Vec::with_capacity(received.len());
        for &(bid, len) in received {
            let bid = usize::from(bid % BUFFER_COUNT);
            let (word, bit) = (bid / 64, 1u64 << (bid % 64));
            if seen[word] & bit != 0 {
                continue;
            }
            seen[word] |= bit;
            let start = self.buffers.as_ptr().wrapping_add(bid * BUFFER_LEN);
            // SAFETY: the buffer lies inside the buffers allocation (`bid < BUFFER_COUNT`,
            // `len <= BUFFER_LEN`) and no other slice handed out here covers it (`seen`); the
            // kernel completed a receive into it and writes it again only after it is
            // provided anew, which needs `&mut self` and so waits until the returned slices,
            // which borrow `self` mutably, are dropped.
            datagrams.push(unsafe { std::slice::from_raw_parts_mut(start, len.min(BUFFER_LEN)) });
        }
        datagrams
    }

    fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the entries allocation holds BUFFER_COUNT entries and stays valid until
        // `self` is dropped, which happens only after the buffer group was unregistered or
        // the ring was destroyed (see `run`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.entries.as_ptr() as u64,
                BUFFER_COUNT,
                BUFFER_GROUP,
                0,
            )
        }
    }
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the kernel no longer uses it (see
        // `register`).
        unsafe { alloc::dealloc(self.entries.as_ptr().cast(), entries_layout()) };
        // SAFETY: as above.
        unsafe { alloc::dealloc(self.buffers.as_ptr(), buffers_layout()) };
    }
}

/// What the loop thread needs.
pub(crate) struct SocketLoop {
    pub(crate) socket: Arc<UdpSocket>,
    pub(crate) wake: Arc<EventFd>,
    pub(crate) core: Arc<ReceiverCore>,
    pub(crate) counters: Arc<PathCounters>,
    pub(crate) stopping: Arc<AtomicBool>,
}

/// Starts the loop thread; returns once its ring is set up (or why that failed).
pub(crate) fn spawn(parts: SocketLoop, alive: Sender<Never>) -> io::Result<JoinHandle<()>> {
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let handle = thread::Builder::new()
        .name("sf-mcast-recv".into())
        .spawn(move || {
            let _alive = alive;
            let setup = IoUring::builder()
                .setup_cqsize(COMPLETION_ENTRIES)
                .build(RING_ENTRIES)
                .and_then(|ring| {
                    let buffers = BufferRing::new()?;
                    buffers.register(&ring)?;
                    Ok((ring, buffers))
                });
            match setup {
                Ok((ring, buffers)) => {
                    let _ = ready_tx.send(Ok(()));
                    run(ring, buffers, &parts);
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                }
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(error)) => {
            let _ = handle.join();
            Err(error)
        }
        Err(_) => {
            let _ = handle.join();
            Err(io::Error::other("the receive thread ended during setup"))
        }
    }
}

/// What the receive's completions gave since the loop last handed datagrams to the core.
struct Harvest {
    /// Buffers holding a datagram, and its length.
    received: Vec<(u16, usize)>,
    /// Buffers to give back to the ring.
    returned: Vec<u16>,
    /// Receive errors since the last success.
    errors_in_a_row: u32,
}

/// Pending operations of the loop.
#[derive(Default)]
struct Armed {
    recv: bool,
    wake: bool,
}

fn push(ring: &mut IoUring, entry: &io_uring::squeue::Entry) -> bool {
    // SAFETY: every entry pushed here refers only to the socket and eventfd (kept open by
    // `SocketLoop` until the loop ends), the provided-buffer ring (registered and alive until
    // after the final completions), and `wake_buf` (alive until after its read completed or
    // was cancelled; see `run` and `release`).
    unsafe { ring.submission().push(entry).is_ok() }
}

/// The loop: runs until `stopping` is set and the eventfd signalled.
fn run(mut ring: IoUring, mut buffers: BufferRing, parts: &SocketLoop) {
    let socket_fd = types::Fd(parts.socket.as_raw_fd());
    let wake_fd = types::Fd(parts.wake.as_fd().as_raw_fd());
    let mut wake_buf = Box::new([0u8; 8]);
    let recv = opcode::RecvMulti::new(socket_fd, BUFFER_GROUP)
        .build()
        .user_data(RECV);
    let wake_read = opcode::Read::new(wake_fd, wake_buf.as_mut_ptr(), 8)
        .build()
        .user_data(WAKE);
    let mut armed = Armed::default();
    let mut harvest = Harvest {
        received: Vec::with_capacity(usize::from(BUFFER_COUNT)),
        returned: Vec::with_capacity(usize::from(BUFFER_COUNT)),
        errors_in_a_row: 0,
    };
    let mut deadline = parts.core.tick();
    while !parts.stopping.load(Ordering::SeqCst) {
        if !armed.recv {
            if harvest.errors_in_a_row >= ERROR_BURST {
                thread::sleep(ERROR_PAUSE);
                harvest.errors_in_a_row = 0;
            }
            armed.recv = push(&mut ring, &recv);
        }
        if !armed.wake {
            armed.wake = push(&mut ring, &wake_read);
        }
        let wait = types::Timespec::from(deadline.saturating_duration_since(Instant::now()));
        let args = types::SubmitArgs::new().timespec(&wait);
        if let Err(error) = ring.submitter().submit_with_args(1, &args) {
            match error.raw_os_error() {
                Some(libc::ETIME | libc::EINTR | libc::EBUSY) => {}
                _ => {
                    tracing::warn!(%error, "mcdist receive loop: io_uring_enter failed");
                    thread::sleep(ERROR_PAUSE);
                }
            }
        }
        let mut woken = false;
        for cqe in ring.completion() {
            match cqe.user_data() {
                RECV => on_receive(&cqe, &parts.counters, &mut armed, &mut harvest),
                WAKE => {
                    armed.wake = false;
                    woken = true;
                }
                _ => {}
            }
        }
        if !harvest.received.is_empty() {
            parts
                .core
                .on_datagrams(buffers.datagrams(&harvest.received));
            harvest
                .returned
                .extend(harvest.received.drain(..).map(|(bid, _)| bid));
        }
        if !harvest.returned.is_empty() {
            for bid in harvest.returned.drain(..) {
                buffers.provide(bid);
            }
            buffers.publish();
        }
        if woken || Instant::now() >= deadline {
            deadline = parts.core.tick();
        }
    }
    release(ring, buffers, wake_buf, armed);
}

/// Takes one completion of the multishot receive: the datagram's buffer goes to
/// `harvest.received`, or straight back if the datagram was too long; errors are counted.
fn on_receive(
    cqe: &cqueue::Entry,
    counters: &PathCounters,
    armed: &mut Armed,
    harvest: &mut Harvest,
) {
    let flags = cqe.flags();
    if !cqueue::more(flags) {
        armed.recv = false;
    }
    let result = cqe.result();
    if let Some(bid) = cqueue::buffer_select(flags) {
        let len = usize::try_from(result).unwrap_or(0);
        if len > MAX_DATAGRAM_LEN {
            counters.truncated.fetch_add(1, Ordering::Relaxed);
            harvest.returned.push(bid);
        } else {
            harvest.received.push((bid, len));
        }
    }
    if result >= 0 {
        harvest.errors_in_a_row = 0;
    } else if result == -libc::ENOBUFS {
        counters.buffers_exhausted.fetch_add(1, Ordering::Relaxed);
    } else if result != -libc::ECANCELED {
        harvest.errors_in_a_row += 1;
        counters.receive_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            error = %io::Error::from_raw_os_error(-result),
            "mcdist receive failed"
        );
    }
}

/// Ends the loop's operations, then frees the ring, the receive buffers and `wake_buf`; if
/// some operation is still pending after [`CANCEL_TIMEOUT`], leaks the memory the kernel may
/// still write into instead.
fn release(mut ring: IoUring, buffers: BufferRing, wake_buf: Box<[u8; 8]>, mut armed: Armed) {
    if cancel_all(&mut ring, &mut armed) {
        if let Err(error) = ring.submitter().unregister_buf_ring(BUFFER_GROUP) {
            tracing::debug!(%error, "unregistering the mcdist receive buffers");
        }
        drop(ring);
        drop(buffers);
        drop(wake_buf);
    } else {
        tracing::error!(
            "mcdist receive operations still pending after {CANCEL_TIMEOUT:?}; \
             leaking their buffers"
        );
        drop(ring);
        std::mem::forget(buffers);
        std::mem::forget(wake_buf);
    }
}

/// Cancels the pending operations and waits for their final completions; returns whether
/// none is left.
fn cancel_all(ring: &mut IoUring, armed: &mut Armed) -> bool {
    for (pending, user_data) in [(armed.recv, RECV), (armed.wake, WAKE)] {
        if pending {
            let cancel = opcode::AsyncCancel::new(user_data)
                .build()
                .user_data(CANCEL);
            push(ring, &cancel);
        }
    }
    let deadline = Instant::now() + CANCEL_TIMEOUT;
    while armed.recv || armed.wake {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let wait = types::Timespec::from(left);
        let args = types::SubmitArgs::new().timespec(&wait);
        let _ = ring.submitter().submit_with_args(1, &args);
        for cqe in ring.completion() {
            match cqe.user_data() {
                RECV if !cqueue::more(cqe.flags()) => armed.recv = false,
                WAKE => armed.wake = false,
                _ => {}
            }
        }
    }
    true
}
