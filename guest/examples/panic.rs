//! panic: panics with `deliberate panic 42` (the VM must end with that report).
#![no_std]
#![no_main]

snowflock_guest::entry!(main);

fn main() -> i32 {
    let answer = core::hint::black_box(42);
    panic!("deliberate panic {answer}");
}
