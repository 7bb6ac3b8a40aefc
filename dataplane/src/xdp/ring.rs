//! The rings and the UMEM shared with the kernel: the fill ring (we produce free chunks), the
//! RX ring (the kernel produces received descriptors) and the UMEM bytes.
//!
//! A ring is `size` slots (a power of two) plus two free-running `u32` positions in shared
//! memory: the producer's and the consumer's. Slots `consumer..producer` (modulo 2^32) hold
//! entries; slot `position & (size - 1)` backs position `position`. Each side writes only
//! its own position: the producer fills slots, then publishes them with a `Release` store of
//! its position, which the consumer reads with `Acquire` before it reads the slots; the
//! consumer hands slots back with a `Release` store of its position after it read them,
//! which the producer reads with `Acquire` before it reuses them.
//!
//! All the `unsafe` accesses to that shared memory are in this file.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering, fence};

use super::sys::Mapping;
use super::umem::{FreeFrames, UmemLayout};

/// Entries ready to consume: `producer - consumer`, capped at the ring size (a larger value
/// is a corrupt producer position; capping keeps every read inside the ring).
pub(super) fn ready_entries(size: u32, producer: u32, consumer: u32) -> u32 {
    producer.wrapping_sub(consumer).min(size)
}

/// Free slots the producer may fill: `size - (producer - consumer)`, zero if the positions
/// are inconsistent.
pub(super) fn free_slots(size: u32, producer: u32, consumer: u32) -> u32 {
    size.saturating_sub(producer.wrapping_sub(consumer))
}

/// Which ring a layout problem is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingKind {
    /// The fill ring: free UMEM chunks for the kernel to receive into.
    Fill,
    /// The completion ring: chunks the kernel has sent (unused: we only receive).
    Completion,
    /// The RX ring: descriptors of received packets.
    Rx,
}

impl fmt::Display for RingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RingKind::Fill => "fill",
            RingKind::Completion => "completion",
            RingKind::Rx => "RX",
        })
    }
}

/// A ring mapped from the socket, with its positions and slots located and checked.
struct SharedRing<T> {
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    slots: NonNull<T>,
    size: u32,
    /// Owns the memory the pointers above point into; unmapped when the ring is dropped.
    mapping: Mapping,
}

impl<T: Copy> SharedRing<T> {
    /// Bytes to map for a ring of `size` slots whose slots start at `offsets.desc`.
    fn mapping_len(offsets: &libc::xdp_ring_offset, size: u32) -> Option<usize> {
        let slots = u64::from(size).checked_mul(std::mem::size_of::<T>() as u64)?;
        usize::try_from(offsets.desc.checked_add(slots)?).ok()
    }

    /// Locates the positions, flags and slots of a ring of `size` slots in `mapping` at the
    /// kernel's `offsets`, checking every one lies inside the mapping and is aligned.
    fn new(
        mapping: Mapping,
        offsets: &libc::xdp_ring_offset,
        size: u32,
    ) -> Result<SharedRing<T>, String> {
        if !size.is_power_of_two() {
            return Err(format!("{size} slots is not a power of two"));
        }
        // Offsets are checked for alignment: the mapping itself starts on a page boundary.
        let len = mapping.len() as u64;
        let word = |name: &str, offset: u64| -> Result<NonNull<AtomicU32>, String> {
            let fits = offset.checked_add(4).is_some_and(|end| end <= len);
            if !fits || !offset.is_multiple_of(4) {
                return Err(format!(
                    "{name} offset {offset} is not an aligned word inside the {len}-byte ring"
                ));
            }
            element_at(&mapping, offset)
        };
        let producer = word("producer", offsets.producer)?;
        let consumer = word("consumer", offsets.consumer)?;
        let flags = word("flags", offsets.flags)?;
        let slots_fit = Self::mapping_len(offsets, size).is_some_and(|end| end as u64 <= len);
        if !slots_fit
            || !offsets
                .desc
                .is_multiple_of(std::mem::align_of::<T>() as u64)
        {
            return Err(format!(
                "{size} slots at offset {} do not fit the {len}-byte ring aligned",
                offsets.desc
            ));
        }
        let slots = element_at(&mapping, offsets.desc)?;
        Ok(SharedRing {
            producer,
            consumer,
            flags,
            slots,
            size,
            mapping,
        })
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: `producer` points to an aligned u32 inside `mapping` (checked in `new`),
        // which lives as long as `self`; the kernel accesses it only atomically.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`: an aligned u32 inside the mapping `self` owns.
        unsafe { self.consumer.as_ref() }
    }

    fn flags(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`: an aligned u32 inside the mapping `self` owns.
        unsafe { self.flags.as_ref() }
    }

    fn slot(&self, position: u32) -> *mut T {
        let index = (position & (self.size - 1)) as usize;
        // SAFETY: `index < size`, and `new` checked that `size` slots of `T` starting at
        // `slots` lie inside the mapping, so the result stays inside it.
        unsafe { self.slots.as_ptr().add(index) }
    }
}

/// Pointer to the element at byte `offset` of `mapping`; the caller checked that it lies
/// inside.
fn element_at<T>(mapping: &Mapping, offset: u64) -> Result<NonNull<T>, String> {
    let element = mapping.as_ptr().wrapping_add(offset as usize).cast::<T>();
    NonNull::new(element).ok_or_else(|| format!("offset {offset} gives a null pointer"))
}

impl<T> fmt::Debug for SharedRing<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRing")
            .field("size", &self.size)
            .field("mapping", &self.mapping)
            .finish_non_exhaustive()
    }
}

// SAFETY: the pointers all point into `mapping`, which the ring owns; moving the ring to
// another thread moves the only user-space handle on those positions and slots, and the
// kernel side synchronizes through the atomics whatever thread we run on.
unsafe impl<T: Send> Send for SharedRing<T> {}

/// The fill ring, produced by us: free UMEM chunks for the kernel to receive into.
#[derive(Debug)]
pub(super) struct FillRing {
    ring: SharedRing<u64>,
    /// Our producer position (the shared one lags until `produce` publishes).
    producer: u32,
}

impl FillRing {
    /// Bytes to map for a fill ring of `size` slots.
    pub(super) fn mapping_len(offsets: &libc::xdp_ring_offset, size: u32) -> Option<usize> {
        SharedRing::<u64>::mapping_len(offsets, size)
    }

    /// The fill ring in `mapping`, laid out at `offsets`.
    pub(super) fn new(
        mapping: Mapping,
        offsets: &libc::xdp_ring_offset,
        size: u32,
    ) -> Result<FillRing, String> {
        let ring = SharedRing::new(mapping, offsets, size)?;
        let producer = ring.producer().load(Ordering::Relaxed);
        Ok(FillRing { ring, producer })
    }

    /// Moves as many chunks from `free` into the ring as it has room for, and publishes
    /// them. Returns how many.
    pub(super) fn produce(&mut self, free: &mut FreeFrames) -> u32 {
        let consumer = self.ring.consumer().load(Ordering::Acquire);
        let room = free_slots(self.ring.size, self.producer, consumer);
        let mut produced = 0;
        while produced < room {
            let Some(chunk) = free.take() else { break };
            let slot = self.ring.slot(self.producer.wrapping_add(produced));
            // SAFETY: `slot` is inside the ring (see `SharedRing::slot`), aligned for u64,
            // and free: the kernel consumed it (its consumer position, read with Acquire,
            // is past it) and reads it again only after the Release store below.
            unsafe { slot.write(chunk) };
            produced += 1;
        }
        if produced > 0 {
            self.producer = self.producer.wrapping_add(produced);
            self.ring.producer().store(self.producer, Ordering::Release);
        }
        produced
    }

    /// Whether the kernel asked to be woken (`XDP_RING_NEED_WAKEUP`) to take new chunks.
    pub(super) fn needs_wakeup(&self) -> bool {
        // Order the producer store before the flag load: the kernel sets the flag and then
        // looks at the producer, so one of the two sides sees the other's write.
        fence(Ordering::SeqCst);
        self.ring.flags().load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }
}

/// What one `RxRing::consume` call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Consumed {
    /// Descriptors taken from the ring.
    pub(super) descriptors: u32,
    /// Descriptors outside the UMEM, across chunks, or naming a chunk already given back:
    /// not handed to the callback.
    pub(super) invalid: u32,
    /// Chunks not given back for reuse: descriptors outside the UMEM, or duplicates of a
    /// chunk already free.
    pub(super) not_returned: u32,
}

/// The RX ring, produced by the kernel, and the UMEM its descriptors point into.
#[derive(Debug)]
pub(super) struct RxRing {
    ring: SharedRing<libc::xdp_desc>,
    /// Our consumer position (the shared one lags until `consume` publishes).
    consumer: u32,
    umem: Mapping,
    layout: UmemLayout,
}

impl RxRing {
    /// Bytes to map for an RX ring of `size` slots.
    pub(super) fn mapping_len(offsets: &libc::xdp_ring_offset, size: u32) -> Option<usize> {
        SharedRing::<libc::xdp_desc>::mapping_len(offsets, size)
    }

    /// The RX ring in `mapping`, laid out at `offsets`, receiving into `umem`.
    pub(super) fn new(
        mapping: Mapping,
        offsets: &libc::xdp_ring_offset,
        size: u32,
        umem: Mapping,
        layout: UmemLayout,
    ) -> Result<RxRing, String> {
        if (umem.len() as u64) < layout.len() {
            return Err(format!(
                "the UMEM mapping has {} bytes, less than its {} frames",
                umem.len(),
                layout.len()
            ));
        }
        let ring = SharedRing::new(mapping, offsets, size)?;
        let consumer = ring.consumer().load(Ordering::Relaxed);
        Ok(RxRing {
            ring,
            consumer,
            umem,
            layout,
        })
    }

    /// Whether the kernel has published descriptors not consumed yet.
    pub(super) fn has_entries(&self) -> bool {
        let producer = self.ring.producer().load(Ordering::Acquire);
        ready_entries(self.ring.size, producer, self.consumer) > 0
    }

    /// Consumes up to `max` descriptors: gives every chunk that lies inside the UMEM back to
    /// `free`, hands all valid packets to `batch` in one call, writable (FRAGMENTs are
    /// decrypted where they lie), then publishes the consumer position. The chunks reach the
    /// kernel again only through `FillRing::produce`, after this returns, so the packets stay
    /// intact for the whole call. A chunk that two descriptors of one call name (which only a
    /// broken producer does) is handed out once.
    pub(super) fn consume(
        &mut self,
        max: u32,
        free: &mut FreeFrames,
        batch: impl FnOnce(&mut [&mut [u8]]),
    ) -> Consumed {
        let producer = self.ring.producer().load(Ordering::Acquire);
        let count = ready_entries(self.ring.size, producer, self.consumer).min(max);
        let mut consumed = Consumed {
            descriptors: count,
            ..Consumed::default()
        };
        let mut packets: Vec<&mut [u8]> = Vec::with_capacity(count as usize);
        let mut chunks: Vec<u64> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let slot = self.ring.slot(self.consumer);
            // SAFETY: `slot` is inside the ring, aligned for xdp_desc, and published: the
            // producer position, read with Acquire above, is past it, and the kernel does
            // not rewrite it before the Release store of our consumer position below. Any
            // bytes are a valid xdp_desc (plain integers).
            let desc = unsafe { slot.read() };
            // Step past the descriptor before using it: if `batch` panics, the chunks are
            // lost but no descriptor is handled twice and no chunk is given back twice.
            self.consumer = self.consumer.wrapping_add(1);
            let Some(chunk) = self.layout.chunk_of(desc.addr) else {
                consumed.invalid += 1;
                consumed.not_returned += 1;
                continue;
            };
            if chunks.contains(&chunk) || !free.put(chunk) {
                consumed.invalid += 1;
                consumed.not_returned += 1;
                continue;
            }
            chunks.push(chunk);
            match self.layout.packet_range(desc.addr, desc.len) {
                Ok(range) => {
                    let start = self.umem.as_ptr().wrapping_add(range.start);
                    // SAFETY: `range` lies inside the UMEM mapping (checked by
                    // `packet_range` against the layout, which `new` checked fits the
                    // mapping) and inside chunk `chunk`, which no other slice of this call
                    // covers (`chunks`). The kernel wrote the packet before publishing the
                    // descriptor (ordered by the Acquire above) and writes the chunk again
                    // only after it went back through the fill ring, which needs
                    // `FillRing::produce` and so cannot happen before this function
                    // returns: the slices live in `packets`, dropped at its end, and
                    // `batch` gets them for the call only.
                    let packet = unsafe { std::slice::from_raw_parts_mut(start, range.len()) };
                    packets.push(packet);
                }
                Err(error) => {
                    tracing::debug!(
                        addr = desc.addr,
                        len = desc.len,
                        ?error,
                        "invalid AF_XDP RX descriptor"
                    );
                    consumed.invalid += 1;
                }
            }
        }
        if !packets.is_empty() {
            batch(&mut packets);
        }
        if count > 0 {
            self.ring.consumer().store(self.consumer, Ordering::Release);
        }
        consumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_entries_counts_across_the_wrap_of_the_positions() {
        assert_eq!(ready_entries(8, 0, 0), 0);
        assert_eq!(ready_entries(8, 5, 2), 3);
        assert_eq!(ready_entries(8, 2, u32::MAX - 1), 4);
        assert_eq!(ready_entries(8, 8, 0), 8);
        // A producer more than a ring ahead (or behind) is capped at the ring size.
        assert_eq!(ready_entries(8, 9, 0), 8);
        assert_eq!(ready_entries(8, 0, 1), 8);
    }

    #[test]
    fn free_slots_counts_across_the_wrap_of_the_positions() {
        assert_eq!(free_slots(8, 0, 0), 8);
        assert_eq!(free_slots(8, 5, 2), 5);
        assert_eq!(free_slots(8, 1, u32::MAX - 2), 4);
        assert_eq!(free_slots(8, 8, 0), 0);
        // Inconsistent positions leave no room rather than overwriting unread slots.
        assert_eq!(free_slots(8, 9, 0), 0);
        assert_eq!(free_slots(8, 0, 1), 0);
    }

    fn offsets(desc: u64) -> libc::xdp_ring_offset {
        libc::xdp_ring_offset {
            producer: 0,
            consumer: 64,
            flags: 128,
            desc,
        }
    }

    #[test]
    fn ring_layouts_outside_the_mapping_or_misaligned_are_refused() {
        let good = offsets(192);
        let len = FillRing::mapping_len(&good, 16).unwrap();
        assert_eq!(len, 192 + 16 * 8);
        let ring = FillRing::new(Mapping::anonymous(len).unwrap(), &good, 16);
        assert!(ring.is_ok());
        let too_small = FillRing::new(Mapping::anonymous(len).unwrap(), &good, 1024);
        assert!(too_small.is_err());
        let misaligned = FillRing::new(Mapping::anonymous(4096).unwrap(), &offsets(196), 16);
        assert!(misaligned.is_err());
        let odd_size = FillRing::new(Mapping::anonymous(4096).unwrap(), &good, 12);
        assert!(odd_size.is_err());
        let bad_word = libc::xdp_ring_offset {
            flags: 1 << 40,
            ..good
        };
        assert!(FillRing::new(Mapping::anonymous(4096).unwrap(), &bad_word, 16).is_err());
    }

    /// Drives a fill ring and an RX ring in ordinary memory, playing the kernel's part by
    /// hand, to check positions, wrap-around and descriptor handling.
    #[test]
    fn rings_in_plain_memory_pass_chunks_and_packets_around() {
        let layout = UmemLayout::new(2048, 4);
        let size = 4;
        let mut free = FreeFrames::all(&layout);

        let fill_len = FillRing::mapping_len(&offsets(192), size).unwrap();
        let mut fill =
            FillRing::new(Mapping::anonymous(fill_len).unwrap(), &offsets(192), size).unwrap();
        let rx_len = RxRing::mapping_len(&offsets(192), size).unwrap();
        let umem = Mapping::anonymous(8192).unwrap();
        let umem_base = umem.as_ptr();
        let mut rx = RxRing::new(
            Mapping::anonymous(rx_len).unwrap(),
            &offsets(192),
            size,
            umem,
            layout,
        )
        .unwrap();

        assert_eq!(fill.produce(&mut free), 4);
        assert_eq!(free.len(), 0);
        assert_eq!(fill.ring.producer().load(Ordering::Relaxed), 4);
        // SAFETY: the test is the kernel here; nothing else touches these slots.
        let posted: Vec<u64> = (0..4)
            .map(|p| unsafe { fill.ring.slot(p).read() })
            .collect();
        assert_eq!(posted, vec![0, 2048, 4096, 6144]);
        assert!(!fill.needs_wakeup());
        fill.ring
            .flags()
            .store(libc::XDP_RING_NEED_WAKEUP, Ordering::Relaxed);
        assert!(fill.needs_wakeup());

        // The "kernel" takes two chunks from the fill ring and receives into them.
        fill.ring.consumer().store(2, Ordering::Release);
        let packets: [(u64, &[u8]); 2] = [(256, b"first"), (2048 + 256, b"second")];
        for (index, (addr, bytes)) in packets.iter().enumerate() {
            let target = umem_base.wrapping_add(*addr as usize);
            // SAFETY: `addr..addr+len` is inside the 8 KiB UMEM mapping, nothing borrows it.
            unsafe { target.copy_from_nonoverlapping(bytes.as_ptr(), bytes.len()) };
            let desc = libc::xdp_desc {
                addr: *addr,
                len: bytes.len() as u32,
                options: 0,
            };
            // SAFETY: slot `index` of the 4-slot RX ring, not published yet.
            unsafe { rx.ring.slot(index as u32).write(desc) };
        }
        // An invalid descriptor after them: beyond the UMEM.
        let bogus = libc::xdp_desc {
            addr: 1 << 20,
            len: 10,
            options: 0,
        };
        // SAFETY: slot 2 of the 4-slot RX ring, not published yet.
        unsafe { rx.ring.slot(2).write(bogus) };
        assert!(!rx.has_entries());
        rx.ring.producer().store(3, Ordering::Release);
        assert!(rx.has_entries());

        let mut seen = Vec::new();
        let consumed = rx.consume(2, &mut free, |packets| {
            seen.extend(packets.iter().map(|p| p.to_vec()))
        });
        assert_eq!(
            consumed,
            Consumed {
                descriptors: 2,
                invalid: 0,
                not_returned: 0
            }
        );
        assert_eq!(seen, vec![b"first".to_vec(), b"second".to_vec()]);
        assert_eq!(rx.ring.consumer().load(Ordering::Relaxed), 2);
        assert_eq!(free.len(), 2);

        let consumed = rx.consume(16, &mut free, |packets| {
            seen.extend(packets.iter().map(|p| p.to_vec()))
        });
        assert_eq!(
            consumed,
            Consumed {
                descriptors: 1,
                invalid: 1,
                not_returned: 1
            }
        );
        assert_eq!(seen.len(), 2);
        assert!(!rx.has_entries());

        // Two slots were consumed by the "kernel": exactly two chunks go back, wrapping.
        assert_eq!(fill.produce(&mut free), 2);
        assert_eq!(fill.ring.producer().load(Ordering::Relaxed), 6);
        // SAFETY: slots 4 and 5 wrap to slots 0 and 1, just written by `produce`.
        let reposted: Vec<u64> = (4..6)
            .map(|p| unsafe { fill.ring.slot(p).read() })
            .collect();
        assert_eq!(reposted, vec![2048, 0]);
        assert_eq!(fill.produce(&mut free), 0, "the fill ring is full");
    }
}
