//! A VM's thread: it runs the VM until it ends, answers its hypercalls
//! (see [`super::hypercalls`]) and captures it for requests from outside.
//! When the VM ends, its clones are killed and waited for and its slots
//! return to the host.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use snowflock_abi::errno;
use snowflock_fault_handler::FaultHandler;
use snowflock_vmm::background::Job;
use snowflock_vmm::machine::Stop;
use snowflock_vmm::memory::MemoryImage;
use snowflock_vmm::{Machine, MachineError};

use super::VmRole;
use super::describe::describe;
use super::error::CaptureError;
use super::handle::Control;
use super::host::{HostState, VmEntry};
use super::tickets::{Checkpoint, Tickets};
use crate::console::ConsoleFlush;
use crate::descriptor::{CaptureKind, Descriptor};
use crate::error_chain;
use crate::outcome::VmOutcome;
use crate::remote::JobScope;
use crate::sync::{lock, wait_timeout};
use crate::working_sets::{ClonePointKey, ImageDigest};

/// How long a waiting VM thread sleeps between checks for kills and control
/// requests; bounds how late a kill of a joining parent is noticed.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// Per-VM state owned by the VM's thread.
pub(super) struct VmContext {
    pub(super) host: Arc<HostState>,
    pub(super) vm: u64,
    pub(super) label: String,
    pub(super) is_clone: bool,
    kill: Arc<AtomicBool>,
    requests: Option<mpsc::Receiver<Control>>,
    /// The fault handler filling a hollow clone's memory from another host.
    pub(super) faults: Option<Arc<FaultHandler>>,
    flush: ConsoleFlush,
    generation: u32,
    pub(super) tickets: Tickets,
    pub(super) checkpoints: HashMap<u64, Checkpoint>,
    /// The image a root VM booted: its clone points' working sets are recorded under it.
    image: Option<ImageDigest>,
    /// The Slurm job whose nodes its clones must stay on.
    pub(super) slurm_job: Option<JobScope>,
}

pub(super) enum JoinError {
    Errno(u64),
    /// This VM was killed while it waited.
    Killed,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl VmContext {
    /// A VM with no tickets yet, no control requests from outside and its
    /// memory on this host (see [`Self::with_requests`], [`Self::with_faults`]).
    pub(super) fn new(
        host: Arc<HostState>,
        vm: u64,
        label: String,
        is_clone: bool,
        kill: Arc<AtomicBool>,
        flush: ConsoleFlush,
        generation: u32,
    ) -> Self {
        Self {
            host,
            vm,
            label,
            is_clone,
            kill,
            requests: None,
            faults: None,
            flush,
            generation,
            tickets: Tickets::default(),
            checkpoints: HashMap::new(),
            image: None,
            slurm_job: None,
        }
    }

    /// A root VM started inside Slurm job `slurm_job`.
    pub(super) fn with_slurm_job(self, slurm_job: Option<JobScope>) -> Self {
        Self { slurm_job, ..self }
    }

    /// A root VM booted from the image `image` digests.
    pub(super) fn with_image(self, image: Option<ImageDigest>) -> Self {
        Self { image, ..self }
    }

    /// The key of this VM's clone point of `generation` across jobs; `None` for VMs not
    /// booted from an image (clones, restored descriptors).
    pub(super) fn clone_point_key(&self, generation: u32) -> Option<ClonePointKey> {
        self.image.map(|image| ClonePointKey { image, generation })
    }

    /// Serves capture requests from outside, as a root VM does.
    pub(super) fn with_requests(self, requests: mpsc::Receiver<Control>) -> Self {
        Self {
            requests: Some(requests),
            ..self
        }
    }

    /// A hollow clone, its memory filled by `faults`.
    pub(super) fn with_faults(self, faults: Arc<FaultHandler>) -> Self {
        Self {
            faults: Some(faults),
            ..self
        }
    }

    pub(super) fn killed(&self) -> bool {
        self.kill.load(Ordering::Acquire)
    }

    fn role(&self) -> VmRole {
        if self.faults.is_some() {
            VmRole::Hollow
        } else if self.is_clone {
            VmRole::Clone
        } else {
            VmRole::Root
        }
    }

    /// Runs the VM to its end, then ends its clones and releases its slots.
    pub(super) fn drive(mut self, mut machine: Machine) -> VmOutcome {
        lock(&self.host.vms).insert(
            self.vm,
            VmEntry {
                label: self.label.clone(),
                role: self.role(),
                mem_size: machine.memory().size(),
                started: Instant::now(),
                kill: self.kill.clone(),
                kicker: machine.kicker(),
            },
        );
        let outcome = self.serve(&mut machine);
        lock(&self.host.vms).remove(&self.vm);
        lock(&self.host.progress).remove(&self.vm);
        self.flush.flush();
        self.tickets.end_all(&self.host);
        for (_, cp) in self.checkpoints.drain() {
            cp.describer.and_then(Job::wait);
            if cp.served
                && let Some(cluster) = &self.host.config.cluster
            {
                cluster.retire_image(cp.descriptor.family);
            }
        }
        // The fault handler must be done with hollow memory before it is
        // unmapped: its address may soon hold another clone's memory.
        if let Some(faults) = &self.faults {
            faults.close();
        }
        drop(machine);
        if let VmOutcome::Failed(reason) = &outcome {
            tracing::warn!(vm = self.vm, %reason, "VM failed");
        }
        outcome
    }

    fn serve(&mut self, machine: &mut Machine) -> VmOutcome {
        loop {
            if self.killed() {
                return VmOutcome::Killed;
            }
            let run = machine.run();
            // A hollow clone whose pages stopped coming may have run on
            // zero-filled pages since: nothing it did after counts.
            if let Some(failure) = self.faults.as_ref().and_then(|f| f.failure()) {
                return VmOutcome::Failed(error_chain(&failure));
            }
            let stop = match run {
                Ok(stop) => stop,
                Err(e) => return VmOutcome::Failed(error_chain(&e)),
            };
            let stopped_at = Instant::now();
            let result = match stop {
                Stop::Exited(code) if self.is_clone && code == 0 => {
                    return VmOutcome::Result(Vec::new());
                }
                Stop::Exited(code) if self.is_clone => {
                    return VmOutcome::Failed(format!("clone exited with code {code}"));
                }
                Stop::Exited(code) => return VmOutcome::Exited(code),
                Stop::ChildExit(result) if self.is_clone => return VmOutcome::Result(result),
                Stop::ChildExit(_) => machine.reply(errno::encode(errno::EPERM), 0),
                Stop::Paused => {
                    self.serve_controls(machine);
                    Ok(())
                }
                Stop::Request(request) => self.serve_request(machine, request, stopped_at),
            };
            if let Err(e) = result {
                return VmOutcome::Failed(error_chain(&e));
            }
        }
    }

    fn serve_controls(&mut self, machine: &mut Machine) {
        let Some(requests) = &self.requests else {
            return;
        };
        let pending: Vec<Control> = requests.try_iter().collect();
        for control in pending {
            match control {
                Control::Capture(reply) => {
                    let captured = self
                        .capture(machine, CaptureKind::External)
                        .map_err(CaptureError::Snapshot)
                        .and_then(|(descriptor, image)| {
                            describe(&self.host, descriptor, &image)
                                .map(|(d, _)| (d, image))
                                .map_err(CaptureError::Describe)
                        });
                    let _ = reply.send(captured);
                }
            }
        }
    }

    /// Answers control requests that cannot be served while the vCPU waits
    /// in `join`.
    fn refuse_controls(&self) {
        if let Some(requests) = &self.requests {
            for control in requests.try_iter() {
                match control {
                    Control::Capture(reply) => {
                        let _ = reply.send(Err(CaptureError::Joining));
                    }
                }
            }
        }
    }

    /// Captures the VM; the descriptor's data page runs are filled in later
    /// by [`describe`].
    pub(super) fn capture(
        &mut self,
        machine: &mut Machine,
        kind: CaptureKind,
    ) -> Result<(Descriptor, Arc<MemoryImage>), MachineError> {
        let (snapshot, image) = machine.capture()?;
        self.generation += 1;
        let descriptor = Descriptor {
            family: std::hash::RandomState::new().hash_one((self.vm, self.generation)),
            generation: self.generation,
            parent_vm: self.vm,
            kind,
            captured_unix_ns: unix_ns(),
            machine: snapshot,
        };
        Ok((descriptor, image))
    }

    /// Waits for every child of `ticket`; returns how many there were.
    pub(super) fn join(&mut self, ticket: u64) -> Result<u32, JoinError> {
        let Some(spawned) = self.tickets.spawned(ticket) else {
            return Err(JoinError::Errno(errno::ENOENT));
        };
        if spawned.joined {
            // The children's outcomes went into the report at the first join: a second one
            // has nothing to wait for (waiting on their cells would never end).
            return Ok(spawned.children.len() as u32);
        }
        let cells = spawned.children.clone();
        for cell in &cells {
            let mut end = lock(&cell.end);
            while end.is_none() {
                if self.killed() {
                    return Err(JoinError::Killed);
                }
                self.refuse_controls();
                end = wait_timeout(&cell.done, end, WAIT_SLICE);
            }
        }
        let count = cells.len() as u32;
        self.tickets.finish(ticket, &self.host);
        Ok(count)
    }

    /// The label of this VM's clone `id`.
    pub(super) fn child_label(&self, id: u32) -> String {
        if self.label.is_empty() {
            format!("clone {id}")
        } else {
            format!("{}.{id}", self.label)
        }
    }
}
