//! The `sfd.toml` each cluster host's daemon reads. The format belongs to the daemon
//! (`snowflock_control::config`); this writes the documented layout with every string quoted
//! by the `toml` crate.

use std::fmt::Write as _;
use std::path::Path;

use crate::record::HostInfo;

/// The `[limits]` section.
#[derive(Debug)]
pub(crate) struct Limits<'a> {
    pub clone_slots: u32,
    pub fetch_timeout_ms: u64,
    pub peer_timeout_ms: Option<u64>,
    /// Further keys, written as given after the others.
    pub extra: &'a toml::Table,
}

/// Renders the configuration of `host`, a member of `members` (every host, `host` included).
/// With `slurm_conf`, the daemon allocates clone slots from the Slurm cluster it names.
pub(crate) fn render(
    host: &HostInfo,
    members: &[HostInfo],
    key_file: &Path,
    limits: &Limits,
    mcdist: &toml::Table,
    metrics_port: Option<u16>,
    slurm_conf: Option<&Path>,
) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(text, "[host]");
    let _ = writeln!(text, "name = {}", string(&host.name));
    let _ = writeln!(text, "state_dir = {}", path(&host.state_dir));
    let _ = writeln!(text, "[listen]");
    let _ = writeln!(text, "control = {}", string(&host.control.to_string()));
    let _ = writeln!(text, "pages = {}", string(&host.pages.to_string()));
    let _ = writeln!(text, "[cluster]");
    let _ = writeln!(text, "key_file = {}", path(key_file));
    let _ = writeln!(text, "members = [");
    for member in members {
        let _ = writeln!(
            text,
            "  {{ name = {}, control = {} }},",
            string(&member.name),
            string(&member.control.to_string())
        );
    }
    let _ = writeln!(text, "]");
    let _ = writeln!(text, "[limits]");
    let _ = writeln!(text, "clone_slots = {}", limits.clone_slots);
    let _ = writeln!(text, "fetch_timeout_ms = {}", limits.fetch_timeout_ms);
    if let Some(ms) = limits.peer_timeout_ms {
        let _ = writeln!(text, "peer_timeout_ms = {ms}");
    }
    for (key, value) in limits.extra {
        let _ = writeln!(text, "{} = {}", string(key), value);
    }
    if !mcdist.is_empty() {
        let _ = writeln!(text, "[mcdist]");
        for (key, value) in mcdist {
            let _ = writeln!(text, "{} = {}", string(key), value);
        }
    }
    if let Some(port) = metrics_port {
        let listen = std::net::SocketAddr::new(host.control.ip(), port);
        let _ = writeln!(text, "[metrics]");
        let _ = writeln!(text, "listen = {}", string(&listen.to_string()));
    }
    if let Some(conf) = slurm_conf {
        let _ = writeln!(text, "[allocation]");
        let _ = writeln!(text, "backend = {}", string("slurm"));
        let _ = writeln!(text, "slurm_conf = {}", path(conf));
    }
    text
}

/// A TOML basic string holding `s`, escaped as needed.
fn string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A path as a TOML string (cluster paths are checked to be UTF-8 before this runs).
fn path(p: &Path) -> String {
    string(&p.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ClusterRecord;

    #[test]
    fn the_config_lists_every_member_and_parses_as_the_documented_layout() {
        let record =
            ClusterRecord::new("sft", Path::new("/run/c"), 2, Path::new("/bin/sfd"), "info");
        let mut extra = toml::Table::new();
        extra.insert("prefetch_pages".into(), toml::Value::Integer(3));
        let limits = Limits {
            clone_slots: 16,
            fetch_timeout_ms: 5000,
            peer_timeout_ms: Some(700),
            extra: &extra,
        };
        let mut mcdist = toml::Table::new();
        mcdist.insert("rx_path".into(), toml::Value::String("sockets".into()));
        let text = render(
            &record.hosts[1],
            &record.hosts,
            &record.key_file,
            &limits,
            &mcdist,
            Some(9464),
            Some(Path::new("/run/c/slurm/slurm.conf")),
        );
        let doc: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(doc["host"]["name"].as_str(), Some("h2"));
        assert_eq!(doc["host"]["state_dir"].as_str(), Some("/run/c/h2"));
        assert_eq!(doc["listen"]["control"].as_str(), Some("10.77.0.2:7070"));
        assert_eq!(doc["listen"]["pages"].as_str(), Some("10.77.0.2:7071"));
        assert_eq!(
            doc["cluster"]["key_file"].as_str(),
            Some("/run/c/cluster.key")
        );
        let members = doc["cluster"]["members"].as_array().unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[0]["name"].as_str(), Some("h1"));
        assert_eq!(members[0]["control"].as_str(), Some("10.77.0.1:7070"));
        assert_eq!(doc["limits"]["clone_slots"].as_integer(), Some(16));
        assert_eq!(doc["limits"]["fetch_timeout_ms"].as_integer(), Some(5000));
        assert_eq!(doc["limits"]["peer_timeout_ms"].as_integer(), Some(700));
        assert_eq!(doc["limits"]["prefetch_pages"].as_integer(), Some(3));
        assert_eq!(doc["mcdist"]["rx_path"].as_str(), Some("sockets"));
        assert_eq!(doc["metrics"]["listen"].as_str(), Some("10.77.0.2:9464"));
        assert_eq!(doc["allocation"]["backend"].as_str(), Some("slurm"));
        assert_eq!(
            doc["allocation"]["slurm_conf"].as_str(),
            Some("/run/c/slurm/slurm.conf")
        );
    }

    #[test]
    fn strings_are_quoted_and_escaped() {
        assert_eq!(string("h1"), "\"h1\"");
        let odd = "a \"quoted\" \\ path\n";
        let parsed: toml::Table = toml::from_str(&format!("k = {}", string(odd))).unwrap();
        assert_eq!(parsed["k"].as_str(), Some(odd));
    }
}
