//! Hugging Face checkpoints of the Llama family read from a model directory: our Llama gives
//! candle-transformers' own Llama's logits (Hugging Face's rotary layout) and its Qwen2's (q, k
//! and v with biases), and a bundle of one architecture is not read as another.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hybrid_model::tiny::{random_llama_weights, tiny_llama_config, tiny_tokenizer};
use hybrid_model::*;

const PROMPT: [u32; 6] = [6, 60, 19, 40, 72, 3];

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.flatten_all().unwrap() - b.flatten_all().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Writes `config` and `tensors` as a Hugging Face model directory and reads it back.
fn through_a_directory(config: serde_json::Value, tensors: &HashMap<String, Tensor>) -> Checkpoint {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(tensors, dir.path().join("model.safetensors")).unwrap();
    tiny_tokenizer()
        .unwrap()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    Checkpoint::open(dir.path().to_str().unwrap()).unwrap()
}

#[test]
fn a_llama_directory_matches_candle_transformers_llama() {
    let cfg = tiny_llama_config();
    let tensors = random_llama_weights(&cfg, 3).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&ModelConfig::Llama(cfg.clone()).to_json().unwrap()).unwrap();
    json["_name_or_path"] = "HuggingFaceTB/SmolLM2-Tiny".into();
    let src = through_a_directory(json.clone(), &tensors);
    assert_eq!(src.config, ModelConfig::Llama(cfg.clone()));
    assert_eq!(src.default_name(), "smollm2-tiny");
    let mut ours = build(&src.config, &src.tensors, &[], Mode::Disable, 8).unwrap();

    let theirs_cfg: candle_transformers::models::llama::LlamaConfig =
        serde_json::from_value(json).unwrap();
    let theirs_cfg = theirs_cfg.into_config(false);
    let device = Device::Cpu;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
    let theirs = candle_transformers::models::llama::Llama::load(vb, &theirs_cfg).unwrap();
    let mut cache =
        candle_transformers::models::llama::Cache::new(true, DType::F32, &theirs_cfg, &device)
            .unwrap();
    let input = Tensor::new(&PROMPT[..], &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want = theirs.forward(&input, 0, &mut cache).unwrap();
    let got = ours.forward(&PROMPT).unwrap();
    assert!(
        max_diff(&want, &got) < 1e-4,
        "prefill differs by {}",
        max_diff(&want, &got)
    );
    let step = Tensor::new(&[7u32], &device).unwrap().unsqueeze(0).unwrap();
    let want = theirs.forward(&step, PROMPT.len(), &mut cache).unwrap();
    let got = ours.forward(&[7]).unwrap();
    assert!(
        max_diff(&want, &got) < 1e-4,
        "decode differs by {}",
        max_diff(&want, &got)
    );
}

#[test]
fn a_qwen2_directory_with_qkv_biases_matches_candle_transformers_qwen2() {
    let mut cfg = tiny_llama_config();
    cfg.tie_word_embeddings = false;
    let mut tensors = random_llama_weights(&cfg, 4).unwrap();
    let device = Device::Cpu;
    for i in 0..cfg.num_hidden_layers {
        for (proj, width) in [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)] {
            let bias: Vec<f32> = (0..width)
                .map(|j| ((i * 7 + j) as f32 * 0.37).sin() * 0.2)
                .collect();
            tensors.insert(
                format!("model.layers.{i}.self_attn.{proj}.bias"),
                Tensor::from_vec(bias, width, &device).unwrap(),
            );
        }
    }
    let json = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads(),
        "max_position_embeddings": cfg.max_position_embeddings,
        "sliding_window": 4096,
        "max_window_layers": 2,
        "tie_word_embeddings": false,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": false,
        "hidden_act": "silu",
    });
    let src = through_a_directory(json.clone(), &tensors);
    assert_eq!(src.config.architecture(), Architecture::Llama);
    let mut ours = build(&src.config, &src.tensors, &[], Mode::Disable, 8).unwrap();
    let theirs_cfg: candle_transformers::models::qwen2::Config =
        serde_json::from_value(json).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
    let mut theirs =
        candle_transformers::models::qwen2::ModelForCausalLM::new(&theirs_cfg, vb).unwrap();
    let input = Tensor::new(&PROMPT[..], &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want = theirs.forward(&input, 0).unwrap();
    let got = ours.forward(&PROMPT).unwrap();
    assert!(
        max_diff(&want, &got) < 1e-4,
        "prefill differs by {}",
        max_diff(&want, &got)
    );

    // The biases of protected projections go with the server's layer (or the client's
    // dequantization): simulate and execute agree, and stay close to the float model.
    let protect = vec!["model.layers.0.self_attn.*".to_string()];
    let mut simulate = build(&src.config, &src.tensors, &protect, Mode::Simulate, 8).unwrap();
    let mut execute = build(&src.config, &src.tensors, &protect, Mode::Execute, 8).unwrap();
    let s = simulate.forward(&PROMPT).unwrap();
    assert_eq!(
        s.to_vec1::<f32>().unwrap(),
        execute.forward(&PROMPT).unwrap().to_vec1::<f32>().unwrap()
    );
    assert!(
        max_diff(&s, &got) < 0.5,
        "8-bit differs by {}",
        max_diff(&s, &got)
    );
}

#[test]
fn a_bundle_of_one_architecture_is_not_read_as_another() {
    let dir = tempfile::tempdir().unwrap();
    let (client, server) = (
        dir.path().join("client"),
        dir.path().join("server.safetensors"),
    );
    let options = compile::CompileOptions {
        model_name: "tiny-llama".into(),
        protect: vec!["blk.0.attn_*".into()],
        n_bits: 8,
        calibration: vec![],
        activations: compile::Activations::Dynamic,
        group_inputs: true,
        outlier_columns: hybrid_model::compile::DEFAULT_OUTLIER_COLUMNS,
        weight_rounding: hybrid_model::compile::WeightRounding::Compensated,
        activation_width: hybrid_model::compile::ActivationWidth::Weights,
    };
    let manifest = compile::compile(
        &tiny::tiny_llama_checkpoint().unwrap(),
        &options,
        &client,
        &server,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(manifest.architecture, "llama");
    assert_eq!(manifest.groups.len(), 1);
    assert_eq!(
        manifest.groups[0].layers,
        vec!["blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v"]
    );
    assert!(bundle::load_client_bundle(&client).is_ok());
    // config.json replaced by a phi configuration.
    std::fs::write(
        client.join("config.json"),
        ModelConfig::Phi(tiny::tiny_config()).to_json().unwrap(),
    )
    .unwrap();
    let err = bundle::load_client_bundle(&client)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("phi model") && err.contains("llama model"),
        "{err}"
    );
}
