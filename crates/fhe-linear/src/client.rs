//! The client side: the secret key, encryption of activation batches, decryption of results.

use rayon::prelude::*;
use tfhe::core_crypto::prelude::*;

use crate::ciphertext::{check_header, EncryptedBatch, EncryptedResult};
use crate::entities::ResultEncoding;
use crate::fourier::Fourier;
use crate::layout::LayerSpec;
use crate::params::{ParamSetId, ParameterSet};
use crate::primitives::{
    expand_masks, negacyclic_binary_at, pack_bits, reversed_key_masks, round_to_bits, unpack_bits,
    NoiseSource,
};
use crate::wire::{check_length, Format, Header, PayloadKind, WireError};
use crate::FheError;

/// Exported secret keys: magic "HFSK", version 1, parameter set id (u16), then the key's bits.
const SECRET_FORMAT: Format = Format {
    magic: *b"HFSK",
    version: 1,
    header_len: 8,
};

/// A client's binary GLWE secret key. It never leaves the client unless exported explicitly
/// with [`ClientKey::export_secret`]; `Debug` does not print it.
pub struct ClientKey {
    params: &'static ParameterSet,
    /// Key coefficients, each 0 or 1 (k = 1: one polynomial).
    key: Vec<u64>,
    /// The key in the Fourier domain (planar), for exact products mask * key.
    key_fourier: Vec<f64>,
    /// The key reversed as bit masks, for direct products at a few coefficients.
    key_reversed: Vec<u64>,
}

/// Keyless results read at most this many coefficients of a ciphertext's `mask * key` directly
/// (N masked additions each); more, and one FFT product of the whole polynomial is cheaper. At 64
/// (a QKV token's n_o) decrypting took 0.6x the time of the FFT path on an AVX-512 machine.
const DIRECT_PRODUCT_MAX_COEFFICIENTS: usize = 64;

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("params", &self.params.name)
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// Generates a fresh binary secret key from the operating system's entropy.
    pub fn generate(params: &'static ParameterSet) -> Self {
        let mut seeder = new_seeder();
        let mut gen = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
        let key: GlweSecretKeyOwned<u64> = allocate_and_generate_new_binary_glwe_secret_key(
            GlweDimension(params.glwe_dimension),
            PolynomialSize(params.polynomial_size),
            &mut gen,
        );
        Self::from_coefficients(params, key.into_container())
    }

    fn from_coefficients(params: &'static ParameterSet, key: Vec<u64>) -> Self {
        let fourier = Fourier::get(params.polynomial_size);
        let mut key_fourier = vec![0.0; fourier.planar_len()];
        fourier.forward(|j| key[j] as f64, &mut key_fourier, &mut fourier.scratch());
        ClientKey {
            params,
            key_reversed: reversed_key_masks(&key),
            key,
            key_fourier,
        }
    }

    pub fn params(&self) -> &'static ParameterSet {
        self.params
    }

    /// The key's coefficients (0 or 1).
    pub(crate) fn coefficients(&self) -> &[u64] {
        &self.key
    }

    /// Exports the secret key for persistence on the client. Whoever holds these bytes can decrypt
    /// everything this key encrypted: store them like a password.
    pub fn export_secret(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.key.len() / 8);
        out.extend_from_slice(&SECRET_FORMAT.magic);
        out.extend_from_slice(&SECRET_FORMAT.version.to_le_bytes());
        out.extend_from_slice(&self.params.id.0.to_le_bytes());
        pack_bits(&self.key, 1, &mut out);
        out
    }

    /// Reads a key written by [`ClientKey::export_secret`].
    pub fn import_secret(bytes: &[u8]) -> Result<Self, WireError> {
        // No size limit of its own: the exact length follows from the parameter set, and is
        // checked before anything is allocated.
        SECRET_FORMAT.read_preamble(bytes, u64::MAX)?;
        let id = u16::from_le_bytes([bytes[6], bytes[7]]);
        let params =
            ParameterSet::by_id(ParamSetId(id)).ok_or(WireError::UnknownParameterSet(id))?;
        let len = params.glwe_dimension * params.polynomial_size;
        check_length(bytes.len(), 8 + len.div_ceil(8) as u64)?;
        let key = unpack_bits(&bytes[8..], 1, len);
        Ok(Self::from_coefficients(params, key))
    }

    /// `count` seeded GLWE ciphertexts of size N under this key, in parallel: masks from one fresh
    /// public seed (returned), bodies `a*s + e` with Gaussian `e` from a private CSPRNG, each then
    /// finished by `finish(index, body)` (add the message, round). Batches and packing keys alike.
    pub(crate) fn seeded_encryptions(
        &self,
        count: usize,
        finish: impl Fn(usize, &mut [u64]) + Sync,
    ) -> (u128, Vec<u64>) {
        let n = self.params.polynomial_size;
        // The public seed of the masks; the noise generators' secret keys, one per ciphertext.
        let seed = NoiseSource::fresh_seed();
        let mut private = NoiseSource::from_entropy();
        let masks = expand_masks(seed, count, n);
        let noise_keys: Vec<u128> = (0..count).map(|_| private.next_u128()).collect();
        let std = self.params.noise_std_relative;
        let fourier = Fourier::get(n);
        let mut bodies = vec![0u64; count * n];
        bodies.par_chunks_mut(n).enumerate().for_each_init(
            || fourier.scratch(),
            |scratch, (c, body)| {
                fourier.mul_u64_by_small(
                    &masks[c * n..(c + 1) * n],
                    &self.key_fourier,
                    body,
                    scratch,
                );
                NoiseSource::new(noise_keys[c]).add_gaussian(body, std);
                finish(c, body);
            },
        );
        (seed, bodies)
    }

    /// Encrypts `tokens` rows of `spec.shape.d_in` activations (row-major) for the layer `spec`.
    ///
    /// Every input polynomial becomes one GLWE ciphertext `(a, b = a*s + e + Delta*m)`: `a` comes
    /// from a public seed (only the seed travels), `e` is Gaussian noise of the parameter set's
    /// standard deviation drawn from a private CSPRNG, and `b` is rounded to `spec.input_bits`.
    pub fn encrypt(
        &self,
        spec: &LayerSpec,
        x: &[i16],
        tokens: usize,
    ) -> Result<EncryptedBatch, FheError> {
        self.check_params(spec)?;
        let d_in = spec.shape.d_in;
        if tokens == 0 || x.len() != tokens * d_in {
            return Err(FheError::DataShape(format!(
                "{} activations for {tokens} tokens of width {d_in}",
                x.len()
            )));
        }
        check_activations(spec, x)?;
        let blocks = spec.input_blocks();
        let count = spec.token_groups(tokens) * blocks;
        let delta_log2 = spec.delta_log2();
        let (seed, bodies) = self.seeded_encryptions(count, |c, body| {
            let (g, b) = (c / blocks, c % blocks);
            spec.for_each_activation(x, tokens, g, b, |k, v| {
                body[k] = body[k].wrapping_add((v as i64 as u64) << delta_log2);
            });
            for v in body.iter_mut() {
                *v = round_to_bits(*v, spec.input_bits);
            }
        });
        let mut header = Header::for_spec(spec, PayloadKind::Batch, tokens, spec.input_bits);
        header.seed = seed;
        Ok(EncryptedBatch { header, bodies })
    }

    /// Decrypts and decodes a result: `tokens x d_out` values, row-major.
    pub fn decrypt(
        &self,
        spec: &LayerSpec,
        result: &EncryptedResult,
    ) -> Result<Vec<i64>, FheError> {
        Ok(self.decrypt_with_noise(spec, result)?.0)
    }

    /// Like [`ClientKey::decrypt`], also returning each output's decrypted noise (the distance, in
    /// units of the 64-bit torus, between the phase and the nearest multiple of Delta).
    pub fn decrypt_with_noise(
        &self,
        spec: &LayerSpec,
        result: &EncryptedResult,
    ) -> Result<(Vec<i64>, Vec<i64>), FheError> {
        self.check_params(spec)?;
        check_header(spec, &result.header, spec.output_bits)?;
        if spec.encoding == ResultEncoding::Packed {
            return Ok(self.decrypt_packed(spec, result));
        }
        let tokens = result.tokens();
        let (n, d_out) = (spec.polynomial_size(), spec.shape.d_out);
        let (n_i, n_o, t_b, stride) = (
            spec.layout.n_i,
            spec.layout.n_o,
            spec.layout.t_b,
            spec.layout.token_stride(),
        );
        let shift = 64 - spec.output_bits;
        let delta_log2 = spec.output_delta_log2();
        let half_delta = 1u64 << (delta_log2 - 1);
        let blocks = spec.output_blocks();
        // Offsets of each ciphertext (g, o) in the coefficient stream.
        let mut offsets = Vec::with_capacity(spec.token_groups(tokens) * blocks);
        let mut at = 0;
        for g in 0..spec.token_groups(tokens) {
            for o in 0..blocks {
                offsets.push((g, o, at));
                at += n + spec.result_bodies(tokens, g, o);
            }
        }
        let fourier = Fourier::get(n);
        let decoded: Vec<Vec<(usize, i64, i64)>> = offsets
            .par_iter()
            .map_init(
                || fourier.scratch(),
                |scratch, &(g, o, at)| {
                    let mask: Vec<u64> = result.coefficients[at..at + n]
                        .iter()
                        .map(|v| v << shift)
                        .collect();
                    let rows = spec.rows_in_block(o);
                    let used = spec.tokens_in_group(tokens, g);
                    let mut mask_key = vec![0u64; n];
                    if used * rows <= DIRECT_PRODUCT_MAX_COEFFICIENTS {
                        let positions =
                            (0..used).flat_map(|t| (0..rows).map(move |r| t * stride + r * n_i));
                        negacyclic_binary_at(&mask, &self.key_reversed, positions, |k, v| {
                            mask_key[k] = v
                        });
                    } else {
                        fourier.mul_u64_by_small(&mask, &self.key_fourier, &mut mask_key, scratch);
                    }
                    let bodies = &result.coefficients[at + n..];
                    let mut out = Vec::with_capacity(rows * used);
                    for t in 0..used {
                        for r in 0..rows {
                            let body = bodies[t * rows + r] << shift;
                            let phase = body.wrapping_sub(mask_key[t * stride + r * n_i]);
                            let y = (phase.wrapping_add(half_delta) as i64) >> delta_log2;
                            let noise = phase.wrapping_sub((y as u64) << delta_log2) as i64;
                            out.push(((g * t_b + t) * d_out + o * n_o + r, y, noise));
                        }
                    }
                    out
                },
            )
            .collect();
        let mut values = vec![0i64; tokens * d_out];
        let mut noise = vec![0i64; tokens * d_out];
        for (i, y, e) in decoded.into_iter().flatten() {
            values[i] = y;
            noise[i] = e;
        }
        Ok((values, noise))
    }

    fn decrypt_packed(&self, spec: &LayerSpec, result: &EncryptedResult) -> (Vec<i64>, Vec<i64>) {
        let tokens = result.tokens();
        let n = spec.polynomial_size();
        let fourier = Fourier::get(n);
        let packs = spec.packed_outputs(tokens);
        let mut offsets = Vec::with_capacity(packs.len());
        let mut at = 0;
        for outputs in &packs {
            offsets.push(at);
            at += n + outputs.len();
        }
        let delta_log2 = spec.output_delta_log2();
        let half_delta = 1u64 << (delta_log2 - 1);
        let decoded: Vec<Vec<(usize, i64, i64)>> = packs
            .par_iter()
            .zip(offsets)
            .map_init(
                || fourier.scratch(),
                |scratch, (outputs, at)| {
                    let coefficients = &result.coefficients[at..];
                    let mask: Vec<u64> = coefficients[..n]
                        .iter()
                        .map(|v| v << (64 - spec.output_bits))
                        .collect();
                    let mut mask_key = vec![0u64; n];
                    fourier.mul_u64_by_small(&mask, &self.key_fourier, &mut mask_key, scratch);
                    outputs
                        .iter()
                        .zip(&coefficients[n..])
                        .map(|((i, c), body)| {
                            let phase =
                                (body << (64 - spec.output_bits)).wrapping_sub(mask_key[*c]);
                            let y = (phase.wrapping_add(half_delta) as i64) >> delta_log2;
                            (*i, y, phase.wrapping_sub((y as u64) << delta_log2) as i64)
                        })
                        .collect()
                },
            )
            .collect();
        let mut values = vec![0i64; tokens * spec.shape.d_out];
        let mut noise = vec![0i64; tokens * spec.shape.d_out];
        for (i, y, e) in decoded.into_iter().flatten() {
            values[i] = y;
            noise[i] = e;
        }
        (values, noise)
    }

    /// Diagnostic: the noise of every coefficient of one of this key's encrypted batches
    /// (phase minus encoded activations, in units of the 64-bit torus, rounding included).
    pub fn input_noise(
        &self,
        spec: &LayerSpec,
        batch: &EncryptedBatch,
        x: &[i16],
    ) -> Result<Vec<i64>, FheError> {
        self.check_params(spec)?;
        check_header(spec, &batch.header, spec.input_bits)?;
        let tokens = batch.tokens();
        let (n, d_in) = (spec.polynomial_size(), spec.shape.d_in);
        if x.len() != tokens * d_in {
            return Err(FheError::DataShape(format!(
                "{} activations for {tokens} tokens",
                x.len()
            )));
        }
        let blocks = spec.input_blocks();
        let count = spec.token_groups(tokens) * blocks;
        let masks = expand_masks(batch.header.seed, count, n);
        let fourier = Fourier::get(n);
        let mut scratch = fourier.scratch();
        let mut noise = vec![0i64; count * n];
        let mut mask_key = vec![0u64; n];
        for c in 0..count {
            let (g, b) = (c / blocks, c % blocks);
            fourier.mul_u64_by_small(
                &masks[c * n..(c + 1) * n],
                &self.key_fourier,
                &mut mask_key,
                &mut scratch,
            );
            let mut phase: Vec<u64> = (0..n)
                .map(|k| {
                    (batch.bodies[c * n + k] << (64 - spec.input_bits)).wrapping_sub(mask_key[k])
                })
                .collect();
            spec.for_each_activation(x, tokens, g, b, |k, v| {
                phase[k] = phase[k].wrapping_sub((v as i64 as u64) << spec.delta_log2());
            });
            for (dst, p) in noise[c * n..(c + 1) * n].iter_mut().zip(phase) {
                *dst = p as i64;
            }
        }
        Ok(noise)
    }

    /// Checks that the key belongs to the spec's parameter set.
    fn check_params(&self, spec: &LayerSpec) -> Result<(), FheError> {
        if spec.params.id != self.params.id {
            return Err(FheError::SpecMismatch(format!(
                "key for parameter set {} used with {}",
                self.params.name, spec.params.name
            )));
        }
        Ok(())
    }
}

/// Checks that every activation fits the spec's width: a wider value would wrap into the
/// neighbouring outputs' share of the plaintext window and decode to a wrong product.
fn check_activations(spec: &LayerSpec, x: &[i16]) -> Result<(), FheError> {
    let half = 1i32 << (spec.activation_bits - 1);
    match x.iter().position(|v| !(-half..half).contains(&(*v as i32))) {
        None => Ok(()),
        Some(index) => Err(FheError::ActivationOutOfRange {
            index,
            value: x[index] as i32,
            bits: spec.activation_bits,
        }),
    }
}
