//! A Hugging Face Llama folder read into strata's parameters: continued
//! pretraining from public weights.
//!
//! [`HfModel::open`] reads `config.json` and the safetensors headers
//! (one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`) from a folder on object storage (a
//! path, `file://` or `s3://`); no tensor data is read then.
//! [`HfModel::check`] compares the config with the recipe's `[model]`,
//! naming every field that differs, and [`HfModel::check_tokenizer`] the
//! folder's `tokenizer.json` with a dataset's tokenizer. [`HfModel::read`]
//! fills one rank's flat buffer through its [`ParamTable`]: each slot's
//! part of each tensor is read with ranged reads of just its rows (f32,
//! bf16 or f16, widened to f32), under the family's Hugging Face names and
//! transposed where strata keeps `[in, out]`, so no rank holds the whole
//! model.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use serde_json::Value;
use strata_recipe::ModelConfig;

use crate::family;
use crate::manifest::TokenizerInfo;
use crate::params::{ParamSlot, ParamTable};
use crate::store::{Location, StoreError};
use crate::tokenize::{EOT_CANDIDATES, TokenizerKind};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// An object of the folder is missing or not what it should be.
    #[error("{url}: {why}")]
    File { url: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The folder's model is not the recipe's: every field that differs.
    #[error("{dir}/config.json does not match [model]: {}", .fields.join("; "))]
    Mismatch { dir: String, fields: Vec<String> },
    /// The folder's tokenizer is not the dataset's.
    #[error("{dir}/tokenizer.json is not the tokenizer of the dataset ({dataset}): {why}")]
    Tokenizer {
        dir: String,
        dataset: String,
        why: String,
    },
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
    /// The weights file's key in the folder.
    file: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// The data's first byte in the file.
    start: u64,
}

/// A Hugging Face model folder, its headers read.
#[derive(Debug)]
pub struct HfModel {
    loc: Location,
    config: Value,
    tensors: HashMap<String, Stored>,
}

/// Largest safetensors header read (the format's own limit).
const MAX_HEADER: u64 = 100 << 20;

async fn read_json(loc: &Location, key: &str) -> Result<Value> {
    let bytes = loc.get(key).await?;
    serde_json::from_slice(&bytes).map_err(|e| ImportError::File {
        url: loc.url_of(key),
        why: e.to_string(),
    })
}

/// The tensors the safetensors file `key` holds, from its header alone.
async fn headers(loc: &Location, key: &str) -> Result<Vec<(String, Stored)>> {
    let bad = |why: String| ImportError::File {
        url: loc.url_of(key),
        why,
    };
    let (size, first) = loc.head_bytes(key, 8).await?;
    let Ok(len) = <[u8; 8]>::try_from(first.as_ref()) else {
        return Err(bad(format!("no safetensors header in {size} bytes")));
    };
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || 8 + n > size {
        return Err(bad(format!("a header of {n} bytes in a file of {size}")));
    }
    let header = 8..8 + n;
    let head = loc
        .get_ranges(key, std::slice::from_ref(&header))
        .await?
        .remove(0);
    let head: serde_json::Map<String, Value> =
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
                file: key.to_string(),
                dtype,
                shape,
                start: data + begin,
            },
        ));
    }
    Ok(out)
}

impl HfModel {
    /// Reads the folder's `config.json` and its weights' headers.
    pub async fn open(loc: Location) -> Result<HfModel> {
        let config = read_json(&loc, "config.json").await?;
        let index = "model.safetensors.index.json";
        let files: Vec<String> = if loc.exists(index).await? {
            let v = read_json(&loc, index).await?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| ImportError::File {
                    url: loc.url_of(index),
                    why: "no weight_map".into(),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(String::from).collect()
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut tensors = HashMap::new();
        for f in &files {
            tensors.extend(headers(&loc, f).await?);
        }
        Ok(HfModel {
            loc,
            config,
            tensors,
        })
    }

    /// The folder at `url` (a path, `file://` or `s3://`), its
    /// `config.json` checked against `cfg` ([`HfModel::check`]).
    pub async fn open_checked(url: &str, cfg: &ModelConfig) -> Result<HfModel> {
        let hf = HfModel::open(Location::parse(url, false)?).await?;
        hf.check(cfg)?;
        Ok(hf)
    }

    /// The folder's URL.
    pub fn url(&self) -> &str {
        self.loc.url()
    }

    /// The folder's `config.json`.
    pub fn config(&self) -> &Value {
        &self.config
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
        if let Some(hd) = int("head_dim") {
            want(
                "head_dim",
                Some(hd),
                cfg.head_dim(),
                "model.d_model / model.n_heads",
            );
        }
        // The rows, which may be more than the tokenizer's ids (padded,
        // as transformers keeps them): strata's padded rows must be as many.
        let rows = int("vocab_size");
        if rows != Some(cfg.padded_vocab_size) {
            let hint = match rows {
                Some(v) if v >= cfg.vocab_size => format!(
                    "; for {v} rows set model.vocab_size = {v} and model.vocab_multiple = 1"
                ),
                _ => String::new(),
            };
            fields.push(format!(
                "vocab_size is {}, strata's model has {} rows (model.vocab_size {} padded){hint}",
                rows.map_or("missing".into(), |v| v.to_string()),
                cfg.padded_vocab_size,
                cfg.vocab_size
            ));
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
                dir: self.url().to_string(),
                fields,
            })
        }
    }

    /// One rank's flat buffer: every slot of `table` (a mirror of the tied
    /// embedding too) read from the folder, only its own part.
    pub async fn read(&self, cfg: &ModelConfig, table: &ParamTable) -> Result<Vec<f32>> {
        let fam = family::of(cfg);
        let mut out = vec![0f32; table.total];
        for slot in &table.slots {
            let (name, transposed) =
                fam.hf_name(&slot.spec.name)
                    .ok_or_else(|| ImportError::File {
                        url: self.url().to_string(),
                        why: format!("{}: no Hugging Face name", slot.spec.name),
                    })?;
            // A tied model has no lm_head: the head is the embedding.
            let name = if name == "lm_head.weight" && !self.tensors.contains_key(&name) {
                "model.embed_tokens.weight".to_string()
            } else {
                name
            };
            let stored = self.tensors.get(&name).ok_or_else(|| ImportError::File {
                url: self.url().to_string(),
                why: format!("no tensor {name}"),
            })?;
            let values = self.read_slot(slot, &name, stored, transposed).await?;
            out[slot.range()].copy_from_slice(&values);
        }
        Ok(out)
    }

    /// `slot`'s part of the tensor `stored`, in strata's orientation.
    async fn read_slot(
        &self,
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
        let bad = |why: String| ImportError::File {
            url: self.loc.url_of(&stored.file),
            why,
        };
        if stored.shape != expect {
            return Err(bad(format!(
                "{name} is {:?}, the model's {} needs {expect:?}",
                stored.shape, slot.spec.name
            )));
        }
        let b = stored.dtype.bytes() as u64;
        // Rows of the stored tensor to read, and the columns of each.
        let (rows, cols) = match (slot.slice.as_slice(), transposed) {
            ([r], _) => (0..1, r.clone()),
            ([r, c], false) => (r.clone(), c.clone()),
            ([r, c], true) => (c.clone(), r.clone()),
            _ => return Err(bad(format!("{name}: more than two dimensions"))),
        };
        let width = *stored.shape.last().expect("a shape") as u64;
        let at = |row: usize, col: usize| stored.start + (row as u64 * width + col as u64) * b;
        // Whole rows are one range; a column slice is a range per row.
        let ranges: Vec<Range<u64>> = if cols.len() as u64 == width {
            let whole = at(rows.start, 0)..at(rows.end, 0);
            vec![whole]
        } else {
            rows.clone()
                .map(|row| at(row, cols.start)..at(row, cols.end))
                .collect()
        };
        let bytes = self.loc.get_ranges(&stored.file, &ranges).await?;
        let mut read = Vec::with_capacity(rows.len() * cols.len());
        for part in &bytes {
            stored.dtype.widen(part, &mut read);
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

    /// Refuses a folder whose `tokenizer.json` is not the tokenizer of
    /// each of `datasets` (from their manifests): a different vocabulary
    /// size, or a token id whose text differs, the first one named. A
    /// dataset's Hugging Face tokenizer file that cannot be read here is
    /// compared by its size and end-of-text token only. `Ok(false)` when
    /// the folder has no `tokenizer.json` (nothing to compare); the file is
    /// read once, whatever the number of datasets.
    pub async fn check_tokenizer(&self, datasets: &[&TokenizerInfo]) -> Result<bool> {
        let key = "tokenizer.json";
        if !self.loc.exists(key).await? {
            return Ok(false);
        }
        let ours = vocabulary(&read_json(&self.loc, key).await?);
        for dataset in datasets {
            self.same_tokenizer(&ours, dataset)?;
        }
        Ok(true)
    }

    fn same_tokenizer(&self, ours: &BTreeMap<u32, String>, dataset: &TokenizerInfo) -> Result<()> {
        let refuse = |why: String| ImportError::Tokenizer {
            dir: self.url().to_string(),
            dataset: dataset.name.clone(),
            why,
        };
        let theirs: Option<BTreeMap<u32, String>> = match dataset.name.strip_prefix("hf:") {
            None => match dataset.name.parse::<TokenizerKind>() {
                Ok(kind) => Some((0..).zip(kind.hf_vocabulary()).collect()),
                Err(e) => return Err(refuse(e)),
            },
            Some(path) => std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .map(|v: Value| vocabulary(&v)),
        };
        let size = ours.keys().next_back().map_or(0, |&k| k + 1);
        if size != dataset.vocab_size {
            return Err(refuse(format!(
                "{size} ids in the model's, {} in the dataset's",
                dataset.vocab_size
            )));
        }
        let Some(theirs) = theirs else {
            let eot = ours.get(&dataset.eot_id);
            if eot.is_none_or(|t| !EOT_CANDIDATES.contains(&t.as_str())) {
                return Err(refuse(format!(
                    "the dataset ends documents with id {}, which is {eot:?} in the model's",
                    dataset.eot_id
                )));
            }
            return Ok(());
        };
        for id in 0..size {
            let (a, b) = (ours.get(&id), theirs.get(&id));
            if a != b {
                let show = |t: Option<&String>| t.map_or("no token".into(), |t| format!("{t:?}"));
                return Err(refuse(format!(
                    "id {id} is {} in the model's, {} in the dataset's",
                    show(a),
                    show(b)
                )));
            }
        }
        Ok(())
    }
}

/// A `tokenizer.json`'s tokens by id: its model's vocabulary (a map for
/// BPE and WordPiece, a list of pairs for Unigram) and its added tokens.
fn vocabulary(json: &Value) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    match &json["model"]["vocab"] {
        Value::Object(m) => {
            for (token, id) in m {
                if let Some(id) = id.as_u64() {
                    out.insert(id as u32, token.clone());
                }
            }
        }
        Value::Array(pairs) => {
            for (id, pair) in pairs.iter().enumerate() {
                if let Some(token) = pair[0].as_str() {
                    out.insert(id as u32, token.to_string());
                }
            }
        }
        _ => {}
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(token)) = (t["id"].as_u64(), t["content"].as_str()) {
            out.insert(id as u32, token.to_string());
        }
    }
    out
}
