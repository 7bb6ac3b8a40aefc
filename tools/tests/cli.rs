//! `sf` end to end, as users run it (real /dev/kvm).

mod common;

use std::process::{Command, Output};

fn sf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sf"))
        .args(args)
        .output()
        .expect("sf runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_prints_the_console_and_exits_with_the_guest_code() {
    let out = sf(&["run", "hello", "--", "clones=3"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("hello from snowflock"), "{stdout}");
    assert!(
        stdout.contains("[clone 2]") || stdout.contains("child 2"),
        "{stdout}"
    );
}

#[test]
fn a_failing_guest_makes_sf_fail() {
    let out = sf(&["run", "fault", "--", "kind=ud2"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid opcode"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_malformed_image_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.elf");
    std::fs::write(&path, b"\x7fELF but not really").unwrap();
    let out = sf(&["run", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("sf: error:") && stderr.contains("ELF"),
        "{stderr}"
    );
}

#[test]
fn demo_prints_a_table_and_passes_its_check() {
    let dir = tempfile::tempdir().unwrap();
    let out = sf(&[
        "demo",
        "--clones",
        "2",
        "--ref-mib",
        "16",
        "--queries",
        "2000",
        "--mem",
        "256M",
        "--descriptor-dir",
        dir.path().to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("result check: PASS"), "{stdout}");
    assert!(stdout.contains("parent paused"), "{stdout}");

    let saved: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(saved.len(), 1, "one clone point, one descriptor");
    let file = saved[0].path();
    let readable = sf(&["descriptor", "inspect", file.to_str().unwrap()]);
    let readable_text = text(&readable.stdout);
    assert!(readable.status.success(), "{}", text(&readable.stderr));
    assert!(
        readable_text.contains("rip=0x") && readable_text.contains("256 MiB"),
        "{readable_text}"
    );

    let json = sf(&["descriptor", "inspect", "--json", file.to_str().unwrap()]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("valid JSON");
    assert_eq!(value["memory"]["bytes"], 256u64 << 20);
    assert_eq!(value["kind"], "Clone");
    assert_eq!(value["vcpu"]["cpl"], 3);
}

#[test]
fn inspecting_a_corrupt_descriptor_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.sfdesc");
    std::fs::write(&path, b"SFLOCKD\0\x01\x00\x00\x00garbage-garbage").unwrap();
    let out = sf(&["descriptor", "inspect", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("descriptor"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_json_reports_clone_operations() {
    let out = sf(&["run", "hello", "--json", "--", "clones=2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(value["check_passed"], true);
    assert_eq!(value["clone_operations"][0]["clones"], 2);
    assert_eq!(
        value["clone_operations"][0]["children"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn run_takes_a_static_linux_program_with_a_mount_and_an_output_directory() {
    let input = tempfile::tempdir().unwrap();
    let text_in: String = (1..=1000u64).map(|i| format!("{i}\n")).collect();
    std::fs::write(input.path().join("numbers.txt"), text_in).unwrap();
    let out = tempfile::tempdir().unwrap();
    let results = out.path().join("results");
    let mount = format!("{}:/data", input.path().display());
    let run = sf(&[
        "run",
        "partsum",
        "--clone-limit",
        "2",
        "--mount",
        &mount,
        "--out",
        results.to_str().unwrap(),
        "--",
        "/data/numbers.txt",
        "2",
    ]);
    let stdout = text(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", text(&run.stderr));
    assert!(
        stdout.contains("clones=2 total=500500 match=1 inherited=1 kept=1"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(results.join("total")).unwrap(),
        "500500\n"
    );
}

#[test]
fn a_dynamically_linked_program_is_refused_naming_the_fix() {
    let out = sf(&["run", "/bin/true"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("link it with -static"), "{stderr}");
}

#[test]
fn the_json_report_lists_the_system_calls_snowflock_does_not_implement() {
    let (_dir, program) = common::pipe_program();
    let out = sf(&["run", "--json", program.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["unimplemented_syscalls"],
        serde_json::json!([{"vm": "", "calls": ["pipe2 (293) x1"]}]),
        "{report:#}"
    );
}

#[test]
fn an_error_on_a_stderr_that_cannot_be_written_is_an_exit_code_not_a_panic() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sf"))
        .args(["kill", "1", "--socket", "/nonexistent/sfd.sock"])
        .stderr(full)
        .output()
        .unwrap();
    // 101 is Rust's exit code for a panic.
    assert_eq!(out.status.code(), Some(1));
}
