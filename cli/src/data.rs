//! `strata decompose` and `strata data inspect|stream`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use strata_dataplane::corpus::{Corpus, CorpusError, CorpusOptions, Progress, Quiet};
use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::loader::{Cursor, Loader, LoaderConfig, LoaderError};
use strata_dataplane::manifest::{Layout, Manifest, TokenizerInfo};
use strata_dataplane::reader::{ReadError, read_manifest};
use strata_dataplane::store::{Location, StoreError, StoreOptions};
use strata_dataplane::tokenize::TokenizerSpec;
use strata_dataplane::writer::{DatasetWriter, WriteError, WriterOptions};
use strata_recipe::{Curriculum, NamedCurriculum};

use crate::format::{count, table};
use crate::{UserError, write_atomically};

#[derive(Args)]
pub struct DecomposeArgs {
    /// Files or folders of them: plain text (one document per file), JSON
    /// lines (`.jsonl`, `.json`, `.ndjson`; plain, `.gz` or `.zst`),
    /// Parquet, Arrow IPC, a Hugging Face `datasets` folder (saved with
    /// `save_to_disk`) or a Hub snapshot's Parquet shards; on local disk,
    /// or a folder on object storage (s3://bucket/prefix, credentials as
    /// for --output).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<String>,
    /// The JSON field, or Parquet/Arrow column, that holds each document's
    /// text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// The split to read from a folder of several, named as Hugging Face
    /// `datasets` names them: a saved DatasetDict's, a Hub snapshot's
    /// `data/{split}-NNNNN-of-NNNNN` shards, or files and folders named
    /// train, validation (valid, dev, val) or test (eval). A folder of one
    /// split reads it without this; one of several is refused without it.
    #[arg(long)]
    split: Option<String>,
    /// Where the dataset goes: a path, file:///…, or s3://bucket/prefix
    /// (endpoint and credentials from AWS_* variables).
    #[arg(long)]
    output: String,
    /// r50k, cl100k, o200k (built in), or the path of a Hugging Face
    /// tokenizer.json.
    #[arg(long, default_value = "r50k")]
    tokenizer: TokenizerSpec,
    /// Smallest bucket: sequences of 2^min-log2 tokens.
    #[arg(long, default_value_t = 8)]
    min_log2: u32,
    /// Largest bucket.
    #[arg(long, default_value_t = 13)]
    max_log2: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How to cut documents longer than the largest bucket: `largest` or
    /// `random` (the reference code's seeded choice).
    #[arg(long, value_enum, default_value = "largest")]
    split_long: SplitLongArg,
    /// The concat-and-chunk baseline instead: documents concatenated and cut
    /// into sequences of LEN tokens (a power of two), one bucket.
    #[arg(long, value_name = "LEN")]
    concat_chunk: Option<u64>,
    /// Upper bound on a shard's size, in MiB. Smaller shards let writing
    /// overlap cutting and let the loader prefetch in finer steps.
    #[arg(long, default_value_t = 16)]
    shard_mib: u64,
    /// Replace a complete dataset at the output.
    #[arg(long)]
    overwrite: bool,
    /// Keep this fraction of the documents (whole, chosen by a draw seeded
    /// with --seed and each document's id) out of training: the held-out
    /// split that `strata eval` and a recipe's `[eval]` use.
    #[arg(long, default_value_t = 0.0, conflicts_with = "holdout_docs")]
    holdout_fraction: f64,
    /// Keep exactly this many documents (whole, chosen by a draw seeded
    /// with --seed) out of training instead.
    #[arg(long)]
    holdout_docs: Option<u64>,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
    /// Spread the work over this many worker processes, which the
    /// coordinator (--coordinator) launches as it launches training ranks
    /// (local processes or Slurm), each decomposing a contiguous part of
    /// the files; it commits the dataset when every part is in. A worker
    /// lost is started again by a new attempt and redoes its part only.
    /// Inputs, the output and a tokenizer.json must be reachable from
    /// the workers at the same paths or URLs.
    #[arg(long, value_name = "N")]
    workers: Option<u32>,
    /// With --workers: new attempts after a lost worker before the job
    /// fails.
    #[arg(long, default_value_t = 3, requires = "workers")]
    max_restarts: u32,
    #[command(flatten)]
    connect: crate::jobs::Connect,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SplitLongArg {
    Largest,
    Random,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// A dataset's manifest: buckets, sequences, tokens.
    Inspect {
        url: String,
        #[arg(long)]
        json: bool,
    },
    /// The steps a curriculum draws, as one JSON object per step.
    Stream(StreamArgs),
}

#[derive(Args)]
pub struct StreamArgs {
    url: String,
    /// uniform, grow-linear, grow-p2, or odds per bucket (smallest first): 4,2,1.
    #[arg(long, default_value = "grow-p2", value_parser = parse_curriculum)]
    curriculum: Curriculum,
    #[arg(long, default_value_t = 1)]
    cycles: u32,
    #[arg(long)]
    tokens_per_step: u64,
    #[arg(long, default_value_t = 1)]
    dp_size: u32,
    #[arg(long, default_value_t = 0)]
    dp_rank: u32,
    #[arg(long)]
    steps: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip buckets longer than this.
    #[arg(long)]
    max_seq_len: Option<u64>,
    /// Resume from a cursor saved by --cursor-out.
    #[arg(long)]
    cursor_in: Option<PathBuf>,
    /// Save the cursor after the last step.
    #[arg(long)]
    cursor_out: Option<PathBuf>,
    /// One JSON object per step (the only output format).
    #[arg(long)]
    json: bool,
}

fn parse_curriculum(s: &str) -> Result<Curriculum, String> {
    if let Some((_, c)) = NamedCurriculum::ALL.iter().find(|(n, _)| *n == s) {
        return Ok(Curriculum::Named(*c));
    }
    s.split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<Vec<_>, _>>()
        .map(Curriculum::Odds)
        .map_err(|_| format!("`{s}`: use uniform, grow-linear, grow-p2 or comma-separated odds"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Errors the user can fix (a bad path, URL, dataset) exit with status 2.
fn user_error(e: impl std::fmt::Display) -> anyhow::Error {
    UserError(e.to_string()).into()
}

fn store_error(e: StoreError) -> anyhow::Error {
    match e {
        StoreError::Io { .. } => anyhow::Error::new(e),
        other => user_error(other),
    }
}

fn write_error(e: WriteError) -> anyhow::Error {
    match e {
        WriteError::Store(s) => store_error(s),
        WriteError::Complete { .. } | WriteError::Options(_) => user_error(e),
        other => anyhow::Error::new(other),
    }
}

fn corpus_error(e: CorpusError) -> anyhow::Error {
    match e {
        CorpusError::Write(w) => write_error(w),
        CorpusError::Store(s) => store_error(s),
        other => user_error(other),
    }
}

fn parts_error(e: strata_dataplane::parts::PartsError) -> anyhow::Error {
    use strata_dataplane::parts::PartsError;
    match e {
        PartsError::Write(w) => write_error(w),
        PartsError::Store(s) => store_error(s),
        PartsError::Corpus(c) => corpus_error(c),
        PartsError::Read(r) => read_error(r),
        other => user_error(other),
    }
}

fn read_error(e: ReadError) -> anyhow::Error {
    match e {
        ReadError::Store(s) => store_error(s),
        other => user_error(other),
    }
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn total_bytes(&self, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64, tokens: u64) {
        self.0.inc(bytes);
        self.0
            .set_message(format!("+{} tokens", count(tokens as f64)));
    }
}

pub fn decompose(args: DecomposeArgs) -> anyhow::Result<()> {
    if let Some(workers) = args.workers {
        return decompose_on_cluster(&args, workers);
    }
    let buckets = Buckets::new(args.min_log2, args.max_log2).map_err(user_error)?;
    let layout = match args.concat_chunk {
        Some(seq_len) => Layout::ConcatChunk { seq_len },
        None => Layout::Decomposed {
            split_long: match args.split_long {
                SplitLongArg::Largest => SplitLong::Largest,
                SplitLongArg::Random => SplitLong::Random,
            },
        },
    };
    let tokenizer = args.tokenizer.load().map_err(user_error)?;
    let opts = WriterOptions {
        tokenizer: TokenizerInfo::of(&tokenizer),
        layout,
        buckets,
        seed: args.seed,
        shard_bytes: args.shard_mib.max(1) << 20,
        overwrite: args.overwrite,
    };
    let rt = runtime()?;
    let summary = rt.block_on(async {
        // Every input is found and checked before the output is touched.
        let corpus = open_corpus(&args, &args.input).await?;
        let out = Location::parse(&args.output, true).map_err(store_error)?;
        let mut writer = DatasetWriter::create(out, opts)
            .await
            .map_err(write_error)?;
        match args.holdout_docs {
            Some(n) => {
                let total = corpus.count_documents().await.map_err(corpus_error)?;
                writer
                    .hold_out_documents(n, total)
                    .map_err(|e| UserError(format!("--holdout-docs: {e}")))?;
            }
            None => writer
                .hold_out(args.holdout_fraction)
                .map_err(|e| UserError(format!("--holdout-fraction: {e}")))?,
        }
        let show_bar = !args.json && std::io::stderr().is_terminal();
        let bar = Bar(if show_bar {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {msg}",
                )
                .expect("valid template"),
            );
            b
        } else {
            ProgressBar::hidden()
        });
        let progress: &dyn Progress = if show_bar { &bar } else { &Quiet };
        let result = corpus.decompose(tokenizer, writer, progress).await;
        bar.0.finish_and_clear();
        result.map_err(corpus_error)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let m = &summary.manifest;
        println!(
            "wrote {} ({} documents, {} skipped): {} tokens in, {} dropped, in {:.2} s ({} tokens/s; tokenizing {:.2} s)",
            args.output,
            m.n_documents,
            m.n_documents_skipped,
            count(m.n_tokens_in as f64),
            count(m.n_tokens_dropped as f64),
            summary.elapsed_s,
            count(summary.tokens_per_s),
            summary.tokenize_s,
        );
        for s in &summary.skipped {
            println!("  skipped {s}");
        }
        for f in &summary.ignored {
            println!("  left out {f} (not a data file, beside Parquet or Arrow files)");
        }
        if let Some(h) = &m.holdout {
            println!(
                "held out {} documents ({} tokens, {:.1}% of documents asked) in {}",
                h.n_documents,
                count(h.n_tokens as f64),
                100.0 * h.fraction,
                h.key
            );
        }
        print!("{}", bucket_table(m));
    }
    Ok(())
}

/// Finds and checks the corpus under `inputs` (S3 settings from `AWS_*`).
async fn open_corpus(args: &DecomposeArgs, inputs: &[String]) -> anyhow::Result<Corpus> {
    let options = CorpusOptions {
        text_field: args.text_field.clone(),
        split: args.split.clone(),
        ..CorpusOptions::default()
    };
    Corpus::open_named(inputs, &StoreOptions::from_env(), options)
        .await
        .map_err(corpus_error)
}

/// A local path as every worker reads it: absolute (a URL is kept).
fn absolute(input: &str) -> String {
    if input.contains("://") {
        return input.to_string();
    }
    std::path::absolute(input)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| input.to_string())
}

/// What a cluster decomposition prints with --json.
#[derive(serde::Serialize)]
struct ClusterSummary<'a> {
    job: &'a str,
    workers: u32,
    /// Attempts the job took (more than one: a worker was lost).
    attempts: usize,
    manifest: &'a Manifest,
    input_bytes: u64,
    /// From submission to the committed manifest.
    elapsed_s: f64,
    tokens_per_s: f64,
}

/// `strata decompose --workers N`: finds and checks the corpus here, cuts
/// its files into N parts, readies the output, submits the job and
/// follows it to the committed manifest.
fn decompose_on_cluster(args: &DecomposeArgs, workers: u32) -> anyhow::Result<()> {
    use strata_dataplane::parts::{CorpusPlan, DecomposeJob, plan_parts};
    use strata_dataplane::tokenize::TokenizerSpec as Spec;
    if args.concat_chunk.is_some() {
        return Err(user_error(
            "--concat-chunk with --workers: a concat-and-chunk sequence runs across documents, hence across parts; decompose it in one process",
        ));
    }
    if args.holdout_docs.is_some() {
        return Err(user_error(
            "--holdout-docs with --workers: an exact count is drawn in sequence over the whole corpus; use --holdout-fraction",
        ));
    }
    let buckets = Buckets::new(args.min_log2, args.max_log2).map_err(user_error)?;
    let tokenizer = match &args.tokenizer {
        Spec::Tiktoken(kind) => kind.to_string(),
        Spec::HuggingFace(path) => absolute(&path.display().to_string()),
    };
    if !(0.0..1.0).contains(&args.holdout_fraction) {
        return Err(user_error(format!(
            "--holdout-fraction: {} must be at least 0 and below 1",
            args.holdout_fraction
        )));
    }
    let inputs: Vec<String> = args.input.iter().map(|i| absolute(i)).collect();
    let output = absolute(&args.output);
    let rt = runtime()?;
    rt.block_on(async {
        let corpus = open_corpus(args, &inputs).await?;
        let files = corpus.files();
        let parts = plan_parts(&files, workers).map_err(user_error)?;
        let name = format!(
            "decompose-{}",
            output.rsplit('/').find(|s| !s.is_empty()).unwrap_or("dataset")
        );
        let job = DecomposeJob {
            name,
            inputs: inputs.clone(),
            text_field: args.text_field.clone(),
            split: args.split.clone(),
            output: output.clone(),
            tokenizer,
            buckets,
            split_long: match args.split_long {
                SplitLongArg::Largest => SplitLong::Largest,
                SplitLongArg::Random => SplitLong::Random,
            },
            seed: args.seed,
            shard_bytes: args.shard_mib.max(1) << 20,
            holdout_fraction: args.holdout_fraction,
            max_restarts: args.max_restarts,
            corpus: CorpusPlan::of(&corpus),
            parts,
        };
        let out = Location::parse(&output, true).map_err(store_error)?;
        strata_dataplane::parts::prepare(&out, args.overwrite)
            .await
            .map_err(parts_error)?;
        let start = std::time::Instant::now();
        let mut client = args.connect.client().await?;
        let id = client
            .submit_job(strata_proto::v1::SubmitJobRequest {
                spec_toml: job.to_json(),
                default_name: job.name.clone(),
                kind: strata_proto::v1::JobKind::Decompose as i32,
            })
            .await
            .map_err(|s| crate::jobs::status_error("SubmitJob", s))?
            .into_inner()
            .job_id;
        eprintln!(
            "{id}: {} files ({}) in {workers} parts",
            files.len(),
            indicatif::HumanBytes(corpus.bytes())
        );
        let ended = follow_parts(&mut client, &id, workers, !args.json).await?;
        if ended.state() != strata_proto::v1::JobState::Succeeded {
            anyhow::bail!(
                "{id} {}: {}",
                crate::jobs::state_name(ended.state),
                ended.failure_reason
            );
        }
        let manifest = read_manifest(&out).await.map_err(read_error)?;
        let elapsed_s = start.elapsed().as_secs_f64();
        if args.json {
            let summary = ClusterSummary {
                job: &id,
                workers,
                attempts: ended.attempts.len(),
                manifest: &manifest,
                input_bytes: corpus.bytes(),
                elapsed_s,
                tokens_per_s: manifest.n_tokens_in as f64 / elapsed_s.max(1e-9),
            };
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            println!(
                "wrote {output} with {workers} workers ({} documents, {} skipped; {} attempt{}): {} tokens in, {} dropped, in {elapsed_s:.2} s ({} tokens/s)",
                manifest.n_documents,
                manifest.n_documents_skipped,
                ended.attempts.len(),
                if ended.attempts.len() == 1 { "" } else { "s" },
                count(manifest.n_tokens_in as f64),
                count(manifest.n_tokens_dropped as f64),
                count(manifest.n_tokens_in as f64 / elapsed_s.max(1e-9)),
            );
            print!("{}", bucket_table(&manifest));
        }
        Ok(())
    })
}

/// Polls a decomposition until it ends, showing its parts finished.
async fn follow_parts(
    client: &mut crate::jobs::Client,
    id: &str,
    workers: u32,
    show: bool,
) -> anyhow::Result<strata_proto::v1::Job> {
    let bar = if show && std::io::stderr().is_terminal() {
        let b = ProgressBar::new(u64::from(workers));
        b.set_style(
            ProgressStyle::with_template("{spinner} {prefix} parts {pos}/{len} {msg}")
                .expect("valid template"),
        );
        b.set_prefix(id.to_string());
        b
    } else {
        ProgressBar::hidden()
    };
    loop {
        let job = client
            .get_job(strata_proto::v1::GetJobRequest {
                job_id: id.to_string(),
            })
            .await
            .map_err(|s| crate::jobs::status_error("GetJob", s))?
            .into_inner();
        bar.set_position(job.steps_done);
        bar.set_message(crate::jobs::state_name(job.state));
        if crate::jobs::is_final(job.state) {
            bar.finish_and_clear();
            return Ok(job);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

fn bucket_table(m: &Manifest) -> String {
    let total: u64 = m.buckets.iter().map(|b| b.n_tokens).sum::<u64>().max(1);
    let mut rows = vec![vec![
        "bucket".to_string(),
        "sequences".into(),
        "tokens".into(),
        "share".into(),
        "shards".into(),
        String::new(),
    ]];
    for b in &m.buckets {
        let share = b.n_tokens as f64 / total as f64;
        rows.push(vec![
            format!("D{:02} ({})", b.seq_len.trailing_zeros(), b.seq_len),
            b.n_sequences.to_string(),
            count(b.n_tokens as f64),
            format!("{:.1}%", 100.0 * share),
            b.shards.len().to_string(),
            "#".repeat((share * 40.0).round() as usize),
        ]);
    }
    table("  ", &rows)
}

pub fn data(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Inspect { url, json } => {
            let rt = runtime()?;
            let manifest = rt.block_on(async {
                let loc = Location::parse(&url, false).map_err(store_error)?;
                read_manifest(&loc).await.map_err(read_error)
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&manifest)?);
            } else {
                println!(
                    "{url}: {} tokenizer, {} documents ({} skipped), {} tokens in, {} dropped, seed {}",
                    manifest.tokenizer.name,
                    manifest.n_documents,
                    manifest.n_documents_skipped,
                    count(manifest.n_tokens_in as f64),
                    count(manifest.n_tokens_dropped as f64),
                    manifest.seed
                );
                print!("{}", bucket_table(&manifest));
            }
            Ok(())
        }
        DataCommand::Stream(args) => stream(args),
    }
}

fn stream(args: StreamArgs) -> anyhow::Result<()> {
    let cursor: Option<Cursor> =
        match &args.cursor_in {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| user_error(format!("cannot read cursor {}: {e}", p.display())))?;
                Some(serde_json::from_str(&text).map_err(|e| {
                    user_error(format!("{}: not a loader cursor: {e}", p.display()))
                })?)
            }
        };
    let cfg = LoaderConfig {
        curriculum: args.curriculum.clone(),
        cycles: args.cycles,
        tokens_per_step: args.tokens_per_step,
        dp_rank: args.dp_rank,
        dp_size: args.dp_size,
        seed: args.seed,
        max_seq_len: args.max_seq_len,
        mixture: Default::default(),
        deal_blocks: 1,
    };
    let rt = runtime()?;
    let final_cursor = rt.block_on(async {
        let loc = Location::parse(&args.url, false).map_err(store_error)?;
        let manifest = read_manifest(&loc).await.map_err(read_error)?;
        let mut loader = Loader::new(loc, manifest, &cfg, cursor).map_err(|e| match e {
            LoaderError::Config(m) => user_error(m),
            other => anyhow::Error::new(other),
        })?;
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        for _ in 0..args.steps {
            let batch = loader.next_batch().await.map_err(|e| match e {
                LoaderError::Read(r) => user_error(r),
                other => anyhow::Error::new(other),
            })?;
            let line = serde_json::json!({
                "step": batch.step,
                "log2": batch.log2,
                "seq_len": batch.seq_len,
                "epoch": batch.epoch,
                "cycle": batch.cycle,
                "n_sequences": batch.n_sequences(),
                "n_sequences_global": batch.n_sequences_global,
                "doc_ids": batch.doc_ids,
            });
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        anyhow::Ok(loader.cursor().clone())
    })?;
    if let Some(p) = &args.cursor_out {
        write_atomically(p, serde_json::to_string_pretty(&final_cursor)?.as_bytes())?;
    }
    Ok(())
}
