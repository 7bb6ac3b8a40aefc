//! Real userfaultfd faults from threads of this process, served by a fault
//! handler whose pages come from a server thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snowflock_fault_handler::{
    AvoidMap, Family, FaultError, FaultHandler, FetchConfig, PAGE_SIZE, PageSource,
};

const PAGES: u64 = 256;

/// The "parent's memory": page `p` is filled with `p as u8 ^ 0xa5`, except
/// zero pages.
fn image_byte(page: u64) -> u8 {
    (page as u8) ^ 0xa5
}

/// A page server on its own thread, as the network transport would be.
struct ServerThread {
    requests: Mutex<mpsc::Sender<Vec<u64>>>,
    seen: Arc<Mutex<Vec<u64>>>,
}

impl PageSource for ServerThread {
    fn request(&self, _family: u64, pages: &[u64]) {
        self.seen.lock().unwrap().extend_from_slice(pages);
        let _ = self.requests.lock().unwrap().send(pages.to_vec());
    }
}

/// A family whose pages come from a server thread that answers after
/// `delay`, or never when `answer` is false.
fn family(delay: Duration, answer: bool, timeout: Duration) -> (Arc<Family>, Arc<Mutex<Vec<u64>>>) {
    let (tx, rx) = mpsc::channel::<Vec<u64>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let source = Arc::new(ServerThread {
        requests: Mutex::new(tx),
        seen: seen.clone(),
    });
    let family = Family::new(
        7,
        PAGES * PAGE_SIZE,
        source,
        FetchConfig {
            fetch_timeout: timeout,
            prefetch_pages: 3,
        },
    )
    .unwrap();
    let weak = Arc::downgrade(&family);
    std::thread::spawn(move || {
        while let Ok(pages) = rx.recv() {
            if !answer {
                continue;
            }
            std::thread::sleep(delay);
            let Some(family) = weak.upgrade() else { break };
            let data: Vec<(u64, Vec<u8>)> = pages
                .iter()
                .map(|&p| (p, vec![image_byte(p); PAGE_SIZE as usize]))
                .collect();
            let batch: Vec<(u64, &[u8])> = data.iter().map(|(p, d)| (*p, d.as_slice())).collect();
            family.deliver_batch(&batch);
        }
    });
    (family, seen)
}

/// A private anonymous region nothing has touched.
struct Region(*mut u8);
// SAFETY: plain memory, read through raw pointers only.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn new() -> Self {
        // SAFETY: a fresh anonymous mapping chosen by the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (PAGES * PAGE_SIZE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Self(ptr.cast())
    }

    fn read(&self, page: u64, offset: u64) -> u8 {
        // SAFETY: inside the mapping; faults are served by the handler.
        unsafe {
            std::ptr::read_volatile(self.0.wrapping_add((page * PAGE_SIZE + offset) as usize))
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used.
        unsafe { libc::munmap(self.0.cast(), (PAGES * PAGE_SIZE) as usize) };
    }
}

fn start(
    family: &Arc<Family>,
    region: &Region,
    avoid: AvoidMap,
) -> (FaultHandler, Arc<AtomicUsize>) {
    let failures = Arc::new(AtomicUsize::new(0));
    let counter = failures.clone();
    // SAFETY: the region is a fresh private anonymous mapping that outlives
    // the handler (dropped first in every test).
    let handler = unsafe {
        FaultHandler::start(
            family.clone(),
            region.0,
            PAGES * PAGE_SIZE,
            avoid,
            Arc::new(move |_: &FaultError| {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }
    .unwrap();
    (handler, failures)
}

/// Data pages: 0..128; free heap: 100..128 (so data but avoided); 128.. zero.
fn avoid_map() -> AvoidMap {
    AvoidMap::new(PAGES, &[(0, 128)], &[(100, 28)]).unwrap()
}

/// Reads `pages` on another thread with a bound, returning the first byte of each.
fn touch(region: &Arc<Region>, pages: Vec<u64>) -> Vec<u8> {
    let r = region.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let bytes: Vec<u8> = pages.iter().map(|&p| r.read(p, 17)).collect();
        let _ = tx.send(bytes);
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("touching pages hung")
}

#[test]
fn fetched_pages_hold_the_image_and_avoided_pages_are_zero_without_requests() {
    let (family, seen) = family(Duration::from_millis(1), true, Duration::from_secs(10));
    let region = Arc::new(Region::new());
    let (handler, failures) = start(&family, &region, avoid_map());
    let bytes = touch(&region, vec![0, 1, 5, 40, 99]);
    assert_eq!(bytes, [0, 1, 5, 40, 99].map(|p: u64| image_byte(p)));
    // Free-heap and zero pages read as zero and are never requested.
    assert_eq!(touch(&region, vec![100, 127, 128, 200, 255]), vec![0; 5]);
    handler.mark_fresh(&[(60, 4)]);
    assert_eq!(touch(&region, vec![61]), vec![0]);
    let requested = seen.lock().unwrap().clone();
    assert!(
        requested.iter().all(|&p| p < 100 && !(60..64).contains(&p)),
        "{requested:?}"
    );
    let stats = handler.stats();
    assert!(stats.faults >= 6, "{stats:?}");
    assert!(
        stats.avoided.zero >= 1 && stats.avoided.free_heap >= 1 && stats.avoided.fresh >= 1,
        "{stats:?}"
    );
    assert!(stats.pages_fetched >= 5, "{stats:?}");
    // Prefetch brought pages 2..=4 along with page 1.
    assert!(stats.prefetched >= 1, "{stats:?}");
    assert!(stats.fetch_latency.count >= 3, "{stats:?}");
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert!(handler.failure().is_none());
    drop(handler);
}

#[test]
fn a_second_clone_is_served_from_the_host_cache() {
    let (family, seen) = family(Duration::ZERO, true, Duration::from_secs(10));
    let first = Arc::new(Region::new());
    let (h1, _) = start(&family, &first, avoid_map());
    touch(&first, (0..50).collect());
    let requests_after_first = seen.lock().unwrap().len();
    let second = Arc::new(Region::new());
    let (h2, _) = start(&family, &second, avoid_map());
    let bytes = touch(&second, (0..50).collect());
    assert_eq!(bytes, (0..50).map(image_byte).collect::<Vec<_>>());
    assert_eq!(
        seen.lock().unwrap().len(),
        requests_after_first,
        "second clone fetched again"
    );
    let stats = h2.stats();
    assert_eq!(stats.pages_fetched, 0, "{stats:?}");
    assert_eq!(stats.cache_hits, 50, "{stats:?}");
    assert_eq!(family.stats().resident_pages, family.stats().pages_received);
    drop((h1, h2));
}

#[test]
fn an_unanswered_request_fails_the_clone_in_bounded_time_and_releases_it() {
    let (family, _) = family(Duration::ZERO, false, Duration::from_millis(300));
    let region = Arc::new(Region::new());
    let (handler, failures) = start(&family, &region, avoid_map());
    let began = Instant::now();
    // The fault is released (with a zero page) once the request times out.
    assert_eq!(touch(&region, vec![3]), vec![0]);
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(failures.load(Ordering::SeqCst), 1);
    assert!(
        matches!(
            handler.failure(),
            Some(FaultError::Timeout { page: 3..=6, .. })
        ),
        "{:?}",
        handler.failure()
    );
    drop(handler);
}

#[test]
fn a_lost_source_fails_every_waiting_clone_once() {
    let (family, _) = family(Duration::ZERO, false, Duration::from_secs(30));
    let region = Arc::new(Region::new());
    let (handler, failures) = start(&family, &region, avoid_map());
    let r = region.clone();
    let waiting = Arc::new(AtomicBool::new(true));
    let w = waiting.clone();
    let reader = std::thread::spawn(move || {
        let byte = r.read(9, 0);
        w.store(false, Ordering::SeqCst);
        byte
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        waiting.load(Ordering::SeqCst),
        "fault should wait for the source"
    );
    family.fail("connection closed".into());
    family.fail("again".into());
    let deadline = Instant::now() + Duration::from_secs(5);
    while waiting.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !waiting.load(Ordering::SeqCst),
        "faulting thread still blocked"
    );
    assert_eq!(reader.join().unwrap(), 0);
    assert_eq!(failures.load(Ordering::SeqCst), 1);
    assert_eq!(
        handler.failure(),
        Some(FaultError::SourceLost("connection closed".into()))
    );
    // A clone started on a failed family fails at once.
    let late = Arc::new(Region::new());
    let (late_handler, late_failures) = start(&family, &late, avoid_map());
    assert_eq!(late_failures.load(Ordering::SeqCst), 1);
    assert!(late_handler.failure().is_some());
}

#[test]
fn local_round_trip_latency() {
    let (family, _) = family(Duration::ZERO, true, Duration::from_secs(10));
    let region = Arc::new(Region::new());
    let (handler, _) = start(
        &family,
        &region,
        AvoidMap::new(PAGES, &[(0, PAGES)], &[]).unwrap(),
    );
    touch(&region, (0..PAGES).step_by(4).collect());
    let s = handler.stats();
    eprintln!(
        "process uffd fault via server thread: p50 {} us, p99 {} us over {} faults",
        s.fetch_latency.p50_us, s.fetch_latency.p99_us, s.fetch_latency.count
    );
    assert_eq!(s.fetch_latency.count, PAGES / 4, "{s:?}");
}
