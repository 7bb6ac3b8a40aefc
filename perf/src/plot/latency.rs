//! Latency distributions: the percentiles a scenario reports, as lines.

use anyhow::Result;

use super::Chart;
use super::figure::{Figure, Mark, Panel, Shape, Stroke, XAxis};
use super::select::{ResultLine, spread};

/// A metric `{what}_p{N}` as (`what`, N).
fn percentile(metric: &str) -> Option<(&str, f64)> {
    let (what, p) = metric.rsplit_once("_p")?;
    Some((what, p.parse().ok()?))
}

/// `fault-remote`: fault latencies seen by the guest and the handler's
/// service times, remote and local, at each reported percentile. Where
/// (`remote`, `local`) picks the colour, what (`fault`, `handler`) the stroke.
pub fn fault_remote(stem: &str, lines: &[ResultLine]) -> Result<Vec<Chart>> {
    // (metric, what, percentile) of each percentile metric, in order of appearance.
    let mut metrics: Vec<(&str, &str, f64)> = Vec::new();
    for line in lines {
        if let Some((what, at)) = percentile(&line.metric)
            && !metrics.iter().any(|m| m.0 == line.metric)
        {
            metrics.push((&line.metric, what, at));
        }
    }
    let (mut series, mut places, mut kinds) = (Vec::new(), Vec::new(), Vec::new());
    for &(_, what, _) in &metrics {
        index_of(&mut series, what);
    }
    let mut marks = Vec::new();
    for what in series {
        let (place, kind) = what.split_once('_').unwrap_or((what, ""));
        let mut points = Vec::new();
        for &(metric, _, at) in metrics.iter().filter(|m| m.1 == what) {
            if let Some(s) = spread(lines, metric, "us", &|_| true)? {
                points.push((at, s));
            }
        }
        marks.push(Mark {
            name: what.replace('_', " "),
            color: index_of(&mut places, place),
            stroke: Stroke::ALL[index_of(&mut kinds, kind) % Stroke::ALL.len()],
            shape: Shape::Line(points),
        });
    }
    if marks.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![Chart {
        suffix: None,
        figure: Figure {
            title: format!("{stem}: fault latency percentiles"),
            panels: vec![Panel {
                title: String::new(),
                x: XAxis::Numbers {
                    label: "percentile".into(),
                    log: false,
                },
                y_label: "latency (µs)".into(),
                marks,
            }],
        },
    }])
}

/// The position of `item` in `items`, appended if new.
fn index_of<'a>(items: &mut Vec<&'a str>, item: &'a str) -> usize {
    match items.iter().position(|&i| i == item) {
        Some(i) => i,
        None => {
            items.push(item);
            items.len() - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentile_metrics() {
        assert_eq!(percentile("remote_fault_p99"), Some(("remote_fault", 99.0)));
        assert_eq!(
            percentile("local_handler_p50"),
            Some(("local_handler", 50.0))
        );
        assert_eq!(percentile("remote_to_local_p50_ratio"), None);
    }
}
