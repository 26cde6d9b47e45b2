//! `hybrid license keygen | issue | admin-token | inspect | revoke`: the vendor's license tooling.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Subcommand;
use license::{AdminClaims, KeySet, LicenseClaims, QuotaPeriod, Role, SigningKey};
use serde_json::json;

#[derive(Subcommand)]
pub enum LicenseCommand {
    /// Create a signing key; its public half is added to DIR/keyset.json.
    Keygen {
        /// Key id, written in every license it signs (e.g. the month of creation).
        #[arg(long)]
        kid: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a key set as a JWKS document (RFC 7517), for tools that verify licenses
    /// themselves; gateways also serve theirs at /.well-known/jwks.json.
    Jwks {
        /// The key set file (from keygen).
        #[arg(long)]
        keyset: PathBuf,
    },
    /// Sign a license and print the token.
    Issue {
        /// The signing key (PEM) written by keygen.
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        kid: String,
        #[arg(long)]
        customer: String,
        #[arg(long)]
        model: String,
        /// Protected layers the license may use (`*` for all).
        #[arg(long, value_delimiter = ',', default_value = "*")]
        layers: Vec<String>,
        /// Billable tokens per period.
        #[arg(long)]
        quota: u64,
        /// day | month | total
        #[arg(long, default_value = "month")]
        period: String,
        #[arg(long, default_value_t = 6000)]
        rate_per_minute: u32,
        #[arg(long, default_value_t = 4)]
        max_in_flight: u32,
        /// Validity in days from now.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// The gateway's audience name.
        #[arg(long, default_value = "hybrid-gateway")]
        aud: String,
        #[arg(long, default_value = "vendor")]
        issuer: String,
        /// License id (default: a random one).
        #[arg(long)]
        id: Option<String>,
        /// Also record the license (and an audit event) in this ledger, so that it shows in
        /// the admin API's license list.
        #[arg(long, hide_env_values = true)]
        database_url: Option<String>,
        /// Who issues (written to the audit log).
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// Sign a short-lived admin token for the gateway's admin API and print it.
    AdminToken {
        /// The signing key (PEM); its public half must be in the gateway's admin key set.
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        kid: String,
        /// compliance (read usage, exports, licenses, audit) | admin (also issue and revoke)
        #[arg(long)]
        role: Role,
        /// Who acts with it (written to the audit log).
        #[arg(long)]
        actor: String,
        /// Validity in hours from now.
        #[arg(long, default_value_t = 8)]
        hours: u64,
        /// The gateway's (license) audience; admin tokens name its admin audience.
        #[arg(long, default_value = "hybrid-gateway")]
        aud: String,
    },
    /// Revoke a license: every gateway on this ledger refuses it within seconds.
    Revoke {
        /// License id (the token's `jti`).
        #[arg(long)]
        id: String,
        #[arg(long)]
        reason: String,
        /// The ledger the gateways use (postgres://... or sqlite:PATH).
        #[arg(long, env = "GATEWAY_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Who revokes (written to the audit log).
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// Print a license's claims; with --keyset, verify it too.
    Inspect {
        token: String,
        #[arg(long)]
        keyset: Option<PathBuf>,
        #[arg(long, default_value = "hybrid-gateway")]
        aud: String,
    },
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn run(cmd: LicenseCommand) -> Result<()> {
    match cmd {
        LicenseCommand::Jwks { keyset } => {
            let json = std::fs::read_to_string(&keyset)
                .with_context(|| format!("reading {}", keyset.display()))?;
            println!("{}", KeySet::from_json(&json)?.to_jwks());
        }
        LicenseCommand::Keygen { kid, out } => {
            std::fs::create_dir_all(&out)?;
            let key = SigningKey::generate(&kid);
            let key_path = out.join(format!("{kid}.key.pem"));
            write_secret(&key_path, key.to_pem()?.as_bytes())?;
            let set_path = out.join("keyset.json");
            let mut set = match std::fs::read_to_string(&set_path) {
                Ok(json) => KeySet::from_json(&json)?,
                Err(_) => KeySet::default(),
            };
            set.insert(key.public()?)?;
            std::fs::write(&set_path, set.to_json())?;
            println!(
                "{}",
                json!({"kid": kid, "signing_key": key_path, "keyset": set_path})
            );
        }
        LicenseCommand::Issue {
            key,
            kid,
            customer,
            model,
            layers,
            quota,
            period,
            rate_per_minute,
            max_in_flight,
            days,
            aud,
            issuer,
            id,
            database_url,
            actor,
        } => {
            let signing = read_signing_key(&key, &kid)?;
            let quota_period: QuotaPeriod = serde_json::from_value(json!(period))
                .context("--period must be day, month or total")?;
            let now = now();
            let claims = LicenseClaims {
                jti: id.unwrap_or_else(|| format!("lic-{}", uuid::Uuid::new_v4())),
                sub: customer,
                iss: issuer,
                aud,
                model,
                layers,
                quota_tokens: quota,
                quota_period,
                rate_limit_per_minute: rate_per_minute,
                max_in_flight,
                iat: now,
                nbf: now,
                exp: now + days * 86_400,
            };
            let token = signing.issue(&claims)?;
            if let Some(url) = database_url {
                record(&url, &claims, &actor)?;
            }
            println!("{token}");
        }
        LicenseCommand::AdminToken {
            key,
            kid,
            role,
            actor,
            hours,
            aud,
        } => {
            let signing = read_signing_key(&key, &kid)?;
            let now = now();
            let claims = AdminClaims {
                jti: format!("adm-{}", uuid::Uuid::new_v4()),
                sub: actor,
                iss: "vendor".into(),
                aud: license::admin_audience(&aud),
                role,
                iat: now,
                nbf: now,
                exp: now + hours * 3600,
            };
            println!("{}", signing.issue_admin(&claims)?);
        }
        LicenseCommand::Revoke {
            id,
            reason,
            database_url,
            actor,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let ledger = ledger::Ledger::connect(&database_url).await?;
                ledger
                    .revoke(&id, &reason, &actor, (now() * 1000) as i64)
                    .await?;
                anyhow::Ok(())
            })?;
            println!("{}", json!({"revoked": id}));
        }
        LicenseCommand::Inspect { token, keyset, aud } => {
            let claims = license::inspect_unverified(token.trim())?;
            let verification = match keyset {
                None => json!(null),
                Some(path) => {
                    let set = KeySet::from_json(&std::fs::read_to_string(&path)?)?;
                    match set.verify(token.trim(), &aud, now()) {
                        Ok(_) => json!({"valid": true}),
                        Err(e) => {
                            json!({"valid": false, "code": e.code(), "reason": e.to_string()})
                        }
                    }
                }
            };
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"claims": claims, "verification": verification})
                )?
            );
        }
    }
    Ok(())
}

/// A signing key file written by `keygen`.
fn read_signing_key(path: &std::path::Path, kid: &str) -> Result<SigningKey> {
    let pem = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(SigningKey::from_pem(kid, &pem)?)
}

/// Records an issued license in a ledger (audited as `license.issue`).
fn record(database_url: &str, claims: &LicenseClaims, actor: &str) -> Result<()> {
    let period = serde_json::to_value(claims.quota_period)?
        .as_str()
        .unwrap_or("month")
        .to_string();
    let record = ledger::LicenseRecord {
        id: claims.jti.clone(),
        customer_id: claims.sub.clone(),
        model: claims.model.clone(),
        quota_tokens: claims.quota_tokens.min(i64::MAX as u64) as i64,
        quota_period: period,
        issued_at: (claims.iat * 1000) as i64,
        expires_at: (claims.exp * 1000) as i64,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let ledger = ledger::Ledger::connect(database_url).await?;
        let now = record.issued_at;
        ledger
            .upsert_customer(&record.customer_id, &record.customer_id, now)
            .await?;
        ledger.record_license(&record, actor, now).await?;
        anyhow::Ok(())
    })
}

/// Writes a file readable by its owner only.
fn write_secret(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)?;
    Ok(())
}
