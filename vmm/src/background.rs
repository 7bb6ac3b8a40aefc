//! Worker threads for work that must not delay vCPUs: starting clones,
//! unmapping retired guest memory, completing descriptors.
//!
//! The workers exist before any clone point: creating a thread maps its
//! stack, which waits for the process's mmap lock, and at a clone point that
//! lock may be busy (unmapping a GiB holds it for tens of milliseconds), so a
//! parent that spawned threads there could stay paused that long.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use crate::sync::lock;

type Task = Box<dyn FnOnce() + Send>;

/// A thread that runs submitted tasks in order.
#[derive(Debug)]
pub struct Worker {
    tasks: Mutex<mpsc::Sender<Task>>,
}

/// The result of a submitted task.
#[derive(Debug)]
pub struct Job<T> {
    result: mpsc::Receiver<T>,
}

impl<T> Job<T> {
    /// Waits for the task; `None` if it panicked.
    pub fn wait(self) -> Option<T> {
        self.result.recv().ok()
    }

    /// Whether the task has ended (its result, if any, is discarded).
    pub fn is_finished(&self) -> bool {
        !matches!(self.result.try_recv(), Err(mpsc::TryRecvError::Empty))
    }
}

impl Worker {
    /// Starts a worker; `idle` schedules it as `SCHED_IDLE`, so it runs only
    /// when a CPU has nothing else to do. If the policy cannot be set the
    /// worker runs at normal priority; the work is the same either way.
    pub fn start(name: &str, idle: bool) -> Self {
        let (tasks, queue) = mpsc::channel::<Task>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if idle {
                    lower_priority();
                }
                for task in queue {
                    task();
                }
            })
            .expect("spawning a worker thread");
        Self {
            tasks: Mutex::new(tasks),
        }
    }

    /// Queues `work`; the worker runs it after the tasks before it.
    pub fn submit<T, F>(&self, work: F) -> Job<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = mpsc::sync_channel(1);
        let task: Task = Box::new(move || {
            let _ = done.send(work());
        });
        let tasks = lock(&self.tasks);
        if let Err(mpsc::SendError(task)) = tasks.send(task) {
            // The worker thread is gone (it only ends with the process); run here.
            task();
        }
        Job { result }
    }
}

/// The process-wide low-priority worker for housekeeping.
pub fn housekeeper() -> &'static Worker {
    static HOUSEKEEPER: OnceLock<Worker> = OnceLock::new();
    HOUSEKEEPER.get_or_init(|| Worker::start("sf-housekeeper", true))
}

fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 means the calling thread; `param` is a valid sched_param
    // for SCHED_IDLE, which requires priority 0.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        tracing::debug!(
            "cannot lower the priority of a worker: {}",
            std::io::Error::last_os_error()
        );
    }
}
