//! The worker's Prometheus metrics, served on their own port. Labels are bounded: route and
//! outcome only (never a model input, a license or a customer).

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// Names of every metric registered.
    pub names: Vec<String>,
    /// Every metric registered, with its help and labels (`--print-metrics`).
    pub described: Vec<service_kit::MetricInfo>,
    /// Requests by route (`apply`, `layers`) and outcome (`ok` or the stable error code).
    pub requests: IntCounterVec,
    /// Server compute time of one apply.
    pub apply_seconds: Histogram,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    pub inflight: IntGauge,
    pub layers_loaded: IntGauge,
    pub keys_cached: IntGauge,
    pub key_loads: IntCounter,
    /// The planner's unit costs this worker plans its packed layouts with, by unit.
    pub planner_unit_cost: GaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("worker_requests_total", "Requests by route and outcome"),
            &["route", "outcome"],
        )
        .expect("metric");
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "worker_apply_seconds",
                "Compute time of one encrypted layer application",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("metric");
        let request_bytes =
            IntCounter::new("worker_request_bytes_total", "Ciphertext bytes received")
                .expect("metric");
        let response_bytes =
            IntCounter::new("worker_response_bytes_total", "Ciphertext bytes sent")
                .expect("metric");
        let inflight =
            IntGauge::new("worker_inflight_requests", "Applies being computed").expect("metric");
        let layers_loaded =
            IntGauge::new("worker_layers_loaded", "Protected layers ready to serve")
                .expect("metric");
        let keys_cached = IntGauge::new(
            "worker_packing_keys_cached",
            "Prepared packing keys in the cache",
        )
        .expect("metric");
        let key_loads = IntCounter::new(
            "worker_packing_key_loads_total",
            "Packing keys received and prepared",
        )
        .expect("metric");
        let planner_unit_cost = GaugeVec::new(
            Opts::new(
                "worker_planner_unit_cost_nanoseconds",
                "One-core cost of each unit of the packed-layout planner (input, mac, output, keyswitch), measured at start or built in",
            ),
            &["unit"],
        )
        .expect("metric");
        let described = service_kit::register_metrics(
            &registry,
            vec![
                Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(apply_seconds.clone()),
                Box::new(request_bytes.clone()),
                Box::new(response_bytes.clone()),
                Box::new(inflight.clone()),
                Box::new(layers_loaded.clone()),
                Box::new(keys_cached.clone()),
                Box::new(key_loads.clone()),
                Box::new(planner_unit_cost.clone()),
            ],
        );
        let names = described.iter().map(|m| m.name.clone()).collect();
        Metrics {
            registry,
            names,
            described,
            requests,
            apply_seconds,
            request_bytes,
            response_bytes,
            inflight,
            layers_loaded,
            keys_cached,
            key_loads,
            planner_unit_cost,
        }
    }

    /// Publishes the unit costs the packed layouts are planned with.
    pub fn record_planner(&self, p: &fhe_linear::Planner) {
        for (unit, ns) in [
            ("input", p.ns_per_input_coefficient),
            ("mac", p.ns_per_mac),
            ("output", p.ns_per_output_coefficient),
            ("keyswitch", p.ns_per_keyswitch_coefficient),
        ] {
            self.planner_unit_cost.with_label_values(&[unit]).set(ns);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
