//! `hybrid synth` writes a checkpoint with a real architecture's configuration and random weights
//! (for speed measurements at full size without downloading anything); `hybrid bench e2e`
//! measures generation on such a model: local only, then hybrid with sets of protected layers
//! served by a real `hybrid-worker` and `hybrid-gateway` (separate processes on loopback), with
//! the per-token split, bytes per token and each process's peak memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use hybrid_model::bundle::{load_client_bundle, SERVER_BUNDLE_FILE};
use hybrid_model::compile::{compile, Activations, CompileOptions};
use hybrid_model::remote::{RemoteConfig, RemoteStats};
use hybrid_model::{
    build, build_remote, generate, Architecture, CausalLm, GenerateOptions, Mode, PhiConfig,
};
use license::{KeySet, LicenseClaims, QuotaPeriod, SigningKey};
use serde_json::json;

use crate::local::{free_port, sibling_binary, Service, WorkDir};
use crate::model_cmd::load_source;
use crate::split::Split;

#[derive(Args)]
pub struct SynthArgs {
    /// `phi-1_5` (hidden 2048, 24 blocks, 32 heads, vocab 51200) or `tiny`.
    #[arg(long, default_value = "phi-1_5")]
    arch: String,
    /// Keep only the first N blocks [default: all].
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output directory: config.json, model.safetensors (f32) and a placeholder tokenizer.json.
    #[arg(long)]
    out: PathBuf,
}

/// Writes `config.json` and `model.safetensors` for `cfg` with random weights.
pub fn synth(args: SynthArgs) -> Result<()> {
    let mut cfg = match args.arch.as_str() {
        "phi-1_5" => PhiConfig::phi_1_5(),
        "tiny" => hybrid_model::tiny::tiny_config(),
        other => bail!("unknown architecture `{other}` (phi-1_5, tiny)"),
    };
    if let Some(n) = args.layers {
        cfg.num_hidden_layers = n.clamp(1, cfg.num_hidden_layers);
    }
    std::fs::create_dir_all(&args.out)?;
    let started = Instant::now();
    let tensors = hybrid_model::tiny::random_weights(&cfg, args.seed)?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    std::fs::write(
        args.out.join("config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    let path = args.out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    // A placeholder word-level tokenizer of the right size, so that the text commands work.
    hybrid_model::tiny::word_tokenizer(cfg.vocab_size)?
        .save(args.out.join("tokenizer.json"), false)
        .map_err(anyhow::Error::msg)?;
    println!(
        "{}",
        json!({
            "arch": args.arch,
            "layers": cfg.num_hidden_layers,
            "parameters": params,
            "checkpoint": path,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

#[derive(Args)]
pub struct E2eArgs {
    /// A checkpoint directory (e.g. written by `hybrid synth`), a Llama GGUF file, `smollm2`,
    /// `tiny` or `tiny-llama`.
    #[arg(long)]
    model: String,
    /// Sets of protected layers to measure, one per flag, each comma-separated names or patterns
    /// [default: phi: `layers.1.mixer.Wqkv`, then `layers.*.mixer.Wqkv`; Llama: `blk.0.attn_q`,
    /// every attention projection, every linear].
    #[arg(long = "protect")]
    protect_sets: Vec<String>,
    #[arg(long, default_value_t = 8)]
    prompt_tokens: usize,
    /// Tokens generated per run (the first comes from the prompt's pass, the rest are timed).
    #[arg(long, default_value_t = 9)]
    tokens: usize,
    /// Compute threads of the worker process (its RAYON_NUM_THREADS) [default: all cores]. The
    /// client's own threads follow this process's RAYON_NUM_THREADS (candle reads it).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Work directory for bundles and the ledger [default: a temporary one, removed after].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Result encoding of the remote runs: keyless, packed, or auto (the planner's choice).
    #[arg(long, default_value = "keyless")]
    results: String,
    /// Compile every protected layer on its own (no requests shared by layers that read the
    /// same input).
    #[arg(long)]
    no_groups: bool,
    /// What --results auto optimises for: latency or bandwidth.
    #[arg(long, default_value = "bandwidth")]
    preference: String,
    #[arg(long)]
    json: bool,
}

/// Peak resident memory of a process (`VmHWM`), in MB.
fn peak_mb(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resets this process's peak-memory mark (Linux: `clear_refs` 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn wait_ready(url: &str, what: &str, limit: Duration) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let started = Instant::now();
    while started.elapsed() < limit {
        if agent
            .get(&format!("{url}/readyz"))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{what} at {url} not ready after {limit:?}")
}

/// The time the gateway and the worker account for, summed over their requests (seconds, from
/// their Prometheus histograms): what splits the SDK's network time into its legs.
#[derive(Clone, Copy, Default)]
struct ServiceClock {
    /// The gateway's apply handler, from its body read to its answer.
    gateway_total: f64,
    /// The part of it spent forwarding to the worker and waiting for its answer.
    gateway_in_worker: f64,
    /// The worker's compute (what it reports in its answer's header).
    worker_compute: f64,
}

impl ServiceClock {
    fn scrape(agent: &ureq::Agent, gateway_metrics: &str, worker_metrics: &str) -> Result<Self> {
        let text = |url: &str| -> Result<String> {
            Ok(agent
                .get(&format!("{url}/metrics"))
                .call()
                .with_context(|| format!("scraping {url}"))?
                .body_mut()
                .read_to_string()?)
        };
        let (g, w) = (text(gateway_metrics)?, text(worker_metrics)?);
        Ok(Self {
            gateway_total: metric(&g, "gateway_request_seconds_sum{part=\"total\"}"),
            gateway_in_worker: metric(&g, "gateway_request_seconds_sum{part=\"worker\"}"),
            worker_compute: metric(&w, "worker_apply_seconds_sum"),
        })
    }

    /// Per-token ms of each leg between two scrapes; `network` is the SDK's network-and-server
    /// time over the same tokens.
    fn legs(self, before: Self, network: f64, tokens: usize) -> serde_json::Value {
        let n = tokens.max(1) as f64 / 1e3;
        let total = self.gateway_total - before.gateway_total;
        let in_worker = self.gateway_in_worker - before.gateway_in_worker;
        let compute = self.worker_compute - before.worker_compute;
        json!({
            "client_to_gateway_ms": (network - total) / n,
            "gateway_own_ms": (total - in_worker) / n,
            "gateway_to_worker_ms": (in_worker - compute) / n,
            "worker_compute_ms": compute / n,
        })
    }
}

/// The value of one sample (`name{labels}` exactly as exposed) in Prometheus text; 0 if absent.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Generates and times each decode step; `stats` splits remote time when given, and
/// `after_prefill` runs once the prompt's pass is done.
fn timed_generation(
    model: &mut dyn CausalLm,
    prompt: &[u32],
    tokens: usize,
    stats: Option<&RemoteStats>,
    mut after_prefill: impl FnMut(),
) -> Result<(Split, Split, Vec<u32>)> {
    let options = GenerateOptions {
        max_tokens: tokens,
        ..GenerateOptions::default()
    };
    let snapshot = || stats.map(|s| s.snapshot()).unwrap_or_default();
    let (mut prefill, mut decode) = (Split::default(), Split::default());
    let mut last = (Instant::now(), snapshot());
    let ids = generate(model, prompt, &options, |_| {
        let now = snapshot();
        let wall = last.0.elapsed().as_secs_f64();
        if prefill.steps == 0 {
            prefill.add(wall, now - last.1);
            after_prefill();
        } else {
            decode.add(wall, now - last.1);
        }
        last = (Instant::now(), now);
    })?;
    Ok((prefill, decode, ids))
}

pub fn e2e(args: E2eArgs) -> Result<()> {
    let worker_bin = sibling_binary("hybrid-worker")?;
    let gateway_bin = sibling_binary("hybrid-gateway")?;
    let dir = WorkDir::new(args.dir.as_deref(), "hybrid-e2e")?;
    run_e2e(&args, dir.path(), &worker_bin, &gateway_bin)
}

fn run_e2e(args: &E2eArgs, dir: &Path, worker_bin: &Path, gateway_bin: &Path) -> Result<()> {
    let say = |m: String| {
        if !args.json {
            eprintln!("==> {m}");
        }
    };
    say(format!("loading {}", args.model));
    let loaded = Instant::now();
    let src = load_source(&args.model)?;
    let load_s = loaded.elapsed().as_secs_f64();
    let vocab = src.config.vocab_size() as u32;
    let protect_sets = match (args.protect_sets.is_empty(), src.config.architecture()) {
        (false, _) => args.protect_sets.clone(),
        (true, Architecture::Phi) => vec![
            "layers.1.mixer.Wqkv".to_string(),
            "layers.*.mixer.Wqkv".to_string(),
        ],
        (true, Architecture::Llama) => vec![
            "blk.0.attn_q".to_string(),
            "blk.*.attn_*".to_string(),
            "blk.*.attn_*,blk.*.ffn_*".to_string(),
        ],
    };
    // A fixed pseudo-random prompt (token ids), the same for every run.
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab)
        .collect();

    say("local-only generation (every layer in the clear)".into());
    let mut local = build(
        &src.config,
        &src.tensors,
        &[] as &[String],
        Mode::Disable,
        8,
    )?;
    let (local_prefill, local_decode, local_ids) =
        timed_generation(local.as_mut(), &prompt, args.tokens, None, || {})?;
    drop(local);
    let local_ms = local_decode.wall / local_decode.steps.max(1) as f64 * 1e3;

    // Compile every set first, then let the checkpoint go: the client runs from its bundle.
    let mut sets = Vec::new();
    for (i, set) in protect_sets.iter().enumerate() {
        let protect: Vec<String> = set.split(',').map(|s| s.trim().to_string()).collect();
        say(format!("compiling with {set} protected"));
        let out = dir.join(format!("set{i}"));
        let started = Instant::now();
        let manifest = compile(
            &src,
            &CompileOptions {
                model_name: "model".into(),
                protect,
                n_bits: 8,
                calibration: vec![],
                activations: Activations::Dynamic,
                group_inputs: !args.no_groups,
                outlier_columns: hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
                weight_rounding: hybrid_model::compile::WeightRounding::Compensated,
                activation_width: hybrid_model::compile::ActivationWidth::Auto,
            },
            &out.join("client"),
            &out.join(SERVER_BUNDLE_FILE),
            &mut |_, _, _| {},
        )?;
        sets.push((set.clone(), out, manifest.layers.len(), started.elapsed()));
    }
    drop(src);

    let key = SigningKey::generate("bench");
    let keyset_path = dir.join("keyset.json");
    std::fs::write(&keyset_path, KeySet::new(&[key.public()?])?.to_json())?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut runs = Vec::new();
    for (set, out, layers, compile_time) in sets {
        say(format!(
            "hybrid generation, {set} protected ({layers} layers), through gateway + worker"
        ));
        let (worker_port, gateway_port) = (free_port()?, free_port()?);
        let (worker_metrics, gateway_metrics) = (
            format!("127.0.0.1:{}", free_port()?),
            format!("127.0.0.1:{}", free_port()?),
        );
        let mut worker = Command::new(worker_bin);
        worker
            .args(["--bundle", out.join(SERVER_BUNDLE_FILE).to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{worker_port}")])
            .args(["--metrics-listen", &worker_metrics])
            // Packed weight transforms only when packed results can be asked for.
            .args(["--packed-results", &(args.results != "keyless").to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(t) = args.worker_threads {
            worker.env("RAYON_NUM_THREADS", t.to_string());
        }
        let worker = Service(worker.spawn().context("starting hybrid-worker")?);
        let worker_url = format!("http://127.0.0.1:{worker_port}");
        let loading = Instant::now();
        wait_ready(&worker_url, "worker", Duration::from_secs(1800))?;
        let worker_load_s = loading.elapsed().as_secs_f64();
        let gateway = Service(
            Command::new(gateway_bin)
                .args(["--keyset", keyset_path.to_str().unwrap()])
                .args(["--worker", &worker_url])
                .args([
                    "--database-url",
                    &format!("sqlite:{}?mode=rwc", out.join("ledger.db").display()),
                ])
                .args(["--listen", &format!("127.0.0.1:{gateway_port}")])
                .args(["--metrics-listen", &gateway_metrics])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting hybrid-gateway")?,
        );
        let gateway_url = format!("http://127.0.0.1:{gateway_port}");
        wait_ready(&gateway_url, "gateway", Duration::from_secs(60))?;
        let license = key.issue(&LicenseClaims {
            jti: format!("bench-{}", uuid::Uuid::new_v4().simple()),
            sub: "bench".into(),
            iss: "vendor".into(),
            aud: "hybrid-gateway".into(),
            model: "model".into(),
            layers: vec!["*".into()],
            quota_tokens: 1 << 40,
            quota_period: QuotaPeriod::Total,
            rate_limit_per_minute: u32::MAX,
            max_in_flight: 64,
            iat: now,
            nbf: now,
            exp: now + 86_400,
        })?;
        reset_peak();
        let client = load_client_bundle(&out.join("client"))?;
        let stats = Arc::new(RemoteStats::default());
        let mut model = build_remote(
            &client,
            RemoteConfig {
                license: Some(license),
                stats: Some(stats.clone()),
                results: hybrid_model::remote::ResultsMode::parse(&args.results, &args.preference)?,
                // Fresh keys: the one-time key costs are part of what is measured.
                keys: hybrid_model::remote::KeySource::Session,
                ..RemoteConfig::new(gateway_url, "model")
            },
        )?;
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let (gateway_metrics, worker_metrics) = (
            format!("http://{gateway_metrics}"),
            format!("http://{worker_metrics}"),
        );
        let scrape = || ServiceClock::scrape(&agent, &gateway_metrics, &worker_metrics);
        let mut after_prefill = Ok(ServiceClock::default());
        let (prefill, decode, ids) =
            timed_generation(model.as_mut(), &prompt, args.tokens, Some(&stats), || {
                after_prefill = scrape()
            })?;
        let legs = scrape()?.legs(after_prefill?, decode.remote.network_s, decode.steps);
        // Keys are generated and registered at connection (packed) or on first use (auto).
        let keys = stats.snapshot();
        let ms = decode.wall / decode.steps.max(1) as f64 * 1e3;
        runs.push(json!({
            "protected": set,
            "results": args.results,
            "key_upload_bytes": keys.key_upload_bytes,
            "keygen_ms": keys.keygen_s * 1e3,
            "key_upload_ms": keys.key_upload_s * 1e3,
            "packed_queries": keys.packed_queries,
            "protected_layers": layers,
            "grouped": !args.no_groups,
            "compile_s": compile_time.as_secs_f64(),
            "worker_load_s": worker_load_s,
            "ms_per_token": ms,
            "added_vs_local": ms / local_ms - 1.0,
            // What the protected layers themselves add (encryption, network and server,
            // decryption) over the local-only time: free of the noise in the client's own
            // local compute between the two runs.
            "remote_added_vs_local": decode.remote_s() / decode.steps.max(1) as f64 * 1e3
                / local_ms,
            "per_token": decode.per_token(),
            // The network-and-server time per token, by leg.
            "network_legs": legs,
            "prefill": prefill.per_token(),
            "same_tokens_as_local": ids.iter().zip(&local_ids).filter(|(a, b)| a == b).count(),
            "client_peak_mb": peak_mb("self"),
            "worker_peak_mb": peak_mb(&worker.0.id().to_string()),
            "gateway_peak_mb": peak_mb(&gateway.0.id().to_string()),
        }));
        drop(model);
        drop(client);
    }
    let report = json!({
        "bench": "e2e",
        "model": args.model,
        "checkpoint_load_s": load_s,
        "prompt_tokens": prompt.len(),
        "decode_tokens": local_decode.steps,
        "local_ms_per_token": local_ms,
        "local_prefill_ms": local_prefill.wall * 1e3,
        "client_threads": candle_core::utils::get_num_threads(),
        "worker_threads": args.worker_threads,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "runs": runs,
    });
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
