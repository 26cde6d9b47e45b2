//! The customer's side over HTTPS, as separate processes with certificates made in the test:
//! `hybrid generate --mode remote` -> gateway (TLS) -> worker (TLS, requiring the gateway's
//! client certificate), keyless and packed, equal to the simulation; a CA the client does not
//! trust, or no client certificate at the worker, refused with a clear error.

use std::path::Path;

mod common;

use common::{agent, hybrid_code, last_json, stack, StackOptions, StackTls};
use test_support::tls::TestCa;

fn token_ids(out: &str) -> Vec<u64> {
    last_json(out)["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

fn generate(bundle: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "generate",
        "--bundle",
        bundle.to_str().unwrap(),
        "--prompt",
        "the server is private",
        "--max-tokens",
        "4",
        "--json",
    ];
    args.extend(extra);
    hybrid_code(&args)
}

#[test]
fn the_sdk_reaches_gateway_and_workers_over_https_with_mutual_tls_inside() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    test_support::compile_tiny(&bundle, &["layers.1.mixer.Wqkv"]);
    let (code, out, err) = generate(&bundle, &["--mode", "simulate"]);
    assert_eq!(code, 0, "{err}");
    let want = token_ids(&out);
    let prompt_tokens = last_json(&out)["prompt_tokens"].as_u64().unwrap();

    let ca = TestCa::new(dir.path());
    let server = ca.issue("localhost");
    let tls = StackTls {
        ca: ca.cert.clone(),
        cert: server.cert.clone(),
        key: server.key.clone(),
        mutual: true,
    };
    let options = StackOptions {
        tls: Some(tls),
        ..StackOptions::default()
    };
    // The gateway is ready only once it reached the worker over mutual TLS.
    let stack = stack(dir.path(), &bundle, "tiny", &options);
    assert!(stack.url.starts_with("https://localhost:"), "{}", stack.url);
    let ca_path = ca.cert.to_str().unwrap();
    for results in ["keyless", "packed"] {
        let (code, out, err) = generate(
            &bundle,
            &[
                "--mode",
                "remote",
                "--url",
                &stack.url,
                "--license",
                &stack.license,
                "--ca-cert",
                ca_path,
                "--results",
                results,
            ],
        );
        assert_eq!(code, 0, "{results}: {err}");
        assert_eq!(token_ids(&out), want, "{results} over HTTPS");
    }
    // The CA may come from the environment too.
    let out = common::hybrid_command(&[
        "generate",
        "--bundle",
        bundle.to_str().unwrap(),
        "--mode",
        "remote",
        "--url",
        &stack.url,
        "--license",
        &stack.license,
        "--prompt",
        "the server is private",
        "--max-tokens",
        "4",
        "--json",
    ])
    .env("HYBRID_CA_CERT", &ca.cert)
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(token_ids(&String::from_utf8(out.stdout).unwrap()), want);

    // Without the CA, or with another one, the client refuses the gateway, saying what to do.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = TestCa::new(&other_dir);
    for extra in [vec![], vec!["--ca-cert", other.cert.to_str().unwrap()]] {
        let mut args = vec![
            "--mode",
            "remote",
            "--url",
            &stack.url,
            "--license",
            &stack.license,
        ];
        args.extend(extra);
        let (code, _, err) = generate(&bundle, &args);
        assert_ne!(code, 0);
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains("certificate is not trusted") && err.contains("--ca-cert"),
            "{err}"
        );
    }
    // The customer's usage, over HTTPS too: three runs of the prompt and 3 fed-back tokens
    // each; the refused ones billed nothing.
    let mut answer = agent(Some(&ca.cert))
        .get(&format!("{}/v1/usage", stack.url))
        .header("authorization", &format!("Bearer {}", stack.license))
        .call()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let usage: serde_json::Value =
        serde_json::from_slice(&answer.body_mut().read_to_vec().unwrap()).unwrap();
    assert_eq!(
        usage["billable_tokens"].as_u64().unwrap(),
        3 * (prompt_tokens + 3),
        "{usage}"
    );

    // The worker requires a client certificate: a client without one is refused at the
    // handshake, before any HTTP.
    let refused = agent(Some(&ca.cert))
        .get(&format!("{}/readyz", stack.worker_url))
        .call();
    assert!(
        refused.is_err(),
        "a client without a certificate got an answer"
    );
}
