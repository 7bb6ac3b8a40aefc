//! Recorded working sets across jobs: which clone point a recording belongs to
//! ([`ClonePointKey`]: the image a root VM booted and the clone point's generation in it),
//! and the bounded store of recordings ([`WorkingSets`]) the parent's host keeps, so that
//! the next job of the same image pushes the pages its clones will ask for first.
//!
//! A recording only orders a push (the pages sent are read from the image served now), so a
//! wrong one costs time, never correctness; still, one applies only to the same image and
//! the same generation: the clone points of a later generation (the parent wrote since)
//! start from the store's own order.

use std::collections::VecDeque;

use sha2::{Digest, Sha256};
use snowflock_dataplane::mcast::WorkingSet;

/// What a root VM booted: its image's bytes, memory size and command line, hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageDigest([u8; 32]);

impl ImageDigest {
    pub fn of(image: &[u8], mem_size: u64, cmdline: &str) -> ImageDigest {
        let mut hash = Sha256::new();
        hash.update((image.len() as u64).to_le_bytes());
        hash.update(image);
        hash.update(mem_size.to_le_bytes());
        hash.update(cmdline.as_bytes());
        ImageDigest(hash.finalize().into())
    }
}

/// A clone point as jobs of the same image see it: the n-th clone point of a VM booted
/// from the same image, memory size and command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClonePointKey {
    pub image: ImageDigest,
    /// The clone point's generation in its VM (1 for the first).
    pub generation: u32,
}

/// The recordings of the clone points served lately, at most `capacity`, oldest dropped
/// first; a clone point's newer recording replaces its older.
#[derive(Debug)]
pub struct WorkingSets {
    capacity: usize,
    recorded: VecDeque<(ClonePointKey, WorkingSet)>,
}

impl WorkingSets {
    /// A store of at most `capacity` recordings (0: recording is off).
    pub fn new(capacity: usize) -> WorkingSets {
        WorkingSets {
            capacity,
            recorded: VecDeque::new(),
        }
    }

    /// Recordings it keeps at most (0: recording is off).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keeps `set` as what the clones of `key` asked for.
    pub fn record(&mut self, key: ClonePointKey, set: WorkingSet) {
        if self.capacity == 0 {
            return;
        }
        self.recorded.retain(|(k, _)| *k != key);
        if self.recorded.len() == self.capacity {
            self.recorded.pop_front();
        }
        self.recorded.push_back((key, set));
    }

    /// The recording of exactly this clone point: same image, same generation.
    pub fn get(&self, key: &ClonePointKey) -> Option<&WorkingSet> {
        self.recorded
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, set)| set)
    }
}

#[cfg(test)]
mod tests {
    use super::{ClonePointKey, ImageDigest, WorkingSets};
    use snowflock_dataplane::mcast::WorkingSet;

    fn key(image: &ImageDigest, generation: u32) -> ClonePointKey {
        ClonePointKey {
            image: *image,
            generation,
        }
    }

    #[test]
    fn an_image_is_told_apart_by_its_bytes_memory_and_command_line() {
        let image = ImageDigest::of(b"\x7fELF one", 64 << 20, "clones=8");
        assert_eq!(image, ImageDigest::of(b"\x7fELF one", 64 << 20, "clones=8"));
        assert_ne!(image, ImageDigest::of(b"\x7fELF two", 64 << 20, "clones=8"));
        assert_ne!(
            image,
            ImageDigest::of(b"\x7fELF one", 128 << 20, "clones=8")
        );
        assert_ne!(image, ImageDigest::of(b"\x7fELF one", 64 << 20, "clones=4"));
    }

    #[test]
    fn a_recording_applies_to_its_own_generation_only() {
        let image = ImageDigest::of(b"image", 1 << 20, "");
        let other = ImageDigest::of(b"rebuilt image", 1 << 20, "");
        let mut sets = WorkingSets::new(4);
        sets.record(key(&image, 1), WorkingSet::default());
        assert!(sets.get(&key(&image, 1)).is_some());
        assert!(sets.get(&key(&image, 2)).is_none(), "a newer generation");
        assert!(sets.get(&key(&other, 1)).is_none(), "another image");
    }

    #[test]
    fn the_store_keeps_its_newest_recordings() {
        let image = ImageDigest::of(b"image", 1 << 20, "");
        let mut sets = WorkingSets::new(2);
        for generation in 1..=3 {
            sets.record(key(&image, generation), WorkingSet::default());
        }
        sets.record(key(&image, 2), WorkingSet::default());
        assert!(sets.get(&key(&image, 1)).is_none());
        assert!(sets.get(&key(&image, 2)).is_some());
        assert!(sets.get(&key(&image, 3)).is_some());
        let mut off = WorkingSets::new(0);
        off.record(key(&image, 1), WorkingSet::default());
        assert!(off.get(&key(&image, 1)).is_none());
    }
}
