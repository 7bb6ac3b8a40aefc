//! Shared helpers for the control-plane integration tests (real /dev/kvm).
// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use snowflock_control::config::PopulateMode;
use snowflock_control::console::LineSink;
use snowflock_control::{Supervisor, SupervisorConfig, VmOutcome};
use snowflock_vmm::KvmHypervisor;
use snowflock_vmm::memory::HostPages;

pub const MEM: u64 = 128 << 20;

/// Console lines seen, as (label, line).
#[derive(Clone, Default, Debug)]
pub struct Lines(Arc<Mutex<Vec<(String, String)>>>);

impl Lines {
    pub fn sink(&self) -> LineSink {
        let lines = self.0.clone();
        Arc::new(move |label: &str, line: &str| {
            lines
                .lock()
                .unwrap()
                .push((label.to_string(), line.to_string()));
        })
    }

    pub fn all(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().clone()
    }

    pub fn of(&self, label: &str) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|(l, _)| l == label)
            .map(|(_, line)| line)
            .collect()
    }
}

pub fn supervisor(clone_limit: u32) -> (Supervisor, Lines) {
    supervisor_populating(clone_limit, PopulateMode::default())
}

/// A supervisor whose local clones' memory is populated as `populate` says.
pub fn supervisor_populating(clone_limit: u32, populate: PopulateMode) -> (Supervisor, Lines) {
    let lines = Lines::default();
    let hv = KvmHypervisor::open().expect("KVM must be available for these tests");
    let sup = Supervisor::new(
        Arc::new(hv),
        SupervisorConfig {
            clone_limit,
            lines: lines.sink(),
            descriptor_dir: None,
            cluster: None,
            populate,
            host_pages: HostPages::Base,
            linux_personality: Some(snowflock_guest::images::LINUX_PERSONALITY.into()),
        },
    );
    (sup, lines)
}

pub fn image(name: &str) -> &'static [u8] {
    snowflock_guest::images::by_name(name).unwrap_or_else(|| panic!("no embedded image {name}"))
}

/// Runs `name` to its end and returns the outcome.
pub fn run(sup: &Supervisor, name: &str, args: &str) -> VmOutcome {
    sup.launch(image(name), MEM, args)
        .unwrap_or_else(|e| panic!("{name} does not start: {e}"))
        .wait()
}

pub fn failure(outcome: &VmOutcome) -> &str {
    match outcome {
        VmOutcome::Failed(reason) => reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}
