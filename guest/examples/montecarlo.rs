//! montecarlo: prices a European call option by Monte Carlo (geometric
//! Brownian motion, Black-Scholes world) across clones.
//!
//! Args `paths` (default 4_000_000), `clones` (default 8), `seed` (default 1).
//! The paths are split into one shard per granted clone (one shard, done by
//! the parent, if none is granted); shard j draws from a generator seeded with
//! mix(seed, j). The parent merges the children's sums, recomputes every shard
//! serially and requires bitwise equality, and requires the price to lie
//! within 5 standard errors (+1e-4) of the analytic Black-Scholes price.
//! Prints `montecarlo: ... price=.. analytic=.. stderr=.. check=ok`; exits 0
//! iff both checks pass.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::arch::asm;
use snowflock_guest::args::{arg_u32, arg_u64};
use snowflock_guest::rand::{SplitMix64, mix};
use snowflock_guest::time::{Millis, now_ns};
use snowflock_guest::{Fork, clone, exit, join, println, request_ticket};

snowflock_guest::entry!(main);

// The option: spot, strike, risk-free rate, volatility, years to expiry.
const S0: f64 = 100.0;
const STRIKE: f64 = 100.0;
const RATE: f64 = 0.05;
const SIGMA: f64 = 0.2;
const T: f64 = 1.0;

/// Undiscounted payoff sums of one shard.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sums {
    sum: f64,
    sum_sq: f64,
    paths: u64,
}

impl Sums {
    fn to_bytes(self) -> [u8; 24] {
        let mut out = [0; 24];
        out[..8].copy_from_slice(&self.sum.to_le_bytes());
        out[8..16].copy_from_slice(&self.sum_sq.to_le_bytes());
        out[16..].copy_from_slice(&self.paths.to_le_bytes());
        out
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        let word = |i: usize| {
            Some(u64::from_le_bytes(
                b.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        (b.len() == 24).then_some(())?;
        Some(Self {
            sum: f64::from_bits(word(0)?),
            sum_sq: f64::from_bits(word(1)?),
            paths: word(2)?,
        })
    }

    /// Bitwise equality: the serial recomputation must reproduce every bit.
    fn same_bits(&self, other: &Self) -> bool {
        self.sum.to_bits() == other.sum.to_bits()
            && self.sum_sq.to_bits() == other.sum_sq.to_bits()
            && self.paths == other.paths
    }
}

/// Paths of shard `j` (1-based) of `shards`.
fn shard_paths(paths: u64, shards: u64, j: u64) -> u64 {
    let at = |k: u64| (u128::from(paths) * u128::from(k) / u128::from(shards)) as u64;
    at(j) - at(j - 1)
}

fn run_shard(seed: u64, j: u64, paths: u64) -> Sums {
    let mut rng = SplitMix64::new(mix(seed, j));
    let drift = (RATE - 0.5 * SIGMA * SIGMA) * T;
    let vol = SIGMA * sqrt(T);
    let mut s = Sums {
        sum: 0.0,
        sum_sq: 0.0,
        paths,
    };
    let mut done = 0;
    while done < paths {
        let (z1, z2) = normal_pair(&mut rng);
        for z in [z1, z2] {
            if done == paths {
                break;
            }
            let payoff = (S0 * exp(drift + vol * z) - STRIKE).max(0.0);
            s.sum += payoff;
            s.sum_sq += payoff * payoff;
            done += 1;
        }
    }
    s
}

/// Two independent standard normals (Marsaglia's polar method).
fn normal_pair(rng: &mut SplitMix64) -> (f64, f64) {
    loop {
        let u = 2.0 * rng.next_f64() - 1.0;
        let v = 2.0 * rng.next_f64() - 1.0;
        let s = u * u + v * v;
        if s > 0.0 && s < 1.0 {
            let f = sqrt(-2.0 * ln(s) / s);
            return (u * f, v * f);
        }
    }
}

fn merge(shards: &[Sums]) -> Sums {
    shards.iter().fold(
        Sums {
            sum: 0.0,
            sum_sq: 0.0,
            paths: 0,
        },
        |a, s| Sums {
            sum: a.sum + s.sum,
            sum_sq: a.sum_sq + s.sum_sq,
            paths: a.paths + s.paths,
        },
    )
}

fn main() -> i32 {
    let paths = arg_u64("paths", 4_000_000).max(2);
    let clones = arg_u32("clones", 8);
    let seed = arg_u64("seed", 1);

    let ticket = request_ticket(clones).expect("request_ticket");
    let shards = u64::from(ticket.granted()).max(1);
    let t0 = now_ns();
    if let Fork::Child(id) = clone(&ticket).expect("clone") {
        let j = u64::from(id);
        exit(&run_shard(seed, j, shard_paths(paths, shards, j)).to_bytes());
    }
    let t1 = now_ns();
    let mut ok = true;
    let parallel: Vec<Sums> = if ticket.granted() == 0 {
        alloc::vec![run_shard(seed, 1, paths)]
    } else {
        let outcomes = join(&ticket).expect("join");
        ok &= outcomes.len() == ticket.granted() as usize;
        outcomes
            .iter()
            .filter_map(|child| match &child.result {
                Ok(r) => Sums::from_bytes(r).or_else(|| {
                    println!("montecarlo: child {}: malformed result", child.id);
                    ok = false;
                    None
                }),
                Err(failure) => {
                    println!("montecarlo: child {}: {failure}", child.id);
                    ok = false;
                    None
                }
            })
            .collect()
    };
    let t2 = now_ns();
    let serial: Vec<Sums> = (1..=shards)
        .map(|j| run_shard(seed, j, shard_paths(paths, shards, j)))
        .collect();
    let t3 = now_ns();

    let (par, ser) = (merge(&parallel), merge(&serial));
    let bitwise = ok && parallel.len() == serial.len() && par.same_bits(&ser);
    let n = ser.paths as f64;
    let discount = exp(-RATE * T);
    let price = discount * ser.sum / n;
    let variance = (ser.sum_sq / n - (ser.sum / n) * (ser.sum / n)) * n / (n - 1.0);
    let stderr = discount * sqrt(variance.max(0.0) / n);
    let analytic = black_scholes_call(S0, STRIKE, RATE, SIGMA, T);
    let close = (price - analytic).abs() <= 5.0 * stderr + 1e-4;

    println!(
        "montecarlo: clone_ms={} join_ms={} serial_ms={}",
        Millis(t1 - t0),
        Millis(t2 - t1),
        Millis(t3 - t2)
    );
    println!(
        "montecarlo: paths={paths} clones={clones} granted={} price={price:.6} analytic={analytic:.6} stderr={stderr:.6} bitwise={} check={}",
        ticket.granted(),
        if bitwise { "equal" } else { "DIFFERENT" },
        if bitwise && close { "ok" } else { "FAILED" },
    );
    if bitwise && close { 0 } else { 1 }
}

fn black_scholes_call(s: f64, k: f64, r: f64, sigma: f64, t: f64) -> f64 {
    let sd = sigma * sqrt(t);
    let d1 = (ln(s / k) + (r + 0.5 * sigma * sigma) * t) / sd;
    let d2 = d1 - sd;
    s * normal_cdf(d1) - k * exp(-r * t) * normal_cdf(d2)
}

// Hand-rolled math: `core` has no transcendental functions, and the guest
// workspace stays dependency-free. Accurate to ~1 ulp (exp, ln) or 1.2e-7
// relative (erfc), plenty for the check; deterministic, which is what matters.

fn sqrt(x: f64) -> f64 {
    let root: f64;
    // SAFETY: `sqrtsd` only computes on registers (correctly rounded, IEEE).
    unsafe {
        asm!("sqrtsd {0}, {1}", lateout(xmm_reg) root, in(xmm_reg) x,
            options(pure, nomem, nostack, preserves_flags));
    }
    root
}

/// ln 2 split (as in fdlibm) so that `k * LN2_HI` is exact for |k| < 2^11.
const LN2_HI: f64 = 0.693_147_180_369_123_8;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;

/// e^x: x = k ln2 + r with |r| <= ln2/2, e^r by Taylor series, times 2^k.
fn exp(x: f64) -> f64 {
    if x > 709.0 {
        return f64::INFINITY;
    }
    if x < -708.0 {
        return 0.0;
    }
    let kf = x * core::f64::consts::LOG2_E;
    let k = if kf >= 0.0 {
        (kf + 0.5) as i64
    } else {
        (kf - 0.5) as i64
    };
    let r = (x - k as f64 * LN2_HI) - k as f64 * LN2_LO;
    let mut term = 1.0;
    let mut sum = 1.0;
    for i in 1..=14 {
        term *= r / f64::from(i);
        sum += term;
    }
    sum * f64::from_bits(((k + 1023) as u64) << 52)
}

/// ln x for positive normal x: x = 2^e m with m in [sqrt(1/2), sqrt(2)),
/// ln m = 2 atanh(s) with s = (m-1)/(m+1), |s| < 0.172, as a series.
fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    if m > core::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut poly = 0.0;
    for j in (0..=10).rev() {
        poly = poly * s2 + 1.0 / f64::from(2 * j + 1);
    }
    e as f64 * core::f64::consts::LN_2 + 2.0 * s * poly
}

/// The standard normal CDF via erfc (Numerical Recipes' Chebyshev fit).
fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / core::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let coeffs = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let poly = coeffs.iter().rev().fold(0.0, |acc, &c| acc * t + c);
    let r = t * exp(-z * z + poly);
    if x >= 0.0 { r } else { 2.0 - r }
}
