//! The system calls of an AF_XDP socket, each wrapped in a safe function, and an owned
//! memory mapping.
//!
//! Every `unsafe` call of the AF_XDP layer except the accesses to ring slots and UMEM bytes
//! (in `ring.rs`) is here.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};

/// Creates an AF_XDP socket (close-on-exec).
pub(super) fn xdp_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes only integer arguments and has no memory effects.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2), is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Socket option values the kernel reads or writes as plain bytes: fixed layout (`repr(C)`),
/// no padding the kernel could leak into, and every bit pattern a valid value.
pub(super) trait OptionValue: Copy {}

impl OptionValue for libc::c_int {}
impl OptionValue for libc::xdp_umem_reg {}
impl OptionValue for libc::xdp_mmap_offsets {}
impl OptionValue for libc::xdp_statistics {}
impl OptionValue for libc::xdp_options {}

/// `setsockopt(fd, level, name, value)`.
pub(super) fn set_option<T: OptionValue>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = mem::size_of::<T>() as libc::socklen_t;
    let value: *const T = value;
    // SAFETY: `value` points to a live, initialized `T` of `len` bytes that the kernel only
    // reads during the call; `fd` is an open descriptor borrowed for the call.
    let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value.cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockopt(fd, level, name)` into `value`, which must come back whole: a kernel that
/// answers with fewer bytes (an older layout) is reported as `InvalidData`.
pub(super) fn get_option<T: OptionValue>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &mut T,
) -> io::Result<()> {
    let expected = mem::size_of::<T>() as libc::socklen_t;
    let mut len = expected;
    let value: *mut T = value;
    // SAFETY: `value` points to a live `T` of `len` bytes that the kernel may overwrite with
    // any bytes (every bit pattern is a valid `T`, see `OptionValue`); `len` is a live
    // socklen_t; `fd` is an open descriptor borrowed for the call.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, value.cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if len != expected {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the kernel answered with {len} bytes instead of {expected}"),
        ));
    }
    Ok(())
}

/// Binds an AF_XDP socket to queue `queue_id` of interface `ifindex` with `flags`
/// (`XDP_COPY`, `XDP_ZEROCOPY`, `XDP_USE_NEED_WAKEUP`).
pub(super) fn bind(fd: BorrowedFd<'_>, ifindex: u32, queue_id: u32, flags: u16) -> io::Result<()> {
    let addr = libc::sockaddr_xdp {
        sxdp_family: libc::AF_XDP as u16,
        sxdp_flags: flags,
        sxdp_ifindex: ifindex,
        sxdp_queue_id: queue_id,
        sxdp_shared_umem_fd: 0,
    };
    let addr_ptr: *const libc::sockaddr_xdp = &addr;
    let len = mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t;
    // SAFETY: `addr_ptr` points to a live, initialized sockaddr_xdp of `len` bytes that the
    // kernel only reads during the call; `fd` is an open descriptor borrowed for the call.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), addr_ptr.cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to process the fill ring (and, with busy polling, to poll the device):
/// an empty non-blocking `recvfrom`, as the AF_XDP wakeup protocol prescribes.
///
/// The kernel answers an AF_XDP `recvfrom` with 0 or, when it has nothing to do, with
/// `EAGAIN`/`EBUSY`/`ENETDOWN`; none of those needs handling, so the result is not returned.
pub(super) fn wake_receive(fd: BorrowedFd<'_>) {
    // SAFETY: a zero-length receive with null buffer and address pointers writes no memory;
    // `fd` is an open descriptor borrowed for the call.
    unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
}

/// Waits up to `timeout` (rounded up to whole milliseconds) for `fd` to become readable.
/// Returns `Ok(false)` on timeout and when a signal interrupted the wait.
pub(super) fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let millis = timeout.as_nanos().div_ceil(1_000_000);
    let millis = libc::c_int::try_from(millis).unwrap_or(libc::c_int::MAX);
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pollfd` is one live pollfd the kernel may update during the call; `fd` is an
    // open descriptor borrowed for the call.
    let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if rc < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(error);
    }
    Ok(rc > 0 && pollfd.revents & libc::POLLIN != 0)
}

/// A read-write memory mapping shared with the kernel, unmapped on drop.
///
/// It hands out raw pointers only, as the kernel reads and writes the memory concurrently:
/// `ring.rs` makes every access, following the rings' protocol.
#[derive(Debug)]
pub(super) struct Mapping(MmapRaw);

impl Mapping {
    /// Maps `len` bytes of zeroed, private anonymous memory (page-aligned, as mmap returns).
    pub(super) fn anonymous(len: usize) -> io::Result<Mapping> {
        let mapping = MmapOptions::new().len(len).populate().map_anon()?;
        Ok(Mapping(mapping.into()))
    }

    /// Maps `len` bytes of the socket's ring at page offset `offset` (an `XDP_PGOFF_*`
    /// constant), shared with the kernel. The kernel checks `len` and `offset` against the
    /// ring it created, and no one can truncate a ring, so the whole mapping stays backed.
    pub(super) fn socket_ring(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Mapping> {
        // mmap takes the offset as an `off_t`: one past its range is refused, not wrapped.
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mapping = MmapOptions::new()
            .len(len)
            .offset(offset)
            .populate()
            .map_raw(&fd)?;
        Ok(Mapping(mapping))
    }

    /// First byte of the mapping.
    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }

    /// Length in bytes.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}
