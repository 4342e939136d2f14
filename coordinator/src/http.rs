//! The coordinator's HTTP side (`--http-listen`): Prometheus metrics at
//! `/metrics`, encoded by the official client from the engine's state at
//! each scrape (nothing is kept twice), the heartbeat histogram the engine
//! observes, and the dashboard ([`crate::dashboard`]). With a client token
//! (always, off loopback) every path asks for it, as gRPC does.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, Request, State as AxumState};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::job::{JobRecord, JobState, now_unix_ms};
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
struct RankLabel {
    job: String,
    rank: String,
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
    let mfu = family::<JobLabel>(
        &mut reg,
        "job_mfu",
        "Model FLOP/s over the devices' peak ([device] peak_tflops, or the GPU's bf16 peak); absent when unknown",
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
    let rank_step_s = family::<RankLabel>(
        &mut reg,
        "job_rank_step_seconds",
        "Each rank's wall time of its last finished step (from its heartbeats): a straggler stands out",
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
    let job_list: Vec<JobRecord> = job_list.into_iter().map(|(j, _)| j).collect();
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
        for r in engine.ranks_now(&j.job_id) {
            if let Some(s) = r.last_step {
                rank_step_s
                    .get_or_create(&RankLabel {
                        job: j.job_id.clone(),
                        rank: r.rank.to_string(),
                    })
                    .set(s.wall_s);
            }
        }
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
            if let Some(peak) = last.peak_flops.filter(|p| *p > 0.0) {
                mfu.get_or_create(&l)
                    .set(per_token * last.tokens_per_s / peak);
            }
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

/// What the HTTP handlers share.
pub(crate) struct Http {
    pub(crate) engine: Arc<Engine>,
    /// The bearer token calls must carry, when one is set.
    pub(crate) token: Option<String>,
    /// Sweep reports made for the dashboard.
    pub(crate) reports: crate::dashboard::Reports,
}

/// The cookie a browser keeps the token in, once given `?token=`.
const COOKIE: &str = "strata_token";

/// The cookie holds the token hex encoded: any token is then a valid
/// cookie value.
fn hex(token: &str) -> String {
    token.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Equal without an early exit: how long a comparison takes says nothing
/// of how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
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

async fn metrics(AxumState(http): AxumState<Arc<Http>>) -> Response {
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
    let app = Router::new()
        .route("/metrics", get(metrics))
        .merge(crate::dashboard::routes())
        .layer(axum::middleware::from_fn_with_state(
            http.clone(),
            authorize,
        ))
        .with_state(http);
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "HTTP (/metrics and the dashboard) listening");
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
