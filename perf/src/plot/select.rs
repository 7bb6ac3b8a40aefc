//! Picking values out of a bench's result lines: medians of lines that
//! repeat the same params (runs appended to one file), ranges, units.

use anyhow::{Result, bail};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::figure::Spread;
use crate::stats::Summary;

/// One line of a results file: the benchmark output contract.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResultLine {
    pub bench: String,
    pub metric: String,
    /// `None` for a value that was not finite (written as `null`).
    pub value: Option<f64>,
    pub unit: String,
    #[serde(default)]
    pub params: Map<String, Value>,
    /// The line's number in its file, from 1.
    #[serde(skip)]
    pub line: usize,
}

impl ResultLine {
    /// A param as text: strings as they are, numbers written out.
    pub fn text(&self, key: &str) -> Option<String> {
        match self.params.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    pub fn number(&self, key: &str) -> Option<f64> {
        self.params.get(key)?.as_f64()
    }
}

/// Which lines a value is taken from.
pub type Keep<'a> = &'a dyn Fn(&ResultLine) -> bool;

/// Units converted into one another: (name, quantity, size in the quantity's base unit).
const UNITS: [(&str, &str, f64); 8] = [
    ("ns", "time", 1e-9),
    ("us", "time", 1e-6),
    ("ms", "time", 1e-3),
    ("s", "time", 1.0),
    ("bytes", "size", 1.0),
    ("KiB", "size", 1024.0),
    ("MiB", "size", 1_048_576.0),
    ("GiB", "size", 1_073_741_824.0),
];

/// What a value in unit `from` is multiplied by to be in unit `to`.
fn factor(from: &str, to: &str) -> Option<f64> {
    if from == to {
        return Some(1.0);
    }
    let find = |name: &str| UNITS.iter().find(|u| u.0 == name);
    let (from, to) = (find(from)?, find(to)?);
    (from.1 == to.1).then(|| from.2 / to.2)
}

/// The values of param `key` on the lines of `metric`, in order of first
/// appearance (`None` for lines without it).
pub fn distinct(lines: &[ResultLine], metric: &str, key: &str) -> Vec<Option<String>> {
    let mut seen: Vec<Option<String>> = Vec::new();
    for text in lines
        .iter()
        .filter(|l| l.metric == metric)
        .map(|l| l.text(key))
    {
        if !seen.contains(&text) {
            seen.push(text);
        }
    }
    seen
}

/// The median of `metric` over the lines that `keep`, in `unit`, and the
/// range of all their runs; `None` if there is no such line.
pub fn spread(
    lines: &[ResultLine],
    metric: &str,
    unit: &str,
    keep: Keep,
) -> Result<Option<Spread>> {
    let (mut medians, mut lows, mut highs) = (Vec::new(), Vec::new(), Vec::new());
    // Some scenarios report a range as metrics of their own (`all_running_ms_min`).
    let (low_metric, high_metric) = (format!("{metric}_min"), format!("{metric}_max"));
    for line in lines.iter().filter(|l| keep(l)) {
        let Some(value) = line.value else { continue };
        let in_unit = |v: f64| match factor(&line.unit, unit) {
            Some(f) => Ok(v * f),
            None => bail!(
                "line {}: `{}` is in {}, which does not convert to {unit}",
                line.line,
                line.metric,
                line.unit
            ),
        };
        if line.metric == metric {
            medians.push(in_unit(value)?);
            lows.push(in_unit(line.number("min").unwrap_or(value))?);
            highs.push(in_unit(line.number("max").unwrap_or(value))?);
        } else if line.metric == low_metric {
            lows.push(in_unit(value)?);
        } else if line.metric == high_metric {
            highs.push(in_unit(value)?);
        }
    }
    let Some(summary) = Summary::of(&medians) else {
        return Ok(None);
    };
    let median = summary.median;
    Ok(Some(Spread {
        median,
        min: lows.into_iter().fold(median, f64::min),
        max: highs.into_iter().fold(median, f64::max),
    }))
}

/// `spread` for each value of the numeric param `x`, in x order.
pub fn by_x(
    lines: &[ResultLine],
    metric: &str,
    x: &str,
    unit: &str,
    keep: Keep,
) -> Result<Vec<(f64, Spread)>> {
    let mut xs: Vec<f64> = lines
        .iter()
        .filter(|l| l.metric == metric && keep(l))
        .filter_map(|l| l.number(x))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut points = Vec::new();
    for at in xs {
        let here = |l: &ResultLine| keep(l) && l.number(x) == Some(at);
        if let Some(s) = spread(lines, metric, unit, &here)? {
            points.push((at, s));
        }
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(metric: &str, value: f64, unit: &str, params: &str) -> ResultLine {
        let params: Map<String, Value> = serde_json::from_str(params).unwrap();
        ResultLine {
            bench: "b".into(),
            metric: metric.into(),
            value: Some(value),
            unit: unit.into(),
            params,
            line: 1,
        }
    }

    #[test]
    fn repeated_lines_give_their_median_and_whole_range() {
        let lines = [
            line("t", 10.0, "ms", r#"{"clones":1,"min":9,"max":12}"#),
            line("t", 30.0, "ms", r#"{"clones":1,"min":20,"max":40}"#),
            line("t", 14.0, "ms", r#"{"clones":1,"min":13,"max":15}"#),
            line("t", 99.0, "ms", r#"{"clones":8}"#),
        ];
        let points = by_x(&lines, "t", "clones", "ms", &|_| true).unwrap();
        assert_eq!(points.len(), 2);
        let (x, s) = points[0];
        assert_eq!(x, 1.0);
        assert_eq!((s.median, s.min, s.max), (14.0, 9.0, 40.0));
        assert_eq!(points[1].1.median, 99.0);
        let in_seconds = by_x(&lines, "t", "clones", "s", &|_| true).unwrap();
        assert!((in_seconds[0].1.median - 0.014).abs() < 1e-12);
    }

    #[test]
    fn ranges_reported_as_metrics_of_their_own() {
        let lines = [
            line("all_running_ms", 5.0, "ms", "{}"),
            line("all_running_ms_min", 4.0, "ms", "{}"),
            line("all_running_ms_max", 12.0, "ms", "{}"),
            line("restore_us", 400.0, "us", "{}"),
            line("restore_us_max", 6000.0, "us", "{}"),
        ];
        let s = spread(&lines, "all_running_ms", "ms", &|_| true)
            .unwrap()
            .unwrap();
        assert_eq!((s.median, s.min, s.max), (5.0, 4.0, 12.0));
        let s = spread(&lines, "restore_us", "ms", &|_| true)
            .unwrap()
            .unwrap();
        assert_eq!((s.median, s.min, s.max), (0.4, 0.4, 6.0));
        assert_eq!(spread(&lines, "absent", "ms", &|_| true).unwrap(), None);
    }

    #[test]
    fn a_unit_that_does_not_convert_names_the_line() {
        let lines = [line("t", 1.0, "MiB", "{}")];
        let e = spread(&lines, "t", "ms", &|_| true).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn distinct_params_in_order() {
        let lines = [
            line("t", 1.0, "ms", r#"{"job":"scan"}"#),
            line("u", 1.0, "ms", r#"{"job":"other"}"#),
            line("t", 1.0, "ms", r#"{"job":"seqsearch"}"#),
            line("t", 1.0, "ms", r#"{"job":"scan"}"#),
            line("t", 1.0, "ms", "{}"),
        ];
        let jobs = distinct(&lines, "t", "job");
        assert_eq!(jobs, [Some("scan".into()), Some("seqsearch".into()), None]);
    }
}
