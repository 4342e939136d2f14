//! A Hugging Face Llama folder read into strata's parameters: the first
//! half of continued pretraining from public weights.
//!
//! [`HfModel::open`] reads `config.json` and the safetensors headers
//! (one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`); no tensor data is read then.
//! [`HfModel::check`] compares the config with the recipe's `[model]`,
//! naming every field that differs. [`HfModel::read`] fills one rank's
//! flat buffer through its [`ParamTable`]: each slot's part of each
//! tensor is read from the file with positioned reads of just its rows
//! (f32, bf16 or f16, widened to f32), under the family's Hugging Face
//! names and transposed where strata keeps `[in, out]`, so no rank holds
//! the whole model.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use strata_dataplane::family;
use strata_recipe::ModelConfig;

use crate::params::{ParamSlot, ParamTable};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    /// The folder's model is not the recipe's: every field that differs.
    #[error("{dir}/config.json does not match [model]: {}", .fields.join("; "))]
    Mismatch { dir: PathBuf, fields: Vec<String> },
}

type Result<T> = std::result::Result<T, ImportError>;

/// How a tensor's numbers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    fn widen(self, b: &[u8], out: &mut Vec<f32>) {
        match self {
            Dtype::F32 => out.extend(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Dtype::Bf16 => out.extend(
                b.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            Dtype::F16 => out.extend(
                b.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Stored {
    file: PathBuf,
    dtype: Dtype,
    shape: Vec<usize>,
    /// The data's first byte in the file.
    start: u64,
}

/// A Hugging Face model folder, its headers read.
#[derive(Debug)]
pub struct HfModel {
    dir: PathBuf,
    config: serde_json::Value,
    tensors: HashMap<String, Stored>,
}

fn file_error(path: &Path) -> impl Fn(String) -> ImportError + '_ {
    move |why| ImportError::File {
        path: path.to_path_buf(),
        why,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path)(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_error(path)(e.to_string()))
}

/// The tensors a safetensors file holds, from its header alone.
fn headers(path: &Path) -> Result<Vec<(String, Stored)>> {
    let bad = file_error(path);
    let f = File::open(path).map_err(|e| bad(e.to_string()))?;
    let size = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut len = [0u8; 8];
    f.read_exact_at(&mut len, 0)
        .map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 || 8 + n > size {
        return Err(bad(format!("a header of {n} bytes in a file of {size}")));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact_at(&mut head, 8)
        .map_err(|e| bad(e.to_string()))?;
    let head: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&head).map_err(|e| bad(format!("its header: {e}")))?;
    let data = 8 + n;
    let mut out = Vec::new();
    for (name, v) in head {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match v["dtype"].as_str() {
            Some("F32") => Dtype::F32,
            Some("BF16") => Dtype::Bf16,
            Some("F16") => Dtype::F16,
            other => {
                return Err(bad(format!(
                    "{name}: dtype {other:?}; strata reads F32, BF16 and F16"
                )));
            }
        };
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64())
                    .map(|d| d as usize)
                    .collect()
            })
            .unwrap_or_default();
        let offsets: Vec<u64> = v["data_offsets"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
            .unwrap_or_default();
        let [begin, end] = offsets[..] else {
            return Err(bad(format!("{name}: no data_offsets")));
        };
        let want = shape.iter().product::<usize>() * dtype.bytes();
        if end < begin || (end - begin) as usize != want || data + end > size {
            return Err(bad(format!(
                "{name}: bytes {begin}..{end} do not hold {shape:?} of {dtype:?} in a file of {size}"
            )));
        }
        out.push((
            name,
            Stored {
                file: path.to_path_buf(),
                dtype,
                shape,
                start: data + begin,
            },
        ));
    }
    Ok(out)
}

impl HfModel {
    /// Reads `dir`'s `config.json` and its weights' headers.
    pub fn open(dir: &Path) -> Result<HfModel> {
        let config = read_json(&dir.join("config.json"))?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let v = read_json(&index)?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| file_error(&index)("no weight_map".into()))?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for f in &files {
            tensors.extend(headers(f)?);
        }
        Ok(HfModel {
            dir: dir.to_path_buf(),
            config,
            tensors,
        })
    }

    /// Every field of `config.json` that differs from `cfg`, named with
    /// both values; an error when any does.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let c = &self.config;
        let mut fields = Vec::new();
        let int = |k: &str| c[k].as_u64();
        let mut want = |key: &str, theirs: Option<u64>, ours: u64, what: &str| {
            if theirs != Some(ours) {
                fields.push(format!(
                    "{key} is {}, {what} is {ours}",
                    theirs.map_or("missing".into(), |v| v.to_string())
                ));
            }
        };
        want(
            "hidden_size",
            int("hidden_size"),
            cfg.d_model,
            "model.d_model",
        );
        want(
            "num_hidden_layers",
            int("num_hidden_layers"),
            cfg.n_layers,
            "model.n_layers",
        );
        want(
            "num_attention_heads",
            int("num_attention_heads"),
            cfg.n_heads,
            "model.n_heads",
        );
        want(
            "num_key_value_heads",
            int("num_key_value_heads").or(int("num_attention_heads")),
            cfg.n_kv_heads,
            "model.n_kv_heads",
        );
        want(
            "intermediate_size",
            int("intermediate_size"),
            cfg.d_ffn,
            "model.d_ffn",
        );
        want(
            "vocab_size",
            int("vocab_size"),
            cfg.padded_vocab_size,
            "model.vocab_size padded",
        );
        if let Some(hd) = int("head_dim") {
            want(
                "head_dim",
                Some(hd),
                cfg.head_dim(),
                "model.d_model / model.n_heads",
            );
        }
        let theta = c["rope_theta"]
            .as_f64()
            .or_else(|| c["rope_parameters"]["rope_theta"].as_f64());
        if theta != Some(cfg.rope_theta) {
            fields.push(format!(
                "rope_theta is {}, model.rope_theta is {}",
                theta.map_or("missing".into(), |t| t.to_string()),
                cfg.rope_theta
            ));
        }
        let tied = c["tie_word_embeddings"].as_bool().unwrap_or(false);
        if tied != cfg.tie_embeddings {
            fields.push(format!(
                "tie_word_embeddings is {tied}, model.tie_embeddings is {}",
                cfg.tie_embeddings
            ));
        }
        let eps = c["rms_norm_eps"].as_f64();
        if eps != Some(family::Llama::NORM_EPS) {
            fields.push(format!(
                "rms_norm_eps is {}, strata's Llama uses {}",
                eps.map_or("missing".into(), |e| e.to_string()),
                family::Llama::NORM_EPS
            ));
        }
        for (key, ok) in [
            ("model_type", c["model_type"].as_str() == Some("llama")),
            (
                "hidden_act",
                c["hidden_act"].as_str().is_none_or(|a| a == "silu"),
            ),
            (
                "attention_bias",
                !c["attention_bias"].as_bool().unwrap_or(false),
            ),
            ("mlp_bias", !c["mlp_bias"].as_bool().unwrap_or(false)),
            ("rope_scaling", c["rope_scaling"].is_null()),
        ] {
            if !ok {
                fields.push(format!(
                    "{key} is {}, strata's Llama has {}",
                    c[key],
                    match key {
                        "model_type" => "llama",
                        "hidden_act" => "silu",
                        "rope_scaling" => "none",
                        _ => "false",
                    }
                ));
            }
        }
        if fields.is_empty() {
            Ok(())
        } else {
            Err(ImportError::Mismatch {
                dir: self.dir.clone(),
                fields,
            })
        }
    }

    /// One rank's flat buffer: every slot of `table` (a mirror of the tied
    /// embedding too) read from the folder, only its own part.
    pub fn read(&self, cfg: &ModelConfig, table: &ParamTable) -> Result<Vec<f32>> {
        let fam = family::of(cfg);
        let mut out = vec![0f32; table.total];
        // Each weights file opened once for all the slots it holds.
        let mut open: HashMap<&Path, File> = HashMap::new();
        for slot in &table.slots {
            let (name, transposed) = fam.hf_name(&slot.spec.name).ok_or_else(|| {
                file_error(&self.dir)(format!("{}: no Hugging Face name", slot.spec.name))
            })?;
            // A tied model has no lm_head: the head is the embedding.
            let name = if name == "lm_head.weight" && !self.tensors.contains_key(&name) {
                "model.embed_tokens.weight".to_string()
            } else {
                name
            };
            let stored = self
                .tensors
                .get(&name)
                .ok_or_else(|| file_error(&self.dir)(format!("no tensor {name}")))?;
            let f = match open.entry(stored.file.as_path()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(
                    File::open(&stored.file)
                        .map_err(|e| file_error(&stored.file)(e.to_string()))?,
                ),
            };
            let values = read_slot(f, slot, &name, stored, transposed)?;
            out[slot.range()].copy_from_slice(&values);
        }
        Ok(out)
    }
}

/// `slot`'s part of the tensor `stored` (in the open file `f`), in
/// strata's orientation.
fn read_slot(
    f: &File,
    slot: &ParamSlot,
    name: &str,
    stored: &Stored,
    transposed: bool,
) -> Result<Vec<f32>> {
    let full = &slot.spec.full_shape;
    let expect: Vec<usize> = if transposed {
        full.iter().rev().copied().collect()
    } else {
        full.clone()
    };
    let bad = file_error(&stored.file);
    if stored.shape != expect {
        return Err(bad(format!(
            "{name} is {:?}, the model's {} needs {expect:?}",
            stored.shape, slot.spec.name
        )));
    }
    let b = stored.dtype.bytes();
    // Rows of the stored tensor to read, and the columns of each.
    let (rows, cols) = match (slot.slice.as_slice(), transposed) {
        ([r], _) => (0..1, r.clone()),
        ([r, c], false) => (r.clone(), c.clone()),
        ([r, c], true) => (c.clone(), r.clone()),
        _ => return Err(bad(format!("{name}: more than two dimensions"))),
    };
    let width = *stored.shape.last().expect("a shape");
    let mut read = Vec::with_capacity(rows.len() * cols.len());
    let mut buf = vec![0u8; cols.len() * b];
    for row in rows.clone() {
        let at = stored.start + ((row * width + cols.start) * b) as u64;
        f.read_exact_at(&mut buf, at)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        stored.dtype.widen(&buf, &mut read);
    }
    if !transposed || slot.slice.len() == 1 {
        return Ok(read);
    }
    // `read` is [rows of the stored tensor][cols]; strata's part is
    // its transpose.
    let (r, c) = (rows.len(), cols.len());
    let mut t = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = read[i * c + j];
        }
    }
    Ok(t)
}
