//! The `sfd` configuration file (TOML).
//!
//! ```toml
//! [host]
//! name = "h1"
//! state_dir = "/run/snowflock"        # the local API socket sfd.sock lives here
//! [listen]
//! control = "10.77.0.1:7070"          # inter-host control protocol (TCP)
//! pages = "10.77.0.1:7071"            # memory server (TCP)
//! [cluster]
//! key_file = "/etc/snowflock/cluster.key"
//! members = [ { name = "h1", control = "10.77.0.1:7070" },
//!             { name = "h2", control = "10.77.0.2:7070" } ]
//! [limits]
//! clone_slots = 16
//! fetch_timeout_ms = 5000
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A failed configuration load.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path} failed")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// Everything `sfd` reads from its configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    pub host: HostSection,
    pub listen: ListenSection,
    pub cluster: ClusterSection,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// This host's name in the cluster; unique among the members.
    pub name: String,
    /// Runtime directory: the local API socket `sfd.sock` lives here.
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// Inter-host control protocol.
    pub control: SocketAddr,
    /// Memory server: peers fetch frozen parent memory here.
    pub pages: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// File holding the cluster key as 64 hex characters.
    pub key_file: PathBuf,
    /// Every host of the cluster, this one included.
    #[serde(default)]
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    pub control: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Clones this host runs at once.
    #[serde(default = "default_clone_slots")]
    pub clone_slots: u32,
    /// A page not delivered within this time fails the clone waiting for it.
    #[serde(default = "default_fetch_timeout_ms")]
    pub fetch_timeout_ms: u64,
    /// Pages fetched after a faulting page when they hold data and are missing.
    #[serde(default = "default_prefetch_pages")]
    pub prefetch_pages: u32,
    /// Skip fetching pages whose contents do not matter (zero, free, fresh).
    #[serde(default = "default_true")]
    pub avoidance: bool,
    /// A peer that stays silent this long is considered lost.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
}

fn default_clone_slots() -> u32 {
    16
}
fn default_fetch_timeout_ms() -> u64 {
    5000
}
fn default_prefetch_pages() -> u32 {
    3
}
fn default_true() -> bool {
    true
}
fn default_peer_timeout_ms() -> u64 {
    5000
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            clone_slots: default_clone_slots(),
            fetch_timeout_ms: default_fetch_timeout_ms(),
            prefetch_pages: default_prefetch_pages(),
            avoidance: true,
            peer_timeout_ms: default_peer_timeout_ms(),
        }
    }
}

impl Limits {
    pub fn fetch_timeout(&self) -> Duration {
        Duration::from_millis(self.fetch_timeout_ms)
    }

    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }
}

impl DaemonConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.check().map_err(|problem| ConfigError::Invalid {
            path: path.to_path_buf(),
            problem,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.host.name.is_empty() || self.host.name.contains(['/', ' ']) {
            return Err(format!(
                "host name {:?} must be non-empty without '/' or spaces",
                self.host.name
            ));
        }
        let mut names: Vec<&str> = self
            .cluster
            .members
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err("cluster member names must be unique".into());
        }
        if let Some(me) = self
            .cluster
            .members
            .iter()
            .find(|m| m.name == self.host.name)
            && me.control != self.listen.control
        {
            return Err(format!(
                "member {} lists control address {} but this host listens on {}",
                me.name, me.control, self.listen.control
            ));
        }
        if self.limits.fetch_timeout_ms == 0 || self.limits.peer_timeout_ms == 0 {
            return Err("timeouts must be positive".into());
        }
        Ok(())
    }

    /// The local API socket.
    pub fn socket_path(&self) -> PathBuf {
        self.host.state_dir.join("sfd.sock")
    }

    /// The other cluster members.
    pub fn peers(&self) -> impl Iterator<Item = &Member> {
        self.cluster
            .members
            .iter()
            .filter(|m| m.name != self.host.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = r#"
            [host]
            name = "h1"
            state_dir = "/run/snowflock"
            [listen]
            control = "10.77.0.1:7070"
            pages = "10.77.0.1:7071"
            [cluster]
            key_file = "/etc/snowflock/cluster.key"
            members = [ { name = "h1", control = "10.77.0.1:7070" },
                        { name = "h2", control = "10.77.0.2:7070" } ]
            [limits]
            clone_slots = 8
        "#;
        let config: DaemonConfig = toml::from_str(text).unwrap();
        config.check().unwrap();
        assert_eq!(config.limits.clone_slots, 8);
        assert_eq!(config.limits.fetch_timeout_ms, 5000);
        assert_eq!(
            config.peers().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["h2"]
        );
    }

    #[test]
    fn rejects_unknown_keys_and_duplicate_members() {
        let base = r#"
            [host]
            name = "h1"
            state_dir = "/tmp"
            [listen]
            control = "127.0.0.1:1"
            pages = "127.0.0.1:2"
            [cluster]
            key_file = "/k"
        "#;
        assert!(toml::from_str::<DaemonConfig>(&format!("{base}\nbogus = 1")).is_err());
        let dup = format!(
            "{base}members = [{{ name = \"a\", control = \"127.0.0.1:3\" }}, {{ name = \"a\", control = \"127.0.0.1:4\" }}]"
        );
        let config: DaemonConfig = toml::from_str(&dup).unwrap();
        assert!(config.check().unwrap_err().contains("unique"));
    }
}
