//! A short chaos soak (`hybrid bench chaos`): gateway and worker processes killed with SIGKILL
//! and started again while clients retry; every answered query is billed exactly once, nothing
//! else is billed, no quota is exceeded and nothing stays reserved after the lease. A real
//! Prometheus evaluates `deploy/`'s alert rules (time-compressed): the dead-worker alert fires
//! when a worker stays dead.

mod common;

use common::*;

/// The Prometheus binary: `$HYBRID_TEST_PROMETHEUS` (.ci/test extracts Debian's), else
/// `prometheus` on PATH.
fn prometheus() -> String {
    let binary = std::env::var("HYBRID_TEST_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let found = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "no Prometheus at `{binary}`: install Debian's `prometheus` or set HYBRID_TEST_PROMETHEUS \
         (.ci/test does)"
    );
    binary
}

#[test]
fn a_short_chaos_soak_keeps_every_invariant() {
    let prometheus = prometheus();
    let database_url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(test_support::fresh_postgres_database("chaos_test"));
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/prometheus/alerts.yml"
    );
    let (ok, out, err) = hybrid(&[
        "bench",
        "chaos",
        "--database-url",
        &database_url,
        "--seconds",
        "16",
        "--kill-every",
        "2",
        "--lease-seconds",
        "2",
        "--quota",
        "150",
        "--dead-worker-seconds",
        "8",
        "--prometheus",
        &prometheus,
        "--alert-rules",
        rules,
        "--json",
    ]);
    assert!(ok, "{err}");
    let report = last_json(&out);
    assert_eq!(report["invariants_hold"], true, "{report:#}");
    assert!(report["kills"].as_array().unwrap().len() >= 2, "{report:#}");
    assert!(
        report["queries_answered"].as_u64().unwrap() > 20,
        "{report:#}"
    );
    // The small quotas ran out: refusals were part of the soak.
    assert!(
        report["refused"]["quota_exceeded"].as_u64().unwrap_or(0) > 0,
        "{report:#}"
    );
    assert!(
        report["alerts"]["fired"]["HybridTargetDown"].is_number(),
        "{report:#}"
    );
}
