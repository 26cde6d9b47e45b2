//! Reading a model, whatever the user names: `tiny` and `tiny-llama` (built in, offline),
//! `smollm2` (fetched once, see [`crate::fetch`]), a GGUF file of the llama architecture, or a
//! Hugging Face directory (`config.json` naming a supported architecture, `*.safetensors`,
//! `tokenizer.json`, optionally `tokenizer_config.json` with the chat template).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::ModelError;

/// A model's configuration, tensors (f32, Hugging Face names) and what comes with them.
pub struct Checkpoint {
    /// The model's own name, when it has one (GGUF `general.name`, a directory's
    /// `_name_or_path`): a bundle's default model name.
    pub name: Option<String>,
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Option<Tokenizer>,
    pub eos_token: Option<u32>,
    /// The chat template (Jinja), when the model has one.
    pub chat_template: Option<String>,
    /// The GGUF file the tensors were read from: a client bundle copies its local tensors from
    /// it in their own quantization.
    pub gguf: Option<PathBuf>,
}

fn source_err(model: &str, why: impl std::fmt::Display) -> ModelError {
    ModelError::Source(model.to_string(), why.to_string())
}

/// `text` as a valid model name: ASCII letters, digits, `.`, `_` and `-` (others become `-`),
/// lower case, at most 64 characters; `None` when nothing is left.
pub fn name_from(text: &str) -> Option<String> {
    let mut out = String::new();
    for c in text.trim().chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(64).collect();
    let out = out.trim_matches('-').to_string();
    (!out.is_empty() && out.chars().any(|c| c.is_ascii_alphanumeric())).then_some(out)
}

impl Checkpoint {
    /// A checkpoint from a configuration and tensors alone.
    pub fn new(config: impl Into<ModelConfig>, tensors: HashMap<String, Tensor>) -> Self {
        Checkpoint {
            name: None,
            config: config.into(),
            tensors,
            tokenizer: None,
            eos_token: None,
            chat_template: None,
            gguf: None,
        }
    }

    pub fn with_tokenizer(mut self, tokenizer: Tokenizer) -> Self {
        self.tokenizer = Some(tokenizer);
        self
    }

    pub fn with_name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// The model a user names on the command line; see the module docs.
    pub fn open(model: &str) -> Result<Self, ModelError> {
        match model {
            "tiny" => return crate::tiny::tiny_checkpoint(),
            "tiny-llama" => return crate::tiny::tiny_llama_checkpoint(),
            "smollm2" => return Self::from_gguf(&crate::fetch::smollm2()?),
            _ => {}
        }
        let path = Path::new(model);
        if path.is_dir() {
            Self::from_dir(path)
        } else if path.is_file() {
            Self::from_gguf(path)
        } else {
            Err(source_err(
                model,
                "neither `tiny`, `tiny-llama`, `smollm2`, a GGUF file nor a Hugging Face \
                 model directory (config.json, *.safetensors, tokenizer.json)",
            ))
        }
    }

    /// A Llama-architecture GGUF file.
    pub fn from_gguf(path: &Path) -> Result<Self, ModelError> {
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
        if read.is_err() || &magic != b"GGUF" {
            return Err(source_err(
                &path.display().to_string(),
                "not a GGUF file (and not a directory)",
            ));
        }
        let m = crate::gguf::load_gguf(path)?;
        Ok(Checkpoint {
            name: m.name.as_deref().and_then(name_from),
            config: ModelConfig::Llama(m.config),
            tensors: m.tensors,
            tokenizer: Some(m.tokenizer),
            eos_token: m.eos_token,
            chat_template: m.chat_template,
            gguf: Some(path.to_path_buf()),
        })
    }

    /// A Hugging Face model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let what = dir.display().to_string();
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| source_err(&what, format!("{name}: {e}")))
        };
        let config_bytes = read("config.json")?;
        let config = ModelConfig::from_json(&config_bytes)?;
        let raw: serde_json::Value =
            serde_json::from_slice(&config_bytes).unwrap_or(serde_json::Value::Null);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| source_err(&what, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(source_err(&what, "no *.safetensors file"));
        }
        let mut tensors = HashMap::new();
        for f in files {
            tensors.extend(crate::bundle::load_safetensors(&f)?);
        }
        let tok = dir.join("tokenizer.json");
        let tokenizer = if tok.exists() {
            Some(Tokenizer::from_file(&tok).map_err(|e| ModelError::Tokenizer(e.to_string()))?)
        } else {
            None
        };
        // tokenizer_config.json: the chat template and the end-of-sequence token.
        let tok_config: serde_json::Value = std::fs::read(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        let chat_template = match &tok_config["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            // A list of named templates: the default one.
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or(list.first())
                .and_then(|t| t["template"].as_str())
                .map(String::from),
            _ => None,
        };
        let eos_text = match &tok_config["eos_token"] {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(String::from),
        };
        let eos_token = match (&tokenizer, eos_text) {
            (Some(t), Some(s)) => t.token_to_id(&s),
            _ => None,
        }
        .or_else(|| raw["eos_token_id"].as_u64().map(|v| v as u32));
        let name = raw["_name_or_path"]
            .as_str()
            .and_then(|p| p.rsplit('/').find(|s| !s.is_empty()))
            .and_then(name_from);
        Ok(Checkpoint {
            name,
            config,
            tensors,
            tokenizer,
            eos_token,
            chat_template,
            gguf: None,
        })
    }

    /// The name a bundle of this model gets without `--name`: its own, else its architecture's.
    pub fn default_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.config.architecture().name().to_string())
    }

    /// The end-of-sequence token: the model's own, else the usual names in its vocabulary.
    pub fn eos(&self) -> Option<u32> {
        self.eos_token
            .or_else(|| self.tokenizer.as_ref().and_then(eos_in_vocabulary))
    }
}

/// The end-of-text token of a vocabulary, under the names phi, GPT-2 and ChatML models use.
pub fn eos_in_vocabulary(tokenizer: &Tokenizer) -> Option<u32> {
    ["<eos>", "<|endoftext|>", "<|im_end|>", "</s>"]
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_out_valid() {
        assert_eq!(
            name_from("SmolLM2 135M Instruct").as_deref(),
            Some("smollm2-135m-instruct")
        );
        assert_eq!(name_from("phi-1_5").as_deref(), Some("phi-1_5"));
        assert_eq!(name_from("  ./// ").as_deref(), None);
        assert_eq!(name_from("--").as_deref(), None);
    }

    #[test]
    fn unknown_sources_are_refused_clearly() {
        let err = Checkpoint::open("/no/such/model")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("smollm2") && err.contains("GGUF"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.bin");
        std::fs::write(&file, b"not a model").unwrap();
        let err = Checkpoint::open(file.to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
    }
}
