//! The page caches of clone points on this host, one [`FetchLink`] each:
//! shared by the clones of a clone point running here, and kept after the
//! last of them ended for as long as the parent's host serves the clone
//! point (a checkpoint keeps it served until its VM ends), so that the next
//! clones from the same checkpoint find every page the earlier ones
//! fetched or were pushed.
//!
//! A kept ("idle") cache leaves its multicast group, so the parent's host
//! pushes nothing more to it, and joins again when a clone of it starts.
//! Idle caches are bounded by a byte budget (`[limits] idle_cache_mib`):
//! past it the cache idle longest goes first. A cache goes at once when
//! the parent's host says its family ended, when the control connection to
//! that host is lost, and when its family failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use snowflock_fault_handler::FamilyStats;
use snowflock_vmm::memory::PAGE_SIZE;

use super::memory::{FetchLink, FetchLinkError};
use crate::protocol::McastOrder;
use crate::sync::lock;

/// A clone point's pages on this host: (its memory server, its family).
pub type FetchKey = (std::net::SocketAddr, u64);

/// One clone point's cache and who uses it.
struct CacheEntry {
    /// The parent's host, as its control connection names it.
    parent: String,
    link: Arc<FetchLink>,
    /// Holds on it: one per launch whose clones still run here.
    holds: usize,
    /// When idle: its place in the order caches became idle (oldest first).
    idle_since: Option<u64>,
    /// The parent's host ended the family: the cache goes with its last clone.
    ended: bool,
}

impl CacheEntry {
    fn bytes(&self) -> u64 {
        self.link.family.cache().resident_pages() * PAGE_SIZE
    }
}

#[derive(Default)]
struct CacheTable {
    entries: HashMap<FetchKey, CacheEntry>,
    idle_count: u64,
}

/// A family on this host as `sf stats` shows it.
#[derive(Debug, Clone)]
pub struct CachedFamily {
    pub family: u64,
    pub parent: String,
    pub stats: FamilyStats,
    /// No clone of it runs here; kept for the next ones.
    pub idle: bool,
}

/// The clone point caches of this host (see the module docs).
pub struct FamilyCaches {
    /// Most bytes of pages idle caches keep; 0 keeps none.
    idle_budget: u64,
    table: Mutex<CacheTable>,
    /// Bytes the caches that went had received, so that the totals a scrape
    /// reads never go back.
    retired: Mutex<ReceivedBytes>,
}

/// Page bytes received from memory servers, by how they came.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceivedBytes {
    pub unicast: u64,
    pub multicast: u64,
}

impl ReceivedBytes {
    fn add(&mut self, link: &FetchLink) {
        let bytes = link.family.stats().bytes_received;
        if link.by_multicast() {
            self.multicast += bytes;
        } else {
            self.unicast += bytes;
        }
    }
}

impl std::fmt::Debug for FamilyCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FamilyCaches")
            .field("idle_budget", &self.idle_budget)
            .finish_non_exhaustive()
    }
}

/// A running clone's hold on its clone point's cache; the cache becomes
/// idle (or goes) when the last hold drops.
pub struct CacheUse {
    caches: Arc<FamilyCaches>,
    key: FetchKey,
    link: Arc<FetchLink>,
}

impl std::fmt::Debug for CacheUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheUse")
            .field("family", &self.key.1)
            .finish_non_exhaustive()
    }
}

impl CacheUse {
    pub fn link(&self) -> &Arc<FetchLink> {
        &self.link
    }
}

impl Drop for CacheUse {
    fn drop(&mut self) {
        self.caches.release(self.key);
    }
}

impl FamilyCaches {
    /// Caches whose idle ones keep at most `idle_budget` bytes of pages.
    pub fn new(idle_budget: u64) -> Arc<Self> {
        Arc::new(Self {
            idle_budget,
            table: Mutex::new(CacheTable::default()),
            retired: Mutex::new(ReceivedBytes::default()),
        })
    }

    /// A hold on the cache of clone point `key` for one more clone: the one
    /// here (an idle one joins its group again, `mcast` says where), or a
    /// new one from `connect`.
    pub fn acquire(
        self: &Arc<Self>,
        parent: &str,
        key: FetchKey,
        mcast: Option<McastOrder>,
        connect: impl FnOnce() -> Result<FetchLink, FetchLinkError>,
    ) -> Result<CacheUse, FetchLinkError> {
        let mut gone = Vec::new();
        let mut table = lock(&self.table);
        let reusable = table
            .entries
            .get(&key)
            .is_some_and(|e| e.link.family.failure().is_none() && !e.ended && e.parent == parent);
        if !reusable && let Some(entry) = table.entries.remove(&key) {
            gone.push(entry.link);
        }
        let link = match table.entries.get_mut(&key) {
            Some(entry) => {
                if entry.holds == 0 {
                    entry.link.join_group(mcast)?;
                    entry.idle_since = None;
                    tracing::info!(
                        family = key.1,
                        pages = entry.link.family.cache().resident_pages(),
                        "reusing an idle page cache"
                    );
                }
                entry.holds += 1;
                entry.link.clone()
            }
            None => {
                let link = Arc::new(connect()?);
                table.entries.insert(
                    key,
                    CacheEntry {
                        parent: parent.to_string(),
                        link: link.clone(),
                        holds: 1,
                        idle_since: None,
                        ended: false,
                    },
                );
                link
            }
        };
        drop(table);
        self.retire(gone);
        Ok(CacheUse {
            caches: self.clone(),
            key,
            link,
        })
    }

    /// One clone of `key` ended: with the last, the cache becomes idle (it
    /// leaves its group) or goes, and idle caches past the budget go.
    fn release(&self, key: FetchKey) {
        let mut gone = Vec::new();
        {
            let mut table = lock(&self.table);
            let Some(entry) = table.entries.get_mut(&key) else {
                return;
            };
            entry.holds -= 1;
            if entry.holds > 0 {
                return;
            }
            if entry.ended || entry.link.family.failure().is_some() || self.idle_budget == 0 {
                if let Some(entry) = table.entries.remove(&key) {
                    gone.push(entry.link);
                }
            } else {
                entry.link.leave_group();
                // Whole 2 MiB blocks go to huge pages now that no clone maps
                // them: the next clones map 2 MiB per first touch.
                entry.link.family.cache().collapse_complete_blocks();
                table.idle_count += 1;
                let order = table.idle_count;
                if let Some(entry) = table.entries.get_mut(&key) {
                    entry.idle_since = Some(order);
                }
                self.trim(&mut table, &mut gone);
            }
        }
        self.retire(gone);
    }

    /// Drops idle caches, oldest first, until they fit the budget.
    fn trim(&self, table: &mut CacheTable, gone: &mut Vec<Arc<FetchLink>>) {
        loop {
            let idle: Vec<(FetchKey, u64, u64)> = table
                .entries
                .iter()
                .filter_map(|(&key, e)| e.idle_since.map(|since| (key, since, e.bytes())))
                .collect();
            let total: u64 = idle.iter().map(|&(_, _, bytes)| bytes).sum();
            if total <= self.idle_budget {
                return;
            }
            let Some(&(oldest, _, bytes)) = idle.iter().min_by_key(|&&(_, since, _)| since) else {
                return;
            };
            tracing::info!(
                family = oldest.1,
                bytes,
                budget = self.idle_budget,
                "dropping the idle page cache idle longest"
            );
            if let Some(entry) = table.entries.remove(&oldest) {
                gone.push(entry.link);
            }
        }
    }

    /// The parent's host `parent` ended `family`: its idle cache goes now,
    /// one in use when its last clone ends. Returns whether there was one.
    pub fn end_family(&self, parent: &str, family: u64) -> bool {
        self.end_where(|(_, f), entry| *f == family && entry.parent == parent)
    }

    /// The control connection to `parent` is gone: so are its caches here
    /// (it cannot serve them, nor say when they end).
    pub fn parent_lost(&self, parent: &str) {
        self.end_where(|_, entry| entry.parent == parent);
    }

    fn end_where(&self, matches: impl Fn(&FetchKey, &CacheEntry) -> bool) -> bool {
        let mut gone = Vec::new();
        let mut found = false;
        {
            let mut table = lock(&self.table);
            let keys: Vec<FetchKey> = table
                .entries
                .iter()
                .filter(|&(key, entry)| matches(key, entry))
                .map(|(&key, _)| key)
                .collect();
            for key in keys {
                found = true;
                let idle = table.entries.get(&key).is_some_and(|e| e.holds == 0);
                if idle {
                    if let Some(entry) = table.entries.remove(&key) {
                        gone.push(entry.link);
                    }
                } else if let Some(entry) = table.entries.get_mut(&key) {
                    entry.ended = true;
                }
            }
        }
        self.retire(gone);
        found
    }

    /// Closes the links of caches that went, counting what they received.
    fn retire(&self, gone: Vec<Arc<FetchLink>>) {
        if gone.is_empty() {
            return;
        }
        let mut retired = lock(&self.retired);
        for link in &gone {
            retired.add(link);
        }
        drop(retired);
        drop(gone);
    }

    /// Page bytes received by every cache since the daemon started.
    pub fn received_bytes(&self) -> ReceivedBytes {
        let mut total = *lock(&self.retired);
        for entry in lock(&self.table).entries.values() {
            total.add(&entry.link);
        }
        total
    }

    /// Every cache here, in use or idle.
    pub fn families(&self) -> Vec<CachedFamily> {
        lock(&self.table)
            .entries
            .iter()
            .map(|(&(_, family), entry)| CachedFamily {
                family,
                parent: entry.parent.clone(),
                stats: entry.link.family.stats(),
                idle: entry.holds == 0,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use snowflock_dataplane::auth::ClusterKey;
    use snowflock_dataplane::server::{MemoryServer, PageStore};
    use snowflock_fault_handler::FetchConfig;

    use super::*;

    const PAGES: u64 = 16;

    /// Pages of zeros, enough for a link to connect.
    struct Zeros;

    impl PageStore for Zeros {
        fn page_count(&self) -> u64 {
            PAGES
        }

        fn read_page(&self, _page: u64, buf: &mut [u8; 4096]) -> std::io::Result<()> {
            buf.fill(0);
            Ok(())
        }
    }

    /// A memory server on loopback serving `families`, and its key.
    fn server(families: &[u64]) -> (MemoryServer, ClusterKey) {
        let key = ClusterKey::generate();
        let server = MemoryServer::bind("127.0.0.1:0".parse().unwrap(), key.clone()).unwrap();
        for &family in families {
            server.register(family, Arc::new(Zeros));
        }
        (server, key)
    }

    /// A hold on `family`'s cache from parent `parent`, connecting a new
    /// link only when `connect` allows it.
    fn hold(
        caches: &Arc<FamilyCaches>,
        server: &MemoryServer,
        key: &ClusterKey,
        parent: &str,
        family: u64,
        connect: bool,
    ) -> CacheUse {
        let addr = server.local_addr();
        caches
            .acquire(parent, (addr, family), None, || {
                assert!(connect, "family {family:#x}: a new link where one was kept");
                FetchLink::connect(
                    family,
                    PAGES * PAGE_SIZE,
                    addr,
                    key,
                    FetchConfig {
                        fetch_timeout: Duration::from_secs(5),
                        prefetch_pages: 0,
                        fault_around_pages: 0,
                        huge_blocks: false,
                    },
                    None,
                )
            })
            .unwrap()
    }

    /// Stores `count` pages in the cache behind `hold`.
    fn fill(hold: &CacheUse, count: u64) {
        let page = vec![7u8; PAGE_SIZE as usize];
        let batch: Vec<(u64, &[u8])> = (0..count).map(|p| (p, &page[..])).collect();
        hold.link().family.deliver_batch(&batch);
    }

    /// Pages the idle caches hold.
    fn idle_pages(caches: &FamilyCaches) -> u64 {
        caches
            .families()
            .iter()
            .filter(|f| f.idle)
            .map(|f| f.stats.resident_pages)
            .sum()
    }

    fn idle_families(caches: &FamilyCaches) -> Vec<u64> {
        let mut idle: Vec<u64> = caches
            .families()
            .into_iter()
            .filter(|f| f.idle)
            .map(|f| f.family)
            .collect();
        idle.sort_unstable();
        idle
    }

    #[test]
    fn an_idle_cache_is_reused_and_goes_when_its_family_ends() {
        let (server, key) = server(&[1]);
        let caches = FamilyCaches::new(1 << 30);
        let first = hold(&caches, &server, &key, "h1", 1, true);
        let second = hold(&caches, &server, &key, "h1", 1, false);
        assert!(Arc::ptr_eq(first.link(), second.link()));
        fill(&first, 5);
        let kept = first.link().family.clone();
        drop((first, second));
        assert_eq!(idle_families(&caches), [1]);
        assert_eq!(idle_pages(&caches), 5);
        let again = hold(&caches, &server, &key, "h1", 1, false);
        assert!(Arc::ptr_eq(&again.link().family, &kept), "the same cache");
        assert_eq!(again.link().family.cache().resident_pages(), 5);
        assert!(idle_families(&caches).is_empty());
        // Ended while in use: it goes with its last clone, not idle.
        assert!(caches.end_family("h1", 1));
        drop(again);
        assert!(caches.families().is_empty());
        // Ended while idle: it goes at once; another parent's family stays.
        drop(hold(&caches, &server, &key, "h1", 1, true));
        assert!(!caches.end_family("h2", 1), "not that parent's family");
        assert_eq!(idle_families(&caches), [1]);
        assert!(caches.end_family("h1", 1));
        assert!(caches.families().is_empty());
        assert_eq!(idle_pages(&caches), 0);
    }

    #[test]
    fn idle_caches_past_the_budget_go_oldest_first() {
        let (server, key) = server(&[1, 2, 3]);
        let caches = FamilyCaches::new(10 * PAGE_SIZE);
        for family in [1, 2, 3] {
            let hold = hold(&caches, &server, &key, "h1", family, true);
            fill(&hold, 4);
        }
        assert_eq!(idle_families(&caches), [2, 3], "12 pages do not fit 10");
        // Reusing one makes it the youngest once idle again.
        drop(hold(&caches, &server, &key, "h1", 2, false));
        let hold4 = hold(&caches, &server, &key, "h1", 1, true);
        fill(&hold4, 4);
        drop(hold4);
        assert_eq!(idle_families(&caches), [1, 2]);
        caches.parent_lost("h1");
        assert!(caches.families().is_empty());
    }

    #[test]
    fn no_budget_keeps_nothing_and_a_failed_family_is_not_reused() {
        let (server, key) = server(&[1]);
        let caches = FamilyCaches::new(0);
        drop(hold(&caches, &server, &key, "h1", 1, true));
        assert!(caches.families().is_empty());
        let caches = FamilyCaches::new(1 << 30);
        let failing = hold(&caches, &server, &key, "h1", 1, true);
        failing.link().family.fail("the parent went away".into());
        drop(failing);
        assert!(caches.families().is_empty(), "a failed cache is not kept");
        drop(hold(&caches, &server, &key, "h1", 1, true));
    }
}
