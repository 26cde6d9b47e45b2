//! The gateway as a real service on loopback, with real workers and a real ledger database
//! (a throw-away Postgres database, or a SQLite file).

mod common;

use std::sync::Arc;

use common::*;
use fhe_linear::{ClientKey, LayerShape, LayerSpec, HFHE_GLWE_2048_V1};
use license::SigningKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_generation_through_the_gateway_is_exact_and_billed() {
    let s = stack(postgres_url().await, 1, 0).await;
    let license = s.key.issue(&claims("lic-gen", 1000)).unwrap();
    let (url, client_dir, lic) = (s.url.clone(), s.client_dir.clone(), license.clone());
    tokio::task::spawn_blocking(move || {
        let prompt = [6, 60, 19, 40, 72];
        let options = hybrid_model::GenerateOptions {
            max_tokens: 6,
            ..Default::default()
        };
        let (client, want) = simulated_generation(&client_dir, &prompt, &options);

        let remote = hybrid_model::remote::RemoteConfig {
            license: Some(lic),
            results: hybrid_model::remote::ResultsMode::Keyless,
            keys: hybrid_model::remote::KeySource::Session,
            ..hybrid_model::remote::RemoteConfig::new(url, "tiny")
        };
        let mut model = hybrid_model::build_remote(&client, remote).unwrap();
        assert_eq!(
            hybrid_model::generate(&mut model, &prompt, &options, |_| {}).unwrap(),
            want
        );
    })
    .await
    .unwrap();
    // Prefill (5 rows) + 5 decode steps (1 row each) through the one protected layer.
    assert_eq!(s.billable("lic-gen").await, 10);
    assert_eq!(s.ledger.usage_events("lic-gen").await.unwrap().len(), 6);
    let usage = customer_usage(&s.url, &license).await;
    assert_eq!((usage.billable_tokens, usage.reserved_tokens), (10, 0));
    let metrics = s.metrics().await;
    for name in [
        "gateway_requests_total",
        "gateway_request_seconds",
        "gateway_tokens_metered_total 10",
        "gateway_quota_rejections_total",
        "gateway_workers_healthy",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    assert!(
        !metrics.contains("lic-gen") && !metrics.contains("acme"),
        "no license or customer label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_misused_and_revoked_licenses_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = stack(sqlite_url(&dir), 1, 0).await;
    let body = batch(1);
    let good = s.key.issue(&claims("lic-ok", 100)).unwrap();
    let mut wrong_aud = claims("lic-a", 100);
    wrong_aud.aud = "elsewhere".into();
    let mut expired = claims("lic-e", 100);
    expired.exp = now() - 3600;
    let mut early = claims("lic-n", 100);
    early.nbf = now() + 3600;
    let mut other_model = claims("lic-m", 100);
    other_model.model = "other".into();
    let mut other_layer = claims("lic-l", 100);
    other_layer.layers = vec!["lm_head".into()];
    let parts: Vec<&str> = good.split('.').collect();
    use base64::Engine;
    let none_header =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k1"}"#);
    let cases: Vec<(Option<String>, u16, &str)> = vec![
        (None, 401, "license_missing"),
        (
            Some(format!("{none_header}.{}.", parts[1])),
            401,
            "license_algorithm_refused",
        ),
        (
            Some(format!("{}.{}x.{}", parts[0], parts[1], parts[2])),
            401,
            "license_bad_signature",
        ),
        (
            Some(
                SigningKey::generate("k9")
                    .issue(&claims("lic-x", 100))
                    .unwrap(),
            ),
            401,
            "license_unknown_kid",
        ),
        (
            Some(s.key.issue(&wrong_aud).unwrap()),
            401,
            "license_wrong_audience",
        ),
        (Some(s.key.issue(&expired).unwrap()), 401, "license_expired"),
        (
            Some(s.key.issue(&early).unwrap()),
            401,
            "license_not_yet_valid",
        ),
        (
            Some(s.key.issue(&other_model).unwrap()),
            403,
            "license_wrong_model",
        ),
        (
            Some(s.key.issue(&other_layer).unwrap()),
            403,
            "layer_not_licensed",
        ),
    ];
    for (token, status, code) in cases {
        assert_eq!(
            s.post(token.as_deref(), Some("q1"), body.clone()).await,
            (status, code.to_string())
        );
    }
    assert_eq!(s.post(Some(&good), Some("q1"), body.clone()).await.0, 200);
    s.ledger
        .revoke("lic-ok", "test", "admin", now() as i64 * 1000)
        .await
        .unwrap();
    assert_eq!(
        s.post(Some(&good), Some("q2"), body.clone()).await,
        (401, "license_revoked".to_string())
    );
    assert_eq!(s.billable("lic-ok").await, 1);
    assert_eq!(
        s.worker_applies().await,
        1,
        "refused requests never reach a worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_admit_exactly_the_quota() {
    let s = Arc::new(stack(postgres_url().await, 1, 0).await);
    let license = Arc::new(s.key.issue(&claims("lic-q", 20)).unwrap());
    let body = Arc::new(batch(1));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (s, license, body) = (s.clone(), license.clone(), body.clone());
            tokio::spawn(async move {
                s.post(Some(&license), Some(&format!("q{i}")), body.to_vec())
                    .await
            })
        })
        .collect();
    let mut outcomes = std::collections::HashMap::new();
    for t in tasks {
        *outcomes.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        outcomes.get(&(200, String::new())),
        Some(&20),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.get(&(429, "quota_exceeded".to_string())),
        Some(&30),
        "{outcomes:?}"
    );
    assert_eq!(s.billable("lic-q").await, 20);
    assert_eq!(s.ledger.usage_events("lic-q").await.unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_bill_once_and_dead_workers_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let s = stack(sqlite_url(&dir), 1, 1).await;
    let license = s.key.issue(&claims("lic-r", 100)).unwrap();
    let body = batch(3);
    for _ in 0..2 {
        assert_eq!(
            s.post(Some(&license), Some("same-query"), body.clone())
                .await
                .0,
            200
        );
    }
    for q in ["a", "b", "c"] {
        assert_eq!(s.post(Some(&license), Some(q), body.clone()).await.0, 200);
    }
    assert_eq!(
        s.billable("lic-r").await,
        12,
        "4 billed queries of 3 tokens; the retry is free"
    );
    assert_eq!(s.ledger.usage_events("lic-r").await.unwrap().len(), 4);
    assert_eq!(s.worker_applies().await, 5, "the retry is served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_codes_and_no_usage() {
    let dir = tempfile::tempdir().unwrap();
    let s = stack(sqlite_url(&dir), 1, 0).await;
    let license = s.key.issue(&claims("lic-b", 1000)).unwrap();
    assert_eq!(
        s.post(Some(&license), Some("q"), b"garbage".to_vec()).await,
        (400, "ciphertext_bad_magic".into())
    );
    assert_eq!(
        s.post(Some(&license), Some("q"), vec![0; 2 << 20]).await,
        (413, "body_too_large".into())
    );
    assert_eq!(
        s.post(Some(&license), None, batch(1)).await,
        (400, "missing_query_id".into())
    );
    assert_eq!(
        s.post(Some(&license), Some("q"), batch(65)).await.0,
        413,
        "over the row cap"
    );
    let mut truncated = batch(1);
    truncated.pop();
    assert_eq!(
        s.post(Some(&license), Some("q"), truncated).await,
        (400, "ciphertext_truncated".into())
    );
    // A well-formed batch for another shape: the worker refuses it; nothing is billed.
    let other = LayerSpec::choose(&HFHE_GLWE_2048_V1, LayerShape::new(32, 8), 1).unwrap();
    let wrong = ClientKey::generate(&HFHE_GLWE_2048_V1)
        .encrypt(&other, &[1; 32], 1)
        .unwrap()
        .to_bytes();
    assert_eq!(
        s.post(Some(&license), Some("q"), wrong).await,
        (400, "layer_mismatch".into())
    );
    assert_eq!(s.billable("lic-b").await, 0);
    assert!(s.ledger.usage_events("lic-b").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_down_refuses_and_forwards_nothing() {
    let url = postgres_url().await;
    let s = stack(url.clone(), 1, 0).await;
    let license = s.key.issue(&claims("lic-d", 100)).unwrap();
    assert_eq!(s.post(Some(&license), Some("q1"), batch(1)).await.0, 200);
    let (admin, name) = url.rsplit_once('/').unwrap();
    let admin = sqlx::AnyPool::connect(&format!("{admin}/postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    assert_eq!(
        s.post(Some(&license), Some("q2"), batch(1)).await,
        (503, "ledger_unavailable".into())
    );
    assert_eq!(
        s.worker_applies().await,
        1,
        "nothing forwarded while usage cannot be recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_mid_request_is_retried_elsewhere_and_billed_once() {
    let dying = dying_worker().await;
    let s = stack_with(postgres_url().await, 1, vec![dying]).await;
    let license = s.key.issue(&claims("lic-k", 100)).unwrap();
    // Round-robin starts on the dying worker for one of the first two requests.
    for q in ["k1", "k2"] {
        assert_eq!(s.post(Some(&license), Some(q), batch(2)).await.0, 200);
    }
    assert_eq!(s.billable("lic-k").await, 4);
    let events = s.ledger.usage_events("lic-k").await.unwrap();
    assert_eq!(events.len(), 2, "one usage row per query");
    assert!(events.iter().all(|e| !e.worker.is_empty()));
    assert_eq!(s.worker_applies().await, 2);
}

/// A worker named by `dns+http://NAME:PORT` stands for every address the name resolves to (as a
/// Kubernetes headless Service does), found again at each health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_named_by_dns_are_resolved_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let s = stack_named(sqlite_url(&dir), 1, vec![], |url| {
        url.replace("http://127.0.0.1:", "dns+http://localhost:")
    })
    .await;
    let license = s.key.issue(&claims("lic-dns", 100)).unwrap();
    for q in ["d1", "d2", "d3"] {
        assert_eq!(s.post(Some(&license), Some(q), batch(1)).await.0, 200);
    }
    assert_eq!(s.billable("lic-dns").await, 3);
    let metrics = s.metrics().await;
    let known: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gateway_workers_configured "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(known >= 1, "localhost resolved to {known} workers");
}
