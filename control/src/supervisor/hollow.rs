//! Hollow clones: clones of a VM on another host, started on this one by the
//! daemon. Their memory is a private mapping of the clone point's page cache,
//! filled on demand by a fault handler fetching from the parent's host.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use snowflock_fault_handler::{AvoidMap, CloneStats, FaultError, FaultHandler};
use snowflock_vmm::Machine;
use snowflock_vmm::machine::{ConsoleSink, PreparedVm};
use snowflock_vmm::memory::PAGE_SIZE;

use super::Supervisor;
use super::error::HollowError;
use super::host::HostState;
use super::vm::VmContext;
use crate::console::labelled;
use crate::error_chain;
use crate::outcome::VmOutcome;
use crate::remote::HollowStart;

impl Supervisor {
    /// Starts a hollow clone in one slot reserved with
    /// [`Supervisor::reserve_slots`]; the slot returns when it ends. Returns
    /// the new VM's id; its start and end go to `start.events`.
    pub fn start_hollow(&self, start: HollowStart) -> u64 {
        let vm = self.host.fresh_vm();
        let host = self.host.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vm{vm}"))
            .spawn(move || run_hollow(host, vm, start));
        if let Err(e) = spawned {
            tracing::error!(vm, "cannot start a thread for a hollow clone: {e}");
            self.host.slots.release(1);
        }
        vm
    }
}

/// Restores and runs one hollow clone; its memory comes from `start.family`.
fn run_hollow(host: Arc<HostState>, vm: u64, start: HollowStart) {
    let begun = Instant::now();
    let mem_size = start.descriptor.machine.mem_size;
    let lines = start
        .lines
        .clone()
        .unwrap_or_else(|| host.config.lines.clone());
    let (console, flush) = labelled(start.label.clone(), lines);
    let prepared = host.take_warm(mem_size, 1).pop();
    host.warm_up(mem_size);
    let kill = Arc::new(AtomicBool::new(false));
    let restored = restore_hollow(&host, &start, prepared, console);
    let restore = begun.elapsed();
    let (outcome, runtime, stats) = match restored {
        Err(e) => (
            VmOutcome::Failed(error_chain(&e)),
            Duration::ZERO,
            CloneStats::default(),
        ),
        Ok((machine, handler)) => {
            start.events.started(vm, restore, handler.clone());
            if start.populate
                && let Some(populator) = machine.memory().populator()
            {
                host.populate_hollow(populator, handler.clone(), vm);
            }
            let started = Instant::now();
            let ctx = VmContext::new(
                host.clone(),
                vm,
                start.label.clone(),
                !start.external,
                kill,
                flush,
                start.descriptor.generation,
            )
            .with_faults(handler.clone());
            let outcome = ctx.drive(machine);
            (outcome, started.elapsed(), handler.stats())
        }
    };
    host.slots.release(1);
    start.events.ended(vm, outcome, runtime, stats);
}

/// Restores the clone's VM onto hollow memory (on `prepared`, or a VM
/// prepared now) and starts the fault handler that fills it.
fn restore_hollow(
    host: &HostState,
    start: &HollowStart,
    prepared: Option<PreparedVm>,
    console: ConsoleSink,
) -> Result<(Machine, Arc<FaultHandler>), HollowError> {
    let snapshot = &start.descriptor.machine;
    let mem_size = snapshot.mem_size;
    let hv = host.hv.as_ref();
    let prepared = match prepared {
        Some(prepared) => prepared,
        None => PreparedVm::new(hv, mem_size).map_err(HollowError::Prepare)?,
    };
    let mut machine = Machine::restore_hollow(
        hv,
        prepared,
        snapshot,
        start.family.cache().memfd(),
        console,
    )
    .map_err(HollowError::Restore)?;
    machine.set_clone(start.descriptor.generation, start.child);
    if let Some(sink) = &start.output {
        machine.forward_output(sink.clone());
    }
    let avoid = if start.avoidance {
        AvoidMap::new(
            mem_size / PAGE_SIZE,
            snapshot.data_pages.runs(),
            snapshot.free_pages.runs(),
        )
    } else {
        AvoidMap::none(mem_size / PAGE_SIZE)
    }
    .map_err(HollowError::Avoid)?;
    let kicker = machine.kicker();
    let on_failure: Arc<dyn Fn(&FaultError) + Send + Sync> = Arc::new(move |_| kicker.kick());
    // SAFETY: hollow memory is a private mapping of the whole of this
    // family's cache memfd that nothing has touched yet (restoring
    // writes only vCPU and VM state). It stays
    // mapped until `machine` drops, and `VmContext::drive` (or the error
    // path below) closes the handler before the machine drops.
    let handler = unsafe {
        FaultHandler::start(
            start.family.clone(),
            machine.memory().host_addr(),
            mem_size,
            avoid,
            on_failure,
        )
    }
    .map_err(HollowError::FaultHandler)?;
    let handler = Arc::new(handler);
    if start.avoidance {
        let faults = handler.clone();
        machine.set_fresh_pages_hook(Arc::new(move |runs| faults.mark_fresh(runs)));
    }
    if !start.external
        && let Err(e) = machine.set_return(u64::from(start.child), start.checkpoint)
    {
        handler.close();
        return Err(HollowError::SetReturn(e));
    }
    Ok((machine, handler))
}
