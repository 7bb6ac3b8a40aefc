//! Tickets from Slurm (`[allocation] backend = "slurm"`): each ticket is a
//! Slurm allocation made with the cluster's own commands, as SnowFlock took
//! its tickets from the resource manager of its day.
//!
//! Why the commands and not `slurmrestd`: every Slurm installation has
//! `salloc`, `scontrol` and `scancel`, configured by the operator and
//! authenticated by munge as the daemon's user; `slurmrestd` is optional,
//! needs its own authentication (JWT) and is absent from many clusters.
//!
//! A ticket for `n` clones takes what is free now, as SnowFlock's `m <= n`
//! grant did: the idle CPUs of the partition are read (`sinfo`), and
//! `salloc --no-shell --immediate --spread-job -n m` asks for at most that
//! many, spread over as many nodes as possible, one clone per CPU. A race
//! with another job makes `salloc` refuse; it is asked again with what is
//! free then, within `[allocation] timeout`. Slurm node names are the
//! members' names.
//!
//! Every allocation is named `snowflock-<host>` after the parent's host and
//! carries a comment naming the VM and ticket, so that `squeue` shows whose
//! it is, and so that leftovers can be cancelled by name: by the host itself
//! when its daemon starts (after a crash), and by the other members when
//! they lose the host.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::config::AllocationSection;

/// Bound on one Slurm command; the allocation's own wait is bounded by
/// `salloc --immediate`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// A Slurm command that failed.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("running {command} failed")]
    Spawn {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} did not finish within {COMMAND_TIMEOUT:?}")]
    Timeout { command: &'static str },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{command} printed what this daemon cannot read: {output}")]
    Unreadable {
        command: &'static str,
        output: String,
    },
}

/// An allocation Slurm granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmGrant {
    pub job: u64,
    /// CPUs granted per node, in Slurm's order.
    pub cpus: Vec<(String, u32)>,
}

/// The Slurm commands, as this daemon runs them.
#[derive(Debug, Clone)]
pub struct Slurm {
    conf: Option<PathBuf>,
    partition: Option<String>,
    timeout: Duration,
}

impl Slurm {
    pub fn new(section: &AllocationSection) -> Self {
        Self {
            conf: section.slurm_conf.clone(),
            partition: section.partition.clone(),
            timeout: section.timeout(),
        }
    }

    /// The job name of `host`'s allocations.
    pub fn job_name(host: &str) -> String {
        format!("snowflock-{host}")
    }

    async fn run(&self, command: &'static str, args: &[&str]) -> Result<Output, SlurmError> {
        let mut cmd = Command::new(command);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(conf) = &self.conf {
            cmd.env("SLURM_CONF", conf);
        }
        let output = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
            .await
            .map_err(|_| SlurmError::Timeout { command })?
            .map_err(|source| SlurmError::Spawn { command, source })?;
        if !output.status.success() {
            return Err(SlurmError::Failed {
                command,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(output)
    }

    /// Idle CPUs of the partition, summed over its nodes that take jobs.
    async fn idle_cpus(&self) -> Result<u32, SlurmError> {
        let mut args = vec!["-h", "-N", "-o", "%N %C %t"];
        if let Some(partition) = &self.partition {
            args.extend(["-p", partition]);
        }
        let output = self.run("sinfo", &args).await?;
        let text = String::from_utf8_lossy(&output.stdout);
        let mut idle = 0;
        let mut nodes = std::collections::HashSet::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [node, cpus, state] = fields.as_slice() else {
                return Err(SlurmError::Unreadable {
                    command: "sinfo",
                    output: text.to_string(),
                });
            };
            // A node in several partitions is listed once per partition.
            if !nodes.insert(node.to_string()) || !matches!(*state, "idle" | "mix") {
                continue;
            }
            // Allocated/idle/other/total.
            let idle_here = cpus
                .split('/')
                .nth(1)
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or_else(|| SlurmError::Unreadable {
                    command: "sinfo",
                    output: text.to_string(),
                })?;
            idle += idle_here;
        }
        Ok(idle)
    }

    /// Allocates up to `wanted` CPUs, taking what is free now; `None` when
    /// nothing is. `comment` says whose allocation it is.
    pub async fn allocate(
        &self,
        host: &str,
        wanted: u32,
        comment: &str,
    ) -> Result<Option<SlurmGrant>, SlurmError> {
        let deadline = Instant::now() + self.timeout;
        let name = Self::job_name(host);
        loop {
            let asked = self.idle_cpus().await?.min(wanted);
            if asked == 0 {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let immediate = format!("--immediate={}", left.as_secs().max(1));
            let tasks = asked.to_string();
            let mut args = vec![
                "--no-shell",
                &immediate,
                "--spread-job",
                "-n",
                &tasks,
                "--job-name",
                &name,
                "--comment",
                comment,
            ];
            if let Some(partition) = &self.partition {
                args.extend(["-p", partition]);
            }
            match self.run("salloc", &args).await {
                Ok(output) => {
                    // "salloc: Granted job allocation 42"
                    let text = String::from_utf8_lossy(&output.stderr);
                    let job = text
                        .split_whitespace()
                        .skip_while(|word| *word != "allocation")
                        .nth(1)
                        .and_then(|id| id.parse().ok())
                        .ok_or_else(|| SlurmError::Unreadable {
                            command: "salloc",
                            output: text.to_string(),
                        })?;
                    return match self.job_cpus(job).await {
                        Ok(cpus) => Ok(Some(SlurmGrant { job, cpus })),
                        Err(error) => {
                            self.release(job).await;
                            Err(error)
                        }
                    };
                }
                // Another job took the CPUs between `sinfo` and `salloc`.
                Err(error @ SlurmError::Failed { .. }) => {
                    if Instant::now() >= deadline {
                        return Err(error);
                    }
                    tracing::debug!(%error, asked, "Slurm refused the allocation; asking again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The CPUs of `job` per node, from `scontrol show job -d`.
    async fn job_cpus(&self, job: u64) -> Result<Vec<(String, u32)>, SlurmError> {
        let id = job.to_string();
        let output = self.run("scontrol", &["show", "job", "-d", &id]).await?;
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let mut cpus = Vec::new();
        for line in text.lines() {
            let mut nodes = None;
            let mut ids = None;
            for field in line.split_whitespace() {
                if let Some(value) = field.strip_prefix("Nodes=") {
                    nodes = Some(value);
                } else if let Some(value) = field.strip_prefix("CPU_IDs=") {
                    ids = Some(value);
                }
            }
            let (Some(nodes), Some(ids)) = (nodes, ids) else {
                continue;
            };
            let count = count_ids(ids).ok_or_else(|| SlurmError::Unreadable {
                command: "scontrol",
                output: text.clone(),
            })?;
            for node in self.hostnames(nodes).await? {
                cpus.push((node, count));
            }
        }
        if cpus.is_empty() {
            return Err(SlurmError::Unreadable {
                command: "scontrol",
                output: text,
            });
        }
        Ok(cpus)
    }

    /// The node names of a Slurm host list (`h[2-3],h5`).
    async fn hostnames(&self, list: &str) -> Result<Vec<String>, SlurmError> {
        if !list.contains('[') {
            return Ok(list.split(',').map(str::to_string).collect());
        }
        let output = self.run("scontrol", &["show", "hostnames", list]).await?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Cancels `job`; logs what fails (the allocation ends with its job's
    /// time limit at the latest).
    pub async fn release(&self, job: u64) {
        let id = job.to_string();
        match self.run("scancel", &[&id]).await {
            Ok(_) => tracing::info!(job, "released the Slurm allocation"),
            Err(error) => tracing::warn!(job, %error, "releasing a Slurm allocation failed"),
        }
    }

    /// Cancels every allocation made for `host`'s VMs.
    pub async fn release_all_of(&self, host: &str) {
        let name = Self::job_name(host);
        match self.run("scancel", &["--name", &name]).await {
            Ok(_) => tracing::info!(%host, "cancelled the host's Slurm allocations"),
            Err(error) => {
                tracing::warn!(%host, %error, "cancelling the host's Slurm allocations failed")
            }
        }
    }
}

/// How many CPUs a Slurm CPU id list (`0-1,4`) names.
fn count_ids(list: &str) -> Option<u32> {
    let mut count = 0u32;
    for part in list.split(',') {
        count += match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (u32, u32) = (first.parse().ok()?, last.parse().ok()?);
                last.checked_sub(first)? + 1
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::count_ids;

    #[test]
    fn cpu_id_lists_are_counted() {
        assert_eq!(count_ids("0"), Some(1));
        assert_eq!(count_ids("0-1"), Some(2));
        assert_eq!(count_ids("0-1,4,6-7"), Some(5));
        assert_eq!(count_ids("3-1"), None);
        assert_eq!(count_ids("x"), None);
        assert_eq!(count_ids(""), None);
    }
}
