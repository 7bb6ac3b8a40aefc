//! The Linux personality: runs next to a static Linux executable in a
//! snowflock guest and serves its system calls inside the guest, at CPL3,
//! as a library OS does. It exits to the VMM only for what it cannot do
//! itself (console output, the clocks' anchor, sleeping, the FS base, exit).
//!
//! The VMM starts it at `_start` with the boot information and the
//! [`LinuxStart`](snowflock_guest::abi::linux::LinuxStart) it wrote; it
//! sets up its state and jumps to the program. A `syscall` first traps to
//! the VMM, which enters [`entry`]'s syscall entry as if the site had called
//! it; [`patch`] then rewrites the site into `call *%rax` through the sled
//! in page 0, so the site's later calls cost a function call.
#![no_std]
#![no_main]

extern crate alloc;

mod clock;
mod console;
mod dispatch;
mod entry;
mod errno;
mod files;
mod host;
mod memfs;
mod memory;
mod names;
mod patch;
mod path;
mod process;
mod user;

use snowflock_guest::heap::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();
