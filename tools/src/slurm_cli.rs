//! `sf start --slurm-job`: the Slurm job `sf` runs in (a batch script's
//! environment), so that the VM's clones stay on the job's nodes.

use std::process::Command;

use anyhow::{Context, Result, bail};
use snowflock_control::remote::JobScope;

/// The job of this environment: `SLURM_JOB_ID`, its nodes
/// (`SLURM_JOB_NODELIST`, expanded by `scontrol show hostnames`) and their
/// CPUs (`SLURM_JOB_CPUS_PER_NODE`).
pub fn job_scope() -> Result<JobScope> {
    let var = |name: &str| {
        std::env::var(name).with_context(|| format!("{name} is not set: not inside a Slurm job"))
    };
    let job = var("SLURM_JOB_ID")?
        .parse()
        .context("SLURM_JOB_ID is not a number")?;
    let nodelist = var("SLURM_JOB_NODELIST")?;
    let output = Command::new("scontrol")
        .args(["show", "hostnames", &nodelist])
        .output()
        .context("running scontrol show hostnames")?;
    if !output.status.success() {
        bail!(
            "scontrol show hostnames {nodelist}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let nodes: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let cpus = cpus_per_node(&var("SLURM_JOB_CPUS_PER_NODE")?)?;
    if cpus.len() != nodes.len() {
        bail!(
            "SLURM_JOB_CPUS_PER_NODE names {} nodes, SLURM_JOB_NODELIST {}",
            cpus.len(),
            nodes.len()
        );
    }
    Ok(JobScope {
        job,
        cpus: nodes.into_iter().zip(cpus).collect(),
    })
}

/// Expands Slurm's CPU counts per node (`4(x2),2` is 4, 4, 2).
fn cpus_per_node(text: &str) -> Result<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let (count, times) = match part.split_once("(x") {
            Some((count, rest)) => {
                let times = rest
                    .strip_suffix(')')
                    .with_context(|| format!("unreadable CPU count {part:?}"))?;
                (count, times.parse::<usize>()?)
            }
            None => (part, 1),
        };
        let count: u32 = count
            .parse()
            .with_context(|| format!("unreadable CPU count {part:?}"))?;
        cpus.extend(std::iter::repeat_n(count, times));
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::cpus_per_node;

    #[test]
    fn cpu_counts_per_node_expand() {
        assert_eq!(cpus_per_node("2").unwrap(), vec![2]);
        assert_eq!(cpus_per_node("4(x2),2").unwrap(), vec![4, 4, 2]);
        assert!(cpus_per_node("4(x2").is_err());
        assert!(cpus_per_node("x").is_err());
    }
}
