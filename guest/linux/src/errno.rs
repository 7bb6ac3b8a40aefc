//! Linux error numbers the personality returns (as `-errno` in `rax`).

pub(crate) const ENOENT: u64 = 2;
pub(crate) const EBADF: u64 = 9;
pub(crate) const EAGAIN: u64 = 11;
pub(crate) const ENOMEM: u64 = 12;
pub(crate) const EFAULT: u64 = 14;
pub(crate) const EINVAL: u64 = 22;
pub(crate) const ENOTTY: u64 = 25;
pub(crate) const ESPIPE: u64 = 29;
pub(crate) const ERANGE: u64 = 34;
pub(crate) const ENOSYS: u64 = 38;
pub(crate) const ENODEV: u64 = 19;

/// A system call's result: a value, or an error number.
pub(crate) type SysResult = Result<u64, u64>;

/// The `rax` a result becomes.
pub(crate) fn to_rax(result: SysResult) -> u64 {
    match result {
        Ok(value) => value,
        Err(errno) => errno.wrapping_neg(),
    }
}
