//! Llama (and the architectures that share it: SmolLM, Mistral, Qwen2) on candle, with every
//! linear of the blocks built through a provider. Reads top to bottom like candle-transformers'
//! `models/llama.rs`: attention with grouped-query heads, the gated MLP, the pre-norm block, the
//! model.
//!
//! Checkpoints in Hugging Face's layout rotate halves of each head; GGUF files keep llama.cpp's
//! row order of q and k for the interleaved rotary embedding (`rope_interleaved`), which is
//! applied accordingly (the tests check against candle's own GGUF Llama).

use candle_core::{Result, Tensor, D};
use candle_nn::{RmsNorm, VarBuilder};

use crate::config::LlamaConfig;
use crate::linear::{Linear, LinearProvider, LocalLinear};
use crate::names::{Module, Proj};
use crate::transformer::{attention, Decoder, DecoderBlock, KvCache, Rotary};

struct Attention {
    /// q, k and v projections (they read the same input), outputs concatenated.
    qkv: Box<dyn Linear>,
    o: Box<dyn Linear>,
    kv_cache: KvCache,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(&mut self, xs: &Tensor, rotary: &Rotary, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, seq, _) = xs.dims3()?;
        let qkv = self.qkv.forward(xs)?;
        let (q_width, kv_width) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let split = |start: usize, heads: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, start, heads * self.head_dim)?
                .reshape((b, seq, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let offset = self.kv_cache.len();
        let q = rotary.apply(&split(0, self.heads)?, offset)?;
        let k = rotary.apply(&split(q_width, self.kv_heads)?, offset)?;
        let v = split(q_width + kv_width, self.kv_heads)?;
        let (k, v) = self.kv_cache.append(k, v)?;
        let repeat = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, repeat)?;
        let v = candle_transformers::utils::repeat_kv(v, repeat)?;
        let y = attention(&q, &k, &v, mask)?
            .transpose(1, 2)?
            .reshape((b, seq, q_width))?;
        self.o.forward(&y)
    }
}

/// `down(silu(gate(x)) * up(x))`.
struct Mlp {
    /// gate and up projections (they read the same input), outputs concatenated.
    gate_up: Box<dyn Linear>,
    down: Box<dyn Linear>,
    intermediate: usize,
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up.forward(xs)?;
        let gate = gate_up.narrow(D::Minus1, 0, self.intermediate)?;
        let up = gate_up.narrow(D::Minus1, self.intermediate, self.intermediate)?;
        self.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

/// A Llama block: pre-norm attention, then the pre-norm MLP, each with a residual.
pub struct Block {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderBlock for Block {
    /// The rotary table, one for all blocks.
    type Shared = Rotary;

    fn forward(&mut self, xs: &Tensor, rotary: &Rotary, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = candle_core::Module::forward(&self.input_layernorm, xs)?;
        let xs = (self.attn.forward(&h, rotary, mask)? + xs)?;
        let h = candle_core::Module::forward(&self.post_attention_layernorm, &xs)?;
        self.mlp.forward(&h)? + xs
    }

    fn kv_cache(&self) -> &KvCache {
        &self.attn.kv_cache
    }

    fn kv_cache_mut(&mut self) -> &mut KvCache {
        &mut self.attn.kv_cache
    }
}

/// A Llama model with a KV cache.
pub type Llama = Decoder<Block, LlamaConfig>;

impl Llama {
    /// Builds the model from checkpoint tensors (Hugging Face naming), every block linear through
    /// `provider`. The output projection is local (tied to the embeddings when the checkpoint has
    /// no `lm_head.weight`).
    pub fn load(cfg: &LlamaConfig, vb: VarBuilder, provider: &dyn LinearProvider) -> Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (heads, kv_heads, head_dim) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        if heads % kv_heads != 0 {
            candle_core::bail!("{heads} attention heads are not a multiple of {kv_heads} kv heads");
        }
        let vb_m = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
        let norm = |name: String| candle_nn::rms_norm(h, cfg.rms_norm_eps, vb_m.pp(name));
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let m = |p| Module::Block(i, p);
            let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
            blocks.push(Block {
                input_layernorm: norm(format!("layers.{i}.input_layernorm"))?,
                attn: Attention {
                    qkv: provider.build(
                        &[m(Proj::Q), m(Proj::K), m(Proj::V)],
                        h,
                        &[q_width, kv_width, kv_width],
                        &vb,
                    )?,
                    o: provider.build(&[m(Proj::O)], q_width, &[h], &vb)?,
                    kv_cache: KvCache::default(),
                    heads,
                    kv_heads,
                    head_dim,
                },
                post_attention_layernorm: norm(format!("layers.{i}.post_attention_layernorm"))?,
                mlp: Mlp {
                    gate_up: provider.build(
                        &[m(Proj::Gate), m(Proj::Up)],
                        h,
                        &[inter, inter],
                        &vb,
                    )?,
                    down: provider.build(&[m(Proj::Down)], inter, &[h], &vb)?,
                    intermediate: inter,
                },
            });
        }
        let lm_head: Box<dyn Linear> = if vb.contains_tensor("lm_head.weight") {
            Box::new(LocalLinear::load(Module::LmHead, h, cfg.vocab_size, &vb)?)
        } else {
            Box::new(LocalLinear::new(embed_tokens.embeddings().clone(), None))
        };
        Ok(Decoder {
            config: cfg.clone(),
            embed_tokens,
            blocks,
            norm: Box::new(norm("norm".into())?),
            lm_head,
            shared: Rotary::new(
                head_dim,
                cfg.rope_theta,
                cfg.max_position_embeddings,
                cfg.rope_interleaved,
                vb.device(),
            )?,
            context: cfg.max_position_embeddings,
            vocab: cfg.vocab_size,
            device: vb.device().clone(),
        })
    }
}
