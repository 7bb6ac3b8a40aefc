//! Static Linux executables: `boot::setup` with the real personality, the
//! VMM's whole start of a Linux-ABI program (`loader::kind`, placement and
//! the static-PIE bias, the load, the initial stack and `LinuxStart`).

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use snowflock_abi::IMAGE_BASE;
use snowflock_abi::linux::{PERSONALITY_BASE, PERSONALITY_END};
use snowflock_fuzz::{GUEST_MEMORY, guest_memory};
use snowflock_guest::images::LINUX_PERSONALITY;
use snowflock_vmm::boot::{self, GuestLayout};
use snowflock_vmm::linux::LinuxFlags;
use snowflock_vmm::loader::{self, ImageKind};
use snowflock_vmm::memory::GuestMemory;

static MEMORY: LazyLock<GuestMemory> = LazyLock::new(guest_memory);

fuzz_target!(|data: &[u8]| {
    let layout = GuestLayout::new(GUEST_MEMORY).expect("a valid layout");
    let kind = loader::kind(data);
    let flags = LinuxFlags {
        strace: data.len() % 2 == 1,
        trap_syscalls: data.len() % 3 == 1,
    };
    let started = boot::setup(
        &MEMORY,
        data,
        "program --flag argument",
        Some(2_000_000),
        Some(LINUX_PERSONALITY),
        flags,
    );
    let Ok((entry, image)) = started else {
        return;
    };
    assert!(kind.is_ok(), "an image that is no kind started");
    assert!((IMAGE_BASE..layout.guard_start()).contains(&image.entry));
    assert!(image.end <= layout.guard_start());
    if kind.ok() == Some(ImageKind::Linux) {
        // The vCPU starts in the personality, which then enters the program.
        assert!((PERSONALITY_BASE..PERSONALITY_END).contains(&entry.regs.rip));
        assert!(entry.regs.rsp < layout.mem_size);
    }
});
