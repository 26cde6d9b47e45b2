//! The server side: a layer compiled once from clear weights, applied to encrypted batches.

use rayon::prelude::*;

use crate::ciphertext::{check_header, EncryptedBatch, EncryptedResult};
use crate::entities::ResultEncoding;
use crate::fourier::{join_u64, Fourier};
use crate::kernel::{chunk_products, load_chunk, store_chunk, Dims, STREAMS, UNIT};
use crate::layout::LayerSpec;
use crate::packing::{Glwe, PreparedPackingKey};
use crate::primitives::{expand_masks, round_to_bits};
use crate::wire::{Header, PayloadKind};
use crate::FheError;

/// A protected layer ready to serve: the Fourier transforms of its weight polynomials (8 bytes per
/// weight and token per polynomial) and its bias scaled by Delta.
pub struct CompiledLayer {
    spec: LayerSpec,
    /// Spectra of the weight polynomials (one per output block and input block, N f64 each),
    /// chunk-major (see [`crate::kernel`]).
    weights: Vec<f64>,
    /// Bias of each output row, times the input's Delta, as a torus value.
    bias: Vec<u64>,
    /// Bias of each output row, times the output's Delta (added after packing).
    packed_bias: Vec<u64>,
}

impl std::fmt::Debug for CompiledLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledLayer")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Checks that no row can leave the plaintext window for any `a`-bit input:
/// `sum_j |w_rj| * 2^(a-1) + |b_r| < 2^(P-1)`.
pub fn check_window(
    params: &crate::ParameterSet,
    d_in: usize,
    activation_bits: u32,
    w: &[i8],
    bias: &[i64],
) -> Result<(), FheError> {
    let window = 1i128 << (params.plaintext_bits(d_in, activation_bits) - 1);
    let a_max = 1i128 << (activation_bits - 1);
    for (r, (row, b)) in w.chunks_exact(d_in).zip(bias).enumerate() {
        let reach =
            row.iter().map(|v| (*v as i128).abs()).sum::<i128>() * a_max + (*b as i128).abs();
        if reach >= window {
            return Err(FheError::BiasOutOfRange { row: r, bias: *b });
        }
    }
    Ok(())
}

impl CompiledLayer {
    /// Precomputes everything that depends only on the weights `w` (`d_out x d_in`, row-major)
    /// and the bias `b` (`d_out`). Fails when a row could overflow the plaintext window:
    /// `sum_j |w_rj| * 2^(a-1) + |b_r|` must stay below `2^(P-1)`.
    pub fn compile(spec: LayerSpec, w: &[i8], bias: &[i64]) -> Result<Self, FheError> {
        let (d_in, d_out) = (spec.shape.d_in, spec.shape.d_out);
        if w.len() != d_in * d_out || bias.len() != d_out {
            return Err(FheError::DataShape(format!(
                "{} weights and {} biases for a {} layer",
                w.len(),
                bias.len(),
                spec.shape
            )));
        }
        check_window(spec.params, d_in, spec.activation_bits, w, bias)?;
        let n = spec.polynomial_size();
        let (n_i, n_o) = (spec.layout.n_i, spec.layout.n_o);
        let (in_blocks, out_blocks) = (spec.input_blocks(), spec.output_blocks());
        let fourier = Fourier::get(n);
        // Spectra of every weight polynomial, planar, [o][b].
        let mut planar = vec![0.0; out_blocks * in_blocks * n];
        planar.par_chunks_mut(n).enumerate().for_each_init(
            || (fourier.scratch(), vec![0.0f64; n]),
            |(scratch, poly), (ob, spectrum)| {
                let (o, b) = (ob / in_blocks, ob % in_blocks);
                poly.fill(0.0);
                for r in 0..spec.rows_in_block(o) {
                    let row = &w[(o * n_o + r) * d_in..][..d_in];
                    for j in 0..n_i.min(d_in - b * n_i) {
                        let v = row[b * n_i + j] as f64;
                        // X^(r n_i - j); a negative exponent wraps to N + (r n_i - j), negated.
                        if r * n_i >= j {
                            poly[r * n_i - j] = v;
                        } else {
                            poly[n + r * n_i - j] = -v;
                        }
                    }
                }
                fourier.forward(|k| poly[k], spectrum, scratch);
            },
        );
        // Chunk-major, [chunk][o][b] (see `kernel`).
        let per_chunk = out_blocks * in_blocks * UNIT;
        let mut weights = vec![0.0; n / UNIT * per_chunk];
        weights
            .par_chunks_mut(per_chunk)
            .enumerate()
            .for_each(|(k, dst)| {
                for (ob, unit) in dst.chunks_exact_mut(UNIT).enumerate() {
                    load_chunk(&planar[ob * n..][..n], k, unit);
                }
            });
        let delta_log2 = spec.delta_log2();
        let packed_bias = bias
            .iter()
            .map(|b| (*b as u64) << spec.output_delta_log2())
            .collect();
        let bias = bias.iter().map(|b| (*b as u64) << delta_log2).collect();
        Ok(CompiledLayer {
            spec,
            weights,
            bias,
            packed_bias,
        })
    }

    pub fn spec(&self) -> &LayerSpec {
        &self.spec
    }

    /// Bytes held by the weight transforms.
    pub fn weight_memory_bytes(&self) -> usize {
        self.weights.len() * std::mem::size_of::<f64>()
    }

    /// Steps 1 and 2 of an apply: the Fourier-domain sums of every (group, output block).
    fn fourier_sums(&self, batch: &EncryptedBatch) -> Result<Sums, FheError> {
        let spec = &self.spec;
        check_header(spec, &batch.header, spec.input_bits)?;
        let tokens = batch.tokens();
        let n = spec.polynomial_size();
        let (in_blocks, out_blocks) = (spec.input_blocks(), spec.output_blocks());
        let groups = spec.token_groups(tokens);
        let count = groups * in_blocks;
        let fourier = Fourier::get(n);

        // 1. Regenerate the masks, lift the bodies back to 64 bits and transform both, split
        //    into signed 32-bit halves (four planar spectra per input ciphertext).
        let masks = expand_masks(batch.header.seed, count, n);
        let lift = 64 - spec.input_bits;
        let mut planar = buffers::take(count * STREAMS * n);
        planar
            .par_chunks_mut(STREAMS * n)
            .enumerate()
            .for_each_init(
                || (fourier.scratch(), vec![0u64; n]),
                |(scratch, body), (c, out)| {
                    for (dst, src) in body.iter_mut().zip(&batch.bodies[c * n..(c + 1) * n]) {
                        *dst = src << lift;
                    }
                    let (mask_f, body_f) = out.split_at_mut(2 * n);
                    let (mask_hi, mask_lo) = mask_f.split_at_mut(n);
                    fourier.forward_split(&masks[c * n..(c + 1) * n], mask_hi, mask_lo, scratch);
                    let (body_hi, body_lo) = body_f.split_at_mut(n);
                    fourier.forward_split(body, body_hi, body_lo, scratch);
                },
            );
        // Chunk-major, [chunk][g][b][stream] (see `kernel`).
        let chunks = n / UNIT;
        let in_per_chunk = count * STREAMS * UNIT;
        let mut inputs = buffers::take(chunks * in_per_chunk);
        inputs
            .par_chunks_mut(in_per_chunk)
            .enumerate()
            .for_each(|(k, dst)| {
                for (cs, unit) in dst.chunks_exact_mut(UNIT).enumerate() {
                    load_chunk(&planar[cs * n..][..n], k, unit);
                }
            });
        buffers::give(planar);

        // 2. For each frequency chunk: every (output block, group) sum over the input blocks.
        let dims = Dims {
            input_blocks: in_blocks,
            output_blocks: out_blocks,
            groups,
        };
        let w_per_chunk = out_blocks * in_blocks * UNIT;
        let sums_per_chunk = groups * out_blocks * STREAMS * UNIT;
        let mut sums = buffers::take(chunks * sums_per_chunk);
        sums.par_chunks_mut(sums_per_chunk)
            .enumerate()
            .for_each(|(k, out)| {
                let w = &self.weights[k * w_per_chunk..][..w_per_chunk];
                let x = &inputs[k * in_per_chunk..][..in_per_chunk];
                chunk_products(w, x, dims, out);
            });
        buffers::give(inputs);

        Ok(Sums {
            sums,
            tokens,
            groups,
            chunks,
            per_chunk: sums_per_chunk,
        })
    }

    /// Transforms the four sums of product `go` back exactly: (mask, body), full 64 bits.
    fn product(&self, sums: &Sums, go: usize, ws: &mut ProductWorkspace) -> (Vec<u64>, Vec<u64>) {
        let n = self.spec.polynomial_size();
        let (mut mask, mut body) = (vec![0u64; n], vec![0u64; n]);
        self.product_into(sums, go, ws, &mut mask, &mut body);
        (mask, body)
    }

    /// [`CompiledLayer::product`] into given buffers of N values each.
    fn product_into(
        &self,
        sums: &Sums,
        go: usize,
        ws: &mut ProductWorkspace,
        mask: &mut [u64],
        body: &mut [u64],
    ) {
        let fourier = Fourier::get(self.spec.polynomial_size());
        let n = fourier.size();
        let (scratch, acc, his) = (&mut ws.scratch, &mut ws.acc, &mut ws.his);
        for k in 0..sums.chunks {
            let at = k * sums.per_chunk + go * STREAMS * UNIT;
            for (s, spectrum) in acc.chunks_exact_mut(n).enumerate() {
                store_chunk(&sums.sums[at + s * UNIT..][..UNIT], k, spectrum);
            }
        }
        fourier.backward(&acc[0..n], scratch, |j, v| his[j] = v);
        fourier.backward(&acc[n..2 * n], scratch, |j, v| {
            mask[j] = join_u64(his[j], v)
        });
        fourier.backward(&acc[2 * n..3 * n], scratch, |j, v| his[j] = v);
        fourier.backward(&acc[3 * n..4 * n], scratch, |j, v| {
            body[j] = join_u64(his[j], v)
        });
    }

    /// Computes the encrypted `X W^T + b` of an encrypted batch as a keyless result, in parallel
    /// over output blocks. Batches prepared for packed results need [`CompiledLayer::apply_packed`].
    pub fn apply(&self, batch: &EncryptedBatch) -> Result<EncryptedResult, FheError> {
        let spec = &self.spec;
        if spec.encoding != ResultEncoding::Keyless {
            return Err(FheError::KeyRequired);
        }
        let sums = self.fourier_sums(batch)?;
        let tokens = sums.tokens;
        let (n_i, n_o, stride) = (spec.layout.n_i, spec.layout.n_o, spec.layout.token_stride());
        let out_blocks = spec.output_blocks();
        let out_bits = spec.output_bits;
        let n = spec.polynomial_size();
        // Each (group, output block) ciphertext written in place, group-major as the wire
        // format orders them: its mask (N values), then its used outputs (tokens x rows).
        let sizes: Vec<usize> = (0..sums.groups * out_blocks)
            .map(|go| {
                let (g, o) = (go / out_blocks, go % out_blocks);
                n + spec.tokens_in_group(tokens, g) * spec.rows_in_block(o)
            })
            .collect();
        let mut coefficients = vec![0u64; sizes.iter().sum()];
        let mut cts = Vec::with_capacity(sizes.len());
        let mut rest = coefficients.as_mut_slice();
        for size in &sizes {
            let (ct, tail) = rest.split_at_mut(*size);
            cts.push(ct);
            rest = tail;
        }
        cts.into_par_iter().enumerate().for_each_init(
            || (ProductWorkspace::new(n), vec![0u64; n]),
            |(ws, body), (go, ct)| {
                let o = go % out_blocks;
                let (mask, outputs) = ct.split_at_mut(n);
                self.product_into(&sums, go, ws, mask, body);
                for v in mask.iter_mut() {
                    *v = round_to_bits(*v, out_bits);
                }
                let rows = spec.rows_in_block(o);
                for (i, out) in outputs.iter_mut().enumerate() {
                    let (t, r) = (i / rows, i % rows);
                    let v = body[t * stride + r * n_i].wrapping_add(self.bias[o * n_o + r]);
                    *out = round_to_bits(v, out_bits);
                }
            },
        );
        let header = Header::for_spec(spec, PayloadKind::Result, tokens, out_bits);
        Ok(EncryptedResult {
            header,
            coefficients,
        })
    }

    /// One request's bytes as a server answers them: the batch parsed under `limits`, applied
    /// (packed with `packing`, else keyless), the result serialised. Returns the result's bytes
    /// and the milliseconds of the products and of the packing (both zero for keyless).
    pub fn answer(
        &self,
        upload: &[u8],
        limits: &crate::Limits,
        packing: Option<&PreparedPackingKey>,
    ) -> Result<(Vec<u8>, f64, f64), FheError> {
        let batch = EncryptedBatch::from_bytes(upload, limits)?;
        Ok(match packing {
            None => (self.apply(&batch)?.to_bytes(), 0.0, 0.0),
            Some(key) => {
                let (result, product_ms, pack_ms) = self.apply_packed(&batch, key)?;
                (result.to_bytes(), product_ms, pack_ms)
            }
        })
    }

    /// Computes `X W^T + b` as a packed result, with the requesting client's packing key: the
    /// products of [`CompiledLayer::apply`], merged n_i at a time ([`crate::packing`]). Returns
    /// the result and the milliseconds spent on (products, packing).
    pub fn apply_packed(
        &self,
        batch: &EncryptedBatch,
        key: &PreparedPackingKey,
    ) -> Result<(EncryptedResult, f64, f64), FheError> {
        let spec = &self.spec;
        if spec.encoding != ResultEncoding::Packed {
            return Err(FheError::SpecMismatch(
                "this layer serves keyless results".into(),
            ));
        }
        if key.params().id != spec.params.id {
            return Err(FheError::SpecMismatch(format!(
                "packing key for parameter set {} used with {}",
                key.params().name,
                spec.params.name
            )));
        }
        let started = std::time::Instant::now();
        let sums = self.fourier_sums(batch)?;
        let tokens = sums.tokens;
        let count = sums.groups * spec.output_blocks();
        let products: Vec<Glwe> = (0..count)
            .into_par_iter()
            .map_init(
                || ProductWorkspace::new(spec.polynomial_size()),
                |ws, go| self.product(&sums, go, ws),
            )
            .collect();
        drop(sums);
        let product_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = std::time::Instant::now();
        let packs = key.pack(products, spec.layout.n_i)?;
        let (out_bits, d_out) = (spec.output_bits, spec.shape.d_out);
        let n = spec.polynomial_size();
        let mut coefficients = Vec::with_capacity(spec.result_coefficients(tokens));
        for ((mask, body), outputs) in packs.iter().zip(spec.packed_outputs(tokens)) {
            coefficients.extend(mask.iter().map(|v| round_to_bits(*v, out_bits)));
            // Each output's body plus its bias at the output's Delta.
            coefficients.extend(outputs.iter().map(|(i, c)| {
                round_to_bits(body[*c].wrapping_add(self.packed_bias[i % d_out]), out_bits)
            }));
        }
        debug_assert_eq!(coefficients.len(), packs.len() * n + tokens * d_out);
        let pack_ms = started.elapsed().as_secs_f64() * 1e3;
        let header = Header::for_spec(spec, PayloadKind::Result, tokens, out_bits);
        Ok((
            EncryptedResult {
                header,
                coefficients,
            },
            product_ms,
            pack_ms,
        ))
    }
}

/// The Fourier-domain sums of one batch, chunk-major `[chunk][group][output block][stream]`.
struct Sums {
    sums: Vec<f64>,
    tokens: usize,
    groups: usize,
    chunks: usize,
    per_chunk: usize,
}

impl Drop for Sums {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.sums));
    }
}

/// The large per-request buffers of [`CompiledLayer`]'s products (a few MB each), kept for the
/// next request: a fresh allocation of that size is mapped anew by the allocator, and its first
/// touch costs a page fault per 4 KiB page (about a tenth of a QKV product's time). Buffers are
/// handed out with unspecified contents: every caller overwrites all of a buffer before reading
/// it. At most [`buffers::MAX_BYTES`] are kept.
mod buffers {
    use std::sync::Mutex;

    pub(super) const MAX_BYTES: usize = 256 << 20;

    static POOL: Mutex<Vec<Vec<f64>>> = Mutex::new(Vec::new());

    /// A buffer of `len` values, reused when one is free (the smallest that is large enough).
    pub(super) fn take(len: usize) -> Vec<f64> {
        let reused = {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| pool.swap_remove(i))
        };
        match reused {
            Some(mut buffer) => {
                buffer.resize(len, 0.0);
                buffer
            }
            None => vec![0.0; len],
        }
    }

    /// Returns a buffer for reuse (dropped if the pool is full).
    pub(super) fn give(buffer: Vec<f64>) {
        if buffer.capacity() == 0 {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = pool.iter().map(|b| b.capacity() * 8).sum();
        if held + buffer.capacity() * 8 <= MAX_BYTES {
            pool.push(buffer);
        }
    }
}

/// Per-thread buffers of the inverse transforms.
struct ProductWorkspace {
    scratch: crate::fourier::Scratch,
    acc: Vec<f64>,
    his: Vec<i64>,
}

impl ProductWorkspace {
    fn new(n: usize) -> Self {
        ProductWorkspace {
            scratch: Fourier::get(n).scratch(),
            acc: vec![0.0; STREAMS * n],
            his: vec![0; n],
        }
    }
}
