//! Guest SDK for snowflock flock images.
//!
//! A flock image is a static `#![no_std]` x86-64 executable that the VMM starts
//! at CPL3 in long mode. This crate gives it a console, its arguments, a clock,
//! and SnowFlock's clone API ([`request_ticket`], [`clone()`], [`join`], ...).
//! With the `rt` feature it also provides the runtime: `_start`, a global
//! allocator, the panic handler and the C memory functions; `entry!` names
//! the guest's `fn main() -> i32`.
//!
//! Host code (the VMM) uses only [`abi`]; everything else expects to run
//! inside a guest. With `images` the crate embeds the example guests (module
//! `images`), built by a nested cargo build in build.rs.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod abi;
pub mod args;
pub mod clone;
pub mod console;
pub mod heap;
pub mod hypercall;
pub mod rand;
pub mod time;

#[cfg(feature = "rt")]
pub mod rt;

/// The example guests, built for the guest and embedded for the host.
#[cfg(feature = "images")]
pub mod images {
    include!(concat!(env!("OUT_DIR"), "/images.rs"));

    /// The image called `name` (an example's name, or `primes_c`).
    pub fn by_name(name: &str) -> Option<&'static [u8]> {
        ALL.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, image)| *image)
    }
}

pub use clone::{
    Checkpoint, CheckpointOutcome, ChildFailure, ChildOutcome, Error, FailureStatus, Fork, Ticket,
    checkpoint_parent, clone, create_clones, exit, exit_vm, join, kill, request_ticket,
};

use abi::BootInfo;
use core::sync::atomic::{AtomicPtr, Ordering};

/// Set once by the runtime's entry after it validated the page.
static BOOT_INFO: AtomicPtr<BootInfo> = AtomicPtr::new(core::ptr::null_mut());

/// What the VMM told this guest at entry.
///
/// The runtime checked its magic, ABI version and that the argument string
/// lies inside the boot page before `main` ran.
///
/// # Panics
/// If no runtime entry ran (a build without the `rt` feature).
pub fn boot_info() -> &'static BootInfo {
    let info = BOOT_INFO.load(Ordering::Relaxed);
    assert!(
        !info.is_null(),
        "boot info not set: the guest did not start through snowflock_guest's runtime"
    );
    // SAFETY: only the runtime stores here, a pointer to the validated boot
    // page, which the VMM keeps mapped read-only and unchanged for the guest's life.
    unsafe { &*info }
}

/// include/snowflock.h must say what abi.rs says.
#[cfg(test)]
mod header_tests {
    use crate::abi::{self, ChildStatus, PageReportKind, errno, nr};

    fn define(name: &str) -> u64 {
        let header = include_str!("../include/snowflock.h");
        let line = header
            .lines()
            .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
            .unwrap_or_else(|| panic!("{name} not in snowflock.h"));
        let value = line
            .split_whitespace()
            .nth(2)
            .unwrap()
            .trim_end_matches(['U', 'L']);
        match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => value.parse(),
        }
        .unwrap_or_else(|_| panic!("{name}: cannot parse {value}"))
    }

    #[test]
    fn header_matches_abi() {
        let expect = [
            ("SF_ABI_VERSION", u64::from(abi::ABI_VERSION)),
            ("SF_HYPERCALL_PORT", u64::from(abi::HYPERCALL_PORT)),
            ("SF_EXCEPTION_PORT", u64::from(abi::EXCEPTION_PORT)),
            ("SF_PAGE_SIZE", abi::PAGE_SIZE),
            ("SF_IMAGE_BASE", abi::IMAGE_BASE),
            ("SF_BOOT_INFO_ADDR", abi::BOOT_INFO_ADDR),
            ("SF_STACK_SIZE", abi::STACK_SIZE),
            ("SF_STACK_GUARD_SIZE", abi::STACK_GUARD_SIZE),
            ("SF_MIN_MEM_SIZE", abi::MIN_MEM_SIZE),
            ("SF_BOOT_INFO_MAGIC", abi::BOOT_INFO_MAGIC),
            ("SF_MAX_CMDLINE", abi::MAX_CMDLINE),
            ("SF_MAX_TRANSFER", abi::MAX_TRANSFER),
            ("SF_NR_CONSOLE_WRITE", u64::from(nr::CONSOLE_WRITE)),
            ("SF_NR_EXIT", u64::from(nr::EXIT)),
            ("SF_NR_PANIC", u64::from(nr::PANIC)),
            ("SF_NR_REQUEST_TICKET", u64::from(nr::REQUEST_TICKET)),
            ("SF_NR_CLONE", u64::from(nr::CLONE)),
            ("SF_NR_CHECKPOINT", u64::from(nr::CHECKPOINT)),
            ("SF_NR_CREATE_CLONES", u64::from(nr::CREATE_CLONES)),
            ("SF_NR_CHILD_EXIT", u64::from(nr::CHILD_EXIT)),
            ("SF_NR_JOIN", u64::from(nr::JOIN)),
            ("SF_NR_CHILD_RESULT", u64::from(nr::CHILD_RESULT)),
            ("SF_NR_KILL", u64::from(nr::KILL)),
            ("SF_NR_TIME_NS", u64::from(nr::TIME_NS)),
            ("SF_NR_REPORT_PAGES", u64::from(nr::REPORT_PAGES)),
            ("SF_MAX_REPORT_RUNS", abi::MAX_REPORT_RUNS),
            ("SF_PAGE_REPORT_FREE", PageReportKind::Free as u64),
            ("SF_PAGE_REPORT_FRESH", PageReportKind::Fresh as u64),
            ("SF_CHILD_EXITED", ChildStatus::Exited as u64),
            ("SF_CHILD_FAILED", ChildStatus::Failed as u64),
            ("SF_CHILD_KILLED", ChildStatus::Killed as u64),
            ("SF_CHILD_LOST", ChildStatus::Lost as u64),
            ("SF_EPERM", errno::EPERM),
            ("SF_ENOENT", errno::ENOENT),
            ("SF_EAGAIN", errno::EAGAIN),
            ("SF_EBUSY", errno::EBUSY),
            ("SF_EINVAL", errno::EINVAL),
        ];
        for (name, value) in expect {
            assert_eq!(define(name), value, "{name}");
        }
    }
}
