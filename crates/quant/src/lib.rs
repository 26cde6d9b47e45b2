//! Integer quantization for protected linear layers.
//!
//! `y = W x + b` in floating point becomes `y_t = s_x[t] * s_w[r] * (Wq xq_t)_r + b_r`:
//!
//! - weights: per output channel, symmetric, signed `n_bits`: `s_w[r] = max_j |W_rj| / q_max`,
//!   `Wq = round(W / s_w)` with `q_max = 2^(n_bits-1) - 1`;
//! - activations: per token (one row), symmetric, signed `n_bits`, computed on the fly:
//!   `s_x[t] = max_j |x_tj| / q_max`, `xq = round(x / s_x)`.
//!
//! The integer product `Wq xq` is what the encrypted layer computes exactly; the client only
//! needs the per-channel weight scales `s_w` and the bias `b` to dequantize. Symmetric activations
//! need no zero point, so the client never needs the weights' per-channel sums (which an
//! asymmetric zero-point correction would require).
//!
//! Alternatively activations use one *static* scale per layer, calibrated on sample prompts
//! ([`quantize_activations_static`]): the server can then fold the bias into the integer product
//! and the client needs only `s_x * s_w[r]`, at the cost of clipping tokens outside the
//! calibrated range.

mod outliers;
mod rounding;
pub use outliers::{ChannelSplit, MAX_PARTS};
pub use rounding::quantize_weights_compensated;

/// Errors of quantization.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    #[error("n_bits must be between 2 and 8, got {0}")]
    Bits(u32),
    #[error("activation bits must be between 2 and {max}, got {0}", max = MAX_ACTIVATION_BITS)]
    ActivationBits(u32),
    #[error("{what}: {len} values do not make {rows} rows of {cols}")]
    Shape {
        what: &'static str,
        len: usize,
        rows: usize,
        cols: usize,
    },
    #[error("{0} contains a value that is not finite")]
    NotFinite(&'static str),
    #[error("outlier channel split: {0}")]
    Split(String),
    #[error("input second moments: {0}")]
    Moments(String),
}

/// Widest activations: quantized activations are `i16`.
pub const MAX_ACTIVATION_BITS: u32 = 16;

/// Largest signed `n_bits` magnitude, for widths from 2 to `max_bits`.
fn magnitude(n_bits: u32, max_bits: u32) -> Option<i32> {
    (2..=max_bits)
        .contains(&n_bits)
        .then(|| (1 << (n_bits - 1)) - 1)
}

/// Largest quantized magnitude for a weight bit width (weights are `i8`).
pub fn q_max(n_bits: u32) -> Result<i32, QuantError> {
    magnitude(n_bits, 8).ok_or(QuantError::Bits(n_bits))
}

/// Largest quantized magnitude for an activation bit width (activations are `i16`).
pub fn activation_q_max(n_bits: u32) -> Result<i32, QuantError> {
    magnitude(n_bits, MAX_ACTIVATION_BITS).ok_or(QuantError::ActivationBits(n_bits))
}

fn check(what: &'static str, v: &[f32], rows: usize, cols: usize) -> Result<(), QuantError> {
    if v.len() != rows * cols || cols == 0 {
        return Err(QuantError::Shape {
            what,
            len: v.len(),
            rows,
            cols,
        });
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(QuantError::NotFinite(what));
    }
    Ok(())
}

/// The symmetric step that maps `max` to `q_max` (1 for an all-zero row).
fn step(max: f32, q_max: i32) -> f32 {
    if max > 0.0 {
        max / q_max as f32
    } else {
        1.0
    }
}

/// The symmetric step of one row: its largest magnitude maps to `q_max`.
fn row_step(row: &[f32], q_max: i32) -> f32 {
    step(row.iter().fold(0f32, |m, x| m.max(x.abs())), q_max)
}

/// Symmetric quantization of each row of a `rows x cols` matrix: values and one scale per row.
/// `T` holds `[-q_max, q_max]`.
fn quantize_rows<T>(v: &[f32], cols: usize, q_max: i32, to: fn(f32) -> T) -> (Vec<T>, Vec<f32>) {
    let mut q = Vec::with_capacity(v.len());
    let mut scales = Vec::with_capacity(v.len() / cols);
    for row in v.chunks_exact(cols) {
        let scale = row_step(row, q_max);
        scales.push(scale);
        q.extend(
            row.iter()
                .map(|x| to((x / scale).round().clamp(-q_max as f32, q_max as f32))),
        );
    }
    (q, scales)
}

/// Weights quantized per output channel.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeights {
    pub n_bits: u32,
    pub d_out: usize,
    pub d_in: usize,
    /// `d_out x d_in`, row-major.
    pub values: Vec<i8>,
    /// One scale per output channel.
    pub scales: Vec<f32>,
}

/// Activation smoothing, weight side: multiplies column `j` of `w` (row-major, rows of
/// `factors.len()`) by `factors[j]`. With [`divide_channels`] on the activations, the product
/// is unchanged while outlier channels move from the activations into the weights.
pub fn scale_columns(w: &mut [f32], factors: &[f32]) {
    for row in w.chunks_exact_mut(factors.len()) {
        for (v, f) in row.iter_mut().zip(factors) {
            *v *= f;
        }
    }
}

/// Activation smoothing, activation side: divides channel `j` of each row of `x` by
/// `factors[j]` (see [`scale_columns`]).
pub fn divide_channels(x: &mut [f32], factors: &[f32]) {
    for row in x.chunks_exact_mut(factors.len()) {
        for (v, f) in row.iter_mut().zip(factors) {
            *v /= f;
        }
    }
}

/// Quantizes `w` (`d_out x d_in`, row-major) per output channel.
pub fn quantize_weights(
    w: &[f32],
    d_out: usize,
    d_in: usize,
    n_bits: u32,
) -> Result<QuantizedWeights, QuantError> {
    let q_max = q_max(n_bits)?;
    check("weights", w, d_out, d_in)?;
    let (values, scales) = quantize_rows(w, d_in, q_max, |v| v as i8);
    Ok(QuantizedWeights {
        n_bits,
        d_out,
        d_in,
        values,
        scales,
    })
}

/// Activations quantized per token.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedActivations {
    /// `tokens x d_in`, row-major.
    pub values: Vec<i16>,
    /// One scale per token.
    pub scales: Vec<f32>,
}

/// Quantizes `x` (`tokens x d_in`, row-major) per token.
pub fn quantize_activations(
    x: &[f32],
    tokens: usize,
    d_in: usize,
    n_bits: u32,
) -> Result<QuantizedActivations, QuantError> {
    let q_max = activation_q_max(n_bits)?;
    check("activations", x, tokens, d_in)?;
    let (values, scales) = quantize_rows(x, d_in, q_max, |v| v as i16);
    Ok(QuantizedActivations { values, scales })
}

/// Quantizes `x` (`tokens x d_in`) with one fixed, calibrated `scale` for every token; values
/// beyond the calibrated range are clipped.
pub fn quantize_activations_static(
    x: &[f32],
    tokens: usize,
    d_in: usize,
    n_bits: u32,
    scale: f32,
) -> Result<QuantizedActivations, QuantError> {
    let q_max = activation_q_max(n_bits)? as f32;
    check("activations", x, tokens, d_in)?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(QuantError::NotFinite("activation scale"));
    }
    let values = x
        .iter()
        .map(|v| (v / scale).round().clamp(-q_max, q_max) as i16)
        .collect();
    Ok(QuantizedActivations {
        values,
        scales: vec![scale; tokens],
    })
}

/// `y[t][r] = y_int[t][r] * s_x[t] * s_w[r] + b[r]` for a `tokens x d_out` integer product.
pub fn dequantize(
    y_int: &[i64],
    activation_scales: &[f32],
    weight_scales: &[f32],
    bias: &[f32],
) -> Vec<f32> {
    let d_out = weight_scales.len();
    assert_eq!(
        y_int.len(),
        activation_scales.len() * d_out,
        "product shape"
    );
    assert_eq!(bias.len(), d_out, "bias shape");
    y_int
        .chunks_exact(d_out)
        .zip(activation_scales)
        .flat_map(|(row, sx)| {
            row.iter()
                .zip(weight_scales)
                .zip(bias)
                .map(move |((y, sw), b)| (*y as f64 * (*sx as f64) * (*sw as f64)) as f32 + b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let w: Vec<f32> = (0..60)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let q = quantize_weights(&w, 6, 10, 8).unwrap();
        for (r, row) in w.chunks(10).enumerate() {
            for (j, v) in row.iter().enumerate() {
                let back = q.values[r * 10 + j] as f32 * q.scales[r];
                assert!((back - v).abs() <= q.scales[r] / 2.0 + 1e-6);
            }
            assert!(q.values[r * 10..][..10].iter().any(|v| v.abs() == 127));
        }
    }

    #[test]
    fn integer_product_dequantizes_close_to_float() {
        let (d_in, d_out) = (16, 3);
        let w: Vec<f32> = (0..d_in * d_out)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
            .collect();
        let x: Vec<f32> = (0..2 * d_in)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let b = vec![0.5, -1.0, 2.0];
        let qw = quantize_weights(&w, d_out, d_in, 8).unwrap();
        let qx = quantize_activations(&x, 2, d_in, 8).unwrap();
        let y_int: Vec<i64> = qx
            .values
            .chunks(d_in)
            .flat_map(|xr| {
                qw.values.chunks(d_in).map(move |wr| {
                    wr.iter()
                        .zip(xr)
                        .map(|(a, b)| *a as i64 * *b as i64)
                        .sum::<i64>()
                })
            })
            .collect();
        let y = dequantize(&y_int, &qx.scales, &qw.scales, &b);
        for t in 0..2 {
            for r in 0..d_out {
                let exact: f32 = (0..d_in)
                    .map(|j| w[r * d_in + j] * x[t * d_in + j])
                    .sum::<f32>()
                    + b[r];
                assert!(
                    (y[t * d_out + r] - exact).abs() < 0.05,
                    "{} vs {exact}",
                    y[t * d_out + r]
                );
            }
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(
            quantize_weights(&[1.0], 1, 1, 9).unwrap_err(),
            QuantError::Bits(9)
        );
        assert!(matches!(
            quantize_weights(&[1.0, 2.0], 1, 3, 8),
            Err(QuantError::Shape { .. })
        ));
        assert_eq!(
            quantize_activations(&[f32::NAN], 1, 1, 8).unwrap_err(),
            QuantError::NotFinite("activations")
        );
        assert_eq!(
            quantize_activations(&[1.0], 1, 1, 17).unwrap_err(),
            QuantError::ActivationBits(17)
        );
        let wide = quantize_activations(&[-3.0, 1.0, 0.5, 2.0], 1, 4, 12).unwrap();
        assert_eq!(wide.values, vec![-2047, 682, 341, 1365]);
        let zeros = quantize_activations(&[0.0; 4], 1, 4, 8).unwrap();
        assert_eq!(zeros.values, vec![0; 4]);
    }
}
