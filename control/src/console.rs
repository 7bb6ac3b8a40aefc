//! Console plumbing: each VM's output goes to one shared sink as whole lines,
//! prefixed with the VM's label, so that the output of many clones printing
//! at once stays readable.

use std::sync::{Arc, Mutex};

use snowflock_vmm::machine::ConsoleSink;

use crate::sync::lock;

/// Receives complete console lines (without the newline) and their VM label.
pub type LineSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// How a console line is shown: `[label] line`, or just the line for an
/// empty label (the VM the user started).
pub fn line_text(label: &str, line: &str) -> String {
    if label.is_empty() {
        line.to_string()
    } else {
        format!("[{label}] {line}")
    }
}

/// A line sink printing [`line_text`] to stdout.
pub fn stdout_lines() -> LineSink {
    Arc::new(|label, line| println!("{}", line_text(label, line)))
}

/// A per-VM console that buffers partial lines and forwards whole ones.
pub fn labelled(label: String, sink: LineSink) -> (ConsoleSink, ConsoleFlush) {
    let partial = Arc::new(Mutex::new(Vec::<u8>::new()));
    let flush = ConsoleFlush {
        label: label.clone(),
        sink: sink.clone(),
        partial: partial.clone(),
    };
    let console: ConsoleSink = Arc::new(move |bytes: &[u8]| {
        let mut buf = lock(&partial);
        buf.extend_from_slice(bytes);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            sink(
                &label,
                String::from_utf8_lossy(&line[..pos]).trim_end_matches('\r'),
            );
        }
    });
    (console, flush)
}

/// Emits what is left of a VM's last, unterminated line.
#[derive(Clone)]
pub struct ConsoleFlush {
    label: String,
    sink: LineSink,
    partial: Arc<Mutex<Vec<u8>>>,
}

impl std::fmt::Debug for ConsoleFlush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleFlush")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl ConsoleFlush {
    pub fn flush(&self) {
        let mut buf = lock(&self.partial);
        if !buf.is_empty() {
            (self.sink)(&self.label, &String::from_utf8_lossy(&buf));
            buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_flushes_the_rest() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sink: LineSink = Arc::new(move |label, line| {
            s.lock().unwrap().push(format!("{label}:{line}"));
        });
        let (console, flush) = labelled("c1".into(), sink);
        console(b"ab");
        console(b"c\nde\r\nf");
        flush.flush();
        assert_eq!(*seen.lock().unwrap(), ["c1:abc", "c1:de", "c1:f"]);
    }
}
