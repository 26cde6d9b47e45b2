//! `hybrid demo`: the whole product on one machine. Compiles a model with protected layers,
//! issues a license, starts a worker and the gateway on loopback (embedded SQLite ledger unless
//! `--database-url`), generates text through the SDK in remote mode, and reports where the time
//! and the bytes of each token go and what the ledger billed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use hybrid_model::bundle::{load_client_bundle, SERVER_BUNDLE_FILE};
use hybrid_model::compile::CompileOptions;
use hybrid_model::remote::{RemoteConfig, RemoteStats};
use hybrid_model::{
    build, build_remote, generate, Architecture, Checkpoint, GenerateOptions, Mode,
};
use license::{KeySet, LicenseClaims, QuotaPeriod, SigningKey};
use serde_json::json;

use crate::local::{chat_prompt, wait_ready, WorkDir};
use crate::model_cmd::{
    compile_with_progress, load_source, tokenize_all, TextStream, DEFAULT_CALIBRATION,
};
use crate::split::Split;

const AUDIENCE: &str = "hybrid-gateway";

#[derive(Args)]
pub struct DemoArgs {
    /// `smollm2` (SmolLM2-135M-Instruct, fetched once into the user's cache; `tiny` when it
    /// cannot be fetched), `tiny`, `tiny-llama`, a Llama GGUF file or a Hugging Face model
    /// directory.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Layers to protect (either naming, or patterns) [default: see `default_protection`].
    #[arg(long)]
    protect: Vec<String>,
    /// The prompt; for a model with a chat template, the user's message [default: a question
    /// for chat models, a sentence for the others].
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
    /// Ledger: postgres://... [default: an embedded SQLite file in the work directory].
    #[arg(long, hide_env_values = true)]
    database_url: Option<String>,
    /// Work directory for the bundles, keys and ledger [default: a temporary one, removed after].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also generate with every layer in the clear (`disable` mode) and report token agreement.
    #[arg(long)]
    compare: bool,
    /// Activation quantization: dynamic, static, smoothed, outliers, smoothed-outliers or auto
    /// (measured on calibration prompts).
    #[arg(long, default_value = "auto")]
    activations: String,
    #[command(flatten)]
    results: crate::keys_cmd::ResultsArgs,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// The layers the demo protects when `--protect` is not given. phi: block 0's fused q/k/v
/// projection (one request per token). Llama: every attention projection of the first two
/// blocks (8 layers); the cost of each protected Llama layer is one more round trip per token
/// (see BENCHMARKS.md), which this keeps a demo's pace.
fn default_protection(arch: Architecture) -> Vec<String> {
    match arch {
        Architecture::Phi => vec!["layers.1.mixer.Wqkv".into()],
        Architecture::Llama => vec!["blk.0.attn_*".into(), "blk.1.attn_*".into()],
    }
}

/// The model: `smollm2` falls back to `tiny` (saying why) when it cannot be fetched.
fn open_model(model: &str, json: bool) -> Result<Checkpoint> {
    match load_source(model) {
        Ok(src) => Ok(src),
        Err(e) if model == "smollm2" => {
            if !json {
                println!("==> SmolLM2 is not available here ({e:#}); running on `tiny` instead");
            }
            load_source("tiny")
        }
        Err(e) => Err(e),
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn step(json: bool, what: &str) {
    if !json {
        println!("==> {what}");
    }
}

pub fn run(args: DemoArgs) -> Result<()> {
    let dir = WorkDir::new(args.dir.as_deref(), "hybrid-demo")?;
    demo(&args, dir.path())
}

fn demo(args: &DemoArgs, dir: &std::path::Path) -> Result<()> {
    let json_out = args.json;
    // 1. The vendor compiles the model: a client bundle for the customer, a server bundle (the
    //    protected weights) for the workers.
    let src = open_model(&args.model, json_out)?;
    let protect = match args.protect.is_empty() {
        true => default_protection(src.config.architecture()),
        false => args.protect.clone(),
    };
    let model_name = src.default_name();
    step(
        json_out,
        &format!(
            "compiling `{model_name}` with {} protected",
            protect.join(", ")
        ),
    );
    let tokenizer = src
        .tokenizer
        .clone()
        .context("the model has no tokenizer.json")?;
    let prompts: Vec<String> = DEFAULT_CALIBRATION.iter().map(|s| s.to_string()).collect();
    let options = CompileOptions {
        model_name: model_name.clone(),
        protect,
        n_bits: 8,
        calibration: tokenize_all(Some(&tokenizer), &prompts)?,
        activations: args.activations.parse()?,
        group_inputs: true,
        outlier_columns: hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
        weight_rounding: hybrid_model::compile::WeightRounding::Compensated,
        activation_width: hybrid_model::compile::ActivationWidth::Auto,
    };
    let client_dir = dir.join("client");
    let server_path = dir.join(SERVER_BUNDLE_FILE);
    let started = Instant::now();
    let manifest = compile_with_progress(&src, &options, dir, !json_out)?;
    let compile_s = started.elapsed().as_secs_f64();
    let protected: Vec<String> = manifest.layers.iter().map(|l| l.name.clone()).collect();
    if !json_out {
        let bits: std::collections::BTreeSet<u32> = manifest
            .layers
            .iter()
            .map(|l| l.activation_bits())
            .collect();
        let bits: Vec<String> = bits.iter().map(u32::to_string).collect();
        println!(
            "    {} protected layer(s) in {:.1} s; activations {}, {} bits",
            protected.len(),
            compile_s,
            manifest.activation_quantization,
            bits.join(" and ")
        );
    }

    // 2. The vendor's service: a worker with the server bundle, the gateway with the ledger.
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite:{}?mode=rwc", dir.join("ledger.db").display()));
    let ledger_kind = if database_url.starts_with("sqlite") {
        "embedded SQLite"
    } else {
        "Postgres"
    };
    step(
        json_out,
        &format!("starting a worker and the gateway on loopback ({ledger_kind} ledger)"),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let key = SigningKey::generate("demo");
    let keyset = KeySet::new(&[key.public()?])?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (gateway_url, ledger) = runtime.block_on(async {
        let worker =
            worker::Application::build(worker::WorkerConfig::local(vec![server_path.clone()]))
                .await?;
        let worker_url = format!("http://127.0.0.1:{}", worker.port());
        tokio::spawn(worker.run_until_stopped(stopped(stop_rx.clone())));
        let config = gateway::GatewayConfig::local(
            &database_url,
            keyset,
            AUDIENCE,
            vec![worker_url.clone()],
        );
        let gateway = gateway::Application::build(config).await?;
        let gateway_url = format!("http://127.0.0.1:{}", gateway.port());
        let ledger = gateway.ledger();
        tokio::spawn(gateway.run_until_stopped(stopped(stop_rx.clone())));
        // Ready once a worker has compiled its layers (keyless and packed) and said so.
        if !wait_ready(
            &gateway_url,
            Duration::from_millis(50),
            Duration::from_secs(120),
        )
        .await
        {
            bail!("the gateway did not become ready (worker at {worker_url})")
        }
        anyhow::Ok((gateway_url, ledger))
    })?;

    // 3. The vendor issues a license to the customer (recorded and audited in the ledger).
    let now = now_s();
    let claims = LicenseClaims {
        jti: format!("lic-demo-{}", uuid::Uuid::new_v4().simple()),
        sub: "demo-customer".into(),
        iss: "vendor".into(),
        aud: AUDIENCE.into(),
        model: model_name.clone(),
        layers: vec!["*".into()],
        quota_tokens: 100_000,
        quota_period: QuotaPeriod::Month,
        rate_limit_per_minute: 60_000,
        max_in_flight: 4,
        iat: now,
        nbf: now,
        exp: now + 3600,
    };
    let license = key.issue(&claims)?;
    runtime.block_on(async {
        let at = (now * 1000) as i64;
        ledger
            .upsert_customer(&claims.sub, "Demo customer", at)
            .await?;
        ledger
            .record_license(
                &ledger::LicenseRecord {
                    id: claims.jti.clone(),
                    customer_id: claims.sub.clone(),
                    model: claims.model.clone(),
                    quota_tokens: claims.quota_tokens as i64,
                    quota_period: "month".into(),
                    issued_at: at,
                    expires_at: (claims.exp * 1000) as i64,
                },
                "demo",
                at,
            )
            .await?;
        anyhow::Ok(())
    })?;
    step(
        json_out,
        &format!(
            "license {} issued to {} ({} tokens/month)",
            claims.jti, claims.sub, claims.quota_tokens
        ),
    );

    // 4. The customer generates: local layers in the clear, protected layers encrypted and sent
    //    to the gateway with the license.
    let client = load_client_bundle(&client_dir)?;
    let stats = Arc::new(RemoteStats::default());
    // The demo's ledger and license are new each run: its keys are too (unless --keys).
    let keys = match &args.results.keys {
        Some(_) => args.results.key_source()?,
        None => hybrid_model::remote::KeySource::Session,
    };
    let remote = RemoteConfig {
        license: Some(license.clone()),
        stats: Some(stats.clone()),
        results: args.results.mode()?,
        keys,
        ..RemoteConfig::new(gateway_url.clone(), model_name.clone())
    };
    let mut model = build_remote(&client, remote)?;
    let keys = stats.snapshot();
    if keys.key_upload_bytes > 0 {
        step(
            json_out,
            &format!(
                "packed results: packing key of {:.2} MB generated in {:.0} ms, registered in {:.0} ms (once per license)",
                keys.key_upload_bytes as f64 / 1e6,
                keys.keygen_s * 1e3,
                keys.key_upload_s * 1e3
            ),
        );
    }
    let eos = src.eos();
    let (shown, text) = match (&src.chat_template, &args.prompt) {
        (Some(template), question) => {
            let question = question
                .clone()
                .unwrap_or_else(|| "What is the capital of France?".into());
            let text = chat_prompt(Some(template), &tokenizer, eos, &question)?;
            (format!("[user] {question}\n    [assistant] "), text)
        }
        (None, prompt) => {
            let prompt = prompt.clone().unwrap_or_else(|| {
                "the customer has a license for the model and the data is".into()
            });
            (format!("{prompt} "), prompt)
        }
    };
    let prompt = tokenizer
        .encode(text.as_str(), false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        eos_token: eos,
        ..GenerateOptions::default()
    };
    step(json_out, "generating through the gateway (remote mode)");
    if !json_out {
        print!("    {shown}");
    }
    let mut stream = TextStream::new(&tokenizer);
    let mut split = Split::default();
    let mut prefill = Split::default();
    let started = Instant::now();
    let mut last = (Instant::now(), keys);
    let tokens = generate(model.as_mut(), &prompt, &options, |t| {
        let snapshot = stats.snapshot();
        let wall = last.0.elapsed().as_secs_f64();
        if prefill.steps == 0 {
            prefill.add(wall, snapshot - last.1);
        } else {
            split.add(wall, snapshot - last.1);
        }
        last = (Instant::now(), snapshot);
        if !json_out {
            stream.push(t);
        }
    })?;
    let total_s = started.elapsed().as_secs_f64();
    if !json_out {
        println!();
    }
    let text = tokenizer
        .decode(&tokens, true)
        .map_err(anyhow::Error::msg)?;
    let totals = stats.snapshot();

    // 5. What the ledger billed for this license, read back from the database and through the
    //    customer's usage API.
    let layers = protected.len() as u64;
    let expected = (prompt.len() + tokens.len() - 1) as i64;
    let (billed, api_billed, events) = runtime.block_on(async {
        let period = ledger::month_start((now_s() * 1000) as i64);
        let billed = ledger.billable_tokens(&claims.jti, period).await?;
        let events = ledger.usage_events(&claims.jti).await?.len();
        let usage = reqwest::Client::new()
            .get(format!("{gateway_url}/v1/usage"))
            .bearer_auth(&license)
            .send()
            .await?
            .bytes()
            .await?;
        let usage: serde_json::Value = serde_json::from_slice(&usage)?;
        anyhow::Ok((billed, usage["billable_tokens"].as_i64(), events))
    })?;
    ensure!(
        totals.rows == expected as u64 * layers,
        "rows sent ({}) differ from the tokens the model processed ({expected} x {layers} layers)",
        totals.rows
    );

    // 6. Optionally, the same prompt with every layer in the clear.
    let agreement = if args.compare {
        step(
            json_out,
            "generating with every layer in the clear (disable mode)",
        );
        let mut clear = build(
            &src.config,
            &src.tensors,
            &[] as &[String],
            Mode::Disable,
            8,
        )?;
        let reference = generate(clear.as_mut(), &prompt, &options, |_| {})?;
        let same = tokens
            .iter()
            .zip(&reference)
            .take_while(|(a, b)| a == b)
            .count();
        let equal = tokens
            .iter()
            .zip(&reference)
            .filter(|(a, b)| a == b)
            .count();
        if !json_out {
            println!(
                "    clear text: {}",
                tokenizer
                    .decode(&reference, true)
                    .map_err(anyhow::Error::msg)?
            );
        }
        Some(json!({
            "reference_token_ids": reference,
            "same_positions": equal,
            "common_prefix": same,
            "of": reference.len().min(tokens.len()),
        }))
    } else {
        None
    };
    let _ = stop_tx.send(true);
    runtime.shutdown_timeout(Duration::from_secs(5));

    let decode_tokens = split.steps;
    let report = json!({
        "model": model_name,
        "architecture": src.config.architecture().name(),
        "protected": protected,
        "ledger": ledger_kind,
        "prompt_tokens": prompt.len(),
        "generated_tokens": tokens.len(),
        "text": text,
        "token_ids": tokens,
        "tokens_per_second": tokens.len() as f64 / total_s,
        "prefill": prefill.per_token(),
        "per_token": split.per_token(),
        "decode_tokens": decode_tokens,
        "queries": totals.queries,
        "results": args.results.results,
        "packed_queries": totals.packed_queries,
        "packing_key": json!({
            "bytes": totals.key_upload_bytes,
            "keygen_ms": totals.keygen_s * 1e3,
            "upload_ms": totals.key_upload_s * 1e3,
        }),
        "upload_bytes_total": totals.upload_bytes,
        "download_bytes_total": totals.download_bytes,
        "billed_tokens": billed,
        "billed_tokens_usage_api": api_billed,
        "expected_billed_tokens": expected,
        "billed_exactly": billed == expected && api_billed == Some(expected),
        "usage_rows": events,
        "agreement": agreement,
        "compile_s": compile_s,
    });
    if json_out {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report, &split, &prefill);
    }
    ensure!(
        billed == expected,
        "the ledger billed {billed} tokens, {expected} were processed"
    );
    Ok(())
}

fn print_summary(report: &serde_json::Value, split: &Split, prefill: &Split) {
    let t = split.per_token();
    let p = prefill.per_token();
    let ms = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    println!(
        "==> per generated token (mean of {} decode steps)",
        split.steps
    );
    println!(
        "    {:.2} tokens/s; {:.2} ms per token: local compute {:.2} ms, encrypt {:.2} ms, \
         network + server {:.2} ms (server compute {:.2} ms), decrypt {:.2} ms",
        report["tokens_per_second"].as_f64().unwrap_or(0.0),
        ms(&t, "total_ms"),
        ms(&t, "local_compute_ms"),
        ms(&t, "encrypt_ms"),
        ms(&t, "network_and_server_ms"),
        ms(&t, "server_compute_ms"),
        ms(&t, "decrypt_ms"),
    );
    println!(
        "    {:.1} KB up, {:.1} KB down per token; prompt ({} tokens, one batch): {:.1} ms, {:.1} KB up, {:.1} KB down",
        ms(&t, "upload_bytes") / 1e3,
        ms(&t, "download_bytes") / 1e3,
        report["prompt_tokens"],
        ms(&p, "total_ms"),
        ms(&p, "upload_bytes") / 1e3,
        ms(&p, "download_bytes") / 1e3,
    );
    if report["packed_queries"].as_u64().unwrap_or(0) > 0 {
        let key = &report["packing_key"];
        println!(
            "    results: {} of {} queries packed; packing key {:.2} MB, generated in {:.0} ms and registered in {:.0} ms, once",
            report["packed_queries"],
            report["queries"],
            key["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            key["keygen_ms"].as_f64().unwrap_or(0.0),
            key["upload_ms"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "==> usage billed by the ledger ({})",
        report["ledger"].as_str().unwrap_or("")
    );
    println!(
        "    {} tokens billed (database) / {} (customer usage API) for {} processed tokens \
         (prompt {} + {} generated tokens fed back); {} usage rows: {}",
        report["billed_tokens"],
        report["billed_tokens_usage_api"],
        report["expected_billed_tokens"],
        report["prompt_tokens"],
        report["decode_tokens"],
        report["usage_rows"],
        if report["billed_exactly"].as_bool() == Some(true) {
            "exact"
        } else {
            "MISMATCH"
        }
    );
    if let Some(a) = report["agreement"].as_object() {
        println!(
            "==> agreement with the clear model: {} of {} tokens at the same position ({} before the first difference)",
            a["same_positions"], a["of"], a["common_prefix"]
        );
    }
}
