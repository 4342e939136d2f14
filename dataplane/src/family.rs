//! Model families: what every layer of strata needs to know of a model
//! without running it.
//!
//! A [`ModelFamily`] declares its logical parameters (names, full shapes,
//! tensor-parallel splits, initialization: the rows of the named parameter
//! table that sharding, checkpoints, resharding, import and export read),
//! their Hugging Face names and `config.json`, and its training FLOPs per
//! token. The worker runs a family's stage through its own seam
//! (`strata_worker::model::StageForward`). [`Llama`] is the one family
//! today; [`of`] is the one place a model configuration is mapped to its
//! family.

use serde_json::json;
use strata_recipe::ModelConfig;

use crate::params::{BlockParam, Init, ParamSpec, Role, Split};

/// Standard deviation of the initial weights (GPT-2, Megatron).
pub const INIT_STD: f64 = 0.02;

/// A decoder family.
pub trait ModelFamily: Sync {
    /// The family's name (Hugging Face's `model_type`).
    fn name(&self) -> &'static str;

    /// The logical parameters of `cfg`, in model order: the embedding,
    /// each block's tensors, the final norm, and the head when it is not
    /// tied.
    fn params(&self, cfg: &ModelConfig) -> Vec<ParamSpec>;

    /// Hugging Face's name for parameter `name`, and whether its values
    /// are transposed on the way (strata keeps projections `[in, out]`,
    /// `torch.nn.Linear` `[out, in]`).
    fn hf_name(&self, name: &str) -> Option<(String, bool)>;

    /// `transformers`' `config.json` for `cfg`.
    fn hf_config(&self, cfg: &ModelConfig) -> serde_json::Value;

    /// Training FLOPs per token at sequence length `seq_len`.
    fn flops_per_token(&self, cfg: &ModelConfig, seq_len: u64) -> f64;
}

/// The family of `cfg`: Llama, the one strata trains today. A second
/// family adds a `[model]` field that names it and an arm here.
pub fn of(_cfg: &ModelConfig) -> &'static dyn ModelFamily {
    &Llama
}

/// The Llama-style decoder: token embedding, blocks of RMSNorm →
/// grouped-query causal attention with rotary embeddings → RMSNorm →
/// SwiGLU MLP, a final RMSNorm and an output head, optionally tied to the
/// embedding.
pub struct Llama;

impl Llama {
    /// RMSNorm's epsilon.
    pub const NORM_EPS: f64 = 1e-5;
}

impl ModelFamily for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn params(&self, cfg: &ModelConfig) -> Vec<ParamSpec> {
        let d = cfg.d_model as usize;
        let (h, kv) = (cfg.n_heads as usize, cfg.n_kv_heads as usize);
        let hd = cfg.head_dim() as usize;
        let f = cfg.d_ffn as usize;
        let v = cfg.padded_vocab_size as usize;
        // Residual-stream projections scaled by 1/√(2L) (GPT-2).
        let out_std = INIT_STD / (2.0 * cfg.n_layers as f64).sqrt();
        let normal = |std| Init::Normal { std };
        let mut out = vec![ParamSpec {
            name: "embed".into(),
            role: Role::Embed,
            full_shape: vec![v, d],
            split: Split::Dim(0),
            init: normal(INIT_STD),
            decay: true,
        }];
        for layer in 0..cfg.n_layers as u32 {
            for param in BlockParam::ALL {
                use BlockParam::*;
                let (shape, split, init) = match param {
                    AttnNorm | MlpNorm => (vec![d], Split::Replicated, Init::Ones),
                    // Column-parallel: Q, K and V split by heads (KV heads with
                    // the query heads that read them), gate and up by columns.
                    Wq => (vec![d, h * hd], Split::Dim(1), normal(INIT_STD)),
                    Wk | Wv => (
                        vec![d, kv * hd],
                        Split::Groups { dim: 1, groups: kv },
                        normal(INIT_STD),
                    ),
                    WGate | WUp => (vec![d, f], Split::Dim(1), normal(INIT_STD)),
                    // Row-parallel: their inputs are the column-parallel outputs.
                    Wo => (vec![h * hd, d], Split::Dim(0), normal(out_std)),
                    WDown => (vec![f, d], Split::Dim(0), normal(out_std)),
                };
                out.push(ParamSpec {
                    name: format!("blocks.{layer}.{}", param.name()),
                    role: Role::Block { layer, param },
                    decay: shape.len() >= 2,
                    full_shape: shape,
                    split,
                    init,
                });
            }
        }
        out.push(ParamSpec {
            name: "final_norm".into(),
            role: Role::FinalNorm,
            full_shape: vec![d],
            split: Split::Replicated,
            init: Init::Ones,
            decay: false,
        });
        if !cfg.tie_embeddings {
            out.push(ParamSpec {
                name: "head".into(),
                role: Role::Head,
                full_shape: vec![d, v],
                split: Split::Dim(1),
                init: normal(INIT_STD),
                decay: true,
            });
        }
        out
    }

    fn hf_name(&self, name: &str) -> Option<(String, bool)> {
        match name {
            "embed" => return Some(("model.embed_tokens.weight".into(), false)),
            "final_norm" => return Some(("model.norm.weight".into(), false)),
            "head" => return Some(("lm_head.weight".into(), true)),
            _ => {}
        }
        let rest = name.strip_prefix("blocks.")?;
        let (layer, param) = rest.split_once('.')?;
        let layer: u32 = layer.parse().ok()?;
        let param = BlockParam::ALL.into_iter().find(|p| p.name() == param)?;
        let (hf, t) = match param {
            BlockParam::AttnNorm => ("input_layernorm.weight", false),
            BlockParam::Wq => ("self_attn.q_proj.weight", true),
            BlockParam::Wk => ("self_attn.k_proj.weight", true),
            BlockParam::Wv => ("self_attn.v_proj.weight", true),
            BlockParam::Wo => ("self_attn.o_proj.weight", true),
            BlockParam::MlpNorm => ("post_attention_layernorm.weight", false),
            BlockParam::WGate => ("mlp.gate_proj.weight", true),
            BlockParam::WUp => ("mlp.up_proj.weight", true),
            BlockParam::WDown => ("mlp.down_proj.weight", true),
        };
        Some((format!("model.layers.{layer}.{hf}"), t))
    }

    /// `LlamaConfig`. The vocabulary is the padded one: the embedding's
    /// rows (the tokenizer's ids are its first rows).
    fn hf_config(&self, cfg: &ModelConfig) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": self.name(),
            "vocab_size": cfg.padded_vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ffn,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim(),
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": Llama::NORM_EPS,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": null,
            "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "pretraining_tp": 1,
            "initializer_range": INIT_STD,
            "torch_dtype": "float32",
            "use_cache": true,
        })
    }

    /// PaLM's count (App. B), which the recipe's plan reports:
    /// `6N + 12·L·H·Q·T` with N the matmul parameters.
    fn flops_per_token(&self, cfg: &ModelConfig, seq_len: u64) -> f64 {
        cfg.flops_per_token(seq_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_has_one_hugging_face_name() {
        let cfg = crate::params::tests::cfg(false);
        let specs = Llama.params(&cfg);
        let mut names: Vec<String> = specs
            .iter()
            .map(|s| Llama.hf_name(&s.name).expect("a Hugging Face name").0)
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), specs.len());
        assert!(names.contains(&"model.layers.2.mlp.down_proj.weight".to_string()));
        assert_eq!(Llama.hf_name("blocks.x.wq"), None);
        assert_eq!(Llama.hf_name("blocks.0.nonsense"), None);
        assert_eq!(Llama.hf_name("nonsense"), None);
    }
}
