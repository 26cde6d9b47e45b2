//! A real model, SmolLM2-135M-Instruct (Llama architecture, from its GGUF file): our Llama gives
//! candle's own GGUF Llama's logits, its tokenizer round-trips text, protected layers computed
//! under encryption equal the integer simulation, and simulated generation stays coherent with
//! the float model. Skipped, with the reason printed, when the file cannot be fetched.

use hybrid_model::compile::{calibrate, smoothing_factors};
use hybrid_model::gguf::{load_gguf, GgufModel};
use hybrid_model::{build, build_with, generate, names, CausalLm, GenerateOptions, Mode, Model};

fn checkpoint() -> Option<GgufModel> {
    match test_support::smollm2_gguf() {
        Ok(path) => Some(load_gguf(&path).unwrap()),
        Err(reason) => {
            eprintln!("SKIPPED: SmolLM2 is not available here: {reason}");
            None
        }
    }
}

fn encode(c: &GgufModel, text: &str) -> Vec<u32> {
    c.tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

#[test]
fn llama_matches_candle_and_the_tokenizer_round_trips() {
    let Some(c) = checkpoint() else { return };
    assert_eq!(
        (
            c.config.hidden_size,
            c.config.num_hidden_layers,
            c.config.vocab_size
        ),
        (576, 30, 49152)
    );
    let text = "The capital of France is Paris. 12 + 30 = 42!";
    let ids = encode(&c, text);
    assert_eq!(c.tokenizer.decode(&ids, false).unwrap(), text);
    let chat = encode(&c, "<|im_start|>user");
    assert_eq!(chat.len(), 2, "control tokens stay whole: {chat:?}");

    // candle's GGUF Llama, with every weight dequantized to f32 like ours.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = test_support::smollm2_gguf().unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let device = candle_core::Device::Cpu;
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content, &mut file, &device,
    )
    .unwrap();
    let config = c.config.clone().into();
    let mut ours = build(&config, &c.tensors, &[], Mode::Disable, 8).unwrap();
    let input = candle_core::Tensor::new(ids.as_slice(), &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want = reference.forward(&input, 0).unwrap().flatten_all().unwrap();
    let got = ours.forward(&ids).unwrap();
    let diff = (want.clone() - got).unwrap().abs().unwrap().max(0).unwrap();
    let diff: f32 = diff.to_scalar().unwrap();
    assert!(diff < 1e-2, "prefill logits differ by {diff}");
    // One decode step through the KV cache.
    let next = want.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    let step = candle_core::Tensor::new(&[next], &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want = reference
        .forward(&step, ids.len())
        .unwrap()
        .flatten_all()
        .unwrap();
    let got = ours.forward(&[next]).unwrap();
    let diff: f32 = (want - got)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-2, "decode logits differ by {diff}");
}

#[test]
fn encrypted_layers_equal_the_simulation_and_generation_stays_coherent() {
    let Some(c) = checkpoint() else { return };
    let prompt = encode(&c, "The three primary colors are");
    let options = GenerateOptions {
        max_tokens: 4,
        ..GenerateOptions::default()
    };
    // Bit-exact: one attention projection under real encryption vs in clear integers.
    let protect = vec![
        "blk.0.attn_q".to_string(),
        "model.layers.3.mlp.down_proj".into(),
    ];
    let config = c.config.clone().into();
    let mut simulate = build(&config, &c.tensors, &protect, Mode::Simulate, 8).unwrap();
    let mut execute = build(&config, &c.tensors, &protect, Mode::Execute, 8).unwrap();
    let a = simulate.forward_all(&prompt).unwrap();
    let b = execute.forward_all(&prompt).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(
        generate(&mut simulate, &prompt, &options, |_| {}).unwrap(),
        generate(&mut execute, &prompt, &options, |_| {}).unwrap()
    );

    // Every attention projection protected at 8 bits: the first greedy tokens are the float
    // model's (stored below), and under teacher forcing nearly every prediction agrees.
    let mut float = build(&config, &c.tensors, &[], Mode::Disable, 8).unwrap();
    let attention = vec!["model.layers.*.self_attn.*".to_string()];
    // Activation outliers are smoothed with channel statistics of a few calibration texts.
    let calibration: Vec<Vec<u32>> = [
        "In 1969, astronauts landed on the Moon for the first time.",
        "fn main() { println!(\"{}\", 1 + 2); }",
        "Customers can return any product within 30 days for a full refund.",
    ]
    .iter()
    .map(|t| encode(&c, t))
    .collect();
    let layers = names::resolve(&attention, config.naming(), config.num_hidden_layers()).unwrap();
    let channel_max = calibrate(&config, &c.tensors, &layers, &calibration).unwrap();
    let factors = smoothing_factors(&channel_max, &layers, 0.5);
    let mut protected = build_with(
        &config,
        &c.tensors,
        &attention,
        Mode::Simulate,
        8,
        &hybrid_model::vendor::InputEncoding {
            input_scales: Some(factors),
            ..Default::default()
        },
    )
    .unwrap();
    let options = GenerateOptions {
        max_tokens: 12,
        ..GenerateOptions::default()
    };
    let want = generate(&mut float, &prompt, &options, |_| {}).unwrap();
    let text = c.tokenizer.decode(&want, true).unwrap();
    assert_eq!(
        text, EXPECTED_FLOAT_CONTINUATION,
        "the float model's continuation"
    );
    let got = generate(&mut protected, &prompt, &options, |_| {}).unwrap();
    // Greedy decoding diverges at the first near-tie; the first tokens must agree.
    assert_eq!(
        got[..3],
        want[..3],
        "{}",
        c.tokenizer.decode(&got, true).unwrap()
    );
    let mut forced = prompt.clone();
    forced.extend(&want);
    let predictions = |m: &mut Model| {
        m.teacher_forced(&forced)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
    };
    let (fl, pr) = (predictions(&mut float), predictions(&mut protected));
    let same = fl.iter().zip(&pr).filter(|(a, b)| a == b).count();
    eprintln!(
        "teacher forcing: {same} of {} next-token predictions agree",
        fl.len()
    );
    assert!(
        same * 100 >= fl.len() * 90,
        "{same} of {} predictions agree",
        fl.len()
    );
}

const EXPECTED_FLOAT_CONTINUATION: &str = " the primary colors of the RGB color model: red, blue";
