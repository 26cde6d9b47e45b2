//! Exact negacyclic polynomial products through a 64-bit floating-point FFT.
//!
//! tfhe's FFT engine (`tfhe-fft`, the one tfhe's bootstrapping uses) computes products in
//! Z[X]/(X^N + 1) with f64 arithmetic. An f64 product is only exact while its coefficients stay
//! well below 2^53, while our ciphertexts carry 64-bit coefficients. Every 64-bit operand is therefore
//! split into signed 32-bit halves, `a = a_hi * 2^32 + a_lo`, each half is multiplied separately,
//! rounded back to integers, and recombined modulo 2^64. Rounding to the nearest integer makes the
//! result exact as long as the f64 error stays below 1/2: the tests compare against a schoolbook
//! product, including the worst-case all -128 weights.
//!
//! A layer's product coefficient sums `input blocks x N` such terms (its spectra are accumulated
//! over the input blocks before one backward transform), and the f64 error grows with that count.
//! Measured with all -128 weights (the largest spectra) on the packed set, the largest distance of a
//! transformed value from its integer was 0.17-0.25 at 2^19 terms, 0.28-0.47 at 2^20 (one layer,
//! 8192x512 with n_i = 32, already decoded wrongly) and 0.5 (wrong results) from 2^21 on. Layouts
//! are therefore refused above [`MAX_PRODUCT_TERMS_LOG2`] (`LayerSpec::with_encoding`).
//!
//! Fourier-domain data is stored *planar*: the N/2 real parts, then the N/2 imaginary parts, so that
//! the multiply-accumulate loops vectorise.

// Index loops over parallel arrays read closest to the math here.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use dyn_stack::{PodBuffer, PodStack};
use tfhe_fft::c64;

use crate::primitives::round_i64;
use tfhe_fft::unordered::{Method, Plan};

/// Most terms (`input blocks x N`, as a power of two) that one product coefficient may sum: the
/// f64 error then stays at a quarter or less, half of what rounding tolerates (module docs).
pub const MAX_PRODUCT_TERMS_LOG2: u32 = 19;

/// A negacyclic FFT of one polynomial size, shared process-wide.
pub struct Fourier {
    n: usize,
    plan: Plan,
    /// exp(i * pi * j / N) for j < N/2: folds the negacyclic product into a cyclic one.
    twist: Vec<c64>,
}

/// Splits a 64-bit value into signed halves: `v = hi * 2^32 + lo (mod 2^64)`.
#[inline(always)]
pub fn split_u64(v: u64) -> (i32, i32) {
    let lo = v as u32 as i32;
    let hi = (v.wrapping_sub(lo as i64 as u64) >> 32) as u32 as i32;
    (hi, lo)
}

/// Inverse of [`split_u64`] for integer-valued products of the halves.
#[inline(always)]
pub fn join_u64(hi: i64, lo: i64) -> u64 {
    ((hi as u64) << 32).wrapping_add(lo as u64)
}

impl Fourier {
    /// The shared FFT for polynomial size `n` (planned once per process).
    pub fn get(n: usize) -> &'static Fourier {
        static PLANS: OnceLock<Mutex<HashMap<usize, &'static Fourier>>> = OnceLock::new();
        let mut plans = PLANS
            .get_or_init(Default::default)
            .lock()
            .expect("fft plan cache");
        plans
            .entry(n)
            .or_insert_with(|| Box::leak(Box::new(Fourier::new(n))))
    }

    fn new(n: usize) -> Self {
        assert!(
            n.is_power_of_two() && n >= 32,
            "polynomial size must be a power of two >= 32"
        );
        let h = n / 2;
        let plan = Plan::new(h, Method::Measure(Duration::from_millis(10)));
        let twist = (0..h)
            .map(|j| {
                let (s, c) = (std::f64::consts::PI * j as f64 / n as f64).sin_cos();
                c64::new(c, s)
            })
            .collect();
        Fourier { n, plan, twist }
    }

    /// Polynomial size N.
    pub fn size(&self) -> usize {
        self.n
    }

    /// Length of one planar Fourier polynomial: N f64 values (N/2 re, then N/2 im).
    pub fn planar_len(&self) -> usize {
        self.n
    }

    /// Scratch memory for one thread.
    pub fn scratch(&self) -> Scratch {
        Scratch {
            stack: PodBuffer::try_new(self.plan.fft_scratch()).expect("fft scratch allocation"),
            buf: vec![c64::default(); self.n / 2],
        }
    }

    /// Forward transform of an integer polynomial given coefficient-wise (|values| < 2^53),
    /// written planar into `out` (length N).
    pub fn forward(&self, coeff: impl Fn(usize) -> f64, out: &mut [f64], scratch: &mut Scratch) {
        let h = self.n / 2;
        let buf = &mut scratch.buf;
        for j in 0..h {
            buf[j] = c64::new(coeff(j), coeff(j + h)) * self.twist[j];
        }
        self.plan.fwd(buf, PodStack::new(&mut scratch.stack));
        let (re, im) = out.split_at_mut(h);
        for j in 0..h {
            re[j] = buf[j].re;
            im[j] = buf[j].im;
        }
    }

    /// Forward transforms of the two signed 32-bit halves of a 64-bit polynomial.
    pub fn forward_split(
        &self,
        poly: &[u64],
        hi: &mut [f64],
        lo: &mut [f64],
        scratch: &mut Scratch,
    ) {
        self.forward(|j| split_u64(poly[j]).0 as f64, hi, scratch);
        self.forward(|j| split_u64(poly[j]).1 as f64, lo, scratch);
    }

    /// Inverse transform of a planar Fourier polynomial whose coefficients are integers; calls
    /// `sink(j, value)` with each coefficient rounded to the nearest integer.
    pub fn backward(
        &self,
        planar: &[f64],
        scratch: &mut Scratch,
        mut sink: impl FnMut(usize, i64),
    ) {
        let h = self.n / 2;
        let buf = &mut scratch.buf;
        let (re, im) = planar.split_at(h);
        for j in 0..h {
            buf[j] = c64::new(re[j], im[j]);
        }
        self.plan.inv(buf, PodStack::new(&mut scratch.stack));
        let norm = 1.0 / h as f64;
        for j in 0..h {
            let v = buf[j] * self.twist[j].conj() * norm;
            sink(j, round_i64(v.re));
            sink(j + h, round_i64(v.im));
        }
    }

    /// Exact product modulo 2^64 of a 64-bit polynomial with a small integer polynomial given
    /// in the Fourier domain (`small`, planar), written into `out`.
    pub fn mul_u64_by_small(
        &self,
        poly: &[u64],
        small: &[f64],
        out: &mut [u64],
        scratch: &mut Scratch,
    ) {
        let n = self.n;
        let mut hi = vec![0.0; n];
        let mut lo = vec![0.0; n];
        self.forward_split(poly, &mut hi, &mut lo, scratch);
        let mut acc_hi = vec![0.0; n];
        let mut acc_lo = vec![0.0; n];
        mul_acc(&mut acc_hi, &hi, small);
        mul_acc(&mut acc_lo, &lo, small);
        let mut his = vec![0i64; n];
        self.backward(&acc_hi, scratch, |j, v| his[j] = v);
        self.backward(&acc_lo, scratch, |j, v| out[j] = join_u64(his[j], v));
    }
}

/// Per-thread FFT scratch space.
pub struct Scratch {
    stack: PodBuffer,
    buf: Vec<c64>,
}

/// `acc += x * w`, pointwise on planar Fourier polynomials.
#[inline(always)]
fn mul_acc_generic(acc: &mut [f64], x: &[f64], w: &[f64]) {
    let h = w.len() / 2;
    let (w_re, w_im) = w.split_at(h);
    let (x_re, x_im) = x.split_at(h);
    let (a_re, a_im) = acc.split_at_mut(h);
    let (x_re, x_im, a_re, a_im) = (&x_re[..h], &x_im[..h], &mut a_re[..h], &mut a_im[..h]);
    for i in 0..h {
        let (xr, xi, wr, wi) = (x_re[i], x_im[i], w_re[i], w_im[i]);
        a_re[i] += xr * wr - xi * wi;
        a_im[i] += xr * wi + xi * wr;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn mul_acc_avx512(acc: &mut [f64], x: &[f64], w: &[f64]) {
    mul_acc_generic(acc, x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mul_acc_avx2(acc: &mut [f64], x: &[f64], w: &[f64]) {
    mul_acc_generic(acc, x, w)
}

/// `acc += x * w` on planar Fourier polynomials of equal length, with the widest SIMD available.
pub fn mul_acc(acc: &mut [f64], x: &[f64], w: &[f64]) {
    assert!(acc.len() == w.len() && x.len() == w.len() && w.len().is_multiple_of(2));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the feature the function was compiled for.
            return unsafe { mul_acc_avx512(acc, x, w) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { mul_acc_avx2(acc, x, w) };
        }
    }
    mul_acc_generic(acc, x, w)
}

/// Schoolbook product in Z_{2^64}[X]/(X^N + 1) of a 64-bit polynomial by a small signed one: the
/// reference the FFT products are tested against.
#[cfg(test)]
pub(crate) fn schoolbook(a: &[u64], w: &[i64]) -> Vec<u64> {
    let n = a.len();
    let mut out = vec![0u64; n];
    for i in 0..n {
        for j in 0..n {
            let p = a[i].wrapping_mul(w[j] as u64);
            let k = i + j;
            if k < n {
                out[k] = out[k].wrapping_add(p);
            } else {
                out[k - n] = out[k - n].wrapping_sub(p);
            }
        }
    }
    out
}

/// Deterministic pseudo-random test inputs (an LCG with an output xor-shift).
#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *state ^ (*state >> 29)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fourier::tests_support::lcg;

    #[test]
    fn split_join_roundtrip() {
        for v in [
            0u64,
            1,
            u64::MAX,
            1 << 63,
            (1 << 31) + 5,
            0x8000_0000_8000_0000,
            12345678901234567,
        ] {
            let (hi, lo) = split_u64(v);
            assert_eq!(join_u64(hi as i64, lo as i64), v);
        }
    }

    #[test]
    fn product_is_exact_for_random_and_extreme_weights() {
        let n = 2048;
        let f = Fourier::get(n);
        let mut scratch = f.scratch();
        let mut st = 7u64;
        let a: Vec<u64> = (0..n).map(|_| lcg(&mut st)).collect();
        let weight_sets: Vec<Vec<i64>> = vec![
            (0..n).map(|_| (lcg(&mut st) % 256) as i64 - 128).collect(),
            vec![-128; n],
            vec![127; n],
        ];
        for w in weight_sets {
            let mut wf = vec![0.0; n];
            f.forward(|j| w[j] as f64, &mut wf, &mut scratch);
            let mut out = vec![0u64; n];
            f.mul_u64_by_small(&a, &wf, &mut out, &mut scratch);
            assert_eq!(out, schoolbook(&a, &w));
        }
    }
}
