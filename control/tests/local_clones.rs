//! Local cloning on the real /dev/kvm: ids, results, isolation, failures.

mod common;

use common::{failure, run, supervisor, supervisor_populating};
use snowflock_control::config::PopulateMode;
use snowflock_control::{CaptureKind, VmOutcome};

#[test]
fn eight_clones_return_distinct_ids_and_correct_results() {
    let (sup, lines) = supervisor(8);
    assert_eq!(
        run(&sup, "hello", "clones=8"),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    let reports = sup.reports();
    assert_eq!(reports.len(), 1);
    let op = &reports[0];
    assert_eq!((op.kind, op.clones), (CaptureKind::Clone, 8));
    assert!(op.descriptor_bytes > 0 && op.all_running.is_some());
    let mut ids: Vec<u32> = op.children.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>());
    for child in &op.children {
        let expected = u64::from(child.id * child.id).to_le_bytes().to_vec();
        assert_eq!(
            child.outcome,
            VmOutcome::Result(expected),
            "clone {}",
            child.id
        );
    }
    assert_eq!(sup.slots_in_use(), 0);
}

#[test]
fn clone_limit_grants_fewer_clones() {
    let (sup, lines) = supervisor(3);
    assert_eq!(
        run(&sup, "hello", "clones=8"),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    assert_eq!(sup.reports()[0].clones, 3);
}

#[test]
fn copy_on_write_isolates_parent_and_clones_both_ways() {
    let (sup, lines) = supervisor(4);
    assert_eq!(
        run(&sup, "cow", "clones=4 mib=16"),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    assert!(lines.of("").iter().any(|l| l.contains("cow: ok")));
    let op = &sup.reports()[0];
    assert_eq!(op.children.len(), 4);
    for child in &op.children {
        assert_eq!(
            child.outcome,
            VmOutcome::Result(vec![1]),
            "clone {}",
            child.id
        );
    }
}

#[test]
fn populated_clones_read_the_parents_state_and_keep_their_own_writes() {
    for mode in [PopulateMode::Read, PopulateMode::Write, PopulateMode::Copy] {
        let (sup, lines) = supervisor_populating(2, mode);
        // Each child overwrites the whole buffer as soon as it starts, while
        // its memory is being populated, then checks it sees only its own
        // pattern; pages it wrote before the populate reached them stay its.
        assert_eq!(
            run(&sup, "cow", "clones=2 mib=32"),
            VmOutcome::Exited(0),
            "{mode:?}: {:?}",
            lines.all()
        );
        for child in &sup.reports()[0].children {
            assert_eq!(
                child.outcome,
                VmOutcome::Result(vec![1]),
                "{mode:?}: clone {}",
                child.id
            );
        }
        // Each child reads pages all over the parent's buffer and checks every byte.
        assert_eq!(
            run(&sup, "touch", "mib=32 clones=2 pages=2048"),
            VmOutcome::Exited(0),
            "{mode:?}: {:?}",
            lines.all()
        );
    }
}

#[test]
fn clones_resume_at_a_checkpoint() {
    let (sup, lines) = supervisor(3);
    assert_eq!(
        run(&sup, "checkpoint", "clones=3"),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    let op = &sup.reports()[0];
    assert_eq!((op.kind, op.clones), (CaptureKind::Checkpoint, 3));
}

#[test]
fn join_reports_a_failed_clone_and_the_others_finish() {
    let (sup, lines) = supervisor(3);
    assert_eq!(
        run(&sup, "childfail", ""),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    let op = &sup.reports()[0];
    let two = op.children.iter().find(|c| c.id == 2).unwrap();
    assert!(failure(&two.outcome).contains("child two fails on purpose"));
    for c in op.children.iter().filter(|c| c.id != 2) {
        assert_eq!(c.outcome, VmOutcome::Result(b"fine".to_vec()));
    }
}

#[test]
fn kill_ends_running_clones() {
    let (sup, lines) = supervisor(4);
    assert_eq!(
        run(&sup, "killer", ""),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    let op = &sup.reports()[0];
    assert_eq!(op.children.len(), 4);
    assert!(op.children.iter().all(|c| c.outcome == VmOutcome::Killed));
    assert_eq!(sup.slots_in_use(), 0);
}

#[test]
fn a_bad_pointer_ends_only_the_clone_that_passed_it() {
    let (sup, lines) = supervisor(2);
    assert_eq!(
        run(&sup, "badptr", ""),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    let op = &sup.reports()[0];
    let bad = op.children.iter().find(|c| c.id == 1).unwrap();
    let reason = failure(&bad.outcome);
    assert!(reason.contains("bad hypercall at rip=0x"), "{reason}");
    assert!(reason.contains("console buffer pointer"), "{reason}");
    let good = op.children.iter().find(|c| c.id == 2).unwrap();
    assert_eq!(good.outcome, VmOutcome::Result(b"fine".to_vec()));
}

#[test]
fn a_bad_pointer_from_the_parent_ends_it_with_a_clear_error() {
    let (sup, _) = supervisor(2);
    let outcome = run(&sup, "badptr", "self=1");
    let reason = failure(&outcome);
    assert!(reason.contains("bad hypercall at rip=0x"), "{reason}");
    assert!(reason.contains("outside guest memory"), "{reason}");
}

#[test]
fn guest_exceptions_name_the_rip_and_the_reason() {
    let (sup, _) = supervisor(1);
    for (kind, expect) in [
        ("ud2", "invalid opcode (#UD) at rip=0x"),
        ("null", "(null pointer)"),
        ("gp", "general protection fault (#GP) at rip=0x"),
        ("stack", "(stack overflow)"),
    ] {
        let outcome = run(&sup, "fault", &format!("kind={kind}"));
        let reason = failure(&outcome);
        assert!(reason.contains(expect), "kind={kind}: {reason}");
    }
}

#[test]
fn guest_panics_carry_message_and_location() {
    let (sup, _) = supervisor(1);
    let outcome = run(&sup, "panic", "");
    let reason = failure(&outcome);
    assert!(reason.contains("deliberate panic 42"), "{reason}");
    assert!(reason.contains("panic.rs:"), "{reason}");
}

#[test]
fn example_jobs_check_their_answers() {
    let (sup, lines) = supervisor(4);
    for (name, args) in [
        ("seqsearch", "ref_mib=16 queries=4000 clones=4"),
        ("montecarlo", "paths=200000 clones=4"),
        ("primes_c", "clones=4"),
    ] {
        assert_eq!(
            run(&sup, name, args),
            VmOutcome::Exited(0),
            "{name}: {:?}",
            lines.all()
        );
    }
}

/// Index of the parent's first line that starts with `start`.
fn line_index(lines: &[String], start: &str) -> Option<usize> {
    lines.iter().position(|l| l.starts_with(start))
}

#[test]
fn scan_children_match_the_parents_check_pass() {
    for write_every in [8, 1] {
        let (sup, lines) = supervisor(2);
        let args = format!("state_mib=4 write_every={write_every} clones=2");
        assert_eq!(
            run(&sup, "scan", &args),
            VmOutcome::Exited(0),
            "{args}: {:?}",
            lines.all()
        );
        assert_eq!(sup.reports()[0].clones, 2);
        let parent = lines.of("");
        let last = parent.last().cloned().unwrap_or_default();
        assert!(
            last.starts_with("scan: state_mib=4 ")
                && last.contains(" granted=2 ")
                && last.ends_with(" check=ok"),
            "{args}: {last}"
        );
        let resident = line_index(&parent, "scan: resident_max_ms=");
        let cloned = line_index(&parent, "scan: clone_ms=");
        assert!(
            resident.is_some() && resident < cloned,
            "the resident pass precedes the clone point: {parent:?}"
        );
    }
}

#[test]
fn children_that_write_start_on_memory_of_their_own_when_the_ticket_says_so() {
    // The default populate mode is a view; the ticket's CHILDREN_WRITE flag
    // (scan asks for it with `own_memory=1`) gives local clones a copy.
    for (own_memory, write_every) in [(1, 8), (0, 8), (1, 0)] {
        let (sup, lines) = supervisor(2);
        let args =
            format!("state_mib=4 write_every={write_every} clones=2 own_memory={own_memory}");
        assert_eq!(
            run(&sup, "scan", &args),
            VmOutcome::Exited(0),
            "{args}: {:?}",
            lines.all()
        );
        let op = &sup.reports()[0];
        assert_eq!(op.children.len(), 2, "{args}");
        for child in &op.children {
            assert_eq!(
                child.own_memory,
                own_memory == 1,
                "{args}: clone {}",
                child.id
            );
        }
    }
    let (sup, lines) = supervisor_populating(2, PopulateMode::Copy);
    assert_eq!(
        run(
            &sup,
            "scan",
            "state_mib=4 write_every=0 clones=2 own_memory=0"
        ),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    assert!(sup.reports()[0].children.iter().all(|c| c.own_memory));
}

#[test]
fn seqsearch_times_its_resident_shards_before_the_clone_point() {
    let (sup, lines) = supervisor(2);
    let args = "ref_mib=4 queries=2000 clones=2 resident=1";
    assert_eq!(
        run(&sup, "seqsearch", args),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    let parent = lines.of("");
    let resident = line_index(&parent, "seqsearch: resident_max_ms=");
    let cloned = line_index(&parent, "seqsearch: clone_ms=");
    assert!(
        resident.is_some() && resident < cloned,
        "the resident pass precedes the clone point: {parent:?}"
    );
    assert!(
        parent
            .last()
            .is_some_and(|l| l.contains(" granted=2 ") && l.ends_with(" check=ok")),
        "{parent:?}"
    );
}

#[test]
fn killing_a_parent_ends_its_running_clones_and_frees_their_slots() {
    let (sup, _) = supervisor(4);
    // killer's parent clones four spinning children and waits ~100 ms before
    // it kills them itself; the operator's kill lands first.
    let vm = sup
        .launch(common::image("killer"), common::MEM, "")
        .expect("killer starts");
    std::thread::sleep(std::time::Duration::from_millis(20));
    vm.kill();
    assert_eq!(vm.wait(), VmOutcome::Killed);
    assert_eq!(sup.slots_in_use(), 0);
    for op in sup.reports() {
        assert!(op.children.iter().all(|c| c.outcome == VmOutcome::Killed));
    }
}

#[test]
fn sse_and_avx_work_in_guests_and_survive_a_clone() {
    let (sup, lines) = supervisor(1);
    let expected = if std::arch::is_x86_feature_detected!("avx") {
        VmOutcome::Exited(0)
    } else {
        VmOutcome::Exited(3)
    };
    assert_eq!(run(&sup, "simd", ""), expected, "{:?}", lines.all());
}

/// The value of `key=` in `line`.
fn value_of(line: &str, key: &str) -> u32 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[test]
fn a_hostile_guest_and_its_clones_end_only_themselves() {
    let (sup, lines) = supervisor(4);
    // A well-behaved job alongside: its tickets have the small ids the hostile guest tries.
    let hello = sup
        .launch(common::image("hello"), common::MEM, "clones=2")
        .unwrap();
    let hostile = sup
        .launch(
            common::image("hostile"),
            common::MEM,
            "rounds=4 calls=500 seed=2",
        )
        .unwrap();
    assert_eq!(hostile.wait(), VmOutcome::Exited(0), "{:?}", lines.all());
    assert_eq!(hello.wait(), VmOutcome::Exited(0), "{:?}", lines.all());
    let summary = lines
        .all()
        .into_iter()
        .map(|(_, line)| line)
        .find(|line| line.starts_with("hostile: rounds="))
        .expect("the hostile guest's summary");
    assert!(summary.ends_with(" ok"), "{summary}");
    // Every clone ended, by exit or by a call that had to end it, and some of each.
    let (children, exited, ended) = (
        value_of(&summary, "children"),
        value_of(&summary, "exited"),
        value_of(&summary, "ended"),
    );
    assert!(children >= 4 && exited + ended == children, "{summary}");
    assert!(exited > 0 && ended > 0, "{summary}");
    assert!(value_of(&summary, "errors") > 0, "{summary}");
    assert_eq!(sup.slots_in_use(), 0, "every slot came back");
    assert!(sup.vms().is_empty());
}
