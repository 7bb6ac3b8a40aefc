//! The send threads (`send_threads` of them) and the sending the request thread does
//! itself: taking queued pages family by family, paced by each family's token bucket, and
//! sending each page's fragments as one UDP GSO message (datagram by datagram where the
//! kernel refuses that); the REJECTs.

use std::io;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use super::config::McastServerConfig;
use super::family::{Destination, FamilyState, Job, ServerState};
use super::repairs::{PushedPage, send_repairs};
use super::service::McastService;
use super::stats::{Counters, bump, bytes_of};
use crate::mcast::sys;
use crate::mcast::wire::{
    self, ALL_FRAGMENTS, FRAGMENT_PUSH, FRAGMENT_UNICAST, Fragment, FragmentSealer, Header,
    MAX_DATAGRAM_LEN, Reject, RejectCode,
};
use crate::server::PageStore;
use crate::sync::{self, Never, lock, read, try_write};
use crate::wire::PAGE_SIZE;

/// Most pages a send thread takes from the queues at once.
const MAX_BATCH_PAGES: u32 = 16;
/// Pages the request thread sends itself right after a REQUEST, from the head of the queue
/// (the REQUEST's first page when nothing was queued before it: a fault's page leads its
/// request), and only while no send thread is sending; the send threads take the rest.
/// Sending a page also runs its receiving host's receive path when both share a machine
/// (veth), so under load two sending threads keep both cores busy: with the request thread
/// sending up to a whole batch instead, the AF_XDP path received ~25% fewer pages per
/// second in `rx-path`.
const INLINE_PAGES: u32 = 1;
/// How often each send thread forgets idle receivers and old unicast sends.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);

/// A page taken for sending, with what the thread sending it needs outside the lock.
pub(super) struct Outgoing {
    family: u64,
    generation: u32,
    store: Arc<dyn PageStore>,
    sealer: Arc<FragmentSealer>,
    to: SocketAddrV4,
    flags: u16,
    job: Job,
}

pub(super) fn send_reject(
    service: &McastService,
    header: &Header,
    reject: Reject,
    to: SocketAddrV4,
    reply: &mut Vec<u8>,
) {
    let header = Header {
        flags: 0,
        sender: 0,
        ..*header
    };
    wire::encode_reject(&service.key, reply, &header, &reject);
    match service.socket.send_to(reply, to) {
        Ok(sent) => {
            bump(&service.counters.rejects_sent, 1);
            bump(&service.counters.bytes_sent, sent as u64);
        }
        Err(error) => {
            bump(&service.counters.send_errors, 1);
            tracing::debug!(%to, %error, "sending an mcdist REJECT failed");
        }
    }
}

/// Buffers for reading, fragmenting and sending pages.
pub(super) struct SendScratch {
    batch: Vec<Outgoing>,
    datagrams: Vec<Vec<u8>>,
    page: Box<[u8; PAGE_SIZE]>,
    pub(super) reply: Vec<u8>,
}

impl Default for SendScratch {
    fn default() -> Self {
        Self {
            batch: Vec::new(),
            datagrams: Vec::new(),
            page: Box::new([0u8; PAGE_SIZE]),
            reply: Vec::new(),
        }
    }
}

/// Right after a REQUEST queued work: sends the first [`INLINE_PAGES`] queued pages from the
/// request thread if tokens allow and no send thread is sending (a fault's page leaves
/// without waking a send thread, and never ahead of pages taken before it), and wakes a send
/// thread for whatever is left (more pages, pacing, pushes).
pub(super) fn send_inline(service: &McastService, scratch: &mut SendScratch) {
    let (more, sending) = {
        let mut state = lock(&service.state);
        if service.stopping.load(Ordering::SeqCst) {
            return;
        }
        take_inline(
            &mut state,
            &service.config,
            &service.sending,
            Instant::now(),
            &mut scratch.batch,
        )
    };
    if more {
        service.work.notify_one();
    }
    if !scratch.batch.is_empty() {
        send_pages(service, scratch);
    }
    drop(sending);
}

/// Fills `batch` with what the request thread sends itself: nothing while a send thread
/// holds `sending`. Returns whether a send thread has work left, and the guard to hold until
/// `batch` is sent.
fn take_inline<'a>(
    state: &mut ServerState,
    config: &McastServerConfig,
    sending: &'a RwLock<()>,
    now: Instant,
    batch: &mut Vec<Outgoing>,
) -> (bool, Option<RwLockWriteGuard<'a, ()>>) {
    let Some(guard) = try_write(sending) else {
        return (true, None);
    };
    let taken = take_batch(state, config, now, INLINE_PAGES, batch);
    let more = matches!(taken, Next::Wait(_)) || state.families.values().any(FamilyState::has_work);
    (more, Some(guard))
}

/// What a send thread should do next.
enum Next {
    /// `batch` was filled.
    Send,
    /// Nothing can be sent before this long (or until notified).
    Wait(Duration),
}

/// Fills `batch` from one family with work and tokens, round robin over the families: first
/// over those with requested pages queued, so that a REQUEST of one family is not sent behind
/// another family's push, then over those with only pushes. Within a family, requested pages
/// go before pushed ones.
fn take_batch(
    state: &mut ServerState,
    config: &McastServerConfig,
    now: Instant,
    max_pages: u32,
    batch: &mut Vec<Outgoing>,
) -> Next {
    let mut ids: Vec<u64> = state.families.keys().copied().collect();
    ids.sort_unstable();
    let mut wait = HOUSEKEEPING_INTERVAL;
    for demand_only in [true, false] {
        for step in 0..ids.len() {
            let index = (state.turn + step) % ids.len();
            let id = ids[index];
            let Some(family) = state.families.get_mut(&id) else {
                continue;
            };
            let eligible = if demand_only {
                !family.queue.is_empty()
            } else {
                family.has_work()
            };
            if !eligible {
                continue;
            }
            let rate = family.rate(now, config);
            family.bucket.refill(now, rate);
            let available = family.bucket.available();
            if available == 0 {
                wait = wait.min(family.bucket.wait_for(1));
                continue;
            }
            let mut taken = 0;
            let mut pushed = 0;
            while taken < available.min(max_pages) {
                let job = match family.queue.pop_front() {
                    Some(mut job) => {
                        if let Some(fragments) = family.queued.remove(&(job.page, job.destination))
                        {
                            job.fragments = fragments;
                        }
                        job
                    }
                    None => match family.next_push(now, config.receiver_idle) {
                        Some(job) => job,
                        None => break,
                    },
                };
                family.mark_sent(&job, now);
                let (to, mut flags) = match job.destination {
                    Destination::Group => (family.group, 0),
                    Destination::Unicast(addr) => (addr, FRAGMENT_UNICAST),
                };
                if job.push {
                    flags |= FRAGMENT_PUSH;
                    pushed += 1;
                }
                batch.push(Outgoing {
                    family: id,
                    generation: family.generation,
                    store: Arc::clone(&family.store),
                    sealer: Arc::clone(&family.sealer),
                    to,
                    flags,
                    job,
                });
                taken += 1;
            }
            family.bucket.take(taken);
            family.pages_sent += u64::from(taken);
            family.pages_pushed += pushed;
            if taken > 0 {
                state.turn = index + 1;
                return Next::Send;
            }
        }
    }
    Next::Wait(wait)
}

/// Forgets every family's idle receivers and old unicast sends.
fn housekeeping(state: &mut ServerState, config: &McastServerConfig, now: Instant) {
    for family in state.families.values_mut() {
        family.forget_stale(now, config);
    }
}

/// A send thread: sends queued pages, paced, until the server stops.
pub(super) fn send_loop(service: &McastService, _alive: Sender<Never>) {
    let mut scratch = SendScratch::default();
    let mut next_housekeeping = Instant::now() + HOUSEKEEPING_INTERVAL;
    loop {
        let sending = {
            let mut state = lock(&service.state);
            loop {
                if service.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let now = Instant::now();
                if now >= next_housekeeping {
                    housekeeping(&mut state, &service.config, now);
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL;
                }
                match take_batch(
                    &mut state,
                    &service.config,
                    now,
                    MAX_BATCH_PAGES,
                    &mut scratch.batch,
                ) {
                    Next::Send => break read(&service.sending),
                    Next::Wait(wait) => {
                        let until_housekeeping = next_housekeeping.saturating_duration_since(now);
                        state =
                            sync::wait_timeout(&service.work, state, wait.min(until_housekeeping));
                    }
                }
            }
        };
        send_pages(service, &mut scratch);
        drop(sending);
    }
}

/// Sends `list`, each page's fragments (`pages`: where each page's datagrams end) as one
/// UDP GSO message while the kernel takes those, else datagram by datagram.
fn send_list(
    service: &McastService,
    list: &[(SocketAddrV4, &[u8])],
    pages: &[(usize, &Outgoing)],
) -> sys::BatchSent {
    if !service.segmentation.load(Ordering::Relaxed) {
        return sys::send_batch(&service.socket, list);
    }
    let datagrams: Vec<&[u8]> = list.iter().map(|(_, d)| *d).collect();
    let mut messages: Vec<(SocketAddrV4, &[&[u8]])> = Vec::with_capacity(pages.len());
    let mut start = 0;
    for &(end, outgoing) in pages {
        if end > start {
            messages.push((outgoing.to, &datagrams[start..end]));
        }
        start = end;
    }
    let outcome = sys::send_segmented(&service.socket, &messages);
    let refused = outcome
        .error
        .as_ref()
        .and_then(io::Error::raw_os_error)
        .is_some_and(|errno| {
            [libc::EIO, libc::EINVAL, libc::EOPNOTSUPP, libc::ENOPROTOOPT].contains(&errno)
        });
    if !refused {
        return outcome;
    }
    service.segmentation.store(false, Ordering::Relaxed);
    tracing::info!(
        error = ?outcome.error,
        "mcdist server: the kernel refuses UDP segmentation offload; sending datagram by datagram"
    );
    let rest = sys::send_batch(&service.socket, &list[outcome.sent..]);
    sys::BatchSent {
        sent: outcome.sent + rest.sent,
        error: rest.error,
    }
}

/// Reads, fragments and sends the pages of `batch` (emptying it).
fn send_pages(service: &McastService, scratch: &mut SendScratch) {
    let SendScratch {
        batch,
        datagrams,
        page,
        reply,
    } = scratch;
    let mut destinations: Vec<SocketAddrV4> = Vec::new();
    let sent_pages = fragment_pages(service, batch, datagrams, page, reply, &mut destinations);
    let list: Vec<(SocketAddrV4, &[u8])> = destinations
        .iter()
        .zip(datagrams.iter())
        .map(|(to, datagram)| (*to, datagram.as_slice()))
        .collect();
    let outcome = send_list(service, &list, &sent_pages);
    count_sent(&service.counters, &list, &outcome, &sent_pages);
    let pushed: Vec<PushedPage<'_>> = batch
        .iter()
        .filter(|o| {
            o.job.push
                && o.job.destination == Destination::Group
                && o.job.fragments == ALL_FRAGMENTS
        })
        .map(|o| PushedPage {
            family: o.family,
            generation: o.generation,
            page: o.job.page,
            to: o.to,
            store: o.store.as_ref(),
            sealer: &o.sealer,
        })
        .collect();
    send_repairs(service, &pushed);
    batch.clear();
}

/// Reads each page of `batch` and encodes its fragments into `datagrams` (reused), their
/// destinations into `destinations`; a page that cannot be read gets its requester, if any, a
/// REJECT.
/// Returns, per page encoded, where its datagrams end and the page.
fn fragment_pages<'b>(
    service: &McastService,
    batch: &'b [Outgoing],
    datagrams: &mut Vec<Vec<u8>>,
    page: &mut [u8; PAGE_SIZE],
    reply: &mut Vec<u8>,
    destinations: &mut Vec<SocketAddrV4>,
) -> Vec<(usize, &'b Outgoing)> {
    let counters = &service.counters;
    let cut = service.fragmentation;
    let mut used = 0;
    // Destination and page-sent accounting per datagram, in order.
    let mut sent_pages: Vec<(usize, &Outgoing)> = Vec::new();
    for outgoing in batch {
        if let Err(error) = outgoing.store.read_page(outgoing.job.page, page) {
            bump(&counters.read_failures, 1);
            tracing::warn!(
                family = format_args!("{:#x}", outgoing.family),
                page = format_args!("{:#x}", outgoing.job.page),
                %error,
                "mcdist server: reading a page failed"
            );
            let header = Header {
                flags: 0,
                family: outgoing.family,
                generation: outgoing.generation,
                sender: 0,
            };
            let reject = Reject {
                page: outgoing.job.page,
                code: RejectCode::ReadFailed,
            };
            if let Some((requester, _)) = outgoing.job.requester {
                send_reject(service, &header, reject, requester, reply);
            }
            continue;
        }
        // Who asked first: that receiver alone may take the page's arrival as the server's
        // place in its requests (its loss detection).
        let asked_by = match outgoing.job.requester {
            Some((_, id)) if !outgoing.job.push => id,
            _ => 0,
        };
        let header = Header {
            flags: outgoing.flags,
            family: outgoing.family,
            generation: outgoing.generation,
            sender: asked_by,
        };
        for (index, offset, len) in cut.pieces() {
            if outgoing.job.fragments & (1 << index) == 0 {
                continue;
            }
            if datagrams.len() <= used {
                datagrams.push(Vec::with_capacity(MAX_DATAGRAM_LEN));
            }
            let start = usize::from(offset);
            let fragment = Fragment {
                page: outgoing.job.page,
                index,
                count: cut.count,
                offset,
                data: &page[start..start + usize::from(len)],
            };
            if let Err(error) =
                wire::encode_fragment(&outgoing.sealer, &mut datagrams[used], &header, &fragment)
            {
                // Unreachable: the fragmentation covers the page with valid pieces.
                tracing::error!(%error, "mcdist server: encoding a fragment failed");
                continue;
            }
            destinations.push(outgoing.to);
            used += 1;
        }
        sent_pages.push((used, outgoing));
    }
    sent_pages
}

/// Counts what `outcome` says of sending `list`: fragments, bytes, and the pages of
/// `sent_pages` all of whose fragments left.
fn count_sent(
    counters: &Counters,
    list: &[(SocketAddrV4, &[u8])],
    outcome: &sys::BatchSent,
    sent_pages: &[(usize, &Outgoing)],
) {
    if let Some(error) = &outcome.error {
        bump(&counters.send_errors, (list.len() - outcome.sent) as u64);
        tracing::debug!(%error, unsent = list.len() - outcome.sent, "mcdist server: send failed");
    }
    bump(&counters.fragments_sent, outcome.sent as u64);
    bump(&counters.bytes_sent, bytes_of(&list[..outcome.sent]));
    for &(end, outgoing) in sent_pages {
        // A page counts as sent when all its fragments were.
        if end > outcome.sent {
            continue;
        }
        bump(&counters.pages_sent, 1);
        if outgoing.flags & FRAGMENT_UNICAST != 0 {
            bump(&counters.unicast_pages, 1);
        }
        if outgoing.job.push {
            bump(&counters.pushed_pages, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;
    use std::time::{Duration, Instant};

    use super::super::config::McastServerConfig;
    use super::super::family::ServerState;
    use super::super::stats::Counters;
    use super::super::test_support::{
        FAMILY, PAGES, apply, config, family_asked, family_pushing, receiver,
    };
    use super::{INLINE_PAGES, MAX_BATCH_PAGES, Next, take_batch, take_inline};
    use crate::mcast::wire::{FRAGMENT_PUSH, FRAGMENT_UNICAST, REQUEST_JOIN};
    use crate::sync::{read, try_write};

    #[test]
    fn the_request_thread_sends_nothing_while_a_send_thread_is_sending() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut state = ServerState::default();
        state
            .families
            .insert(FAMILY, family_asked(&config, &counters, &[0, 1, 2, 3], now));
        let sending = RwLock::new(());
        let mut batch = Vec::new();
        let send_thread = read(&sending);
        let (more, guard) = take_inline(&mut state, &config, &sending, now, &mut batch);
        assert!(more && guard.is_none() && batch.is_empty());
        assert_eq!(state.families[&FAMILY].queue.len(), 4, "nothing taken");
        drop(send_thread);
        let (more, guard) = take_inline(&mut state, &config, &sending, now, &mut batch);
        assert!(more && guard.is_some());
        assert!(
            try_write(&sending).is_none(),
            "held until the batch is sent"
        );
        let taken: Vec<u64> = batch.iter().map(|o| o.job.page).collect();
        assert_eq!(taken.len(), INLINE_PAGES as usize);
        assert_eq!(taken[0], 0, "from the head of the queue");
    }

    #[test]
    fn batches_take_turns_between_families_and_spend_their_tokens() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut state = ServerState::default();
        for id in [FAMILY, FAMILY + 1] {
            let family = family_asked(&config, &counters, &[0, 1, 2, 3, 4, 5, 6], now);
            state.families.insert(id, family);
        }
        let mut batch = Vec::new();
        let mut order = Vec::new();
        for _ in 0..2 {
            assert!(matches!(
                take_batch(&mut state, &config, now, 4, &mut batch),
                Next::Send
            ));
            order.push(batch[0].family);
            assert_eq!(batch.len(), 4);
            assert!(
                batch
                    .iter()
                    .all(|page| page.flags == FRAGMENT_UNICAST && page.to == receiver(1))
            );
            batch.clear();
        }
        assert_eq!(order, vec![FAMILY, FAMILY + 1], "round robin");
        assert_eq!(state.families[&FAMILY].pages_sent, 4);
        assert_eq!(state.families[&FAMILY].queue.len(), 3);
    }

    #[test]
    fn requested_pages_of_any_family_go_before_pushed_ones() {
        let config = config();
        let counters = Counters::default();
        let now = Instant::now();
        let mut state = ServerState::default();
        let mut pushing = family_pushing(&config, now, vec![(0, PAGES)]);
        apply(
            &mut pushing,
            &config,
            &counters,
            (1, REQUEST_JOIN),
            &[],
            now,
        );
        state.families.insert(FAMILY, pushing);
        let mut asking = family_pushing(&config, now, vec![(0, PAGES)]);
        apply(&mut asking, &config, &counters, (1, REQUEST_JOIN), &[], now);
        apply(&mut asking, &config, &counters, (1, 0), &[5, 6], now);
        state.families.insert(FAMILY + 1, asking);
        let mut batch = Vec::new();
        // The request thread's one page: the request's, though the other family's turn.
        assert!(matches!(
            take_batch(&mut state, &config, now, 1, &mut batch),
            Next::Send
        ));
        assert_eq!((batch[0].family, batch[0].job.page), (FAMILY + 1, 5));
        batch.clear();
        // Then the rest of the request, and the family's push behind it.
        assert!(matches!(
            take_batch(&mut state, &config, now, 3, &mut batch),
            Next::Send
        ));
        let taken: Vec<(u64, bool)> = batch.iter().map(|o| (o.job.page, o.job.push)).collect();
        assert_eq!(taken, vec![(6, false), (0, true), (1, true)]);
        assert!(batch[1..].iter().all(|o| o.flags == FRAGMENT_PUSH));
        batch.clear();
        // With no request left, the families' pushes take turns.
        assert!(matches!(
            take_batch(&mut state, &config, now, 2, &mut batch),
            Next::Send
        ));
        assert_eq!(batch[0].family, FAMILY);
        assert_eq!(state.families[&(FAMILY + 1)].pages_pushed, 2);
    }

    #[test]
    fn a_family_out_of_tokens_waits_for_the_next_one() {
        // 1000 pages/s: a burst of 5 pages, then one page per millisecond.
        let config = McastServerConfig {
            initial_rate: 1000,
            ..config()
        };
        let counters = Counters::default();
        let now = Instant::now();
        let family = family_asked(&config, &counters, &[0, 1, 2, 3, 4, 5, 6, 7], now);
        let mut state = ServerState::default();
        state.families.insert(FAMILY, family);
        let mut batch = Vec::new();
        assert!(matches!(
            take_batch(&mut state, &config, now, MAX_BATCH_PAGES, &mut batch),
            Next::Send
        ));
        let pages: Vec<u64> = batch.iter().map(|page| page.job.page).collect();
        assert_eq!(pages, vec![0, 1, 2, 3, 4]);
        batch.clear();
        match take_batch(&mut state, &config, now, MAX_BATCH_PAGES, &mut batch) {
            Next::Wait(wait) => assert!(wait > Duration::ZERO && wait <= Duration::from_millis(1)),
            Next::Send => panic!("sent without tokens: {} pages", batch.len()),
        }
        let later = now + Duration::from_micros(2500);
        assert!(matches!(
            take_batch(&mut state, &config, later, MAX_BATCH_PAGES, &mut batch),
            Next::Send
        ));
        assert_eq!(batch.len(), 2);
        assert_eq!(state.families[&FAMILY].pages_sent, 7);
    }
}
