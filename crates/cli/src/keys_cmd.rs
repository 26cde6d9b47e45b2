//! `hybrid keys ...`: the client's keys for packed results (generated into a directory, or
//! kept in the user's key store: listed, deleted, rotated, here and at the gateway), and the
//! result flags shared by the commands that talk to the service.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hybrid_model::keystore::{license_id, KeyStore};
use hybrid_model::remote::{KeyService, KeySource, PackedKeys, RemoteConfig, ResultsMode};
use serde_json::json;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Generate a secret key and its packing key (public, about 1.3 MB) into a directory. The
    /// packing key is registered with the service on first use (`--keys DIR`).
    Gen(GenArgs),
    /// The keys of the user's key store (one set per gateway and license, reused by every
    /// run); with --url and --license, also the keys the gateway holds for that license.
    List(StoreArgs),
    /// Delete a license's packing key at the gateway (freeing one of its key slots) and from
    /// the key store. Without --key-id: the key store's key for that gateway and license.
    Delete(DeleteArgs),
    /// Replace a license's stored keys with fresh ones: register the new packing key, delete
    /// the old one at the gateway, keep the new pair in the key store.
    Rotate(StoreArgs),
}

/// The gateway and license whose keys are meant.
#[derive(Args)]
pub struct StoreArgs {
    /// The gateway's base URL.
    #[arg(long, env = "HYBRID_URL")]
    url: Option<String>,
    /// The license token (JWT).
    #[arg(long, env = "HYBRID_LICENSE", hide_env_values = true)]
    license: Option<String>,
    #[command(flatten)]
    ca: crate::client::CaArgs,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The key to delete [default: the key store's key for this gateway and license].
    #[arg(long)]
    key_id: Option<String>,
}

impl StoreArgs {
    fn service(&self) -> Result<(String, Option<String>, KeyService)> {
        let url = self
            .url
            .clone()
            .context("--url (or HYBRID_URL) is required")?;
        let config = RemoteConfig {
            license: self.license.clone(),
            tls: self.ca.client_tls(),
            ..RemoteConfig::new(url.clone(), "keys")
        };
        Ok((url, self.license.clone(), KeyService::new(config)?))
    }
}

#[derive(Args)]
pub struct GenArgs {
    /// Directory to write `packed-secret.key` (owner-only) and `packing.key` into.
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// How results come back from the service.
#[derive(Args, Clone)]
pub struct ResultsArgs {
    /// keyless (no key, larger downloads), packed (a one-time packing key upload, about a
    /// tenth of the download), or auto (the planner's choice per request among what the
    /// service offers).
    #[arg(long, default_value = "auto")]
    pub results: String,
    /// What --results auto optimises for: latency or bandwidth.
    #[arg(long, default_value = "bandwidth")]
    pub preference: String,
    /// Packing keys from `hybrid keys gen` [default: the user's key store, one set per gateway
    /// and license, made and registered on first use: see `hybrid keys list`].
    #[arg(long)]
    pub keys: Option<PathBuf>,
}

impl ResultsArgs {
    pub fn mode(&self) -> Result<ResultsMode> {
        Ok(ResultsMode::parse(&self.results, &self.preference)?)
    }

    pub fn key_source(&self) -> Result<KeySource> {
        crate::client::key_source(&self.keys)
    }
}

pub fn run(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::List(args) => list(args),
        KeysCommand::Delete(args) => delete(args),
        KeysCommand::Rotate(args) => rotate(args),
        KeysCommand::Gen(args) => {
            let started = Instant::now();
            let keys = PackedKeys::generate()?;
            let keygen_ms = started.elapsed().as_secs_f64() * 1e3;
            keys.save(&args.out)?;
            let packing_key_bytes = keys.packing.to_bytes().len();
            let report = json!({
                "dir": args.out.display().to_string(),
                "parameter_set": keys.secret.params().name,
                "packing_key_bytes": packing_key_bytes,
                "keygen_ms": keygen_ms,
            });
            if args.json {
                println!("{report}");
            } else {
                println!(
                    "wrote {} ({} parameters): packing key {:.2} MB, generated in {keygen_ms:.0} ms",
                    args.out.display(),
                    keys.secret.params().name,
                    packing_key_bytes as f64 / 1e6
                );
            }
            Ok(())
        }
    }
}

fn list(args: StoreArgs) -> Result<()> {
    let store = KeyStore::user()?;
    let local: Vec<_> = store
        .list()?
        .into_iter()
        .map(|e| {
            json!({"gateway": e.gateway, "license_id": e.license_id, "key_id": e.key_id,
                   "created_ms": e.created_ms, "dir": e.dir})
        })
        .collect();
    let remote = match &args.url {
        Some(_) => Some(args.service()?.2.list()?),
        None => None,
    };
    let report = json!({"store": store.root, "local": local, "gateway": remote});
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn delete(args: DeleteArgs) -> Result<()> {
    let (url, license, service) = args.store.service()?;
    let store = KeyStore::user()?;
    let entry = store.entry(&url, &license_id(license.as_deref()))?;
    let key_id = match (&args.key_id, &entry) {
        (Some(id), _) => id.clone(),
        (None, Some(e)) => e
            .key_id
            .clone()
            .context("the stored keys were never registered")?,
        (None, None) => bail!("no stored keys for this gateway and license: give --key-id"),
    };
    let deleted = service.delete(&key_id)?;
    // The local pair goes with its registration (a deleted key is of no more use).
    let removed_local = match entry {
        Some(e) if e.key_id.as_deref() == Some(key_id.as_str()) => {
            store.remove(&e)?;
            true
        }
        _ => false,
    };
    if !deleted && !removed_local {
        bail!("the gateway has no packing key {key_id} for this license");
    }
    let report =
        json!({"key_id": key_id, "deleted_at_gateway": deleted, "removed_locally": removed_local});
    if args.store.json {
        println!("{report}");
    } else {
        println!("deleted packing key {key_id} (gateway: {deleted}, key store: {removed_local})");
    }
    Ok(())
}

fn rotate(args: StoreArgs) -> Result<()> {
    let (url, license, service) = args.service()?;
    let store = KeyStore::user()?;
    let id = license_id(license.as_deref());
    let old = store.entry(&url, &id)?;
    // The new pair is registered before the old one is deleted: a failure leaves a working key.
    let fresh = KeyStore::at(store.root.join(".rotating"));
    let _ = std::fs::remove_dir_all(&fresh.root);
    let (keys, entry) = fresh.load_or_create(&url, &id)?;
    let registered = service.register(&keys)?;
    let old_key = old.as_ref().and_then(|e| e.key_id.clone());
    if let Some(old_key) = &old_key {
        if old_key != &registered.key_id {
            service.delete(old_key)?;
        }
    }
    if let Some(old) = &old {
        store.remove(old)?;
    }
    let target = store.entry_dir(&url, &id);
    std::fs::create_dir_all(&store.root)?;
    std::fs::rename(&entry.dir, &target)?;
    let _ = std::fs::remove_dir_all(&fresh.root);
    let entry = store
        .entry(&url, &id)?
        .context("rotated keys not found in the key store")?;
    store.set_key_id(&entry, &registered.key_id)?;
    let report = json!({"key_id": registered.key_id, "replaced": old_key, "dir": target});
    if args.json {
        println!("{report}");
    } else {
        println!(
            "registered packing key {} (replacing {}), kept in {}",
            registered.key_id,
            old_key.as_deref().unwrap_or("none"),
            target.display()
        );
    }
    Ok(())
}
