//! Packed results: automorphism keys and the packing tree that merges the block products.
//!
//! A keyless result is one GLWE ciphertext per (token group, output block), of which only
//! `n_o * t_b` body coefficients are useful: they sit on the lattice of multiples of `n_i`
//! ([`crate::layout`]). Packing merges `n_i` such products into one full ciphertext, every
//! coefficient useful, so each token downloads about two coefficients per output instead of
//! `n_i`.
//!
//! # Automorphisms
//!
//! `tau_g: X -> X^g` (g odd) maps coefficient `i` to `i * g mod 2N`, negated when that is `>= N`.
//! Applied to both halves of a GLWE ciphertext under `s`, it gives a ciphertext of `tau_g(m)`
//! under `tau_g(s)`; a key switch from `tau_g(s)` back to `s` (a [`PackingKey`]) finishes the
//! job. The key holds switches for `g_k = 1 + 2N / 2^k`, `k = 1..=max_depth`.
//!
//! # The tree
//!
//! With useful coefficients on the lattice of stride `d`, `g = 1 + 2N/d` fixes that lattice and
//! negates its shift by `s = d/2`. So for two ciphertexts `a`, `b` of that shape,
//!
//! ```text
//! merge(a, b) = a + X^s b + tau_g(a - X^s b)
//! ```
//!
//! holds `2a` on the stride-d lattice, `2b` on its shift by `s`, and nothing else on the stride-s
//! lattice: every other term cancels. Level 1 merges pairs of products with `d = n_i`, level 2 the
//! pairs of pairs with `d = n_i / 2`, ..., level `log2(n_i)` with `d = 2`: product `j` of a pack
//! ends up shifted by `bitreverse(j)`, times `n_i` ([`crate::LayerSpec::output_position`]). The
//! client encrypts at `Delta / n_i` to absorb the doubling. A missing sibling (the last pack of a
//! layer) is an implicit zero.
//!
//! # Key switching, in the Fourier domain
//!
//! The mask `a` of `tau_g(ct)` is rounded to its top `base_log * levels` bits and decomposed into
//! balanced digits `a = sum_l D_l 2^(64 - l base_log)`, `|D_l| <= 2^(base_log - 1)`; the key holds
//! `(alpha_l, beta_l = alpha_l s + e_l + tau_g(s) 2^(64 - l base_log))` with seeded `alpha_l`;
//! the result is `(-sum_l D_l alpha_l, b - sum_l D_l beta_l)`. The products go through the f64
//! FFT with the key cut into a 22-bit high part (products below 2^37: exact) and a 42-bit low part
//! (products near 2^57: off by a few tens of units, a noise the budget counts,
//! [`crate::noise::KEYSWITCH_FFT_VARIANCE`]). A test compares against the schoolbook switch.

use rayon::prelude::*;

use crate::fourier::{mul_acc, Fourier, Scratch};
use crate::params::{PackingParams, ParamSetId, ParameterSet};
use crate::primitives::{expand_masks, pack_bits, round_to_bits, unpack_bits};
use crate::wire::{check_length, Format, WireError};
use crate::{ClientKey, FheError};

const KEY_MAGIC: [u8; 4] = *b"HFPK";
/// Format version of serialised packing keys (2: masks from [`crate::primitives`]' stream).
pub const KEY_VERSION: u16 = 2;
/// Bytes of a packing key's header.
pub const KEY_HEADER_LEN: usize = 40;
const KEY_FORMAT: Format = Format {
    magic: KEY_MAGIC,
    version: KEY_VERSION,
    header_len: KEY_HEADER_LEN,
};

/// Where the key's 64-bit coefficients are cut for the FFT: `v = hi * 2^SPLIT + lo`.
const SPLIT: u32 = 42;

/// The client's packing key: key switches for the automorphisms `X -> X^(1 + 2N/2^k)`,
/// `k = 1..=depth`, under the client's secret key. Public: it lets a server pack results, not
/// decrypt them. Masks come from a seed, so only the bodies travel.
///
/// ```text
/// offset size field
///      0    4 magic "HFPK"
///      4    2 version (2: masks from the stream of [`crate::primitives`]; 1 is refused)
///      6    2 parameter set id
///      8    1 base_log
///      9    1 levels
///     10    1 depth (automorphisms)
///     11    1 bits per body coefficient
///     12    4 reserved, 0
///     16   16 mask seed
///     32    8 payload length in bytes
///     40    . bodies, [automorphism k][level l][N], bit-packed little-endian
/// ```
#[derive(Clone, PartialEq)]
pub struct PackingKey {
    params: &'static ParameterSet,
    packing: PackingParams,
    depth: u32,
    seed: u128,
    /// Body coefficients, each below 2^key_body_bits.
    bodies: Vec<u64>,
}

impl std::fmt::Debug for PackingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackingKey")
            .field("params", &self.params.name)
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

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
fn add_rotated(p: &[u64], s: usize, out: &mut [u64]) {
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
fn split_key(v: u64) -> (f64, f64) {
    let lo = ((v << (64 - SPLIT)) as i64) >> (64 - SPLIT);
    let hi = (v.wrapping_sub(lo as u64) as i64) >> SPLIT;
    (hi as f64, lo as f64)
}

/// Balanced decomposition of `v` into `levels` digits of `base_log` bits, most significant
/// first, after rounding to the top `base_log * levels` bits.
#[inline(always)]
fn decompose(v: u64, base_log: u32, levels: u32, digits: &mut [i64]) {
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

impl PackingKey {
    /// Generates the packing key of `key` for every depth its parameter set allows.
    pub fn generate(key: &ClientKey) -> Result<Self, FheError> {
        let params = key.params();
        let packing = params.packing.ok_or_else(|| {
            FheError::InvalidLayout(format!("parameter set {} has no packing keys", params.name))
        })?;
        let n = params.polynomial_size;
        let depth = packing.max_depth;
        let levels = packing.levels as usize;
        // tau_g(s) of each automorphism, once.
        let tau_s: Vec<Vec<u64>> = (1..=depth)
            .map(|k| {
                let mut t = vec![0u64; n];
                automorphism(key.coefficients(), galois_element(n, k), &mut t);
                t
            })
            .collect();
        let (seed, bodies) = key.seeded_encryptions(depth as usize * levels, |c, body| {
            let (k, l) = (c / levels, c % levels + 1);
            let scale = 64 - l as u32 * packing.base_log;
            for (b, t) in body.iter_mut().zip(&tau_s[k]) {
                *b = round_to_bits(b.wrapping_add(t << scale), packing.key_body_bits);
            }
        });
        Ok(PackingKey {
            params,
            packing,
            depth,
            seed,
            bodies,
        })
    }

    pub fn params(&self) -> &'static ParameterSet {
        self.params
    }

    /// Packing levels this key supports: layouts with `n_i <= 2^depth`.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Serialises the key (see the type's docs for the layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        let bits = self.packing.key_body_bits;
        let payload_len = (self.bodies.len() * bits as usize).div_ceil(8);
        let mut out = Vec::with_capacity(KEY_HEADER_LEN + payload_len);
        out.extend_from_slice(&KEY_MAGIC);
        out.extend_from_slice(&KEY_VERSION.to_le_bytes());
        out.extend_from_slice(&self.params.id.0.to_le_bytes());
        out.extend_from_slice(&[
            self.packing.base_log as u8,
            self.packing.levels as u8,
            self.depth as u8,
            bits as u8,
        ]);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&(payload_len as u64).to_le_bytes());
        pack_bits(&self.bodies, bits, &mut out);
        out
    }

    /// Bytes of the serialised key of parameter set `params` (for limits and cost models).
    pub fn serialized_len(params: &ParameterSet) -> Option<usize> {
        let p = params.packing?;
        let coeffs = p.max_depth as usize * p.levels as usize * params.polynomial_size;
        Some(KEY_HEADER_LEN + (coeffs * p.key_body_bits as usize).div_ceil(8))
    }

    /// Parses untrusted bytes: every field must be exactly what the parameter set prescribes and
    /// the length must match, checked before anything is allocated.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        // No size limit of its own: the exact length follows from the parameter set, and is
        // checked before anything is allocated (gateways bound the body before parsing).
        KEY_FORMAT.read_preamble(bytes, u64::MAX)?;
        let id = u16::from_le_bytes([bytes[6], bytes[7]]);
        let params =
            ParameterSet::by_id(ParamSetId(id)).ok_or(WireError::UnknownParameterSet(id))?;
        let packing = params.packing.ok_or_else(|| {
            WireError::InvalidHeader(format!("parameter set {} has no packing keys", params.name))
        })?;
        let declared = (
            bytes[8] as u32,
            bytes[9] as u32,
            bytes[10] as u32,
            bytes[11] as u32,
        );
        let expected = (
            packing.base_log,
            packing.levels,
            packing.max_depth,
            packing.key_body_bits,
        );
        if declared != expected {
            return Err(WireError::InvalidHeader(format!(
                "packing key (base_log, levels, depth, bits) = {declared:?}, parameter set {} \
                 needs {expected:?}",
                params.name
            )));
        }
        if bytes[12..16] != [0; 4] {
            return Err(WireError::InvalidHeader(
                "reserved fields must be zero".into(),
            ));
        }
        let seed = u128::from_le_bytes(bytes[16..32].try_into().unwrap());
        let payload_len = u64::from_le_bytes(bytes[32..40].try_into().unwrap());
        let total = Self::serialized_len(params).expect("packing parameters exist");
        if payload_len != (total - KEY_HEADER_LEN) as u64 {
            return Err(WireError::InvalidHeader(format!(
                "payload length {payload_len} instead of {}",
                total - KEY_HEADER_LEN
            )));
        }
        check_length(bytes.len(), total as u64)?;
        let count = packing.max_depth as usize * packing.levels as usize * params.polynomial_size;
        let bodies = unpack_bits(&bytes[KEY_HEADER_LEN..], packing.key_body_bits, count);
        Ok(PackingKey {
            params,
            packing,
            depth: packing.max_depth,
            seed,
            bodies,
        })
    }
}

/// A packing key made ready to serve: the spectra of its masks and bodies (about 4.7 MB at
/// N = 4096 for depth 9). Workers keep these in a bounded cache.
pub struct PreparedPackingKey {
    params: &'static ParameterSet,
    packing: PackingParams,
    depth: u32,
    /// For each automorphism k and level l: alpha hi, alpha lo, beta hi, beta lo, planar.
    spectra: Vec<f64>,
}

impl std::fmt::Debug for PreparedPackingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedPackingKey")
            .field("params", &self.params.name)
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

/// One ciphertext inside the packing tree: full 64-bit mask and body.
pub(crate) type Glwe = (Vec<u64>, Vec<u64>);

impl PreparedPackingKey {
    /// Regenerates the masks and transforms everything once.
    pub fn prepare(key: &PackingKey) -> Self {
        let params = key.params;
        let n = params.polynomial_size;
        let count = key.depth as usize * key.packing.levels as usize;
        let masks = expand_masks(key.seed, count, n);
        let lift = 64 - key.packing.key_body_bits;
        let fourier = Fourier::get(n);
        let mut spectra = vec![0.0; count * 4 * n];
        spectra.par_chunks_mut(4 * n).enumerate().for_each_init(
            || fourier.scratch(),
            |scratch, (c, out)| {
                let (alpha, rest) = out.split_at_mut(2 * n);
                let (alpha_hi, alpha_lo) = alpha.split_at_mut(n);
                let (beta_hi, beta_lo) = rest.split_at_mut(n);
                let mask = &masks[c * n..(c + 1) * n];
                let body = &key.bodies[c * n..(c + 1) * n];
                fourier.forward(|j| split_key(mask[j]).0, alpha_hi, scratch);
                fourier.forward(|j| split_key(mask[j]).1, alpha_lo, scratch);
                fourier.forward(|j| split_key(body[j] << lift).0, beta_hi, scratch);
                fourier.forward(|j| split_key(body[j] << lift).1, beta_lo, scratch);
            },
        );
        PreparedPackingKey {
            params,
            packing: key.packing,
            depth: key.depth,
            spectra,
        }
    }

    pub fn params(&self) -> &'static ParameterSet {
        self.params
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Bytes held by the spectra.
    pub fn memory_bytes(&self) -> usize {
        self.spectra.len() * std::mem::size_of::<f64>()
    }

    /// Key switch of a ciphertext under `tau_g(s)` (g of level index `k`) back to `s`, in place.
    pub(crate) fn keyswitch(&self, k: u32, ct: &mut Glwe, ws: &mut Workspace) {
        let fourier = Fourier::get(self.params.polynomial_size);
        let n = fourier.size();
        let (base_log, levels) = (self.packing.base_log, self.packing.levels as usize);
        let Workspace {
            scratch,
            digits,
            digit_spectra,
            acc,
            his,
        } = ws;
        // Digits of every mask coefficient, level-major.
        let mut d = [0i64; 16];
        for (j, &a) in ct.0.iter().enumerate() {
            decompose(a, base_log, levels as u32, &mut d[..levels]);
            for l in 0..levels {
                digits[l * n + j] = d[l] as f64;
            }
        }
        acc.fill(0.0);
        let key = &self.spectra[(k as usize - 1) * levels * 4 * n..][..levels * 4 * n];
        for l in 0..levels {
            let spectrum = &mut digit_spectra[..n];
            fourier.forward(|j| digits[l * n + j], spectrum, scratch);
            for s in 0..4 {
                mul_acc(
                    &mut acc[s * n..(s + 1) * n],
                    spectrum,
                    &key[(l * 4 + s) * n..][..n],
                );
            }
        }
        let (mask, body) = (&mut ct.0, &mut ct.1);
        fourier.backward(&acc[0..n], scratch, |j, v| his[j] = v);
        fourier.backward(&acc[n..2 * n], scratch, |j, v| {
            mask[j] = ((his[j] as u64) << SPLIT)
                .wrapping_add(v as u64)
                .wrapping_neg()
        });
        fourier.backward(&acc[2 * n..3 * n], scratch, |j, v| his[j] = v);
        fourier.backward(&acc[3 * n..4 * n], scratch, |j, v| {
            let product = ((his[j] as u64) << SPLIT).wrapping_add(v as u64);
            body[j] = body[j].wrapping_sub(product)
        });
    }

    /// `merge(a, b) = a + X^s b + KS(tau_g(a - X^s b))` with `g` of level index `k`.
    fn merge(
        &self,
        k: u32,
        shift: usize,
        a: Option<Glwe>,
        b: Option<Glwe>,
        ws: &mut Workspace,
    ) -> Option<Glwe> {
        let n = self.params.polynomial_size;
        if a.is_none() && b.is_none() {
            return None;
        }
        // sum = a + X^s b, diff = a - X^s b.
        let mut sum = a.unwrap_or_else(|| (vec![0u64; n], vec![0u64; n]));
        let mut diff = sum.clone();
        if let Some(b) = b {
            let mut neg = (vec![0u64; n], vec![0u64; n]);
            add_rotated(&b.0, shift, &mut sum.0);
            add_rotated(&b.1, shift, &mut sum.1);
            add_rotated(&b.0, shift, &mut neg.0);
            add_rotated(&b.1, shift, &mut neg.1);
            for (d, v) in diff.0.iter_mut().zip(&neg.0) {
                *d = d.wrapping_sub(*v);
            }
            for (d, v) in diff.1.iter_mut().zip(&neg.1) {
                *d = d.wrapping_sub(*v);
            }
        }
        let g = galois_element(n, k);
        let mut tau = (vec![0u64; n], vec![0u64; n]);
        automorphism(&diff.0, g, &mut tau.0);
        automorphism(&diff.1, g, &mut tau.1);
        self.keyswitch(k, &mut tau, ws);
        for (s, t) in sum.0.iter_mut().zip(&tau.0) {
            *s = s.wrapping_add(*t);
        }
        for (s, t) in sum.1.iter_mut().zip(&tau.1) {
            *s = s.wrapping_add(*t);
        }
        Some(sum)
    }

    /// Packs products (each with useful coefficients on the stride-`n_i` lattice) into
    /// `ceil(len / n_i)` full ciphertexts; product `j` of pack `p` is `products[p * n_i + j]`.
    pub(crate) fn pack(&self, products: Vec<Glwe>, n_i: usize) -> Result<Vec<Glwe>, FheError> {
        let depth = n_i.trailing_zeros();
        if !n_i.is_power_of_two() || depth > self.depth {
            return Err(FheError::InvalidLayout(format!(
                "n_i={n_i} needs {depth} packing levels; the key has {}",
                self.depth
            )));
        }
        let packs = products.len().div_ceil(n_i);
        let mut level: Vec<Option<Glwe>> = products.into_iter().map(Some).collect();
        level.resize_with(packs * n_i, || None);
        let n = self.params.polynomial_size;
        // Level i (1-based) merges siblings with d = n_i / 2^(i-1): k = log2(d), shift d / 2.
        for i in 1..=depth {
            let d = n_i >> (i - 1);
            let (k, shift) = (d.trailing_zeros(), d / 2);
            let mut pairs: Vec<(Option<Glwe>, Option<Glwe>)> = Vec::with_capacity(level.len() / 2);
            let mut it = level.into_iter();
            while let (Some(a), Some(b)) = (it.next(), it.next()) {
                pairs.push((a, b));
            }
            level = pairs
                .into_par_iter()
                .map_init(
                    || Workspace::new(n, self.packing.levels as usize),
                    |ws, (a, b)| self.merge(k, shift, a, b, ws),
                )
                .collect();
        }
        Ok(level
            .into_iter()
            .map(|ct| ct.unwrap_or_else(|| (vec![0u64; n], vec![0u64; n])))
            .collect())
    }
}

/// Per-thread buffers of the key switch.
pub(crate) struct Workspace {
    scratch: Scratch,
    digits: Vec<f64>,
    digit_spectra: Vec<f64>,
    acc: Vec<f64>,
    his: Vec<i64>,
}

impl Workspace {
    pub(crate) fn new(n: usize, levels: usize) -> Self {
        Workspace {
            scratch: Fourier::get(n).scratch(),
            digits: vec![0.0; levels * n],
            digit_spectra: vec![0.0; n],
            acc: vec![0.0; 4 * n],
            his: vec![0; n],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fourier::schoolbook;

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
    fn fourier_key_switch_matches_the_schoolbook_one_within_the_budgeted_error() {
        use crate::params::HFHE_GLWE_4096_V1;
        let client = ClientKey::generate(&HFHE_GLWE_4096_V1);
        let key = PackingKey::generate(&client).unwrap();
        let prepared = PreparedPackingKey::prepare(&key);
        let (n, p) = (4096, key.packing);
        let levels = p.levels as usize;
        let mut state = 99u64;
        let mut next = || crate::fourier::tests_support::lcg(&mut state);
        let ct: Glwe = (
            (0..n).map(|_| next()).collect(),
            (0..n).map(|_| next()).collect(),
        );
        let k = 3u32;
        let mut fast = ct.clone();
        prepared.keyswitch(k, &mut fast, &mut Workspace::new(n, levels));
        // Schoolbook: digits of the mask times the key's (alpha, beta) of automorphism k.
        let masks = expand_masks(key.seed, key.depth as usize * levels, n);
        let mut digits = vec![vec![0i64; n]; levels];
        let mut d = [0i64; 16];
        for (j, &a) in ct.0.iter().enumerate() {
            decompose(a, p.base_log, p.levels, &mut d[..levels]);
            for l in 0..levels {
                digits[l][j] = d[l];
            }
        }
        let (mut mask, mut body) = (vec![0u64; n], ct.1.clone());
        for (l, digit) in digits.iter().enumerate() {
            let c = (k as usize - 1) * levels + l;
            let alpha = &masks[c * n..(c + 1) * n];
            let beta: Vec<u64> = key.bodies[c * n..(c + 1) * n]
                .iter()
                .map(|v| v << (64 - p.key_body_bits))
                .collect();
            for (m, v) in mask.iter_mut().zip(schoolbook(alpha, digit)) {
                *m = m.wrapping_sub(v);
            }
            for (b, v) in body.iter_mut().zip(schoolbook(&beta, digit)) {
                *b = b.wrapping_sub(v);
            }
        }
        let errors: Vec<f64> = fast
            .0
            .iter()
            .zip(&mask)
            .chain(fast.1.iter().zip(&body))
            .map(|(a, b)| a.wrapping_sub(*b) as i64 as f64)
            .collect();
        let worst = errors.iter().fold(0f64, |m, e| m.max(e.abs()));
        let var = errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64;
        // The budget counts an FFT error of variance KEYSWITCH_FFT_VARIANCE (std 2^8); the high
        // halves must be exact (an error there would be a multiple of 2^42).
        assert!(
            var <= crate::noise::KEYSWITCH_FFT_VARIANCE,
            "error std 2^{:.1}",
            var.sqrt().log2()
        );
        assert!(
            worst < (1u64 << 20) as f64,
            "worst error 2^{:.1}",
            worst.log2()
        );
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
