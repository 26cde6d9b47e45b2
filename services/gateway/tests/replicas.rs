//! Two gateways on one ledger enforce one rate limit per license between them (not one each),
//! and one quota.

mod common;

use common::*;
use gateway::{Application, GatewayConfig};
use license::{KeySet, SigningKey};

async fn check(database_url: String) {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = compile_tiny(dir.path());
    let worker = worker::Application::build(worker::WorkerConfig::local(vec![server]))
        .await
        .unwrap();
    let worker_url = format!("http://127.0.0.1:{}", worker.port());
    tokio::spawn(worker.run_until_stopped(std::future::pending()));
    wait_ready(&worker_url).await;

    let key = SigningKey::generate("k1");
    let keyset = KeySet::new(&[key.public().unwrap()]).unwrap();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let config =
            GatewayConfig::local(&database_url, keyset.clone(), AUD, vec![worker_url.clone()]);
        let app = Application::build(config).await.unwrap();
        gateways.push(format!(
            "http://127.0.0.1:{}/v1/models/tiny/layers/{LAYER}/apply",
            app.port()
        ));
        tokio::spawn(app.run_until_stopped(std::future::pending()));
    }
    // 12 tokens per minute; each request below costs 2.
    let mut c = claims("lic-rate", 1000);
    c.rate_limit_per_minute = 12;
    let license = key.issue(&c).unwrap();
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for i in 0..8 {
        let answer = client
            .post(&gateways[i % 2])
            .bearer_auth(&license)
            .header(protocol::QUERY_ID_HEADER, format!("q{i}"))
            .body(batch(2))
            .send()
            .await
            .unwrap();
        let retry_after = answer
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let status = answer.status().as_u16();
        let code = error_code(&answer.bytes().await.unwrap());
        answers.push((status, code, retry_after));
    }
    let admitted = answers.iter().filter(|a| a.0 == 200).count();
    assert_eq!(admitted, 6, "one bucket for both gateways: {answers:?}");
    for refused in &answers[6..] {
        assert_eq!((refused.0, refused.1.as_str()), (429, "rate_limited"));
        let wait: u64 = refused.2.as_deref().unwrap().parse().unwrap();
        assert!((1..=10).contains(&wait), "{refused:?}");
    }
    let ledger = ledger::Ledger::connect(&database_url).await.unwrap();
    assert_eq!(ledger.usage_events("lic-rate").await.unwrap().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_rate_limit_on_postgres() {
    check(postgres_url().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_rate_limit_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    check(sqlite_url(&dir)).await;
}
