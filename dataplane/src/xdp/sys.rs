//! The system calls of an AF_XDP socket, each wrapped in a safe function, and an owned
//! memory mapping.
//!
//! Every `unsafe` call of the AF_XDP layer except the accesses to ring slots and UMEM bytes
//! (in `ring.rs`) is here.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::time::Duration;

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

/// A read-write memory mapping, unmapped on drop.
#[derive(Debug)]
pub(super) struct Mapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range owned by this value alone; moving the owner to
// another thread moves nothing the mapping depends on (munmap works from any thread).
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of zeroed, private anonymous memory (page-aligned, as mmap returns).
    pub(super) fn anonymous(len: usize) -> io::Result<Mapping> {
        // SAFETY: a new private anonymous mapping at an address of the kernel's choosing
        // aliases no existing memory.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        Mapping::from_mmap(addr, len)
    }

    /// Maps `len` bytes of the socket's ring at page offset `offset` (an `XDP_PGOFF_*`
    /// constant), shared with the kernel.
    pub(super) fn socket_ring(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a new shared mapping of the socket's ring at an address of the kernel's
        // choosing aliases no memory this process uses; the kernel checks `len` and `offset`
        // against the ring it created.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                offset,
            )
        };
        Mapping::from_mmap(addr, len)
    }

    fn from_mmap(addr: *mut libc::c_void, len: usize) -> io::Result<Mapping> {
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast()).ok_or_else(|| io::Error::other("mmap returned 0"))?;
        Ok(Mapping { addr, len })
    }

    /// First byte of the mapping.
    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Length in bytes.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is the mapping this value created and owns; every borrow
        // into it (ring slots, packet slices) is tied to the owner's lifetime and has ended.
        let rc = unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
        if rc < 0 {
            tracing::warn!(
                len = self.len,
                error = %io::Error::last_os_error(),
                "unmapping AF_XDP memory failed"
            );
        }
    }
}
