//! The model configuration, as found in a Hugging Face `config.json` of a phi checkpoint.

use candle_nn::Activation;
use serde::{Deserialize, Serialize};

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
