//! The `hybrid` binary end to end: JSON on the last line, bundles, errors.

mod common;

use common::{hybrid, last_json};

#[test]
fn generate_prints_json_and_modes_agree() {
    let run = |mode: &str| {
        let (ok, out, err) = hybrid(&[
            "generate",
            "--model",
            "tiny",
            "--protect",
            "layers.1.mixer.Wqkv",
            "--mode",
            mode,
            "--prompt",
            "the server is private",
            "--max-tokens",
            "6",
            "--json",
        ]);
        assert!(ok, "{err}");
        last_json(&out)
    };
    let simulate = run("simulate");
    let execute = run("execute");
    assert_eq!(simulate["token_ids"], execute["token_ids"]);
    assert_eq!(simulate["token_ids"].as_array().unwrap().len(), 6);
    assert!(
        simulate["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count()
            >= 1
    );
    assert!(simulate["ms_per_token"].as_f64().unwrap() > 0.0);
}

#[test]
fn compiled_bundles_generate_like_the_in_process_split() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let (ok, stdout, err) = hybrid(&[
        "compile",
        "--model",
        "tiny",
        "--protect",
        "layers.*.mixer.Wqkv",
        "--out",
        out,
        "--json",
    ]);
    assert!(ok, "{err}");
    let report = last_json(&stdout);
    assert_eq!(report["protected"].as_array().unwrap().len(), 2);
    let args = [
        "--prompt",
        "a customer has a license",
        "--max-tokens",
        "5",
        "--json",
    ];
    let (ok, from_bundle, err) = hybrid(
        &[
            &["generate", "--bundle", out, "--mode", "execute"][..],
            &args,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let (ok, in_process, err) = hybrid(
        &[
            &[
                "generate",
                "--model",
                "tiny",
                "--protect",
                "layers.*.mixer.Wqkv",
                "--mode",
                "simulate",
            ][..],
            &args,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert_eq!(
        last_json(&from_bundle)["token_ids"],
        last_json(&in_process)["token_ids"]
    );
}

#[test]
fn bench_fhe_reports_an_exact_run() {
    let (ok, out, err) = hybrid(&[
        "bench", "fhe", "--shape", "300x40", "--tokens", "3", "--runs", "1", "--json",
    ]);
    assert!(ok, "{err}");
    let r = last_json(&out);
    assert_eq!(r["exact"], true);
    assert_eq!(r["key_upload_bytes"], 0);
    for field in [
        "server_ms",
        "encrypt_ms",
        "decrypt_ms",
        "upload_bytes",
        "download_bytes",
        "threads",
        "plain_f32_ms",
        "candle_f32_ms",
    ] {
        assert!(r[field].as_f64().unwrap() > 0.0, "{field}");
    }
    // The ratio is against the faster of candle and the BLAS product; the BLAS one is there
    // wherever numpy is (the test command installs it).
    let numpy = std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    let candle = r["candle_f32_ms"].as_f64().unwrap();
    let plain = r["plain_f32_ms"].as_f64().unwrap();
    if numpy {
        let blas = r["blas_f32_ms"]
            .as_f64()
            .expect("a BLAS baseline where numpy is");
        assert!(blas > 0.0);
        assert_eq!(plain, blas.min(candle));
        assert!(r["blas_library"].as_str().unwrap().starts_with("numpy"));
    } else {
        assert!(r["blas_f32_ms"].is_null());
        assert_eq!(plain, candle);
    }
    let ratio = r["server_over_f32"].as_f64().unwrap();
    assert!((ratio - r["server_ms"].as_f64().unwrap() / plain).abs() < 1e-9);
}

#[test]
fn bad_requests_fail_with_a_clear_message() {
    let (ok, _, err) = hybrid(&[
        "generate",
        "--model",
        "tiny",
        "--protect",
        "layers.1.mixer.Wq",
        "--prompt",
        "the",
    ]);
    assert!(!ok && err.contains("valid names"), "{err}");
    let (ok, _, err) = hybrid(&["generate", "--model", "tiny", "--prompt", ""]);
    assert!(!ok && err.contains("empty"), "{err}");
    let (ok, _, err) = hybrid(&["generate", "--model", "/nonexistent", "--prompt", "the"]);
    assert!(!ok && err.contains("neither"), "{err}");
    let (ok, _, err) = hybrid(&[
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "the",
        "--max-tokens",
        "1000",
    ]);
    assert!(!ok && err.contains("context"), "{err}");
}

#[test]
fn license_keygen_issue_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let (ok, _, err) = hybrid(&["license", "keygen", "--kid", "k1", "--out", out]);
    assert!(ok, "{err}");
    let key = dir.path().join("k1.key.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let (ok, token, err) = hybrid(&[
        "license",
        "issue",
        "--key",
        key.to_str().unwrap(),
        "--kid",
        "k1",
        "--customer",
        "acme",
        "--model",
        "tiny",
        "--quota",
        "1000",
        "--id",
        "lic-7",
    ]);
    assert!(ok, "{err}");
    let keyset = dir.path().join("keyset.json");
    let (ok, out, err) = hybrid(&[
        "license",
        "inspect",
        token.trim(),
        "--keyset",
        keyset.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["claims"]["jti"], "lic-7");
    assert_eq!(report["verification"]["valid"], true);
    let (ok, out, _) = hybrid(&[
        "license",
        "inspect",
        token.trim(),
        "--keyset",
        keyset.to_str().unwrap(),
        "--aud",
        "elsewhere",
    ]);
    assert!(ok);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["verification"]["code"], "license_wrong_audience");

    let db = format!("sqlite:{}?mode=rwc", dir.path().join("ledger.db").display());
    let (ok, _, err) = hybrid(&[
        "license",
        "revoke",
        "--id",
        "lic-7",
        "--reason",
        "test",
        "--database-url",
        &db,
    ]);
    assert!(ok, "{err}");
}

/// The demo runs the whole product (worker and gateway on loopback, embedded ledger) and reads
/// back exactly the tokens it processed as billed; its generation is the one the simulation of
/// the same bundles gives.
#[test]
fn demo_bills_exactly_what_it_generates() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("demo");
    let (ok, out, err) = hybrid(&[
        "demo",
        "--model",
        "tiny",
        "--dir",
        work.to_str().unwrap(),
        "--protect",
        "layers.1.mixer.Wqkv",
        "--protect",
        "layers.2.mlp.fc2",
        "--max-tokens",
        "8",
        "--compare",
        "--json",
    ]);
    assert!(ok, "{err}");
    let report = last_json(&out);
    assert_eq!(report["billed_exactly"], true, "{report}");
    let prompt = report["prompt_tokens"].as_i64().unwrap();
    let generated = report["generated_tokens"].as_i64().unwrap();
    assert_eq!(generated, 8);
    assert_eq!(report["billed_tokens"], prompt + generated - 1);
    // Two protected layers: every processed token crossed both, billed once.
    assert_eq!(report["queries"], 2 * generated);
    assert!(report["per_token"]["upload_bytes"].as_f64().unwrap() > 10_000.0);
    assert!(report["agreement"]["of"].as_i64().unwrap() == 8);

    // The remote run equals the simulation of the same bundles.
    let (ok, out, err) = hybrid(&[
        "generate",
        "--bundle",
        work.to_str().unwrap(),
        "--mode",
        "simulate",
        "--prompt",
        "the customer has a license for the model and the data is",
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(last_json(&out)["token_ids"], report["token_ids"]);
}

/// A checkpoint of phi-1.5's real width (hidden 2048, 32 heads, partial rotary, vocab 51200; one
/// block to keep the test short) written by `hybrid synth` loads through the same code as a
/// downloaded one and generates in every mode; protected layers are named in either naming, and
/// the encrypted run equals the integer simulation.
#[test]
fn a_phi_1_5_shaped_checkpoint_loads_and_runs_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("phi-1_5-1layer");
    let (ok, _, err) = hybrid(&[
        "synth",
        "--arch",
        "phi-1_5",
        "--layers",
        "1",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (
            &config["hidden_size"],
            &config["vocab_size"],
            &config["num_attention_heads"]
        ),
        (&2048.into(), &51200.into(), &32.into())
    );
    let run = |mode: &str, protect: &str| {
        let (ok, out, err) = hybrid(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--protect",
            protect,
            "--mode",
            mode,
            "--prompt",
            "the model is private",
            "--max-tokens",
            "3",
            "--json",
        ]);
        assert!(ok, "{mode} {protect}: {err}");
        last_json(&out)["token_ids"].clone()
    };
    let simulated = run("simulate", "layers.1.mixer.Wqkv");
    assert_eq!(simulated.as_array().unwrap().len(), 3);
    assert_eq!(run("execute", "layers.1.mixer.Wqkv"), simulated);
    assert_eq!(
        run("simulate", "model.layers.0.self_attn.q_proj"),
        run("execute", "model.layers.0.self_attn.q_proj")
    );
    run("disable", "layers.1.mixer.Wqkv");
}
