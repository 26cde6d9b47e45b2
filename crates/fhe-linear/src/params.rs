//! The named, versioned parameter sets of the encrypted linear layers.
//!
//! A parameter set fixes the ring (GLWE dimension k, polynomial size N), the modulus (q = 2^64),
//! the secret-key distribution (binary) and the encryption noise. Its id travels in every wire
//! header, so a ciphertext can never be read under the wrong parameters.

/// Identifier of a parameter set on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamSetId(pub u16);

/// A named set of cryptographic parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParameterSet {
    pub id: ParamSetId,
    pub name: &'static str,
    /// GLWE dimension k (number of mask polynomials).
    pub glwe_dimension: usize,
    /// Polynomial size N (a power of two).
    pub polynomial_size: usize,
    /// Standard deviation of the Gaussian encryption noise, relative to q = 2^64.
    pub noise_std_relative: f64,
    /// Weights are signed integers in [-2^(w-1), 2^(w-1)).
    pub weight_bits: u32,
    /// Largest supported input width (bounds the plaintext window to 64 bits with headroom).
    pub max_d_in: usize,
    /// The packing keys of this set, when it supports packed results (see [`crate::packing`]).
    pub packing: Option<PackingParams>,
}

/// Parameters of the packing (automorphism key-switching) keys of a parameter set.
///
/// One key serves every layer of a client, so these are fixed per parameter set; the noise
/// budget of every packed layer spec accounts for them ([`crate::noise::keyswitch_variance`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackingParams {
    /// log2 of the gadget decomposition base.
    pub base_log: u32,
    /// Decomposition levels: the top `base_log * levels` bits of a mask coefficient are kept.
    pub levels: u32,
    /// Bits kept of each key body coefficient (the masks come from a seed).
    pub key_body_bits: u32,
    /// Automorphisms in a key: packed layouts may use up to `2^max_depth` activations per block.
    pub max_depth: u32,
}

/// k = 1, N = 2048, q = 2^64, binary keys, 8-bit weights (activations: see [`ACTIVATION_BITS`]).
///
/// Security: the GLWE dimension, polynomial size and noise are those of the GLWE side of tfhe-rs
/// 1.8.2's 128-bit set `V0_11_PARAM_MESSAGE_2_CARRY_2_KS_PBS_GAUSSIAN_2M64`
/// (`glwe_dimension: GlweDimension(1)`, `polynomial_size: PolynomialSize(2048)`,
/// `glwe_noise_distribution: StandardDev(2.845267479601915e-15)`), used there with binary
/// GLWE secret keys, which is what this crate generates.
pub const HFHE_GLWE_2048_V1: ParameterSet = ParameterSet {
    id: ParamSetId(1),
    name: "hfhe-glwe-2048-v1",
    glwe_dimension: 1,
    polynomial_size: 2048,
    noise_std_relative: 2.845267479601915e-15,
    weight_bits: 8,
    max_d_in: 16384,
    packing: None,
};

/// k = 1, N = 4096, q = 2^64, binary keys, 8-bit weights: the set of packed
/// results (its noise is 2^13.7 times smaller than [`HFHE_GLWE_2048_V1`]'s, which is what lets
/// 8-bit weights survive up to nine packing levels).
///
/// Security: the GLWE dimension, polynomial size and noise are those of the GLWE side of tfhe-rs
/// 1.8.2's 128-bit set `V0_11_PARAM_MESSAGE_2_CARRY_3_KS_PBS_GAUSSIAN_2M64`
/// (`glwe_dimension: GlweDimension(1)`, `polynomial_size: PolynomialSize(4096)`,
/// `glwe_noise_distribution: StandardDev(2.168404344971009e-19)`, an absolute std of 4 at q = 2^64),
/// used there with binary GLWE secret keys. The packing keys are GLWE encryptions under the same
/// key with the same noise. Packing parameters: base 2^11 (larger bases lose exactness in the f64
/// FFT at N = 4096), 5 levels, 57-bit key bodies, 9 automorphisms: chosen from the noise budget
/// ([`crate::noise`]) so that n_i = 512 still fits with 8-bit weights and the key stays under 1.5 MB.
pub const HFHE_GLWE_4096_V1: ParameterSet = ParameterSet {
    id: ParamSetId(2),
    name: "hfhe-glwe-4096-v1",
    glwe_dimension: 1,
    polynomial_size: 4096,
    noise_std_relative: 2.168404344971009e-19,
    weight_bits: 8,
    max_d_in: 16384,
    packing: Some(PackingParams {
        base_log: 11,
        levels: 5,
        key_body_bits: 57,
        max_depth: 9,
    }),
};

/// Activation widths a layer spec may use: signed integers in `[-2^(a-1), 2^(a-1))`.
///
/// The width is an encoding choice, not a cryptographic one: the ciphertexts, keys and kernel are
/// the same for every width, which only moves the scaling factor Delta (one plaintext bit per
/// activation bit) and so takes its share of the noise budget ([`crate::noise`]). It is part of
/// the [`crate::LayerSpec`] and travels in every wire header.
pub const ACTIVATION_BITS: std::ops::RangeInclusive<u32> = 8..=16;

/// The activation width of a spec that does not name one.
pub const DEFAULT_ACTIVATION_BITS: u32 = 8;

/// All parameter sets this build understands.
pub const PARAMETER_SETS: &[ParameterSet] = &[HFHE_GLWE_2048_V1, HFHE_GLWE_4096_V1];

impl ParameterSet {
    /// Look a parameter set up by its wire id.
    pub fn by_id(id: ParamSetId) -> Option<&'static ParameterSet> {
        PARAMETER_SETS.iter().find(|p| p.id == id)
    }

    /// Look a parameter set up by its name.
    pub fn by_name(name: &str) -> Option<&'static ParameterSet> {
        PARAMETER_SETS.iter().find(|p| p.name == name)
    }

    /// Absolute noise standard deviation at q = 2^64 (about 2^15.7 for the default set).
    pub fn noise_std(&self) -> f64 {
        self.noise_std_relative * 2f64.powi(64)
    }

    /// Bits of the signed plaintext window for an input width and `a`-bit activations:
    /// ceil(log2 d_in) + a + w.
    ///
    /// |sum_j w_j x_j| <= d_in * 2^(a-1) * 2^(w-1) = 2^(log2 d_in + a + w - 2), so a window of
    /// ceil(log2 d_in) + a + w bits leaves one bit of sign and one bit of headroom for the bias.
    pub fn plaintext_bits(&self, d_in: usize, activation_bits: u32) -> u32 {
        let log_d = usize::BITS - (d_in.max(1) - 1).leading_zeros();
        log_d + activation_bits + self.weight_bits
    }

    /// Inclusive range of the weights.
    pub fn weight_range(&self) -> (i32, i32) {
        (
            -(1 << (self.weight_bits - 1)),
            (1 << (self.weight_bits - 1)) - 1,
        )
    }
}
