//! Error-compensating weight rounding (GPTQ, Frantar et al. 2022), on the same per-row grid.
//!
//! Rounding each weight to its nearest step minimises the error of the weights; what matters is
//! the error of the layer's outputs, `(W - Q) X`, on the inputs `X` the layer sees. GPTQ
//! rounds the columns of a row one after another and spreads each column's rounding error over
//! the columns not yet rounded, in proportion to how the inputs correlate, using the inverse of
//! `H = X^T X` (calibrated). The result lies on the same grid as nearest rounding (one
//! symmetric step per output row, values within `[-q_max, q_max]`): the encrypted product and
//! its noise budget are unchanged, only which grid point each weight takes.

use rayon::prelude::*;

use crate::{check, q_max, row_step, QuantError, QuantizedWeights};

/// Share of the mean diagonal of `H` added to it. `H` from a few hundred calibration tokens is
/// singular for wide layers and overfits them: on SmolLM2-135M's attention projections (8
/// calibration texts, 219 tokens) 0.01 / 0.1 / 1.0 gave 13 / 8 / 12 disagreements with the
/// float model in 704 next-token predictions (11 rounding to nearest).
pub const DAMPING: f64 = 0.1;

/// Quantizes `w` (`d_out x d_in`, row-major) per output channel with GPTQ's error
/// compensation for inputs whose second moments are `gram` (`d_in x d_in`, `sum_t x_t x_t^T`).
pub fn quantize_weights_compensated(
    w: &[f32],
    d_out: usize,
    d_in: usize,
    n_bits: u32,
    gram: &[f64],
) -> Result<QuantizedWeights, QuantError> {
    let q_max = q_max(n_bits)?;
    check("weights", w, d_out, d_in)?;
    if gram.len() != d_in * d_in || gram.iter().any(|v| !v.is_finite()) {
        return Err(QuantError::Moments(format!(
            "{} finite values expected for {d_in} inputs",
            d_in * d_in
        )));
    }
    let u = inverse_cholesky_upper(gram, d_in);
    let mut values = vec![0i8; d_out * d_in];
    let scales: Vec<f32> = w
        .chunks_exact(d_in)
        .map(|row| row_step(row, q_max))
        .collect();
    // Rows are independent: each one's errors go to its own later columns.
    values
        .par_chunks_exact_mut(d_in)
        .zip(w.par_chunks_exact(d_in))
        .zip(scales.par_iter())
        .for_each_init(
            || vec![0f64; d_in],
            |row, ((out, src), scale)| {
                let s = *scale as f64;
                row.iter_mut().zip(src).for_each(|(d, v)| *d = *v as f64);
                for i in 0..d_in {
                    let q = (row[i] / s).round().clamp(-q_max as f64, q_max as f64);
                    out[i] = q as i8;
                    let err = (row[i] - q * s) / u[i * d_in + i];
                    let u_row = &u[i * d_in..][..d_in];
                    for k in i + 1..d_in {
                        row[k] -= err * u_row[k];
                    }
                }
            },
        );
    Ok(QuantizedWeights {
        n_bits,
        d_out,
        d_in,
        values,
        scales,
    })
}

/// The upper Cholesky factor `U` of `(H + damping)^-1` (`U^T U = H^-1`), row-major. Channels
/// that never fired (zero diagonal) get a unit diagonal, so they are rounded to nearest.
fn inverse_cholesky_upper(gram: &[f64], d: usize) -> Vec<f64> {
    let mut h = gram.to_vec();
    let mean_diag = (0..d).map(|i| h[i * d + i]).sum::<f64>() / d.max(1) as f64;
    let damp = DAMPING * mean_diag.max(f64::MIN_POSITIVE);
    for i in 0..d {
        if h[i * d + i] <= 0.0 {
            h[i * d + i] = 1.0;
        }
        h[i * d + i] += damp;
    }
    // H = L L^T, so H^-1 = L^-T L^-1; then U = chol(H^-1)^T.
    let l = cholesky_lower(&h, d);
    let l_inv = invert_lower(&l, d);
    // H^-1 = L^-T L^-1.
    let mut h_inv = vec![0f64; d * d];
    h_inv
        .par_chunks_exact_mut(d)
        .enumerate()
        .for_each(|(i, out)| {
            for (j, v) in out.iter_mut().enumerate() {
                // L^-1 is lower triangular: the terms below max(i, j) vanish.
                *v = (i.max(j)..d)
                    .map(|k| l_inv[k * d + i] * l_inv[k * d + j])
                    .sum();
            }
        });
    let lower = cholesky_lower(&h_inv, d);
    // U = lower^T.
    let mut u = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            u[j * d + i] = lower[i * d + j];
        }
    }
    u
}

/// Lower Cholesky factor of a symmetric positive definite `d x d` matrix (a tiny pivot is
/// clamped: the damping keeps it away in practice).
fn cholesky_lower(a: &[f64], d: usize) -> Vec<f64> {
    let mut l = vec![0f64; d * d];
    for j in 0..d {
        let mut diag = a[j * d + j];
        for k in 0..j {
            diag -= l[j * d + k] * l[j * d + k];
        }
        let pivot = diag.max(1e-12 * a[j * d + j].abs().max(1e-300)).sqrt();
        l[j * d + j] = pivot;
        for i in j + 1..d {
            let mut v = a[i * d + j];
            for k in 0..j {
                v -= l[i * d + k] * l[j * d + k];
            }
            l[i * d + j] = v / pivot;
        }
    }
    l
}

/// Inverse of a lower triangular matrix with a positive diagonal.
fn invert_lower(l: &[f64], d: usize) -> Vec<f64> {
    let mut inv = vec![0f64; d * d];
    for j in 0..d {
        inv[j * d + j] = 1.0 / l[j * d + j];
        for i in j + 1..d {
            let mut acc = 0.0;
            for k in j..i {
                acc += l[i * d + k] * inv[k * d + j];
            }
            inv[i * d + j] = -acc / l[i * d + i];
        }
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize_weights;

    /// Correlated inputs: a few latent factors mixed into every channel, plus noise.
    fn inputs(tokens: usize, d_in: usize) -> Vec<f64> {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        let mix: Vec<f64> = (0..4 * d_in).map(|_| next()).collect();
        let mut x = vec![0f64; tokens * d_in];
        for t in 0..tokens {
            let f: Vec<f64> = (0..4).map(|_| next() * 3.0).collect();
            for j in 0..d_in {
                x[t * d_in + j] =
                    (0..4).map(|k| f[k] * mix[k * d_in + j]).sum::<f64>() + 0.1 * next();
            }
        }
        x
    }

    fn output_error(w: &[f32], q: &QuantizedWeights, x: &[f64], d_in: usize) -> f64 {
        let mut total = 0.0;
        for xr in x.chunks_exact(d_in) {
            for (r, row) in w.chunks_exact(d_in).enumerate() {
                let exact: f64 = row.iter().zip(xr).map(|(a, b)| *a as f64 * b).sum();
                let quant: f64 = q.values[r * d_in..][..d_in]
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| *a as f64 * q.scales[r] as f64 * b)
                    .sum();
                total += (exact - quant).powi(2);
            }
        }
        total
    }

    #[test]
    fn compensation_lowers_the_output_error_on_the_same_grid() {
        let (tokens, d_in, d_out) = (256, 48, 8);
        let x = inputs(tokens, d_in);
        let mut gram = vec![0f64; d_in * d_in];
        for xr in x.chunks_exact(d_in) {
            for i in 0..d_in {
                for j in 0..d_in {
                    gram[i * d_in + j] += xr[i] * xr[j];
                }
            }
        }
        let w: Vec<f32> = (0..d_out * d_in)
            .map(|i| (((i * 37) % 101) as f32 - 50.0) / 37.0)
            .collect();
        let nearest = quantize_weights(&w, d_out, d_in, 4).unwrap();
        let gptq = quantize_weights_compensated(&w, d_out, d_in, 4, &gram).unwrap();
        // Same grid: the same steps, values within the range.
        assert_eq!(gptq.scales, nearest.scales);
        assert!(gptq.values.iter().all(|v| (-7..=7).contains(v)));
        let (e_near, e_gptq) = (
            output_error(&w, &nearest, &x, d_in),
            output_error(&w, &gptq, &x, d_in),
        );
        assert!(e_gptq < 0.7 * e_near, "{e_gptq} vs {e_near}");
        // Garbage second moments are refused, not used.
        let mut bad = gram.clone();
        bad[3] = f64::NAN;
        assert!(quantize_weights_compensated(&w, d_out, d_in, 4, &bad).is_err());
        assert!(quantize_weights_compensated(&w, d_out, d_in, 4, &gram[1..]).is_err());
    }

    #[test]
    fn the_inverse_factor_is_the_inverse() {
        let d = 5;
        let mut h = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                h[i * d + j] = 1.0 / (1.0 + i as f64 + j as f64) + if i == j { 1.0 } else { 0.0 };
            }
        }
        let u = inverse_cholesky_upper(&h, d);
        let mean = (0..d).map(|i| h[i * d + i]).sum::<f64>() / d as f64;
        // (U^T U) (H + damping) = I.
        for i in 0..d {
            for j in 0..d {
                let mut acc = 0.0;
                for k in 0..d {
                    let inv_ik: f64 = (0..d).map(|m| u[m * d + i] * u[m * d + k]).sum();
                    let hk = h[k * d + j] + if k == j { DAMPING * mean } else { 0.0 };
                    acc += inv_ik * hk;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((acc - want).abs() < 1e-9, "{i} {j}: {acc}");
            }
        }
    }
}
