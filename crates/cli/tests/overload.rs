//! The client against a gateway that limits it, as processes: batches split to the gateway's
//! row cap; a rate limit ridden out by honouring Retry-After, each query billed once; a request
//! larger than the license's rate refused with its own code; exit codes that tell "retry
//! later" from "refused".

use std::process::{Command, Stdio};

mod common;

use common::{
    agent, free_port, hybrid_code, issue_license, last_json, service_binary, stack, wait_ready,
    Service, StackOptions, EXIT_REFUSED, EXIT_RETRY_LATER,
};

fn generate(bundle: &std::path::Path, tokens: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "generate",
        "--bundle",
        bundle.to_str().unwrap(),
        "--prompt",
        "the server is private and the data is encrypted",
        "--max-tokens",
        tokens,
        "--json",
    ];
    args.extend(extra);
    hybrid_code(&args)
}

fn billed(url: &str, license: &str) -> u64 {
    let mut answer = agent(None)
        .get(&format!("{url}/v1/usage"))
        .header("authorization", &format!("Bearer {license}"))
        .call()
        .unwrap();
    let usage: serde_json::Value =
        serde_json::from_slice(&answer.body_mut().read_to_vec().unwrap()).unwrap();
    usage["billable_tokens"].as_u64().unwrap()
}

#[test]
fn rate_limits_and_row_caps_are_ridden_out_and_billed_once() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    test_support::compile_tiny(&bundle, &["layers.1.mixer.Wqkv"]);
    let (code, out, err) = generate(&bundle, "60", &["--mode", "simulate"]);
    assert_eq!(code, 0, "{err}");
    let want = last_json(&out);
    let prompt_tokens = want["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 5, "{want}");

    // 60 tokens a minute: the prompt and 59 fed-back tokens need more, so the last requests
    // wait for the bucket (Retry-After: 1 s each), then pass; each position billed once.
    let options = StackOptions {
        rate_per_minute: 60,
        ..StackOptions::default()
    };
    let stack = stack(dir.path(), &bundle, "tiny", &options);
    let remote = [
        "--mode",
        "remote",
        "--url",
        &stack.url,
        "--license",
        &stack.license,
    ];
    let mut args = remote.to_vec();
    args.extend(["--results", "keyless"]);
    let (code, out, err) = generate(&bundle, "60", &args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(last_json(&out)["token_ids"], want["token_ids"]);
    assert_eq!(billed(&stack.url, &stack.license), prompt_tokens + 59);

    // A batch larger than the bucket can ever hold: 422 exceeds_rate_limit, nothing billed.
    let small = issue_license(&stack.keys, "tiny", 1000, 4);
    let spec = fhe_linear::LayerSpec::choose(
        &fhe_linear::HFHE_GLWE_2048_V1,
        fhe_linear::LayerShape::new(64, 192),
        1,
    )
    .unwrap();
    let batch = fhe_linear::ClientKey::generate(&fhe_linear::HFHE_GLWE_2048_V1)
        .encrypt(&spec, &vec![1i16; 64 * 6], 6)
        .unwrap()
        .to_bytes();
    let mut answer = agent(None)
        .post(&format!(
            "{}/v1/models/tiny/layers/layers.1.mixer.Wqkv/apply",
            stack.url
        ))
        .header("authorization", &format!("Bearer {small}"))
        .header("x-query-id", "too-big")
        .send(&batch[..])
        .unwrap();
    assert_eq!(answer.status().as_u16(), 422);
    let body = answer.body_mut().read_to_string().unwrap();
    assert!(body.contains("exceeds_rate_limit"), "{body}");
    // The layer listing tells the SDK how many rows fit, and it splits the prompt to them (it
    // then waits for the bucket: here, only the listing is checked).
    let mut answer = agent(None)
        .get(&format!("{}/v1/models/tiny/layers", stack.url))
        .header("authorization", &format!("Bearer {small}"))
        .call()
        .unwrap();
    let layers: serde_json::Value =
        serde_json::from_slice(&answer.body_mut().read_to_vec().unwrap()).unwrap();
    assert_eq!(layers["layers"][0]["max_rows"], 4, "{layers}");
    assert_eq!(billed(&stack.url, &small), 0);

    // Quota used up: refused, exit 77, with the gateway's code.
    let poor = issue_license(&stack.keys, "tiny", 3, 6000);
    let (code, _, err) = generate(
        &bundle,
        "2",
        &[
            "--mode",
            "remote",
            "--url",
            &stack.url,
            "--license",
            &poor,
            "--results",
            "keyless",
        ],
    );
    assert_eq!(code, EXIT_REFUSED, "{err}");
    assert!(err.contains("quota_exceeded"), "{err}");
    // Nobody there: retry later, exit 75.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) = generate(
        &bundle,
        "2",
        &["--mode", "remote", "--url", &nobody, "--license", &poor],
    );
    assert_eq!(code, EXIT_RETRY_LATER, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

#[test]
fn prompts_longer_than_the_row_cap_travel_in_several_queries() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    test_support::compile_tiny(&bundle, &["layers.1.mixer.Wqkv"]);
    let (code, out, err) = generate(&bundle, "3", &["--mode", "simulate"]);
    assert_eq!(code, 0, "{err}");
    let want = last_json(&out);
    // A gateway capped at 3 rows per request, in front of its own worker.
    let stack = stack(dir.path(), &bundle, "tiny", &StackOptions::default());
    let port = free_port();
    let mut capped = Service(
        Command::new(service_binary("hybrid-gateway"))
            .args(["--keyset", stack.keys.join("keyset.json").to_str().unwrap()])
            .args(["--worker", &stack.worker_url])
            .args([
                "--database-url",
                &format!("sqlite:{}?mode=rwc", dir.path().join("capped.db").display()),
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--metrics-listen",
                "127.0.0.1:0",
                "--max-rows-per-request",
                "3",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url, &mut capped, None);
    let (code, out, err) = generate(
        &bundle,
        "3",
        &[
            "--mode",
            "remote",
            "--url",
            &url,
            "--license",
            &stack.license,
            "--results",
            "keyless",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(last_json(&out)["token_ids"], want["token_ids"]);
    let prompt_tokens = want["prompt_tokens"].as_u64().unwrap();
    assert_eq!(billed(&url, &stack.license), prompt_tokens + 2);
}
