//! Guest memory: memfd-backed, frozen into immutable images at clone time.
//!
//! A VM starts on a shared mapping of a fresh memfd. Freezing it for a clone
//! turns the memory into a [`MemoryImage`]: a stack of memfd *layers*, each
//! covering some pages, that nobody writes again. The parent and every child
//! then run on private (`MAP_PRIVATE`, copy-on-write) views of the image, so
//! later writes by any of them are invisible to the others. A second freeze
//! of a VM that already runs on an image copies only the pages it dirtied
//! since (found through `/proc/self/pagemap`) into a new top layer.
//!
//! Memory may ask for huge host pages ([`HostPages::Huge`]): its mappings
//! are advised `MADV_HUGEPAGE`, so the memfd is filled in 2 MiB folios where
//! the kernel's shmem THP policy allows it, and a guest first touch maps
//! 2 MiB at once in the hypervisor. An image keeps the choice of the memory
//! it was frozen from, so every view of it is advised the same way.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::populate::{Populator, ViewLease};

/// Guest page size.
pub const PAGE_SIZE: u64 = snowflock_abi::PAGE_SIZE;
/// More mapped runs than this across an image's layers and the next freeze
/// flattens the image into one layer, to stay far below `vm.max_map_count`.
const MAX_LAYER_RUNS: usize = 4096;

/// A failed guest memory operation.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {size:#x} is not a positive multiple of {PAGE_SIZE}")]
    BadSize { size: u64 },
    #[error("creating the memfd failed")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the memfd to {size:#x} bytes failed")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping {len:#x} bytes of guest memory failed")]
    Map {
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory ({size:#x} bytes)")]
    OutOfRange { addr: u64, len: u64, size: u64 },
    #[error("moving the pages of guest memory out of the way failed")]
    Move(#[source] std::io::Error),
    #[error("reading the page map of guest memory failed")]
    PageMap(#[source] std::io::Error),
    #[error("copying dirty pages into a new layer failed")]
    CopyLayer(#[source] std::io::Error),
    #[error("copying an image's pages into memory of its own failed")]
    CopyImage(#[source] std::io::Error),
    #[error("advising guest memory to use huge pages failed")]
    Advise(#[source] std::io::Error),
    #[error("finding the data pages of a layer failed")]
    SeekData(#[source] std::io::Error),
    #[error("hollow memory (filled on demand from another host) cannot be frozen")]
    FreezeHollow,
    #[error("the host page cache of hollow memory is {cache:#x} bytes, the memory {size:#x}")]
    CacheSize { cache: u64, size: u64 },
    #[error("inspecting the host page cache of hollow memory failed")]
    Cache(#[source] std::io::Error),
}

/// The host pages that back guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostPages {
    /// 4 KiB pages.
    #[default]
    Base,
    /// 2 MiB transparent huge pages where the kernel allows them (see
    /// [`huge_pages_available`]), 4 KiB pages elsewhere. A page written
    /// anywhere in 2 MiB makes all of it data, so an image's data pages
    /// (and with them descriptors and populates) come in 2 MiB runs.
    Huge,
}

/// How a VM restored from an image holds its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoredMemory {
    /// A private copy-on-write view of the image ([`GuestMemory::from_image_in`]):
    /// no memory of its own until it writes, but under PVM every first
    /// write costs a hypervisor exit, a host copy-on-write fault and, on huge
    /// pages, the split of the 2 MiB mapping around it.
    View,
    /// Memory of its own holding a copy of the image's data pages
    /// ([`GuestMemory::copy_of_image_in`]), made before the VM first runs:
    /// its writes fault nothing and, on huge pages, every first touch maps
    /// 2 MiB.
    Copy,
}

/// Where the kernel's policy for huge pages in memfds is set: the global
/// setting, and the 2 MiB size's own, which may defer to it (`inherit`).
const SHMEM_THP_POLICY: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
const SHMEM_THP_2M_POLICY: &str =
    "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled";

/// Whether memfd memory advised `MADV_HUGEPAGE` gets 2 MiB pages on this
/// host: the kernel's shmem THP policy (chosen by root) is `advise`,
/// `within_size`, `always` or `force`, not `never` or `deny`.
pub fn huge_pages_available() -> bool {
    let selected = |path: &str| {
        let text = std::fs::read_to_string(path).ok()?;
        let start = text.find('[')? + 1;
        let end = start + text[start..].find(']')?;
        Some(text[start..end].to_string())
    };
    let grants = |policy: &str| matches!(policy, "advise" | "within_size" | "always" | "force");
    match selected(SHMEM_THP_2M_POLICY).as_deref() {
        Some("inherit") | None => selected(SHMEM_THP_POLICY).is_some_and(|p| grants(&p)),
        Some(policy) => grants(policy),
    }
}

/// A sorted list of disjoint page runs `(first_page, count)`; the compact
/// form of a page bitmap used in descriptors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRuns(Vec<(u64, u64)>);

impl PageRuns {
    /// Runs covering every set bit of `bits`.
    pub fn from_bitmap(bits: &PageBitmap) -> Self {
        let mut runs = Vec::new();
        let mut page = 0;
        while let Some(start) = bits.next(page, true) {
            let end = bits.next(start, false).unwrap_or(bits.pages);
            runs.push((start, end - start));
            page = end;
        }
        Self(runs)
    }

    /// Runs as given; check them with [`PageRuns::is_valid`] before use.
    pub fn new(runs: Vec<(u64, u64)>) -> Self {
        Self(runs)
    }

    pub fn runs(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Total pages covered.
    pub fn pages(&self) -> u64 {
        self.0.iter().map(|&(_, n)| n).sum()
    }

    /// Whether the runs are sorted, disjoint, non-empty and below `limit` pages.
    pub fn is_valid(&self, limit: u64) -> bool {
        let mut next_free = 0;
        self.0.iter().all(|&(start, count)| {
            let ok = count > 0
                && start >= next_free
                && start.checked_add(count).is_some_and(|end| end <= limit);
            next_free = start.saturating_add(count);
            ok
        })
    }

    /// Whether `page` lies in one of the runs.
    pub fn contains(&self, page: u64) -> bool {
        let idx = self.0.partition_point(|&(start, _)| start <= page);
        idx > 0 && {
            let (start, count) = self.0[idx - 1];
            page < start + count
        }
    }
}

/// One bit per guest page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    pages: u64,
    words: Vec<u64>,
}

impl PageBitmap {
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn set_range(&mut self, start: u64, count: u64, value: bool) {
        let end = start.saturating_add(count).min(self.pages);
        let mut page = start;
        while page < end {
            let bit = page % 64;
            let span = (64 - bit).min(end - page);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            let word = &mut self.words[(page / 64) as usize];
            if value {
                *word |= mask;
            } else {
                *word &= !mask;
            }
            page += span;
        }
    }

    /// The first page at or after `from` whose bit equals `value`.
    pub fn next(&self, from: u64, value: bool) -> Option<u64> {
        let mut page = from;
        while page < self.pages {
            let raw = self.words[(page / 64) as usize];
            let word = if value { raw } else { !raw } >> (page % 64);
            if word != 0 {
                let found = page + u64::from(word.trailing_zeros());
                return (found < self.pages).then_some(found);
            }
            page = (page / 64 + 1) * 64;
        }
        None
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// One memfd of an image and the pages it provides.
#[derive(Debug)]
struct Layer {
    file: File,
    pages: PageRuns,
}

/// Frozen guest memory: never written again, shared by every VM that runs on it.
#[derive(Debug)]
pub struct MemoryImage {
    size: u64,
    layers: Vec<Layer>,
    host_pages: HostPages,
}

impl MemoryImage {
    /// Bytes of guest memory.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of memfd layers.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// The host pages its views ask for.
    pub fn host_pages(&self) -> HostPages {
        self.host_pages
    }

    /// Pages that hold data; every other page reads as zero. Found from the
    /// memfds' holes (`SEEK_DATA`), not by reading memory, so it costs
    /// microseconds per run rather than a scan of guest memory.
    pub fn data_pages(&self) -> Result<PageBitmap, MemoryError> {
        let pages = self.size / PAGE_SIZE;
        let mut data = PageBitmap::new(pages);
        for layer in &self.layers {
            for &(start, count) in layer.pages.runs() {
                data.set_range(start, count, false);
                for (d_start, d_count) in file_data_runs(&layer.file, start, start + count)? {
                    data.set_range(d_start, d_count, true);
                }
            }
        }
        Ok(data)
    }

    /// The data pages of the newest layer, i.e. the pages the VM wrote
    /// between its previous clone point and this one, when the image has
    /// such a layer; `None` for a one-layer image (a first clone point, or
    /// one flattened), where no such set is known.
    pub fn newest_layer_data_pages(&self) -> Result<Option<PageRuns>, MemoryError> {
        let [_, .., newest] = self.layers.as_slice() else {
            return Ok(None);
        };
        let mut runs = Vec::new();
        for &(start, count) in newest.pages.runs() {
            runs.extend(file_data_runs(&newest.file, start, start + count)?);
        }
        Ok(Some(PageRuns(runs)))
    }

    /// Copies `buf.len()` bytes at guest-physical `addr` out of the image.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(addr, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = addr + done as u64;
            let page = at / PAGE_SIZE;
            let chunk = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(buf.len() - done);
            let layer = self
                .layers
                .iter()
                .rev()
                .find(|l| l.pages.contains(page))
                .expect("layer 0 covers every page");
            layer
                .file
                .read_exact_at(&mut buf[done..done + chunk], at)
                .map_err(MemoryError::CopyLayer)?;
            done += chunk;
        }
        Ok(())
    }
}

/// Runs of pages in `[first, end)` of `file` that hold data.
fn file_data_runs(file: &File, first: u64, end: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
    let mut runs = Vec::new();
    let end_off = end * PAGE_SIZE;
    let mut off = first * PAGE_SIZE;
    while off < end_off {
        let Some(data) = seek(file, off, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end_off {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?
            .unwrap_or(end_off)
            .min(end_off);
        let start_page = data / PAGE_SIZE;
        runs.push((start_page, hole.div_ceil(PAGE_SIZE) - start_page));
        off = hole;
    }
    Ok(runs)
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` when there is no more data.
fn seek(file: &File, off: u64, whence: libc::c_int) -> Result<Option<u64>, MemoryError> {
    // SAFETY: lseek on an fd we own; it only moves the file offset, which
    // nothing else in this process relies on (all I/O here is positional).
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(MemoryError::SeekData(err)),
        };
    }
    Ok(Some(rc as u64))
}

/// Memory restored from `image` must be reserved at the image's size.
fn check_image_size(image: &MemoryImage, reserved: &ReservedMemory) -> Result<(), MemoryError> {
    if reserved.size != image.size {
        return Err(MemoryError::BadSize {
            size: reserved.size,
        });
    }
    Ok(())
}

fn check_range(addr: u64, len: u64, size: u64) -> Result<(), MemoryError> {
    match addr.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(MemoryError::OutOfRange { addr, len, size }),
    }
}

/// A host mapping of guest memory, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: NonNull<u8>,
    len: u64,
}

// SAFETY: the mapping is plain memory with no thread affinity; all access
// goes through `GuestMemory`, whose methods take `&self`/`&mut self`.
unsafe impl Send for Mapping {}
// SAFETY: as above; concurrent reads and writes of guest memory by the guest
// and the VMM are byte copies without Rust references into the mapping.
unsafe impl Sync for Mapping {}

/// Guest mappings are 2 MiB aligned so that moving their page tables
/// (`mremap`) moves whole page-table pages instead of single entries.
const MAPPING_ALIGN: usize = 2 << 20;

impl Mapping {
    /// An inaccessible, 2 MiB-aligned placeholder of `len` bytes that later
    /// `map_fixed` calls fill. Owning the range first means no other mmap in
    /// the process can land inside it.
    fn reserve(len: u64) -> Result<Self, MemoryError> {
        let padded = len as usize + MAPPING_ALIGN;
        let map_err = |source| MemoryError::Map { len, source };
        // SAFETY: no address hint and no MAP_FIXED: the kernel picks a fresh
        // range, so no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(MAPPING_ALIGN);
        let tail = aligned + len as usize;
        // SAFETY: both ranges are the unaligned head and tail of the
        // reservation made above, which nothing else references.
        unsafe {
            libc::munmap(raw, aligned - start);
        }
        // SAFETY: as above.
        unsafe {
            libc::munmap(tail as *mut libc::c_void, start + padded - tail);
        }
        Ok(Self {
            addr: NonNull::new(aligned as *mut u8).expect("mmap never returns null on success"),
            len,
        })
    }

    /// Maps `len` bytes of `fd` at `offset` over the same offset of this range.
    fn map_fixed(&self, offset: u64, len: u64, flags: i32, fd: i32) -> Result<(), MemoryError> {
        assert!(offset + len <= self.len, "fixed mapping outside its range");
        // SAFETY: the target lies inside this mapping, which we own and into
        // which no Rust reference points; MAP_FIXED replaces those pages.
        let ptr = unsafe {
            libc::mmap(
                self.addr.as_ptr().wrapping_add(offset as usize).cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Advises the whole range `MADV_HUGEPAGE` for [`HostPages::Huge`]. Each
    /// `map_fixed` makes new mappings that do not inherit the advice, so it
    /// follows them, before anything touches the range.
    fn advise(&self, host_pages: HostPages) -> Result<(), MemoryError> {
        if host_pages == HostPages::Base {
            return Ok(());
        }
        // SAFETY: the range is a mapping we own; the advice changes only
        // which page size later faults allocate, never the contents.
        let rc = unsafe {
            libc::madvise(
                self.addr.as_ptr().cast(),
                self.len as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Advise(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Moves this range's pages (its page tables) to a new range and returns
    /// that; this range stays mapped as before but empty, so it can be
    /// overmapped without first tearing down its page tables, which costs
    /// ~65 µs per populated MiB. The range never becomes a hole another
    /// thread's mmap could take (`MREMAP_DONTUNMAP`).
    fn move_pages_out(&self) -> Result<Self, MemoryError> {
        let target = Self::reserve(self.len)?;
        // SAFETY: source and target are ranges of equal size that we own;
        // MREMAP_FIXED replaces the target reservation, which has no users.
        let moved = unsafe {
            libc::mremap(
                self.addr.as_ptr().cast(),
                self.len as usize,
                self.len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                target.addr.as_ptr().cast::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            return Err(MemoryError::Move(std::io::Error::last_os_error()));
        }
        Ok(target)
    }
}

impl Mapping {
    /// Unmaps the range a few MiB at a time. Unmapping takes the process's
    /// mmap lock for as long as it tears down page tables; one call over a
    /// populated GiB holds it for ~65 ms, stalling every thread that maps
    /// memory (thread creation, allocations), such as new clones starting.
    pub fn unmap_gradually(self) {
        const CHUNK: u64 = 8 << 20;
        let mut offset = 0;
        while offset < self.len {
            let len = CHUNK.min(self.len - offset);
            // SAFETY: the chunk lies inside this mapping, which we own; the
            // remaining chunks stay mapped until their turn, and `forget`
            // below keeps Drop from unmapping the range a second time.
            unsafe {
                libc::munmap(
                    self.addr.as_ptr().wrapping_add(offset as usize).cast(),
                    len as usize,
                )
            };
            offset += len;
        }
        std::mem::forget(self);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is a mapping this value created and owns.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len as usize) };
    }
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is
    // owned by the File immediately below.
    let fd = unsafe { libc::memfd_create(c"snowflock-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    Ok(file)
}

#[derive(Debug)]
enum Backing {
    /// A shared mapping of a memfd that only this VM uses.
    Live(File),
    /// A private view of a frozen image.
    Image(Arc<MemoryImage>),
    /// Private anonymous memory, empty until a userfaultfd handler fills it
    /// page by page from another host.
    Hollow,
}

/// The memory of one VM.
#[derive(Debug)]
pub struct GuestMemory {
    size: u64,
    mapping: Mapping,
    backing: Backing,
    host_pages: HostPages,
    /// Lets populates of the current view run until it goes away.
    lease: Arc<ViewLease>,
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // Before the mapping field unmaps the range.
        self.lease.revoke();
    }
}

/// What a freeze leaves behind.
#[derive(Debug)]
pub struct Frozen {
    /// The image every clone (and from now on the VM itself) runs on.
    pub image: Arc<MemoryImage>,
    /// The pages the VM had before the freeze, moved to a range of their
    /// own. Unmapping a large populated range takes milliseconds, so callers
    /// may drop it on another thread.
    pub retired: Mapping,
}

/// Host address space set aside for one VM's memory before its contents are
/// known: inaccessible until a [`GuestMemory`] is built in it. A hypervisor
/// memory slot can point at it early, so that creating the slot (which waits
/// several milliseconds on a fresh KVM VM) is off the clone path.
#[derive(Debug)]
pub struct ReservedMemory {
    size: u64,
    mapping: Mapping,
}

impl ReservedMemory {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadSize { size });
        }
        Ok(Self {
            size,
            mapping: Mapping::reserve(size)?,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest-physical 0.
    pub fn host_addr(&self) -> *mut u8 {
        self.mapping.addr.as_ptr()
    }
}

impl GuestMemory {
    /// Fresh zeroed memory of `size` bytes on `host_pages`.
    pub fn new(size: u64, host_pages: HostPages) -> Result<Self, MemoryError> {
        Self::new_in(ReservedMemory::new(size)?, host_pages)
    }

    /// Fresh zeroed memory in `reserved` on `host_pages`.
    pub fn new_in(reserved: ReservedMemory, host_pages: HostPages) -> Result<Self, MemoryError> {
        let ReservedMemory { size, mapping } = reserved;
        let file = memfd(size)?;
        mapping.map_fixed(0, size, libc::MAP_SHARED, file.as_raw_fd())?;
        mapping.advise(host_pages)?;
        Ok(Self {
            lease: ViewLease::new(mapping.addr.as_ptr(), size / PAGE_SIZE),
            size,
            mapping,
            backing: Backing::Live(file),
            host_pages,
        })
    }

    /// A private copy-on-write view of `image`.
    pub fn from_image(image: &Arc<MemoryImage>) -> Result<Self, MemoryError> {
        Self::from_image_in(image, ReservedMemory::new(image.size)?)
    }

    /// A private copy-on-write view of `image` in `reserved`.
    pub fn from_image_in(
        image: &Arc<MemoryImage>,
        reserved: ReservedMemory,
    ) -> Result<Self, MemoryError> {
        check_image_size(image, &reserved)?;
        map_image(image, &reserved.mapping)?;
        Ok(Self {
            lease: ViewLease::new(reserved.host_addr(), image.size / PAGE_SIZE),
            size: image.size,
            mapping: reserved.mapping,
            backing: Backing::Image(image.clone()),
            host_pages: image.host_pages,
        })
    }

    /// Memory of its own in `reserved`, on the image's host pages, holding a
    /// copy of `image`: each page's data is read from the newest layer that
    /// covers it, and zero pages stay holes.
    pub fn copy_of_image_in(
        image: &Arc<MemoryImage>,
        reserved: ReservedMemory,
    ) -> Result<Self, MemoryError> {
        check_image_size(image, &reserved)?;
        let memory = Self::new_in(reserved, image.host_pages)?;
        let pages = image.size / PAGE_SIZE;
        let mut covered = PageBitmap::new(pages);
        for layer in image.layers.iter().rev() {
            for &(start, count) in layer.pages.runs() {
                let end = start + count;
                let mut page = start;
                while let Some(first) = covered.next(page, false).filter(|&p| p < end) {
                    let last = covered.next(first, true).unwrap_or(pages).min(end);
                    for (data, data_count) in file_data_runs(&layer.file, first, last)? {
                        memory.fill_from(&layer.file, data, data_count)?;
                    }
                    page = last;
                }
                covered.set_range(start, count, true);
            }
        }
        Ok(memory)
    }

    /// A private view of `cache` (a file of exactly the reserved size, most
    /// of it holes) in `reserved`, that nothing has touched yet: the memory
    /// of a clone whose pages live on another host. Pages already in
    /// `cache` are the clone's (copy-on-write); the caller registers the
    /// range with a userfaultfd handler for the missing ones before
    /// anything reads it.
    pub fn hollow_in(
        reserved: ReservedMemory,
        cache: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Self, MemoryError> {
        let ReservedMemory { size, mapping } = reserved;
        let file = File::from(cache.try_clone_to_owned().map_err(MemoryError::Cache)?);
        let cache_size = file.metadata().map_err(MemoryError::Cache)?.len();
        if cache_size != size {
            return Err(MemoryError::CacheSize {
                cache: cache_size,
                size,
            });
        }
        mapping.map_fixed(0, size, libc::MAP_PRIVATE, file.as_raw_fd())?;
        Ok(Self {
            lease: ViewLease::new(mapping.addr.as_ptr(), size / PAGE_SIZE),
            size,
            mapping,
            backing: Backing::Hollow,
            host_pages: HostPages::Base,
        })
    }

    /// Whether this memory is filled on demand (see [`GuestMemory::hollow_in`]).
    pub fn is_hollow(&self) -> bool {
        matches!(self.backing, Backing::Hollow)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest-physical 0.
    pub fn host_addr(&self) -> *mut u8 {
        self.mapping.addr.as_ptr()
    }

    /// The image this memory is a view of, if it has been frozen before.
    pub fn image(&self) -> Option<&Arc<MemoryImage>> {
        match &self.backing {
            Backing::Image(image) => Some(image),
            Backing::Live(_) | Backing::Hollow => None,
        }
    }

    /// A handle that maps this VM's view of its image (or of its host page
    /// cache, for hollow memory) ahead of the guest, from any thread, until
    /// the view is frozen again or the memory is dropped; `None` for live
    /// memory.
    pub fn populator(&self) -> Option<Populator> {
        match &self.backing {
            Backing::Image(image) => Some(Populator::new(Some(image.clone()), self.lease.clone())),
            Backing::Hollow => Some(Populator::new(None, self.lease.clone())),
            Backing::Live(_) => None,
        }
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(addr, buf.len() as u64, self.size)?;
        // SAFETY: the range is inside the mapping (checked above); the copy
        // goes through raw pointers, so concurrent guest writes cannot break
        // Rust aliasing rules, only give torn bytes, which callers tolerate.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.host_addr().wrapping_add(addr as usize),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        check_range(addr, data.len() as u64, self.size)?;
        // SAFETY: the range is inside the mapping (checked above) and the
        // mapping is writable; no Rust reference points into guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.host_addr().wrapping_add(addr as usize),
                data.len(),
            );
        }
        Ok(())
    }

    /// Reads `count` pages at `page` of `file` into the same pages of this
    /// memory, which no VM runs on yet.
    fn fill_from(&self, file: &File, page: u64, count: u64) -> Result<(), MemoryError> {
        let (addr, len) = (page * PAGE_SIZE, count * PAGE_SIZE);
        check_range(addr, len, self.size)?;
        // SAFETY: the range is inside the mapping (checked above), which is
        // writable and lives as long as `self`; only the caller, building
        // this memory before any vCPU or other thread can reach it, touches
        // it, so the slice is the one reference to those bytes.
        let target = unsafe {
            std::slice::from_raw_parts_mut(
                self.host_addr().wrapping_add(addr as usize),
                len as usize,
            )
        };
        file.read_exact_at(target, addr)
            .map_err(MemoryError::CopyImage)
    }

    /// Reads a little-endian u64 at `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut raw = [0u8; 8];
        self.read(addr, &mut raw)?;
        Ok(u64::from_le_bytes(raw))
    }

    /// Writes a little-endian u64 at `addr`.
    pub fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemoryError> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Freezes the current contents into an image and moves this VM onto a
    /// private view of it, at the same host address (so the hypervisor's
    /// memory slot stays valid; its MMU notifier sees the change). The vCPU
    /// must not run during the call.
    pub fn freeze(&mut self) -> Result<Frozen, MemoryError> {
        let image = match &self.backing {
            Backing::Live(file) => Arc::new(MemoryImage {
                size: self.size,
                layers: vec![Layer {
                    file: file.try_clone().map_err(MemoryError::Memfd)?,
                    pages: PageRuns(vec![(0, self.size / PAGE_SIZE)]),
                }],
                host_pages: self.host_pages,
            }),
            Backing::Image(base) => Arc::new(self.layer_dirty_pages(base)?),
            Backing::Hollow => return Err(MemoryError::FreezeHollow),
        };
        // Populates of the old view would map the pages about to be moved
        // out; the new view gets a lease of its own.
        self.lease.revoke();
        self.lease = ViewLease::new(self.host_addr(), self.size / PAGE_SIZE);
        let retired = self.mapping.move_pages_out()?;
        map_image(&image, &self.mapping)?;
        self.backing = Backing::Image(image.clone());
        Ok(Frozen { image, retired })
    }

    /// A new image: `base` plus the pages this VM has written since it was
    /// mapped (private anonymous pages in its mapping).
    fn layer_dirty_pages(&self, base: &MemoryImage) -> Result<MemoryImage, MemoryError> {
        let dirty = self.private_pages()?;
        let runs = PageRuns::from_bitmap(&dirty);
        let total_runs: usize = base.layers.iter().map(|l| l.pages.runs().len()).sum();
        if total_runs + runs.runs().len() > MAX_LAYER_RUNS {
            return self.flatten();
        }
        let file = memfd(self.size)?;
        for &(start, count) in runs.runs() {
            self.copy_pages_to(&file, start, count)?;
        }
        let mut layers = Vec::with_capacity(base.layers.len() + 1);
        for layer in &base.layers {
            layers.push(Layer {
                file: layer.file.try_clone().map_err(MemoryError::Memfd)?,
                pages: layer.pages.clone(),
            });
        }
        layers.push(Layer { file, pages: runs });
        Ok(MemoryImage {
            size: self.size,
            layers,
            host_pages: self.host_pages,
        })
    }

    /// A one-layer image holding a full copy of this VM's memory.
    fn flatten(&self) -> Result<MemoryImage, MemoryError> {
        let file = memfd(self.size)?;
        self.copy_pages_to(&file, 0, self.size / PAGE_SIZE)?;
        Ok(MemoryImage {
            size: self.size,
            layers: vec![Layer {
                file,
                pages: PageRuns(vec![(0, self.size / PAGE_SIZE)]),
            }],
            host_pages: self.host_pages,
        })
    }

    /// Copies pages into `file`, leaving all-zero pages as holes.
    fn copy_pages_to(&self, file: &File, start: u64, count: u64) -> Result<(), MemoryError> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in start..start + count {
            self.read(p * PAGE_SIZE, &mut page)?;
            if page.iter().any(|&b| b != 0) {
                file.write_all_at(&page, p * PAGE_SIZE)
                    .map_err(MemoryError::CopyLayer)?;
            }
        }
        Ok(())
    }

    /// Pages of the mapping that are private anonymous copies, i.e. written
    /// since the mapping was made (pagemap: present and not file-backed).
    fn private_pages(&self) -> Result<PageBitmap, MemoryError> {
        const PRESENT: u64 = 1 << 63;
        const FILE_OR_SHARED: u64 = 1 << 61;
        let pages = self.size / PAGE_SIZE;
        let mut map = File::open("/proc/self/pagemap").map_err(MemoryError::PageMap)?;
        map.seek(SeekFrom::Start(self.host_addr() as u64 / PAGE_SIZE * 8))
            .map_err(MemoryError::PageMap)?;
        let mut bits = PageBitmap::new(pages);
        let mut buf = vec![0u8; 64 * 1024];
        let mut page = 0u64;
        while page < pages {
            let want = ((pages - page) as usize * 8).min(buf.len());
            map.read_exact(&mut buf[..want])
                .map_err(MemoryError::PageMap)?;
            for entry in buf[..want].chunks_exact(8) {
                let e = u64::from_le_bytes(entry.try_into().expect("8-byte chunk"));
                if e & PRESENT != 0 && e & FILE_OR_SHARED == 0 {
                    bits.set_range(page, 1, true);
                }
                page += 1;
            }
        }
        Ok(bits)
    }
}

/// Maps a private view of every layer of `image` over `into`, bottom first,
/// advised for the image's host pages.
fn map_image(image: &MemoryImage, into: &Mapping) -> Result<(), MemoryError> {
    for layer in &image.layers {
        for &(start, count) in layer.pages.runs() {
            into.map_fixed(
                start * PAGE_SIZE,
                count * PAGE_SIZE,
                libc::MAP_PRIVATE,
                layer.file.as_raw_fd(),
            )?;
        }
    }
    into.advise(image.host_pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs_round_trip() {
        let mut bits = PageBitmap::new(300);
        bits.set_range(0, 3, true);
        bits.set_range(62, 5, true);
        bits.set_range(128, 64, true);
        bits.set_range(299, 10, true);
        bits.set_range(63, 1, false);
        let runs = PageRuns::from_bitmap(&bits);
        assert_eq!(
            runs.runs(),
            &[(0, 3), (62, 1), (64, 3), (128, 64), (299, 1)]
        );
        assert_eq!(runs.pages(), bits.count());
        assert!(runs.is_valid(300));
        assert!(!runs.is_valid(299));
        assert!(runs.contains(130) && !runs.contains(63) && !runs.contains(200));
    }

    #[test]
    fn overlapping_or_empty_runs_are_invalid() {
        assert!(!PageRuns(vec![(0, 4), (3, 2)]).is_valid(10));
        assert!(!PageRuns(vec![(0, 0)]).is_valid(10));
        assert!(!PageRuns(vec![(u64::MAX, 2)]).is_valid(u64::MAX));
    }

    #[test]
    fn frozen_image_is_isolated_from_later_writes() {
        let mut mem = GuestMemory::new(64 * PAGE_SIZE, HostPages::Base).unwrap();
        mem.write(5 * PAGE_SIZE, b"before").unwrap();
        let first = mem.freeze().unwrap();
        drop(first.retired);
        mem.write(5 * PAGE_SIZE, b"after!").unwrap();
        mem.write(9 * PAGE_SIZE, b"new").unwrap();
        let second = mem.freeze().unwrap();
        drop(second.retired);

        let mut buf = [0u8; 6];
        first.image.read(5 * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(&buf, b"before");
        second.image.read(5 * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(&buf, b"after!");
        assert_eq!(second.image.layer_count(), 2);

        let view = GuestMemory::from_image(&second.image).unwrap();
        view.write(9 * PAGE_SIZE, b"mine").unwrap();
        let mut small = [0u8; 3];
        second.image.read(9 * PAGE_SIZE, &mut small).unwrap();
        assert_eq!(&small, b"new");

        let data = second.image.data_pages().unwrap();
        assert!(data.get(5) && data.get(9) && !data.get(6));
        assert_eq!(data.count(), 2);
        assert_eq!(first.image.newest_layer_data_pages().unwrap(), None);
        let recent = second.image.newest_layer_data_pages().unwrap().unwrap();
        assert_eq!(recent.runs(), &[(5, 1), (9, 1)]);
    }

    #[test]
    fn a_copy_of_an_image_holds_each_pages_newest_contents_and_is_its_own() {
        let pages = 64;
        let mut mem = GuestMemory::new(pages * PAGE_SIZE, HostPages::Base).unwrap();
        for (p, text) in [(5, b"five-old"), (9, b"nine-old"), (12, b"twelve!!")] {
            mem.write(p * PAGE_SIZE, text).unwrap();
        }
        drop(mem.freeze().unwrap().retired);
        // The second layer rewrites page 5, zeroes page 12 (a hole in the
        // layer that hides the older data) and adds page 20.
        mem.write(5 * PAGE_SIZE, b"five-new").unwrap();
        mem.write(12 * PAGE_SIZE, &[0; 8]).unwrap();
        mem.write(20 * PAGE_SIZE, b"twenty!!").unwrap();
        let frozen = mem.freeze().unwrap();
        assert_eq!(frozen.image.layer_count(), 2);

        let reserved = ReservedMemory::new(pages * PAGE_SIZE).unwrap();
        let mut copy = GuestMemory::copy_of_image_in(&frozen.image, reserved).unwrap();
        let (mut want, mut got) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
        for p in 0..pages {
            frozen.image.read(p * PAGE_SIZE, &mut want).unwrap();
            copy.read(p * PAGE_SIZE, &mut got).unwrap();
            assert_eq!(got, want, "page {p}");
        }
        copy.read(12 * PAGE_SIZE, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0), "the newer zero page wins");

        // Its writes are its own, and it freezes like memory that was never
        // frozen: one layer, nothing shared with the image it came from.
        assert!(copy.image().is_none() && copy.populator().is_none());
        copy.write(9 * PAGE_SIZE, b"nine-mine").unwrap();
        let mut buf = [0u8; 8];
        frozen.image.read(9 * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(&buf, b"nine-old");
        let refrozen = copy.freeze().unwrap();
        assert_eq!(refrozen.image.layer_count(), 1);
        let mut nine = [0u8; 9];
        refrozen.image.read(9 * PAGE_SIZE, &mut nine).unwrap();
        assert_eq!(&nine, b"nine-mine");

        let wrong = ReservedMemory::new((pages + 1) * PAGE_SIZE).unwrap();
        assert!(matches!(
            GuestMemory::copy_of_image_in(&frozen.image, wrong),
            Err(MemoryError::BadSize { .. })
        ));
        drop((frozen.retired, refrozen.retired));
    }

    #[test]
    fn huge_pages_keep_zero_pages_dirty_pages_and_views_exact() {
        const BLOCK: u64 = (2 << 20) / PAGE_SIZE;
        let pages = 4 * BLOCK;
        let mut parent = GuestMemory::new(pages * PAGE_SIZE, HostPages::Huge).unwrap();
        parent.write(PAGE_SIZE, b"first").unwrap();
        parent.write((3 * BLOCK + 7) * PAGE_SIZE, b"last").unwrap();
        let first = parent.freeze().unwrap();
        assert_eq!(first.image.host_pages(), HostPages::Huge);

        // A huge page makes its whole 2 MiB data, never more: untouched
        // blocks stay holes, and every page outside the data reads zero.
        let data = first.image.data_pages().unwrap();
        assert!(data.get(1) && data.get(3 * BLOCK + 7));
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in 0..pages {
            assert!(
                !data.get(p) || p / BLOCK == 0 || p / BLOCK == 3,
                "page {p} of an untouched block is data"
            );
            if !data.get(p) {
                first.image.read(p * PAGE_SIZE, &mut page).unwrap();
                assert!(page.iter().all(|&b| b == 0), "page {p} is not zero");
            }
        }

        // Reading a view (2 MiB at a time where the kernel maps it so)
        // dirties nothing; each write dirties its own 4 KiB page only.
        let mut view = GuestMemory::from_image(&first.image).unwrap();
        for p in (0..pages).filter(|&p| data.get(p)) {
            view.read(p * PAGE_SIZE, &mut page).unwrap();
        }
        assert_eq!(view.private_pages().unwrap().count(), 0);
        view.write(2 * PAGE_SIZE, b"mine").unwrap();
        view.write((BLOCK + 88) * PAGE_SIZE, b"fresh").unwrap();
        let private = view.private_pages().unwrap();
        assert_eq!(private.count(), 2);
        assert!(private.get(2) && private.get(BLOCK + 88));

        let second = view.freeze().unwrap();
        assert_eq!(second.image.host_pages(), HostPages::Huge);
        assert_eq!(
            second.image.layers[1].pages.runs(),
            &[(2, 1), (BLOCK + 88, 1)]
        );
        let mut buf = [0u8; 5];
        for (p, want) in [(1, b"first"), (BLOCK + 88, b"fresh")] {
            second.image.read(p * PAGE_SIZE, &mut buf).unwrap();
            assert_eq!(&buf, want);
        }
        second.image.read(2 * PAGE_SIZE, &mut buf[..4]).unwrap();
        assert_eq!(&buf[..4], b"mine");
        first.image.read(2 * PAGE_SIZE, &mut buf[..4]).unwrap();
        assert_eq!(&buf[..4], &[0; 4]);
        drop((first.retired, second.retired));
    }

    #[test]
    fn populating_keeps_the_views_own_pages_and_stops_when_the_view_goes() {
        use crate::populate::{PopulateAccess, Populated};

        let mut parent = GuestMemory::new(64 * PAGE_SIZE, HostPages::Base).unwrap();
        parent.write(5 * PAGE_SIZE, b"image5").unwrap();
        parent.write(9 * PAGE_SIZE, b"image9").unwrap();
        let frozen = parent.freeze().unwrap();
        let mut view = GuestMemory::from_image(&frozen.image).unwrap();
        view.write(9 * PAGE_SIZE, b"mine").unwrap();

        let populator = view.populator().unwrap();
        let runs = populator.data_runs().unwrap();
        assert_eq!(runs.runs(), &[(5, 1), (9, 1)]);
        for &(first, count) in runs.runs() {
            let done = populator.populate(first, count, PopulateAccess::Read);
            assert_eq!(done.unwrap(), Populated::Mapped);
        }
        let mut buf = [0u8; 6];
        view.read(9 * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(&buf, b"minee9");
        assert_eq!(
            view.private_pages().unwrap().count(),
            1,
            "a read populate copies nothing"
        );

        for &(first, count) in runs.runs() {
            let done = populator.populate(first, count, PopulateAccess::Write);
            assert_eq!(done.unwrap(), Populated::Mapped);
        }
        let private = view.private_pages().unwrap();
        assert!(private.get(5) && private.get(9));
        view.read(5 * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(&buf, b"image5");
        view.read(9 * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(&buf, b"minee9");
        assert!(populator.populate(60, 5, PopulateAccess::Read).is_err());

        let refrozen = view.freeze().unwrap();
        assert_eq!(
            populator.populate(5, 1, PopulateAccess::Read).unwrap(),
            Populated::Gone
        );
        let again = view.populator().unwrap();
        drop(view);
        assert_eq!(
            again.populate(5, 1, PopulateAccess::Read).unwrap(),
            Populated::Gone
        );
        drop((refrozen, frozen));
    }
}
