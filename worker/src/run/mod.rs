//! A worker process's life: register with the coordinator, get the
//! assignment, join the collective groups, train, report, finish.
//!
//! The worker is handed a coordinator URL, a job, a rank and the job's
//! token; it never learns which launcher started it.
//!
//! This file is the process's start-up, top to bottom; [`heartbeat`] runs
//! beside the training thread (heartbeats, SIGTERM, the stop request),
//! [`rendezvous`] publishes the collective address and joins the groups
//! through a [`CollectiveBackend`], [`steps`] is the step loop, with
//! [`checkpoints`] and [`eval`] beside it, and [`report`] is the only
//! place that speaks protobuf. A decomposition's worker takes its part of
//! the corpus instead of training ([`decompose`]).

mod checkpoints;
mod decompose;
mod eval;
mod heartbeat;
mod init;
mod rendezvous;
mod report;
mod steps;

use std::net::SocketAddr;
use std::sync::Arc;

use burn::backend::Autodiff;
use strata_dataplane::reader::read_manifest;
use strata_dataplane::store::Location;
use strata_recipe::{DeviceKind, Recipe};

pub use rendezvous::advertised;

use crate::collective::{CollectiveBackend, TcpEndpoint};
use heartbeat::{Pulse, Stop};
use report::Reporter;

/// The CPU backend workers train on: burn-flex (gemm matmuls with AVX-512
/// where the CPU has it, SIMD elementwise kernels, rayon threads) with
/// autodiff, and strata's own kernels for the head, attention, RMSNorm,
/// SwiGLU, the projections and AdamW (`cpu`); 8.3× NdArray's tokens/s on
/// the 4-layer shape and 3.1× on the 124M one (`bench/cpu-pair.sh`, 2
/// cores).
pub type CpuBackend = Autodiff<burn::backend::Flex>;

/// What a worker is started with.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub coordinator: String,
    pub job: String,
    pub rank: u32,
    /// The job's attempt this worker was started for.
    pub attempt: u32,
    /// The job's worker token (`STRATA_JOB_TOKEN`).
    pub token: String,
    /// The CA (PEM) a TLS coordinator is trusted by
    /// (`STRATA_COORDINATOR_CA`); needed when `coordinator` is https.
    pub coordinator_ca: Option<String>,
    /// The address this worker's collective listener binds (port 0: any).
    pub collective_bind: SocketAddr,
    /// What to publish as the listener's address when it binds every
    /// interface: an IP, or `iface:NAME`; `None`: the address this machine
    /// reaches the coordinator from.
    pub advertise: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("coordinator {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("coordinator call {call}: {status}")]
    Rpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Data(String),
    #[error("step {step}: {what}")]
    Collective { step: u64, what: String },
    #[error("stopped by the coordinator: {0}")]
    Stopped(String),
}

/// Runs the worker to the end of its job. Reports failures to the
/// coordinator before returning them.
pub fn run(args: WorkerArgs) -> Result<(), WorkerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Setup(format!("tokio runtime: {e}")))?;
    let reporter = rt.block_on(Reporter::connect(args.clone()))?;
    let result = start(&rt, reporter.clone(), &args);
    let error = match &result {
        Ok(()) => None,
        Err(WorkerError::Stopped(_)) => return result,
        Err(e) => Some(e.to_string()),
    };
    let done = rt.block_on(reporter.clone().done(error));
    result?;
    done
}

/// From the collective listener to the last step: register, start the
/// heartbeats, take the assignment, open the device, join the groups,
/// open the data, train.
fn start(
    rt: &tokio::runtime::Runtime,
    mut reporter: Reporter,
    args: &WorkerArgs,
) -> Result<(), WorkerError> {
    let endpoint = TcpEndpoint::bind(args.collective_bind, args.token.as_bytes()).map_err(|e| {
        WorkerError::Setup(format!(
            "collective listener on {}: {e}",
            args.collective_bind
        ))
    })?;
    let bound = endpoint
        .local_addr()
        .map_err(|e| WorkerError::Setup(format!("collective listener: {e}")))?;
    let addr = advertised(bound, args.advertise.as_deref(), &args.coordinator)?;
    tracing::info!(%bound, %addr, "collective listener");
    let heartbeat_ms = rt.block_on(reporter.register(rendezvous::hostname(), addr))?;

    // Heartbeats from the runtime's threads, whatever the training thread
    // is doing; a stop request (the coordinator's, or SIGTERM) is agreed
    // on by every rank in the next step, so that all stop after the same
    // one.
    let pulse = Arc::new(Pulse::new());
    let stop = Arc::new(Stop::default());
    heartbeat::watch_sigterm(rt, stop.clone());
    heartbeat::spawn_heartbeats(
        rt,
        reporter.clone(),
        heartbeat_ms,
        pulse.clone(),
        stop.clone(),
    );

    let assignment = rt.block_on(reporter.assignment())?;
    if assignment.decompose {
        return decompose::run_part(rt, args, &assignment.spec_toml, pulse, stop);
    }
    let recipe = Recipe::from_toml_str(&assignment.spec_toml, &args.job)
        .map_err(|e| WorkerError::Setup(e.to_string()))?;
    // The device before anything else, so that a rank without its GPU
    // fails before its peers wait for it in the groups.
    let (device, gpu) = Device::open(recipe.device, args.rank)?;
    // Every device's peak together (the layout's devices alike), for MFU.
    let peak_flops = crate::peak::device_peak_flops(&recipe, gpu.as_deref())
        .map(|p| p * f64::from(recipe.parallel.layout.world_size()));
    let coords = assignment.coords;
    let layout = recipe.parallel.layout;
    let plans = rendezvous::plans(
        &format!("{}/a{}", args.job, args.attempt),
        coords,
        layout,
        &assignment.groups,
        recipe.model.tie_embeddings,
        recipe.parallel.virtual_stages > 1,
    );
    let backend: &dyn CollectiveBackend = &endpoint;
    let (groups, members) = rendezvous::join_groups(backend, &plans)?;
    tracing::info!(
        rank = args.rank,
        tp = coords.tp,
        pp = coords.pp,
        dp = coords.dp,
        %layout,
        backend = backend.name(),
        "joined the process groups"
    );

    let mut data = Vec::with_capacity(recipe.data.sources.len());
    for source in &recipe.data.sources {
        let loc = Location::parse(&source.dataset, false)
            .map_err(|e| WorkerError::Data(format!("source {}: {e}", source.name)))?;
        let manifest = rt
            .block_on(read_manifest(&loc))
            .map_err(|e| WorkerError::Data(e.to_string()))?;
        data.push((loc, manifest));
    }
    let session = steps::Session {
        rt,
        reporter,
        args,
        recipe,
        spec_toml: assignment.spec_toml,
        resume: assignment.resume,
        resume_job: assignment.resume_job,
        coords,
        groups,
        members,
        data,
        pulse,
        stop,
        peak_flops,
    };
    match device {
        Device::Cpu => steps::train::<CpuBackend>(session, Default::default(), None),
        #[cfg(feature = "cuda")]
        Device::Cuda(index) => {
            type Gpu = Autodiff<crate::cuda::CudaFused>;
            let mut session = session;
            // Gradients are summed over dp on the GPUs, joined over the
            // host dp group this attempt's rendezvous set up.
            let dp = if session.groups.dp.size() > 1 {
                use crate::collective::DeviceBackend;
                let nccl = crate::nccl::Nccl { gpu: index };
                let plan = &plans
                    .iter()
                    .find(|(k, _)| *k == crate::train::GroupKind::Data)
                    .expect("a data-parallel group is always planned")
                    .1;
                let dp = nccl.join(plan, session.groups.dp.as_mut()).map_err(|e| {
                    WorkerError::Setup(format!(
                        "data-parallel group on {}: {e}",
                        rendezvous::hostname()
                    ))
                })?;
                tracing::info!(
                    rank = args.rank,
                    backend = nccl.name(),
                    "data-parallel sums on the device"
                );
                Some(dp)
            } else {
                None
            };
            steps::train::<Gpu>(session, crate::cuda::device(index), dp)
        }
        // Data-parallel sums go through the host's collectives: wgpu has
        // no device-to-device transport.
        #[cfg(feature = "wgpu")]
        Device::Wgpu => {
            steps::train::<Autodiff<crate::wgpu::WgpuFused>>(session, crate::wgpu::device(), None)
        }
    }
}

/// The device a worker trains on, found before it joins its groups.
enum Device {
    Cpu,
    /// A GPU, by its index among the visible ones.
    #[cfg(feature = "cuda")]
    Cuda(usize),
    /// burn's default wgpu adapter.
    #[cfg(feature = "wgpu")]
    Wgpu,
}

impl Device {
    /// Opens what the recipe asks for: the CPU, or the first GPU this
    /// worker sees (its launcher sets `CUDA_VISIBLE_DEVICES` to the one
    /// GPU its slot leases). A missing GPU, driver or CUDA build is an
    /// error that names the device and the host (the coordinator adds the
    /// rank).
    /// The device, and the GPU's name when it is one.
    fn open(kind: DeviceKind, rank: u32) -> Result<(Device, Option<String>), WorkerError> {
        match kind {
            DeviceKind::Cpu => Ok((Device::Cpu, None)),
            DeviceKind::Cuda => Device::cuda(rank),
            DeviceKind::Wgpu => Device::wgpu(rank),
        }
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(rank: u32) -> Result<(Device, Option<String>), WorkerError> {
        let info = crate::wgpu::probe()
            .map_err(|e| WorkerError::Setup(format!("wgpu on {}: {e}", rendezvous::hostname())))?;
        tracing::info!(
            rank,
            adapter = %info.name,
            kind = %info.kind,
            api = %info.api,
            driver = %info.driver,
            "training on wgpu"
        );
        Ok((Device::Wgpu, (!info.is_cpu()).then_some(info.name)))
    }

    #[cfg(not(feature = "wgpu"))]
    fn wgpu(_rank: u32) -> Result<(Device, Option<String>), WorkerError> {
        Err(WorkerError::Setup(format!(
            "on {}: the recipe trains on wgpu ([device] backend) but this strata was built without it; rebuild it with `cargo build --release --features wgpu`",
            rendezvous::hostname()
        )))
    }

    #[cfg(feature = "cuda")]
    fn cuda(rank: u32) -> Result<(Device, Option<String>), WorkerError> {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
        let info = crate::cuda::probe(0).map_err(|e| {
            WorkerError::Setup(format!(
                "GPU 0 of CUDA_VISIBLE_DEVICES={visible} on {}: {e}",
                rendezvous::hostname()
            ))
        })?;
        tracing::info!(
            rank,
            gpu = %info.name,
            memory_gib = info.memory_bytes as f64 / f64::from(1u32 << 30),
            visible = %visible,
            "training on CUDA"
        );
        Ok((Device::Cuda(0), Some(info.name)))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda(_rank: u32) -> Result<(Device, Option<String>), WorkerError> {
        Err(WorkerError::Setup(format!(
            "on {}: the recipe trains on cuda ([device] backend) but this strata was built without CUDA; rebuild it with `cargo build --release --features cuda`",
            rendezvous::hostname()
        )))
    }
}
