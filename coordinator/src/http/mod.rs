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
    /// Whether the listener is on loopback (then only loopback host names
    /// are served).
    pub(crate) loopback: bool,
}

/// The cookie a browser keeps the token in, once given `?token=`.
const COOKIE: &str = "strata_token";

/// The cookie holds the token hex encoded: any token is then a valid
/// cookie value.
fn hex(token: &str) -> String {
    crate::job::to_hex(token.as_bytes())
}

/// The `strata_token` cookie's value among `Cookie` headers' text.
fn cookie_value<'a>(headers: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    headers
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The token rule of gRPC, for every HTTP path: with a token set, a call
/// carries it as `Authorization: Bearer …` or in the `strata_token`
/// cookie. A page opened with `?token=…` (as the coordinator prints it)
/// gets the cookie and is sent on to the same path without the token, so
/// the token does not stay in the address bar or the history.
async fn authorize(AxumState(http): AxumState<Arc<Http>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if !host_allowed(host, http.loopback) {
        tracing::warn!(host = ?host, path = %req.uri().path(), "HTTP call naming another host refused");
        return (
            StatusCode::MISDIRECTED_REQUEST,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!(
                "host {:?} is not this server: it listens on loopback (open it as localhost or 127.0.0.1)\n",
                host.unwrap_or("")
            ),
        )
            .into_response();
    }
    let Some(token) = &http.token else {
        return next.run(req).await;
    };
    let query: Vec<(String, String)> = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .map(|q| q.0)
        .unwrap_or_default();
    if let Some((_, given)) = query.iter().find(|(k, _)| k == "token")
        && same(given.as_bytes(), token.as_bytes())
    {
        let to = redirect_target(req.uri().path(), req.uri().query());
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
    let cookie = cookie_value(
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
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

/// Where a page opened with `?token=` is sent on: the same path on this
/// server, without the token. Never elsewhere: a path starting `//` or
/// `/\` (which browsers read as `//`) would name another site, so leading
/// slashes are collapsed and backslashes escaped; every parameter whose
/// name decodes to `token` goes (`%74oken=` too, which would otherwise
/// loop).
fn redirect_target(path: &str, query: Option<&str>) -> String {
    let path = path.replace('\\', "%5C");
    let mut to = format!("/{}", path.trim_start_matches('/'));
    let rest: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| {
            let key = p.split('=').next().unwrap_or("");
            !p.is_empty() && percent_decode(key) != "token"
        })
        .collect();
    if !rest.is_empty() {
        to = format!("{to}?{}", rest.join("&"));
    }
    to
}

/// A query key as a form decodes it (`+` is a space, `%XX` a byte).
fn percent_decode(key: &str) -> String {
    form_urlencoded::parse(key.as_bytes())
        .next()
        .map(|(k, _)| k.into_owned())
        .unwrap_or_default()
}

/// Whether a request's `Host` may reach a listener on loopback: only a
/// loopback name. A web page cannot then reach the dashboard through DNS
/// rebinding (its requests carry its own host name). Off loopback the
/// token guards every path.
fn host_allowed(host: Option<&str>, loopback: bool) -> bool {
    if !loopback {
        return true;
    }
    let Some(host) = host else {
        return false;
    };
    // `name:port`, `[v6]:port`, or a bare name.
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    crate::net::is_loopback_name(name)
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
/// turns true; over TLS when given its configuration.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    token: Option<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let http = Arc::new(Http {
        engine,
        token,
        reports: Default::default(),
        loopback: addr.is_some_and(|a| a.ip().is_loopback()),
    });
    let app: Router = Router::new()
        .route("/metrics", get(metrics_handler))
        .merge(dashboard::routes())
        .layer(axum::middleware::from_fn_with_state(
            http.clone(),
            authorize,
        ))
        .with_state(http);
    tracing::info!(addr = ?addr, "HTTP (/metrics and the dashboard) listening");
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
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
        let closing = closing.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, svc, closing, peer).await,
                // The handshake has the headers' time limit.
                Some(tls) => {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, svc, closing, peer).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// One HTTP connection, plain or TLS, until it ends or the server closes.
async fn serve_connection<IO>(
    io: IO,
    svc: hyper_util::service::TowerToHyperService<Router>,
    mut closing: tokio::sync::watch::Receiver<bool>,
    peer: SocketAddr,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_redirect_stays_on_this_server() {
        assert_eq!(
            redirect_target("/jobs/x", Some("token=T&a=1")),
            "/jobs/x?a=1"
        );
        // Browsers read `/\\host` as `//host`, another site.
        assert_eq!(
            redirect_target("/\\evil.com", Some("token=T")),
            "/%5Cevil.com"
        );
        assert_eq!(redirect_target("//evil.com", Some("token=T")), "/evil.com");
        // An encoded name is still the token: dropped, not looped on.
        assert_eq!(redirect_target("/", Some("%74oken=T")), "/");
        assert_eq!(redirect_target("/", Some("%74%6F%6B%65%6E=T&b=2")), "/?b=2");
        assert_eq!(redirect_target("/", Some("tokens=1")), "/?tokens=1");
    }

    proptest::proptest! {
        /// Whatever the path and query: the redirect stays on this server
        /// and carries no token, and nothing panics.
        #[test]
        fn any_redirect_stays_here(path in "\\PC{0,40}", query in proptest::option::of("\\PC{0,60}")) {
            let to = redirect_target(&format!("/{path}"), query.as_deref());
            proptest::prop_assert!(to.starts_with('/') && !to.starts_with("//"), "{to}");
            let (path, q) = to.split_once('?').unwrap_or((&to, ""));
            // Browsers read a backslash in the path as a slash.
            proptest::prop_assert!(!path.contains('\\'), "{to}");
            for part in q.split('&') {
                let key = part.split('=').next().unwrap_or("");
                proptest::prop_assert_ne!(percent_decode(key), "token");
            }
        }
    }

    proptest::proptest! {
        /// Whatever the `Cookie` headers say, the parse never panics and
        /// finds our cookie only where it is (its exact name, then `=`).
        #[test]
        fn any_cookie_header_parses(
            before in "[ -~]{0,40}",
            value in "[0-9a-f]{0,64}",
            after in "[ -~]{0,40}",
            other in "[ -~]{0,80}",
        ) {
            let _ = cookie_value([other.as_str()].into_iter());
            let with = format!("a=1; {COOKIE}={value}; {after}");
            let found = cookie_value([with.as_str()].into_iter());
            proptest::prop_assert_eq!(found, Some(value.as_str()));
            let near = format!("{before}x{COOKIE}={value}");
            if !before.contains(';') && !before.contains(COOKIE) {
                proptest::prop_assert_eq!(cookie_value([near.as_str()].into_iter()), None);
            }
        }
    }

    #[test]
    fn cookies_are_found_by_their_exact_name() {
        assert_eq!(cookie_value(["strata_token=ab"].into_iter()), Some("ab"));
        assert_eq!(
            cookie_value(["x=1", "y=2; strata_token=cd"].into_iter()),
            Some("cd")
        );
        assert_eq!(cookie_value(["strata_tokens=ab"].into_iter()), None);
        assert_eq!(cookie_value(["xstrata_token=ab"].into_iter()), None);
        assert_eq!(cookie_value([";;;="].into_iter()), None);
    }

    #[test]
    fn percent_decoding_of_keys() {
        assert_eq!(percent_decode("%74oken"), "token");
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn only_loopback_names_reach_a_loopback_listener() {
        for ok in [
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "LOCALHOST",
            "127.0.0.1",
        ] {
            assert!(host_allowed(Some(ok), true), "{ok}");
        }
        for bad in [
            "evil.com:8080",
            "evil.com",
            "10.0.0.1:8080",
            "[2001:db8::1]:80",
            "",
        ] {
            assert!(!host_allowed(Some(bad), true), "{bad}");
        }
        assert!(!host_allowed(None, true));
        assert!(host_allowed(Some("evil.com"), false));
    }
}
