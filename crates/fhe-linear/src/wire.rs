//! The wire format of encrypted batches and results: a fixed, versioned header followed by
//! bit-packed coefficients.
//!
//! ```text
//! offset size field
//!      0    4 magic "HFHE"
//!      4    2 format version (2; version 1 drew masks differently and is refused)
//!      6    1 kind: 1 = encrypted batch (client -> server), 2 = encrypted result
//!      7    1 result encoding: 1 = keyless block result, 2 = packed result; a batch names the
//!             encoding it is prepared for (0 also means keyless)
//!      8    2 parameter set id
//!     10    1 bits per coefficient
//!     11    1 activation bits of the layer (9..=16), or 0 for 8
//!     12    4 d_in
//!     16    4 d_out
//!     20    4 tokens in the batch
//!     24    2 n_i      (block layout, see `layout`)
//!     26    2 n_o
//!     28    2 t_b
//!     30    2 reserved, 0
//!     32   16 mask seed (batch) or zeros (result)
//!     48    8 payload length in bytes
//!     56    . payload: little-endian bit stream, `bits` bits per coefficient, LSB first
//! ```
//!
//! A batch's payload holds, for each token group g and input block b (in that order), the N
//! body coefficients of one seeded GLWE ciphertext; its masks are regenerated from the seed.
//! A keyless result's payload holds, for each token group g and output block o, the N mask
//! coefficients of one GLWE ciphertext followed by its useful body coefficients
//! (`tokens_in_group * rows_in_block` of them, token-major). A packed result's payload holds,
//! for each pack, the N mask coefficients of one GLWE ciphertext followed by the body
//! coefficients of the outputs it carries ([`crate::LayerSpec::packed_outputs`]).
//!
//! Decoding never trusts the bytes: every field is checked, the payload length must equal the
//! one the header implies, and the total size is bounded *before* anything is allocated.

use crate::entities::{BlockLayout, LayerShape, ResultEncoding};
use crate::layout::LayerSpec;
use crate::params::{ParamSetId, ParameterSet};
pub use crate::primitives::{pack_bits, unpack_bits};

pub const MAGIC: [u8; 4] = *b"HFHE";
/// Version 2: masks from the bulk AES-128-CTR stream ([`crate::primitives`]).
pub const FORMAT_VERSION: u16 = 2;
pub const HEADER_LEN: usize = 56;

const KIND_BATCH: u8 = 1;
const KIND_RESULT: u8 = 2;

/// What a payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// Encrypted activations, client to server.
    Batch,
    /// Encrypted results, server to client.
    Result,
}

/// Errors from decoding untrusted bytes. Each variant has a stable code (see [`WireError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("payload truncated: {0} bytes is shorter than its header says")]
    Truncated(usize),
    #[error("payload has {0} bytes after its declared end")]
    TrailingBytes(usize),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("not an encrypted payload (bad magic)")]
    BadMagic,
    #[error(
        "unsupported format version {found}: this build reads version {reads} only (client and \
         server must run releases of the same format)"
    )]
    UnsupportedVersion { found: u16, reads: u16 },
    #[error("expected a {expected}, got another kind of payload")]
    WrongKind { expected: &'static str },
    #[error("unknown parameter set id {0}")]
    UnknownParameterSet(u16),
    #[error("unsupported result encoding {0}")]
    UnknownResultEncoding(u8),
    #[error("invalid header: {0}")]
    InvalidHeader(String),
}

impl WireError {
    /// A stable, machine-readable error code.
    pub fn code(&self) -> &'static str {
        match self {
            WireError::Truncated(_) => "ciphertext_truncated",
            WireError::TrailingBytes(_) => "ciphertext_trailing_bytes",
            WireError::TooLarge { .. } => "ciphertext_too_large",
            WireError::BadMagic => "ciphertext_bad_magic",
            WireError::UnsupportedVersion { .. } => "ciphertext_unsupported_version",
            WireError::WrongKind { .. } => "ciphertext_wrong_kind",
            WireError::UnknownParameterSet(_) => "ciphertext_unknown_parameter_set",
            WireError::UnknownResultEncoding(_) => "ciphertext_unknown_result_encoding",
            WireError::InvalidHeader(_) => "ciphertext_invalid_header",
        }
    }
}

/// Bounds applied while decoding untrusted bytes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted payload, header included.
    pub max_bytes: u64,
    /// Largest accepted token count per batch.
    pub max_tokens: usize,
    /// Largest accepted output width.
    pub max_d_out: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 256 << 20,
            max_tokens: 4096,
            max_d_out: 1 << 17,
        }
    }
}

/// The parsed header shared by batches and results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub param_set: ParamSetId,
    pub shape: LayerShape,
    pub layout: BlockLayout,
    pub tokens: usize,
    pub bits: u32,
    pub seed: u128,
    pub kind: PayloadKind,
    /// The result encoding (of a result), or the one a batch was encrypted for.
    pub encoding: ResultEncoding,
    /// The activation width of the layer the payload belongs to.
    pub activation_bits: u32,
}

impl Header {
    /// Header of a batch or result for `spec`.
    pub(crate) fn for_spec(spec: &LayerSpec, kind: PayloadKind, tokens: usize, bits: u32) -> Self {
        Header {
            param_set: spec.params.id,
            shape: spec.shape,
            layout: spec.layout,
            tokens,
            bits,
            seed: 0,
            kind,
            encoding: spec.encoding,
            activation_bits: spec.activation_bits,
        }
    }

    /// Payload coefficients the header implies.
    fn coefficient_count(&self, params: &'static ParameterSet) -> Result<usize, WireError> {
        let spec = LayerSpec {
            params,
            shape: self.shape,
            layout: self.layout,
            input_bits: self.bits,
            output_bits: self.bits,
            encoding: self.encoding,
            activation_bits: self.activation_bits,
        };
        let n = params.polynomial_size;
        Ok(match self.kind {
            PayloadKind::Batch => spec.token_groups(self.tokens) * spec.input_blocks() * n,
            PayloadKind::Result => spec.result_coefficients(self.tokens),
        })
    }

    fn write(&self, payload_len: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.push(match self.kind {
            PayloadKind::Batch => KIND_BATCH,
            PayloadKind::Result => KIND_RESULT,
        });
        // Keyless batches keep the 0 of the first clients.
        out.push(match (self.kind, self.encoding) {
            (PayloadKind::Batch, ResultEncoding::Keyless) => 0,
            (_, e) => e as u8,
        });
        out.extend_from_slice(&self.param_set.0.to_le_bytes());
        out.push(self.bits as u8);
        // 8-bit layers keep the 0 of the first clients.
        out.push(match self.activation_bits {
            crate::DEFAULT_ACTIVATION_BITS => 0,
            a => a as u8,
        });
        for v in [self.shape.d_in, self.shape.d_out, self.tokens] {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for v in [self.layout.n_i, self.layout.n_o, self.layout.t_b, 0] {
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&(payload_len as u64).to_le_bytes());
    }

    /// Parses and validates a header; returns it with the payload slice.
    fn read<'a>(
        bytes: &'a [u8],
        expect_result: bool,
        limits: &Limits,
    ) -> Result<(Header, &'a [u8]), WireError> {
        CIPHERTEXT_FORMAT.read_preamble(bytes, limits.max_bytes)?;
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let (kind, encoding) = (bytes[6], bytes[7]);
        let (kind, encoding) = match (expect_result, kind, encoding) {
            (false, KIND_BATCH, 0 | 1) => (PayloadKind::Batch, ResultEncoding::Keyless),
            (false, KIND_BATCH, 2) => (PayloadKind::Batch, ResultEncoding::Packed),
            (true, KIND_RESULT, 1) => (PayloadKind::Result, ResultEncoding::Keyless),
            (true, KIND_RESULT, 2) => (PayloadKind::Result, ResultEncoding::Packed),
            (false, KIND_BATCH, e) | (true, KIND_RESULT, e) => {
                return Err(WireError::UnknownResultEncoding(e))
            }
            (false, _, _) => {
                return Err(WireError::WrongKind {
                    expected: "encrypted batch",
                })
            }
            (true, _, _) => {
                return Err(WireError::WrongKind {
                    expected: "encrypted result",
                })
            }
        };
        let param_id = u16_at(8);
        let params = ParameterSet::by_id(ParamSetId(param_id))
            .ok_or(WireError::UnknownParameterSet(param_id))?;
        let bits = bytes[10] as u32;
        if !(1..=64).contains(&bits) {
            return Err(WireError::InvalidHeader(format!(
                "{bits} bits per coefficient"
            )));
        }
        let activation_bits = match bytes[11] as u32 {
            0 => crate::DEFAULT_ACTIVATION_BITS,
            a if a != crate::DEFAULT_ACTIVATION_BITS && crate::ACTIVATION_BITS.contains(&a) => a,
            a => {
                return Err(WireError::InvalidHeader(format!(
                    "{a}-bit activations (0 for 8, or {}..={})",
                    crate::DEFAULT_ACTIVATION_BITS + 1,
                    crate::ACTIVATION_BITS.end()
                )))
            }
        };
        if u16_at(30) != 0 {
            return Err(WireError::InvalidHeader(
                "reserved fields must be zero".into(),
            ));
        }
        let shape = LayerShape::new(u32_at(12) as usize, u32_at(16) as usize);
        if shape.d_in == 0
            || shape.d_in > params.max_d_in
            || shape.d_out == 0
            || shape.d_out > limits.max_d_out
        {
            return Err(WireError::InvalidHeader(format!(
                "layer shape {shape} outside 1..={} x 1..={}",
                params.max_d_in, limits.max_d_out
            )));
        }
        let tokens = u32_at(20) as usize;
        if tokens == 0 || tokens > limits.max_tokens {
            return Err(WireError::InvalidHeader(format!(
                "{tokens} tokens outside 1..={}",
                limits.max_tokens
            )));
        }
        let layout = BlockLayout {
            n_i: u16_at(24) as usize,
            n_o: u16_at(26) as usize,
            t_b: u16_at(28) as usize,
        };
        layout
            .validate(params.polynomial_size)
            .map_err(|e| WireError::InvalidHeader(e.to_string()))?;
        if encoding == ResultEncoding::Packed {
            let depth = params.packing.map_or(0, |p| p.max_depth);
            if params.packing.is_none() || layout.n_i > 1 << depth {
                return Err(WireError::InvalidHeader(format!(
                    "packed results with n_i={} under parameter set {}",
                    layout.n_i, params.name
                )));
            }
        }
        let seed = u128::from_le_bytes(bytes[32..48].try_into().unwrap());
        if expect_result && seed != 0 {
            return Err(WireError::InvalidHeader("result with a seed".into()));
        }
        let payload_len = u64::from_le_bytes(bytes[48..56].try_into().unwrap());
        let header = Header {
            param_set: params.id,
            shape,
            layout,
            tokens,
            bits,
            seed,
            kind,
            encoding,
            activation_bits,
        };
        let expected = (header.coefficient_count(params)? as u64 * bits as u64).div_ceil(8);
        if payload_len != expected {
            return Err(WireError::InvalidHeader(format!(
                "payload length {payload_len} does not match the {expected} bytes its shape needs"
            )));
        }
        check_length(bytes.len(), HEADER_LEN as u64 + payload_len)?;
        Ok((header, &bytes[HEADER_LEN..]))
    }
}

/// How one of this crate's byte formats begins: every one (batches and results, packing keys,
/// exported secret keys) starts with a 4-byte magic and a little-endian u16 version, followed by
/// a fixed-size header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Format {
    pub magic: [u8; 4],
    pub version: u16,
    /// Bytes of the fixed header, magic and version included.
    pub header_len: usize,
}

/// Batches and results (this module).
pub(crate) const CIPHERTEXT_FORMAT: Format = Format {
    magic: MAGIC,
    version: FORMAT_VERSION,
    header_len: HEADER_LEN,
};

impl Format {
    /// Checks what the formats share, in this order, before anything is read or allocated: the
    /// size limit, the magic (an input shorter than it is truncated), the header's length, the
    /// version. The caller reads the rest of its header and then calls [`check_length`].
    pub(crate) fn read_preamble(&self, bytes: &[u8], max_bytes: u64) -> Result<(), WireError> {
        if bytes.len() as u64 > max_bytes {
            return Err(WireError::TooLarge {
                size: bytes.len() as u64,
                limit: max_bytes,
            });
        }
        if bytes.len() < 4 {
            return Err(WireError::Truncated(bytes.len()));
        }
        if bytes[0..4] != self.magic {
            return Err(WireError::BadMagic);
        }
        if bytes.len() < self.header_len {
            return Err(WireError::Truncated(bytes.len()));
        }
        let found = u16::from_le_bytes([bytes[4], bytes[5]]);
        if found != self.version {
            return Err(WireError::UnsupportedVersion {
                found,
                reads: self.version,
            });
        }
        Ok(())
    }
}

/// The input must be exactly `expected` bytes long (as its header implies).
pub(crate) fn check_length(len: usize, expected: u64) -> Result<(), WireError> {
    match (len as u64).cmp(&expected) {
        std::cmp::Ordering::Less => Err(WireError::Truncated(len)),
        std::cmp::Ordering::Greater => Err(WireError::TrailingBytes(len - expected as usize)),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Serialises a header and its coefficients.
pub(crate) fn encode(header: &Header, coefficients: &[u64]) -> Vec<u8> {
    let payload_len = (coefficients.len() * header.bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    header.write(payload_len, &mut out);
    pack_bits(coefficients, header.bits, &mut out);
    out
}

/// Validates an encrypted batch's header and length without unpacking its payload: what a
/// gateway needs to meter a request (token count, shape) without touching the ciphertext.
pub fn read_batch_header(bytes: &[u8], limits: &Limits) -> Result<Header, WireError> {
    Header::read(bytes, false, limits).map(|(header, _)| header)
}

/// Parses a header and unpacks its coefficients.
pub(crate) fn decode(
    bytes: &[u8],
    expect_result: bool,
    limits: &Limits,
) -> Result<(Header, Vec<u64>), WireError> {
    let (header, payload) = Header::read(bytes, expect_result, limits)?;
    let params = ParameterSet::by_id(header.param_set).expect("checked by Header::read");
    let count = header.coefficient_count(params)?;
    Ok((header, unpack_bits(payload, header.bits, count)))
}
