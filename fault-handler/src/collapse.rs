//! Holding complete 2 MiB blocks of host page caches in huge pages.
//!
//! A host page cache fills 4 KiB at a time, so a clone first touching a
//! page of it costs the hypervisor a 4 KiB mapping (under PVM, a
//! shadow-MMU fault per page). Once every page of an aligned 2 MiB block
//! is in the cache, the kernel can hold the block in one huge page
//! (`MADV_COLLAPSE`), and a clone's first touch then maps all of it.
//! Collapsing allocates and copies 2 MiB, so it runs on one process-wide
//! worker thread, off the receive path: the receive thread hands complete
//! blocks over through a bounded lock-free queue and never waits. A block
//! that does not fit the queue stays in 4 KiB pages (it is still correct,
//! only slower to map).
//!
//! When a cache fetches pages by the block or less, its blocks are
//! collapsed when the cache's clones have all ended (see
//! [`PageCache::collapse_complete_blocks`](crate::PageCache::collapse_complete_blocks)),
//! not as they complete: collapsing locks the block's pages and unmaps them
//! from every clone that mapped them, and done under running clones it made
//! a cold remote `seqsearch` job 15-40% slower here, at normal priority or
//! at `SCHED_IDLE`. The next clones of the clone point find the blocks
//! whole. A cache that fetches whole blocks (`HugeBlocks::OnArrival`)
//! collapses each block on the thread that stored its last page, before the
//! faults waiting for it are woken ([`collapse_now`]): no clone has mapped
//! the block in 4 KiB pages yet, except pages pushed to it earlier.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::sys::SharedView;

/// Blocks waiting for the worker (8 GiB of cache): more than a burst of
/// deliveries completes before the worker catches up.
const QUEUE_BLOCKS: usize = 4096;
/// How long the idle worker sleeps before looking at the queue again when
/// no hand-off woke it.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// A cache's view and its collapse counters, shared with the worker.
#[derive(Debug)]
pub(crate) struct CollapseTarget {
    pub(crate) view: SharedView,
    /// Blocks held in huge pages.
    pub(crate) collapsed: AtomicU64,
    /// Blocks the kernel refused (no huge page free, or THP disabled).
    pub(crate) refused: AtomicU64,
    /// Blocks that found the queue full.
    pub(crate) dropped: AtomicU64,
}

impl CollapseTarget {
    pub(crate) fn new(view: SharedView) -> Self {
        Self {
            view,
            collapsed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

struct Job {
    target: Arc<CollapseTarget>,
    block: u64,
}

struct Worker {
    queue: ArrayQueue<Job>,
    thread: Thread,
}

/// The worker, started on first use; `None` if its thread could not start.
static WORKER: OnceLock<Option<Worker>> = OnceLock::new();

/// Hands block `block` of `target` (every page present) to the worker.
pub(crate) fn submit(target: &Arc<CollapseTarget>, block: u64) {
    let Some(worker) = worker() else {
        target.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let job = Job {
        target: target.clone(),
        block,
    };
    if worker.queue.push(job).is_err() {
        target.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    worker.thread.unpark();
}

fn worker() -> Option<&'static Worker> {
    WORKER
        .get_or_init(|| {
            // The thread waits until this initialisation is done.
            let spawned = std::thread::Builder::new()
                .name("sf-collapse".into())
                .spawn(|| {
                    if let Some(worker) = WORKER.wait() {
                        run(worker);
                    }
                });
            match spawned {
                Ok(handle) => Some(Worker {
                    queue: ArrayQueue::new(QUEUE_BLOCKS),
                    thread: handle.thread().clone(),
                }),
                Err(e) => {
                    tracing::warn!("cannot start the page cache's collapse thread: {e}");
                    None
                }
            }
        })
        .as_ref()
}

fn run(worker: &Worker) {
    loop {
        match worker.queue.pop() {
            Some(job) => collapse(&job),
            None => std::thread::park_timeout(IDLE_WAIT),
        }
    }
}

fn collapse(job: &Job) {
    collapse_now(&job.target, job.block);
}

/// Collapses block `block` of `target` (every page present) on this thread.
pub(crate) fn collapse_now(target: &CollapseTarget, block: u64) {
    match target.view.collapse(block) {
        Ok(()) => {
            target.collapsed.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            let first = target.refused.fetch_add(1, Ordering::Relaxed) == 0;
            if first {
                tracing::debug!(block, "the kernel kept a cache block in 4 KiB pages: {e}");
            }
        }
    }
}
