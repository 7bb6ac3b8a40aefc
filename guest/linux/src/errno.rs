//! Linux error numbers the personality returns (as `-errno` in `rax`).

pub(crate) const ENOENT: u64 = 2;
pub(crate) const ESRCH: u64 = 3;
pub(crate) const EBADF: u64 = 9;
pub(crate) const EAGAIN: u64 = 11;
pub(crate) const ENOMEM: u64 = 12;
pub(crate) const EFAULT: u64 = 14;
pub(crate) const EEXIST: u64 = 17;
pub(crate) const EXDEV: u64 = 18;
pub(crate) const ENODEV: u64 = 19;
pub(crate) const ENOTDIR: u64 = 20;
pub(crate) const EISDIR: u64 = 21;
pub(crate) const EINVAL: u64 = 22;
pub(crate) const EMFILE: u64 = 24;
pub(crate) const ENOTTY: u64 = 25;
pub(crate) const ESPIPE: u64 = 29;
pub(crate) const EROFS: u64 = 30;
pub(crate) const ERANGE: u64 = 34;
pub(crate) const ENAMETOOLONG: u64 = 36;
pub(crate) const ENOSYS: u64 = 38;
pub(crate) const ENOTEMPTY: u64 = 39;

/// A system call's result: a value, or an error number.
pub(crate) type SysResult = Result<u64, u64>;

/// The `rax` a result becomes.
pub(crate) fn to_rax(result: SysResult) -> u64 {
    match result {
        Ok(value) => value,
        Err(errno) => errno.wrapping_neg(),
    }
}
