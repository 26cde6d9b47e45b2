//! The ledger over TLS to Postgres (`sslmode=require`, as a managed Postgres demands), on the
//! test server at $LEDGER_TEST_POSTGRES; skipped, saying why, where that server has TLS off.

use ledger::Ledger;
use sqlx::Row;
use test_support::tls::TestCa;

/// `url` with one more query parameter.
fn with(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

#[tokio::test]
async fn the_ledger_speaks_tls_to_postgres_and_refuses_an_unverified_server() {
    let url = test_support::fresh_postgres_database("ledger_tls").await;
    let plain = Ledger::connect(&url).await.unwrap();
    let ssl: String = sqlx::query("SELECT CAST(current_setting('ssl') AS TEXT)")
        .fetch_one(plain.pool())
        .await
        .unwrap()
        .get(0);
    if ssl != "on" {
        eprintln!("SKIPPED: the Postgres server at the test URL has ssl = {ssl}");
        return;
    }
    let ledger = Ledger::connect(&with(&url, "sslmode=require"))
        .await
        .unwrap();
    let encrypted: String = sqlx::query(
        "SELECT CAST(ssl AS TEXT) || ' ' || version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(ledger.pool())
    .await
    .unwrap()
    .get(0);
    assert!(encrypted.starts_with("true TLSv1."), "{encrypted}");
    // The ledger works over it (migrations ran, a query answers).
    ledger.ping().await.unwrap();

    // verify-full against a CA that did not sign the server's certificate: refused.
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let strict = with(
        &url,
        &format!("sslmode=verify-full&sslrootcert={}", ca.cert.display()),
    );
    assert!(Ledger::connect(&strict).await.is_err());
}
