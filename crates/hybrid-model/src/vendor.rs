//! The vendor's side of a hybrid model: split a checkpoint into what the client runs and what
//! the server keeps.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::backend::ServerLayer;
use crate::linear::ClientLayer;
use crate::names::{Module, ProtectedLayer};
use crate::ModelError;

/// A protected layer, split: the client's metadata and the server's quantized weights.
#[derive(Debug, Clone)]
pub struct SplitLayer {
    pub modules: Vec<Module>,
    pub client: ClientLayer,
    pub server: ServerLayer,
}

pub(crate) fn tensor(tensors: &HashMap<String, Tensor>, name: &str) -> Result<Tensor, ModelError> {
    tensors
        .get(name)
        .cloned()
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
}

/// How the protected layers' inputs are encoded, per layer name (all empty: per-token
/// quantization of the raw inputs).
#[derive(Debug, Clone, Default)]
pub struct InputEncoding {
    /// One calibrated activation scale per layer: the bias is folded into the server's integer
    /// product (`round(b_r / (s_x s_w[r]))`) and the client keeps no bias; otherwise
    /// activations are quantized per token and the client adds the float bias.
    pub static_scales: Option<HashMap<String, f32>>,
    /// One divisor per input channel: the client divides its activations by them before
    /// quantizing and the weight columns are multiplied by them (smoothing).
    pub input_scales: Option<HashMap<String, Vec<f32>>>,
    /// Outlier channels spread over several columns of the product ([`quant::ChannelSplit`]);
    /// layers without an entry are not split.
    pub outliers: Option<HashMap<String, quant::ChannelSplit>>,
    /// Second moments of each layer's calibrated inputs (`d_in x d_in`): weights are rounded
    /// with error compensation ([`quant::quantize_weights_compensated`]); layers without an
    /// entry are rounded to nearest.
    pub moments: Option<HashMap<String, std::sync::Arc<Vec<f64>>>>,
}

/// Quantizes each protected layer (its modules' rows stacked) per output channel, its inputs
/// encoded as `encoding` says.
pub fn split_layers(
    tensors: &HashMap<String, Tensor>,
    protected: &[ProtectedLayer],
    n_bits: u32,
    encoding: &InputEncoding,
) -> Result<Vec<SplitLayer>, ModelError> {
    let mut out = Vec::with_capacity(protected.len());
    for layer in protected {
        let mut weights = Vec::new();
        let mut bias = Vec::new();
        let mut d_in = None;
        for m in &layer.parts {
            let w = tensor(tensors, &format!("{}.weight", m.hf_name()))?;
            let (rows, cols) = w.dims2()?;
            if *d_in.get_or_insert(cols) != cols {
                return Err(ModelError::Backend(format!(
                    "{}: parts differ in input width",
                    layer.name
                )));
            }
            weights.extend(
                w.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
            match tensors.get(&format!("{}.bias", m.hf_name())) {
                Some(b) => bias.extend(b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
                None => bias.extend(std::iter::repeat_n(0f32, rows)),
            }
        }
        let d_in = d_in.unwrap_or(0);
        let d_out = bias.len();
        let input_scale = match &encoding.input_scales {
            None => None,
            Some(all) => {
                let s = all.get(&layer.name).ok_or_else(|| {
                    ModelError::Bundle(format!("no smoothing factors for {}", layer.name))
                })?;
                if s.len() != d_in {
                    return Err(ModelError::Bundle(format!(
                        "{}: {} smoothing factors for {d_in} inputs",
                        layer.name,
                        s.len()
                    )));
                }
                quant::scale_columns(&mut weights, s);
                Some(s.clone())
            }
        };
        let moments = encoding.moments.as_ref().and_then(|m| m.get(&layer.name));
        let q = match moments {
            Some(gram) => {
                // The inputs the weights meet are the smoothed ones: x_j / f_j.
                let gram: std::borrow::Cow<[f64]> = match &input_scale {
                    Some(f) => (0..d_in * d_in)
                        .map(|i| gram[i] / (f[i / d_in] as f64 * f[i % d_in] as f64))
                        .collect(),
                    None => gram.as_slice().into(),
                };
                quant::quantize_weights_compensated(&weights, d_out, d_in, n_bits, &gram)?
            }
            None => quant::quantize_weights(&weights, d_out, d_in, n_bits)?,
        };
        let outliers = match &encoding.outliers {
            Some(all) => all.get(&layer.name).cloned(),
            None => None,
        };
        // The server's weights: the split channels' columns repeated.
        let q = match &outliers {
            Some(split) => split.expand_weights(&q)?,
            None => q,
        };
        let activation_scale = match &encoding.static_scales {
            None => None,
            Some(scales) => Some(*scales.get(&layer.name).ok_or_else(|| {
                ModelError::Bundle(format!("no calibrated activation scale for {}", layer.name))
            })?),
        };
        let (client_bias, server_bias) = match activation_scale {
            None => (bias, vec![0i64; d_out]),
            Some(sx) => {
                let folded: Vec<i64> = bias
                    .iter()
                    .zip(&q.scales)
                    .map(|(b, sw)| (*b as f64 / (sx as f64 * *sw as f64)).round() as i64)
                    .collect();
                fhe_linear::server::check_window(
                    &fhe_linear::HFHE_GLWE_2048_V1,
                    q.d_in,
                    fhe_linear::DEFAULT_ACTIVATION_BITS,
                    &q.values,
                    &folded,
                )?;
                (vec![0f32; d_out], folded)
            }
        };
        out.push(SplitLayer {
            modules: layer.parts.clone(),
            client: ClientLayer {
                name: layer.name.clone(),
                parts: layer.parts.iter().map(Module::hf_name).collect(),
                d_in,
                d_out,
                n_bits,
                activation_bits: None,
                weight_scales: q.scales.clone(),
                bias: client_bias,
                activation_scale,
                input_scale,
                outliers,
            },
            server: ServerLayer {
                name: layer.name.clone(),
                weights: q,
                bias: server_bias,
                activation_bits: fhe_linear::DEFAULT_ACTIVATION_BITS,
            },
        });
    }
    Ok(out)
}

/// Whether [`widen_activations`] would widen `layer` to `bits`: only past its width, and not
/// with a static scale (it and the bias folded with it are calibrated for `n_bits`).
pub fn widens(layer: &SplitLayer, bits: u32) -> bool {
    layer.client.activation_scale.is_none() && bits > layer.client.activation_bits()
}

/// Widens a layer's activations to `bits` where [`widens`] says so.
pub fn widen_activations(layer: &mut SplitLayer, bits: u32) {
    if !widens(layer, bits) {
        return;
    }
    layer.client.activation_bits = Some(bits);
    layer.server.activation_bits = bits.max(fhe_linear::DEFAULT_ACTIVATION_BITS);
}

/// The tensors (Hugging Face names) of the protected modules: their weights and biases.
pub fn protected_tensor_names(protected: &[ProtectedLayer]) -> Vec<String> {
    protected
        .iter()
        .flat_map(|l| l.parts.iter())
        .flat_map(|m| {
            [
                format!("{}.weight", m.hf_name()),
                format!("{}.bias", m.hf_name()),
            ]
        })
        .collect()
}

/// The client's checkpoint: every tensor except the weights and biases of protected modules.
pub fn client_tensors(
    tensors: &HashMap<String, Tensor>,
    protected: &[ProtectedLayer],
) -> HashMap<String, Tensor> {
    let removed = protected_tensor_names(protected);
    tensors
        .iter()
        .filter(|(k, _)| !removed.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The groups of protected layers that can share one request: runs of at least two
/// consecutive modules of an input group ([`crate::names::Naming::input_groups`]), each a
/// protected layer of its own, quantizing their (common) input the same way.
pub fn layer_groups(
    naming: &dyn crate::names::Naming,
    blocks: usize,
    split: &[SplitLayer],
) -> Vec<server_bundle::LayerGroup> {
    let mut groups = Vec::new();
    for set in naming.input_groups(blocks) {
        let mut run: Vec<&SplitLayer> = Vec::new();
        let mut close = |run: &mut Vec<&SplitLayer>| {
            if run.len() >= 2 {
                groups.push(server_bundle::LayerGroup::new(
                    run.iter().map(|s| s.client.name.clone()).collect(),
                ));
            }
            run.clear();
        };
        for m in &set {
            match split.iter().find(|s| s.modules == [*m]) {
                Some(layer) => {
                    let same = run.first().is_none_or(|first| {
                        let (a, b) = (&first.client, &layer.client);
                        a.n_bits == b.n_bits
                            && a.activation_bits == b.activation_bits
                            && a.activation_scale == b.activation_scale
                            && a.input_scale == b.input_scale
                            && a.outliers == b.outliers
                    });
                    if !same {
                        close(&mut run);
                    }
                    run.push(layer);
                }
                None => close(&mut run),
            }
        }
        close(&mut run);
    }
    groups
}
