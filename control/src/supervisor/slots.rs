//! The host's clone slots and its pool of VMs prepared ahead of clone
//! points. Slots bound how many clones run at once; each local clone holds
//! one until it ends. Prepared VMs let a clone skip creating its KVM VM.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use snowflock_vmm::Hypervisor;
use snowflock_vmm::background::Worker;
use snowflock_vmm::machine::PreparedVm;

use crate::error_chain;
use crate::sync::lock;

/// Most prepared VMs kept per guest memory size.
const MAX_WARM_VMS: u32 = 64;

/// Clone slots on this host: at most `limit` clones run at once.
pub(super) struct Slots {
    limit: u32,
    in_use: Mutex<u32>,
}

impl Slots {
    pub(super) fn new(limit: u32) -> Self {
        Self {
            limit,
            in_use: Mutex::new(0),
        }
    }

    /// Takes up to `wanted` slots; returns how many it got.
    pub(super) fn reserve(&self, wanted: u32) -> u32 {
        let mut used = lock(&self.in_use);
        let granted = wanted.min(self.limit.saturating_sub(*used));
        *used += granted;
        granted
    }

    pub(super) fn free(&self) -> u32 {
        let used = lock(&self.in_use);
        self.limit.saturating_sub(*used)
    }

    pub(super) fn release(&self, slots: u32) {
        let mut used = lock(&self.in_use);
        *used = used.saturating_sub(slots);
    }

    pub(super) fn in_use(&self) -> u32 {
        *lock(&self.in_use)
    }
}

/// How many prepared VMs of one size to keep: enough for a full clone of
/// the host's slots, within reason (each holds a KVM VM and its slot).
fn warm_target(clone_limit: u32) -> usize {
    clone_limit.min(MAX_WARM_VMS) as usize
}

/// VMs prepared ahead of clone points, by guest memory size.
pub(super) struct WarmPool {
    hv: Arc<dyn Hypervisor>,
    target: usize,
    ready: Mutex<HashMap<u64, Vec<PreparedVm>>>,
}

impl WarmPool {
    pub(super) fn new(hv: Arc<dyn Hypervisor>, clone_limit: u32) -> Self {
        Self {
            hv,
            target: warm_target(clone_limit),
            ready: Mutex::new(HashMap::new()),
        }
    }

    /// Up to `n` prepared VMs for `mem_size` bytes of memory.
    pub(super) fn take(&self, mem_size: u64, n: usize) -> Vec<PreparedVm> {
        let mut warm = lock(&self.ready);
        let pool = warm.entry(mem_size).or_default();
        let keep = pool.len().saturating_sub(n);
        pool.split_off(keep)
    }

    /// Prepared VMs of all memory sizes.
    pub(super) fn len(&self) -> usize {
        lock(&self.ready).values().map(Vec::len).sum()
    }

    /// Tops up the prepared VMs for `mem_size` on `launcher`, preparing
    /// them in parallel: each waits milliseconds, mostly idle, in KVM.
    pub(super) fn top_up(self: &Arc<Self>, launcher: &Worker, mem_size: u64) {
        let pool = self.clone();
        // The job reports nothing; later launcher jobs run after it anyway.
        let _ = launcher.submit(move || {
            let have = lock(&pool.ready).get(&mem_size).map_or(0, Vec::len);
            let missing = pool.target.saturating_sub(have);
            let preparing: Vec<_> = (0..missing)
                .map(|_| {
                    let hv = pool.hv.clone();
                    std::thread::spawn(move || PreparedVm::new(hv.as_ref(), mem_size))
                })
                .collect();
            for thread in preparing {
                match thread.join() {
                    Ok(Ok(vm)) => lock(&pool.ready).entry(mem_size).or_default().push(vm),
                    Ok(Err(e)) => tracing::warn!("cannot prepare a VM: {}", error_chain(&e)),
                    Err(_) => tracing::warn!("preparing a VM panicked"),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_grants_at_most_the_free_slots() {
        let slots = Slots::new(4);
        assert_eq!(slots.reserve(3), 3);
        assert_eq!(slots.free(), 1);
        assert_eq!(slots.reserve(5), 1);
        assert_eq!(slots.free(), 0);
        assert_eq!(slots.reserve(1), 0);
        assert_eq!(slots.in_use(), 4);
    }

    #[test]
    fn release_returns_slots_and_never_goes_below_zero() {
        let slots = Slots::new(4);
        slots.reserve(3);
        slots.release(2);
        assert_eq!((slots.in_use(), slots.free()), (1, 3));
        slots.release(5);
        assert_eq!((slots.in_use(), slots.free()), (0, 4));
    }

    #[test]
    fn a_host_without_slots_grants_none() {
        let slots = Slots::new(0);
        assert_eq!(slots.reserve(2), 0);
        assert_eq!(slots.free(), 0);
    }

    #[test]
    fn warm_pool_covers_the_slots_up_to_its_cap() {
        assert_eq!(warm_target(0), 0);
        assert_eq!(warm_target(8), 8);
        assert_eq!(warm_target(MAX_WARM_VMS), MAX_WARM_VMS as usize);
        assert_eq!(warm_target(1000), MAX_WARM_VMS as usize);
    }
}
