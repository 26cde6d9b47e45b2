//! phi (phi-1 / phi-1.5 / phi-2 architecture) on candle, with every linear built through a
//! provider.
//!
//! Follows candle-transformers' `models/phi.rs` operation by operation (the tests check that
//! the float model gives the same logits), with the linears made pluggable.

use candle_core::{Result, Tensor, D};
use candle_nn::{Activation, LayerNorm, VarBuilder};

use crate::config::PhiConfig;
use crate::linear::{Linear, LinearProvider};
use crate::names::{Module, Proj};
use crate::transformer::{attention, Decoder, DecoderBlock, KvCache, Rotary};

struct Attention {
    /// q, k and v projections, outputs concatenated.
    qkv: Box<dyn Linear>,
    dense: Box<dyn Linear>,
    kv_cache: KvCache,
    rotary: Rotary,
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
        let offset = self.kv_cache.len();
        let q = self.rotary.apply(&split(0)?, offset)?;
        let k = self.rotary.apply(&split(1)?, offset)?;
        let (k, v) = self.kv_cache.append(k, split(2)?)?;
        let out = attention(&q, &k, &v, mask)?
            .transpose(1, 2)?
            .reshape((b, seq_len, ()))?;
        self.dense.forward(&out)
    }
}

/// A phi block: attention and MLP in parallel on the same normalized input.
pub struct Block {
    input_layernorm: LayerNorm,
    attn: Attention,
    fc1: Box<dyn Linear>,
    fc2: Box<dyn Linear>,
    act: Activation,
}

impl DecoderBlock for Block {
    type Shared = ();

    fn forward(&mut self, xs: &Tensor, _: &(), mask: Option<&Tensor>) -> Result<Tensor> {
        let h = candle_core::Module::forward(&self.input_layernorm, xs)?;
        let attn = self.attn.forward(&h, mask)?;
        let mlp = self.fc2.forward(&candle_core::Module::forward(
            &self.act,
            &self.fc1.forward(&h)?,
        )?)?;
        attn + mlp + xs
    }

    fn kv_cache(&self) -> &KvCache {
        &self.attn.kv_cache
    }

    fn kv_cache_mut(&mut self) -> &mut KvCache {
        &mut self.attn.kv_cache
    }
}

/// The phi model with a KV cache.
pub type Phi = Decoder<Block, PhiConfig>;

impl Phi {
    /// Builds the model from checkpoint tensors (Hugging Face naming), every linear through
    /// `provider`.
    pub fn load(cfg: &PhiConfig, vb: VarBuilder, provider: &dyn LinearProvider) -> Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let vb_m = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
        let final_layernorm =
            candle_nn::layer_norm(h, cfg.layer_norm_eps, vb_m.pp("final_layernorm"))?;
        let rotary_dim = (cfg.partial_rotary_factor * cfg.head_dim() as f64) as usize;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let m = |p| Module::Block(i, p);
            let attn = Attention {
                qkv: provider.build(&[m(Proj::Q), m(Proj::K), m(Proj::V)], h, &[h, h, h], &vb)?,
                dense: provider.build(&[m(Proj::Dense)], h, &[h], &vb)?,
                kv_cache: KvCache::default(),
                rotary: Rotary::new(
                    rotary_dim,
                    cfg.rope_theta,
                    cfg.max_position_embeddings,
                    false,
                    vb.device(),
                )?,
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
        Ok(Decoder {
            config: cfg.clone(),
            embed_tokens,
            blocks,
            norm: Box::new(final_layernorm),
            lm_head: provider.build(&[Module::LmHead], h, &[cfg.vocab_size], &vb)?,
            shared: (),
            context: cfg.max_position_embeddings,
            vocab: cfg.vocab_size,
            device: vb.device().clone(),
        })
    }
}
