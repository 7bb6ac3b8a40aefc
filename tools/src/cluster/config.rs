//! The `sfd.toml` each cluster host's daemon reads. The format belongs to the daemon
//! (`snowflock_control::config`); this writes the documented layout with every string quoted
//! by the `toml` crate.

use std::fmt::Write as _;
use std::path::Path;

use super::HostInfo;

/// The `[limits]` section.
#[derive(Debug)]
pub(super) struct Limits<'a> {
    pub clone_slots: u32,
    pub fetch_timeout_ms: u64,
    pub peer_timeout_ms: Option<u64>,
    /// Further keys, written as given after the others.
    pub extra: &'a toml::Table,
}

/// Renders the configuration of `host`, a member of `members` (every host, `host` included).
pub(super) fn render(
    host: &HostInfo,
    members: &[HostInfo],
    key_file: &Path,
    limits: &Limits,
    mcdist: &toml::Table,
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

    #[test]
    fn strings_are_quoted_and_escaped() {
        assert_eq!(string("h1"), "\"h1\"");
        let odd = "a \"quoted\" \\ path\n";
        let parsed: toml::Table = toml::from_str(&format!("k = {}", string(odd))).unwrap();
        assert_eq!(parsed["k"].as_str(), Some(odd));
    }
}
