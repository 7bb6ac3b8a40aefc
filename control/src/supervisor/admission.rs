//! Admission of a new root VM: its guest memory must fit in what the host can still hold.
//!
//! Guest memory is a memfd filled on first touch, so a VM larger than the host starts and runs
//! until its guest touches more than the host has; then the kernel's OOM killer ends the
//! process holding the most memory, the daemon with every VM of the host. Refusing such a VM
//! at the start turns that into an error its user can read.

use std::io;

/// Where the kernel reports free memory.
const MEMINFO: &str = "/proc/meminfo";

/// A VM refused because its guest memory does not fit in the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "guest memory of {:.1} GiB is more than this host can hold: {:.1} GiB available \
     (MemAvailable + SwapFree)",
    gib(*requested),
    gib(*available)
)]
pub struct MemoryShortage {
    pub requested: u64,
    pub available: u64,
}

/// Checks that `mem_size` bytes of guest memory fit in the host's available memory and free
/// swap (`MemAvailable` + `SwapFree`). An unreadable `/proc/meminfo` admits the VM.
pub(super) fn check_memory(mem_size: u64) -> Result<(), MemoryShortage> {
    let Ok(available) = available_memory() else {
        return Ok(());
    };
    if mem_size > available {
        return Err(MemoryShortage {
            requested: mem_size,
            available,
        });
    }
    Ok(())
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// `MemAvailable` + `SwapFree`, in bytes.
fn available_memory() -> io::Result<u64> {
    parse_available(&std::fs::read_to_string(MEMINFO)?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no MemAvailable in meminfo"))
}

fn parse_available(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_is_mem_available_plus_free_swap() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:        18000000 kB\n\
                       MemAvailable:   22000000 kB\nSwapTotal:        100 kB\nSwapFree:          10 kB\n";
        assert_eq!(parse_available(meminfo), Some((22_000_000 + 10) * 1024));
        assert_eq!(
            parse_available("MemAvailable: 4 kB\n"),
            Some(4096),
            "no swap line"
        );
        assert_eq!(parse_available("MemTotal: 4 kB\n"), None);
    }

    #[test]
    fn a_vm_larger_than_the_host_is_refused() {
        let refused = check_memory(64 << 40).unwrap_err();
        assert_eq!(refused.requested, 64 << 40);
        assert!(refused.available > 0);
        assert!(
            refused
                .to_string()
                .starts_with("guest memory of 65536.0 GiB is more than this host can hold: "),
            "{refused}"
        );
        assert_eq!(check_memory(2 << 20), Ok(()));
    }
}
