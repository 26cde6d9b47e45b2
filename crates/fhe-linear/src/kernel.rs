//! The server's hot loop: for every output block and token group, the sum over all input blocks
//! of (input spectrum x weight spectrum), for the four streams of each input ciphertext (mask hi,
//! mask lo, body hi, body lo).
//!
//! Spectra are stored *chunk-major*: frequencies are cut into chunks of [`CHUNK`] complex values
//! and the work is split by chunk. For one chunk, the inputs of every token group and input block
//! (a few tens of KB) stay in cache while the weights of every output block stream past them once,
//! and the accumulators of one (output block, group) stay in registers across the input blocks.
//!
//! Layouts, each innermost unit being `2 * CHUNK` f64 (real parts, then imaginary parts):
//! - weights: `[chunk][output block][input block]`
//! - inputs:  `[chunk][group][input block][stream]`
//! - sums:    `[chunk][group][output block][stream]`

// Index loops over fixed-size chunks read closest to the math here.
#![allow(clippy::needless_range_loop)]

/// Complex values per chunk: one 512-bit register of real parts and one of imaginary parts.
pub const CHUNK: usize = 8;
/// Spectra per input ciphertext: mask hi, mask lo, body hi, body lo.
pub const STREAMS: usize = 4;
/// f64 values per chunk of one spectrum.
pub const UNIT: usize = 2 * CHUNK;

/// Dimensions of one product.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub input_blocks: usize,
    pub output_blocks: usize,
    pub groups: usize,
}

/// Copies chunk `k` of a planar spectrum (N/2 real parts, then N/2 imaginary parts) to `dst`.
#[inline]
pub fn load_chunk(planar: &[f64], k: usize, dst: &mut [f64]) {
    let h = planar.len() / 2;
    dst[..CHUNK].copy_from_slice(&planar[k * CHUNK..][..CHUNK]);
    dst[CHUNK..UNIT].copy_from_slice(&planar[h + k * CHUNK..][..CHUNK]);
}

/// Copies a chunk back into its place in a planar spectrum.
#[inline]
pub fn store_chunk(src: &[f64], k: usize, planar: &mut [f64]) {
    let h = planar.len() / 2;
    planar[k * CHUNK..][..CHUNK].copy_from_slice(&src[..CHUNK]);
    planar[h + k * CHUNK..][..CHUNK].copy_from_slice(&src[CHUNK..UNIT]);
}

#[inline(always)]
fn chunk_generic(weights: &[f64], inputs: &[f64], dims: Dims, sums: &mut [f64]) {
    chunk_one_at_a_time(weights, inputs, dims, sums, 0..dims.output_blocks)
}

/// The sums of the output blocks `outputs`, one output block at a time.
#[inline(always)]
fn chunk_one_at_a_time(
    weights: &[f64],
    inputs: &[f64],
    dims: Dims,
    sums: &mut [f64],
    outputs: std::ops::Range<usize>,
) {
    let ib = dims.input_blocks;
    for o in outputs {
        let w_o = &weights[o * ib * UNIT..][..ib * UNIT];
        for g in 0..dims.groups {
            let x_g = &inputs[g * ib * STREAMS * UNIT..][..ib * STREAMS * UNIT];
            let mut acc = [[0f64; UNIT]; STREAMS];
            for b in 0..ib {
                let w: &[f64; UNIT] = w_o[b * UNIT..][..UNIT].try_into().unwrap();
                for s in 0..STREAMS {
                    let x: &[f64; UNIT] =
                        x_g[(b * STREAMS + s) * UNIT..][..UNIT].try_into().unwrap();
                    mac(&mut acc[s], x, w);
                }
            }
            let out = &mut sums[(g * dims.output_blocks + o) * STREAMS * UNIT..][..STREAMS * UNIT];
            for s in 0..STREAMS {
                out[s * UNIT..(s + 1) * UNIT].copy_from_slice(&acc[s]);
            }
        }
    }
}

/// One input chunk times one weight chunk, added to one stream's accumulators.
#[inline(always)]
fn mac(a: &mut [f64; UNIT], x: &[f64; UNIT], w: &[f64; UNIT]) {
    for i in 0..CHUNK {
        let (xr, xi, wr, wi) = (x[i], x[CHUNK + i], w[i], w[CHUNK + i]);
        a[i] = xr.mul_add(wr, a[i]);
        a[i] = (-xi).mul_add(wi, a[i]);
        a[CHUNK + i] = xr.mul_add(wi, a[CHUNK + i]);
        a[CHUNK + i] = xi.mul_add(wr, a[CHUNK + i]);
    }
}

/// [`chunk_generic`] two output blocks at a time: each input chunk loaded once serves both, so
/// the inputs are read from cache half as often. Every accumulator sees the same operations in
/// the same order as in [`chunk_generic`]: the sums are bit for bit the same. Its 16
/// accumulators, 8 input and 4 weight registers fit AVX-512's 32 registers.
#[inline(always)]
fn chunk_paired(weights: &[f64], inputs: &[f64], dims: Dims, sums: &mut [f64]) {
    let (ib, ob) = (dims.input_blocks, dims.output_blocks);
    let pairs = ob / 2;
    for p in 0..pairs {
        let o = 2 * p;
        let w_a = &weights[o * ib * UNIT..][..ib * UNIT];
        let w_b = &weights[(o + 1) * ib * UNIT..][..ib * UNIT];
        for g in 0..dims.groups {
            let x_g = &inputs[g * ib * STREAMS * UNIT..][..ib * STREAMS * UNIT];
            let mut acc_a = [[0f64; UNIT]; STREAMS];
            let mut acc_b = [[0f64; UNIT]; STREAMS];
            for b in 0..ib {
                let wa: &[f64; UNIT] = w_a[b * UNIT..][..UNIT].try_into().unwrap();
                let wb: &[f64; UNIT] = w_b[b * UNIT..][..UNIT].try_into().unwrap();
                for s in 0..STREAMS {
                    let x: &[f64; UNIT] =
                        x_g[(b * STREAMS + s) * UNIT..][..UNIT].try_into().unwrap();
                    mac(&mut acc_a[s], x, wa);
                    mac(&mut acc_b[s], x, wb);
                }
            }
            for (k, acc) in [(o, &acc_a), (o + 1, &acc_b)] {
                let out = &mut sums[(g * ob + k) * STREAMS * UNIT..][..STREAMS * UNIT];
                for s in 0..STREAMS {
                    out[s * UNIT..(s + 1) * UNIT].copy_from_slice(&acc[s]);
                }
            }
        }
    }
    // The last output block of an odd number alone.
    chunk_one_at_a_time(weights, inputs, dims, sums, 2 * pairs..ob);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,fma")]
unsafe fn chunk_avx512(weights: &[f64], inputs: &[f64], dims: Dims, sums: &mut [f64]) {
    chunk_paired(weights, inputs, dims, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2(weights: &[f64], inputs: &[f64], dims: Dims, sums: &mut [f64]) {
    chunk_generic(weights, inputs, dims, sums)
}

/// All products of one frequency chunk: `weights`, `inputs` and `sums` are that chunk's slices
/// of the layouts in the module docs.
pub fn chunk_products(weights: &[f64], inputs: &[f64], dims: Dims, sums: &mut [f64]) {
    let (ib, ob, g) = (dims.input_blocks, dims.output_blocks, dims.groups);
    assert_eq!(weights.len(), ob * ib * UNIT);
    assert_eq!(inputs.len(), g * ib * STREAMS * UNIT);
    assert_eq!(sums.len(), g * ob * STREAMS * UNIT);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { chunk_avx512(weights, inputs, dims, sums) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { chunk_avx2(weights, inputs, dims, sums) };
        }
    }
    chunk_generic(weights, inputs, dims, sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of a fixed pseudo-random pattern, of the magnitudes the spectra have.
    fn pattern(len: usize, salt: u64) -> Vec<f64> {
        let mut state = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 * 2e9 - 1e9
            })
            .collect()
    }

    #[test]
    fn paired_output_blocks_sum_bit_for_bit_as_one_at_a_time() {
        // An odd number of output blocks (the last one alone) and several token groups.
        for (ib, ob, groups) in [(3, 5, 2), (4, 2, 1), (1, 1, 3), (2, 7, 1)] {
            let dims = Dims {
                input_blocks: ib,
                output_blocks: ob,
                groups,
            };
            let w = pattern(ob * ib * UNIT, 1);
            let x = pattern(groups * ib * STREAMS * UNIT, 2);
            let mut one = vec![0f64; groups * ob * STREAMS * UNIT];
            let mut paired = vec![f64::NAN; one.len()];
            chunk_generic(&w, &x, dims, &mut one);
            chunk_paired(&w, &x, dims, &mut paired);
            let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&paired), "{dims:?}");
            // And what the machine's own kernel computes.
            let mut dispatched = vec![f64::NAN; one.len()];
            chunk_products(&w, &x, dims, &mut dispatched);
            assert_eq!(bits(&one), bits(&dispatched), "{dims:?}");
        }
    }
}
