//! Signing keys a vendor adds or retires reach a running gateway without a restart: the key set
//! file is read again when it changes (a file that does not read leaves the set in use), and the
//! gateway publishes its keys as a JWKS document.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gateway::{Application, GatewayConfig};
use license::{KeySet, SigningKey};

async fn status(url: &str, license: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{url}/v1/usage"))
        .bearer_auth(license)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn jwks_kids(url: &str) -> Vec<String> {
    let text = reqwest::get(format!("{url}/.well-known/jwks.json"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

/// Polls `check` until it holds (5 s at most).
async fn eventually<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(5), "never happened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_set_files_are_reloaded_and_published_as_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (SigningKey::generate("k1"), SigningKey::generate("k2"));
    let file = dir.path().join("keyset.json");
    let write = |keys: &[&SigningKey]| {
        let set =
            KeySet::new(&keys.iter().map(|k| k.public().unwrap()).collect::<Vec<_>>()).unwrap();
        std::fs::write(&file, set.to_json()).unwrap();
    };
    write(&[&k1]);
    let keyset = KeySet::from_json(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let mut config = GatewayConfig::local(
        &sqlite_url(&dir),
        keyset,
        AUD,
        vec!["http://127.0.0.1:1".into()],
    );
    config.keyset_file = Some(file.clone());
    config.keyset_reload = Duration::from_millis(50);
    let app = Application::build(config).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let metrics = format!("http://127.0.0.1:{}/metrics", app.metrics_port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));

    let lic1 = k1.issue(&claims("lic-1", 100)).unwrap();
    let lic2 = k2.issue(&claims("lic-2", 100)).unwrap();
    assert_eq!(status(&url, &lic1).await, 200);
    assert_eq!(status(&url, &lic2).await, 401, "k2 is not in the set yet");
    assert_eq!(jwks_kids(&url).await, vec!["k1"]);

    // A key added to the file: accepted without a restart, and published.
    write(&[&k1, &k2]);
    eventually(|| async { status(&url, &lic2).await == 200 }).await;
    assert_eq!(jwks_kids(&url).await, vec!["k1", "k2"]);

    // A file that does not read: logged and counted, the set in use kept.
    std::fs::write(&file, "{ not json").unwrap();
    eventually(|| async {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        text.contains("gateway_keyset_reload_errors_total 1")
    })
    .await;
    assert_eq!(status(&url, &lic2).await, 200);

    // The file as a JWKS document with k1 retired: k1's licenses stop verifying.
    let only_k2 = KeySet::new(&[k2.public().unwrap()]).unwrap().to_jwks();
    std::fs::write(&file, only_k2).unwrap();
    eventually(|| async { status(&url, &lic1).await == 401 }).await;
    assert_eq!(status(&url, &lic2).await, 200);
    assert_eq!(jwks_kids(&url).await, vec!["k2"]);
}
