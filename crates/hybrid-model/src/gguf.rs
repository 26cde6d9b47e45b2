//! GGUF files (llama.cpp's format) of Llama-architecture models: configuration, tensors under
//! Hugging Face names, the tokenizer its metadata describes, and its chat template.
//!
//! Tensors are dequantized to f32 for the model (the float model is the reference; protected
//! layers are then quantized by `quant`, as for every architecture). A client bundle of a GGUF
//! model is itself a GGUF file ([`write_without`]): the local tensors are copied in their own
//! quantization, so the customer's download stays the size of the model it came from.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::config::LlamaConfig;
use crate::names::{Module, LLAMA_PROJECTIONS};
use crate::ModelError;

/// The GGUF architectures read (`general.architecture`).
pub const SUPPORTED_GGUF_ARCHITECTURES: &[&str] = &["llama"];

/// A model read from a GGUF file.
pub struct GgufModel {
    pub config: LlamaConfig,
    /// f32 tensors under Hugging Face names.
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    pub eos_token: Option<u32>,
    /// `tokenizer.chat_template` (Jinja), when the file has one.
    pub chat_template: Option<String>,
    /// `general.name`, when the file has one.
    pub name: Option<String>,
}

fn gguf_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Gguf(e.to_string())
}

/// The Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` ->
/// `model.layers.3.self_attn.q_proj.weight`); `None` for tensors the model does not use.
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (block, rest) = rest.split_once('.')?;
    let i: usize = block.parse().ok()?;
    let (leaf, kind) = rest.rsplit_once('.')?;
    if !matches!(kind, "weight" | "bias") {
        return None;
    }
    let prefix = match leaf {
        "attn_norm" => format!("model.layers.{i}.input_layernorm"),
        "ffn_norm" => format!("model.layers.{i}.post_attention_layernorm"),
        _ => {
            let (p, _) = LLAMA_PROJECTIONS.iter().find(|(_, g)| *g == leaf)?;
            Module::Block(i, *p).hf_name()
        }
    };
    Some(format!("{prefix}.{kind}"))
}

fn open(path: &Path) -> Result<(std::fs::File, gguf_file::Content), ModelError> {
    let mut file =
        std::fs::File::open(path).map_err(|e| gguf_err(format!("{}: {e}", path.display())))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| gguf_err(format!("{}: not a readable GGUF file: {e}", path.display())))?;
    Ok((file, content))
}

/// Every tensor the model uses, dequantized to f32, under Hugging Face names.
fn read_tensors<R: std::io::Read + std::io::Seek>(
    file: &mut R,
    content: &gguf_file::Content,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let device = Device::Cpu;
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gguf in names {
        let Some(hf) = hf_tensor_name(gguf) else {
            continue;
        };
        let t = content
            .tensor(file, gguf, &device)
            .and_then(|q| q.dequantize(&device))
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| gguf_err(format!("tensor {gguf}: {e}")))?;
        tensors.insert(hf, t);
    }
    Ok(tensors)
}

/// The tensors of a GGUF file's bytes (f32, Hugging Face names): what a client bundle's
/// `model.gguf` holds.
pub fn tensors_from_bytes(bytes: &[u8]) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut reader = std::io::Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| gguf_err(format!("not a readable GGUF file: {e}")))?;
    read_tensors(&mut reader, &content)
}

/// Reads a Llama GGUF file: configuration, every tensor dequantized to f32, tokenizer.
pub fn load_gguf(path: &Path) -> Result<GgufModel, ModelError> {
    let (mut file, content) = open(path)?;
    let md = |k: &str| {
        content
            .metadata
            .get(k)
            .ok_or_else(|| gguf_err(format!("no metadata `{k}`")))
    };
    let arch = md("general.architecture")?
        .to_string()
        .map_err(gguf_err)?
        .clone();
    if !SUPPORTED_GGUF_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(ModelError::UnsupportedArchitecture(format!(
            "GGUF architecture `{arch}`"
        )));
    }
    let u = |k: &str| -> Result<usize, ModelError> {
        Ok(md(&format!("{arch}.{k}"))?.to_u32().map_err(gguf_err)? as usize)
    };
    let tokens: Vec<String> = md("tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(gguf_err)?
        .iter()
        .map(|v| v.to_string().cloned().map_err(gguf_err))
        .collect::<Result<_, _>>()?;
    let heads = u("attention.head_count")?;
    let tensors = read_tensors(&mut file, &content)?;
    let config = LlamaConfig {
        vocab_size: tokens.len(),
        hidden_size: u("embedding_length")?,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(u("attention.head_count_kv").unwrap_or(heads)),
        head_dim: None,
        rms_norm_eps: md(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
            .to_f32()
            .map_err(gguf_err)? as f64,
        rope_theta: md(&format!("{arch}.rope.freq_base"))
            .and_then(|v| v.to_f32().map_err(gguf_err))
            .unwrap_or(10_000.0),
        max_position_embeddings: u("context_length").unwrap_or(2048),
        tie_word_embeddings: !tensors.contains_key("lm_head.weight"),
        rope_interleaved: true,
    };
    let tokenizer = gguf_tokenizer(&content, tokens)?;
    let text = |k: &str| {
        content
            .metadata
            .get(k)
            .and_then(|v| v.to_string().ok())
            .cloned()
    };
    Ok(GgufModel {
        config,
        tensors,
        tokenizer,
        eos_token: content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok()),
        chat_template: text("tokenizer.chat_template"),
        // `smollm2` + `135M`: the base name and size; `general.name` often carries training
        // details (SmolLM2's: "Smollm2 135M 8k Lc100K Mix1 Ep2").
        name: match (text("general.basename"), text("general.size_label")) {
            (Some(base), Some(size)) => Some(format!("{base}-{size}")),
            (Some(base), None) => Some(base),
            _ => text("general.name"),
        },
    })
}

/// Copies the GGUF file `src` to `dst` without the tensors whose Hugging Face names are in
/// `removed`: metadata as it is, every other tensor in its own quantization.
pub fn write_without(src: &Path, dst: &Path, removed: &[String]) -> Result<(), ModelError> {
    let (mut file, content) = open(src)?;
    let device = Device::Cpu;
    let mut names: Vec<&String> = content
        .tensor_infos
        .keys()
        .filter(|g| hf_tensor_name(g).is_none_or(|hf| !removed.contains(&hf)))
        .collect();
    names.sort();
    let tensors = names
        .iter()
        .map(|g| {
            content
                .tensor(&mut file, g, &device)
                .map(|t| (g.as_str(), t))
                .map_err(|e| gguf_err(format!("tensor {g}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    let metadata: Vec<(&str, &gguf_file::Value)> = keys
        .iter()
        .map(|k| (k.as_str(), &content.metadata[*k]))
        .collect();
    let tensor_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(dst).map_err(|e| gguf_err(format!("{}: {e}", dst.display())))?,
    );
    gguf_file::write(&mut out, &metadata, &tensor_refs).map_err(gguf_err)?;
    std::io::Write::flush(&mut out).map_err(|e| gguf_err(format!("{}: {e}", dst.display())))?;
    Ok(())
}

/// The byte-level BPE tokenizer a GGUF file describes (`tokenizer.ggml.model = gpt2`): vocabulary,
/// merges, and its control tokens as special tokens.
fn gguf_tokenizer(
    content: &gguf_file::Content,
    tokens: Vec<String>,
) -> Result<Tokenizer, ModelError> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, PreTokenizerWrapper};
    let md = |k: &str| content.metadata.get(k);
    let model = md("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(gguf_err(format!(
            "tokenizer model `{model}` (byte-level BPE, `gpt2`, expected)"
        )));
    }
    let merges: Vec<(String, String)> = md("tokenizer.ggml.merges")
        .ok_or_else(|| gguf_err("no tokenizer.ggml.merges"))?
        .to_vec()
        .map_err(gguf_err)?
        .iter()
        .filter_map(|v| v.to_string().ok())
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // Control tokens (type 3) such as <|im_start|> are matched whole, never split.
    if let Some(types) = md("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| t.to_i32().ok() == Some(3))
            .map(|(_, tok)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    fn write_gguf(path: &Path, arch: &str, tensors: &[(&str, &QTensor)]) {
        let arch = gguf_file::Value::String(arch.into());
        let mut out = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut out, &[("general.architecture", &arch)], tensors).unwrap();
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_tensor_name("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_tensor_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_tensor_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn other_architectures_and_broken_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpt2.gguf");
        write_gguf(&path, "gpt2", &[]);
        let err = load_gguf(&path).err().unwrap().to_string();
        assert!(err.contains("`gpt2`") && err.contains("supported"), "{err}");
        let broken = dir.path().join("broken.gguf");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
        assert!(load_gguf(&broken).is_err());
    }

    #[test]
    fn copies_keep_their_quantization_and_drop_the_removed_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::Cpu;
        let t = |seed: f64| {
            let values: Vec<f32> = (0..64 * 32)
                .map(|i| ((i as f64 * seed).sin()) as f32)
                .collect();
            QTensor::quantize(
                &Tensor::from_vec(values, (32, 64), &device).unwrap(),
                GgmlDType::Q8_0,
            )
            .unwrap()
        };
        let (q, down) = (t(0.1), t(0.2));
        let src = dir.path().join("src.gguf");
        write_gguf(
            &src,
            "llama",
            &[
                ("blk.0.attn_q.weight", &q),
                ("blk.0.ffn_down.weight", &down),
            ],
        );
        let dst = dir.path().join("dst.gguf");
        write_without(
            &src,
            &dst,
            &["model.layers.0.self_attn.q_proj.weight".into()],
        )
        .unwrap();
        let (_, content) = open(&dst).unwrap();
        let names: Vec<&String> = content.tensor_infos.keys().collect();
        assert_eq!(names, vec!["blk.0.ffn_down.weight"]);
        assert_eq!(
            content.tensor_infos["blk.0.ffn_down.weight"].ggml_dtype,
            GgmlDType::Q8_0
        );
        let tensors = tensors_from_bytes(&std::fs::read(&dst).unwrap()).unwrap();
        let want = down
            .dequantize(&device)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = tensors["model.layers.0.mlp.down_proj.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want);
    }
}
