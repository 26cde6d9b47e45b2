//! Compiled bundles: what the vendor ships to the customer (the client bundle) and what it
//! keeps (the server bundle), versioned and paired by content hash.
//!
//! Client bundle (a directory):
//! - `config.json`: the model configuration (Hugging Face's, naming its architecture);
//! - `model.safetensors` (models read from safetensors) or `model.gguf` (models read from a GGUF
//!   file, every local tensor in its own quantization): every tensor of the model *except* the
//!   protected layers' weights and biases (they are removed, not zeroed);
//! - `tokenizer.json` (when the model has one);
//! - `hybrid-manifest.json`: [`ClientManifest`] (also the chat template and end-of-sequence
//!   token, when the model has them).
//!
//! Server bundle (one file, `server.safetensors`): the protected layers' quantized weights as
//! `I8` tensors named after the layers, and a [`ServerManifest`] in the safetensors metadata.
//!
//! What the client learns of a protected layer ([`crate::linear::ClientLayer`]): its name, shape,
//! the per-output-channel weight scales (`max_j |W_rj| / 127`), and either the float bias (dynamic
//! per-token activations) or one calibrated activation scale (static activations: the bias is
//! folded into the server's integer product and the client gets zeros). Never the weights.
//! `compile` measures both on the calibration prompts and keeps the more accurate by default.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::linear::ClientLayer;
use crate::names::Module;
use crate::ModelError;

pub use server_bundle::{
    load_server_bundle, sha256_hex, write_server_bundle, LayerGroup, ServerBundle, ServerLayer,
    ServerLayerInfo, ServerManifest, FORMAT_VERSION as BUNDLE_FORMAT_VERSION, SERVER_BUNDLE_FILE,
};

pub const MANIFEST_FILE: &str = "hybrid-manifest.json";
pub const CLIENT_WEIGHTS_FILE: &str = "model.safetensors";
/// The client's weights of a model read from a GGUF file.
pub const CLIENT_GGUF_FILE: &str = "model.gguf";

/// Accuracy of the compiled model against the float model on the calibration prompts
/// (teacher-forced, every position).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    /// The activation encoding measured ([`crate::compile::Activations`]'s names).
    #[serde(default)]
    pub activations: String,
    pub prompts: usize,
    pub positions: usize,
    /// Share of positions whose most likely next token is the float model's.
    pub top1_agreement: f64,
    pub max_logit_error: f32,
    /// Mean KL divergence of the protected model's next-token distribution from the float
    /// model's (nats per position).
    #[serde(default)]
    pub kl_divergence: f64,
    /// Product columns added by outlier splits, over all protected layers (their cost).
    #[serde(default)]
    pub extra_columns: usize,
    /// The widest activations of any protected layer, when wider than the weights' bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_bits: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientManifest {
    pub format_version: u32,
    pub model: String,
    /// The FHE parameter set the server computes with.
    pub parameter_set: String,
    pub n_bits: u32,
    /// How the client quantizes a protected layer's input.
    pub activation_quantization: String,
    /// How the protected layers' weights were rounded (`nearest`, `compensated`).
    #[serde(default = "default_weight_rounding")]
    pub weight_rounding: String,
    pub layers: Vec<ClientLayer>,
    /// SHA-256 of the server bundle this client bundle pairs with.
    pub server_bundle_sha256: String,
    /// SHA-256 of `model.safetensors`.
    pub client_weights_sha256: String,
    pub calibration: Option<CalibrationReport>,
    /// The accuracy of the activation quantization that was measured and not chosen.
    #[serde(default)]
    pub alternative: Option<CalibrationReport>,
    /// The model's architecture (`phi`, `llama`): must match `config.json`'s.
    #[serde(default = "default_architecture")]
    pub architecture: String,
    /// The file holding the client's tensors ([`CLIENT_WEIGHTS_FILE`] or [`CLIENT_GGUF_FILE`]).
    #[serde(default = "default_weights_file")]
    pub weights_file: String,
    /// The model's chat template (Jinja), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// The token that ends a generation, when the model names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    /// Protected layers that read the same input, computed as one product (one encryption,
    /// one request); the server bundle has the same groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<LayerGroup>,
}

fn default_weight_rounding() -> String {
    "nearest".into()
}

fn default_architecture() -> String {
    "phi".into()
}

fn default_weights_file() -> String {
    CLIENT_WEIGHTS_FILE.into()
}

fn bundle_err(what: impl std::fmt::Display) -> ModelError {
    ModelError::Bundle(what.to_string())
}

/// Reads a safetensors checkpoint one tensor at a time: memory peaks at the tensors plus the
/// largest one's bytes, not at twice the file.
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, ModelError> {
    Ok(read_safetensors_hashed(path)?.0)
}

/// Reads a safetensors file one tensor at a time (so that memory peaks at the tensors plus one
/// tensor's bytes, not twice the file) while hashing every byte of it in order.
fn read_safetensors_hashed(path: &Path) -> Result<(HashMap<String, Tensor>, String), ModelError> {
    use std::io::Read;
    let fail = |m: String| bundle_err(format!("{}: {m}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    let mut hasher = Sha256::new();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| fail(e.to_string()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > (100 << 20) || 8 + header_len > file_len {
        return Err(fail("bad safetensors header length".into()));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| fail(e.to_string()))?;
    hasher.update(len_bytes);
    hasher.update(&header);
    #[derive(serde::Deserialize)]
    struct Info {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let entries: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| fail(format!("header: {e}")))?;
    let mut infos: Vec<(String, Info)> = entries
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, v)| {
            serde_json::from_value::<Info>(v)
                .map(|i| (name.clone(), i))
                .map_err(|e| fail(format!("tensor {name}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    infos.sort_by_key(|(_, i)| i.data_offsets);
    let mut at = 0u64;
    let mut tensors = HashMap::with_capacity(infos.len());
    let mut bytes = Vec::new();
    for (name, info) in infos {
        let (start, end) = info.data_offsets;
        if start != at || end < start || 8 + header_len + end > file_len {
            return Err(fail(format!("tensor {name}: data not contiguous")));
        }
        let dtype = match info.dtype.as_str() {
            "F32" => candle_core::DType::F32,
            "F16" => candle_core::DType::F16,
            "BF16" => candle_core::DType::BF16,
            "F64" => candle_core::DType::F64,
            "I64" => candle_core::DType::I64,
            "U32" => candle_core::DType::U32,
            "U8" => candle_core::DType::U8,
            other => return Err(fail(format!("tensor {name}: dtype {other} unsupported"))),
        };
        bytes.resize((end - start) as usize, 0);
        file.read_exact(&mut bytes)
            .map_err(|e| fail(e.to_string()))?;
        hasher.update(&bytes);
        let tensor =
            Tensor::from_raw_buffer(&bytes, dtype, &info.shape, &candle_core::Device::Cpu)?;
        tensors.insert(name, tensor);
        at = end;
    }
    if 8 + header_len + at != file_len {
        return Err(fail("trailing bytes after the tensors".into()));
    }
    let sha = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((tensors, sha))
}

fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|e| bundle_err(format!("{}: {e}", path.display())))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    std::fs::write(path, bytes).map_err(|e| bundle_err(format!("{}: {e}", path.display())))
}

/// A loaded client bundle.
pub struct ClientBundle {
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
    pub manifest: ClientManifest,
    pub tokenizer: Option<Tokenizer>,
}

impl ClientBundle {
    /// The protected layers with the modules each computes.
    pub fn protected(&self) -> Result<Vec<(Vec<Module>, ClientLayer)>, ModelError> {
        let all = self.config.naming().layers(self.config.num_hidden_layers());
        self.manifest
            .layers
            .iter()
            .map(|l| {
                let known = all
                    .iter()
                    .find(|n| n.name == l.name)
                    .ok_or_else(|| bundle_err(format!("unknown layer {}", l.name)))?;
                Ok((known.parts.clone(), l.clone()))
            })
            .collect()
    }

    /// Checks that `server` is the bundle this client bundle was compiled with.
    pub fn check_pair(&self, server: &ServerBundle) -> Result<(), ModelError> {
        if server.sha256 != self.manifest.server_bundle_sha256 {
            return Err(bundle_err(format!(
                "server bundle {} does not pair with this client bundle (expects {})",
                server.sha256, self.manifest.server_bundle_sha256
            )));
        }
        Ok(())
    }
}

/// Reads and validates a client bundle directory.
pub fn load_client_bundle(dir: &Path) -> Result<ClientBundle, ModelError> {
    let manifest: ClientManifest = serde_json::from_slice(&read(&dir.join(MANIFEST_FILE))?)
        .map_err(|e| bundle_err(format!("manifest: {e}")))?;
    if manifest.format_version != BUNDLE_FORMAT_VERSION {
        return Err(bundle_err(format!(
            "client bundle format {} (expected {BUNDLE_FORMAT_VERSION})",
            manifest.format_version
        )));
    }
    for layer in &manifest.layers {
        if let Some(split) = &layer.outliers {
            split
                .validate(layer.d_in)
                .map_err(|e| bundle_err(format!("layer {}: {e}", layer.name)))?;
        }
    }
    let config = ModelConfig::from_json(&read(&dir.join("config.json"))?)?;
    if config.architecture().name() != manifest.architecture {
        return Err(bundle_err(format!(
            "config.json describes a {} model, the manifest a {} model",
            config.architecture().name(),
            manifest.architecture
        )));
    }
    let weights = dir.join(&manifest.weights_file);
    let vouched = |sha: &str| match sha == manifest.client_weights_sha256 {
        true => Ok(()),
        false => Err(bundle_err(format!(
            "{} does not match its manifest (modified?)",
            manifest.weights_file
        ))),
    };
    let tensors = match manifest.weights_file.as_str() {
        CLIENT_WEIGHTS_FILE => {
            let (tensors, sha) = read_safetensors_hashed(&weights)?;
            vouched(&sha)?;
            tensors
        }
        CLIENT_GGUF_FILE => {
            // Read once, and parsed only once the manifest vouches for the bytes.
            let bytes = read(&weights)?;
            vouched(&sha256_hex(&bytes))?;
            crate::gguf::tensors_from_bytes(&bytes)?
        }
        other => return Err(bundle_err(format!("unknown client weights file `{other}`"))),
    };
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(Tokenizer::from_file(&tok_path).map_err(|e| ModelError::Tokenizer(e.to_string()))?)
    } else {
        None
    };
    Ok(ClientBundle {
        config,
        tensors,
        manifest,
        tokenizer,
    })
}

/// The client's tensors, as a bundle stores them.
pub enum ClientWeights<'a> {
    /// Written as `model.safetensors`.
    Tensors(HashMap<String, Tensor>),
    /// The GGUF file `source` without the tensors named (Hugging Face names) in `removed`,
    /// written as `model.gguf`; the other tensors keep their quantization.
    GgufWithout {
        source: &'a Path,
        removed: Vec<String>,
    },
}

/// Writes the client bundle directory.
pub fn write_client_bundle(
    dir: &Path,
    config: &ModelConfig,
    weights: ClientWeights,
    tokenizer: Option<&Tokenizer>,
    mut manifest: ClientManifest,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| bundle_err(format!("{}: {e}", dir.display())))?;
    write(&dir.join("config.json"), &config.to_json()?)?;
    let file = match weights {
        ClientWeights::Tensors(tensors) => {
            candle_core::safetensors::save(&tensors, dir.join(CLIENT_WEIGHTS_FILE))?;
            CLIENT_WEIGHTS_FILE
        }
        ClientWeights::GgufWithout { source, removed } => {
            crate::gguf::write_without(source, &dir.join(CLIENT_GGUF_FILE), &removed)?;
            CLIENT_GGUF_FILE
        }
    };
    for stale in [CLIENT_WEIGHTS_FILE, CLIENT_GGUF_FILE] {
        if stale != file {
            std::fs::remove_file(dir.join(stale)).ok();
        }
    }
    manifest.weights_file = file.to_string();
    manifest.architecture = config.architecture().name().to_string();
    manifest.client_weights_sha256 = sha256_hex(&read(&dir.join(file))?);
    if let Some(t) = tokenizer {
        t.save(dir.join("tokenizer.json"), false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    }
    write(
        &dir.join(MANIFEST_FILE),
        &serde_json::to_vec_pretty(&manifest).map_err(bundle_err)?,
    )
}
