//! phi (phi-1 / phi-1.5 architecture) on candle, with every linear built through a provider.
//!
//! Follows candle-transformers' `models/phi.rs` operation by operation (the tests check that
//! the float model gives the same logits), with the linears made pluggable.

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use candle_nn::{Activation, Embedding, LayerNorm, VarBuilder};

use crate::config::PhiConfig;
use crate::linear::{Linear, LinearProvider};
use crate::names::{Module, Proj};

struct RotaryEmbedding {
    dim: usize,
    sin: Tensor,
    cos: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &PhiConfig, dev: &Device) -> Result<Self> {
        let dim = (cfg.partial_rotary_factor * cfg.head_dim() as f64) as usize;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / dim as f32))
            .collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), dev)?;
        let t = Tensor::arange(0u32, cfg.max_position_embeddings as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Self {
            dim,
            sin: freqs.sin()?,
            cos: freqs.cos()?,
        })
    }

    /// Rotates the first `dim` features of each head; the rest pass through.
    fn apply(&self, xs: &Tensor, offset: usize) -> Result<Tensor> {
        let (_b, _h, seq_len, _d) = xs.dims4()?;
        let rot = xs.i((.., .., .., ..self.dim))?.contiguous()?;
        let pass = xs.i((.., .., .., self.dim..))?;
        let c = self.cos.narrow(0, offset, seq_len)?;
        let s = self.sin.narrow(0, offset, seq_len)?;
        let rot = candle_nn::rotary_emb::rope(&rot, &c, &s)?;
        Tensor::cat(&[&rot, &pass], D::Minus1)
    }
}

struct Attention {
    /// q, k and v projections, outputs concatenated.
    qkv: Box<dyn Linear>,
    dense: Box<dyn Linear>,
    kv_cache: Option<(Tensor, Tensor)>,
    rotary: RotaryEmbedding,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(&mut self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, seq_len, hidden) = xs.dims3()?;
        let qkv = self.qkv.forward(xs)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * hidden, hidden)?
                .reshape((b, seq_len, self.heads, self.head_dim))?
                .transpose(1, 2)
        };
        let offset = self.kv_cache.as_ref().map_or(Ok(0), |(k, _)| k.dim(2))?;
        let q = self.rotary.apply(&split(0)?, offset)?;
        let k = self.rotary.apply(&split(1)?, offset)?;
        let v = split(2)?;
        let (k, v) = match &self.kv_cache {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
        };
        self.kv_cache = Some((k.clone(), v.clone()));
        let k = k.contiguous()?;
        let v = v.contiguous()?;
        let scale = 1f64 / (self.head_dim as f64).sqrt();
        let weights = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
        let weights = match mask {
            None => weights,
            Some(mask) => {
                let mask = mask.broadcast_left((b, self.heads))?;
                let neg = Tensor::new(f32::NEG_INFINITY, weights.device())?
                    .broadcast_as(mask.shape().dims())?;
                mask.where_cond(&neg, &weights)?
            }
        };
        let weights = candle_nn::ops::softmax_last_dim(&weights)?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, seq_len, ()))?;
        self.dense.forward(&out)
    }
}

struct Block {
    input_layernorm: LayerNorm,
    attn: Attention,
    fc1: Box<dyn Linear>,
    fc2: Box<dyn Linear>,
    act: Activation,
}

impl Block {
    fn forward(&mut self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = candle_core::Module::forward(&self.input_layernorm, xs)?;
        let attn = self.attn.forward(&h, mask)?;
        let mlp = self.fc2.forward(&candle_core::Module::forward(
            &self.act,
            &self.fc1.forward(&h)?,
        )?)?;
        attn + mlp + xs
    }
}

/// The phi model with a KV cache.
pub struct Phi {
    cfg: PhiConfig,
    embed_tokens: Embedding,
    blocks: Vec<Block>,
    final_layernorm: LayerNorm,
    lm_head: Box<dyn Linear>,
    device: Device,
}

impl Phi {
    /// Builds the model from checkpoint tensors (Hugging Face naming), every linear through
    /// `provider`.
    pub fn load(cfg: &PhiConfig, vb: VarBuilder, provider: &dyn LinearProvider) -> Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let vb_m = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
        let final_layernorm =
            candle_nn::layer_norm(h, cfg.layer_norm_eps, vb_m.pp("final_layernorm"))?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let m = |p| Module::Block(i, p);
            let attn = Attention {
                qkv: provider.build(&[m(Proj::Q), m(Proj::K), m(Proj::V)], h, &[h, h, h], &vb)?,
                dense: provider.build(&[m(Proj::Dense)], h, &[h], &vb)?,
                kv_cache: None,
                rotary: RotaryEmbedding::new(cfg, vb.device())?,
                heads: cfg.num_attention_heads,
                head_dim: cfg.head_dim(),
            };
            blocks.push(Block {
                input_layernorm: candle_nn::layer_norm(
                    h,
                    cfg.layer_norm_eps,
                    vb_m.pp(format!("layers.{i}.input_layernorm")),
                )?,
                attn,
                fc1: provider.build(&[m(Proj::Fc1)], h, &[inter], &vb)?,
                fc2: provider.build(&[m(Proj::Fc2)], inter, &[h], &vb)?,
                act: cfg.hidden_act,
            });
        }
        let lm_head = provider.build(&[Module::LmHead], h, &[cfg.vocab_size], &vb)?;
        Ok(Phi {
            cfg: cfg.clone(),
            embed_tokens,
            blocks,
            final_layernorm,
            lm_head,
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &PhiConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokens already in the KV cache.
    pub fn cached_tokens(&self) -> usize {
        self.blocks
            .first()
            .and_then(|b| b.attn.kv_cache.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Feeds `tokens` (after those in the cache); returns the final hidden states, `(1, seq, h)`.
    fn hidden_states(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let seq_len = tokens.len();
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut xs = candle_core::Module::forward(&self.embed_tokens, &input)?;
        let mask = match seq_len {
            0 | 1 => None,
            _ => Some(causal_mask(seq_len, self.cached_tokens(), &self.device)?),
        };
        for block in self.blocks.iter_mut() {
            xs = block.forward(&xs, mask.as_ref())?;
        }
        candle_core::Module::forward(&self.final_layernorm, &xs)
    }

    /// Feeds `tokens` and returns the logits of every new position, shape `(tokens, vocab)`.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let xs = self.hidden_states(tokens)?;
        self.lm_head.forward(&xs)?.squeeze(0)
    }

    /// Feeds `tokens` and returns the logits of the last position, shape `(vocab,)`.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let xs = self.hidden_states(tokens)?;
        let last = xs.narrow(1, tokens.len() - 1, 1)?;
        self.lm_head.forward(&last)?.flatten_all()
    }

    pub fn clear_kv_cache(&mut self) {
        for b in self.blocks.iter_mut() {
            b.attn.kv_cache = None;
        }
    }
}

/// Mask of the positions a new token must not see: `(seq_len, offset + seq_len)`, 1 = hidden.
pub(crate) fn causal_mask(seq_len: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<u8> = (0..seq_len)
        .flat_map(|i| (0..offset + seq_len).map(move |j| u8::from(j > offset + i)))
        .collect();
    Tensor::from_slice(&mask, (seq_len, offset + seq_len), device)
}
