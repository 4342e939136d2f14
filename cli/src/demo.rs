//! `strata demo`: the whole path in one command. Decomposes the bundled
//! *Moby-Dick* (one document per chapter), starts a coordinator in this
//! process, submits a small job (two data-parallel worker processes by
//! default; `--tp` and `--pp` add tensor and pipeline parallelism),
//! follows it and prints a summary.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use strata_coordinator::{Coordinator, CoordinatorConfig, Inventory};
use strata_dataplane::corpus::{Quiet, decompose_corpus};
use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::manifest::{Layout, TokenizerInfo};
use strata_dataplane::store::Location;
use strata_dataplane::tokenize::TokenizerKind;
use strata_dataplane::writer::{DatasetWriter, WriterOptions};

use crate::UserError;
use crate::jobs::{Connect, fetch_metrics, shown, submit_text, watch};

const MOBY_DICK: &str = include_str!("../assets/moby-dick.txt");

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo's corpus, dataset, job store and worker logs go
    /// [default: $TMPDIR/strata-demo].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Text files or folders to train on instead of the bundled Moby-Dick.
    #[arg(long)]
    pub corpus: Vec<PathBuf>,
    /// Optimizer steps (1024 tokens each).
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Data-parallel replicas.
    #[arg(long, default_value_t = 2)]
    pub dp: u32,
    /// Tensor-parallel ranks per replica (the demo model's 4 query and 2
    /// KV heads allow 1 or 2).
    #[arg(long, default_value_t = 1)]
    pub tp: u32,
    /// Pipeline stages per replica (the demo model's 2 layers allow 1 or
    /// 2); each step then runs 1F1B over 2·pp microbatches.
    #[arg(long, default_value_t = 1)]
    pub pp: u32,
    /// What the workers train on: `cpu`, or `cuda` (one NVIDIA GPU per
    /// rank, GPUs 0..tp·pp·dp; needs a strata built with `--features
    /// cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,
}

impl DemoArgs {
    fn world(&self) -> u32 {
        self.tp * self.pp * self.dp
    }

    fn microbatches(&self) -> u32 {
        if self.pp > 1 { 2 * self.pp } else { 1 }
    }

    /// 1024, or more when the layout needs it: every bucket must split
    /// into the microbatches of every replica.
    fn tokens_per_step(&self) -> u64 {
        1024u64.max(128 * u64::from(self.dp) * u64::from(self.microbatches()))
    }
}

/// The demo's recipe: a small Llama on r50k tokens, sequences up to 128.
fn recipe(dataset: &str, args: &DemoArgs) -> String {
    let (steps, tokens_per_step) = (args.steps, args.tokens_per_step());
    let total = steps * tokens_per_step;
    let (tp, pp, dp, microbatches) = (args.tp, args.pp, args.dp, args.microbatches());
    format!(
        r#"name = "demo"
seed = 7

[model]
n_layers = 2
d_model = 64
n_heads = 4
n_kv_heads = 2
d_ffn = 176
vocab_size = 50257
max_seq_len = 128
rope_theta = 10000.0
tie_embeddings = true

[parallel]
tp = {tp}
pp = {pp}
dp = {dp}
microbatches = {microbatches}

[data]
dataset = "{dataset}"
curriculum = "grow-p2"
cycles = 4
tokens_per_step = {tokens_per_step}
total_tokens = {total}

[optimizer]
lr = 1e-2
weight_decay = 0.1
grad_clip = 1.0

[schedule]
kind = "wsd"
warmup_tokens = {warmup}
decay_tokens = {decay}
decay_shape = "one_minus_sqrt"

[device]
backend = "{device}"
"#,
        device = args.device,
        warmup = (steps / 10).max(1) * tokens_per_step,
        decay = (steps / 5).max(1) * tokens_per_step,
    )
}

/// Writes the bundled book as one file per chapter.
fn write_bundled(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut chapters: Vec<String> = Vec::new();
    for line in MOBY_DICK.split_inclusive('\n') {
        if line.starts_with("CHAPTER ") || chapters.is_empty() {
            chapters.push(String::new());
        }
        chapters.last_mut().expect("one chapter").push_str(line);
    }
    for (i, text) in chapters.iter().enumerate() {
        let path = dir.join(format!("chapter-{i:03}.txt"));
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    if args.steps == 0 || args.dp == 0 || args.tp == 0 || args.pp == 0 {
        return Err(UserError("--steps, --tp, --pp and --dp must be at least 1".into()).into());
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("strata-demo"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let corpus = if args.corpus.is_empty() {
        let c = dir.join("corpus");
        write_bundled(&c)?;
        eprintln!(
            "corpus: Moby-Dick (bundled), one document per chapter, in {}",
            shown(&c)
        );
        vec![c]
    } else {
        args.corpus.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        // 1. Decompose.
        let dataset_dir = dir.join("dataset");
        let loc = Location::parse(dataset_dir.to_str().context("a UTF-8 path")?, true)?;
        let tokenizer = TokenizerKind::R50k.load();
        let writer = DatasetWriter::create(
            loc,
            WriterOptions {
                tokenizer: TokenizerInfo::of(&tokenizer),
                layout: Layout::Decomposed {
                    split_long: SplitLong::Largest,
                },
                buckets: Buckets::new(5, 7).expect("valid buckets"),
                seed: 0,
                shard_bytes: 16 << 20,
                overwrite: true,
            },
        )
        .await?;
        let summary = decompose_corpus(&corpus, tokenizer, writer, &Quiet)
            .await
            .map_err(|e| UserError(e.to_string()))?;
        let m = &summary.manifest;
        eprintln!(
            "decomposed {} documents, {} tokens, into buckets of 32..128 tokens ({:.1} M tokens/s) at {}",
            m.n_documents,
            m.n_tokens_in,
            summary.tokens_per_s / 1e6,
            shown(&dataset_dir)
        );

        // 2. A coordinator in this process.
        let state_dir = dir.join("state");
        let mut cfg = CoordinatorConfig::new(
            "127.0.0.1:0".parse().expect("address"),
            state_dir.clone(),
            if args.device == "cuda" {
                Inventory::local_gpus(args.world())
            } else {
                Inventory::local(args.world())
            }
            .map_err(|e| UserError(e.to_string()))?,
            std::env::current_exe().context("the strata binary's path")?,
        );
        // A token even here: any user of this machine reaches loopback.
        let token = strata_coordinator::job::random_token().context("a random token")?;
        cfg.client_token = Some(token.clone());
        let coordinator = Coordinator::start(cfg).await.map_err(|e| UserError(e.to_string()))?;
        let connect = Connect {
            coordinator: Some(format!("http://{}", coordinator.addr)),
            token_file: None,
            token: Some(token),
            ca: None,
        };
        let result = async {
            let mut client = connect.client().await?;
            let url = format!("file://{}", shown(&dataset_dir));
            let id = submit_text(&mut client, recipe(&url, &args), "demo".into()).await?;
            eprintln!(
                "submitted {id}: {} steps of {} tokens, tp = {} pp = {} dp = {} ({} worker processes{})",
                args.steps,
                args.tokens_per_step(),
                args.tp,
                args.pp,
                args.dp,
                args.world(),
                if args.pp > 1 {
                    format!(", {} microbatches per step", args.microbatches())
                } else {
                    String::new()
                }
            );
            let job = watch(&mut client, &id, true).await?;
            let steps = fetch_metrics(&mut client, &id).await?;
            Ok::<_, anyhow::Error>((job, steps))
        }
        .await;
        coordinator.stop().await;
        let (job, steps) = result?;
        if job.state() != strata_proto::v1::JobState::Succeeded {
            anyhow::bail!("{} ended {}: {}", job.job_id, crate::jobs::state_name(job.state), job.failure_reason);
        }
        summarise(&job, &steps, &dir);
        Ok(())
    })
}

fn summarise(job: &strata_proto::v1::Job, steps: &[strata_proto::v1::StepMetrics], dir: &Path) {
    let mean = |s: &[strata_proto::v1::StepMetrics]| {
        s.iter().map(|x| x.loss).sum::<f64>() / s.len().max(1) as f64
    };
    let k = (steps.len() / 10).clamp(1, 20);
    let first = mean(&steps[..k.min(steps.len())]);
    let last = mean(&steps[steps.len().saturating_sub(k)..]);
    let mut rates: Vec<f64> = steps.iter().map(|s| s.tokens_per_s).collect();
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    println!(
        "{} succeeded: {} steps, {} tokens",
        job.job_id, job.steps_done, job.tokens_done
    );
    println!(
        "loss: {first:.3} (mean of the first {k} steps) -> {last:.3} (last {k}); perplexity {:.0} -> {:.0}",
        first.exp(),
        last.exp()
    );
    let world = job.layout.as_ref().map_or(1, |l| l.world_size);
    println!("throughput: {median:.0} tokens/s (median step, all {world} workers together)");
    if let Some(s) = steps.last()
        && s.stages.len() > 1
    {
        let stages: Vec<String> = s
            .stages
            .iter()
            .map(|st| {
                format!(
                    "stage {} computes {:.2} s and idles {:.0}%",
                    st.stage,
                    st.forward_s + st.backward_s,
                    100.0 * st.bubble
                )
            })
            .collect();
        println!(
            "pipeline (last step): {}; 1F1B idles {:.0}% when stages cost the same (here the last stage also computes the 50k-row head)",
            stages.join(", "),
            100.0 * s.bubble_theory
        );
    }
    println!("files: {}", shown(dir));
    println!("  worker logs: {}/attempt-*/rank-*.log", job.run_dir);
    println!("  job store:   {}/state", shown(dir));
}
