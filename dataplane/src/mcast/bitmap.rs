//! One bit per page: the pages a receiver holds or queued, the pages a push plan took.

/// Pages, one bit each; bits past the end read as clear and ignore sets.
#[derive(Debug)]
pub(crate) struct Bitmap(Vec<u64>);

impl Bitmap {
    pub(crate) fn new(bits: u64) -> Bitmap {
        Bitmap(vec![0; bits.div_ceil(64) as usize])
    }

    pub(crate) fn get(&self, bit: u64) -> bool {
        self.0
            .get((bit / 64) as usize)
            .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }

    pub(crate) fn set(&mut self, bit: u64) {
        if let Some(word) = self.0.get_mut((bit / 64) as usize) {
            *word |= 1 << (bit % 64);
        }
    }

    pub(crate) fn clear(&mut self, bit: u64) {
        if let Some(word) = self.0.get_mut((bit / 64) as usize) {
            *word &= !(1 << (bit % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Bitmap;

    #[test]
    fn a_bitmap_holds_bits_in_range_and_ignores_the_rest() {
        let mut bits = Bitmap::new(70);
        bits.set(0);
        bits.set(69);
        bits.set(200);
        assert!(bits.get(0) && bits.get(69));
        assert!(!bits.get(1) && !bits.get(64) && !bits.get(200));
        bits.clear(69);
        assert!(!bits.get(69) && bits.get(0));
    }
}
