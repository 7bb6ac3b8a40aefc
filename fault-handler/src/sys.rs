//! The userfaultfd kernel ABI (`linux/userfaultfd.h`), written out by hand:
//! the handful of structures and ioctls this crate uses, checked against the
//! kernel's sizes at compile time. Every raw system call of the crate is here.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xaa;
const UFFDIO: u64 = 0xaa;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
const _: () = assert!(size_of::<UffdioApi>() == 24);

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
const _: () = assert!(size_of::<UffdioRange>() == 16);

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
const _: () = assert!(size_of::<UffdioRegister>() == 32);

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
const _: () = assert!(size_of::<UffdioCopy>() == 40);

/// `struct uffdio_zeropage`.
#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
const _: () = assert!(size_of::<UffdioZeropage>() == 32);

/// `struct uffd_msg`, page-fault view of its union.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct UffdMsg {
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    pub flags: u64,
    pub address: u64,
    ptid: u32,
    pad: u32,
}
pub const MSG_SIZE: usize = size_of::<UffdMsg>();
const _: () = assert!(MSG_SIZE == 32);

pub const EVENT_PAGEFAULT: u8 = 0x12;
const REGISTER_MODE_MISSING: u64 = 1;
const MODE_DONTWAKE: u64 = 1;

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3f, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioZeropage>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xaa, 0)`.
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A new userfaultfd (non-blocking, close-on-exec) that also reports faults
/// raised from kernel context, as KVM raises them: created through
/// `/dev/userfaultfd` (no `UFFD_USER_MODE_ONLY`), or the system call when the
/// device is missing. API handshake done.
pub fn open_userfaultfd() -> std::io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let fd = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and
            // returns a new descriptor or -1; `dev` is a valid open fd.
            check(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) })?
        }
        Err(_) => {
            // SAFETY: the userfaultfd system call takes its flags by value
            // and returns a new descriptor or -1.
            let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            check(rc as libc::c_int)?
        }
    };
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) })?;
    Ok(fd)
}

/// Registers `[start, start+len)` for missing-page faults.
pub fn register(fd: &OwnedFd, start: u64, len: u64) -> std::io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`; the
    // kernel checks that the range is mapped and of a supported kind.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) })?;
    Ok(())
}

/// Unregisters a range; wakes every fault waiting in it.
pub fn unregister(fd: &OwnedFd, start: u64, len: u64) -> std::io::Result<()> {
    let range = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &range) })?;
    Ok(())
}

/// Wakes the faults waiting in a range.
pub fn wake(fd: &OwnedFd, start: u64, len: u64) -> std::io::Result<()> {
    let range = UffdioRange { start, len };
    // SAFETY: UFFDIO_WAKE reads one `uffdio_range`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE as _, &range) })?;
    Ok(())
}

/// Outcome of an install.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    Done,
    /// The page was already there.
    Exists,
}

/// Copies `len` bytes from `src` into the registered range at `dst`.
///
/// # Safety
/// `src..src+len` must be readable memory of this process for the call.
pub unsafe fn copy(
    fd: &OwnedFd,
    dst: u64,
    src: *const u8,
    len: u64,
    wake: bool,
) -> std::io::Result<Installed> {
    let mut done = 0u64;
    while done < len {
        let mut op = UffdioCopy {
            dst: dst + done,
            src: src as u64 + done,
            len: len - done,
            mode: if wake { 0 } else { MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one `uffdio_copy`; the caller
        // guarantees the source is readable, and the kernel checks the
        // destination lies in a range registered on `fd`.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY as _, &mut op) };
        if rc == 0 {
            return Ok(Installed::Done);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EEXIST) => return Ok(Installed::Exists),
            Some(libc::EAGAIN) if op.copy > 0 => done += op.copy as u64,
            _ => return Err(err),
        }
    }
    Ok(Installed::Done)
}

/// Maps the zero page over `[start, start+len)` of the registered range.
pub fn zeropage(fd: &OwnedFd, start: u64, len: u64, wake: bool) -> std::io::Result<Installed> {
    let mut op = UffdioZeropage {
        range: UffdioRange { start, len },
        mode: if wake { 0 } else { MODE_DONTWAKE },
        zeropage: 0,
    };
    // SAFETY: UFFDIO_ZEROPAGE reads and writes one `uffdio_zeropage`; the
    // kernel checks the range.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut op) };
    if rc == 0 {
        return Ok(Installed::Done);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(Installed::Exists),
        _ => Err(err),
    }
}

/// A new eventfd used to stop a fault loop.
pub fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes its arguments by value and returns a new fd or -1.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Signals an eventfd.
pub fn signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
}

/// A shared read-write mapping of a new memfd of `len` bytes.
pub fn memfd_mapping(len: u64) -> std::io::Result<(OwnedFd, *mut u8)> {
    // SAFETY: the name is NUL-terminated; the result is a new fd or -1.
    let fd =
        check(unsafe { libc::memfd_create(c"snowflock-page-cache".as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: `fd` is new and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
    // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED) of our fd.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fd, ptr.cast()))
}

/// Unmaps a mapping made by [`memfd_mapping`].
///
/// # Safety
/// `ptr..ptr+len` must be such a mapping, no longer used.
pub unsafe fn unmap(ptr: *mut u8, len: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { libc::munmap(ptr.cast(), len as usize) };
}

/// Copies one page into the cache mapping.
///
/// # Safety
/// `dst..dst+data.len()` must lie in a live writable mapping of this process.
pub unsafe fn write_page(dst: *mut u8, data: &[u8]) {
    // SAFETY: guaranteed by the caller; `data` is a distinct Rust slice.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
}
