//! The vendor's compile step: choose protected layers, quantize them, measure the accuracy on
//! calibration prompts, and write the client and server bundles.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::bundle::{
    self, CalibrationReport, ClientManifest, ServerLayerInfo, ServerManifest, BUNDLE_FORMAT_VERSION,
};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::transformer::{CausalLm, Model};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::backend::SimulateBackend;
use crate::linear::{
    per_module, ChannelMax, HybridProvider, InputMoments, Linear, LinearProvider, LocalLinear,
    LocalProvider, Recording,
};
use crate::{build, load_model, names, vendor, Mode, ModelError};

/// How protected layers quantize their inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// One scale per token, computed on the fly (the client adds the float bias).
    Dynamic,
    /// One scale per layer, calibrated on the prompts (the server folds the bias in).
    Static,
    /// One scale per token after dividing each input channel by the square root of its largest
    /// calibrated magnitude (the weight columns multiplied by the same): outlier channels no
    /// longer set every token's step. The factors come from activations only.
    Smoothed,
    /// One scale per token, the calibrated outlier channels spread over extra columns of the
    /// product ([`quant::ChannelSplit`]): the step is set by the other channels.
    Outliers,
    /// Smoothed, then the remaining outlier channels spread over extra columns.
    SmoothedOutliers,
    /// Measure every choice on the calibration prompts and keep the most accurate (the
    /// cheapest on a tie).
    Auto,
}

impl Activations {
    /// Every concrete choice, cheapest first (the order that breaks ties).
    pub const ALL: [Activations; 5] = [
        Activations::Dynamic,
        Activations::Static,
        Activations::Smoothed,
        Activations::Outliers,
        Activations::SmoothedOutliers,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Activations::Dynamic => "dynamic",
            Activations::Static => "static",
            Activations::Smoothed => "smoothed",
            Activations::Outliers => "outliers",
            Activations::SmoothedOutliers => "smoothed-outliers",
            Activations::Auto => "auto",
        }
    }

    /// What the client bundle's manifest says of the choice.
    fn describe(self) -> &'static str {
        match self {
            Activations::Static => {
                "per-layer symmetric, static (calibrated); bias folded into the server's product"
            }
            Activations::Smoothed => "per-token symmetric, dynamic, channels smoothed (calibrated)",
            Activations::Outliers => {
                "per-token symmetric, dynamic, outlier channels over extra columns (calibrated)"
            }
            Activations::SmoothedOutliers => {
                "per-token symmetric, dynamic, channels smoothed and outlier channels over extra \
                 columns (calibrated)"
            }
            Activations::Dynamic | Activations::Auto => "per-token symmetric, dynamic",
        }
    }

    fn needs_calibration(self) -> bool {
        !matches!(self, Activations::Dynamic | Activations::Auto)
    }
}

impl std::str::FromStr for Activations {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        Activations::ALL
            .into_iter()
            .chain([Activations::Auto])
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                ModelError::Bundle(format!(
                    "activations `{s}`: dynamic, static, smoothed, outliers, smoothed-outliers \
                     or auto"
                ))
            })
    }
}

/// How protected layers' weights are rounded to their 8-bit grid (one step per output row
/// either way: the encrypted product and its noise budget do not change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightRounding {
    /// Each weight to its nearest step.
    Nearest,
    /// Error-compensating (GPTQ, [`quant::quantize_weights_compensated`]) on the second moments
    /// of the layer's inputs over the calibration prompts; to nearest without calibration
    /// prompts.
    Compensated,
}

impl WeightRounding {
    pub fn name(self) -> &'static str {
        match self {
            WeightRounding::Nearest => "nearest",
            WeightRounding::Compensated => "compensated",
        }
    }
}

impl std::str::FromStr for WeightRounding {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "nearest" => Ok(WeightRounding::Nearest),
            "compensated" => Ok(WeightRounding::Compensated),
            _ => Err(ModelError::Bundle(format!(
                "weight rounding `{s}`: nearest or compensated"
            ))),
        }
    }
}

/// Extra product columns an outlier split may add, as a share of the layer's inputs (the
/// cost in upload bytes and server time grows about as much). A quarter: on SmolLM2's
/// attention projections next-token agreement rises with the budget up to about this share and
/// no further (BENCHMARKS.md), within the 1.5x cost a protected layer may add.
pub const DEFAULT_OUTLIER_COLUMNS: f32 = 0.25;

/// How wide protected layers' activations are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationWidth {
    /// As many bits as the weights (`n_bits`).
    Weights,
    /// This many bits for every layer; a layer that no layout holds at that width fails.
    Bits(u32),
    /// For each layer (each group served as one product), the widest activations whose
    /// cheapest layout costs at most [`MAX_WIDENING_COST`] times the bytes per token of 8-bit
    /// ones, kept when they measure better than `n_bits` on the calibration prompts (without
    /// calibration prompts, `n_bits`).
    Auto,
}

/// Bytes per token wider activations may cost a protected layer, against 8-bit ones: each
/// activation bit takes a plaintext bit from the noise budget, so past some width the layout
/// needs smaller output blocks (more bytes, more server time).
pub const MAX_WIDENING_COST: f64 = 1.25;

impl std::str::FromStr for ActivationWidth {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "auto" => Ok(ActivationWidth::Auto),
            "weights" => Ok(ActivationWidth::Weights),
            bits => match bits.parse::<u32>() {
                Ok(b) if (2..=quant::MAX_ACTIVATION_BITS).contains(&b) => {
                    Ok(ActivationWidth::Bits(b))
                }
                _ => Err(ModelError::Bundle(format!(
                    "activation bits `{s}`: auto, weights, or a width of 2 to {}",
                    quant::MAX_ACTIVATION_BITS
                ))),
            },
        }
    }
}

/// Bytes per token of the cheapest keyless layout of `shape` at `bits`-bit activations.
fn keyless_bytes(shape: fhe_linear::LayerShape, bits: u32) -> Option<usize> {
    let spec =
        fhe_linear::LayerSpec::choose_for(&fhe_linear::HFHE_GLWE_2048_V1, shape, 1, bits).ok()?;
    Some(spec.upload_bytes(1) + spec.download_bytes(1))
}

/// The widest activations within [`MAX_WIDENING_COST`] for a served shape (8 when none is).
pub fn widest_activations(shape: fhe_linear::LayerShape) -> u32 {
    let base = fhe_linear::DEFAULT_ACTIVATION_BITS;
    let Some(narrow) = keyless_bytes(shape, base) else {
        return base;
    };
    fhe_linear::ACTIVATION_BITS
        .rev()
        .find(|bits| {
            keyless_bytes(shape, *bits)
                .is_some_and(|b| b as f64 <= MAX_WIDENING_COST * narrow as f64)
        })
        .unwrap_or(base)
}

/// The activation width of each layer of `split`: layers served together (a group of
/// `naming`'s input groups) take the width of their fused product.
fn widths(
    split: &[vendor::SplitLayer],
    width: ActivationWidth,
    groups: &[server_bundle::LayerGroup],
) -> Vec<u32> {
    let served = |s: &vendor::SplitLayer| -> fhe_linear::LayerShape {
        let d_out = groups
            .iter()
            .find(|g| g.layers.contains(&s.client.name))
            .map_or(s.client.d_out, |g| {
                split
                    .iter()
                    .filter(|o| g.layers.contains(&o.client.name))
                    .map(|o| o.client.d_out)
                    .sum()
            });
        fhe_linear::LayerShape::new(s.client.product_width(), d_out)
    };
    let mut cache = HashMap::new();
    split
        .iter()
        .map(|s| match width {
            ActivationWidth::Weights => s.client.n_bits,
            ActivationWidth::Bits(b) => b,
            ActivationWidth::Auto => *cache
                .entry(served(s))
                .or_insert_with_key(|shape| widest_activations(*shape)),
        })
        .collect()
}

/// How to compile.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    pub model_name: String,
    /// Protected layers: names or patterns, in either naming.
    pub protect: Vec<String>,
    /// Bits of the quantized weights and activations (2..=8).
    pub n_bits: u32,
    /// Token ids of the calibration prompts.
    pub calibration: Vec<Vec<u32>>,
    pub activations: Activations,
    /// Serve protected layers that read the same input (q, k, v; gate, up) as one product:
    /// one encryption and one request for them.
    pub group_inputs: bool,
    /// Extra product columns an outlier split may add per layer, as a share of its inputs
    /// ([`DEFAULT_OUTLIER_COLUMNS`]).
    pub outlier_columns: f32,
    pub weight_rounding: WeightRounding,
    /// How wide the activations are ([`ActivationWidth`]).
    pub activation_width: ActivationWidth,
}

/// The float model, with the inputs of protected layers recorded.
struct RecordingProvider {
    protected: Vec<names::ProtectedLayer>,
    stats: ChannelMax,
    moments: Option<InputMoments>,
}

impl RecordingProvider {
    fn wrap(&self, modules: &[names::Module], inner: Box<dyn Linear>) -> Box<dyn Linear> {
        match self.protected.iter().find(|l| l.parts == modules) {
            Some(l) => Box::new(Recording {
                inner,
                name: l.name.clone(),
                stats: self.stats.clone(),
                moments: self.moments.clone(),
            }),
            None => inner,
        }
    }
}

impl LinearProvider for RecordingProvider {
    fn build(
        &self,
        modules: &[names::Module],
        d_in: usize,
        d_outs: &[usize],
        vb: &VarBuilder,
    ) -> candle_core::Result<Box<dyn Linear>> {
        if self.protected.iter().any(|l| l.parts == modules) {
            let local = LocalProvider.build(modules, d_in, d_outs, vb)?;
            return Ok(self.wrap(modules, local));
        }
        per_module(modules, d_in, d_outs, vb, |m| {
            let inner =
                LocalLinear::load(m, d_in, d_outs[modules.iter().position(|x| *x == m)?], vb)
                    .ok()?;
            Some(self.wrap(&[m], Box::new(inner)))
        })
    }
}

/// The largest magnitude of each input channel of each protected layer on the prompts, run
/// through the float model.
pub fn calibrate(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    protected: &[names::ProtectedLayer],
    prompts: &[Vec<u32>],
) -> Result<HashMap<String, Vec<f32>>, ModelError> {
    Ok(calibrate_inputs(cfg, tensors, protected, prompts, false)?.channel_max)
}

/// Calibration statistics of the protected layers' inputs.
pub struct InputStats {
    /// The largest magnitude of each input channel.
    pub channel_max: HashMap<String, Vec<f32>>,
    /// The inputs' second moments `sum_t x_t x_t^T` (`d_in x d_in`), when asked for.
    pub moments: Option<HashMap<String, Arc<Vec<f64>>>>,
}

/// [`calibrate`], and with `moments` the second moments of the inputs as well.
pub fn calibrate_inputs(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    protected: &[names::ProtectedLayer],
    prompts: &[Vec<u32>],
    moments: bool,
) -> Result<InputStats, ModelError> {
    let stats = Arc::new(Mutex::new(HashMap::new()));
    let recorded = moments.then(|| Arc::new(Mutex::new(HashMap::new())));
    let provider = RecordingProvider {
        protected: protected.to_vec(),
        stats: stats.clone(),
        moments: recorded.clone(),
    };
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let mut model = load_model(cfg, vb, &provider)?;
    for p in prompts.iter().filter(|p| !p.is_empty()) {
        model.clear_kv_cache();
        model.forward_all(p)?;
    }
    drop(model);
    let stats = stats.lock().expect("calibration stats").clone();
    let moments = recorded.map(|m| {
        std::mem::take(&mut *m.lock().expect("calibration moments"))
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect()
    });
    Ok(InputStats {
        channel_max: stats,
        moments,
    })
}

/// Static activation scales (largest magnitude seen / q_max) per protected layer.
fn static_scales(
    channel_max: &HashMap<String, Vec<f32>>,
    protected: &[names::ProtectedLayer],
    n_bits: u32,
) -> Result<HashMap<String, f32>, ModelError> {
    let q_max = quant::q_max(n_bits)? as f32;
    Ok(protected
        .iter()
        .map(|l| {
            let max = channel_max
                .get(&l.name)
                .map(|v| v.iter().copied().fold(0.0f32, f32::max))
                .filter(|m| *m > 0.0)
                .unwrap_or(1.0);
            (l.name.clone(), max / q_max)
        })
        .collect())
}

/// Smoothing factors per protected layer: each channel's calibrated maximum to the power
/// `alpha` (1/2 when compiling).
pub fn smoothing_factors(
    channel_max: &HashMap<String, Vec<f32>>,
    protected: &[names::ProtectedLayer],
    alpha: f32,
) -> HashMap<String, Vec<f32>> {
    protected
        .iter()
        .filter_map(|l| {
            let max = channel_max.get(&l.name)?;
            Some((
                l.name.clone(),
                max.iter()
                    .map(|m| if *m > 1e-6 { m.powf(alpha) } else { 1.0 })
                    .collect(),
            ))
        })
        .collect()
}

/// A simulate-mode model from split layers (the client part built without protected tensors).
pub fn simulated(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    protected: &[names::ProtectedLayer],
    split: &[vendor::SplitLayer],
) -> Result<Model, ModelError> {
    let backend = Arc::new(SimulateBackend::new(
        split.iter().map(|s| s.server.clone()).collect(),
    ));
    let provider = HybridProvider::new(
        split
            .iter()
            .map(|s| (s.modules.clone(), s.client.clone()))
            .collect(),
        backend,
    );
    let vb = VarBuilder::from_tensors(
        vendor::client_tensors(tensors, protected),
        DType::F32,
        &Device::Cpu,
    );
    load_model(cfg, vb, &provider)
}

/// Teacher-forced comparison of two models over `prompts`: share of identical argmax next-token
/// predictions and the largest logit difference.
pub fn compare(
    a: &mut dyn CausalLm,
    b: &mut dyn CausalLm,
    prompts: &[Vec<u32>],
) -> Result<CalibrationReport, ModelError> {
    let (mut same, mut positions, mut max_err, mut kl) = (0usize, 0usize, 0f32, 0f64);
    for p in prompts.iter().filter(|p| !p.is_empty()) {
        a.clear_kv_cache();
        b.clear_kv_cache();
        let la = a.forward_all(p)?.to_vec2::<f32>()?;
        let lb = b.forward_all(p)?.to_vec2::<f32>()?;
        for (x, y) in la.iter().zip(&lb) {
            let argmax = |v: &Vec<f32>| (0..v.len()).max_by(|i, j| v[*i].total_cmp(&v[*j]));
            same += usize::from(argmax(x) == argmax(y));
            positions += 1;
            kl += kl_divergence(x, y);
            max_err = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(max_err, f32::max);
        }
    }
    Ok(CalibrationReport {
        activations: String::new(),
        prompts: prompts.len(),
        positions,
        top1_agreement: if positions == 0 {
            1.0
        } else {
            same as f64 / positions as f64
        },
        max_logit_error: max_err,
        kl_divergence: kl / positions.max(1) as f64,
        extra_columns: 0,
        activation_bits: None,
    })
}

/// KL(softmax(p) || softmax(q)) in nats, from logits.
fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |v: &[f32]| -> Vec<f64> {
        let max = v.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x)) as f64;
        let sum: f64 = v.iter().map(|x| (*x as f64 - max).exp()).sum();
        let log_z = max + sum.ln();
        v.iter().map(|x| *x as f64 - log_z).collect()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// Outlier splits per protected layer from its calibrated channel maxima (divided by the
/// smoothing factors when the channels are smoothed), at most `share` extra columns per input.
fn outlier_splits(
    channel_max: &HashMap<String, Vec<f32>>,
    factors: Option<&HashMap<String, Vec<f32>>>,
    share: f32,
) -> HashMap<String, quant::ChannelSplit> {
    channel_max
        .iter()
        .filter_map(|(name, max)| {
            let max: Vec<f32> = match factors.and_then(|f| f.get(name)) {
                Some(f) => max.iter().zip(f).map(|(m, f)| m / f).collect(),
                None => max.clone(),
            };
            let budget = (max.len() as f32 * share.max(0.0)).floor() as usize;
            Some((name.clone(), quant::ChannelSplit::calibrate(&max, budget)?))
        })
        .collect()
}

/// The input encoding of one concrete choice.
fn input_encoding(
    choice: Activations,
    channel_max: Option<&HashMap<String, Vec<f32>>>,
    protected: &[names::ProtectedLayer],
    options: &CompileOptions,
) -> Result<vendor::InputEncoding, ModelError> {
    let mut encoding = vendor::InputEncoding::default();
    let Some(max) = channel_max.filter(|_| choice.needs_calibration()) else {
        return Ok(encoding);
    };
    match choice {
        Activations::Static => {
            encoding.static_scales = Some(static_scales(max, protected, options.n_bits)?)
        }
        Activations::Smoothed => {
            encoding.input_scales = Some(smoothing_factors(max, protected, 0.5))
        }
        Activations::Outliers => {
            encoding.outliers = Some(outlier_splits(max, None, options.outlier_columns))
        }
        Activations::SmoothedOutliers => {
            let factors = smoothing_factors(max, protected, 0.5);
            encoding.outliers = Some(outlier_splits(max, Some(&factors), options.outlier_columns));
            encoding.input_scales = Some(factors);
        }
        Activations::Dynamic | Activations::Auto => {}
    }
    Ok(encoding)
}

/// The input encoding compile ships: its layers and what was measured.
pub struct ChosenEncoding {
    pub activations: Activations,
    /// How the weights were rounded (nearest when there were no calibration prompts).
    pub weight_rounding: WeightRounding,
    pub split: Vec<vendor::SplitLayer>,
    /// The chosen encoding's measurement on the calibration prompts first, then the other
    /// candidates', best first (empty without calibration prompts).
    pub reports: Vec<CalibrationReport>,
}

/// Quantizes the protected layers with `options.activations`; with `Auto`, every choice is
/// measured on the calibration prompts (teacher-forced next-token agreement with the float
/// model, then the mean KL divergence from it) and the best kept, the cheapest on a tie.
/// Without calibration prompts `Auto` is `Dynamic`. With compensated weights and several
/// candidates, they are compared with weights rounded to nearest; the chosen one is then
/// compensated and measured again (the other reports stay those of nearest rounding).
pub fn choose_encoding(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    protected: &[names::ProtectedLayer],
    options: &CompileOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<ChosenEncoding, ModelError> {
    let prompts: Vec<Vec<u32>> = options
        .calibration
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect();
    let wanted: Vec<Activations> = match options.activations {
        Activations::Auto if prompts.is_empty() => vec![Activations::Dynamic],
        Activations::Auto => Activations::ALL.to_vec(),
        choice if choice.needs_calibration() && prompts.is_empty() => {
            return Err(ModelError::Bundle(format!(
                "{} activations need calibration prompts",
                choice.name()
            )))
        }
        choice => vec![choice],
    };
    progress("quantize", 0, wanted.len());
    let compensate = options.weight_rounding == WeightRounding::Compensated && !prompts.is_empty();
    let (channel_max, moments) = match wanted.iter().any(|a| a.needs_calibration()) || compensate {
        true => {
            let stats = calibrate_inputs(cfg, tensors, protected, &prompts, compensate)?;
            (Some(stats.channel_max), stats.moments)
        }
        false => (None, None),
    };
    // Compensated rounding costs a few d_in^3 per layer: with several candidates they are
    // compared with weights rounded to nearest, and only the chosen one is compensated.
    let encode = |choice: Activations, moments: Option<&HashMap<String, Arc<Vec<f64>>>>| {
        input_encoding(choice, channel_max.as_ref(), protected, options).and_then(|mut e| {
            e.moments = moments.cloned();
            vendor::split_layers(tensors, protected, options.n_bits, &e)
        })
    };
    let compensate_each = wanted.len() == 1;
    let mut candidates = Vec::new();
    for (i, choice) in wanted.iter().enumerate() {
        // A static split can fail when a folded bias leaves the plaintext window; auto then
        // keeps the others.
        let split = encode(*choice, moments.as_ref().filter(|_| compensate_each));
        match split {
            Ok(split) => candidates.push((*choice, split)),
            // Dynamic activations need nothing calibrated: their failure is the compile's.
            Err(e)
                if options.activations == Activations::Auto && *choice != Activations::Dynamic =>
            {
                tracing::warn!(
                    activations = choice.name(),
                    error = %e,
                    "activations not applicable; not a candidate"
                )
            }
            Err(e) => return Err(e),
        }
        progress("quantize", i + 1, wanted.len());
    }
    // Each candidate with its measurement (none without calibration prompts).
    let mut measured: Vec<(
        Activations,
        Vec<vendor::SplitLayer>,
        Option<CalibrationReport>,
    )> = Vec::with_capacity(candidates.len());
    let mut float = match prompts.is_empty() {
        true => None,
        false => Some(build(cfg, tensors, &[], Mode::Disable, options.n_bits)?),
    };
    // A split measured against the float model on the calibration prompts.
    let measure = |float: &mut dyn CausalLm,
                   split: &[vendor::SplitLayer],
                   activations: Activations|
     -> Result<CalibrationReport, ModelError> {
        let mut model = simulated(cfg, tensors, protected, split)?;
        let mut report = compare(float, model.as_mut(), &prompts)?;
        report.activations = activations.name().to_string();
        report.extra_columns = split
            .iter()
            .map(|s| s.client.product_width() - s.client.d_in)
            .sum();
        report.activation_bits = split.iter().filter_map(|s| s.client.activation_bits).max();
        Ok(report)
    };
    let count = candidates.len();
    for (i, (choice, split)) in candidates.into_iter().enumerate() {
        let report = match float.as_mut() {
            None => None,
            Some(float) => {
                progress("calibrate", i, count);
                Some(measure(float.as_mut(), &split, choice)?)
            }
        };
        measured.push((choice, split, report));
    }
    if float.is_some() {
        progress("calibrate", count, count);
    }
    // Better agreement first, then lower divergence; the sort is stable, so a tie keeps the
    // cheaper (earlier) choice.
    measured.sort_by(|(_, _, a), (_, _, b)| match (a, b) {
        (Some(a), Some(b)) => better_first(a, b),
        _ => std::cmp::Ordering::Equal,
    });
    let mut measured = measured.into_iter();
    let (activations, mut split, mut first) = measured
        .next()
        .expect("dynamic activations are always a candidate");
    let mut compensated = compensate && compensate_each;
    if let (Some(m), false) = (moments.as_ref().filter(|_| compensate), compensate_each) {
        // The chosen encoding with compensated weights, measured again; should its folded bias
        // no longer fit the plaintext window, it ships rounded to nearest.
        match encode(activations, Some(m)) {
            Ok(better) => {
                if let Some(float) = float.as_mut() {
                    first = Some(measure(float.as_mut(), &better, activations)?);
                }
                split = better;
                compensated = true;
            }
            Err(e) => tracing::warn!(
                error = %e,
                "compensated rounding failed; weights rounded to nearest"
            ),
        }
    }
    // Wider activations: the same layers at the widths `options.activation_width` names.
    let mut others: Vec<CalibrationReport> = measured.filter_map(|(_, _, r)| r).collect();
    let groups = match options.group_inputs {
        true => vendor::layer_groups(cfg.naming(), cfg.num_hidden_layers(), &split),
        false => vec![],
    };
    let bits = widths(&split, options.activation_width, &groups);
    if split.iter().zip(&bits).any(|(l, b)| vendor::widens(l, *b)) {
        let mut wide = split.clone();
        for (layer, bits) in wide.iter_mut().zip(&bits) {
            vendor::widen_activations(layer, *bits);
        }
        // Auto's widths have a layout by construction; a width given for every layer may not.
        if let ActivationWidth::Bits(_) = options.activation_width {
            for layer in wide.iter().filter(|l| l.client.activation_bits.is_some()) {
                let shape =
                    fhe_linear::LayerShape::new(layer.client.product_width(), layer.client.d_out);
                let served = layer.server.activation_bits;
                if keyless_bytes(shape, served).is_none() {
                    return Err(ModelError::Bundle(format!(
                        "{}: no layout holds {served}-bit activations for its {shape} product",
                        layer.client.name
                    )));
                }
            }
        }
        let report = match float.as_mut() {
            None => None,
            Some(float) => Some(measure(float.as_mut(), &wide, activations)?),
        };
        // Auto keeps the wider activations only when they measure better (so, without
        // calibration prompts, never).
        let better = match (&report, &first) {
            (Some(w), Some(n)) => better_first(w, n) == std::cmp::Ordering::Less,
            _ => false,
        };
        if options.activation_width != ActivationWidth::Auto || better {
            split = wide;
            others.splice(0..0, first.take());
            first = report;
        } else {
            others.splice(0..0, report);
        }
    }
    let reports = first.into_iter().chain(others).collect();
    Ok(ChosenEncoding {
        activations,
        weight_rounding: match compensated {
            true => WeightRounding::Compensated,
            false => WeightRounding::Nearest,
        },
        split,
        reports,
    })
}

/// Orders calibration reports best first: better next-token agreement, then lower divergence.
fn better_first(a: &CalibrationReport, b: &CalibrationReport) -> std::cmp::Ordering {
    b.top1_agreement
        .total_cmp(&a.top1_agreement)
        .then(a.kl_divergence.total_cmp(&b.kl_divergence))
}

/// Compiles `tensors` into a client bundle directory and a server bundle file. `progress` is
/// called with (stage, done, total).
pub fn compile(
    source: &Checkpoint,
    options: &CompileOptions,
    client_dir: &Path,
    server_path: &Path,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<ClientManifest, ModelError> {
    let (cfg, tensors) = (&source.config, &source.tensors);
    protocol::Name::parse(&options.model_name).map_err(|e| ModelError::Bundle(e.to_string()))?;
    let protected = names::resolve(&options.protect, cfg.naming(), cfg.num_hidden_layers())?;
    if protected.is_empty() {
        return Err(ModelError::Bundle("no layer to protect".into()));
    }
    let chosen = choose_encoding(cfg, tensors, &protected, options, progress)?;
    let split = chosen.split;
    let mut reports = chosen.reports.into_iter();
    let calibration = reports.next();
    let alternative = reports.next();

    let groups = match options.group_inputs {
        true => vendor::layer_groups(cfg.naming(), cfg.num_hidden_layers(), &split),
        false => vec![],
    };
    let parameter_set = fhe_linear::HFHE_GLWE_2048_V1.name.to_string();
    let server_manifest = ServerManifest {
        format_version: BUNDLE_FORMAT_VERSION,
        model: options.model_name.clone(),
        parameter_set: parameter_set.clone(),
        n_bits: options.n_bits,
        layers: split
            .iter()
            .map(|s| ServerLayerInfo {
                name: s.client.name.clone(),
                parts: s.client.parts.clone(),
                d_in: s.client.product_width(),
                d_out: s.client.d_out,
                activation_bits: (s.server.activation_bits != fhe_linear::DEFAULT_ACTIVATION_BITS)
                    .then_some(s.server.activation_bits),
            })
            .collect(),
        groups: groups.clone(),
    };
    let servers: Vec<_> = split.iter().map(|s| s.server.clone()).collect();
    if let Some(dir) = server_path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ModelError::Bundle(format!("{}: {e}", dir.display())))?;
    }
    let server_sha = bundle::write_server_bundle(server_path, &server_manifest, &servers)?;
    let manifest = ClientManifest {
        format_version: BUNDLE_FORMAT_VERSION,
        model: options.model_name.clone(),
        parameter_set,
        n_bits: options.n_bits,
        activation_quantization: chosen.activations.describe().into(),
        weight_rounding: chosen.weight_rounding.name().into(),
        layers: split.into_iter().map(|s| s.client).collect(),
        server_bundle_sha256: server_sha,
        client_weights_sha256: String::new(),
        calibration,
        alternative,
        architecture: cfg.architecture().name().to_string(),
        weights_file: String::new(),
        chat_template: source.chat_template.clone(),
        eos_token_id: source.eos(),
        groups,
    };
    let weights = match &source.gguf {
        Some(gguf) => bundle::ClientWeights::GgufWithout {
            source: gguf,
            removed: vendor::protected_tensor_names(&protected),
        },
        None => bundle::ClientWeights::Tensors(vendor::client_tensors(tensors, &protected)),
    };
    bundle::write_client_bundle(
        client_dir,
        cfg,
        weights,
        source.tokenizer.as_ref(),
        manifest,
    )?;
    Ok(bundle::load_client_bundle(client_dir)?.manifest)
}
