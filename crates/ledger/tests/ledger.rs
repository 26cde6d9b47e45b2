//! The ledger against real databases: a throw-away Postgres database per test (the server at
//! $LEDGER_TEST_POSTGRES, default postgres://postgres@127.0.0.1:5432/postgres) and a SQLite file.

use std::sync::Arc;

use ledger::*;

const NOW: i64 = 1_795_657_977_000; // 2026-11-26

/// A ledger on a fresh, empty Postgres database.
async fn postgres() -> Ledger {
    Ledger::connect(&test_support::fresh_postgres_database("ledger_test").await)
        .await
        .unwrap()
}

async fn sqlite(dir: &tempfile::TempDir) -> Ledger {
    Ledger::connect(&format!(
        "sqlite:{}?mode=rwc",
        dir.path().join("ledger.db").display()
    ))
    .await
    .unwrap()
}

fn event(query_id: &str, layer: &str, tokens: i64, at: i64) -> UsageEvent {
    UsageEvent {
        query_id: query_id.into(),
        license_id: "lic-1".into(),
        customer_id: "acme".into(),
        model: "tiny".into(),
        layer: layer.into(),
        tokens,
        upload_bytes: 1000,
        download_bytes: 2000,
        worker: "w1".into(),
        compute_ms: 1.5,
        status: "ok".into(),
        created_at: at,
        results: "keyless".into(),
        key_id: String::new(),
    }
}

/// Admits `tokens` for each of `layers` of lic-1 at NOW, with a rate that never refuses and a
/// one-minute lease.
async fn reserve<'l>(
    l: &'l Ledger,
    layers: &[&str],
    period: i64,
    quota: i64,
    tokens: i64,
) -> Result<Reservation<'l>, LedgerError> {
    reserve_at(l, layers, period, quota, tokens, NOW, 60_000).await
}

async fn reserve_at<'l>(
    l: &'l Ledger,
    layers: &[&str],
    period: i64,
    quota: i64,
    tokens: i64,
    now: i64,
    lease_ms: i64,
) -> Result<Reservation<'l>, LedgerError> {
    l.reserve(&Reserve {
        license_id: "lic-1",
        customer_id: "acme",
        model: "tiny",
        layers,
        period_start: period,
        quota,
        tokens,
        rate: Rate {
            per_minute: 1_000_000,
            cost: tokens * layers.len() as i64,
        },
        now,
        lease_ms,
    })
    .await
}

/// Reserves and releases `tokens` on layer `a` at `now`: an admission that needs the room, so
/// that it reclaims the expired leases first.
async fn reclaim_at(l: &Ledger, period: i64, quota: i64, tokens: i64, now: i64) {
    reserve_at(l, &["a"], period, quota, tokens, now, 1000)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

/// Settles a one-layer reservation.
async fn settle(r: Reservation<'_>, e: &UsageEvent) -> Result<Settlement, LedgerError> {
    Ok(r.settle(std::slice::from_ref(e)).await?[0])
}

async fn setup(l: &Ledger) {
    l.upsert_customer("acme", "Acme", NOW).await.unwrap();
    let license = LicenseRecord {
        id: "lic-1".into(),
        customer_id: "acme".into(),
        model: "tiny".into(),
        quota_tokens: 20,
        quota_period: "month".into(),
        issued_at: NOW,
        expires_at: NOW + 86_400_000,
    };
    l.record_license(&license, "admin", NOW).await.unwrap();
}

/// 50 concurrent reservations of one token against a quota of 20 admit exactly 20, and only
/// settled queries are billed.
async fn quota_race(l: Arc<Ledger>) {
    setup(&l).await;
    let period = month_start(NOW);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let l = l.clone();
            tokio::spawn(async move {
                match reserve(&l, &["layers.1.mixer.Wqkv"], period, 20, 1).await {
                    Ok(r) => {
                        let event = event(&format!("q{i}"), "layers.1.mixer.Wqkv", 1, NOW);
                        assert!(settle(r, &event).await.unwrap().billed);
                        true
                    }
                    Err(LedgerError::QuotaExceeded { .. }) => false,
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 20);
    assert_eq!(l.billable_tokens("lic-1", period).await.unwrap(), 20);
    assert_eq!(l.usage_events("lic-1").await.unwrap().len(), 20);
    let err = reserve(&l, &["layers.1.mixer.Wqkv"], period, 20, 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "quota_exceeded");
}

/// A retried query id is served but billed once; a failed query releases its reservation.
async fn exactly_once(l: Ledger) {
    setup(&l).await;
    let period = month_start(NOW);
    let layer = "layers.1.mixer.Wqkv";
    let r1 = reserve(&l, &[layer], period, 20, 4).await.unwrap();
    let first = settle(r1, &event("q-retried", layer, 4, NOW))
        .await
        .unwrap();
    assert_eq!(
        first,
        Settlement {
            billed: true,
            layer_used: 4
        }
    );
    assert!(l.is_claimed("lic-1", "q-retried").await.unwrap());
    let r2 = reserve(&l, &[layer], period, 20, 4).await.unwrap();
    let retry = settle(r2, &event("q-retried", layer, 4, NOW + 5))
        .await
        .unwrap();
    assert_eq!(
        retry,
        Settlement {
            billed: false,
            layer_used: 4
        },
        "billed twice"
    );
    let failed = reserve(&l, &[layer], period, 20, 16).await.unwrap();
    failed.release().await.unwrap();
    assert_eq!(l.billable_tokens("lic-1", period).await.unwrap(), 4);
    assert_eq!(l.usage_events("lic-1").await.unwrap().len(), 1);
    // 16 tokens are still free: the released reservation came back.
    reserve(&l, &[layer], period, 20, 16)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // A token crossing two protected layers is billed once: the largest count over layers.
    let other = "layers.1.mlp.fc1";
    let r = reserve(&l, &[other], period, 20, 4).await.unwrap();
    assert!(
        settle(r, &event("q-fc1", other, 4, NOW))
            .await
            .unwrap()
            .billed
    );
    assert_eq!(l.billable_tokens("lic-1", period).await.unwrap(), 4);

    // Revocation and the audit trail.
    assert!(!l.is_revoked("lic-1").await.unwrap());
    l.revoke("lic-1", "contract ended", "admin", NOW + 10)
        .await
        .unwrap();
    l.revoke("lic-1", "again", "admin", NOW + 11).await.unwrap();
    assert!(l.is_revoked("lic-1").await.unwrap());
    assert_eq!(l.revoked_ids().await.unwrap(), vec!["lic-1".to_string()]);
    let log = l.audit_log(10).await.unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["license.issue", "license.revoke", "license.revoke"]
    );
    // Append-only: the database itself refuses changes.
    assert!(sqlx::query("UPDATE audit_events SET actor = 'mallory'")
        .execute(l.pool())
        .await
        .is_err());
    assert!(sqlx::query("DELETE FROM audit_events")
        .execute(l.pool())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_quota_race_admits_exactly_the_quota() {
    quota_race(Arc::new(postgres().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_quota_race_admits_exactly_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    quota_race(Arc::new(sqlite(&dir).await)).await;
}

#[tokio::test]
async fn postgres_bills_each_query_once() {
    exactly_once(postgres().await).await;
}

#[tokio::test]
async fn sqlite_bills_each_query_once() {
    let dir = tempfile::tempdir().unwrap();
    exactly_once(sqlite(&dir).await).await;
}

#[tokio::test]
async fn postgres_usage_is_partitioned_by_month_and_old_months_drop() {
    let l = postgres().await;
    setup(&l).await;
    let layer = "layers.1.mixer.Wqkv";
    let last_month = month_start(NOW) - 1;
    for (q, at) in [("old", last_month), ("new", NOW)] {
        let r = reserve(&l, &[layer], month_start(at), 100, 1)
            .await
            .unwrap();
        settle(r, &event(q, layer, 1, at)).await.unwrap();
    }
    assert_eq!(l.usage_events("lic-1").await.unwrap().len(), 2);
    let dropped = l
        .drop_partitions_before(month_start(NOW), "admin", NOW)
        .await
        .unwrap();
    assert_eq!(dropped, vec!["usage_events_2026_10".to_string()]);
    let left = l.usage_events("lic-1").await.unwrap();
    assert_eq!(
        left.iter().map(|e| e.query_id.as_str()).collect::<Vec<_>>(),
        ["new"]
    );
    assert_eq!(l.audit_log(1).await.unwrap()[0].action, "usage.retention");
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    assert!(matches!(
        Ledger::connect("mysql://x").await,
        Err(LedgerError::UnsupportedUrl)
    ));
}

/// Reports group the rollups by bucket and dimension and bill a token crossing several layers
/// once; exports page through raw rows; licenses list with their revocation.
async fn reports(l: Ledger) {
    setup(&l).await;
    let (qkv, fc1) = ("layers.1.mixer.Wqkv", "layers.1.mlp.fc1");
    let day = day_start(NOW);
    let hour = 3_600_000;
    // Two hours of one day: 3 then 5 tokens through both layers, plus a day later 2 through qkv.
    let mut n = 0;
    for (at, tokens, layers) in [
        (day + hour, 3, vec![qkv, fc1]),
        (day + 2 * hour, 5, vec![qkv, fc1]),
        (day + 24 * hour, 2, vec![qkv]),
    ] {
        for layer in layers {
            n += 1;
            let r = reserve(&l, &[layer], month_start(at), 1000, tokens)
                .await
                .unwrap();
            settle(r, &event(&format!("q{n}"), layer, tokens, at))
                .await
                .unwrap();
        }
    }
    let window = UsageFilter {
        from: month_start(NOW),
        to: next_month_start(NOW),
        ..UsageFilter::default()
    };
    let daily = l.usage_report(&window, Grain::Day, &[]).await.unwrap();
    let summary: Vec<_> = daily
        .iter()
        .map(|b| (b.start, b.requests, b.tokens, b.billable_tokens))
        .collect();
    assert_eq!(
        summary,
        [(day, 4, 16, 8), (day + 24 * hour, 1, 2, 2)],
        "a token through two layers is billed once"
    );
    let by_layer = l
        .usage_report(&window, Grain::Hour, &[Dim::Layer])
        .await
        .unwrap();
    assert_eq!(by_layer.len(), 5);
    assert_eq!(by_layer[0].layer.as_deref(), Some(qkv));
    assert_eq!(by_layer[0].billable_tokens, 3);
    assert_eq!(by_layer[0].upload_bytes, 1000);
    let monthly = l
        .usage_report(&window, Grain::Month, &[Dim::Customer, Dim::License])
        .await
        .unwrap();
    assert_eq!(monthly.len(), 1);
    let m = &monthly[0];
    assert_eq!(
        (m.start, m.customer_id.as_deref(), m.license_id.as_deref()),
        (month_start(NOW), Some("acme"), Some("lic-1"))
    );
    assert_eq!((m.requests, m.tokens, m.billable_tokens), (5, 18, 10));
    assert_eq!(m.model, None);
    let other = UsageFilter {
        customer: Some("globex".into()),
        ..window.clone()
    };
    assert!(l
        .usage_report(&other, Grain::Day, &[])
        .await
        .unwrap()
        .is_empty());

    // Export pages: every row once, in time order, whatever the page size.
    let mut seen = Vec::new();
    let mut cursor: Option<EventCursor> = None;
    loop {
        let page = l
            .usage_events_page(&window, cursor.as_ref(), 2)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        let last = page.last().unwrap();
        cursor = Some(EventCursor {
            created_at: last.created_at,
            license_id: last.license_id.clone(),
            query_id: last.query_id.clone(),
        });
        seen.extend(page.into_iter().map(|e| e.query_id));
    }
    assert_eq!(seen, ["q1", "q2", "q3", "q4", "q5"]);
    let only_fc1 = UsageFilter {
        layer: Some(fc1.into()),
        ..window.clone()
    };
    assert_eq!(
        l.usage_events_page(&only_fc1, None, 100)
            .await
            .unwrap()
            .len(),
        2
    );

    // Licenses with their revocation; the audit log pages by id.
    l.revoke("lic-1", "contract ended", "admin", NOW + 10)
        .await
        .unwrap();
    let licenses = l.list_licenses(None).await.unwrap();
    assert_eq!(licenses.len(), 1);
    assert_eq!(
        licenses[0].revoked,
        Some((NOW + 10, "contract ended".to_string()))
    );
    assert!(l.list_licenses(Some("globex")).await.unwrap().is_empty());
    let audit = l.audit_page(0, 10).await.unwrap();
    assert_eq!(audit.len(), 2);
    assert!(l.audit_page(audit[0].id, 10).await.unwrap().len() == 1);
    // The view dashboards read agrees with the report.
    let row = sqlx::query("SELECT CAST(SUM(billable_tokens) AS BIGINT) FROM billable_daily")
        .fetch_one(l.pool())
        .await
        .unwrap();
    use sqlx::Row;
    assert_eq!(row.try_get::<i64, _>(0).unwrap(), 10);
}

#[tokio::test]
async fn postgres_reports_and_exports() {
    reports(postgres().await).await;
}

#[tokio::test]
async fn sqlite_reports_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    reports(sqlite(&dir).await).await;
}

async fn packing_keys(l: Ledger) {
    setup(&l).await;
    let record = PackingKeyRecord {
        key_id: "00112233445566778899aabbccddeeff".into(),
        license_id: "lic-1".into(),
        customer_id: "acme".into(),
        parameter_set: "hfhe-glwe-4096-v1".into(),
        bytes: 5,
        uploaded_at: NOW,
    };
    let blob = vec![1u8, 2, 3, 250, 0];
    assert!(l.register_packing_key(&record, &blob).await.unwrap());
    // Idempotent: the same key again is not a second upload.
    assert!(!l.register_packing_key(&record, &blob).await.unwrap());
    let (stored, bytes) = l.packing_key(&record.key_id).await.unwrap().unwrap();
    assert_eq!((stored, bytes), (record.clone(), blob));
    assert!(l
        .packing_key("ffffffffffffffffffffffffffffffff")
        .await
        .unwrap()
        .is_none());
    assert_eq!(l.packing_keys("lic-1").await.unwrap(), vec![record.clone()]);
    assert!(l.packing_keys("lic-2").await.unwrap().is_empty());
    let uploads: Vec<_> = l
        .audit_log(100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "key.upload")
        .collect();
    assert_eq!(uploads.len(), 1);
    // A packed query records its encoding and key.
    let r = reserve(&l, &["l1"], 0, 1000, 2).await.unwrap();
    let mut e = event("q-packed", "l1", 2, NOW);
    e.results = "packed".into();
    e.key_id = record.key_id.clone();
    assert!(settle(r, &e).await.unwrap().billed);
    let rows = l.usage_events("lic-1").await.unwrap();
    assert_eq!(rows.last().unwrap(), &e);
}

#[tokio::test]
async fn postgres_stores_packing_keys() {
    packing_keys(postgres().await).await;
}

#[tokio::test]
async fn sqlite_stores_packing_keys() {
    let dir = tempfile::tempdir().unwrap();
    packing_keys(sqlite(&dir).await).await;
}

/// A group request reserves all of its layers or none, and its settlement bills each layer
/// once, also when retried with the same query ids.
async fn group_reservations(l: Ledger) {
    setup(&l).await;
    let period = month_start(NOW);
    // Layer b already has 15 of its 20 tokens used.
    let r = reserve(&l, &["b"], period, 20, 15).await.unwrap();
    settle(r, &event("q0", "b", 15, NOW)).await.unwrap();
    let refused = reserve(&l, &["a", "b", "c"], period, 20, 6).await;
    assert!(matches!(
        refused,
        Err(LedgerError::QuotaExceeded { remaining: 5, .. })
    ));
    // Nothing was left reserved on a or c by the refused request.
    let group = reserve(&l, &["a", "c"], period, 20, 20).await.unwrap();
    assert_eq!(group.leases().len(), 2);
    let events = [event("q1.0", "a", 20, NOW), event("q1.1", "c", 20, NOW)];
    let settled = group.settle(&events).await.unwrap();
    assert!(settled.iter().all(|s| s.billed && s.layer_used == 20));
    // The same queries again (a retry): not billed twice.
    let again = reserve(&l, &["a", "c"], period, 40, 20).await.unwrap();
    let settled = again.settle(&events).await.unwrap();
    assert!(settled.iter().all(|s| !s.billed && s.layer_used == 20));
    assert_eq!(l.billable_tokens("lic-1", period).await.unwrap(), 20);
    assert_eq!(l.usage_events("lic-1").await.unwrap().len(), 3);
}

#[tokio::test]
async fn postgres_group_reservations_are_all_or_nothing() {
    group_reservations(postgres().await).await;
}

#[tokio::test]
async fn sqlite_group_reservations_are_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    group_reservations(sqlite(&dir).await).await;
}

/// The counters agree with the rows.
async fn counters_agree(l: &Ledger) {
    assert_eq!(l.reconcile().await.unwrap(), Vec::<String>::new());
}

/// Reservations nobody settles (their gateway died) stop holding quota when their lease
/// expires; a settlement after its lease is billed once, and never beyond the quota.
async fn leases(l: Ledger) {
    setup(&l).await;
    let period = month_start(NOW);
    let in_flight = |now| {
        let l = &l;
        async move {
            let only = UsageFilter {
                license: Some("lic-1".into()),
                ..UsageFilter::default()
            };
            let rows = l.in_flight(&only, now).await.unwrap();
            rows.iter().map(|r| r.tokens).sum::<i64>()
        }
    };
    // A gateway admits 6 tokens and dies (the reservation is never settled).
    drop(
        reserve_at(&l, &["a"], period, 10, 6, NOW, 1000)
            .await
            .unwrap(),
    );
    assert_eq!(in_flight(NOW).await, 6);
    let refused = reserve_at(&l, &["a"], period, 10, 5, NOW + 500, 1000).await;
    assert!(
        matches!(
            refused,
            Err(LedgerError::QuotaExceeded { remaining: 4, .. })
        ),
        "the lease still holds"
    );
    // After the lease: not in flight any more, and the quota is whole again.
    assert_eq!(in_flight(NOW + 1000).await, 0);
    let r = reserve_at(&l, &["a"], period, 10, 5, NOW + 1001, 1000)
        .await
        .unwrap();
    assert!(
        settle(r, &event("q1", "a", 5, NOW + 1001))
            .await
            .unwrap()
            .billed
    );
    counters_agree(&l).await;

    // A request that outlives its lease, reclaimed by an admission that needed the room: its
    // settlement finds no room (5 + 4 used of 10) and bills nothing.
    let slow = reserve_at(&l, &["a"], period, 10, 3, NOW + 1002, 10)
        .await
        .unwrap();
    let r = reserve_at(&l, &["a"], period, 10, 4, NOW + 2000, 1000)
        .await
        .unwrap();
    assert!(
        settle(r, &event("q2", "a", 4, NOW + 2000))
            .await
            .unwrap()
            .billed
    );
    let late = settle(slow, &event("q-slow", "a", 3, NOW + 2001)).await;
    assert!(
        matches!(
            late,
            Err(LedgerError::LeaseExpired {
                remaining: 1,
                requested: 3,
                ..
            })
        ),
        "{late:?}"
    );
    assert!(!l.is_claimed("lic-1", "q-slow").await.unwrap());
    assert_eq!(l.billable_tokens("lic-1", period).await.unwrap(), 9);
    counters_agree(&l).await;

    // One that outlives its lease while the quota has room is billed once.
    let slow = reserve_at(&l, &["a"], period, 10, 1, NOW + 3000, 10)
        .await
        .unwrap();
    reclaim_at(&l, period, 10, 1, NOW + 4000).await;
    let late = settle(slow, &event("q-late", "a", 1, NOW + 4001))
        .await
        .unwrap();
    assert_eq!(
        late,
        Settlement {
            billed: true,
            layer_used: 10
        }
    );
    // The same query again, its lease reclaimed too: answered, not billed twice.
    let retry = reserve_at(&l, &["a"], period, 20, 1, NOW + 5000, 10)
        .await
        .unwrap();
    reclaim_at(&l, period, 20, 10, NOW + 6000).await;
    let again = settle(retry, &event("q-late", "a", 1, NOW + 6001))
        .await
        .unwrap();
    assert_eq!(
        again,
        Settlement {
            billed: false,
            layer_used: 10
        }
    );
    assert_eq!(l.billable_tokens("lic-1", period).await.unwrap(), 10);
    assert_eq!(l.usage_events("lic-1").await.unwrap().len(), 3);
    counters_agree(&l).await;

    // A settlement must match its reservation.
    let r = reserve(&l, &["a"], period, 20, 1).await.unwrap();
    assert!(matches!(
        settle(r, &event("q-wrong", "b", 1, NOW)).await,
        Err(LedgerError::Mismatch(_))
    ));
}

#[tokio::test]
async fn postgres_leases_expire_and_late_settlements_bill_once() {
    leases(postgres().await).await;
}

#[tokio::test]
async fn sqlite_leases_expire_and_late_settlements_bill_once() {
    let dir = tempfile::tempdir().unwrap();
    leases(sqlite(&dir).await).await;
}

/// A license's rate is one bucket for every gateway: two ledgers (two replicas) on one
/// database share it.
async fn rate_limits(a: Ledger, b: Ledger) {
    setup(&a).await;
    let period = month_start(NOW);
    let ask = |cost: i64, now: i64| Reserve {
        license_id: "lic-1",
        customer_id: "acme",
        model: "tiny",
        layers: &["a"],
        period_start: period,
        quota: 1000,
        tokens: cost,
        rate: Rate {
            per_minute: 60,
            cost,
        },
        now,
        lease_ms: 60_000,
    };
    a.reserve(&ask(40, NOW))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    b.reserve(&ask(20, NOW))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    for l in [&a, &b] {
        let refused = l.reserve(&ask(2, NOW + 100)).await;
        assert!(
            matches!(
                refused,
                Err(LedgerError::RateLimited {
                    retry_after_s: 2,
                    ..
                })
            ),
            "{refused:?}"
        );
    }
    // The bucket refills at 1 token per second.
    b.reserve(&ask(30, NOW + 30_000))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert!(a.reserve(&ask(1, NOW + 30_000)).await.is_err());
    a.reserve(&ask(1, NOW + 31_000))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    // A group pays its rate once for all its layers.
    let group = Reserve {
        layers: &["a", "b"],
        tokens: 10,
        rate: Rate {
            per_minute: 60,
            cost: 20,
        },
        ..ask(0, NOW + 51_000)
    };
    b.reserve(&group).await.unwrap().release().await.unwrap();
    assert!(a.reserve(&ask(1, NOW + 51_000)).await.is_err());
}

#[tokio::test]
async fn postgres_rate_limits_hold_across_replicas() {
    let url = test_support::fresh_postgres_database("ledger_test").await;
    let a = Ledger::connect(&url).await.unwrap();
    let b = Ledger::connect(&url).await.unwrap();
    rate_limits(a, b).await;
}

#[tokio::test]
async fn sqlite_rate_limits_hold_across_replicas() {
    let dir = tempfile::tempdir().unwrap();
    rate_limits(sqlite(&dir).await, sqlite(&dir).await).await;
}

/// Settlements in groups (Postgres) bill exactly as one by one: each query once (also when its
/// retry waits in the same group), each settlement sees the usage as of its own turn, and a
/// settlement whose lease was reclaimed is still billed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_group_commit_bills_as_one_by_one() {
    let l = Arc::new(postgres().await);
    setup(&l).await;
    l.start_group_commit(16);
    let period = month_start(NOW);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let l = l.clone();
            tokio::spawn(async move {
                // Queries 40..50 are retries of 0..10, sent at the same time.
                let id = format!("q{}", if i < 40 { i } else { i - 40 });
                let r = reserve(&l, &["a"], period, 100, 1).await.unwrap();
                settle(r, &event(&id, "a", 1, NOW)).await.unwrap()
            })
        })
        .collect();
    let mut used = Vec::new();
    for t in tasks {
        let settled = t.await.unwrap();
        if settled.billed {
            used.push(settled.layer_used);
        }
    }
    used.sort();
    assert_eq!(used, (1..=40).collect::<Vec<i64>>());
    assert_eq!(l.usage_events("lic-1").await.unwrap().len(), 40);
    assert_eq!(l.billable_tokens("lic-1", period).await.unwrap(), 40);
    counters_agree(&l).await;
    let daily = l
        .usage_report(
            &UsageFilter {
                from: month_start(NOW),
                to: next_month_start(NOW),
                ..UsageFilter::default()
            },
            Grain::Day,
            &[],
        )
        .await
        .unwrap();
    assert_eq!((daily[0].requests, daily[0].tokens), (40, 40), "rollups");

    // A lease reclaimed before its settlement reaches the group: billed once, after the batch.
    let slow = reserve_at(&l, &["a"], period, 100, 1, NOW + 1, 1)
        .await
        .unwrap();
    reclaim_at(&l, period, 100, 60, NOW + 10).await;
    let late = settle(slow, &event("q-late", "a", 1, NOW + 10))
        .await
        .unwrap();
    assert_eq!(
        late,
        Settlement {
            billed: true,
            layer_used: 41
        }
    );
    counters_agree(&l).await;
}

/// Admissions in groups (Postgres) admit exactly as one by one: never more than the quota
/// (a group the quota refuses as a whole is tried one by one), and never more than the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_group_admission_admits_exactly_the_quota() {
    let l = postgres().await;
    l.start_group_admission(64);
    l.start_group_commit(64);
    quota_race(Arc::new(l)).await;
}

/// A group that the quota refuses gives back the rate tokens it took before its admissions are
/// tried alone: 20 concurrent one-token requests on a quota of 10 and a rate of 20 per minute,
/// over two replicas, admit 10 and refuse 10 for the quota, none for the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_group_admission_pays_the_rate_once() {
    let url = test_support::fresh_postgres_database("ledger_test").await;
    let replicas = [
        Arc::new(Ledger::connect(&url).await.unwrap()),
        Arc::new(Ledger::connect(&url).await.unwrap()),
    ];
    setup(&replicas[0]).await;
    let period = month_start(NOW);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let l = replicas[i % 2].clone();
            l.start_group_admission(64);
            tokio::spawn(async move {
                let r = l
                    .reserve(&Reserve {
                        license_id: "lic-1",
                        customer_id: "acme",
                        model: "tiny",
                        layers: &["a"],
                        period_start: period,
                        quota: 10,
                        tokens: 1,
                        rate: Rate {
                            per_minute: 20,
                            cost: 1,
                        },
                        now: NOW,
                        lease_ms: 60_000,
                    })
                    .await;
                match r {
                    Ok(r) => Ok(r.leases().len()),
                    Err(e) => Err(e.code()),
                }
            })
        })
        .collect();
    let (mut admitted, mut refused) = (0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(code) => refused.push(code),
        }
    }
    assert_eq!(admitted, 10);
    assert_eq!(refused, vec!["quota_exceeded"; 10]);
    counters_agree(&replicas[0]).await;
}

/// The embedded ledger keeps a write-ahead log (one flushed append per commit) and flushes every
/// commit to the disk (`synchronous = FULL`), on every connection of its pool.
/// `journal_mode` and `synchronous` of `n` connections held at once (so that more than one
/// is opened) of a SQLite pool.
async fn sqlite_modes(pool: &sqlx::AnyPool, n: usize) -> Vec<(String, i64)> {
    use sqlx::Row;
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pool.acquire().await.unwrap());
    }
    let mut modes = Vec::new();
    for conn in &mut held {
        let row = |sql| sqlx::query(sql);
        let mode: String = row("PRAGMA journal_mode")
            .fetch_one(&mut **conn)
            .await
            .unwrap()
            .get(0);
        let synchronous: i64 = row("PRAGMA synchronous")
            .fetch_one(&mut **conn)
            .await
            .unwrap()
            .get(0);
        modes.push((mode, synchronous));
    }
    modes
}

#[tokio::test]
async fn the_sqlite_ledger_logs_ahead_and_flushes_every_commit_but_admissions() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = sqlite(&dir).await;
    // Settlements and everything else: every commit flushed (FULL = 2).
    for mode in sqlite_modes(ledger.pool(), 3).await {
        assert_eq!(mode, ("wal".to_string(), 2));
    }
    // Admissions and releases: flushed by the next flushed commit (NORMAL = 1).
    for mode in sqlite_modes(ledger.admission_pool(), 3).await {
        assert_eq!(mode, ("wal".to_string(), 1));
    }
}

#[tokio::test]
async fn postgres_admissions_alone_commit_without_waiting_for_the_flush() {
    use sqlx::Row;
    let ledger = postgres().await;
    let show = |pool: &sqlx::AnyPool| {
        let pool = pool.clone();
        async move {
            let row = sqlx::query("SHOW synchronous_commit")
                .fetch_one(&pool)
                .await
                .unwrap();
            row.get::<String, _>(0)
        }
    };
    assert_eq!(show(ledger.pool()).await, "on");
    assert_eq!(show(ledger.admission_pool()).await, "off");
}
