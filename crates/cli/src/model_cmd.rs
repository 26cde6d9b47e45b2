//! `hybrid compile` and `hybrid generate`: the SDK on the command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use hybrid_model::bundle::{load_client_bundle, load_server_bundle, SERVER_BUNDLE_FILE};
use hybrid_model::compile::{compile, CompileOptions};
use hybrid_model::remote::RemoteStats;
use hybrid_model::{
    build, build_from_bundles, build_remote, generate, Checkpoint, GenerateOptions, Mode, Model,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokenizers::Tokenizer;

/// The model named by `--model`: `tiny`, `tiny-llama`, `smollm2`, a GGUF file, a Hugging Face
/// directory, or (with `--features hf-hub`) a hub id.
pub(crate) fn load_source(model: &str) -> Result<Checkpoint> {
    if !Path::new(model).exists() && model.contains('/') && cfg!(feature = "hf-hub") {
        return Ok(Checkpoint::from_dir(&download(model)?)?);
    }
    Ok(Checkpoint::open(model)?)
}

/// The name a bundle of `src` is served under: `--name`, else the model's own.
pub(crate) fn model_name(src: &Checkpoint, name: Option<&str>) -> String {
    name.map(String::from).unwrap_or_else(|| src.default_name())
}

/// Downloads a model from the Hugging Face hub into its cache; returns the snapshot directory.
#[cfg(feature = "hf-hub")]
fn download(id: &str) -> Result<PathBuf> {
    let repo = hf_hub::api::sync::Api::new()?.model(id.to_string());
    let config = repo.get("config.json")?;
    let _ = repo.get("tokenizer.json");
    let _ = repo.get("tokenizer_config.json");
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let index: serde_json::Value = serde_json::from_slice(&std::fs::read(index)?)?;
            let mut shards: Vec<&str> = index["weight_map"]
                .as_object()
                .context("index without weight_map")?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            shards.sort();
            shards.dedup();
            for shard in shards {
                repo.get(shard)?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")?;
        }
    }
    Ok(config.parent().context("snapshot directory")?.to_path_buf())
}

#[cfg(not(feature = "hf-hub"))]
fn download(id: &str) -> Result<PathBuf> {
    bail!("`{id}`: this build cannot download models (build with --features hf-hub)")
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar
}

/// Compiles `src` into `out/client/` and `out/server.safetensors`, with a progress bar when `show`.
pub(crate) fn compile_with_progress(
    src: &Checkpoint,
    options: &CompileOptions,
    out: &Path,
    show: bool,
) -> Result<hybrid_model::bundle::ClientManifest> {
    let bar = progress_bar();
    if !show {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let manifest = compile(
        src,
        options,
        &out.join("client"),
        &out.join(SERVER_BUNDLE_FILE),
        &mut |stage, done, total| {
            bar.set_message(stage.to_string());
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    Ok(manifest)
}

#[derive(Args)]
pub struct CompileArgs {
    /// `tiny`, `tiny-llama`, `smollm2` (fetched once), a Llama GGUF file, or a Hugging Face
    /// model directory (phi or Llama architecture).
    #[arg(long, default_value = "tiny")]
    model: String,
    /// The model's name in the bundle, licenses and routes [default: the model's own name].
    #[arg(long)]
    name: Option<String>,
    /// Layers to protect (names in either naming, or patterns such as `layers.*.mixer.Wqkv`).
    #[arg(long, required = true)]
    protect: Vec<String>,
    /// Calibration prompts, one per line (accuracy is measured on them).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Bits of the quantized weights and activations.
    #[arg(long, default_value_t = 8)]
    n_bits: u32,
    /// Activation quantization: dynamic (per token), static (calibrated per layer), smoothed
    /// (per token, input channels divided by calibrated factors), outliers (per token, outlier
    /// channels over extra product columns), smoothed-outliers (both), or auto (measure each on
    /// the calibration prompts, keep the most accurate).
    #[arg(long, default_value = "auto")]
    activations: String,
    /// Extra product columns an outlier split may add per layer, as a share of its inputs
    /// (upload bytes and server time grow about as much).
    #[arg(long, default_value_t = hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS)]
    outlier_columns: f32,
    /// How weights are rounded to their 8-bit grid: compensated (GPTQ: each row's rounding
    /// errors spread over its later columns as the calibration prompts' inputs correlate; needs
    /// calibration prompts) or nearest.
    #[arg(long, default_value = "compensated")]
    weights: String,
    /// Width of the activations: auto (per layer the widest whose layout costs at most 1.25x
    /// the bytes of 8-bit ones, kept when it measures better on the calibration prompts),
    /// weights (as many bits as the weights), or a width from 2 to 16.
    #[arg(long, default_value = "auto")]
    activation_bits: String,
    /// Output directory: `client/` (for the customer) and `server.safetensors` (for the workers).
    #[arg(long)]
    out: PathBuf,
    /// Serve every protected layer on its own, even those that read the same input (by
    /// default q, k and v of a block, and gate and up, travel as one request).
    #[arg(long)]
    no_groups: bool,
    #[arg(long)]
    json: bool,
}

pub(crate) const DEFAULT_CALIBRATION: &[&str] = &[
    "the server is private and the data is encrypted",
    "a customer has a license for the model",
    "they will work on the program for one week",
];

pub fn compile_cmd(args: CompileArgs) -> Result<()> {
    let src = load_source(&args.model)?;
    let prompts: Vec<String> = match &args.calibration {
        Some(p) => crate::bench_accuracy::read_prompts(p)?,
        None => DEFAULT_CALIBRATION.iter().map(|s| s.to_string()).collect(),
    };
    let calibration = tokenize_all(src.tokenizer.as_ref(), &prompts)?;
    let options = CompileOptions {
        model_name: model_name(&src, args.name.as_deref()),
        protect: args.protect,
        n_bits: args.n_bits,
        calibration,
        activations: args.activations.parse()?,
        group_inputs: !args.no_groups,
        outlier_columns: args.outlier_columns,
        weight_rounding: args.weights.parse()?,
        activation_width: args.activation_bits.parse()?,
    };
    anyhow::ensure!(
        options.outlier_columns.is_finite() && options.outlier_columns >= 0.0,
        "--outlier-columns must be a share of a layer's inputs (0 or more)"
    );
    let client_dir = args.out.join("client");
    let server_path = args.out.join(SERVER_BUNDLE_FILE);
    let started = Instant::now();
    let manifest = compile_with_progress(&src, &options, &args.out, !args.json)?;
    let report = json!({
        "model": manifest.model,
        "architecture": manifest.architecture,
        "client_bundle": client_dir,
        "server_bundle": server_path,
        "groups": manifest.groups.iter().map(|g| &g.name).collect::<Vec<_>>(),
        "protected": manifest.layers.iter().map(|l| json!({"name": l.name, "d_in": l.d_in, "d_out": l.d_out})).collect::<Vec<_>>(),
        "n_bits": manifest.n_bits,
        "activation_quantization": manifest.activation_quantization,
        "weight_rounding": manifest.weight_rounding,
        "calibration": manifest.calibration,
        "alternative": manifest.alternative,
        "server_bundle_sha256": manifest.server_bundle_sha256,
        "compile_ms": started.elapsed().as_secs_f64() * 1e3,
    });
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Prints generated text as it streams: the new part of the decoded text after each token.
pub(crate) struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            printed: 0,
        }
    }

    pub fn push(&mut self, token: u32) {
        self.ids.push(token);
        if let Ok(text) = self.tokenizer.decode(&self.ids, true) {
            if text.len() > self.printed && text.is_char_boundary(self.printed) {
                let mut stdout = std::io::stdout();
                let _ = write!(stdout, "{}", &text[self.printed..]);
                let _ = stdout.flush();
                self.printed = text.len();
            }
        }
    }
}

/// Calibration prompts as token ids (none without a tokenizer).
pub(crate) fn tokenize_all(
    tokenizer: Option<&Tokenizer>,
    prompts: &[String],
) -> Result<Vec<Vec<u32>>> {
    match tokenizer {
        Some(t) => prompts
            .iter()
            .map(|p| {
                t.encode(p.as_str(), false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(anyhow::Error::msg)
            })
            .collect(),
        None => Ok(vec![]),
    }
}

/// Which model, in which mode: what `generate` and `serve` share.
#[derive(Args)]
pub struct ModelArgs {
    /// `tiny`, `tiny-llama`, `smollm2`, a Llama GGUF file, or a Hugging Face model directory
    /// (ignored with --bundle).
    #[arg(long, default_value = "tiny")]
    model: String,
    /// A directory written by `hybrid compile` (client/ and server.safetensors).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Layers to protect (without --bundle).
    #[arg(long)]
    protect: Vec<String>,
    /// disable | simulate | execute | remote
    #[arg(long, default_value = "simulate")]
    pub mode: String,
    #[arg(long, default_value_t = 8)]
    n_bits: u32,
    #[command(flatten)]
    remote: crate::client::RemoteArgs,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Render the prompt as a user message with the model's chat template (instruction-tuned
    /// models).
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Sampling temperature (greedy when absent).
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// What generation needs of a model, whether it came from a bundle or a checkpoint.
pub(crate) struct Loaded {
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub eos_token: Option<u32>,
    pub chat_template: Option<String>,
    pub protected: Vec<String>,
    /// The model's name (the bundle's, or the checkpoint's own).
    pub name: String,
    /// Remote mode: the remote calls' totals (rows metered among them).
    pub stats: Option<Arc<RemoteStats>>,
}

/// Loads the model `args` name, in its mode.
pub(crate) fn load_model(args: &ModelArgs) -> Result<Loaded> {
    let mode: Mode = args.mode.parse()?;
    Ok(match &args.bundle {
        Some(dir) => {
            let client = load_client_bundle(&dir.join("client"))?;
            let mut stats = None;
            let model = if mode == Mode::Remote {
                let mut config = args.remote.config(&client.manifest.model)?;
                let st = Arc::new(RemoteStats::default());
                config.stats = Some(st.clone());
                stats = Some(st);
                build_remote(&client, config)?
            } else {
                let server_path = dir.join(SERVER_BUNDLE_FILE);
                let server = if server_path.exists() {
                    Some(load_server_bundle(&server_path)?)
                } else {
                    None
                };
                build_from_bundles(&client, server.as_ref(), mode)?
            };
            let eos_token = client
                .manifest
                .eos_token_id
                .or_else(|| client.tokenizer.as_ref().and_then(crate::local::eos_token));
            Loaded {
                model,
                eos_token,
                chat_template: client.manifest.chat_template.clone(),
                protected: client
                    .manifest
                    .layers
                    .iter()
                    .map(|l| l.name.clone())
                    .collect(),
                name: client.manifest.model.clone(),
                tokenizer: client.tokenizer,
                stats,
            }
        }
        None => {
            if mode == Mode::Remote {
                bail!(
                    "remote mode runs a compiled bundle: give --bundle DIR (see `hybrid compile`)"
                );
            }
            let src = load_source(&args.model)?;
            Loaded {
                model: build(&src.config, &src.tensors, &args.protect, mode, args.n_bits)?,
                eos_token: src.eos(),
                chat_template: src.chat_template.clone(),
                protected: args.protect.clone(),
                name: src.default_name(),
                tokenizer: src.tokenizer,
                stats: None,
            }
        }
    })
}

pub fn generate_cmd(args: GenerateArgs) -> Result<()> {
    let Loaded {
        mut model,
        tokenizer,
        eos_token,
        chat_template,
        protected,
        ..
    } = load_model(&args.model)?;
    let tokenizer = tokenizer.context("the model has no tokenizer.json")?;
    let text = if args.chat {
        crate::local::chat_prompt(
            chat_template.as_deref(),
            &tokenizer,
            eos_token,
            &args.prompt,
        )?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer
        .encode(text.as_str(), false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        eos_token,
    };
    let started = Instant::now();
    let mut first_token_ms = None;
    let mut stream = TextStream::new(&tokenizer);
    let tokens = generate(model.as_mut(), &prompt, &options, |t| {
        first_token_ms.get_or_insert(started.elapsed().as_secs_f64() * 1e3);
        if !args.json {
            stream.push(t);
        }
    })?;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let text = tokenizer
        .decode(&tokens, true)
        .map_err(anyhow::Error::msg)?;
    let prefill_ms = first_token_ms.unwrap_or(total_ms);
    let decode_steps = tokens.len().saturating_sub(1).max(1);
    if args.json {
        println!(
            "{}",
            json!({
                "text": text,
                "token_ids": tokens,
                "prompt_tokens": prompt.len(),
                "mode": args.model.mode,
                "protected": protected,
                "prefill_ms": prefill_ms,
                "ms_per_token": (total_ms - prefill_ms) / decode_steps as f64,
                "total_ms": total_ms,
            })
        );
    } else {
        println!();
    }
    Ok(())
}
