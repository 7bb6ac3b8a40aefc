//! The guest heap: the global allocator of flock images.
//!
//! Hand-written on purpose: SnowFlock's avoidance heuristics need the allocator
//! to tell the VMM which pages are fresh or free, so it must know its pages.
//!
//! - Small blocks (up to 2 KiB) come from per-class *slabs* of 1-4 pages; each
//!   slab has its own free list, and a class keeps a list of slabs with free
//!   blocks. An empty slab goes back to the page allocator unless it is the
//!   class's only partial slab (so an alloc/free loop does not churn pages).
//! - Larger blocks are *runs* of whole pages, taken first-fit from segregated
//!   free lists (exact sizes up to 32 pages, then one list per power of two,
//!   with a bitmap of non-empty lists) or from the never-used top of the heap.
//!   Freed runs coalesce with free neighbours at once; a run that reaches the
//!   top gives its pages back to the top.
//! - All bookkeeping lives in a side table of one 16-byte entry per page at the
//!   start of the heap, never in free pages: their contents do not matter, so
//!   the VMM need not fetch them, and pages never handed out are still zero
//!   (`alloc_zeroed` skips clearing them).
//!
//! Every operation is O(1) except splitting/merging bookkeeping, which is too.
//!
//! Page reports (the avoidance heuristics, `REPORT_PAGES`):
//!
//! - *Free*: [`Heap::free_runs`] lists the free runs and the top (everything
//!   from `top` up), whose contents are dead. Slab pages are never listed,
//!   not even empty ones: their free blocks hold the free-list links.
//! - *Fresh*: once [`Heap::start_fresh_reports`] ran (in a clone), every run
//!   of pages the allocator hands out is passed to the reporter before the
//!   caller can write it: whole-page blocks, new slabs, the pages a block
//!   grows by in place. Only pages without live data are ever reported:
//!   pages just handed out, and the rest of the free run or top they came
//!   from (reported along with them, up to [`FRESH_BATCH`] pages, so that
//!   small allocations do not cost a hypercall each). A bitmap of the pages
//!   reported so far keeps any page from being reported twice.
//!
//! Reused pages may hold anything: the VMM gives a clone zeros or the
//! parent's old bytes for reported pages. `alloc_zeroed` clears every page
//! below `fresh` (the high-water mark of pages ever handed out, inherited by
//! clones), so this never matters; pages from `fresh` up were zero in the
//! parent at the clone point and so are zero in the clone, fetched or not.

use crate::abi::{MAX_REPORT_RUNS, PageRun};
use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

const PAGE: usize = 4096;
/// "No page" in lists.
const NIL: u32 = u32::MAX;
/// Run lengths and page indices must fit the 30 bits of a tag.
const MAX_PAGES: usize = (1 << 30) - 1;

/// Block sizes of the small classes: 16-byte steps to 128, then four per doubling.
const CLASS_SIZES: [u32; 24] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
    1280, 1536, 1792, 2048,
];
const NCLASSES: usize = CLASS_SIZES.len();
const SMALL_MAX: usize = 2048;
/// Pages per slab of each class: the fewest (up to 4) that waste at most 1/8.
const SLAB_PAGES: [u32; NCLASSES] = slab_pages();

const fn slab_pages() -> [u32; NCLASSES] {
    let mut out = [0; NCLASSES];
    let mut i = 0;
    while i < NCLASSES {
        let mut pages = 1;
        while pages < 4 && (pages * PAGE as u32 % CLASS_SIZES[i]) * 8 > pages * PAGE as u32 {
            pages += 1;
        }
        out[i] = pages;
        i += 1;
    }
    out
}

/// Free-run lists: 32 exact lengths, then one per power of two.
const NBINS: usize = 64;

/// A fresh report taken from a free run or the top covers at least this many
/// of its pages (1 MiB), all dead, so that carving slabs or small blocks in a
/// clone costs one `REPORT_PAGES` per MiB rather than one per allocation.
pub const FRESH_BATCH: u32 = 256;
/// Runs per fresh report hypercall (the reporter's buffer is on the stack).
const FRESH_RUNS: usize = 32;

/// Receives runs of fresh pages in a clone; returns whether the VMM accepted them.
pub type FreshReporter = fn(&[PageRun]) -> bool;

/// What [`Heap::free_runs`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeRuns {
    /// Runs written to the output.
    pub runs: usize,
    /// Pages in them.
    pub pages: u64,
    /// Free runs that did not fit the output, and their pages.
    pub omitted_runs: u64,
    pub omitted_pages: u64,
}

/// Counters of the fresh reports a heap made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreshStats {
    /// Reporter calls (`REPORT_PAGES` hypercalls in a guest).
    pub calls: u64,
    /// Pages reported.
    pub pages: u64,
    /// Calls the reporter said were refused (a bug if ever non-zero).
    pub refused: u64,
}

// Page kinds, in the low two bits of a tag.
/// A page of a slab other than its first; the tag's length field is the
/// distance back to the first page.
const SLAB_TAIL: u32 = 0;
const FREE: u32 = 1;
const USED: u32 = 2;
const SLAB: u32 = 3;

/// Side-table entry of one page. Every run (free, used or slab) has a valid
/// tag on its first and last page; `prev`/`next` link the first page into a
/// free list (free runs) or its class's partial list (slabs).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Meta {
    /// `len << 2 | kind`.
    tag: u32,
    prev: u32,
    next: u32,
    /// Slabs: free-list head (block index + 1, 0 = none) | live blocks << 16.
    slab: u32,
}

/// The allocator proper. Single-threaded; [`LockedHeap`] makes it global.
pub struct Heap {
    /// One entry per heap page; `meta.len()` is the number of pages.
    meta: &'static mut [Meta],
    /// Address of page 0.
    base: usize,
    /// Pages `top..` are not handed out; every run lies below.
    top: u32,
    /// Pages `fresh..` were never handed out since boot, so they are still zero.
    fresh: u32,
    bin_mask: u64,
    bins: [u32; NBINS],
    /// First slab with free blocks, per class.
    partial: [u32; NCLASSES],
    /// Set by [`Heap::start_fresh_reports`]: where fresh pages are reported.
    reporter: Option<FreshReporter>,
    /// One bit per page, set once the page was reported fresh. Lives in a
    /// run of this heap that is never freed; empty when fresh reports are
    /// off or the run could not be allocated (then nothing is deduplicated).
    reported: &'static mut [u64],
    fresh_stats: FreshStats,
}

impl Heap {
    /// A heap with no memory: every allocation fails.
    pub const fn empty() -> Self {
        Self {
            meta: &mut [],
            base: 0,
            top: 0,
            fresh: 0,
            bin_mask: 0,
            bins: [NIL; NBINS],
            partial: [NIL; NCLASSES],
            reporter: None,
            reported: &mut [],
            fresh_stats: FreshStats {
                calls: 0,
                pages: 0,
                refused: 0,
            },
        }
    }

    /// A heap over `[start, end)` (trimmed to whole pages).
    ///
    /// # Safety
    /// The range must be memory that nothing else uses for as long as the heap
    /// (or any block from it) lives, and it must read as zero: the allocator
    /// relies on never-used pages being zero.
    pub unsafe fn new(start: usize, end: usize) -> Self {
        let start = start.next_multiple_of(PAGE);
        let end = end & !(PAGE - 1);
        let total = end.saturating_sub(start) / PAGE;
        let meta_pages = (total * size_of::<Meta>()).div_ceil(PAGE);
        if total <= meta_pages {
            return Self::empty();
        }
        let npages = (total - meta_pages).min(MAX_PAGES);
        // SAFETY: the caller gives us [start, end); the first `meta_pages`
        // pages hold `npages` entries, which are plain integers, so the zeroed
        // memory is a valid value for every one of them.
        let meta = unsafe { core::slice::from_raw_parts_mut(start as *mut Meta, npages) };
        Self {
            meta,
            base: start + meta_pages * PAGE,
            ..Self::empty()
        }
    }

    /// Bytes of heap pages (excluding the side table).
    pub fn capacity(&self) -> usize {
        self.meta.len() * PAGE
    }

    pub fn alloc(&mut self, layout: Layout) -> *mut u8 {
        match small_class(layout) {
            Some(class) => self.alloc_small(class),
            None => self
                .alloc_large(layout)
                .map_or(ptr::null_mut(), |p| self.addr(p)),
        }
    }

    /// Like [`Heap::alloc`], with the block zeroed.
    pub fn alloc_zeroed(&mut self, layout: Layout) -> *mut u8 {
        if small_class(layout).is_some() {
            let block = self.alloc(layout);
            if !block.is_null() {
                // SAFETY: the block was just allocated with at least `size` bytes.
                unsafe { ptr::write_bytes(block, 0, layout.size()) };
            }
            return block;
        }
        let fresh = self.fresh;
        let Some(p) = self.alloc_large(layout) else {
            return ptr::null_mut();
        };
        // Only pages handed out before can be dirty.
        let dirty = (fresh.saturating_sub(p) as usize * PAGE).min(layout.size());
        // SAFETY: the run was just allocated with at least `size` bytes.
        unsafe { ptr::write_bytes(self.addr(p), 0, dirty) };
        self.addr(p)
    }

    /// # Safety
    /// `block` must come from this heap's `alloc` with this `layout`, and not
    /// have been freed since.
    pub unsafe fn dealloc(&mut self, block: *mut u8, layout: Layout) {
        match small_class(layout) {
            // SAFETY: forwarded caller contract.
            Some(class) => unsafe { self.dealloc_small(block, class) },
            None => self.free_pages(self.page_of(block), pages_for(layout.size())),
        }
    }

    /// Resizes in place where it can (same size class; page runs that shrink,
    /// or grow into a free neighbour or the top), else moves.
    ///
    /// # Safety
    /// As for [`Heap::dealloc`], and `new_size` rounded up to `layout.align()`
    /// must not overflow `isize`.
    pub unsafe fn realloc(&mut self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees the new size is valid for this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (small_class(layout), small_class(new_layout)) {
            (Some(a), Some(b)) if a == b => return block,
            (None, None) => {
                let (p, n, new_n) = (
                    self.page_of(block),
                    pages_for(layout.size()),
                    pages_for(new_size),
                );
                if new_n <= n {
                    if new_n < n {
                        self.set_run(p, new_n, USED);
                        self.free_pages(p + new_n, n - new_n);
                    }
                    return block;
                }
                if self.grow_in_place(p, n, new_n) {
                    return block;
                }
            }
            _ => {}
        }
        let moved = self.alloc(new_layout);
        if !moved.is_null() {
            // SAFETY: both blocks are live, distinct and hold at least this many bytes.
            unsafe { ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size)) };
            // SAFETY: forwarded caller contract.
            unsafe { self.dealloc(block, layout) };
        }
        moved
    }

    fn alloc_small(&mut self, class: usize) -> *mut u8 {
        let mut s = self.partial[class];
        if s == NIL {
            match self.new_slab(class) {
                Some(new) => s = new,
                None => return ptr::null_mut(),
            }
        }
        let size = CLASS_SIZES[class] as usize;
        let state = self.meta[s as usize].slab;
        let (head, live) = (state & 0xffff, state >> 16);
        let block = self.addr(s).wrapping_add((head - 1) as usize * size);
        // SAFETY: `block` is a free block of this slab; its first word holds
        // the next free block (written by `new_slab` or `dealloc_small`).
        let next = unsafe { block.cast::<u32>().read() };
        self.meta[s as usize].slab = next | (live + 1) << 16;
        if next == 0 {
            list_unlink(self.meta, &mut self.partial[class], s);
        }
        block
    }

    fn new_slab(&mut self, class: usize) -> Option<u32> {
        let pages = SLAB_PAGES[class];
        let size = CLASS_SIZES[class] as usize;
        let s = self.alloc_pages(pages)?;
        self.set_run(s, pages, SLAB);
        for i in 1..pages {
            self.meta[(s + i) as usize].tag = i << 2 | SLAB_TAIL;
        }
        let blocks = pages as usize * PAGE / size;
        let first = self.addr(s);
        for i in 0..blocks {
            let next = if i + 1 < blocks { i as u32 + 2 } else { 0 };
            // SAFETY: block `i` lies inside the slab's pages, which we own.
            let block = unsafe { first.add(i * size) };
            // SAFETY: `block` is in bounds (above) and 4-byte aligned: the slab starts on a page
            // and every class size is a multiple of 8.
            unsafe { block.cast::<u32>().write(next) };
        }
        self.meta[s as usize].slab = 1;
        list_push(self.meta, &mut self.partial[class], s);
        Some(s)
    }

    /// # Safety
    /// `block` must be a live block of size class `class` from this heap.
    unsafe fn dealloc_small(&mut self, block: *mut u8, class: usize) {
        let page = self.page_of(block);
        let tag = self.meta[page as usize].tag;
        let s = if tag & 3 == SLAB_TAIL {
            page - (tag >> 2)
        } else {
            page
        };
        let index = (block as usize - self.addr(s) as usize) / CLASS_SIZES[class] as usize;
        let state = self.meta[s as usize].slab;
        let (head, live) = (state & 0xffff, (state >> 16) - 1);
        // SAFETY: the caller hands the block back; it is ours to hold the link.
        unsafe { block.cast::<u32>().write(head) };
        self.meta[s as usize].slab = (index as u32 + 1) | live << 16;
        if head == 0 {
            // It was full, so it was in no list.
            list_push(self.meta, &mut self.partial[class], s);
        }
        let only = self.partial[class] == s && self.meta[s as usize].next == NIL;
        if live == 0 && !only {
            list_unlink(self.meta, &mut self.partial[class], s);
            self.free_pages(s, SLAB_PAGES[class]);
        }
    }

    /// A page-aligned run for `layout`, aligned further if it asks.
    fn alloc_large(&mut self, layout: Layout) -> Option<u32> {
        let n = pages_for(layout.size());
        if n as usize > MAX_PAGES {
            return None;
        }
        let align = (layout.align() / PAGE).max(1) as u32;
        if align == 1 {
            return self.alloc_pages(n);
        }
        // Over-allocate, then give back the pages before and after the aligned run.
        let total = n.checked_add(align - 1)?;
        let p = self.alloc_pages(total)?;
        let base_page = self.base / PAGE;
        let q = ((base_page + p as usize).next_multiple_of(align as usize) - base_page) as u32;
        self.set_run(q, n, USED);
        if q > p {
            self.set_run(p, q - p, USED);
            self.free_pages(p, q - p);
        }
        let rest = p + total - (q + n);
        if rest > 0 {
            self.set_run(q + n, rest, USED);
            self.free_pages(q + n, rest);
        }
        Some(q)
    }

    /// Takes `n` pages: the first run in the smallest non-empty list whose runs
    /// all fit, split if longer; else from the top.
    fn alloc_pages(&mut self, n: u32) -> Option<u32> {
        let mut b = bin_of(n);
        if bin_min(b) < n {
            b += 1;
        }
        let candidates = if b < NBINS {
            self.bin_mask & (!0 << b)
        } else {
            0
        };
        if candidates != 0 {
            let p = self.bins[candidates.trailing_zeros() as usize];
            let len = self.len(p);
            self.unlink_free(p);
            if len > n {
                self.push_free(p + n, len - n);
            }
            self.set_run(p, n, USED);
            self.handed_out(p, n, len);
            return Some(p);
        }
        let room = self.meta.len() as u32 - self.top;
        if room < n {
            return None;
        }
        let p = self.top;
        self.top += n;
        self.fresh = self.fresh.max(self.top);
        self.set_run(p, n, USED);
        self.handed_out(p, n, room);
        Some(p)
    }

    /// Extends the used run `[p, p+n)` to `new_n` pages if the pages after it
    /// are free.
    fn grow_in_place(&mut self, p: u32, n: u32, new_n: u32) -> bool {
        let (end, extra) = (p + n, new_n - n);
        let room = if end == self.top {
            let room = self.meta.len() as u32 - self.top;
            if room < extra {
                return false;
            }
            self.top += extra;
            self.fresh = self.fresh.max(self.top);
            room
        } else {
            if self.kind(end) != FREE || self.len(end) < extra {
                return false;
            }
            let len = self.len(end);
            self.unlink_free(end);
            if len > extra {
                self.push_free(end + extra, len - extra);
            }
            len
        };
        self.set_run(p, new_n, USED);
        // Only the added pages: the first `n` keep the block's contents.
        self.handed_out(end, extra, room);
        true
    }

    /// From now on, reports every run of pages handed out to `reporter`
    /// (see the module docs). Called once in a clone, right after the clone
    /// point; later calls change nothing. Allocates the dedup bitmap (1 bit
    /// per heap page, never freed) and reports its own pages.
    pub fn start_fresh_reports(&mut self, reporter: FreshReporter) {
        if self.reporter.is_some() {
            return;
        }
        let words = self.meta.len().div_ceil(64);
        let n = pages_for(words * size_of::<u64>());
        let fresh = self.fresh;
        let bitmap = self.alloc_pages(n);
        self.reporter = Some(reporter);
        let Some(p) = bitmap else {
            return;
        };
        // Before the bitmap is written; with no bitmap yet, in full.
        self.report_fresh(p, n);
        let dirty = (fresh.saturating_sub(p) as usize * PAGE).min(words * size_of::<u64>());
        let bits = self.addr(p).cast::<u64>();
        // SAFETY: the run was just allocated with at least `dirty` bytes.
        unsafe { ptr::write_bytes(bits.cast::<u8>(), 0, dirty) };
        // SAFETY: the run holds `words` u64s, is page aligned and is never
        // freed, so the bitmap owns it for the heap's life; its pages from
        // `fresh` up were zero already, the rest was cleared above.
        self.reported = unsafe { core::slice::from_raw_parts_mut(bits, words) };
        set_bits(self.reported, p, p + n);
    }

    /// Whether [`Heap::start_fresh_reports`] ran.
    pub fn reports_fresh(&self) -> bool {
        self.reporter.is_some()
    }

    /// Counters of the fresh reports so far.
    pub fn fresh_stats(&self) -> FreshStats {
        self.fresh_stats
    }

    /// `[p, p+n)` was just handed out from a free run or the top whose pages
    /// `[p, p+avail)` were all free: reports the new pages, and some of the
    /// rest (see [`FRESH_BATCH`]).
    fn handed_out(&mut self, p: u32, n: u32, avail: u32) {
        if self.reporter.is_some() {
            self.report_fresh(p, avail.min(n.max(FRESH_BATCH)));
        }
    }

    /// Reports the pages of `[p, p+len)` not reported before.
    fn report_fresh(&mut self, p: u32, len: u32) {
        let Some(report) = self.reporter else {
            return;
        };
        let end = p + len;
        let mut buf = [PageRun::default(); FRESH_RUNS];
        let mut k = 0;
        let mut page = p;
        while page < end {
            let (start, stop) = if self.reported.is_empty() {
                (page, end)
            } else {
                let start = next_bit(self.reported, page, end, false);
                let stop = next_bit(self.reported, start, end, true);
                set_bits(self.reported, start, stop);
                (start, stop)
            };
            if start < stop {
                buf[k] = PageRun {
                    start: self.addr(start) as u64,
                    len: u64::from(stop - start) * PAGE as u64,
                };
                k += 1;
                if k == FRESH_RUNS {
                    self.send_fresh(report, &buf);
                    k = 0;
                }
            }
            page = stop;
        }
        if k > 0 {
            self.send_fresh(report, &buf[..k]);
        }
    }

    fn send_fresh(&mut self, report: FreshReporter, runs: &[PageRun]) {
        self.fresh_stats.calls += 1;
        self.fresh_stats.pages += runs.iter().map(|r| r.len / PAGE as u64).sum::<u64>();
        if !report(runs) {
            self.fresh_stats.refused += 1;
        }
    }

    /// Writes the heap's free page runs to `out`: the top first (everything
    /// from `top` up), then the free runs, longest size class first. If there
    /// are more runs than `out` holds, the shortest ones are left out (and
    /// counted). Slab pages and the side table are never listed.
    pub fn free_runs(&self, out: &mut [PageRun]) -> FreeRuns {
        let mut found = FreeRuns::default();
        let mut add = |addr: u64, len: u32| {
            if found.runs < out.len() {
                out[found.runs] = PageRun {
                    start: addr,
                    len: u64::from(len) * PAGE as u64,
                };
                found.runs += 1;
                found.pages += u64::from(len);
            } else {
                found.omitted_runs += 1;
                found.omitted_pages += u64::from(len);
            }
        };
        let total = self.meta.len() as u32;
        if self.top < total {
            add(self.addr(self.top) as u64, total - self.top);
        }
        for &head in self.bins.iter().rev() {
            let mut p = head;
            while p != NIL {
                add(self.addr(p) as u64, self.len(p));
                p = self.meta[p as usize].next;
            }
        }
        found
    }

    /// Returns the run `[p, p+n)`, merging it with free neighbours or the top.
    fn free_pages(&mut self, p: u32, n: u32) {
        let (mut start, mut end) = (p, p + n);
        if start > 0 && self.kind(start - 1) == FREE {
            start -= self.len(start - 1);
            self.unlink_free(start);
        }
        if end == self.top {
            self.top = start;
            return;
        }
        if self.kind(end) == FREE {
            let len = self.len(end);
            self.unlink_free(end);
            end += len;
        }
        self.push_free(start, end - start);
    }

    fn push_free(&mut self, p: u32, len: u32) {
        self.set_run(p, len, FREE);
        let b = bin_of(len);
        list_push(self.meta, &mut self.bins[b], p);
        self.bin_mask |= 1 << b;
    }

    fn unlink_free(&mut self, p: u32) {
        let b = bin_of(self.len(p));
        list_unlink(self.meta, &mut self.bins[b], p);
        if self.bins[b] == NIL {
            self.bin_mask &= !(1 << b);
        }
    }

    fn set_run(&mut self, p: u32, len: u32, kind: u32) {
        let tag = len << 2 | kind;
        self.meta[p as usize].tag = tag;
        self.meta[(p + len - 1) as usize].tag = tag;
    }

    fn kind(&self, p: u32) -> u32 {
        self.meta[p as usize].tag & 3
    }

    fn len(&self, p: u32) -> u32 {
        self.meta[p as usize].tag >> 2
    }

    fn addr(&self, p: u32) -> *mut u8 {
        (self.base + p as usize * PAGE) as *mut u8
    }

    fn page_of(&self, block: *mut u8) -> u32 {
        ((block as usize - self.base) / PAGE) as u32
    }
}

impl core::fmt::Debug for Heap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Heap")
            .field("base", &self.base)
            .field("pages", &self.meta.len())
            .field("top", &self.top)
            .field("fresh", &self.fresh)
            .finish_non_exhaustive()
    }
}

fn list_push(meta: &mut [Meta], head: &mut u32, p: u32) {
    meta[p as usize].prev = NIL;
    meta[p as usize].next = *head;
    if *head != NIL {
        meta[*head as usize].prev = p;
    }
    *head = p;
}

fn list_unlink(meta: &mut [Meta], head: &mut u32, p: u32) {
    let Meta { prev, next, .. } = meta[p as usize];
    if prev == NIL {
        *head = next;
    } else {
        meta[prev as usize].next = next;
    }
    if next != NIL {
        meta[next as usize].prev = prev;
    }
}

/// The first bit in `[from, end)` of `bits` equal to `value`, or `end`.
fn next_bit(bits: &[u64], from: u32, end: u32, value: bool) -> u32 {
    let mut i = from;
    while i < end {
        let raw = bits[i as usize / 64];
        let word = if value { raw } else { !raw } >> (i % 64);
        if word != 0 {
            return (i + word.trailing_zeros()).min(end);
        }
        i = (i / 64 + 1) * 64;
    }
    end
}

/// Sets the bits `[from, end)` of `bits`.
fn set_bits(bits: &mut [u64], from: u32, end: u32) {
    let mut i = from;
    while i < end {
        let bit = i % 64;
        let span = (64 - bit).min(end - i);
        let mask = if span == 64 {
            u64::MAX
        } else {
            ((1u64 << span) - 1) << bit
        };
        bits[i as usize / 64] |= mask;
        i += span;
    }
}

/// The size class serving `layout`, if it is small. Classes above 16 bytes
/// that are powers of two sit at multiples of their size in page-aligned
/// slabs, so a power-of-two size at least the alignment is aligned too.
fn small_class(layout: Layout) -> Option<usize> {
    let size = layout.size().max(1);
    let size = if layout.align() <= 16 {
        size
    } else {
        size.max(layout.align()).next_power_of_two()
    };
    (size <= SMALL_MAX).then(|| class_of(size))
}

/// The smallest class holding `size` (1..=2048) bytes, in O(1).
fn class_of(size: usize) -> usize {
    if size <= 128 {
        return size.div_ceil(16) - 1;
    }
    let s = size - 1;
    let log = (usize::BITS - 1 - s.leading_zeros()) as usize;
    8 + (log - 7) * 4 + ((s >> (log - 2)) & 3)
}

fn pages_for(size: usize) -> u32 {
    size.max(1).div_ceil(PAGE).min(u32::MAX as usize) as u32
}

/// The free list for runs of `len` pages.
fn bin_of(len: u32) -> usize {
    if len <= 32 {
        len as usize - 1
    } else {
        27 + (31 - len.leading_zeros()) as usize
    }
}

/// The shortest run list `b` can hold.
fn bin_min(b: usize) -> u32 {
    match b {
        0..32 => b as u32 + 1,
        32 => 33,
        _ => 1 << (b - 27),
    }
}

/// [`Heap`] behind a spin lock, for `#[global_allocator]`. Guests run on one
/// vCPU without interrupts, so the lock never spins; it keeps `Sync` honest.
#[derive(Debug)]
pub struct LockedHeap {
    locked: AtomicBool,
    heap: UnsafeCell<Heap>,
}

// SAFETY: the heap is only reached through `with`, which holds the lock.
unsafe impl Sync for LockedHeap {}

impl LockedHeap {
    pub const fn empty() -> Self {
        Self {
            locked: AtomicBool::new(false),
            heap: UnsafeCell::new(Heap::empty()),
        }
    }

    /// Gives the heap the memory `[start, end)`, forgetting any earlier heap.
    ///
    /// # Safety
    /// As for [`Heap::new`]; and no block of an earlier heap may be in use.
    pub unsafe fn init(&self, start: usize, end: usize) {
        // SAFETY: forwarded caller contract.
        self.with(|heap| *heap = unsafe { Heap::new(start, end) });
    }

    /// Bytes of heap pages.
    pub fn capacity(&self) -> usize {
        self.with(|heap| heap.capacity())
    }

    /// Lists the heap's free page runs ([`Heap::free_runs`]) in a static
    /// buffer of [`MAX_REPORT_RUNS`] runs and passes them to `report`. Does
    /// not allocate. With more free runs than that, the shortest are left
    /// out (their pages are then copied to clones like live ones).
    pub fn report_free_pages<R>(&self, report: impl FnOnce(&[PageRun]) -> R) -> (FreeRuns, R) {
        FREE_RUNS.with(|buf| {
            let found = self.with(|heap| heap.free_runs(buf));
            (found, report(&buf[..found.runs]))
        })
    }

    /// [`Heap::start_fresh_reports`] on this heap.
    pub fn start_fresh_reports(&self, reporter: FreshReporter) {
        self.with(|heap| heap.start_fresh_reports(reporter));
    }

    /// [`Heap::fresh_stats`] of this heap.
    pub fn fresh_stats(&self) -> FreshStats {
        self.with(|heap| heap.fresh_stats())
    }

    fn with<R>(&self, f: impl FnOnce(&mut Heap) -> R) -> R {
        while self.locked.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        // SAFETY: holding the lock makes this the only reference to the heap.
        let result = f(unsafe { &mut *self.heap.get() });
        self.locked.store(false, Ordering::Release);
        result
    }
}

/// The buffer of free runs for `REPORT_PAGES(Free)`: static, so that making
/// the report allocates nothing (the heap is what it describes), and all
/// zeros, so that it costs the image nothing but `.bss`.
struct FreeRunBuffer {
    locked: AtomicBool,
    runs: UnsafeCell<[PageRun; MAX_REPORT_RUNS as usize]>,
}

// SAFETY: the runs are only reached through `with`, which holds the lock.
unsafe impl Sync for FreeRunBuffer {}

static FREE_RUNS: FreeRunBuffer = FreeRunBuffer {
    locked: AtomicBool::new(false),
    runs: UnsafeCell::new([PageRun { start: 0, len: 0 }; MAX_REPORT_RUNS as usize]),
};

impl FreeRunBuffer {
    fn with<R>(&self, f: impl FnOnce(&mut [PageRun]) -> R) -> R {
        while self.locked.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        // SAFETY: holding the lock makes this the only reference to the runs.
        let result = f(unsafe { &mut *self.runs.get() });
        self.locked.store(false, Ordering::Release);
        result
    }
}

// SAFETY: `Heap` hands out disjoint blocks of at least the layout's size and
// alignment from memory it owns, and takes them back only through dealloc.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with(|heap| heap.alloc(layout))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.with(|heap| heap.alloc_zeroed(layout))
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: GlobalAlloc's contract is Heap::dealloc's.
        self.with(|heap| unsafe { heap.dealloc(block, layout) })
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: GlobalAlloc's contract is Heap::realloc's.
        self.with(|heap| unsafe { heap.realloc(block, layout, new_size) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rand::SplitMix64;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::vec::Vec;

    std::thread_local! {
        /// Fresh reports made on this test's thread.
        static REPORTED: RefCell<Vec<PageRun>> = const { RefCell::new(Vec::new()) };
    }

    fn record(runs: &[PageRun]) -> bool {
        REPORTED.with(|r| r.borrow_mut().extend_from_slice(runs));
        true
    }

    /// Page addresses in the fresh reports since the last call.
    fn take_reported() -> Vec<u64> {
        REPORTED.with(|r| {
            r.borrow_mut()
                .drain(..)
                .flat_map(|run| {
                    assert!(run.len > 0 && run.len % PAGE as u64 == 0, "{run:?}");
                    assert_eq!(run.start % PAGE as u64, 0, "{run:?}");
                    (run.start..run.start + run.len).step_by(PAGE)
                })
                .collect()
        })
    }

    /// Addresses of the pages `[p, p+len)` touches.
    fn pages_of(p: *mut u8, len: usize) -> impl Iterator<Item = u64> {
        let first = p as u64 & !(PAGE as u64 - 1);
        let end = (p as u64 + len.max(1) as u64).next_multiple_of(PAGE as u64);
        (first..end).step_by(PAGE)
    }

    /// A heap over `mib` MiB of zeroed host memory (leaked: tests are short).
    fn heap(mib: usize) -> Heap {
        let layout = Layout::from_size_align(mib << 20, PAGE).unwrap();
        // SAFETY: non-zero size.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) } as usize;
        assert_ne!(mem, 0);
        // SAFETY: fresh zeroed memory, never freed.
        unsafe { Heap::new(mem + 123, mem + (mib << 20)) }
    }

    impl Heap {
        /// Walks every run below `top` and checks the bookkeeping.
        fn check(&self) {
            let mut p = 0;
            let mut prev_free = false;
            let mut free_runs = 0;
            while p < self.top {
                let tag = self.meta[p as usize].tag;
                let (len, kind) = (tag >> 2, tag & 3);
                assert!(
                    len >= 1 && kind != SLAB_TAIL,
                    "bad first page {p}: {tag:#x}"
                );
                let last = self.meta[(p + len - 1) as usize].tag;
                match kind {
                    FREE => {
                        assert_eq!(last, tag);
                        assert!(!prev_free, "adjacent free runs at {p}");
                        assert!(self.bin_mask & 1 << bin_of(len) != 0);
                        free_runs += 1;
                    }
                    USED => assert_eq!(last, tag),
                    _ => assert_ne!(last & 3, FREE),
                }
                prev_free = kind == FREE;
                p += len;
            }
            assert_eq!(p, self.top);
            assert!(!prev_free, "free run touching the top");
            let listed: usize = self
                .bins
                .iter()
                .map(|&h| {
                    let mut n = 0;
                    let mut q = h;
                    while q != NIL {
                        assert_eq!(self.kind(q), FREE);
                        n += 1;
                        q = self.meta[q as usize].next;
                    }
                    n
                })
                .sum();
            assert_eq!(listed, free_runs);
            assert!(self.top <= self.fresh);
        }
    }

    #[test]
    fn classes_are_tight() {
        for size in 1..=SMALL_MAX {
            let c = class_of(size);
            assert!(CLASS_SIZES[c] as usize >= size, "{size}");
            assert!(c == 0 || (CLASS_SIZES[c - 1] as usize) < size, "{size}");
        }
        for (i, &size) in CLASS_SIZES.iter().enumerate() {
            assert_eq!(size % 16, 0);
            let blocks = SLAB_PAGES[i] as usize * PAGE / size as usize;
            assert!((2..=0xffff).contains(&blocks));
        }
    }

    #[test]
    fn bins_hold_what_they_promise() {
        for len in 1..5000 {
            let b = bin_of(len);
            assert!(b < NBINS && bin_min(b) <= len, "{len}");
            assert!(b + 1 == NBINS || bin_min(b + 1) > len, "{len}");
        }
        assert!(bin_of(MAX_PAGES as u32) < NBINS);
    }

    #[test]
    fn fresh_pages_are_not_cleared_and_reused_ones_are() {
        let mut h = heap(8);
        let big = Layout::from_size_align(1 << 20, 8).unwrap();
        let a = h.alloc_zeroed(big);
        // SAFETY: `a` holds 1 MiB.
        unsafe { ptr::write_bytes(a, 0xab, 1 << 20) };
        // SAFETY: allocated above with `big`.
        unsafe { h.dealloc(a, big) };
        assert_eq!(h.top, 0);
        let b = h.alloc_zeroed(big);
        assert_eq!(a, b);
        assert!(
            // SAFETY: `b` holds 1 MiB.
            unsafe { core::slice::from_raw_parts(b, 1 << 20) }
                .iter()
                .all(|&x| x == 0)
        );
        h.check();
    }

    #[test]
    fn large_runs_coalesce_and_grow_in_place() {
        let mut h = heap(16);
        let l = |pages: usize| Layout::from_size_align(pages * PAGE, 8).unwrap();
        let blocks: Vec<_> = (0..8).map(|_| h.alloc(l(3))).collect();
        for &i in &[1, 3, 2] {
            // SAFETY: allocated above with l(3).
            unsafe { h.dealloc(blocks[i], l(3)) };
            h.check();
        }
        // Pages 3..12 are one free run of 9 pages: block 0 grows into it.
        // SAFETY: allocated above with l(3).
        let grown = unsafe { h.realloc(blocks[0], l(3), 12 * PAGE) };
        assert_eq!(grown, blocks[0]);
        h.check();
        // SAFETY: grown above to 12 pages.
        unsafe { h.dealloc(grown, l(12)) };
        for &i in &[4, 5, 6, 7] {
            // SAFETY: allocated above with l(3), not freed yet.
            unsafe { h.dealloc(blocks[i], l(3)) };
        }
        h.check();
        assert_eq!(h.top, 0);
    }

    #[test]
    fn empty_heap_fails_cleanly() {
        let mut h = Heap::empty();
        assert!(h.alloc(Layout::new::<u64>()).is_null());
        assert!(
            h.alloc(Layout::from_size_align(1 << 20, 1 << 16).unwrap())
                .is_null()
        );
        let mut tiny = heap(1);
        assert!(
            tiny.alloc(Layout::from_size_align(2 << 20, 8).unwrap())
                .is_null()
        );
        tiny.check();
    }

    #[test]
    fn free_runs_list_the_top_and_free_runs_only() {
        let mut h = heap(16);
        let l = |pages: usize| Layout::from_size_align(pages * PAGE, 8).unwrap();
        let small = Layout::from_size_align(100, 8).unwrap();
        let blocks: Vec<_> = (0..6).map(|i| h.alloc(l(i + 1))).collect();
        let tiny = h.alloc(small);
        // SAFETY: allocated above with l(2).
        unsafe { h.dealloc(blocks[1], l(2)) };
        // SAFETY: allocated above with l(4).
        unsafe { h.dealloc(blocks[3], l(4)) };
        let mut out = [PageRun::default(); 8];
        let found = h.free_runs(&mut out);
        assert_eq!(found.runs, 3);
        assert_eq!(found.omitted_runs, 0);
        // The top, then the 4-page run, then the 2-page one.
        assert_eq!(out[0].start, h.addr(h.top) as u64);
        assert_eq!(
            out[0].len,
            (h.meta.len() as u64 - u64::from(h.top)) * PAGE as u64
        );
        assert_eq!(
            out[1],
            PageRun {
                start: blocks[3] as u64,
                len: 4 * PAGE as u64
            }
        );
        assert_eq!(
            out[2],
            PageRun {
                start: blocks[1] as u64,
                len: 2 * PAGE as u64
            }
        );
        assert_eq!(
            found.pages,
            out[..3].iter().map(|r| r.len / PAGE as u64).sum::<u64>()
        );
        let live: BTreeSet<u64> = [(0, 1), (2, 3), (4, 5), (5, 6)]
            .iter()
            .flat_map(|&(i, pages)| pages_of(blocks[i], pages * PAGE))
            .chain(pages_of(tiny, 100))
            .collect();
        for run in &out[..3] {
            for page in (run.start..run.start + run.len).step_by(PAGE) {
                assert!(
                    !live.contains(&page),
                    "free run {run:?} covers live page {page:#x}"
                );
            }
        }
        // A short buffer keeps the longest runs.
        let mut short = [PageRun::default(); 2];
        let found = h.free_runs(&mut short);
        assert_eq!(
            (found.runs, found.omitted_runs, found.omitted_pages),
            (2, 1, 2)
        );
        assert_eq!(short[1].len, 4 * PAGE as u64);
        // An emptied slab that the class keeps is not free: its blocks hold links.
        // SAFETY: allocated above with `small`.
        unsafe { h.dealloc(tiny, small) };
        let found = h.free_runs(&mut out);
        assert!(
            out[..found.runs]
                .iter()
                .all(|r| !(r.start..r.start + r.len).contains(&(tiny as u64)))
        );
        h.check();
    }

    #[test]
    fn fresh_reports_cover_new_pages_once_and_never_live_ones() {
        let mut h = heap(64);
        take_reported();
        let l = |pages: usize| Layout::from_size_align(pages * PAGE, 8).unwrap();
        // Before the clone point nothing is reported.
        let kept = h.alloc(l(8));
        let dropped = h.alloc(l(40));
        // SAFETY: allocated above with l(40).
        unsafe { h.dealloc(dropped, l(40)) };
        let grow = h.alloc(l(3));
        assert!(take_reported().is_empty());

        h.start_fresh_reports(record);
        assert!(h.reports_fresh());
        let bitmap: BTreeSet<u64> = take_reported().into_iter().collect();
        assert!(!bitmap.is_empty(), "the bitmap's own pages are reported");
        let live: BTreeSet<u64> = pages_of(kept, 8 * PAGE)
            .chain(pages_of(grow, 3 * PAGE))
            .collect();
        assert!(bitmap.is_disjoint(&live));

        // A block from the old free run: its pages are reported, with the
        // rest of the run (dead too), but not the bitmap's pages again.
        let a = h.alloc(l(2));
        let got: BTreeSet<u64> = take_reported().into_iter().collect();
        assert!(pages_of(a, 2 * PAGE).all(|p| got.contains(&p) || bitmap.contains(&p)));
        assert!(got.is_disjoint(&live) && got.is_disjoint(&bitmap));
        let mut seen: BTreeSet<u64> = bitmap.union(&got).copied().collect();

        // Growing in place reports only the added pages.
        // SAFETY: allocated above with l(3).
        let grown = unsafe { h.realloc(grow, l(3), 20 * PAGE) };
        let got = take_reported();
        if grown == grow {
            assert!(
                got.iter()
                    .all(|p| !pages_of(grow, 3 * PAGE).any(|q| q == *p))
            );
        }
        for p in got {
            assert!(seen.insert(p), "page {p:#x} reported twice");
            assert!(!live.contains(&p) || grown != grow);
        }
        // Freed and allocated again: nothing new to report.
        // SAFETY: allocated above with l(2).
        unsafe { h.dealloc(a, l(2)) };
        let again = h.alloc(l(2));
        assert_eq!(again, a);
        assert!(take_reported().is_empty());
        let stats = h.fresh_stats();
        assert_eq!(stats.pages, seen.len() as u64);
        assert_eq!(stats.refused, 0);
        assert!(stats.calls <= 4, "{stats:?}");
        h.check();
    }

    /// Random operations after the clone point: no report covers a page of
    /// a block that stays live (other than what was just handed out), no
    /// page is reported twice, and every page handed out for a page-run
    /// block since is reported by the time the block is returned.
    #[test]
    fn fresh_reports_under_random_churn() {
        let mut h = heap(64);
        let mut rng = SplitMix64::new(7);
        let mut live: Vec<(*mut u8, Layout)> = Vec::new();
        // Live blocks other than the one handed out this round: start -> end.
        let mut others: BTreeMap<u64, u64> = BTreeMap::new();
        let mut reported: BTreeSet<u64> = BTreeSet::new();
        take_reported();
        for round in 0..20_000u32 {
            if round == 2_000 {
                h.start_fresh_reports(record);
                reported.extend(take_reported());
            }
            let op = rng.below(10);
            // The block handed out this round, and how many of its bytes it kept.
            let (q, l, kept) = if op < 5 || live.is_empty() {
                let size = match rng.below(3) {
                    0 => 1 + rng.below(2048),
                    1 => 1 + rng.below(64 << 10),
                    _ => 1 + rng.below(1 << 20),
                } as usize;
                let layout = Layout::from_size_align(size, 1 << rng.below(14)).unwrap();
                let p = if op == 0 {
                    h.alloc_zeroed(layout)
                } else {
                    h.alloc(layout)
                };
                if p.is_null() {
                    continue;
                }
                if op == 0 {
                    // SAFETY: just allocated with `size` bytes.
                    let bytes = unsafe { core::slice::from_raw_parts(p, size) };
                    assert!(bytes.iter().all(|&b| b == 0));
                }
                (p, layout, 0)
            } else {
                let (p, layout) = live.swap_remove(rng.below(live.len() as u64) as usize);
                others.remove(&(p as u64));
                if op < 8 {
                    // SAFETY: live block with its layout.
                    unsafe { h.dealloc(p, layout) };
                    continue;
                }
                let new_size = 1 + rng.below(2 * layout.size() as u64 + 4096) as usize;
                // SAFETY: live block with its layout; sizes are small.
                let q = unsafe { h.realloc(p, layout, new_size) };
                if q.is_null() {
                    live.push((p, layout));
                    others.insert(p as u64, p as u64 + layout.size() as u64);
                    continue;
                }
                let kept = if q == p {
                    layout.size().min(new_size)
                } else {
                    0
                };
                (
                    q,
                    Layout::from_size_align(new_size, layout.align()).unwrap(),
                    kept,
                )
            };
            let got = take_reported();
            for &page in &got {
                assert!(
                    reported.insert(page),
                    "round {round}: page {page:#x} reported twice"
                );
                let overlaps = others
                    .range(..page + PAGE as u64)
                    .next_back()
                    .is_some_and(|(_, &end)| end > page);
                let in_kept = page < q as u64 + kept as u64 && page + PAGE as u64 > q as u64;
                assert!(
                    !overlaps && !in_kept,
                    "round {round}: live page {page:#x} reported"
                );
            }
            if round >= 2_000 && small_class(l).is_none() {
                let kept_pages = if kept > 0 {
                    pages_for(kept) as usize
                } else {
                    0
                };
                assert!(
                    pages_of(q, l.size())
                        .skip(kept_pages)
                        .all(|p| reported.contains(&p)),
                    "round {round}: block {q:?} {l:?} not reported"
                );
            }
            // SAFETY: live block of at least this size.
            unsafe { ptr::write_bytes(q, round as u8, l.size()) };
            live.push((q, l));
            others.insert(q as u64, q as u64 + l.size() as u64);
            if round % 5_000 == 0 {
                h.check();
            }
        }
        h.check();
        assert_eq!(h.fresh_stats().refused, 0);
        assert_eq!(h.fresh_stats().pages, reported.len() as u64);
    }

    /// Random allocations, frees and reallocs of all sizes and alignments;
    /// every block is filled with its own pattern and checked before it goes.
    #[test]
    fn random_stress() {
        let mut h = heap(64);
        let mut rng = SplitMix64::new(42);
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        let fill = |p: *mut u8, n: usize, v: u8| {
            // SAFETY: callers pass live blocks of at least n bytes.
            unsafe { ptr::write_bytes(p, v, n) }
        };
        let verify = |p: *mut u8, n: usize, v: u8| {
            // SAFETY: callers pass live blocks of at least n bytes.
            let s = unsafe { core::slice::from_raw_parts(p, n) };
            assert!(s.iter().all(|&x| x == v), "block {p:?} corrupted");
        };
        for round in 0..100_000u32 {
            let op = rng.below(10);
            if op < 5 || live.is_empty() {
                let size = match rng.below(4) {
                    0 => 1 + rng.below(64),
                    1 => 1 + rng.below(2048),
                    2 => 1 + rng.below(64 << 10),
                    _ => 1 + rng.below(1 << 20),
                } as usize;
                let max_log = if rng.below(20) == 0 { 17 } else { 5 };
                let align = 1usize << rng.below(max_log);
                let layout = Layout::from_size_align(size, align).unwrap();
                let p = if op == 0 {
                    h.alloc_zeroed(layout)
                } else {
                    h.alloc(layout)
                };
                if p.is_null() {
                    continue;
                }
                assert_eq!(p as usize % align, 0);
                if op == 0 {
                    verify(p, size, 0);
                }
                let v = round as u8;
                fill(p, size, v);
                live.push((p, layout, v));
            } else {
                let i = rng.below(live.len() as u64) as usize;
                let (p, layout, v) = live.swap_remove(i);
                verify(p, layout.size(), v);
                if op < 8 {
                    // SAFETY: live block with its layout.
                    unsafe { h.dealloc(p, layout) };
                } else {
                    let new_size = 1 + rng.below(2 * layout.size() as u64 + 4096) as usize;
                    // SAFETY: live block with its layout; sizes are small.
                    let q = unsafe { h.realloc(p, layout, new_size) };
                    if q.is_null() {
                        live.push((p, layout, v));
                        continue;
                    }
                    assert_eq!(q as usize % layout.align(), 0);
                    verify(q, layout.size().min(new_size), v);
                    let layout = Layout::from_size_align(new_size, layout.align()).unwrap();
                    fill(q, new_size, v);
                    live.push((q, layout, v));
                }
            }
            if round % 10_000 == 0 {
                h.check();
            }
        }
        for (p, layout, v) in live.drain(..) {
            verify(p, layout.size(), v);
            // SAFETY: live block with its layout.
            unsafe { h.dealloc(p, layout) };
        }
        h.check();
        // Only the one kept-back empty slab per class may remain.
        let mut p = 0;
        let mut slab_pages = 0;
        while p < h.top {
            let len = h.len(p);
            assert_ne!(h.kind(p), USED, "leaked run at {p}");
            if h.kind(p) == SLAB {
                slab_pages += len;
            }
            p += len;
        }
        assert!(
            slab_pages as usize <= NCLASSES * 4,
            "{slab_pages} slab pages left"
        );
    }
}
