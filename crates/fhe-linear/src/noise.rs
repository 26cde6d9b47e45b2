//! The noise budget of the keyless block encoding, and the wire precisions chosen from it.
//!
//! All quantities are in units of the 64-bit torus (q = 2^64). A result coefficient decrypts to
//! `Delta * y + E` with `Delta = 2^(64 - P)` (`P` from [`ParameterSet::plaintext_bits`]) and decodes
//! exactly when `|E| < Delta / 2`. `E` is the sum of independent, zero-mean terms:
//!
//! 1. fresh encryption noise, Gaussian with std `sigma` (about 2^15.7), on every coefficient of every
//!    input polynomial;
//! 2. the rounding of each uploaded body coefficient to `b_in` bits: uniform, variance
//!    `(2^(64-b_in))^2 / 12`;
//! 3. the product: each result coefficient collects the input noise of *all* N coefficients of
//!    every input polynomial, weighted by *all* coefficients of the weight polynomial, so its
//!    variance is `sigma_in^2 * ||W_block||_F^2` where `W_block` are the `n_o` rows of the output
//!    block. We budget for the worst weights allowed (every weight -128):
//!    `||W_block||_F^2 <= n_o * d_in * 2^14`;
//! 4. the rounding of the returned coefficients to `b_out` bits: the body's own rounding plus the
//!    mask's rounding multiplied by the binary key (at most N ones):
//!    `(N + 1) * (2^(64-b_out))^2 / 12`.
//!
//! The FFT products are exact (see [`crate::fourier`]): they add no noise.
//!
//! # Packed results
//!
//! A packed result ([`crate::packing`]) runs the products through `L = log2(n_i)` packing
//! levels. The client encrypts at `Delta_in = Delta / 2^L`; each level doubles the message and,
//! at the useful coefficients (fixed by the automorphism), doubles the noise coherently. So, in
//! units of the output's Delta:
//!
//! - the product noise (items 1-3, without the product's own rounding) is multiplied by `4^L`;
//! - each level adds one key switch, whose noise the later levels double again: in total
//!   `E_ks^2 * (4^L - 1) / 3` with `E_ks^2` from [`keyswitch_variance`] (the key's noise and body
//!   rounding times the decomposition digits, the decomposition's truncation times the binary
//!   key, and the f64 FFT's error on the low halves of the key);
//! - the packed ciphertext's mask and body are rounded to `b_out` bits once, at the end.
//!
//! Decoding fails when `|E| >= Delta / 2`. Treating `E` as Gaussian (a sum of N * d_in / n_i
//! independent terms), the budget requires `Z * std(E) <= Delta / 2` with `Z = 7.2`, a two-sided
//! tail of 2^-40.6 per output. Among all `(b_in, b_out)` meeting it, the fewest bytes win.

use crate::entities::{BlockLayout, LayerShape, ResultEncoding};
use crate::params::ParameterSet;

/// Standard deviations of the tail bound: P(|N(0,1)| > 7.2) = 2^-40.6.
pub const TAIL_Z: f64 = 7.2;

/// log2 of the per-output failure probability the budget guarantees (under the Gaussian model).
pub const FAILURE_LOG2: f64 = -40.0;

/// Extra bits kept on top of the tail bound, for the distance between the model and measured
/// noise (the tests check that measured noise stays within this of the prediction).
pub const MODEL_SLACK_BITS: f64 = 0.5;

/// The noise budget of one layer spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseBudget {
    /// Predicted std of the result noise with the worst allowed weights.
    pub worst_case_std: f64,
    /// Decoding threshold Delta / 2.
    pub half_delta: f64,
}

impl NoiseBudget {
    /// log2(Delta / 2) - log2(Z * std): the safety margin in bits (>= 0 when the budget holds).
    pub fn margin_bits(&self) -> f64 {
        (self.half_delta / (TAIL_Z * self.worst_case_std)).log2()
    }
}

/// Variance of a uniform rounding to `bits` bits of a 64-bit torus value.
fn rounding_variance(bits: u32) -> f64 {
    let step = 2f64.powi(64 - bits as i32);
    step * step / 12.0
}

/// Variance of the result noise for weights with the given squared Frobenius norm per output block.
pub fn result_variance(
    params: &ParameterSet,
    block_weight_norm_sq: f64,
    input_bits: u32,
    output_bits: u32,
) -> f64 {
    let sigma = params.noise_std();
    let input = sigma * sigma + rounding_variance(input_bits);
    let n = params.polynomial_size as f64;
    input * block_weight_norm_sq + (n + 1.0) * rounding_variance(output_bits)
}

/// Bound on the variance of the f64 FFT's error in one key switch (a std of 2^8 torus units): the
/// low 42-bit halves of the key are multiplied inexactly (products near 2^57 in f64; measured
/// errors are a few tens of units), the high halves exactly (see [`crate::packing`]).
pub const KEYSWITCH_FFT_VARIANCE: f64 = 65536.0;

/// Variance added by one key switch of a packing key of `params`.
pub fn keyswitch_variance(params: &ParameterSet) -> f64 {
    let Some(p) = params.packing else {
        return 0.0;
    };
    let n = params.polynomial_size as f64;
    let sigma = params.noise_std();
    let base = 2f64.powi(p.base_log as i32);
    // Balanced digits are uniform in [-B/2, B/2): variance B^2 / 12.
    let digits = p.levels as f64 * n * base * base / 12.0;
    let key_noise = sigma * sigma + rounding_variance(p.key_body_bits);
    // The bits below the decomposition, times a binary key of at most N ones.
    let truncation = n * rounding_variance(p.base_log * p.levels);
    digits * key_noise + truncation + KEYSWITCH_FFT_VARIANCE
}

/// Variance of a packed result, in torus units at the output's Delta, for weights with the given
/// squared Frobenius norm per output block and `depth` packing levels.
pub fn packed_result_variance(
    params: &ParameterSet,
    block_weight_norm_sq: f64,
    depth: u32,
    input_bits: u32,
    output_bits: u32,
) -> f64 {
    // The keyless terms with the product noise grown 4^L (the same as weights 2^L times larger),
    // plus the key switches of every level.
    let growth = 4f64.powi(depth as i32);
    result_variance(
        params,
        block_weight_norm_sq * growth,
        input_bits,
        output_bits,
    ) + keyswitch_variance(params) * (growth - 1.0) / 3.0
}

/// Largest squared Frobenius norm of `n_o` rows of `d_in` weights.
pub fn worst_block_norm_sq(params: &ParameterSet, shape: LayerShape, n_o: usize) -> f64 {
    let w_max = 2f64.powi(params.weight_bits as i32 - 1);
    n_o as f64 * shape.d_in as f64 * w_max * w_max
}

/// The budget for explicit wire precisions and `activation_bits`-bit activations.
pub fn budget(
    params: &ParameterSet,
    shape: LayerShape,
    layout: BlockLayout,
    encoding: ResultEncoding,
    activation_bits: u32,
    (input_bits, output_bits): (u32, u32),
) -> NoiseBudget {
    let norm_sq = worst_block_norm_sq(params, shape, layout.n_o);
    let var = match encoding {
        ResultEncoding::Keyless => result_variance(params, norm_sq, input_bits, output_bits),
        ResultEncoding::Packed => packed_result_variance(
            params,
            norm_sq,
            layout.n_i.trailing_zeros(),
            input_bits,
            output_bits,
        ),
    };
    let delta_log2 = 64 - params.plaintext_bits(shape.d_in, activation_bits);
    NoiseBudget {
        worst_case_std: var.sqrt(),
        half_delta: 2f64.powi(delta_log2 as i32 - 1),
    }
}

/// The `(b_in, b_out)` that fit the budget with the fewest bytes for one full token group, or
/// `None` when the layout cannot fit even at full precision.
pub fn choose_wire_bits(
    params: &ParameterSet,
    shape: LayerShape,
    layout: BlockLayout,
    encoding: ResultEncoding,
    activation_bits: u32,
) -> Option<(u32, u32)> {
    let n = params.polynomial_size;
    let in_coeffs = shape.d_in.div_ceil(layout.n_i) * n;
    let out_blocks = shape.d_out.div_ceil(layout.n_o);
    let out_coeffs = match encoding {
        ResultEncoding::Keyless => out_blocks * (n + layout.n_o * layout.t_b),
        ResultEncoding::Packed => out_blocks.div_ceil(layout.n_i) * n + layout.t_b * shape.d_out,
    };
    let mut best: Option<(usize, (u32, u32))> = None;
    for b_in in 16..=64u32 {
        for b_out in 16..=64u32 {
            let b = budget(
                params,
                shape,
                layout,
                encoding,
                activation_bits,
                (b_in, b_out),
            );
            if b.margin_bits() < MODEL_SLACK_BITS {
                continue;
            }
            let bytes = in_coeffs * b_in as usize + out_coeffs * b_out as usize;
            if best.is_none_or(|(bb, _)| bytes < bb) {
                best = Some((bytes, (b_in, b_out)));
            }
        }
    }
    best.map(|(_, bits)| bits)
}
