//! Encrypted linear layers on TFHE GLWE ciphertexts.
//!
//! A client holds activations `X` (`tokens x d_in`, signed 8-bit); a server holds weights `W`
//! (`d_out x d_in`, signed 8-bit) and a bias `b`. The client obtains `Y = X W^T + b` exactly; the
//! server only ever sees ciphertexts, the client never sees `W` or `b`.
//!
//! ```
//! use fhe_linear::{ClientKey, CompiledLayer, LayerShape, LayerSpec, HFHE_GLWE_2048_V1, simulate};
//!
//! let shape = LayerShape::new(100, 3);
//! let spec = LayerSpec::choose(&HFHE_GLWE_2048_V1, shape, 1).unwrap();
//! let (w, b) = (vec![-3i8; 300], vec![7i64, -8, 9]);
//! let x: Vec<i16> = (0..200).map(|i| i % 256 - 128).collect();
//!
//! let key = ClientKey::generate(&HFHE_GLWE_2048_V1);        // client
//! let layer = CompiledLayer::compile(spec, &w, &b).unwrap(); // server, once
//! let batch = key.encrypt(&spec, &x, 2).unwrap();           // client -> server
//! let result = layer.apply(&batch).unwrap();                 // server -> client
//! assert_eq!(key.decrypt(&spec, &result).unwrap(), simulate(shape, &x, 2, &w, &b));
//! ```
//!
//! # How (the keyless block encoding)
//!
//! Activations are placed as coefficients of input polynomials and weight blocks as coefficients
//! of clear polynomials, such that each product polynomial carries `n_o` outputs per token at
//! known positions ([`layout`]). The server multiplies the client's GLWE ciphertexts by its clear
//! weight polynomials (Fourier transforms precomputed once at [`CompiledLayer::compile`]), sums over
//! the input blocks and returns, for each product, its full mask and only the useful coefficients
//! of its body. No evaluation key is needed. Products are exact ([`fourier`]).
//!
//! # Packed results
//!
//! A second result encoding ([`ResultEncoding::Packed`], parameter set [`HFHE_GLWE_4096_V1`]) merges
//! the products of `n_i` output blocks into one full ciphertext with the client's packing key
//! ([`packing`]: automorphisms and key switching, `log2 n_i` levels), so that each output costs
//! about two coefficients of download instead of `n_i`. The client generates the key once
//! ([`PackingKey::generate`], 1.3 MB, seeded); the server prepares it once
//! ([`PreparedPackingKey::prepare`]) and calls [`CompiledLayer::apply_packed`]. The results are
//! exactly the keyless ones. [`plan`] chooses between the encodings and among block splits.
//!
//! ```
//! use fhe_linear::*;
//!
//! let shape = LayerShape::new(256, 100);
//! let layout = BlockLayout { n_i: 64, n_o: 64, t_b: 1 };
//! let spec = LayerSpec::packed(&HFHE_GLWE_4096_V1, shape, layout).unwrap();
//! let (w, b) = (vec![5i8; 256 * 100], vec![-3i64; 100]);
//! let x: Vec<i16> = (0..256).map(|i| i % 200 - 100).collect();
//!
//! let key = ClientKey::generate(&HFHE_GLWE_4096_V1);                  // client
//! let packing = PackingKey::generate(&key).unwrap().to_bytes();        // client -> server, once
//! let prepared = PreparedPackingKey::prepare(&PackingKey::from_bytes(&packing).unwrap());
//! let layer = CompiledLayer::compile(spec, &w, &b).unwrap();           // server, once
//! let batch = key.encrypt(&spec, &x, 1).unwrap();                      // client -> server
//! let (result, _, _) = layer.apply_packed(&batch, &prepared).unwrap(); // server -> client
//! assert_eq!(key.decrypt(&spec, &result).unwrap(), simulate(shape, &x, 1, &w, &b));
//! ```
//!
//! # Noise budget
//!
//! See [`noise`]: encryption noise, its growth through the product (every output collects the
//! noise of all N coefficients of every input polynomial, weighted by the whole weight block:
//! `sigma^2 * ||W_block||_F^2`, budgeted for the worst weights), and the rounding of the
//! modulus switches on upload and download. Wire precisions are the cheapest that keep the
//! failure probability below 2^-40 per output (Gaussian tail, 7.2 standard deviations) with half
//! a bit to spare; a test measures the noise and checks it against the model. Packed results add
//! the packing levels' doubling and key-switch noise to the same budget (see [`noise`]).
//!
//! Activations are 8 bits unless a spec is widened ([`LayerSpec::with_activation_bits`],
//! [`LayerSpec::choose_for`], up to 16 bits): the ciphertexts and the kernel stay the same, Delta
//! shrinks by one bit per activation bit, so the budget decides which layouts hold the width.
//!
//! # What each side learns
//!
//! The server sees shapes, token counts and timing, never values. The client learns `Y` and the
//! decrypted noise of each output, which is a linear function of its own encryption noise and
//! of `W` (no noise flooding): a small leak about `W` per query, on top of the fact that a client
//! choosing its inputs can solve for `W` from about `d_in` queries.

pub mod calibrate;
pub mod ciphertext;
pub mod client;
pub mod entities;
pub mod fourier;
pub mod kernel;
pub mod layout;
pub mod noise;
pub mod packing;
pub mod params;
pub mod plan;
pub mod primitives;
pub mod server;
pub mod simulate;
pub mod wire;

pub use calibrate::{calibrate, Calibration};
pub use ciphertext::{EncryptedBatch, EncryptedResult};
pub use client::ClientKey;
pub use entities::{BlockLayout, LayerShape, ResultEncoding};
pub use layout::LayerSpec;
pub use noise::NoiseBudget;
pub use packing::{PackingKey, PreparedPackingKey};
pub use params::{
    PackingParams, ParamSetId, ParameterSet, ACTIVATION_BITS, DEFAULT_ACTIVATION_BITS,
    HFHE_GLWE_2048_V1, HFHE_GLWE_4096_V1, PARAMETER_SETS,
};
pub use plan::{Plan, Planner, Preference};
pub use server::CompiledLayer;
pub use simulate::simulate;
pub use wire::{Limits, PayloadKind, WireError};

/// Errors of the encrypted linear layer API.
#[derive(Debug, thiserror::Error)]
pub enum FheError {
    #[error("invalid layer shape: {0}")]
    InvalidShape(String),
    #[error("invalid block layout: {0}")]
    InvalidLayout(String),
    #[error("data does not match the layer: {0}")]
    DataShape(String),
    #[error("ciphertext does not belong to this layer: {0}")]
    SpecMismatch(String),
    #[error("row {row}: bias {bias} (with the row's weights) can overflow the plaintext window")]
    BiasOutOfRange { row: usize, bias: i64 },
    #[error("activation {value} at index {index} is outside the layer's {bits}-bit range")]
    ActivationOutOfRange { index: usize, value: i32, bits: u32 },
    #[error("packed results need the client's packing key")]
    KeyRequired,
    #[error("measuring this machine's unit costs failed: {0}")]
    Calibration(String),
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl FheError {
    /// A stable, machine-readable error code.
    pub fn code(&self) -> &'static str {
        match self {
            FheError::InvalidShape(_) => "invalid_shape",
            FheError::InvalidLayout(_) => "invalid_layout",
            FheError::DataShape(_) => "data_shape_mismatch",
            FheError::SpecMismatch(_) => "layer_mismatch",
            FheError::BiasOutOfRange { .. } => "bias_out_of_range",
            FheError::ActivationOutOfRange { .. } => "activation_out_of_range",
            FheError::KeyRequired => "key_required",
            FheError::Calibration(_) => "calibration_failed",
            FheError::Wire(e) => e.code(),
        }
    }
}
