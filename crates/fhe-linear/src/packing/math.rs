//! The packing's arithmetic on polynomials and torus values: automorphisms, rotations by `X^s`,
//! the key's split for the FFT and the balanced gadget decomposition.

/// Where the key's 64-bit coefficients are cut for the FFT: `v = hi * 2^SPLIT + lo`.
pub(super) const SPLIT: u32 = 42;

/// `tau_g` on a polynomial of size N: `out[i g mod 2N] = +-p[i]`.
pub fn automorphism(p: &[u64], g: usize, out: &mut [u64]) {
    let n = p.len();
    let two_n = 2 * n;
    for (i, &v) in p.iter().enumerate() {
        let j = i * g % two_n;
        if j < n {
            out[j] = v;
        } else {
            out[j - n] = v.wrapping_neg();
        }
    }
}

/// `X^s * p` in Z_q[X]/(X^N + 1), added into `out`.
pub(super) fn add_rotated(p: &[u64], s: usize, out: &mut [u64]) {
    let n = p.len();
    for (i, &v) in p.iter().enumerate() {
        let j = i + s;
        if j < n {
            out[j] = out[j].wrapping_add(v);
        } else {
            out[j - n] = out[j - n].wrapping_sub(v);
        }
    }
}

/// The automorphism exponent of level index `k` (1 = the last level, `g = N + 1`).
pub fn galois_element(n: usize, k: u32) -> usize {
    1 + ((2 * n) >> k)
}

/// Splits a 64-bit value for the key switch's FFT: `v = hi * 2^42 + lo`, both signed.
#[inline(always)]
pub(super) fn split_key(v: u64) -> (f64, f64) {
    let lo = ((v << (64 - SPLIT)) as i64) >> (64 - SPLIT);
    let hi = (v.wrapping_sub(lo as u64) as i64) >> SPLIT;
    (hi as f64, lo as f64)
}

/// Balanced decomposition of `v` into `levels` digits of `base_log` bits, most significant
/// first, after rounding to the top `base_log * levels` bits.
#[inline(always)]
pub(super) fn decompose(v: u64, base_log: u32, levels: u32, digits: &mut [i64]) {
    let kept = base_log * levels;
    let shift = 64 - kept;
    let mut rest = if shift == 0 {
        v
    } else {
        (v >> shift).wrapping_add((v >> (shift - 1)) & 1)
    };
    let base = 1u64 << base_log;
    let half = base >> 1;
    for l in (0..levels as usize).rev() {
        let mut d = rest & (base - 1);
        rest >>= base_log;
        if d >= half {
            d = d.wrapping_sub(base);
            rest = rest.wrapping_add(1);
        }
        digits[l] = d as i64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decomposition_recomposes_the_rounded_value() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut digits = [0i64; 5];
        for _ in 0..10_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = state;
            decompose(v, 11, 5, &mut digits);
            let mut sum = 0u64;
            for (l, d) in digits.iter().enumerate() {
                assert!(d.abs() <= 1024);
                sum = sum.wrapping_add((*d as u64).wrapping_shl(64 - 11 * (l as u32 + 1)));
            }
            let err = v.wrapping_sub(sum) as i64;
            assert!(err.abs() <= 1 << 8, "{err}");
        }
    }

    #[test]
    fn key_split_joins() {
        for v in [
            0u64,
            1,
            u64::MAX,
            1 << 63,
            (1 << 41) + 3,
            0xdead_beef_cafe_f00d,
        ] {
            let (hi, lo) = split_key(v);
            assert!(hi.abs() <= (1 << 21) as f64 && lo.abs() <= (1u64 << 41) as f64);
            assert_eq!(
                ((hi as i64 as u64) << SPLIT).wrapping_add(lo as i64 as u64),
                v
            );
        }
    }

    #[test]
    fn automorphisms_compose_and_invert() {
        let n = 16;
        let p: Vec<u64> = (1..=n as u64).collect();
        let mut a = vec![0u64; n];
        let mut b = vec![0u64; n];
        // g and its inverse modulo 2N give back p.
        let g = galois_element(n, 2); // 1 + N/2 = 9; 9 * 25 = 225 = 7 * 32 + 1
        automorphism(&p, g, &mut a);
        automorphism(&a, 25, &mut b);
        assert_eq!(b, p);
    }
}
