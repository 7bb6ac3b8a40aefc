//! UMEM geometry: where frames are, and whether a descriptor from the kernel lies inside one.
//!
//! The UMEM is registered in aligned mode: `frame_count` chunks of `frame_size` bytes (a power
//! of two), so the chunk that holds a descriptor's address is the address with its low bits
//! cleared. In copy mode the kernel writes a packet at an offset inside its chunk (after the
//! headroom it reserves), and the descriptor's address includes that offset.

use std::ops::Range;

/// Frame layout of a UMEM of `frame_count` chunks of `frame_size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct UmemLayout {
    frame_size: u32,
    frame_count: u32,
}

/// Why a descriptor from the RX ring was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DescriptorError {
    /// Its address is beyond the end of the UMEM.
    OutsideUmem,
    /// Its bytes run past the end of the chunk that holds its address.
    CrossesChunk,
}

impl UmemLayout {
    /// A layout; `frame_size` must be a power of two (checked by the configuration).
    pub(super) fn new(frame_size: u32, frame_count: u32) -> UmemLayout {
        debug_assert!(frame_size.is_power_of_two());
        UmemLayout {
            frame_size,
            frame_count,
        }
    }

    /// Bytes of the UMEM.
    pub(super) fn len(&self) -> u64 {
        u64::from(self.frame_size) * u64::from(self.frame_count)
    }

    /// Bytes of one chunk.
    pub(super) fn frame_size(&self) -> u32 {
        self.frame_size
    }

    /// UMEM addresses of all chunks, highest first, so a stack of them hands out the lowest
    /// chunk first.
    pub(super) fn chunk_addresses(&self) -> impl Iterator<Item = u64> + use<> {
        let frame_size = u64::from(self.frame_size);
        (0..u64::from(self.frame_count))
            .rev()
            .map(move |index| index * frame_size)
    }

    /// The chunk that holds UMEM address `addr`, or `None` if `addr` is outside the UMEM.
    pub(super) fn chunk_of(&self, addr: u64) -> Option<u64> {
        (addr < self.len()).then_some(addr & !(u64::from(self.frame_size) - 1))
    }

    /// The bytes `addr..addr+len` of a received descriptor, checked to lie inside one chunk
    /// of the UMEM.
    pub(super) fn packet_range(
        &self,
        addr: u64,
        len: u32,
    ) -> Result<Range<usize>, DescriptorError> {
        let chunk = self.chunk_of(addr).ok_or(DescriptorError::OutsideUmem)?;
        let end = addr + u64::from(len);
        if end > chunk + u64::from(self.frame_size) {
            return Err(DescriptorError::CrossesChunk);
        }
        // Both fit in usize: they are at most the UMEM's length, which was mapped.
        let start = usize::try_from(addr).map_err(|_| DescriptorError::OutsideUmem)?;
        let end = usize::try_from(end).map_err(|_| DescriptorError::OutsideUmem)?;
        Ok(start..end)
    }
}

/// Chunks that are in neither the fill ring nor the RX ring: the ones the fill ring had no
/// room for, and the ones just received, until they go back to the fill ring.
pub(super) struct FreeFrames {
    chunks: Vec<u64>,
    capacity: usize,
}

impl FreeFrames {
    /// All chunks of `layout`, lowest on top.
    pub(super) fn all(layout: &UmemLayout) -> FreeFrames {
        let chunks: Vec<u64> = layout.chunk_addresses().collect();
        let capacity = chunks.len();
        FreeFrames { chunks, capacity }
    }

    /// Takes back a chunk. Returns `false` (and keeps nothing) if every chunk of the UMEM is
    /// already here, which only a duplicated descriptor can cause: keeping it would hand the
    /// same chunk to the kernel twice.
    pub(super) fn put(&mut self, chunk: u64) -> bool {
        if self.chunks.len() >= self.capacity {
            return false;
        }
        self.chunks.push(chunk);
        true
    }

    /// Takes a chunk.
    pub(super) fn take(&mut self) -> Option<u64> {
        self.chunks.pop()
    }

    /// Chunks held.
    pub(super) fn len(&self) -> usize {
        self.chunks.len()
    }
}

impl std::fmt::Debug for FreeFrames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreeFrames")
            .field("free", &self.chunks.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_of_clears_the_offset_inside_the_chunk() {
        let layout = UmemLayout::new(2048, 4);
        assert_eq!(layout.len(), 8192);
        assert_eq!(layout.chunk_of(0), Some(0));
        assert_eq!(layout.chunk_of(256), Some(0));
        assert_eq!(layout.chunk_of(2048 + 256), Some(2048));
        assert_eq!(layout.chunk_of(8191), Some(6144));
        assert_eq!(layout.chunk_of(8192), None);
        assert_eq!(layout.chunk_of(u64::MAX), None);
    }

    #[test]
    fn packet_range_accepts_packets_inside_one_chunk() {
        let layout = UmemLayout::new(4096, 4);
        assert_eq!(layout.packet_range(4096 + 256, 1500), Ok(4352..5852));
        assert_eq!(layout.packet_range(256, 4096 - 256), Ok(256..4096));
        assert_eq!(layout.packet_range(3 * 4096, 4096), Ok(12288..16384));
        assert_eq!(layout.packet_range(100, 0), Ok(100..100));
    }

    #[test]
    fn packet_range_rejects_descriptors_outside_the_umem_or_across_chunks() {
        let layout = UmemLayout::new(4096, 4);
        assert_eq!(
            layout.packet_range(16384, 1),
            Err(DescriptorError::OutsideUmem)
        );
        assert_eq!(
            layout.packet_range(u64::MAX, u32::MAX),
            Err(DescriptorError::OutsideUmem)
        );
        assert_eq!(
            layout.packet_range(256, 4096 - 255),
            Err(DescriptorError::CrossesChunk)
        );
        // The last chunk: running past it would also run past the UMEM.
        assert_eq!(
            layout.packet_range(3 * 4096 + 256, 4096),
            Err(DescriptorError::CrossesChunk)
        );
        assert_eq!(
            layout.packet_range(3 * 4096, u32::MAX),
            Err(DescriptorError::CrossesChunk)
        );
    }

    #[test]
    fn free_frames_start_full_hand_out_low_chunks_first_and_refuse_duplicates() {
        let layout = UmemLayout::new(2048, 3);
        let mut free = FreeFrames::all(&layout);
        assert_eq!(free.len(), 3);
        assert!(!free.put(0), "a full set takes no fourth chunk");
        assert_eq!(free.take(), Some(0));
        assert_eq!(free.take(), Some(2048));
        assert!(free.put(2048));
        assert_eq!(free.take(), Some(2048));
        assert_eq!(free.take(), Some(4096));
        assert_eq!(free.take(), None);
        assert_eq!(free.len(), 0);
    }
}
