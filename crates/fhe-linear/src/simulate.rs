//! The plain integer reference: what every encrypted computation must reproduce exactly.

use crate::layout::LayerShape;

/// `Y = X W^T + b` in clear integers: `x` is `tokens x d_in`, `w` is `d_out x d_in`, both
/// row-major; returns `tokens x d_out`, row-major.
pub fn simulate(shape: LayerShape, x: &[i8], tokens: usize, w: &[i8], bias: &[i64]) -> Vec<i64> {
    let (d_in, d_out) = (shape.d_in, shape.d_out);
    assert_eq!(x.len(), tokens * d_in, "activations do not match the shape");
    assert_eq!(w.len(), d_out * d_in, "weights do not match the shape");
    assert_eq!(bias.len(), d_out, "bias does not match the shape");
    let mut y = Vec::with_capacity(tokens * d_out);
    for row in x.chunks_exact(d_in) {
        for (w_row, b) in w.chunks_exact(d_in).zip(bias) {
            let dot: i64 = row
                .iter()
                .zip(w_row)
                .map(|(a, b)| *a as i64 * *b as i64)
                .sum();
            y.push(dot + b);
        }
    }
    y
}
