//! Primitives shared by the client, the server and the packing keys: mask expansion from a
//! public seed, the private noise generator, rounding to the wire's precision and bit packing.
//!
//! # Masks (wire format version 2)
//!
//! The masks of a seeded payload (a batch, a packing key) are the AES-128 counter-mode keystream
//! under the payload's 16-byte seed as the key (`seed.to_le_bytes()`): 128-bit block number `i`
//! is `AES_seed(i.to_le_bytes())`, and mask coefficient `j` of ciphertext `c` (polynomial size
//! `N`) is the little-endian `u64` at bytes `8 * (j % 2)` of block `c * N / 2 + j / 2`. Anyone can
//! regenerate any ciphertext's mask on its own, in bulk: the AES runs many blocks at a time (with
//! AES-NI or VAES where the CPU has them), where format version 1 drew masks through tfhe's
//! byte-at-a-time generator interface.
//!
//! # Noise
//!
//! Encryption noise comes from [`NoiseSource`]: the same AES-128 counter-mode construction
//! under a secret key drawn from the operating system's entropy ([`NoiseSource::from_entropy`]),
//! turned into Gaussian samples by the ziggurat method (`rand_distr::StandardNormal`), scaled to
//! the parameter set's standard deviation and rounded to the integer torus, as tfhe's own
//! `Gaussian` sampler does with the Marsaglia polar method. The distribution, and with it the
//! security of the parameter set, is the same; a sample costs one 64-bit draw in about 99% of
//! cases instead of a logarithm and a square root.

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use aes::Aes128;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// AES blocks computed per call of the cipher (enough to keep its pipeline full).
const BATCH_BLOCKS: usize = 64;

/// Fills `out` with the keystream of `cipher` from block `first` on: two u64 per block.
fn keystream(cipher: &Aes128, first: u128, out: &mut [u64]) {
    let mut blocks = [aes::Block::default(); BATCH_BLOCKS];
    let mut counter = first;
    for chunk in out.chunks_mut(2 * BATCH_BLOCKS) {
        let used = chunk.len().div_ceil(2);
        for block in &mut blocks[..used] {
            *block = Array::from(counter.to_le_bytes());
            counter = counter.wrapping_add(1);
        }
        cipher.encrypt_blocks(&mut blocks[..used]);
        for (pair, block) in chunk.chunks_mut(2).zip(&blocks[..used]) {
            for (v, bytes) in pair.iter_mut().zip(block.chunks_exact(8)) {
                *v = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
            }
        }
    }
}

fn cipher(key: u128) -> Aes128 {
    Aes128::new(&Array::from(key.to_le_bytes()))
}

/// The uniform masks of `count` seeded ciphertexts of size `n` (`n` even), regenerated from
/// their public seed as the module docs describe, in parallel. Client and server both call this.
pub(crate) fn expand_masks(seed: u128, count: usize, n: usize) -> Vec<u64> {
    assert!(n.is_multiple_of(2), "polynomial sizes are even");
    let aes = cipher(seed);
    let mut masks = vec![0u64; count * n];
    masks.par_chunks_mut(n).enumerate().for_each(|(c, mask)| {
        keystream(&aes, (c * n / 2) as u128, mask);
    });
    masks
}

/// A private cryptographically secure generator of encryption noise (see the module docs).
pub(crate) struct NoiseSource {
    aes: Aes128,
    counter: u128,
    buffer: [u64; 2 * BATCH_BLOCKS],
    used: usize,
}

impl NoiseSource {
    /// A generator under a secret key (the caller draws it from a secure source).
    pub(crate) fn new(key: u128) -> Self {
        NoiseSource {
            aes: cipher(key),
            counter: 0,
            buffer: [0; 2 * BATCH_BLOCKS],
            used: 2 * BATCH_BLOCKS,
        }
    }

    /// A generator under a fresh key from the operating system's entropy.
    pub(crate) fn from_entropy() -> Self {
        Self::new(Self::fresh_seed())
    }

    /// 128 bits of the operating system's entropy (through tfhe's seeder: the CPU's `rdseed`
    /// where present, else `/dev/random`), for keys and public seeds alike.
    pub(crate) fn fresh_seed() -> u128 {
        tfhe::core_crypto::prelude::new_seeder().seed().0
    }

    /// A fresh 128-bit secret drawn from this generator (keys of independent generators).
    pub(crate) fn next_u128(&mut self) -> u128 {
        let lo = self.next() as u128;
        (self.next() as u128) << 64 | lo
    }

    fn next(&mut self) -> u64 {
        if self.used == self.buffer.len() {
            keystream(&self.aes, self.counter, &mut self.buffer);
            self.counter += BATCH_BLOCKS as u128;
            self.used = 0;
        }
        self.used += 1;
        self.buffer[self.used - 1]
    }

    /// Adds to every value one Gaussian sample of standard deviation `std_relative` (relative
    /// to q = 2^64), rounded to the nearest integer of the 64-bit torus.
    pub(crate) fn add_gaussian(&mut self, values: &mut [u64], std_relative: f64) {
        let std = std_relative * 2f64.powi(64);
        for v in values {
            let e: f64 = StandardNormal.sample(self);
            *v = v.wrapping_add(round_i64(e * std) as u64);
        }
    }
}

impl rand_core::RngCore for NoiseSource {
    fn next_u32(&mut self) -> u32 {
        self.next() as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.next()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// A binary secret key arranged for direct products: `M[j] = 0 - s[N - 1 - j]` (all ones where
/// the reversed key is 1), so that one coefficient of `a * s` is a contiguous masked sum.
pub(crate) fn reversed_key_masks(key: &[u64]) -> Vec<u64> {
    key.iter().rev().map(|s| 0u64.wrapping_sub(*s)).collect()
}

/// Coefficients `positions` of the negacyclic product `a * s` modulo 2^64 and X^N + 1, for a
/// binary key given as [`reversed_key_masks`], calling `sink(position, value)`.
///
/// With `A[i] = -a[i]` for `i < N` and `A[i] = a[i - N]` for `N <= i < 2N` (the negacyclic
/// extension: `a[k - j] = A[k - j + N]`, negated where `k - j` wraps below zero), coefficient `k` is
/// `sum_j M[j] & A[k + 1 + j]`: N masked additions over contiguous memory, exact, and cheaper
/// than the four transforms of an FFT product when only a few coefficients are needed (a keyless
/// result of one token reads `n_o` of each ciphertext's N).
pub(crate) fn negacyclic_binary_at(
    a: &[u64],
    reversed_key: &[u64],
    positions: impl Iterator<Item = usize>,
    mut sink: impl FnMut(usize, u64),
) {
    let n = a.len();
    assert_eq!(reversed_key.len(), n);
    let mut extended = Vec::with_capacity(2 * n);
    extended.extend(a.iter().map(|v| v.wrapping_neg()));
    extended.extend_from_slice(a);
    for k in positions {
        let window = &extended[k + 1..k + 1 + n];
        sink(k, masked_sum(window, reversed_key));
    }
}

#[inline(always)]
fn masked_sum_generic(values: &[u64], masks: &[u64]) -> u64 {
    // An integer reduction: the compiler vectorises it (wrapping addition is associative).
    values
        .iter()
        .zip(masks)
        .fold(0u64, |acc, (v, m)| acc.wrapping_add(v & m))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn masked_sum_avx512(values: &[u64], masks: &[u64]) -> u64 {
    masked_sum_generic(values, masks)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn masked_sum_avx2(values: &[u64], masks: &[u64]) -> u64 {
    masked_sum_generic(values, masks)
}

/// `sum_j values[j] & masks[j]` modulo 2^64, with the widest SIMD available.
fn masked_sum(values: &[u64], masks: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the feature the function was compiled for.
            return unsafe { masked_sum_avx512(values, masks) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { masked_sum_avx2(values, masks) };
        }
    }
    masked_sum_generic(values, masks)
}

/// `x` rounded to the nearest integer, halves away from zero (as `f64::round`), for |x| < 2^63:
/// a truncating conversion and a comparison, which compile inline where `f64::round` is a call
/// into the C library on the baseline x86-64 target.
#[inline(always)]
pub(crate) fn round_i64(x: f64) -> i64 {
    let t = x as i64;
    let frac = x - t as f64;
    t + (frac >= 0.5) as i64 - (frac <= -0.5) as i64
}

/// Rounds a 64-bit torus value to its top `bits` bits (returned as a `bits`-bit integer).
#[inline(always)]
pub(crate) fn round_to_bits(v: u64, bits: u32) -> u64 {
    if bits == 64 {
        return v;
    }
    let shift = 64 - bits;
    ((v >> shift).wrapping_add((v >> (shift - 1)) & 1)) & ((1u64 << bits) - 1)
}

/// Appends `values` (each below 2^bits) as a little-endian bit stream, LSB first.
pub fn pack_bits(values: &[u64], bits: u32, out: &mut Vec<u8>) {
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let mut acc: u128 = 0;
    let mut filled = 0u32;
    for &v in values {
        acc |= ((v & mask) as u128) << filled;
        filled += bits;
        while filled >= 64 {
            out.extend_from_slice(&(acc as u64).to_le_bytes());
            acc >>= 64;
            filled -= 64;
        }
    }
    let tail = filled.div_ceil(8) as usize;
    out.extend_from_slice(&(acc as u64).to_le_bytes()[..tail]);
}

/// Reads `count` values of `bits` bits from a little-endian bit stream long enough to hold them.
pub fn unpack_bits(bytes: &[u8], bits: u32, count: usize) -> Vec<u64> {
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let mut out = Vec::with_capacity(count);
    let mut acc: u128 = 0;
    let mut filled = 0u32;
    let mut pos = 0usize;
    for _ in 0..count {
        while filled < bits {
            let take = (bytes.len() - pos).min(8);
            if take == 0 {
                // Past the end: the missing bits read as zeros (callers check lengths first).
                filled += 64;
                continue;
            }
            let mut word = [0u8; 8];
            word[..take].copy_from_slice(&bytes[pos..pos + take]);
            acc |= (u64::from_le_bytes(word) as u128) << filled;
            pos += take;
            filled += 8 * take as u32;
        }
        out.push(acc as u64 & mask);
        acc >>= bits;
        filled -= bits;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_packing_roundtrips() {
        for bits in [1u32, 7, 13, 32, 45, 63, 64] {
            let mask = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let values: Vec<u64> = (0..1001u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) & mask)
                .collect();
            let mut bytes = Vec::new();
            pack_bits(&values, bits, &mut bytes);
            assert_eq!(bytes.len(), (values.len() * bits as usize).div_ceil(8));
            assert_eq!(unpack_bits(&bytes, bits, values.len()), values);
        }
    }

    /// The masks are the documented AES-128-CTR stream: FIPS-197's AES-128 test vector
    /// (appendix C.1) under key 00..0f encrypts block 00112233..ff; here the counter block of
    /// ciphertext 0's first coefficients is the number 0, checked against an independent
    /// one-block encryption, and later ciphertexts continue the same stream.
    #[test]
    fn masks_are_the_documented_keystream() {
        let key = u128::from_le_bytes(core::array::from_fn(|i| i as u8));
        let aes = cipher(key);
        let mut block = Array::from(core::array::from_fn::<u8, 16, _>(|i| (i * 0x11) as u8));
        aes.encrypt_block(&mut block);
        assert_eq!(
            block.as_slice(),
            [
                0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30, 0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4,
                0xc5, 0x5a
            ]
        );
        let (n, count) = (32, 3);
        let masks = expand_masks(key, count, n);
        for c in 0..count {
            for j in 0..n {
                let mut block = Array::from(((c * n / 2 + j / 2) as u128).to_le_bytes());
                aes.encrypt_block(&mut block);
                let half = &block[8 * (j % 2)..8 * (j % 2) + 8];
                assert_eq!(
                    masks[c * n + j],
                    u64::from_le_bytes(half.try_into().unwrap())
                );
            }
        }
        // A different seed, different masks; the same seed, the same.
        assert_ne!(expand_masks(key ^ 1, count, n), masks);
        assert_eq!(expand_masks(key, count, n), masks);
    }

    #[test]
    fn direct_binary_products_equal_the_schoolbook_product() {
        let n = 64;
        let mut state = 3u64;
        let mut next = || crate::fourier::tests_support::lcg(&mut state);
        for _ in 0..5 {
            let a: Vec<u64> = (0..n).map(|_| next()).collect();
            let key: Vec<u64> = (0..n).map(|_| next() & 1).collect();
            let expected =
                crate::fourier::schoolbook(&a, &key.iter().map(|v| *v as i64).collect::<Vec<_>>());
            let mut got = vec![0u64; n];
            negacyclic_binary_at(&a, &reversed_key_masks(&key), 0..n, |k, v| got[k] = v);
            assert_eq!(got, expected);
        }
        // All-ones key and all-ones masks: the wrap-around signs at their extreme.
        let a = vec![u64::MAX; n];
        let key = vec![1u64; n];
        let expected = crate::fourier::schoolbook(&a, &vec![1i64; n]);
        let mut got = vec![0u64; n];
        negacyclic_binary_at(&a, &reversed_key_masks(&key), 0..n, |k, v| got[k] = v);
        assert_eq!(got, expected);
    }

    #[test]
    fn rounding_matches_the_standard_library() {
        let mut state = 1u64;
        for _ in 0..100_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let x =
                ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 2f64.powi((state % 60) as i32);
            assert_eq!(round_i64(x), x.round() as i64, "{x}");
        }
        for x in [
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            0.49999999999999994,
            -0.49999999999999994,
            4503599627370497.0,
        ] {
            assert_eq!(round_i64(x), x.round() as i64, "{x}");
        }
    }

    /// The noise has the parameter set's standard deviation and no bias: over 2^20 samples at
    /// the N = 2048 set's sigma (about 52,500 on the 64-bit torus), the sample mean is within
    /// 5 standard errors of 0 and the sample standard deviation within 1%; the tails hold as many
    /// samples beyond 3 sigma as a Gaussian's (0.27%, within 10%).
    #[test]
    fn noise_is_gaussian_with_the_parameter_sets_sigma() {
        let sigma_relative = crate::HFHE_GLWE_2048_V1.noise_std_relative;
        let sigma = sigma_relative * 2f64.powi(64);
        let mut values = vec![0u64; 1 << 20];
        NoiseSource::from_entropy().add_gaussian(&mut values, sigma_relative);
        let samples: Vec<f64> = values.iter().map(|v| *v as i64 as f64).collect();
        let count = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / count;
        let std = (samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / count).sqrt();
        assert!(mean.abs() < 5.0 * sigma / count.sqrt(), "mean {mean}");
        assert!((std / sigma - 1.0).abs() < 0.01, "std {std} vs {sigma}");
        let tail = samples.iter().filter(|s| s.abs() > 3.0 * sigma).count() as f64 / count;
        assert!((tail / 0.0026998 - 1.0).abs() < 0.1, "tail {tail}");
        // Two generators from the operating system's entropy never repeat each other.
        let mut a = NoiseSource::from_entropy();
        let mut b = NoiseSource::from_entropy();
        assert_ne!(a.next_u128(), b.next_u128());
    }
}
