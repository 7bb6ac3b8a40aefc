//! `sf key show|rotate`: the host's cluster keys, and moving it to a new one without a
//! restart (`snowflock_dataplane::keyring`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use snowflock_dataplane::auth::ClusterKey;
use snowflock_dataplane::keyring::{RingStatus, RotationPhase};

use crate::daemon::Daemon;
use crate::error_chain;
use crate::protocol::{ApiResponse, KeyStatus};

/// The ring's state for operators: ids only.
pub(crate) fn status(daemon: &Daemon) -> KeyStatus {
    describe(&daemon.key.status(), &daemon.config.cluster.key_file)
}

fn describe(ring: &RingStatus, key_file: &Path) -> KeyStatus {
    let (phase, retiring, remaining) = match &ring.phase {
        RotationPhase::Settled => ("settled", None, Duration::ZERO),
        RotationPhase::Introducing { old, remaining } => {
            ("introducing", Some(old.to_string()), *remaining)
        }
        RotationPhase::Retiring { old, remaining } => {
            ("retiring", Some(old.to_string()), *remaining)
        }
    };
    KeyStatus {
        current: ring.current.to_string(),
        sending: ring.sending.to_string(),
        retiring,
        phase: phase.to_string(),
        remaining,
        key_file: key_file.to_path_buf(),
    }
}

/// Starts the rotation to `hex` over `window` and saves the new key as the host's key file, so
/// a restarted daemon holds it. The file is replaced only if the rotation starts: the new key
/// is written beside it first and renamed over it after.
pub(crate) fn rotate(daemon: &Daemon, hex: &str, window: Duration) -> ApiResponse {
    let error = |message: String| ApiResponse::Error { message };
    let new = match ClusterKey::from_hex(hex.trim()) {
        Ok(key) => key,
        Err(e) => return error(format!("the new cluster key is malformed: {e}")),
    };
    let key_file = &daemon.config.cluster.key_file;
    let staged = staged_path(key_file);
    if let Err(e) = new.save(&staged) {
        return error(format!("saving the new key: {}", error_chain(&e)));
    }
    let ring = match daemon.key.rotate(new, window) {
        Ok(ring) => ring,
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            return error(format!("rotation refused: {e}"));
        }
    };
    tracing::info!(
        new = %ring.current,
        old = %ring.sending,
        window_ms = window.as_millis() as u64,
        "cluster key rotation started"
    );
    if let Err(e) = std::fs::rename(&staged, key_file) {
        tracing::error!(path = %key_file.display(), %e, "saving the rotated key failed");
        return error(format!(
            "the rotation to key {} started, but {} could not be replaced ({e}); \
             the new key is in {}: move it there before the daemon restarts",
            ring.current,
            key_file.display(),
            staged.display()
        ));
    }
    ApiResponse::Keys(describe(&ring, key_file))
}

fn staged_path(key_file: &Path) -> PathBuf {
    let mut name = key_file.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    key_file.with_file_name(name)
}
