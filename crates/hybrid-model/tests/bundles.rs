//! Client and server bundles: written by the compile step, protected tensors absent from the
//! client's, the model rebuilt from them computes the same, tampering and mismatches refused.

use std::path::{Path, PathBuf};

use hybrid_model::bundle::{
    load_client_bundle, load_server_bundle, CLIENT_WEIGHTS_FILE, MANIFEST_FILE,
};
use hybrid_model::compile::{compile, CompileOptions};
use hybrid_model::tiny::{tiny_config, tiny_weights};
use hybrid_model::*;

fn compile_tiny(dir: &Path, protect: &[&str]) -> (PathBuf, PathBuf) {
    let (client, server) = (dir.join("client"), dir.join("server.safetensors"));
    let calibration = vec![vec![6, 60, 19, 40], vec![7, 8, 9, 10, 11, 12]];
    let options = CompileOptions {
        model_name: "tiny".into(),
        protect: protect.iter().map(|s| s.to_string()).collect(),
        n_bits: 8,
        calibration,
        activations: hybrid_model::compile::Activations::Dynamic,
        group_inputs: true,
        outlier_columns: hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
        // What `build(.., Mode::Simulate, 8)` does in process, which the bundles must match.
        weight_rounding: hybrid_model::compile::WeightRounding::Nearest,
        activation_width: hybrid_model::compile::ActivationWidth::Weights,
    };
    let mut stages = Vec::new();
    let manifest = compile(
        &hybrid_model::tiny::tiny_checkpoint().unwrap(),
        &options,
        &client,
        &server,
        &mut |s, _, _| stages.push(s.to_string()),
    )
    .unwrap();
    assert!(stages.contains(&"quantize".to_string()) && stages.contains(&"calibrate".to_string()));
    let report = manifest.calibration.unwrap();
    assert_eq!(report.positions, 10);
    assert!(report.top1_agreement >= 0.8, "{report:?}");
    (client, server)
}

fn last_logits(model: &mut Model) -> Vec<f32> {
    model.clear_kv_cache();
    model
        .forward(&[6, 60, 19, 40, 72])
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn bundles_rebuild_the_same_model_without_the_protected_weights() {
    let dir = tempfile::tempdir().unwrap();
    let protect = ["layers.1.mixer.Wqkv", "lm_head"];
    let (client_dir, server_path) = compile_tiny(dir.path(), &protect);

    // The client's weights file holds no tensor of a protected layer.
    let bytes = std::fs::read(client_dir.join(CLIENT_WEIGHTS_FILE)).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for gone in ["q_proj", "k_proj", "v_proj"] {
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with(&format!("model.layers.0.self_attn.{gone}"))),
            "{gone} leaked"
        );
    }
    assert!(!names.iter().any(|n| n.starts_with("lm_head")));
    assert!(names
        .iter()
        .any(|n| n.starts_with("model.layers.1.self_attn.q_proj")));

    let client = load_client_bundle(&client_dir).unwrap();
    let server = load_server_bundle(&server_path).unwrap();
    assert!(client.tokenizer.is_some());
    let mut from_bundles = build_from_bundles(&client, Some(&server), Mode::Simulate).unwrap();
    let protect: Vec<String> = protect.iter().map(|s| s.to_string()).collect();
    let mut in_process = build(
        &tiny_config().into(),
        &tiny_weights().unwrap(),
        &protect,
        Mode::Simulate,
        8,
    )
    .unwrap();
    assert_eq!(last_logits(&mut from_bundles), last_logits(&mut in_process));
    let mut encrypted = build_from_bundles(&client, Some(&server), Mode::Execute).unwrap();
    assert_eq!(last_logits(&mut encrypted), last_logits(&mut in_process));
    assert!(build_from_bundles(&client, None, Mode::Execute).is_err());
    assert!(build_from_bundles(&client, Some(&server), Mode::Disable).is_err());
}

#[test]
fn tampered_or_mismatched_bundles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (client_dir, server_path) = compile_tiny(&dir.path().join("a"), &["layers.1.mixer.Wqkv"]);
    let (_, other_server) = compile_tiny(&dir.path().join("b"), &["layers.2.mixer.Wqkv"]);
    let client = load_client_bundle(&client_dir).unwrap();

    let other = load_server_bundle(&other_server).unwrap();
    let err = build_from_bundles(&client, Some(&other), Mode::Simulate)
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not pair"), "{err}");

    // One weight changed in the server bundle.
    let mut bytes = std::fs::read(&server_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&server_path, &bytes).unwrap();
    let tampered = load_server_bundle(&server_path).unwrap();
    assert!(build_from_bundles(&client, Some(&tampered), Mode::Simulate).is_err());

    // Client weights changed.
    let weights = client_dir.join(CLIENT_WEIGHTS_FILE);
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    assert!(load_client_bundle(&client_dir)
        .err()
        .unwrap()
        .to_string()
        .contains("modified"));

    // A manifest from a future format.
    let manifest = client_dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 2");
    std::fs::write(&manifest, text).unwrap();
    assert!(load_client_bundle(&client_dir)
        .err()
        .unwrap()
        .to_string()
        .contains("format 2"));

    // Not a bundle at all.
    std::fs::write(&server_path, b"garbage").unwrap();
    assert!(load_server_bundle(&server_path).is_err());
}

#[test]
fn static_activations_fold_the_bias_into_the_server_and_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (client_dir, server_path) = (
        dir.path().join("client"),
        dir.path().join("server.safetensors"),
    );
    let options = CompileOptions {
        model_name: "tiny".into(),
        protect: vec![
            "layers.1.mixer.Wqkv".into(),
            "model.layers.1.mlp.fc2".into(),
        ],
        n_bits: 8,
        calibration: vec![vec![6, 60, 19, 40], vec![7, 8, 9, 10, 11, 12]],
        activations: hybrid_model::compile::Activations::Static,
        group_inputs: true,
        outlier_columns: hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
        weight_rounding: hybrid_model::compile::WeightRounding::Compensated,
        activation_width: hybrid_model::compile::ActivationWidth::Weights,
    };
    let manifest = compile(
        &hybrid_model::tiny::tiny_checkpoint().unwrap(),
        &options,
        &client_dir,
        &server_path,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert!(manifest.activation_quantization.contains("static"));
    for layer in &manifest.layers {
        assert!(layer.activation_scale.is_some_and(|s| s > 0.0));
        assert!(
            layer.bias.iter().all(|b| *b == 0.0),
            "the client must not learn the bias"
        );
    }
    let server = load_server_bundle(&server_path).unwrap();
    assert!(
        server.layers.iter().any(|l| l.bias.iter().any(|b| *b != 0)),
        "bias folded on the server"
    );
    assert_exact_and_close(&client_dir, &server_path, "static");

    // Auto measures both and records the one it did not keep.
    let auto = CompileOptions {
        activations: hybrid_model::compile::Activations::Auto,
        group_inputs: true,
        outlier_columns: hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
        weight_rounding: hybrid_model::compile::WeightRounding::Compensated,
        activation_width: hybrid_model::compile::ActivationWidth::Weights,
        ..options
    };
    let manifest = compile(
        &Checkpoint::new(tiny_config(), tiny_weights().unwrap()),
        &auto,
        &dir.path().join("c2"),
        &dir.path().join("s2"),
        &mut |_, _, _| {},
    )
    .unwrap();
    let (chosen, other) = (manifest.calibration.unwrap(), manifest.alternative.unwrap());
    assert_ne!(chosen.activations, other.activations);
    assert!(chosen.top1_agreement >= other.top1_agreement);
}

/// Smoothed activations: the client divides each input channel by a calibrated factor and the
/// server's weight columns carry it; encryption stays bit-exact with the simulation, and the
/// model stays close to the float one.
#[test]
fn smoothed_activations_are_exact_under_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let (client_dir, server_path, manifest) = compile_calibrated(
        dir.path(),
        hybrid_model::compile::Activations::Smoothed,
        hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
    );
    assert!(manifest.activation_quantization.contains("smoothed"));
    for layer in &manifest.layers {
        let factors = layer.input_scale.as_ref().expect("smoothing factors");
        assert_eq!(factors.len(), layer.d_in);
        assert!(factors.iter().all(|f| *f > 0.0));
    }
    assert_exact_and_close(&client_dir, &server_path, "smoothed");
}

/// Outlier channels over extra columns: the server's weights carry the repeated columns, the
/// client spreads each split channel's value over them; encryption stays bit-exact with the
/// simulation, and a manifest whose split does not fit its layer is refused.
#[test]
fn outlier_columns_are_exact_under_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let (client_dir, server_path, manifest) = compile_calibrated(
        dir.path(),
        hybrid_model::compile::Activations::SmoothedOutliers,
        0.25,
    );
    assert!(manifest.activation_quantization.contains("outlier"));
    let server = load_server_bundle(&server_path).unwrap();
    for layer in &manifest.layers {
        let split = layer.outliers.as_ref().expect("an outlier split");
        assert!(
            split.extra() >= 1 && split.extra() <= layer.d_in / 4,
            "{split:?}"
        );
        let served = server.layers.iter().find(|l| l.name == layer.name).unwrap();
        assert_eq!(served.weights.d_in, layer.product_width());
    }
    assert!(manifest.calibration.as_ref().unwrap().extra_columns > 0);
    assert_exact_and_close(&client_dir, &server_path, "outliers");

    // A split naming a channel the layer does not have is a corrupt bundle.
    let path = client_dir.join(MANIFEST_FILE);
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json["layers"][0]["outliers"]["channels"][0] = serde_json::json!(100_000);
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    let err = load_client_bundle(&client_dir).err().expect("refused");
    assert!(err.to_string().contains("outlier"), "{err}");
}

/// Wider activations: the client quantizes to the width, the server's spec carries it, the
/// manifest records it with the measurement of both widths, and encryption stays bit-exact
/// with the simulation.
#[test]
fn wider_activations_are_recorded_and_exact_under_encryption() {
    use hybrid_model::compile::{widest_activations, ActivationWidth};
    let dir = tempfile::tempdir().unwrap();
    let mut options =
        calibrated_options(hybrid_model::compile::Activations::SmoothedOutliers, 0.25);
    options.activation_width = ActivationWidth::Bits(12);
    let (client_dir, server_path, manifest) = compile_into(dir.path(), &options);
    let server = load_server_bundle(&server_path).unwrap();
    for layer in &manifest.layers {
        assert_eq!(layer.activation_bits(), 12, "{}", layer.name);
        let served = server.layers.iter().find(|l| l.name == layer.name).unwrap();
        assert_eq!(served.activation_bits, 12);
    }
    let (chosen, other) = (
        manifest.calibration.as_ref().unwrap(),
        manifest.alternative.as_ref().unwrap(),
    );
    assert_eq!(chosen.activation_bits, Some(12));
    assert_eq!(other.activation_bits, None);
    assert_exact_and_close(&client_dir, &server_path, "12-bit activations");

    // Auto: the widest width within the cost allowed, kept only when it measures better.
    options.activation_width = ActivationWidth::Auto;
    let (_, _, manifest) = compile_into(&dir.path().join("auto"), &options);
    let (chosen, other) = (
        manifest.calibration.as_ref().unwrap(),
        manifest.alternative.as_ref().unwrap(),
    );
    assert!(chosen.top1_agreement >= other.top1_agreement);
    let widened = [chosen, other]
        .into_iter()
        .find_map(|r| r.activation_bits)
        .expect("a wider measurement");
    for layer in &manifest.layers {
        assert!([8, widened].contains(&layer.activation_bits()));
    }
    // Without calibration prompts nothing measures better: auto keeps the weights' width.
    options.calibration = vec![];
    options.activations = hybrid_model::compile::Activations::Dynamic;
    let (_, _, manifest) = compile_into(&dir.path().join("unmeasured"), &options);
    assert!(manifest.layers.iter().all(|l| l.activation_bits() == 8));
    // The cost rule on real shapes: SmolLM2's q, k, v take wider activations almost for free,
    // phi-1.5's fused QKV has no budget to spare.
    use fhe_linear::LayerShape;
    assert!(widest_activations(LayerShape::new(576, 960)) >= 10);
    assert!(widest_activations(LayerShape::new(2048, 6144)) < 10);
}

/// Compiles the tiny model's Wqkv of block 1 and fc1 of block 2 (grouped) with `activations`
/// calibrated on two short prompts into `dir`: the client directory, the server bundle and
/// the client manifest.
fn compile_calibrated(
    dir: &Path,
    activations: hybrid_model::compile::Activations,
    outlier_columns: f32,
) -> (PathBuf, PathBuf, hybrid_model::bundle::ClientManifest) {
    compile_into(dir, &calibrated_options(activations, outlier_columns))
}

/// The options of [`compile_calibrated`].
fn calibrated_options(
    activations: hybrid_model::compile::Activations,
    outlier_columns: f32,
) -> CompileOptions {
    CompileOptions {
        model_name: "tiny".into(),
        protect: vec!["layers.1.mixer.Wqkv".into(), "layers.2.mlp.fc1".into()],
        n_bits: 8,
        calibration: vec![vec![6, 60, 19, 40], vec![7, 8, 9, 10, 11, 12]],
        activations,
        group_inputs: true,
        outlier_columns,
        weight_rounding: hybrid_model::compile::WeightRounding::Compensated,
        activation_width: hybrid_model::compile::ActivationWidth::Weights,
    }
}

/// Compiles the tiny model with `options` into `dir`: the client directory, the server bundle
/// and the client manifest.
fn compile_into(
    dir: &Path,
    options: &CompileOptions,
) -> (PathBuf, PathBuf, hybrid_model::bundle::ClientManifest) {
    let (client_dir, server_path) = (dir.join("client"), dir.join("server.safetensors"));
    let manifest = compile(
        &Checkpoint::new(tiny_config(), tiny_weights().unwrap()),
        options,
        &client_dir,
        &server_path,
        &mut |_, _, _| {},
    )
    .unwrap();
    (client_dir, server_path, manifest)
}

/// The bundles' encrypted run equals their simulation, which stays close to the float model.
fn assert_exact_and_close(client_dir: &std::path::Path, server_path: &std::path::Path, what: &str) {
    let client = load_client_bundle(client_dir).unwrap();
    let server = load_server_bundle(server_path).unwrap();
    let mut simulate = build_from_bundles(&client, Some(&server), Mode::Simulate).unwrap();
    let mut execute = build_from_bundles(&client, Some(&server), Mode::Execute).unwrap();
    assert_eq!(last_logits(&mut simulate), last_logits(&mut execute));
    let mut float = build(
        &tiny_config().into(),
        &tiny_weights().unwrap(),
        &[],
        Mode::Disable,
        8,
    )
    .unwrap();
    let diff = last_logits(&mut simulate)
        .iter()
        .zip(last_logits(&mut float))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 0.2, "{what} quantization moved logits by {diff}");
}

/// Error-compensating weight rounding (GPTQ on the calibration prompts' inputs): the same grid
/// as nearest rounding (the same step per row), other points on it, recorded in the manifest,
/// and exact under encryption like any other weights.
#[test]
fn compensated_weights_stay_on_the_grid_and_exact_under_encryption() {
    use hybrid_model::compile::{Activations, WeightRounding};
    let dir = tempfile::tempdir().unwrap();
    let base = calibrated_options(
        Activations::Dynamic,
        hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
    );
    let (client_dir, server_path, compensated) = compile_into(&dir.path().join("gptq"), &base);
    let (_, nearest_path, nearest) = compile_into(
        &dir.path().join("nearest"),
        &CompileOptions {
            weight_rounding: WeightRounding::Nearest,
            activation_width: hybrid_model::compile::ActivationWidth::Weights,
            ..base.clone()
        },
    );
    assert_eq!(compensated.weight_rounding, "compensated");
    assert_eq!(nearest.weight_rounding, "nearest");
    let (a, b) = (
        load_server_bundle(&server_path).unwrap(),
        load_server_bundle(&nearest_path).unwrap(),
    );
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.weights.scales, y.weights.scales, "the same grid");
    }
    assert!(
        a.layers
            .iter()
            .zip(&b.layers)
            .any(|(x, y)| x.weights.values != y.weights.values),
        "compensation moved some weights to another grid point"
    );
    assert_exact_and_close(&client_dir, &server_path, "compensated");
    // Without calibration prompts there is nothing to compensate for: nearest, and so recorded.
    let (_, _, uncalibrated) = compile_into(
        &dir.path().join("none"),
        &CompileOptions {
            calibration: vec![],
            ..base
        },
    );
    assert_eq!(uncalibrated.weight_rounding, "nearest");
}
