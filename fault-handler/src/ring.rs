//! The io_uring of a fault thread: a `Read` of the userfaultfd (messages
//! parsed by `sys`), a `Read` of the stop eventfd, and a periodic
//! `Timeout`. Reads on the non-blocking userfaultfd are armed on poll by
//! the kernel (kernel ≥ 6.10, where userfaultfd has `read_iter`).
//!
//! Buffer ownership: the kernel writes into the read buffers while their
//! operations are in flight, so they are heap memory reached only through
//! raw pointers, and their Rust views are made only after the operation's
//! completion was reaped and before it is queued again. On the way out
//! every operation is cancelled and its completion reaped; if that does not
//! finish in time, the ring and the buffers are leaked rather than freed
//! under the kernel.

use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};

use crate::sys::{self, MSG_SIZE, PageFault};

/// How often the loop reports a [`Event::Tick`].
pub const TICK: Duration = Duration::from_millis(50);
const ENTRIES: u32 = 8;
/// Userfaultfd messages read at once.
const MSGS_PER_READ: usize = 32;
const MSG_BYTES: usize = MSGS_PER_READ * MSG_SIZE;
/// How long the loop waits for cancelled operations to complete.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

const READ_FAULTS: u64 = 1;
const READ_STOP: u64 = 2;
const TIMEOUT: u64 = 3;
const CANCEL: u64 = 4;

/// What the loop hands to its caller.
#[derive(Debug)]
pub enum Event<'a> {
    /// Page faults read in one go, at `read_at`.
    Faults {
        faults: &'a [PageFault],
        read_at: Instant,
    },
    /// A [`TICK`] passed.
    Tick,
}

/// The ring of one fault thread and the memory its operations use.
pub struct FaultRing {
    ring: ManuallyDrop<IoUring>,
    /// Userfaultfd messages (see the module docs for ownership).
    msgs: *mut [u8; MSG_BYTES],
    /// The stop eventfd's counter.
    stop: *mut [u8; 8],
    /// The `Timeout` interval; the kernel reads it when the entry is
    /// submitted, which may be after `run` queued it.
    tick: *mut types::Timespec,
    /// Operations queued or submitted whose completion was not reaped.
    in_flight: usize,
}

impl std::fmt::Debug for FaultRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultRing")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

// SAFETY: the ring and the buffers are owned by this value alone; the
// kernel's access to the buffers is tied to the ring, not to a thread.
unsafe impl Send for FaultRing {}

impl FaultRing {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            ring: ManuallyDrop::new(IoUring::new(ENTRIES)?),
            msgs: Box::into_raw(Box::new([0u8; MSG_BYTES])),
            stop: Box::into_raw(Box::new([0u8; 8])),
            tick: Box::into_raw(Box::new(types::Timespec::from(TICK))),
            in_flight: 0,
        })
    }

    /// Serves events until `stop` is signalled (then `Ok`) or reading
    /// fails. Every operation is finished when this returns.
    pub fn run(
        mut self,
        uffd: &OwnedFd,
        stop: &OwnedFd,
        mut on: impl FnMut(Event<'_>),
    ) -> std::io::Result<()> {
        let result = self.serve(uffd, stop, &mut on);
        self.drain();
        result
    }

    fn read_faults(&self, uffd: &OwnedFd) -> squeue::Entry {
        opcode::Read::new(
            types::Fd(uffd.as_raw_fd()),
            self.msgs.cast(),
            MSG_BYTES as u32,
        )
        .build()
        .user_data(READ_FAULTS)
    }

    fn read_stop(&self, stop: &OwnedFd) -> squeue::Entry {
        opcode::Read::new(types::Fd(stop.as_raw_fd()), self.stop.cast(), 8)
            .build()
            .user_data(READ_STOP)
    }

    fn timeout(&self) -> squeue::Entry {
        opcode::Timeout::new(self.tick.cast_const())
            .build()
            .user_data(TIMEOUT)
    }

    fn push(&mut self, entry: &squeue::Entry) -> std::io::Result<()> {
        // SAFETY: entries name only `msgs`, `stop` and `tick`, heap memory
        // owned by `self` that is freed only once no operation is in flight
        // (`Drop`), and each buffer has at most one operation at a time:
        // `serve` queues a read again only after reaping its completion.
        unsafe { self.ring.submission().push(entry) }
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
        self.in_flight += 1;
        Ok(())
    }

    fn serve(
        &mut self,
        uffd: &OwnedFd,
        stop: &OwnedFd,
        on: &mut impl FnMut(Event<'_>),
    ) -> std::io::Result<()> {
        self.push(&self.read_faults(uffd))?;
        self.push(&self.read_stop(stop))?;
        self.push(&self.timeout())?;
        let mut faults = Vec::with_capacity(MSGS_PER_READ);
        let mut done = [(0u64, 0i32); 2 * ENTRIES as usize];
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            let mut n = 0;
            for cqe in self.ring.completion().take(done.len()) {
                done[n] = (cqe.user_data(), cqe.result());
                n += 1;
            }
            self.in_flight -= n;
            for &(what, result) in &done[..n] {
                match what {
                    READ_STOP if result == -libc::EAGAIN || result == -libc::EINTR => {
                        self.push(&self.read_stop(stop))?;
                    }
                    READ_STOP => return Ok(()),
                    READ_FAULTS => {
                        let read_at = Instant::now();
                        if let Ok(len) = usize::try_from(result) {
                            // SAFETY: this read's completion was just reaped
                            // and no read of `msgs` is queued again before
                            // the view ends below.
                            let raw = unsafe { &*self.msgs };
                            let (msgs, _) = raw[..len.min(MSG_BYTES)].as_chunks::<MSG_SIZE>();
                            faults.clear();
                            faults.extend(msgs.iter().filter_map(sys::parse_msg));
                            on(Event::Faults {
                                faults: &faults,
                                read_at,
                            });
                        } else if result != -libc::EAGAIN && result != -libc::EINTR {
                            return Err(std::io::Error::from_raw_os_error(-result));
                        }
                        self.push(&self.read_faults(uffd))?;
                    }
                    TIMEOUT => {
                        on(Event::Tick);
                        self.push(&self.timeout())?;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Cancels every operation and reaps the completions, for at most
    /// [`DRAIN_TIMEOUT`].
    fn drain(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL);
        if let Err(e) = self.push(&cancel) {
            tracing::error!("cancelling the fault ring's operations failed: {e}");
            return;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let wait = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&wait);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => {
                    tracing::error!("draining the fault ring failed: {e}");
                    return;
                }
            }
            self.in_flight -= self.ring.completion().count();
        }
    }
}

impl Drop for FaultRing {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            tracing::error!(
                in_flight = self.in_flight,
                "fault ring operations did not finish; leaking the ring and its buffers"
            );
            return;
        }
        // SAFETY: dropped once, here; no operation is in flight.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        // SAFETY: made by `Box::into_raw` in `new`, freed only here, and no
        // operation uses it any more.
        drop(unsafe { Box::from_raw(self.msgs) });
        // SAFETY: as above.
        drop(unsafe { Box::from_raw(self.stop) });
        // SAFETY: as above.
        drop(unsafe { Box::from_raw(self.tick) });
    }
}
