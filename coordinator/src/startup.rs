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
    /// TLS: the operator's certificate chain and key (PEM), and the CA
    /// clients trust (default: the chain's last certificate).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// Serve TLS on loopback too (off loopback it always is), with a
    /// certificate this coordinator makes when none is given.
    pub tls: bool,
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
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls: false,
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

/// Creates `path` (and its parents) if needed and makes it its owner's
/// alone (0700): the state folder holds the store, tokens and logs.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
            tracing::info!(path = %path.display(), was = format!("{:o}", mode & 0o777), "state folder made private (0700)");
        }
    }
    Ok(())
}

/// Writes `contents` to `path` readable by its owner only, through a
/// temporary file made 0600 before anything is written to it.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
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

/// The client token: the given file's, or one kept in the state folder
/// (made at first start, readable by its owner only). Every caller needs
/// it, on loopback too: another user of the same machine reaches a
/// loopback port as easily as its owner. Where it is.
pub fn client_token(o: &CoordinatorOptions) -> Result<(String, PathBuf), OptionsError> {
    if let Some(path) = &o.token_file {
        return read_token_file(path).map(|t| (t, path.clone()));
    }
    let path = o.state_dir.join("token");
    if let Ok(t) = std::fs::read_to_string(&path)
        && !t.trim().is_empty()
    {
        return Ok((t.trim().to_string(), path));
    }
    private_dir(&o.state_dir)
        .map_err(|e| err(format!("cannot create {}: {e}", o.state_dir.display())))?;
    let token = random_token().map_err(|e| err(format!("random token: {e}")))?;
    write_private(&path, format!("{token}\n").as_bytes())
        .map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
    Ok((token, path))
}

/// The folder where a coordinator leaves its client token for its owner's
/// CLI (`$XDG_CONFIG_HOME/strata/tokens`, else `~/.config/strata/tokens`).
pub fn token_folder() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("strata").join("tokens"))
}

/// The name of a coordinator's token in [`token_folder`]: its port for
/// one on this machine (reached as localhost, 127.0.0.1 or any local
/// address), else `HOST-PORT`.
pub fn token_key(host: &str, port: u16) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let local = crate::net::is_loopback_name(host)
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
    if local {
        format!("{port}")
    } else {
        let safe: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{safe}-{port}")
    }
}

/// Leaves `token` where the owner's CLI finds it for a coordinator on
/// `addr` (a file 0600 in a folder 0700). Where, if it could.
pub fn publish_token(addr: SocketAddr, token: &str) -> Option<PathBuf> {
    publish_token_in(&token_folder()?, addr, token)
}

fn publish_token_in(dir: &Path, addr: SocketAddr, token: &str) -> Option<PathBuf> {
    let name = token_key(&addr.ip().to_string(), addr.port());
    publish_in(dir, &name, &format!("{token}\n"), "client token")
}

/// Leaves a TLS coordinator's CA beside its token, where the owner's CLI
/// finds it.
pub fn publish_ca(addr: SocketAddr, ca_pem: &str) -> Option<PathBuf> {
    let name = format!("{}.ca.pem", token_key(&addr.ip().to_string(), addr.port()));
    publish_in(&token_folder()?, &name, ca_pem, "CA")
}

fn publish_in(dir: &Path, name: &str, contents: &str, what: &str) -> Option<PathBuf> {
    let path = dir.join(name);
    match private_dir(dir).and_then(|()| write_private(&path, contents.as_bytes())) {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not leave the {what} for the CLI");
            None
        }
    }
}

/// The token a coordinator at `url` left for this user, if any.
pub fn published_token(url: &str) -> Option<String> {
    published_token_in(&token_folder()?, url)
}

/// The CA a TLS coordinator at `url` left for this user, if any.
pub fn published_ca(url: &str) -> Option<String> {
    let path = token_folder()?.join(format!("{}.ca.pem", url_key(url)?));
    std::fs::read_to_string(path).ok()
}

/// [`token_key`] of a coordinator URL.
fn url_key(url: &str) -> Option<String> {
    let uri: axum::http::Uri = url.parse().ok()?;
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Some(token_key(uri.host()?, port))
}

fn published_token_in(dir: &Path, url: &str) -> Option<String> {
    let t = std::fs::read_to_string(dir.join(url_key(url)?)).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
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
    private_dir(state_dir)
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
        LauncherChoice::Local => Ok((
            Arc::new(LocalJobLauncher::with_registry(
                o.state_dir.join("local-workers"),
            )),
            Vec::new(),
        )),
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

/// The TLS the options ask for: the operator's files; else, when asked
/// for or when listening off loopback (plain text is for loopback only),
/// a certificate this coordinator makes from its own CA; else none.
pub fn server_tls(o: &CoordinatorOptions) -> Result<Option<crate::tls::ServerTls>, OptionsError> {
    let tls_err = |e: crate::tls::TlsError| err(format!("TLS: {e}"));
    match (&o.tls_cert, &o.tls_key) {
        (Some(cert), Some(key)) => {
            return crate::tls::from_files(cert, key, o.tls_ca.as_deref())
                .map(Some)
                .map_err(tls_err);
        }
        (Some(_), None) => return Err(err("--tls-cert needs --tls-key")),
        (None, Some(_)) => return Err(err("--tls-key needs --tls-cert")),
        (None, None) if o.tls_ca.is_some() => {
            return Err(err(
                "--tls-ca goes with --tls-cert/--tls-key (a certificate this coordinator makes has its own CA)",
            ));
        }
        (None, None) => {}
    }
    let listen: Vec<SocketAddr> = std::iter::once(o.listen).chain(o.http_listen).collect();
    let off_loopback = listen.iter().any(|a| !crate::tls::plain_allowed(a.ip()));
    if !(o.tls || off_loopback) {
        return Ok(None);
    }
    let names = crate::tls::names(
        &listen,
        &crate::engine::host_name(),
        o.advertise_url.as_deref(),
    );
    crate::tls::self_signed(&o.state_dir, &names)
        .map(Some)
        .map_err(tls_err)
}

/// The engine's configuration, its launcher, and the token file's path.
pub type Configured = (CoordinatorConfig, Arc<dyn JobLauncher>, PathBuf);

/// The engine's configuration from the options, and the launcher; the
/// token file's path.
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
    cfg.client_token = Some(token.0);
    cfg.heartbeat_timeout = o.heartbeat_timeout;
    cfg.stop_grace = o.stop_grace;
    cfg.heartbeats_per_s = o.heartbeats_per_s;
    cfg.advertise_url = o.advertise_url.clone();
    cfg.http_listen = o.http_listen;
    cfg.worker_args.extend(extra_worker_args);
    cfg.tls = server_tls(o)?.map(Arc::new);
    if let Some(url) = &cfg.advertise_url {
        let https = url.starts_with("https://");
        if https != cfg.tls.is_some() {
            return Err(err(format!(
                "--advertise-url {url}: workers reach this coordinator over {}",
                if cfg.tls.is_some() {
                    "TLS (it is off loopback, or given --tls or a certificate): give an https:// URL"
                } else {
                    "plain text (it serves no TLS): give an http:// URL, or serve TLS (--tls)"
                }
            )));
        }
    }
    Ok((cfg, launcher, token.1))
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
    let tls = c.engine.config().tls.clone();
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!(
        "strata coordinator on {scheme}://{} (state in {}, {}: {slots} slots on {} nodes, {gpus} GPUs); Ctrl-C stops it",
        c.addr,
        o.state_dir.display(),
        c.engine.launcher_description(),
        inventory.nodes().len(),
    );
    // The owner's CLI finds the token without flags; other users cannot
    // read it.
    let token = c.engine.config().client_token.clone().unwrap_or_default();
    let published = publish_token(c.addr, &token);
    eprintln!(
        "clients need the token in {}{} (or --token-file / STRATA_TOKEN)",
        token_file.display(),
        published.as_ref().map_or(String::new(), |p| format!(
            ", which this user's `strata` finds in {}",
            p.display()
        ))
    );
    let published_ca = tls.as_ref().and_then(|t| {
        let p = publish_ca(c.addr, &t.ca_pem);
        eprintln!(
            "TLS: clients and workers trust the CA in {}{} (or --ca / STRATA_CA)",
            t.ca_path.display(),
            p.as_ref().map_or(String::new(), |p| format!(
                ", which this user's `strata` finds in {}",
                p.display()
            ))
        );
        p
    });
    if let Some(h) = c.http_addr {
        eprintln!("dashboard at {scheme}://{h}/ and Prometheus metrics at {scheme}://{h}/metrics");
        eprintln!(
            "  they need the client token: a browser opens {scheme}://{h}/?token=$(cat {}) once (it then keeps a cookie); scrapers send `Authorization: Bearer TOKEN`",
            token_file.display()
        );
    }
    let stop = c.shutdown_handle();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        if let Some(tx) = stop {
            let _ = tx.send(());
        }
    });
    let served = c.wait().await.map_err(ServeError::Serve);
    // Gone with the coordinator, unless another has taken the port since.
    if let Some(p) = published
        && std::fs::read_to_string(&p).is_ok_and(|t| t.trim() == token)
    {
        let _ = std::fs::remove_file(&p);
        if let Some(ca) = published_ca {
            let _ = std::fs::remove_file(ca);
        }
    }
    served
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
        let (t, path) = client_token(&o).unwrap();
        assert_eq!(t.len(), 48);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The same token the next time.
        assert_eq!(client_token(&o).unwrap().0, t);
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        o.token_file = Some(empty.clone());
        let e = client_token(&o).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("token file {} is empty", empty.display())
        );
        // On loopback too: the same token.
        o.token_file = None;
        o.listen = "127.0.0.1:0".parse().unwrap();
        assert_eq!(client_token(&o).unwrap().0, t);
    }

    #[test]
    fn the_cli_finds_a_local_coordinators_token_by_its_port() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        let at = publish_token_in(&tokens, "127.0.0.1:7070".parse().unwrap(), "t1").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&tokens), mode(&at)), (0o700, 0o600));
        for url in [
            "http://127.0.0.1:7070",
            "http://localhost:7070/",
            "http://[::1]:7070",
        ] {
            assert_eq!(
                published_token_in(&tokens, url).as_deref(),
                Some("t1"),
                "{url}"
            );
        }
        assert_eq!(published_token_in(&tokens, "http://127.0.0.1:7071"), None);
        assert_eq!(published_token_in(&tokens, "http://node7:7070"), None);
        // One listening on every address is local too; a remote one is
        // keyed by its host.
        publish_token_in(&tokens, "0.0.0.0:7072".parse().unwrap(), "t2").unwrap();
        assert_eq!(
            published_token_in(&tokens, "http://127.0.0.1:7072").as_deref(),
            Some("t2")
        );
        assert_eq!(token_key("10.0.0.5", 7070), "10.0.0.5-7070");
        assert_eq!(token_key("node/../x", 1), "node_.._x-1");
    }

    #[test]
    fn tls_off_loopback_or_when_asked_and_urls_that_match_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = CoordinatorOptions::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("state"),
            "/bin/false".into(),
        );
        assert!(server_tls(&o).unwrap().is_none(), "plain on loopback");
        o.http_listen = Some("0.0.0.0:0".parse().unwrap());
        let made = server_tls(&o).unwrap().expect("TLS off loopback");
        assert_eq!(made.ca_path, dir.path().join("state/tls/ca.pem"));
        o.http_listen = None;
        o.tls = true;
        let again = server_tls(&o).unwrap().expect("TLS when asked");
        assert_eq!(again.ca_pem, made.ca_pem, "the same CA");
        o.tls_cert = Some(dir.path().join("cert.pem"));
        assert_eq!(
            server_tls(&o).unwrap_err().to_string(),
            "--tls-cert needs --tls-key"
        );
        o.tls_cert = None;
        o.advertise_url = Some("http://head:7070".into());
        let e = configure(&o).err().unwrap().to_string();
        assert!(e.contains("give an https:// URL"), "{e}");
        o.tls = false;
        o.advertise_url = Some("https://head:7070".into());
        let e = configure(&o).err().unwrap().to_string();
        assert!(e.contains("give an http:// URL"), "{e}");
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
