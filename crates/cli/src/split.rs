//! Where the time of generated tokens goes: local compute, encryption, network + server,
//! decryption, and the bytes each token sends and receives (from the SDK's `RemoteStats`).

use hybrid_model::remote::StatsSnapshot;
use serde_json::json;

/// Where one decode step's time went (seconds) and what it sent.
#[derive(Default)]
pub struct Split {
    pub steps: usize,
    pub wall: f64,
    pub remote: StatsSnapshot,
}

impl Split {
    pub fn add(&mut self, wall: f64, d: StatsSnapshot) {
        self.steps += 1;
        self.wall += wall;
        self.remote = self.remote + d;
    }

    /// Seconds of the protected layers (encryption, network and server, decryption), over all
    /// steps.
    pub fn remote_s(&self) -> f64 {
        let r = &self.remote;
        r.encrypt_s + r.network_s + r.decrypt_s
    }

    /// Per-step averages in ms (and bytes).
    pub fn per_token(&self) -> serde_json::Value {
        let n = self.steps.max(1) as f64;
        let r = &self.remote;
        let local = self.wall - self.remote_s();
        json!({
            "total_ms": self.wall / n * 1e3,
            "local_compute_ms": local / n * 1e3,
            "encrypt_ms": r.encrypt_s / n * 1e3,
            "network_and_server_ms": r.network_s / n * 1e3,
            "server_compute_ms": r.server_s / n * 1e3,
            "decrypt_ms": r.decrypt_s / n * 1e3,
            "upload_bytes": r.upload_bytes as f64 / n,
            "download_bytes": r.download_bytes as f64 / n,
            "round_trips": r.queries as f64 / n,
        })
    }
}
