//! The cluster keys a host holds while the cluster moves from one key to the next.
//!
//! A rotation replaces the key of every host without stopping the cluster. The operator runs
//! `sf key rotate NEW_KEY --window W` on every host, each within `W / 2` of the first. On each
//! host the rotation has two halves of `W / 2`:
//!
//! 1. *introducing*: the new key is accepted, the old one is still the one sent with;
//! 2. *retiring*: the new key is sent with, the old one is still accepted.
//!
//! After `W` only the new key is held. With every host rotated within `W / 2` of the first,
//! every key a host sends with is one its peer accepts at that moment: a host sends with the
//! new key only from `W / 2` after its own rotation, when every other host holds the new key
//! too; and it sends with the old key at most until then, when every other host still accepts
//! it (for `W` after its own rotation, which came at most `W / 2` earlier).
//!
//! What a key was used for outlives its retirement where it must: an mcdist family keeps the
//! fragment key it was registered with, and a connection keeps its session key.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::auth::{ClusterKey, KeyId, KeySource};
use crate::sync::{read, write};

/// A host's cluster keys, shared by every part of it that authenticates or seals.
///
/// Cloning gives another handle to the same keys; a rotation is seen by every handle at once.
#[derive(Clone, Debug)]
pub struct KeyRing {
    state: Arc<RwLock<RingState>>,
}

#[derive(Debug)]
struct RingState {
    current: ClusterKey,
    previous: Option<Rotation>,
}

#[derive(Debug)]
struct Rotation {
    old: ClusterKey,
    started: Instant,
    window: Duration,
}

impl Rotation {
    fn sends_old(&self, now: Instant) -> bool {
        now < self.started + self.window / 2
    }

    fn accepts_old(&self, now: Instant) -> bool {
        now < self.started + self.window
    }
}

/// Where a ring's rotation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationPhase {
    /// One key, no rotation under way.
    Settled,
    /// The new key is accepted; the old one is sent with for `remaining`.
    Introducing {
        /// The key being retired.
        old: KeyId,
        /// Until the new key is sent with.
        remaining: Duration,
    },
    /// The new key is sent with; the old one is accepted for `remaining`.
    Retiring {
        /// The key being retired.
        old: KeyId,
        /// Until the old key is dropped.
        remaining: Duration,
    },
}

/// A ring's keys and phase, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingStatus {
    /// The newest key.
    pub current: KeyId,
    /// The key sent with now.
    pub sending: KeyId,
    /// The rotation's phase.
    pub phase: RotationPhase,
}

/// Why a rotation was refused; the ring is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotateError {
    /// The new key is the key held now.
    #[error("key {id} is already this host's cluster key")]
    SameKey {
        /// Its id.
        id: KeyId,
    },
    /// The new key has the id of the key held now (a 2^-32 chance, or a crafted key).
    #[error("the new key's id {id} is that of the current key; draw another key")]
    IdClash {
        /// The shared id.
        id: KeyId,
    },
    /// The previous rotation still accepts its old key.
    #[error(
        "a rotation from key {old} is still under way for {remaining:?}; \
         rotate again once it is done"
    )]
    InProgress {
        /// The key it retires.
        old: KeyId,
        /// Until it is done.
        remaining: Duration,
    },
    /// A window of zero would drop the old key at once, before other hosts hold the new one.
    #[error("a rotation window must be longer than zero")]
    ZeroWindow,
}

impl KeyRing {
    /// A ring holding `key` alone.
    pub fn new(key: ClusterKey) -> KeyRing {
        KeyRing {
            state: Arc::new(RwLock::new(RingState {
                current: key,
                previous: None,
            })),
        }
    }

    /// Starts moving to `new` over `window` (see the module documentation).
    pub fn rotate(&self, new: ClusterKey, window: Duration) -> Result<RingStatus, RotateError> {
        self.rotate_at(new, window, Instant::now())
    }

    fn rotate_at(
        &self,
        new: ClusterKey,
        window: Duration,
        now: Instant,
    ) -> Result<RingStatus, RotateError> {
        if window.is_zero() {
            return Err(RotateError::ZeroWindow);
        }
        let mut state = write(&self.state);
        if new == state.current {
            return Err(RotateError::SameKey { id: new.id() });
        }
        if new.id() == state.current.id() {
            return Err(RotateError::IdClash { id: new.id() });
        }
        if let Some(rotation) = state.previous.as_ref().filter(|r| r.accepts_old(now)) {
            return Err(RotateError::InProgress {
                old: rotation.old.id(),
                remaining: (rotation.started + rotation.window).saturating_duration_since(now),
            });
        }
        let old = std::mem::replace(&mut state.current, new);
        state.previous = Some(Rotation {
            old,
            started: now,
            window,
        });
        Ok(status_of(&state, now))
    }

    /// The keys and the rotation's phase now.
    pub fn status(&self) -> RingStatus {
        status_of(&read(&self.state), Instant::now())
    }

    /// The newest key, and the old one while it is still accepted.
    pub fn accepted_keys(&self) -> (ClusterKey, Option<ClusterKey>) {
        let now = Instant::now();
        let state = read(&self.state);
        let old = state
            .previous
            .as_ref()
            .filter(|r| r.accepts_old(now))
            .map(|r| r.old.clone());
        (state.current.clone(), old)
    }

    fn sending_at(&self, now: Instant) -> ClusterKey {
        let state = read(&self.state);
        match &state.previous {
            Some(rotation) if rotation.sends_old(now) => rotation.old.clone(),
            _ => state.current.clone(),
        }
    }

    fn accepted_at(&self, id: KeyId, now: Instant) -> Option<ClusterKey> {
        let state = read(&self.state);
        if state.current.id() == id {
            return Some(state.current.clone());
        }
        state
            .previous
            .as_ref()
            .filter(|r| r.accepts_old(now) && r.old.id() == id)
            .map(|r| r.old.clone())
    }
}

fn status_of(state: &RingState, now: Instant) -> RingStatus {
    let current = state.current.id();
    let phase = match &state.previous {
        Some(r) if r.sends_old(now) => RotationPhase::Introducing {
            old: r.old.id(),
            remaining: (r.started + r.window / 2).saturating_duration_since(now),
        },
        Some(r) if r.accepts_old(now) => RotationPhase::Retiring {
            old: r.old.id(),
            remaining: (r.started + r.window).saturating_duration_since(now),
        },
        _ => RotationPhase::Settled,
    };
    let sending = match &phase {
        RotationPhase::Introducing { old, .. } => *old,
        _ => current,
    };
    RingStatus {
        current,
        sending,
        phase,
    }
}

impl KeySource for KeyRing {
    fn sending(&self) -> ClusterKey {
        self.sending_at(Instant::now())
    }

    fn accepted(&self, id: KeyId) -> Option<ClusterKey> {
        self.accepted_at(id, Instant::now())
    }
}

impl From<ClusterKey> for KeyRing {
    fn from(key: ClusterKey) -> KeyRing {
        KeyRing::new(key)
    }
}

impl From<&KeyRing> for KeyRing {
    fn from(ring: &KeyRing) -> KeyRing {
        ring.clone()
    }
}

impl From<&ClusterKey> for KeyRing {
    fn from(key: &ClusterKey) -> KeyRing {
        KeyRing::new(key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::from_bytes([byte; 32])
    }

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn a_rotation_introduces_then_retires_the_old_key() {
        let ring = KeyRing::new(key(1));
        let t0 = Instant::now();
        ring.rotate_at(key(2), WINDOW, t0).unwrap();
        let (old, new) = (key(1).id(), key(2).id());
        let at = |secs| t0 + Duration::from_secs(secs);
        // Introducing: both accepted, the old one sent with.
        assert_eq!(ring.sending_at(at(29)), key(1));
        assert_eq!(ring.accepted_at(old, at(29)), Some(key(1)));
        assert_eq!(ring.accepted_at(new, at(29)), Some(key(2)));
        // Retiring: both accepted, the new one sent with.
        assert_eq!(ring.sending_at(at(30)), key(2));
        assert_eq!(ring.accepted_at(old, at(59)), Some(key(1)));
        // Done: the old key is gone.
        assert_eq!(ring.accepted_at(old, at(60)), None);
        assert_eq!(ring.accepted_at(new, at(60)), Some(key(2)));
        assert_eq!(ring.accepted_at(key(3).id(), at(0)), None);
    }

    #[test]
    fn hosts_rotated_within_half_the_window_always_accept_what_the_other_sends() {
        let t0 = Instant::now();
        for lag in [0, 1, 15, 29, 30] {
            let first = KeyRing::new(key(1));
            let second = KeyRing::new(key(1));
            first.rotate_at(key(2), WINDOW, t0).unwrap();
            for tick in 0..=200u64 {
                let now = t0 + Duration::from_millis(tick * 500);
                if tick * 500 == lag * 1000 {
                    second.rotate_at(key(2), WINDOW, now).unwrap();
                }
                for (from, to) in [(&first, &second), (&second, &first)] {
                    let sent = from.sending_at(now);
                    assert_eq!(
                        to.accepted_at(sent.id(), now),
                        Some(sent.clone()),
                        "lag {lag} s, at {} ms",
                        tick * 500
                    );
                }
            }
        }
    }

    #[test]
    fn rotations_that_would_lose_a_key_are_refused() {
        let ring = KeyRing::new(key(1));
        let t0 = Instant::now();
        assert_eq!(
            ring.rotate_at(key(1), WINDOW, t0),
            Err(RotateError::SameKey { id: key(1).id() })
        );
        assert_eq!(
            ring.rotate_at(key(2), Duration::ZERO, t0),
            Err(RotateError::ZeroWindow)
        );
        ring.rotate_at(key(2), WINDOW, t0).unwrap();
        assert!(matches!(
            ring.rotate_at(key(3), WINDOW, t0 + Duration::from_secs(59)),
            Err(RotateError::InProgress { old, .. }) if old == key(1).id()
        ));
        let status = ring
            .rotate_at(key(3), WINDOW, t0 + Duration::from_secs(60))
            .unwrap();
        assert_eq!(status.current, key(3).id());
        assert_eq!(status.sending, key(2).id());
        assert!(
            matches!(status.phase, RotationPhase::Introducing { old, .. } if old == key(2).id())
        );
    }
}
