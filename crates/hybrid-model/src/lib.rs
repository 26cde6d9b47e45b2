//! The client SDK's model: decoder-only language models on candle (phi and Llama, one backbone),
//! in which any chosen linear layers run as protected layers.
//!
//! - [`transformer`]: what every architecture shares ([`CausalLm`], KV cache, causal mask,
//!   rotary embeddings, attention); [`phi`] and [`llama`] build their blocks from it, every linear
//!   through a [`linear::LinearProvider`];
//! - [`config`]: configurations ([`ModelConfig`], read from Hugging Face `config.json`);
//! - [`checkpoint`]: reading a model (`tiny`, a Hugging Face directory, a GGUF file, `smollm2`);
//!   [`gguf`] reads GGUF files, [`fetch`] brings SmolLM2 into the user's cache;
//! - [`names`]: module names in both namings of each architecture, and patterns;
//! - [`vendor`]: splitting a checkpoint into the client's part and the server's quantized layers;
//! - [`compile`] and [`bundle`]: the client and server bundles;
//! - [`backend`] and [`remote`]: where a protected layer's integer product runs ([`Mode`]);
//! - [`generate`]: prefill + decode with sampling and a per-token callback; [`chat`] renders a
//!   model's chat template;
//! - [`tiny`]: deterministic tiny models and a tokenizer for offline use and tests.

pub mod backend;
pub mod bundle;
pub mod chat;
pub mod checkpoint;
pub mod compile;
pub mod config;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod keystore;
pub mod linear;
pub mod llama;
pub mod names;
pub mod phi;
pub mod remote;
pub mod tiny;
pub mod transformer;
pub mod vendor;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use checkpoint::Checkpoint;
pub use config::{Architecture, LlamaConfig, ModelConfig, PhiConfig};
pub use generate::{generate, generate_while, GenerateOptions};
pub use llama::Llama;
pub use phi::Phi;
pub use transformer::{CausalLm, Model};

/// How protected layers are executed; the generation API is the same for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Float model, every layer local: the vendor's reference.
    Disable,
    /// Protected layers in clear integer arithmetic, exactly as the server computes them.
    Simulate,
    /// Real encryption in this process: client key, server computation, decryption.
    Execute,
    /// Protected layers sent to the vendor's gateway.
    Remote,
}

impl std::str::FromStr for Mode {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "disable" => Ok(Mode::Disable),
            "simulate" => Ok(Mode::Simulate),
            "execute" => Ok(Mode::Execute),
            "remote" => Ok(Mode::Remote),
            other => Err(ModelError::UnknownMode(other.to_string())),
        }
    }
}

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown module `{name}`; valid names: {valid}")]
    UnknownModule { name: String, valid: String },
    #[error("module {0} is protected twice")]
    OverlappingProtection(String),
    #[error("unknown mode `{0}` (disable, simulate, execute, remote)")]
    UnknownMode(String),
    #[error("mode `{0}` needs {1}")]
    ModeUnavailable(&'static str, &'static str),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "prompt of {prompt} tokens + {max_tokens} new tokens exceeds the context of {context}"
    )]
    ContextTooLong {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("checkpoint has no tensor `{0}`")]
    MissingTensor(String),
    #[error("no protected layer named `{0}`")]
    MissingLayer(String),
    #[error("protected layer: {0}")]
    Backend(String),
    #[error("bundle: {0}")]
    Bundle(String),
    #[error("server bundle: {0}")]
    ServerBundle(#[from] server_bundle::BundleError),
    #[error("service answered {status} {code}: {message}")]
    Remote {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach the service: {0}")]
    Transport(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(
        "the service's TLS certificate is not trusted ({0}); if it is signed by a private CA, \
         give the CA with --ca-cert FILE (HYBRID_CA_CERT)"
    )]
    Certificate(String),
    #[error(transparent)]
    Candle(candle_core::Error),
    #[error(transparent)]
    Fhe(#[from] fhe_linear::FheError),
    #[error(transparent)]
    Wire(#[from] fhe_linear::WireError),
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    #[error("key files: {0}")]
    Io(#[from] std::io::Error),
    #[error("model configuration: {0}")]
    Config(String),
    #[error(
        "unsupported architecture {0}; supported: Hugging Face directories of PhiForCausalLM, \
         LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM, and GGUF files of the llama \
         architecture"
    )]
    UnsupportedArchitecture(String),
    #[error("gguf: {0}")]
    Gguf(String),
    #[error("model `{0}`: {1}")]
    Source(String, String),
}

impl ModelError {
    /// This error as a candle error, to cross a `candle_nn::Module`'s forward pass (a protected
    /// layer's backend failing): carried in candle's one variant that keeps an error's type
    /// (its display is the error's own), so that [`ModelError::from`] gives it back unchanged
    /// and callers still tell a refused license from an unreachable service.
    pub fn into_candle(self) -> candle_core::Error {
        candle_core::Error::Cuda(Box::new(self))
    }

    /// Whether the same call may succeed later: the service was overloaded, rate limited,
    /// unavailable or unreachable (the retries inside the deadline did not get through).
    pub fn is_retry_later(&self) -> bool {
        match self {
            ModelError::Remote {
                status: 429, code, ..
            } => code != protocol::codes::QUOTA_EXCEEDED,
            ModelError::Remote { status, .. } => matches!(status, 502..=504),
            ModelError::Transport(_) => true,
            _ => false,
        }
    }

    /// Whether the service refused the call for what it is (license, quota, input): the same
    /// call will be refused again.
    pub fn is_refused(&self) -> bool {
        match self {
            ModelError::Remote {
                status: 429, code, ..
            } => code == protocol::codes::QUOTA_EXCEEDED,
            ModelError::Remote { status, .. } => (400..500).contains(status),
            _ => false,
        }
    }
}

impl From<candle_core::Error> for ModelError {
    /// Unwraps what [`ModelError::into_candle`] wrapped (under candle's context and backtrace
    /// layers too); any other candle error stays one.
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::Cuda(boxed) => match boxed.downcast::<ModelError>() {
                Ok(inner) => *inner,
                Err(other) => ModelError::Candle(candle_core::Error::Cuda(other)),
            },
            candle_core::Error::WithBacktrace { inner, backtrace } => {
                match ModelError::from(*inner) {
                    ModelError::Candle(inner) => {
                        ModelError::Candle(candle_core::Error::WithBacktrace {
                            inner: Box::new(inner),
                            backtrace,
                        })
                    }
                    unwrapped => unwrapped,
                }
            }
            candle_core::Error::Context { inner, context } => match ModelError::from(*inner) {
                ModelError::Candle(inner) => ModelError::Candle(candle_core::Error::Context {
                    inner: Box::new(inner),
                    context,
                }),
                unwrapped => unwrapped,
            },
            other => ModelError::Candle(other),
        }
    }
}

/// Builds the model of `cfg`'s architecture from `vb`, every linear through `provider`.
pub fn load_model(
    cfg: &ModelConfig,
    vb: VarBuilder,
    provider: &dyn linear::LinearProvider,
) -> Result<Model, ModelError> {
    Ok(match cfg {
        ModelConfig::Phi(c) => Box::new(Phi::load(c, vb, provider)?),
        ModelConfig::Llama(c) => Box::new(Llama::load(c, vb, provider)?),
    })
}

/// Builds a model from checkpoint tensors with `protect` (names or patterns) running in `mode`.
/// For `Simulate` and `Execute` the vendor's split happens in-process: the client part is built
/// from a checkpoint *without* the protected tensors.
pub fn build(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    protect: &[String],
    mode: Mode,
    n_bits: u32,
) -> Result<Model, ModelError> {
    build_with(
        cfg,
        tensors,
        protect,
        mode,
        n_bits,
        &vendor::InputEncoding::default(),
    )
}

/// [`build`] with the protected layers' inputs encoded as `encoding` says (smoothing factors,
/// static scales, outlier splits by layer name; see [`vendor::split_layers`]).
pub fn build_with(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    protect: &[String],
    mode: Mode,
    n_bits: u32,
    encoding: &vendor::InputEncoding,
) -> Result<Model, ModelError> {
    let dev = Device::Cpu;
    if mode == Mode::Disable {
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
        return load_model(cfg, vb, &linear::LocalProvider);
    }
    let protected = names::resolve(protect, cfg.naming(), cfg.num_hidden_layers())?;
    let split = vendor::split_layers(tensors, &protected, n_bits, encoding)?;
    let groups = vendor::layer_groups(cfg.naming(), cfg.num_hidden_layers(), &split);
    let backend = backend_for(mode, split.iter().map(|s| s.server.clone()).collect())?;
    let provider = linear::HybridProvider::new(
        split.into_iter().map(|s| (s.modules, s.client)).collect(),
        backend,
    )
    .with_groups(&groups);
    let vb = VarBuilder::from_tensors(
        vendor::client_tensors(tensors, &protected),
        DType::F32,
        &dev,
    );
    load_model(cfg, vb, &provider)
}

/// The backend computing protected layers in `mode` from the server's layers.
pub(crate) fn backend_for(
    mode: Mode,
    servers: Vec<backend::ServerLayer>,
) -> Result<Arc<dyn backend::ProtectedBackend>, ModelError> {
    Ok(match mode {
        Mode::Simulate => Arc::new(backend::SimulateBackend::new(servers)),
        Mode::Execute => Arc::new(backend::ExecuteBackend::new(servers)?),
        Mode::Remote => {
            return Err(ModelError::ModeUnavailable(
                "remote",
                "a client bundle and the service address (build_remote)",
            ))
        }
        Mode::Disable => {
            return Err(ModelError::Bundle(
                "disable mode runs the original float model".into(),
            ))
        }
    })
}

/// The client's model from a client bundle, protected layers through `backend`.
fn from_client_bundle(
    client: &bundle::ClientBundle,
    backend: Arc<dyn backend::ProtectedBackend>,
) -> Result<Model, ModelError> {
    let provider = linear::HybridProvider::new(client.protected()?, backend)
        .with_groups(&client.manifest.groups);
    let vb = VarBuilder::from_tensors(client.tensors.clone(), DType::F32, &Device::Cpu);
    load_model(&client.config, vb, &provider)
}

/// Builds the client's model from a client bundle with its protected layers computed by the
/// service at `remote`.
pub fn build_remote(
    client: &bundle::ClientBundle,
    remote: remote::RemoteConfig,
) -> Result<Model, ModelError> {
    let backend = Arc::new(remote::RemoteBackend::connect(
        remote,
        &client.manifest.layers,
        &client.manifest.groups,
    )?);
    from_client_bundle(client, backend)
}

/// Builds the client's model from a client bundle; `simulate` and `execute` also need the
/// server bundle it pairs with (checked by content hash).
pub fn build_from_bundles(
    client: &bundle::ClientBundle,
    server: Option<&bundle::ServerBundle>,
    mode: Mode,
) -> Result<Model, ModelError> {
    let servers = match (mode, server) {
        (Mode::Simulate | Mode::Execute, Some(server)) => {
            client.check_pair(server)?;
            server.layers.clone()
        }
        (Mode::Simulate | Mode::Execute, None) => {
            return Err(ModelError::Bundle(
                "simulate and execute need the server bundle".into(),
            ))
        }
        _ => vec![],
    };
    from_client_bundle(client, backend_for(mode, servers)?)
}
