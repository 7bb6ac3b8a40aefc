//! What `sf run` and `sf demo` report: as a table for people, as JSON for scripts.

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;
use snowflock_control::{CloneReport, VmOutcome};
use snowflock_guest::abi::linux::UNIMPLEMENTED_REPORT;

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub image: String,
    pub outcome: Outcome,
    /// The guest's own self-check: it exited with code 0.
    pub check_passed: bool,
    pub total_ms: f64,
    pub clone_operations: Vec<CloneOp>,
    /// System calls a Linux-ABI program (or one of its clones) made that
    /// the personality does not implement, by VM (console label: empty for
    /// the VM started).
    pub unimplemented_syscalls: Vec<Unimplemented>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unimplemented {
    pub vm: String,
    /// `name (number) xcount` each.
    pub calls: Vec<String>,
}

impl Unimplemented {
    /// One line for people: which VM, which calls.
    pub fn describe(&self) -> String {
        let vm = if self.vm.is_empty() {
            "the program"
        } else {
            self.vm.as_str()
        };
        format!(
            "{vm} made system calls snowflock does not implement (they failed with ENOSYS): {}",
            self.calls.join(", ")
        )
    }

    /// The personality's report line, if `line` is one.
    pub fn parse(vm: &str, line: &str) -> Option<Self> {
        let rest = line.strip_prefix(UNIMPLEMENTED_REPORT)?;
        // ` name (nr) xN` repeated: split before each name, after each count.
        let mut calls = Vec::new();
        let mut words = rest.split_whitespace().peekable();
        while let Some(name) = words.next() {
            let number = words.next()?;
            let count = words.next()?;
            calls.push(format!("{name} {number} {count}"));
        }
        Some(Self {
            vm: vm.to_string(),
            calls,
        })
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Exited { code: i32 },
    Result { bytes: usize },
    Failed { reason: String },
    Killed,
}

#[derive(Debug, Serialize)]
pub struct CloneOp {
    pub parent_vm: u64,
    pub kind: String,
    pub clones: u32,
    pub capture_pause_ms: f64,
    pub descriptor_bytes: usize,
    pub all_running_ms: Option<f64>,
    pub children: Vec<Child>,
}

#[derive(Debug, Serialize)]
pub struct Child {
    pub id: u32,
    pub restore_ms: f64,
    /// It ran on a copy of its parent's memory of its own.
    pub own_memory: bool,
    pub runtime_ms: f64,
    pub outcome: Outcome,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl From<&VmOutcome> for Outcome {
    fn from(o: &VmOutcome) -> Self {
        match o {
            VmOutcome::Exited(code) => Self::Exited { code: *code },
            VmOutcome::Result(bytes) => Self::Result { bytes: bytes.len() },
            VmOutcome::Failed(reason) => Self::Failed {
                reason: reason.clone(),
            },
            VmOutcome::Killed => Self::Killed,
            VmOutcome::Lost(reason) => Self::Failed {
                reason: format!("lost: {reason}"),
            },
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited { code } => write!(f, "exited with code {code}"),
            Self::Result { bytes } => write!(f, "ok ({bytes}-byte result)"),
            Self::Failed { reason } => write!(f, "FAILED: {reason}"),
            Self::Killed => write!(f, "killed"),
        }
    }
}

impl RunReport {
    pub fn new(
        image: &str,
        outcome: &VmOutcome,
        total: Duration,
        clones: &[CloneReport],
        unimplemented: Vec<Unimplemented>,
    ) -> Self {
        Self {
            unimplemented_syscalls: unimplemented,
            image: image.to_string(),
            outcome: outcome.into(),
            check_passed: *outcome == VmOutcome::Exited(0),
            total_ms: ms(total),
            clone_operations: clones
                .iter()
                .map(|r| CloneOp {
                    parent_vm: r.parent_vm,
                    kind: format!("{:?}", r.kind).to_lowercase(),
                    clones: r.clones,
                    capture_pause_ms: ms(r.capture_pause),
                    descriptor_bytes: r.descriptor_bytes,
                    all_running_ms: r.all_running.map(ms),
                    children: r
                        .children
                        .iter()
                        .map(|c| Child {
                            id: c.id,
                            restore_ms: ms(c.restore),
                            own_memory: c.own_memory,
                            runtime_ms: ms(c.runtime),
                            outcome: (&c.outcome).into(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// A few lines for `sf run`.
    pub fn brief(&self) -> String {
        let mut out = String::new();
        for op in &self.clone_operations {
            let failed = op
                .children
                .iter()
                .filter(|c| !matches!(c.outcome, Outcome::Result { .. }))
                .count();
            let _ = writeln!(
                out,
                "sf: vm {} {}: {} clones, paused {:.2} ms, descriptor {} bytes, all running after {}, {} not ok",
                op.parent_vm,
                op.kind,
                op.clones,
                op.capture_pause_ms,
                op.descriptor_bytes,
                op.all_running_ms
                    .map_or("-".into(), |v| format!("{v:.1} ms")),
                failed
            );
        }
        for report in &self.unimplemented_syscalls {
            let _ = writeln!(out, "sf: {}", report.describe());
        }
        let _ = writeln!(
            out,
            "sf: {} {} after {:.0} ms",
            self.image, self.outcome, self.total_ms
        );
        out
    }

    /// The table `sf demo` prints.
    pub fn demo_table(&self, cmdline: &str, mem: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "snowflock demo: seqsearch {cmdline} on a {} MiB VM",
            mem >> 20
        );
        for op in &self.clone_operations {
            let _ = writeln!(
                out,
                "clone: parent paused {:.2} ms, descriptor {:.1} KiB, all {} clones running {} after the clone call",
                op.capture_pause_ms,
                op.descriptor_bytes as f64 / 1024.0,
                op.clones,
                op.all_running_ms
                    .map_or("-".into(), |v| format!("{v:.1} ms")),
            );
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "{:>6}  {:>10}  {:>11}  result",
                "clone", "restore", "runtime"
            );
            for c in &op.children {
                let _ = writeln!(
                    out,
                    "{:>6}  {:>7.2} ms  {:>8.1} ms  {}",
                    c.id, c.restore_ms, c.runtime_ms, c.outcome
                );
            }
        }
        let _ = writeln!(out);
        let verdict = if self.check_passed {
            "PASS (merged clone results equal the same search run without cloning)"
        } else {
            "FAIL"
        };
        let _ = writeln!(out, "result check: {verdict}; guest {}", self.outcome);
        let _ = writeln!(out, "total time: {:.2} s", self.total_ms / 1e3);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_personality_s_report_line_becomes_the_list_of_calls() {
        let line = format!("{UNIMPLEMENTED_REPORT} pipe (22) x2 ? (400) x1");
        assert_eq!(
            Unimplemented::parse("clone 2", &line),
            Some(Unimplemented {
                vm: "clone 2".into(),
                calls: vec!["pipe (22) x2".into(), "? (400) x1".into()],
            })
        );
        assert_eq!(Unimplemented::parse("", "hello"), None);
    }
}
