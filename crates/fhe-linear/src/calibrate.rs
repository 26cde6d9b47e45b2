//! The planner's unit costs, measured on this machine.
//!
//! [`Planner`] prices a layout with four constants (nanoseconds per uploaded coefficient, per
//! complex multiply-accumulate, per product coefficient transformed back, per key-switched
//! coefficient). They differ between machines: AVX2 against AVX-512 transforms, memory bandwidth
//! for the weight spectra. [`calibrate`] measures them in about a second, on one core, by applying
//! four small layers, each chosen so that one unit dominates its time:
//!
//! | sample   | results | shape     | n_i/n_o/t_b | dominated by |
//! |----------|---------|-----------|-------------|--------------|
//! | `input`  | keyless | 2048x64   | 32/64/1     | uploaded coefficients (64 input ciphertexts, 1 output block) |
//! | `macs`   | keyless | 2048x4096 | 32/64/1     | multiply-accumulates (64 MiB of weight spectra, more than a last-level cache) |
//! | `output` | keyless | 64x4096   | 64/32/1     | product coefficients (1 input ciphertext, 128 output blocks) |
//! | `pack`   | packed  | 1024x1024 | 64/64/1     | key switches (63), timed apart from its products |
//!
//! Each sample is timed as a server handles a request (parse the batch, apply, serialise the
//! result): one warm-up, then the median of [`RUNS`]. The three keyless samples give three
//! equations in the first three constants, solved by Gauss-Seidel iteration (each equation is
//! dominated by its own unknown, so it converges in a few steps); the packed sample's packing
//! time divided by its key-switched coefficients gives the fourth. A timing disturbed by other
//! work on the machine can push an estimate towards zero, which would make that unit look free:
//! every cost is kept at least [`FLOOR`] times the given planner's. Every sample's result is
//! decrypted and checked against the integer product.

use std::time::Instant;

use crate::ciphertext::EncryptedResult;
use crate::client::ClientKey;
use crate::entities::{BlockLayout, LayerShape, ResultEncoding};
use crate::layout::LayerSpec;
use crate::packing::{PackingKey, PreparedPackingKey};
use crate::params::{HFHE_GLWE_2048_V1, HFHE_GLWE_4096_V1};
use crate::plan::{cost, Cost, Planner};
use crate::server::CompiledLayer;
use crate::simulate::simulate;
use crate::wire::Limits;
use crate::FheError;

/// Timed runs per sample, after one warm-up.
pub const RUNS: usize = 5;

/// The smallest fraction of the given planner's unit cost that a measured one may be.
pub const FLOOR: f64 = 0.01;

/// One measured layer.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `input`, `macs`, `output` or `pack`.
    pub name: &'static str,
    pub spec: LayerSpec,
    /// The modelled work of one request.
    pub cost: Cost,
    /// Median milliseconds of a request (parse, apply, serialise).
    pub measured_ms: f64,
    /// Of which packing (packed results only).
    pub pack_ms: f64,
}

/// What [`calibrate`] measured.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// The given planner with its four unit costs replaced by this machine's.
    pub planner: Planner,
    pub samples: Vec<Sample>,
    /// Milliseconds the whole measurement took (key generation and compiling included).
    pub took_ms: f64,
}

/// Measures the planner's unit costs on one core of this machine; the rest of `base` (link speed,
/// slowdown, largest tokens per polynomial) is kept.
pub fn calibrate(base: Planner) -> Result<Calibration, FheError> {
    let started = Instant::now();
    // One core, as the planner's constants are stated; a pool of its own so that a server's
    // other work does not share it.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| FheError::Calibration(e.to_string()))?;
    let samples = pool.install(measure_samples)?;
    let planner = fit(base, &samples);
    Ok(Calibration {
        planner,
        samples,
        took_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// One sample of the module docs' table.
struct SampleDef {
    name: &'static str,
    encoding: ResultEncoding,
    /// (d_in, d_out)
    shape: (usize, usize),
    /// (n_i, n_o)
    layout: (usize, usize),
}

const fn sample(
    name: &'static str,
    encoding: ResultEncoding,
    shape: (usize, usize),
    layout: (usize, usize),
) -> SampleDef {
    SampleDef {
        name,
        encoding,
        shape,
        layout,
    }
}

const SAMPLES: [SampleDef; 4] = [
    sample("input", ResultEncoding::Keyless, (2048, 64), (32, 64)),
    sample("macs", ResultEncoding::Keyless, (2048, 4096), (32, 64)),
    sample("output", ResultEncoding::Keyless, (64, 4096), (64, 32)),
    sample("pack", ResultEncoding::Packed, (1024, 1024), (64, 64)),
];

/// The spec of a sample: keyless results on the 2048 set, packed ones on the 4096 set.
fn sample_spec(def: &SampleDef) -> Result<LayerSpec, FheError> {
    let ((d_in, d_out), (n_i, n_o), encoding) = (def.shape, def.layout, def.encoding);
    let params = match encoding {
        ResultEncoding::Keyless => &HFHE_GLWE_2048_V1,
        ResultEncoding::Packed => &HFHE_GLWE_4096_V1,
    };
    let layout = BlockLayout { n_i, n_o, t_b: 1 };
    LayerSpec::with_encoding(params, LayerShape::new(d_in, d_out), layout, encoding)
}

fn measure_samples() -> Result<Vec<Sample>, FheError> {
    let keyless = ClientKey::generate(&HFHE_GLWE_2048_V1);
    let packed = ClientKey::generate(&HFHE_GLWE_4096_V1);
    let packing = PreparedPackingKey::prepare(&PackingKey::generate(&packed)?);
    SAMPLES
        .iter()
        .map(|def| {
            let spec = sample_spec(def)?;
            match def.encoding {
                ResultEncoding::Keyless => measure(def.name, spec, &keyless, None),
                ResultEncoding::Packed => measure(def.name, spec, &packed, Some(&packing)),
            }
        })
        .collect()
}

/// Small weights and activations of a fixed pattern: the time does not depend on the values,
/// and small ones keep every row inside the plaintext window.
fn pattern(len: usize, salt: usize) -> Vec<i8> {
    (0..len)
        .map(|i| ((i.wrapping_mul(2_654_435_761).wrapping_add(salt)) % 7) as i8 - 3)
        .collect()
}

fn measure(
    name: &'static str,
    spec: LayerSpec,
    key: &ClientKey,
    packing: Option<&PreparedPackingKey>,
) -> Result<Sample, FheError> {
    let shape = spec.shape;
    let w = pattern(shape.d_in * shape.d_out, 1);
    let bias: Vec<i64> = pattern(shape.d_out, 2).iter().map(|v| *v as i64).collect();
    let x: Vec<i16> = pattern(shape.d_in, 3).iter().map(|v| *v as i16).collect();
    let layer = CompiledLayer::compile(spec, &w, &bias)?;
    let upload = key.encrypt(&spec, &x, 1)?.to_bytes();
    let limits = Limits::default();
    let (download, _, _) = layer.answer(&upload, &limits, packing)?;
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let (_, _, pack_ms) = layer.answer(&upload, &limits, packing)?;
        times.push((t.elapsed().as_secs_f64() * 1e3, pack_ms));
    }
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (measured_ms, pack_ms) = times[RUNS / 2];
    let result = EncryptedResult::from_bytes(&download, &limits)?;
    if key.decrypt(&spec, &result)? != simulate(shape, &x, 1, &w, &bias) {
        return Err(FheError::Calibration(format!(
            "sample `{name}` did not decrypt to the integer product"
        )));
    }
    Ok(Sample {
        name,
        spec,
        cost: cost(&spec, 1),
        measured_ms,
        pack_ms,
    })
}

/// The four unit costs that explain `samples` (see the module docs).
fn fit(base: Planner, samples: &[Sample]) -> Planner {
    let by = |name: &str| samples.iter().find(|s| s.name == name);
    let mut planner = base;
    let (Some(input), Some(macs), Some(output)) = (by("input"), by("macs"), by("output")) else {
        return planner;
    };
    let ns = |s: &Sample| (s.measured_ms - s.pack_ms) * 1e6;
    let (fa, fb, fd) = (
        FLOOR * base.ns_per_input_coefficient,
        FLOOR * base.ns_per_mac,
        FLOOR * base.ns_per_output_coefficient,
    );
    let (mut a, mut b, mut d) = (fa, fb, fd);
    for _ in 0..50 {
        let c = &input.cost;
        a = ((ns(input) - b * c.macs - d * c.output_coefficients) / c.input_coefficients).max(fa);
        let c = &macs.cost;
        b = ((ns(macs) - a * c.input_coefficients - d * c.output_coefficients) / c.macs).max(fb);
        let c = &output.cost;
        d = ((ns(output) - a * c.input_coefficients - b * c.macs) / c.output_coefficients).max(fd);
    }
    planner.ns_per_input_coefficient = a;
    planner.ns_per_mac = b;
    planner.ns_per_output_coefficient = d;
    if let Some(pack) = by("pack") {
        let n = pack.spec.polynomial_size() as f64;
        let switched = pack.cost.keyswitches as f64 * n;
        if switched > 0.0 {
            planner.ns_per_keyswitch_coefficient =
                (pack.pack_ms * 1e6 / switched).max(FLOOR * base.ns_per_keyswitch_coefficient);
        }
    }
    planner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_the_unit_costs_that_made_the_times() {
        let truth = Planner {
            ns_per_input_coefficient: 70.0,
            ns_per_mac: 1.3,
            ns_per_output_coefficient: 25.0,
            ns_per_keyswitch_coefficient: 80.0,
            ..Planner::default()
        };
        let samples: Vec<Sample> = SAMPLES
            .iter()
            .map(|def| {
                let spec = sample_spec(def).unwrap();
                let plan = truth.cost_of(spec, 1);
                let n = spec.polynomial_size() as f64;
                let pack_ms =
                    plan.cost.keyswitches as f64 * n * truth.ns_per_keyswitch_coefficient / 1e6;
                Sample {
                    name: def.name,
                    spec,
                    cost: plan.cost,
                    measured_ms: plan.server_ms,
                    pack_ms,
                }
            })
            .collect();
        let fitted = fit(Planner::default(), &samples);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b;
        assert!(close(fitted.ns_per_input_coefficient, 70.0), "{fitted:?}");
        assert!(close(fitted.ns_per_mac, 1.3), "{fitted:?}");
        assert!(close(fitted.ns_per_output_coefficient, 25.0), "{fitted:?}");
        assert!(
            close(fitted.ns_per_keyswitch_coefficient, 80.0),
            "{fitted:?}"
        );
        assert_eq!(fitted.link_mbit_s, Planner::default().link_mbit_s);
        // A macs sample timed too fast (as if its time had gone to the other samples) leaves the
        // multiply-accumulate cost at the floor, not at zero.
        let mut disturbed = samples.clone();
        disturbed[1].measured_ms /= 10.0;
        let fitted = fit(Planner::default(), &disturbed);
        assert_eq!(fitted.ns_per_mac, FLOOR * Planner::default().ns_per_mac);
    }

    /// Measures this machine: every sample decrypts exactly and every unit costs something.
    #[test]
    fn calibration_measures_four_positive_unit_costs() {
        let c = calibrate(Planner::default()).unwrap();
        assert_eq!(c.samples.len(), 4);
        let p = c.planner;
        for v in [
            p.ns_per_input_coefficient,
            p.ns_per_mac,
            p.ns_per_output_coefficient,
            p.ns_per_keyswitch_coefficient,
        ] {
            assert!(v.is_finite() && v > 0.0, "{p:?}");
        }
    }
}
