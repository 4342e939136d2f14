//! `strata bench train`: a recipe's model trained on one rank, with no
//! coordinator, on the chosen backend; prints tokens/s, the step-time
//! split, MFU and peak memory (JSON with `--json`, the same fields as
//! `bench/torch_reference.py`).

use std::path::PathBuf;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use clap::{Args, Subcommand, ValueEnum};
use strata_dataplane::memory::gib;
use strata_recipe::{DeviceKind, Precision};
use strata_worker::bench::{self, Peak, Target, TrainBench, TrainReport};

use crate::format::table;
use crate::{UserError, load_recipe};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Train a recipe's whole model on one rank for a few steps on
    /// synthetic tokens and report tokens/s, the step-time split, MFU and
    /// peak memory.
    Train(TrainArgs),
    /// The coordinator at cluster scale: a rank simulator plays 1,024 to
    /// 16,384 ranks against a `strata coordinator` process; rendezvous,
    /// heartbeats, the engine lock, CPU and memory, faults and their
    /// recovery, `/metrics` and the job page (JSON with --json).
    Coordinator(crate::simbench::CoordinatorBenchArgs),
    /// NCCL's collectives on burn's CUDA tensors over this machine's GPUs
    /// (one thread per GPU), checked against host sums in f32 and bf16,
    /// and the time of a 64 MiB all-reduce (needs the `cuda` feature).
    Nccl(NcclArgs),
    /// The TCP collective at growing group sizes, each member a thread
    /// with its own endpoint on loopback: the time for a group to form
    /// and agree once, the links a member holds, and a scalar
    /// all-reduce's latency by the log-round algorithm and by the ring.
    Collective(CollectiveArgs),
}

#[derive(Args)]
pub struct CollectiveArgs {
    /// Group sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4, 8, 16, 32, 64, 128, 256, 512])]
    sizes: Vec<usize>,
    /// Scalar all-reduces timed per size and algorithm.
    #[arg(long, default_value_t = 200)]
    reps: usize,
    /// The largest group also connected as a full mesh (every member to
    /// every other, as joins once did): n·(n − 1) links, each a descriptor
    /// at both ends, all in this process.
    #[arg(long, default_value_t = 64)]
    mesh_max: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct NcclArgs {
    /// GPUs to use, from the first visible one; all of them by default.
    #[arg(long)]
    gpus: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// burn's NdArray backend (CPU).
    Ndarray,
    /// burn-flex (CPU: gemm matmul, SIMD, rayon threads).
    Flex,
    /// burn's CUDA backend with kernel fusion (needs the `cuda` feature).
    Cuda,
    /// burn's CUDA backend without fusion.
    CudaUnfused,
    /// burn's wgpu backend with fusion, on the machine's graphics adapter
    /// (lavapipe on a CPU; needs the `wgpu` feature).
    Wgpu,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RecomputeArg {
    None,
    Selective,
    Full,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The job recipe (TOML): its model, seed, optimizer and schedule.
    recipe: PathBuf,
    #[command(flatten)]
    sets: crate::Sets,
    /// Measured steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Unmeasured steps first (kernel compilation, autotuning, allocator
    /// warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, value_enum, default_value_t = BackendArg::Flex)]
    backend: BackendArg,
    /// Sequence length; the recipe's max_seq_len by default.
    #[arg(long)]
    seq: Option<usize>,
    /// Tokens per optimizer step; the recipe's by default.
    #[arg(long)]
    tokens_per_step: Option<usize>,
    /// Microbatches per step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    microbatches: usize,
    /// Data-parallel replicas, on threads of this process (the step's
    /// tokens split between them): for measuring a replica's memory.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    dp: u16,
    /// Shard the optimizer over the replicas (ZeRO-1).
    #[arg(long)]
    shard_optimizer: bool,
    /// Activation recomputation; the recipe's `[model] recompute` by
    /// default.
    #[arg(long, value_enum)]
    recompute: Option<RecomputeArg>,
    /// Which GPU, among the visible ones.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// The device's peak rate in TFLOP/s, for MFU (known GPUs have a
    /// datasheet default; CPUs have none).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// What the model computes in: f32, or bf16 (mixed precision: f32
    /// master weights, norms, softmax and loss). bf16 on CUDA and f32 on
    /// the CPU by default.
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Train nothing: print the report's shape, seed, optimizer and
    /// learning rates as JSON (for `bench/torch_reference.py --like` on a
    /// machine where strata's own run cannot happen).
    #[arg(long)]
    describe: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Train(args) => train(args),
        BenchCommand::Coordinator(args) => crate::simbench::coordinator(args),
        BenchCommand::Nccl(args) => nccl(args),
        BenchCommand::Collective(args) => collective(args),
    }
}

#[cfg(feature = "cuda")]
fn nccl(args: NcclArgs) -> anyhow::Result<()> {
    let visible = strata_worker::cuda::device_count()?;
    let gpus = args.gpus.unwrap_or(visible);
    if gpus == 0 || gpus > visible {
        return Err(UserError(format!(
            "--gpus {gpus}: this machine has {visible} visible GPUs"
        ))
        .into());
    }
    let report = strata_worker::nccl::conformance(gpus)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &report.checks {
            let verdict = if c.pass { "ok" } else { "FAILED" };
            println!(
                "{:<15} {:<5} {verdict} {}",
                c.op,
                c.dtype,
                c.detail.as_deref().unwrap_or("")
            );
        }
        println!(
            "NCCL {} over {} GPUs: 64 MiB all-reduce {:.3} ms",
            report.nccl_version,
            report.world_size,
            report.all_reduce_64mib_s * 1e3
        );
    }
    if !report.pass {
        anyhow::bail!("NCCL conformance failed");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn nccl(_: NcclArgs) -> anyhow::Result<()> {
    Err(built_without("CUDA", "cuda"))
}

/// The error of a backend this binary was built without.
#[cfg(any(not(feature = "cuda"), not(feature = "wgpu")))]
fn built_without(what: &str, feature: &str) -> anyhow::Error {
    UserError(format!(
        "this strata was built without {what}: rebuild with `cargo build --release --features {feature}`"
    ))
    .into()
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let (recipe, _) = load_recipe(&args.recipe, &args.sets)?;
    let cfg = TrainBench {
        steps: args.steps,
        warmup: args.warmup,
        seq_len: args.seq.unwrap_or(recipe.model.max_seq_len as usize),
        tokens_per_step: args
            .tokens_per_step
            .unwrap_or(recipe.data.tokens_per_step as usize),
        microbatches: args.microbatches,
        dp: usize::from(args.dp),
        shard_optimizer: args.shard_optimizer,
        recompute: match args.recompute {
            Some(RecomputeArg::Full) => strata_recipe::Recompute::Full,
            Some(RecomputeArg::None) => strata_recipe::Recompute::None,
            Some(RecomputeArg::Selective) => strata_recipe::Recompute::Selective,
            None => recipe.recompute,
        },
    };
    cfg.rows().map_err(UserError)?;
    if args.describe {
        let report = bench::describe(&recipe, &cfg);
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if args.steps == 0 {
        return Err(UserError("--steps must be at least 1".into()).into());
    }
    let user_peak = args.peak_tflops.map(|tflops| Peak {
        tflops,
        source: "--peak-tflops".into(),
    });
    let precision = match (args.precision, args.backend) {
        (Some(PrecisionArg::F32), _) => Precision::F32,
        (Some(PrecisionArg::Bf16), _) => Precision::Bf16,
        (None, BackendArg::Ndarray | BackendArg::Flex) => Precision::default_for(DeviceKind::Cpu),
        (None, BackendArg::Wgpu) => Precision::default_for(DeviceKind::Wgpu),
        (None, BackendArg::Cuda | BackendArg::CudaUnfused) => {
            Precision::default_for(DeviceKind::Cuda)
        }
    };
    if precision == Precision::Bf16 && args.backend == BackendArg::Ndarray {
        return Err(UserError(
            "--precision bf16: NdArray computes in f32 only; use --backend flex".into(),
        )
        .into());
    }
    let report = match args.backend {
        BackendArg::Ndarray => bench::train::<Autodiff<NdArray<f32>>>(
            &recipe,
            &cfg,
            cpu_target("ndarray", user_peak, precision),
        ),
        BackendArg::Flex => bench::train::<Autodiff<burn::backend::Flex>>(
            &recipe,
            &cfg,
            cpu_target("flex", user_peak, precision),
        ),
        BackendArg::Cuda | BackendArg::CudaUnfused => {
            cuda_train(&recipe, &cfg, args.backend, args.gpu, user_peak, precision)?
        }
        BackendArg::Wgpu => wgpu_train(&recipe, &cfg, user_peak, precision)?,
    }
    .map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// A CPU backend: its default device, the process's peak RSS as memory.
fn cpu_target<B: AutodiffBackend>(
    name: &str,
    peak: Option<Peak>,
    precision: Precision,
) -> Target<B> {
    Target {
        backend: name.into(),
        device_name: format!("CPU, {} threads", rayon_threads()),
        precision,
        device: Default::default(),
        device_kind: strata_recipe::DeviceKind::Cpu,
        peak,
        peak_memory: Box::new(bench::peak_rss_bytes),
        peak_heap: Box::new(|| {
            crate::heap::start();
            Box::new(crate::heap::peak)
        }),
        in_use: None,
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(feature = "cuda")]
fn cuda_train(
    recipe: &strata_recipe::Recipe,
    cfg: &TrainBench,
    backend: BackendArg,
    gpu: usize,
    user_peak: Option<Peak>,
    precision: Precision,
) -> anyhow::Result<Result<TrainReport, String>> {
    use strata_worker::cuda;

    let info = cuda::probe(gpu)?;
    tracing::info!(gpu, name = %info.name, "GPU found");
    let peak = user_peak.or_else(|| {
        cuda::bf16_peak_tflops(&info.name).map(|(tflops, source)| Peak {
            tflops,
            source: source.into(),
        })
    });
    fn target<B: AutodiffBackend<Device = burn::backend::cuda::CudaDevice>>(
        name: &str,
        info: &cuda::GpuInfo,
        peak: Option<Peak>,
        precision: Precision,
    ) -> Target<B> {
        let gpu = info.index;
        Target {
            backend: name.into(),
            device_name: format!(
                "{} (GPU {}, sm_{}{}, {:.0} GiB)",
                info.name,
                gpu,
                info.capability.0,
                info.capability.1,
                gib(info.memory_bytes)
            ),
            precision,
            device: cuda::device(gpu),
            device_kind: strata_recipe::DeviceKind::Cuda,
            peak,
            peak_memory: Box::new(move || cuda::memory_in_use(gpu)),
            peak_heap: Box::new(|| Box::new(|| None)),
            in_use: Some(Box::new(cuda::in_use_reader(gpu))),
        }
    }
    Ok(match backend {
        BackendArg::Cuda => bench::train::<Autodiff<cuda::CudaFused>>(
            recipe,
            cfg,
            target("cuda", &info, peak, precision),
        ),
        _ => bench::train::<Autodiff<cuda::CudaUnfused>>(
            recipe,
            cfg,
            target("cuda-unfused", &info, peak, precision),
        ),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_train(
    _: &strata_recipe::Recipe,
    _: &TrainBench,
    _: BackendArg,
    _: usize,
    _: Option<Peak>,
    _: Precision,
) -> anyhow::Result<Result<TrainReport, String>> {
    Err(built_without("CUDA", "cuda"))
}

#[cfg(feature = "wgpu")]
fn wgpu_train(
    recipe: &strata_recipe::Recipe,
    cfg: &TrainBench,
    peak: Option<Peak>,
    precision: Precision,
) -> anyhow::Result<Result<TrainReport, String>> {
    use strata_worker::wgpu;

    if precision == Precision::Bf16 {
        return Err(UserError("--precision bf16: WGSL has no bf16 type; use f32".into()).into());
    }
    let info = wgpu::probe().map_err(|e| UserError(e.to_string()))?;
    tracing::info!(adapter = %info.name, kind = %info.kind, "wgpu adapter found");
    let device = wgpu::device();
    let memory_device = device.clone();
    // Read on this thread's stream, the one the trainer runs on.
    let in_use = wgpu::in_use_reader(&device);
    Ok(bench::train::<Autodiff<wgpu::WgpuFused>>(
        recipe,
        cfg,
        Target {
            backend: "wgpu".into(),
            device_name: format!(
                "{} ({}, {}; {})",
                info.name, info.kind, info.api, info.driver
            ),
            precision,
            device,
            device_kind: DeviceKind::Wgpu,
            peak,
            in_use: Some(Box::new(in_use)),
            peak_memory: Box::new(move || wgpu::memory_reserved(&memory_device)),
            peak_heap: Box::new(|| Box::new(|| None)),
        },
    ))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_train(
    _: &strata_recipe::Recipe,
    _: &TrainBench,
    _: Option<Peak>,
    _: Precision,
) -> anyhow::Result<Result<TrainReport, String>> {
    Err(built_without("wgpu", "wgpu"))
}

fn render(r: &TrainReport) -> String {
    let mut rows = vec![
        (
            "backend".to_string(),
            format!("{} on {}", r.backend, r.device),
        ),
        (
            "model".into(),
            format!(
                "{} layers, d={}, {} heads ({} KV), ffn {}, vocab {}: {:.1}M parameters",
                r.n_layers,
                r.d_model,
                r.n_heads,
                r.n_kv_heads,
                r.d_ffn,
                r.vocab,
                r.params as f64 / 1e6
            ),
        ),
        (
            "batch".into(),
            format!(
                "{} tokens per step, sequences of {}, {} microbatches",
                r.tokens_per_step, r.seq_len, r.microbatches
            ),
        ),
        ("tokens/s".into(), format!("{:.0}", r.tokens_per_s)),
        (
            "step".into(),
            format!(
                "{:.3} s (forward {:.3}, backward {:.3}, optimizer {:.3})",
                r.step_s, r.forward_s, r.backward_s, r.optimizer_s
            ),
        ),
        (
            "compute".into(),
            format!(
                "{:.3} TFLOP/s at {:.3e} FLOPs per token",
                r.achieved_tflops, r.flops_per_token
            ),
        ),
    ];
    if let (Some(mfu), Some(p)) = (r.mfu, &r.peak) {
        rows.push((
            "MFU".into(),
            format!("{:.1}% of {} TFLOP/s ({})", mfu * 100.0, p.tflops, p.source),
        ));
    }
    if let Some(b) = r.peak_memory_bytes {
        let plan = r.memory_plan.total_bytes;
        rows.push(("peak memory".into(), format!("{:.2} GiB", gib(b))));
        // Per replica: the process holds `dp` of them.
        let measured = r
            .peak_heap_bytes
            .or(r.memory_baseline_bytes.map(|base| b.saturating_sub(base)))
            .map(|m| m / r.dp.max(1) as u64);
        if let Some(m) = measured {
            rows.push((
                "memory plan".into(),
                format!(
                    "{:.3} GiB planned per replica, {:.3} GiB measured ({}), {:+.1}%",
                    gib(plan),
                    gib(m),
                    if r.peak_heap_bytes.is_some() {
                        "the heap's peak since the model was built"
                    } else {
                        "above the reading before the model"
                    },
                    (plan as f64 / m as f64 - 1.0) * 100.0
                ),
            ));
        }
    }
    if let Some(u) = r.peak_in_use_bytes {
        rows.push((
            "pools in use".into(),
            format!(
                "{:.3} GiB at most seen (sampled each ms), {:+.1}% planned",
                gib(u),
                (r.memory_plan.total_bytes as f64 / u as f64 - 1.0) * 100.0
            ),
        ));
    }
    rows.push((
        "host transfers".into(),
        format!("{:.0} elements per step", r.host_elems_per_step),
    ));
    rows.push((
        "loss".into(),
        format!(
            "{:.4} → {:.4}",
            r.losses.first().copied().unwrap_or(f64::NAN),
            r.losses.last().copied().unwrap_or(f64::NAN)
        ),
    ));
    table(
        "",
        &rows
            .iter()
            .map(|(a, b)| vec![a.clone(), b.clone()])
            .collect::<Vec<_>>(),
    )
}

fn collective(args: CollectiveArgs) -> anyhow::Result<()> {
    if let Some(&bad) = args.sizes.iter().find(|&&n| n < 2) {
        return Err(UserError(format!(
            "--sizes: a group of {bad} has nothing to measure (2 or more)"
        ))
        .into());
    }
    let rows = strata_worker::collective::scale::measure(&args.sizes, args.reps, args.mesh_max)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut out = vec![vec![
        "members".to_string(),
        "form (s)".into(),
        "scalar log (µs)".into(),
        "scalar ring (µs)".into(),
        "links out/in".into(),
        "full mesh (s)".into(),
    ]];
    for r in &rows {
        out.push(vec![
            r.members.to_string(),
            format!("{:.3}", r.form_s),
            format!("{:.0}", r.scalar_us),
            format!("{:.0}", r.ring_scalar_us),
            format!("{}/{}", r.links_out, r.links_in),
            r.full_mesh_s.map_or("-".into(), |s| format!("{s:.3}")),
        ]);
    }
    print!("{}", table("", &out));
    Ok(())
}
