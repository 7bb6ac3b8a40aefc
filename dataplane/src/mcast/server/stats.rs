//! The server's counters: the atomics its threads bump ([`Counters`]) and the snapshot
//! [`McastServer::stats`](super::McastServer::stats) returns ([`McastServerStats`], with a
//! [`FamilyServerStats`] per family).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

/// One family's view in [`McastServerStats`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FamilyServerStats {
    /// The family.
    pub family: u64,
    /// Its generation.
    pub generation: u32,
    /// Its group.
    pub group: Ipv4Addr,
    /// The rate it is sent at now, pages/s.
    pub rate: u32,
    /// The lowest rate its receivers' reports have set since it was registered, pages/s;
    /// 0 before any report.
    #[serde(default)]
    pub lowest_rate: u32,
    /// Receivers heard from within `receiver_idle`.
    pub active_receivers: usize,
    /// Pages waiting to be sent (requested and pushed).
    pub queued_pages: usize,
    /// Pages taken from its queues for sending so far.
    pub pages_sent: u64,
    /// Of those, pages pushed without a request (to late joiners and at the clone point).
    #[serde(default)]
    pub pages_pushed: u64,
    /// Pages the clone point's push has still to go through (sent, or skipped because they
    /// were multicast since the last receiver joined); 0 once it is done, or with push off.
    #[serde(default)]
    pub push_remaining: u64,
    /// Pages at the head of the clone point's push in the order a recorded working set of
    /// the same clone point gave (0: none applied).
    #[serde(default)]
    pub push_led: u64,
}

/// Counters of a [`McastServer`](super::McastServer), since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct McastServerStats {
    /// Valid REQUEST datagrams received (reports, JOIN and LEAVE included).
    pub requests: u64,
    /// Pages named in them.
    pub pages_requested: u64,
    /// Requested pages not queued because the same page was queued, or sent within the
    /// suppression window, to the same destination.
    pub duplicates_suppressed: u64,
    /// Pages sent (all fragments handed to the kernel).
    pub pages_sent: u64,
    /// Fragments sent.
    pub fragments_sent: u64,
    /// UDP payload bytes sent (fragments and REJECTs).
    pub bytes_sent: u64,
    /// Of the pages sent, those sent to one receiver only.
    pub unicast_pages: u64,
    /// Of the pages sent, those pushed without a request.
    pub pushed_pages: u64,
    /// Pages that recorded working sets put at the head of clone point pushes, over every
    /// registration ([`McastServer::register_led`](super::McastServer::register_led)).
    #[serde(default)]
    pub push_led_pages: u64,
    /// REPAIRs sent: recovery symbols of blocks of pushed pages (their bytes are in
    /// `bytes_sent`).
    #[serde(default)]
    pub repairs_sent: u64,
    /// REJECTs sent.
    pub rejects_sent: u64,
    /// Datagrams with a wrong tag.
    pub mac_failed: u64,
    /// Datagrams malformed, or not REQUESTs.
    pub malformed: u64,
    /// REQUESTs for a family not served, or of another generation.
    pub stale: u64,
    /// Pages whose read from the store failed.
    pub read_failures: u64,
    /// Datagrams the kernel refused to send.
    pub send_errors: u64,
    /// Every family served, by id.
    pub families: Vec<FamilyServerStats>,
}

#[derive(Default)]
/// The server's counters, bumped by its threads without a lock.
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) pages_requested: AtomicU64,
    pub(super) duplicates_suppressed: AtomicU64,
    pub(super) pages_sent: AtomicU64,
    pub(super) fragments_sent: AtomicU64,
    pub(super) bytes_sent: AtomicU64,
    pub(super) unicast_pages: AtomicU64,
    pub(super) pushed_pages: AtomicU64,
    pub(super) push_led_pages: AtomicU64,
    pub(super) repairs_sent: AtomicU64,
    pub(super) rejects_sent: AtomicU64,
    pub(super) mac_failed: AtomicU64,
    pub(super) malformed: AtomicU64,
    pub(super) stale: AtomicU64,
    pub(super) read_failures: AtomicU64,
    pub(super) send_errors: AtomicU64,
}

/// Adds `by` to `counter`.
pub(super) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Bytes of the datagrams of a send batch (for `bytes_sent`).
pub(super) fn bytes_of(datagrams: &[(SocketAddrV4, &[u8])]) -> u64 {
    datagrams.iter().map(|(_, d)| d.len() as u64).sum()
}

impl Counters {
    /// The counters now, with `families` (sorted here by id).
    pub(super) fn snapshot(&self, mut families: Vec<FamilyServerStats>) -> McastServerStats {
        families.sort_by_key(|f| f.family);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        McastServerStats {
            requests: load(&self.requests),
            pages_requested: load(&self.pages_requested),
            duplicates_suppressed: load(&self.duplicates_suppressed),
            pages_sent: load(&self.pages_sent),
            fragments_sent: load(&self.fragments_sent),
            bytes_sent: load(&self.bytes_sent),
            unicast_pages: load(&self.unicast_pages),
            pushed_pages: load(&self.pushed_pages),
            push_led_pages: load(&self.push_led_pages),
            repairs_sent: load(&self.repairs_sent),
            rejects_sent: load(&self.rejects_sent),
            mac_failed: load(&self.mac_failed),
            malformed: load(&self.malformed),
            stale: load(&self.stale),
            read_failures: load(&self.read_failures),
            send_errors: load(&self.send_errors),
            families,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reads_every_counter_and_sorts_the_families() {
        let counters = Counters::default();
        bump(&counters.requests, 3);
        bump(&counters.duplicates_suppressed, 2);
        bump(&counters.bytes_sent, 1000);
        bump(&counters.bytes_sent, 24);
        let family = |family| FamilyServerStats {
            family,
            generation: 1,
            group: Ipv4Addr::new(239, 255, 0, 1),
            rate: 10,
            lowest_rate: 0,
            active_receivers: 0,
            queued_pages: 0,
            pages_sent: 0,
            pages_pushed: 0,
            push_remaining: 0,
            push_led: 0,
        };
        let stats = counters.snapshot(vec![family(9), family(2), family(5)]);
        assert_eq!(stats.requests, 3);
        assert_eq!(stats.duplicates_suppressed, 2);
        assert_eq!(stats.bytes_sent, 1024);
        assert_eq!(stats.pages_sent, 0);
        let order: Vec<u64> = stats.families.iter().map(|f| f.family).collect();
        assert_eq!(order, vec![2, 5, 9]);
    }
}
