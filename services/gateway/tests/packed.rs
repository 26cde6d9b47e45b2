//! Packed results through the gateway and a worker: key registration, packed requests, refused
//! keys, and the usage rows each writes.

mod common;

use common::*;
use fhe_linear::{
    ClientKey, EncryptedResult, LayerSpec, Limits, PackingKey, HFHE_GLWE_2048_V1, HFHE_GLWE_4096_V1,
};
use protocol::{KeyRegistered, ModelLayers};

struct Client {
    license: String,
    key: ClientKey,
    packing: Vec<u8>,
}

impl Client {
    fn new(s: &Stack, id: &str) -> Client {
        let key = ClientKey::generate(&HFHE_GLWE_4096_V1);
        let packing = PackingKey::generate(&key).unwrap().to_bytes();
        Client {
            license: s.key.issue(&claims(id, 1000)).unwrap(),
            key,
            packing,
        }
    }

    async fn register(&self, s: &Stack, body: Vec<u8>) -> (u16, serde_json::Value) {
        let answer = reqwest::Client::new()
            .put(format!("{}/v1/keys", s.url))
            .bearer_auth(&self.license)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        let bytes = answer.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    /// The keyless answer to `x` (`tokens` rows) as query `query`, decrypted with a fresh key of
    /// the keyless set (answered with 200).
    async fn keyless_y(
        &self,
        s: &Stack,
        spec: &LayerSpec,
        x: &[i16],
        tokens: usize,
        query: &str,
    ) -> Vec<i64> {
        let key = ClientKey::generate(&HFHE_GLWE_2048_V1);
        let upload = key.encrypt(spec, x, tokens).unwrap().to_bytes();
        let (status, _, bytes) = self.post(s, query, None, upload).await;
        assert_eq!(status, 200);
        key.decrypt(
            spec,
            &EncryptedResult::from_bytes(&bytes, &Limits::default()).unwrap(),
        )
        .unwrap()
    }

    /// Posts a batch with an optional key id; returns status, error code and body.
    async fn post(
        &self,
        s: &Stack,
        query: &str,
        key_id: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, String, Vec<u8>) {
        let mut request = reqwest::Client::new()
            .post(s.apply_url(LAYER))
            .bearer_auth(&self.license)
            .header(protocol::QUERY_ID_HEADER, query)
            .body(body);
        if let Some(k) = key_id {
            request = request.header(protocol::KEY_ID_HEADER, k);
        }
        let answer = request.send().await.unwrap();
        let status = answer.status().as_u16();
        let bytes = answer.bytes().await.unwrap().to_vec();
        (status, error_code(&bytes), bytes)
    }
}

async fn specs(s: &Stack, license: &str) -> (LayerSpec, LayerSpec) {
    let bytes = reqwest::Client::new()
        .get(format!("{}/v1/models/tiny/layers", s.url))
        .bearer_auth(license)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let layers: ModelLayers = serde_json::from_slice(&bytes).unwrap();
    let info = layers
        .layers
        .iter()
        .find(|l| l.name.as_str() == LAYER)
        .unwrap();
    (
        info.to_spec().unwrap(),
        info.packed_spec().unwrap().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_results_with_registered_keys_are_exact_metered_and_license_bound() {
    let s = stack(postgres_url().await, 1, 0).await;
    let alice = Client::new(&s, "lic-alice");
    let bob = Client::new(&s, "lic-bob");
    let (keyless_spec, packed_spec) = specs(&s, &alice.license).await;
    assert_eq!(packed_spec.params.id, HFHE_GLWE_4096_V1.id);

    // Registration: created once, then idempotent; a damaged key is refused.
    let (status, body) = alice.register(&s, alice.packing.clone()).await;
    assert_eq!(status, 201, "{body}");
    let registered: KeyRegistered = serde_json::from_value(body).unwrap();
    assert!(registered.created);
    assert_eq!(registered.bytes, alice.packing.len());
    let (status, body) = alice.register(&s, alice.packing.clone()).await;
    assert_eq!((status, body["created"].as_bool()), (200, Some(false)));
    let (status, body) = alice.register(&s, alice.packing[..1000].to_vec()).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_key")));
    let (status, bob_body) = bob.register(&s, bob.packing.clone()).await;
    assert_eq!(status, 201);
    let bob_key = bob_body["key_id"].as_str().unwrap().to_string();
    let records = s.ledger.packing_keys("lic-alice").await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].bytes as usize, alice.packing.len());

    // The same activations, keyless and packed, decode to the same Y.
    let x: Vec<i16> = (0..2 * 64)
        .map(|i| (i * 37 % 256) as u8 as i8 as i16)
        .collect();
    let y_keyless = alice.keyless_y(&s, &keyless_spec, &x, 2, "q-keyless").await;
    let packed_upload = alice.key.encrypt(&packed_spec, &x, 2).unwrap().to_bytes();
    let (status, code, bytes) = alice
        .post(
            &s,
            "q-packed",
            Some(&registered.key_id),
            packed_upload.clone(),
        )
        .await;
    assert_eq!(status, 200, "{code}");
    let result = EncryptedResult::from_bytes(&bytes, &Limits::default()).unwrap();
    assert_eq!(alice.key.decrypt(&packed_spec, &result).unwrap(), y_keyless);
    assert!(bytes.len() < packed_upload.len());
    // The worker had not seen the key: the gateway pushed it once.
    assert!(s
        .metrics()
        .await
        .contains("gateway_packing_key_pushes_total 1"));
    let (status, _, _) = alice
        .post(
            &s,
            "q-packed-2",
            Some(&registered.key_id),
            packed_upload.clone(),
        )
        .await;
    assert_eq!(status, 200);
    assert!(s
        .metrics()
        .await
        .contains("gateway_packing_key_pushes_total 1"));

    // Refused: no key, an unknown key, another license's key. Nothing is billed for them.
    for (query, key, expected) in [
        ("q-nokey", None, (400, "key_required")),
        (
            "q-unknown",
            Some("0123456789abcdef0123456789abcdef"),
            (404, "unknown_key"),
        ),
        ("q-bobs", Some(bob_key.as_str()), (403, "key_not_owned")),
    ] {
        let (status, code, _) = alice.post(&s, query, key, packed_upload.clone()).await;
        assert_eq!((status, code.as_str()), expected, "{query}");
    }

    let rows = s.ledger.usage_events("lic-alice").await.unwrap();
    let summary: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r.query_id.as_str(), r.results.as_str(), r.key_id.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("q-keyless", "keyless", ""),
            ("q-packed", "packed", registered.key_id.as_str()),
            ("q-packed-2", "packed", registered.key_id.as_str()),
        ]
    );
    assert_eq!(rows[1].upload_bytes as usize, packed_upload.len());
    assert_eq!(s.billable("lic-alice").await, 6);
    assert!(s.ledger.usage_events("lic-bob").await.unwrap().is_empty());
    // The key upload is part of the license's usage, as the customer sees it.
    let usage = reqwest::Client::new()
        .get(format!("{}/v1/usage", s.url))
        .bearer_auth(&alice.license)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let usage: protocol::admin::CustomerUsage = serde_json::from_slice(&usage).unwrap();
    assert_eq!(usage.packing_keys.len(), 1);
    assert_eq!(usage.packing_keys[0].key_id, registered.key_id);
    assert_eq!(usage.packing_keys[0].bytes as usize, alice.packing.len());
    let audit = s.ledger.audit_log(50).await.unwrap();
    assert_eq!(audit.iter().filter(|e| e.action == "key.upload").count(), 2);

    // A license registers a bounded number of distinct keys (each is stored).
    let carol = Client::new(&s, "lic-carol");
    let variant = |i: u8| {
        let mut k = carol.packing.clone();
        *k.last_mut().unwrap() ^= i; // still a well-formed key, another key id
        k
    };
    for i in 0..8 {
        assert_eq!(carol.register(&s, variant(i)).await.0, 201, "key {i}");
    }
    let (status, body) = carol.register(&s, variant(8)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("too_many_keys"))
    );
    assert_eq!(carol.register(&s, variant(3)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_generation_with_packed_results_matches_simulation() {
    use hybrid_model::remote::{PackedKeys, RemoteConfig, RemoteStats, ResultsMode};
    let db = tempfile::tempdir().unwrap();
    let s = stack(sqlite_url(&db), 1, 0).await;
    let license = s.key.issue(&claims("lic-sdk", 1000)).unwrap();
    let (url, client_dir) = (s.url.clone(), s.client_dir.clone());
    let stats = std::sync::Arc::new(RemoteStats::default());
    let st = stats.clone();
    tokio::task::spawn_blocking(move || {
        let prompt = [6, 60, 19, 40, 72];
        let options = hybrid_model::GenerateOptions {
            max_tokens: 4,
            ..Default::default()
        };
        let (client, want) = simulated_generation(&client_dir, &prompt, &options);
        // Keys kept by the client (as `hybrid keys gen` writes them) and reused.
        let dir = tempfile::tempdir().unwrap();
        PackedKeys::generate().unwrap().save(dir.path()).unwrap();
        let keys = std::sync::Arc::new(PackedKeys::load(dir.path()).unwrap());

        let remote = RemoteConfig {
            license: Some(license),
            stats: Some(st),
            results: ResultsMode::Packed,
            keys: hybrid_model::remote::KeySource::Fixed(keys),
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
    let totals = stats.snapshot();
    assert_eq!(totals.packed_queries, totals.queries);
    assert!(totals.key_upload_bytes > 1_000_000);
    let rows = s.ledger.usage_events("lic-sdk").await.unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows
        .iter()
        .all(|r| r.results == "packed" && protocol::is_key_id(&r.key_id)));
    assert_eq!(s.billable("lic-sdk").await, 8);
}

/// Two workers whose packed layouts differ (planned with different unit costs, as two machines
/// measured apart would): every packed request is answered, whichever worker the gateway tries
/// first, decodes to the keyless answer, and is billed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_requests_reach_a_worker_that_serves_their_layout() {
    assert_eq!(
        fhe_linear::FheError::SpecMismatch(String::new()).code(),
        protocol::codes::LAYER_MISMATCH
    );
    let costs = [[17.0, 0.55, 22.0, 50.0], [17.0, 0.55, 22.0, 1e6]];
    let s = stack_configured(
        postgres_url().await,
        2,
        Vec::new(),
        |url| url,
        |i, config| config.planner_costs = worker::PlannerCosts::Given(costs[i]),
    )
    .await;
    let alice = Client::new(&s, "lic-alice");
    let (keyless_spec, listed) = specs(&s, &alice.license).await;
    let offers: Vec<LayerSpec> = costs
        .iter()
        .map(|c| {
            let planner = worker::PlannerCosts::Given(*c).planner();
            worker::packed_spec(&planner, listed.shape, listed.activation_bits).unwrap()
        })
        .collect();
    assert_ne!(
        offers[0], offers[1],
        "the two workers must offer different layouts"
    );
    assert!(offers.contains(&listed));
    let (status, body) = alice.register(&s, alice.packing.clone()).await;
    assert_eq!(status, 201, "{body}");
    let key_id = body["key_id"].as_str().unwrap().to_string();

    let x: Vec<i16> = (0..64).map(|i| (i * 53 % 256) as u8 as i8 as i16).collect();
    let expected = alice.keyless_y(&s, &keyless_spec, &x, 1, "q-keyless").await;
    for q in 0..4 {
        let upload = alice.key.encrypt(&listed, &x, 1).unwrap().to_bytes();
        let (status, code, bytes) = alice
            .post(&s, &format!("q-packed-{q}"), Some(&key_id), upload)
            .await;
        assert_eq!(status, 200, "{code}");
        let result = EncryptedResult::from_bytes(&bytes, &Limits::default()).unwrap();
        assert_eq!(alice.key.decrypt(&listed, &result).unwrap(), expected);
    }
    // Round robin sent some of them first to the worker of the other layout, which refused them.
    let refused = s
        .worker_metric_sum(|l| {
            l.starts_with("worker_requests_total") && l.contains("outcome=\"layer_mismatch\"")
        })
        .await;
    assert!(
        refused > 0,
        "no request was tried on the other layout's worker first"
    );
    assert_eq!(s.billable("lic-alice").await, 5);
}
