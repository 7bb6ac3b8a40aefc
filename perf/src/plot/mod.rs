//! `sf-bench plot`: SVG charts of benchmark results.
//!
//! Each results file's lines are grouped by bench, and each bench the
//! plotter knows becomes one or more figures, named after the file:
//! `job.jsonl` gives `job.svg`, and a second chart of a file gets a suffix
//! (`mcast-scale-job-time.svg`). A bench without a chart is reported and
//! skipped, so that new scenarios do not break the plots of the others.

mod bars;
mod clones;
mod figure;
mod latency;
mod select;
mod soak;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use figure::{Figure, Panel};
pub use select::ResultLine;

/// What [`plot_files`] did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The charts written.
    pub written: Vec<PathBuf>,
    /// Why some benches have no chart, one message each.
    pub skipped: Vec<String>,
}

/// A figure and the suffix of its file name (none for a bench's main chart).
#[derive(Debug)]
struct Chart {
    suffix: Option<&'static str>,
    figure: Figure,
}

impl Chart {
    /// The chart of `panels` titled `title`; none if there are no panels.
    fn of(suffix: Option<&'static str>, title: String, panels: Vec<Panel>) -> Vec<Chart> {
        if panels.is_empty() {
            return Vec::new();
        }
        vec![Chart {
            suffix,
            figure: Figure { title, panels },
        }]
    }
}

/// The result lines of a results file's `text` (blank lines skipped).
pub fn parse(text: &str) -> Result<Vec<ResultLine>> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let mut line: ResultLine = serde_json::from_str(raw)
            .with_context(|| format!("line {}: not a result line", i + 1))?;
        line.line = i + 1;
        lines.push(line);
    }
    if lines.is_empty() {
        bail!("no result lines");
    }
    Ok(lines)
}

/// Writes the charts of the results files `inputs` into `out_dir`, which is
/// created if missing.
pub fn plot_files(inputs: &[PathBuf], out_dir: &Path) -> Result<Outcome> {
    if inputs.is_empty() {
        bail!("no results files to plot");
    }
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut outcome = Outcome::default();
    let mut names: HashSet<String> = HashSet::new();
    for path in inputs {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let lines = parse(&text).with_context(|| path.display().to_string())?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .with_context(|| format!("{}: not a file name", path.display()))?;
        let mut benches: Vec<&str> = Vec::new();
        for line in &lines {
            if !benches.contains(&line.bench.as_str()) {
                benches.push(&line.bench);
            }
        }
        for &bench in &benches {
            let of_bench: Vec<ResultLine> =
                lines.iter().filter(|l| l.bench == bench).cloned().collect();
            let Some(charts) = charts(bench, stem, &of_bench) else {
                outcome.skipped.push(format!(
                    "{}: no chart for bench `{bench}`, skipped",
                    path.display()
                ));
                continue;
            };
            let charts = charts.with_context(|| format!("{}: bench `{bench}`", path.display()))?;
            if charts.is_empty() {
                outcome.skipped.push(format!(
                    "{}: nothing to plot of bench `{bench}`",
                    path.display()
                ));
            }
            for chart in charts {
                let mut name = stem.to_string();
                if benches.len() > 1 {
                    name = format!("{name}-{bench}");
                }
                if let Some(suffix) = chart.suffix {
                    name = format!("{name}-{suffix}");
                }
                name.push_str(".svg");
                if !names.insert(name.clone()) {
                    bail!(
                        "two charts would be written to {name}: give the results files distinct names"
                    );
                }
                let svg = chart
                    .figure
                    .to_svg()
                    .with_context(|| format!("{}: bench `{bench}`", path.display()))?;
                let out = out_dir.join(&name);
                fs::write(&out, svg).with_context(|| format!("writing {}", out.display()))?;
                outcome.written.push(out);
            }
        }
    }
    Ok(outcome)
}

/// The charts of the lines of `bench`; `None` for a bench without a chart.
fn charts(bench: &str, stem: &str, lines: &[ResultLine]) -> Option<Result<Vec<Chart>>> {
    Some(match bench {
        crate::clone_local::BENCH => clones::clone_local(stem, lines),
        "clone-remote" => clones::clone_remote(stem, lines),
        "mcast-scale" => clones::mcast_scale(stem, lines),
        crate::job::BENCH => clones::job(stem, lines),
        "fault-remote" => latency::fault_remote(stem, lines),
        "rx-path" => bars::rx_path(stem, lines),
        "syscall" => bars::syscall(stem, lines),
        "avoidance" => bars::avoidance(stem, lines),
        crate::soak::BENCH => soak::soak(stem, lines),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_numbers_them() {
        let text = "\n{\"bench\":\"b\",\"metric\":\"m\",\"value\":1.5,\"unit\":\"ms\",\"params\":{}}\n\
                    {\"bench\":\"b\",\"metric\":\"n\",\"value\":null,\"unit\":\"ms\",\"params\":{}}\n";
        let lines = parse(text).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].line, lines[0].value), (2, Some(1.5)));
        assert_eq!((lines[1].line, lines[1].value), (3, None));
    }

    #[test]
    fn a_bad_line_is_named() {
        let text = "{\"bench\":\"b\",\"metric\":\"m\",\"value\":1,\"unit\":\"ms\",\"params\":{}}\nnot json\n";
        let e = parse(text).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e:#}");
        let e = parse("{\"bench\":\"b\"}\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e:#}");
        assert!(parse("\n\n").is_err());
    }
}
