//! Guest SDK for snowflock flock images.
//!
//! A flock image is a static `#![no_std]` x86-64 executable that the VMM starts
//! at CPL3 in long mode. This crate gives it a console, its arguments, a clock,
//! and SnowFlock's clone API ([`request_ticket`], [`clone()`], [`join`], ...).
//! With the `rt` feature it also provides the runtime: `_start`, a global
//! allocator, the panic handler and the C memory functions; `entry!` names
//! the guest's `fn main() -> i32`.
//!
//! Without `rt`, the crate is usable from a Linux-ABI program, `std` ones
//! included (feature `hosted`: ending through the clone API first has the
//! personality flush its output and write `/out`).
//!
//! [`abi`] re-exports `snowflock-abi`, the interface shared with the VMM;
//! everything else expects to run inside a guest. With `images` the crate embeds the example guests (module
//! `images`), built by a nested cargo build in build.rs.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub use snowflock_abi as abi;
pub mod args;
pub mod clone;
pub mod console;
pub mod heap;
pub mod hypercall;
pub mod rand;
pub mod rounds;
pub mod time;

#[cfg(feature = "lang")]
mod lang;
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
    request_ticket_with,
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
