//! `hybrid bench planner`: does the planner know this machine? Its unit costs are measured (as a
//! worker does at start), then every layout the noise budget allows for a layer is compiled and
//! timed on one core, beside the server time the planner predicts for it. The layouts that matter
//! are the Pareto ones (no other layout is both faster and smaller): the report says how far the
//! prediction is from the measurement on each.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use fhe_linear::*;
use serde_json::json;

use crate::bench::{machine, parse_shape, planner_for, synthetic_layer, time_median, unit_costs};

/// The largest relative error of a prediction that the report calls agreement.
const AGREEMENT: f64 = 0.30;

#[derive(Args)]
pub struct PlannerArgs {
    /// Layer shape as D_INxD_OUT.
    #[arg(long, default_value = "2048x6144")]
    shape: String,
    /// Tokens (activation rows) per request.
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Largest tokens per polynomial considered (default: 1 for one token, else up to 16).
    #[arg(long)]
    tokens_per_poly: Option<usize>,
    /// keyless, packed or both.
    #[arg(long, default_value = "both")]
    results: String,
    /// Timed runs of each layout after one warm-up; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The planner's unit costs: `measure` (on this machine), `builtin`, or four numbers
    /// `input,mac,output,keyswitch` (ns), as a worker's `planner_costs` takes them.
    #[arg(long, default_value = "measure")]
    planner_costs: String,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// One layout, predicted and measured.
struct Row {
    plan: Plan,
    measured_ms: f64,
    pack_ms: f64,
    bytes: usize,
    exact: bool,
}

impl Row {
    fn error(&self) -> f64 {
        (self.plan.server_ms - self.measured_ms) / self.measured_ms
    }
}

pub fn run(args: PlannerArgs) -> Result<()> {
    // One core, as the planner's constants are stated (read by rayon's global pool).
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let shape = parse_shape(&args.shape)?;
    let tokens = args.tokens;
    if tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    let encodings: &[ResultEncoding] = match args.results.as_str() {
        "keyless" => &[ResultEncoding::Keyless],
        "packed" => &[ResultEncoding::Packed],
        "both" => &[ResultEncoding::Keyless, ResultEncoding::Packed],
        other => bail!("--results must be keyless, packed or both, not {other}"),
    };
    let started = Instant::now();
    let (measured, calibration) = planner_for(&args.planner_costs)?;
    let planner = Planner {
        max_t_b: args
            .tokens_per_poly
            .unwrap_or(if tokens == 1 { 1 } else { 16 }),
        ..measured
    };

    let (w, x, bias, expected) =
        synthetic_layer(shape, tokens, fhe_linear::DEFAULT_ACTIVATION_BITS);
    let limits = Limits::default();

    let mut rows = Vec::new();
    for &encoding in encodings {
        let plans = planner.candidates(shape, tokens, encoding);
        let Some(first) = plans.first() else { continue };
        let key = ClientKey::generate(first.spec.params);
        let packing = match encoding {
            ResultEncoding::Keyless => None,
            ResultEncoding::Packed => {
                Some(PreparedPackingKey::prepare(&PackingKey::generate(&key)?))
            }
        };
        for plan in plans {
            let spec = plan.spec;
            let layer = CompiledLayer::compile(spec, &w, &bias)?;
            let upload = key.encrypt(&spec, &x, tokens)?.to_bytes();
            let mut packs = Vec::new();
            let (measured_ms, download) = time_median(args.runs, || -> Result<Vec<u8>> {
                let (bytes, _, pack_ms) = layer.answer(&upload, &limits, packing.as_ref())?;
                packs.push(pack_ms);
                Ok(bytes)
            });
            let download = download?;
            packs.sort_by(|a, b| a.total_cmp(b));
            let result = EncryptedResult::from_bytes(&download, &limits)?;
            let exact = key.decrypt(&spec, &result)? == expected;
            rows.push(Row {
                plan,
                measured_ms,
                pack_ms: packs.get(packs.len() / 2).copied().unwrap_or(0.0),
                bytes: upload.len() + download.len(),
                exact,
            });
        }
    }
    if rows.is_empty() {
        bail!("no layout of {} fits layer {shape}", args.results);
    }

    // Pareto on what was measured: no other row at most as slow and at most as big, and better
    // on one of the two.
    let pareto: Vec<bool> = rows
        .iter()
        .map(|r| {
            !rows.iter().any(|o| {
                o.measured_ms <= r.measured_ms
                    && o.bytes <= r.bytes
                    && (o.measured_ms < r.measured_ms || o.bytes < r.bytes)
            })
        })
        .collect();
    let worst = |only_pareto: bool| {
        rows.iter()
            .zip(&pareto)
            .filter(|(_, p)| **p || !only_pareto)
            .map(|(r, _)| r.error().abs())
            .fold(0.0f64, f64::max)
    };
    let (worst_pareto, worst_all) = (worst(true), worst(false));
    let exact = rows.iter().all(|r| r.exact);
    let layouts: Vec<_> = rows
        .iter()
        .zip(&pareto)
        .map(|(r, p)| {
            let l = r.plan.spec.layout;
            json!({
                "results": r.plan.spec.encoding.as_str(),
                "parameter_set": r.plan.spec.params.name,
                "n_i": l.n_i, "n_o": l.n_o, "t_b": l.t_b,
                "bytes_per_token": r.bytes as f64 / tokens as f64,
                "predicted_ms": r.plan.server_ms,
                "measured_ms": r.measured_ms,
                "pack_ms": r.pack_ms,
                "error": r.error(),
                "pareto": p,
                "exact": r.exact,
            })
        })
        .collect();
    let report = json!({
        "bench": "planner",
        "shape": format!("{}x{}", shape.d_in, shape.d_out),
        "tokens": tokens,
        "threads": 1,
        "runs": args.runs,
        "machine": machine(),
        "planner": calibration,
        "unit_costs": unit_costs(&planner),
        "layouts": layouts,
        "worst_error_pareto": worst_pareto,
        "worst_error_all": worst_all,
        "agreement": AGREEMENT,
        "pareto_within_agreement": worst_pareto <= AGREEMENT,
        "exact": exact,
        "took_s": started.elapsed().as_secs_f64(),
    });
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "planner vs this machine: {} x {tokens} tokens, one core",
            args.shape
        );
        println!("  unit costs {}", report["unit_costs"]);
        println!("  results  n_i/n_o/t_b   KB/token  predicted ms  measured ms  error  pareto");
        for (r, p) in rows.iter().zip(&pareto) {
            let l = r.plan.spec.layout;
            println!(
                "  {:<8} {:>4}/{:<4}/{:<2} {:>9.0} {:>13.1} {:>12.1} {:>+6.0}%  {}",
                r.plan.spec.encoding.as_str(),
                l.n_i,
                l.n_o,
                l.t_b,
                r.bytes as f64 / tokens as f64 / 1e3,
                r.plan.server_ms,
                r.measured_ms,
                r.error() * 100.0,
                if *p { "yes" } else { "" }
            );
        }
        println!(
            "  worst error: {:.0}% on the Pareto layouts, {:.0}% on all",
            worst_pareto * 100.0,
            worst_all * 100.0
        );
    }
    if !exact {
        bail!("decrypted results differ from the integer reference");
    }
    Ok(())
}
