//! Starting a coordinator from its options: the client token (a file, or
//! one made in the state folder off loopback), the inventory (this
//! machine's slots or GPUs, or the launcher's nodes), the launcher (local
//! processes, Slurm, or a rank simulator), then serving until a signal.
//! The CLI only parses flags into [`CoordinatorOptions`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use strata_cluster::{
    Inventory, JobLauncher, LocalJobLauncher, SimJobLauncher, SlurmConfig, SlurmJobLauncher,
};

use crate::config::{CoordinatorConfig, DEFAULT_HEARTBEATS_PER_S};
use crate::job::random_token;
use crate::server::Coordinator;

/// Where workers run.
#[derive(Debug, Clone)]
pub enum LauncherChoice {
    /// Processes on this machine.
    Local,
    /// One Slurm allocation per attempt, from this machine as a submit
    /// host.
    Slurm(SlurmChoice),
    /// A rank simulator (`strata sim`) at this address, playing an
    /// inventory of `nodes` nodes of `gpus_per_node` GPUs.
    Sim {
        addr: SocketAddr,
        nodes: u32,
        gpus_per_node: u32,
    },
}

/// `--launcher slurm`'s settings; a recipe's `[slurm]` section overrides
/// partition, account, qos and time for its job.
#[derive(Debug, Clone, Default)]
pub struct SlurmChoice {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<String>,
    pub gpus_per_node: Option<u32>,
    pub cpus_per_task: u32,
    /// How workers publish their collective address (an IP or
    /// `iface:NAME`).
    pub worker_advertise: Option<String>,
}

/// Everything `strata coordinator` is given.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    pub listen: SocketAddr,
    pub http_listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub slots: Option<u32>,
    pub gpus: Option<u32>,
    /// The GPUs this machine's driver reports (0 without CUDA).
    pub detected_gpus: u32,
    pub token_file: Option<PathBuf>,
    pub heartbeat_timeout: Duration,
    pub stop_grace: Duration,
    pub heartbeats_per_s: u32,
    pub launcher: LauncherChoice,
    pub advertise_url: Option<String>,
    /// The program workers run (this `strata` binary).
    pub worker_program: PathBuf,
}

impl CoordinatorOptions {
    pub fn new(listen: SocketAddr, state_dir: PathBuf, worker_program: PathBuf) -> Self {
        CoordinatorOptions {
            listen,
            http_listen: None,
            state_dir,
            slots: None,
            gpus: None,
            detected_gpus: 0,
            token_file: None,
            heartbeat_timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(30),
            heartbeats_per_s: DEFAULT_HEARTBEATS_PER_S,
            launcher: LauncherChoice::Local,
            advertise_url: None,
            worker_program,
        }
    }
}

/// A mistake in the options (a flag, a token file): the message names it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OptionsError(pub String);

fn err(m: impl Into<String>) -> OptionsError {
    OptionsError(m.into())
}

/// A token file's contents, trimmed; an unreadable or empty file is an
/// error that names it.
pub fn read_token_file(path: &Path) -> Result<String, OptionsError> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read token file {}: {e}", path.display())))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(err(format!("token file {} is empty", path.display())));
    }
    Ok(t)
}

/// Writes `contents` to `path` readable by its owner only, through a
/// temporary file made 0600 before anything is written to it.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    opts.open(&tmp)?.write_all(contents)?;
    std::fs::rename(&tmp, path)
}

/// The client token: the given file's, or (off loopback) one generated
/// into the state folder, readable by its owner only. Whether it was
/// made now, and where it is.
pub fn client_token(o: &CoordinatorOptions) -> Result<Option<(String, PathBuf)>, OptionsError> {
    if let Some(path) = &o.token_file {
        return read_token_file(path).map(|t| Some((t, path.clone())));
    }
    if o.listen.ip().is_loopback() && o.http_listen.is_none_or(|h| h.ip().is_loopback()) {
        return Ok(None);
    }
    let path = o.state_dir.join("token");
    if let Ok(t) = std::fs::read_to_string(&path)
        && !t.trim().is_empty()
    {
        return Ok(Some((t.trim().to_string(), path)));
    }
    std::fs::create_dir_all(&o.state_dir)
        .map_err(|e| err(format!("cannot create {}: {e}", o.state_dir.display())))?;
    let token = random_token().map_err(|e| err(format!("random token: {e}")))?;
    write_private(&path, format!("{token}\n").as_bytes())
        .map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
    eprintln!(
        "clients need the token in {} (--token-file or STRATA_TOKEN)",
        path.display()
    );
    Ok(Some((token, path)))
}

/// This coordinator's mark on its Slurm allocations, kept in the state
/// folder so that the next coordinator on it finds them.
pub fn owner_id(state_dir: &Path) -> Result<String, OptionsError> {
    let path = state_dir.join("coordinator-id");
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_string());
    }
    std::fs::create_dir_all(state_dir)
        .map_err(|e| err(format!("cannot create {}: {e}", state_dir.display())))?;
    let id: String = random_token()
        .map_err(|e| err(format!("random id: {e}")))?
        .chars()
        .take(12)
        .collect();
    write_private(&path, format!("{id}\n").as_bytes())
        .map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
    Ok(id)
}

/// This machine's slots from `--slots` and `--gpus` (default: the GPUs
/// the driver reports, one slot each; 8 CPU slots without GPUs).
pub fn local_inventory(o: &CoordinatorOptions) -> Result<Inventory, OptionsError> {
    let gpus = o.gpus.unwrap_or(o.detected_gpus);
    let inventory = match (gpus, o.slots) {
        (_, Some(0)) => return Err(err("--slots must be at least 1")),
        (0, slots) => Inventory::local(slots.unwrap_or(8)),
        (g, Some(s)) if s != g => {
            return Err(err(format!(
                "--slots {s} with {g} GPUs: a GPU machine runs one worker per GPU (leave --slots out, or give --gpus 0 for CPU slots only)"
            )));
        }
        (g, _) => Inventory::local_gpus(g),
    };
    inventory.map_err(|e| err(e.to_string()))
}

/// The launcher the options name, with the worker arguments it needs.
pub fn launcher(
    o: &CoordinatorOptions,
) -> Result<(Arc<dyn JobLauncher>, Vec<String>), OptionsError> {
    match &o.launcher {
        LauncherChoice::Local => Ok((Arc::new(LocalJobLauncher), Vec::new())),
        LauncherChoice::Sim {
            addr,
            nodes,
            gpus_per_node,
        } => {
            if *nodes == 0 {
                return Err(err("--sim-nodes must be at least 1"));
            }
            Ok((
                Arc::new(SimJobLauncher::new(*addr, *nodes, *gpus_per_node)),
                Vec::new(),
            ))
        }
        LauncherChoice::Slurm(s) => {
            let cfg = SlurmConfig {
                partition: s.partition.clone(),
                account: s.account.clone(),
                qos: s.qos.clone(),
                time: s.time.clone(),
                gpus_per_node: s.gpus_per_node,
                cpus_per_task: s.cpus_per_task,
                signal_grace_s: o.stop_grace.as_secs(),
                owner: owner_id(&o.state_dir)?,
                ..SlurmConfig::default()
            };
            let launcher = SlurmJobLauncher::new(cfg).map_err(|e| err(e.to_string()))?;
            // Ranks on other nodes reach each other's listeners.
            let mut worker = vec!["--collective-bind".to_string(), "0.0.0.0:0".to_string()];
            if let Some(a) = &s.worker_advertise {
                worker.extend(["--advertise".to_string(), a.clone()]);
            }
            Ok((Arc::new(launcher), worker))
        }
    }
}

/// The engine's configuration, its launcher, and the token file's path
/// when a token is set.
pub type Configured = (CoordinatorConfig, Arc<dyn JobLauncher>, Option<PathBuf>);

/// The engine's configuration from the options, and the launcher; the
/// token file's path when a token is set.
pub fn configure(o: &CoordinatorOptions) -> Result<Configured, OptionsError> {
    let (launcher, extra_worker_args) = launcher(o)?;
    let inventory = match o.launcher {
        LauncherChoice::Local => local_inventory(o)?,
        // Replaced by the nodes the launcher reports.
        _ => Inventory::local(1).map_err(|e| err(e.to_string()))?,
    };
    let token = client_token(o)?;
    let mut cfg = CoordinatorConfig::new(
        o.listen,
        o.state_dir.clone(),
        inventory,
        o.worker_program.clone(),
    );
    cfg.client_token = token.as_ref().map(|t| t.0.clone());
    cfg.heartbeat_timeout = o.heartbeat_timeout;
    cfg.stop_grace = o.stop_grace;
    cfg.heartbeats_per_s = o.heartbeats_per_s;
    cfg.advertise_url = o.advertise_url.clone();
    cfg.http_listen = o.http_listen;
    cfg.worker_args.extend(extra_worker_args);
    Ok((cfg, launcher, token.map(|t| t.1)))
}

/// Starts the coordinator the options describe and serves until
/// `shutdown` resolves (Ctrl-C, SIGTERM).
pub async fn serve(
    o: CoordinatorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (cfg, launcher, token_file) = configure(&o)?;
    let mut c = Coordinator::start_with(cfg, launcher)
        .await
        .map_err(|e| ServeError::Options(OptionsError(e.to_string())))?;
    let inventory = c.engine.inventory();
    let (slots, gpus) = (
        inventory.total_slots(),
        inventory.nodes().iter().map(|n| n.gpus).sum::<u32>(),
    );
    eprintln!(
        "strata coordinator on http://{} (state in {}, {}: {slots} slots on {} nodes, {gpus} GPUs); Ctrl-C stops it",
        c.addr,
        o.state_dir.display(),
        c.engine.launcher_description(),
        inventory.nodes().len(),
    );
    if let Some(h) = c.http_addr {
        eprintln!("dashboard at http://{h}/ and Prometheus metrics at http://{h}/metrics");
        if let Some(file) = token_file {
            eprintln!(
                "  they need the client token: a browser opens http://{h}/?token=$(cat {}) once (it then keeps a cookie); scrapers send `Authorization: Bearer TOKEN`",
                file.display()
            );
        }
    }
    let stop = c.shutdown_handle();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        if let Some(tx) = stop {
            let _ = tx.send(());
        }
    });
    c.wait().await.map_err(ServeError::Serve)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The options are at fault (exit status 2).
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("serving: {0}")]
    Serve(tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_token_is_private_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = CoordinatorOptions::new(
            "0.0.0.0:0".parse().unwrap(),
            dir.path().join("state"),
            "/bin/false".into(),
        );
        let (t, path) = client_token(&o).unwrap().unwrap();
        assert_eq!(t.len(), 48);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The same token the next time.
        assert_eq!(client_token(&o).unwrap().unwrap().0, t);
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        o.token_file = Some(empty.clone());
        let e = client_token(&o).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("token file {} is empty", empty.display())
        );
        // On loopback no token is needed.
        o.token_file = None;
        o.listen = "127.0.0.1:0".parse().unwrap();
        assert!(client_token(&o).unwrap().is_none());
    }

    #[test]
    fn slots_and_gpus_must_agree() {
        let mut o = CoordinatorOptions::new(
            "127.0.0.1:0".parse().unwrap(),
            "/tmp/x".into(),
            "/bin/false".into(),
        );
        o.slots = Some(4);
        assert_eq!(local_inventory(&o).unwrap().total_slots(), 4);
        o.detected_gpus = 2;
        let e = local_inventory(&o).unwrap_err().to_string();
        assert!(e.starts_with("--slots 4 with 2 GPUs"), "{e}");
        o.slots = None;
        assert!(local_inventory(&o).unwrap().has_gpus());
        o.slots = Some(0);
        assert_eq!(
            local_inventory(&o).unwrap_err().to_string(),
            "--slots must be at least 1"
        );
    }
}
