//! Where a protected layer's integer product is computed: in the clear (`simulate`), under real
//! encryption in this process (`execute`), or (through the service) remotely.

use std::collections::HashMap;

use fhe_linear::{ClientKey, CompiledLayer, EncryptedBatch, EncryptedResult, LayerSpec, Limits};

pub use server_bundle::{LayerGroup, ServerLayer};

use crate::ModelError;

/// Computes `Y = X Wq^T` (integers) for a protected layer, from the client's quantized input.
pub trait ProtectedBackend: Send + Sync {
    fn apply(&self, layer: &str, x: &[i16], tokens: usize) -> Result<Vec<i64>, ModelError>;

    /// The products of a group's layers with the same input, concatenated per token
    /// (`tokens x sum(d_out)`): one request where the backend can, else one per layer.
    fn apply_group(
        &self,
        group: &LayerGroup,
        x: &[i16],
        tokens: usize,
    ) -> Result<Vec<i64>, ModelError> {
        apply_each(self, group, x, tokens)
    }
}

/// A group's products one layer at a time, concatenated per token.
pub(crate) fn apply_each(
    backend: &(impl ProtectedBackend + ?Sized),
    group: &LayerGroup,
    x: &[i16],
    tokens: usize,
) -> Result<Vec<i64>, ModelError> {
    let parts = group
        .layers
        .iter()
        .map(|l| backend.apply(l, x, tokens))
        .collect::<Result<Vec<_>, _>>()?;
    let total: usize = parts.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total);
    for t in 0..tokens {
        for p in &parts {
            let d = p.len() / tokens;
            out.extend_from_slice(&p[t * d..(t + 1) * d]);
        }
    }
    Ok(out)
}

fn check_input(layer: &ServerLayer, x: &[i16], tokens: usize) -> Result<(), ModelError> {
    if tokens == 0 || x.len() != tokens * layer.weights.d_in {
        return Err(ModelError::Backend(format!(
            "layer {}: {} activations for {tokens} tokens of width {}",
            layer.name,
            x.len(),
            layer.weights.d_in
        )));
    }
    Ok(())
}

/// The server's computation in clear integers: exactly what the encrypted path must produce.
pub struct SimulateBackend {
    layers: HashMap<String, ServerLayer>,
}

impl SimulateBackend {
    pub fn new(layers: Vec<ServerLayer>) -> Self {
        SimulateBackend {
            layers: layers.into_iter().map(|l| (l.name.clone(), l)).collect(),
        }
    }
}

impl ProtectedBackend for SimulateBackend {
    fn apply(&self, layer: &str, x: &[i16], tokens: usize) -> Result<Vec<i64>, ModelError> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| ModelError::MissingLayer(layer.to_string()))?;
        check_input(l, x, tokens)?;
        Ok(fhe_linear::simulate(
            l.shape(),
            x,
            tokens,
            &l.weights.values,
            &l.bias,
        ))
    }
}

/// Real encryption in one process: the client key encrypts, the compiled layer computes on
/// ciphertexts (through their wire encoding), the client key decrypts.
pub struct ExecuteBackend {
    key: ClientKey,
    layers: HashMap<String, (LayerSpec, CompiledLayer)>,
}

impl ExecuteBackend {
    pub fn new(layers: Vec<ServerLayer>) -> Result<Self, ModelError> {
        let params = &fhe_linear::HFHE_GLWE_2048_V1;
        let mut compiled = HashMap::new();
        for l in layers {
            let spec = LayerSpec::choose_for(params, l.shape(), 1, l.activation_bits)?;
            compiled.insert(
                l.name.clone(),
                (
                    spec,
                    CompiledLayer::compile(spec, &l.weights.values, &l.bias)?,
                ),
            );
        }
        Ok(ExecuteBackend {
            key: ClientKey::generate(params),
            layers: compiled,
        })
    }
}

impl ProtectedBackend for ExecuteBackend {
    fn apply(&self, layer: &str, x: &[i16], tokens: usize) -> Result<Vec<i64>, ModelError> {
        let (spec, compiled) = self
            .layers
            .get(layer)
            .ok_or_else(|| ModelError::MissingLayer(layer.to_string()))?;
        let limits = Limits::default();
        let upload = self.key.encrypt(spec, x, tokens)?.to_bytes();
        let result = compiled
            .apply(&EncryptedBatch::from_bytes(&upload, &limits)?)?
            .to_bytes();
        Ok(self
            .key
            .decrypt(spec, &EncryptedResult::from_bytes(&result, &limits)?)?)
    }
}
