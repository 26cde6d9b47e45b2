//! Text generation: prefill the prompt, then decode token by token with a KV cache.

use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::transformer::CausalLm;
use crate::ModelError;

/// How to pick the next tokens.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// `None`: greedy (argmax). Otherwise sample at this temperature.
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold (with a temperature).
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop after generating this token.
    pub eos_token: Option<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 32,
            temperature: None,
            top_p: None,
            seed: 299_792_458,
            eos_token: None,
        }
    }
}

/// Generates after `prompt` (token ids), calling `on_token` with each new token as soon as it
/// is chosen. Clears the model's KV cache first.
pub fn generate(
    model: &mut dyn CausalLm,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, ModelError> {
    generate_while(model, prompt, options, |t| {
        on_token(t);
        true
    })
}

/// [`generate`], stopping early when `on_token` returns false (a stop sequence was produced,
/// the client went away): the token it was given is the last one, and no further step runs.
pub fn generate_while(
    model: &mut dyn CausalLm,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    let context = model.context_length();
    if prompt.len() + options.max_tokens > context {
        return Err(ModelError::ContextTooLong {
            prompt: prompt.len(),
            max_tokens: options.max_tokens,
            context,
        });
    }
    let vocab = model.vocab_size() as u32;
    if let Some(bad) = prompt.iter().find(|t| **t >= vocab) {
        return Err(ModelError::Tokenizer(format!(
            "token id {bad} outside the vocabulary of {vocab}"
        )));
    }
    let sampling = match (options.temperature, options.top_p) {
        (None, _) => Sampling::ArgMax,
        (Some(temperature), None) => Sampling::All { temperature },
        (Some(temperature), Some(p)) => Sampling::TopP { p, temperature },
    };
    let mut sampler = LogitsProcessor::from_sampling(options.seed, sampling);
    model.clear_kv_cache();
    let mut out = Vec::with_capacity(options.max_tokens);
    let mut logits = model.forward(prompt)?;
    for _ in 0..options.max_tokens {
        let next = sampler.sample(&logits)?;
        out.push(next);
        let go_on = on_token(next);
        if !go_on || Some(next) == options.eos_token || out.len() == options.max_tokens {
            break;
        }
        logits = model.forward(&[next])?;
    }
    Ok(out)
}
