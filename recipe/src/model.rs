//! The model's shape and its accounting: parameter counts and FLOPs per token.

use serde::{Deserialize, Serialize};

/// Embedding and output rows are padded to a multiple of this times the
/// tensor-parallel degree's odd part (Megatron-LM's
/// `make-vocab-size-divisible-by`); see [`padded_vocab_size`].
pub const VOCAB_PAD_MULTIPLE: u64 = 128;

/// The vocabulary size the embedding and output layers allocate: `vocab_size`
/// rounded up to a multiple of `lcm(128, tp)`. For power-of-two `tp` up to 128
/// the padding does not depend on `tp`, so checkpoints move between those
/// layouts unchanged. Padded rows never appear as targets.
pub fn padded_vocab_size(vocab_size: u64, tp: u64) -> u64 {
    padded_vocab_size_by(vocab_size, tp, VOCAB_PAD_MULTIPLE)
}

/// [`padded_vocab_size`] to a multiple of `lcm(multiple, tp)` instead
/// (`[model] vocab_multiple`).
pub fn padded_vocab_size_by(vocab_size: u64, tp: u64, multiple: u64) -> u64 {
    let m = lcm(multiple.max(1), tp.max(1));
    vocab_size.div_ceil(m) * m
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

/// A Llama-style decoder: token embedding, `n_layers` blocks of RMSNorm →
/// grouped-query attention with rotary embeddings → RMSNorm → SwiGLU MLP, a
/// final RMSNorm and an output head (optionally tied to the embedding).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub n_layers: u64,
    pub d_model: u64,
    pub n_heads: u64,
    pub n_kv_heads: u64,
    pub d_ffn: u64,
    pub vocab_size: u64,
    /// See [`padded_vocab_size`].
    pub padded_vocab_size: u64,
    pub max_seq_len: u64,
    pub rope_theta: f64,
    pub tie_embeddings: bool,
}

impl ModelConfig {
    pub fn head_dim(&self) -> u64 {
        self.d_model / self.n_heads
    }

    /// Non-embedding parameters as Step Law counts them: the attention and
    /// SwiGLU weight matrices, `(4d² + 3·d·d_ffn)·L` for full multi-head
    /// attention. With grouped KV heads the K and V projections are
    /// `d × n_kv_heads·head_dim` each, counted exactly. Norm gains are not
    /// weight matrices and are left out, as in the law's definition.
    pub fn non_embedding_params(&self) -> u64 {
        let d = self.d_model;
        let kv = self.n_kv_heads * self.head_dim();
        let attention = 2 * d * d + 2 * d * kv; // q, o; k, v
        let mlp = 3 * d * self.d_ffn; // gate, up, down
        (attention + mlp) * self.n_layers
    }

    /// Every parameter the model allocates: the non-embedding matrices, the
    /// RMSNorm gains (two per block and a final one), the (padded) embedding,
    /// and the output head unless it is tied.
    pub fn total_params(&self) -> u64 {
        let norms = (2 * self.n_layers + 1) * self.d_model;
        let embedding = self.padded_vocab_size * self.d_model;
        let head = if self.tie_embeddings { 0 } else { embedding };
        self.non_embedding_params() + norms + embedding + head
    }

    /// Parameters that take part in a matrix multiply per token: the
    /// non-embedding matrices and the output head (an embedding lookup costs
    /// no FLOPs, while the head's matmul does whether or not it is tied).
    pub fn matmul_params(&self) -> u64 {
        self.non_embedding_params() + self.padded_vocab_size * self.d_model
    }

    /// What keeps weights of a model `other` from serving as this one's:
    /// each field of the parameters' shapes that differs, named with both
    /// values. Sequence length and RoPE theta may differ (long-context
    /// continued pretraining changes both).
    pub fn weight_differences(&self, other: &ModelConfig) -> Vec<String> {
        [
            ("n_layers", self.n_layers, other.n_layers),
            ("d_model", self.d_model, other.d_model),
            ("n_heads", self.n_heads, other.n_heads),
            ("n_kv_heads", self.n_kv_heads, other.n_kv_heads),
            ("d_ffn", self.d_ffn, other.d_ffn),
            (
                "vocab_size padded",
                self.padded_vocab_size,
                other.padded_vocab_size,
            ),
            (
                "tie_embeddings",
                u64::from(self.tie_embeddings),
                u64::from(other.tie_embeddings),
            ),
        ]
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(k, a, b)| match k {
            "tie_embeddings" => format!("model.{k} is {}, theirs {}", a == 1, b == 1),
            _ => format!("model.{k} is {a}, theirs {b}"),
        })
        .collect()
    }

    /// Training FLOPs per token at sequence length `seq_len` (PaLM, App. B):
    /// `6N + 12·L·H·Q·T`, with N the matmul parameters.
    pub fn flops_per_token(&self, seq_len: u64) -> f64 {
        6.0 * self.matmul_params() as f64
            + 12.0 * (self.n_layers * self.n_heads * self.head_dim()) as f64 * seq_len as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(n_heads: u64, n_kv_heads: u64) -> ModelConfig {
        ModelConfig {
            n_layers: 2,
            d_model: 64,
            n_heads,
            n_kv_heads,
            d_ffn: 172,
            vocab_size: 1000,
            padded_vocab_size: padded_vocab_size(1000, 1),
            max_seq_len: 128,
            rope_theta: 10_000.0,
            tie_embeddings: false,
        }
    }

    #[test]
    fn full_attention_matches_step_law_formula() {
        let m = model(4, 4);
        let (d, f, l) = (64, 172, 2);
        assert_eq!(m.non_embedding_params(), (4 * d * d + 3 * d * f) * l);
    }

    #[test]
    fn grouped_kv_heads_are_counted_exactly() {
        let m = model(4, 1);
        let (d, f, l, kv) = (64, 172, 2, 16);
        assert_eq!(
            m.non_embedding_params(),
            (2 * d * d + 2 * d * kv + 3 * d * f) * l
        );
    }

    #[test]
    fn totals_add_embeddings_norms_and_an_untied_head() {
        let m = model(4, 4);
        assert_eq!(m.padded_vocab_size, 1024);
        let emb = 1024 * 64;
        let norms = 5 * 64;
        assert_eq!(m.total_params(), m.non_embedding_params() + norms + 2 * emb);
        let tied = ModelConfig {
            tie_embeddings: true,
            ..m
        };
        assert_eq!(tied.total_params(), m.non_embedding_params() + norms + emb);
    }

    #[test]
    fn llama2_7b_shape_has_its_published_size() {
        // Llama 2 7B: 32 layers, d 4096, 32 heads, d_ffn 11008, vocab 32000.
        let m = ModelConfig {
            n_layers: 32,
            d_model: 4096,
            n_heads: 32,
            n_kv_heads: 32,
            d_ffn: 11008,
            vocab_size: 32000,
            padded_vocab_size: 32000,
            max_seq_len: 4096,
            rope_theta: 10_000.0,
            tie_embeddings: false,
        };
        // Meta reports 6,738,415,616 parameters.
        assert_eq!(m.total_params(), 6_738_415_616);
    }

    #[test]
    fn flops_follow_palm() {
        let m = model(4, 4);
        let n = m.non_embedding_params() + 1024 * 64;
        let expected = 6.0 * n as f64 + 12.0 * (2 * 4 * 16) as f64 * 128.0;
        assert_eq!(m.flops_per_token(128), expected);
    }

    #[test]
    fn vocab_padding_is_independent_of_power_of_two_tp() {
        assert_eq!(padded_vocab_size(50257, 1), 50304);
        assert_eq!(padded_vocab_size(50257, 8), 50304);
        assert_eq!(padded_vocab_size(50304, 2), 50304);
        assert_eq!(padded_vocab_size(50257, 3), 50304); // lcm(128, 3) = 384
        assert_eq!(padded_vocab_size(1000, 3), 1152);
    }
}
