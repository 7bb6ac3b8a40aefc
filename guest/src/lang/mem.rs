//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`: the compiler emits calls
//! to them, and on this target nothing else provides them to a `no_std`
//! image. Written with string instructions in `asm!` so the optimiser cannot
//! recognise the loops and turn them back into calls to themselves.

use core::arch::asm;

/// # Safety
/// `src` and `dest` valid for `n` bytes, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear per the ABI.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// # Safety
/// `src` and `dest` valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src or past its end: a forward copy is safe.
        // SAFETY: forwarded caller contract.
        return unsafe { memcpy(dest, src, n) };
    }
    // dest overlaps the end of src: copy backwards, then restore DF.
    // SAFETY: n > 0 here because the difference above was below n, and the
    // caller guarantees dest is valid for n bytes.
    let dest_last = unsafe { dest.add(n - 1) };
    // SAFETY: as above, for src.
    let src_last = unsafe { src.add(n - 1) };
    // SAFETY: the caller guarantees both ranges; the copy runs from their last bytes down.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest_last => _,
            inout("rsi") src_last => _,
            options(nostack),
        );
    }
    dest
}

/// # Safety
/// `dest` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; DF is clear per the ABI.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let (a_end, b_end): (*const u8, *const u8);
    // SAFETY: the caller guarantees both ranges; `repe cmpsb` stops just past
    // the first differing pair, or past the end.
    unsafe {
        asm!(
            "repe cmpsb",
            inout("rcx") n => _,
            inout("rsi") a => a_end,
            inout("rdi") b => b_end,
            options(nostack, readonly),
        );
    }
    // SAFETY: at least one pair was compared, so the byte before each end
    // pointer lies in its range: the last pair compared (equal ranges make
    // them equal too).
    let a_last = unsafe { a_end.sub(1) };
    // SAFETY: as for `a_last`.
    let b_last = unsafe { b_end.sub(1) };
    // SAFETY: `a_last` is in `a`'s range (above).
    let x = unsafe { *a_last };
    // SAFETY: `b_last` is in `b`'s range (above).
    let y = unsafe { *b_last };
    i32::from(x) - i32::from(y)
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded caller contract.
    unsafe { memcmp(a, b, n) }
}
