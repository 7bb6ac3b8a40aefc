//! When an awaited page counts as lost, so that a retransmission timer is only a moment to
//! look, not a verdict: a server serving a whole 2 MiB block per fault, to several hosts at
//! once, takes longer than any timeout estimated from a page's round trip, and re-requesting
//! what is still queued only loads it and cuts the rate.
//!
//! The server sends a family's requested pages in the order it queued them, so (as RACK does
//! for TCP, RFC 8985) a page is lost once a page this host asked for *after* it arrived and a
//! reordering window passed; a page is also lost when nothing the server was asked for
//! arrived for a whole timeout (the tail of a request, or a server that stopped), and in any
//! case past its deadline (a lost REQUEST whose pages nothing later overtakes, while siblings
//! keep the family busy). Only a page this host asked for once, and whose FRAGMENTs name this
//! receiver as the one whose REQUEST queued it (`sender`), says where the server is in this
//! host's requests: a page another host asked for first comes from that host's place in the
//! queue, and a re-requested page perhaps from its first place (a page is not queued twice).
//!
//! A page whose block another host asked for first is not overtaken by anything this host
//! asked for while its clones wait for it, so it would wait for a stall or its deadline. But
//! a fault-around request asks for its block in ascending runs (the faulted page, those
//! after it, then the rest from the block's start), and the server sends it in that order:
//! when two pages of a block arrive one after the other for another host's request, the
//! second higher, the pages between them were sent, and an awaited one among them that
//! this host asked for once is lost once the reordering window passes (`Lost::Passed`).
//! Where this host's request for it went behind the other host's (it held the page, or the
//! page's send was more than a suppression window old), it comes a second time: one
//! duplicate page, against a wait of tens of milliseconds for a clone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How many of a request's timeouts (retransmission timeout plus its queueing) a page may
/// wait at most while the family still progresses.
pub(super) const DEADLINE_TIMEOUTS: u32 = 4;

/// Why an awaited page was taken for lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lost {
    /// A page requested after it arrived, and the reordering window passed.
    Overtaken,
    /// Pages of its block sent after it for another host arrived, and the reordering window
    /// passed.
    Passed,
    /// Nothing requested of the family arrived for a timeout.
    Stalled,
    /// It waited past its deadline.
    Deadline,
}

/// The order of a family's requests and what arrived of them.
#[derive(Debug)]
pub(super) struct LossDetector {
    /// The sequence number the next (re)request of a page gets.
    next_seq: u64,
    /// Awaited pages by the sequence number of their last request.
    by_seq: BTreeMap<u64, u64>,
    /// The highest sequence number of an awaited page that arrived (0: none yet).
    served_seq: u64,
    /// Pages requested before this sequence number have had their timers brought forward
    /// already.
    marked_seq: u64,
    /// When a page someone requested (not pushed) last arrived.
    last_progress: Instant,
}

impl LossDetector {
    pub(super) fn new(now: Instant) -> LossDetector {
        LossDetector {
            next_seq: 1,
            by_seq: BTreeMap::new(),
            served_seq: 0,
            marked_seq: 0,
            last_progress: now,
        }
    }

    /// `page` is (re)requested now: returns its new sequence number. A re-requested page
    /// must have had its previous number [forgotten](LossDetector::forget).
    pub(super) fn requested(&mut self, page: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_seq.insert(seq, page);
        seq
    }

    /// The request numbered `seq` is no longer awaited (arrived, re-requested, or dropped).
    pub(super) fn forget(&mut self, seq: u64) {
        self.by_seq.remove(&seq);
    }

    /// Nothing is awaited any more (the family failed).
    pub(super) fn clear(&mut self) {
        self.by_seq.clear();
    }

    /// A page someone requested arrived at `now`: the server is working through the queue.
    pub(super) fn progressed(&mut self, now: Instant) {
        self.last_progress = now;
    }

    /// The awaited page requested as `seq` arrived: returns the awaited pages requested before
    /// it that it overtakes for the first time, whose timers the caller brings forward to the
    /// end of the reordering window.
    pub(super) fn arrived(&mut self, seq: u64) -> Vec<u64> {
        self.by_seq.remove(&seq);
        if seq <= self.served_seq {
            return Vec::new();
        }
        self.served_seq = seq;
        let from = self.marked_seq.max(1);
        self.marked_seq = seq;
        self.by_seq
            .range(from..seq)
            .map(|(_, &page)| page)
            .collect()
    }

    /// Whether the page requested as `seq` at `last_sent`, whose timer expired at `now`, is
    /// lost, and why; `None` while it is still being served.
    pub(super) fn lost(
        &self,
        seq: u64,
        last_sent: Instant,
        deadline: Instant,
        now: Instant,
        timeout: Duration,
    ) -> Option<Lost> {
        if seq < self.served_seq {
            Some(Lost::Overtaken)
        } else if now >= self.last_progress.max(last_sent) + timeout {
            Some(Lost::Stalled)
        } else if now >= deadline {
            Some(Lost::Deadline)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{LossDetector, Lost};

    const TIMEOUT: Duration = Duration::from_millis(10);

    #[test]
    fn a_page_is_lost_once_a_later_request_arrives_and_not_before() {
        let start = Instant::now();
        let mut loss = LossDetector::new(start);
        let seqs: Vec<u64> = (10..15).map(|page| loss.requested(page)).collect();
        let far = start + Duration::from_secs(60);
        // Pages keep arriving: nothing is lost while the server works through the queue.
        loss.progressed(start + TIMEOUT);
        assert_eq!(
            loss.lost(seqs[0], start, far, start + TIMEOUT, TIMEOUT),
            None
        );
        assert_eq!(
            loss.arrived(seqs[1]),
            vec![10],
            "page 10 was asked for first"
        );
        assert_eq!(
            loss.lost(seqs[0], start, far, start + TIMEOUT, TIMEOUT),
            Some(Lost::Overtaken)
        );
        assert_eq!(
            loss.lost(seqs[2], start, far, start + TIMEOUT, TIMEOUT),
            None
        );
        assert_eq!(
            loss.arrived(seqs[4]),
            vec![12, 13],
            "page 10 was brought forward already"
        );
        assert_eq!(
            loss.arrived(seqs[3]),
            Vec::<u64>::new(),
            "behind the newest"
        );
        // Re-requested, page 10 is behind what arrived: not overtaken until a later one comes.
        loss.forget(seqs[0]);
        let again = loss.requested(10);
        assert_eq!(loss.lost(again, start, far, start + TIMEOUT, TIMEOUT), None);
    }

    #[test]
    fn a_page_is_lost_when_the_family_stalls_or_past_its_deadline() {
        let start = Instant::now();
        let mut loss = LossDetector::new(start);
        let seq = loss.requested(1);
        let deadline = start + 4 * TIMEOUT;
        assert_eq!(
            loss.lost(seq, start, deadline, start + TIMEOUT, TIMEOUT),
            Some(Lost::Stalled)
        );
        let busy = |at: Instant| {
            let mut loss = LossDetector::new(start);
            let seq = loss.requested(1);
            loss.progressed(at);
            loss.lost(seq, start, deadline, at, TIMEOUT)
        };
        assert_eq!(busy(start + 2 * TIMEOUT), None, "siblings' pages arrive");
        assert_eq!(busy(deadline), Some(Lost::Deadline));
    }
}
