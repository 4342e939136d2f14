//! The coordinator's HTTP side (`--http-listen`): Prometheus metrics at
//! `/metrics` ([`metrics`]) and the dashboard ([`dashboard`]), beside the
//! gRPC adapters and, like them, over the engine. With a client token
//! (always, off loopback) every path asks for it, as gRPC does.
//!
//! Connections are capped ([`MAX_CONNECTIONS`]; one over it is closed at
//! once) and a client gets [`HEADER_READ_TIMEOUT`] to send its request's
//! headers: a slow or idle client holds a connection, never the server.

mod dashboard;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State as AxumState};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::engine::{Engine, same_token as same};

/// Open HTTP connections at most (dashboards following event streams,
/// scrapers); past it, new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the HTTP handlers share.
pub(crate) struct Http {
    pub(crate) engine: Arc<Engine>,
    /// The bearer token calls must carry, when one is set.
    pub(crate) token: Option<String>,
    /// Sweep reports made for the dashboard.
    pub(crate) reports: dashboard::Reports,
}

/// The cookie a browser keeps the token in, once given `?token=`.
const COOKIE: &str = "strata_token";

/// The cookie holds the token hex encoded: any token is then a valid
/// cookie value.
fn hex(token: &str) -> String {
    token.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The token rule of gRPC, for every HTTP path: with a token set, a call
/// carries it as `Authorization: Bearer …` or in the `strata_token`
/// cookie. A page opened with `?token=…` (as the coordinator prints it)
/// gets the cookie and is sent on to the same path without the token, so
/// the token does not stay in the address bar or the history.
async fn authorize(AxumState(http): AxumState<Arc<Http>>, req: Request, next: Next) -> Response {
    let Some(token) = &http.token else {
        return next.run(req).await;
    };
    let query: Vec<(String, String)> = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .map(|q| q.0)
        .unwrap_or_default();
    if let Some((_, given)) = query.iter().find(|(k, _)| k == "token")
        && same(given.as_bytes(), token.as_bytes())
    {
        let rest: Vec<&str> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("token="))
            .collect();
        // Never elsewhere: `//host` would be another site.
        let mut to = format!("/{}", req.uri().path().trim_start_matches('/'));
        if !rest.is_empty() {
            to = format!("{to}?{}", rest.join("&"));
        }
        return (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, to),
                (
                    header::SET_COOKIE,
                    format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", hex(token)),
                ),
            ],
        )
            .into_response();
    }
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='));
    let ok = bearer.is_some_and(|g| same(g.as_bytes(), token.as_bytes()))
        || cookie.is_some_and(|g| same(g.as_bytes(), hex(token).as_bytes()));
    if ok {
        return next.run(req).await;
    }
    tracing::warn!(path = %req.uri().path(), "HTTP call with a wrong or missing token");
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "wrong or missing token: send `Authorization: Bearer TOKEN`, or open the dashboard once as /?token=TOKEN (the coordinator's --token-file)\n",
    )
        .into_response()
}

async fn metrics_handler(AxumState(http): AxumState<Arc<Http>>) -> Response {
    let engine = http.engine.clone();
    match tokio::task::spawn_blocking(move || metrics::render(&engine)).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves `/metrics` and the dashboard on `listener` until `closing`
/// turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    token: Option<String>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let http = Arc::new(Http {
        engine,
        token,
        reports: Default::default(),
    });
    let app: Router = Router::new()
        .route("/metrics", get(metrics_handler))
        .merge(dashboard::routes())
        .layer(axum::middleware::from_fn_with_state(
            http.clone(),
            authorize,
        ))
        .with_state(http);
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "HTTP (/metrics and the dashboard) listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused = crate::net::Backoff::default();
    let mut accept = crate::net::Backoff::default();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => { accept.reset(); s }
                Err(e) => {
                    accept.wait("HTTP", &e).await;
                    continue;
                }
            },
            _ = async { let _ = closing.wait_for(|c| *c).await; } => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if refused.note() {
                tracing::warn!(%peer, max = MAX_CONNECTIONS, "too many HTTP connections; closing new ones");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut closing = closing.clone();
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended");
                    }
                }
                _ = async { let _ = closing.wait_for(|c| *c).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(3), conn).await;
                }
            }
            drop(permit);
        });
    }
}
