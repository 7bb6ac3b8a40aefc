//! The REPAIRs that follow a batch of pushed pages: each run of consecutive pages multicast
//! together as pushed pages (a block of at most [`MAX_BLOCK_PAGES`]) gets
//! `repair_percent`% of its fragments in Reed-Solomon recovery symbols, sent to the group
//! right after it, each as a datagram of its own.

use std::net::SocketAddrV4;

use super::service::McastService;
use super::stats::{bump, bytes_of};
use crate::mcast::reassembly::PageBuf;
use crate::mcast::repair::{self, Shape};
use crate::mcast::sys;
use crate::mcast::wire::{self, FragmentSealer, Header, MAX_BLOCK_PAGES, Repair};
use crate::server::PageStore;
use crate::wire::PAGE_SIZE;

/// Recovery symbols for a block of `pages` pages of `shape` at `percent`%: at least one, at
/// most 255 (the wire's count).
fn recovery_count(shape: Shape, pages: usize, percent: u32) -> u8 {
    let symbols = pages * usize::from(shape.symbols_per_page);
    let count = (symbols * percent as usize).div_ceil(100);
    count.clamp(1, usize::from(u8::MAX)) as u8
}

/// A whole page just multicast as pushed, with what its REPAIRs need.
pub(super) struct PushedPage<'a> {
    pub(super) family: u64,
    pub(super) generation: u32,
    pub(super) page: u64,
    pub(super) to: SocketAddrV4,
    pub(super) store: &'a dyn PageStore,
    pub(super) sealer: &'a FragmentSealer,
}

/// The blocks of `pushed`: runs of consecutive pages of one family, at most
/// [`MAX_BLOCK_PAGES`] each.
fn blocks<'p, 'a>(pushed: &'p [PushedPage<'a>]) -> Vec<&'p [PushedPage<'a>]> {
    let mut blocks = Vec::new();
    let mut start = 0;
    for end in 1..=pushed.len() {
        let continues = end < pushed.len()
            && pushed[end].family == pushed[start].family
            && pushed[end].page == pushed[end - 1].page + 1
            && end - start < usize::from(MAX_BLOCK_PAGES);
        if !continues {
            blocks.push(&pushed[start..end]);
            start = end;
        }
    }
    blocks
}

/// Sends the REPAIRs of the blocks of `pushed` (sent just before), if the server sends any.
pub(super) fn send_repairs(service: &McastService, pushed: &[PushedPage<'_>]) {
    let percent = service.config.repair_percent;
    let Some(shape) = Shape::of(service.fragmentation).filter(|_| percent > 0) else {
        return;
    };
    for block in blocks(pushed) {
        let mut pages: Vec<PageBuf> = Vec::with_capacity(block.len());
        for pushed in block {
            let mut page: PageBuf = Box::new([0u8; PAGE_SIZE]);
            // A page that cannot be read was not sent either (and was logged): no block.
            if pushed.store.read_page(pushed.page, &mut page).is_err() {
                break;
            }
            pages.push(page);
        }
        if pages.len() == block.len() {
            send_block(service, shape, percent, block, &pages);
        }
    }
}

fn send_block(
    service: &McastService,
    shape: Shape,
    percent: u32,
    block: &[PushedPage<'_>],
    pages: &[PageBuf],
) {
    let first = &block[0];
    let count = recovery_count(shape, pages.len(), percent);
    let refs: Vec<&[u8; PAGE_SIZE]> = pages.iter().map(|page| &**page).collect();
    let symbols = match repair::encode(shape, &refs, usize::from(count)) {
        Ok(symbols) => symbols,
        Err(error) => {
            tracing::warn!(%error, "mcdist server: encoding repairs failed");
            return;
        }
    };
    let header = Header {
        flags: 0,
        family: first.family,
        generation: first.generation,
        sender: 0,
    };
    let mut datagrams: Vec<Vec<u8>> = Vec::with_capacity(symbols.len());
    for (index, symbol) in symbols.iter().enumerate() {
        let repair = Repair {
            first_page: first.page,
            pages: block.len() as u8,
            symbols_per_page: shape.symbols_per_page,
            symbol_len: shape.symbol_len,
            index: index as u8,
            count,
            data: symbol,
        };
        let mut out = Vec::new();
        match wire::encode_repair(first.sealer, &mut out, &header, &repair) {
            Ok(()) => datagrams.push(out),
            Err(error) => {
                tracing::warn!(%error, "mcdist server: encoding a repair failed");
                return;
            }
        }
    }
    let list: Vec<(SocketAddrV4, &[u8])> = datagrams
        .iter()
        .map(|datagram| (first.to, datagram.as_slice()))
        .collect();
    let outcome = sys::send_batch(&service.socket, &list);
    let counters = &service.counters;
    bump(&counters.repairs_sent, outcome.sent as u64);
    bump(&counters.bytes_sent, bytes_of(&list[..outcome.sent]));
    if let Some(error) = outcome.error {
        bump(&counters.send_errors, (list.len() - outcome.sent) as u64);
        tracing::debug!(%error, "mcdist server: sending repairs failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcast::wire::Fragmentation;

    #[test]
    fn a_block_gets_its_share_of_recovery_symbols() {
        let shape = Shape::of(Fragmentation::for_mtu(1500)).unwrap();
        assert_eq!(recovery_count(shape, 16, 25), 12);
        assert_eq!(recovery_count(shape, 1, 25), 1, "rounded up");
        assert_eq!(recovery_count(shape, 16, 1000), 255, "the wire's most");
    }
}
