//! Where a job's CPU time went on this machine: the daemons' VM threads
//! (named `vm<id>`: a vCPU runs there, guest time and the hypervisor's exits
//! alike), the daemons' other threads (page transport, fault handlers,
//! control), and every core's busy time (which adds the kernel's network
//! processing in softirq context and everything else running).
//!
//! A netns cluster's hosts share this machine's cores, so a cluster job is
//! bounded by the sum of the work of all its hosts divided by the cores.

use anyhow::{Context, Result};
use procfs::CurrentSI;
use procfs::KernelStats;
use procfs::process::Process;

/// CPU seconds spent so far (or over an interval, see [`CpuTimes::since`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// By the daemons' VM threads.
    pub vcpus: f64,
    /// By the daemons' other threads.
    pub daemons: f64,
    /// By the whole machine: every core's time neither idle nor waiting for I/O.
    pub machine_busy: f64,
}

impl CpuTimes {
    /// The CPU time of the daemons with process ids `pids` (their threads now) and of the
    /// whole machine. A daemon or thread that ends between the listing and the read is
    /// skipped: an interval loses at most the time of threads that ended within it.
    pub fn now(pids: &[u32]) -> Result<CpuTimes> {
        let per_second = procfs::ticks_per_second() as f64;
        let mut times = CpuTimes::default();
        for &pid in pids {
            let pid = i32::try_from(pid).context("a process id past i32")?;
            let Ok(process) = Process::new(pid) else {
                continue;
            };
            let tasks = process
                .tasks()
                .with_context(|| format!("listing the threads of process {pid}"))?;
            for stat in tasks.flatten().filter_map(|task| task.stat().ok()) {
                let seconds = (stat.utime + stat.stime) as f64 / per_second;
                if is_vm_thread(&stat.comm) {
                    times.vcpus += seconds;
                } else {
                    times.daemons += seconds;
                }
            }
        }
        let total = KernelStats::current().context("reading /proc/stat")?.total;
        let busy = total.user
            + total.nice
            + total.system
            + total.irq.unwrap_or(0)
            + total.softirq.unwrap_or(0)
            + total.steal.unwrap_or(0);
        times.machine_busy = busy as f64 / per_second;
        Ok(times)
    }

    /// What was spent between `before` and `self`.
    pub fn since(&self, before: &CpuTimes) -> CpuTimes {
        CpuTimes {
            vcpus: (self.vcpus - before.vcpus).max(0.0),
            daemons: (self.daemons - before.daemons).max(0.0),
            machine_busy: (self.machine_busy - before.machine_busy).max(0.0),
        }
    }
}

/// A VM's thread: `vm` and its id (`wait-vm1`, `copies-vm1` are not).
fn is_vm_thread(comm: &str) -> bool {
    comm.strip_prefix("vm")
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::{CpuTimes, is_vm_thread};

    #[test]
    fn vm_threads_are_told_from_the_daemons_others() {
        assert!(is_vm_thread("vm12"));
        assert!(!is_vm_thread("vm"));
        assert!(!is_vm_thread("wait-vm1"));
        assert!(!is_vm_thread("vmx1"));
        assert!(!is_vm_thread("sf-faults-7"));
    }

    #[test]
    fn this_process_and_the_machine_spend_time() {
        use std::time::{Duration, Instant};
        let before = CpuTimes::now(&[std::process::id()]).unwrap();
        // Spins until a tick of this process's time is counted (bounded).
        let deadline = Instant::now() + Duration::from_secs(5);
        let spent = loop {
            let spin = Instant::now();
            let mut x = 0u64;
            while spin.elapsed() < Duration::from_millis(20) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            let spent = CpuTimes::now(&[std::process::id()]).unwrap().since(&before);
            if spent.daemons > 0.0 || Instant::now() > deadline {
                break spent;
            }
        };
        assert_eq!(spent.vcpus, 0.0);
        assert!(spent.daemons > 0.0, "{spent:?}");
        assert!(spent.machine_busy > 0.0, "{spent:?}");
    }
}
