//! Progress of a job `sf start --wait` follows: its clones requested,
//! granted, running and ended, and the pages its clones on other hosts
//! fetched, polled from the daemon while the console streams.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use snowflock_control::client::ApiClient;
use snowflock_control::protocol::{HostStats, VmProgress};

/// How often the daemon is asked.
const POLL: Duration = Duration::from_millis(500);
/// Each question is answered within this (the cluster's stats ask every host).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where progress goes.
#[derive(Debug, Clone)]
pub enum ProgressOutput {
    /// The message of a spinner (drawn only on a terminal).
    Bar(ProgressBar),
    /// A line on stderr whenever the figures change (for logs).
    Lines,
}

/// A thread polling one VM's progress until stopped.
#[derive(Debug)]
pub struct ProgressWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The progress of VM `vm`, as one line.
fn describe(vm: u64, progress: &VmProgress, pages_fetched: u64) -> String {
    format!(
        "vm{vm}: clones {} requested, {} granted, {} running, {} ended; {pages_fetched} pages fetched",
        progress.requested, progress.granted, progress.running, progress.ended
    )
}

/// Pages fetched by the hollow clones of VM `vm` (labelled `vm{vm}.N`, and
/// their descendants) on every host.
fn pages_fetched(hosts: &[HostStats], vm: u64) -> u64 {
    let prefix = format!("vm{vm}.");
    hosts
        .iter()
        .flat_map(|host| &host.clones)
        .filter(|clone| clone.label.starts_with(&prefix))
        .map(|clone| clone.stats.pages_fetched)
        .sum()
}

impl ProgressWatch {
    /// Polls `socket` for VM `vm` once `vm` is known (it is set when the
    /// start is answered; 0 until then).
    pub fn start(
        socket: PathBuf,
        vm: Arc<std::sync::atomic::AtomicU64>,
        output: ProgressOutput,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("sf-progress".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    let client = ApiClient::new(&socket, Some(ANSWER_TIMEOUT));
                    let mut last = String::new();
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        next = Instant::now() + POLL;
                        let id = vm.load(Ordering::Acquire);
                        if id == 0 || stop.load(Ordering::Acquire) {
                            continue;
                        }
                        // The VM ends between polls: the watch ends with it.
                        let Ok(progress) = client.progress(id) else {
                            continue;
                        };
                        let fetched = client.stats().map_or(0, |hosts| pages_fetched(&hosts, id));
                        let line = describe(id, &progress, fetched);
                        if line == last {
                            continue;
                        }
                        match &output {
                            ProgressOutput::Bar(bar) => bar.set_message(line.clone()),
                            ProgressOutput::Lines => note!("sf: progress: {line}"),
                        }
                        last = line;
                    }
                }
            })
            .expect("spawning a thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops polling and waits for the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
