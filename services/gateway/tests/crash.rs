//! A gateway killed (`kill -9`) with requests in flight strands no quota for good: after the
//! reservation lease its license has its whole quota again, nothing was billed for the
//! unanswered requests, and a query answered just before the crash is billed exactly once when
//! its client retries it with the same query id (also once the quota is used up: it was paid
//! for). The gateway runs as a real process, on SQLite and on Postgres.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use license::{KeySet, SigningKey};

const LEASE_SECONDS: u64 = 2;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `hybrid-gateway` process over `database_url`, ready.
async fn start_gateway(dir: &std::path::Path, database_url: &str, worker: &str) -> (Child, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_hybrid-gateway"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--database-url", database_url])
        .args(["--keyset", dir.join("keyset.json").to_str().unwrap()])
        .args(["--worker", worker])
        .args(["--reservation-lease-seconds", &LEASE_SECONDS.to_string()])
        .args(["--revocation-refresh-ms", "0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;
    (child, url)
}

async fn in_flight(ledger: &ledger::Ledger) -> i64 {
    let all = ledger::UsageFilter::default();
    let now = now() as i64 * 1000;
    ledger
        .in_flight(&all, now)
        .await
        .unwrap()
        .iter()
        .map(|r| r.tokens)
        .sum()
}

async fn apply(url: &str, license: &str, query_id: &str, rows: usize) -> (u16, String) {
    let answer = reqwest::Client::new()
        .post(format!("{url}/v1/models/tiny/layers/{LAYER}/apply"))
        .bearer_auth(license)
        .header(protocol::QUERY_ID_HEADER, query_id)
        .body(batch(rows))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, error_code(&answer.bytes().await.unwrap()))
}

async fn check(database_url: String) {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = compile_tiny(dir.path());
    // A worker whose one compute slot the test can hold: "the worker paused".
    let (worker_url, slots) = paused_worker(server, Duration::from_secs(30)).await;

    let key = SigningKey::generate("k1");
    let keyset = KeySet::new(&[key.public().unwrap()]).unwrap();
    std::fs::write(dir.path().join("keyset.json"), keyset.to_json()).unwrap();
    let license = key.issue(&claims("lic-crash", 5)).unwrap();
    let ledger = ledger::Ledger::connect(&database_url).await.unwrap();

    let (mut gateway, url) = start_gateway(dir.path(), &database_url, &worker_url).await;
    // Answered just before the crash: billed.
    assert_eq!(apply(&url, &license, "q-done", 1).await.0, 200);
    // Three requests in flight when the gateway is killed, the worker paused.
    let held = slots.clone().acquire_owned().await.unwrap();
    let lost: Vec<_> = (0..3)
        .map(|i| {
            let (url, license) = (url.clone(), license.clone());
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(format!("{url}/v1/models/tiny/layers/{LAYER}/apply"))
                    .bearer_auth(&license)
                    .header(protocol::QUERY_ID_HEADER, format!("q-lost-{i}"))
                    .body(batch(1))
                    .send()
                    .await
            })
        })
        .collect();
    let started = Instant::now();
    while in_flight(&ledger).await != 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let crashed_at = Instant::now();
    gateway.kill().unwrap(); // SIGKILL: nothing settles, nothing releases.
    gateway.wait().unwrap();
    for request in lost {
        assert!(
            request.await.unwrap().is_err(),
            "no answer from a dead gateway"
        );
    }
    drop(held);

    let (mut gateway, url) = start_gateway(dir.path(), &database_url, &worker_url).await;
    let seen = customer_usage(&url, &license).await;
    assert_eq!(seen.billable_tokens, 1);
    if crashed_at.elapsed() < Duration::from_secs(LEASE_SECONDS) {
        // The customer sees the stranded tokens as in flight, and the lease still holds them.
        assert_eq!(seen.reserved_tokens, 3);
        assert_eq!(
            apply(&url, &license, "q-early", 2).await,
            (429, "quota_exceeded".to_string())
        );
    }
    // The answered query, retried with its id: answered again, not billed again.
    assert_eq!(apply(&url, &license, "q-done", 1).await.0, 200);
    assert_eq!(customer_usage(&url, &license).await.billable_tokens, 1);

    // After the lease: the whole quota is usable again.
    let lease_end = crashed_at + Duration::from_secs(LEASE_SECONDS) + Duration::from_millis(100);
    tokio::time::sleep_until(lease_end.into()).await;
    assert_eq!(customer_usage(&url, &license).await.reserved_tokens, 0);
    assert_eq!(apply(&url, &license, "q-after", 4).await.0, 200);
    assert_eq!(
        apply(&url, &license, "q-full", 1).await,
        (429, "quota_exceeded".to_string())
    );
    // With the quota used up, a retry of a billed query is still answered (it was paid for).
    assert_eq!(apply(&url, &license, "q-after", 4).await.0, 200);
    let seen = customer_usage(&url, &license).await;
    assert_eq!((seen.billable_tokens, seen.reserved_tokens), (5, 0));
    let billed: Vec<String> = ledger
        .usage_events("lic-crash")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.query_id)
        .collect();
    assert_eq!(
        billed,
        ["q-done", "q-after"],
        "nothing billed for the unanswered"
    );
    gateway.kill().unwrap();
    gateway.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_strands_no_quota_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    check(sqlite_url(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_strands_no_quota_on_postgres() {
    check(postgres_url().await).await;
}
