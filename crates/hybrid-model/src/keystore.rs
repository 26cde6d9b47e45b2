//! Packing keys that persist: one secret key and its packing key per gateway and license, kept
//! in the user's data directory and reused by every run, so that a license registers one key
//! (not one per run) and the gateway's per-license cap is reached only by deliberate rotation.
//!
//! Layout: `ROOT/<license>-<hash>/` with `packed-secret.key` (0600), `packing.key` and
//! `entry.json` (the gateway's URL, the license id and the id the gateway registered the key
//! under); the directories are 0700. `ROOT` is `$HYBRID_KEYS_DIR`, else
//! `$XDG_DATA_HOME/hybrid/keys`, else `~/.local/share/hybrid/keys`.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use server_bundle::sha256_hex;

use crate::remote::PackedKeys;
use crate::ModelError;

const ENTRY_FILE: &str = "entry.json";

/// The keys of the user, one entry per gateway and license.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStore {
    pub root: PathBuf,
}

/// What an entry says about its keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// The gateway's base URL.
    pub gateway: String,
    /// The license the keys are registered under (its `jti`), `anonymous` without one.
    pub license_id: String,
    /// The id the gateway registered the packing key under, once registered.
    pub key_id: Option<String>,
    /// When the keys were generated (ms since the epoch).
    pub created_ms: u64,
    /// The id of the packing key this entry's key renewed (an earlier format), still registered
    /// at the gateway until the new key is registered; then it is deleted there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// The entry's directory.
    #[serde(skip)]
    pub dir: PathBuf,
}

/// The license id (`jti` claim) of a JWT, read without verifying it (the gateway verifies); or
/// a hash of the token when it has none.
pub fn license_id(license: Option<&str>) -> String {
    let Some(token) = license else {
        return "anonymous".into();
    };
    let claims = token.split('.').nth(1).and_then(|payload| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()
    });
    let jti = claims
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| v.get("jti").and_then(|j| j.as_str()).map(String::from));
    match jti {
        Some(jti) => jti,
        None => format!("token-{}", &sha256_hex(token.as_bytes())[..16]),
    }
}

fn normalize(gateway: &str) -> String {
    gateway.trim_end_matches('/').to_ascii_lowercase()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(unix)]
fn owner_only(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn owner_only(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Ok(())
}

impl KeyStore {
    /// The store in the user's data directory (see the module's documentation).
    pub fn user() -> Result<KeyStore, ModelError> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = var("HYBRID_KEYS_DIR")
            .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("hybrid").join("keys")))
            .or_else(|| var("HOME").map(|h| h.join(".local/share/hybrid/keys")))
            .ok_or_else(|| {
                ModelError::Bundle(
                    "no data directory for packing keys: set HYBRID_KEYS_DIR or HOME".into(),
                )
            })?;
        Ok(KeyStore { root })
    }

    pub fn at(root: impl Into<PathBuf>) -> KeyStore {
        KeyStore { root: root.into() }
    }

    /// The directory of the entry for `gateway` and `license_id`.
    pub fn entry_dir(&self, gateway: &str, license_id: &str) -> PathBuf {
        let digest = sha256_hex(format!("{}\n{license_id}", normalize(gateway)).as_bytes());
        let safe: String = license_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        self.root.join(format!("{safe}-{}", &digest[..12]))
    }

    /// The entry for `gateway` and `license_id`, if its keys exist.
    pub fn entry(&self, gateway: &str, license_id: &str) -> Result<Option<KeyEntry>, ModelError> {
        read_entry(&self.entry_dir(gateway, license_id))
    }

    /// The keys for `gateway` and `license_id`: those stored, else fresh ones, saved first.
    /// Returns them with their entry.
    pub fn load_or_create(
        &self,
        gateway: &str,
        license_id: &str,
    ) -> Result<(PackedKeys, KeyEntry), ModelError> {
        let dir = self.entry_dir(gateway, license_id);
        if let Some(entry) = read_entry(&dir)? {
            let (keys, renewed) = PackedKeys::load_renewing(&dir)?;
            if !renewed {
                return Ok((keys, entry));
            }
            // The gateway knows the old key only: register the new one.
            let entry = KeyEntry {
                key_id: None,
                replaces: entry.key_id.clone().or(entry.replaces.clone()),
                ..entry
            };
            write_entry(&dir, &entry)?;
            return Ok((keys, entry));
        }
        let keys = PackedKeys::generate()?;
        let entry = KeyEntry {
            gateway: normalize(gateway),
            license_id: license_id.to_string(),
            key_id: None,
            created_ms: now_ms(),
            replaces: None,
            dir: dir.clone(),
        };
        // Written under a temporary name and renamed: a run killed halfway leaves no half entry.
        let partial = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)?;
        owner_only(&self.root, 0o700)?;
        owner_only(&partial, 0o700)?;
        keys.save(&partial)?;
        write_entry(&partial, &entry)?;
        std::fs::rename(&partial, &dir)?;
        Ok((keys, entry))
    }

    /// Records the id the gateway registered `entry`'s key under.
    pub fn set_key_id(&self, entry: &KeyEntry, key_id: &str) -> Result<KeyEntry, ModelError> {
        let mut entry = entry.clone();
        entry.key_id = Some(key_id.to_string());
        // The key it replaced, if any, is forgotten: the caller deleted it at the gateway.
        entry.replaces = None;
        write_entry(&entry.dir, &entry)?;
        Ok(entry)
    }

    /// Every entry, oldest first.
    pub fn list(&self) -> Result<Vec<KeyEntry>, ModelError> {
        let mut entries = Vec::new();
        let dirs = match std::fs::read_dir(&self.root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(entries),
            Err(e) => return Err(e.into()),
        };
        for dir in dirs {
            let path = dir?.path();
            if path.extension().is_some_and(|e| e == "partial") {
                continue;
            }
            if let Some(entry) = read_entry(&path)? {
                entries.push(entry);
            }
        }
        entries.sort_by(|a, b| (a.created_ms, &a.dir).cmp(&(b.created_ms, &b.dir)));
        Ok(entries)
    }

    /// Removes an entry's keys from this machine.
    pub fn remove(&self, entry: &KeyEntry) -> Result<(), ModelError> {
        std::fs::remove_dir_all(&entry.dir)?;
        Ok(())
    }
}

fn read_entry(dir: &Path) -> Result<Option<KeyEntry>, ModelError> {
    let text = match std::fs::read_to_string(dir.join(ENTRY_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut entry: KeyEntry = serde_json::from_str(&text)
        .map_err(|e| ModelError::Bundle(format!("{}: {e}", dir.join(ENTRY_FILE).display())))?;
    entry.dir = dir.to_path_buf();
    Ok(Some(entry))
}

fn write_entry(dir: &Path, entry: &KeyEntry) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(entry).expect("entry serializes");
    let tmp = dir.join(format!("{ENTRY_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(ENTRY_FILE))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn license_ids_from_tokens() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"jti":"lic-42","sub":"acme"}"#);
        assert_eq!(license_id(Some(&format!("h.{payload}.s"))), "lic-42");
        assert!(license_id(Some("not-a-jwt")).starts_with("token-"));
        assert_eq!(license_id(None), "anonymous");
    }

    #[test]
    fn entries_are_per_gateway_and_license_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::at(dir.path().join("keys"));
        let (keys, entry) = store.load_or_create("https://gw:8080/", "lic-1").unwrap();
        assert_eq!(entry.key_id, None);
        let entry = store.set_key_id(&entry, "abc").unwrap();
        let (again, stored) = store.load_or_create("https://GW:8080", "lic-1").unwrap();
        assert_eq!(stored, entry, "same gateway and license: the same entry");
        assert_eq!(again.packing.to_bytes(), keys.packing.to_bytes());
        let (_, other) = store.load_or_create("https://gw:8080", "lic-2").unwrap();
        assert_ne!(other.dir, entry.dir);
        assert_eq!(store.list().unwrap().len(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&entry.dir.join("packed-secret.key")), 0o600);
            assert_eq!(mode(&entry.dir), 0o700);
        }
        store.remove(&entry).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn a_packing_key_of_an_earlier_format_is_renewed_from_the_same_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::at(dir.path().join("keys"));
        let (keys, entry) = store.load_or_create("https://gw:8080", "lic-1").unwrap();
        let entry = store.set_key_id(&entry, "registered-v1").unwrap();
        // What an earlier release left: the same layout under format version 1.
        let file = entry.dir.join("packing.key");
        let mut old = std::fs::read(&file).unwrap();
        old[4..6].copy_from_slice(&1u16.to_le_bytes());
        std::fs::write(&file, &old).unwrap();
        assert!(
            PackedKeys::load(&entry.dir).is_err(),
            "the strict reader refuses it"
        );

        let (renewed, stored) = store.load_or_create("https://gw:8080", "lic-1").unwrap();
        assert_eq!(
            stored.key_id, None,
            "the new packing key must be registered again"
        );
        assert_eq!(stored.replaces.as_deref(), Some("registered-v1"));
        assert_eq!(stored.dir, entry.dir);
        assert_eq!(renewed.secret.export_secret(), keys.secret.export_secret());
        assert_ne!(renewed.packing.to_bytes(), old);
        // Saved: the next run reads it as it is, and it packs under the same secret.
        let (again, _) = store.load_or_create("https://gw:8080", "lic-1").unwrap();
        assert_eq!(again.packing.to_bytes(), renewed.packing.to_bytes());
        assert_eq!(std::fs::read(&file).unwrap(), renewed.packing.to_bytes());
    }
}
