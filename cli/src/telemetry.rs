//! Logs and traces. Logs go to stderr (`RUST_LOG` filters them). When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, strata's spans are also exported over OTLP/gRPC: the
//! coordinator's submission, placement, launch and checkpoint commits, and
//! each worker's steps with their phases and checkpoint copies and writes.
//! A worker's spans join the trace of the launch that started it (W3C
//! `traceparent`, passed in `TRACEPARENT`).

use std::collections::HashMap;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; dropping it sends the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The runtime the OTLP client's connection lives on.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: exporting the last spans failed: {e}");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Whether traces are to be exported.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Installs the logger (at `default_level` unless `RUST_LOG` says) and,
/// when configured, the OTLP exporter for `service` (unless
/// `OTEL_SERVICE_NAME` names it).
pub fn init(default_level: &str, service: &str) -> Telemetry {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Worker logs go to files and into failure reasons: colour only
        // for a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        );
    let mut telemetry = Telemetry {
        provider: None,
        runtime: None,
    };
    let traces = if otlp_configured() {
        match exporter(service) {
            Ok((provider, runtime)) => {
                let tracer = provider.tracer("strata");
                opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
                telemetry.provider = Some(provider);
                telemetry.runtime = Some(runtime);
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(Targets::new().with_target("strata", LevelFilter::INFO)),
                )
            }
            Err(e) => {
                eprintln!("warning: traces are not exported: {e}");
                None
            }
        }
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    telemetry
}

fn exporter(service: &str) -> anyhow::Result<(SdkTracerProvider, tokio::runtime::Runtime)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp")
        .enable_all()
        .build()?;
    let provider = runtime.block_on(async {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service.to_string());
        }
        Ok::<_, anyhow::Error>(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build(),
        )
    })?;
    Ok((provider, runtime))
}

/// Makes `span` a child of the trace in `TRACEPARENT`, when there is one
/// (a worker started by a coordinator that exports traces).
pub fn join_parent_trace(span: &tracing::Span) {
    let Ok(parent) = std::env::var("TRACEPARENT") else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_string(), parent)]);
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!(error = %e, "TRACEPARENT not joined");
    }
}
