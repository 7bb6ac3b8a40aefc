//! Starting a ticket's children: the local share restored onto
//! copy-on-write views of the parent's frozen memory, each on its own
//! thread; the remote share handed to the cluster with the completed
//! descriptor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use snowflock_vmm::Machine;
use snowflock_vmm::background::Job;
use snowflock_vmm::machine::{MachineSnapshot, PreparedVm};
use snowflock_vmm::memory::{MemoryImage, RestoredMemory};

use super::describe::{Described, Description, describe, describe_in_background};
use super::host::HostState;
use super::tickets::Launch;
use super::vm::VmContext;
use crate::child::ChildCell;
use crate::console::labelled;
use crate::descriptor::Descriptor;
use crate::error_chain;
use crate::outcome::VmOutcome;
use crate::remote::{Cluster, RemoteChild, RemoteGrant, RemoteLaunch};

impl VmContext {
    /// Starts every child of `ticket`: the local share on copy-on-write
    /// views of `image`, the rest on the hosts holding the ticket's remote
    /// reservations. Remote hosts need the finished descriptor, so it is
    /// completed and shipped on the launcher, after the local children
    /// started. `described` is the encoded size when already known.
    pub(super) fn spawn_all(
        &mut self,
        ticket: u64,
        descriptor: Descriptor,
        image: Arc<MemoryImage>,
        checkpoint: u64,
        described: Option<Description>,
    ) -> (Launch, Described) {
        let t = self
            .tickets
            .get_mut(ticket)
            .expect("ticket checked by caller");
        let local = t.unused_slots;
        let remote = std::mem::take(&mut t.remote);
        let memory = if t.children_write {
            RestoredMemory::Copy
        } else {
            self.host.config.populate.restored_memory()
        };
        let mut launch = self.spawn_children(&descriptor, image.clone(), local, checkpoint, memory);
        let cluster = match (&self.host.config.cluster, remote.is_empty()) {
            (Some(cluster), false) => cluster.clone(),
            _ => {
                let describer = match described {
                    Some(bytes) => Described::Done(bytes),
                    None => {
                        Described::Pending(describe_in_background(&self.host, &descriptor, &image))
                    }
                };
                return (launch, describer);
            }
        };
        let family = descriptor.family;
        let mut next_id = local + 1;
        let mut shares = Vec::with_capacity(remote.len());
        for grant in remote {
            let children: Vec<RemoteChild> = (0..grant.slots)
                .map(|_| {
                    let id = next_id;
                    next_id += 1;
                    RemoteChild::new_remote(
                        id,
                        self.child_label(id),
                        cluster.clone(),
                        &grant.host,
                        family,
                    )
                })
                .collect();
            launch.cells.extend(children.iter().map(|c| c.0.clone()));
            shares.push((grant, children));
        }
        launch.served_family = Some(family);
        let key = self.clone_point_key(descriptor.generation);
        cluster.serve_image(family, image.clone(), key);
        let shipping = self.ship_remote(cluster, shares, descriptor, image, checkpoint);
        (launch, Described::Pending(shipping))
    }

    /// Completes the descriptor on the launcher and hands each remote share
    /// to its host; if the descriptor cannot be completed, the reservations
    /// return and the share's children fail.
    fn ship_remote(
        &self,
        cluster: Arc<dyn Cluster>,
        shares: Vec<(RemoteGrant, Vec<RemoteChild>)>,
        descriptor: Descriptor,
        image: Arc<MemoryImage>,
        checkpoint: u64,
    ) -> Job<Description> {
        let (host, parent_label) = (self.host.clone(), self.label.clone());
        self.host
            .launcher
            .submit(move || match describe(&host, descriptor, &image) {
                Ok((descriptor, bytes)) => {
                    let done = Description::of(&descriptor, bytes);
                    let descriptor = Arc::new(descriptor);
                    for (grant, children) in shares {
                        cluster.launch(
                            grant,
                            RemoteLaunch {
                                descriptor: descriptor.clone(),
                                children,
                                checkpoint,
                                parent_label: parent_label.clone(),
                                external: false,
                            },
                        );
                    }
                    done
                }
                Err(e) => {
                    for (grant, children) in shares {
                        cluster.release(grant);
                        for child in children {
                            child.ended(
                                VmOutcome::Failed(format!(
                                    "describing the clone point failed: {}",
                                    error_chain(&e)
                                )),
                                Duration::ZERO,
                            );
                        }
                    }
                    Description::default()
                }
            })
    }

    /// Starts `count` children from `descriptor`, on memory held as `memory`
    /// says. The supervisor's launcher
    /// thread creates the children's threads, so the parent's pause neither
    /// grows with the number of clones nor waits to create a thread.
    fn spawn_children(
        &self,
        descriptor: &Descriptor,
        image: Arc<MemoryImage>,
        count: u32,
        checkpoint: u64,
        memory: RestoredMemory,
    ) -> Launch {
        let snapshot = Arc::new(descriptor.machine.clone());
        let starts: Vec<ChildStart> = (1..=count)
            .map(|id| {
                let vm = self.host.fresh_vm();
                let label = self.child_label(id);
                ChildStart {
                    host: self.host.clone(),
                    prepared: None,
                    cell: Arc::new(ChildCell::new(id, vm, label.clone(), None)),
                    snapshot: snapshot.clone(),
                    image: image.clone(),
                    memory,
                    label,
                    checkpoint,
                    generation: descriptor.generation,
                }
            })
            .collect();
        let cells = starts.iter().map(|c| c.cell.clone()).collect();
        let (host, mem_size) = (self.host.clone(), descriptor.machine.mem_size);
        let thread = self.host.launcher.submit(move || {
            let mut warm = host.take_warm(mem_size, starts.len());
            let threads = starts
                .into_iter()
                .map(|mut child| {
                    child.prepared = warm.pop();
                    std::thread::Builder::new()
                        .name(format!("vm{}", child.cell.vm))
                        .spawn(move || child.run())
                        .expect("spawning a clone thread")
                })
                .collect();
            host.warm_up(mem_size);
            threads
        });
        Launch {
            cells,
            thread,
            served_family: None,
        }
    }
}

/// Everything a child thread needs to restore and run its VM.
struct ChildStart {
    host: Arc<HostState>,
    /// A VM prepared ahead of time, if the pool had one.
    prepared: Option<PreparedVm>,
    cell: Arc<ChildCell>,
    snapshot: Arc<MachineSnapshot>,
    image: Arc<MemoryImage>,
    /// A view of `image` or a copy of its own.
    memory: RestoredMemory,
    label: String,
    checkpoint: u64,
    generation: u32,
}

impl ChildStart {
    fn run(self) {
        let begun = Instant::now();
        let (console, flush) = labelled(self.label.clone(), self.host.config.lines.clone());
        let hv = self.host.hv.as_ref();
        let restored = match self.prepared {
            Some(prepared) => Ok(prepared),
            None => PreparedVm::new(hv, self.snapshot.mem_size),
        }
        .and_then(|prepared| {
            Machine::restore_prepared(
                hv,
                prepared,
                &self.snapshot,
                &self.image,
                self.memory,
                console,
            )
        })
        .and_then(|mut m| {
            m.set_return(u64::from(self.cell.id), self.checkpoint)?;
            m.set_clone(self.generation, self.cell.id);
            Ok(m)
        });
        let restore = begun.elapsed();
        drop(self.image);
        let (outcome, runtime) = match restored {
            Err(e) => (VmOutcome::Failed(error_chain(&e)), Duration::ZERO),
            Ok(machine) => {
                self.cell.set_kicker(machine.kicker());
                let started = Instant::now();
                if self.memory == RestoredMemory::Copy {
                    self.cell.mark_own_memory();
                }
                self.cell.mark_started(restore);
                if let Some(populator) = machine.memory().populator() {
                    self.host.populate_clone(populator, self.cell.vm);
                }
                let ctx = VmContext::new(
                    self.host.clone(),
                    self.cell.vm,
                    self.label,
                    true,
                    self.cell.kill.clone(),
                    flush,
                    self.generation,
                );
                (ctx.drive(machine), started.elapsed())
            }
        };
        self.host.slots.release(1);
        self.cell.finish(outcome, runtime);
    }
}
