//! What a clone shares with the parent that started it: its kill flag and
//! vCPU kicker, when it started running, and how it ended. The parent's
//! thread waits on the cell in `join`; the child's thread (or, for a clone on
//! another host, the cluster) fills it in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use snowflock_vmm::VcpuKicker;

use crate::outcome::{ChildReport, VmOutcome};
use crate::sync::lock;

/// The clone on another host that a child cell stands for.
pub(crate) struct RemoteTarget {
    pub(crate) host: String,
    /// Ends the clone on its host.
    pub(crate) kill: Box<dyn Fn() + Send + Sync>,
}

/// What a child shares with the parent that spawned it.
pub(crate) struct ChildCell {
    pub(crate) id: u32,
    pub(crate) vm: u64,
    pub(crate) label: String,
    /// Set for a clone on another host.
    pub(crate) remote: Option<RemoteTarget>,
    pub(crate) kill: Arc<AtomicBool>,
    kicker: Mutex<Option<Arc<dyn VcpuKicker>>>,
    first_run: Mutex<Option<Instant>>,
    restore: Mutex<Duration>,
    own_memory: AtomicBool,
    pub(crate) end: Mutex<Option<(VmOutcome, Duration)>>,
    pub(crate) done: Condvar,
}

impl ChildCell {
    pub(crate) fn new(id: u32, vm: u64, label: String, remote: Option<RemoteTarget>) -> Self {
        Self {
            id,
            vm,
            label,
            remote,
            kill: Arc::new(AtomicBool::new(false)),
            kicker: Mutex::new(None),
            first_run: Mutex::new(None),
            restore: Mutex::new(Duration::ZERO),
            own_memory: AtomicBool::new(false),
            end: Mutex::new(None),
            done: Condvar::new(),
        }
    }

    /// Asks the child to end; false if it already had.
    pub(crate) fn kill(&self) -> bool {
        if self.has_ended() {
            return false;
        }
        self.kill.store(true, Ordering::Release);
        if let Some(remote) = &self.remote {
            (remote.kill)();
        }
        if let Some(kicker) = &*lock(&self.kicker) {
            kicker.kick();
        }
        true
    }

    /// The child's vCPU, to kick it out of guest code when it is killed.
    pub(crate) fn set_kicker(&self, kicker: Arc<dyn VcpuKicker>) {
        *lock(&self.kicker) = Some(kicker);
    }

    pub(crate) fn mark_started(&self, restore: Duration) {
        *lock(&self.restore) = restore;
        lock(&self.first_run).get_or_insert_with(Instant::now);
    }

    /// The child runs on memory of its own (see [`ChildReport::own_memory`]).
    pub(crate) fn mark_own_memory(&self) {
        self.own_memory.store(true, Ordering::Relaxed);
    }

    /// When the child first ran guest code, if it did.
    pub(crate) fn first_run(&self) -> Option<Instant> {
        *lock(&self.first_run)
    }

    pub(crate) fn finish(&self, outcome: VmOutcome, runtime: Duration) {
        let mut end = lock(&self.end);
        if end.is_none() {
            *end = Some((outcome, runtime));
            self.done.notify_all();
        }
    }

    pub(crate) fn has_ended(&self) -> bool {
        lock(&self.end).is_some()
    }

    /// The child's entry in its parent's clone report; takes its outcome.
    pub(crate) fn take_report(&self) -> ChildReport {
        let (outcome, runtime) = lock(&self.end)
            .take()
            .unwrap_or((VmOutcome::Failed("no outcome".into()), Duration::ZERO));
        ChildReport {
            id: self.id,
            vm: self.vm,
            host: self.remote.as_ref().map(|r| r.host.clone()),
            restore: *lock(&self.restore),
            own_memory: self.own_memory.load(Ordering::Relaxed),
            runtime,
            outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    #[test]
    fn only_the_first_end_counts() {
        let cell = ChildCell::new(1, 7, "clone 1".into(), None);
        assert!(!cell.has_ended());
        cell.finish(VmOutcome::Killed, Duration::from_millis(3));
        cell.finish(VmOutcome::Exited(0), Duration::from_millis(5));
        assert!(cell.has_ended());
        let report = cell.take_report();
        assert_eq!(report.outcome, VmOutcome::Killed);
        assert_eq!(report.runtime, Duration::from_millis(3));
        assert_eq!((report.id, report.vm, report.host), (1, 7, None));
    }

    #[test]
    fn a_child_without_an_end_reports_no_outcome() {
        let cell = ChildCell::new(2, 8, "clone 2".into(), None);
        assert_eq!(
            cell.take_report().outcome,
            VmOutcome::Failed("no outcome".into())
        );
    }

    #[test]
    fn start_keeps_the_first_run_and_the_latest_restore_time() {
        let cell = ChildCell::new(1, 7, "clone 1".into(), None);
        assert_eq!(cell.first_run(), None);
        cell.mark_started(Duration::from_millis(1));
        let first = cell.first_run();
        cell.mark_started(Duration::from_millis(2));
        assert!(first.is_some());
        assert_eq!(cell.first_run(), first);
        cell.finish(VmOutcome::Killed, Duration::ZERO);
        assert_eq!(cell.take_report().restore, Duration::from_millis(2));
    }

    #[test]
    fn kill_reaches_a_remote_clone_until_it_ended() {
        let kills = Arc::new(AtomicU32::new(0));
        let counted = kills.clone();
        let remote = RemoteTarget {
            host: "b".into(),
            kill: Box::new(move || {
                counted.fetch_add(1, Ordering::Relaxed);
            }),
        };
        let cell = ChildCell::new(3, 0, "clone 3".into(), Some(remote));
        assert!(cell.kill());
        assert!(cell.kill.load(Ordering::Acquire));
        cell.finish(VmOutcome::Killed, Duration::ZERO);
        assert!(!cell.kill());
        assert_eq!(kills.load(Ordering::Relaxed), 1);
        assert_eq!(cell.take_report().host.as_deref(), Some("b"));
    }
}
