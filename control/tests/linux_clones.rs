//! Linux-ABI programs clone like flock images: ordinary static C programs
//! (`clonesum`, `partsum`: glibc, malloc, qsort, stdio, files) call the
//! clone API from snowflock.h, and their clones inherit the process (the
//! personality's state, the break, the heap, the FS base for TLS, the
//! in-VM files) copy-on-write, read the same host mounts, and write their
//! own `/out` directories.

mod common;

use common::{run, supervisor};
use snowflock_control::{CaptureKind, StartOptions, VmOutcome, error_chain};
use snowflock_vmm::files::{FilesConfig, MountSpec};

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

/// A host directory with numbers 1..=n, one per line.
fn numbers(n: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (1..=n).map(|i| format!("{i}\n")).collect();
    std::fs::write(dir.path().join("numbers.txt"), text).unwrap();
    dir
}

fn mount(host: &std::path::Path, guest: &str) -> MountSpec {
    MountSpec {
        host: host.to_path_buf(),
        guest: guest.into(),
        identity: None,
    }
}

#[test]
fn clones_read_a_mount_keep_their_files_apart_and_write_their_own_out_directories() {
    let (sup, lines) = supervisor(3);
    let input = numbers(90_000);
    let out = tempfile::tempdir().unwrap();
    let files = FilesConfig {
        mounts: vec![mount(input.path(), "/data")],
        stdin: None,
        out: Some(out.path().to_path_buf()),
    };
    let outcome = sup
        .launch_linux(
            common::image("partsum"),
            common::MEM,
            "partsum /data/numbers.txt 3",
            StartOptions {
                files,
                strace: false,
                trap_syscalls: false,
                slurm_job: None,
            },
        )
        .expect("partsum starts")
        .wait();
    assert_eq!(outcome, VmOutcome::Exited(0), "{:?}", lines.all());
    assert!(
        lines
            .of("")
            .contains(&"clones=3 total=4050045000 match=1 inherited=1 kept=1".to_string()),
        "{:?}",
        lines.all()
    );
    let read = |rel: &str| std::fs::read_to_string(out.path().join(rel)).unwrap();
    assert_eq!(read("total"), "4050045000\n");
    // One directory per clone, clone-<generation>-<id>, holding its part.
    let mut clones: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("clone-"))
        .collect();
    clones.sort();
    assert_eq!(clones.len(), 3, "{clones:?}");
    let mut parts = 0;
    for (i, name) in clones.iter().enumerate() {
        let id = i + 1;
        assert!(name.ends_with(&format!("-{id}")), "{clones:?}");
        parts += read(&format!("{name}/part-{id}"))
            .trim()
            .parse::<u64>()
            .unwrap();
    }
    assert_eq!(parts, 4_050_045_000);
    // The parent's /out holds only its own file.
    let top: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with("clone-"))
        .collect();
    assert_eq!(top, ["total"]);
}

const SPIN: &str = r#"
#include <stdio.h>
int main(void) {
    FILE *f = fopen("/data/numbers.txt", "r");
    volatile unsigned long n = f != NULL;
    for (;;) n++;
}
"#;

#[test]
fn a_clone_whose_host_mount_is_not_the_parents_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("spin.c");
    let exe = dir.path().join("spin");
    std::fs::write(&c, SPIN).unwrap();
    let gcc = std::process::Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(&exe)
        .arg(&c)
        .status()
        .unwrap();
    assert!(gcc.success());
    let input = numbers(10);
    let (sup, _) = supervisor(1);
    let files = FilesConfig {
        mounts: vec![mount(input.path(), "/data")],
        ..FilesConfig::default()
    };
    let vm = sup
        .launch_linux(
            &std::fs::read(&exe).unwrap(),
            common::MEM,
            "spin",
            StartOptions {
                files,
                strace: false,
                trap_syscalls: false,
                slurm_job: None,
            },
        )
        .expect("spin starts");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (descriptor, image) = vm.capture().expect("capture");
    let recorded = &descriptor.machine.files.mounts[0];
    assert!(recorded.identity.is_some(), "{recorded:?}");
    let summary = descriptor.summary(0);
    assert_eq!(summary.guest, "Linux-ABI program");
    assert_eq!(
        summary.mounts,
        [format!("{} at /data", input.path().display())]
    );
    // The directory changes (a new entry moves its modification time).
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(input.path().join("new.txt"), "x").unwrap();
    let refused = sup.resume(&descriptor, &image).unwrap_err();
    let text = error_chain(&refused);
    assert!(
        text.contains("not the directory the parent VM mounted"),
        "{text}"
    );
    vm.kill();
}

#[test]
fn a_fortran_program_clones_through_the_c_header() {
    let (sup, lines) = supervisor(2);
    assert_eq!(
        run(&sup, "pisum_f", "pisum_f 2000000 2"),
        VmOutcome::Exited(0),
        "{:?}",
        lines.all()
    );
    assert_eq!(lines.of(""), ["clones=2 pi= 3.141592176 match=T"]);
    assert_eq!(sup.reports()[0].clones, 2);
}

#[test]
fn a_rust_std_program_clones_through_the_sdk_and_its_clones_write_their_output() {
    let (sup, lines) = supervisor(2);
    let out = tempfile::tempdir().unwrap();
    let options = StartOptions {
        files: FilesConfig {
            out: Some(out.path().to_path_buf()),
            ..FilesConfig::default()
        },
        strace: false,
        trap_syscalls: false,
        slurm_job: None,
    };
    let outcome = sup
        .launch_linux(
            common::image("clonestd"),
            common::MEM,
            "clonestd - 2",
            options,
        )
        .expect("clonestd starts")
        .wait();
    assert_eq!(outcome, VmOutcome::Exited(0), "{:?}", lines.all());
    assert!(
        lines
            .of("")
            .contains(&"clonestd: clones=2 words=220000 distinct=105 match=true".to_string()),
        "{:?}",
        lines.all()
    );
    let mut written = Vec::new();
    for entry in std::fs::read_dir(out.path()).unwrap() {
        let dir = entry.unwrap().path();
        for file in std::fs::read_dir(&dir).unwrap() {
            let file = file.unwrap().path();
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.lines().all(|l| l.split(' ').count() == 2), "{text}");
            written.push(file.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    written.sort();
    assert_eq!(written, ["counts-1.txt", "counts-2.txt"]);
}
