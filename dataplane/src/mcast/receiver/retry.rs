//! Requests in flight and the timers: admitting waiting pages into the window of
//! `max_in_flight` awaited pages, re-requesting the pages whose timeout expired (with
//! `RETRY`, then also `UNICAST_REPLY`), the periodic rate reports, and the partial pages'
//! expiry.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::config::ReceiverConfig;
use super::family::Family;
use super::loss::{DEADLINE_TIMEOUTS, Lost};
use super::outgoing::Outgoing;
use super::rtt::{Outstanding, queueing};
use super::state::State;
use super::stats::{ReceiverStats, count};
use crate::mcast::reassembly::Reassembly;
use crate::mcast::wire::{REQUEST_FRAGMENTS, REQUEST_RETRY, REQUEST_UNICAST_REPLY, fragment_entry};

/// How long [`run_timers`] lets the transport sleep when nothing is pending.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Re-requests the pages whose timeout expired, admits waiting pages, sends the reports that
/// are due and drops timed-out partial pages. Returns when it wants to run next.
pub(super) fn run_timers(
    state: &mut State,
    config: &ReceiverConfig,
    outgoing: &Outgoing<'_>,
    now: Instant,
) -> Instant {
    state.stats.partials_dropped += state.reassembly.expire(now);
    let mut next = now + IDLE_TICK;
    for family in state.families.values_mut() {
        // A failed family waits to be left: it neither requests nor reports.
        if family.failed {
            continue;
        }
        retry_due(
            config,
            outgoing,
            &state.reassembly,
            &mut state.scratch,
            &mut state.stats,
            family,
            now,
        );
        admit(
            config,
            outgoing,
            &mut state.scratch,
            &mut state.stats,
            family,
            now,
        );
        if now >= family.next_report {
            family.sample_goodput(now);
            if family.rate.on_interval() {
                count(&mut state.stats, &mut family.stats, |s| s.rate_cuts += 1);
            }
            state.long_run_loss = family.rate.long_run_loss();
            outgoing.send(&mut state.scratch, family, &mut state.stats, 0, &[]);
            family.next_report = now + config.report_interval;
        }
        next = next.min(family.next_report);
        if let Some(&(retry_at, _)) = family.retry_order.first() {
            next = next.min(retry_at);
        }
    }
    if let Some(expiry) = state.reassembly.next_expiry() {
        next = next.min(expiry);
    }
    next
}

/// Sends waiting pages of `family` while fewer than `max_in_flight` are awaited; returns
/// the earliest retry time it set.
pub(super) fn admit(
    config: &ReceiverConfig,
    outgoing: &Outgoing<'_>,
    scratch: &mut Vec<u8>,
    global: &mut ReceiverStats,
    fam: &mut Family,
    now: Instant,
) -> Option<Instant> {
    let room = config
        .max_in_flight
        .max(1)
        .saturating_sub(fam.outstanding.len());
    if room == 0 || fam.waiting.is_empty() {
        return None;
    }
    let rto = fam.rtt.rto(config.rto_min, config.rto_max);
    let pace = fam.pace();
    let mut wanted = Vec::with_capacity(room.min(fam.waiting.len()));
    let mut earliest = None;
    while wanted.len() < room {
        let Some(page) = fam.waiting.pop_front() else {
            break;
        };
        fam.queued.clear(page);
        if fam.held.get(page) {
            continue;
        }
        let queued_for = queueing(fam.outstanding.len() + 1, pace);
        let retry_at = now + rto + queued_for;
        earliest.get_or_insert(retry_at);
        let seq = fam.loss.requested(page);
        fam.outstanding.insert(
            page,
            Outstanding {
                seq,
                first_sent: now,
                last_sent: now,
                queued_for,
                retry_at,
                deadline: now + (rto + queued_for) * DEADLINE_TIMEOUTS,
                retries: 0,
                passed: false,
            },
        );
        fam.retry_order.insert((retry_at, page));
        wanted.push(page);
    }
    if !wanted.is_empty() {
        outgoing.send(scratch, fam, global, 0, &wanted);
    }
    earliest
}

/// Re-requests the pages of `family` whose timeout expired by `now` and that are lost (see
/// [`LossDetector::lost`](super::loss::LossDetector::lost)): a page partly received by its
/// missing fragments only (`REQUEST_FRAGMENTS`), the others whole. The others are looked at
/// again a timeout later.
fn retry_due(
    config: &ReceiverConfig,
    outgoing: &Outgoing<'_>,
    reassembly: &Reassembly,
    scratch: &mut Vec<u8>,
    global: &mut ReceiverStats,
    family: &mut Family,
    now: Instant,
) {
    let mut due = Vec::new();
    while let Some(&(retry_at, page)) = family.retry_order.first() {
        if retry_at > now {
            break;
        }
        family.retry_order.pop_first();
        due.push(page);
    }
    if due.is_empty() {
        return;
    }
    let rto = family.rtt.rto(config.rto_min, config.rto_max);
    let mut lost = Vec::with_capacity(due.len());
    for page in due {
        let Some(request) = family.outstanding.get_mut(&page) else {
            continue;
        };
        let verdict = if request.passed {
            Some(Lost::Passed)
        } else {
            family
                .loss
                .lost(request.seq, request.last_sent, request.deadline, now, rto)
        };
        let Some(cause) = verdict else {
            request.retry_at = (now + rto).min(request.deadline);
            family.retry_order.insert((request.retry_at, page));
            count(global, &mut family.stats, |s| s.retries_deferred += 1);
            continue;
        };
        count(global, &mut family.stats, |s| match cause {
            Lost::Overtaken => s.lost_overtaken += 1,
            Lost::Passed => s.lost_passed += 1,
            Lost::Stalled => s.lost_stalled += 1,
            Lost::Deadline => s.lost_deadline += 1,
        });
        lost.push(page);
    }
    if lost.is_empty() {
        return;
    }
    family
        .rate
        .on_loss(u32::try_from(lost.len()).unwrap_or(u32::MAX));
    // Entries by the flags of the REQUEST they go in.
    let mut requests: BTreeMap<u16, Vec<u64>> = BTreeMap::new();
    let mut by_fragments = 0;
    let rate = family.pace();
    // The pages still awaited in time are served before these.
    let mut ahead = family.outstanding.len().saturating_sub(lost.len());
    for page in lost {
        let Some(request) = family.outstanding.get_mut(&page) else {
            continue;
        };
        request.retries += 1;
        request.passed = false;
        ahead += 1;
        let waited = u64::try_from(now.saturating_duration_since(request.last_sent).as_micros())
            .unwrap_or(u64::MAX);
        count(global, &mut family.stats, |s| {
            s.retry_wait_total_us = s.retry_wait_total_us.saturating_add(waited);
        });
        request.last_sent = now;
        // Linear, not exponential: losses here are mostly random, and a page someone
        // faults on should not wait out a long backoff; overload is what the rate is for.
        let backoff = rto
            .saturating_mul(1 + request.retries.min(64))
            .min(config.rto_max.max(rto));
        let timeout = backoff + queueing(ahead, rate);
        request.retry_at = now + timeout;
        request.deadline = now + timeout * DEADLINE_TIMEOUTS;
        family.loss.forget(request.seq);
        request.seq = family.loss.requested(page);
        family.retry_order.insert((request.retry_at, page));
        let mut flags = REQUEST_RETRY;
        if request.retries >= config.unicast_after {
            flags |= REQUEST_UNICAST_REPLY;
        }
        let entry = match reassembly.missing(family.join.family, page) {
            Some(missing) => {
                flags |= REQUEST_FRAGMENTS;
                by_fragments += 1;
                fragment_entry(page, missing)
            }
            None => page,
        };
        requests.entry(flags).or_default().push(entry);
    }
    let retried: u64 = requests.values().map(|entries| entries.len() as u64).sum();
    count(global, &mut family.stats, |s| {
        s.re_requests += retried;
        s.fragment_re_requests += by_fragments;
    });
    for (flags, entries) in requests {
        outgoing.send(scratch, family, global, flags, &entries);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::test_support::{
        Collect, FAMILY, GENERATION, Recorder, config, decode_request, decode_request_entries,
        feed, fragments, fragments_asked_by, join, key, setup,
    };
    use super::super::{ReceiverConfig, ReceiverCore};
    use crate::mcast::wire::{ALL_FRAGMENTS, REQUEST_FRAGMENTS};
    use crate::mcast::wire::{REQUEST_RETRY, REQUEST_UNICAST_REPLY};
    use crate::wire::PAGE_SIZE;

    #[test]
    fn requests_beyond_the_window_wait_and_go_out_as_pages_arrive() {
        let recorder = Arc::new(Recorder::default());
        let windowed = ReceiverConfig {
            max_in_flight: 3,
            ..config()
        };
        let core = ReceiverCore::new(windowed, key(), recorder.clone());
        let sink = Arc::new(Collect::default());
        core.join(join(), sink.clone(), None).unwrap();
        core.request(FAMILY, &[1, 2, 3, 4, 5, 6, 16]);
        let requested = |from: usize| -> Vec<Vec<u64>> {
            recorder.sent.lock().unwrap()[from..]
                .iter()
                .map(|d| decode_request(d).1)
                .collect()
        };
        assert_eq!(requested(1), vec![vec![1, 2, 3]], "page 16 is out of range");
        let stats = core.family_stats(FAMILY).unwrap();
        assert_eq!((stats.outstanding, stats.queued), (6, 3));
        // Page 5 arrives early (a sibling asked): it is not requested when its turn comes.
        for page in [5, 1] {
            feed(
                &core,
                fragments(FAMILY, GENERATION, page, 1)
                    .iter()
                    .map(|d| d.as_slice()),
            );
        }
        assert_eq!(requested(2), vec![vec![4]], "one arrival, one more request");
        feed(
            &core,
            fragments(FAMILY, GENERATION, 2, 2)
                .iter()
                .map(|d| d.as_slice()),
        );
        assert_eq!(
            requested(3),
            vec![vec![6]],
            "page 5 is held, so page 6 goes"
        );
        let stats = core.family_stats(FAMILY).unwrap();
        assert_eq!((stats.outstanding, stats.queued), (3, 0));
        core.request(FAMILY, &[4, 5, 6]);
        assert_eq!(recorder.sent.lock().unwrap().len(), 4, "awaited or held");
    }

    /// A core joined to the test family whose timeouts (30 s at least) never expire in a
    /// test: whatever it re-requests, it took for lost. `request_block_pages` as configured.
    fn patient(request_block_pages: u64) -> (ReceiverCore, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let config = ReceiverConfig {
            rto_min: Duration::from_secs(30),
            rto_max: Duration::from_secs(60),
            request_block_pages,
            ..config()
        };
        let core = ReceiverCore::new(config, key(), recorder.clone());
        core.join(join(), Arc::new(Collect::default()), None)
            .unwrap();
        (core, recorder)
    }

    /// Feeds `page`'s FRAGMENTs as the server sends them for receiver `asked_by`'s REQUEST.
    fn arrive(core: &ReceiverCore, asked_by: u32, page: u64) {
        let datagrams = fragments_asked_by(asked_by, FAMILY, GENERATION, page, page as u8);
        feed(core, datagrams.iter().map(|d| d.as_slice()));
    }

    /// The pages re-requested so far, in order.
    fn retried(recorder: &Recorder) -> Vec<u64> {
        recorder
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|d| decode_request(d))
            .filter(|(flags, _)| flags & REQUEST_RETRY != 0)
            .flat_map(|(_, pages)| pages)
            .collect()
    }

    /// Runs `core`'s timers until something is re-requested; panics after 5 s (the timeouts
    /// are 30 s: only a page taken for lost goes before).
    fn tick_until_retried(core: &ReceiverCore, recorder: &Recorder) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while retried(recorder).is_empty() {
            assert!(Instant::now() < deadline, "nothing re-requested in 5 s");
            let next = core.tick().min(deadline);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }

    /// Runs `core`'s timers for 50 ms, past any reordering window of these tests.
    fn tick_past_the_window(core: &ReceiverCore) {
        let past_the_window = Instant::now() + Duration::from_millis(50);
        while Instant::now() < past_the_window {
            let next = core.tick().min(past_the_window);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }

    #[test]
    fn pages_overtaken_by_a_later_request_are_asked_again_long_before_their_timeout() {
        let (core, recorder) = patient(0);
        core.request(FAMILY, &[1, 2, 3, 4, 5, 6]);
        // Another host asked for page 6 first: it came from that host's place in the queue.
        arrive(&core, core.id() ^ 1, 6);
        arrive(&core, core.id(), 3);
        tick_until_retried(&core, &recorder);
        assert_eq!(retried(&recorder), vec![1, 2], "4 and 5 are behind page 3");
        let stats = core.stats();
        assert_eq!((stats.lost_overtaken, stats.lost_stalled), (2, 0));
        // A re-requested page may come from its first place in the queue: it overtakes
        // nothing.
        arrive(&core, core.id(), 1);
        tick_past_the_window(&core);
        assert_eq!(
            retried(&recorder),
            vec![1, 2],
            "4 and 5 still wait their turn"
        );
    }

    #[test]
    fn pages_another_host_s_request_sent_past_are_asked_again_long_before_their_timeout() {
        let (core, recorder) = patient(16);
        core.request(FAMILY, &[2, 3, 4, 6, 8, 20, 30]);
        // Another host's request for blocks 0-15 and 16-31, in ascending runs: 9 (its fault)
        // first, then 1, 4 (2 and 3 lost on the way), 5; then 0, a new run, lower; and in
        // the next block 25 alone, which says nothing of 20.
        for page in [9, 1, 4, 5, 0, 25] {
            arrive(&core, core.id() ^ 1, page);
        }
        tick_until_retried(&core, &recorder);
        assert_eq!(
            retried(&recorder),
            vec![2, 3],
            "9 to 1 and 5 to 0 start new runs; 6 and 8 are still to come"
        );
        let stats = core.stats();
        assert_eq!((stats.lost_passed, stats.lost_overtaken), (2, 0));
        // A page passed again after its re-request is not taken for lost again: its resend
        // may come from anywhere in the queue.
        for page in [1, 7] {
            arrive(&core, core.id() ^ 1, page);
        }
        tick_past_the_window(&core);
        assert_eq!(
            retried(&recorder),
            vec![2, 3, 6],
            "only 6 more, passed by 1 to 7"
        );
    }

    #[test]
    fn a_partly_received_page_is_asked_for_by_its_missing_fragments_only() {
        let (core, recorder, sink) = setup();
        core.request(FAMILY, &[3, 4]);
        let page_3 = fragments(FAMILY, GENERATION, 3, 7);
        assert_eq!(page_3.len(), 3, "a 1500-byte MTU cuts a page in three");
        feed(&core, [page_3[0].as_slice(), page_3[2].as_slice()]);
        let mut retries: Vec<(u16, Vec<(u64, u16)>)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while retries.len() < 2 && Instant::now() < deadline {
            let next = core.tick();
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            retries = recorder
                .sent
                .lock()
                .unwrap()
                .iter()
                .map(|d| decode_request_entries(d))
                .filter(|(flags, _)| flags & REQUEST_RETRY != 0)
                .collect();
        }
        assert_eq!(
            retries[..2],
            [
                (REQUEST_RETRY, vec![(4, ALL_FRAGMENTS)]),
                (REQUEST_RETRY | REQUEST_FRAGMENTS, vec![(3, 0b010)]),
            ],
            "page 4 whole, page 3 by its middle fragment"
        );
        assert!(core.stats().fragment_re_requests >= 1);
        feed(&core, [page_3[1].as_slice()]);
        let pages = sink.pages.lock().unwrap();
        assert_eq!(pages.len(), 1);
        assert_eq!(pages[0], (3, vec![7; PAGE_SIZE]));
    }

    #[test]
    fn expired_requests_are_retried_then_asked_unicast_and_the_rate_drops() {
        let recorder = Arc::new(Recorder::default());
        let reporting = ReceiverConfig {
            report_interval: Duration::from_millis(20),
            ..config()
        };
        let core = ReceiverCore::new(reporting, key(), recorder.clone());
        let sink = Arc::new(Collect::default());
        core.join(join(), sink.clone(), Some(sink)).unwrap();
        let initial = core.stats().rate;
        core.request(FAMILY, &[1, 2]);
        let mut flags_seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while flags_seen.len() < 2 && Instant::now() < deadline {
            let next = core.tick();
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let sent = recorder.sent.lock().unwrap().clone();
            for datagram in &sent[2..] {
                let (flags, pages) = decode_request(datagram);
                if pages.is_empty() {
                    // A rate report.
                    continue;
                }
                assert_eq!(pages, vec![1, 2]);
                if !flags_seen.contains(&flags) {
                    flags_seen.push(flags);
                }
            }
        }
        assert_eq!(
            flags_seen,
            vec![REQUEST_RETRY, REQUEST_RETRY | REQUEST_UNICAST_REPLY]
        );
        // The cut comes with the next report interval.
        while core.stats().rate_cuts == 0 && Instant::now() < deadline {
            let next = core.tick();
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let stats = core.stats();
        assert!(stats.re_requests >= 4);
        assert!(stats.unicast_requests >= 1);
        assert!(stats.rate_cuts >= 1);
        assert!(stats.rate < initial);
    }
}
