//! `hybrid bench ...`: speed and size of the encrypted computations, with a plain baseline
//! timed in the same run so that results compare across machines as ratios.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fhe_linear::*;
use rayon::prelude::*;
use serde_json::json;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// One encrypted linear layer: client encryption, server product, client decryption.
    Fhe(FheArgs),
    /// The gateway's metering overhead and request rate, in front of a tiny-layer worker.
    Gateway(crate::bench_gateway::GatewayArgs),
    /// Generation at full size: local only vs protected layers through gateway + worker
    /// processes (per-token split, bytes, peak memory).
    E2e(crate::bench_e2e::E2eArgs),
    /// Accuracy of protected layers on a real model (SmolLM2, GGUF): simulate vs float.
    Accuracy(crate::bench_accuracy::AccuracyArgs),
    /// A soak under faults: gateways and workers killed and restarted while clients retry;
    /// checks that every answer is billed exactly once and nothing else is.
    Chaos(crate::bench_chaos::ChaosArgs),
    /// The planner against this machine: its unit costs measured, then every layout of a layer
    /// timed on one core beside the time the planner predicts for it.
    Planner(crate::bench_planner::PlannerArgs),
}

#[derive(Args)]
pub struct FheArgs {
    /// Layer shape as D_INxD_OUT (phi-1.5: 2048x6144 QKV, 2048x2048 dense, 2048x8192 fc1, 8192x2048 fc2).
    #[arg(long, default_value = "2048x6144")]
    shape: String,
    /// Tokens (activation rows) per request.
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Tokens sharing one polynomial (a power of two; default: 1 for one token, else up to 8).
    #[arg(long)]
    tokens_per_poly: Option<usize>,
    /// Timed runs after one warm-up; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Worker threads for the server, the client and the plain baseline (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Result encoding: keyless (no key), packed (the client's packing key; without --n-i, the
    /// layout a worker on this machine offers), or auto (the planner's choice for --preference).
    #[arg(long, default_value = "keyless")]
    results: String,
    /// What the planner optimises for with --results auto: latency or bandwidth.
    #[arg(long, default_value = "bandwidth")]
    preference: String,
    /// Activations per input block (overrides the planner; n_o follows from N).
    #[arg(long)]
    n_i: Option<usize>,
    /// Packing key decomposition (base log, levels) instead of the parameter set's: for sweeps
    /// only (such keys are not accepted on the wire).
    #[arg(long, num_args = 2, value_names = ["BASE_LOG", "LEVELS"])]
    decomposition: Option<Vec<u32>>,
    /// The planner's unit costs, as a worker's `planner_costs` takes them: `measure` (on this
    /// machine, before the run), `builtin`, or four numbers `input,mac,output,keyswitch` (ns).
    #[arg(long, default_value = "measure")]
    planner_costs: String,
    /// Width of the activations (8 to 16): the layout is chosen for it and the activations
    /// span it.
    #[arg(long, default_value_t = fhe_linear::DEFAULT_ACTIVATION_BITS)]
    activation_bits: u32,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// The planner with `costs` (what a worker's `planner_costs` takes: `measure`, `builtin` or four
/// given numbers), and the calibration's report when measured. Unlike a worker, which falls back
/// to the built-in costs, a failed measurement is the bench's error.
pub(crate) fn planner_for(costs: &str) -> Result<(Planner, serde_json::Value)> {
    match worker::PlannerCosts::parse(costs) {
        Some(worker::PlannerCosts::Measure) => {
            let c = calibrate(Planner::default())?;
            let samples: Vec<_> = c
                .samples
                .iter()
                .map(|s| json!({"sample": s.name, "ms": s.measured_ms, "pack_ms": s.pack_ms}))
                .collect();
            Ok((
                c.planner,
                json!({"costs": "measured", "took_ms": c.took_ms, "samples": samples}),
            ))
        }
        Some(fixed) => {
            let costs = match fixed {
                worker::PlannerCosts::Builtin => "builtin",
                _ => "given",
            };
            Ok((fixed.planner(), json!({ "costs": costs })))
        }
        None => bail!(
            "--planner-costs must be measure, builtin or four positive numbers \
             (input,mac,output,keyswitch in ns), not {costs}"
        ),
    }
}

/// The planner's unit costs as JSON.
pub(crate) fn unit_costs(p: &Planner) -> serde_json::Value {
    json!({
        "ns_per_input_coefficient": p.ns_per_input_coefficient,
        "ns_per_mac": p.ns_per_mac,
        "ns_per_output_coefficient": p.ns_per_output_coefficient,
        "ns_per_keyswitch_coefficient": p.ns_per_keyswitch_coefficient,
    })
}

/// The widest x86 vector extension the kernels use on this machine, and the CPU's name.
pub(crate) fn machine() -> serde_json::Value {
    #[cfg(target_arch = "x86_64")]
    let simd = if std::arch::is_x86_feature_detected!("avx512f") {
        "avx512"
    } else if std::arch::is_x86_feature_detected!("avx2") {
        "avx2"
    } else {
        "none"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let simd = "none";
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    json!({"simd": simd, "cpu": cpu})
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Fhe(args) => fhe(args),
        BenchCommand::Gateway(args) => crate::bench_gateway::run(args),
        BenchCommand::E2e(args) => crate::bench_e2e::e2e(args),
        BenchCommand::Accuracy(args) => crate::bench_accuracy::run(args),
        BenchCommand::Chaos(args) => crate::bench_chaos::run(args),
        BenchCommand::Planner(args) => crate::bench_planner::run(args),
    }
}

pub(crate) fn parse_shape(s: &str) -> Result<LayerShape> {
    let (a, b) = s
        .split_once('x')
        .context("shape must look like 2048x6144")?;
    Ok(LayerShape::new(a.trim().parse()?, b.trim().parse()?))
}

/// Median wall time in milliseconds of `runs` calls after one warm-up; returns the last output.
pub(crate) fn time_median<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut out = f();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        out = f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], out)
}

/// A layer's worth of deterministic data: weights, `tokens` rows of activations, a bias, and
/// the integer product every encrypted result is checked against.
pub(crate) fn synthetic_layer(
    shape: LayerShape,
    tokens: usize,
    activation_bits: u32,
) -> (Vec<i8>, Vec<i16>, Vec<i64>, Vec<i64>) {
    let w = pseudo_random_i8(shape.d_in * shape.d_out, 1);
    // Activations over the whole width: the high byte pseudo-random, the low bits another draw.
    let low = pseudo_random_i8(tokens * shape.d_in, 4);
    let x: Vec<i16> = pseudo_random_i8(tokens * shape.d_in, 2)
        .iter()
        .zip(low)
        .map(|(h, l)| {
            let extra = activation_bits - 8;
            ((*h as i16) << extra) | ((l as u8 as i16) & ((1 << extra) - 1))
        })
        .collect();
    let bias: Vec<i64> = pseudo_random_i8(shape.d_out, 3)
        .iter()
        .map(|v| *v as i64 * 100)
        .collect();
    let expected = simulate(shape, &x, tokens, &w, &bias);
    (w, x, bias, expected)
}

/// Deterministic pseudo-random bytes for weights and activations (SplitMix64).
fn pseudo_random_i8(len: usize, mut state: u64) -> Vec<i8> {
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u8 as i8
        })
        .collect()
}

fn plain_f32_ms(shape: LayerShape, tokens: usize, x: &[i8], w: &[i8], runs: usize) -> Result<f64> {
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let xf: Vec<f32> = x.iter().map(|v| *v as f32).collect();
    // W^T, d_in x d_out, so that the product is a plain (tokens x d_in) * (d_in x d_out).
    let mut wt = vec![0f32; shape.d_in * shape.d_out];
    for (r, row) in w.chunks_exact(shape.d_in).enumerate() {
        for (j, v) in row.iter().enumerate() {
            wt[j * shape.d_out + r] = *v as f32;
        }
    }
    let xt = Tensor::from_vec(xf, (tokens, shape.d_in), &dev)?;
    let wt = Tensor::from_vec(wt, (shape.d_in, shape.d_out), &dev)?;
    let (ms, y) = time_median(runs, || xt.matmul(&wt));
    y?;
    Ok(ms)
}

/// numpy's f32 product on the same data (see `scripts/blas_matmul.py`), with `threads` BLAS
/// threads: the fastest plain product on most machines. `Err` says why there is none (no
/// Python, no numpy), which the report prints instead.
///
/// numpy rather than a BLAS linked into `hybrid`: its PyPI wheels carry an OpenBLAS built for
/// every x86-64 kernel family and pick one at run time (AVX2, AVX-512), where a Debian package
/// linked behind a cargo feature would add a C dependency to the build for a baseline only.
fn blas_f32_ms(
    shape: LayerShape,
    tokens: usize,
    x: &[i8],
    w: &[i8],
    runs: usize,
    threads: usize,
) -> std::result::Result<(f64, String), String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    const SCRIPT: &str = include_str!("../scripts/blas_matmul.py");
    let python = std::env::var("HYBRID_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .args([tokens, shape.d_in, shape.d_out, runs].map(|v| v.to_string()))
        .env("OPENBLAS_NUM_THREADS", threads.to_string())
        .env("OMP_NUM_THREADS", threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{python}: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let bytes = |v: &[i8]| v.iter().map(|b| *b as u8).collect::<Vec<u8>>();
    let written = stdin
        .write_all(&bytes(x))
        .and_then(|_| stdin.write_all(&bytes(w)));
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let reason = err.lines().last().unwrap_or("failed").to_string();
        return Err(format!("{python}: {reason}"));
    }
    written.map_err(|e| e.to_string())?;
    let report: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or("no JSON from the BLAS script")?;
    match (report["ms"].as_f64(), report["library"].as_str()) {
        (Some(ms), Some(library)) if ms > 0.0 => Ok((ms, library.to_string())),
        _ => Err(format!("unexpected BLAS report {report}")),
    }
}

fn plain_int8_ms(shape: LayerShape, x: &[i8], w: &[i8], runs: usize) -> f64 {
    let d_in = shape.d_in;
    time_median(runs, || {
        w.par_chunks(d_in * 64)
            .map(|rows| {
                let mut acc = 0i64;
                for row in rows.chunks_exact(d_in) {
                    for xr in x.chunks_exact(d_in) {
                        acc += row
                            .iter()
                            .zip(xr)
                            .map(|(a, b)| *a as i32 * *b as i32)
                            .sum::<i32>() as i64;
                    }
                }
                acc
            })
            .sum::<i64>()
    })
    .0
}

fn fhe(args: FheArgs) -> Result<()> {
    if let Some(t) = args.threads {
        // Read by rayon's global pool and by candle's CPU kernels alike.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let threads = rayon::current_num_threads();
    let shape = parse_shape(&args.shape)?;
    let tokens = args.tokens;
    if tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    let t_b = args.tokens_per_poly.unwrap_or(if tokens == 1 {
        1
    } else {
        tokens.next_power_of_two().min(8)
    });
    let preference =
        Preference::parse(&args.preference).context("--preference must be latency or bandwidth")?;
    let (measured, calibration) = planner_for(&args.planner_costs)?;
    let planner = Planner {
        max_t_b: t_b,
        activation_bits: args.activation_bits,
        ..measured
    };
    let encodings: &[ResultEncoding] = match args.results.as_str() {
        "keyless" => &[ResultEncoding::Keyless],
        "packed" => &[ResultEncoding::Packed],
        "auto" => &[ResultEncoding::Keyless, ResultEncoding::Packed],
        other => bail!("--results must be keyless, packed or auto, not {other}"),
    };
    anyhow::ensure!(
        fhe_linear::ACTIVATION_BITS.contains(&args.activation_bits),
        "--activation-bits must be 8 to 16"
    );
    let mut spec = match (args.n_i, encodings) {
        (Some(n_i), [encoding]) => {
            let params = match encoding {
                ResultEncoding::Keyless => &HFHE_GLWE_2048_V1,
                ResultEncoding::Packed => &HFHE_GLWE_4096_V1,
            };
            let n = params.polynomial_size;
            let layout = BlockLayout {
                n_i,
                n_o: n / (n_i * t_b).min(n),
                t_b,
            };
            LayerSpec::with_encoding_and_width(
                params,
                shape,
                layout,
                *encoding,
                args.activation_bits,
            )?
        }
        (Some(_), _) => bail!("--n-i needs --results keyless or packed"),
        (None, [ResultEncoding::Keyless]) => {
            LayerSpec::choose_for(&HFHE_GLWE_2048_V1, shape, t_b, args.activation_bits)?
        }
        // The packed layout a worker on this machine offers.
        (None, [ResultEncoding::Packed]) => {
            planner.offer(shape, tokens, ResultEncoding::Packed)?.spec
        }
        (None, _) => planner.plan(shape, tokens, preference, encodings)?.spec,
    };
    if let Some(d) = &args.decomposition {
        let mut params = *spec.params;
        let packing = params
            .packing
            .as_mut()
            .context("--decomposition needs packed results")?;
        (packing.base_log, packing.levels) = (d[0], d[1]);
        let params: &'static ParameterSet = Box::leak(Box::new(params));
        spec = LayerSpec::with_encoding_and_width(
            params,
            shape,
            spec.layout,
            spec.encoding,
            spec.activation_bits,
        )?;
    }
    let params = spec.params;
    let packed = spec.encoding == ResultEncoding::Packed;
    let runs = args.runs;

    let (w, x, bias, expected) = synthetic_layer(shape, tokens, spec.activation_bits);

    let t = Instant::now();
    let key = ClientKey::generate(params);
    let packing_key = packed.then(|| PackingKey::generate(&key)).transpose()?;
    let keygen_ms = t.elapsed().as_secs_f64() * 1e3;
    let key_upload_bytes = packing_key.as_ref().map_or(0, |k| k.to_bytes().len());
    let t = Instant::now();
    let prepared = packing_key.as_ref().map(PreparedPackingKey::prepare);
    let key_prepare_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let layer = CompiledLayer::compile(spec, &w, &bias)?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;

    let limits = Limits::default();
    let (encrypt_ms, upload) = time_median(runs, || {
        key.encrypt(&spec, &x, tokens).map(|b| b.to_bytes())
    });
    let upload = upload?;
    let mut splits = Vec::new();
    let (server_ms, download) = time_median(runs, || -> Result<Vec<u8>> {
        let (bytes, product_ms, pack_ms) = layer.answer(&upload, &limits, prepared.as_ref())?;
        splits.push((product_ms, pack_ms));
        Ok(bytes)
    });
    let download = download?;
    let median = |f: fn(&(f64, f64)) -> f64| -> f64 {
        let mut v: Vec<f64> = splits.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (product_ms, pack_ms) = if packed {
        (median(|s| s.0), median(|s| s.1))
    } else {
        (server_ms, 0.0)
    };
    let (decrypt_ms, decrypted) = time_median(runs, || -> Result<(Vec<i64>, Vec<i64>)> {
        let result = EncryptedResult::from_bytes(&download, &limits)?;
        Ok(key.decrypt_with_noise(&spec, &result)?)
    });
    let (values, noise) = decrypted?;
    let exact = values == expected;
    let max_noise = noise.iter().map(|e| e.unsigned_abs()).max().unwrap_or(0) as f64;
    let model = spec.noise_budget();
    let estimate = planner.cost_of(spec, tokens);

    // The plain baselines multiply 8-bit activations (the top byte of wider ones).
    let x: Vec<i8> = x
        .iter()
        .map(|v| (*v >> (spec.activation_bits - 8)) as i8)
        .collect();
    let candle_f32 = plain_f32_ms(shape, tokens, &x, &w, runs.max(5))?;
    let blas = blas_f32_ms(shape, tokens, &x, &w, runs.max(5), threads);
    // The ratios use the fastest plain product this machine has.
    let (plain_f32, plain_f32_source) = match &blas {
        Ok((ms, _)) if *ms < candle_f32 => (*ms, "blas"),
        _ => (candle_f32, "candle"),
    };
    let plain_int8 = plain_int8_ms(shape, &x, &w, runs.max(5));

    let mut report = json!({
        "bench": "fhe",
        "shape": format!("{}x{}", shape.d_in, shape.d_out),
        "d_in": shape.d_in,
        "d_out": shape.d_out,
        "tokens": tokens,
        "parameter_set": params.name,
        "layout": { "n_i": spec.layout.n_i, "n_o": spec.layout.n_o, "t_b": spec.layout.t_b },
        "activation_bits": spec.activation_bits,
        "input_bits": spec.input_bits,
        "output_bits": spec.output_bits,
        "results": spec.encoding.as_str(),
        "server_ms": server_ms,
        "product_ms": product_ms,
        "pack_ms": pack_ms,
        "keyswitches": estimate.cost.keyswitches,
        "model_server_ms_one_core": estimate.server_ms,
        "model_input_coefficients": estimate.cost.input_coefficients,
        "model_macs": estimate.cost.macs,
        "server_ms_per_token": server_ms / tokens as f64,
        "encrypt_ms": encrypt_ms,
        "decrypt_ms": decrypt_ms,
        "upload_bytes": upload.len(),
        "download_bytes": download.len(),
        "bytes_per_token": (upload.len() + download.len()) as f64 / tokens as f64,
        "key_upload_bytes": key_upload_bytes,
        "keygen_ms": keygen_ms,
        "key_prepare_ms": key_prepare_ms,
        "key_memory_bytes": prepared.as_ref().map_or(0, |k| k.memory_bytes()),
        "packing": params.packing.map(|p| json!({"base_log": p.base_log, "levels": p.levels, "key_body_bits": p.key_body_bits, "max_depth": p.max_depth})),
        "compile_ms": compile_ms,
        "weight_memory_bytes": layer.weight_memory_bytes(),
        "exact": exact,
        "max_noise_log2": max_noise.max(1.0).log2(),
        "decode_threshold_log2": model.half_delta.log2(),
        "model_margin_bits": model.margin_bits(),
        "model_noise_std_log2": model.worst_case_std.log2(),
        "threads": threads,
        "plain_f32_ms": plain_f32,
        "plain_int8_ms": plain_int8,
        "server_over_f32": server_ms / plain_f32,
        "runs": runs,
    });
    // The two plain products behind `plain_f32_ms` (the faster of them).
    let baselines = json!({
        "planner": calibration,
        "unit_costs": unit_costs(&planner),
        "machine": machine(),
        "plain_f32_source": plain_f32_source,
        "candle_f32_ms": candle_f32,
        "blas_f32_ms": blas.as_ref().ok().map(|b| b.0),
        "blas_library": blas.as_ref().map(|b| b.1.clone()).unwrap_or_else(|e| format!("none: {e}")),
    });
    if let (Some(r), serde_json::Value::Object(b)) = (report.as_object_mut(), baselines) {
        r.extend(b);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "encrypted linear layer {} x {} tokens ({threads} threads)",
            args.shape, tokens
        );
        for (k, v) in report.as_object().expect("object") {
            println!("  {k:<24} {v}");
        }
    }
    if !exact {
        bail!("decrypted results differ from the integer reference");
    }
    Ok(())
}
