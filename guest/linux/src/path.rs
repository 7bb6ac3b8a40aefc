//! Paths: made absolute against a directory, normalized (`.`, `..`, repeated
//! slashes), and located either under a host mount or in the in-VM file
//! system.

use alloc::vec::Vec;

use snowflock_guest::abi::linux::files::{MAX_MOUNTS, MOUNTS_ADDR, MountEntry};

/// `base` joined with `path` (unless `path` is absolute), normalized.
/// `..` never climbs above `/`. The result starts with `/` and has no
/// trailing slash (except `/` itself).
pub(crate) fn absolute(base: &[u8], path: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    let joined = if path.first() == Some(&b'/') {
        [path].into_iter().chain(None)
    } else {
        [base].into_iter().chain(Some(path))
    };
    for piece in joined {
        for part in piece.split(|&b| b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    parts.pop();
                }
                name => parts.push(name),
            }
        }
    }
    let mut out = Vec::with_capacity(path.len() + base.len() + 1);
    for part in &parts {
        out.push(b'/');
        out.extend_from_slice(part);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// The parent directory and the last component of a normalized path
/// (`None` for `/`).
pub(crate) fn split_last(path: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = path.iter().rposition(|&b| b == b'/')?;
    let name = &path[at + 1..];
    if name.is_empty() {
        return None;
    }
    let parent = if at == 0 { &b"/"[..] } else { &path[..at] };
    Some((parent, name))
}

/// Where a normalized path lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location<'p> {
    /// Under mount `index`, at this relative path (empty: the mount itself).
    Mount { index: u64, rel: &'p [u8] },
    /// In the in-VM file system.
    Memory,
}

/// The guest paths of the host mounts, from the table the VMM wrote.
#[derive(Debug, Default)]
pub(crate) struct Mounts {
    paths: Vec<Vec<u8>>,
}

impl Mounts {
    pub(crate) fn from_table() -> Self {
        // SAFETY: the VMM maps the mount table page read-only at MOUNTS_ADDR
        // for Linux-ABI guests and never changes it.
        let count = unsafe { core::ptr::read(MOUNTS_ADDR as *const u64) }.min(MAX_MOUNTS);
        let paths = (0..count)
            .map(|i| {
                let at = MOUNTS_ADDR + 8 + i * size_of::<MountEntry>() as u64;
                // SAFETY: as above; `count` entries follow the count, all
                // inside the page (MAX_MOUNTS of them fit).
                let entry = unsafe { core::ptr::read(at as *const MountEntry) };
                let len = (entry.len as usize).min(entry.path.len());
                entry.path[..len].to_vec()
            })
            .collect();
        Self { paths }
    }

    pub(crate) fn paths(&self) -> impl Iterator<Item = &[u8]> {
        self.paths.iter().map(Vec::as_slice)
    }

    /// The mount holding `path` (the longest match), or the in-VM file system.
    pub(crate) fn locate<'p>(&self, path: &'p [u8]) -> Location<'p> {
        let mut best: Option<(usize, &'p [u8])> = None;
        for (index, mount) in self.paths.iter().enumerate() {
            let rel = if path == mount.as_slice() {
                Some(&path[path.len()..])
            } else if path.starts_with(mount) && path.get(mount.len()) == Some(&b'/') {
                Some(&path[mount.len() + 1..])
            } else {
                None
            };
            if let Some(rel) = rel
                && best.is_none_or(|(b, _)| self.paths[b].len() < mount.len())
            {
                best = Some((index, rel));
            }
        }
        match best {
            Some((index, rel)) => Location::Mount {
                index: index as u64,
                rel,
            },
            None => Location::Memory,
        }
    }
}
