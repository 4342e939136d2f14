//! A trained model for the ecosystem, and its loss on given tokens.
//!
//! [`write_hf`] writes a Hugging Face Llama checkpoint (`config.json`,
//! `generation_config.json` and `model.safetensors` in bf16 or f32,
//! sharded with an index when large) from the whole
//! model's master weights, which [`crate::checkpoint::read_rank`] gathers
//! from any layout, under the names and `config.json` of the model's
//! family ([`strata_dataplane::family`]). strata's parameters are Hugging
//! Face's up to names and the orientation of the projections (strata keeps them `[in, out]`,
//! `torch.nn.Linear` `[out, in]`): RoPE's convention, grouped KV heads,
//! RMSNorm's epsilon and the tied head are the same, as
//! `tests/reference.rs` pins against `transformers`.
//!
//! [`mean_loss`] is the mean next-token cross-entropy of a checkpoint on
//! exact token sequences: each sequence's tokens 1..n predicted from
//! those before, every predicted token weighted alike.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use strata_dataplane::family::{self, ModelFamily};
use strata_recipe::ModelConfig;

use crate::model::{StageForward, StageModel};
use crate::params::ParamTable;
use crate::run::CpuBackend;
use crate::tensors::to_vec;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, ExportError>;

/// One exported tensor.
pub struct HfTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The whole model's parameters (`master`, in `table`'s flat layout; the
/// table must be [`ParamTable::whole`]'s) under Hugging Face's names and
/// orientation, as `family` names them.
pub fn hf_tensors(
    family: &dyn ModelFamily,
    table: &ParamTable,
    master: &[f32],
) -> Result<Vec<HfTensor>> {
    if master.len() != table.total {
        return Err(ExportError::Invalid(format!(
            "{} values for a model of {} parameters",
            master.len(),
            table.total
        )));
    }
    let mut out = Vec::with_capacity(table.slots.len());
    for slot in &table.slots {
        if slot.mirror {
            continue;
        }
        if slot.shape != slot.spec.full_shape {
            return Err(ExportError::Invalid(format!(
                "{}: holds {:?} of {:?}; export needs the whole model",
                slot.spec.name, slot.shape, slot.spec.full_shape
            )));
        }
        let (name, transpose) = family.hf_name(&slot.spec.name).ok_or_else(|| {
            ExportError::Invalid(format!("{}: no Hugging Face name", slot.spec.name))
        })?;
        let values = &master[slot.range()];
        let (shape, data) = match (transpose, slot.shape.as_slice()) {
            (true, &[rows, cols]) => {
                let mut t = vec![0f32; values.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        t[c * rows + r] = values[r * cols + c];
                    }
                }
                (vec![cols, rows], t)
            }
            _ => (slot.shape.clone(), values.to_vec()),
        };
        out.push(HfTensor { name, shape, data });
    }
    Ok(out)
}

/// What [`write_hf`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    pub dir: PathBuf,
    pub files: Vec<String>,
    pub tensors: usize,
    pub parameters: usize,
    pub bytes: u64,
}

/// The number type the exported weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// bfloat16, rounded to nearest even: what Hugging Face users
    /// download, half the bytes.
    Bf16,
    /// float32: the master weights bit for bit.
    F32,
}

impl WeightDtype {
    /// The name `config.json`'s `torch_dtype` gives it.
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::Bf16 => "bfloat16",
            WeightDtype::F32 => "float32",
        }
    }

    fn bytes(self) -> u64 {
        match self {
            WeightDtype::Bf16 => 2,
            WeightDtype::F32 => 4,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            WeightDtype::F32 => bytemuck::cast_slice::<f32, u8>(values).to_vec(),
            WeightDtype::Bf16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            WeightDtype::Bf16 => Dtype::BF16,
            WeightDtype::F32 => Dtype::F32,
        }
    }
}

/// The tokens a generation starts and stops at, for `config.json` and
/// `generation_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: u32,
    pub eos: u32,
}

/// Writes `config.json` and the weights (as `dtype`) into `dir`: one
/// `model.safetensors`, or, past `max_shard_bytes`, shards
/// `model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`,
/// as `transformers` writes them; with `special`, their ids in the config
/// and a `generation_config.json`.
pub fn write_hf(
    dir: &Path,
    cfg: &ModelConfig,
    table: &ParamTable,
    master: &[f32],
    max_shard_bytes: u64,
    dtype: WeightDtype,
    special: Option<SpecialIds>,
) -> Result<Exported> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let family = family::of(cfg);
    let tensors = hf_tensors(family, table, master)?;
    // Shards of whole tensors, in model order, each under the limit
    // unless one tensor alone is larger.
    let mut shards: Vec<Vec<&HfTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in &tensors {
        let b = dtype.bytes() * t.data.len() as u64;
        if size > 0 && size + b > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += b;
        shards.last_mut().expect("a shard").push(t);
    }
    let n = shards.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = shard
            .iter()
            .map(|t| (t.name.clone(), dtype.encode(&t.data), t.shape.clone()))
            .collect();
        let views: Vec<(String, TensorView<'_>)> = bytes
            .iter()
            .map(|(name, b, shape)| {
                let v = TensorView::new(dtype.safetensors(), shape.clone(), b)
                    .map_err(|e| ExportError::Invalid(format!("{name}: {e}")))?;
                Ok((name.clone(), v))
            })
            .collect::<Result<_>>()?;
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let data = safetensors::serialize(views, Some(meta))
            .map_err(|e| ExportError::Invalid(format!("{file}: {e}")))?;
        total += bytes.iter().map(|b| b.1.len() as u64).sum::<u64>();
        let path = dir.join(&file);
        std::fs::write(&path, data).map_err(io(&path))?;
        for t in shard {
            weight_map.insert(t.name.clone(), json!(file));
        }
        files.push(file);
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join("model.safetensors.index.json");
        write_json(&path, &index)?;
        files.push("model.safetensors.index.json".into());
    }
    let mut config = family.hf_config(cfg);
    config["torch_dtype"] = json!(dtype.torch_name());
    if let Some(ids) = special {
        config["bos_token_id"] = json!(ids.bos);
        config["eos_token_id"] = json!(ids.eos);
        let generation = json!({
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos,
            "max_length": cfg.max_seq_len,
        });
        let path = dir.join("generation_config.json");
        write_json(&path, &generation)?;
        files.push("generation_config.json".into());
    }
    let path = dir.join("config.json");
    write_json(&path, &config)?;
    files.push("config.json".into());
    Ok(Exported {
        dir: dir.to_path_buf(),
        files,
        tensors: tensors.len(),
        parameters: tensors.iter().map(|t| t.data.len()).sum(),
        bytes: total,
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A checkpoint's loss on token sequences.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalLoss {
    /// Mean cross-entropy (nats) over every predicted token.
    pub loss: f64,
    /// Tokens predicted (each sequence's length less one, summed).
    pub tokens: u64,
    pub sequences: usize,
}

/// The mean next-token loss of the whole model (`master`, in
/// [`ParamTable::whole`]'s layout) on `sequences`, on the CPU: each
/// sequence's tokens 1..n predicted from those before (so a sequence has
/// at most `max_seq_len + 1` tokens: `max_seq_len` inputs). Sequences of
/// fewer than 2 tokens, longer, or with ids outside the vocabulary are
/// refused, naming the sequence.
pub fn mean_loss(cfg: &ModelConfig, master: &[f32], sequences: &[Vec<u32>]) -> Result<EvalLoss> {
    for (i, s) in sequences.iter().enumerate() {
        if s.len() < 2 {
            return Err(ExportError::Invalid(format!(
                "sequence {i}: {} tokens; at least 2 are needed (the first predicts the second)",
                s.len()
            )));
        }
        if s.len() as u64 > cfg.max_seq_len + 1 {
            return Err(ExportError::Invalid(format!(
                "sequence {i}: {} tokens, more than max_seq_len + 1 = {} (the model reads at most {} inputs)",
                s.len(),
                cfg.max_seq_len + 1,
                cfg.max_seq_len
            )));
        }
        if let Some(t) = s.iter().find(|&&t| u64::from(t) >= cfg.padded_vocab_size) {
            return Err(ExportError::Invalid(format!(
                "sequence {i}: token id {t} is outside the vocabulary ({} rows)",
                cfg.padded_vocab_size
            )));
        }
    }
    if sequences.is_empty() {
        return Err(ExportError::Invalid("no sequences to evaluate".into()));
    }
    let table = ParamTable::whole(cfg);
    if master.len() != table.total {
        return Err(ExportError::Invalid(format!(
            "{} values for a model of {} parameters",
            master.len(),
            table.total
        )));
    }
    let device = Default::default();
    let mut model = StageModel::<CpuBackend>::new_empty(cfg, table, &device);
    model.load(master);
    let mut sum = 0f64;
    let mut tokens = 0u64;
    for s in sequences {
        let seq = s.len() - 1;
        let logits = model.logits(&s[..seq], 1, seq);
        let v = cfg.padded_vocab_size as usize;
        let z = to_vec(logits);
        for (row, &target) in s[1..].iter().enumerate() {
            let r = &z[row * v..(row + 1) * v];
            let max = r
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let lse = r
                .iter()
                .map(|&x| (f64::from(x) - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            sum += lse - f64::from(r[target as usize]);
        }
        tokens += seq as u64;
    }
    Ok(EvalLoss {
        loss: sum / tokens as f64,
        tokens,
        sequences: sequences.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_has_a_hugging_face_name() {
        let cfg = ModelConfig {
            n_layers: 2,
            d_model: 16,
            n_heads: 4,
            n_kv_heads: 2,
            d_ffn: 32,
            vocab_size: 100,
            padded_vocab_size: 128,
            max_seq_len: 16,
            rope_theta: 10000.0,
            tie_embeddings: false,
        };
        let table = ParamTable::whole(&cfg);
        let master: Vec<f32> = (0..table.total).map(|i| i as f32).collect();
        let t = hf_tensors(family::of(&cfg), &table, &master).unwrap();
        assert_eq!(t.len(), 2 + 2 * 9 + 1);
        let q = t
            .iter()
            .find(|t| t.name == "model.layers.1.self_attn.k_proj.weight")
            .unwrap();
        // [in = 16, out = 8] becomes [out, in]: element (o, i) is (i, o).
        assert_eq!(q.shape, vec![8, 16]);
        let slot = table.get("blocks.1.wk").unwrap();
        assert_eq!(q.data[3 * 16 + 5], master[slot.offset + 5 * 8 + 3]);
        assert!(
            t.iter()
                .any(|t| t.name == "lm_head.weight" && t.shape == vec![128, 16])
        );
    }
}
