//! The tickets and checkpoints a VM holds. A ticket reserves clone slots
//! (here and on other hosts) until its children are started; `join` waits
//! for them, files the operation's [`CloneReport`] and returns unused slots.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snowflock_abi::errno;
use snowflock_vmm::background::Job;
use snowflock_vmm::memory::MemoryImage;

use super::describe::{Described, Description};
use super::host::{HostState, MAX_REPORTS};
use crate::child::ChildCell;
use crate::descriptor::{CaptureKind, Descriptor};
use crate::outcome::{CloneReport, VmOutcome};
use crate::remote::RemoteGrant;
use crate::sync::lock;

/// A VM's tickets, by id.
#[derive(Default)]
pub(super) struct Tickets(HashMap<u64, Ticket>);

pub(super) struct Ticket {
    /// The VM holding it.
    pub(super) vm: u64,
    pub(super) granted: u32,
    /// Slots on this host reserved but not yet handed to running children.
    pub(super) unused_slots: u32,
    /// Reservations on other hosts not yet used.
    pub(super) remote: Vec<RemoteGrant>,
    /// The Slurm allocation holding the ticket's slots, until it is joined.
    pub(super) slurm_job: Option<u64>,
    /// The guest said the children will write much of their state: local
    /// ones get memory of their own (`abi::ticket::CHILDREN_WRITE`).
    pub(super) children_write: bool,
    pub(super) spawned: Option<Spawned>,
}

pub(super) struct Spawned {
    started: Instant,
    report: CloneReport,
    pub(super) children: Vec<Arc<ChildCell>>,
    /// Starting the children on the launcher; yields their threads.
    launcher: Option<Job<Vec<JoinHandle<()>>>>,
    describer: Option<Described>,
    /// The clone point served to other hosts, retired once joined.
    served_family: Option<u64>,
    pub(super) joined: bool,
}

impl Spawned {
    /// Waits for the children's threads and the clone point's description,
    /// then fills in the report from them and from the children's cells.
    fn complete_report(&mut self) {
        for thread in self.launcher.take().and_then(Job::wait).unwrap_or_default() {
            let _ = thread.join();
        }
        let described = self
            .describer
            .take()
            .map_or_else(Description::default, Described::get);
        self.report.descriptor_bytes = described.bytes;
        self.report.data_pages = described.data_pages;
        let mut last_start = None;
        for cell in &self.children {
            last_start = last_start.max(cell.first_run());
            self.report.children.push(cell.take_report());
        }
        self.report.all_running = last_start.map(|t| t.duration_since(self.started));
    }
}

/// Ends the Slurm allocation `(vm, job)` of a ticket, if it had one.
fn release_allocation(host: &HostState, slurm_job: Option<(u64, u64)>) {
    let Some((vm, job)) = slurm_job else {
        return;
    };
    if let Some(cluster) = &host.config.cluster {
        cluster.release_allocation(job);
    }
    let mut jobs = lock(&host.slurm_jobs);
    if let Some(held) = jobs.get_mut(&vm) {
        held.retain(|&held| held != job);
        if held.is_empty() {
            jobs.remove(&vm);
        }
    }
}

/// A capture kept for creating clones from it later.
pub(super) struct Checkpoint {
    pub(super) descriptor: Descriptor,
    pub(super) image: Arc<MemoryImage>,
    pub(super) pause: Duration,
    pub(super) describer: Option<Job<Description>>,
    pub(super) description: Description,
    /// Whether the checkpoint keeps its clone point served to other hosts
    /// (from its first remote clones to the VM's end), so that their page
    /// caches stay for its next clones.
    pub(super) served: bool,
}

/// Children being started: their cells now, their threads from the launcher.
pub(super) struct Launch {
    pub(super) cells: Vec<Arc<ChildCell>>,
    pub(super) thread: Job<Vec<JoinHandle<()>>>,
    /// The clone point, when it is served to other hosts.
    pub(super) served_family: Option<u64>,
}

impl Tickets {
    pub(super) fn insert(&mut self, id: u64, ticket: Ticket) {
        self.0.insert(id, ticket);
    }

    pub(super) fn get_mut(&mut self, ticket: u64) -> Option<&mut Ticket> {
        self.0.get_mut(&ticket)
    }

    /// The started children of `ticket`, if it has any.
    pub(super) fn spawned(&self, ticket: u64) -> Option<&Spawned> {
        self.0.get(&ticket).and_then(|t| t.spawned.as_ref())
    }

    /// The granted count of an unused ticket, or an errno.
    pub(super) fn usable(&self, ticket: u64) -> Result<u32, u64> {
        match self.0.get(&ticket) {
            None => Err(errno::ENOENT),
            Some(t) if t.spawned.is_some() => Err(errno::EBUSY),
            Some(t) => Ok(t.granted),
        }
    }

    /// Records that `ticket` of VM `parent_vm` was used at `started`.
    pub(super) fn mark_spawned(
        &mut self,
        ticket: u64,
        parent_vm: u64,
        started: Instant,
        kind: CaptureKind,
        launched: Option<(Launch, Described)>,
        host: &HostState,
    ) {
        let t = self.0.get_mut(&ticket).expect("ticket checked by caller");
        let (children, launcher, describer, served_family) = match launched {
            Some((launch, describer)) => (
                launch.cells,
                Some(launch.thread),
                Some(describer),
                launch.served_family,
            ),
            None => (Vec::new(), None, None, None),
        };
        // Each local child now owns one slot and returns it when it ends;
        // remote reservations were handed to their hosts.
        let local = children.iter().filter(|c| c.remote.is_none()).count() as u32;
        host.metrics
            .clones_started(u64::from(local), (children.len() as u32 - local).into());
        lock(&host.progress)
            .entry(t.vm)
            .or_default()
            .children
            .extend(children.iter().cloned());
        t.unused_slots -= local;
        t.spawned = Some(Spawned {
            started,
            report: CloneReport {
                parent_vm,
                ticket,
                kind,
                clones: children.len() as u32,
                capture_pause: Duration::ZERO,
                descriptor_bytes: 0,
                data_pages: 0,
                all_running: None,
                slurm_job: None,
                children: Vec::new(),
            },
            children,
            launcher,
            describer,
            served_family,
            joined: false,
        });
    }

    pub(super) fn set_pause(&mut self, ticket: u64, pause: Duration) {
        if let Some(spawned) = self.0.get_mut(&ticket).and_then(|t| t.spawned.as_mut()) {
            spawned.report.capture_pause = pause;
        }
    }

    /// Joins the threads of a ticket whose children all ended and files its report.
    pub(super) fn finish(&mut self, ticket: u64, host: &HostState) {
        let Some(t) = self.0.get_mut(&ticket) else {
            return;
        };
        host.slots.release(std::mem::take(&mut t.unused_slots));
        if let Some(cluster) = &host.config.cluster {
            for grant in t.remote.drain(..) {
                cluster.release(grant);
            }
        }
        let slurm_job = t.slurm_job.take().map(|job| (t.vm, job));
        let Some(spawned) = t.spawned.as_mut() else {
            release_allocation(host, slurm_job);
            return;
        };
        if spawned.joined {
            release_allocation(host, slurm_job);
            return;
        }
        spawned.joined = true;
        spawned.complete_report();
        if let Some(progress) = lock(&host.progress).get_mut(&t.vm) {
            progress
                .children
                .retain(|cell| !spawned.children.iter().any(|c| Arc::ptr_eq(c, cell)));
            progress.joined += spawned.children.len() as u64;
        }
        // After the children ended: the allocation covers them to the last.
        release_allocation(host, slurm_job);
        spawned.report.slurm_job = slurm_job.map(|(_, job)| job);
        if let (Some(family), Some(cluster)) = (spawned.served_family.take(), &host.config.cluster)
        {
            cluster.retire_image(family);
        }
        host.metrics.operation_done(&spawned.report);
        let mut reports = lock(&host.reports);
        if reports.len() == MAX_REPORTS {
            reports.pop_front();
        }
        reports.push_back(spawned.report.clone());
    }

    /// A joined child's outcome; `EBUSY` while the ticket's children have not
    /// been joined, `ENOENT` for an unknown ticket or child.
    pub(super) fn child_outcome(&self, ticket: u64, child: u32) -> Result<VmOutcome, u64> {
        let Some(spawned) = self.spawned(ticket) else {
            return Err(errno::ENOENT);
        };
        if child == 0 || child > spawned.report.clones {
            return Err(errno::ENOENT);
        }
        if !spawned.joined {
            return Err(errno::EBUSY);
        }
        spawned
            .report
            .children
            .iter()
            .find(|c| c.id == child)
            .map(|c| c.outcome.clone())
            .ok_or(errno::ENOENT)
    }

    /// At VM end: kill what still runs, wait for it, release every slot.
    pub(super) fn end_all(&mut self, host: &HostState) {
        for ticket in self.0.values() {
            if let Some(spawned) = &ticket.spawned {
                for cell in &spawned.children {
                    cell.kill();
                }
            }
        }
        let ids: Vec<u64> = self.0.keys().copied().collect();
        for id in ids {
            self.finish(id, host);
        }
        self.0.clear();
    }
}
