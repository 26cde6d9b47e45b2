//! A real Prometheus over the chaos soak's processes: `deploy/`'s two VM scrape jobs
//! (`hybrid-gateway`, `hybrid-worker`) pointed at the soak's metrics ports, `deploy/`'s alert
//! rules with every duration divided by a time scale (a soak of minutes stands for hours of
//! rule time), and the alerts that reached `firing`, polled every second.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::local::{free_port, Service};

/// A running Prometheus and what it saw fire.
pub struct AlertWatch {
    _process: Service,
    fired: Arc<Mutex<BTreeMap<String, f64>>>,
    poll: tokio::task::JoinHandle<()>,
}

/// `rules` with each duration (`5m`, `1h`, `30s`) divided by `scale`, in seconds.
pub fn scale_durations(rules: &str, scale: f64) -> String {
    let mut out = String::with_capacity(rules.len());
    let mut rest = rules;
    while let Some(at) = rest.find(|c: char| c.is_ascii_digit()) {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let digits = from.bytes().take_while(u8::is_ascii_digit).count();
        let unit = from[digits..].chars().next();
        // A duration: digits then one unit letter, not part of a longer word or number.
        let prior = before.chars().last();
        let starts = !prior.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        let ends = !from[digits..]
            .chars()
            .nth(1)
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let seconds = match unit {
            Some('s') => Some(1.0),
            Some('m') => Some(60.0),
            Some('h') => Some(3600.0),
            _ => None,
        };
        match seconds {
            Some(unit_s) if starts && ends => {
                let n: f64 = from[..digits].parse().unwrap_or(0.0);
                let scaled = (n * unit_s / scale).round().max(1.0);
                out.push_str(&format!("{scaled}s"));
                rest = &from[digits + 1..];
            }
            _ => {
                out.push_str(&from[..digits]);
                rest = &from[digits..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl AlertWatch {
    /// Starts `binary` in `dir` on the gateways' and workers' metrics addresses with `rules`
    /// scaled by `scale`, and polls its alerts.
    pub async fn start(
        binary: &Path,
        dir: &Path,
        rules: &Path,
        scale: f64,
        gateways: &[String],
        workers: &[String],
    ) -> Result<Self> {
        let rules_text = std::fs::read_to_string(rules)
            .with_context(|| format!("reading the alert rules {}", rules.display()))?;
        let scaled: PathBuf = dir.join("alerts.yml");
        std::fs::write(&scaled, scale_durations(&rules_text, scale))?;
        let list = |targets: &[String]| {
            targets
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: hybrid-gateway\n    static_configs:\n      - targets: [{}]\n\
                 \x20 - job_name: hybrid-worker\n    static_configs:\n      - targets: [{}]\n",
                scaled.display(),
                list(gateways),
                list(workers)
            ),
        )?;
        let port = free_port()?;
        let data = dir.join("prometheus-data");
        let process = Service(
            Command::new(binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?,
        );
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let ready = http.get(format!("{url}/-/ready")).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "prometheus did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let fired = Arc::new(Mutex::new(BTreeMap::new()));
        let poll = tokio::spawn(poll(http, url, fired.clone(), started));
        Ok(AlertWatch {
            _process: process,
            fired,
            poll,
        })
    }

    /// The alerts that fired, with the second (since the watch started) each first fired.
    pub fn fired(&self) -> BTreeMap<String, f64> {
        self.fired.lock().expect("fired alerts").clone()
    }
}

impl Drop for AlertWatch {
    fn drop(&mut self) {
        self.poll.abort();
    }
}

#[derive(serde::Deserialize)]
struct Alerts {
    data: AlertList,
}

#[derive(serde::Deserialize)]
struct AlertList {
    alerts: Vec<Alert>,
}

#[derive(serde::Deserialize)]
struct Alert {
    labels: BTreeMap<String, String>,
    state: String,
}

async fn poll(
    http: reqwest::Client,
    url: String,
    fired: Arc<Mutex<BTreeMap<String, f64>>>,
    started: Instant,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(answer) = http.get(format!("{url}/api/v1/alerts")).send().await else {
            continue;
        };
        let Ok(body) = answer.bytes().await else {
            continue;
        };
        let Ok(alerts) = serde_json::from_slice::<Alerts>(&body) else {
            continue;
        };
        let at = started.elapsed().as_secs_f64();
        let mut fired = fired.lock().expect("fired alerts");
        for alert in alerts.data.alerts {
            if alert.state == "firing" {
                if let Some(name) = alert.labels.get("alertname") {
                    fired.entry(name.clone()).or_insert(at);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_scale_and_nothing_else_changes() {
        let rules = "expr: rate(x_total[5m]) > 0.05 and up{job=\"a1m\"} == 0\nfor: 10m\nincrease(y[1h]) > 2\n";
        assert_eq!(
            super::scale_durations(rules, 60.0),
            "expr: rate(x_total[5s]) > 0.05 and up{job=\"a1m\"} == 0\nfor: 10s\nincrease(y[60s]) > 2\n"
        );
    }
}
