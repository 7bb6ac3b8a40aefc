//! Standard output and error, line-buffered in the guest: a write that
//! ends no line stays here until one does (or 4 KiB gather, or the program
//! ends), so a program writing a few bytes at a time makes one exit per
//! line, not one per write. Like stdio buffers across `fork`, what is
//! buffered at a clone point is printed by the parent and by every clone.

use alloc::vec::Vec;

use snowflock_guest::abi::MAX_TRANSFER;
use snowflock_guest::hypercall;

const CAPACITY: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Stream {
    buffer: Vec<u8>,
}

fn emit(bytes: &[u8]) {
    for chunk in bytes.chunks(MAX_TRANSFER as usize) {
        hypercall::console_write(chunk);
    }
}

impl Stream {
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        match bytes.iter().rposition(|&b| b == b'\n') {
            Some(last) => {
                let (lines, rest) = bytes.split_at(last + 1);
                if self.buffer.is_empty() {
                    emit(lines);
                } else {
                    self.buffer.extend_from_slice(lines);
                    self.flush();
                }
                self.buffer.extend_from_slice(rest);
            }
            None => self.buffer.extend_from_slice(bytes),
        }
        if self.buffer.len() >= CAPACITY {
            self.flush();
        }
    }

    pub(crate) fn flush(&mut self) {
        if !self.buffer.is_empty() {
            emit(&self.buffer);
            self.buffer.clear();
        }
    }
}
