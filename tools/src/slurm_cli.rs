//! `sf start --slurm-job`: the Slurm job `sf` runs in (a batch script's
//! environment), so that the VM's clones stay on the job's nodes.

use std::process::Command;

use anyhow::{Context, Result, bail};
use snowflock_control::remote::JobScope;
use snowflock_tools::text::cpus_per_node;

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
