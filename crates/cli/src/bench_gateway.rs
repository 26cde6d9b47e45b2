//! `hybrid bench gateway`: the metering overhead of the gateway and its sustained request rate,
//! in front of a worker serving a tiny layer (so that the worker's own time is small).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use fhe_linear::{ClientKey, LayerShape, LayerSpec, HFHE_GLWE_2048_V1};
use hybrid_model::compile::{compile, Activations, CompileOptions};
use license::{KeySet, LicenseClaims, QuotaPeriod, SigningKey};
use serde_json::json;

use crate::local::{wait_ready, WorkDir};

#[derive(Args)]
pub struct GatewayArgs {
    /// Ledger: postgres://... (an existing database; tables are created) or sqlite (a temporary file).
    #[arg(long, default_value = "sqlite")]
    database_url: String,
    /// Requests for the latency measurement (one at a time).
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Requests for the throughput measurement.
    #[arg(long, default_value_t = 2000)]
    load_requests: usize,
    /// Requests in flight during the throughput measurement.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Width of the stand-in model's protected layer (`hidden x 3 hidden`): 64 is the tiny
    /// model's; smaller is a faster worker, so that more of the time measured is the gateway's.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The stand-in model of the service benchmarks: the tiny model with its
/// `layers.1.mixer.Wqkv` protected, `hidden` wide (smaller is a faster worker), compiled into
/// `dir` (`client/`, `server.safetensors`). Returns the bundles' paths and the model's shape.
pub(crate) fn stand_in_bundle(
    dir: &std::path::Path,
    hidden: usize,
) -> Result<(
    std::path::PathBuf,
    std::path::PathBuf,
    hybrid_model::PhiConfig,
)> {
    let (client_dir, server) = (dir.join("client"), dir.join("server.safetensors"));
    let options = CompileOptions {
        model_name: "tiny".into(),
        protect: vec!["layers.1.mixer.Wqkv".into()],
        n_bits: 8,
        calibration: vec![],
        activations: Activations::Dynamic,
        group_inputs: true,
        outlier_columns: hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
        weight_rounding: hybrid_model::compile::WeightRounding::Compensated,
        activation_width: hybrid_model::compile::ActivationWidth::Auto,
    };
    let mut tiny = hybrid_model::tiny::tiny_config();
    anyhow::ensure!(
        hidden >= 8 && hidden.is_multiple_of(8),
        "--hidden: a multiple of 8"
    );
    tiny.hidden_size = hidden;
    tiny.intermediate_size = 4 * hidden;
    let weights = hybrid_model::tiny::random_weights(&tiny, 7)?;
    compile(
        &hybrid_model::Checkpoint::new(tiny.clone(), weights),
        &options,
        &client_dir,
        &server,
        &mut |_, _, _| {},
    )?;

    Ok((client_dir, server, tiny))
}

pub fn run(args: GatewayArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: GatewayArgs) -> Result<()> {
    let work = WorkDir::new(None, "hybrid-bench")?;
    let dir = work.path().to_path_buf();
    let (_client_dir, server, tiny) = stand_in_bundle(&dir, args.hidden)?;

    // Keyless requests only: no packed weight transforms.
    let mut config = worker::WorkerConfig::local(vec![server]);
    config.packed_results = false;
    let worker = worker::Application::build(config).await?;
    let worker_url = format!("http://127.0.0.1:{}", worker.port());
    tokio::spawn(worker.run_until_stopped(std::future::pending()));
    if !wait_ready(
        &worker_url,
        Duration::from_millis(10),
        Duration::from_secs(60),
    )
    .await
    {
        anyhow::bail!("the worker at {worker_url} did not finish loading");
    }
    let client = reqwest::Client::new();

    let database_url = if args.database_url == "sqlite" {
        format!("sqlite:{}?mode=rwc", dir.join("ledger.db").display())
    } else {
        args.database_url.clone()
    };
    let key = SigningKey::generate("bench");
    let keyset = KeySet::new(&[key.public()?])?;
    let config = gateway::GatewayConfig::local(
        &database_url,
        keyset,
        "hybrid-gateway",
        vec![worker_url.clone()],
    );
    let gateway = gateway::Application::build(config).await?;
    let gateway_url = format!("http://127.0.0.1:{}", gateway.port());
    tokio::spawn(gateway.run_until_stopped(std::future::pending()));

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let license_id = format!("bench-{}", uuid::Uuid::new_v4());
    let license = key.issue(&LicenseClaims {
        jti: license_id.clone(),
        sub: "bench".into(),
        iss: "vendor".into(),
        aud: "hybrid-gateway".into(),
        model: "tiny".into(),
        layers: vec!["*".into()],
        quota_tokens: u64::MAX / 4,
        quota_period: QuotaPeriod::Total,
        rate_limit_per_minute: u32::MAX,
        max_in_flight: 1024,
        iat: now,
        nbf: now,
        exp: now + 3600,
    })?;
    let spec = LayerSpec::choose(
        &HFHE_GLWE_2048_V1,
        LayerShape::new(tiny.hidden_size, 3 * tiny.hidden_size),
        1,
    )?;
    let body: Vec<u8> = ClientKey::generate(&HFHE_GLWE_2048_V1)
        .encrypt(&spec, &vec![5i16; tiny.hidden_size], 1)?
        .to_bytes();
    let path = "/v1/models/tiny/layers/layers.1.mixer.Wqkv/apply";

    // Latency, one request at a time: straight to the worker, then through the gateway.
    let (upload_bytes, shared) = (
        body.len(),
        (client.clone(), Arc::new(body), license.clone()),
    );
    let send = move |url: String, query: String| {
        let (client, body, license) = (shared.0.clone(), shared.1.clone(), shared.2.clone());
        async move {
            let started = Instant::now();
            let answer = client
                .post(url)
                .bearer_auth(license)
                .header(protocol::QUERY_ID_HEADER, query)
                .body(body.to_vec())
                .send()
                .await?;
            let ok = answer.status() == 200;
            answer.bytes().await?;
            anyhow::ensure!(ok, "request refused");
            anyhow::Ok(started.elapsed().as_secs_f64() * 1e3)
        }
    };
    let mut direct = Vec::new();
    let mut through = Vec::new();
    for i in 0..args.requests + 20 {
        let d = send(format!("{worker_url}{path}"), format!("d{i}")).await?;
        let g = send(format!("{gateway_url}{path}"), format!("g{i}")).await?;
        if i >= 20 {
            direct.push(d);
            through.push(g);
        }
    }
    let overhead: Vec<f64> = through.iter().zip(&direct).map(|(g, d)| g - d).collect();

    // Throughput: `concurrency` requests in flight, straight to the worker (the ceiling on this
    // machine), then through the gateway.
    let direct_rate = load(
        send.clone(),
        format!("{worker_url}{path}"),
        "direct-load",
        args.load_requests,
        args.concurrency,
    )
    .await?;
    let gateway_rate = load(
        send.clone(),
        format!("{gateway_url}{path}"),
        "load",
        args.load_requests,
        args.concurrency,
    )
    .await?;
    let ledger = ledger::Ledger::connect(&database_url).await?;
    let billed = ledger.billable_tokens(&license_id, 0).await?;
    let expected = (args.requests + 20 + args.load_requests) as i64;

    let report = json!({
        "bench": "gateway",
        "database": if database_url.starts_with("postgres") { "postgres" } else { "sqlite" },
        "requests": args.requests,
        "worker_direct_median_ms": median(direct.clone()),
        "gateway_median_ms": median(through.clone()),
        "gateway_p99_ms": percentile(through, 0.99),
        "overhead_median_ms": median(overhead.clone()),
        "overhead_p99_ms": percentile(overhead, 0.99),
        "load_requests": args.load_requests,
        "concurrency": args.concurrency,
        "worker_direct_requests_per_second": direct_rate,
        "requests_per_second": gateway_rate,
        "upload_bytes": upload_bytes,
        "layer_shape": format!("{}x{}", args.hidden, 3 * args.hidden),
        "billed_tokens": billed,
        "billed_exactly": billed == expected,
        "threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
    });
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for (k, v) in report.as_object().context("object")? {
            println!("  {k:<26} {v}");
        }
    }
    Ok(())
}

/// Sends `total` requests to `url` with `concurrency` in flight; returns requests per second.
async fn load<F, Fut>(
    send: F,
    url: String,
    prefix: &str,
    total: usize,
    concurrency: usize,
) -> Result<f64>
where
    F: Fn(String, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<f64>> + Send,
{
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, send, url, prefix) =
            (next.clone(), send.clone(), url.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                send(url.clone(), format!("{prefix}{i}")).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
