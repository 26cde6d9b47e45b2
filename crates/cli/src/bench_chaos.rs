//! `hybrid bench chaos`: a soak of the metered path under faults. Two `hybrid-gateway` and two
//! `hybrid-worker` processes on one Postgres ledger, several licenses with small quotas, and
//! clients that retry with the same query id, while a killer `kill -9`s a random gateway or
//! worker every few seconds and starts it again (and, given a command for it, restarts Postgres
//! once). At the end, after the reservation lease, the ledger is checked against what the
//! clients saw:
//! - every query a client saw answered is billed exactly once;
//! - no query without an answer is billed;
//! - no quota is exceeded;
//! - nothing stays reserved: each license can still reserve all of its unused quota;
//! - the usage rows, rollups and quota counters agree (`Ledger::reconcile`).
//!
//! With `--prometheus`, a real Prometheus scrapes every process with `deploy/`'s jobs and alert
//! rules (durations divided by `--alert-time-scale`), and the alerts that fired are reported;
//! the rules for a dead worker (`--dead-worker-seconds`), gateway errors and ledger trouble
//! (`--restart-postgres`) must fire on their faults.
//!
//! `invariants_hold` is true only when all of them hold.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use fhe_linear::{ClientKey, LayerShape, LayerSpec, HFHE_GLWE_2048_V1};
use license::{KeySet, LicenseClaims, QuotaPeriod, SigningKey};
use serde_json::json;

use crate::local::{free_port, sibling_binary, wait_ready, Service, WorkDir};

const LAYER: &str = "layers.1.mixer.Wqkv";

#[derive(Args)]
pub struct ChaosArgs {
    /// Ledger: postgres://... (an existing database; its tables are created).
    #[arg(long)]
    database_url: String,
    /// How long the clients send requests, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds between kills (SIGKILL of a random gateway or worker, started again at once).
    #[arg(long, default_value_t = 4.0)]
    kill_every: f64,
    /// A shell command that restarts Postgres, run once half-way (e.g. `pg_ctlcluster 15 main
    /// restart`) [default: Postgres is not restarted].
    #[arg(long)]
    restart_postgres: Option<String>,
    /// The gateways' reservation lease, in seconds.
    #[arg(long, default_value_t = 3)]
    lease_seconds: u64,
    #[arg(long, default_value_t = 4)]
    licenses: usize,
    /// Tokens each license may use.
    #[arg(long, default_value_t = 2000)]
    quota: u64,
    /// Clients sending at the same time (each one query at a time).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Keep one worker dead this long (a quarter of the way in), for the dead-target alert
    /// [default: 0, no such phase].
    #[arg(long, default_value_t = 0)]
    dead_worker_seconds: u64,
    /// A Prometheus binary (Debian's `prometheus`) to scrape the processes and evaluate the
    /// alert rules during the soak [default: none].
    #[arg(long)]
    prometheus: Option<std::path::PathBuf>,
    /// The alert rules Prometheus evaluates.
    #[arg(long, default_value = "deploy/prometheus/alerts.yml")]
    alert_rules: std::path::PathBuf,
    /// The rules' durations (`for:`, rate windows) are divided by this: 60 makes a minute of
    /// rule time a second of the soak.
    #[arg(long, default_value_t = 60.0)]
    alert_time_scale: f64,
    #[arg(long)]
    json: bool,
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// (license, query id) -> tokens, for every answered query.
    answered: HashMap<(String, String), i64>,
    /// Queries given up unanswered (their deadline passed).
    abandoned: Vec<(String, String)>,
    /// Final refusals by code.
    refused: BTreeMap<String, u64>,
    /// Answers that were retried (an error, no answer) by code or `transport`.
    retried: BTreeMap<String, u64>,
    requests: u64,
}

/// One service process the killer may kill and start again.
struct Slot {
    name: String,
    command: Command,
    url: String,
    process: Option<Service>,
}

impl Slot {
    fn start(&mut self) -> Result<()> {
        self.process = Some(Service(
            self.command
                .spawn()
                .with_context(|| format!("starting {}", self.name))?,
        ));
        Ok(())
    }
}

/// A small xorshift generator: which process to kill, how many rows to send.
struct Dice(u64);

impl Dice {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

pub fn run(args: ChaosArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(soak(args))
}

async fn soak(args: ChaosArgs) -> Result<()> {
    anyhow::ensure!(
        args.database_url.starts_with("postgres"),
        "--database-url: a Postgres database (postgres://...)"
    );
    let work = WorkDir::new(None, "hybrid-chaos")?;
    let dir = work.path().to_path_buf();
    let (_, server, tiny) = crate::bench_gateway::stand_in_bundle(&dir, 16)?;
    let key = SigningKey::generate("chaos");
    let keyset_path = dir.join("keyset.json");
    std::fs::write(&keyset_path, KeySet::new(&[key.public()?])?.to_json())?;
    // The ledger's schema, before any gateway starts.
    let ledger = ledger::Ledger::connect(&args.database_url).await?;

    let (worker_bin, gateway_bin) = (
        sibling_binary("hybrid-worker")?,
        sibling_binary("hybrid-gateway")?,
    );
    let mut slots = Vec::new();
    let mut worker_urls = Vec::new();
    let (mut worker_metrics, mut gateway_metrics) = (Vec::new(), Vec::new());
    for i in 0..2 {
        let port = free_port()?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        worker_metrics.push(metrics.clone());
        let mut command = Command::new(&worker_bin);
        command
            .args(["--bundle", server.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &metrics])
            .args(["--packed-results", "false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let url = format!("http://127.0.0.1:{port}");
        worker_urls.push(url.clone());
        slots.push(Slot {
            name: format!("worker-{i}"),
            command,
            url,
            process: None,
        });
    }
    let mut gateway_urls = Vec::new();
    for i in 0..2 {
        let port = free_port()?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        gateway_metrics.push(metrics.clone());
        let mut command = Command::new(&gateway_bin);
        command
            .args(["--keyset", keyset_path.to_str().unwrap()])
            .args(["--worker", &worker_urls.join(",")])
            .args(["--database-url", &args.database_url])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &metrics])
            .args([
                "--reservation-lease-seconds",
                &args.lease_seconds.to_string(),
            ])
            .args(["--worker-timeout-ms", "2000"])
            .args(["--health-interval-ms", "500"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let url = format!("http://127.0.0.1:{port}");
        gateway_urls.push(url.clone());
        slots.push(Slot {
            name: format!("gateway-{i}"),
            command,
            url,
            process: None,
        });
    }
    for slot in &mut slots {
        slot.start()?;
    }
    for slot in &slots {
        anyhow::ensure!(
            wait_ready(
                &slot.url,
                Duration::from_millis(50),
                Duration::from_secs(60)
            )
            .await,
            "{} did not become ready",
            slot.name
        );
    }

    let alerts = match &args.prometheus {
        Some(binary) => Some(
            crate::alert_watch::AlertWatch::start(
                binary,
                &dir,
                &args.alert_rules,
                args.alert_time_scale,
                &gateway_metrics,
                &worker_metrics,
            )
            .await?,
        ),
        None => None,
    };

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let licenses: Vec<(String, String)> = (0..args.licenses)
        .map(|i| {
            let id = format!("chaos-{}-{i}", &run_id[..8]);
            let token = key.issue(&LicenseClaims {
                jti: id.clone(),
                sub: "chaos".into(),
                iss: "vendor".into(),
                aud: "hybrid-gateway".into(),
                model: "tiny".into(),
                layers: vec!["*".into()],
                quota_tokens: args.quota,
                quota_period: QuotaPeriod::Total,
                rate_limit_per_minute: u32::MAX,
                max_in_flight: 64,
                iat: now,
                nbf: now,
                exp: now + 86_400,
            })?;
            Ok((id, token))
        })
        .collect::<Result<_>>()?;
    let spec = LayerSpec::choose(
        &HFHE_GLWE_2048_V1,
        LayerShape::new(tiny.hidden_size, 3 * tiny.hidden_size),
        1,
    )?;
    let client_key = ClientKey::generate(&HFHE_GLWE_2048_V1);
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (1..=3)
            .map(|rows| {
                Ok(client_key
                    .encrypt(&spec, &vec![3i16; tiny.hidden_size * rows], rows)?
                    .to_bytes())
            })
            .collect::<Result<_>>()?,
    );

    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let (seen, http, bodies) = (seen.clone(), http.clone(), bodies.clone());
            let (licenses, gateways) = (licenses.clone(), gateway_urls.clone());
            tokio::spawn(async move {
                let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1));
                let mut n = 0usize;
                while Instant::now() < until {
                    n += 1;
                    let (license_id, token) = &licenses[(c + n) % licenses.len()];
                    let rows = 1 + dice.next(3);
                    let query_id = format!("c{c}-{n}");
                    one_query(
                        &http, &gateways, token, license_id, &query_id, rows, &bodies, &seen,
                        &mut dice,
                    )
                    .await;
                }
            })
        })
        .collect();

    // The killer.
    let mut kills = Vec::new();
    let mut dice = Dice(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64 | 1);
    let mut postgres_restart = None;
    let mut restart_postgres = args.restart_postgres.clone();
    let mut dead_phase = (args.dead_worker_seconds > 0).then_some(args.dead_worker_seconds);
    let mut dead_worker = None;
    let every = Duration::from_secs_f64(args.kill_every.max(0.5));
    while Instant::now() + every < until {
        tokio::time::sleep(every).await;
        let quarter_way = started.elapsed() * 4 >= until - started;
        if let Some(seconds) = dead_phase.take_if(|_| quarter_way) {
            // One worker stays dead: the other serves, and the dead target's alert must fire.
            let slot = &mut slots[1];
            if let Some(mut process) = slot.process.take() {
                process.0.kill()?;
                process.0.wait()?;
            }
            let at = started.elapsed().as_secs_f64();
            dead_worker = Some(json!({ "target": slot.name, "at_s": at, "seconds": seconds }));
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            slot.start()?;
            continue;
        }
        let half_way = started.elapsed() * 2 >= until - started;
        if let Some(command) = restart_postgres.take_if(|_| half_way) {
            let at = started.elapsed().as_secs_f64();
            let t = Instant::now();
            let status = Command::new("sh").args(["-c", &command]).status()?;
            anyhow::ensure!(status.success(), "`{command}` failed: {status}");
            let back = ready_all(&gateway_urls).await;
            postgres_restart = Some(json!({
                "at_s": at,
                "recover_ms": back.then(|| t.elapsed().as_secs_f64() * 1e3),
            }));
            continue;
        }
        let slot = &mut slots[dice.next(4)];
        if slot.process.is_none() {
            continue;
        }
        let at = started.elapsed().as_secs_f64();
        if let Some(mut process) = slot.process.take() {
            process.0.kill()?; // SIGKILL
            process.0.wait()?;
        }
        let t = Instant::now();
        slot.start()?;
        let ready = wait_ready(
            &slot.url,
            Duration::from_millis(20),
            Duration::from_secs(60),
        )
        .await;
        kills.push(json!({
            "target": slot.name,
            "at_s": at,
            "recover_ms": ready.then(|| t.elapsed().as_secs_f64() * 1e3),
        }));
    }
    for c in clients {
        c.await?;
    }
    let sending_s = started.elapsed().as_secs_f64();

    // After the lease, nothing a dead gateway reserved holds quota any more.
    tokio::time::sleep(Duration::from_secs(args.lease_seconds) + Duration::from_millis(500)).await;
    let seen = std::mem::take(&mut *seen.lock().expect("seen"));
    let mut billed = HashMap::new();
    let mut billed_rows = 0u64;
    for (license_id, _) in &licenses {
        for e in ledger.usage_events(license_id).await? {
            billed_rows += 1;
            *billed
                .entry((e.license_id.clone(), e.query_id.clone()))
                .or_insert(0i64) += 1;
        }
    }
    let answered_billed_once = seen
        .answered
        .keys()
        .all(|k| billed.get(k).copied() == Some(1));
    let answered: HashSet<_> = seen.answered.keys().collect();
    let unanswered_billed: Vec<_> = billed.keys().filter(|k| !answered.contains(k)).collect();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let mut stranded = Vec::new();
    let mut over_quota = Vec::new();
    for (license_id, _) in &licenses {
        let used = ledger.billable_tokens(license_id, 0).await?;
        if used > args.quota as i64 {
            over_quota.push(license_id.clone());
        }
        let free = args.quota as i64 - used;
        if free > 0 {
            let layers = [LAYER];
            let reserve = ledger::Reserve {
                license_id,
                customer_id: "chaos",
                model: "tiny",
                layers: &layers,
                period_start: 0,
                quota: args.quota as i64,
                tokens: free,
                rate: ledger::Rate {
                    per_minute: i64::MAX / 2,
                    cost: free,
                },
                now: now_ms,
                lease_ms: 1000,
            };
            match ledger.reserve(&reserve).await {
                Ok(r) => r.release().await?,
                Err(e) => stranded.push(format!("{license_id}: {e}")),
            }
        }
    }
    let disagreements = ledger.reconcile().await?;
    // The alerts that must have fired on the faults the soak caused.
    let (fired, alerts_fired_on_their_faults) = match &alerts {
        None => (None, true),
        Some(watch) => {
            let fired = watch.fired();
            let mut expected = Vec::new();
            if dead_worker.is_some() {
                expected.push("HybridTargetDown");
            }
            if postgres_restart.is_some() {
                expected.extend(["HybridLedgerUnavailable", "HybridGatewayHighErrorRate"]);
            }
            let missing: Vec<_> = expected
                .iter()
                .filter(|a| !fired.contains_key(**a))
                .collect();
            let report = json!({ "fired": fired, "expected": expected, "missing": missing });
            (Some(report), missing.is_empty())
        }
    };
    let invariants = json!({
        "answered_billed_exactly_once": answered_billed_once,
        "no_unanswered_query_billed": unanswered_billed.is_empty(),
        "no_quota_exceeded": over_quota.is_empty(),
        "nothing_reserved_after_the_lease": stranded.is_empty(),
        "counters_agree": disagreements.is_empty(),
        "alerts_fired_on_their_faults": alerts_fired_on_their_faults,
    });
    let invariants_hold = invariants
        .as_object()
        .is_some_and(|o| o.values().all(|v| v == true));
    let answered_tokens: i64 = seen.answered.values().sum();
    let report = json!({
        "bench": "chaos",
        "seconds": sending_s,
        "gateways": 2,
        "workers": 2,
        "licenses": args.licenses,
        "quota_per_license": args.quota,
        "clients": args.clients,
        "lease_seconds": args.lease_seconds,
        "requests": seen.requests,
        "queries_answered": seen.answered.len(),
        "tokens_answered": answered_tokens,
        "usage_rows": billed_rows,
        "abandoned": seen.abandoned.len(),
        "refused": seen.refused,
        "retried": seen.retried,
        "kills": kills,
        "postgres_restart": postgres_restart,
        "dead_worker": dead_worker,
        "alerts": fired,
        "invariants": invariants,
        "violations": {
            "unanswered_billed": unanswered_billed.iter().take(10).map(|(l, q)| format!("{l} {q}")).collect::<Vec<_>>(),
            "over_quota": over_quota,
            "stranded": stranded,
            "disagreements": disagreements,
        },
        "invariants_hold": invariants_hold,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Whether every gateway is ready again (the ledger answers), waiting up to a minute.
async fn ready_all(urls: &[String]) -> bool {
    for url in urls {
        if !wait_ready(url, Duration::from_millis(50), Duration::from_secs(60)).await {
            return false;
        }
    }
    true
}

/// One query, retried with the same id (on the other gateway, after a pause) until it is
/// answered, finally refused, or 30 s have passed.
#[allow(clippy::too_many_arguments)]
async fn one_query(
    http: &reqwest::Client,
    gateways: &[String],
    token: &str,
    license_id: &str,
    query_id: &str,
    rows: usize,
    bodies: &[Vec<u8>],
    seen: &Mutex<Seen>,
    dice: &mut Dice,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut gateway = dice.next(gateways.len());
    let key = (license_id.to_string(), query_id.to_string());
    while Instant::now() < deadline {
        let sent = http
            .post(format!(
                "{}/v1/models/tiny/layers/{LAYER}/apply",
                gateways[gateway]
            ))
            .bearer_auth(token)
            .header(protocol::QUERY_ID_HEADER, query_id)
            .body(bodies[rows - 1].clone())
            .send()
            .await;
        let (status, code) = match sent {
            Ok(answer) => {
                let status = answer.status().as_u16();
                let body = answer.bytes().await;
                match (status, body) {
                    (200, Ok(_)) => (200, String::new()),
                    (_, Ok(body)) => (
                        status,
                        serde_json::from_slice::<protocol::ErrorBody>(&body)
                            .map(|e| e.code)
                            .unwrap_or_else(|_| format!("http_{status}")),
                    ),
                    (_, Err(_)) => (0, "transport".to_string()),
                }
            }
            Err(_) => (0, "transport".to_string()),
        };
        let done = {
            let mut s = seen.lock().expect("seen");
            s.requests += 1;
            match (status, code.as_str()) {
                (200, _) => {
                    s.answered.insert(key.clone(), rows as i64);
                    true
                }
                // Final: retrying does not help.
                (400..=499, _) if code != "rate_limited" && code != "too_many_in_flight" => {
                    *s.refused.entry(code).or_insert(0) += 1;
                    true
                }
                _ => {
                    *s.retried.entry(code).or_insert(0) += 1;
                    false
                }
            }
        };
        if done {
            return;
        }
        gateway = (gateway + 1) % gateways.len();
        tokio::time::sleep(Duration::from_millis(50 + dice.next(150) as u64)).await;
    }
    seen.lock().expect("seen").abandoned.push(key);
}
