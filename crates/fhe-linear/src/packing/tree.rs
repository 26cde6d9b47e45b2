//! The packing tree: level by level, pairs of ciphertexts merged with an automorphism and a key
//! switch until `n_i` products share one ciphertext (the module docs of [`crate::packing`]).

use rayon::prelude::*;

use super::key::{PreparedPackingKey, Workspace};
use super::math::{add_rotated, automorphism, galois_element};
use super::Glwe;
use crate::FheError;

impl PreparedPackingKey {
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
