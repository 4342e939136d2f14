//! How a coordinator runs: what the engine and its servers are given.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use strata_cluster::Inventory;

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Where workers may run: this machine's CPU slots (processes; they may
    /// oversubscribe the cores), or one slot per GPU. A launcher that
    /// reports its nodes (Slurm, the simulator) replaces it with theirs.
    pub inventory: Inventory,
    /// The URL workers reach the coordinator at; `None`: the listening
    /// address (on all interfaces: this machine's name, or 127.0.0.1 for
    /// workers on this machine).
    pub advertise_url: Option<String>,
    /// The program workers run (the `strata` binary) and the arguments
    /// before the worker's own (`["worker"]`).
    pub worker_program: PathBuf,
    pub worker_args: Vec<String>,
    /// Extra environment for workers (e.g. `RUST_LOG`, `AWS_*`).
    pub worker_env: Vec<(String, String)>,
    /// The bearer token clients must present (`strata coordinator` always
    /// sets one; `None` only for tests and embedded uses).
    pub client_token: Option<String>,
    /// A worker silent for this long fails its attempt.
    pub heartbeat_timeout: Duration,
    /// How long the workers of a cancelled or failed attempt get between
    /// SIGTERM (they save a checkpoint and leave) and SIGKILL.
    pub stop_grace: Duration,
    /// Where to serve HTTP (Prometheus `/metrics`, the dashboard), if
    /// anywhere; the same token rule as gRPC.
    pub http_listen: Option<SocketAddr>,
    /// Heartbeats a second the coordinator asks of all its ranks together:
    /// past this many ranks, each rank's period grows beyond a second (up
    /// to a sixth of the heartbeat timeout).
    pub heartbeats_per_s: u32,
    /// TLS on gRPC and HTTP: the certificate served and the CA workers
    /// pin. Without it, the coordinator listens on loopback only.
    pub tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
}

impl CoordinatorConfig {
    /// A coordinator on `listen` with this machine's `slots` CPU slots,
    /// running `worker_program worker …`; the rest at its defaults.
    pub fn new(
        listen: SocketAddr,
        state_dir: PathBuf,
        inventory: Inventory,
        worker_program: PathBuf,
    ) -> CoordinatorConfig {
        CoordinatorConfig {
            listen,
            state_dir,
            inventory,
            advertise_url: None,
            worker_program,
            worker_args: vec!["worker".into()],
            worker_env: Vec::new(),
            client_token: None,
            heartbeat_timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(30),
            http_listen: None,
            heartbeats_per_s: DEFAULT_HEARTBEATS_PER_S,
            tls: None,
        }
    }
}

/// The heartbeat rate a coordinator asks for by default: 4,096 ranks beat
/// once a second, 16,384 every four.
pub const DEFAULT_HEARTBEATS_PER_S: u32 = 4096;
