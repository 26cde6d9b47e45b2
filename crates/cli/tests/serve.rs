//! `hybrid serve`, the OpenAI-compatible server, as a process: answered by the official `openai`
//! Python package (chat and completions, streamed and not, on SmolLM2 with a protected layer)
//! and by `curl` (a tiny bundle in remote mode through a real gateway and worker, with the
//! protected tokens billed in `usage`, errors in OpenAI's shape, a full queue refused).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{free_port, hybrid, hybrid_command, stack, Service, StackOptions};

/// Starts `hybrid serve ARGS` on a free port; returns its base URL and the process.
fn serve(args: &[&str]) -> (String, Service) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut all = vec!["serve", "--listen", &listen];
    all.extend(args);
    let mut service = Service(
        hybrid_command(&all)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{listen}");
    let started = Instant::now();
    loop {
        if let Some(status) = service.0.try_wait().unwrap() {
            panic!("hybrid serve exited: {status}");
        }
        if ureq::get(&format!("{url}/healthz")).call().is_ok() {
            return (url, service);
        }
        assert!(started.elapsed() < Duration::from_secs(300), "not serving");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `curl` with a JSON body; returns the HTTP status and the body.
fn curl(url: &str, body: &serde_json::Value) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
        ])
        .args(["-d", &body.to_string(), url])
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_string())
}

/// The Python with the `openai` package: `$HYBRID_TEST_PYTHON`, else `python3`.
fn python_with_openai() -> String {
    let python = std::env::var("HYBRID_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{python} cannot import the `openai` package: `python3 -m pip install openai` (.ci/test \
         installs it)"
    );
    python
}

#[test]
fn the_openai_client_talks_to_smollm2_with_a_protected_layer() {
    if let Err(reason) = test_support::smollm2_gguf() {
        eprintln!("SKIPPED: SmolLM2 is not available here: {reason}");
        return;
    }
    let python = python_with_openai();
    let (url, _server) = serve(&[
        "--model",
        "smollm2",
        "--protect",
        "blk.0.attn_q",
        "--mode",
        "simulate",
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/client.py");
    let out = Command::new(&python)
        .arg(&script)
        .args([
            &format!("{url}/v1"),
            "smollm2-135m",
            "What is the capital of France?",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_str(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(got["models"], serde_json::json!(["smollm2-135m"]), "{got}");
    let chat = &got["chat"];
    assert!(chat["content"].as_str().unwrap().contains("Paris"), "{got}");
    assert_eq!(chat["role"], "assistant");
    let usage = &chat["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    // Streamed: the same greedy text, in several chunks, with the same usage at the end.
    let stream = &got["chat_stream"];
    assert_eq!(stream["content"], chat["content"], "{got}");
    assert!(stream["chunks"].as_u64().unwrap() > 1, "{got}");
    assert_eq!(stream["finish_reason"], chat["finish_reason"]);
    assert_eq!(
        stream["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );
    // Completions stop before the stop sequence, streamed or not.
    let completion = &got["completion"];
    let text = completion["text"].as_str().unwrap();
    assert!(text.contains("Paris") && !text.contains('.'), "{got}");
    assert_eq!(completion["finish_reason"], "stop");
    assert_eq!(got["completion_stream"], completion["text"]);
    assert_eq!(
        got["sampled_equal"], true,
        "a seed makes sampling repeatable"
    );
    assert_eq!(got["wrong_model"]["status"], 404);
    assert_eq!(got["wrong_model"]["code"], "model_not_found");
}

#[test]
fn serve_runs_a_bundle_remotely_bills_in_usage_and_answers_curl() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    test_support::compile_tiny(&bundle, &["layers.1.mixer.Wqkv", "layers.2.mlp.fc1"]);
    let stack = stack(dir.path(), &bundle, "tiny", &StackOptions::default());
    let (url, _server) = serve(&[
        "--bundle",
        bundle.to_str().unwrap(),
        "--mode",
        "remote",
        "--url",
        &stack.url,
        "--license",
        &stack.license,
        "--results",
        "keyless",
        "--max-queue",
        "1",
    ]);
    let out = Command::new("curl")
        .args(["-sS", &format!("{url}/v1/models")])
        .output()
        .unwrap();
    let models: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny", "{models}");

    let prompt = "the server is private";
    let (ok, out, err) = hybrid(&[
        "generate",
        "--bundle",
        bundle.to_str().unwrap(),
        "--mode",
        "simulate",
        "--prompt",
        prompt,
        "--max-tokens",
        "6",
        "--json",
    ]);
    assert!(ok, "{err}");
    let want = common::last_json(&out);
    let request =
        serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0});
    let (status, body) = curl(&format!("{url}/v1/completions"), &request);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["choices"][0]["text"], want["text"], "{answer}");
    let usage = &answer["usage"];
    let prompt_tokens = want["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap(), prompt_tokens);
    // Every position crosses both protected layers; the last token is never fed back.
    assert_eq!(
        usage["protected_tokens_billed"].as_u64().unwrap(),
        prompt_tokens + completion - 1,
        "{usage}"
    );
    // What the gateway billed is what the answer said.
    let billed = ureq::get(&format!("{}/v1/usage", stack.url))
        .header("authorization", &format!("Bearer {}", stack.license))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let billed: serde_json::Value = serde_json::from_str(&billed).unwrap();
    assert_eq!(billed["billable_tokens"], usage["protected_tokens_billed"]);

    // Streamed: server-sent events ending with [DONE], the same text.
    let mut stream_request = request.clone();
    stream_request["stream"] = true.into();
    let (status, body) = curl(&format!("{url}/v1/completions"), &stream_request);
    assert_eq!(status, 200, "{body}");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
        .map(|v| v["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(text, want["text"].as_str().unwrap());

    // Errors in OpenAI's shape: no chat template, a context too long, bad JSON.
    let (status, body) = curl(
        &format!("{url}/v1/chat/completions"),
        &serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "no_chat_template", "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let (status, body) = curl(
        &format!("{url}/v1/completions"),
        &serde_json::json!({"prompt": prompt, "max_tokens": 1000}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("context_length_exceeded"), "{body}");
    let (status, body) = curl(&format!("{url}/v1/completions"), &serde_json::json!([1, 2]));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_json"), "{body}");

    // One request generating, one waiting: the next is refused at once with 429.
    let long = serde_json::json!({"prompt": prompt, "max_tokens": 100, "temperature": 0});
    let first = spawn_curl(&format!("{url}/v1/completions"), &long);
    std::thread::sleep(Duration::from_millis(300));
    let second = spawn_curl(&format!("{url}/v1/completions"), &long);
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = curl(&format!("{url}/v1/completions"), &long);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("queue_full"), "{body}");
    for child in [first, second] {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.ends_with("200"), "{text}");
    }
}

fn spawn_curl(url: &str, body: &serde_json::Value) -> std::process::Child {
    Command::new("curl")
        .args([
            "-sS",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
        ])
        .args(["-d", &body.to_string(), url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}
