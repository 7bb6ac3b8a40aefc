//! Host files a Linux-ABI guest may read: read-only mounts of host
//! directories and a file as standard input (`HOST_FILE`, see
//! [`snowflock_abi::linux::files`]).
//!
//! A path from the guest is a mount index and a relative path; it is opened
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` under the mount's
//! directory, so neither `..` nor a symlink reaches anything outside it.
//! Nothing is kept open between calls that a clone would need: the
//! configuration travels in the snapshot, and a clone host opens the same
//! mounts, refusing the clone if a mount's directory is not the one the
//! parent saw (its inode and modification time differ).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snowflock_abi::PAGE_SIZE;
use snowflock_abi::linux::files::{HostStat, MAX_GUEST_PATH, MAX_MOUNTS, MountEntry};

/// What a guest's host files are: its mounts and its standard input.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesConfig {
    pub mounts: Vec<MountSpec>,
    /// A host file the program reads as standard input (none: empty).
    pub stdin: Option<PathBuf>,
    /// Where the guest's `/out` is written when it ends: this directory for
    /// the VM started, `clone-<generation>-<id>/` in it for each clone.
    pub out: Option<PathBuf>,
}

/// A host directory shown read-only at a guest path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub host: PathBuf,
    /// Absolute, normalized, not `/`.
    pub guest: String,
    /// The directory the VM first opened (filled in at boot).
    pub identity: Option<Identity>,
}

/// Which directory a mount was: a clone host's must be the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub inode: u64,
    pub mtime_ns: i128,
}

/// Why a guest's host files cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("mount {guest}: cannot open the host directory {host}")]
    Open {
        guest: String,
        host: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {guest}: {host} is not a directory")]
    NotDirectory { guest: String, host: PathBuf },
    #[error(
        "mount {guest}: {host} on this host is not the directory the parent VM mounted (another inode or modification time): refusing to compute on different data"
    )]
    Changed { guest: String, host: PathBuf },
    #[error(
        "guest path {guest:?} of a mount must be absolute, normalized, not `/`, at most {MAX_GUEST_PATH} bytes, and unique"
    )]
    BadGuestPath { guest: String },
    #[error("at most {MAX_MOUNTS} mounts")]
    TooMany,
    #[error("standard input {path}")]
    Stdin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Takes the files of a VM's `/out` (path relative to it, offset, bytes)
/// where the VM does not write them itself: a clone on another host hands
/// them to the host that started the job.
pub type OutputSink = Arc<dyn Fn(&[u8], u64, &[u8]) -> Result<(), u64> + Send + Sync>;

/// Where a VM's `/out` goes.
enum Output {
    /// No output directory: nothing is kept.
    None,
    /// Written beneath this directory on this host.
    Local(PathBuf),
    Forward(OutputSink),
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Local(dir) => f.debug_tuple("Local").field(dir).finish(),
            Self::Forward(_) => f.write_str("Forward"),
        }
    }
}

/// The opened mounts and standard input of one VM.
#[derive(Debug)]
pub struct HostFiles {
    config: FilesConfig,
    dirs: Vec<OwnedFd>,
    stdin: Option<File>,
    /// Where this VM's `/out` goes (a clone's own directory).
    output: Output,
}

fn identity_of(meta: &std::fs::Metadata) -> Identity {
    Identity {
        inode: meta.ino(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    }
}

fn valid_guest_path(guest: &str) -> bool {
    // Split by hand: `Path::components` drops `.` components silently.
    guest.len() <= MAX_GUEST_PATH
        && guest.len() > 1
        && guest
            .strip_prefix('/')
            .is_some_and(|rest| rest.split('/').all(|part| !matches!(part, "" | "." | "..")))
}

/// A relative path from the guest: no root, no `..`, no NUL; `""` is the mount itself.
fn relative(path: &[u8]) -> Result<CString, u64> {
    if path.contains(&0) {
        return Err(libc::EINVAL as u64);
    }
    if path.first() == Some(&b'/') || path.split(|&b| b == b'/').any(|part| part == b"..") {
        return Err(libc::EACCES as u64);
    }
    let text = if path.is_empty() { b"." as &[u8] } else { path };
    CString::new(text).map_err(|_| libc::EINVAL as u64)
}

/// Where clone `id` of clone point `generation` writes its `/out`, in the
/// output directory `out`.
pub fn clone_output_dir(out: &Path, generation: u32, id: u32) -> PathBuf {
    out.join(format!("clone-{generation}-{id}"))
}

/// Writes `data` at `offset` of the relative `path` beneath `root`
/// (creating `root`, the file at offset 0, and the directories on its way);
/// nothing resolves outside `root`. Errors are `errno` values.
pub fn write_beneath(root: &Path, path: &[u8], offset: u64, data: &[u8]) -> Result<(), u64> {
    let path = relative(path)?;
    std::fs::create_dir_all(root).map_err(|e| errno_of(&e))?;
    let mut dir = OwnedFd::from(File::open(root).map_err(|e| errno_of(&e))?);
    let bytes = path.as_bytes();
    let parts: Vec<&[u8]> = bytes
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    let (file, dirs) = parts.split_last().ok_or(libc::EISDIR as u64)?;
    for part in dirs {
        let name = CString::new(*part).map_err(|_| libc::EINVAL as u64)?;
        // SAFETY: mkdirat reads the NUL-terminated name; `dir` is an open directory.
        let made = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) };
        if made != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EEXIST) {
                return Err(errno_of(&error));
            }
        }
        dir = OwnedFd::from(openat_beneath(
            &dir,
            part,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?);
    }
    let create = if offset == 0 {
        libc::O_CREAT | libc::O_TRUNC
    } else {
        0
    };
    let out = openat_beneath(&dir, file, libc::O_WRONLY | create, 0o644)?;
    out.write_all_at(data, offset).map_err(|e| errno_of(&e))
}

/// `struct open_how` of openat2(2), the first version of it (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn errno_of(error: &std::io::Error) -> u64 {
    error.raw_os_error().map_or(libc::EIO as u64, |e| e as u64)
}

impl HostFiles {
    /// Opens `config`'s mounts and standard input. Mounts with an identity
    /// must still be those directories; the others get theirs recorded.
    pub fn open(config: &FilesConfig) -> Result<Self, FilesError> {
        if config.mounts.len() as u64 > MAX_MOUNTS {
            return Err(FilesError::TooMany);
        }
        let mut config = config.clone();
        let mut dirs = Vec::with_capacity(config.mounts.len());
        for mount in &mut config.mounts {
            if !valid_guest_path(&mount.guest) {
                return Err(FilesError::BadGuestPath {
                    guest: mount.guest.clone(),
                });
            }
            let open_error = |source| FilesError::Open {
                guest: mount.guest.clone(),
                host: mount.host.clone(),
                source,
            };
            let dir = File::open(&mount.host).map_err(open_error)?;
            let meta = dir.metadata().map_err(open_error)?;
            if !meta.is_dir() {
                return Err(FilesError::NotDirectory {
                    guest: mount.guest.clone(),
                    host: mount.host.clone(),
                });
            }
            let found = identity_of(&meta);
            match mount.identity {
                Some(recorded) if recorded != found => {
                    return Err(FilesError::Changed {
                        guest: mount.guest.clone(),
                        host: mount.host.clone(),
                    });
                }
                _ => mount.identity = Some(found),
            }
            dirs.push(OwnedFd::from(dir));
        }
        let guests: std::collections::HashSet<&str> =
            config.mounts.iter().map(|m| m.guest.as_str()).collect();
        if guests.len() != config.mounts.len() {
            let guest = config.mounts.last().map(|m| m.guest.clone());
            return Err(FilesError::BadGuestPath {
                guest: guest.unwrap_or_default(),
            });
        }
        let stdin = match &config.stdin {
            None => None,
            Some(path) => Some(File::open(path).map_err(|source| FilesError::Stdin {
                path: path.clone(),
                source,
            })?),
        };
        let output = config.out.clone().map_or(Output::None, Output::Local);
        Ok(Self {
            config,
            dirs,
            stdin,
            output,
        })
    }

    /// This VM is clone `id` of clone point `generation`: its `/out` goes
    /// to `clone-<generation>-<id>/` of the output directory.
    pub fn set_clone(&mut self, generation: u32, id: u32) {
        self.output = match &self.config.out {
            Some(out) => Output::Local(clone_output_dir(out, generation, id)),
            None => Output::None,
        };
    }

    /// Hands this VM's `/out` to `sink` instead of writing it here (if it
    /// has an output directory at all).
    pub fn forward_output(&mut self, sink: OutputSink) {
        if !matches!(self.output, Output::None) {
            self.output = Output::Forward(sink);
        }
    }

    /// Writes `data` at `offset` of `/out/<path>` where this VM's output goes.
    pub(crate) fn write_output(&self, path: &[u8], offset: u64, data: &[u8]) -> Result<(), u64> {
        match &self.output {
            Output::None => Ok(()),
            Output::Local(root) => write_beneath(root, path, offset, data),
            Output::Forward(sink) => {
                relative(path)?;
                sink(path, offset, data)
            }
        }
    }

    /// The configuration with every mount's identity.
    pub fn config(&self) -> &FilesConfig {
        &self.config
    }

    /// The mount table page the personality reads.
    pub(crate) fn mount_table(&self) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        page[..8].copy_from_slice(&(self.config.mounts.len() as u64).to_le_bytes());
        for (i, mount) in self.config.mounts.iter().enumerate() {
            let at = 8 + i * size_of::<MountEntry>();
            let guest = mount.guest.as_bytes();
            page[at..at + 8].copy_from_slice(&(guest.len() as u64).to_le_bytes());
            page[at + 16..at + 16 + guest.len()].copy_from_slice(guest);
        }
        page
    }

    /// Opens `path` beneath mount `mount`.
    fn open_beneath(&self, mount: u64, path: &[u8], flags: i32) -> Result<File, u64> {
        let dir = self
            .dirs
            .get(usize::try_from(mount).map_err(|_| libc::EBADF as u64)?)
            .ok_or(libc::EBADF as u64)?;
        openat_beneath(dir, path, flags, 0)
    }

    /// `follow`: of the file a final symlink names, else of the link.
    pub(crate) fn stat(&self, mount: u64, path: &[u8], follow: bool) -> Result<HostStat, u64> {
        let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
        let file = self.open_beneath(mount, path, libc::O_PATH | nofollow)?;
        let meta = file.metadata().map_err(|e| errno_of(&e))?;
        Ok(HostStat {
            size: meta.size(),
            mode: u64::from(meta.mode()),
            mtime_ns: (meta.mtime() as u64)
                .wrapping_mul(1_000_000_000)
                .wrapping_add(meta.mtime_nsec() as u64),
            ino: meta.ino(),
            nlink: meta.nlink(),
        })
    }

    /// The target of the symlink `path`, truncated to `buf`.
    pub(crate) fn readlink(&self, mount: u64, path: &[u8], buf: &mut [u8]) -> Result<usize, u64> {
        let link = self.open_beneath(mount, path, libc::O_PATH | libc::O_NOFOLLOW)?;
        // SAFETY: readlinkat with an empty path reads the link `link` is
        // (an O_PATH fd of it) into `buf`, at most `buf.len()` bytes.
        let n = unsafe {
            libc::readlinkat(
                link.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(errno_of(&std::io::Error::last_os_error()));
        }
        Ok(n as usize)
    }

    pub(crate) fn read(
        &self,
        mount: u64,
        path: &[u8],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, u64> {
        let file = self.open_beneath(mount, path, libc::O_RDONLY)?;
        read_at(&file, offset, buf)
    }

    /// Entries of a directory from the `first`-th on, packed into `buf`.
    pub(crate) fn readdir(
        &self,
        mount: u64,
        path: &[u8],
        first: u64,
        buf: &mut [u8],
    ) -> Result<(usize, u64), u64> {
        let dir = self.open_beneath(mount, path, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .map_err(|e| errno_of(&e))?;
        let mut names: Vec<(u8, Vec<u8>)> = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| errno_of(&e))?;
            let kind = match entry.file_type() {
                Ok(t) if t.is_dir() => b'd',
                Ok(t) if t.is_file() => b'f',
                Ok(t) if t.is_symlink() => b'l',
                _ => b'o',
            };
            names.push((kind, entry.file_name().as_bytes().to_vec()));
        }
        names.sort();
        let mut used = 0;
        let mut next = first;
        for (kind, name) in names
            .iter()
            .skip(usize::try_from(first).unwrap_or(usize::MAX))
        {
            let need = name.len() + 2;
            if used + need > buf.len() {
                break;
            }
            buf[used] = *kind;
            buf[used + 1..used + 1 + name.len()].copy_from_slice(name);
            buf[used + 1 + name.len()] = 0;
            used += need;
            next += 1;
        }
        Ok((used, next))
    }

    pub(crate) fn read_stdin(&self, offset: u64, buf: &mut [u8]) -> Result<usize, u64> {
        match &self.stdin {
            None => Ok(0),
            Some(file) => read_at(file, offset, buf),
        }
    }
}

/// Opens the relative `path` beneath `dir`: neither `..` nor a symlink
/// (nor a magic link) resolves outside it.
fn openat_beneath(dir: &OwnedFd, path: &[u8], flags: i32, mode: u64) -> Result<File, u64> {
    let path = relative(path)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads `path` (NUL-terminated) and `how` (its size
    // passed), both valid for the call; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(errno_of(&std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> Result<usize, u64> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(errno_of(&e)),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_of_mounts_are_absolute_and_normalized() {
        for good in ["/ref", "/data/ref"] {
            assert!(valid_guest_path(good), "{good}");
        }
        for bad in ["/", "ref", "/ref/", "/a/../b", "/a/./b", "//a", ""] {
            assert!(!valid_guest_path(bad), "{bad}");
        }
    }

    #[test]
    fn relative_paths_from_the_guest_never_climb() {
        assert!(relative(b"db/seq.fa").is_ok());
        assert!(relative(b"").is_ok());
        for bad in [&b"../etc/passwd"[..], b"/etc/passwd", b"a/../../b", b"a\0b"] {
            assert!(relative(bad).is_err(), "{bad:?}");
        }
    }
}
