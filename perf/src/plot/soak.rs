//! `soak`: what each daemon holds against the clone-and-join cycles run.

use anyhow::Result;

use super::Chart;
use super::figure::{Mark, Panel, Shape, Stroke, XAxis};
use super::select::{ResultLine, by_x, distinct};

/// The panels: (metric, title, y label, unit).
const PANELS: [(&str, &str, &str, &str); 4] = [
    ("rss", "resident memory", "RSS (MiB)", "MiB"),
    ("vm_pte", "page tables", "VmPTE (KiB)", "KiB"),
    ("fds", "open descriptors", "descriptors", "fds"),
    ("threads", "threads", "threads", "threads"),
];

/// A panel per resource, a line per variant (colour) and host (stroke).
pub fn soak(stem: &str, lines: &[ResultLine]) -> Result<Vec<Chart>> {
    let variants = distinct(lines, "rss", "variant");
    let hosts = distinct(lines, "rss", "host");
    let mut panels = Vec::new();
    for (metric, title, y_label, unit) in PANELS {
        let mut marks = Vec::new();
        for (color, variant) in variants.iter().enumerate() {
            for (h, host) in hosts.iter().enumerate() {
                let keep =
                    |l: &ResultLine| l.text("variant") == *variant && l.text("host") == *host;
                let points = by_x(lines, metric, "cycle", unit, &keep)?;
                if points.is_empty() {
                    continue;
                }
                let name = [variant.as_deref(), host.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", ");
                marks.push(Mark {
                    name,
                    color,
                    stroke: Stroke::ALL[h % Stroke::ALL.len()],
                    shape: Shape::Line(points),
                });
            }
        }
        if !marks.is_empty() {
            panels.push(Panel {
                title: title.into(),
                x: XAxis::Linear {
                    label: "clone-and-join cycles".into(),
                },
                y_label: y_label.into(),
                marks,
            });
        }
    }
    Ok(Chart::of(
        None,
        format!("{stem}: sfd's resources over clone-and-join cycles"),
        panels,
    ))
}
