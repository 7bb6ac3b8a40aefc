//! The raw system calls of the crate: the userfaultfd ABI
//! (`linux/userfaultfd.h`) written out by hand, checked against the kernel's
//! sizes, offsets and ioctl numbers at compile time, and the few memfd,
//! mmap and eventfd calls of the page cache and the fault loop.
//!
//! Everything above this module works with page ranges and `io::Result`s;
//! no other module calls `libc` directly.

use std::mem::offset_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::PAGE_SIZE;

const UFFD_API: u64 = 0xaa;
/// The ioctl type byte of userfaultfd (`UFFDIO`) and of `/dev/userfaultfd`.
const UFFDIO: u64 = 0xaa;

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOC(dir, type, nr, size)` of `asm-generic/ioctl.h`.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

const UFFDIO_REGISTER_NR: u64 = 0x00;
const UFFDIO_UNREGISTER_NR: u64 = 0x01;
const UFFDIO_WAKE_NR: u64 = 0x02;
const UFFDIO_COPY_NR: u64 = 0x03;
const UFFDIO_ZEROPAGE_NR: u64 = 0x04;
const UFFDIO_API_NR: u64 = 0x3f;

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
    /// Bytes copied, or a negated errno.
    copy: i64,
}
const _: () = assert!(size_of::<UffdioCopy>() == 40);

/// `struct uffdio_zeropage`.
#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    /// Bytes zero-filled, or a negated errno.
    zeropage: i64,
}
const _: () = assert!(size_of::<UffdioZeropage>() == 32);

/// `struct uffd_msg` with the page-fault member of its union (the kernel
/// declares it packed; this layout has no padding, so it is the same).
/// Never read from memory directly: [`parse_msg`] decodes it from bytes.
#[repr(C)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `arg.pagefault.flags`.
    flags: u64,
    /// `arg.pagefault.address`.
    address: u64,
    /// `arg.pagefault.feat.ptid`.
    ptid: u32,
    pad: u32,
}

/// Size of one message read from a userfaultfd.
pub const MSG_SIZE: usize = size_of::<UffdMsg>();
const _: () = assert!(MSG_SIZE == 32);
const _: () = assert!(offset_of!(UffdMsg, event) == 0);
const _: () = assert!(offset_of!(UffdMsg, flags) == 8);
const _: () = assert!(offset_of!(UffdMsg, address) == 16);
const _: () = assert!(offset_of!(UffdMsg, ptid) == 24);

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_COPY_MODE_DONTWAKE` and `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
const MODE_DONTWAKE: u64 = 1 << 0;

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO_API_NR, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO_REGISTER_NR,
    size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO_UNREGISTER_NR, size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO_WAKE_NR, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO_COPY_NR,
    size_of::<UffdioCopy>(),
);
const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO_ZEROPAGE_NR,
    size_of::<UffdioZeropage>(),
);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xaa, 0)`.
const USERFAULTFD_IOC_NEW: u64 = ioc(IOC_NONE, 0x00, 0);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);

/// The range ioctls the fault handler needs on a registered range
/// (`uffdio_register.ioctls` bits).
pub const NEEDED_RANGE_IOCTLS: u64 =
    (1 << UFFDIO_WAKE_NR) | (1 << UFFDIO_COPY_NR) | (1 << UFFDIO_ZEROPAGE_NR);
/// The ioctls the handshake must offer (`uffdio_api.ioctls` bits).
pub const NEEDED_API_IOCTLS: u64 =
    (1 << UFFDIO_REGISTER_NR) | (1 << UFFDIO_UNREGISTER_NR) | (1 << UFFDIO_API_NR);

/// How often a fill retries while the kernel reports the address space in
/// flux (`EAGAIN` with no progress). Only non-cooperative events, which
/// this crate does not enable, cause that; the bound keeps a kernel
/// surprise from becoming a busy loop.
const MAX_NO_PROGRESS_RETRIES: u32 = 64;

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A page fault read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// Faulting address (page aligned: the crate does not ask for
    /// `UFFD_FEATURE_EXACT_ADDRESS`).
    pub address: u64,
    /// The access was a write.
    pub write: bool,
}

/// Decodes one message; `None` for events other than page faults (none
/// are enabled, so none should come).
pub fn parse_msg(raw: &[u8; MSG_SIZE]) -> Option<PageFault> {
    let u64_at = |offset: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&raw[offset..offset + 8]);
        u64::from_ne_bytes(word)
    };
    (raw[offset_of!(UffdMsg, event)] == UFFD_EVENT_PAGEFAULT).then(|| PageFault {
        address: u64_at(offset_of!(UffdMsg, address)),
        write: u64_at(offset_of!(UffdMsg, flags)) & UFFD_PAGEFAULT_FLAG_WRITE != 0,
    })
}

/// A new userfaultfd (non-blocking, close-on-exec) that also reports faults
/// raised from kernel context, as KVM raises them: made through
/// `/dev/userfaultfd` (without `UFFD_USER_MODE_ONLY`), or with the system
/// call when the device cannot be used. The handshake is not done yet.
pub fn open_userfaultfd() -> std::io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd");
    let from_device = device.and_then(|dev| {
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a
        // new descriptor or -1; `dev` is an open fd for the call's duration.
        check(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) })
    });
    let fd = match from_device {
        Ok(fd) => fd,
        Err(device_error) => {
            tracing::debug!(%device_error, "/dev/userfaultfd unusable, using the system call");
            // SAFETY: the userfaultfd system call takes its flags by value
            // and returns a new descriptor or -1.
            let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            check(rc as libc::c_int)?
        }
    };
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `UFFDIO_API` handshake with no optional features; returns the
/// ioctls the kernel offers (`uffdio_api.ioctls`).
pub fn api_handshake(uffd: &OwnedFd) -> std::io::Result<u64> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is,
    // live for the call.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &raw mut api) })?;
    Ok(api.ioctls)
}

/// Registers `[start, start + len)` for missing-page faults; returns the
/// ioctls the kernel allows on the range (`uffdio_register.ioctls`).
pub fn register(uffd: &OwnedFd, start: u64, len: u64) -> std::io::Result<u64> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`, live
    // for the call; the kernel checks that the range is mapped memory of a
    // kind it supports. Registering changes no memory contents.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &raw mut reg) })?;
    Ok(reg.ioctls)
}

/// Unregisters a range, which wakes every fault waiting in it. The kernel
/// unregisters whatever userfaultfd the range's mappings belong to, so the
/// caller must know the range is still its own.
pub fn unregister(uffd: &OwnedFd, start: u64, len: u64) -> std::io::Result<()> {
    let range = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`, live for the call.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, &raw const range) })?;
    Ok(())
}

/// Replaces the mapping at `[start, start + len)` with fresh private
/// anonymous memory in one step (`MAP_FIXED`), so nothing reaches the file
/// mapped there before through this range any more; the new mapping is not
/// registered with any userfaultfd, and faults waiting in the old one retry
/// on it (reading zeros).
///
/// # Safety
/// The range must be a mapping of this process that its owner has handed
/// over for this: no Rust reference points into it, and its owner only
/// unmaps it afterwards.
pub unsafe fn replace_with_anonymous(start: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: MAP_FIXED over the range our caller vouches for; no other
    // mapping is affected.
    let ptr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Wakes the faults of this userfaultfd waiting in a range.
pub fn wake(uffd: &OwnedFd, start: u64, len: u64) -> std::io::Result<()> {
    let range = UffdioRange { start, len };
    // SAFETY: UFFDIO_WAKE reads one `uffdio_range`, live for the call; it
    // only wakes threads waiting on this userfaultfd.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE as _, &raw const range) })?;
    Ok(())
}

/// What a fill puts into the missing pages of a range.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// Bytes copied from `src`, which maps onto the range byte for byte.
    Copy { src: *const u8 },
    /// The shared zero page, mapped read-only (a write later gets a private
    /// page from the kernel without a userfault).
    Zero,
}

/// One `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` call: the bytes done, and the
/// errno if it stopped short (0 if not).
///
/// # Safety
/// As for [`fill_range`].
unsafe fn fill_once(uffd: &OwnedFd, fill: Fill, dst: u64, len: u64, dontwake: bool) -> (u64, i32) {
    let mode = if dontwake { MODE_DONTWAKE } else { 0 };
    let (rc, done) = match fill {
        Fill::Copy { src } => {
            let mut op = UffdioCopy {
                dst,
                src: src as u64,
                len,
                mode,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes one `uffdio_copy`, live
            // for the call. It reads `len` bytes at `src`, which our caller
            // guarantees are readable, and writes only missing pages of a
            // registered range (the kernel checks that), which our caller
            // guarantees is its own.
            let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &raw mut op) };
            (rc, op.copy)
        }
        Fill::Zero => {
            let mut op = UffdioZeropage {
                range: UffdioRange { start: dst, len },
                mode,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes one `uffdio_zeropage`,
            // live for the call; it maps the zero page into missing pages of
            // a registered range only, which our caller guarantees is its own.
            let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &raw mut op) };
            (rc, op.zeropage)
        }
    };
    if rc == 0 {
        return (len, 0);
    }
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    (u64::try_from(done).unwrap_or(0), errno)
}

/// Fills the missing pages of `[dst, dst + len)` (whole pages), resuming
/// after partial progress (`EAGAIN`) and skipping pages already present
/// (`EEXIST`). Returns how many pages were already present. With
/// `dontwake`, no waiting fault is woken; otherwise the faults in each
/// filled piece are.
///
/// # Safety
/// For [`Fill::Copy`], `src..src + len` must be readable memory of this
/// process for the call. The range must belong to a registration of this
/// process that the caller owns (the kernel fills any registered range of
/// the process, whichever userfaultfd registered it).
pub unsafe fn fill_range(
    uffd: &OwnedFd,
    fill: Fill,
    dst: u64,
    len: u64,
    dontwake: bool,
) -> std::io::Result<u64> {
    let mut offset = 0u64;
    let mut present = 0u64;
    let mut stalls = 0u32;
    while offset < len {
        let piece = match fill {
            Fill::Copy { src } => Fill::Copy {
                src: src.wrapping_add(offset as usize),
            },
            Fill::Zero => Fill::Zero,
        };
        // SAFETY: `piece` and `dst + offset..dst + len` are the tail of the
        // source and range our caller vouches for.
        let (done, errno) = unsafe { fill_once(uffd, piece, dst + offset, len - offset, dontwake) };
        // Progress is whole pages; round down in case the kernel ever says
        // otherwise, so the next call starts on a page boundary.
        let done = done.min(len - offset) / PAGE_SIZE * PAGE_SIZE;
        offset += done;
        match errno {
            0 => {}
            libc::EAGAIN if done > 0 => stalls = 0,
            libc::EAGAIN if stalls < MAX_NO_PROGRESS_RETRIES => {
                stalls += 1;
                std::thread::yield_now();
            }
            libc::EEXIST if done == 0 => {
                present += 1;
                offset += PAGE_SIZE;
            }
            // A page present after some progress: the next call reports
            // EEXIST for it with no progress.
            libc::EEXIST => {}
            _ => return Err(std::io::Error::from_raw_os_error(errno)),
        }
    }
    Ok(present)
}

/// Bytes in [`zero_source`].
pub const ZERO_SOURCE_LEN: u64 = 64 * PAGE_SIZE;

/// A process-wide read-only mapping of [`ZERO_SOURCE_LEN`] zero bytes, to
/// copy zeros from with `UFFDIO_COPY` (which, unlike `UFFDIO_ZEROPAGE`,
/// leaves writable pages). Never written, so it stays backed by the
/// kernel's zero page and costs no memory. `None` if it cannot be mapped.
pub fn zero_source() -> Option<*const u8> {
    static ZEROS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let addr = ZEROS.get_or_init(|| {
        // SAFETY: a new read-only anonymous mapping at an address the
        // kernel picks; it is never unmapped, so pointers into it stay
        // valid for the life of the process.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ZERO_SOURCE_LEN as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "mapping a zero source failed; zero-filling with UFFDIO_ZEROPAGE only"
            );
            return None;
        }
        Some(ptr as usize)
    });
    addr.map(|a| a as *const u8)
}

/// A new non-blocking eventfd, used to stop a fault loop.
pub fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes its arguments by value and returns a new fd or -1.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter.
pub fn signal(eventfd: &OwnedFd) -> std::io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of a live u64 to an eventfd we own.
    let rc = unsafe { libc::write(eventfd.as_raw_fd(), (&raw const one).cast(), 8) };
    if rc == 8 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A new memfd of `len` bytes (all holes), closed on exec.
pub fn memfd(name: &std::ffi::CStr, len: u64) -> std::io::Result<OwnedFd> {
    let size =
        libc::off_t::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: `name` is NUL-terminated; the result is a new fd or -1.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: `fd` is new and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a memfd we own; nothing maps it yet.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?;
    Ok(fd)
}

/// `MADV_COLLAPSE` (`linux/mman.h`; the libc crate may not name it).
const MADV_COLLAPSE: libc::c_int = 25;
/// Huge page size and alignment of [`SharedView`] blocks.
pub const HUGE_BLOCK: u64 = 2 << 20;

/// A read-only `MAP_SHARED` mapping of a whole memfd at a 2 MiB-aligned
/// address, so that each 2 MiB block of the file is a 2 MiB-aligned range
/// of the mapping. Never read through: reading a hole of a shared memfd
/// mapping would allocate a zero page in the file. It exists to name
/// blocks to [`SharedView::collapse`].
#[derive(Debug)]
pub struct SharedView {
    /// Start of the whole reservation (for `munmap`).
    reserved: *mut libc::c_void,
    reserved_len: usize,
    /// The aligned start of the file's mapping.
    start: usize,
    len: u64,
}

// SAFETY: the view is an address range only; nothing dereferences it, and
// `madvise`/`munmap` on it are safe from any thread.
unsafe impl Send for SharedView {}
// SAFETY: as above: `collapse` takes `&self` and only passes the range to
// the kernel.
unsafe impl Sync for SharedView {}

impl SharedView {
    pub fn new(fd: &OwnedFd, len: u64) -> std::io::Result<Self> {
        let reserved_len = usize::try_from(len + HUGE_BLOCK)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: no address hint and no MAP_FIXED: the kernel picks a free
        // range, so no existing mapping is affected.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserved == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let view = Self {
            reserved,
            reserved_len,
            start: (reserved as usize).next_multiple_of(HUGE_BLOCK as usize),
            len,
        };
        // SAFETY: the target lies inside the reservation made above, which
        // this view owns and nothing references; MAP_FIXED replaces part of
        // it with the file, read-only and shared (no copy-on-write pages).
        let mapped = unsafe {
            libc::mmap(
                view.start as *mut libc::c_void,
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(view)
    }

    /// Asks the kernel to hold 2 MiB block `block` of the file in one huge
    /// page (`MADV_COLLAPSE`). Only for a block whose every page is in the
    /// file: the kernel fills the holes of a collapsed block with zeros.
    pub fn collapse(&self, block: u64) -> std::io::Result<()> {
        let offset = block * HUGE_BLOCK;
        if offset + HUGE_BLOCK > self.len {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the block lies inside this view's mapping of the file;
        // the advice changes how the file's pages are held, never their
        // contents (every page of the block is present: see above).
        check(unsafe {
            libc::madvise(
                (self.start + offset as usize) as *mut libc::c_void,
                HUGE_BLOCK as usize,
                MADV_COLLAPSE,
            )
        })
        .map(|_| ())
    }
}

impl Drop for SharedView {
    fn drop(&mut self) {
        // SAFETY: the reservation (with the file's mapping inside it) was
        // made by `new` and is owned by this view alone.
        unsafe { libc::munmap(self.reserved, self.reserved_len) };
    }
}

/// Writes `parts`, back to back, at `offset` of `fd` with `pwritev`,
/// until all is written. The kernel copies straight from the parts.
pub fn write_parts_at(fd: &OwnedFd, parts: &[&[u8]], offset: u64) -> std::io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        let mut skip = done;
        let iov: Vec<libc::iovec> = parts
            .iter()
            .filter_map(|part| {
                if skip >= part.len() {
                    skip -= part.len();
                    return None;
                }
                let rest = &part[skip..];
                skip = 0;
                Some(libc::iovec {
                    iov_base: rest.as_ptr().cast_mut().cast(),
                    iov_len: rest.len(),
                })
            })
            .collect();
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into a live borrowed slice (the kernel
        // only reads them); `fd` is an open file we own.
        let written = unsafe { libc::pwritev(fd.as_raw_fd(), iov.as_ptr(), count, at) };
        match written {
            n if n > 0 => done += n as usize,
            0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset` of `fd` (holes read as zeros).
pub fn read_exact_at(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd.try_clone()?);
    file.read_exact_at(buf, offset)
}

#[cfg(test)]
mod tests {
    use memmap2::{MmapOptions, MmapRaw};

    use super::*;

    /// Four untouched private anonymous pages, unmapped on drop. Raw
    /// pointers only: the kernel installs the pages behind our back.
    struct Pages(MmapRaw);

    impl Pages {
        const LEN: u64 = 4 * PAGE_SIZE;

        fn new() -> Self {
            let map = MmapOptions::new().len(Self::LEN as usize).map_anon();
            Self(map.expect("mapping four pages").into())
        }

        /// The first byte of each page; only call once all are filled.
        fn first_bytes(&self) -> Vec<u8> {
            (0..4)
                .map(|p| {
                    // SAFETY: inside the mapping, and filled (no fault).
                    unsafe {
                        self.0
                            .as_ptr()
                            .wrapping_add((p * PAGE_SIZE) as usize)
                            .read_volatile()
                    }
                })
                .collect()
        }
    }

    #[test]
    fn fills_resume_after_partial_progress_and_skip_present_pages() {
        let pages = Pages::new();
        let base = pages.0.as_ptr() as u64;
        let uffd = open_userfaultfd().unwrap();
        assert_eq!(
            api_handshake(&uffd).unwrap() & NEEDED_API_IOCTLS,
            NEEDED_API_IOCTLS
        );
        let offered = register(&uffd, base, Pages::LEN).unwrap();
        assert_eq!(offered & NEEDED_RANGE_IOCTLS, NEEDED_RANGE_IOCTLS);
        let first = vec![1u8; PAGE_SIZE as usize];
        let second = vec![2u8; Pages::LEN as usize];
        // SAFETY: the sources are live buffers of the copied lengths; the
        // range is our own registration.
        let present = unsafe {
            fill_range(
                &uffd,
                Fill::Copy {
                    src: first.as_ptr(),
                },
                base + PAGE_SIZE,
                PAGE_SIZE,
                true,
            )
        };
        assert_eq!(present.unwrap(), 0);
        // Page 0 is copied, page 1 is there (EAGAIN after one page, then
        // EEXIST), pages 2 and 3 are copied.
        // SAFETY: as above.
        let present = unsafe {
            fill_range(
                &uffd,
                Fill::Copy {
                    src: second.as_ptr(),
                },
                base,
                Pages::LEN,
                true,
            )
        };
        assert_eq!(present.unwrap(), 1);
        assert_eq!(pages.first_bytes(), [2, 1, 2, 2]);
        // SAFETY: as above.
        let present = unsafe { fill_range(&uffd, Fill::Zero, base, Pages::LEN, false) };
        assert_eq!(present.unwrap(), 4);
        wake(&uffd, base, Pages::LEN).unwrap();
        unregister(&uffd, base, Pages::LEN).unwrap();
        // Outside any registration the kernel refuses.
        // SAFETY: as above.
        let refused = unsafe { fill_range(&uffd, Fill::Zero, base, PAGE_SIZE, true) };
        assert!(refused.is_err());
    }

    #[test]
    fn the_zero_source_reads_as_zeros() {
        let src = zero_source().expect("mapping a zero source");
        // SAFETY: the zero source is ZERO_SOURCE_LEN readable bytes, never
        // unmapped.
        let bytes = unsafe { std::slice::from_raw_parts(src, ZERO_SOURCE_LEN as usize) };
        assert!(bytes.iter().all(|&b| b == 0));
        assert_eq!(zero_source(), Some(src));
    }

    #[test]
    fn page_fault_messages_are_decoded_and_others_skipped() {
        let mut raw = [0u8; MSG_SIZE];
        raw[0] = UFFD_EVENT_PAGEFAULT;
        raw[8..16].copy_from_slice(&UFFD_PAGEFAULT_FLAG_WRITE.to_ne_bytes());
        raw[16..24].copy_from_slice(&0x7f00_1234_5000u64.to_ne_bytes());
        assert_eq!(
            parse_msg(&raw),
            Some(PageFault {
                address: 0x7f00_1234_5000,
                write: true
            })
        );
        raw[8..16].fill(0);
        assert_eq!(parse_msg(&raw).map(|f| f.write), Some(false));
        // UFFD_EVENT_UNMAP and a garbage event byte.
        for event in [0x16, 0xff] {
            raw[0] = event;
            assert_eq!(parse_msg(&raw), None);
        }
    }
}
