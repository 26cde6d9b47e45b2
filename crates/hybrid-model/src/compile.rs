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
    per_module, ChannelMax, HybridProvider, Linear, LinearProvider, LocalLinear, LocalProvider,
    Recording,
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
    /// Measure every choice on the calibration prompts and keep the most accurate (dynamic on
    /// a tie).
    Auto,
}

impl std::str::FromStr for Activations {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "dynamic" => Ok(Activations::Dynamic),
            "static" => Ok(Activations::Static),
            "smoothed" => Ok(Activations::Smoothed),
            "auto" => Ok(Activations::Auto),
            other => Err(ModelError::Bundle(format!(
                "activations `{other}`: dynamic, static, smoothed or auto"
            ))),
        }
    }
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
}

/// The float model, with the inputs of protected layers recorded.
struct RecordingProvider {
    protected: Vec<names::ProtectedLayer>,
    stats: ChannelMax,
}

impl RecordingProvider {
    fn wrap(&self, modules: &[names::Module], inner: Box<dyn Linear>) -> Box<dyn Linear> {
        match self.protected.iter().find(|l| l.parts == modules) {
            Some(l) => Box::new(Recording {
                inner,
                name: l.name.clone(),
                stats: self.stats.clone(),
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
    let stats = Arc::new(Mutex::new(HashMap::new()));
    let provider = RecordingProvider {
        protected: protected.to_vec(),
        stats: stats.clone(),
    };
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let mut model = load_model(cfg, vb, &provider)?;
    for p in prompts.iter().filter(|p| !p.is_empty()) {
        model.clear_kv_cache();
        model.forward_all(p)?;
    }
    drop(model);
    let stats = stats.lock().expect("calibration stats").clone();
    Ok(stats)
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
fn simulated(
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
    let (mut same, mut positions, mut max_err) = (0usize, 0usize, 0f32);
    for p in prompts.iter().filter(|p| !p.is_empty()) {
        a.clear_kv_cache();
        b.clear_kv_cache();
        let la = a.forward_all(p)?.to_vec2::<f32>()?;
        let lb = b.forward_all(p)?.to_vec2::<f32>()?;
        for (x, y) in la.iter().zip(&lb) {
            let argmax = |v: &Vec<f32>| (0..v.len()).max_by(|i, j| v[*i].total_cmp(&v[*j]));
            same += usize::from(argmax(x) == argmax(y));
            positions += 1;
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
    })
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
    let prompts: Vec<Vec<u32>> = options
        .calibration
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect();
    let choice = match (options.activations, prompts.is_empty()) {
        (Activations::Static | Activations::Smoothed, true) => {
            return Err(ModelError::Bundle(
                "static and smoothed activations need calibration prompts".into(),
            ))
        }
        (Activations::Auto, true) => Activations::Dynamic,
        (choice, _) => choice,
    };
    progress("quantize", 0, 2);
    let dynamic = vendor::split_layers(tensors, &protected, options.n_bits, None, None)?;
    let channel_max = match choice {
        Activations::Dynamic => None,
        _ => Some(calibrate(cfg, tensors, &protected, &prompts)?),
    };
    // A static split can fail when a folded bias leaves the plaintext window; auto then keeps
    // the others.
    let static_split = match (&channel_max, choice) {
        (Some(max), Activations::Static | Activations::Auto) => {
            let scales = static_scales(max, &protected, options.n_bits)?;
            match vendor::split_layers(tensors, &protected, options.n_bits, Some(&scales), None) {
                Ok(split) => Some(split),
                Err(e) if choice == Activations::Auto => {
                    eprintln!("static activations not applicable ({e}); not a candidate");
                    None
                }
                Err(e) => return Err(e),
            }
        }
        _ => None,
    };
    let smoothed_split = match (&channel_max, choice) {
        (Some(max), Activations::Smoothed | Activations::Auto) => {
            let factors = smoothing_factors(max, &protected, 0.5);
            Some(vendor::split_layers(
                tensors,
                &protected,
                options.n_bits,
                None,
                Some(&factors),
            )?)
        }
        _ => None,
    };
    progress("quantize", 2, 2);

    let mut candidates: Vec<(&str, Vec<vendor::SplitLayer>)> = Vec::new();
    if matches!(choice, Activations::Dynamic | Activations::Auto) {
        candidates.push(("dynamic", dynamic));
    }
    if let Some(split) = smoothed_split {
        candidates.push(("smoothed", split));
    }
    if let Some(split) = static_split {
        candidates.push(("static", split));
    }
    let mut reports = Vec::new();
    if !prompts.is_empty() {
        let mut float = build(cfg, tensors, &[], Mode::Disable, options.n_bits)?;
        let count = candidates.len();
        for (i, (name, split)) in candidates.iter().enumerate() {
            progress("calibrate", i, count);
            let mut model = simulated(cfg, tensors, &protected, split)?;
            let mut report = compare(float.as_mut(), model.as_mut(), &prompts)?;
            report.activations = name.to_string();
            reports.push(report);
        }
        progress("calibrate", count, count);
    }
    // The chosen report first; on a tie, dynamic (it clips nothing and needs no statistics).
    reports.sort_by(|a, b| {
        b.top1_agreement
            .total_cmp(&a.top1_agreement)
            .then(a.activations.cmp(&b.activations))
    });
    let chosen = reports
        .first()
        .map(|r| r.activations.clone())
        .unwrap_or_else(|| candidates[0].0.to_string());
    let split = candidates
        .into_iter()
        .find(|(name, _)| *name == chosen)
        .map(|(_, split)| split)
        .expect("the chosen candidate was measured");
    let mut reports = reports.into_iter();
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
                d_in: s.client.d_in,
                d_out: s.client.d_out,
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
        activation_quantization: match chosen.as_str() {
            "static" => {
                "per-layer symmetric, static (calibrated); bias folded into the server's product"
                    .into()
            }
            "smoothed" => "per-token symmetric, dynamic, channels smoothed (calibrated)".into(),
            _ => "per-token symmetric, dynamic".into(),
        },
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
