//! The runtime files of a cluster in its directory `DIR`: each host's `DIR/h{i}` (configuration,
//! socket, log, daemon state) and the cluster key, written when the cluster comes up, and all of
//! them with `cluster.json` and the Slurm files (`DIR/slurm`, written by the `slurm` module)
//! removed when it goes down. `DIR` itself is only removed if that leaves it empty.

use std::fs;
use std::io;
use std::path::Path;

use snowflock_dataplane::auth::ClusterKey;

use crate::config::{self, Limits};
use crate::error::{TeardownFailure, UpError};
use crate::record::{ClusterRecord, STATE_FILE};

/// Set to anything but empty or `0` to keep each host's `sfd.log` (and the Slurm daemons' logs)
/// when a cluster goes down.
pub const KEEP_LOGS_ENV: &str = "SF_KEEP_LOGS";

/// Writes each host's directory and configuration and a fresh cluster key.
pub(crate) fn write(
    record: &ClusterRecord,
    limits: &Limits,
    mcdist: &toml::Table,
    metrics_port: Option<u16>,
) -> Result<(), UpError> {
    for host in &record.hosts {
        fs::create_dir_all(&host.state_dir).map_err(|source| UpError::CreateDir {
            path: host.state_dir.clone(),
            source,
        })?;
        // A socket left by an earlier run would look ready before the daemon is.
        remove_if_present(&host.socket).map_err(|source| UpError::RemoveFile {
            path: host.socket.clone(),
            source,
        })?;
    }
    ClusterKey::generate()
        .save(&record.key_file)
        .map_err(|source| UpError::Key { source })?;
    for host in &record.hosts {
        let text = config::render(
            host,
            &record.hosts,
            &record.key_file,
            limits,
            mcdist,
            metrics_port,
            record.slurm.as_ref().map(|slurm| slurm.conf.as_path()),
        );
        fs::write(&host.config, text).map_err(|source| UpError::WriteConfig {
            path: host.config.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Removes the runtime files (keeping the logs if [`KEEP_LOGS_ENV`] says so); returns the
/// failures.
pub(crate) fn remove(record: &ClusterRecord) -> Vec<TeardownFailure> {
    let keep_logs = std::env::var_os(KEEP_LOGS_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    let mut trees: Vec<(&Path, Vec<&Path>)> = record
        .hosts
        .iter()
        .map(|host| (host.state_dir.as_path(), vec![host.log.as_path()]))
        .collect();
    if let Some(slurm) = &record.slurm {
        let logs = slurm.daemons.iter().map(|d| d.log.as_path()).collect();
        trees.push((&slurm.dir, logs));
    }
    let mut failures = Vec::new();
    for (dir, logs) in trees {
        let result = if keep_logs {
            remove_all_but(dir, &logs)
        } else {
            match fs::remove_dir_all(dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        };
        if let Err(source) = result {
            failures.push(TeardownFailure::RemoveFile {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    for path in [&record.key_file, &record.dir.join(STATE_FILE)] {
        if let Err(source) = remove_if_present(path) {
            failures.push(TeardownFailure::RemoveFile {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    // Only if empty: the directory may hold things that are not ours.
    let _ = fs::remove_dir(&record.dir);
    failures
}

/// Removes the file at `path`; one that is not there is no error.
pub(crate) fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes everything in `dir` except the files `keep` (and the directories leading to them).
fn remove_all_but(dir: &Path, keep: &[&Path]) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if keep.contains(&path.as_path()) {
            continue;
        }
        if fs::symlink_metadata(&path)?.is_dir() {
            if keep.iter().any(|k| k.starts_with(&path)) {
                remove_all_but(&path, keep)?;
            } else {
                fs::remove_dir_all(&path)?;
            }
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeping_logs_removes_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("h1");
        fs::create_dir_all(host.join("vms/1")).unwrap();
        for file in ["sfd.log", "sfd.toml", "sfd.sock", "vms/1/state"] {
            fs::write(host.join(file), "x").unwrap();
        }
        remove_all_but(&host, &[&host.join("sfd.log")]).unwrap();
        let left: Vec<_> = fs::read_dir(&host)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["sfd.log"]);
        remove_all_but(&dir.path().join("missing"), &[&host]).unwrap();
    }

    #[test]
    fn kept_logs_in_subdirectories_keep_their_directories() {
        let dir = tempfile::tempdir().unwrap();
        let slurm = dir.path().join("slurm");
        fs::create_dir_all(slurm.join("h1/spool")).unwrap();
        fs::create_dir_all(slurm.join("state")).unwrap();
        for file in [
            "slurm.conf",
            "slurmctld.log",
            "h1/slurmd.log",
            "h1/spool/x",
            "state/y",
        ] {
            fs::write(slurm.join(file), "x").unwrap();
        }
        let (ctld, slurmd) = (slurm.join("slurmctld.log"), slurm.join("h1/slurmd.log"));
        remove_all_but(&slurm, &[&ctld, &slurmd]).unwrap();
        let mut left: Vec<_> = fs::read_dir(&slurm)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["h1", "slurmctld.log"]);
        let left: Vec<_> = fs::read_dir(slurm.join("h1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["slurmd.log"]);
    }
}
