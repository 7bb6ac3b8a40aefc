//! Charts against the clone count: clone times, bytes on the wire, job times.

use anyhow::Result;

use super::Chart;
use super::figure::{Mark, Panel, Shape, Spread, Stroke, XAxis};
use super::select::{ResultLine, by_x, distinct};

fn clones_axis() -> XAxis {
    XAxis::Numbers {
        label: "clones".into(),
        log: true,
    }
}

/// A line through `points`, or `None` if there are none.
fn line(name: String, color: usize, stroke: Stroke, points: Vec<(f64, Spread)>) -> Option<Mark> {
    (!points.is_empty()).then_some(Mark {
        name,
        color,
        stroke,
        shape: Shape::Line(points),
    })
}

/// The chart of one panel, or nothing if the panel is empty.
fn one_panel(suffix: Option<&'static str>, title: String, panel: Panel) -> Vec<Chart> {
    if panel.marks.is_empty() {
        return Vec::new();
    }
    Chart::of(suffix, title, vec![panel])
}

/// `clone-local`: time to N running clones against N cold-started VMs.
pub fn clone_local(stem: &str, lines: &[ResultLine]) -> Result<Vec<Chart>> {
    let series = [
        ("all_running_ms", "all N clones running", Stroke::Solid),
        (
            "cold_start_ms",
            "N VMs cold-started (baseline)",
            Stroke::Solid,
        ),
        (
            "capture_pause_us",
            "parent paused for the clone",
            Stroke::Dashed,
        ),
        ("restore_us", "restore of one child", Stroke::Dotted),
    ];
    times_against_clones(stem, "clone time", lines, &series)
}

/// `clone-remote`: clones over hosts, to all running and to the job's end.
pub fn clone_remote(stem: &str, lines: &[ResultLine]) -> Result<Vec<Chart>> {
    let series = [
        ("all_running", "all N clones running", Stroke::Solid),
        ("job_time_remote", "job on remote clones", Stroke::Solid),
        (
            "job_time_state_resident",
            "job with the state resident",
            Stroke::Dashed,
        ),
    ];
    times_against_clones(stem, "clone and job time", lines, &series)
}

/// One panel of `series` (metric, legend, stroke), in ms, against the clone count.
fn times_against_clones(
    stem: &str,
    what: &str,
    lines: &[ResultLine],
    series: &[(&str, &str, Stroke)],
) -> Result<Vec<Chart>> {
    let mut marks = Vec::new();
    for (color, &(metric, name, stroke)) in series.iter().enumerate() {
        let points = by_x(lines, metric, "clones", "ms", &|_| true)?;
        marks.extend(line(name.into(), color, stroke, points));
    }
    let panel = Panel {
        title: String::new(),
        x: clones_axis(),
        y_label: "time (ms)".into(),
        marks,
    };
    Ok(one_panel(
        None,
        format!("{stem}: {what} against clone count"),
        panel,
    ))
}

/// `mcast-scale`: bytes the parent's host sends, and job time, per distribution.
pub fn mcast_scale(stem: &str, lines: &[ResultLine]) -> Result<Vec<Chart>> {
    let mut charts = Vec::new();
    for (suffix, metric, unit, title, y_label) in [
        (
            None,
            "parent_bytes_sent",
            "MiB",
            "bytes sent by the parent's host",
            "sent (MiB)",
        ),
        (Some("job-time"), "job_time", "ms", "job time", "time (ms)"),
    ] {
        let mut marks = Vec::new();
        for (color, distribution) in distinct(lines, metric, "distribution")
            .into_iter()
            .enumerate()
        {
            let keep = |l: &ResultLine| l.text("distribution") == distribution;
            let points = by_x(lines, metric, "clones", unit, &keep)?;
            let name = distribution.unwrap_or_else(|| metric.into());
            marks.extend(line(name, color, Stroke::Solid, points));
        }
        let panel = Panel {
            title: String::new(),
            x: clones_axis(),
            y_label: y_label.into(),
            marks,
        };
        let title = format!("{stem}: {title}, by distribution");
        charts.extend(one_panel(suffix, title, panel));
    }
    Ok(charts)
}

/// `job` (and its variants): cold and warm job time and the resident time
/// against the clone count, or against the loss where the clone count is
/// fixed; a panel per mode and job, a colour per variant (per metric where
/// there is one variant).
pub fn job(stem: &str, lines: &[ResultLine]) -> Result<Vec<Chart>> {
    let against_loss = distinct(lines, "job_ms", "clones").len() == 1
        && distinct(lines, "job_ms", "loss").len() > 1;
    let (x, x_axis, against) = if against_loss {
        let axis = XAxis::Numbers {
            label: "datagrams lost (%)".into(),
            log: false,
        };
        ("loss", axis, "loss")
    } else {
        ("clones", clones_axis(), "clone count")
    };
    let variants = distinct(lines, "job_ms", "variant");
    let series = [
        ("job_ms", "job", Stroke::Solid),
        (
            "warm_ms",
            "warm job (same checkpoint again)",
            Stroke::Dotted,
        ),
        ("resident_ms", "resident (slowest share)", Stroke::Dashed),
    ];
    // A loss that is not the x axis splits the panels: a median over loss
    // levels would be no one's job time.
    let losses = if against_loss {
        vec![None]
    } else {
        distinct(lines, "job_ms", "loss")
    };
    let mut panels = Vec::new();
    for mode in distinct(lines, "job_ms", "mode") {
        for job in distinct(lines, "job_ms", "job") {
            for loss in &losses {
                let keep = |l: &ResultLine| {
                    l.text("mode") == mode
                        && l.text("job") == job
                        && (against_loss || l.text("loss") == *loss)
                };
                let mut marks = Vec::new();
                for (v, variant) in variants.iter().enumerate() {
                    for (m, (metric, what, stroke)) in series.into_iter().enumerate() {
                        let of_variant = |l: &ResultLine| keep(l) && l.text("variant") == *variant;
                        // A colour per variant where there are several, else per metric.
                        let (name, color) = match variant {
                            Some(variant) if variants.len() > 1 => {
                                (format!("{variant}: {what}"), v)
                            }
                            _ => (what.to_string(), m),
                        };
                        let points = by_x(lines, metric, x, "ms", &of_variant)?;
                        marks.extend(line(name, color, stroke, points));
                    }
                }
                if marks.is_empty() {
                    continue;
                }
                let title = [
                    mode.clone(),
                    job.clone(),
                    loss.as_ref().map(|l| format!("{l}% loss")),
                ];
                panels.push(Panel {
                    title: title.into_iter().flatten().collect::<Vec<_>>().join(", "),
                    x: x_axis.clone(),
                    y_label: "time (ms)".into(),
                    marks,
                });
            }
        }
    }
    Ok(Chart::of(
        None,
        format!("{stem}: job time against {against}"),
        panels,
    ))
}
