//! The VM console. [`print!`](crate::print) and [`println!`](crate::println)
//! format into a stack buffer and issue one `CONSOLE_WRITE` per call (more only
//! when a line outgrows the buffer), so lines from one call stay together.

use crate::abi::MAX_TRANSFER;
use crate::hypercall;
use core::fmt;

/// Writes `bytes` to the console, in as many hypercalls as [`MAX_TRANSFER`] needs.
pub fn write(bytes: &[u8]) {
    for chunk in bytes.chunks(MAX_TRANSFER as usize) {
        // Console output is best effort: nothing useful to do on failure.
        hypercall::console_write(chunk);
    }
}

/// A `fmt::Write` sink that batches output into hypercalls of up to `BUF` bytes.
#[derive(Debug)]
pub struct Writer {
    buf: [u8; Self::BUF],
    len: usize,
}

impl Writer {
    const BUF: usize = 512;

    pub const fn new() -> Self {
        Self {
            buf: [0; Self::BUF],
            len: 0,
        }
    }

    /// Writes out whatever is buffered.
    pub fn flush(&mut self) {
        if self.len > 0 {
            write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            if self.len == Self::BUF {
                self.flush();
            }
            let n = bytes.len().min(Self::BUF - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.flush();
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>, newline: bool) {
    use fmt::Write as _;
    let mut w = Writer::new();
    // Writer never fails; a failing Display impl just truncates the line.
    let _ = w.write_fmt(args);
    if newline {
        let _ = w.write_str("\n");
    }
}

/// Prints to the VM console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!($($arg)*), false)
    };
}

/// Prints a line to the VM console (one hypercall for lines up to 512 bytes).
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::_print(::core::format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!($($arg)*), true)
    };
}
