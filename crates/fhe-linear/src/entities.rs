//! The data that describe a protected layer, below everything that computes with them: its
//! shape, its block layout and how its results travel. [`crate::params`] holds the fourth, the
//! parameter set. `layout` (where values sit and which spec a layer uses), `noise` (the budget)
//! and `wire` (the byte format) all build on these and not on each other's types.

use crate::FheError;

/// The shape of a protected linear layer: `d_out x d_in` weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerShape {
    pub d_in: usize,
    pub d_out: usize,
}

/// The block split of the encoding (see [`crate::layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    /// Activations per input block.
    pub n_i: usize,
    /// Outputs per product polynomial and token.
    pub n_o: usize,
    /// Tokens per polynomial.
    pub t_b: usize,
}

impl LayerShape {
    pub fn new(d_in: usize, d_out: usize) -> Self {
        LayerShape { d_in, d_out }
    }
}

impl std::fmt::Display for LayerShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.d_in, self.d_out)
    }
}

impl BlockLayout {
    /// Checks that the three factors are powers of two multiplying to `n`.
    pub fn validate(&self, n: usize) -> Result<(), FheError> {
        let ok = [self.n_i, self.n_o, self.t_b]
            .iter()
            .all(|v| *v >= 1 && v.is_power_of_two())
            && self
                .n_i
                .checked_mul(self.n_o)
                .and_then(|v| v.checked_mul(self.t_b))
                == Some(n);
        if ok {
            Ok(())
        } else {
            Err(FheError::InvalidLayout(format!(
                "n_i={} n_o={} t_b={} must be powers of two with n_i*n_o*t_b = {n}",
                self.n_i, self.n_o, self.t_b
            )))
        }
    }

    /// Coefficients between two tokens of one polynomial.
    pub fn token_stride(&self) -> usize {
        self.n_i * self.n_o
    }
}

/// How the server returns results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResultEncoding {
    /// One ciphertext per (token group, output block): no key needed.
    Keyless = 1,
    /// Products packed into full ciphertexts with the client's packing key.
    Packed = 2,
}

impl ResultEncoding {
    pub fn as_str(&self) -> &'static str {
        match self {
            ResultEncoding::Keyless => "keyless",
            ResultEncoding::Packed => "packed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "keyless" => Some(ResultEncoding::Keyless),
            "packed" => Some(ResultEncoding::Packed),
            _ => None,
        }
    }
}

impl std::fmt::Display for ResultEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
