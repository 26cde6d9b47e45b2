//! Running the `hybrid` binary from the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Exit codes of `hybrid` (see crates/cli/src/client.rs).
pub const EXIT_RETRY_LATER: i32 = 75;
pub const EXIT_REFUSED: i32 = 77;

/// The key store of the commands these tests run (never the user's own).
pub fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("keys-{}", std::process::id()))
}

/// `hybrid ARGS` as a command, with the tests' key store.
pub fn hybrid_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hybrid"));
    command
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("HYBRID_CA_CERT")
        .env("HYBRID_KEYS_DIR", keys_dir());
    command
}

/// Runs `hybrid ARGS`: success, standard output, standard error.
pub fn hybrid(args: &[&str]) -> (bool, String, String) {
    let (code, out, err) = hybrid_code(args);
    (code == 0, out, err)
}

/// Runs `hybrid ARGS`: exit code, standard output, standard error.
pub fn hybrid_code(args: &[&str]) -> (i32, String, String) {
    let out = hybrid_command(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A service binary of the workspace, built beside `hybrid` by `cargo test --workspace`.
pub fn service_binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_hybrid")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo test --workspace)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, killed when dropped.
pub struct Service(pub Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP agent trusting `ca` (and the system's roots) that returns error answers as answers.
pub fn agent(ca: Option<&Path>) -> ureq::Agent {
    let mut roots = tls::system_roots();
    if let Some(ca) = ca {
        roots.extend(tls::read_certificates(ca).unwrap());
    }
    let roots: Vec<_> = roots
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::from(roots))
                .build(),
        )
        .build()
        .into()
}

/// Waits until `{url}/readyz` answers 200 (trusting `ca`), failing if `service` exits first.
pub fn wait_ready(url: &str, service: &mut Service, ca: Option<&Path>) {
    let agent = agent(ca);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(300) {
        if let Some(status) = service.0.try_wait().unwrap() {
            panic!("{url} exited early: {status}");
        }
        if agent
            .get(&format!("{url}/readyz"))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} not ready");
}

/// TLS of a stack: everything signed by one test CA.
pub struct StackTls {
    pub ca: PathBuf,
    /// Gateway and worker certificates (for `localhost`) and keys.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The worker requires the gateway's client certificate (signed by `ca`).
    pub mutual: bool,
}

pub struct StackOptions {
    pub packed: bool,
    pub tls: Option<StackTls>,
    pub quota: u64,
    pub rate_per_minute: u64,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            packed: true,
            tls: None,
            quota: 1_000_000,
            rate_per_minute: 1_000_000,
        }
    }
}

/// A worker and a gateway (embedded SQLite ledger) as processes, and a license.
pub struct Stack {
    /// The gateway's base URL.
    pub url: String,
    pub worker_url: String,
    pub license: String,
    pub keys: PathBuf,
    pub services: Vec<Service>,
}

/// Starts a worker serving `bundle`'s server bundle and a gateway in front of it, and issues a
/// license for `model`.
pub fn stack(dir: &Path, bundle: &Path, model: &str, options: &StackOptions) -> Stack {
    let keys = dir.join("keys");
    let (ok, _, err) = hybrid(&[
        "license",
        "keygen",
        "--kid",
        "k1",
        "--out",
        keys.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (worker_port, gateway_port) = (free_port(), free_port());
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let host = if options.tls.is_some() {
        "localhost"
    } else {
        "127.0.0.1"
    };
    let ca = options.tls.as_ref().map(|t| t.ca.as_path());
    let mut worker = Command::new(service_binary("hybrid-worker"));
    worker
        .args([
            "--bundle",
            bundle.join("server.safetensors").to_str().unwrap(),
        ])
        .args(["--listen", &format!("127.0.0.1:{worker_port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--packed-results", &options.packed.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(tls) = &options.tls {
        worker.arg("--tls-cert").arg(&tls.cert);
        worker.arg("--tls-key").arg(&tls.key);
        if tls.mutual {
            worker.arg("--tls-client-ca").arg(&tls.ca);
        }
    }
    let mut worker = Service(worker.spawn().unwrap());
    let worker_url = format!("{scheme}://{host}:{worker_port}");
    if options.tls.as_ref().is_some_and(|t| t.mutual) {
        // Without a client certificate the worker does not answer: wait for its port.
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", worker_port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "worker not listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        wait_ready(&worker_url, &mut worker, ca);
    }
    let mut gateway = Command::new(service_binary("hybrid-gateway"));
    gateway
        .args(["--keyset", keys.join("keyset.json").to_str().unwrap()])
        .args(["--worker", &worker_url])
        .args([
            "--database-url",
            &format!("sqlite:{}?mode=rwc", dir.join("ledger.db").display()),
        ])
        .args(["--listen", &format!("127.0.0.1:{gateway_port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(tls) = &options.tls {
        gateway.arg("--tls-cert").arg(&tls.cert);
        gateway.arg("--tls-key").arg(&tls.key);
        gateway.arg("--worker-ca-cert").arg(&tls.ca);
        if tls.mutual {
            gateway.arg("--worker-client-cert").arg(&tls.cert);
            gateway.arg("--worker-client-key").arg(&tls.key);
        }
    }
    let mut gateway = Service(gateway.spawn().unwrap());
    let url = format!("{scheme}://{host}:{gateway_port}");
    wait_ready(&url, &mut gateway, ca);
    let license = issue_license(&keys, model, options.quota, options.rate_per_minute);
    Stack {
        url,
        worker_url,
        license,
        keys,
        services: vec![gateway, worker],
    }
}

/// A license for `model` signed with the key `hybrid license keygen` wrote into `keys`.
pub fn issue_license(keys: &Path, model: &str, quota: u64, rate_per_minute: u64) -> String {
    let (ok, out, err) = hybrid(&[
        "license",
        "issue",
        "--key",
        keys.join("k1.key.pem").to_str().unwrap(),
        "--kid",
        "k1",
        "--customer",
        "acme",
        "--model",
        model,
        "--quota",
        &quota.to_string(),
        "--rate-per-minute",
        &rate_per_minute.to_string(),
    ]);
    assert!(ok, "{err}");
    out.trim().to_string()
}

/// The JSON object a command printed on its last line.
pub fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("output")).expect("last line is JSON")
}

/// Runs `hybrid ARGS`, which must fail without a panic; returns its standard error.
pub fn refused(args: &[&str]) -> String {
    let (ok, _, err) = hybrid(args);
    assert!(!ok, "`hybrid {}` succeeded", args.join(" "));
    assert!(!err.contains("panicked"), "{err}");
    err
}
