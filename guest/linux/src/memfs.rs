//! The in-VM file system: directories and regular files kept in guest
//! memory, so a clone inherits its parent's files copy-on-write with the
//! rest of its memory, and a clone on another host fetches file data on
//! demand like any other page. Metadata lives in the personality's heap;
//! file data in mappings of the program's address space ([`Memory`]),
//! grown by doubling.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::errno::{EEXIST, EINVAL, EISDIR, ENOENT, ENOTDIR, ENOTEMPTY, SysResult};
use crate::memory::Memory;
use crate::path::split_last;

pub(crate) type Ino = usize;
pub(crate) const ROOT: Ino = 0;

#[derive(Debug)]
pub(crate) enum Kind {
    Dir(BTreeMap<Vec<u8>, Ino>),
    File(Data),
}

/// A file's bytes: `len` used of `capacity` at `addr` (0: none yet).
#[derive(Debug, Default)]
pub(crate) struct Data {
    addr: u64,
    capacity: u64,
    pub(crate) len: u64,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    pub(crate) mode: u32,
    pub(crate) mtime_ns: u64,
    /// Open descriptions and directory entries naming it.
    links: u32,
}

#[derive(Debug)]
pub(crate) struct MemFs {
    nodes: Vec<Option<Node>>,
}

impl Data {
    /// The bytes `[offset, offset + len)` that exist.
    pub(crate) fn read(&self, offset: u64, out: &mut [u8]) -> usize {
        if offset >= self.len {
            return 0;
        }
        let n = (self.len - offset).min(out.len() as u64) as usize;
        // SAFETY: `[addr, addr + len)` is a mapping this file owns, and
        // `offset + n <= len`.
        let src = unsafe { core::slice::from_raw_parts((self.addr + offset) as *const u8, n) };
        out[..n].copy_from_slice(src);
        n
    }

    /// All of the file's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `[addr, addr + len)` is a mapping this file owns.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len as usize) }
    }

    fn reserve(&mut self, memory: &mut Memory, needed: u64) -> SysResult {
        if needed <= self.capacity {
            return Ok(0);
        }
        let capacity = needed.max(self.capacity * 2).max(4096).next_power_of_two();
        self.addr = if self.capacity == 0 {
            memory.map(0, capacity, 0)?
        } else {
            memory.remap(
                self.addr,
                self.capacity,
                capacity,
                crate::memory::MREMAP_MAYMOVE,
            )?
        };
        self.capacity = capacity;
        Ok(0)
    }

    pub(crate) fn write(&mut self, memory: &mut Memory, offset: u64, bytes: &[u8]) -> SysResult {
        let end = offset.checked_add(bytes.len() as u64).ok_or(EINVAL)?;
        self.reserve(memory, end)?;
        if offset > self.len {
            // A hole reads as zeros: the mapping may hold an old tail.
            self.zero(self.len, offset);
        }
        // SAFETY: `reserve` made `[addr, addr + end)` this file's mapping.
        let dst = unsafe {
            core::slice::from_raw_parts_mut((self.addr + offset) as *mut u8, bytes.len())
        };
        dst.copy_from_slice(bytes);
        self.len = self.len.max(end);
        Ok(bytes.len() as u64)
    }

    pub(crate) fn truncate(&mut self, memory: &mut Memory, len: u64) -> SysResult {
        if len > self.len {
            self.reserve(memory, len)?;
            self.zero(self.len, len);
        }
        self.len = len;
        Ok(0)
    }

    fn zero(&mut self, from: u64, to: u64) {
        // SAFETY: callers keep `to` within the reserved capacity.
        unsafe { core::ptr::write_bytes((self.addr + from) as *mut u8, 0, (to - from) as usize) };
    }

    fn release(&mut self, memory: &mut Memory) {
        if self.capacity > 0 {
            let _ = memory.unmap(self.addr, self.capacity);
        }
        *self = Self::default();
    }
}

impl MemFs {
    pub(crate) fn new(now_ns: u64) -> Self {
        let root = Node {
            kind: Kind::Dir(BTreeMap::new()),
            mode: 0o040_755,
            mtime_ns: now_ns,
            links: 1,
        };
        Self {
            nodes: alloc::vec![Some(root)],
        }
    }

    pub(crate) fn node(&self, ino: Ino) -> &Node {
        self.nodes[ino].as_ref().expect("a live inode")
    }

    pub(crate) fn node_mut(&mut self, ino: Ino) -> &mut Node {
        self.nodes[ino].as_mut().expect("a live inode")
    }

    /// The inode at a normalized absolute path.
    pub(crate) fn lookup(&self, path: &[u8]) -> Result<Ino, u64> {
        let mut ino = ROOT;
        for name in path.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            match &self.node(ino).kind {
                Kind::Dir(entries) => ino = *entries.get(name).ok_or(ENOENT)?,
                Kind::File(_) => return Err(ENOTDIR),
            }
        }
        Ok(ino)
    }

    fn entries_mut(&mut self, dir: Ino) -> Result<&mut BTreeMap<Vec<u8>, Ino>, u64> {
        match &mut self.node_mut(dir).kind {
            Kind::Dir(entries) => Ok(entries),
            Kind::File(_) => Err(ENOTDIR),
        }
    }

    fn add(&mut self, node: Node) -> Ino {
        match self.nodes.iter().position(Option::is_none) {
            Some(free) => {
                self.nodes[free] = Some(node);
                free
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        }
    }

    /// Creates `path` (its parent must exist) as a directory or an empty file.
    pub(crate) fn create(
        &mut self,
        path: &[u8],
        dir: bool,
        mode: u32,
        now_ns: u64,
    ) -> Result<Ino, u64> {
        let (parent, name) = split_last(path).ok_or(EEXIST)?;
        let parent = self.lookup(parent)?;
        if self.entries_mut(parent)?.contains_key(name) {
            return Err(EEXIST);
        }
        let kind = if dir {
            Kind::Dir(BTreeMap::new())
        } else {
            Kind::File(Data::default())
        };
        let file_type = if dir { 0o040_000 } else { 0o100_000 };
        let ino = self.add(Node {
            kind,
            mode: file_type | (mode & 0o7777),
            mtime_ns: now_ns,
            links: 1,
        });
        self.entries_mut(parent)?.insert(name.to_vec(), ino);
        self.node_mut(parent).mtime_ns = now_ns;
        Ok(ino)
    }

    /// `mkdir -p`: every missing directory of `path`.
    pub(crate) fn create_dirs(&mut self, path: &[u8], now_ns: u64) {
        let mut prefix = Vec::new();
        for name in path.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            prefix.push(b'/');
            prefix.extend_from_slice(name);
            if self.lookup(&prefix).is_err() {
                let _ = self.create(&prefix, true, 0o755, now_ns);
            }
        }
    }

    /// Removes the entry `path`: a file (`dir` false) or an empty directory.
    pub(crate) fn remove(&mut self, memory: &mut Memory, path: &[u8], dir: bool) -> SysResult {
        let (parent_path, name) = split_last(path).ok_or(EINVAL)?;
        let parent = self.lookup(parent_path)?;
        let ino = *self.entries_mut(parent)?.get(name).ok_or(ENOENT)?;
        match (&self.node(ino).kind, dir) {
            (Kind::Dir(entries), true) if !entries.is_empty() => return Err(ENOTEMPTY),
            (Kind::Dir(_), false) => return Err(EISDIR),
            (Kind::File(_), true) => return Err(ENOTDIR),
            _ => {}
        }
        self.entries_mut(parent)?.remove(name);
        self.unlink(memory, ino);
        Ok(0)
    }

    /// Moves `from` to `to`, replacing a file (or an empty directory) there.
    pub(crate) fn rename(&mut self, memory: &mut Memory, from: &[u8], to: &[u8]) -> SysResult {
        if from == to {
            return Ok(0);
        }
        if to.starts_with(from) && to.get(from.len()) == Some(&b'/') {
            return Err(EINVAL);
        }
        let (from_parent, from_name) = split_last(from).ok_or(EINVAL)?;
        let (to_parent, to_name) = split_last(to).ok_or(EINVAL)?;
        let from_dir = self.lookup(from_parent)?;
        let to_dir = self.lookup(to_parent)?;
        let ino = *self.entries_mut(from_dir)?.get(from_name).ok_or(ENOENT)?;
        let moving_dir = matches!(self.node(ino).kind, Kind::Dir(_));
        if let Some(&old) = self.entries_mut(to_dir)?.get(to_name) {
            match (&self.node(old).kind, moving_dir) {
                (Kind::Dir(e), true) if !e.is_empty() => return Err(ENOTEMPTY),
                (Kind::Dir(_), false) => return Err(EISDIR),
                (Kind::File(_), true) => return Err(ENOTDIR),
                _ => {}
            }
            self.unlink(memory, old);
        }
        self.entries_mut(from_dir)?.remove(from_name);
        self.entries_mut(to_dir)?.insert(to_name.to_vec(), ino);
        Ok(0)
    }

    /// One more open description of `ino`.
    pub(crate) fn hold(&mut self, ino: Ino) {
        self.node_mut(ino).links += 1;
    }

    /// Drops a link (a directory entry or an open description); the last
    /// one frees the node and its data.
    pub(crate) fn unlink(&mut self, memory: &mut Memory, ino: Ino) {
        let node = self.node_mut(ino);
        node.links -= 1;
        if node.links == 0
            && let Some(Node {
                kind: Kind::File(mut data),
                ..
            }) = self.nodes[ino].take()
        {
            data.release(memory);
        }
    }

    /// The files under directory `dir`, depth first, with their paths
    /// relative to it.
    pub(crate) fn files_under(&self, dir: Ino) -> Vec<(Vec<u8>, Ino)> {
        let mut found = Vec::new();
        let mut pending = alloc::vec![(Vec::new(), dir)];
        while let Some((prefix, ino)) = pending.pop() {
            if let Kind::Dir(entries) = &self.node(ino).kind {
                for (name, &child) in entries {
                    let mut path = prefix.clone();
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(name);
                    match self.node(child).kind {
                        Kind::Dir(_) => pending.push((path, child)),
                        Kind::File(_) => found.push((path, child)),
                    }
                }
            }
        }
        found
    }

    pub(crate) fn data_mut(&mut self, ino: Ino) -> Result<&mut Data, u64> {
        match &mut self.node_mut(ino).kind {
            Kind::File(data) => Ok(data),
            Kind::Dir(_) => Err(EISDIR),
        }
    }
}
