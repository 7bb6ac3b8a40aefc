//! Flock images: `loader::kind`, `loader::check` and `loader::load` into
//! real guest memory, and `boot::setup`, the VMM's whole start of an image
//! (without a personality, as for a flock image).

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use snowflock_abi::{IMAGE_BASE, PAGE_SIZE};
use snowflock_fuzz::{GUEST_MEMORY, guest_memory};
use snowflock_vmm::boot::{self, GuestLayout};
use snowflock_vmm::linux::LinuxFlags;
use snowflock_vmm::loader::{self, ImageKind};
use snowflock_vmm::memory::GuestMemory;

static MEMORY: LazyLock<GuestMemory> = LazyLock::new(guest_memory);

fuzz_target!(|data: &[u8]| {
    let layout = GuestLayout::new(GUEST_MEMORY).expect("a valid layout");
    let limit = layout.guard_start();
    let kind = loader::kind(data);
    let checked = loader::check(data, limit);
    let loaded = loader::load(data, &MEMORY, limit);
    match (&checked, &loaded) {
        (Ok(checked), Ok(loaded)) => {
            assert_eq!(checked, loaded, "check and load disagree");
            assert!((IMAGE_BASE..limit).contains(&loaded.entry));
            assert!(loaded.end <= limit.next_multiple_of(PAGE_SIZE));
            assert!(loaded.end.is_multiple_of(PAGE_SIZE));
        }
        (Err(_), Err(_)) => {}
        _ => panic!("check {checked:?} but load {loaded:?}"),
    }
    let started = boot::setup(&MEMORY, data, "fuzz", None, None, LinuxFlags::default());
    match (&kind, &started) {
        (Ok(ImageKind::Flock), _) => assert_eq!(
            started.as_ref().ok().map(|(_, image)| *image),
            loaded.ok(),
            "boot and load disagree"
        ),
        (Ok(ImageKind::Linux), Ok(_)) => panic!("a Linux program started without a personality"),
        (Err(_), Ok(_)) => panic!("an image that is no kind started"),
        _ => {}
    }
});
