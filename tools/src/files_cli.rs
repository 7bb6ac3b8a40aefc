//! `--mount` and `--stdin`: the host files of a Linux-ABI program.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use snowflock_tools::text::mount_spec;
use snowflock_vmm::files::{FilesConfig, MountSpec};

#[derive(Debug, Args, Default)]
pub struct FileArgs {
    /// Show the host directory HOST to a Linux-ABI program at the guest path
    /// GUEST, read-only (repeatable). The program cannot reach anything of
    /// the host outside its mounts.
    #[arg(long = "mount", value_name = "HOST:GUEST[:ro]")]
    pub mounts: Vec<String>,
    /// A host file the program reads as standard input (default: none, it reads the end).
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// Copy what the program wrote under /out here when it ends:
    /// DIR/ for the VM started, DIR/clone-<generation>-<id>/ for each clone.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

impl FileArgs {
    /// The configuration, host paths made absolute.
    pub fn config(&self) -> Result<FilesConfig> {
        let mut mounts = Vec::with_capacity(self.mounts.len());
        for spec in &self.mounts {
            let (host, guest) = mount_spec(spec)?;
            let host = std::fs::canonicalize(host)
                .with_context(|| format!("--mount {spec}: host directory {host}"))?;
            mounts.push(MountSpec {
                host,
                guest: guest.to_string(),
                identity: None,
            });
        }
        let stdin = match &self.stdin {
            None => None,
            Some(path) => Some(
                std::fs::canonicalize(path)
                    .with_context(|| format!("--stdin {}", path.display()))?,
            ),
        };
        let out = match &self.out {
            None => None,
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("--out {}", dir.display()))?;
                Some(
                    std::fs::canonicalize(dir)
                        .with_context(|| format!("--out {}", dir.display()))?,
                )
            }
        };
        Ok(FilesConfig { mounts, stdin, out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(mounts: &[&str]) -> FileArgs {
        FileArgs {
            mounts: mounts.iter().map(|m| m.to_string()).collect(),
            stdin: None,
            out: None,
        }
    }

    #[test]
    fn mounts_parse_with_and_without_ro() {
        let dir = std::env::temp_dir();
        let host = dir.display();
        let config = args(&[&format!("{host}:/data"), &format!("{host}:/ref:ro")])
            .config()
            .unwrap();
        let guests: Vec<&str> = config.mounts.iter().map(|m| m.guest.as_str()).collect();
        assert_eq!(guests, ["/data", "/ref"]);
        assert!(config.mounts.iter().all(|m| m.host.is_absolute()));
    }

    #[test]
    fn bad_mounts_are_refused_with_the_form() {
        for bad in ["/tmp", "/tmp:/x:rw", "/no/such/dir:/x"] {
            let error = args(&[bad]).config().unwrap_err();
            assert!(format!("{error:#}").contains("--mount"), "{bad}: {error:#}");
        }
    }
}
