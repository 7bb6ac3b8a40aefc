//! The panic handler: formats the message into a static buffer (no heap: the
//! panic may come from the allocator) and reports it with the `PANIC` hypercall.

use crate::abi::PanicReport;
use crate::hypercall;
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

const MESSAGE_CAP: usize = 4096;

struct MessageBuf(UnsafeCell<[u8; MESSAGE_CAP]>);

// SAFETY: only the first panic touches the buffer (guarded by PANICKING).
unsafe impl Sync for MessageBuf {}

static MESSAGE: MessageBuf = MessageBuf(UnsafeCell::new([0; MESSAGE_CAP]));
static PANICKING: AtomicBool = AtomicBool::new(false);

/// Fills a byte buffer, silently truncating (at a char boundary) when full.
struct Truncating<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for Truncating<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let (file, line, column) = info
        .location()
        .map_or(("<unknown>", 0, 0), |l| (l.file(), l.line(), l.column()));
    let message: &[u8] = if PANICKING.swap(true, Ordering::Relaxed) {
        // Formatting the first message panicked: report without formatting.
        b"panic while panicking"
    } else {
        // SAFETY: the flag above lets only the first panic get here, and the
        // guest is single-threaded, so this is the only reference.
        let buf = unsafe { &mut *MESSAGE.0.get() };
        let mut w = Truncating { buf, len: 0 };
        let _ = write!(w, "{}", info.message());
        let len = w.len;
        &buf[..len]
    };
    hypercall::panic(&PanicReport {
        message_ptr: message.as_ptr() as u64,
        message_len: message.len() as u64,
        file_ptr: file.as_ptr() as u64,
        file_len: file.len() as u64,
        line,
        column,
    })
}
