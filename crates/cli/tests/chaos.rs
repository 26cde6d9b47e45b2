//! A short chaos soak (`hybrid bench chaos`): gateway and worker processes killed with SIGKILL
//! and started again while clients retry; every answered query is billed exactly once, nothing
//! else is billed, no quota is exceeded and nothing stays reserved after the lease.

mod common;

use common::*;

#[test]
fn a_short_chaos_soak_keeps_every_invariant() {
    let database_url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(test_support::fresh_postgres_database("chaos_test"));
    let (ok, out, err) = hybrid(&[
        "bench",
        "chaos",
        "--database-url",
        &database_url,
        "--seconds",
        "10",
        "--kill-every",
        "2",
        "--lease-seconds",
        "2",
        "--quota",
        "150",
        "--json",
    ]);
    assert!(ok, "{err}");
    let report = last_json(&out);
    assert_eq!(report["invariants_hold"], true, "{report:#}");
    assert!(report["kills"].as_array().unwrap().len() >= 3, "{report:#}");
    assert!(
        report["queries_answered"].as_u64().unwrap() > 20,
        "{report:#}"
    );
    // The small quotas ran out: refusals were part of the soak.
    assert!(
        report["refused"]["quota_exceeded"].as_u64().unwrap_or(0) > 0,
        "{report:#}"
    );
}
