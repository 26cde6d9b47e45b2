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
    let ib = dims.input_blocks;
    for o in 0..dims.output_blocks {
        let w_o = &weights[o * ib * UNIT..][..ib * UNIT];
        for g in 0..dims.groups {
            let x_g = &inputs[g * ib * STREAMS * UNIT..][..ib * STREAMS * UNIT];
            let mut acc = [[0f64; UNIT]; STREAMS];
            for b in 0..ib {
                let w: &[f64; UNIT] = w_o[b * UNIT..][..UNIT].try_into().unwrap();
                for s in 0..STREAMS {
                    let x: &[f64; UNIT] =
                        x_g[(b * STREAMS + s) * UNIT..][..UNIT].try_into().unwrap();
                    let a = &mut acc[s];
                    for i in 0..CHUNK {
                        let (xr, xi, wr, wi) = (x[i], x[CHUNK + i], w[i], w[CHUNK + i]);
                        a[i] = xr.mul_add(wr, a[i]);
                        a[i] = (-xi).mul_add(wi, a[i]);
                        a[CHUNK + i] = xr.mul_add(wi, a[CHUNK + i]);
                        a[CHUNK + i] = xi.mul_add(wr, a[CHUNK + i]);
                    }
                }
            }
            let out = &mut sums[(g * dims.output_blocks + o) * STREAMS * UNIT..][..STREAMS * UNIT];
            for s in 0..STREAMS {
                out[s * UNIT..(s + 1) * UNIT].copy_from_slice(&acc[s]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,fma")]
unsafe fn chunk_avx512(weights: &[f64], inputs: &[f64], dims: Dims, sums: &mut [f64]) {
    chunk_generic(weights, inputs, dims, sums)
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
