//! The control-plane hypercalls a VM makes: one function per request, each
//! answering the guest through [`Machine::reply`]. A returned error ends the
//! VM as failed; a refused request is an errno in the reply.

use std::sync::Arc;
use std::time::Instant;

use snowflock_abi::{ChildStatus, errno};
use snowflock_vmm::background::Job;
use snowflock_vmm::machine::Request;
use snowflock_vmm::memory::MemoryImage;
use snowflock_vmm::{Machine, MachineError};

use super::describe::{Description, describe_in_background};
use super::tickets::{Checkpoint, Ticket};
use super::vm::{JoinError, VmContext};
use crate::descriptor::CaptureKind;
use crate::outcome::VmOutcome;
use crate::remote::Plan;
use crate::sync::lock;

impl VmContext {
    pub(super) fn serve_request(
        &mut self,
        machine: &mut Machine,
        request: Request,
        stopped_at: Instant,
    ) -> Result<(), MachineError> {
        match request {
            Request::RequestTicket {
                clones,
                children_write,
            } => self.answer_request_ticket(machine, clones, children_write),
            Request::Clone { ticket } => self.answer_clone(machine, ticket, stopped_at),
            Request::Checkpoint => self.answer_checkpoint(machine, stopped_at),
            Request::CreateClones { checkpoint, ticket } => {
                self.answer_create_clones(machine, checkpoint, ticket, stopped_at)
            }
            Request::Join { ticket } => self.answer_join(machine, ticket),
            Request::ChildResult {
                ticket,
                child,
                capacity: _,
            } => self.answer_child_result(machine, ticket, child),
            Request::Kill { ticket } => self.answer_kill(machine, ticket),
        }
    }

    /// Where the slots of a ticket for `wanted` clones come from.
    fn plan(&self, wanted: u32, mem_size: u64) -> Plan {
        match &self.host.config.cluster {
            Some(cluster) => {
                let owner = format!("vm {} ({})", self.vm, self.label);
                cluster.plan(
                    wanted,
                    mem_size,
                    self.host.slots.free(),
                    &owner,
                    self.slurm_job.as_ref(),
                )
            }
            None => Plan {
                local: wanted,
                remote: Vec::new(),
                slurm_job: None,
            },
        }
    }

    /// Reserves slots for up to `clones` children; replies with the ticket
    /// and how many slots it holds.
    fn answer_request_ticket(
        &mut self,
        machine: &mut Machine,
        clones: u32,
        children_write: bool,
    ) -> Result<(), MachineError> {
        if self.faults.is_some() {
            // A hollow clone's memory lives on another host; it cannot
            // be frozen and served again.
            return machine.reply(errno::encode(errno::EPERM), 0);
        }
        let asked = Instant::now();
        let plan = self.plan(clones, machine.memory().size());
        let local = self.host.slots.reserve(plan.local);
        let remote_slots: u32 = plan.remote.iter().map(|g| g.slots).sum();
        let granted = local + remote_slots;
        self.host
            .metrics
            .ticket(clones, local, remote_slots, asked.elapsed());
        let id = self.host.fresh_id();
        {
            let mut progress = lock(&self.host.progress);
            let progress = progress.entry(self.vm).or_default();
            progress.requested += u64::from(clones);
            progress.granted += u64::from(granted);
        }
        if let Some(job) = plan.slurm_job {
            lock(&self.host.slurm_jobs)
                .entry(self.vm)
                .or_default()
                .push(job);
        }
        self.tickets.insert(
            id,
            Ticket {
                vm: self.vm,
                granted,
                unused_slots: local,
                remote: plan.remote,
                slurm_job: plan.slurm_job,
                children_write,
                spawned: None,
            },
        );
        machine.reply(id, u64::from(granted))
    }

    /// Captures the VM and starts the ticket's children from it; the parent
    /// continues as soon as the capture is done.
    fn answer_clone(
        &mut self,
        machine: &mut Machine,
        ticket: u64,
        stopped_at: Instant,
    ) -> Result<(), MachineError> {
        let granted = match self.tickets.usable(ticket) {
            Ok(granted) => granted,
            Err(code) => return machine.reply(errno::encode(code), 0),
        };
        if granted == 0 {
            self.tickets.mark_spawned(
                ticket,
                self.vm,
                stopped_at,
                CaptureKind::Clone,
                None,
                &self.host,
            );
            return machine.reply(0, 0);
        }
        let (descriptor, image) = self.capture(machine, CaptureKind::Clone)?;
        machine.reply(0, 0)?;
        let launched = self.spawn_all(ticket, descriptor, image, 0, None);
        self.tickets.mark_spawned(
            ticket,
            self.vm,
            stopped_at,
            CaptureKind::Clone,
            Some(launched),
            &self.host,
        );
        self.tickets.set_pause(ticket, stopped_at.elapsed());
        Ok(())
    }

    /// Captures the VM for clones created later; replies with the
    /// checkpoint's id.
    fn answer_checkpoint(
        &mut self,
        machine: &mut Machine,
        stopped_at: Instant,
    ) -> Result<(), MachineError> {
        let (descriptor, image) = self.capture(machine, CaptureKind::Checkpoint)?;
        let describer = Some(describe_in_background(&self.host, &descriptor, &image));
        let id = self.host.fresh_id();
        self.checkpoints.insert(
            id,
            Checkpoint {
                descriptor,
                image,
                pause: stopped_at.elapsed(),
                describer,
                description: Description::default(),
                served: false,
            },
        );
        machine.reply(0, id)
    }

    /// Starts the ticket's children from an earlier checkpoint.
    fn answer_create_clones(
        &mut self,
        machine: &mut Machine,
        checkpoint: u64,
        ticket: u64,
        stopped_at: Instant,
    ) -> Result<(), MachineError> {
        if !self.checkpoints.contains_key(&checkpoint) {
            return machine.reply(errno::encode(errno::ENOENT), 0);
        }
        if let Err(code) = self.tickets.usable(ticket) {
            return machine.reply(errno::encode(code), 0);
        }
        let cp = self
            .checkpoints
            .get_mut(&checkpoint)
            .expect("checked above");
        if let Some(done) = cp.describer.take().and_then(Job::wait) {
            cp.description = done;
        }
        let (descriptor, image, pause, bytes) = (
            cp.descriptor.clone(),
            cp.image.clone(),
            cp.pause,
            cp.description,
        );
        let family = descriptor.family;
        let launched = self.spawn_all(ticket, descriptor, image.clone(), checkpoint, Some(bytes));
        if launched.0.served_family.is_some() {
            self.keep_served(checkpoint, family, image);
        }
        self.tickets.mark_spawned(
            ticket,
            self.vm,
            stopped_at,
            CaptureKind::Checkpoint,
            Some(launched),
            &self.host,
        );
        self.tickets.set_pause(ticket, pause);
        machine.reply(0, 0)
    }

    /// Keeps `checkpoint`'s clone point served to other hosts until the VM
    /// ends (once per checkpoint): the next clones from it find their
    /// hosts' page caches where this round left them.
    fn keep_served(&mut self, checkpoint: u64, family: u64, image: Arc<MemoryImage>) {
        let Some(cluster) = &self.host.config.cluster else {
            return;
        };
        let key = self
            .checkpoints
            .get(&checkpoint)
            .and_then(|cp| self.clone_point_key(cp.descriptor.generation));
        if let Some(cp) = self.checkpoints.get_mut(&checkpoint)
            && !cp.served
        {
            cluster.serve_image(family, image, key);
            cp.served = true;
        }
    }

    /// Waits for the ticket's children; replies with their number. A killed
    /// VM gets no reply: it ends.
    fn answer_join(&mut self, machine: &mut Machine, ticket: u64) -> Result<(), MachineError> {
        match self.join(ticket) {
            Ok(count) => machine.reply(u64::from(count), 0),
            Err(JoinError::Errno(code)) => machine.reply(errno::encode(code), 0),
            Err(JoinError::Killed) => Ok(()),
        }
    }

    /// Replies with a joined child's status and result (or reason).
    fn answer_child_result(
        &mut self,
        machine: &mut Machine,
        ticket: u64,
        child: u32,
    ) -> Result<(), MachineError> {
        match self.tickets.child_outcome(ticket, child) {
            Ok(VmOutcome::Result(bytes)) => {
                machine.reply_child_result(ChildStatus::Exited as u64, &bytes)
            }
            Ok(VmOutcome::Exited(code)) => machine.reply_child_result(
                ChildStatus::Failed as u64,
                format!("exited with code {code}").as_bytes(),
            ),
            Ok(VmOutcome::Failed(reason)) => {
                machine.reply_child_result(ChildStatus::Failed as u64, reason.as_bytes())
            }
            Ok(VmOutcome::Killed) => {
                machine.reply_child_result(ChildStatus::Killed as u64, b"killed")
            }
            Ok(VmOutcome::Lost(reason)) => {
                machine.reply_child_result(ChildStatus::Lost as u64, reason.as_bytes())
            }
            Err(code) => machine.reply(errno::encode(code), 0),
        }
    }

    /// Kills the ticket's children that still run; replies with their number.
    fn answer_kill(&mut self, machine: &mut Machine, ticket: u64) -> Result<(), MachineError> {
        let Some(spawned) = self.tickets.spawned(ticket) else {
            return machine.reply(errno::encode(errno::ENOENT), 0);
        };
        let killed = spawned.children.iter().filter(|c| c.kill()).count();
        machine.reply(killed as u64, 0)
    }
}
