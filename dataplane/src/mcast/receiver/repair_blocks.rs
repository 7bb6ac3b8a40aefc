//! What the receiver keeps to use the push stream's REPAIRs: a copy of the pages it completed
//! lately (a block's pages that arrived are its known symbols) and the recovery symbols of the
//! blocks still missing pages, both bounded, oldest dropped first.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};

use crate::mcast::reassembly::PageBuf;
use crate::mcast::repair::{self, RepairError, Shape};
use crate::wire::PAGE_SIZE;

/// Blocks awaiting recovery symbols at once; older ones are dropped (their pages come by
/// demand).
const MAX_BLOCKS: usize = 256;

/// A block: (family, first page, pages).
pub(super) type BlockKey = (u64, u64, u8);

struct Block {
    shape: Shape,
    count: u8,
    recovery: Vec<(usize, Vec<u8>)>,
}

/// Recent pages and pending blocks.
pub(super) struct RepairBlocks {
    pages: HashMap<(u64, u64), PageBuf>,
    page_order: VecDeque<(u64, u64)>,
    max_pages: usize,
    blocks: HashMap<BlockKey, Block>,
    block_order: VecDeque<BlockKey>,
}

impl RepairBlocks {
    /// Keeps copies of at most `max_pages` completed pages (0: none, so only blocks lost
    /// whole can be rebuilt).
    pub(super) fn new(max_pages: usize) -> RepairBlocks {
        RepairBlocks {
            pages: HashMap::new(),
            page_order: VecDeque::new(),
            max_pages,
            blocks: HashMap::new(),
            block_order: VecDeque::new(),
        }
    }

    /// Keeps a copy of `page` of `family`, which just completed with `data` (its bytes, in
    /// pieces).
    pub(super) fn completed(&mut self, family: u64, page: u64, data: &[&[u8]]) {
        if self.max_pages == 0 || self.pages.contains_key(&(family, page)) {
            return;
        }
        while self.page_order.len() >= self.max_pages {
            if let Some(old) = self.page_order.pop_front() {
                self.pages.remove(&old);
            }
        }
        let mut copy: PageBuf = Box::new([0u8; PAGE_SIZE]);
        let mut at = 0;
        for piece in data {
            let end = (at + piece.len()).min(PAGE_SIZE);
            copy[at..end].copy_from_slice(&piece[..end - at]);
            at = end;
        }
        self.pages.insert((family, page), copy);
        self.page_order.push_back((family, page));
    }

    /// Adds recovery symbol `index` (of `count`) of block `key` and tries to rebuild the
    /// block's pages for which `held` is false. Returns the rebuilt pages (position in the
    /// block, bytes) once there are enough symbols; the block is then forgotten, as it is when
    /// decoding fails.
    pub(super) fn add(
        &mut self,
        key: BlockKey,
        shape: Shape,
        (index, count): (u8, u8),
        symbol: &[u8],
        held: impl Fn(u64) -> bool,
    ) -> Result<Option<Vec<(usize, PageBuf)>>, RepairError> {
        let (family, first, pages) = key;
        let fresh = self
            .blocks
            .get(&key)
            .is_none_or(|block| block.shape != shape || block.count != count);
        if fresh {
            if !self.blocks.contains_key(&key) {
                self.block_order.push_back(key);
            }
            self.blocks.insert(
                key,
                Block {
                    shape,
                    count,
                    recovery: Vec::new(),
                },
            );
            while self.block_order.len() > MAX_BLOCKS {
                if let Some(old) = self.block_order.pop_front() {
                    self.blocks.remove(&old);
                }
            }
        }
        let Some(block) = self.blocks.get_mut(&key) else {
            return Ok(None);
        };
        let index = usize::from(index);
        if !block.recovery.iter().any(|(i, _)| *i == index) {
            block.recovery.push((index, symbol.to_vec()));
        }
        let known: HashMap<usize, &[u8; PAGE_SIZE]> = (0..usize::from(pages))
            .filter(|&position| held(first + position as u64))
            .filter_map(|position| {
                self.pages
                    .get(&(family, first + position as u64))
                    .map(|page| (position, &**page))
            })
            .collect();
        let outcome = repair::decode(
            shape,
            usize::from(pages),
            usize::from(count),
            &known,
            &block.recovery,
        );
        if !matches!(outcome, Ok(None)) {
            self.forget(key);
        }
        outcome
    }

    /// Drops block `key` (all its pages are held, or it was decoded).
    pub(super) fn forget(&mut self, key: BlockKey) {
        if self.blocks.remove(&key).is_some() {
            self.block_order.retain(|k| *k != key);
        }
    }

    /// Drops everything of `family` (it was left).
    pub(super) fn leave(&mut self, family: u64) {
        self.pages.retain(|(f, _), _| *f != family);
        self.page_order.retain(|(f, _)| *f != family);
        self.blocks.retain(|(f, _, _), _| *f != family);
        self.block_order.retain(|(f, _, _)| *f != family);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{FAMILY, GENERATION, feed, fragments, header, key, setup};
    use crate::mcast::repair::{self, Shape};
    use crate::mcast::wire::{self, FragmentSealer, Fragmentation, McastKey, Repair};
    use crate::wire::PAGE_SIZE;

    /// The REPAIR datagrams of the block `first..first + fills.len()`, page `first + i`
    /// filled with `fills[i]` (as [`fragments`] fills them).
    fn repairs(first: u64, fills: &[u8], count: u8) -> Vec<Vec<u8>> {
        let shape = Shape::of(Fragmentation::for_mtu(1500)).unwrap();
        let pages: Vec<[u8; PAGE_SIZE]> = fills.iter().map(|&f| [f; PAGE_SIZE]).collect();
        let refs: Vec<&[u8; PAGE_SIZE]> = pages.iter().collect();
        let sealer = FragmentSealer::new(McastKey::new(key()).fragment_key(FAMILY, GENERATION));
        repair::encode(shape, &refs, usize::from(count))
            .unwrap()
            .iter()
            .enumerate()
            .map(|(index, symbol)| {
                let repair = Repair {
                    first_page: first,
                    pages: fills.len() as u8,
                    symbols_per_page: shape.symbols_per_page,
                    symbol_len: shape.symbol_len,
                    index: index as u8,
                    count,
                    data: symbol,
                };
                let mut out = Vec::new();
                wire::encode_repair(&sealer, &mut out, &header(FAMILY, GENERATION), &repair)
                    .unwrap();
                out
            })
            .collect()
    }

    #[test]
    fn a_lost_pushed_page_is_rebuilt_from_the_repairs_that_follow_its_block() {
        let (core, recorder, sink) = setup();
        // Pages 4..8 pushed; page 6 lost whole (3 fragments), so 3 of the 4 REPAIRs rebuild it.
        for page in [4, 5, 7] {
            let datagrams = fragments(FAMILY, GENERATION, page, page as u8);
            feed(&core, datagrams.iter().map(Vec::as_slice));
        }
        let block = repairs(4, &[4, 5, 6, 7], 4);
        feed(&core, block[..2].iter().map(Vec::as_slice));
        assert_eq!(core.stats().pages_repaired, 0, "two symbols are too few");
        feed(&core, [block[3].as_slice()]);
        let stats = core.stats();
        assert_eq!((stats.pages_repaired, stats.repair_symbols), (1, 3));
        let pages = sink.pages.lock().unwrap().clone();
        assert_eq!(pages.len(), 4);
        assert!(pages.contains(&(6, vec![6; PAGE_SIZE])));
        // Nothing was requested: the loss cost no round trip.
        assert_eq!(recorder.sent.lock().unwrap().len(), 1, "the JOIN only");
        // Late repairs of a block held whole, and a block past the family's end, do nothing.
        feed(&core, [block[2].as_slice()]);
        feed(&core, repairs(15, &[1, 2], 1).iter().map(Vec::as_slice));
        let stats = core.stats();
        assert_eq!((stats.pages_repaired, stats.malformed), (1, 1));
        assert_eq!(sink.pages.lock().unwrap().len(), 4);
    }

    #[test]
    fn a_block_lost_whole_is_rebuilt_from_its_repairs_alone() {
        let (core, _recorder, sink) = setup();
        let block = repairs(0, &[1, 2], 6);
        feed(&core, block.iter().map(Vec::as_slice));
        assert_eq!(core.stats().pages_repaired, 2);
        let mut pages = sink.pages.lock().unwrap().clone();
        pages.sort();
        assert_eq!(
            pages,
            vec![(0, vec![1; PAGE_SIZE]), (1, vec![2; PAGE_SIZE])]
        );
    }
}
