//! `strata export` (a checkpoint as a Hugging Face Llama) and `strata eval`
//! (a checkpoint's loss on given tokens or text).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use strata_dataplane::checkpoint::{self as ckpt, Manifest};
use strata_dataplane::manifest::Manifest as DatasetManifest;
use strata_dataplane::reader::{read_holdout, read_manifest};
use strata_dataplane::store::Location;
use strata_dataplane::tokenize::{Tokenizer, TokenizerSpec};
use strata_proto::v1 as pb;
use strata_recipe::Recipe;
use strata_worker::checkpoint::read_weights;
use strata_worker::export::{SpecialIds, WeightDtype, mean_loss, write_hf};
use strata_worker::params::ParamTable;

use crate::UserError;
use crate::jobs::{Connect, runtime, status_error};

/// Which checkpoint: a job's (through its coordinator), or a checkpoint
/// folder's URL.
#[derive(Args)]
pub struct CheckpointRef {
    /// The job whose checkpoint to use.
    #[arg(required_unless_present = "checkpoint")]
    pub job: Option<String>,
    /// A checkpoint folder instead (`…/JOB/step-00000100`, a path,
    /// file:// or s3:// URL): no coordinator needed.
    #[arg(long, conflicts_with = "job")]
    pub checkpoint: Option<String>,
    /// The checkpoint's step [default: the latest complete one].
    #[arg(long)]
    pub step: Option<u64>,
    #[command(flatten)]
    pub connect: Connect,
}

/// A complete checkpoint and its whole model's master weights.
struct Loaded {
    manifest: Manifest,
    url: String,
    master: Vec<f32>,
}

impl CheckpointRef {
    /// The checkpoint folder's URL.
    async fn url(&self) -> anyhow::Result<String> {
        if let Some(url) = &self.checkpoint {
            return Ok(url.trim_end_matches('/').to_string());
        }
        let job = self
            .job
            .clone()
            .expect("clap requires a job or --checkpoint");
        let mut c = self.connect.client().await?;
        let list = c
            .list_checkpoints(pb::ListCheckpointsRequest {
                job_id: job.clone(),
            })
            .await
            .map_err(|s| status_error("ListCheckpoints", s))?
            .into_inner()
            .checkpoints;
        let steps: Vec<String> = list.iter().map(|k| k.step.to_string()).collect();
        let chosen = match self.step {
            Some(s) => list.iter().find(|k| k.step == s),
            None => list.last(),
        };
        chosen.map(|k| k.url.clone()).ok_or_else(|| {
            UserError(match self.step {
                Some(s) => format!(
                    "job {job} has no complete checkpoint at step {s} (it has: {})",
                    if steps.is_empty() {
                        "none".into()
                    } else {
                        steps.join(", ")
                    }
                ),
                None => format!("job {job} has no complete checkpoint"),
            })
            .into()
        })
    }

    async fn load(&self) -> anyhow::Result<Loaded> {
        let url = self.url().await?;
        let (loc, manifest) = ckpt::open_step(&url)
            .await
            .map_err(|e| UserError(e.to_string()))?;
        let table = ParamTable::whole(&manifest.model);
        // The weights alone: the optimizer's files are not read.
        let master = read_weights(&loc, "", &manifest, &table)
            .await
            .with_context(|| format!("reading {url}"))?;
        Ok(Loaded {
            manifest,
            url,
            master,
        })
    }
}

/// The dataset the checkpoint's recipe trained on: where, and its
/// manifest.
async fn dataset_of(manifest: &Manifest) -> anyhow::Result<(Location, DatasetManifest)> {
    let recipe = Recipe::from_toml_str(&manifest.recipe, &manifest.job)
        .map_err(|e| anyhow::anyhow!("the checkpoint's recipe: {e}"))?;
    // A mixture's sources share one tokenizer: the first stands for all.
    let url = recipe.data.first_dataset();
    let loc = Location::parse(url, false).map_err(|e| UserError(format!("{url}: {e}")))?;
    let data = read_manifest(&loc)
        .await
        .map_err(|e| UserError(format!("the job's dataset {url}: {e}")))?;
    Ok((loc, data))
}

/// The tokenizer of the dataset `manifest`'s recipe trained on.
async fn dataset_tokenizer(manifest: &Manifest) -> anyhow::Result<(TokenizerSpec, String)> {
    let (_, data) = dataset_of(manifest).await?;
    let name = data.tokenizer.name;
    let spec = match name.strip_prefix("hf:") {
        Some(path) => TokenizerSpec::HuggingFace(PathBuf::from(path)),
        None => name
            .parse()
            .map_err(|e: String| UserError(format!("the dataset's tokenizer: {e}")))?,
    };
    Ok((spec, name))
}

// -------------------------------------------------------------- export ---

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub from: CheckpointRef,
    /// The folder to write (created; files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// The weights' number type: bf16 (rounded to nearest even; what
    /// Hugging Face models ship in) or f32 (the master weights exactly).
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    pub dtype: DtypeArg,
    /// Largest `model.safetensors` file, in MiB, before the weights are
    /// sharded with an index (as `transformers` does).
    #[arg(long, default_value_t = 5000)]
    pub max_shard_mib: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DtypeArg {
    Bf16,
    F32,
}

/// Tokens a generation may start with, in order of preference; without
/// one, the end-of-text token starts it too (as GPT-2's does).
const BOS_CANDIDATES: [&str; 4] = ["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"];

/// The dataset's tokenizer, as files beside an export: `tokenizer.json`
/// and `tokenizer_config.json`, so `AutoTokenizer` loads the folder.
struct TokenizerFiles {
    json: Vec<u8>,
    from: String,
    special: SpecialIds,
    bos: String,
    eos: String,
}

impl TokenizerFiles {
    fn of(spec: &TokenizerSpec) -> anyhow::Result<TokenizerFiles> {
        let tok = spec.load().map_err(|e| UserError(e.to_string()))?;
        let (json, from) = match spec {
            TokenizerSpec::HuggingFace(path) => (
                std::fs::read(path)
                    .map_err(|e| UserError(format!("reading {}: {e}", path.display())))?,
                path.display().to_string(),
            ),
            TokenizerSpec::Tiktoken(kind) => (
                kind.hf_tokenizer_json().to_string().into_bytes(),
                format!("the built-in {}, converted", kind.name()),
            ),
        };
        let eos = tok.eot_id();
        let bos = BOS_CANDIDATES
            .iter()
            .find_map(|t| tok.token_id(t))
            .unwrap_or(eos);
        let text = |id| {
            tok.token_text(id)
                .ok_or_else(|| UserError(format!("the tokenizer has no text for its token {id}")))
        };
        Ok(TokenizerFiles {
            json,
            from,
            special: SpecialIds { bos, eos },
            bos: text(bos)?,
            eos: text(eos)?,
        })
    }

    fn write(&self, dir: &Path, max_len: u64) -> anyhow::Result<Vec<String>> {
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos,
            "eos_token": self.eos,
            "model_max_length": max_len,
            "clean_up_tokenization_spaces": false,
        });
        let config = serde_json::to_string_pretty(&config)? + "\n";
        for (name, bytes) in [
            ("tokenizer.json", self.json.as_slice()),
            ("tokenizer_config.json", config.as_bytes()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, bytes)
                .map_err(|e| UserError(format!("writing {}: {e}", path.display())))?;
        }
        Ok(vec![
            "tokenizer.json".into(),
            "tokenizer_config.json".into(),
        ])
    }
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let loaded = args.from.load().await?;
        let m = &loaded.manifest;
        let table = ParamTable::whole(&m.model);
        // The tokenizer travels with the model.
        let tokenizer = match dataset_tokenizer(m).await {
            Ok((spec, _)) => Ok(TokenizerFiles::of(&spec)?),
            Err(e) => Err(format!("none written: {e:#}")),
        };
        let dtype = match args.dtype {
            DtypeArg::Bf16 => WeightDtype::Bf16,
            DtypeArg::F32 => WeightDtype::F32,
        };
        let mut out = write_hf(
            &args.out,
            &m.model,
            &table,
            &loaded.master,
            args.max_shard_mib.max(1) << 20,
            dtype,
            tokenizer.as_ref().ok().map(|t| t.special),
        )
        .map_err(|e| UserError(e.to_string()))?;
        let tokenizer = match tokenizer {
            Ok(t) => {
                out.files.extend(t.write(&args.out, m.model.max_seq_len)?);
                format!("tokenizer.json ({})", t.from)
            }
            Err(why) => why,
        };
        if args.json {
            let v = json!({
                "checkpoint": loaded.url,
                "step": m.step,
                "out": out.dir,
                "dtype": dtype.torch_name(),
                "files": out.files,
                "tensors": out.tensors,
                "parameters": out.parameters,
                "bytes": out.bytes,
                "tokenizer": tokenizer,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "exported step {} of {} ({} parameters, {} tensors, {}) to {}: {}",
                m.step,
                m.job,
                out.parameters,
                out.tensors,
                dtype.torch_name(),
                out.dir.display(),
                out.files.join(", ")
            );
            println!("tokenizer: {tokenizer}");
        }
        Ok(())
    })
}

// ---------------------------------------------------------------- eval ---

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub from: CheckpointRef,
    /// Exact token sequences: a JSON array of arrays of token ids; each
    /// sequence's tokens 1..n are predicted from those before.
    #[arg(long, conflicts_with = "input")]
    pub tokens: Option<PathBuf>,
    /// A text file, tokenized with the dataset's tokenizer and cut into
    /// windows of max_seq_len + 1 tokens.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Without --tokens or --input: the job's held-out split (a dataset
    /// decomposed with --holdout-fraction), in windows of max_seq_len + 1
    /// (as `[eval]` during training); at most this many of its tokens
    /// [default: all].
    #[arg(long)]
    pub holdout_tokens: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

/// `text`'s tokens in consecutive windows of `len` (the last may be
/// shorter; one of a single token predicts nothing and is dropped).
fn windows(ids: &[u32], len: usize) -> Vec<Vec<u32>> {
    ids.chunks(len)
        .filter(|w| w.len() >= 2)
        .map(<[u32]>::to_vec)
        .collect()
}

fn read_tokens(path: &Path) -> anyhow::Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UserError(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str::<Vec<Vec<u32>>>(&text).map_err(|e| {
        UserError(format!(
            "{}: not a JSON array of arrays of token ids: {e}",
            path.display()
        ))
        .into()
    })
}

pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        // The inputs are checked before the checkpoint is read.
        let tokens = match &args.tokens {
            Some(path) => Some((read_tokens(path)?, path.display().to_string())),
            None => None,
        };
        let loaded = args.from.load().await?;
        let m = &loaded.manifest;
        let (sequences, source) = match (tokens, &args.input) {
            (Some(t), _) => t,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| UserError(format!("cannot read {}: {e}", path.display())))?;
                let (spec, name) = dataset_tokenizer(m).await?;
                let tok: Tokenizer = spec
                    .load()
                    .map_err(|e| UserError(format!("tokenizer {name}: {e}")))?;
                let ids = tok.encode(&text);
                (
                    windows(&ids, m.model.max_seq_len as usize + 1),
                    format!("{} ({name}, {} tokens)", path.display(), ids.len()),
                )
            }
            (None, None) => {
                let (loc, data) = dataset_of(m).await?;
                let url = loc.url().to_string();
                let ids = read_holdout(&loc, &data)
                    .await
                    .map_err(|e| UserError(e.to_string()))?
                    .ok_or_else(|| {
                        UserError(format!(
                            "the job's dataset {url} has no held-out split (decompose it with --holdout-fraction F), so give --tokens FILE.json or --input FILE"
                        ))
                    })?;
                let keep = args
                    .holdout_tokens
                    .map_or(ids.len(), |n| (n as usize).min(ids.len()));
                (
                    windows(&ids[..keep], m.model.max_seq_len as usize + 1),
                    format!("the held-out split of {url} ({keep} tokens)"),
                )
            }
        };
        let model = m.model;
        let master = loaded.master;
        let r = tokio::task::spawn_blocking(move || mean_loss(&model, &master, &sequences))
            .await
            .context("evaluation thread")?
            .map_err(|e| UserError(format!("{source}: {e}")))?;
        if args.json {
            let v = json!({
                "checkpoint": loaded.url,
                "step": m.step,
                "source": source,
                "loss": r.loss,
                "tokens": r.tokens,
                "sequences": r.sequences,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "step {} of {}: mean loss {:.6} over {} tokens in {} sequences ({source})",
                m.step, m.job, r.loss, r.tokens, r.sequences
            );
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_windows_predict_every_token_but_each_first() {
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(
            windows(&ids, 4),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
        );
        assert_eq!(windows(&ids[..9], 4).len(), 2);
    }
}
