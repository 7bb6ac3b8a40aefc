//! Open files: the descriptor table, the working directory, and the file
//! system calls over three kinds of file: the console streams and standard
//! input, host files beneath read-only mounts, and the in-VM file system.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use crate::console::Stream;
use crate::errno::{
    EBADF, EINVAL, EISDIR, EMFILE, ENOENT, ENOTDIR, ENOTTY, EROFS, ESPIPE, EXDEV, SysResult,
};
use crate::host;
use crate::memfs::{Ino, Kind, MemFs};
use crate::memory::Memory;
use crate::path::{self, Location, Mounts};
use crate::user::UserMemory;

pub(crate) const AT_FDCWD: u64 = (-100i64) as u64;
pub(crate) const AT_EMPTY_PATH: u64 = 0x1000;
pub(crate) const AT_REMOVEDIR: u64 = 0x200;
pub(crate) const AT_SYMLINK_NOFOLLOW: u64 = 0x100;
const O_ACCMODE: u64 = 3;
const O_RDONLY: u64 = 0;
const O_WRONLY: u64 = 1;
const O_CREAT: u64 = 0o100;
const O_EXCL: u64 = 0o200;
const O_TRUNC: u64 = 0o1000;
const O_APPEND: u64 = 0o2000;
const O_DIRECTORY: u64 = 0o200_000;
const O_CLOEXEC: u64 = 0o2_000_000;
const O_PATH: u64 = 0o10_000_000;
const O_TMPFILE: u64 = 0o20_000_000;
const SEEK_SET: u64 = 0;
const SEEK_CUR: u64 = 1;
const SEEK_END: u64 = 2;
const MAX_FDS: usize = 1024;
const S_IFIFO: u32 = 0o010_000;
const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const DT_DIR: u8 = 4;
const DT_REG: u8 = 8;
const DT_LNK: u8 = 10;
const DT_UNKNOWN: u8 = 0;
/// Host files report 1 MiB blocks, so stdio reads them in large chunks.
const HOST_BLOCK: i64 = 1 << 20;
/// Devices in `st_dev`: the in-VM file system, and mount `i` as `MOUNT_DEV + i`.
const MEMORY_DEV: u64 = 1;
const MOUNT_DEV: u64 = 16;

#[derive(Debug)]
enum Target {
    Stdin,
    Stdout,
    Stderr,
    HostFile { mount: u64, rel: Vec<u8> },
    HostDir { mount: u64, rel: Vec<u8> },
    MemFile(Ino),
    MemDir(Ino),
}

/// An open file description (shared by duplicated descriptors).
#[derive(Debug)]
struct Description {
    target: Target,
    /// The absolute path it was opened by (directories: the base of `*at` calls).
    path: Vec<u8>,
    offset: u64,
    /// Access mode and `O_APPEND`.
    flags: u64,
}

#[derive(Debug)]
struct Slot {
    description: Rc<RefCell<Description>>,
    cloexec: bool,
}

/// `struct stat` on x86-64.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Stat {
    dev: u64,
    ino: u64,
    nlink: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    pad: u32,
    rdev: u64,
    size: i64,
    blksize: i64,
    blocks: i64,
    times: [i64; 6],
    reserved: [i64; 3],
}
const _: () = assert!(size_of::<Stat>() == 144);

impl Stat {
    fn with_mtime(mut self, ns: u64) -> Self {
        let (sec, nsec) = ((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as i64);
        self.times = [sec, nsec, sec, nsec, sec, nsec];
        self
    }
}

/// What a call that may write files works with: the program's memory for
/// its arguments, the address space for file data, and the time.
pub(crate) struct Env<'a> {
    pub(crate) user: &'a UserMemory,
    pub(crate) memory: &'a mut Memory,
    pub(crate) now_ns: u64,
}

#[derive(Debug)]
pub(crate) struct Files {
    table: Vec<Option<Slot>>,
    cwd: Vec<u8>,
    mounts: Mounts,
    fs: MemFs,
    stdout: Stream,
    stderr: Stream,
}

/// A descriptor argument: the kernel reads an `int` (the low 32 bits).
fn fd_index(fd: u64) -> usize {
    fd as u32 as usize
}

/// Whether a directory descriptor argument is `AT_FDCWD` (an `int`, -100).
fn is_cwd(dirfd: u64) -> bool {
    dirfd as u32 as i32 == AT_FDCWD as i32
}

fn description(target: Target, path: &[u8], flags: u64) -> Rc<RefCell<Description>> {
    Rc::new(RefCell::new(Description {
        target,
        path: path.to_vec(),
        offset: 0,
        flags,
    }))
}

impl Files {
    /// Standard input, output and error open; `/out`, `/tmp` and the mount
    /// points exist.
    pub(crate) fn new(now_ns: u64) -> Self {
        let mounts = Mounts::from_table();
        let mut fs = MemFs::new(now_ns);
        for dir in [&b"/out"[..], b"/tmp"].into_iter().chain(mounts.paths()) {
            fs.create_dirs(dir, now_ns);
        }
        let standard = [
            (Target::Stdin, O_RDONLY),
            (Target::Stdout, O_WRONLY),
            (Target::Stderr, O_WRONLY),
        ];
        let table = standard
            .into_iter()
            .map(|(target, flags)| {
                Some(Slot {
                    description: description(target, b"/", flags),
                    cloexec: false,
                })
            })
            .collect();
        Self {
            table,
            cwd: b"/".to_vec(),
            mounts,
            fs,
            stdout: Stream::default(),
            stderr: Stream::default(),
        }
    }

    pub(crate) fn flush(&mut self) {
        self.stdout.flush();
        self.stderr.flush();
    }

    /// Flushes the console and writes every file under `/out` to the host
    /// (the VM's output directory), as the program ends. A file that
    /// cannot be written is reported on standard error; the rest go on.
    pub(crate) fn finish(&mut self) {
        self.flush();
        let Ok(out) = self.fs.lookup(b"/out") else {
            return;
        };
        for (rel, ino) in self.fs.files_under(out) {
            let Ok(data) = self.fs.data_mut(ino) else {
                continue;
            };
            if let Err(errno) = host::output(&rel, data.bytes()) {
                let line = alloc::format!(
                    "sf-linux: writing /out/{} to the host failed: errno {errno}\n",
                    alloc::string::String::from_utf8_lossy(&rel)
                );
                self.stderr.write(line.as_bytes());
                self.stderr.flush();
            }
        }
    }

    fn get(&self, fd: u64) -> Result<Rc<RefCell<Description>>, u64> {
        let slot = self.table.get(fd_index(fd));
        Ok(slot
            .and_then(Option::as_ref)
            .ok_or(EBADF)?
            .description
            .clone())
    }

    fn install(
        &mut self,
        description: Rc<RefCell<Description>>,
        lowest: usize,
        cloexec: bool,
    ) -> SysResult {
        let free = (lowest..MAX_FDS)
            .find(|&fd| self.table.get(fd).is_none_or(Option::is_none))
            .ok_or(EMFILE)?;
        if free >= self.table.len() {
            self.table.resize_with(free + 1, || None);
        }
        self.table[free] = Some(Slot {
            description,
            cloexec,
        });
        Ok(free as u64)
    }

    /// Drops a reference to a description; the last one releases its inode.
    fn release(&mut self, memory: &mut Memory, description: Rc<RefCell<Description>>) {
        if let Ok(description) = Rc::try_unwrap(description) {
            match description.into_inner().target {
                Target::MemFile(ino) | Target::MemDir(ino) => self.fs.unlink(memory, ino),
                _ => {}
            }
        }
    }

    /// The absolute path `path` names relative to `dirfd`.
    fn resolve(&self, user: &UserMemory, dirfd: u64, path: u64) -> Result<Vec<u8>, u64> {
        let path = user.path(path)?;
        self.resolve_bytes(dirfd, path)
    }

    fn resolve_bytes(&self, dirfd: u64, path: &[u8]) -> Result<Vec<u8>, u64> {
        if path.first() == Some(&b'/') || is_cwd(dirfd) {
            return Ok(path::absolute(&self.cwd, path));
        }
        let dir = self.get(dirfd)?;
        let dir = dir.borrow();
        match dir.target {
            Target::HostDir { .. } | Target::MemDir(_) => Ok(path::absolute(&dir.path, path)),
            _ => Err(ENOTDIR),
        }
    }

    pub(crate) fn openat(
        &mut self,
        env: &mut Env<'_>,
        dirfd: u64,
        path: u64,
        flags: u64,
        mode: u64,
    ) -> SysResult {
        let now_ns = env.now_ns;
        let path = self.resolve(env.user, dirfd, path)?;
        if flags & O_TMPFILE == O_TMPFILE {
            return Err(EINVAL);
        }
        let access = flags & O_ACCMODE;
        let writes = access != O_RDONLY || flags & (O_CREAT | O_TRUNC) != 0;
        let cloexec = flags & O_CLOEXEC != 0;
        let target = match self.mounts.locate(&path) {
            Location::Mount { index, rel } => {
                let stat = host::stat(index, rel, true)?;
                if writes {
                    return Err(EROFS);
                }
                let dir = stat.mode as u32 & S_IFMT == S_IFDIR;
                if flags & O_DIRECTORY != 0 && !dir {
                    return Err(ENOTDIR);
                }
                let rel = rel.to_vec();
                if dir {
                    Target::HostDir { mount: index, rel }
                } else {
                    Target::HostFile { mount: index, rel }
                }
            }
            Location::Memory => {
                let ino = match self.fs.lookup(&path) {
                    Ok(_) if flags & (O_CREAT | O_EXCL) == O_CREAT | O_EXCL => {
                        return Err(crate::errno::EEXIST);
                    }
                    Ok(ino) => ino,
                    Err(ENOENT) if flags & O_CREAT != 0 => {
                        self.fs.create(&path, false, mode as u32, now_ns)?
                    }
                    Err(e) => return Err(e),
                };
                match self.fs.node(ino).kind {
                    Kind::Dir(_) if writes => return Err(EISDIR),
                    Kind::Dir(_) => Target::MemDir(ino),
                    Kind::File(_) if flags & O_DIRECTORY != 0 => return Err(ENOTDIR),
                    Kind::File(_) => {
                        if flags & O_TRUNC != 0 && access != O_RDONLY {
                            self.fs.data_mut(ino)?.truncate(env.memory, 0)?;
                            self.fs.node_mut(ino).mtime_ns = now_ns;
                        }
                        Target::MemFile(ino)
                    }
                }
            }
        };
        if let Target::MemFile(ino) | Target::MemDir(ino) = target {
            self.fs.hold(ino);
        }
        let status = flags & (O_ACCMODE | O_APPEND | O_PATH);
        self.install(description(target, &path, status), 0, cloexec)
    }

    pub(crate) fn close(&mut self, memory: &mut Memory, fd: u64) -> SysResult {
        let slot = self
            .table
            .get_mut(fd_index(fd))
            .and_then(Option::take)
            .ok_or(EBADF)?;
        self.release(memory, slot.description);
        Ok(0)
    }

    /// Reads at `offset` (or the description's offset, advanced, when `None`).
    pub(crate) fn read(
        &mut self,
        user: &UserMemory,
        fd: u64,
        buf: u64,
        len: u64,
        at: Option<u64>,
    ) -> SysResult {
        let out = user.bytes_mut(buf, len)?;
        self.read_into(fd, out, at).map(|n| n as u64)
    }

    fn read_into(&mut self, fd: u64, out: &mut [u8], at: Option<u64>) -> Result<usize, u64> {
        let description = self.get(fd)?;
        let mut d = description.borrow_mut();
        if d.flags & O_ACCMODE == O_WRONLY || d.flags & O_PATH != 0 {
            return Err(EBADF);
        }
        let offset = at.unwrap_or(d.offset);
        let n = match &d.target {
            Target::Stdin => host::read(None, &[], offset, out)?,
            Target::HostFile { mount, rel } => host::read(Some(*mount), rel, offset, out)?,
            Target::MemFile(ino) => self.fs.data_mut(*ino)?.read(offset, out),
            Target::HostDir { .. } | Target::MemDir(_) => return Err(EISDIR),
            Target::Stdout | Target::Stderr => return Err(EBADF),
        };
        if at.is_none() {
            d.offset = offset + n as u64;
        }
        Ok(n)
    }

    pub(crate) fn write(
        &mut self,
        env: &mut Env<'_>,
        fd: u64,
        buf: u64,
        len: u64,
        at: Option<u64>,
    ) -> SysResult {
        let bytes = env.user.bytes(buf, len)?;
        self.write_at(env, fd, bytes, at)
    }

    fn write_at(&mut self, env: &mut Env<'_>, fd: u64, bytes: &[u8], at: Option<u64>) -> SysResult {
        let len = bytes.len() as u64;
        let description = self.get(fd)?;
        let mut d = description.borrow_mut();
        if d.flags & O_ACCMODE == O_RDONLY {
            return Err(EBADF);
        }
        match d.target {
            Target::Stdout => self.stdout.write(bytes),
            Target::Stderr => self.stderr.write(bytes),
            Target::MemFile(ino) => {
                let data = self.fs.data_mut(ino)?;
                let offset = match at {
                    Some(offset) => offset,
                    None if d.flags & O_APPEND != 0 => data.len,
                    None => d.offset,
                };
                data.write(env.memory, offset, bytes)?;
                self.fs.node_mut(ino).mtime_ns = env.now_ns;
                if at.is_none() {
                    d.offset = offset + len;
                }
            }
            _ => return Err(EBADF),
        }
        Ok(len)
    }

    /// `sendfile`: copies through a buffer of the personality's (from the
    /// input's offset, or `*offset` which is then advanced).
    pub(crate) fn sendfile(
        &mut self,
        env: &mut Env<'_>,
        out_fd: u64,
        in_fd: u64,
        offset: u64,
        count: u64,
    ) -> SysResult {
        const CHUNK: usize = 256 << 10;
        let mut at: Option<u64> = match offset {
            0 => None,
            ptr => Some(env.user.read(ptr)?),
        };
        let mut buffer = alloc::vec![0u8; CHUNK.min(count as usize)];
        let mut done = 0u64;
        while done < count {
            let want = (count - done).min(buffer.len() as u64) as usize;
            let n = self.read_into(in_fd, &mut buffer[..want], at)?;
            if n == 0 {
                break;
            }
            self.write_at(env, out_fd, &buffer[..n], None)?;
            done += n as u64;
            if let Some(position) = at.as_mut() {
                *position += n as u64;
            }
        }
        if let (Some(position), ptr) = (at, offset)
            && ptr != 0
        {
            env.user.write(ptr, &position)?;
        }
        Ok(done)
    }

    /// `readv`/`writev`: one call per vector, stopping at a short transfer.
    pub(crate) fn vectored(
        &mut self,
        env: &mut Env<'_>,
        fd: u64,
        iov: u64,
        count: u64,
        write: bool,
    ) -> SysResult {
        if count > 1024 {
            return Err(EINVAL);
        }
        let mut total = 0;
        for i in 0..count {
            let [base, len]: [u64; 2] = env.user.read(iov + 16 * i)?;
            let done = if write {
                self.write(env, fd, base, len, None)?
            } else {
                self.read(env.user, fd, base, len, None)?
            };
            total += done;
            if done < len {
                break;
            }
        }
        Ok(total)
    }

    pub(crate) fn lseek(&mut self, fd: u64, offset: u64, whence: u64) -> SysResult {
        let description = self.get(fd)?;
        let mut d = description.borrow_mut();
        let end = match &d.target {
            Target::Stdin | Target::Stdout | Target::Stderr => return Err(ESPIPE),
            Target::HostFile { mount, rel } => host::stat(*mount, rel, true)?.size,
            Target::MemFile(ino) => self.fs.data_mut(*ino)?.len,
            Target::HostDir { .. } | Target::MemDir(_) => 0,
        };
        let base = match whence {
            SEEK_SET => 0,
            SEEK_CUR => d.offset,
            SEEK_END => end,
            _ => return Err(EINVAL),
        };
        let new = base.wrapping_add(offset);
        if (new as i64) < 0 {
            return Err(EINVAL);
        }
        d.offset = new;
        Ok(new)
    }

    fn stat_target(&self, target: &Target) -> Result<Stat, u64> {
        Ok(match target {
            Target::Stdin | Target::Stdout | Target::Stderr => Stat {
                mode: S_IFIFO | 0o600,
                nlink: 1,
                blksize: 4096,
                ..Stat::default()
            },
            Target::HostFile { mount, rel } | Target::HostDir { mount, rel } => {
                self.stat_host(*mount, rel, true)?
            }
            Target::MemFile(ino) | Target::MemDir(ino) => self.stat_memory(*ino),
        })
    }

    fn stat_host(&self, mount: u64, rel: &[u8], follow: bool) -> Result<Stat, u64> {
        let s = host::stat(mount, rel, follow)?;
        Ok(Stat {
            dev: MOUNT_DEV + mount,
            ino: s.ino,
            nlink: s.nlink,
            mode: s.mode as u32,
            size: s.size as i64,
            blksize: HOST_BLOCK,
            blocks: s.size.div_ceil(512) as i64,
            ..Stat::default()
        }
        .with_mtime(s.mtime_ns))
    }

    fn stat_memory(&self, ino: Ino) -> Stat {
        let node = self.fs.node(ino);
        let size = match &node.kind {
            Kind::File(data) => data.len,
            Kind::Dir(entries) => entries.len() as u64,
        };
        Stat {
            dev: MEMORY_DEV,
            ino: ino as u64 + 1,
            nlink: 1,
            mode: node.mode,
            size: size as i64,
            blksize: 4096,
            blocks: size.div_ceil(512) as i64,
            ..Stat::default()
        }
        .with_mtime(node.mtime_ns)
    }

    fn stat_path(&self, path: &[u8]) -> Result<Stat, u64> {
        self.stat_path_as(path, true)
    }

    fn stat_path_as(&self, path: &[u8], follow: bool) -> Result<Stat, u64> {
        match self.mounts.locate(path) {
            Location::Mount { index, rel } => self.stat_host(index, rel, follow),
            Location::Memory => Ok(self.stat_memory(self.fs.lookup(path)?)),
        }
    }

    pub(crate) fn fstat(&self, user: &UserMemory, fd: u64, buf: u64) -> SysResult {
        let description = self.get(fd)?;
        let stat = self.stat_target(&description.borrow().target)?;
        user.write(buf, &stat)
    }

    pub(crate) fn fstatat(
        &self,
        user: &UserMemory,
        dirfd: u64,
        path: u64,
        buf: u64,
        flags: u64,
    ) -> SysResult {
        user.write(buf, &self.stat_at(user, dirfd, path, flags)?)
    }

    fn stat_at(&self, user: &UserMemory, dirfd: u64, path: u64, flags: u64) -> Result<Stat, u64> {
        let raw = user.path(path)?;
        if raw.is_empty() {
            if flags & AT_EMPTY_PATH == 0 {
                return Err(ENOENT);
            }
            if is_cwd(dirfd) {
                return self.stat_path(&self.cwd);
            }
            let description = self.get(dirfd)?;
            return self.stat_target(&description.borrow().target);
        }
        let path = self.resolve_bytes(dirfd, raw)?;
        let follow = flags & AT_SYMLINK_NOFOLLOW == 0;
        self.stat_path_as(&path, follow)
    }

    /// `statx`: the same facts as `newfstatat`, in `struct statx`.
    pub(crate) fn statx(
        &self,
        user: &UserMemory,
        dirfd: u64,
        path: u64,
        flags: u64,
        buf: u64,
    ) -> SysResult {
        const STATX_BASIC_STATS: u32 = 0x7ff;
        let stat = self.stat_at(user, dirfd, path, flags)?;
        let mut out = [0u8; 256];
        let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &STATX_BASIC_STATS.to_le_bytes());
        put(4, &(stat.blksize as u32).to_le_bytes());
        put(16, &(stat.nlink as u32).to_le_bytes());
        put(28, &(stat.mode as u16).to_le_bytes());
        put(32, &stat.ino.to_le_bytes());
        put(40, &(stat.size as u64).to_le_bytes());
        put(48, &(stat.blocks as u64).to_le_bytes());
        // atime, btime, ctime, mtime: seconds and nanoseconds.
        for at in [64, 80, 96, 112] {
            put(at, &stat.times[4].to_le_bytes());
            put(at + 8, &(stat.times[5] as u32).to_le_bytes());
        }
        put(140, &(stat.dev as u32).to_le_bytes());
        user.write(buf, &out)
    }

    /// Reads a file into `out` from `offset` for a private mapping of it;
    /// the part past its end stays as it is (zeros).
    pub(crate) fn map_file(&mut self, fd: u64, offset: u64, out: &mut [u8]) -> SysResult {
        let mut done = 0;
        while done < out.len() {
            let n = self.read_into(fd, &mut out[done..], Some(offset + done as u64))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(0)
    }

    pub(crate) fn access(&self, user: &UserMemory, dirfd: u64, path: u64, mode: u64) -> SysResult {
        const W_OK: u64 = 2;
        let path = self.resolve(user, dirfd, path)?;
        self.stat_path(&path)?;
        if mode & W_OK != 0 && matches!(self.mounts.locate(&path), Location::Mount { .. }) {
            return Err(EROFS);
        }
        Ok(0)
    }

    pub(crate) fn getdents64(
        &mut self,
        user: &UserMemory,
        fd: u64,
        buf: u64,
        len: u64,
    ) -> SysResult {
        let description = self.get(fd)?;
        let mut d = description.borrow_mut();
        let out = user.bytes_mut(buf, len)?;
        // Entries 0 and 1 are `.` and `..`; then the directory's, in name order.
        let mut names: Vec<(u8, Vec<u8>)> = Vec::new();
        let first = d.offset;
        if first < 2 {
            names.push((DT_DIR, b".".to_vec()));
            names.push((DT_DIR, b"..".to_vec()));
            names.drain(..first as usize);
        }
        let skip = first.saturating_sub(2);
        match &d.target {
            Target::MemDir(ino) => {
                if let Kind::Dir(entries) = &self.fs.node(*ino).kind {
                    for (name, &child) in entries.iter().skip(skip as usize) {
                        let kind = match self.fs.node(child).kind {
                            Kind::Dir(_) => DT_DIR,
                            Kind::File(_) => DT_REG,
                        };
                        names.push((kind, name.clone()));
                        if names.len() > 256 {
                            break;
                        }
                    }
                }
            }
            Target::HostDir { mount, rel } => {
                let mut listing = alloc::vec![0u8; 16 << 10];
                let (used, _) = host::readdir(*mount, rel, skip, &mut listing)?;
                for entry in listing[..used].split(|&b| b == 0).filter(|e| !e.is_empty()) {
                    let kind = match entry[0] {
                        b'd' => DT_DIR,
                        b'f' => DT_REG,
                        b'l' => DT_LNK,
                        _ => DT_UNKNOWN,
                    };
                    names.push((kind, entry[1..].to_vec()));
                }
            }
            _ => return Err(ENOTDIR),
        }
        let mut used = 0;
        let mut emitted = 0;
        for (kind, name) in &names {
            let reclen = (19 + name.len() + 1).next_multiple_of(8);
            if used + reclen > out.len() {
                break;
            }
            let record = &mut out[used..used + reclen];
            record.fill(0);
            let next = first + emitted + 1;
            record[..8].copy_from_slice(&(next + 1000).to_le_bytes());
            record[8..16].copy_from_slice(&next.to_le_bytes());
            record[16..18].copy_from_slice(&(reclen as u16).to_le_bytes());
            record[18] = *kind;
            record[19..19 + name.len()].copy_from_slice(name);
            used += reclen;
            emitted += 1;
        }
        if emitted == 0 && !names.is_empty() {
            return Err(EINVAL);
        }
        d.offset = first + emitted;
        Ok(used as u64)
    }

    pub(crate) fn mkdirat(
        &mut self,
        user: &UserMemory,
        dirfd: u64,
        path: u64,
        mode: u64,
        now_ns: u64,
    ) -> SysResult {
        let path = self.resolve(user, dirfd, path)?;
        self.writable(&path)?;
        self.fs.create(&path, true, mode as u32, now_ns)?;
        Ok(0)
    }

    pub(crate) fn unlinkat(
        &mut self,
        user: &UserMemory,
        memory: &mut Memory,
        dirfd: u64,
        path: u64,
        flags: u64,
    ) -> SysResult {
        let path = self.resolve(user, dirfd, path)?;
        self.writable(&path)?;
        self.fs.remove(memory, &path, flags & AT_REMOVEDIR != 0)
    }

    pub(crate) fn renameat(
        &mut self,
        user: &UserMemory,
        memory: &mut Memory,
        old_dir: u64,
        old: u64,
        new_dir: u64,
        new: u64,
    ) -> SysResult {
        let from = self.resolve(user, old_dir, old)?;
        let to = self.resolve(user, new_dir, new)?;
        let mounted = |p: &[u8]| matches!(self.mounts.locate(p), Location::Mount { .. });
        if mounted(&from) != mounted(&to) {
            return Err(EXDEV);
        }
        self.writable(&from)?;
        self.fs.rename(memory, &from, &to)
    }

    pub(crate) fn ftruncate(
        &mut self,
        memory: &mut Memory,
        fd: u64,
        len: u64,
        now_ns: u64,
    ) -> SysResult {
        let description = self.get(fd)?;
        let d = description.borrow();
        if d.flags & O_ACCMODE == O_RDONLY {
            return Err(EINVAL);
        }
        match d.target {
            Target::MemFile(ino) => {
                self.fs.data_mut(ino)?.truncate(memory, len)?;
                self.fs.node_mut(ino).mtime_ns = now_ns;
                Ok(0)
            }
            _ => Err(EINVAL),
        }
    }

    pub(crate) fn truncate(
        &mut self,
        user: &UserMemory,
        memory: &mut Memory,
        path: u64,
        len: u64,
        now_ns: u64,
    ) -> SysResult {
        let path = self.resolve(user, AT_FDCWD, path)?;
        self.writable(&path)?;
        let ino = self.fs.lookup(&path)?;
        self.fs.data_mut(ino)?.truncate(memory, len)?;
        self.fs.node_mut(ino).mtime_ns = now_ns;
        Ok(0)
    }

    fn writable(&self, path: &[u8]) -> SysResult {
        match self.mounts.locate(path) {
            Location::Mount { .. } => Err(EROFS),
            Location::Memory => Ok(0),
        }
    }

    pub(crate) fn chdir(&mut self, user: &UserMemory, path: u64) -> SysResult {
        let path = self.resolve(user, AT_FDCWD, path)?;
        self.enter(path)
    }

    pub(crate) fn fchdir(&mut self, fd: u64) -> SysResult {
        let path = self.get(fd)?.borrow().path.clone();
        self.enter(path)
    }

    fn enter(&mut self, path: Vec<u8>) -> SysResult {
        if self.stat_path(&path)?.mode & S_IFMT != S_IFDIR {
            return Err(ENOTDIR);
        }
        self.cwd = path;
        Ok(0)
    }

    pub(crate) fn getcwd(&self, user: &UserMemory, buf: u64, size: u64) -> SysResult {
        let needed = self.cwd.len() as u64 + 1;
        if size < needed {
            return Err(crate::errno::ERANGE);
        }
        let out = user.bytes_mut(buf, needed)?;
        out[..self.cwd.len()].copy_from_slice(&self.cwd);
        out[self.cwd.len()] = 0;
        Ok(needed)
    }

    /// `readlinkat`: symlinks exist only under mounts (the in-VM file
    /// system has none).
    pub(crate) fn readlinkat(
        &self,
        user: &UserMemory,
        dirfd: u64,
        path: u64,
        buf: u64,
        len: u64,
    ) -> SysResult {
        let path = self.resolve(user, dirfd, path)?;
        match self.mounts.locate(&path) {
            Location::Mount { index, rel } => {
                let out = user.bytes_mut(buf, len)?;
                host::readlink(index, rel, out).map(|n| n as u64)
            }
            Location::Memory => {
                self.fs.lookup(&path)?;
                Err(EINVAL)
            }
        }
    }

    pub(crate) fn dup(&mut self, fd: u64, lowest: u64, cloexec: bool) -> SysResult {
        let description = self.get(fd)?;
        self.install(
            description,
            usize::try_from(lowest).map_err(|_| EINVAL)?,
            cloexec,
        )
    }

    pub(crate) fn dup3(
        &mut self,
        memory: &mut Memory,
        old: u64,
        new: u64,
        flags: u64,
    ) -> SysResult {
        let description = self.get(old)?;
        let new_fd = Some(fd_index(new)).filter(|&n| n < MAX_FDS).ok_or(EBADF)?;
        if fd_index(old) == new_fd {
            return Ok(new_fd as u64);
        }
        if new_fd >= self.table.len() {
            self.table.resize_with(new_fd + 1, || None);
        }
        let replaced = self.table[new_fd].replace(Slot {
            description,
            cloexec: flags & O_CLOEXEC != 0,
        });
        if let Some(old_slot) = replaced {
            self.release(memory, old_slot.description);
        }
        Ok(new_fd as u64)
    }

    pub(crate) fn fcntl(&mut self, fd: u64, command: u64, arg: u64) -> SysResult {
        const F_DUPFD: u64 = 0;
        const F_GETFD: u64 = 1;
        const F_SETFD: u64 = 2;
        const F_GETFL: u64 = 3;
        const F_SETFL: u64 = 4;
        const F_DUPFD_CLOEXEC: u64 = 1030;
        const FD_CLOEXEC: u64 = 1;
        let index = usize::try_from(fd).map_err(|_| EBADF)?;
        let slot = self
            .table
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or(EBADF)?;
        match command {
            F_DUPFD => self.dup(fd, arg, false),
            F_DUPFD_CLOEXEC => self.dup(fd, arg, true),
            F_GETFD => Ok(u64::from(slot.cloexec)),
            F_SETFD => {
                slot.cloexec = arg & FD_CLOEXEC != 0;
                Ok(0)
            }
            F_GETFL => Ok(slot.description.borrow().flags),
            F_SETFL => {
                let mut d = slot.description.borrow_mut();
                d.flags = (d.flags & !O_APPEND) | (arg & O_APPEND);
                Ok(0)
            }
            _ => Err(EINVAL),
        }
    }

    /// `fsync` and friends: the descriptor must be open; there is nothing to sync.
    pub(crate) fn check(&self, fd: u64) -> SysResult {
        self.get(fd).map(|_| 0)
    }

    /// `poll`: every open descriptor is ready for what it is asked (reads
    /// and writes never block here); a closed one is `POLLNVAL`.
    pub(crate) fn poll(&self, user: &UserMemory, fds: u64, count: u64) -> SysResult {
        const POLLIN: u16 = 1;
        const POLLOUT: u16 = 4;
        const POLLNVAL: u16 = 0x20;
        if count > MAX_FDS as u64 {
            return Err(EINVAL);
        }
        let mut ready = 0;
        for i in 0..count {
            let at = fds + 8 * i;
            let [fd, events_and_revents]: [u32; 2] = user.read(at)?;
            let events = events_and_revents as u16;
            let revents = if (fd as i32) < 0 {
                0
            } else if self.get(u64::from(fd)).is_err() {
                POLLNVAL
            } else {
                events & (POLLIN | POLLOUT)
            };
            user.write(at + 6, &revents)?;
            if revents != 0 {
                ready += 1;
            }
        }
        Ok(ready)
    }

    pub(crate) fn ioctl(&self, fd: u64) -> SysResult {
        self.get(fd)?;
        Err(ENOTTY)
    }
}
