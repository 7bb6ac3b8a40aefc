//! Bar charts: values per category (receive path, system call, job), side by
//! side per series, with ceilings as levels across.

use anyhow::Result;

use super::Chart;
use super::figure::{Figure, Mark, Panel, Shape, Stroke, XAxis};
use super::select::{ResultLine, distinct, spread};

/// A bar of each of `series` (metric, name) for each of `categories`
/// (values of param `key`), in `unit`; series without a value are left out.
fn grouped(
    lines: &[ResultLine],
    key: &str,
    categories: &[String],
    series: &[(&str, &str)],
    unit: &str,
) -> Result<Vec<Mark>> {
    let mut found = Vec::new();
    for &(metric, name) in series {
        let mut values = Vec::new();
        for (i, category) in categories.iter().enumerate() {
            let keep = |l: &ResultLine| l.text(key).as_ref() == Some(category);
            if let Some(s) = spread(lines, metric, unit, &keep)? {
                values.push((i, s));
            }
        }
        if !values.is_empty() {
            found.push((name, values));
        }
    }
    let slots = found.len();
    Ok(found
        .into_iter()
        .enumerate()
        .map(|(slot, (name, values))| Mark {
            name: name.into(),
            color: slot,
            stroke: Stroke::Solid,
            shape: Shape::Bars {
                slot,
                slots,
                values,
            },
        })
        .collect())
}

/// A figure of one panel of bars per category of param `key`, or nothing.
fn bar_chart(
    title: String,
    lines: &[ResultLine],
    key: &str,
    series: &[(&str, &str)],
    (unit, y_label): (&str, &str),
) -> Result<Vec<Chart>> {
    let Some(&(first, _)) = series.first() else {
        return Ok(Vec::new());
    };
    let categories: Vec<String> = distinct(lines, first, key).into_iter().flatten().collect();
    let marks = grouped(lines, key, &categories, series, unit)?;
    if marks.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![Chart {
        suffix: None,
        figure: Figure {
            title,
            panels: vec![Panel {
                title: String::new(),
                x: XAxis::Categories {
                    label: key.into(),
                    names: categories,
                },
                y_label: y_label.into(),
                marks,
            }],
        },
    }])
}

/// `rx-path`: the receive paths' rates as bars against the ceilings of
/// the steps below them, a panel per MTU and send thread count.
pub fn rx_path(stem: &str, lines: &[ResultLine]) -> Result<Vec<Chart>> {
    const PATHS: [(&str, &str); 2] = [("sockets", "kernel sockets"), ("af_xdp", "AF_XDP")];
    const CEILINGS: [(&str, &str); 3] = [
        ("uffdio_copy_ceiling", "bulk UFFDIO_COPY ceiling"),
        ("install_ceiling", "install ceiling (cache write)"),
        ("delivery_ceiling", "delivery ceiling (no receive work)"),
    ];
    let mut settings: Vec<(Option<String>, Option<String>)> = Vec::new();
    for line in lines {
        let setting = (line.text("mtu"), line.text("send_threads"));
        if !settings.contains(&setting) {
            settings.push(setting);
        }
    }
    let mut panels = Vec::new();
    for (mtu, send_threads) in settings {
        let here = |l: &ResultLine| l.text("mtu") == mtu && l.text("send_threads") == send_threads;
        let (mut names, mut rates) = (Vec::new(), Vec::new());
        for (metric, name) in PATHS {
            if let Some(s) = spread(lines, metric, "pages/s", &here)? {
                rates.push((names.len(), s));
                names.push(name.to_string());
            }
        }
        let mut marks = Vec::new();
        if !rates.is_empty() {
            marks.push(Mark {
                name: "receive path".into(),
                color: 0,
                stroke: Stroke::Solid,
                shape: Shape::Bars {
                    slot: 0,
                    slots: 1,
                    values: rates,
                },
            });
        }
        for (color, (metric, name)) in CEILINGS.into_iter().enumerate() {
            if let Some(s) = spread(lines, metric, "pages/s", &here)? {
                marks.push(Mark {
                    name: name.into(),
                    color: color + 1,
                    stroke: Stroke::Dashed,
                    shape: Shape::Level(s),
                });
            }
        }
        if marks.is_empty() {
            continue;
        }
        let mut title: Vec<String> = mtu.into_iter().map(|m| format!("MTU {m}")).collect();
        title.extend(send_threads.map(|n| format!("{n} send threads")));
        panels.push(Panel {
            title: title.join(", "),
            x: XAxis::Categories {
                label: "receive path".into(),
                names,
            },
            y_label: "pages/s".into(),
            marks,
        });
    }
    Ok(Chart::of(
        None,
        format!("{stem}: receive rates against their ceilings"),
        panels,
    ))
}

/// `syscall`: time per call in the guest (patched to the personality)
/// against the same call run natively.
pub fn syscall(stem: &str, lines: &[ResultLine]) -> Result<Vec<Chart>> {
    bar_chart(
        format!("{stem}: time per system call, guest against native"),
        lines,
        "call",
        &[
            ("guest_ns", "guest (patched call)"),
            ("native_ns", "native"),
            ("first_call_ns", "first call in the guest"),
        ],
        ("ns", "time per call (ns)"),
    )
}

/// `avoidance`: memory the clones fetch with the avoidance heuristics on and off.
pub fn avoidance(stem: &str, lines: &[ResultLine]) -> Result<Vec<Chart>> {
    bar_chart(
        format!("{stem}: memory fetched by the clones, heuristics on and off"),
        lines,
        "job",
        &[
            ("fetched_heuristics_on", "heuristics on"),
            ("fetched_heuristics_off", "heuristics off"),
        ],
        ("MiB", "fetched (MiB)"),
    )
}
