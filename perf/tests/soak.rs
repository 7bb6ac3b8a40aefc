//! `sf-bench soak`, short: a few clone-and-join cycles on one host and
//! across two, against the `sfd` built next to `sf-bench`. Needs root and
//! /dev/kvm, like the other tests that run VMs.

use std::path::Path;
use std::process::Command;

use snowflock_perf::plot::parse;

const CYCLES: u32 = 20;

#[test]
fn a_short_soak_reports_flat_daemons() {
    let bench = env!("CARGO_BIN_EXE_sf-bench");
    let sfd = Path::new(bench).with_file_name("sfd");
    assert!(
        sfd.is_file(),
        "{} is missing: build the daemon first (cargo build -p snowflock-tools)",
        sfd.display()
    );
    let output = Command::new(bench)
        .args(["soak", "--cycles", &CYCLES.to_string()])
        .args(["--every", "5", "--warmup", "5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "sf-bench soak failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = parse(&stdout).unwrap();
    assert!(lines.iter().all(|l| l.bench == "soak"));
    for variant in ["local", "remote"] {
        let of = |metric: &str| {
            lines
                .iter()
                .filter(|l| l.metric == metric && l.text("variant").as_deref() == Some(variant))
                .collect::<Vec<_>>()
        };
        let verdict = of("pass");
        assert_eq!(verdict.len(), 1, "{variant}: {stdout}");
        assert_eq!(verdict[0].value, Some(1.0), "{variant}: {stdout}");
        assert_eq!(verdict[0].number("wrong_results"), Some(0.0));
        // Samples at cycles 0, 5, .. 20 of every daemon (two across hosts).
        let daemons = if variant == "local" { 1 } else { 2 };
        let rss = of("rss");
        assert_eq!(rss.len(), 5 * daemons, "{variant}: {stdout}");
        assert!(rss.iter().all(|l| l.value.is_some_and(|v| v > 1.0)));
        for metric in [
            "rss",
            "vm_pte",
            "fds",
            "threads",
            "slots_in_use",
            "vms_running",
        ] {
            let summaries = of(&format!("{metric}_slope"));
            assert_eq!(summaries.len(), daemons, "{variant} {metric}: {stdout}");
            for s in summaries {
                assert_eq!(s.params.get("pass"), Some(&true.into()), "{s:?}");
            }
        }
        assert_eq!(of("slab_slope").len(), 1);
        assert!(of("wall_s")[0].value.is_some_and(|v| v > 0.0));
    }
}
