//! `sf-bench plot` over the committed results and over broken input.

use std::fs;
use std::path::{Path, PathBuf};

use snowflock_perf::plot::plot_files;

fn committed_results() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

fn chart(dir: &Path, name: &str) -> String {
    let svg = fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{name} is not an SVG document"
    );
    svg
}

/// Whether the chart holds `text` as a text element of its own.
fn has_text(svg: &str, text: &str) -> bool {
    svg.contains(&format!(">\n{text}\n</text>"))
}

#[test]
fn every_committed_results_file_gets_its_charts() {
    let inputs = committed_results();
    assert!(inputs.len() >= 8, "results files: {inputs:?}");
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("plots");
    let outcome = plot_files(&inputs, &dir).unwrap();
    assert_eq!(outcome.skipped, Vec::<String>::new());
    for input in &inputs {
        let stem = input.file_stem().unwrap().to_str().unwrap();
        chart(&dir, &format!("{stem}.svg"));
    }
    let mut written: Vec<String> = outcome
        .written
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    written.sort();
    let mut expected: Vec<String> = inputs
        .iter()
        .map(|p| format!("{}.svg", p.file_stem().unwrap().to_str().unwrap()))
        .chain(["mcast-scale-job-time.svg".to_string()])
        .collect();
    expected.sort();
    assert_eq!(written, expected);

    let clone_local = chart(&dir, "clone-local.svg");
    for text in [
        "all N clones running",
        "N VMs cold-started (baseline)",
        "parent paused for the clone",
        "clones",
        "time (ms)",
        // The measured clone counts are the x axis' ticks.
        "1",
        "8",
        "32",
    ] {
        assert!(
            has_text(&clone_local, text),
            "clone-local.svg lacks {text:?}"
        );
    }
    let job = chart(&dir, "job.svg");
    for text in [
        "job",
        "warm job (same checkpoint again)",
        "resident (slowest share)",
        "local, scan",
        "remote, seqsearch",
        "clones",
        "time (ms)",
    ] {
        assert!(has_text(&job, text), "job.svg lacks {text:?}");
    }
    let job_warm = chart(&dir, "job-warm.svg");
    assert!(has_text(
        &job_warm,
        "populate: warm job (same checkpoint again)"
    ));
    let loss = chart(&dir, "job-loss.svg");
    assert!(has_text(&loss, "datagrams lost (%)"));
    let mcast = chart(&dir, "mcast-scale.svg");
    assert!(has_text(&mcast, "mcdist") && has_text(&mcast, "unicast"));
    assert!(has_text(&mcast, "sent (MiB)"));
    let rx = chart(&dir, "rx-path.svg");
    for text in [
        "kernel sockets",
        "AF_XDP",
        "delivery ceiling (no receive work)",
        "pages/s",
    ] {
        assert!(has_text(&rx, text), "rx-path.svg lacks {text:?}");
    }
    let fault = chart(&dir, "fault-remote.svg");
    for text in [
        "remote fault",
        "local handler",
        "percentile",
        "latency (µs)",
    ] {
        assert!(has_text(&fault, text), "fault-remote.svg lacks {text:?}");
    }
    let syscall = chart(&dir, "syscall.svg");
    assert!(has_text(&syscall, "guest (patched call)") && has_text(&syscall, "native"));
    assert!(has_text(&syscall, "getpid_unpatched"));
}

/// The charts `docs/benchmarks.md` shows are those of the committed results.
#[test]
fn committed_charts_are_up_to_date() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/plots");
    let out = tempfile::tempdir().unwrap();
    let outcome = plot_files(&committed_results(), out.path()).unwrap();
    let stale: Vec<String> = outcome
        .written
        .iter()
        .map(|drawn| drawn.file_name().unwrap())
        .filter(|name| {
            let fresh = fs::read(out.path().join(name)).unwrap();
            fs::read(committed.join(name)).ok() != Some(fresh)
        })
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    let mut extra: Vec<String> = fs::read_dir(&committed)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !out.path().join(name).exists())
        .collect();
    extra.sort();
    assert!(
        stale.is_empty() && extra.is_empty(),
        "perf/results/plots is stale (missing or different: {stale:?}; not drawn: {extra:?}): \
         run `sf-bench plot perf/results/*.jsonl -o perf/results/plots`"
    );
}

const LINE: &str = r#"{"bench":"clone-local","metric":"all_running_ms","value":5.3,"unit":"ms","params":{"clones":1}}"#;

#[test]
fn a_malformed_line_is_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("broken.jsonl");
    fs::write(&input, format!("{LINE}\n\n{{\"bench\":\"clone-local\",\n")).unwrap();
    let e = plot_files(std::slice::from_ref(&input), &dir.path().join("out")).unwrap_err();
    let message = format!("{e:#}");
    assert!(message.contains("broken.jsonl"), "{message}");
    assert!(message.contains("line 3"), "{message}");
}

#[test]
fn an_empty_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("empty.jsonl");
    fs::write(&input, "\n").unwrap();
    let e = plot_files(&[input], &dir.path().join("out")).unwrap_err();
    let message = format!("{e:#}");
    assert!(
        message.contains("empty.jsonl") && message.contains("no result lines"),
        "{message}"
    );
}

#[test]
fn an_unknown_bench_is_skipped_and_the_others_plotted() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mixed.jsonl");
    let unknown = r#"{"bench":"nonesuch","metric":"m","value":1,"unit":"ms","params":{}}"#;
    fs::write(&input, format!("{LINE}\n{unknown}\n")).unwrap();
    let out = dir.path().join("out");
    let outcome = plot_files(&[input], &out).unwrap();
    assert_eq!(outcome.written, [out.join("mixed-clone-local.svg")]);
    assert_eq!(outcome.skipped.len(), 1);
    assert!(
        outcome.skipped[0].contains("nonesuch"),
        "{:?}",
        outcome.skipped
    );
    assert!(has_text(
        &chart(&out, "mixed-clone-local.svg"),
        "all N clones running"
    ));
}
