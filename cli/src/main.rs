//! `strata`: the command-line face of strata.

mod bench;
mod chart;
mod data;
mod demo;
mod export;
mod fit;
mod format;
mod import;
mod jobs;
mod plan;
mod plot;
mod results;
mod schedule;
mod sim;
mod simbench;
mod sweep;
mod telemetry;
mod top;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use strata_recipe::Recipe;

/// Training allocates and frees logits-sized tensors every step; mimalloc
/// reuses their pages where glibc unmaps and faults them in again (a third
/// of a CPU worker's time went to page faults).
#[global_allocator]
static ALLOC: heap::Counting = heap::Counting;

/// mimalloc, and (once [`heap::start`] is called: `strata bench train`)
/// the peak of the bytes live on the heap, which the memory plan is
/// checked against. Until then an allocation costs one relaxed load more.
pub mod heap {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

    pub struct Counting;

    static ON: AtomicBool = AtomicBool::new(false);
    static LIVE: AtomicI64 = AtomicI64::new(0);
    static PEAK: AtomicI64 = AtomicI64::new(0);

    fn grew(by: i64) {
        let now = LIVE.fetch_add(by, Relaxed) + by;
        PEAK.fetch_max(now, Relaxed);
    }

    #[allow(unsafe_code)]
    // SAFETY: every call is mimalloc's with the caller's arguments; the
    // counting around it touches only atomics.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let p = unsafe { mimalloc::MiMalloc.alloc(l) };
            if ON.load(Relaxed) && !p.is_null() {
                grew(l.size() as i64);
            }
            p
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(l) };
            if ON.load(Relaxed) && !p.is_null() {
                grew(l.size() as i64);
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            if ON.load(Relaxed) {
                LIVE.fetch_sub(l.size() as i64, Relaxed);
            }
            unsafe { mimalloc::MiMalloc.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            let q = unsafe { mimalloc::MiMalloc.realloc(p, l, new) };
            if ON.load(Relaxed) && !q.is_null() {
                grew(new as i64 - l.size() as i64);
            }
            q
        }
    }

    /// Counts from now: live bytes start at zero (frees of older
    /// allocations make them negative, which the peak ignores).
    pub fn start() {
        LIVE.store(0, Relaxed);
        PEAK.store(0, Relaxed);
        ON.store(true, Relaxed);
    }

    /// The most bytes live at once since [`start`].
    pub fn peak() -> Option<u64> {
        ON.load(Relaxed).then(|| PEAK.load(Relaxed).max(0) as u64)
    }
}

/// `mi_option_purge_delay` in mimalloc.h (v3's option enum).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// Tells mimalloc never to return freed memory to the OS. A training step
/// frees and reallocates the same large activation and logits buffers
/// every step; returned to the OS, each is faulted in and zeroed again
/// (a third of a CPU step's time for the 124M model, measured with perf).
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: sets one of mimalloc's documented options to a documented
    // value (-1: no purging); called once, before any thread is started.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "strata: distributed LLM pretraining orchestrator",
    long_about = "strata plans, launches and watches 3D-parallel LLM pretraining jobs.\n\
                  Start with `strata plan examples/tiny-cpu.toml`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Resolve a recipe and report its size, compute, schedule and the scaling laws' advice.
    ///
    /// With --budget-flops instead of a recipe: the compute-optimal model size
    /// and token count under each Chinchilla fit.
    Plan(plan::PlanArgs),
    /// Evaluate a recipe's learning-rate schedule at given token counts, or plot it.
    Schedule(schedule::ScheduleArgs),
    /// Tokenize a corpus and write it as dataset-decomposition buckets (Arrow)
    /// on object storage.
    Decompose(data::DecomposeArgs),
    /// Look at a decomposed dataset and the curriculum's steps over it.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Decompose a bundled book, start a coordinator, train a small
    /// data-parallel job on it and summarise the run.
    Demo(demo::DemoArgs),
    /// Run the coordinator: accepts jobs, launches and watches their workers.
    Coordinator(jobs::CoordinatorArgs),
    /// Run one worker (started by the coordinator's launcher).
    Worker(jobs::WorkerArgs),
    /// Submit a job recipe to the coordinator; prints the job id.
    Submit(jobs::SubmitArgs),
    /// A job's state and progress.
    Status(jobs::JobArgs),
    /// Every job the coordinator knows.
    List(jobs::ListArgs),
    /// Stop a job and all its workers.
    Cancel(jobs::CancelArgs),
    /// Continue an ended job from a checkpoint, on its layout or another.
    Resume(jobs::ResumeArgs),
    /// Start a cooldown branch of a WSD or Power job from one of its
    /// stable-phase checkpoints: the decay starts there.
    Branch(jobs::BranchArgs),
    /// A job's complete checkpoints: step, tokens, size, stall.
    Checkpoints(jobs::CheckpointsArgs),
    /// The nodes workers run on (Slurm: from sinfo), their slots and state.
    Nodes(jobs::NodesArgs),
    /// The coordinator's jobs, live in the terminal: states, progress,
    /// loss, throughput and ETA; the selected job's curves and step time.
    Top(top::TopArgs),
    /// Write a checkpoint as a Hugging Face Llama (config.json,
    /// model.safetensors), gathered from any layout.
    Export(export::ExportArgs),
    /// Write a Hugging Face Llama folder as a strata checkpoint (step 0)
    /// in a recipe's layout, checked against its [model].
    Import(import::ImportArgs),
    /// A checkpoint's mean next-token loss on exact token sequences or a
    /// text file.
    Eval(export::EvalArgs),
    /// Fit scaling laws to a CSV of runs: Chinchilla's L(N, D), and the
    /// learning rate and batch size as power laws in N and D, with
    /// bootstrap intervals.
    Fit(fit::FitArgs),
    /// The results table of jobs (N, D, FLOPs, peak LR, batch, final
    /// train and held-out losses, wall time) as CSV, Parquet or JSON: what
    /// `strata fit` reads.
    Results(results::ResultsArgs),
    /// Sweeps: submit a sweep file, follow, cancel, resubmit and report them.
    Sweep(sweep::SweepArgs),
    /// A job's per-step metrics (loss, lr, tokens/s, step-time split).
    Metrics(jobs::MetricsArgs),
    /// The rank simulator: thousands of simulated workers speaking the real
    /// protocol to a real coordinator, faults on command, Slurm stand-ins.
    #[command(subcommand)]
    Sim(sim::SimCommand),
    /// Benchmarks: `strata bench train RECIPE` trains a recipe's model on
    /// one rank and reports tokens/s, MFU and memory; `strata bench
    /// coordinator` measures the coordinator at cluster scale.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// An error in what the user gave us (a recipe, a flag, a file): exit status 2.
#[derive(Debug)]
pub struct UserError(pub String);

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

/// Ends the process with this status, quietly (after its spans are sent):
/// a worker stopped on request.
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// `--set KEY=VALUE`, repeated: overrides of a recipe's fields.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Sets {
    /// Override a recipe field: `--set optimizer.lr=1e-3 --set
    /// parallel.tp=2` (a TOML value; other text is a string; an array
    /// entry as `data.sources[1].weight=0.3`). Checked like the file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<strata_recipe::Override>,
}

/// Reads and validates a recipe file with `sets` written in: the recipe
/// and its text as submitted. Every failure is a [`UserError`] that
/// names the file.
pub fn load_recipe(path: &Path, sets: &Sets) -> anyhow::Result<(Recipe, String)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UserError(format!("cannot read recipe {}: {e}", path.display())))?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Recipe::from_toml_with(&text, &stem, &sets.sets)
        .map_err(|e| UserError(format!("{}: {e}", path.display())).into())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Plan(args) => plan::run(args),
        Command::Schedule(args) => schedule::run(args),
        Command::Decompose(args) => data::decompose(args),
        Command::Data(cmd) => data::data(cmd),
        Command::Demo(args) => demo::demo(args),
        Command::Coordinator(args) => jobs::coordinator(args),
        Command::Worker(args) => jobs::worker(args),
        Command::Submit(args) => jobs::submit(args),
        Command::Status(args) => jobs::status(args),
        Command::List(args) => jobs::list(args),
        Command::Cancel(args) => jobs::cancel(args),
        Command::Resume(args) => jobs::resume(args),
        Command::Checkpoints(args) => jobs::checkpoints(args),
        Command::Branch(args) => jobs::branch(args),
        Command::Nodes(args) => jobs::nodes(args),
        Command::Top(args) => top::run(args),
        Command::Export(args) => export::export(args),
        Command::Eval(args) => export::eval(args),
        Command::Import(args) => import::import(args),
        Command::Fit(args) => fit::run(args),
        Command::Results(args) => results::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Metrics(args) => jobs::metrics(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Sim(cmd) => sim::run(cmd),
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    // Logs go to stderr; RUST_LOG=info (or debug) shows more. The long-lived
    // processes (coordinator, worker) log their lifecycle at info by default.
    let default_level = match cli.command {
        Command::Coordinator(_) | Command::Worker(_) => "info",
        _ => "warn",
    };
    let service = match cli.command {
        Command::Coordinator(_) => "strata-coordinator",
        Command::Worker(_) => "strata-worker",
        _ => "strata",
    };
    let telemetry = telemetry::init(default_level, service);
    // One TLS provider for every HTTPS client the process makes (S3,
    // the benchmarks' scrapes); one installed already is kept.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = run(cli);
    // The last spans are sent before the process ends.
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(ExitWith(code)) = e.downcast_ref::<ExitWith>() {
                ExitCode::from(*code)
            } else if let Some(user) = e.downcast_ref::<UserError>() {
                eprintln!("error: {user}");
                ExitCode::from(2)
            } else {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Writes `contents` to `path` through a temporary file in the same folder,
/// so a failed write never leaves a half-written file where the old one was.
pub fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot move {} to {}", tmp.display(), path.display())
    })
}
