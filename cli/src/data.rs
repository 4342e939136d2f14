//! `strata decompose` and `strata data inspect|stream`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use strata_dataplane::corpus::{Corpus, CorpusError, CorpusOptions, Input, Progress, Quiet};
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
        let store = StoreOptions::from_env();
        let inputs = args
            .input
            .iter()
            .map(|i| Input::parse(i, &store))
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)?;
        let options = CorpusOptions {
            text_field: args.text_field.clone(),
            ..CorpusOptions::default()
        };
        let corpus = Corpus::open_inputs(&inputs, options)
            .await
            .map_err(corpus_error)?;
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
