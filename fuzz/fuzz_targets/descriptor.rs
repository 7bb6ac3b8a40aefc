//! VM descriptors from another host (a clone order) or a file (`sf inspect`):
//! `Descriptor::decode`, then what the daemon does with one that decoded
//! (the avoidance map of a hollow clone) and what `sf inspect` prints.
//!
//! An input whose first byte is odd is a payload wrapped here in a header
//! with the right length and CRC, so that mutations reach the postcard
//! decoder and the checks after it instead of dying at the checksum.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_control::descriptor::{Descriptor, FORMAT_VERSION, MAGIC};
use snowflock_fault_handler::AvoidMap;
use snowflock_vmm::memory::PAGE_SIZE;

fn wrap(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(24 + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&[0, 0]);
    bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fuzz_target!(|data: &[u8]| {
    let wrapped;
    let bytes = match data.split_first() {
        Some((mode, payload)) if mode & 1 == 1 => {
            wrapped = wrap(payload);
            &wrapped
        }
        _ => data,
    };
    let Ok(descriptor) = Descriptor::decode(bytes) else {
        return;
    };
    let encoded = descriptor.encode().expect("a decoded descriptor encodes");
    let again = Descriptor::decode(&encoded).expect("a re-encoded descriptor decodes");
    assert_eq!(
        again.encode().expect("encodes"),
        encoded,
        "decode and encode disagree"
    );
    let machine = &descriptor.machine;
    let _ = AvoidMap::new(
        machine.mem_size / PAGE_SIZE,
        machine.data_pages.runs(),
        machine.free_pages.runs(),
    );
    let _ = descriptor.summary(bytes.len()).to_string();
});
