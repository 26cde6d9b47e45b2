//! The Grafana dashboards and Prometheus alerts use only metrics the services register, and every
//! SQL panel runs against the ledger's real schema (a fresh Postgres database, migrated).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every string under `key`, anywhere in a JSON document.
fn strings_under(value: &serde_json::Value, key: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == key => out.push(s.clone()),
                    _ => strings_under(v, key, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, out)),
        _ => {}
    }
}

fn dashboard(name: &str) -> serde_json::Value {
    let path = repo().join("dashboards").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Identifiers of our services' metrics in a PromQL expression (histogram series suffixes
/// removed).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("gateway_") || w.starts_with("worker_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_string()
        })
        .collect()
}

#[test]
fn dashboards_and_alerts_use_only_registered_metrics() {
    let registered: BTreeSet<String> = gateway::Metrics::new()
        .names
        .into_iter()
        .chain(worker::Metrics::new().names)
        .collect();
    let mut exprs = Vec::new();
    strings_under(&dashboard("operator.json"), "expr", &mut exprs);
    assert!(exprs.len() >= 10, "the operator dashboard has its panels");
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    exprs.push(alerts);
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            // Histograms are registered under their base name.
            assert!(
                registered.contains(&name),
                "`{name}` is used by a dashboard or an alert but no service registers it \
                 (registered: {registered:?})"
            );
            used.insert(name);
        }
    }
    for core in [
        "gateway_requests_total",
        "gateway_request_seconds",
        "worker_inflight_requests",
        "gateway_workers_healthy",
    ] {
        assert!(used.contains(core), "{core} is not charted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_dashboard_queries_run_against_the_ledger_schema() {
    let url = test_support::fresh_postgres_database("dashboards_test").await;
    let ledger = ledger::Ledger::connect(&url).await.unwrap();
    let mut queries = Vec::new();
    strings_under(&dashboard("usage.json"), "rawSql", &mut queries);
    assert!(queries.len() >= 6, "the usage dashboard has its panels");
    for sql in queries {
        // Grafana's time macros (seconds), as Grafana expands them.
        let expanded = sql
            .replace("$__unixEpochFrom()", "1790000000")
            .replace("$__unixEpochTo()", "1800000000");
        assert!(
            !expanded.contains("$__"),
            "only $__unixEpochFrom/To are expanded here: {sql}"
        );
        let wrapped = format!(
            "SELECT COUNT(*) FROM ({}) AS panel",
            expanded.trim().trim_end_matches(';')
        );
        sqlx::query(&wrapped)
            .fetch_one(ledger.pool())
            .await
            .unwrap_or_else(|e| panic!("panel query fails against the schema: {e}\n{sql}"));
    }
}
