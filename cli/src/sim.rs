//! `strata sim`: the rank simulator as a process (`serve`), its faults and
//! measurements from the command line, and the Slurm stand-ins that drive
//! the real Slurm launcher through it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use strata_coordinator::cluster::sim::{SimFault, SimRequest, SimResponse, call};
use strata_sim::{SimConfig, Simulator};

use crate::UserError;

#[derive(Subcommand)]
pub enum SimCommand {
    /// Run a rank simulator: each rank a task speaking the real worker
    /// protocol to the coordinator that launches it (`strata coordinator
    /// --launcher sim --sim ADDR`).
    Serve(ServeArgs),
    /// Inject a fault into a running simulated job.
    Fault(FaultArgs),
    /// The simulator's measurements (JSON): rendezvous times, heartbeat
    /// round trips, failed calls.
    Stats(StatsArgs),
    /// Write the Slurm stand-ins (sbatch, squeue, scancel, sinfo, sacct)
    /// into a folder: put it first on a coordinator's PATH, with
    /// STRATA_SIM=ADDR, and `--launcher slurm` runs on the simulator.
    SlurmStandins { dir: PathBuf },
    /// One Slurm stand-in command (what the stand-in scripts run); its
    /// arguments are Slurm's, `-h` among them.
    #[command(hide = true, disable_help_flag = true)]
    Slurm {
        command: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:7090")]
    pub listen: SocketAddr,
    /// Milliseconds per simulated step.
    #[arg(long, default_value_t = 1000)]
    pub step_ms: u64,
    /// Nodes `sinfo` reports (Slurm stand-ins).
    #[arg(long, default_value_t = 2048)]
    pub nodes: u32,
    #[arg(long, default_value_t = 8)]
    pub gpus_per_node: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FaultKind {
    /// The rank goes silent (no heartbeat, no step).
    Silent,
    /// The rank's step stops moving; its heartbeats go on.
    Hang,
    /// The rank's process ends (killed by signal 9, or --code N).
    Exit,
    /// Every rank on --node goes at once.
    LoseNode,
    /// The next launcher command --command (start, sbatch, scancel) of
    /// --job hangs for --seconds.
    HangCommand,
}

#[derive(Args)]
pub struct FaultArgs {
    #[arg(value_enum)]
    pub kind: FaultKind,
    /// The simulator's control address.
    #[arg(long = "sim", default_value = "127.0.0.1:7090")]
    pub sim: SocketAddr,
    #[arg(long, default_value = "")]
    pub job: String,
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    #[arg(long, default_value = "")]
    pub node: String,
    /// An exit status instead of signal 9.
    #[arg(long)]
    pub code: Option<i32>,
    #[arg(long, default_value = "start")]
    pub command: String,
    #[arg(long, default_value_t = 90.0)]
    pub seconds: f64,
}

#[derive(Args)]
pub struct StatsArgs {
    #[arg(long = "sim", default_value = "127.0.0.1:7090")]
    pub sim: SocketAddr,
    /// Start the latencies afresh after this report.
    #[arg(long)]
    pub reset: bool,
}

pub fn run(cmd: SimCommand) -> anyhow::Result<()> {
    match cmd {
        SimCommand::Serve(a) => crate::jobs::runtime()?.block_on(async move {
            let sim = Simulator::start(
                a.listen,
                SimConfig {
                    step_time: Duration::from_millis(a.step_ms),
                    nodes: a.nodes,
                    gpus_per_node: a.gpus_per_node,
                },
            )
            .await
            .with_context(|| format!("listen on {}", a.listen))?;
            eprintln!(
                "strata rank simulator on {} ({} ms steps); start a coordinator with --launcher sim --sim {}; Ctrl-C stops it",
                sim.addr, a.step_ms, sim.addr
            );
            tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
            Ok(())
        }),
        SimCommand::Fault(a) => {
            let fault = match a.kind {
                FaultKind::Silent => SimFault::Silent {
                    job: a.job,
                    rank: a.rank,
                },
                FaultKind::Hang => SimFault::Hang {
                    job: a.job,
                    rank: a.rank,
                },
                FaultKind::Exit => SimFault::Exit {
                    job: a.job,
                    rank: a.rank,
                    code: a.code.unwrap_or(9),
                    signal: a.code.is_none(),
                },
                FaultKind::LoseNode => SimFault::LoseNode {
                    job: a.job,
                    node: a.node,
                },
                FaultKind::HangCommand => SimFault::HangCommand {
                    command: a.command,
                    job: a.job,
                    seconds: a.seconds,
                },
            };
            call(a.sim, &SimRequest::Fault(fault), Duration::from_secs(30))
                .map_err(|e| UserError(e.to_string()))?;
            Ok(())
        }
        SimCommand::Stats(a) => {
            match call(a.sim, &SimRequest::Stats { reset: a.reset }, Duration::from_secs(30))
                .map_err(|e| UserError(e.to_string()))?
            {
                SimResponse::Stats { stats } => {
                    println!("{}", serde_json::to_string_pretty(&stats)?);
                    Ok(())
                }
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
        SimCommand::SlurmStandins { dir } => {
            let strata = std::env::current_exe().context("the strata binary's path")?;
            strata_sim::slurm::write_standins(&dir, &strata)
                .with_context(|| format!("writing the stand-ins into {}", dir.display()))?;
            eprintln!(
                "Slurm stand-ins in {}: PATH={}:$PATH {}=ADDR strata coordinator --launcher slurm …",
                dir.display(),
                dir.display(),
                strata_sim::slurm::SIM_ADDR_VAR
            );
            Ok(())
        }
        SimCommand::Slurm { command, args } => {
            let addr: SocketAddr = std::env::var(strata_sim::slurm::SIM_ADDR_VAR)
                .map_err(|_| {
                    UserError(format!(
                        "{} is not set (the simulator's address)",
                        strata_sim::slurm::SIM_ADDR_VAR
                    ))
                })?
                .parse()
                .map_err(|e| UserError(format!("{}: {e}", strata_sim::slurm::SIM_ADDR_VAR)))?;
            let out = strata_sim::slurm::standin(&command, &args, addr);
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            if out.code != 0 {
                return Err(crate::ExitWith(out.code as u8).into());
            }
            Ok(())
        }
    }
}
