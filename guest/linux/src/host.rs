//! The host files the VMM serves (`HOST_FILE`): stat, read and list beneath
//! a mount, and read standard input. Each call names its file; reads larger
//! than one transfer are split.

use snowflock_guest::abi::linux::files::{
    HostFileRequest, HostStat, OP_OUTPUT, OP_READ, OP_READDIR, OP_READLINK, OP_STAT, OP_STDIN,
    STAT_NOFOLLOW,
};
use snowflock_guest::abi::{MAX_TRANSFER, errno, nr};
use snowflock_guest::hypercall;

fn call(op: u64, request: &HostFileRequest) -> Result<(u64, u64), u64> {
    // SAFETY: `request` and the path and buffer it names are valid for the
    // VMM's reads and writes: callers pass the program's checked memory or
    // the personality's own buffers, which nothing else touches meanwhile.
    let (rax, rdx) = unsafe {
        hypercall::call(
            nr::HOST_FILE,
            op,
            request as *const HostFileRequest as u64,
            0,
            0,
        )
    };
    match errno::decode(rax) {
        Some(e) => Err(e),
        None => Ok((rax, rdx)),
    }
}

fn request(mount: u64, rel: &[u8], offset: u64, buf: u64, len: u64) -> HostFileRequest {
    HostFileRequest {
        mount,
        path_ptr: rel.as_ptr() as u64,
        path_len: rel.len() as u64,
        offset,
        buf,
        len,
    }
}

/// Of the file a final symlink names (`follow`), or of the link.
pub(crate) fn stat(mount: u64, rel: &[u8], follow: bool) -> Result<HostStat, u64> {
    let mut stat = HostStat::default();
    let len = size_of::<HostStat>() as u64;
    let flags = if follow { 0 } else { STAT_NOFOLLOW };
    call(
        OP_STAT,
        &request(mount, rel, flags, &mut stat as *mut HostStat as u64, len),
    )?;
    Ok(stat)
}

/// Reads into `out` from `offset`; fewer bytes only at the end of the file.
pub(crate) fn read(
    mount: Option<u64>,
    rel: &[u8],
    offset: u64,
    out: &mut [u8],
) -> Result<usize, u64> {
    let mut done = 0;
    while done < out.len() {
        let chunk = &mut out[done..];
        let len = (chunk.len() as u64).min(MAX_TRANSFER);
        let at = offset + done as u64;
        let (n, _) = match mount {
            Some(mount) => call(
                OP_READ,
                &request(mount, rel, at, chunk.as_mut_ptr() as u64, len),
            )?,
            None => call(
                OP_STDIN,
                &request(0, &[], at, chunk.as_mut_ptr() as u64, len),
            )?,
        };
        done += n as usize;
        if n < len {
            break;
        }
    }
    Ok(done)
}

/// Entries of a directory from the `first`-th: the bytes used in `out`
/// (`kind`, name, NUL each) and the index after the last.
pub(crate) fn readdir(
    mount: u64,
    rel: &[u8],
    first: u64,
    out: &mut [u8],
) -> Result<(usize, u64), u64> {
    let (n, next) = call(
        OP_READDIR,
        &request(mount, rel, first, out.as_mut_ptr() as u64, out.len() as u64),
    )?;
    Ok((n as usize, next))
}

/// Writes one file of `/out` (`rel` to it) to the VM's output directory.
pub(crate) fn output(rel: &[u8], data: &[u8]) -> Result<(), u64> {
    let mut offset = 0;
    loop {
        let chunk = &data[offset..data.len().min(offset + MAX_TRANSFER as usize)];
        call(
            OP_OUTPUT,
            &request(
                0,
                rel,
                offset as u64,
                chunk.as_ptr() as u64,
                chunk.len() as u64,
            ),
        )?;
        offset += chunk.len();
        if offset >= data.len() {
            return Ok(());
        }
    }
}

/// The target of the symlink `rel`, truncated to `out`.
pub(crate) fn readlink(mount: u64, rel: &[u8], out: &mut [u8]) -> Result<usize, u64> {
    let (n, _) = call(
        OP_READLINK,
        &request(mount, rel, 0, out.as_mut_ptr() as u64, out.len() as u64),
    )?;
    Ok(n as usize)
}
