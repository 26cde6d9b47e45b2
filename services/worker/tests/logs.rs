//! The worker's logs as an operator collects them: piped to a file they carry no colour codes,
//! and `--log-format json` writes one JSON object per line.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The worker's standard error while it starts with the tiny model's server bundle.
fn startup_logs(format: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = test_support::compile_tiny(dir.path(), &["layers.1.mixer.Wqkv"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hybrid-worker"))
        .args(["--log-format", format])
        .args(["--bundle", server.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut stderr = child.stderr.take().unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains("worker listening") && started.elapsed() < Duration::from_secs(20) {
        match stderr.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    text
}

#[test]
fn piped_logs_have_no_colour_codes_and_json_logs_parse() {
    let text = startup_logs("text");
    assert!(text.contains("worker listening"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in piped logs: {text:?}"
    );

    let json = startup_logs("json");
    let line = json
        .lines()
        .find(|l| l.contains("worker listening"))
        .unwrap_or_else(|| panic!("{json}"));
    let event: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(event["level"], "INFO", "{event}");
    assert_eq!(event["fields"]["message"], "worker listening", "{event}");
    assert!(event["fields"]["port"].as_u64().unwrap() > 0, "{event}");
}

#[test]
fn an_unknown_log_format_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_hybrid-worker"))
        .args(["--log-format", "xml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("text or json"));
}
