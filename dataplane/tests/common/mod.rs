//! Helpers shared by the end-to-end tests: page stores, a recording sink, bounded waits.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use snowflock_dataplane::{PAGE_SIZE, PageSink, PageStore};

/// Upper bound of every wait in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Deterministic contents of `page` of `family`, different for every (family, page).
pub fn pattern(family: u64, page: u64) -> Vec<u8> {
    let mut state = (family << 40 ^ page).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..PAGE_SIZE)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A frozen image held in a `Vec`.
pub struct VecStore {
    pages: Vec<Vec<u8>>,
}

impl VecStore {
    pub fn new(family: u64, pages: u64) -> VecStore {
        VecStore {
            pages: (0..pages).map(|page| pattern(family, page)).collect(),
        }
    }
}

impl PageStore for VecStore {
    fn page_count(&self) -> u64 {
        self.pages.len() as u64
    }

    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        let data = usize::try_from(page)
            .ok()
            .and_then(|page| self.pages.get(page))
            .ok_or_else(|| io::Error::other("no such page"))?;
        buf.copy_from_slice(data);
        Ok(())
    }
}

/// A frozen image in a memfd, read with pread like the control plane's image.
pub struct MemfdStore {
    file: File,
    pages: u64,
}

impl MemfdStore {
    pub fn new(family: u64, pages: u64) -> MemfdStore {
        let name = CString::new("sf-dataplane-test").unwrap();
        // SAFETY: `name` is a NUL-terminated string that outlives the call; MFD_CLOEXEC is a
        // valid flag. The call has no other memory effects.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut file = File::from(fd);
        for page in 0..pages {
            file.write_all(&pattern(family, page)).unwrap();
        }
        MemfdStore { file, pages }
    }
}

impl PageStore for MemfdStore {
    fn page_count(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        self.file.read_exact_at(buf, page * PAGE_SIZE as u64)
    }
}

/// A store whose reads all fail.
pub struct BrokenStore;

impl PageStore for BrokenStore {
    fn page_count(&self) -> u64 {
        8
    }

    fn read_page(&self, _page: u64, _buf: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        Err(io::Error::other("disk on fire"))
    }
}

/// A store that takes a while per page, so a stream of replies lasts long enough to be cut.
pub struct SlowStore {
    pub inner: VecStore,
    pub delay: Duration,
}

impl PageStore for SlowStore {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }

    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        thread::sleep(self.delay);
        self.inner.read_page(page, buf)
    }
}

#[derive(Default)]
struct Received {
    pages: HashMap<u64, Vec<u8>>,
    deliveries: u64,
    batches: u64,
    failures: Vec<String>,
}

/// Records what a client delivers; lets the test wait for it.
#[derive(Default)]
pub struct RecordingSink {
    received: Mutex<Received>,
    changed: Condvar,
}

impl PageSink for RecordingSink {
    fn deliver_batch(&self, pages: &[(u64, &[u8])]) {
        let mut received = self.received.lock().unwrap();
        received.batches += 1;
        for (page, data) in pages {
            received.deliveries += 1;
            received.pages.insert(*page, data.to_vec());
        }
        self.changed.notify_all();
    }

    fn failed(&self, reason: String) {
        self.received.lock().unwrap().failures.push(reason);
        self.changed.notify_all();
    }
}

impl RecordingSink {
    /// Waits until `done` holds for what was received; panics after [`TIMEOUT`].
    fn wait(&self, what: &str, mut done: impl FnMut(&Received) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        let mut received = self.received.lock().unwrap();
        while !done(&received) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            received = self.changed.wait_timeout(received, left).unwrap().0;
        }
    }

    /// Waits until `count` distinct pages have arrived.
    pub fn wait_for_pages(&self, count: usize) {
        self.wait(&format!("{count} pages"), |r| r.pages.len() >= count);
    }

    /// Waits until `failed` was called; returns the reason.
    pub fn wait_for_failure(&self) -> String {
        self.wait("a failure", |r| !r.failures.is_empty());
        self.failures()[0].clone()
    }

    pub fn page(&self, page: u64) -> Option<Vec<u8>> {
        self.received.lock().unwrap().pages.get(&page).cloned()
    }

    pub fn take(&self, page: u64) -> Option<Vec<u8>> {
        self.received.lock().unwrap().pages.remove(&page)
    }

    pub fn failures(&self) -> Vec<String> {
        self.received.lock().unwrap().failures.clone()
    }

    pub fn deliveries(&self) -> u64 {
        self.received.lock().unwrap().deliveries
    }

    pub fn batches(&self) -> u64 {
        self.received.lock().unwrap().batches
    }

    /// Waits for one page to arrive and removes it (for round-trip timing).
    pub fn wait_take(&self, page: u64) -> Vec<u8> {
        let deadline = Instant::now() + TIMEOUT;
        let mut received = self.received.lock().unwrap();
        loop {
            if let Some(data) = received.pages.remove(&page) {
                return data;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for page {page:#x}");
            received = self.changed.wait_timeout(received, left).unwrap().0;
        }
    }
}

/// Polls `condition` until it holds; panics after [`TIMEOUT`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}
