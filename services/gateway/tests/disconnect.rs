//! Clients that give up mid-request (a timeout, a dropped connection) strand nothing: the
//! request runs to its settlement, the worker's answer is billed once, and nothing stays
//! reserved; a retry with the same query id is answered and not billed again. On SQLite and
//! Postgres.

mod common;

use std::time::Duration;

use common::*;
use gateway::{Application, GatewayConfig};
use license::{KeySet, SigningKey};
use sqlx::Row;

async fn reserved_and_used(ledger: &ledger::Ledger) -> (i64, i64) {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(reserved), 0) AS BIGINT), CAST(COALESCE(SUM(used), 0) AS BIGINT) FROM quota_usage",
    )
    .fetch_one(ledger.pool())
    .await
    .unwrap();
    (row.get(0), row.get(1))
}

async fn check(database_url: String) {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = compile_tiny(dir.path());
    // A worker with one compute slot, held by the test: requests wait in its queue.
    let (worker_url, slots) = paused_worker(server, Duration::from_secs(10)).await;
    let held = slots.clone().acquire_owned().await.unwrap();

    let key = SigningKey::generate("k1");
    let keyset = KeySet::new(&[key.public().unwrap()]).unwrap();
    let config = GatewayConfig::local(&database_url, keyset, AUD, vec![worker_url]);
    let app = Application::build(config).await.unwrap();
    let url = format!(
        "http://127.0.0.1:{}/v1/models/tiny/layers/{LAYER}/apply",
        app.port()
    );
    let ledger = app.ledger();
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let license = key.issue(&claims("lic-gone", 1000)).unwrap();

    // Three clients give up after 300 ms, while the worker is busy.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for i in 0..3 {
        let sent = client
            .post(&url)
            .bearer_auth(&license)
            .header(protocol::QUERY_ID_HEADER, format!("gone-{i}"))
            .body(batch(4))
            .send()
            .await;
        assert!(sent.is_err(), "the client gave up before the answer");
    }
    assert_eq!(
        reserved_and_used(&ledger).await,
        (12, 0),
        "in flight: reserved"
    );
    // The worker frees up: the abandoned requests run to their end and are billed once.
    drop(held);
    let started = std::time::Instant::now();
    while reserved_and_used(&ledger).await != (0, 12) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            reserved_and_used(&ledger).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ledger.usage_events("lic-gone").await.unwrap().len(), 3);
    // The client retries one with the same query id: answered, not billed again.
    let answer = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&license)
        .header(protocol::QUERY_ID_HEADER, "gone-1")
        .body(batch(4))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(reserved_and_used(&ledger).await, (0, 12));
    assert_eq!(ledger.usage_events("lic-gone").await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_are_settled_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    check(sqlite_url(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_are_settled_once_on_postgres() {
    check(postgres_url().await).await;
}
