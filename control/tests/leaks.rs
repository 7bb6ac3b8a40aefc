//! Clones, kills and failures leave nothing behind: no fds, mappings, threads
//! or slots. Alone in its own test binary so no other test shares the process.

mod common;

use std::time::{Duration, Instant};

use common::{run, supervisor_populating};
use snowflock_control::VmOutcome;
use snowflock_control::config::PopulateMode;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// Mappings of guest memory and of KVM objects (vCPU run pages). Other
/// mappings (malloc arenas, glibc's cache of thread stacks) are the C
/// library's to keep.
fn vm_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:") || l.contains("kvm"))
        .count()
}

fn snapshot() -> (usize, usize, usize) {
    (
        count("/proc/self/fd"),
        vm_mappings(),
        count("/proc/self/task"),
    )
}

/// Waits (bounded) until the supervisor's pool of prepared VMs is full again:
/// it is refilled in the background after each clone point.
fn settle(sup: &snowflock_control::Supervisor, warm: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sup.warm_vms() != warm && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sup.warm_vms(), warm, "the prepared-VM pool refills");
}

/// One test, not one per mode: the probe counts the whole process's fds,
/// mappings and threads, which a test running alongside would change.
#[test]
fn clone_kill_and_failure_release_every_resource() {
    // Write populates take longest, so clones end while theirs still run;
    // copies give each clone memory of its own.
    for mode in [PopulateMode::Write, PopulateMode::Copy] {
        release_every_resource(mode);
    }
}

fn release_every_resource(mode: PopulateMode) {
    const LIMIT: u32 = 8;
    let (sup, lines) = supervisor_populating(LIMIT, mode);
    // Warm-up: one-time process state (signal handler, KVM probing, allocator
    // arenas, worker threads, the pool of prepared VMs).
    assert_eq!(run(&sup, "hello", "clones=2"), VmOutcome::Exited(0));
    settle(&sup, LIMIT as usize);
    let before = snapshot();
    // Only the prepared VMs' vCPUs are mapped between runs, one kvm_run each.
    assert_eq!(before.1, LIMIT as usize);
    for (name, args) in [
        ("hello", "clones=8"),
        ("killer", ""),
        ("childfail", ""),
        ("badptr", ""),
        ("hostile", "rounds=2 calls=300 seed=3"),
        ("cow", "clones=4 mib=8"),
        ("touch", "mib=64 clones=2"),
    ] {
        assert_eq!(
            run(&sup, name, args),
            VmOutcome::Exited(0),
            "{name}: {:?}",
            lines.all()
        );
    }
    // The probe sees a running VM's memory and vCPU, so a leak would show.
    let running = sup
        .launch(common::image("spin"), common::MEM, "")
        .expect("spin starts");
    assert!(
        vm_mappings() >= before.1 + 2,
        "guest memory and kvm_run are mapped while a VM runs"
    );
    running.kill();
    assert_eq!(running.wait(), VmOutcome::Killed);
    assert_eq!(sup.slots_in_use(), 0);
    settle(&sup, LIMIT as usize);
    // Thread exit is asynchronous to join's return; allow it a bounded moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = snapshot();
    while after != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        after = snapshot();
    }
    assert_eq!(after, before, "(fds, VM mappings, threads) before vs after");
}
