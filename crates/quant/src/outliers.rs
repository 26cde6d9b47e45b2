//! Outlier channels spread over several columns of the integer product.
//!
//! A few input channels of a transformer's linear layers (the residual stream's outliers) carry
//! magnitudes far above the rest. With one step per token, `s = max_j |x_j| / q_max`, they leave
//! every other channel a handful of steps. A [`ChannelSplit`] gives each outlier channel `j`
//! `p_j` columns of the product instead of one:
//!
//! - the server repeats weight column `j` `p_j` times ([`ChannelSplit::expand_weights`]);
//! - the client quantizes with the step `s = max_j |x_j| / (p_j q_max)` (`p_j = 1` for the other
//!   channels), so `v_j = round(x_j / s)` reaches up to `p_j q_max`, and spreads `v_j` over the
//!   channel's `p_j` columns, each within `[-q_max, q_max]` ([`ChannelSplit::quantize`]).
//!
//! `sum_k W_j v_jk = W_j v_j`: the product is the one of the original layer with the finer step.
//! The encrypted layer is an ordinary layer of `n_bits` activations and weights and width
//! `d_in + extra`, so its exactness and noise budget are those of that width.
//!
//! Column order of the widened product: the `d_in` original columns (channel `j`'s first part in
//! column `j`), then, for each split channel in increasing order, its `p_j - 1` further parts.

use serde::{Deserialize, Serialize};

use crate::{activation_q_max, check, step, QuantError, QuantizedActivations, QuantizedWeights};

/// Outlier channels and how many columns each spans (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSplit {
    /// Split channels, strictly increasing.
    pub channels: Vec<u32>,
    /// Columns per split channel (each at least 2), in the order of `channels`.
    pub parts: Vec<u32>,
}

/// Largest number of columns one channel may span.
pub const MAX_PARTS: u32 = 256;

impl ChannelSplit {
    /// The split that makes the per-token step of the calibration data smallest with at most
    /// `max_extra` added columns: every channel whose calibrated largest magnitude
    /// (`channel_max`) exceeds a threshold `tau` spans `ceil(max_j / tau)` columns, with the
    /// smallest `tau` that fits the budget, but no lower than the largest maximum over
    /// [`MAX_PARTS`]. A budget above the outliers' needs splits the ordinary channels too: a
    /// finer step for every channel (two columns each is one more bit of activation).
    /// `None` when no channel would be split.
    pub fn calibrate(channel_max: &[f32], max_extra: usize) -> Option<ChannelSplit> {
        let extra = |tau: f64| -> usize {
            channel_max
                .iter()
                .map(|m| parts_for(*m as f64, tau) as usize - 1)
                .sum()
        };
        let top = channel_max.iter().fold(0f32, |a, m| a.max(*m)) as f64;
        if max_extra == 0 || !top.is_finite() || top <= 0.0 {
            return None;
        }
        // extra(tau) is non-increasing in tau: bisect for the smallest tau within the budget.
        let (mut lo, mut hi) = (top / MAX_PARTS as f64, top);
        if extra(lo) <= max_extra {
            hi = lo;
        }
        for _ in 0..64 {
            if hi - lo <= hi * 1e-9 {
                break;
            }
            let mid = 0.5 * (lo + hi);
            if extra(mid) <= max_extra {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let (channels, parts): (Vec<u32>, Vec<u32>) = channel_max
            .iter()
            .enumerate()
            .map(|(j, m)| (j as u32, parts_for(*m as f64, hi)))
            .filter(|(_, p)| *p > 1)
            .unzip();
        (!channels.is_empty()).then_some(ChannelSplit { channels, parts })
    }

    /// Columns added to the product.
    pub fn extra(&self) -> usize {
        self.parts.iter().map(|p| *p as usize - 1).sum()
    }

    /// Width of the product for `d_in` input channels.
    pub fn width(&self, d_in: usize) -> usize {
        d_in + self.extra()
    }

    /// Checks the split against a layer of `d_in` inputs (a split read from a file).
    pub fn validate(&self, d_in: usize) -> Result<(), QuantError> {
        let bad = |why: String| Err(QuantError::Split(why));
        if self.channels.len() != self.parts.len() {
            return bad(format!(
                "{} channels with {} part counts",
                self.channels.len(),
                self.parts.len()
            ));
        }
        if self.channels.windows(2).any(|w| w[0] >= w[1]) {
            return bad("channels not strictly increasing".into());
        }
        if let Some(c) = self.channels.iter().find(|c| **c as usize >= d_in) {
            return bad(format!("channel {c} of a layer of {d_in} inputs"));
        }
        if let Some(p) = self.parts.iter().find(|p| !(2..=MAX_PARTS).contains(*p)) {
            return bad(format!("{p} parts (2..={MAX_PARTS})"));
        }
        Ok(())
    }

    /// Per input channel, the columns it spans (1 for channels not split).
    fn parts_per_channel(&self, d_in: usize) -> Vec<u32> {
        let mut all = vec![1u32; d_in];
        for (c, p) in self.channels.iter().zip(&self.parts) {
            all[*c as usize] = *p;
        }
        all
    }

    /// The widened weights: each split channel's column repeated once per further part.
    pub fn expand_weights(&self, w: &QuantizedWeights) -> Result<QuantizedWeights, QuantError> {
        self.validate(w.d_in)?;
        let width = self.width(w.d_in);
        let mut values = Vec::with_capacity(w.d_out * width);
        for row in w.values.chunks_exact(w.d_in) {
            values.extend_from_slice(row);
            for (c, p) in self.channels.iter().zip(&self.parts) {
                values.extend(std::iter::repeat_n(row[*c as usize], *p as usize - 1));
            }
        }
        Ok(QuantizedWeights {
            n_bits: w.n_bits,
            d_out: w.d_out,
            d_in: width,
            values,
            scales: w.scales.clone(),
        })
    }

    /// Quantizes `x` (`tokens x d_in`) into `tokens x width(d_in)` values: per token the step
    /// `max_j |x_j| / (p_j q_max)`, or the fixed calibrated `scale` (values beyond a channel's
    /// `p_j q_max` steps clipped), each split channel's value spread over its columns.
    pub fn quantize(
        &self,
        x: &[f32],
        tokens: usize,
        d_in: usize,
        n_bits: u32,
        scale: Option<f32>,
    ) -> Result<QuantizedActivations, QuantError> {
        let q = activation_q_max(n_bits)?;
        check("activations", x, tokens, d_in)?;
        self.validate(d_in)?;
        if let Some(s) = scale {
            if !(s.is_finite() && s > 0.0) {
                return Err(QuantError::NotFinite("activation scale"));
            }
        }
        let parts = self.parts_per_channel(d_in);
        let width = self.width(d_in);
        let mut values = Vec::with_capacity(tokens * width);
        let mut scales = Vec::with_capacity(tokens);
        let mut split = Vec::with_capacity(MAX_PARTS as usize);
        for row in x.chunks_exact(d_in) {
            let s = scale.unwrap_or_else(|| {
                let max = row
                    .iter()
                    .zip(&parts)
                    .fold(0f32, |m, (v, p)| m.max(v.abs() / *p as f32));
                step(max, q)
            });
            scales.push(s);
            let start = values.len();
            values.resize(start + width, 0i16);
            let mut next = start + d_in;
            for (j, (v, p)) in row.iter().zip(&parts).enumerate() {
                let limit = (*p as i64) * q as i64;
                let n = ((v / s).round() as i64).clamp(-limit, limit);
                if *p == 1 {
                    values[start + j] = n as i16;
                    continue;
                }
                spread(n, *p, &mut split);
                values[start + j] = split[0];
                values[next..next + split.len() - 1].copy_from_slice(&split[1..]);
                next += split.len() - 1;
            }
        }
        Ok(QuantizedActivations { values, scales })
    }
}

/// Columns a channel of calibrated maximum `max` needs for the step `tau / q_max`.
fn parts_for(max: f64, tau: f64) -> u32 {
    ((max / tau).ceil() as u32).clamp(1, MAX_PARTS)
}

/// `n` as `p` integers summing to it, each at most `ceil(|n| / p)` in magnitude.
fn spread(n: i64, p: u32, out: &mut Vec<i16>) {
    out.clear();
    let (a, sign) = (n.unsigned_abs(), n.signum());
    let (base, rem) = (a / p as u64, a % p as u64);
    out.extend((0..p as u64).map(|k| (sign * (base + u64::from(k < rem)) as i64) as i16));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{quantize_activations, quantize_weights};

    fn product(w: &QuantizedWeights, x: &[i16]) -> Vec<i64> {
        x.chunks(w.d_in)
            .flat_map(|xr| {
                w.values.chunks(w.d_in).map(move |wr| {
                    wr.iter()
                        .zip(xr)
                        .map(|(a, b)| *a as i64 * *b as i64)
                        .sum::<i64>()
                })
            })
            .collect()
    }

    /// Inputs with two outlier channels 40 and 300 times larger than the rest.
    fn inputs(tokens: usize, d_in: usize) -> Vec<f32> {
        (0..tokens * d_in)
            .map(|i| {
                let base = ((i * 37 % 101) as f32 - 50.0) / 50.0;
                match i % d_in {
                    3 => base * 40.0 + 20.0,
                    7 => -base * 300.0,
                    _ => base,
                }
            })
            .collect()
    }

    #[test]
    fn calibration_splits_the_outliers_within_the_budget() {
        let mut max = vec![1.0f32; 64];
        max[3] = 60.0;
        max[7] = 300.0;
        let split = ChannelSplit::calibrate(&max, 16).unwrap();
        assert_eq!(split.channels, vec![3, 7]);
        assert!(split.extra() <= 16 && split.extra() >= 14, "{split:?}");
        assert_eq!(split.width(64), 64 + split.extra());
        assert_eq!(ChannelSplit::calibrate(&max, 0), None);
        assert_eq!(ChannelSplit::calibrate(&[1.0; 8], 4), None);
        // A large budget stops at MAX_PARTS columns for the largest channel...
        let all = ChannelSplit::calibrate(&max, 10_000).unwrap();
        assert_eq!(all.parts, vec![52, 256]);
        // ... and a budget above the outliers' needs splits the ordinary channels too.
        let mut max = vec![1.0f32; 64];
        max[5] = 4.0;
        let all = ChannelSplit::calibrate(&max, 70).unwrap();
        assert_eq!(all.channels.len(), 64);
        assert_eq!(all.extra(), 70);
        for (c, p) in all.channels.iter().zip(&all.parts) {
            assert_eq!(*p, if *c == 5 { 8 } else { 2 }, "{all:?}");
        }
    }

    #[test]
    fn the_widened_product_is_the_finer_product() {
        let (tokens, d_in, d_out) = (5, 16, 4);
        let x = inputs(tokens, d_in);
        let w: Vec<f32> = (0..d_out * d_in)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
            .collect();
        let qw = quantize_weights(&w, d_out, d_in, 8).unwrap();
        let split = ChannelSplit {
            channels: vec![3, 7],
            parts: vec![2, 5],
        };
        let wide = split.expand_weights(&qw).unwrap();
        assert_eq!(wide.d_in, d_in + 5);
        let qx = split.quantize(&x, tokens, d_in, 8, None).unwrap();
        assert_eq!(qx.values.len(), tokens * (d_in + 5));
        // Spreading loses nothing: the widened product equals the product of the
        // unspread integer values with the original weights.
        for (t, row) in x.chunks(d_in).enumerate() {
            let s = qx.scales[t];
            let v: Vec<i64> = row.iter().map(|v| (v / s).round() as i64).collect();
            assert!(v[7].abs() > 127 && v[7].abs() <= 5 * 127, "{}", v[7]);
            let want: Vec<i64> = qw
                .values
                .chunks(d_in)
                .map(|wr| wr.iter().zip(&v).map(|(a, b)| *a as i64 * b).sum())
                .collect();
            let got = product(&wide, &qx.values[t * wide.d_in..(t + 1) * wide.d_in]);
            assert_eq!(got, want, "token {t}");
        }
        // And it is closer to the float product than one step per token.
        let plain = quantize_activations(&x, tokens, d_in, 8).unwrap();
        let error = |y: &[i64], scales: &[f32]| -> f64 {
            let mut e = 0.0;
            for t in 0..tokens {
                for r in 0..d_out {
                    let exact: f32 = (0..d_in).map(|j| w[r * d_in + j] * x[t * d_in + j]).sum();
                    let got = y[t * d_out + r] as f64 * (scales[t] * qw.scales[r]) as f64;
                    e += (got - exact as f64).powi(2);
                }
            }
            e
        };
        let finer = error(&product(&wide, &qx.values), &qx.scales);
        let coarse = error(&product(&qw, &plain.values), &plain.scales);
        assert!(finer * 4.0 < coarse, "{finer} vs {coarse}");
    }

    #[test]
    fn spreading_keeps_every_part_in_range() {
        let mut out = Vec::new();
        for p in [2u32, 3, 7, 256] {
            let limit = p as i64 * 127;
            for n in [-limit, -limit + 1, -1, 0, 1, 128, limit - 1, limit] {
                spread(n, p, &mut out);
                assert_eq!(out.len(), p as usize);
                assert_eq!(out.iter().map(|v| *v as i64).sum::<i64>(), n);
                assert!(out.iter().all(|v| (-127..=127).contains(v)));
            }
        }
    }

    #[test]
    fn static_scale_clips_each_channel_at_its_parts() {
        let split = ChannelSplit {
            channels: vec![1],
            parts: vec![3],
        };
        let q = split
            .quantize(&[1000.0, 1000.0, -0.5], 1, 3, 8, Some(1.0))
            .unwrap();
        assert_eq!(q.values[0], 127);
        assert_eq!(
            q.values[1] as i32 + q.values[3] as i32 + q.values[4] as i32,
            381
        );
        assert_eq!(q.values[2], -1);
    }

    #[test]
    fn a_bad_split_is_an_error() {
        let bad = [
            (vec![3, 1], vec![2, 2]),
            (vec![1], vec![2, 2]),
            (vec![9], vec![2]),
            (vec![1], vec![1]),
            (vec![1], vec![MAX_PARTS + 1]),
        ];
        for (channels, parts) in bad {
            let split = ChannelSplit { channels, parts };
            assert!(matches!(split.validate(8), Err(QuantError::Split(_))));
            assert!(split.quantize(&[0.0; 8], 1, 8, 8, None).is_err());
        }
    }
}
