//! The pluggable linear layer: every linear module of the model is built through a
//! [`LinearProvider`], which decides whether it runs locally or as a protected layer.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::backend::{LayerGroup, ProtectedBackend};
use crate::names::Module;

/// A linear map applied to the last dimension of its input.
pub trait Linear: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// Builds the linear computing the concatenated outputs of `modules` (one module, or the three
/// attention input projections of a block), all with the same input width.
pub trait LinearProvider {
    fn build(
        &self,
        modules: &[Module],
        d_in: usize,
        d_outs: &[usize],
        vb: &VarBuilder,
    ) -> Result<Box<dyn Linear>>;
}

/// A linear computed in the clear from the checkpoint's weights.
pub struct LocalLinear(candle_nn::Linear);

impl LocalLinear {
    /// From a weight `(d_out, d_in)` and an optional bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        LocalLinear(candle_nn::Linear::new(weight, bias))
    }

    /// The module's weight `(d_out, d_in)`, with its bias when the checkpoint has one.
    pub fn load(module: Module, d_in: usize, d_out: usize, vb: &VarBuilder) -> Result<Self> {
        let vb = vb.pp(module.hf_name());
        let weight = vb.get((d_out, d_in), "weight")?;
        let bias = match vb.contains_tensor("bias") {
            true => Some(vb.get(d_out, "bias")?),
            false => None,
        };
        Ok(LocalLinear(candle_nn::Linear::new(weight, bias)))
    }
}

impl Linear for LocalLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_core::Module::forward(&self.0, x)
    }
}

/// Several linears on the same input, outputs concatenated on the last dimension.
pub struct Concat(pub Vec<Box<dyn Linear>>);

impl Linear for Concat {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let parts = self
            .0
            .iter()
            .map(|l| l.forward(x))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, candle_core::D::Minus1)
    }
}

/// One linear per module (each from `make`, or loaded locally), concatenated when several.
pub(crate) fn per_module(
    modules: &[Module],
    d_in: usize,
    d_outs: &[usize],
    vb: &VarBuilder,
    make: impl Fn(Module) -> Option<Box<dyn Linear>>,
) -> Result<Box<dyn Linear>> {
    let mut parts: Vec<Box<dyn Linear>> = Vec::new();
    for (m, d_out) in modules.iter().zip(d_outs) {
        parts.push(match make(*m) {
            Some(p) => p,
            None => Box::new(LocalLinear::load(*m, d_in, *d_out, vb)?),
        });
    }
    Ok(if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Box::new(Concat(parts))
    })
}

/// Largest magnitude of each input channel, per layer name (calibration statistics).
pub(crate) type ChannelMax = Arc<std::sync::Mutex<HashMap<String, Vec<f32>>>>;

/// Second moments of each layer's inputs, `sum_t x_t x_t^T` (`d_in x d_in`, row-major), per
/// layer name (calibration statistics for error-compensating weight rounding).
pub(crate) type InputMoments = Arc<std::sync::Mutex<HashMap<String, Vec<f64>>>>;

/// A linear that records the largest magnitude of each input channel it sees into `stats`
/// (and, with `moments`, the inputs' second moments) under `name`, then computes as `inner`
/// does.
pub(crate) struct Recording {
    pub inner: Box<dyn Linear>,
    pub name: String,
    pub stats: ChannelMax,
    pub moments: Option<InputMoments>,
}

impl Linear for Recording {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d_in = x.dim(candle_core::D::Minus1)?;
        let flat = x.reshape(((), d_in))?;
        let rows = flat.abs()?.max(0)?.to_vec1::<f32>()?;
        let mut stats = self.stats.lock().expect("calibration stats");
        let e = stats
            .entry(self.name.clone())
            .or_insert_with(|| vec![0.0; d_in]);
        for (m, v) in e.iter_mut().zip(rows) {
            *m = m.max(v);
        }
        drop(stats);
        if let Some(moments) = &self.moments {
            let x64 = flat.to_dtype(candle_core::DType::F64)?;
            let gram = x64.t()?.matmul(&x64)?.flatten_all()?.to_vec1::<f64>()?;
            let mut all = moments.lock().expect("calibration moments");
            let e = all
                .entry(self.name.clone())
                .or_insert_with(|| vec![0.0; d_in * d_in]);
            for (m, v) in e.iter_mut().zip(gram) {
                *m += v;
            }
        }
        self.inner.forward(x)
    }
}

/// Everything local: the float model.
pub struct LocalProvider;

impl LinearProvider for LocalProvider {
    fn build(
        &self,
        modules: &[Module],
        d_in: usize,
        d_outs: &[usize],
        vb: &VarBuilder,
    ) -> Result<Box<dyn Linear>> {
        per_module(modules, d_in, d_outs, vb, |_| None)
    }
}

/// What the client holds of one protected layer: enough to quantize its input and dequantize
/// its output, nothing of its weights beyond one scale per output channel.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientLayer {
    pub name: String,
    pub parts: Vec<String>,
    pub d_in: usize,
    pub d_out: usize,
    /// Bits of the weights, and of the activations unless `activation_bits` says more.
    pub n_bits: u32,
    /// Width of the quantized activations when wider than `n_bits` (the server's layer spec
    /// takes as many): a finer step for every channel at the same ciphertext size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_bits: Option<u32>,
    pub weight_scales: Vec<f32>,
    /// The float bias added after dequantization (zeros when the server folded it in).
    pub bias: Vec<f32>,
    /// `None`: activations quantized per token (dynamic). `Some(s)`: one calibrated scale.
    #[serde(default)]
    pub activation_scale: Option<f32>,
    /// Per input channel divisors applied to the activations before quantization (the server's
    /// weight columns are multiplied by the same factors, so the product is unchanged): moves
    /// activation outliers into the weights, which are quantized per output channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_scale: Option<Vec<f32>>,
    /// Outlier channels spread over several columns of the product (the server's weight
    /// columns repeated), so they no longer set every token's step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outliers: Option<quant::ChannelSplit>,
}

impl ClientLayer {
    /// Bits the activations are quantized to.
    pub fn activation_bits(&self) -> u32 {
        self.activation_bits.unwrap_or(self.n_bits)
    }

    /// Width of the integer product the server computes: `d_in`, plus the columns of split
    /// outlier channels.
    pub fn product_width(&self) -> usize {
        self.outliers
            .as_ref()
            .map_or(self.d_in, |s| s.width(self.d_in))
    }
}

/// A protected linear: quantize the input per token, have the backend compute the integer
/// product, dequantize.
pub struct ProtectedLinear {
    layer: ClientLayer,
    backend: Arc<dyn ProtectedBackend>,
}

impl ProtectedLinear {
    pub fn new(layer: ClientLayer, backend: Arc<dyn ProtectedBackend>) -> Self {
        ProtectedLinear { layer, backend }
    }
}

/// Quantizes `x` (`(..., d_in)`) as `layer` says, has `product` compute the integer product of
/// the rows, and dequantizes with `weight_scales` and `bias` (`d_out` each).
fn protected_forward(
    layer: &ClientLayer,
    weight_scales: &[f32],
    bias: &[f32],
    x: &Tensor,
    product: impl FnOnce(&[i16], usize) -> std::result::Result<Vec<i64>, crate::ModelError>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d_in = *dims
        .last()
        .expect("a linear input has at least one dimension");
    let tokens = x.elem_count() / d_in;
    let mut flat: Vec<f32> = x
        .reshape((tokens, d_in))?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    if let Some(factors) = &layer.input_scale {
        quant::divide_channels(&mut flat, factors);
    }
    let bits = layer.activation_bits();
    let q = match (&layer.outliers, layer.activation_scale) {
        (Some(split), scale) => split.quantize(&flat, tokens, d_in, bits, scale),
        (None, None) => quant::quantize_activations(&flat, tokens, d_in, bits),
        (None, Some(scale)) => quant::quantize_activations_static(&flat, tokens, d_in, bits, scale),
    }
    .map_err(candle_core::Error::wrap)?;
    let y_int = product(&q.values, tokens).map_err(crate::ModelError::into_candle)?;
    let y = quant::dequantize(&y_int, &q.scales, weight_scales, bias);
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = weight_scales.len();
    Tensor::from_vec(y, out_dims, x.device())?.to_dtype(x.dtype())
}

impl Linear for ProtectedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let layer = &self.layer;
        protected_forward(layer, &layer.weight_scales, &layer.bias, x, |q, tokens| {
            self.backend.apply(&layer.name, q, tokens)
        })
    }
}

/// Protected layers that read the same input, computed as one product: the input quantized
/// once (the layers quantize it the same way), one backend call, the outputs concatenated.
pub struct ProtectedGroup {
    group: LayerGroup,
    first: ClientLayer,
    weight_scales: Vec<f32>,
    bias: Vec<f32>,
    backend: Arc<dyn ProtectedBackend>,
}

impl ProtectedGroup {
    pub fn new(
        group: LayerGroup,
        layers: &[ClientLayer],
        backend: Arc<dyn ProtectedBackend>,
    ) -> Self {
        ProtectedGroup {
            first: layers[0].clone(),
            weight_scales: layers
                .iter()
                .flat_map(|l| l.weight_scales.iter().copied())
                .collect(),
            bias: layers.iter().flat_map(|l| l.bias.iter().copied()).collect(),
            group,
            backend,
        }
    }
}

impl Linear for ProtectedGroup {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        protected_forward(
            &self.first,
            &self.weight_scales,
            &self.bias,
            x,
            |q, tokens| self.backend.apply_group(&self.group, q, tokens),
        )
    }
}

/// Protected layers through a backend, everything else local.
pub struct HybridProvider {
    layers: HashMap<Vec<Module>, ClientLayer>,
    /// Groups of single-module layers computed as one product, with their modules in order.
    groups: Vec<(Vec<Module>, LayerGroup)>,
    backend: Arc<dyn ProtectedBackend>,
}

impl HybridProvider {
    /// `layers` pairs each protected layer's modules with its client metadata.
    pub fn new(
        layers: Vec<(Vec<Module>, ClientLayer)>,
        backend: Arc<dyn ProtectedBackend>,
    ) -> Self {
        HybridProvider {
            layers: layers.into_iter().collect(),
            groups: vec![],
            backend,
        }
    }

    /// Computes each of `groups` (layers that read the same input) as one product.
    pub fn with_groups(mut self, groups: &[LayerGroup]) -> Self {
        for group in groups {
            let modules: Option<Vec<Module>> = group
                .layers
                .iter()
                .map(|name| {
                    self.layers.iter().find_map(|(m, l)| match m.as_slice() {
                        [one] if &l.name == name => Some(*one),
                        _ => None,
                    })
                })
                .collect();
            if let Some(modules) = modules {
                self.groups.push((modules, group.clone()));
            }
        }
        self
    }

    fn group(&self, modules: &[Module]) -> Option<(usize, Box<dyn Linear>)> {
        let (members, group) = self.groups.iter().find(|(m, _)| modules.starts_with(m))?;
        let layers: Vec<ClientLayer> = members
            .iter()
            .map(|m| self.layers.get(&vec![*m]).cloned())
            .collect::<Option<_>>()?;
        Some((
            members.len(),
            Box::new(ProtectedGroup::new(
                group.clone(),
                &layers,
                self.backend.clone(),
            )),
        ))
    }

    fn protected(&self, modules: &[Module]) -> Option<Box<dyn Linear>> {
        self.layers.get(modules).map(|layer| {
            Box::new(ProtectedLinear {
                layer: layer.clone(),
                backend: self.backend.clone(),
            }) as Box<dyn Linear>
        })
    }
}

impl LinearProvider for HybridProvider {
    fn build(
        &self,
        modules: &[Module],
        d_in: usize,
        d_outs: &[usize],
        vb: &VarBuilder,
    ) -> Result<Box<dyn Linear>> {
        if let Some(fused) = self.protected(modules) {
            return Ok(fused);
        }
        let mut parts: Vec<Box<dyn Linear>> = Vec::new();
        let mut i = 0;
        while i < modules.len() {
            if let Some((n, group)) = self.group(&modules[i..]) {
                parts.push(group);
                i += n;
                continue;
            }
            let m = modules[i];
            parts.push(match self.protected(&[m]) {
                Some(p) => p,
                None => Box::new(LocalLinear::load(m, d_in, d_outs[i], vb)?),
            });
            i += 1;
        }
        Ok(if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Box::new(Concat(parts))
        })
    }
}
