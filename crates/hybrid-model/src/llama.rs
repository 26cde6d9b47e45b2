//! Llama-architecture models (SmolLM2 and the like) loaded from GGUF files, with every linear of
//! the blocks built the same pluggable way as phi's: in the clear, or protected (quantized by us,
//! computed by a [`ProtectedBackend`]: `simulate` in clear integers, `execute` under encryption).
//!
//! Weights are dequantized from the GGUF's own quantization to f32 first; the float model
//! (`disable`) is the reference, and protected layers are then quantized by `quant` exactly as for
//! phi. GGUF files keep llama.cpp's layout: q and k rows are ordered for the interleaved rotary
//! embedding, which this model applies accordingly (checked against candle's own GGUF Llama).
//!
//! Layer names: `model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`
//! (Hugging Face), or the GGUF names `blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,
//! ffn_down}`; `*` matches any part of a name.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Embedding, RmsNorm};
use tokenizers::Tokenizer;

use crate::backend::ServerLayer;
use crate::linear::{ClientLayer, Linear, LocalLinear, ProtectedLinear, Recording};
use crate::vendor::tensor;
use crate::{Mode, ModelError};

/// Hyper-parameters of a Llama model, as read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// A linear of a Llama block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LlamaProj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LlamaProj {
    pub const ALL: [LlamaProj; 7] = [
        LlamaProj::Q,
        LlamaProj::K,
        LlamaProj::V,
        LlamaProj::O,
        LlamaProj::Gate,
        LlamaProj::Up,
        LlamaProj::Down,
    ];

    /// The attention projections.
    pub const ATTENTION: [LlamaProj; 4] = [LlamaProj::Q, LlamaProj::K, LlamaProj::V, LlamaProj::O];

    /// Hugging Face name of this linear in block `i`.
    pub fn hf_name(self, i: usize) -> String {
        let part = match self {
            LlamaProj::Q => "self_attn.q_proj",
            LlamaProj::K => "self_attn.k_proj",
            LlamaProj::V => "self_attn.v_proj",
            LlamaProj::O => "self_attn.o_proj",
            LlamaProj::Gate => "mlp.gate_proj",
            LlamaProj::Up => "mlp.up_proj",
            LlamaProj::Down => "mlp.down_proj",
        };
        format!("model.layers.{i}.{part}")
    }

    /// GGUF name of this linear in block `i`.
    pub fn gguf_name(self, i: usize) -> String {
        let part = match self {
            LlamaProj::Q => "attn_q",
            LlamaProj::K => "attn_k",
            LlamaProj::V => "attn_v",
            LlamaProj::O => "attn_output",
            LlamaProj::Gate => "ffn_gate",
            LlamaProj::Up => "ffn_up",
            LlamaProj::Down => "ffn_down",
        };
        format!("blk.{i}.{part}")
    }
}

/// The linears (block, projection) named by `patterns` (either naming, `*` wildcards,
/// comma-separated lists), in model order.
pub fn resolve(patterns: &[String], layers: usize) -> Result<Vec<(usize, LlamaProj)>, ModelError> {
    let mut chosen = Vec::new();
    for pattern in patterns
        .iter()
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let mut matched = false;
        for i in 0..layers {
            for p in LlamaProj::ALL {
                if crate::names::glob(pattern, &p.hf_name(i))
                    || crate::names::glob(pattern, &p.gguf_name(i))
                {
                    matched = true;
                    if !chosen.contains(&(i, p)) {
                        chosen.push((i, p));
                    }
                }
            }
        }
        if !matched {
            let last = layers.saturating_sub(1);
            return Err(ModelError::UnknownModule {
                name: pattern.to_string(),
                valid: format!(
                    "model.layers.{{0..{last}}}.self_attn.{{q,k,v,o}}_proj, \
                     model.layers.{{0..{last}}}.mlp.{{gate,up,down}}_proj; GGUF: \
                     blk.{{0..{last}}}.{{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}}"
                ),
            });
        }
    }
    chosen.sort();
    Ok(chosen)
}

/// A model read from a GGUF file: configuration, f32 tensors under Hugging Face names, and the
/// tokenizer described by its metadata.
pub struct LlamaCheckpoint {
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    pub eos_token: Option<u32>,
}

fn gguf_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Bundle(format!("gguf: {e}"))
}

/// Reads a Llama GGUF file, dequantizing every tensor to f32.
pub fn load_gguf(path: &Path) -> Result<LlamaCheckpoint, ModelError> {
    use candle_core::quantized::gguf_file;
    let mut file =
        std::fs::File::open(path).map_err(|e| gguf_err(format!("{}: {e}", path.display())))?;
    let content = gguf_file::Content::read(&mut file).map_err(gguf_err)?;
    let md = |k: &str| {
        content
            .metadata
            .get(k)
            .ok_or_else(|| gguf_err(format!("no metadata `{k}`")))
    };
    let arch = md("general.architecture")?
        .to_string()
        .map_err(gguf_err)?
        .clone();
    if arch != "llama" {
        return Err(gguf_err(format!("architecture `{arch}` (llama expected)")));
    }
    let u = |k: &str| -> Result<usize, ModelError> {
        Ok(md(&format!("llama.{k}"))?.to_u32().map_err(gguf_err)? as usize)
    };
    let tokens: Vec<String> = md("tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(gguf_err)?
        .iter()
        .map(|v| v.to_string().cloned().map_err(gguf_err))
        .collect::<Result<_, _>>()?;
    let heads = u("attention.head_count")?;
    let config = LlamaConfig {
        vocab_size: tokens.len(),
        hidden_size: u("embedding_length")?,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: u("attention.head_count_kv").unwrap_or(heads),
        rms_norm_eps: md("llama.attention.layer_norm_rms_epsilon")?
            .to_f32()
            .map_err(gguf_err)? as f64,
        rope_theta: md("llama.rope.freq_base")
            .and_then(|v| v.to_f32().map_err(gguf_err))
            .unwrap_or(10_000.0),
        max_position_embeddings: u("context_length").unwrap_or(2048),
    };
    let device = Device::Cpu;
    let mut tensors = HashMap::new();
    let mut get = |gguf: &str, hf: String| -> Result<(), ModelError> {
        let t = content
            .tensor(&mut file, gguf, &device)
            .map_err(|e| gguf_err(format!("{gguf}: {e}")))?
            .dequantize(&device)?;
        tensors.insert(hf, t.to_dtype(DType::F32)?);
        Ok(())
    };
    get("token_embd.weight", "model.embed_tokens.weight".into())?;
    get("output_norm.weight", "model.norm.weight".into())?;
    if content.tensor_infos.contains_key("output.weight") {
        get("output.weight", "lm_head.weight".into())?;
    }
    for i in 0..config.num_hidden_layers {
        get(
            &format!("blk.{i}.attn_norm.weight"),
            format!("model.layers.{i}.input_layernorm.weight"),
        )?;
        get(
            &format!("blk.{i}.ffn_norm.weight"),
            format!("model.layers.{i}.post_attention_layernorm.weight"),
        )?;
        for p in LlamaProj::ALL {
            get(
                &format!("{}.weight", p.gguf_name(i)),
                format!("{}.weight", p.hf_name(i)),
            )?;
        }
    }
    let tokenizer = gguf_tokenizer(&content, tokens)?;
    let eos_token = content
        .metadata
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok());
    Ok(LlamaCheckpoint {
        config,
        tensors,
        tokenizer,
        eos_token,
    })
}

/// The byte-level BPE tokenizer a GGUF file describes (`tokenizer.ggml.model = gpt2`): vocabulary,
/// merges, and its control tokens as special tokens.
fn gguf_tokenizer(
    content: &candle_core::quantized::gguf_file::Content,
    tokens: Vec<String>,
) -> Result<Tokenizer, ModelError> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, PreTokenizerWrapper};
    let md = |k: &str| content.metadata.get(k);
    let model = md("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(gguf_err(format!(
            "tokenizer model `{model}` (byte-level BPE, `gpt2`, expected)"
        )));
    }
    let merges: Vec<(String, String)> = md("tokenizer.ggml.merges")
        .ok_or_else(|| gguf_err("no tokenizer.ggml.merges"))?
        .to_vec()
        .map_err(gguf_err)?
        .iter()
        .filter_map(|v| v.to_string().ok())
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // Control tokens (type 3) such as <|im_start|> are matched whole, never split.
    if let Some(types) = md("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| t.to_i32().ok() == Some(3))
            .map(|(_, tok)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
    }
    Ok(tokenizer)
}

/// How activations are prepared for quantization.
#[derive(Debug, Clone, Default)]
pub enum Smoothing {
    /// Quantize the linear's input as it is.
    #[default]
    None,
    /// For linears fed by an RMSNorm (q, k, v, gate, up), quantize the normalized activations
    /// before the norm's gain and fold the gain into the weight columns. The gain is a client
    /// tensor already, so the client learns nothing new.
    NormGain,
    /// Divide each input channel by `channel_max^alpha`, its largest magnitude on calibration
    /// prompts ([`Llama::calibrate`]) to the power `alpha`, and multiply the weight columns by the
    /// same: outlier channels no longer set every token's quantization step. The factors come
    /// from activations only (which the client computes itself), not from the weights.
    Calibrated {
        alpha: f32,
        channel_max: Arc<HashMap<String, Vec<f32>>>,
    },
}

/// The per-input-channel divisors `smoothing` gives linear `p` of block `i`.
fn input_scale(
    tensors: &HashMap<String, Tensor>,
    i: usize,
    p: LlamaProj,
    smoothing: &Smoothing,
) -> Result<Option<Vec<f32>>, ModelError> {
    let scale: Vec<f32> = match smoothing {
        Smoothing::None => return Ok(None),
        Smoothing::NormGain => {
            let norm = match p {
                LlamaProj::O | LlamaProj::Down => return Ok(None),
                LlamaProj::Q | LlamaProj::K | LlamaProj::V => "input_layernorm",
                LlamaProj::Gate | LlamaProj::Up => "post_attention_layernorm",
            };
            tensor(tensors, &format!("model.layers.{i}.{norm}.weight"))?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
        }
        Smoothing::Calibrated { alpha, channel_max } => {
            let name = p.hf_name(i);
            let max = channel_max.get(&name).ok_or_else(|| {
                ModelError::Bundle(format!("no calibration statistics for {name}"))
            })?;
            max.iter().map(|m| m.powf(*alpha)).collect()
        }
    };
    // A zero factor would divide by zero; such a channel carries nothing, keep it as is.
    Ok(Some(
        scale
            .into_iter()
            .map(|g| if g.abs() > 1e-6 { g } else { 1.0 })
            .collect(),
    ))
}

/// Quantizes the protected linears (no bias in Llama): the client's part and the server's.
pub fn split_layers(
    tensors: &HashMap<String, Tensor>,
    protected: &[(usize, LlamaProj)],
    n_bits: u32,
    smoothing: Smoothing,
) -> Result<(Vec<ClientLayer>, Vec<ServerLayer>), ModelError> {
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for (i, p) in protected {
        let name = p.hf_name(*i);
        let w = tensor(tensors, &format!("{name}.weight"))?;
        let (d_out, d_in) = w.dims2()?;
        let mut values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let scale = input_scale(tensors, *i, *p, &smoothing)?;
        if let Some(factors) = &scale {
            quant::scale_columns(&mut values, factors);
        }
        let q = quant::quantize_weights(&values, d_out, d_in, n_bits)?;
        clients.push(ClientLayer {
            name: name.clone(),
            parts: vec![name.clone()],
            d_in,
            d_out,
            n_bits,
            weight_scales: q.scales.clone(),
            bias: vec![0.0; d_out],
            activation_scale: None,
            input_scale: scale,
        });
        servers.push(ServerLayer {
            name,
            weights: q,
            bias: vec![0; d_out],
        });
    }
    Ok((clients, servers))
}

struct Block {
    attn_norm: RmsNorm,
    q: Box<dyn Linear>,
    k: Box<dyn Linear>,
    v: Box<dyn Linear>,
    o: Box<dyn Linear>,
    mlp_norm: RmsNorm,
    gate: Box<dyn Linear>,
    up: Box<dyn Linear>,
    down: Box<dyn Linear>,
    kv_cache: Option<(Tensor, Tensor)>,
}

/// A Llama model whose block linears are local or protected.
pub struct Llama {
    config: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Box<dyn Linear>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl Llama {
    /// Builds the model from f32 tensors; `protect` names linears (see the module docs) whose
    /// products go through `mode`'s backend (`disable` ignores them).
    pub fn build(
        config: &LlamaConfig,
        tensors: &HashMap<String, Tensor>,
        protect: &[String],
        mode: Mode,
        n_bits: u32,
    ) -> Result<Self, ModelError> {
        Self::build_with(config, tensors, protect, mode, n_bits, Smoothing::default())
    }

    /// The largest magnitude of each input channel of every block linear, over `prompts` run
    /// through the float model: the statistics of [`Smoothing::Calibrated`].
    pub fn calibrate(
        config: &LlamaConfig,
        tensors: &HashMap<String, Tensor>,
        prompts: &[Vec<u32>],
    ) -> Result<HashMap<String, Vec<f32>>, ModelError> {
        let max = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let record = |name: String| -> Result<Box<dyn Linear>, ModelError> {
            let w = tensor(tensors, &format!("{name}.weight"))?;
            Ok(Box::new(Recording {
                name,
                inner: Box::new(LocalLinear::new(w, None)),
                stats: max.clone(),
            }))
        };
        let mut model = Self::assemble(config, tensors, record)?;
        for prompt in prompts.iter().filter(|p| !p.is_empty()) {
            model.clear_kv_cache();
            model.forward_all(prompt)?;
        }
        drop(model);
        let stats = max.lock().expect("calibration statistics").clone();
        Ok(stats)
    }

    /// [`Llama::build`] with a choice of activation [`Smoothing`].
    pub fn build_with(
        config: &LlamaConfig,
        tensors: &HashMap<String, Tensor>,
        protect: &[String],
        mode: Mode,
        n_bits: u32,
        smoothing: Smoothing,
    ) -> Result<Self, ModelError> {
        let protected = match mode {
            Mode::Disable => vec![],
            _ => resolve(protect, config.num_hidden_layers)?,
        };
        let (clients, servers) = split_layers(tensors, &protected, n_bits, smoothing)?;
        let backend = match mode {
            // Nothing is protected: no product reaches a backend.
            Mode::Disable => crate::backend_for(Mode::Simulate, servers)?,
            Mode::Remote => {
                return Err(ModelError::ModeUnavailable(
                    "remote",
                    "a compiled bundle (phi models only for now)",
                ))
            }
            _ => crate::backend_for(mode, servers)?,
        };
        let mut clients: HashMap<String, ClientLayer> =
            clients.into_iter().map(|c| (c.name.clone(), c)).collect();
        let linear = |name: String| -> Result<Box<dyn Linear>, ModelError> {
            Ok(match clients.remove(&name) {
                Some(client) => Box::new(ProtectedLinear::new(client, backend.clone())),
                None => Box::new(LocalLinear::new(
                    tensor(tensors, &format!("{name}.weight"))?,
                    None,
                )),
            })
        };
        Self::assemble(config, tensors, linear)
    }

    /// The model with each block linear (by Hugging Face name) from `linear`.
    fn assemble(
        config: &LlamaConfig,
        tensors: &HashMap<String, Tensor>,
        mut linear: impl FnMut(String) -> Result<Box<dyn Linear>, ModelError>,
    ) -> Result<Self, ModelError> {
        let device = Device::Cpu;
        let norm = |name: String| -> Result<RmsNorm, ModelError> {
            Ok(RmsNorm::new(tensor(tensors, &name)?, config.rms_norm_eps))
        };
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            blocks.push(Block {
                attn_norm: norm(format!("model.layers.{i}.input_layernorm.weight"))?,
                q: linear(LlamaProj::Q.hf_name(i))?,
                k: linear(LlamaProj::K.hf_name(i))?,
                v: linear(LlamaProj::V.hf_name(i))?,
                o: linear(LlamaProj::O.hf_name(i))?,
                mlp_norm: norm(format!("model.layers.{i}.post_attention_layernorm.weight"))?,
                gate: linear(LlamaProj::Gate.hf_name(i))?,
                up: linear(LlamaProj::Up.hf_name(i))?,
                down: linear(LlamaProj::Down.hf_name(i))?,
                kv_cache: None,
            });
        }
        let embeddings = tensor(tensors, "model.embed_tokens.weight")?;
        // Tied embeddings when the file has no separate output matrix.
        let head = tensors
            .get("lm_head.weight")
            .cloned()
            .unwrap_or_else(|| embeddings.clone());
        let head_dim = config.head_dim();
        let theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / config.rope_theta.powf(i as f32 / head_dim as f32))
            .collect();
        let positions = config.max_position_embeddings;
        let angles = Tensor::arange(0, positions as u32, &device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?
            .matmul(&Tensor::new(theta.as_slice(), &device)?.reshape((1, head_dim / 2))?)?;
        Ok(Llama {
            config: config.clone(),
            embed: Embedding::new(embeddings, config.hidden_size),
            blocks,
            norm: norm("model.norm.weight".into())?,
            lm_head: Box::new(LocalLinear::new(head, None)),
            cos: angles.cos()?,
            sin: angles.sin()?,
            device,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Tokens already in the KV cache.
    pub fn cached_tokens(&self) -> usize {
        self.blocks
            .first()
            .and_then(|b| b.kv_cache.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn clear_kv_cache(&mut self) {
        for b in self.blocks.iter_mut() {
            b.kv_cache = None;
        }
    }

    fn hidden_states(&mut self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let seq = tokens.len();
        let offset = self.cached_tokens();
        if offset + seq > self.config.max_position_embeddings {
            return Err(ModelError::ContextTooLong {
                prompt: offset + seq,
                max_tokens: 0,
                context: self.config.max_position_embeddings,
            });
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut xs = candle_core::Module::forward(&self.embed, &input)?;
        let mask = match seq {
            0 | 1 => None,
            _ => Some(crate::model::causal_mask(seq, offset, &self.device)?),
        };
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        let (heads, kv_heads, head_dim) = (
            self.config.num_attention_heads,
            self.config.num_key_value_heads,
            self.config.head_dim(),
        );
        for b in self.blocks.iter_mut() {
            let residual = xs.clone();
            let h = candle_core::Module::forward(&b.attn_norm, &xs)?;
            let split = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
                t.reshape((1, seq, n, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = split(b.q.forward(&h)?, heads)?;
            let k = split(b.k.forward(&h)?, kv_heads)?;
            let v = split(b.v.forward(&h)?, kv_heads)?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
            let (k, v) = match &b.kv_cache {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            b.kv_cache = Some((k.clone(), v.clone()));
            let repeat = heads / kv_heads;
            let k = candle_transformers::utils::repeat_kv(k, repeat)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, repeat)?.contiguous()?;
            let mut att = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
            if let Some(m) = &mask {
                let m = m.broadcast_as(att.shape())?;
                let neg =
                    Tensor::new(f32::NEG_INFINITY, &self.device)?.broadcast_as(att.shape())?;
                att = m.where_cond(&neg, &att)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((1, seq, heads * head_dim))?;
            xs = (b.o.forward(&y)? + residual)?;
            let residual = xs.clone();
            let h = candle_core::Module::forward(&b.mlp_norm, &xs)?;
            let gated = (candle_nn::ops::silu(&b.gate.forward(&h)?)? * b.up.forward(&h)?)?;
            xs = (b.down.forward(&gated)? + residual)?;
        }
        Ok(candle_core::Module::forward(&self.norm, &xs)?)
    }

    /// Feeds `tokens` and returns the logits of every new position, shape `(tokens, vocab)`.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let xs = self.hidden_states(tokens)?;
        Ok(self.lm_head.forward(&xs)?.squeeze(0)?)
    }

    /// Feeds `tokens` and returns the logits of the last position, shape `(vocab,)`.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let xs = self.hidden_states(tokens)?;
        let last = xs.narrow(1, tokens.len() - 1, 1)?;
        Ok(self.lm_head.forward(&last)?.flatten_all()?)
    }

    /// The model's argmax after each position of `tokens` (teacher forcing), and the log-softmax
    /// rows, from a clear KV cache.
    pub fn teacher_forced(&mut self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        self.clear_kv_cache();
        let logits = self.forward_all(tokens)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }
}
