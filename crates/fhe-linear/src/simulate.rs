//! The plain integer reference: what every encrypted computation must reproduce exactly.

use rayon::prelude::*;

use crate::entities::LayerShape;

/// `Y = X W^T + b` in clear integers: `x` is `tokens x d_in`, `w` is `d_out x d_in`, both
/// row-major; returns `tokens x d_out`, row-major.
pub fn simulate(shape: LayerShape, x: &[i16], tokens: usize, w: &[i8], bias: &[i64]) -> Vec<i64> {
    let (d_in, d_out) = (shape.d_in, shape.d_out);
    assert_eq!(x.len(), tokens * d_in, "activations do not match the shape");
    assert_eq!(w.len(), d_out * d_in, "weights do not match the shape");
    assert_eq!(bias.len(), d_out, "bias does not match the shape");
    let mut y = vec![0i64; tokens * d_out];
    for (out, row) in y.chunks_mut(d_out).zip(x.chunks_exact(d_in)) {
        // |x w| <= max|x| * 2^7 per term: an i32 sum is exact (and vectorises well) while
        // d_in such terms stay below 2^31.
        let x_max = row.iter().map(|v| (*v as i64).abs()).max().unwrap_or(0);
        let exact_in_i32 = (d_in as i64) * x_max * 128 < (1 << 31);
        out.par_iter_mut()
            .zip(w.par_chunks_exact(d_in))
            .zip(bias.par_iter())
            .for_each(|((o, w_row), b)| {
                let dot = if exact_in_i32 {
                    row.iter()
                        .zip(w_row)
                        .map(|(a, b)| *a as i32 * *b as i32)
                        .sum::<i32>() as i64
                } else {
                    row.iter()
                        .zip(w_row)
                        .map(|(a, b)| *a as i64 * *b as i64)
                        .sum()
                };
                *o = dot + b;
            });
    }
    y
}
