//! Where each activation, weight and result sits in the polynomials of the block encoding.
//!
//! The ring is Z_q[X]/(X^N + 1). Inputs are cut into blocks of `n_i` activations; `t_b` tokens
//! share one input polynomial; one product polynomial carries `n_o` outputs of each of its `t_b`
//! tokens, with `n_i * n_o * t_b = N`. With `S = n_i * n_o`:
//!
//! - input polynomial (group g, input block b): coefficient `t*S + j` holds `x[g*t_b + t][b*n_i + j]`;
//! - weight polynomial (output block o, input block b): coefficient `r*n_i - j` holds
//!   `w[o*n_o + r][b*n_i + j]` (an index below zero wraps to `N + r*n_i - j`, negated, because
//!   X^N = -1);
//! - product coefficient `t*S + r*n_i` is then exactly `sum_j w[o*n_o + r][b*n_i + j] * x[..][b*n_i + j]`:
//!   no other pair of terms lands there, so summing over b gives one output of Y = X W^T.

use crate::entities::{BlockLayout, LayerShape, ResultEncoding};
use crate::params::ParameterSet;
use crate::FheError;

/// Everything about a protected layer that client and server must agree on, and nothing secret:
/// parameter set, shape, block layout and the wire precisions that follow from the noise budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSpec {
    pub params: &'static ParameterSet,
    pub shape: LayerShape,
    pub layout: BlockLayout,
    /// Bits kept of each uploaded body coefficient.
    pub input_bits: u32,
    /// Bits kept of each returned coefficient.
    pub output_bits: u32,
    /// How results come back: one ciphertext per output block (keyless), or packed into full
    /// ciphertexts with the client's packing key (see [`crate::packing`]).
    pub encoding: ResultEncoding,
    /// Width of the activations, in [`crate::ACTIVATION_BITS`] (see there): wider activations
    /// take a smaller Delta, and so a share of the noise budget.
    pub activation_bits: u32,
}

impl LayerSpec {
    /// The keyless spec for a layout given explicitly; fails if the noise budget cannot hold it.
    pub fn new(
        params: &'static ParameterSet,
        shape: LayerShape,
        layout: BlockLayout,
    ) -> Result<Self, FheError> {
        Self::with_encoding(params, shape, layout, ResultEncoding::Keyless)
    }

    /// The packed-result spec for a layout given explicitly; fails if the parameter set has no
    /// packing keys, if `n_i` exceeds their depth, or if the noise budget cannot hold it.
    pub fn packed(
        params: &'static ParameterSet,
        shape: LayerShape,
        layout: BlockLayout,
    ) -> Result<Self, FheError> {
        Self::with_encoding(params, shape, layout, ResultEncoding::Packed)
    }

    /// The spec for a layout and result encoding, with 8-bit activations.
    pub fn with_encoding(
        params: &'static ParameterSet,
        shape: LayerShape,
        layout: BlockLayout,
        encoding: ResultEncoding,
    ) -> Result<Self, FheError> {
        Self::with_encoding_and_width(
            params,
            shape,
            layout,
            encoding,
            crate::DEFAULT_ACTIVATION_BITS,
        )
    }

    /// The same layout and result encoding for `activation_bits`-bit activations, with the wire
    /// precisions chosen again; fails where the noise budget does not hold that width.
    pub fn with_activation_bits(&self, activation_bits: u32) -> Result<Self, FheError> {
        Self::with_encoding_and_width(
            self.params,
            self.shape,
            self.layout,
            self.encoding,
            activation_bits,
        )
    }

    /// The spec for a layout, result encoding and `activation_bits`-bit activations; fails where
    /// the width is unsupported or the noise budget does not hold it.
    pub fn with_encoding_and_width(
        params: &'static ParameterSet,
        shape: LayerShape,
        layout: BlockLayout,
        encoding: ResultEncoding,
        activation_bits: u32,
    ) -> Result<Self, FheError> {
        if !crate::ACTIVATION_BITS.contains(&activation_bits) {
            return Err(FheError::InvalidLayout(format!(
                "{activation_bits}-bit activations: supported widths are {}..={}",
                crate::ACTIVATION_BITS.start(),
                crate::ACTIVATION_BITS.end()
            )));
        }
        if shape.d_in == 0 || shape.d_out == 0 || shape.d_in > params.max_d_in {
            return Err(FheError::InvalidShape(format!(
                "layer {shape}: need 1 <= d_in <= {} and d_out >= 1",
                params.max_d_in
            )));
        }
        layout.validate(params.polynomial_size)?;
        if encoding == ResultEncoding::Packed {
            let packing = params.packing.ok_or_else(|| {
                FheError::InvalidLayout(format!(
                    "parameter set {} has no packing keys",
                    params.name
                ))
            })?;
            if packing.base_log == 0 || packing.base_log * packing.levels > 64 {
                return Err(FheError::InvalidLayout(format!(
                    "packing decomposition 2^{} x {} does not fit 64 bits",
                    packing.base_log, packing.levels
                )));
            }
            if layout.n_i > 1 << packing.max_depth {
                return Err(FheError::InvalidLayout(format!(
                    "n_i={} needs more than the {} packing levels of {}",
                    layout.n_i, packing.max_depth, params.name
                )));
            }
        }
        // The f64 transforms stay exact only up to so many terms per product coefficient.
        let terms = shape.d_in.div_ceil(layout.n_i) * params.polynomial_size;
        if terms > 1 << crate::fourier::MAX_PRODUCT_TERMS_LOG2 {
            return Err(FheError::InvalidLayout(format!(
                "n_i={} is too small for d_in={} with N={}: each product coefficient would sum \
                 {terms} terms, more than the 2^{} that the f64 transforms keep exact",
                layout.n_i,
                shape.d_in,
                params.polynomial_size,
                crate::fourier::MAX_PRODUCT_TERMS_LOG2
            )));
        }
        let (input_bits, output_bits) =
            crate::noise::choose_wire_bits(params, shape, layout, encoding, activation_bits)
                .ok_or_else(|| {
                    FheError::InvalidLayout(format!(
                        "n_i={} n_o={} is too large for d_in={} with {activation_bits}-bit \
                         activations: the noise budget does not hold",
                        layout.n_i, layout.n_o, shape.d_in
                    ))
                })?;
        Ok(LayerSpec {
            params,
            shape,
            layout,
            input_bits,
            output_bits,
            encoding,
            activation_bits,
        })
    }

    /// The layout with the fewest bytes per token among those the noise budget allows, for
    /// `t_b` tokens per polynomial (1 for token-by-token decoding; 8 or 16 for prefill batches,
    /// at t_b times the server's weight memory).
    pub fn choose(
        params: &'static ParameterSet,
        shape: LayerShape,
        t_b: usize,
    ) -> Result<Self, FheError> {
        Self::choose_for(params, shape, t_b, crate::DEFAULT_ACTIVATION_BITS)
    }

    /// [`LayerSpec::choose`] for `activation_bits`-bit activations.
    pub fn choose_for(
        params: &'static ParameterSet,
        shape: LayerShape,
        t_b: usize,
        activation_bits: u32,
    ) -> Result<Self, FheError> {
        let n = params.polynomial_size;
        if !t_b.is_power_of_two() || t_b > n {
            return Err(FheError::InvalidLayout(format!(
                "tokens per polynomial {t_b}"
            )));
        }
        let mut best: Option<(usize, LayerSpec)> = None;
        let mut n_o = 1;
        while n_o * t_b <= n {
            let layout = BlockLayout {
                n_i: n / (n_o * t_b),
                n_o,
                t_b,
            };
            if let Ok(spec) = LayerSpec::with_encoding_and_width(
                params,
                shape,
                layout,
                ResultEncoding::Keyless,
                activation_bits,
            ) {
                let bytes = spec.upload_bytes(t_b) + spec.download_bytes(t_b);
                if best.as_ref().is_none_or(|(b, _)| bytes < *b) {
                    best = Some((bytes, spec));
                }
            }
            n_o *= 2;
        }
        best.map(|(_, s)| s).ok_or_else(|| {
            FheError::InvalidLayout(format!(
                "no block layout fits layer {shape} with {activation_bits}-bit activations"
            ))
        })
    }

    pub fn polynomial_size(&self) -> usize {
        self.params.polynomial_size
    }

    /// Input blocks per token group: ceil(d_in / n_i).
    pub fn input_blocks(&self) -> usize {
        self.shape.d_in.div_ceil(self.layout.n_i)
    }

    /// Output blocks per token group: ceil(d_out / n_o).
    pub fn output_blocks(&self) -> usize {
        self.shape.d_out.div_ceil(self.layout.n_o)
    }

    /// Token groups for a batch of `tokens`: ceil(tokens / t_b).
    pub fn token_groups(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.layout.t_b)
    }

    /// Tokens actually present in group `g` of a batch of `tokens`.
    pub fn tokens_in_group(&self, tokens: usize, g: usize) -> usize {
        (tokens - g * self.layout.t_b).min(self.layout.t_b)
    }

    /// Rows of W actually present in output block `o`.
    pub fn rows_in_block(&self, o: usize) -> usize {
        (self.shape.d_out - o * self.layout.n_o).min(self.layout.n_o)
    }

    /// Packing levels applied to the results: log2(n_i) when packed, else 0.
    pub fn packing_depth(&self) -> u32 {
        match self.encoding {
            ResultEncoding::Keyless => 0,
            ResultEncoding::Packed => self.layout.n_i.trailing_zeros(),
        }
    }

    /// Scaling factor of the encrypted activations, as a shift: Delta = 2^(64 - P) for keyless
    /// results; for packed ones 2^(64 - P - depth), since every packing level doubles the message.
    pub fn delta_log2(&self) -> u32 {
        self.output_delta_log2() - self.packing_depth()
    }

    /// Scaling factor Delta = 2^(64 - P) of the decrypted results, as a shift.
    pub fn output_delta_log2(&self) -> u32 {
        64 - self
            .params
            .plaintext_bits(self.shape.d_in, self.activation_bits)
    }

    /// Packed result ciphertexts for `tokens`: the (group, output block) products, n_i per pack.
    pub fn packs(&self, tokens: usize) -> usize {
        (self.token_groups(tokens) * self.output_blocks()).div_ceil(self.layout.n_i)
    }

    /// Where output (token `t`, row `row`) sits: (ciphertext index, coefficient). For keyless
    /// results the ciphertext is the (group, output block) product; for packed ones the pack.
    pub fn output_position(&self, t: usize, row: usize) -> (usize, usize) {
        let (n_i, n_o, t_b) = (self.layout.n_i, self.layout.n_o, self.layout.t_b);
        let product = (t / t_b) * self.output_blocks() + row / n_o;
        let coefficient = (t % t_b) * self.layout.token_stride() + (row % n_o) * n_i;
        match self.encoding {
            ResultEncoding::Keyless => (product, coefficient),
            ResultEncoding::Packed => {
                let depth = self.packing_depth();
                let slot = product % n_i;
                // Level k of the packing tree shifts odd siblings by n_i / 2^k: the slot's bits,
                // reversed.
                let shift = if depth == 0 {
                    0
                } else {
                    slot.reverse_bits() >> (usize::BITS - depth)
                };
                (product / n_i, coefficient + shift)
            }
        }
    }

    /// Bytes of the encrypted upload for `tokens` (header excluded).
    pub fn upload_bytes(&self, tokens: usize) -> usize {
        let coeffs = self.token_groups(tokens) * self.input_blocks() * self.polynomial_size();
        (coeffs * self.input_bits as usize).div_ceil(8)
    }

    /// Returned body coefficients of result ciphertext (g, o).
    pub fn result_bodies(&self, tokens: usize, g: usize, o: usize) -> usize {
        self.tokens_in_group(tokens, g) * self.rows_in_block(o)
    }

    /// Coefficients of the encrypted result for `tokens`.
    pub fn result_coefficients(&self, tokens: usize) -> usize {
        let n = self.polynomial_size();
        match self.encoding {
            ResultEncoding::Keyless => {
                self.token_groups(tokens) * self.output_blocks() * n + tokens * self.shape.d_out
            }
            ResultEncoding::Packed => self.packs(tokens) * n + tokens * self.shape.d_out,
        }
    }

    /// For each pack of a packed result: the outputs it carries, as (index in the `tokens x
    /// d_out` result, coefficient), in the order their bodies travel.
    pub fn packed_outputs(&self, tokens: usize) -> Vec<Vec<(usize, usize)>> {
        let d_out = self.shape.d_out;
        let mut packs = vec![Vec::new(); self.packs(tokens)];
        for t in 0..tokens {
            for row in 0..d_out {
                let (p, c) = self.output_position(t, row);
                packs[p].push((t * d_out + row, c));
            }
        }
        packs
    }

    /// Bytes of the encrypted result for `tokens` (header excluded).
    pub fn download_bytes(&self, tokens: usize) -> usize {
        (self.result_coefficients(tokens) * self.output_bits as usize).div_ceil(8)
    }

    /// The noise budget of this spec with the worst weights allowed.
    pub fn noise_budget(&self) -> crate::noise::NoiseBudget {
        crate::noise::budget(
            self.params,
            self.shape,
            self.layout,
            self.encoding,
            self.activation_bits,
            (self.input_bits, self.output_bits),
        )
    }

    /// Calls `f(coefficient, activation)` for every activation of token group `g` and input
    /// block `b` of a `tokens x d_in` batch: where it sits in that input polynomial.
    pub fn for_each_activation(
        &self,
        x: &[i16],
        tokens: usize,
        g: usize,
        b: usize,
        mut f: impl FnMut(usize, i16),
    ) {
        let (d_in, n_i, t_b) = (self.shape.d_in, self.layout.n_i, self.layout.t_b);
        let width = n_i.min(d_in - b * n_i);
        for t in 0..self.tokens_in_group(tokens, g) {
            let row = &x[(g * t_b + t) * d_in + b * n_i..][..width];
            for (j, &v) in row.iter().enumerate() {
                f(t * self.layout.token_stride() + j, v);
            }
        }
    }

    /// Bytes of the server's precomputed weight transforms.
    pub fn weight_memory_bytes(&self) -> usize {
        self.input_blocks() * self.output_blocks() * self.polynomial_size() / 2 * 16
    }
}
