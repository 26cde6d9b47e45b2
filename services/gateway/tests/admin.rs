//! The usage and administration API against a real gateway, worker and ledger: role-scoped
//! admin tokens, licenses issued and revoked over HTTP, usage reports, the streamed CSV export,
//! the audit log; and the checked-in OpenAPI document is the one the code generates.

mod common;

use common::*;
use license::{AdminClaims, Role};
use protocol::admin::*;
use serde_json::json;

fn admin_token(s: &Stack, role: Role, exp_offset: i64) -> String {
    let now = now();
    s.key
        .issue_admin(&AdminClaims {
            jti: format!("adm-{}", role.as_str()),
            sub: format!("{}@vendor", role.as_str()),
            iss: "vendor".into(),
            aud: license::admin_audience(AUD),
            role,
            iat: now,
            nbf: now - 5,
            exp: (now as i64 + exp_offset) as u64,
        })
        .unwrap()
}

struct Answer {
    status: u16,
    code: String,
    body: Vec<u8>,
}

async fn call(
    method: &str,
    url: String,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Answer {
    let client = reqwest::Client::new();
    let mut request = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some(b) = body {
        request = request
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    let body = answer.bytes().await.unwrap().to_vec();
    let code = error_code(&body);
    Answer { status, code, body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_issues_reports_exports_and_revokes() {
    let s = stack(postgres_url().await, 1, 0).await;
    let compliance = admin_token(&s, Role::Compliance, 600);
    let admin = admin_token(&s, Role::Admin, 600);
    let licenses_url = format!("{}/v1/admin/licenses", s.url);
    let request = json!({
        "customer": "acme", "customer_name": "Acme Corp", "model": "tiny",
        "layers": [LAYER], "quota_tokens": 100, "id": "lic-api"
    });

    // Who may do what.
    let a = call("POST", licenses_url.clone(), None, Some(request.clone())).await;
    assert_eq!((a.status, a.code.as_str()), (401, "admin_token_missing"));
    let a = call(
        "POST",
        licenses_url.clone(),
        Some(&compliance),
        Some(request.clone()),
    )
    .await;
    assert_eq!(
        (a.status, a.code.as_str()),
        (403, "admin_role_insufficient")
    );
    let customer_license = s.key.issue(&claims("lic-cust", 10)).unwrap();
    let a = call("GET", licenses_url.clone(), Some(&customer_license), None).await;
    assert_eq!((a.status, a.code.as_str()), (401, "admin_token_invalid"));
    let expired = admin_token(&s, Role::Admin, -3600);
    let a = call("GET", licenses_url.clone(), Some(&expired), None).await;
    assert_eq!((a.status, a.code.as_str()), (401, "admin_token_expired"));
    let bad =
        json!({"customer": "acme", "model": "tiny", "quota_tokens": 5, "quota_period": "week"});
    let a = call("POST", licenses_url.clone(), Some(&admin), Some(bad)).await;
    assert_eq!(
        (a.status, a.code.as_str()),
        (422, "invalid_license_request")
    );
    let a = call(
        "POST",
        licenses_url.clone(),
        Some(&admin),
        Some(json!({"customer": 1})),
    )
    .await;
    assert_eq!((a.status, a.code.as_str()), (422, "bad_json"));

    // Issue over HTTP; the token works at once.
    let a = call("POST", licenses_url.clone(), Some(&admin), Some(request)).await;
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let issued: IssuedLicense = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(issued.license.id, "lic-api");
    assert_eq!(issued.license.quota_tokens, 100);
    for (i, rows) in [2usize, 3, 1].into_iter().enumerate() {
        let q = format!("q{i}");
        assert_eq!(
            s.post(Some(&issued.token), Some(&q), batch(rows)).await.0,
            200
        );
    }

    // Reports: compliance sees everyone, grouped as asked.
    let a = call(
        "GET",
        format!("{}/v1/admin/usage?group=hour&by=customer,layer", s.url),
        Some(&compliance),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let report: UsageReport = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(report.group, Grain::Hour);
    assert_eq!(report.by, [Dimension::Customer, Dimension::Layer]);
    let total: i64 = report.rows.iter().map(|r| r.billable_tokens).sum();
    assert_eq!(total, 6);
    assert!(report
        .rows
        .iter()
        .all(|r| r.customer.as_deref() == Some("acme")
            && r.layer.as_deref() == Some(LAYER)
            && r.license.is_none()));
    let a = call(
        "GET",
        format!("{}/v1/admin/usage?group=month&customer=globex", s.url),
        Some(&compliance),
        None,
    )
    .await;
    let report: UsageReport = serde_json::from_slice(&a.body).unwrap();
    assert!(report.rows.is_empty(), "filters apply");
    for bad in ["group=week", "by=colour", "from_ms=10&to_ms=5", "from_ms=x"] {
        let a = call(
            "GET",
            format!("{}/v1/admin/usage?{bad}", s.url),
            Some(&compliance),
            None,
        )
        .await;
        assert_eq!((a.status, a.code.as_str()), (400, "bad_query"), "{bad}");
    }

    // A customer sees its own usage only, whatever it asks for.
    let a = call(
        "GET",
        format!(
            "{}/v1/usage?customer=globex&license=other&by=customer,layer",
            s.url
        ),
        Some(&issued.token),
        None,
    )
    .await;
    let own: CustomerUsage = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(
        (own.license_id.as_str(), own.billable_tokens),
        ("lic-api", 6)
    );
    assert_eq!(own.report.by, [Dimension::Layer]);
    assert_eq!(own.report.rows.iter().map(|r| r.tokens).sum::<i64>(), 6);

    // The CSV export streams every billed query.
    let a = call(
        "GET",
        format!("{}/v1/admin/usage/export.csv?license=lic-api", s.url),
        Some(&compliance),
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    let mut reader = csv::Reader::from_reader(&a.body[..]);
    assert_eq!(
        reader.headers().unwrap().iter().collect::<Vec<_>>(),
        USAGE_CSV_COLUMNS
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 3);
    let tokens: Vec<&str> = rows.iter().map(|r| &r[6]).collect();
    assert_eq!(tokens, ["2", "3", "1"]);
    assert!(rows.iter().all(|r| &r[2] == "lic-api" && &r[3] == "acme"));
    assert!(rows.iter().all(|r| &r[12] == "keyless" && r[13].is_empty()));

    // List, revoke, refused.
    let a = call(
        "GET",
        format!("{licenses_url}?customer=acme"),
        Some(&compliance),
        None,
    )
    .await;
    let list: LicenseList = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(list.licenses.len(), 1);
    assert_eq!(list.licenses[0].revoked_at_ms, None);
    let revoke_url = format!("{licenses_url}/lic-api/revoke");
    let reason = json!({"reason": "contract ended"});
    let a = call(
        "POST",
        revoke_url.clone(),
        Some(&compliance),
        Some(reason.clone()),
    )
    .await;
    assert_eq!(a.status, 403);
    let a = call("POST", revoke_url, Some(&admin), Some(reason)).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        s.post(Some(&issued.token), Some("q9"), batch(1)).await,
        (401, "license_revoked".to_string())
    );
    let a = call("GET", licenses_url.clone(), Some(&compliance), None).await;
    let list: LicenseList = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(
        list.licenses[0].revoke_reason.as_deref(),
        Some("contract ended")
    );

    // Every change and the export are in the audit log, with who did them; it pages.
    let a = call(
        "GET",
        format!("{}/v1/admin/audit", s.url),
        Some(&compliance),
        None,
    )
    .await;
    let log: AuditLog = serde_json::from_slice(&a.body).unwrap();
    let actions: Vec<(&str, &str)> = log
        .entries
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("license.issue", "admin@vendor"),
            ("usage.export", "compliance@vendor"),
            ("license.revoke", "admin@vendor"),
        ]
    );
    assert_eq!(log.next_after, None);
    let a = call(
        "GET",
        format!("{}/v1/admin/audit?limit=2", s.url),
        Some(&compliance),
        None,
    )
    .await;
    let page: AuditLog = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(page.entries.len(), 2);
    let after = page.next_after.unwrap();
    let a = call(
        "GET",
        format!("{}/v1/admin/audit?after={after}", s.url),
        Some(&compliance),
        None,
    )
    .await;
    let rest: AuditLog = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(rest.entries.len(), 1);

    // Revoked admin tokens are refused too.
    s.ledger
        .revoke(
            "adm-compliance",
            "left the company",
            "admin@vendor",
            now() as i64 * 1000,
        )
        .await
        .unwrap();
    let a = call("GET", licenses_url, Some(&compliance), None).await;
    assert_eq!((a.status, a.code.as_str()), (401, "admin_token_revoked"));
    let metrics = s.metrics().await;
    assert!(metrics.contains("route=\"admin\""));
    assert!(metrics.contains("part=\"overhead\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checked_in_openapi_document_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let generated = gateway::openapi_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, format!("{generated}\n")).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in.trim_end() == generated,
        "services/gateway/openapi.json is stale: run \
         `UPDATE_OPENAPI=1 cargo test --release -p gateway --test admin` and commit it"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    for path in [
        "/v1/models/{model}/layers/{layer}/apply",
        "/v1/usage",
        "/v1/admin/usage",
        "/v1/admin/usage/export.csv",
        "/v1/admin/licenses",
        "/v1/admin/licenses/{id}/revoke",
        "/v1/admin/audit",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} undocumented");
    }
    for schema in ["UsageReport", "IssueLicense", "ErrorBody", "AuditLog"] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
}
