//! How long the coordinator takes to answer each worker call, measured at
//! the service (after HTTP/2 framing, before the answer is sent): what a
//! heartbeat costs the coordinator itself, apart from the network and the
//! caller's own scheduling.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;

use crate::engine::EngineMetrics;

/// Wraps the gRPC services: every call's time goes to
/// `strata_rpc_seconds{method}`.
#[derive(Clone)]
pub struct Timing(pub Arc<EngineMetrics>);

impl<S> tower_layer::Layer<S> for Timing {
    type Service = Timed<S>;
    fn layer(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    metrics: Arc<EngineMetrics>,
}

/// The calls measured (the long-polling `GetAssignment` and the streams
/// are not: their time is waiting).
fn measured(path: &str) -> Option<&'static str> {
    Some(match path.rsplit('/').next()? {
        "Heartbeat" => "Heartbeat",
        "Register" => "Register",
        "ReportMetrics" => "ReportMetrics",
        "ReportCheckpoint" => "ReportCheckpoint",
        "ReportDone" => "ReportDone",
        "GetJob" => "GetJob",
        "ListJobs" => "ListJobs",
        "SubmitJob" => "SubmitJob",
        _ => return None,
    })
}

impl<S, B> tower_service::Service<http::Request<B>> for Timed<S>
where
    S: tower_service::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = measured(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = fut.await;
            if let Some(m) = method {
                metrics.observe_rpc(m, start.elapsed());
            }
            r
        })
    }
}
