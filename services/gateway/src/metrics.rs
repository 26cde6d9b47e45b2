//! The gateway's Prometheus metrics, on their own port. Labels are bounded (route, outcome,
//! error code); never a license, customer or model input.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// Names of every metric registered.
    pub names: Vec<String>,
    /// Every metric registered, with its help and labels (`--print-metrics`).
    pub described: Vec<service_kit::MetricInfo>,
    /// Requests by route and outcome (`ok` or the error code).
    pub requests: IntCounterVec,
    /// Latency by part: `total` (whole request) and `worker` (forwarding to the worker).
    pub latency: HistogramVec,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub tokens_metered: IntCounter,
    pub key_uploads: IntCounter,
    pub key_upload_bytes: IntCounter,
    pub key_pushes: IntCounter,
    pub quota_rejections: IntCounter,
    /// Rows sent to one protected layer beyond its input width within a quota period
    /// (enough to solve for the layer's weights): alerts, not a guarantee.
    pub extraction_alerts: IntCounter,
    pub workers_healthy: IntGauge,
    pub workers_configured: IntGauge,
    /// Key set files that changed but did not read (the set in use was kept).
    pub keyset_reload_errors: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("gateway_requests_total", "Requests by route and outcome"),
            &["route", "outcome"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "gateway_request_seconds",
                "Latency of apply requests: total, the part spent in the worker, and the rest (overhead)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["part"],
        )
        .expect("metric");
        let bytes_in = IntCounter::new("gateway_request_bytes_total", "Ciphertext bytes received")
            .expect("metric");
        let bytes_out = IntCounter::new("gateway_response_bytes_total", "Ciphertext bytes sent")
            .expect("metric");
        let tokens_metered =
            IntCounter::new("gateway_tokens_metered_total", "Tokens billed").expect("metric");
        let key_uploads = IntCounter::new(
            "gateway_packing_key_uploads_total",
            "Packing keys registered",
        )
        .expect("metric");
        let key_upload_bytes = IntCounter::new(
            "gateway_packing_key_upload_bytes_total",
            "Bytes of packing keys registered",
        )
        .expect("metric");
        let key_pushes = IntCounter::new(
            "gateway_packing_key_pushes_total",
            "Packing keys sent to workers that had not loaded them",
        )
        .expect("metric");
        let quota_rejections = IntCounter::new(
            "gateway_quota_rejections_total",
            "Requests refused for quota",
        )
        .expect("metric");
        let extraction_alerts = IntCounter::new(
            "gateway_extraction_alerts_total",
            "Licenses past a layer's input width in rows this period",
        )
        .expect("metric");
        let workers_healthy =
            IntGauge::new("gateway_workers_healthy", "Workers answering /readyz").expect("metric");
        let workers_configured = IntGauge::new(
            "gateway_workers_configured",
            "Workers known (configured, names resolved)",
        )
        .expect("metric");
        let keyset_reload_errors = IntCounter::new(
            "gateway_keyset_reload_errors_total",
            "Key set files that changed but did not read (the set in use was kept)",
        )
        .expect("metric");
        let described = service_kit::register_metrics(
            &registry,
            vec![
                Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(latency.clone()),
                Box::new(bytes_in.clone()),
                Box::new(bytes_out.clone()),
                Box::new(tokens_metered.clone()),
                Box::new(key_uploads.clone()),
                Box::new(key_upload_bytes.clone()),
                Box::new(key_pushes.clone()),
                Box::new(quota_rejections.clone()),
                Box::new(extraction_alerts.clone()),
                Box::new(workers_healthy.clone()),
                Box::new(workers_configured.clone()),
                Box::new(keyset_reload_errors.clone()),
            ],
        );
        let names = described.iter().map(|m| m.name.clone()).collect();
        Metrics {
            registry,
            names,
            described,
            requests,
            latency,
            bytes_in,
            bytes_out,
            tokens_metered,
            key_uploads,
            key_upload_bytes,
            key_pushes,
            quota_rejections,
            extraction_alerts,
            workers_healthy,
            workers_configured,
            keyset_reload_errors,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
