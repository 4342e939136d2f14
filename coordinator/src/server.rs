//! A running coordinator: the gRPC server (both services), the HTTP side,
//! the engine's tasks (the monitor, the sweep advancer, the inventory
//! refresh, the action executor), and shutting it all down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use strata_cluster::{JobLauncher, LocalJobLauncher};
use strata_proto::v1::control_service_server::ControlServiceServer;
use strata_proto::v1::job_service_server::JobServiceServer;

use crate::config::CoordinatorConfig;
use crate::engine::{Engine, host_name};
use crate::error::EngineError;
use crate::rpc::{Control, Jobs};

/// How long a shutting-down server waits for the calls in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How often a launcher's nodes are asked for again.
const INVENTORY_REFRESH: Duration = Duration::from_secs(10);
/// How often the monitor looks at every attempt.
const MONITOR_TICK: Duration = Duration::from_millis(250);
/// HTTP/2 keepalive pings on every connection (workers, clients): a peer
/// whose machine went away is noticed, and idle connections survive
/// middleboxes.
const KEEPALIVE: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a client has to finish its TLS handshake.
pub const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// A running coordinator: its address, and a handle to stop it.
pub struct Coordinator {
    pub addr: SocketAddr,
    /// Where `/metrics` and the dashboard are served (`--http-listen`).
    pub http_addr: Option<SocketAddr>,
    pub engine: Arc<Engine>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "{addr} is not a loopback address: serve TLS there (--tls-cert/--tls-key, or the certificate `strata coordinator` makes), plain text is for loopback only"
    )]
    PlainOffLoopback { addr: SocketAddr },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("state folder {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The gRPC listener's connections; accept errors back off and are never
/// handed to the server (which would retry at once).
fn incoming(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(
        (listener, crate::net::Backoff::default()),
        |(l, mut backoff)| async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        backoff.reset();
                        let _ = s.set_nodelay(true);
                        return Some((Ok(s), (l, backoff)));
                    }
                    Err(e) => backoff.wait("gRPC", &e).await,
                }
            }
        },
    )
}

impl Coordinator {
    /// Binds, opens the store and serves until [`Coordinator::stop`],
    /// launching workers as local processes.
    pub async fn start(cfg: CoordinatorConfig) -> Result<Coordinator, StartError> {
        let launcher = LocalJobLauncher::with_registry(cfg.state_dir.join("local-workers"));
        Coordinator::start_with(cfg, Arc::new(launcher)).await
    }

    /// [`Coordinator::start`] with another launcher.
    pub async fn start_with(
        mut cfg: CoordinatorConfig,
        launcher: Arc<dyn JobLauncher>,
    ) -> Result<Coordinator, StartError> {
        if cfg.tls.is_none() {
            for addr in std::iter::once(cfg.listen).chain(cfg.http_listen) {
                if !crate::tls::plain_allowed(addr.ip()) {
                    return Err(StartError::PlainOffLoopback { addr });
                }
            }
        }
        let http_tls = match &cfg.tls {
            Some(t) => Some(t.rustls_config().map_err(StartError::Tls)?),
            None => None,
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = &cfg.tls {
            // Workers reach it over TLS, trusting its CA only.
            cfg.worker_env
                .push((strata_cluster::COORDINATOR_CA_ENV.into(), t.ca_pem.clone()));
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(
                            &t.cert_pem,
                            &t.key_pem,
                        ))
                        // A client that opens a connection and says
                        // nothing holds a handshake task, not the server.
                        .timeout(TLS_HANDSHAKE),
                )
                .map_err(|e| StartError::Tls(e.to_string()))?;
        }
        crate::startup::private_dir(&cfg.state_dir).map_err(|source| StartError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let listener = crate::net::bind(cfg.listen).map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
        cfg.listen = addr;
        let http = match cfg.http_listen {
            Some(at) => {
                Some(crate::net::bind(at).map_err(|source| StartError::Bind { addr: at, source })?)
            }
            None => None,
        };
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        // Opening reads the store and asks the launcher for its nodes.
        let open = tokio::task::spawn_blocking(move || Engine::open(cfg, launcher))
            .await
            .map_err(|e| EngineError::Unavailable(format!("opening the engine: {e}")))?;
        let engine = open?;
        // One connection per rank: the open-files limit must hold them.
        strata_cluster::limits::ensure_open_files(
            u64::from(engine.inventory().total_slots()) + 256,
            "the inventory's ranks",
        );
        engine.start_executor();
        if let Some(listener) = http {
            tokio::spawn(crate::http::serve(
                listener,
                engine.clone(),
                engine.config().client_token.clone(),
                http_tls,
                engine.closing(),
            ));
        }
        let scheme = if engine.config().tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = match &engine.config().advertise_url {
            Some(url) => url.clone(),
            None if !addr.ip().is_unspecified() => format!("{scheme}://{addr}"),
            // Workers on other machines reach this one by its name.
            None if !engine.launcher().shares_this_machine() => {
                format!("{scheme}://{}:{}", host_name(), addr.port())
            }
            None => format!("{scheme}://127.0.0.1:{}", addr.port()),
        };
        engine.set_worker_url(url);
        {
            let mut state = engine.lock();
            engine.schedule(&mut state);
        }
        let sweeper = engine.clone();
        let sweep_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                sweeper.advance_sweeps().await;
            }
        });
        let monitor = engine.clone();
        let monitor_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(MONITOR_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                monitor.tick().await;
            }
        });
        let refresher = engine.clone();
        let refresh_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(INVENTORY_REFRESH);
            tick.tick().await;
            loop {
                tick.tick().await;
                let engine = refresher.clone();
                let _ = tokio::task::spawn_blocking(move || engine.refresh_inventory()).await;
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc_engine = engine.clone();
        let task = tokio::spawn(async move {
            let mut closed = svc_engine.closing();
            let closer = svc_engine.clone();
            let serve = builder
                .http2_keepalive_interval(Some(KEEPALIVE))
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .layer(crate::rpc::timing::Timing(svc_engine.metrics.clone()))
                .add_service(JobServiceServer::new(Jobs(svc_engine.clone())))
                .add_service(ControlServiceServer::new(Control(svc_engine.clone())))
                .serve_with_incoming_shutdown(incoming(listener), async move {
                    let _ = rx.await;
                    // Open watch streams end now: a graceful shutdown
                    // waits for every call in flight.
                    closer.set_closing();
                });
            // A client that stops reading a stream holds its call open
            // past any signal the stream could see: its connection goes
            // after a grace period.
            let result = tokio::select! {
                r = serve => r,
                _ = async {
                    let _ = closed.wait_for(|c| *c).await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => {
                    tracing::warn!("calls still open {} s into the shutdown; closing their connections", SHUTDOWN_GRACE.as_secs());
                    Ok(())
                }
            };
            monitor_task.abort();
            sweep_task.abort();
            refresh_task.abort();
            let engine = svc_engine.clone();
            let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
            result
        });
        tracing::info!(%addr, "coordinator listening");
        Ok(Coordinator {
            addr,
            http_addr,
            engine,
            shutdown: Some(tx),
            task,
        })
    }

    /// Stops serving, stops every worker (their jobs continue under the
    /// next coordinator on this state folder) and waits until the server
    /// is down.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Serves until the server ends (for the `coordinator` command).
    pub async fn wait(mut self) -> Result<(), tonic::transport::Error> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }

    pub fn shutdown_handle(&mut self) -> Option<tokio::sync::oneshot::Sender<()>> {
        self.shutdown.take()
    }
}
