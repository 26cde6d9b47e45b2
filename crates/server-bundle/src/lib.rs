//! The server bundle: what a model vendor keeps of a compiled model and its workers serve. One
//! safetensors file (`server.safetensors`): per protected layer its quantized weights as an `I8`
//! tensor named after the layer and the integer bias folded into its product as `NAME.bias`
//! (`I64`), and a [`ServerManifest`] in the file's metadata (format version, model, parameter set,
//! layers, and the groups of layers that read the same input). A client bundle names the
//! SHA-256 of the server bundle it pairs with.
//!
//! This crate is all a worker needs to read its bundle: it links neither the client's model
//! stack nor its tokenizers.

use std::collections::HashMap;
use std::path::Path;

use fhe_linear::LayerShape;
use quant::QuantizedWeights;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the bundle formats (client and server).
pub const FORMAT_VERSION: u32 = 1;
pub const SERVER_BUNDLE_FILE: &str = "server.safetensors";
const SERVER_METADATA_KEY: &str = "hybrid-fhe";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn bundle_err(what: impl std::fmt::Display) -> BundleError {
    BundleError::Invalid(what.to_string())
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, BundleError> {
    std::fs::read(path).map_err(|source| BundleError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    std::fs::write(path, bytes).map_err(|source| BundleError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// What the vendor keeps of one protected layer: its quantized weights and the integer bias
/// folded into the product (zeros when the client adds the float bias after dequantization).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerLayer {
    pub name: String,
    pub weights: QuantizedWeights,
    pub bias: Vec<i64>,
    /// Width of the encrypted activations: the layer spec a server computes it under carries
    /// the same ([`fhe_linear::ACTIVATION_BITS`]).
    pub activation_bits: u32,
}

impl ServerLayer {
    pub fn shape(&self) -> LayerShape {
        LayerShape::new(self.weights.d_in, self.weights.d_out)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerLayerInfo {
    pub name: String,
    pub parts: Vec<String>,
    pub d_in: usize,
    pub d_out: usize,
    /// Width of the layer's activations when wider than 8 bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_bits: Option<u32>,
}

/// Protected layers that read the same input (q, k and v of a block; gate and up), served as
/// one product: one encryption and one request for all, each layer still metered by its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerGroup {
    /// The name the group is served under (its layers' names joined by [`GROUP_SEPARATOR`]).
    pub name: String,
    /// The layers, in the order their outputs are concatenated.
    pub layers: Vec<String>,
}

/// Joins the names of a group's layers into the group's name.
pub const GROUP_SEPARATOR: &str = "__";

impl LayerGroup {
    pub fn new(layers: Vec<String>) -> Self {
        LayerGroup {
            name: layers.join(GROUP_SEPARATOR),
            layers,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerManifest {
    pub format_version: u32,
    pub model: String,
    pub parameter_set: String,
    pub n_bits: u32,
    pub layers: Vec<ServerLayerInfo>,
    /// Groups of layers served as one product.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<LayerGroup>,
}

/// Writes the server bundle; returns its bytes' SHA-256.
pub fn write_server_bundle(
    path: &Path,
    manifest: &ServerManifest,
    layers: &[ServerLayer],
) -> Result<String, BundleError> {
    // Per layer: the int8 weights under its name, the folded integer bias under `NAME.bias`.
    let mut data: Vec<(String, safetensors::Dtype, Vec<u8>, Vec<usize>)> = Vec::new();
    for l in layers {
        let weights = l.weights.values.iter().map(|v| *v as u8).collect();
        data.push((
            l.name.clone(),
            safetensors::Dtype::I8,
            weights,
            vec![l.weights.d_out, l.weights.d_in],
        ));
        let bias = l.bias.iter().flat_map(|b| b.to_le_bytes()).collect();
        data.push((
            format!("{}.bias", l.name),
            safetensors::Dtype::I64,
            bias,
            vec![l.weights.d_out],
        ));
    }
    let views = data
        .iter()
        .map(|(name, dtype, bytes, shape)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(bundle_err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = HashMap::from([(
        SERVER_METADATA_KEY.to_string(),
        serde_json::to_string(manifest).map_err(bundle_err)?,
    )]);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(bundle_err)?;
    write(path, &bytes)?;
    Ok(sha256_hex(&bytes))
}

/// A loaded server bundle.
pub struct ServerBundle {
    pub manifest: ServerManifest,
    pub layers: Vec<ServerLayer>,
    pub sha256: String,
}

/// Reads and validates a server bundle (format version, dtypes, shapes against the manifest).
pub fn load_server_bundle(path: &Path) -> Result<ServerBundle, BundleError> {
    let bytes = read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bundle_err(format!("server bundle: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(bundle_err)?;
    let manifest: ServerManifest = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(SERVER_METADATA_KEY))
        .ok_or_else(|| bundle_err("server bundle has no manifest"))
        .and_then(|s| serde_json::from_str(s).map_err(bundle_err))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(bundle_err(format!(
            "server bundle format {} (expected {FORMAT_VERSION})",
            manifest.format_version
        )));
    }
    let mut layers = Vec::new();
    for info in &manifest.layers {
        let view = st
            .tensor(&info.name)
            .map_err(|e| bundle_err(format!("layer {}: {e}", info.name)))?;
        if view.dtype() != safetensors::Dtype::I8 || view.shape() != [info.d_out, info.d_in] {
            return Err(bundle_err(format!(
                "layer {}: expected I8 {}x{}",
                info.name, info.d_out, info.d_in
            )));
        }
        let values: Vec<i8> = view.data().iter().map(|b| *b as i8).collect();
        let bias_name = format!("{}.bias", info.name);
        let bias_view = st
            .tensor(&bias_name)
            .map_err(|e| bundle_err(format!("{bias_name}: {e}")))?;
        if bias_view.dtype() != safetensors::Dtype::I64 || bias_view.shape() != [info.d_out] {
            return Err(bundle_err(format!(
                "{bias_name}: expected I64 {}",
                info.d_out
            )));
        }
        let bias: Vec<i64> = bias_view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        layers.push(ServerLayer {
            name: info.name.clone(),
            weights: quant::QuantizedWeights {
                n_bits: manifest.n_bits,
                d_out: info.d_out,
                d_in: info.d_in,
                scales: vec![],
                values,
            },
            bias,
            activation_bits: info
                .activation_bits
                .unwrap_or(fhe_linear::DEFAULT_ACTIVATION_BITS),
        });
    }
    Ok(ServerBundle {
        manifest,
        layers,
        sha256: sha256_hex(&bytes),
    })
}

impl ServerBundle {
    /// What a worker serves: each group's layers fused into one (rows stacked in the group's
    /// order, named after the group, with its layers' names), then every layer in no group.
    pub fn served(&self) -> Result<Vec<(ServerLayer, Vec<String>)>, BundleError> {
        let by_name: HashMap<&str, &ServerLayer> =
            self.layers.iter().map(|l| (l.name.as_str(), l)).collect();
        let mut grouped = std::collections::HashSet::new();
        let mut out = Vec::new();
        for group in &self.manifest.groups {
            let mut values = Vec::new();
            let mut bias = Vec::new();
            let mut d_in = None;
            let mut activation_bits = None;
            for name in &group.layers {
                let layer = by_name
                    .get(name.as_str())
                    .ok_or_else(|| bundle_err(format!("group {}: no layer {name}", group.name)))?;
                if *d_in.get_or_insert(layer.weights.d_in) != layer.weights.d_in {
                    return Err(bundle_err(format!(
                        "group {}: its layers differ in input width",
                        group.name
                    )));
                }
                if *activation_bits.get_or_insert(layer.activation_bits) != layer.activation_bits {
                    return Err(bundle_err(format!(
                        "group {}: its layers differ in activation width",
                        group.name
                    )));
                }
                if !grouped.insert(name.as_str()) {
                    return Err(bundle_err(format!("layer {name} is in two groups")));
                }
                values.extend_from_slice(&layer.weights.values);
                bias.extend_from_slice(&layer.bias);
            }
            let d_in = d_in.ok_or_else(|| bundle_err(format!("group {} is empty", group.name)))?;
            out.push((
                ServerLayer {
                    name: group.name.clone(),
                    weights: QuantizedWeights {
                        n_bits: self.manifest.n_bits,
                        d_out: bias.len(),
                        d_in,
                        scales: vec![],
                        values,
                    },
                    bias,
                    activation_bits: activation_bits.unwrap_or(fhe_linear::DEFAULT_ACTIVATION_BITS),
                },
                group.layers.clone(),
            ));
        }
        for layer in &self.layers {
            if !grouped.contains(layer.name.as_str()) {
                out.push((layer.clone(), vec![]));
            }
        }
        Ok(out)
    }
}
