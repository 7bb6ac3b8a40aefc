//! Real userfaultfd faults from threads of this process, served by fault
//! handlers whose pages come from a page server thread reading a frozen
//! image (a memfd).
//!
//! Tests run in parallel; the one that counts descriptors and threads of
//! the whole process takes [`SERIAL`] exclusively, all others share it.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use common::{
    BOUND, Clone, Image, Mode, PROMPT, Region, avoid, bounded, config, cpu_ticks, family,
    in_thread_family, threads_named, touch, wait_for,
};
use snowflock_fault_handler::{
    AvoidError, AvoidMap, AvoidedPages, CloneStats, Family, FaultError, FaultHandler, InsertError,
    PAGE_SIZE, PageSource, StartError,
};

/// Orders the tests that must run alone; a failed test poisons it, and the others still run.
static SERIAL: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    snowflock_sync::read(&SERIAL)
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    snowflock_sync::write(&SERIAL)
}

const ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Reads page `page` of `region` on a thread of its own; the receiver gets
/// the bytes once the fault is resolved.
fn reader(region: &Arc<Region>, page: u64) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    let region = region.clone();
    std::thread::spawn(move || {
        let _ = tx.send(region.read(page));
    });
    rx
}

/// Asserts that `rx`'s reader is still blocked in its fault.
fn assert_blocked(rx: &mpsc::Receiver<Vec<u8>>) {
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(150)).err(),
        Some(mpsc::RecvTimeoutError::Timeout),
        "the fault should still wait"
    );
}

fn received(rx: &mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    rx.recv_timeout(BOUND)
        .expect("the faulting thread was not released")
}

#[test]
fn touched_pages_hold_the_image() {
    let _serial = shared();
    let image = Image::new(512, &[(0, 300), (400, 50)]);
    let (family, server) = family(0x101, &image, PROMPT, config(0, BOUND));
    let clone = Clone::start(&family, avoid(&image, &[]));
    let data: Vec<u64> = (0..300).chain(400..450).collect();
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let pages: Vec<u64> = data.iter().copied().skip(t).step_by(4).collect();
            let region = clone.region.clone();
            std::thread::spawn(move || {
                pages
                    .into_iter()
                    .map(|p| (p, region.read(p)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let pages = bounded("four touching threads", move || {
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(pages.len(), data.len());
    for (page, bytes) in pages {
        assert!(bytes == Image::expected(page), "page {page:#x} differs");
    }
    let mut requested = server.requested();
    requested.sort_unstable();
    assert_eq!(requested, data);
    let stats = clone.handler.stats();
    assert_eq!(
        (
            stats.faults,
            stats.pages_fetched,
            stats.cache_hits,
            stats.prefetched
        ),
        (350, 350, 0, 0),
        "{stats:?}"
    );
    assert_eq!(stats.fetch_latency.count, 350);
    assert_eq!(stats.latency.count, 350);
    let family_stats = family.stats();
    assert_eq!(
        (
            family_stats.pages_received,
            family_stats.resident_pages,
            family_stats.outstanding,
            family_stats.clones
        ),
        (350, 350, 0, 1)
    );
    assert!(clone.failures().is_empty());
}

#[test]
fn avoided_pages_read_zero_and_are_never_requested() {
    let _serial = shared();
    // Data 0..192 (128..192 free heap at the clone point); 192.. zero.
    let image = Image::new(512, &[(0, 192)]);
    let (family, server) = family(0x102, &image, PROMPT, config(4, BOUND));
    let clone = Clone::start(&family, avoid(&image, &[(128, 64)]));
    // Fresh since the clone point: 64..264, where free heap and zero win.
    clone.handler.mark_fresh(&[(64, 200)]);
    // Sequential faults just below the fresh pages: prefetch stops there.
    let got = touch(&clone.region, [60, 61, 62, 63]);
    for (page, bytes) in (60..64).zip(got) {
        assert!(bytes == Image::expected(page), "page {page:#x} differs");
    }
    let zeros = touch(&clone.region, 64..512);
    for (page, bytes) in (64..512).zip(zeros) {
        assert!(bytes == ZEROS, "avoided page {page:#x} is not zero");
    }
    assert_eq!(*server.seen.lock().unwrap(), [vec![60], vec![61, 62, 63]]);
    let stats = clone.handler.stats();
    assert_eq!(
        stats.avoided,
        AvoidedPages {
            zero: 320,
            free_heap: 64,
            fresh: 64
        },
        "{stats:?}"
    );
    // Two fetched faults, one per avoided 64-page window.
    assert_eq!((stats.faults, stats.latency.count), (9, 9), "{stats:?}");
    assert_eq!((stats.pages_fetched, stats.prefetched), (4, 2), "{stats:?}");
    assert!(clone.failures().is_empty());
}

#[test]
fn a_second_clone_is_served_from_the_host_cache() {
    let _serial = shared();
    let image = Image::new(256, &[(0, 256)]);
    let (family, server) = family(0x103, &image, PROMPT, config(0, BOUND));
    let first = Clone::start(&family, avoid(&image, &[]));
    touch(&first.region, 0..50);
    let requests = server.requested().len();
    let second = Clone::start(&family, avoid(&image, &[]));
    let got = touch(&second.region, 0..50);
    for (page, bytes) in (0..50).zip(got) {
        assert!(bytes == Image::expected(page), "page {page:#x} differs");
    }
    assert_eq!(
        server.requested().len(),
        requests,
        "the second clone fetched"
    );
    // The pages are in the cache the second clone maps: the kernel maps them
    // on first touch, and no fault reaches the handler.
    let stats = second.handler.stats();
    assert_eq!(
        (stats.faults, stats.cache_hits, stats.pages_fetched),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(
        (stats.latency.count, stats.fetch_latency.count),
        (0, 0),
        "{stats:?}"
    );
    let family_stats = family.stats();
    assert_eq!((family_stats.pages_received, family_stats.clones), (50, 2));
}

#[test]
fn prefetch_installs_following_pages_of_sequential_faults() {
    let _serial = shared();
    let image = Image::new(256, &[(0, 256)]);
    let (family, server) = family(0x104, &image, PROMPT, config(4, BOUND));
    let clone = Clone::start(&family, avoid(&image, &[]));
    touch(&clone.region, [10, 11]);
    assert_eq!(
        *server.seen.lock().unwrap(),
        [vec![10], vec![11, 12, 13, 14, 15]]
    );
    // The prefetched pages are there: touching them faults no more.
    let got = touch(&clone.region, 12..16);
    for (page, bytes) in (12..16).zip(got) {
        assert!(bytes == Image::expected(page), "page {page:#x} differs");
    }
    let stats = clone.handler.stats();
    assert_eq!(
        (stats.faults, stats.pages_fetched, stats.prefetched),
        (2, 6, 4),
        "{stats:?}"
    );
    // Random access gets no prefetch.
    touch(&clone.region, [100, 50]);
    assert_eq!(server.seen.lock().unwrap()[2..], [vec![100], vec![50]]);
}

#[test]
fn a_batch_is_copied_without_waking_then_woken_per_run() {
    let _serial = shared();
    let image = Image::new(256, &[(0, 256)]);
    let mode = Mode::Answer {
        delay: Duration::ZERO,
        batch: Duration::from_millis(300),
    };
    let (family, server) = family(0x105, &image, mode, config(0, BOUND));
    let clone = Clone::start(&family, avoid(&image, &[]));
    let pages = [3u64, 4, 5, 9, 20, 21, 40, 41];
    let barrier = Arc::new(Barrier::new(pages.len()));
    let readers: Vec<_> = pages
        .iter()
        .map(|&p| {
            let (region, barrier) = (clone.region.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                region.read(p)
            })
        })
        .collect();
    let got = bounded("eight faulting threads", move || {
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (&page, bytes) in pages.iter().zip(got) {
        assert!(bytes == Image::expected(page), "page {page:#x} differs");
    }
    // All eight arrived in one delivery, which released all eight faults.
    assert_eq!(*server.batches.lock().unwrap(), [8]);
    let stats = clone.handler.stats();
    assert_eq!(
        (stats.faults, stats.pages_fetched, stats.fetch_latency.count),
        (8, 8, 8),
        "{stats:?}"
    );
    assert!(stats.fetch_latency.p50_us >= 100_000, "{stats:?}");
}

#[test]
fn an_unanswered_request_fails_the_clone_in_bounded_time() {
    let _serial = shared();
    let image = Image::new(64, &[(0, 64)]);
    let timeout = Duration::from_millis(300);
    let (family, server) = family(0x106, &image, Mode::Silent, config(0, timeout));
    let clone = Clone::start(&family, avoid(&image, &[]));
    let began = Instant::now();
    assert!(touch(&clone.region, [3])[0] == ZEROS);
    let took = began.elapsed();
    assert!(took >= timeout && took < timeout * 10, "{took:?}");
    let expected = FaultError::Timeout { page: 3, timeout };
    assert_eq!(clone.failures(), std::slice::from_ref(&expected));
    assert_eq!(clone.handler.failure(), Some(expected.clone()));
    assert_eq!(family.failure(), Some(expected.clone()));
    assert_eq!(
        expected.to_string(),
        "page 0x3 was not delivered within 300ms"
    );
    // Later faults neither wait nor fetch.
    assert!(touch(&clone.region, [4, 5]).iter().all(|p| *p == ZEROS));
    assert_eq!(server.requested(), [3]);
    assert_eq!(clone.failures().len(), 1);
    // A clone started on the failed family is refused.
    let region = Region::of(&family);
    // SAFETY: a fresh private view of the family's cache that outlives the attempt.
    let refused = unsafe {
        FaultHandler::start(
            family.clone(),
            region.addr(),
            region.len(),
            avoid(&image, &[]),
            Arc::new(|_: &FaultError| {}),
        )
    };
    assert!(
        matches!(refused, Err(StartError::FamilyFailed(ref e)) if *e == expected),
        "{refused:?}"
    );
}

#[test]
fn a_lost_source_fails_every_clone_once() {
    let _serial = shared();
    let image = Image::new(64, &[(0, 64)]);
    let (family, _server) = family(0x107, &image, Mode::Silent, config(0, BOUND * 3));
    let a = Clone::start(&family, avoid(&image, &[]));
    let b = Clone::start(&family, avoid(&image, &[]));
    let (in_a, in_b) = (reader(&a.region, 9), reader(&b.region, 10));
    assert_blocked(&in_a);
    assert_blocked(&in_b);
    family.fail("connection closed".into());
    family.fail("closed again".into());
    assert!(received(&in_a) == ZEROS);
    assert!(received(&in_b) == ZEROS);
    let expected = FaultError::SourceLost {
        reason: "connection closed".into(),
        pages_received: 0,
    };
    assert_eq!(a.failures(), std::slice::from_ref(&expected));
    assert_eq!(b.failures(), std::slice::from_ref(&expected));
    assert_eq!(
        expected.to_string(),
        "memory server lost after 0 pages: connection closed"
    );
    assert_eq!(family.stats().outstanding, 0);
}

#[test]
fn a_dying_fault_thread_fails_the_family_on_this_host() {
    struct Panicking;
    impl PageSource for Panicking {
        fn request(&self, _family: u64, pages: &[u64]) {
            panic!("transport bug at {pages:?}");
        }
    }
    let _serial = shared();
    let family = Family::new(0x108, 64 * PAGE_SIZE, Arc::new(Panicking), config(0, BOUND)).unwrap();
    let clone = Clone::start(&family, AvoidMap::new(64, &[(0, 64)], &[]).unwrap());
    assert!(touch(&clone.region, [1])[0] == ZEROS);
    let died = FaultError::HandlerDied {
        reason: "the fault thread panicked".into(),
    };
    assert_eq!(clone.failures(), std::slice::from_ref(&died));
    // Its siblings share the cache its unregistered region could fill with zeros.
    assert_eq!(family.failure(), Some(died));
    // The thread is gone; the unregistered region still serves zeros.
    assert!(touch(&clone.region, [2, 3]).iter().all(|p| *p == ZEROS));
}

#[test]
fn malformed_deliveries_fail_the_family() {
    let _serial = shared();
    let image = Image::new(64, &[(0, 64)]);
    let (short, _server) = family(0x109, &image, Mode::Short, config(0, BOUND));
    let clone = Clone::start(&short, avoid(&image, &[]));
    assert!(touch(&clone.region, [2])[0] == ZEROS);
    let expected = FaultError::BadDelivery(InsertError::BadLength { page: 2, len: 100 });
    assert_eq!(clone.failures(), std::slice::from_ref(&expected));
    assert_eq!(short.failure(), Some(expected));

    let (family, _server) = family(0x10a, &image, Mode::Silent, config(0, BOUND * 3));
    let clone = Clone::start(&family, avoid(&image, &[]));
    let waiting = reader(&clone.region, 1);
    assert_blocked(&waiting);
    family.deliver_batch(&[(64, &ZEROS)]);
    assert!(received(&waiting) == ZEROS);
    assert_eq!(
        clone.failures(),
        [FaultError::BadDelivery(InsertError::OutOfRange {
            page: 64,
            pages: 64
        })]
    );
}

#[test]
fn pages_pushed_after_a_clone_wrote_never_replace_its_writes() {
    let _serial = shared();
    // Data 0..128 (96..128 free heap at the clone point, so zero-filled when touched).
    let image = Image::new(128, &[(0, 128)]);
    let (family, server) = family(0x130, &image, PROMPT, config(0, BOUND));
    let clone = Clone::start(&family, avoid(&image, &[(96, 32)]));
    // A fetched page and a zero-filled one, both written by the clone.
    clone.region.write(5, 0, 0xa5);
    clone.region.write(100, 0, 0x5a);
    let requested = server.requested();
    // The push brings other bytes for them (as if the image were another) and a page nobody
    // touched yet.
    let pushed: Vec<(u64, Vec<u8>)> = [5, 100, 7]
        .into_iter()
        .map(|page| (page, vec![0xee; PAGE_SIZE as usize]))
        .collect();
    let batch: Vec<(u64, &[u8])> = pushed.iter().map(|(p, d)| (*p, &d[..])).collect();
    family.deliver_batch(&batch);
    // The cached page is not written again; the clone's own copies are untouched.
    assert!(family.cache().read_page(5).unwrap() == Image::expected(5));
    let mut written = Image::expected(5);
    written[0] = 0xa5;
    assert!(
        clone.region.read(5) == written,
        "a push replaced a written page"
    );
    let mut zero_written = vec![0u8; PAGE_SIZE as usize];
    zero_written[0] = 0x5a;
    assert!(
        clone.region.read(100) == zero_written,
        "a push replaced a written zero page"
    );
    // The untouched page is the pushed one, mapped without a fault.
    let faults = clone.handler.stats().faults;
    assert!(clone.region.read(7) == vec![0xee; PAGE_SIZE as usize]);
    assert_eq!(clone.handler.stats().faults, faults);
    assert_eq!(server.requested(), requested, "nothing more was fetched");
    assert!(clone.failures().is_empty());
}

#[test]
fn concurrent_duplicate_deliveries_install_each_page_once() {
    let _serial = shared();
    let image = Image::new(256, &[(0, 256)]);
    let (family, _server) = family(0x10b, &image, Mode::Twice, config(8, BOUND));
    let clone = Clone::start(&family, avoid(&image, &[]));
    let got = touch(&clone.region, 0..256);
    for (page, bytes) in (0..256).zip(got) {
        assert!(bytes == Image::expected(page), "page {page:#x} differs");
    }
    let stats = clone.handler.stats();
    assert_eq!(stats.pages_fetched, 256, "{stats:?}");
    assert_eq!(family.stats().pages_received, 256);
    assert_eq!(family.cache().resident_pages(), 256);
    assert!(clone.failures().is_empty());
}

#[test]
fn stats_add_up() {
    let _serial = shared();
    let image = Image::new(256, &[(0, 128)]);
    let (family, _server) = family(0x10c, &image, PROMPT, config(2, BOUND));
    let a = Clone::start(&family, avoid(&image, &[(64, 64)]));
    // 0: fetched; 1: fetched, sequential, so 2 and 3 come along and are
    // then read without a fault; 64: a free-heap window; 200: a zero one.
    touch(&a.region, [0, 1, 2, 3, 64, 200]);
    let b = Clone::start(&family, avoid(&image, &[(64, 64)]));
    touch(&b.region, 0..4);

    let sa = a.handler.stats();
    assert_eq!(
        (
            sa.faults,
            sa.pages_fetched,
            sa.bytes_fetched,
            sa.prefetched,
            sa.cache_hits
        ),
        (4, 4, 4 * PAGE_SIZE, 2, 0),
        "{sa:?}"
    );
    assert_eq!(
        sa.avoided,
        AvoidedPages {
            zero: 64,
            free_heap: 64,
            fresh: 0
        }
    );
    assert_eq!(sa.avoided.total(), 128);
    assert_eq!((sa.latency.count, sa.fetch_latency.count), (4, 2));
    // Each fault resolved one way: network, cache, or a zero-fill window.
    assert_eq!(
        sa.faults,
        (sa.pages_fetched - sa.prefetched) + sa.cache_hits + 2
    );

    // b maps the pages a fetched straight from the cache.
    let sb = b.handler.stats();
    assert_eq!(
        (sb.faults, sb.cache_hits, sb.pages_fetched, sb.latency.count),
        (0, 0, 0, 0),
        "{sb:?}"
    );
    let fs = family.stats();
    assert_eq!(
        (
            fs.pages_received,
            fs.bytes_received,
            fs.resident_pages,
            fs.outstanding,
            fs.clones
        ),
        (4, 4 * PAGE_SIZE, 4, 0, 2)
    );
    for s in [&sa.latency, &sa.fetch_latency] {
        assert!(s.p50_us <= s.p90_us && s.p90_us <= s.p99_us && s.p99_us <= s.max_us);
        assert!(
            s.mean_us > 0.0 && s.mean_us <= s.max_us as f64 + 1.0,
            "{s:?}"
        );
        assert_eq!(s.buckets.iter().map(|&(_, n)| n).sum::<u64>(), s.count);
        assert!(s.buckets.windows(2).all(|w| w[0].0 < w[1].0), "{s:?}");
    }
    let json = serde_json::to_string(&sa).unwrap();
    assert_eq!(serde_json::from_str::<CloneStats>(&json).unwrap(), sa);
}

#[test]
fn close_releases_faults_and_never_touches_the_region_again() {
    let _serial = shared();
    let image = Image::new(64, &[(0, 64)]);
    let (old, _old_server) = family(0x10d, &image, Mode::Silent, config(0, BOUND * 3));
    let Clone {
        handler, region, ..
    } = Clone::start(&old, avoid(&image, &[]));
    let waiting = reader(&region, 7);
    assert_blocked(&waiting);
    drop(handler);
    // Unregistered: the kernel fills the page with zeros.
    assert!(received(&waiting) == ZEROS);
    assert_eq!(old.stats().clones, 0);
    assert_eq!(old.stats().outstanding, 0);
    let (new, _new_server) = family(0x10e, &image, Mode::Silent, config(0, BOUND * 3));

    // Another clone's memory lands at the same address...
    let reused = Arc::new(
        Arc::into_inner(region)
            .expect("the reader is done")
            .replace(&new),
    );
    // SAFETY: a fresh private view of the new family's cache that outlives the handler.
    let handler = unsafe {
        FaultHandler::start(
            new.clone(),
            reused.addr(),
            reused.len(),
            avoid(&image, &[]),
            Arc::new(|_: &FaultError| {}),
        )
    }
    .unwrap();
    // ... and the old family's page arrives late: it goes to the old
    // cache only, never into the new clone.
    old.deliver_batch(&[(7, &Image::expected(7))]);
    assert!(old.cache().contains(7));
    let waiting = reader(&reused, 7);
    assert_blocked(&waiting);
    new.fail("test over".into());
    assert!(received(&waiting) == ZEROS);
    drop(handler);
}

#[test]
fn closing_is_bounded_while_the_source_blocks() {
    struct Stuck {
        entered: Mutex<mpsc::Sender<()>>,
        release: Mutex<mpsc::Receiver<()>>,
    }
    impl PageSource for Stuck {
        fn request(&self, _family: u64, _pages: &[u64]) {
            let _ = self.entered.lock().unwrap().send(());
            let _ = self.release.lock().unwrap().recv_timeout(BOUND);
        }
    }
    let _serial = shared();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let source = Arc::new(Stuck {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
    });
    let family = Family::new(0x10f, 64 * PAGE_SIZE, source, config(0, BOUND)).unwrap();
    let clone = Clone::start(&family, AvoidMap::new(64, &[(0, 64)], &[]).unwrap());
    let waiting = reader(&clone.region, 0);
    entered
        .recv_timeout(BOUND)
        .expect("the source was not asked");
    let began = Instant::now();
    clone.handler.close();
    let took = began.elapsed();
    assert!(took < Duration::from_secs(3), "close took {took:?}");
    assert!(received(&waiting) == ZEROS);
    release.send(()).unwrap();
    wait_for("the fault thread to end", || {
        threads_named("sf-faults-10f").is_empty()
    });
}

#[test]
fn an_idle_handler_does_not_spin() {
    let _serial = shared();
    let image = Image::new(64, &[(0, 64)]);
    let (family, _server) = family(0x110, &image, PROMPT, config(0, BOUND));
    let clone = Clone::start(&family, avoid(&image, &[]));
    touch(&clone.region, [0]);
    let threads = threads_named("sf-faults-110");
    assert_eq!(threads.len(), 1);
    let before = cpu_ticks(threads[0]);
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_ticks(threads[0]) - before;
    // Ten 50 ms ticks in half a second; a few clock ticks at most.
    assert!(used <= 5, "fault thread used {used} clock ticks while idle");
}

#[test]
fn start_checks_its_arguments() {
    let _serial = shared();
    let image = Image::new(64, &[(0, 64)]);
    let (family, _server) = family(0x111, &image, PROMPT, config(0, BOUND));
    let region = Region::of(&family);
    let attempt = |addr: *mut u8, len: u64, avoid: AvoidMap| {
        // SAFETY: every attempt is refused before it registers anything.
        unsafe {
            FaultHandler::start(
                family.clone(),
                addr,
                len,
                avoid,
                Arc::new(|_: &FaultError| {}),
            )
        }
    };
    let bad_region =
        |r: Result<FaultHandler, StartError>| matches!(r, Err(StartError::BadRegion { .. }));
    assert!(bad_region(attempt(
        region.addr().wrapping_add(1),
        region.len(),
        avoid(&image, &[])
    )));
    assert!(bad_region(attempt(
        region.addr(),
        region.len() - PAGE_SIZE,
        avoid(&image, &[])
    )));
    assert!(bad_region(attempt(
        std::ptr::null_mut(),
        region.len(),
        avoid(&image, &[])
    )));
    assert!(matches!(
        attempt(region.addr(), region.len(), AvoidMap::none(32).unwrap()),
        Err(StartError::AvoidMismatch {
            map: 32,
            region: 64
        })
    ));
    assert_eq!(
        AvoidMap::new(64, &[(60, 5)], &[]).err(),
        Some(AvoidError::OutOfRange {
            what: "data page",
            start: 60,
            count: 5,
            pages: 64
        })
    );
    // The region was never registered: it is plain memory.
    assert!(region.read(0) == ZEROS);
}

#[test]
fn handlers_leave_no_descriptors_threads_or_registrations_behind() {
    let _all = exclusive();
    // Descriptors of the kinds handlers and families own, by kind.
    let fds = || {
        let mut kinds: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .filter(|t| {
                ["userfaultfd", "io_uring", "eventfd", "snowflock-page-cache"]
                    .iter()
                    .any(|k| t.contains(k))
            })
            .collect();
        kinds.sort();
        kinds
    };
    let before = fds();
    {
        let image = Image::new(64, &[(0, 64)]);
        let (family, _server) = family(0x112, &image, PROMPT, config(0, BOUND));
        for page in 0..8 {
            let clone = Clone::start(&family, avoid(&image, &[]));
            assert!(touch(&clone.region, [page])[0] == Image::expected(page));
            let Clone {
                handler, region, ..
            } = clone;
            drop(handler);
            // Replaced: an untouched page is plain zero memory now, and the
            // cache was not touched (the next clone reads it right).
            assert!(touch(&region, [page + 1])[0] == ZEROS);
        }
        assert!(threads_named("sf-faults-112").is_empty());
        assert_eq!(family.stats().clones, 0);
    }
    // The server thread ends with its family.
    wait_for("descriptors to be closed", || fds() == before);
}

#[test]
fn marking_pages_fresh_races_safely_with_faults() {
    let _serial = shared();
    let image = Image::new(1024, &[(0, 1024)]);
    let (family, _server) = family(0x113, &image, PROMPT, config(0, BOUND));
    let clone = Arc::new(Clone::start(&family, avoid(&image, &[])));
    let marker = {
        let clone = clone.clone();
        std::thread::spawn(move || {
            for start in (512..1024).step_by(8) {
                clone.handler.mark_fresh(&[(start, 8)]);
            }
        })
    };
    let got = touch(&clone.region, (0..1024).rev());
    marker.join().unwrap();
    for (page, bytes) in (0..1024).rev().zip(got) {
        // A page below 512 holds the image; above, either the image (it
        // was fetched before it was marked) or zeros.
        let ok = bytes == Image::expected(page) || (page >= 512 && bytes == ZEROS);
        assert!(ok, "page {page:#x} holds neither the image nor zeros");
    }
    let stats = clone.handler.stats();
    assert_eq!(stats.pages_fetched + stats.avoided.fresh, 1024, "{stats:?}");
    assert!(clone.failures().is_empty());
}

/// Measurements for the crate's report; run with
/// `cargo test --release -p snowflock-fault-handler -- --ignored --nocapture`.
mod measure {
    use super::*;

    fn percentiles(mut us: Vec<f64>) -> (f64, f64) {
        us.sort_by(f64::total_cmp);
        let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
        (at(0.5), at(0.99))
    }

    /// Touches `pages` one at a time, timing each read; (p50, p99) in µs.
    fn timed_touches(region: &Arc<Region>, pages: Vec<u64>) -> (f64, f64) {
        let region = region.clone();
        let us = bounded("timed touches", move || {
            pages
                .iter()
                .map(|&p| {
                    let t = Instant::now();
                    region.write(p, 0, 1);
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect::<Vec<_>>()
        });
        percentiles(us)
    }

    fn report(what: &str, s: &snowflock_fault_handler::LatencySummary, side: (f64, f64)) {
        eprintln!(
            "{what}: handler p50 {} us p99 {} us (n={}); as the faulting thread sees it p50 {:.1} us p99 {:.1} us",
            s.p50_us, s.p99_us, s.count, side.0, side.1
        );
    }

    #[test]
    #[ignore = "measurement; run in release"]
    fn fault_round_trips() {
        let _serial = exclusive();
        const PAGES: u64 = 4096;
        let image = Image::new(PAGES, &[(0, PAGES)]);
        // Scattered pages, so no fault is served by prefetch or a window.
        let order: Vec<u64> = (0..PAGES).map(|i| (i * 2654435761) % PAGES).collect();

        let family = in_thread_family(0x201, &image, config(0, BOUND));
        let clone = Clone::start(&family, avoid(&image, &[]));
        let side = timed_touches(&clone.region, order.clone());
        report(
            "in-thread source",
            &clone.handler.stats().fetch_latency,
            side,
        );

        let second = Clone::start(&family, avoid(&image, &[]));
        let side = timed_touches(&second.region, order.clone());
        report("host cache hit", &second.handler.stats().latency, side);

        let (family, _server) = common::family(0x202, &image, PROMPT, config(0, BOUND));
        let clone = Clone::start(&family, avoid(&image, &[]));
        let side = timed_touches(&clone.region, order);
        report(
            "server thread source",
            &clone.handler.stats().fetch_latency,
            side,
        );
    }

    /// Touches pages `1..pages` of `region` once each; µs per page.
    fn touch_all(region: &Arc<Region>, write: bool) -> f64 {
        let region = region.clone();
        bounded("touching every page", move || {
            let t = Instant::now();
            for p in 1..region.pages {
                if write {
                    region.write(p, 0, 1);
                } else {
                    std::hint::black_box(region.read(p));
                }
            }
            t.elapsed().as_secs_f64() * 1e6 / (region.pages - 1) as f64
        })
    }

    #[test]
    #[ignore = "measurement; run in release"]
    fn zero_fill_cost() {
        let _serial = exclusive();
        const PAGES: u64 = 64 * 1024;
        let image = Image::new(PAGES, &[(0, 1)]);
        let all_data = Image::new(PAGES, &[(0, PAGES)]);
        let family = in_thread_family(0x203, &image, config(0, BOUND));
        let fresh_family = in_thread_family(0x204, &all_data, config(0, BOUND));
        for (what, write) in [("read", false), ("write", true)] {
            for fresh in [false, true] {
                let clone = if fresh {
                    let clone = Clone::start(&fresh_family, avoid(&all_data, &[]));
                    clone.handler.mark_fresh(&[(0, PAGES)]);
                    clone
                } else {
                    Clone::start(&family, avoid(&image, &[]))
                };
                let per_page = touch_all(&clone.region, write);
                let s = clone.handler.stats();
                eprintln!(
                    "zero-fill, {} pages, {what} touches: {per_page:.2} us per page ({} faults; handler per window p50 {} us p99 {} us)",
                    if fresh { "fresh" } else { "zero" },
                    s.faults,
                    s.latency.p50_us,
                    s.latency.p99_us
                );
            }
            let unhandled = in_thread_family(0x205, &image, config(0, BOUND));
            let plain = Arc::new(Region::of(&unhandled));
            eprintln!(
                "plain page-cache memory (no handler), {what} touches: {:.2} us per page",
                touch_all(&plain, write)
            );
        }
    }
}
