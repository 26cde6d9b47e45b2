//! Tiny models (phi and Llama architecture) and a tokenizer, deterministic from a seed: let the
//! SDK, the CLI and the tests run offline without downloading weights.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::Tokenizer;

use crate::checkpoint::Checkpoint;
use crate::config::{LlamaConfig, PhiConfig};
use crate::names::{Module, Proj};
use crate::ModelError;

/// Words of the tiny tokenizer (id = position); unknown words map to `<unk>`.
const WORDS: &str =
    "<unk> <eos> . , ! ? the a an of to and in is it that for on with as was he she \
they we you i his her their our this these those be are were been have has had do does did not \
no yes can will would could should may might must one two three four five six seven eight nine ten \
model token layer secret weight server client encrypted data private key vendor customer license \
time day year people world life work hand part place case week company system program question \
number night point home water room mother area money story fact month lot right study book eye job \
word business issue side kind head house service friend father power hour game line end member law";

/// The tiny model's configuration: hidden 64, 2 blocks, 4 heads, partial rotary 0.5.
pub fn tiny_config() -> PhiConfig {
    PhiConfig {
        vocab_size: WORDS.split_whitespace().count(),
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        hidden_act: candle_nn::Activation::NewGelu,
        max_position_embeddings: 128,
        layer_norm_eps: 1e-5,
        tie_word_embeddings: false,
        rope_theta: 10000.0,
        partial_rotary_factor: 0.5,
        qk_layernorm: false,
    }
}

/// SplitMix64 mapped to [-1, 1).
struct Uniform(u64);

impl Uniform {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn tensor(&mut self, dims: &[usize], scale: f32, offset: f32) -> Result<Tensor, ModelError> {
        let n = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * self.next()).collect();
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
    }
}

/// Random weights for `cfg` in Hugging Face naming, deterministic from `seed`.
pub fn random_weights(cfg: &PhiConfig, seed: u64) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut rng = Uniform(seed);
    let mut t = HashMap::new();
    let (h, inter, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    t.insert(
        "model.embed_tokens.weight".to_string(),
        rng.tensor(&[v, h], 1.0, 0.0)?,
    );
    let norm = |t: &mut HashMap<String, Tensor>,
                prefix: String,
                rng: &mut Uniform|
     -> Result<(), ModelError> {
        t.insert(format!("{prefix}.weight"), rng.tensor(&[h], 0.1, 1.0)?);
        t.insert(format!("{prefix}.bias"), rng.tensor(&[h], 0.1, 0.0)?);
        Ok(())
    };
    let linear = |t: &mut HashMap<String, Tensor>,
                  m: Module,
                  d_in: usize,
                  d_out: usize,
                  rng: &mut Uniform|
     -> Result<(), ModelError> {
        // Uniform with unit output variance for unit-variance inputs.
        let a = (3.0 / d_in as f32).sqrt();
        t.insert(
            format!("{}.weight", m.hf_name()),
            rng.tensor(&[d_out, d_in], a, 0.0)?,
        );
        t.insert(
            format!("{}.bias", m.hf_name()),
            rng.tensor(&[d_out], 0.1, 0.0)?,
        );
        Ok(())
    };
    for i in 0..cfg.num_hidden_layers {
        norm(
            &mut t,
            format!("model.layers.{i}.input_layernorm"),
            &mut rng,
        )?;
        for p in [Proj::Q, Proj::K, Proj::V, Proj::Dense] {
            linear(&mut t, Module::Block(i, p), h, h, &mut rng)?;
        }
        linear(&mut t, Module::Block(i, Proj::Fc1), h, inter, &mut rng)?;
        linear(&mut t, Module::Block(i, Proj::Fc2), inter, h, &mut rng)?;
    }
    norm(&mut t, "model.final_layernorm".to_string(), &mut rng)?;
    linear(&mut t, Module::LmHead, h, v, &mut rng)?;
    Ok(t)
}

/// The tiny model's weights (seed 1).
pub fn tiny_weights() -> Result<HashMap<String, Tensor>, ModelError> {
    random_weights(&tiny_config(), 1)
}

/// The tiny phi model as a checkpoint named `tiny`.
pub fn tiny_checkpoint() -> Result<Checkpoint, ModelError> {
    Ok(Checkpoint::new(tiny_config(), tiny_weights()?)
        .with_tokenizer(tiny_tokenizer()?)
        .with_name("tiny"))
}

/// A tiny Llama: hidden 64, 2 blocks, 4 heads sharing 2 key/value heads, tied embeddings,
/// Hugging Face's rotary layout.
pub fn tiny_llama_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: WORDS.split_whitespace().count(),
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        rope_interleaved: false,
    }
}

/// Random Llama weights for `cfg` in Hugging Face naming (no biases; no `lm_head.weight` when
/// the embeddings are tied), deterministic from `seed`.
pub fn random_llama_weights(
    cfg: &LlamaConfig,
    seed: u64,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut rng = Uniform(seed);
    let mut t = HashMap::new();
    let (h, inter, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.kv_heads() * cfg.head_dim(),
    );
    t.insert(
        "model.embed_tokens.weight".into(),
        rng.tensor(&[v, h], 1.0, 0.0)?,
    );
    let mut linear = |t: &mut HashMap<String, Tensor>, m: Module, d_in: usize, d_out: usize| {
        let a = (3.0 / d_in as f32).sqrt();
        rng.tensor(&[d_out, d_in], a, 0.0)
            .map(|w| t.insert(format!("{}.weight", m.hf_name()), w))
    };
    for i in 0..cfg.num_hidden_layers {
        let m = |p| Module::Block(i, p);
        linear(&mut t, m(Proj::Q), h, q)?;
        linear(&mut t, m(Proj::K), h, kv)?;
        linear(&mut t, m(Proj::V), h, kv)?;
        linear(&mut t, m(Proj::O), q, h)?;
        linear(&mut t, m(Proj::Gate), h, inter)?;
        linear(&mut t, m(Proj::Up), h, inter)?;
        linear(&mut t, m(Proj::Down), inter, h)?;
    }
    if !cfg.tie_word_embeddings {
        linear(&mut t, Module::LmHead, h, v)?;
    }
    for i in 0..cfg.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(
                format!("model.layers.{i}.{norm}.weight"),
                rng.tensor(&[h], 0.1, 1.0)?,
            );
        }
    }
    t.insert("model.norm.weight".into(), rng.tensor(&[h], 0.1, 1.0)?);
    Ok(t)
}

/// The tiny Llama (seed 2) as a checkpoint named `tiny-llama`, with the tiny tokenizer.
pub fn tiny_llama_checkpoint() -> Result<Checkpoint, ModelError> {
    let cfg = tiny_llama_config();
    let tensors = random_llama_weights(&cfg, 2)?;
    Ok(Checkpoint::new(cfg, tensors)
        .with_tokenizer(tiny_tokenizer()?)
        .with_name("tiny-llama"))
}

/// A word-level tokenizer over the tiny model's vocabulary.
pub fn tiny_tokenizer() -> Result<Tokenizer, ModelError> {
    word_tokenizer(WORDS.split_whitespace().count())
}

/// A word-level tokenizer with `vocab_size` ids: the tiny model's words first, then `w<id>`
/// placeholders (for random-weight checkpoints of real sizes, which have no real tokenizer).
pub fn word_tokenizer(vocab_size: usize) -> Result<Tokenizer, ModelError> {
    let words = WORDS.split_whitespace().map(String::from);
    let vocab = words
        .chain((WORDS.split_whitespace().count()..).map(|i| format!("w{i}")))
        .take(vocab_size)
        .enumerate()
        .map(|(i, w)| (w, i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("<unk>".to_string())
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    Ok(tokenizer)
}
