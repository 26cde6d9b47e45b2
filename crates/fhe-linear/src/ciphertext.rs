//! Encrypted batches (client -> server) and encrypted results (server -> client).

use crate::layout::LayerSpec;
use crate::wire::{self, Header, Limits, WireError};
use crate::FheError;

/// A batch of `tokens` activation rows encrypted as seeded GLWE ciphertexts: the body
/// coefficients (rounded to `input_bits`) and one seed from which the masks are regenerated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedBatch {
    pub(crate) header: Header,
    /// For each (group, input block): N body coefficients, each below 2^input_bits.
    pub(crate) bodies: Vec<u64>,
}

/// The encrypted product of a batch: for each (group, output block) one GLWE ciphertext with its
/// full mask and only its useful body coefficients, rounded to `output_bits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedResult {
    pub(crate) header: Header,
    /// For each (group, output block): N mask coefficients, then the useful bodies.
    pub(crate) coefficients: Vec<u64>,
}

impl EncryptedBatch {
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn tokens(&self) -> usize {
        self.header.tokens
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        wire::encode(&self.header, &self.bodies)
    }

    /// Parses untrusted bytes (size-limited, every header field validated).
    pub fn from_bytes(bytes: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let (header, bodies) = wire::decode(bytes, false, limits)?;
        Ok(EncryptedBatch { header, bodies })
    }
}

impl EncryptedResult {
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn tokens(&self) -> usize {
        self.header.tokens
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        wire::encode(&self.header, &self.coefficients)
    }

    /// Parses untrusted bytes (size-limited, every header field validated).
    pub fn from_bytes(bytes: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let (header, coefficients) = wire::decode(bytes, true, limits)?;
        Ok(EncryptedResult {
            header,
            coefficients,
        })
    }
}

/// Checks that a parsed header belongs to `spec` (same parameters, shape, layout and precision).
pub(crate) fn check_header(spec: &LayerSpec, header: &Header, bits: u32) -> Result<(), FheError> {
    let mismatch = |what: String| Err(FheError::SpecMismatch(what));
    if header.param_set != spec.params.id {
        return mismatch(format!(
            "parameter set {} instead of {}",
            header.param_set.0, spec.params.id.0
        ));
    }
    if header.shape != spec.shape {
        return mismatch(format!("shape {} instead of {}", header.shape, spec.shape));
    }
    if header.layout != spec.layout {
        return mismatch(format!(
            "block layout {:?} instead of {:?}",
            header.layout, spec.layout
        ));
    }
    if header.encoding != spec.encoding {
        return mismatch(format!(
            "{} results instead of {}",
            header.encoding, spec.encoding
        ));
    }
    if header.activation_bits != spec.activation_bits {
        return mismatch(format!(
            "{}-bit activations instead of {}",
            header.activation_bits, spec.activation_bits
        ));
    }
    if header.bits != bits {
        return mismatch(format!(
            "{} bits per coefficient instead of {bits}",
            header.bits
        ));
    }
    Ok(())
}
