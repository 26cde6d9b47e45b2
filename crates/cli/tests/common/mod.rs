//! Running the `hybrid` binary from the integration tests.
#![allow(dead_code)]

use std::process::Command;

/// Runs `hybrid ARGS`: success, standard output, standard error.
pub fn hybrid(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hybrid"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The JSON object a command printed on its last line.
pub fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("output")).expect("last line is JSON")
}

/// Runs `hybrid ARGS`, which must fail without a panic; returns its standard error.
pub fn refused(args: &[&str]) -> String {
    let (ok, _, err) = hybrid(args);
    assert!(!ok, "`hybrid {}` succeeded", args.join(" "));
    assert!(!err.contains("panicked"), "{err}");
    err
}
