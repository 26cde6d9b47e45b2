//! The worker as a real process on loopback: a remote generation through it equals the local
//! simulation, and bad requests get stable error codes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hybrid_model::bundle::{load_client_bundle, load_server_bundle};
use hybrid_model::remote::RemoteConfig;
use hybrid_model::{build_from_bundles, build_remote, generate, GenerateOptions, Mode};
use worker::{Application, PlannerCosts, WorkerConfig};

fn compile_tiny(dir: &Path) -> (PathBuf, PathBuf) {
    test_support::compile_tiny(dir, &["layers.1.mixer.Wqkv", "layers.2.mlp.fc2"])
}

struct Worker {
    url: String,
    metrics_url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn spawn_worker(bundle: PathBuf, max_body_bytes: usize) -> Worker {
    let mut config = WorkerConfig::local(vec![bundle]);
    config.max_body_bytes = max_body_bytes;
    spawn_worker_with(config).await
}

async fn spawn_worker_with(config: WorkerConfig) -> Worker {
    let app = Application::build(config).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let metrics_url = format!("http://127.0.0.1:{}/metrics", app.metrics_port());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    let ready = format!("{url}/readyz");
    for _ in 0..200 {
        let ready = ready.clone();
        let status = tokio::task::spawn_blocking(move || {
            ureq::get(&ready)
                .call()
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        })
        .await
        .unwrap();
        if status == 200 {
            return Worker {
                url,
                metrics_url,
                _stop: tx,
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("worker never became ready");
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(url: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut answer = agent().post(url).send(body).unwrap();
    let status = answer.status().as_u16();
    let bytes = answer.body_mut().read_to_vec().unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// Generates `max_tokens` through the worker at `url` (keyless results) and in the simulation
/// of the bundles, asserts they agree, and returns the client bundle.
fn assert_remote_equals_simulation(
    client_dir: &Path,
    server_path: &Path,
    url: &str,
    max_tokens: usize,
) -> hybrid_model::bundle::ClientBundle {
    let client = load_client_bundle(client_dir).unwrap();
    let server = load_server_bundle(server_path).unwrap();
    let prompt = [6, 60, 19, 40, 72];
    let options = GenerateOptions {
        max_tokens,
        ..Default::default()
    };
    let mut simulate = build_from_bundles(&client, Some(&server), Mode::Simulate).unwrap();
    let want = generate(&mut simulate, &prompt, &options, |_| {}).unwrap();
    let remote = RemoteConfig {
        results: hybrid_model::remote::ResultsMode::Keyless,
        keys: hybrid_model::remote::KeySource::Session,
        ..RemoteConfig::new(url, "tiny")
    };
    let mut model = build_remote(&client, remote).unwrap();
    assert_eq!(
        generate(&mut model, &prompt, &options, |_| {}).unwrap(),
        want
    );
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_generation_through_a_worker_equals_the_simulation() {
    let dir = tempfile::tempdir().unwrap();
    let (client_dir, server_path) = compile_tiny(dir.path());
    let worker = spawn_worker(server_path.clone(), 64 << 20).await;
    let url = worker.url.clone();
    tokio::task::spawn_blocking(move || {
        let client = assert_remote_equals_simulation(&client_dir, &server_path, &url, 6);
        let wrong = RemoteConfig {
            results: hybrid_model::remote::ResultsMode::Keyless,
            keys: hybrid_model::remote::KeySource::Session,
            ..hybrid_model::remote::RemoteConfig::new("http://127.0.0.1:1", "tiny")
        };
        assert!(build_remote(&client, wrong).is_err());
    })
    .await
    .unwrap();
    let metrics = tokio::task::spawn_blocking(move || {
        ureq::get(&worker.metrics_url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap();
    for name in [
        "worker_requests_total",
        "worker_apply_seconds",
        "worker_request_bytes_total",
        "worker_inflight_requests",
        "worker_layers_loaded 2",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(metrics.contains("outcome=\"ok\""));
}

/// Layers compiled for 12-bit activations: the worker lists the width, both of its result
/// encodings take it, and generation through it equals the simulation (packed results at that
/// width: `fhe-linear`'s tests; they need a license, so a gateway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wider_activations_through_a_worker_equal_the_simulation() {
    let dir = tempfile::tempdir().unwrap();
    let (client_dir, server_path) = test_support::compile_tiny_with(
        dir.path(),
        &["layers.1.mixer.Wqkv", "layers.2.mlp.fc2"],
        hybrid_model::compile::ActivationWidth::Bits(12),
    );
    let worker = spawn_worker(server_path.clone(), 64 << 20).await;
    let url = worker.url.clone();
    tokio::task::spawn_blocking(move || {
        let layers: protocol::ModelLayers = serde_json::from_slice(
            &agent()
                .get(&format!("{url}/v1/models/tiny/layers"))
                .call()
                .unwrap()
                .body_mut()
                .read_to_vec()
                .unwrap(),
        )
        .unwrap();
        for layer in &layers.layers {
            assert_eq!(layer.activation_bits, Some(12), "{}", layer.name);
            assert_eq!(layer.to_spec().unwrap().activation_bits, 12);
            assert_eq!(layer.packed_spec().unwrap().unwrap().activation_bits, 12);
        }
        assert_remote_equals_simulation(&client_dir, &server_path, &url, 4);
    })
    .await
    .unwrap();
}

/// A deployed worker measures the planner's unit costs before it compiles its bundles, publishes
/// them, and offers the packed layouts that these costs plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_plans_its_packed_layouts_with_unit_costs_it_measured() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server_path) = compile_tiny(dir.path());
    let mut config = WorkerConfig::local(vec![server_path]);
    config.planner_costs = PlannerCosts::Measure;
    let worker = spawn_worker_with(config).await;
    let (url, metrics_url) = (worker.url.clone(), worker.metrics_url.clone());
    tokio::task::spawn_blocking(move || {
        let read = |url: &str| {
            agent()
                .get(url)
                .call()
                .unwrap()
                .body_mut()
                .read_to_vec()
                .unwrap()
        };
        let metrics = String::from_utf8(read(&metrics_url)).unwrap();
        let cost = |unit: &str| -> f64 {
            let label = format!("worker_planner_unit_cost_nanoseconds{{unit=\"{unit}\"}} ");
            let line = metrics
                .lines()
                .find(|l| l.starts_with(&label))
                .unwrap_or_else(|| panic!("{label} missing from /metrics"));
            let v: f64 = line[label.len()..].parse().unwrap();
            assert!(v.is_finite() && v > 0.0, "{line}");
            v
        };
        let planner =
            PlannerCosts::Given(["input", "mac", "output", "keyswitch"].map(cost)).planner();
        let layers: protocol::ModelLayers =
            serde_json::from_slice(&read(&format!("{url}/v1/models/tiny/layers"))).unwrap();
        for layer in &layers.layers {
            let offered = layer.packed_spec().unwrap().unwrap();
            let planned =
                worker::packed_spec(&planner, offered.shape, offered.activation_bits).unwrap();
            assert_eq!(offered, planned, "{}", layer.name);
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_stable_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server_path) = compile_tiny(dir.path());
    let worker = spawn_worker(server_path, 100_000).await;
    let base = worker.url.clone();
    tokio::task::spawn_blocking(move || {
        let apply = |layer: &str| format!("{base}/v1/models/tiny/layers/{layer}/apply");
        let (status, body) = post(&apply("layers.1.mixer.Wqkv"), b"not a ciphertext");
        assert_eq!(
            (status, body["code"].as_str().unwrap()),
            (400, "ciphertext_bad_magic")
        );
        let (status, body) = post(&apply("layers.1.mixer.Wqkv"), b"");
        assert_eq!(
            (status, body["code"].as_str().unwrap()),
            (400, "ciphertext_truncated")
        );
        let (status, body) = post(&apply("layers.9.mixer.Wqkv"), b"x");
        assert_eq!(
            (status, body["code"].as_str().unwrap()),
            (404, "unknown_layer")
        );
        let (status, body) = post(&format!("{base}/v1/models/other/layers/x/apply"), b"x");
        assert_eq!(
            (status, body["code"].as_str().unwrap()),
            (404, "unknown_model")
        );
        let (status, body) = post(&apply("bad%20name"), b"x");
        assert_eq!(
            (status, body["code"].as_str().unwrap()),
            (400, "invalid_name")
        );
        let (status, body) = post(&apply("layers.1.mixer.Wqkv"), &vec![0u8; 200_000]);
        assert_eq!(
            (status, body["code"].as_str().unwrap()),
            (413, "body_too_large")
        );

        // A valid ciphertext for another layer's shape is refused, not computed.
        let fc2 = fhe_linear::LayerSpec::choose(
            &fhe_linear::HFHE_GLWE_2048_V1,
            fhe_linear::LayerShape::new(256, 64),
            1,
        )
        .unwrap();
        let key = fhe_linear::ClientKey::generate(&fhe_linear::HFHE_GLWE_2048_V1);
        let batch = key.encrypt(&fc2, &[1i16; 256], 1).unwrap().to_bytes();
        let (status, body) = post(&apply("layers.1.mixer.Wqkv"), &batch);
        assert_eq!(
            (status, body["code"].as_str().unwrap()),
            (400, "layer_mismatch")
        );

        let mut answer = agent()
            .get(&format!("{base}/v1/models/nope/layers"))
            .call()
            .unwrap();
        assert_eq!(answer.status().as_u16(), 404);
        let body: serde_json::Value =
            serde_json::from_slice(&answer.body_mut().read_to_vec().unwrap()).unwrap();
        assert_eq!(body["code"], "unknown_model");
        assert_eq!(
            agent()
                .get(&format!("{base}/healthz"))
                .call()
                .unwrap()
                .status()
                .as_u16(),
            200
        );
    })
    .await
    .unwrap();
}

/// A saturated worker answers 503 `overloaded` with Retry-After once the queue wait is over,
/// and serves again as soon as a compute slot frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_worker_sheds_load_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server_path) = compile_tiny(dir.path());
    let mut config = WorkerConfig::local(vec![server_path]);
    config.max_concurrency = 2;
    config.queue_timeout = Duration::from_millis(100);
    let app = Application::build(config).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let slots = app.compute_slots();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    // Every compute slot taken, as by long-running requests.
    let held = slots.clone().acquire_many_owned(2).await.unwrap();
    let spec = fhe_linear::LayerSpec::choose(
        &fhe_linear::HFHE_GLWE_2048_V1,
        fhe_linear::LayerShape::new(64, 192),
        1,
    )
    .unwrap();
    let key = fhe_linear::ClientKey::generate(&fhe_linear::HFHE_GLWE_2048_V1);
    let batch = key.encrypt(&spec, &[1i16; 64], 1).unwrap().to_bytes();
    let url = format!("{base}/v1/models/tiny/layers/layers.1.mixer.Wqkv/apply");
    let call = move |url: String, batch: Vec<u8>| {
        tokio::task::spawn_blocking(move || {
            for _ in 0..500 {
                // Wait until the bundles are loaded (503 not_ready before).
                let ready = agent()
                    .get(url.replace(
                        "/v1/models/tiny/layers/layers.1.mixer.Wqkv/apply",
                        "/readyz",
                    ))
                    .call()
                    .map(|r| r.status().as_u16() == 200)
                    .unwrap_or(false);
                if ready {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let answer = agent().post(&url).send(&batch[..]).unwrap();
            let retry = answer
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (answer.status().as_u16(), retry)
        })
    };
    let (status, retry) = call(url.clone(), batch.clone()).await.unwrap();
    assert_eq!((status, retry.as_deref()), (503, Some("1")));
    drop(held);
    let (status, _) = call(url, batch).await.unwrap();
    assert_eq!(status, 200, "served once a slot is free");
    let _ = tx.send(());
}

/// Stopping the worker lets a request already in flight finish (200), refuses new connections,
/// and then returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server_path) = compile_tiny(dir.path());
    let mut config = WorkerConfig::local(vec![server_path]);
    config.max_concurrency = 1;
    config.queue_timeout = Duration::from_secs(30);
    let app = Application::build(config).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let slots = app.compute_slots();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    for _ in 0..500 {
        let url = format!("{base}/readyz");
        let ready = tokio::task::spawn_blocking(move || {
            agent()
                .get(&url)
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200)
        })
        .await
        .unwrap();
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request waits for the compute slot held here: it is in flight when the stop comes.
    let held = slots.clone().acquire_owned().await.unwrap();
    let spec = fhe_linear::LayerSpec::choose(
        &fhe_linear::HFHE_GLWE_2048_V1,
        fhe_linear::LayerShape::new(64, 192),
        1,
    )
    .unwrap();
    let key = fhe_linear::ClientKey::generate(&fhe_linear::HFHE_GLWE_2048_V1);
    let batch = key.encrypt(&spec, &[2i16; 64], 1).unwrap().to_bytes();
    let url = format!("{base}/v1/models/tiny/layers/layers.1.mixer.Wqkv/apply");
    let in_flight = tokio::task::spawn_blocking(move || {
        agent()
            .post(&url)
            .send(&batch[..])
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = format!("{base}/healthz");
    let refused = tokio::task::spawn_blocking(move || agent().get(&late).call().is_err())
        .await
        .unwrap();
    assert!(refused, "no new connection after the stop");
    assert!(!server.is_finished(), "waits for the request in flight");
    drop(held);
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("stops once idle")
        .unwrap()
        .unwrap();
}

/// Sends with headers; returns status and the error code (if any).
fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let mut answer = agent().run(request.body(body.to_vec()).unwrap()).unwrap();
    let status = answer.status().as_u16();
    let bytes = answer.body_mut().read_to_vec().unwrap();
    let code = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["code"].as_str().map(String::from))
        .unwrap_or_default();
    (status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_requests_need_a_loaded_key_of_the_same_license() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server_path) = compile_tiny(dir.path());
    let worker = spawn_worker(server_path, 64 << 20).await;
    let url = worker.url.clone();
    tokio::task::spawn_blocking(move || {
        let layers: protocol::ModelLayers = serde_json::from_slice(
            &agent()
                .get(format!("{url}/v1/models/tiny/layers"))
                .call()
                .unwrap()
                .body_mut()
                .read_to_vec()
                .unwrap(),
        )
        .unwrap();
        let spec = layers.layers[0].packed_spec().unwrap().unwrap();
        let apply = format!(
            "{url}/v1/models/tiny/layers/{}/apply",
            layers.layers[0].name
        );
        let key = fhe_linear::ClientKey::generate(spec.params);
        let packing = fhe_linear::PackingKey::generate(&key).unwrap().to_bytes();
        let key_id = protocol::key_id("lic-a", &packing);
        let key_url = format!("{url}{}", protocol::key_path(&key_id));
        let batch = key
            .encrypt(&spec, &vec![1i16; spec.shape.d_in], 1)
            .unwrap()
            .to_bytes();
        let as_a = [
            (protocol::KEY_ID_HEADER, key_id.as_str()),
            (protocol::LICENSE_ID_HEADER, "lic-a"),
        ];
        // Not loaded yet: the gateway is told to push it.
        assert_eq!(
            send("POST", &apply, &as_a, &batch),
            (409, "key_not_loaded".into())
        );
        // A key id that is not the key's (or another license's) is refused.
        let as_b = [(protocol::LICENSE_ID_HEADER, "lic-b")];
        assert_eq!(
            send("PUT", &key_url, &as_b, &packing),
            (400, "invalid_key".into())
        );
        let as_a_only = [(protocol::LICENSE_ID_HEADER, "lic-a")];
        assert_eq!(send("PUT", &key_url, &as_a_only, &packing[..500]).0, 400);
        assert_eq!(send("PUT", &key_url, &as_a_only, &packing).0, 200);
        assert_eq!(send("POST", &apply, &as_a, &batch).0, 200);
        let wrong_license = [
            (protocol::KEY_ID_HEADER, key_id.as_str()),
            (protocol::LICENSE_ID_HEADER, "lic-b"),
        ];
        assert_eq!(
            send("POST", &apply, &wrong_license, &batch),
            (403, "key_not_owned".into())
        );
        assert_eq!(
            send("POST", &apply, &as_a_only, &batch),
            (400, "key_required".into())
        );
    })
    .await
    .unwrap();
}
