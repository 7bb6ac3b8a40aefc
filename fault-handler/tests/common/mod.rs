//! Test fixtures: a frozen image in a memfd, a page server on its own
//! thread (as the network transport would be), untouched private views of a
//! family's page cache as clone memory, and bounded touching of their pages
//! from other threads.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use snowflock_fault_handler::{
    AvoidMap, Family, FaultError, FaultHandler, FetchConfig, PAGE_SIZE, PageSource,
};

/// Upper bound of every wait in the tests.
pub const BOUND: Duration = Duration::from_secs(10);

/// Byte `i` of page `page` of an image.
pub fn pattern(page: u64, i: usize) -> u8 {
    ((page as usize).wrapping_mul(7) ^ i.wrapping_mul(13)) as u8 | 1
}

/// A frozen image: a memfd whose data pages hold [`pattern`] and whose
/// other pages are holes (zeros).
pub struct Image {
    file: File,
    pub pages: u64,
    pub data_runs: Vec<(u64, u64)>,
}

impl Image {
    pub fn new(pages: u64, data_runs: &[(u64, u64)]) -> Arc<Self> {
        // SAFETY: the name is NUL-terminated; the result is a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"test-image".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is new and owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(pages * PAGE_SIZE).unwrap();
        for &(start, count) in data_runs {
            for page in start..start + count {
                file.write_all_at(&Self::expected(page), page * PAGE_SIZE)
                    .unwrap();
            }
        }
        Arc::new(Self {
            file,
            pages,
            data_runs: data_runs.to_vec(),
        })
    }

    /// What a data page holds.
    pub fn expected(page: u64) -> Vec<u8> {
        (0..PAGE_SIZE as usize).map(|i| pattern(page, i)).collect()
    }

    pub fn read(&self, page: u64) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        self.file.read_exact_at(&mut buf, page * PAGE_SIZE).unwrap();
        buf
    }
}

/// How the page server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// After `delay`, with everything requested within `batch` of the
    /// first request in one delivery.
    Answer { delay: Duration, batch: Duration },
    /// Every delivery twice, from two threads at once.
    Twice,
    /// Pages of the wrong size.
    Short,
    /// Never.
    Silent,
}

/// A page server on its own thread serving an [`Image`].
pub struct Server {
    requests: Mutex<Sender<Vec<u64>>>,
    /// Every `request` call, in order.
    pub seen: Mutex<Vec<Vec<u64>>>,
    /// Sizes of the batches delivered.
    pub batches: Arc<Mutex<Vec<usize>>>,
}

impl Server {
    pub fn requested(&self) -> Vec<u64> {
        self.seen.lock().unwrap().concat()
    }
}

impl PageSource for Server {
    fn request(&self, _family: u64, pages: &[u64]) {
        self.seen.lock().unwrap().push(pages.to_vec());
        // The server thread ends only with the family, which owns us.
        let _ = self.requests.lock().unwrap().send(pages.to_vec());
    }
}

fn deliver(family: &Family, image: &Image, pages: &[u64], mode: Mode) {
    let data: Vec<(u64, Vec<u8>)> = pages.iter().map(|&p| (p, image.read(p))).collect();
    let mut batch: Vec<(u64, &[u8])> = data.iter().map(|(p, d)| (*p, d.as_slice())).collect();
    match mode {
        Mode::Twice => std::thread::scope(|s| {
            s.spawn(|| family.deliver_batch(&batch));
            family.deliver_batch(&batch);
        }),
        Mode::Short => {
            for entry in &mut batch {
                entry.1 = &entry.1[..100];
            }
            family.deliver_batch(&batch);
        }
        _ => family.deliver_batch(&batch),
    }
}

fn serve(
    queue: Receiver<Vec<u64>>,
    family: Weak<Family>,
    image: Arc<Image>,
    mode: Mode,
    batches: Arc<Mutex<Vec<usize>>>,
) {
    while let Ok(first) = queue.recv() {
        let mut pages = first;
        if let Mode::Answer { batch, .. } = mode {
            let until = Instant::now() + batch;
            loop {
                match queue.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(more) => pages.extend(more),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
        match mode {
            Mode::Silent => continue,
            Mode::Answer { delay, .. } => std::thread::sleep(delay),
            Mode::Twice | Mode::Short => {}
        }
        let Some(family) = family.upgrade() else {
            return;
        };
        batches.lock().unwrap().push(pages.len());
        deliver(&family, &image, &pages, mode);
    }
}

/// A family of `image` whose pages come from a [`Server`] in `mode`.
pub fn family(
    id: u64,
    image: &Arc<Image>,
    mode: Mode,
    config: FetchConfig,
) -> (Arc<Family>, Arc<Server>) {
    let (tx, rx) = mpsc::channel();
    let server = Arc::new(Server {
        requests: Mutex::new(tx),
        seen: Mutex::new(Vec::new()),
        batches: Arc::new(Mutex::new(Vec::new())),
    });
    let family = Family::new(id, image.pages * PAGE_SIZE, server.clone(), config).unwrap();
    let (weak, image, batches) = (
        Arc::downgrade(&family),
        image.clone(),
        server.batches.clone(),
    );
    std::thread::Builder::new()
        .name("test-server".into())
        .spawn(move || serve(rx, weak, image, mode, batches))
        .unwrap();
    (family, server)
}

pub fn config(prefetch_pages: u32, fetch_timeout: Duration) -> FetchConfig {
    FetchConfig {
        fetch_timeout,
        prefetch_pages,
        fault_around_pages: 0,
        huge_blocks: false,
    }
}

/// Answers immediately, one batch per request.
pub const PROMPT: Mode = Mode::Answer {
    delay: Duration::ZERO,
    batch: Duration::ZERO,
};

/// Answers every request at once on the faulting thread itself.
pub struct InThread {
    pub image: Arc<Image>,
    pub family: OnceLock<Weak<Family>>,
}

impl PageSource for InThread {
    fn request(&self, _family: u64, pages: &[u64]) {
        if let Some(family) = self.family.get().and_then(Weak::upgrade) {
            deliver(&family, &self.image, pages, PROMPT);
        }
    }
}

/// A family answered in place by [`InThread`].
pub fn in_thread_family(id: u64, image: &Arc<Image>, config: FetchConfig) -> Arc<Family> {
    let source = Arc::new(InThread {
        image: image.clone(),
        family: OnceLock::new(),
    });
    let family = Family::new(id, image.pages * PAGE_SIZE, source.clone(), config).unwrap();
    let _ = source.family.set(Arc::downgrade(&family));
    family
}

/// A clone's memory: a private view of its family's cache memfd that
/// nothing has touched.
pub struct Region {
    ptr: *mut u8,
    pub pages: u64,
}

// SAFETY: plain memory, accessed through raw pointers only.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

/// `mmap` of the whole cache of `family` at `at` (`MAP_FIXED` unless null).
fn map_cache(family: &Family, at: *mut u8) -> *mut u8 {
    let len = (family.cache().page_count() * PAGE_SIZE) as usize;
    let fixed = if at.is_null() { 0 } else { libc::MAP_FIXED };
    // SAFETY: a private mapping of the cache memfd, either where the kernel
    // picks or (MAP_FIXED) over a mapping of the caller's that nothing uses.
    let ptr = unsafe {
        libc::mmap(
            at.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE | fixed,
            family.cache().memfd().as_raw_fd(),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    ptr.cast()
}

impl Region {
    pub fn of(family: &Family) -> Self {
        Self {
            ptr: map_cache(family, std::ptr::null_mut()),
            pages: family.cache().page_count(),
        }
    }

    /// Untouched memory of `family` at the same address: the old mapping
    /// is replaced in one step, so no other thread's mapping can land there
    /// in between (as if another clone's memory were mapped after this one
    /// was unmapped).
    pub fn replace(self, family: &Family) -> Self {
        assert_eq!(family.cache().page_count(), self.pages);
        let ptr = map_cache(family, self.ptr);
        assert_eq!(ptr, self.ptr);
        let pages = self.pages;
        std::mem::forget(self);
        Self { ptr, pages }
    }

    pub fn addr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// Copies page `page` out (faulting it in if missing).
    pub fn read(&self, page: u64) -> Vec<u8> {
        assert!(page < self.pages);
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        // SAFETY: the page lies inside the mapping; raw copies make no
        // Rust reference into memory the kernel fills.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.wrapping_add((page * PAGE_SIZE) as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        buf
    }

    /// Writes one byte of page `page` (faulting it in if missing).
    pub fn write(&self, page: u64, offset: u64, value: u8) {
        assert!(page < self.pages && offset < PAGE_SIZE);
        // SAFETY: inside the mapping, which is writable.
        unsafe {
            std::ptr::write_volatile(
                self.ptr.wrapping_add((page * PAGE_SIZE + offset) as usize),
                value,
            )
        };
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (handlers are dropped
        // before their regions).
        unsafe { libc::munmap(self.ptr.cast(), self.len() as usize) };
    }
}

/// Runs `f` on another thread and waits at most [`BOUND`] for it.
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(BOUND)
        .unwrap_or_else(|_| panic!("{what}: no answer within {BOUND:?}"))
}

/// Reads `pages` of `region` on another thread, with a bound.
pub fn touch(region: &Arc<Region>, pages: impl IntoIterator<Item = u64>) -> Vec<Vec<u8>> {
    let region = region.clone();
    let pages: Vec<u64> = pages.into_iter().collect();
    bounded("touching pages", move || {
        pages.iter().map(|&p| region.read(p)).collect()
    })
}

/// A hollow clone: its handler (dropped first), region and failures.
pub struct Clone {
    pub handler: FaultHandler,
    pub region: Arc<Region>,
    pub failures: Arc<Mutex<Vec<FaultError>>>,
}

impl Clone {
    pub fn start(family: &Arc<Family>, avoid: AvoidMap) -> Self {
        let pages = family.cache().page_count();
        let region = Arc::new(Region::of(family));
        assert_eq!(region.pages, pages);
        let failures = Arc::new(Mutex::new(Vec::new()));
        let sink = failures.clone();
        // SAFETY: the region is a fresh private view of the family's cache
        // that outlives the handler (field order drops the handler first).
        let handler = unsafe {
            FaultHandler::start(
                family.clone(),
                region.addr(),
                region.len(),
                avoid,
                Arc::new(move |e: &FaultError| sink.lock().unwrap().push(e.clone())),
            )
        }
        .unwrap();
        Self {
            handler,
            region,
            failures,
        }
    }

    pub fn failures(&self) -> Vec<FaultError> {
        self.failures.lock().unwrap().clone()
    }
}

/// Avoidance from the image's data runs and `free` runs.
pub fn avoid(image: &Image, free: &[(u64, u64)]) -> AvoidMap {
    AvoidMap::new(image.pages, &image.data_runs, free).unwrap()
}

/// Waits (bounded) until `done` holds.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + BOUND;
    while !done() {
        assert!(Instant::now() < until, "{what}: not within {BOUND:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Threads of this process whose name starts with `prefix`.
pub fn threads_named(prefix: &str) -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            comm.starts_with(prefix).then_some(tid)
        })
        .collect()
}

/// User + system CPU time of thread `tid`, in clock ticks.
pub fn cpu_ticks(tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the parenthesised name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}
