//! Packing keys that persist: consecutive `hybrid generate --results packed` runs on one license
//! reuse one key from the key store; `hybrid keys list|rotate|delete` manage it, here and at the
//! gateway; a stored key the gateway no longer knows is registered again.

mod common;

use common::{hybrid_command, last_json, stack, StackOptions};

/// `hybrid ARGS` with its own key store `store`.
fn run(store: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = hybrid_command(args)
        .env("HYBRID_KEYS_DIR", store)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn twenty_packed_runs_register_one_key_and_keys_are_managed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let bundle = dir.path().join("bundle");
    test_support::compile_tiny(&bundle, &["layers.1.mixer.Wqkv"]);
    let stack = stack(dir.path(), &bundle, "tiny", &StackOptions::default());
    let generate = |store: &std::path::Path| {
        let (ok, out, err) = run(
            store,
            &[
                "generate",
                "--bundle",
                bundle.to_str().unwrap(),
                "--mode",
                "remote",
                "--url",
                &stack.url,
                "--license",
                &stack.license,
                "--results",
                "packed",
                "--prompt",
                "the data is private",
                "--max-tokens",
                "2",
                "--json",
            ],
        );
        assert!(ok, "{err}");
        last_json(&out)["token_ids"].clone()
    };
    // `hybrid keys VERB` for this gateway and license, with the key store `store`.
    let keys = |store: &std::path::Path, verb: &str, extra: &[&str]| {
        let mut args = vec![
            "keys",
            verb,
            "--url",
            &stack.url,
            "--license",
            &stack.license,
        ];
        args.extend(extra);
        run(store, &args)
    };
    let first = generate(&store);
    // More runs than the license has key slots (8): all succeed, none registers a new key.
    for _ in 1..20 {
        assert_eq!(generate(&store), first);
    }
    let list = |store: &std::path::Path| {
        let (ok, out, err) = keys(store, "list", &["--json"]);
        assert!(ok, "{err}");
        last_json(&out)
    };
    let listed = list(&store);
    let at_gateway = listed["gateway"]["keys"].as_array().unwrap();
    assert_eq!(at_gateway.len(), 1, "{listed}");
    let local = listed["local"].as_array().unwrap();
    assert_eq!(local.len(), 1, "{listed}");
    let key_id = local[0]["key_id"].as_str().unwrap().to_string();
    assert_eq!(at_gateway[0]["key_id"], key_id.as_str());
    let secret = std::path::Path::new(local[0]["dir"].as_str().unwrap()).join("packed-secret.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Rotation: a new key registered, the old one gone at the gateway, generation still works.
    let (ok, out, err) = keys(&store, "rotate", &["--json"]);
    assert!(ok, "{err}");
    let rotated = last_json(&out);
    assert_eq!(rotated["replaced"], key_id.as_str());
    let new_id = rotated["key_id"].as_str().unwrap().to_string();
    assert_ne!(new_id, key_id);
    let listed = list(&store);
    assert_eq!(
        listed["gateway"]["keys"].as_array().unwrap().len(),
        1,
        "{listed}"
    );
    assert_eq!(listed["gateway"]["keys"][0]["key_id"], new_id.as_str());
    assert_eq!(listed["local"][0]["key_id"], new_id.as_str());
    assert_eq!(generate(&store), first);

    // Deleted at the gateway only (another machine's `keys delete --key-id`): the stored key is
    // registered again on the next run.
    let (ok, _, err) = keys(
        &dir.path().join("elsewhere"),
        "delete",
        &["--key-id", &new_id],
    );
    assert!(ok, "{err}");
    assert_eq!(list(&store)["gateway"]["keys"].as_array().unwrap().len(), 0);
    assert_eq!(generate(&store), first);
    assert_eq!(list(&store)["gateway"]["keys"].as_array().unwrap().len(), 1);

    // A stored packing key of an earlier format (1): the next run renews it from the same secret
    // key, registers the new key and deletes the old one at the gateway (one key slot, not two).
    let registered = list(&store)["local"][0]["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let file = find_file(&store, "packing.key").expect("a stored packing key");
    let mut old = std::fs::read(&file).unwrap();
    old[4..6].copy_from_slice(&1u16.to_le_bytes());
    std::fs::write(&file, &old).unwrap();
    assert_eq!(generate(&store), first);
    let listed = list(&store);
    let at_gateway = listed["gateway"]["keys"].as_array().unwrap();
    assert_eq!(at_gateway.len(), 1, "{listed}");
    let renewed = at_gateway[0]["key_id"].as_str().unwrap();
    assert_ne!(renewed, registered);
    assert_eq!(listed["local"][0]["key_id"], renewed);

    // Deleted with the store's entry: gone in both places.
    let (ok, out, err) = keys(&store, "delete", &["--json"]);
    assert!(ok, "{err}");
    assert_eq!(last_json(&out)["removed_locally"], true);
    let listed = list(&store);
    assert_eq!(
        listed["gateway"]["keys"].as_array().unwrap().len(),
        0,
        "{listed}"
    );
    assert_eq!(listed["local"].as_array().unwrap().len(), 0, "{listed}");
    // Deleting a key the license does not have is refused, without a panic.
    let (ok, _, err) = keys(&store, "delete", &["--key-id", &key_id]);
    assert!(!ok && err.contains("no packing key"), "{err}");
}

/// The first file named `name` under `dir`.
fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}
