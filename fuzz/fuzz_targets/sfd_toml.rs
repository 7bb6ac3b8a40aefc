//! sfd's configuration files: `DaemonConfig::parse` (what `DaemonConfig::load`
//! runs on sfd.toml) and `ClusterKey::from_hex` (the key file's text). A
//! configuration that parses serializes to TOML that parses to the same
//! configuration; a key that parses prints as the same hex.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_control::config::DaemonConfig;
use snowflock_dataplane::auth::ClusterKey;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = ClusterKey::from_hex(text) {
        assert_eq!(key.to_hex(), text.to_ascii_lowercase());
    }
    let Ok(config) = DaemonConfig::parse(text) else {
        return;
    };
    let Ok(printed) = toml::to_string(&config) else {
        return;
    };
    let again = DaemonConfig::parse(&printed)
        .unwrap_or_else(|e| panic!("a printed configuration does not parse: {e}\n{printed}"));
    assert_eq!(
        toml::to_string(&again).expect("prints"),
        printed,
        "{config:?} and {again:?} differ"
    );
});
