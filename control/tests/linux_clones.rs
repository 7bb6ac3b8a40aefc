//! Linux-ABI programs clone like flock images: an ordinary static C program
//! (`clonesum`: glibc, malloc, qsort, stdio) calls the clone API from
//! snowflock.h, and its clones inherit the process (the personality's state,
//! the break, the program's heap, the FS base for TLS) copy-on-write.

mod common;

use common::{run, supervisor};
use snowflock_control::{CaptureKind, VmOutcome};

#[test]
fn a_static_c_program_clones_itself_and_merges_its_clones_results() {
    let (sup, lines) = supervisor(4);
    assert_eq!(
        run(&sup, "clonesum", "clonesum 200000 4"),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    let root = lines.of("");
    assert!(
        root.iter()
            .any(|l| l.starts_with("clones=4 sum=") && l.ends_with(" match=1")),
        "{root:?}"
    );
    // Output buffered before the clone point is printed once, by the parent.
    let all = lines.all();
    let built = all
        .iter()
        .filter(|(_, l)| l.contains("values built"))
        .count();
    assert_eq!(built, 1, "{all:?}");
    let op = &sup.reports()[0];
    assert_eq!((op.kind, op.clones), (CaptureKind::Clone, 4));
    for child in &op.children {
        assert!(
            matches!(child.outcome, VmOutcome::Result(ref r) if r.len() == 16),
            "clone {}: {:?}",
            child.id,
            child.outcome
        );
        let own = lines.of(&format!("clone {}", child.id));
        assert_eq!(own, [format!("clone {} sorted 50000 values", child.id)]);
    }
    assert_eq!(sup.slots_in_use(), 0);
}
