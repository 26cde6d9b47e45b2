//! What every decoder-only architecture shares: the [`CausalLm`] interface that generation,
//! calibration and the benchmarks use, the KV cache, the causal mask, rotary embeddings and
//! scaled dot-product attention. `phi` and `llama` build their blocks from these.

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};

use crate::linear::Linear;
use crate::ModelError;

/// A causal language model with a KV cache.
///
/// An architecture provides its final hidden states and output projection; the logits of every
/// or of the last position follow from them the same way for all.
pub trait CausalLm: Send {
    /// Feeds `tokens` after the cached ones; returns the final (normalized) hidden states,
    /// shape `(1, tokens, hidden)`.
    fn hidden_states(&mut self, tokens: &[u32]) -> std::result::Result<Tensor, ModelError>;
    /// The output projection (hidden -> vocabulary logits).
    fn lm_head(&self) -> &dyn Linear;
    fn clear_kv_cache(&mut self);
    /// Tokens already in the KV cache.
    fn cached_tokens(&self) -> usize;
    fn context_length(&self) -> usize;
    fn vocab_size(&self) -> usize;

    /// Feeds `tokens` and returns the logits of every new position, shape `(tokens, vocab)`.
    fn forward_all(&mut self, tokens: &[u32]) -> std::result::Result<Tensor, ModelError> {
        let xs = self.hidden_states(tokens)?;
        Ok(self.lm_head().forward(&xs)?.squeeze(0)?)
    }

    /// Feeds `tokens` and returns the logits of the last position, shape `(vocab,)`.
    fn forward(&mut self, tokens: &[u32]) -> std::result::Result<Tensor, ModelError> {
        let xs = self.hidden_states(tokens)?;
        let last = xs.narrow(1, tokens.len() - 1, 1)?;
        Ok(self.lm_head().forward(&last)?.flatten_all()?)
    }

    /// The log-softmax of every position of `tokens` from a clear KV cache (teacher forcing).
    fn teacher_forced(&mut self, tokens: &[u32]) -> std::result::Result<Tensor, ModelError> {
        self.clear_kv_cache();
        let logits = self.forward_all(tokens)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }
}

/// A model of any supported architecture.
pub type Model = Box<dyn CausalLm>;

impl CausalLm for Model {
    fn hidden_states(&mut self, tokens: &[u32]) -> std::result::Result<Tensor, ModelError> {
        (**self).hidden_states(tokens)
    }
    fn lm_head(&self) -> &dyn Linear {
        (**self).lm_head()
    }
    fn clear_kv_cache(&mut self) {
        (**self).clear_kv_cache()
    }
    fn cached_tokens(&self) -> usize {
        (**self).cached_tokens()
    }
    fn context_length(&self) -> usize {
        (**self).context_length()
    }
    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }
}

/// One decoder block of an architecture. `Shared` is what every block of a model reads (Llama's
/// rotary table; phi's blocks hold their own).
pub trait DecoderBlock: Send {
    type Shared: Send;
    fn forward(
        &mut self,
        xs: &Tensor,
        shared: &Self::Shared,
        mask: Option<&Tensor>,
    ) -> Result<Tensor>;
    fn kv_cache(&self) -> &KvCache;
    fn kv_cache_mut(&mut self) -> &mut KvCache;
}

/// A decoder-only model: token embedding, blocks, final norm, output projection. Every
/// architecture is one of these ([`crate::Phi`], [`crate::Llama`]), so that the [`CausalLm`]
/// implementation is written once.
pub struct Decoder<B: DecoderBlock, C> {
    pub(crate) config: C,
    pub(crate) embed_tokens: candle_nn::Embedding,
    pub(crate) blocks: Vec<B>,
    pub(crate) norm: Box<dyn candle_core::Module + Send + Sync>,
    pub(crate) lm_head: Box<dyn Linear>,
    pub(crate) shared: B::Shared,
    pub(crate) context: usize,
    pub(crate) vocab: usize,
    pub(crate) device: Device,
}

impl<B: DecoderBlock, C> Decoder<B, C> {
    /// The model's configuration.
    pub fn config(&self) -> &C {
        &self.config
    }
}

impl<B: DecoderBlock, C: Send> CausalLm for Decoder<B, C> {
    fn hidden_states(&mut self, tokens: &[u32]) -> std::result::Result<Tensor, ModelError> {
        let (input, mask) = prepare(tokens, self.cached_tokens(), self.context, &self.device)?;
        let mut xs = candle_core::Module::forward(&self.embed_tokens, &input)?;
        for block in self.blocks.iter_mut() {
            xs = block.forward(&xs, &self.shared, mask.as_ref())?;
        }
        Ok(self.norm.forward(&xs)?)
    }

    fn lm_head(&self) -> &dyn Linear {
        self.lm_head.as_ref()
    }

    fn clear_kv_cache(&mut self) {
        for b in self.blocks.iter_mut() {
            b.kv_cache_mut().clear();
        }
    }

    fn cached_tokens(&self) -> usize {
        self.blocks.first().map_or(0, |b| b.kv_cache().len())
    }

    fn context_length(&self) -> usize {
        self.context
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

/// The keys and values of the tokens seen so far, `(batch, kv_heads, tokens, head_dim)`.
#[derive(Default)]
pub struct KvCache(Option<(Tensor, Tensor)>);

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the new tokens' keys and values; returns all of them.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.0 {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
        };
        self.0 = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    pub fn clear(&mut self) {
        self.0 = None;
    }
}

/// The embedding input for `tokens` after `offset` cached ones, and the causal mask of the new
/// positions (none for a single token); refuses a context longer than `context`.
pub(crate) fn prepare(
    tokens: &[u32],
    offset: usize,
    context: usize,
    device: &Device,
) -> std::result::Result<(Tensor, Option<Tensor>), ModelError> {
    if tokens.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    if offset + tokens.len() > context {
        return Err(ModelError::ContextTooLong {
            prompt: offset + tokens.len(),
            max_tokens: 0,
            context,
        });
    }
    let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
    let mask = match tokens.len() {
        1 => None,
        seq => Some(causal_mask(seq, offset, device)?),
    };
    Ok((input, mask))
}

/// Mask of the positions a new token must not see: `(seq_len, offset + seq_len)`, 1 = hidden.
pub(crate) fn causal_mask(seq_len: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<u8> = (0..seq_len)
        .flat_map(|i| (0..offset + seq_len).map(move |j| u8::from(j > offset + i)))
        .collect();
    Tensor::from_slice(&mask, (seq_len, offset + seq_len), device)
}

/// `softmax(q k^T / sqrt(head_dim) + mask) v` over `(batch, heads, tokens, head_dim)` tensors,
/// with k and v already repeated to q's heads.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let head_dim = q.dim(D::Minus1)?;
    let scale = 1f64 / (head_dim as f64).sqrt();
    let weights = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?;
    let weights = match mask {
        None => weights,
        Some(mask) => {
            let mask = mask.broadcast_as(weights.shape())?;
            let neg = Tensor::new(f32::NEG_INFINITY, weights.device())?
                .broadcast_as(weights.shape().dims())?;
            mask.where_cond(&neg, &weights)?
        }
    };
    candle_nn::ops::softmax_last_dim(&weights)?.matmul(&v.contiguous()?)
}

/// Rotary position embeddings over the first `dim` features of each head (all of them, or a
/// share as in phi), rotating halves (Hugging Face) or interleaved pairs (llama.cpp's layout).
pub struct Rotary {
    dim: usize,
    interleaved: bool,
    sin: Tensor,
    cos: Tensor,
}

impl Rotary {
    pub fn new(
        dim: usize,
        theta: f32,
        positions: usize,
        interleaved: bool,
        dev: &Device,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / dim as f32))
            .collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), dev)?;
        let t = Tensor::arange(0u32, positions as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Rotary {
            dim,
            interleaved,
            sin: freqs.sin()?,
            cos: freqs.cos()?,
        })
    }

    /// Rotates `(batch, heads, tokens, head_dim)` for positions `offset..offset + tokens`.
    pub fn apply(&self, xs: &Tensor, offset: usize) -> Result<Tensor> {
        let (_b, _h, seq_len, head_dim) = xs.dims4()?;
        let c = self.cos.narrow(0, offset, seq_len)?;
        let s = self.sin.narrow(0, offset, seq_len)?;
        let rope = |x: &Tensor| {
            if self.interleaved {
                candle_nn::rotary_emb::rope_i(x, &c, &s)
            } else {
                candle_nn::rotary_emb::rope(x, &c, &s)
            }
        };
        if self.dim == head_dim {
            return rope(&xs.contiguous()?);
        }
        let rot = rope(&xs.i((.., .., .., ..self.dim))?.contiguous()?)?;
        let pass = xs.i((.., .., .., self.dim..))?;
        Tensor::cat(&[&rot, &pass], D::Minus1)
    }
}
