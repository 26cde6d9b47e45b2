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
    /// Largest activation magnitude bits: activations are signed integers in [-2^(a-1), 2^(a-1)).
    pub activation_bits: u32,
    /// Weights are signed integers in [-2^(w-1), 2^(w-1)).
    pub weight_bits: u32,
    /// Largest supported input width (bounds the plaintext window to 64 bits with headroom).
    pub max_d_in: usize,
}

/// k = 1, N = 2048, q = 2^64, binary keys, 8-bit activations and weights.
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
    activation_bits: 8,
    weight_bits: 8,
    max_d_in: 16384,
};

/// All parameter sets this build understands.
pub const PARAMETER_SETS: &[ParameterSet] = &[HFHE_GLWE_2048_V1];

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

    /// Bits of the signed plaintext window for an input width: ceil(log2 d_in) + a + w.
    ///
    /// |sum_j w_j x_j| <= d_in * 2^(a-1) * 2^(w-1) = 2^(log2 d_in + a + w - 2), so a window of
    /// ceil(log2 d_in) + a + w bits leaves one bit of sign and one bit of headroom for the bias.
    pub fn plaintext_bits(&self, d_in: usize) -> u32 {
        let log_d = usize::BITS - (d_in.max(1) - 1).leading_zeros();
        log_d + self.activation_bits + self.weight_bits
    }

    /// Inclusive range of the activations.
    pub fn activation_range(&self) -> (i32, i32) {
        (
            -(1 << (self.activation_bits - 1)),
            (1 << (self.activation_bits - 1)) - 1,
        )
    }

    /// Inclusive range of the weights.
    pub fn weight_range(&self) -> (i32, i32) {
        (
            -(1 << (self.weight_bits - 1)),
            (1 << (self.weight_bits - 1)) - 1,
        )
    }
}
