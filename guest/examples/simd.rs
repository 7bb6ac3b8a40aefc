//! simd: SSE and AVX work in a guest, and their registers survive a clone.
//!
//! Checks CPUID and XCR0 for AVX, adds vectors with SSE2 and AVX, clones one
//! child while a YMM value is live in the parent's computation, and has the
//! child redo the AVX sum. Prints `simd: avx=<yes|no> ... ok`; exits 0 iff
//! every sum is right, 3 if the CPU offers no AVX.
#![no_std]
#![no_main]

use core::arch::x86_64::{
    __cpuid, __m256d, _mm_add_pd, _mm_set_pd, _mm_storeu_pd, _mm256_add_pd, _mm256_set_pd,
    _mm256_storeu_pd, _xgetbv,
};
use snowflock_guest::{Fork, clone, exit, join, println, request_ticket};

snowflock_guest::entry!(main);

const CPUID_1_ECX_OSXSAVE: u32 = 1 << 27;
const CPUID_1_ECX_AVX: u32 = 1 << 28;
/// XCR0: x87, SSE and AVX state enabled.
const XCR0_SSE_AVX: u64 = 0b110;

/// Whether the CPU and the OS (here, the VMM) let this guest use AVX.
fn avx_usable() -> bool {
    let leaf1 = __cpuid(1);
    let wanted = CPUID_1_ECX_OSXSAVE | CPUID_1_ECX_AVX;
    if leaf1.ecx & wanted != wanted {
        return false;
    }
    // SAFETY: CPUID reported OSXSAVE, so XGETBV is enabled.
    let xcr0 = unsafe { xcr0() };
    xcr0 & XCR0_SSE_AVX == XCR0_SSE_AVX
}

/// # Safety
/// XGETBV must be enabled (CPUID.1:ECX.OSXSAVE).
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    // SAFETY: the caller guarantees OSXSAVE; XCR0 always exists then.
    unsafe { _xgetbv(0) }
}

#[target_feature(enable = "sse2")]
fn sse_sum() -> f64 {
    let mut out = [0.0f64; 2];
    let v = _mm_add_pd(_mm_set_pd(1.5, 2.5), _mm_set_pd(10.0, 20.0));
    // SAFETY: `out` holds the two f64 an unaligned 128-bit store writes.
    unsafe { _mm_storeu_pd(out.as_mut_ptr(), v) };
    out[0] + out[1]
}

#[target_feature(enable = "avx")]
fn avx_vector(scale: f64) -> __m256d {
    _mm256_add_pd(
        _mm256_set_pd(1.0, 2.0, 3.0, 4.0),
        _mm256_set_pd(scale, scale, scale, scale),
    )
}

#[target_feature(enable = "avx")]
fn avx_total(v: __m256d) -> f64 {
    let mut out = [0.0f64; 4];
    // SAFETY: `out` holds the four f64 an unaligned 256-bit store writes.
    unsafe { _mm256_storeu_pd(out.as_mut_ptr(), v) };
    out.iter().sum()
}

fn main() -> i32 {
    // SAFETY: SSE2 is part of x86-64; the VMM enables its state (CR4.OSFXSR).
    let sse = unsafe { sse_sum() };
    let avx = avx_usable();
    println!("simd: avx={} sse_sum={sse}", if avx { "yes" } else { "no" });
    if sse != 34.0 {
        return 1;
    }
    if !avx {
        return 3;
    }
    // SAFETY: `avx_usable` confirmed CPU support and OS-enabled YMM state.
    let live = unsafe { avx_vector(100.0) };
    let ticket = request_ticket(1).expect("request_ticket");
    if let Fork::Child(_) = clone(&ticket).expect("clone") {
        // SAFETY: as above; the child runs on the same CPU model.
        let total = unsafe { avx_total(live) };
        exit(&total.to_le_bytes());
    }
    // SAFETY: as above.
    let parent_total = unsafe { avx_total(live) };
    let child_total = join(&ticket)
        .expect("join")
        .first()
        .and_then(|c| c.result.as_ref().ok())
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
        .map(f64::from_le_bytes);
    let ok = parent_total == 410.0 && (ticket.granted() == 0 || child_total == Some(410.0));
    println!(
        "simd: avx_sum={parent_total} clone_avx_sum={child_total:?} {}",
        if ok { "ok" } else { "WRONG" }
    );
    if ok { 0 } else { 1 }
}
