//! Model configurations, as found in a Hugging Face `config.json`, for the architectures the SDK
//! runs: phi (phi-1, phi-1.5, phi-2) and Llama (Llama, SmolLM, Mistral, Qwen2, whose q/k/v carry
//! biases). A configuration names its architecture the way Hugging Face does, in
//! `architectures`; a `config.json` without that key is a phi configuration (bundles written
//! before Llama support).

use candle_nn::Activation;
use serde::{Deserialize, Serialize};

use crate::names::{LlamaNames, Naming, PhiNames};
use crate::ModelError;

/// phi architecture hyper-parameters (Hugging Face `PhiConfig` field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhiConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub rope_theta: f32,
    pub partial_rotary_factor: f64,
    #[serde(default)]
    pub qk_layernorm: bool,
}

impl PhiConfig {
    /// microsoft/phi-1_5.
    pub fn phi_1_5() -> Self {
        PhiConfig {
            vocab_size: 51200,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_hidden_layers: 24,
            num_attention_heads: 32,
            hidden_act: Activation::NewGelu,
            max_position_embeddings: 2048,
            layer_norm_eps: 1e-5,
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            partial_rotary_factor: 0.5,
            qk_layernorm: false,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

fn default_rope_theta() -> f32 {
    10_000.0
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// Llama architecture hyper-parameters (Hugging Face `LlamaConfig` field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: heads of k and v (= `num_attention_heads` when absent).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head (`hidden_size / num_attention_heads` when absent).
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    /// The output projection is the embedding matrix (no `lm_head.weight`).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Rows of q and k in llama.cpp's order (GGUF files), for the interleaved rotary embedding;
    /// Hugging Face checkpoints rotate halves instead.
    #[serde(default)]
    pub rope_interleaved: bool,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
}

/// The architectures the SDK runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Phi,
    Llama,
}

/// Hugging Face `architectures` entries the SDK accepts, with the architecture each runs as.
pub const SUPPORTED_ARCHITECTURES: &[(&str, Architecture)] = &[
    ("PhiForCausalLM", Architecture::Phi),
    ("LlamaForCausalLM", Architecture::Llama),
    ("MistralForCausalLM", Architecture::Llama),
    ("Qwen2ForCausalLM", Architecture::Llama),
];

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Phi => "phi",
            Architecture::Llama => "llama",
        }
    }

    /// The naming of its protected layers (both namings users meet).
    pub fn naming(self) -> &'static dyn Naming {
        match self {
            Architecture::Phi => &PhiNames,
            Architecture::Llama => &LlamaNames,
        }
    }

    fn hf_class(self) -> &'static str {
        match self {
            Architecture::Phi => "PhiForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
        }
    }
}

/// The configuration of a model of any supported architecture.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Phi(PhiConfig),
    Llama(LlamaConfig),
}

impl From<PhiConfig> for ModelConfig {
    fn from(c: PhiConfig) -> Self {
        ModelConfig::Phi(c)
    }
}

impl From<LlamaConfig> for ModelConfig {
    fn from(c: LlamaConfig) -> Self {
        ModelConfig::Llama(c)
    }
}

fn config_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Config(e.to_string())
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (its `architectures` says which model it is).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ModelError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(config_err)?;
        let classes: Vec<String> = match value.get("architectures") {
            None => vec![Architecture::Phi.hf_class().to_string()],
            Some(v) => serde_json::from_value(v.clone()).map_err(config_err)?,
        };
        let arch = classes
            .iter()
            .find_map(|c| {
                SUPPORTED_ARCHITECTURES
                    .iter()
                    .find(|(name, _)| name == c)
                    .map(|(_, a)| *a)
            })
            .ok_or_else(|| ModelError::UnsupportedArchitecture(classes.join(", ")))?;
        Ok(match arch {
            Architecture::Phi => ModelConfig::Phi(
                serde_json::from_value(value)
                    .map_err(|e| config_err(format!("not a phi configuration: {e}")))?,
            ),
            Architecture::Llama => {
                let cfg: LlamaConfig = serde_json::from_value(value.clone())
                    .map_err(|e| config_err(format!("not a Llama configuration: {e}")))?;
                if let Some(act) = value.get("hidden_act").and_then(|a| a.as_str()) {
                    if act != "silu" {
                        return Err(config_err(format!(
                            "Llama with activation `{act}` (silu expected)"
                        )));
                    }
                }
                ModelConfig::Llama(cfg)
            }
        })
    }

    /// The configuration as a Hugging Face `config.json`, `architectures` included.
    pub fn to_json(&self) -> Result<Vec<u8>, ModelError> {
        let mut value = match self {
            ModelConfig::Phi(c) => serde_json::to_value(c),
            ModelConfig::Llama(c) => serde_json::to_value(c),
        }
        .map_err(config_err)?;
        value["architectures"] = serde_json::json!([self.architecture().hf_class()]);
        value["model_type"] = serde_json::json!(self.architecture().name());
        serde_json::to_vec_pretty(&value).map_err(config_err)
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            ModelConfig::Phi(_) => Architecture::Phi,
            ModelConfig::Llama(_) => Architecture::Llama,
        }
    }

    pub fn naming(&self) -> &'static dyn Naming {
        self.architecture().naming()
    }

    pub fn num_hidden_layers(&self) -> usize {
        match self {
            ModelConfig::Phi(c) => c.num_hidden_layers,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Phi(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Phi(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.hidden_size,
        }
    }

    pub fn max_position_embeddings(&self) -> usize {
        match self {
            ModelConfig::Phi(c) => c.max_position_embeddings,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_round_trip_and_name_their_architecture() {
        let phi = ModelConfig::Phi(PhiConfig::phi_1_5());
        assert_eq!(
            ModelConfig::from_json(&phi.to_json().unwrap()).unwrap(),
            phi
        );
        let llama = ModelConfig::Llama(LlamaConfig {
            vocab_size: 100,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            rope_interleaved: true,
        });
        assert_eq!(
            ModelConfig::from_json(&llama.to_json().unwrap()).unwrap(),
            llama
        );
        // phi configurations written before `architectures` existed.
        let old = serde_json::to_vec(&PhiConfig::phi_1_5()).unwrap();
        assert_eq!(ModelConfig::from_json(&old).unwrap(), phi);
    }

    #[test]
    fn other_architectures_are_refused_by_name() {
        let err = ModelConfig::from_json(br#"{"architectures": ["GPT2LMHeadModel"]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"),
            "{err}"
        );
        assert!(ModelConfig::from_json(b"{not json").is_err());
        assert!(ModelConfig::from_json(br#"{"architectures": ["LlamaForCausalLM"]}"#).is_err());
    }
}
