//! Where a job's CPU time went on this machine: the daemons' VM threads
//! (named `vm<id>`: a vCPU runs there, guest time and the hypervisor's exits
//! alike), the daemons' other threads (page transport, fault handlers,
//! control), and every core's busy time (which adds the kernel's network
//! processing in softirq context and everything else running).
//!
//! A netns cluster's hosts share this machine's cores, so a cluster job is
//! bounded by the sum of the work of all its hosts divided by the cores.
//!
//! A thread's time leaves `/proc/PID/task` when it ends (it stays in the
//! process's total), and a job's VM threads end with the job: a
//! [`VmThreadWatch`] samples them while the job runs and keeps each one's
//! last reading, so a VM thread's last sampling period (`SAMPLE_PERIOD`) is
//! counted with the daemons' other threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use procfs::CurrentSI;
use procfs::KernelStats;
use procfs::process::Process;

/// How often a [`VmThreadWatch`] reads the VM threads' times (each read walks every
/// thread of every daemon: at 20 ms it took ~4% of the cores during a job).
const SAMPLE_PERIOD: Duration = Duration::from_millis(50);

/// CPU seconds spent over an interval, by who spent them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// By the daemons' VM threads.
    pub vcpus: f64,
    /// By the daemons' other threads.
    pub daemons: f64,
    /// By the whole machine: every core's time neither idle nor waiting for I/O.
    pub machine_busy: f64,
}

/// Process and machine totals at one instant.
#[derive(Debug, Clone, Copy)]
struct Totals {
    /// The daemons' processes, every thread they ran (ended ones included).
    daemons: f64,
    machine_busy: f64,
}

fn per_second() -> f64 {
    procfs::ticks_per_second() as f64
}

impl Totals {
    fn now(pids: &[i32]) -> Result<Totals> {
        let mut daemons = 0.0;
        for &pid in pids {
            // A daemon that ended is not counted from then on.
            if let Ok(stat) = Process::new(pid).and_then(|p| p.stat()) {
                daemons += (stat.utime + stat.stime) as f64 / per_second();
            }
        }
        let total = KernelStats::current().context("reading /proc/stat")?.total;
        let busy = total.user
            + total.nice
            + total.system
            + total.irq.unwrap_or(0)
            + total.softirq.unwrap_or(0)
            + total.steal.unwrap_or(0);
        Ok(Totals {
            daemons,
            machine_busy: busy as f64 / per_second(),
        })
    }
}

/// Each live VM thread's CPU seconds, by (process, thread).
fn vm_threads(pids: &[i32]) -> HashMap<(i32, i32), f64> {
    let mut seconds = HashMap::new();
    for &pid in pids {
        let Ok(tasks) = Process::new(pid).and_then(|p| p.tasks()) else {
            continue;
        };
        for stat in tasks.flatten().filter_map(|task| task.stat().ok()) {
            if is_vm_thread(&stat.comm) {
                let spent = (stat.utime + stat.stime) as f64 / per_second();
                seconds.insert((pid, stat.pid), spent);
            }
        }
    }
    seconds
}

/// Measures the CPU time of daemons and machine from its start to [`VmThreadWatch::finish`].
#[derive(Debug)]
pub struct VmThreadWatch {
    pids: Vec<i32>,
    start: Totals,
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<HashMap<(i32, i32), (f64, f64)>>,
}

impl VmThreadWatch {
    /// Starts watching the daemons with process ids `pids`.
    pub fn start(pids: &[u32]) -> Result<VmThreadWatch> {
        let pids = pids
            .iter()
            .map(|&pid| i32::try_from(pid).context("a process id past i32"))
            .collect::<Result<Vec<i32>>>()?;
        let start = Totals::now(&pids)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let pids = pids.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("cpu-sampler".into())
                .spawn(move || {
                    // (first reading, last reading) per thread; a thread first seen
                    // after the start spent all of its time within the interval.
                    let mut seen: HashMap<(i32, i32), (f64, f64)> = vm_threads(&pids)
                        .into_iter()
                        .map(|(id, s)| (id, (s, s)))
                        .collect();
                    while !stop.load(Ordering::Acquire) {
                        std::thread::sleep(SAMPLE_PERIOD);
                        for (id, s) in vm_threads(&pids) {
                            seen.entry(id).or_insert((0.0, s)).1 = s;
                        }
                    }
                    seen
                })
                .context("starting the CPU sampler")?
        };
        Ok(VmThreadWatch {
            pids,
            start,
            stop,
            sampler,
        })
    }

    /// What was spent since the start.
    pub fn finish(self) -> Result<CpuTimes> {
        self.stop.store(true, Ordering::Release);
        let seen = self
            .sampler
            .join()
            .map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))?;
        let end = Totals::now(&self.pids)?;
        let vcpus: f64 = seen.values().map(|(first, last)| last - first).sum();
        let daemons = (end.daemons - self.start.daemons).max(0.0);
        Ok(CpuTimes {
            vcpus: vcpus.min(daemons),
            daemons: (daemons - vcpus).max(0.0),
            machine_busy: (end.machine_busy - self.start.machine_busy).max(0.0),
        })
    }
}

/// A VM's thread: `vm` and its id (`wait-vm1`, `copies-vm1` are not).
fn is_vm_thread(comm: &str) -> bool {
    comm.strip_prefix("vm")
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{VmThreadWatch, is_vm_thread};

    #[test]
    fn vm_threads_are_told_from_the_daemons_others() {
        assert!(is_vm_thread("vm12"));
        assert!(!is_vm_thread("vm"));
        assert!(!is_vm_thread("wait-vm1"));
        assert!(!is_vm_thread("vmx1"));
        assert!(!is_vm_thread("sf-faults-7"));
    }

    /// Spins on a thread named `name` until it has spent CPU time (bounded).
    fn spin_on(name: &str) {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(|| {
                let deadline = Instant::now() + Duration::from_millis(200);
                let mut x = 0u64;
                while Instant::now() < deadline {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_vm_thread_that_ended_is_counted_as_one() {
        let watch = VmThreadWatch::start(&[std::process::id()]).unwrap();
        spin_on("vm7");
        spin_on("helper");
        let spent = watch.finish().unwrap();
        // Ticks are 10 ms and the machine may be loaded: only the split is asserted.
        assert!(spent.vcpus > 0.0, "{spent:?}");
        assert!(spent.daemons > 0.0, "{spent:?}");
        assert!(spent.machine_busy > 0.0, "{spent:?}");
    }
}
