//! The fault thread's lifecycle: [`FaultHandler::start`] registers a
//! clone's region and spawns its thread, which runs the io_uring fault
//! loop (`ring`) and serves each fault read; a tick checks the family's
//! deadlines. [`FaultHandler::close`] ends the registration, stops the
//! thread (waiting a bounded time) and leaves the family. A drop guard
//! fails the family if the thread unwinds.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::FaultHandler;
use super::error::{FaultError, StartError};
use super::family::Family;
use super::install::CloneState;
use crate::PAGE_SIZE;
use crate::avoid::AvoidMap;
use crate::ring;
use crate::sync;
use crate::sys::{self, PageFault};

/// How long closing a handler waits for its fault thread to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

impl FaultHandler {
    /// Registers `[region_addr, region_addr + region_len)` with a new
    /// userfaultfd and starts serving its faults from `family`, zero-filling
    /// the pages `avoid` names. `on_failure` is called once, from whichever
    /// thread notices, if the clone's memory can no longer be served; it
    /// must be quick and must not close or drop this handler.
    ///
    /// # Safety
    /// The region must be a private mapping (`MAP_PRIVATE`) of the whole of
    /// `family.cache().memfd()`, from offset 0, that nothing has touched yet,
    /// into which no Rust reference points, and it must stay mapped at this
    /// address until [`FaultHandler::close`] returned or the handler was
    /// dropped; `close` replaces it with anonymous memory of the same size,
    /// which the caller then unmaps. Until then the handler writes
    /// into the range through userfaultfd ioctls, and the kernel applies
    /// those to whatever mapping is registered there at the time, even a
    /// different one (another clone's memory mapped at the same address).
    pub unsafe fn start(
        family: Arc<Family>,
        region_addr: *mut u8,
        region_len: u64,
        avoid: AvoidMap,
        on_failure: Arc<dyn Fn(&FaultError) + Send + Sync>,
    ) -> Result<Self, StartError> {
        let base = region_addr as u64;
        let pages = check_region(&family, base, region_len, &avoid)?;
        let uffd = sys::open_userfaultfd().map_err(StartError::Open)?;
        let offered = sys::api_handshake(&uffd).map_err(StartError::Api)?;
        check_ioctls("handshake", offered, sys::NEEDED_API_IOCTLS)?;
        let stop = sys::eventfd().map_err(StartError::EventFd)?;
        let stop_for_thread = stop.try_clone().map_err(StartError::EventFd)?;
        let ring = ring::FaultRing::new().map_err(StartError::Ring)?;
        let offered =
            sys::register(&uffd, base, region_len).map_err(|source| StartError::Register {
                addr: base,
                len: region_len,
                source,
            })?;
        let clone = Arc::new(CloneState::new(uffd, base, pages, avoid, on_failure));
        let handler = Self {
            clone: clone.clone(),
            family: family.clone(),
            stop,
            thread: Mutex::new(None),
        };
        // From here on, dropping `handler` undoes the registration.
        check_ioctls("range", offered, sys::NEEDED_RANGE_IOCTLS)?;
        family.admit(&clone).map_err(StartError::FamilyFailed)?;
        let thread = std::thread::Builder::new()
            .name(format!("sf-faults-{:x}", family.id()))
            .spawn(move || fault_thread(ring, &clone, &family, &stop_for_thread))
            .map_err(StartError::Thread)?;
        *sync::lock(&handler.thread) = Some(thread);
        Ok(handler)
    }

    /// Stops serving faults: replaces the region with private anonymous
    /// zero memory in one step (`MAP_FIXED`; a fault waiting in it retries
    /// there and reads zeros) and so ends its registration, stops the fault
    /// thread (waiting at most 2 s for it) and leaves the family. Replacing
    /// rather than unregistering keeps the family's cache out of reach: a
    /// fault on a hole of an unregistered view would make the kernel put a
    /// zero page into the cache, where every sibling would map it. After
    /// this returns, the handler never touches the region again, so it may
    /// be unmapped. Stats stay readable, with the pushed pages the clone
    /// used counted first (from its page map). Idempotent; `Drop` calls it.
    pub fn close(&self) {
        let pushed_used = self.clone.pushed_pages_used(self.family.cache());
        if !self.clone.close_region() {
            return;
        }
        if let Some(pages) = pushed_used {
            self.clone.stats.pushed_used(pages);
        }
        if let Err(e) = sys::signal(&self.stop) {
            tracing::warn!("signalling the fault thread to stop failed: {e}");
        }
        self.join_thread();
        self.family.forget(&self.clone, true);
    }

    /// Waits up to [`STOP_TIMEOUT`] for the signalled fault thread to end;
    /// one that does not is left to end on its own.
    fn join_thread(&self) {
        let thread = sync::lock(&self.thread).take();
        if let Some(thread) = thread {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                // A panic was reported through the death guard already.
                let _ = thread.join();
            } else {
                tracing::warn!(
                    timeout = ?STOP_TIMEOUT,
                    "fault thread did not stop in time; left to end on its own"
                );
            }
        }
    }
}

/// The region's pages, if `[base, base + len)` is a page-aligned view of
/// the whole of `family`'s memory that `avoid` covers.
fn check_region(family: &Family, base: u64, len: u64, avoid: &AvoidMap) -> Result<u64, StartError> {
    let family_len = family.cache().page_count() * PAGE_SIZE;
    if base == 0 || !base.is_multiple_of(PAGE_SIZE) || len != family_len {
        return Err(StartError::BadRegion {
            addr: base,
            len,
            family_len,
        });
    }
    let pages = len / PAGE_SIZE;
    if avoid.pages() != pages {
        return Err(StartError::AvoidMismatch {
            map: avoid.pages(),
            region: pages,
        });
    }
    Ok(pages)
}

fn check_ioctls(what: &'static str, offered: u64, needed: u64) -> Result<(), StartError> {
    if offered & needed == needed {
        Ok(())
    } else {
        Err(StartError::MissingIoctls {
            what,
            offered,
            needed,
        })
    }
}

/// Fails the clone if the fault thread unwinds.
struct DeathGuard<'a> {
    clone: &'a Arc<CloneState>,
    family: &'a Family,
}

impl Drop for DeathGuard<'_> {
    fn drop(&mut self) {
        self.family.fail_with_clone(
            self.clone,
            FaultError::HandlerDied {
                reason: "the fault thread panicked".into(),
            },
        );
    }
}

fn fault_thread(ring: ring::FaultRing, clone: &Arc<CloneState>, family: &Family, stop: &OwnedFd) {
    let guard = DeathGuard { clone, family };
    let result = ring.run(&clone.uffd, stop, |event| match event {
        ring::Event::Faults { faults, read_at } => {
            for &fault in faults {
                serve_fault(clone, family, fault, read_at);
            }
        }
        ring::Event::Tick => family.check_deadlines(Instant::now()),
    });
    std::mem::forget(guard);
    if let Err(e) = result {
        family.fail_with_clone(
            clone,
            FaultError::HandlerDied {
                reason: format!("reading faults failed: {e}"),
            },
        );
    }
}

/// Serves one fault read from the userfaultfd: a clone that failed gets a
/// zero page, a page installed meanwhile a wake, an avoided page a zero
/// fill (a refused fill fails the family); any other page is the family's
/// to fetch.
fn serve_fault(clone: &Arc<CloneState>, family: &Family, fault: PageFault, read_at: Instant) {
    let Some(page) = clone.page_of(fault.address) else {
        tracing::warn!(
            address = fault.address,
            "fault outside the registered region ignored"
        );
        return;
    };
    clone.stats.fault();
    if clone.failure.get().is_some() {
        clone.zero_after_failure(page);
        return;
    }
    if clone.is_installed(page) {
        // Installed (or being installed) since the fault was raised.
        clone.stats.latency(read_at.elapsed(), false);
        clone.wake(page, 1);
        return;
    }
    if clone.avoid.reason(page).is_some() {
        if let Err(error) = clone.zero_fill(fault, page, read_at) {
            family.fail_with(error);
        }
        return;
    }
    family.fetch(clone, page, read_at);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_needed_ioctl_must_be_offered() {
        assert!(check_ioctls("range", 0b1110, 0b0110).is_ok());
        assert!(check_ioctls("range", 0b0110, 0b0110).is_ok());
        let error = check_ioctls("handshake", 0b0100, 0b0110).unwrap_err();
        assert!(matches!(
            error,
            StartError::MissingIoctls {
                what: "handshake",
                offered: 0b0100,
                needed: 0b0110,
            }
        ));
    }
}
