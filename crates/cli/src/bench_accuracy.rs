//! `hybrid bench accuracy`: what protecting layers costs in accuracy on a real model
//! (SmolLM2-135M-Instruct by default, or any model `--model` reads) on fixed prompts or the
//! vendor's own (`--prompts FILE`). For each bit width and set of
//! protected layers, the `simulate` model (bit-exact with `execute`) is compared to the float
//! model (`disable`) on fixed prompts: greedy tokens until the first divergence, next-token
//! agreement under teacher forcing on the float model's continuation, and that continuation's
//! perplexity under both.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use hybrid_model::{build, compile, generate, names, GenerateOptions, Mode};

use crate::model_cmd::load_source;
use serde_json::json;

/// Prompts of various kinds: facts, instructions, code, arithmetic, lists, dialogue, prose.
const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Water boils at a temperature of",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
    "The largest planet in our solar system is",
    "Q: What is 12 times 7?\nA:",
    "Here is a list of fruits: apple, banana,",
    "The theory of relativity was developed by",
    "In machine learning, overfitting means",
    "Dear customer, thank you for your order.",
    "SELECT name, price FROM products WHERE",
    "The main causes of the French Revolution were",
    "Photosynthesis is the process by which plants",
    "<|im_start|>user\nWhat is the tallest mountain on Earth?<|im_end|>\n<|im_start|>assistant\n",
    "The recipe calls for two cups of flour and",
    "A good password should",
    "The stock market fell today because",
    "Translate to French: Good morning, how are you?",
    "The human heart has four chambers:",
];

/// Calibration texts (distinct from the evaluation prompts): what a vendor passes to
/// `hybrid compile --calibration`.
const CALIBRATION: &[&str] = &[
    "The weather today is sunny with a light breeze from the west, and the forecast for the weekend looks pleasant.",
    "In 1969, astronauts landed on the Moon for the first time, an event watched by millions around the world.",
    "fn main() { let numbers = vec![1, 2, 3]; println!(\"{:?}\", numbers.iter().sum::<i32>()); }",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\nStart by mixing flour, water, yeast and salt.",
    "The committee approved the budget after a long debate about schools, roads and hospitals.",
    "A prime number is a natural number greater than 1 that has no divisors other than 1 and itself: 2, 3, 5, 7, 11.",
    "She opened the old wooden door slowly and found a garden full of roses and tall green trees.",
    "Customers can return any product within 30 days of purchase for a full refund, no questions asked.",
];

#[derive(Args)]
pub struct AccuracyArgs {
    /// The model: `smollm2` (fetched once), a Llama GGUF file, a Hugging Face directory,
    /// `tiny` or `tiny-llama`.
    #[arg(long, alias = "gguf", default_value = "smollm2")]
    model: String,
    /// Bit widths of weights and activations.
    #[arg(long, value_delimiter = ',', default_values_t = vec![6u32, 7, 8])]
    bits: Vec<u32>,
    /// Sets of protected layers: `one` (block 0's q_proj), `attention` (every attention
    /// projection), `all` (every linear of every block), or a pattern.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["one".to_string(), "attention".into(), "all".into()])]
    sets: Vec<String>,
    /// Greedy tokens per prompt.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Evaluation prompts, one per line (`\n` in a line is a newline) [default: a fixed set of
    /// 22 prompts of various kinds].
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Use only the first N prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// How protected layers encode their inputs, as `hybrid compile --activations` takes it:
    /// auto (what compile ships: every choice measured on calibration texts distinct from the
    /// prompts, the best kept), dynamic, static, smoothed, outliers or smoothed-outliers.
    #[arg(long, default_value = "auto")]
    activations: String,
    /// Extra product columns an outlier split may add, as a share of a layer's inputs.
    #[arg(long, default_value_t = compile::DEFAULT_OUTLIER_COLUMNS)]
    outlier_columns: f32,
    /// How weights are rounded, as `hybrid compile --weights` takes it: compensated (GPTQ on
    /// the calibration texts) or nearest.
    #[arg(long, default_value = "compensated")]
    weights: String,
    /// Width of the activations, as `hybrid compile --activation-bits` takes it: auto (what
    /// compile ships), weights, or a width from 2 to 16.
    #[arg(long, default_value = "auto")]
    activation_bits: String,
    #[arg(long)]
    json: bool,
}

fn set_patterns(set: &str) -> Vec<String> {
    match set {
        "one" => vec!["model.layers.0.self_attn.q_proj".into()],
        "attention" => vec!["model.layers.*.self_attn.*".into()],
        "all" => vec!["model.layers.*".into()],
        pattern => vec![pattern.into()],
    }
}

/// Prompts from a file: one per line, blank lines skipped, `\n` standing for a newline.
pub(crate) fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let prompts: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.replace("\\n", "\n"))
        .collect();
    anyhow::ensure!(!prompts.is_empty(), "{}: no prompt", path.display());
    Ok(prompts)
}

/// Mean negative log-likelihood of `tokens[from..]` given what precedes each.
fn nll(log_probs: &candle_core::Tensor, tokens: &[u32], from: usize) -> Result<f64> {
    let rows = log_probs.to_vec2::<f32>()?;
    let mut total = 0.0;
    for t in from..tokens.len() {
        total -= rows[t - 1][tokens[t] as usize] as f64;
    }
    Ok(total / (tokens.len() - from) as f64)
}

fn argmaxes(log_probs: &candle_core::Tensor) -> Result<Vec<u32>> {
    Ok(log_probs.argmax(1)?.to_vec1::<u32>()?)
}

pub fn run(args: AccuracyArgs) -> Result<()> {
    let src = load_source(&args.model)?;
    let (cfg, tensors) = (&src.config, &src.tensors);
    let tok = src
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer")?;
    let encode = |text: &str| -> Result<Vec<u32>> {
        Ok(tok
            .encode(text, false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec())
    };
    let activations: compile::Activations = args.activations.parse()?;
    let calibration = CALIBRATION
        .iter()
        .map(|t| encode(t))
        .collect::<Result<Vec<_>>>()?;
    let texts: Vec<String> = match &args.prompts {
        Some(path) => read_prompts(path)?,
        None => PROMPTS.iter().map(|p| p.to_string()).collect(),
    };
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .take(args.limit.unwrap_or(usize::MAX))
        .map(|p| encode(p))
        .filter(|p| !matches!(p, Ok(ids) if ids.is_empty()))
        .collect::<Result<_>>()?;
    anyhow::ensure!(!prompts.is_empty(), "no prompt to evaluate");
    let options = GenerateOptions {
        max_tokens: args.tokens,
        eos_token: None,
        ..GenerateOptions::default()
    };

    // The float model's continuations, predictions and likelihoods: the reference.
    let started = Instant::now();
    let mut float = build(cfg, tensors, &[], Mode::Disable, 8)?;
    let mut reference = Vec::new();
    for prompt in &prompts {
        let continuation = generate(float.as_mut(), prompt, &options, |_| {})?;
        let mut all = prompt.clone();
        all.extend(&continuation);
        let log_probs = float.teacher_forced(&all)?;
        let predictions = argmaxes(&log_probs)?;
        let nll = nll(&log_probs, &all, prompt.len())?;
        // The float model's log-probabilities where the continuation is predicted.
        let rows = log_probs
            .narrow(0, prompt.len() - 1, all.len() - prompt.len())?
            .to_vec2::<f32>()?;
        reference.push((continuation, all, predictions, nll, rows));
    }
    let float_ppl = (reference.iter().map(|r| r.3).sum::<f64>() / reference.len() as f64).exp();
    let float_s = started.elapsed().as_secs_f64();
    drop(float);

    let mut rows = Vec::new();
    for set in &args.sets {
        for &bits in &args.bits {
            let started = Instant::now();
            let patterns = set_patterns(set);
            let protected = names::resolve(&patterns, cfg.naming(), cfg.num_hidden_layers())?;
            // What `hybrid compile` would ship for these layers and calibration texts.
            let compile_options = compile::CompileOptions {
                model_name: src.default_name(),
                protect: patterns.clone(),
                n_bits: bits,
                calibration: calibration.clone(),
                activations,
                // As compile serves them: a group's width is its fused product's.
                group_inputs: true,
                outlier_columns: args.outlier_columns,
                weight_rounding: args.weights.parse()?,
                activation_width: args.activation_bits.parse()?,
            };
            let chosen = compile::choose_encoding(
                cfg,
                tensors,
                &protected,
                &compile_options,
                &mut |_, _, _| {},
            )?;
            let inputs: usize = chosen.split.iter().map(|s| s.client.d_in).sum();
            let columns: usize = chosen.split.iter().map(|s| s.client.product_width()).sum();
            // Protected layers per activation width.
            let mut widths = std::collections::BTreeMap::<u32, usize>::new();
            for s in &chosen.split {
                *widths.entry(s.client.activation_bits()).or_default() += 1;
            }
            let mut model = compile::simulated(cfg, tensors, &protected, &chosen.split)?;
            let (mut prefix, mut agree, mut predictions, mut nll_sum) =
                (0usize, 0usize, 0usize, 0.0);
            // How far apart the float model put its choice and the protected model's, where
            // they differ (nats): small gaps are near-ties of the float model itself.
            let mut gaps = Vec::new();
            for (prompt, (continuation, all, want, _, float_rows)) in prompts.iter().zip(&reference)
            {
                let got = generate(model.as_mut(), prompt, &options, |_| {})?;
                prefix += got
                    .iter()
                    .zip(continuation)
                    .take_while(|(a, b)| a == b)
                    .count();
                let log_probs = model.teacher_forced(all)?;
                let preds = argmaxes(&log_probs)?;
                // Predictions of the continuation's tokens (the positions before each).
                for t in prompt.len()..all.len() {
                    predictions += 1;
                    agree += usize::from(preds[t - 1] == want[t - 1]);
                    if preds[t - 1] != want[t - 1] {
                        let row = &float_rows[t - prompt.len()];
                        gaps.push(row[want[t - 1] as usize] - row[preds[t - 1] as usize]);
                    }
                }
                nll_sum += nll(&log_probs, all, prompt.len())?;
            }
            let ppl = (nll_sum / prompts.len() as f64).exp();
            gaps.sort_by(|a, b| a.total_cmp(b));
            let gap_median = gaps.get(gaps.len() / 2).copied();
            let gap_max = gaps.last().copied();
            let row = json!({
                "set": set,
                "bits": bits,
                "activations": chosen.activations.name(),
                "weight_rounding": chosen.weight_rounding.name(),
                "product_columns_over_inputs": columns as f64 / inputs as f64,
                "layers_by_activation_bits": widths,
                "calibration": chosen.reports,
                "greedy_prefix_mean": prefix as f64 / prompts.len() as f64,
                "next_token_agreement": agree as f64 / predictions as f64,
                "perplexity": ppl,
                "perplexity_vs_float": ppl / float_ppl - 1.0,
                "disagreements": gaps.len(),
                "disagreement_float_gap_median": gap_median,
                "disagreement_float_gap_max": gap_max,
                "seconds": started.elapsed().as_secs_f64(),
            });
            if !args.json {
                eprintln!(
                    "{set:>10} {bits} bits {:>17} (activations {widths:?}), {} weights (x{:.3} columns): greedy prefix {:.1}/{}, next-token agreement {:.2}%, perplexity {:.3} ({:+.2}% vs float), float gap at disagreements median {:.3} max {:.3} nats",
                    chosen.activations.name(),
                    chosen.weight_rounding.name(),
                    columns as f64 / inputs as f64,
                    prefix as f64 / prompts.len() as f64,
                    args.tokens,
                    100.0 * agree as f64 / predictions as f64,
                    ppl,
                    100.0 * (ppl / float_ppl - 1.0),
                    gap_median.unwrap_or(0.0),
                    gap_max.unwrap_or(0.0),
                );
            }
            rows.push(row);
        }
    }
    let report = json!({
        "bench": "accuracy",
        "model": src.default_name(),
        "prompt_file": args.prompts,
        "prompts": prompts.len(),
        "tokens": args.tokens,
        "float_perplexity": float_ppl,
        "float_seconds": float_s,
        "activations": args.activations,
        "outlier_columns": args.outlier_columns,
        "weights": args.weights,
        "activation_bits": args.activation_bits,
        "rows": rows,
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
