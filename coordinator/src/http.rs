//! The coordinator's HTTP side (`--http-listen`): Prometheus metrics at
//! `/metrics`, encoded by the official client from the engine's state at
//! each scrape (nothing is kept twice), and the heartbeat histogram the
//! engine observes. Off loopback it asks for the same bearer token as
//! gRPC.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::job::{JobState, now_unix_ms};
use crate::server::Engine;

/// Seconds between a rank's heartbeats: 0.25 s to about 64 s.
pub fn heartbeat_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.25, 2.0, 9))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    job: String,
    phase: String,
}

type F64 = Gauge<f64, std::sync::atomic::AtomicU64>;

/// A family of float gauges, registered under `name`.
fn family<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, F64>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, F64>::default();
    reg.register(name, help, f.clone());
    f
}

/// The metrics as Prometheus' text format, from the engine as it is now.
pub fn render(engine: &Engine) -> String {
    let mut reg = Registry::with_prefix("strata");
    let jobs = family::<StateLabel>(&mut reg, "jobs", "Jobs by state");
    let queue = F64::default();
    reg.register("queue_length", "Jobs waiting for slots", queue.clone());
    let slots = F64::default();
    reg.register("slots", "Worker slots of the inventory", slots.clone());
    let leased = F64::default();
    reg.register(
        "slots_leased",
        "Worker slots held by live attempts",
        leased.clone(),
    );
    let step = family::<JobLabel>(&mut reg, "job_step", "Last step recorded");
    let steps_total = family::<JobLabel>(&mut reg, "job_steps_total", "Steps of the run");
    let loss = family::<JobLabel>(&mut reg, "job_loss", "Training loss of the last step");
    let eval_loss = family::<JobLabel>(&mut reg, "job_eval_loss", "Last held-out loss");
    let lr = family::<JobLabel>(&mut reg, "job_lr", "Learning rate of the last step");
    let tps = family::<JobLabel>(
        &mut reg,
        "job_tokens_per_second",
        "Tokens per second of the last step",
    );
    let flops = family::<JobLabel>(
        &mut reg,
        "job_model_flops_per_second",
        "Model FLOP/s of the last step (the plan's FLOPs per token × tokens/s; divide by the devices' peak for MFU)",
    );
    let step_s = family::<JobLabel>(
        &mut reg,
        "job_step_seconds",
        "Wall time of the last step (rank 0's phases summed)",
    );
    let phase_s = family::<PhaseLabel>(
        &mut reg,
        "job_step_phase_seconds",
        "Rank 0's time per phase of the last step",
    );
    let bubble = family::<JobLabel>(
        &mut reg,
        "job_pipeline_bubble",
        "Worst pipeline stage's idle share of the last step",
    );
    let attempts = family::<JobLabel>(&mut reg, "job_attempts", "Attempts so far");
    let ck_stall = family::<JobLabel>(
        &mut reg,
        "job_checkpoint_stall_seconds",
        "Step stall of the latest checkpoint",
    );
    let ck_age = family::<JobLabel>(
        &mut reg,
        "job_checkpoint_age_seconds",
        "Seconds since the latest checkpoint was committed",
    );
    reg.register(
        "heartbeat_interval_seconds",
        "Seconds between a rank's heartbeats",
        engine.heartbeat_gaps.clone(),
    );

    let (job_list, queued, leased_now) = engine.snapshot();
    for s in [
        JobState::Queued,
        JobState::Running,
        JobState::Restarting,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ] {
        let n = job_list.iter().filter(|j| j.state == s).count();
        jobs.get_or_create(&StateLabel {
            state: s.name().into(),
        })
        .set(n as f64);
    }
    queue.set(queued as f64);
    slots.set(f64::from(engine.inventory().total_slots()));
    leased.set(leased_now as f64);
    let now = now_unix_ms();
    for j in job_list.iter().filter(|j| !j.state.is_final()) {
        let l = JobLabel {
            job: j.job_id.clone(),
        };
        steps_total.get_or_create(&l).set(j.steps_total as f64);
        attempts.get_or_create(&l).set(j.attempts.len() as f64);
        if let Some(c) = j.checkpoints.last() {
            ck_stall.get_or_create(&l).set(c.stall_s);
            ck_age
                .get_or_create(&l)
                .set((now - c.written_unix_ms).max(0) as f64 / 1e3);
        }
        let Ok(Some(last)) = engine.store().last_step(&j.job_id) else {
            continue;
        };
        // The step and its numbers come from one record.
        step.get_or_create(&l).set(last.step as f64);
        loss.get_or_create(&l).set(last.loss);
        lr.get_or_create(&l).set(last.lr);
        tps.get_or_create(&l).set(last.tokens_per_s);
        if let Ok(r) = strata_recipe::Recipe::from_toml_str(&j.spec_toml, &j.name) {
            let per_token = strata_recipe::plan::Plan::new(&r).flops_per_token;
            flops.get_or_create(&l).set(per_token * last.tokens_per_s);
        }
        if let Some(e) = last.eval_loss {
            eval_loss.get_or_create(&l).set(e);
        }
        let t = &last.times;
        let phases = [
            ("data", t.data_s),
            ("forward", t.forward_s),
            ("backward", t.backward_s),
            ("all_reduce", t.all_reduce_s),
            ("optimizer", t.optimizer_s),
        ];
        step_s
            .get_or_create(&l)
            .set(phases.iter().map(|p| p.1).sum());
        for (p, v) in phases {
            phase_s
                .get_or_create(&PhaseLabel {
                    job: j.job_id.clone(),
                    phase: p.into(),
                })
                .set(v);
        }
        if let Some(b) = last.stages.iter().map(|s| s.bubble).reduce(f64::max) {
            bubble.get_or_create(&l).set(b);
        }
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

struct Http {
    engine: Arc<Engine>,
    token: Option<String>,
}

async fn metrics(AxumState(http): AxumState<Arc<Http>>, headers: HeaderMap) -> Response {
    if let Some(token) = &http.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            tracing::warn!("HTTP call with a wrong or missing token");
            return (
                StatusCode::UNAUTHORIZED,
                "wrong or missing bearer token (see the coordinator's --token-file)\n",
            )
                .into_response();
        }
    }
    let engine = http.engine.clone();
    match tokio::task::spawn_blocking(move || render(&engine)).await {
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

/// Serves `/metrics` on `listener` until `closing` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    token: Option<String>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(Http { engine, token }));
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "HTTP (/metrics) listening");
    let shutdown = async move {
        let _ = closing.wait_for(|c| *c).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "HTTP server failed");
    }
}
