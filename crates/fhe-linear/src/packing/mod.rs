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
//!
//! # Modules
//!
//! - `math`: automorphisms, rotations, the key's split for the FFT and the balanced decomposition;
//! - `key`: the client's [`PackingKey`] (generation and its byte format) and the server's
//!   [`PreparedPackingKey`] (its spectra and the key switch);
//! - `tree`: the merges that pack `n_i` products into one ciphertext.

mod key;
mod math;
mod tree;

pub use key::{PackingKey, PreparedPackingKey, KEY_HEADER_LEN, KEY_VERSION};
pub use math::{automorphism, galois_element};

/// One ciphertext inside the packing tree: full 64-bit mask and body.
pub(crate) type Glwe = (Vec<u64>, Vec<u64>);
