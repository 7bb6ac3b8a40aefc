//! Forward error correction of the push stream: a block of pushed pages, each cut into its
//! fragments (the source symbols, the last one of a page padded with zeros), protected by
//! Reed-Solomon recovery symbols, so that a receiver that lost some of the block's fragments
//! rebuilds them from the REPAIRs that follow the block, without a round trip.
//!
//! Reed-Solomon (`reed-solomon-simd`: O(n log n) encoding and decoding, SIMD on x86-64) and
//! not RaptorQ: a block here is at most 16 pages (256 source symbols), where a
//! maximum-distance-separable code recovers from exactly as many recovery symbols as symbols
//! were lost, and its encoder and decoder are one call each with no tuning.

use foldhash::{HashMap, HashMapExt};

use crate::mcast::reassembly::PageBuf;
use crate::mcast::wire::Fragmentation;
use crate::wire::PAGE_SIZE;

/// How a block's pages are cut into symbols: the page's fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) symbols_per_page: u8,
    pub(crate) symbol_len: u16,
}

impl Shape {
    /// The shape of a sender's fragmentation; `None` when its fragments are of odd length
    /// (the code needs even symbols; [`Fragmentation::for_mtu`] never cuts so).
    pub(crate) fn of(cut: Fragmentation) -> Option<Shape> {
        cut.payload.is_multiple_of(2).then_some(Shape {
            symbols_per_page: cut.count,
            symbol_len: cut.payload,
        })
    }

    /// The bytes of `page` that symbol `index` carries.
    fn piece(self, index: usize) -> std::ops::Range<usize> {
        let len = usize::from(self.symbol_len);
        (index * len).min(PAGE_SIZE)..((index + 1) * len).min(PAGE_SIZE)
    }

    /// Symbol `index` of `page`: its piece, padded with zeros.
    fn symbol(self, page: &[u8; PAGE_SIZE], index: usize) -> Vec<u8> {
        let mut symbol = vec![0u8; usize::from(self.symbol_len)];
        let piece = &page[self.piece(index)];
        symbol[..piece.len()].copy_from_slice(piece);
        symbol
    }
}

/// Why a block could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RepairError {
    /// The Reed-Solomon encoder refused the block.
    #[error("encoding {pages} pages into {count} recovery symbols")]
    Encode {
        pages: usize,
        count: usize,
        #[source]
        source: reed_solomon_simd::Error,
    },
    /// The Reed-Solomon decoder refused the symbols.
    #[error("decoding a block of {pages} pages")]
    Decode {
        pages: usize,
        #[source]
        source: reed_solomon_simd::Error,
    },
}

/// The `count` recovery symbols of the block `pages`.
pub(crate) fn encode(
    shape: Shape,
    pages: &[&[u8; PAGE_SIZE]],
    count: usize,
) -> Result<Vec<Vec<u8>>, RepairError> {
    let per_page = usize::from(shape.symbols_per_page);
    let originals = pages
        .iter()
        .flat_map(|page| (0..per_page).map(move |index| shape.symbol(page, index)));
    reed_solomon_simd::encode(pages.len() * per_page, count, originals).map_err(|source| {
        RepairError::Encode {
            pages: pages.len(),
            count,
            source,
        }
    })
}

/// Rebuilds the pages of a block of `pages` pages that are not in `known` (position in the
/// block → page) from `recovery` (index → symbol, of `count` recovery symbols). `None` when
/// there are too few symbols yet.
pub(crate) fn decode(
    shape: Shape,
    pages: usize,
    count: usize,
    known: &HashMap<usize, &[u8; PAGE_SIZE]>,
    recovery: &[(usize, Vec<u8>)],
) -> Result<Option<Vec<(usize, PageBuf)>>, RepairError> {
    let per_page = usize::from(shape.symbols_per_page);
    let missing = (pages - known.len()) * per_page;
    if missing == 0 || recovery.len() < missing {
        return Ok(None);
    }
    let originals = known.iter().flat_map(|(&position, page)| {
        (0..per_page).map(move |index| (position * per_page + index, shape.symbol(page, index)))
    });
    let restored = reed_solomon_simd::decode(
        pages * per_page,
        count,
        originals,
        recovery.iter().map(|(index, symbol)| (*index, symbol)),
    )
    .map_err(|source| RepairError::Decode { pages, source })?;
    let mut rebuilt: HashMap<usize, PageBuf> = HashMap::new();
    for (symbol_index, symbol) in restored {
        let (position, index) = (symbol_index / per_page, symbol_index % per_page);
        let page = rebuilt
            .entry(position)
            .or_insert_with(|| Box::new([0u8; PAGE_SIZE]));
        let piece = shape.piece(index);
        let len = piece.len();
        page[piece].copy_from_slice(&symbol[..len]);
    }
    let mut rebuilt: Vec<(usize, PageBuf)> = rebuilt.into_iter().collect();
    rebuilt.sort_unstable_by_key(|(position, _)| *position);
    Ok(Some(rebuilt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> PageBuf {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        for (i, byte) in page.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        page
    }

    #[test]
    fn lost_pages_are_rebuilt_from_as_many_recovery_symbols_as_symbols_lost() {
        let shape = Shape::of(Fragmentation::for_mtu(1500)).unwrap();
        assert_eq!((shape.symbols_per_page, shape.symbol_len), (3, 1368));
        let pages: Vec<PageBuf> = (0..5).map(page).collect();
        let refs: Vec<&[u8; PAGE_SIZE]> = pages.iter().map(|p| &**p).collect();
        let recovery = encode(shape, &refs, 7).unwrap();
        assert_eq!(recovery.len(), 7);
        assert!(recovery.iter().all(|s| s.len() == 1368));
        // Pages 1 and 3 lost: 6 symbols, so 6 of the 7 recovery symbols are needed.
        let known: HashMap<usize, &[u8; PAGE_SIZE]> =
            [0, 2, 4].into_iter().map(|i| (i, refs[i])).collect();
        let some: Vec<(usize, Vec<u8>)> = recovery.iter().cloned().enumerate().skip(2).collect();
        assert_eq!(some.len(), 5);
        assert!(decode(shape, 5, 7, &known, &some).unwrap().is_none());
        let enough: Vec<(usize, Vec<u8>)> = recovery.iter().cloned().enumerate().skip(1).collect();
        let rebuilt = decode(shape, 5, 7, &known, &enough).unwrap().unwrap();
        assert_eq!(rebuilt.len(), 2);
        assert_eq!((rebuilt[0].0, rebuilt[1].0), (1, 3));
        assert_eq!(rebuilt[0].1, pages[1]);
        assert_eq!(rebuilt[1].1, pages[3]);
        // Nothing lost: nothing to do.
        let all: HashMap<usize, &[u8; PAGE_SIZE]> = refs.iter().copied().enumerate().collect();
        assert!(decode(shape, 5, 7, &all, &enough).unwrap().is_none());
    }

    #[test]
    fn larger_frames_give_two_symbols_and_garbage_symbols_are_refused() {
        let shape = Shape::of(Fragmentation::for_mtu(3500)).unwrap();
        assert_eq!((shape.symbols_per_page, shape.symbol_len), (2, 2048));
        let pages: Vec<PageBuf> = (0..2).map(page).collect();
        let refs: Vec<&[u8; PAGE_SIZE]> = pages.iter().map(|p| &**p).collect();
        let recovery = encode(shape, &refs, 2).unwrap();
        let known: HashMap<usize, &[u8; PAGE_SIZE]> = [(1, refs[1])].into_iter().collect();
        let two: Vec<(usize, Vec<u8>)> = recovery.into_iter().enumerate().collect();
        let rebuilt = decode(shape, 2, 2, &known, &two).unwrap().unwrap();
        assert_eq!(rebuilt[0], (0, pages[0].clone()));
        // A symbol of the wrong length is an error, not a panic.
        let short = vec![(0, vec![0u8; 10]), (1, vec![0u8; 10])];
        assert!(decode(shape, 2, 2, &known, &short).is_err());
        assert!(
            Shape::of(Fragmentation {
                count: 3,
                payload: 1367
            })
            .is_none()
        );
    }
}
