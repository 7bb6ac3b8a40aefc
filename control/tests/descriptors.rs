//! Descriptors captured from running VMs: round trip, resume, corruption.

mod common;

use std::time::Duration;

use common::{MEM, image, supervisor};
use snowflock_control::{CaptureKind, Descriptor, DescriptorError, VmOutcome, error_chain};

/// Starts `spin`, lets it run a little, and captures it from outside.
fn capture_spin(
    sup: &snowflock_control::Supervisor,
) -> (
    snowflock_control::VmHandle,
    Descriptor,
    std::sync::Arc<snowflock_vmm::memory::MemoryImage>,
) {
    let vm = sup.launch(image("spin"), MEM, "").expect("spin starts");
    std::thread::sleep(Duration::from_millis(100));
    let (descriptor, image) = vm.capture().expect("capture of a running VM");
    (vm, descriptor, image)
}

fn checksum(lines: &[String]) -> String {
    lines
        .iter()
        .find(|l| l.starts_with("spin: checksum="))
        .cloned()
        .unwrap_or_else(|| panic!("no checksum line in {lines:?}"))
}

#[test]
fn a_descriptor_saved_loaded_and_resumed_reaches_the_same_outcome() {
    let (sup, lines) = supervisor(1);
    let (original, descriptor, image) = capture_spin(&sup);
    assert_eq!(descriptor.kind, CaptureKind::External);
    assert_eq!(descriptor.machine.mem_size, MEM);
    assert_eq!(descriptor.summary(0).guest, "flock image");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spin.sfdesc");
    let written = descriptor.save(&path).unwrap();
    assert!(written < 64 * 1024, "descriptor is {written} bytes");
    let loaded = Descriptor::load(&path).unwrap();
    assert_eq!(loaded.encode().unwrap(), descriptor.encode().unwrap());

    let resumed = sup
        .resume(&loaded, &image)
        .expect("resume from the loaded descriptor");
    let resumed_label = format!("vm {}", resumed.id());
    assert_eq!(original.wait(), VmOutcome::Exited(0));
    assert_eq!(resumed.wait(), VmOutcome::Exited(0));
    let parent = checksum(&lines.of(""));
    assert_eq!(checksum(&lines.of(&resumed_label)), parent);
}

#[test]
fn corrupt_truncated_and_oversized_descriptors_are_rejected() {
    let (sup, _) = supervisor(1);
    let (vm, descriptor, _image) = capture_spin(&sup);
    vm.kill();
    vm.wait();
    let good = descriptor.encode().unwrap();
    Descriptor::decode(&good).expect("the untouched descriptor decodes");

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    assert!(matches!(
        Descriptor::decode(&flipped),
        Err(DescriptorError::Checksum { .. })
    ));

    let truncated = &good[..good.len() - 100];
    assert!(matches!(
        Descriptor::decode(truncated),
        Err(DescriptorError::Truncated { .. })
    ));
    assert!(matches!(
        Descriptor::decode(&good[..10]),
        Err(DescriptorError::TooShort { .. })
    ));

    let mut oversized = good.clone();
    oversized[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        Descriptor::decode(&oversized),
        Err(DescriptorError::TooLarge { .. })
    ));

    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(matches!(
        Descriptor::decode(&magic),
        Err(DescriptorError::BadMagic { .. })
    ));

    let mut version = good.clone();
    version[8] = 99;
    assert!(matches!(
        Descriptor::decode(&version),
        Err(DescriptorError::UnsupportedVersion { found: 99 })
    ));

    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(
        Descriptor::decode(&trailing),
        Err(DescriptorError::TrailingBytes { extra: 1 })
    ));

    // A payload that checksums but lies about the guest: re-encode with a bad size.
    let mut lying = descriptor.clone();
    lying.machine.mem_size = 12345;
    let err = Descriptor::decode(&lying.encode().unwrap()).unwrap_err();
    assert!(matches!(err, DescriptorError::Invalid(_)), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.sfdesc");
    std::fs::write(&path, vec![0u8; (17 << 20) as usize]).unwrap();
    assert!(matches!(
        Descriptor::load(&path),
        Err(DescriptorError::TooLarge { .. })
    ));
}

#[test]
fn malformed_images_are_rejected_with_a_clear_error() {
    let (sup, _) = supervisor(1);
    let good = image("hello");
    let mut wrong_machine = good.to_vec();
    wrong_machine[18] = 0x28; // e_machine = ARM
    let mut low_segment = good.to_vec();
    let phoff = u64::from_le_bytes(good[32..40].try_into().unwrap()) as usize;
    // First program header's p_vaddr: below the image area.
    low_segment[phoff + 16..phoff + 24].copy_from_slice(&0x1000u64.to_le_bytes());
    let mut bad_entry = good.to_vec();
    bad_entry[24..32].copy_from_slice(&0xdead_0000u64.to_le_bytes());
    for (what, bytes, expect) in [
        (
            "garbage",
            b"definitely not an ELF file".to_vec(),
            "not a valid ELF",
        ),
        ("truncated", good[..200].to_vec(), "ELF"),
        (
            "wrong machine",
            wrong_machine,
            "not 64-bit little-endian x86-64",
        ),
        ("low segment", low_segment, "outside the guest image area"),
        ("bad entry", bad_entry, "entry point 0xdead0000"),
    ] {
        let err = sup.launch(&bytes, MEM, "").expect_err(what);
        let text = error_chain(&err);
        assert!(text.contains(expect), "{what}: {text}");
    }
}
