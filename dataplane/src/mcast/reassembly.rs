//! Reassembly of pages from their fragments, keyed by (family, page).
//!
//! At most `max_partials` pages are partly received at once: a new page beyond that evicts the
//! oldest partial one. A partial page older than `timeout` is dropped (its missing fragments
//! were lost; the page comes again when someone re-requests it). Completed pages are handed
//! out in their own buffers, which the caller gives back with [`Reassembly::recycle`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt};

use crate::mcast::wire::Fragment;
use crate::wire::PAGE_SIZE;

/// One page's bytes.
pub(crate) type PageBuf = Box<[u8; PAGE_SIZE]>;

/// Spare page buffers kept for reuse.
const MAX_SPARE_BUFFERS: usize = 256;

/// What one fragment did; `P` is how a complete page is held.
#[derive(Debug)]
pub(crate) enum Outcome<P = PageBuf> {
    /// The page is still missing fragments.
    Partial,
    /// The page is complete.
    Complete(P),
    /// This fragment had already arrived.
    Duplicate,
    /// The fragment contradicts the ones before it (another fragment count, or lengths that
    /// do not add up to a page); the partial page was dropped.
    Inconsistent,
}

#[derive(Debug)]
struct Partial {
    data: PageBuf,
    count: u8,
    /// Bit `i` set: fragment `i` arrived.
    received: u16,
    bytes: usize,
    /// Key into `Reassembly::age`.
    seq: u64,
}

impl<P> Outcome<P> {
    /// The same outcome with the complete page converted by `f`.
    pub(crate) fn map<Q>(self, f: impl FnOnce(P) -> Q) -> Outcome<Q> {
        match self {
            Outcome::Partial => Outcome::Partial,
            Outcome::Complete(page) => Outcome::Complete(f(page)),
            Outcome::Duplicate => Outcome::Duplicate,
            Outcome::Inconsistent => Outcome::Inconsistent,
        }
    }
}

/// Pages being reassembled.
#[derive(Debug)]
pub(crate) struct Reassembly {
    partials: HashMap<(u64, u64), Partial>,
    /// Partial pages by age: sequence number → (key, started).
    age: BTreeMap<u64, ((u64, u64), Instant)>,
    next_seq: u64,
    max_partials: usize,
    timeout: Duration,
    spare: Vec<PageBuf>,
}

fn new_page() -> PageBuf {
    Box::new([0u8; PAGE_SIZE])
}

impl Reassembly {
    /// Keeps at most `max_partials` (at least 1) partial pages, each at most `timeout`.
    pub(crate) fn new(max_partials: usize, timeout: Duration) -> Reassembly {
        Reassembly {
            partials: HashMap::new(),
            age: BTreeMap::new(),
            next_seq: 0,
            max_partials: max_partials.max(1),
            timeout,
            spare: Vec::new(),
        }
    }

    fn buffer(&mut self) -> PageBuf {
        self.spare.pop().unwrap_or_else(new_page)
    }

    /// Whether `page` of `family` is partly received.
    pub(crate) fn is_partial(&self, family: u64, page: u64) -> bool {
        self.partials.contains_key(&(family, page))
    }

    /// The fragments of `page` of `family` still missing (bit `i`: fragment `i`), if it is
    /// partly received.
    pub(crate) fn missing(&self, family: u64, page: u64) -> Option<u16> {
        let partial = self.partials.get(&(family, page))?;
        let full = u16::MAX >> (16 - u32::from(partial.count));
        Some(full & !partial.received)
    }

    /// Gives a completed page's buffer back for reuse.
    pub(crate) fn recycle(&mut self, buf: PageBuf) {
        if self.spare.len() < MAX_SPARE_BUFFERS {
            self.spare.push(buf);
        }
    }

    fn remove(&mut self, key: (u64, u64)) -> Option<Partial> {
        let partial = self.partials.remove(&key)?;
        self.age.remove(&partial.seq);
        Some(partial)
    }

    /// Adds one authenticated fragment of `page` of `family`. Returns how many partial pages
    /// were evicted to make room besides the outcome.
    pub(crate) fn insert(
        &mut self,
        family: u64,
        fragment: &Fragment<'_>,
        now: Instant,
    ) -> (Outcome, u64) {
        let offset = usize::from(fragment.offset);
        let range = offset..offset + fragment.data.len();
        if fragment.count == 1 {
            if fragment.data.len() != PAGE_SIZE {
                return (Outcome::Inconsistent, 0);
            }
            let mut buf = self.buffer();
            buf.copy_from_slice(fragment.data);
            return (Outcome::Complete(buf), 0);
        }
        let key = (family, fragment.page);
        let bit = 1u16 << fragment.index;
        let full = u16::MAX >> (16 - u32::from(fragment.count));
        if let Some(partial) = self.partials.get_mut(&key) {
            if partial.count != fragment.count {
                if let Some(dropped) = self.remove(key) {
                    self.recycle(dropped.data);
                }
                return (Outcome::Inconsistent, 0);
            }
            if partial.received & bit != 0 {
                return (Outcome::Duplicate, 0);
            }
            partial.data[range].copy_from_slice(fragment.data);
            partial.received |= bit;
            partial.bytes += fragment.data.len();
            let done = partial.received == full;
            let overfull = partial.bytes > PAGE_SIZE;
            let exact = partial.bytes == PAGE_SIZE;
            if !done && !overfull {
                return (Outcome::Partial, 0);
            }
            let Some(finished) = self.remove(key) else {
                return (Outcome::Inconsistent, 0);
            };
            if done && exact {
                return (Outcome::Complete(finished.data), 0);
            }
            self.recycle(finished.data);
            return (Outcome::Inconsistent, 0);
        }
        let mut evicted = 0;
        while self.partials.len() >= self.max_partials {
            let Some((_, (oldest, _))) = self.age.pop_first() else {
                break;
            };
            if let Some(dropped) = self.partials.remove(&oldest) {
                self.recycle(dropped.data);
                evicted += 1;
            }
        }
        let mut data = self.buffer();
        data[range].copy_from_slice(fragment.data);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.age.insert(seq, (key, now));
        self.partials.insert(
            key,
            Partial {
                data,
                count: fragment.count,
                received: bit,
                bytes: fragment.data.len(),
                seq,
            },
        );
        (Outcome::Partial, evicted)
    }

    /// Drops the partial pages older than the timeout; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> u64 {
        let mut expired = 0;
        while let Some((&seq, &(key, started))) = self.age.first_key_value() {
            if now.saturating_duration_since(started) < self.timeout {
                break;
            }
            self.age.remove(&seq);
            if let Some(dropped) = self.partials.remove(&key) {
                self.recycle(dropped.data);
                expired += 1;
            }
        }
        expired
    }

    /// When the oldest partial page times out, if there is one.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.age
            .first_key_value()
            .map(|(_, &(_, started))| started + self.timeout)
    }

    /// Drops every partial page of `family`.
    pub(crate) fn forget_family(&mut self, family: u64) {
        let keys: Vec<(u64, u64)> = self
            .partials
            .keys()
            .filter(|(f, _)| *f == family)
            .copied()
            .collect();
        for key in keys {
            if let Some(dropped) = self.remove(key) {
                self.recycle(dropped.data);
            }
        }
    }

    /// Pages partly received now.
    pub(crate) fn partial_pages(&self) -> usize {
        self.partials.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcast::wire::Fragmentation;

    fn page_bytes(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn fragments(page: u64, data: &[u8], mtu: u32) -> Vec<Fragment<'_>> {
        let cut = Fragmentation::for_mtu(mtu);
        cut.pieces()
            .map(|(index, offset, len)| Fragment {
                page,
                index,
                count: cut.count,
                offset,
                data: &data[usize::from(offset)..usize::from(offset) + usize::from(len)],
            })
            .collect()
    }

    fn complete(outcome: Outcome) -> PageBuf {
        match outcome {
            Outcome::Complete(buf) => buf,
            other => panic!("expected a complete page, got {other:?}"),
        }
    }

    #[test]
    fn pages_complete_in_any_order_and_duplicates_are_ignored() {
        let now = Instant::now();
        let mut r = Reassembly::new(8, Duration::from_secs(1));
        let data = page_bytes(1);
        let mut pieces = fragments(5, &data, 1500);
        assert_eq!(pieces.len(), 3);
        pieces.reverse();
        assert!(matches!(r.insert(1, &pieces[0], now).0, Outcome::Partial));
        assert!(matches!(r.insert(1, &pieces[0], now).0, Outcome::Duplicate));
        assert!(matches!(r.insert(1, &pieces[1], now).0, Outcome::Partial));
        // The same page number of another family is another page.
        assert!(matches!(r.insert(2, &pieces[1], now).0, Outcome::Partial));
        let page = complete(r.insert(1, &pieces[2], now).0);
        assert_eq!(&page[..], &data[..]);
        assert_eq!(r.partial_pages(), 1);
        r.recycle(page);
        let jumbo = fragments(6, &data, 9000);
        assert_eq!(jumbo.len(), 1);
        assert_eq!(&complete(r.insert(1, &jumbo[0], now).0)[..], &data[..]);
    }

    #[test]
    fn contradicting_fragments_drop_the_partial_page() {
        let now = Instant::now();
        let mut r = Reassembly::new(8, Duration::from_secs(1));
        let data = page_bytes(2);
        let small = fragments(1, &data, 1500);
        let smaller = fragments(1, &data, 576);
        assert!(matches!(r.insert(1, &small[0], now).0, Outcome::Partial));
        assert!(matches!(
            r.insert(1, &smaller[1], now).0,
            Outcome::Inconsistent
        ));
        assert_eq!(r.partial_pages(), 0);
        // Lengths that do not add up to a page.
        let short = Fragment {
            data: &data[..100],
            ..small[1]
        };
        assert!(matches!(r.insert(1, &small[0], now).0, Outcome::Partial));
        assert!(matches!(r.insert(1, &short, now).0, Outcome::Partial));
        assert!(matches!(
            r.insert(1, &small[2], now).0,
            Outcome::Inconsistent
        ));
        let single_short = Fragment {
            count: 1,
            index: 0,
            ..short
        };
        assert!(matches!(
            r.insert(1, &single_short, now).0,
            Outcome::Inconsistent
        ));
        assert_eq!(r.partial_pages(), 0);
    }

    #[test]
    fn partial_pages_are_bounded_and_time_out() {
        let start = Instant::now();
        let timeout = Duration::from_millis(100);
        let mut r = Reassembly::new(2, timeout);
        let data = page_bytes(3);
        let first = fragments(1, &data, 1500);
        let second = fragments(2, &data, 1500);
        let third = fragments(3, &data, 1500);
        assert_eq!(r.insert(7, &first[0], start).1, 0);
        assert_eq!(r.insert(7, &second[0], start).1, 0);
        assert_eq!(r.next_expiry(), Some(start + timeout));
        // A third page evicts the oldest.
        assert_eq!(r.insert(7, &third[0], start).1, 1);
        assert_eq!(r.partial_pages(), 2);
        assert!(matches!(r.insert(7, &first[1], start).1, 1));
        assert_eq!(r.expire(start + Duration::from_millis(50)), 0);
        assert_eq!(r.expire(start + timeout), 2);
        assert_eq!(r.partial_pages(), 0);
        assert_eq!(r.next_expiry(), None);
        assert!(matches!(r.insert(7, &third[1], start).0, Outcome::Partial));
        r.forget_family(7);
        assert_eq!(r.partial_pages(), 0);
        assert_eq!(r.next_expiry(), None);
    }
}
