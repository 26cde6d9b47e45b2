//! The vendor's compile step: choose protected layers, quantize them, measure the accuracy on
//! calibration prompts, and write the client and server bundles.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use tokenizers::Tokenizer;

use crate::bundle::{
    self, CalibrationReport, ClientManifest, ServerLayerInfo, ServerManifest, BUNDLE_FORMAT_VERSION,
};
use crate::config::PhiConfig;
use crate::model::Phi;
use crate::{build, names, vendor, Mode, ModelError};

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
}

/// Teacher-forced comparison of two models over `prompts`: share of identical argmax next-token
/// predictions and the largest logit difference.
pub fn compare(
    a: &mut Phi,
    b: &mut Phi,
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
    cfg: &PhiConfig,
    tensors: &HashMap<String, Tensor>,
    tokenizer: Option<&Tokenizer>,
    options: &CompileOptions,
    client_dir: &Path,
    server_path: &Path,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<ClientManifest, ModelError> {
    let protected = names::resolve(&options.protect, cfg.num_hidden_layers)?;
    if protected.is_empty() {
        return Err(ModelError::Bundle("no layer to protect".into()));
    }
    let mut split = Vec::new();
    for (i, layer) in protected.iter().enumerate() {
        progress("quantize", i, protected.len());
        split.extend(vendor::split_layers(
            tensors,
            std::slice::from_ref(layer),
            options.n_bits,
        )?);
    }
    progress("quantize", protected.len(), protected.len());

    let calibration = if options.calibration.is_empty() {
        None
    } else {
        progress("calibrate", 0, 1);
        let mut float = build(cfg, tensors, &[], Mode::Disable, options.n_bits)?;
        let mut quantized = build(
            cfg,
            tensors,
            &options.protect,
            Mode::Simulate,
            options.n_bits,
        )?;
        let report = compare(&mut float, &mut quantized, &options.calibration)?;
        progress("calibrate", 1, 1);
        Some(report)
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
        activation_quantization: "per-token symmetric, dynamic".into(),
        layers: split.into_iter().map(|s| s.client).collect(),
        server_bundle_sha256: server_sha,
        client_weights_sha256: String::new(),
        calibration,
    };
    let client_tensors = vendor::client_tensors(tensors, &protected);
    bundle::write_client_bundle(
        client_dir,
        cfg,
        &client_tensors,
        tokenizer,
        manifest.clone(),
    )?;
    Ok(bundle::load_client_bundle(client_dir)?.manifest)
}
