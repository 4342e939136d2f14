//! The dashboard: one page of embedded HTML, CSS and JavaScript (no build
//! step, no library) and the JSON it reads. The job list and the sweeps
//! come from the engine as they are now; a job page follows the job's
//! watch stream as server-sent events (its recorded steps in batches, then
//! each step and each change of the job as it happens) and asks for its
//! live ranks every few seconds.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::http::Http;
use crate::job::{JobRecord, StepRecord, now_unix_ms};
use crate::server::{Engine, Event};
use strata_sweep::spec::PointKind;

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

/// Steps per event of a job's history.
const HISTORY_BATCH: usize = 500;

/// The dashboard's routes (pages, assets and `/api`).
pub(crate) fn routes() -> Router<Arc<Http>> {
    Router::new()
        .route("/", get(page))
        .route("/jobs/{id}", get(page))
        .route("/sweeps/{id}", get(page))
        .route("/assets/dashboard.js", get(script))
        .route("/assets/dashboard.css", get(style))
        .route("/api/overview", get(overview))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/events", get(events))
        .route("/api/sweeps/{id}", get(sweep))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
        .into_response()
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": what }))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({ "error": e.to_string() })),
    )
        .into_response()
}

/// A float as JSON: non-finite ones (a diverged loss) as `null`.
fn num(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

/// Seconds left, from the last step: tokens per step so far over its
/// throughput, times the steps to go.
fn eta_s(job: &JobRecord, last: Option<&StepRecord>) -> Option<f64> {
    let last = last?;
    if job.state.is_final() || last.step == 0 || last.tokens_per_s <= 0.0 {
        return None;
    }
    let per_step = last.tokens as f64 / last.step as f64 / last.tokens_per_s;
    Some(job.steps_total.saturating_sub(last.step) as f64 * per_step)
}

/// A job as the dashboard shows it (never its workers' token).
fn job_json(job: &JobRecord, waiting: Option<&str>, last: Option<&StepRecord>) -> Value {
    let l = job.layout;
    json!({
        "id": job.job_id,
        "name": job.name,
        "state": job.state.name(),
        "layout": { "tp": l.tp, "pp": l.pp, "dp": l.dp, "text": l.to_string() },
        "microbatches": job.microbatches,
        "steps_done": job.steps_done,
        "steps_total": job.steps_total,
        "tokens_done": job.tokens_done,
        "last_loss": job.last_loss.map(num),
        "last_eval_loss": last.and_then(|s| s.eval_loss).map(num),
        "tokens_per_s": last.map(|s| num(s.tokens_per_s)),
        "eta_s": eta_s(job, last),
        "failure_reason": job.failure_reason,
        "waiting": waiting,
        "submitted_unix_ms": job.submitted_unix_ms,
        "started_unix_ms": job.started_unix_ms,
        "finished_unix_ms": job.finished_unix_ms,
        "run_dir": job.run_dir,
        "attempts": job.attempts,
        "checkpoints": job.checkpoints,
        "checkpoint_errors": job.checkpoint_errors,
        "parent": job.parent,
    })
}

fn step_json(s: &StepRecord) -> Value {
    let t = &s.times;
    json!({
        "step": s.step,
        "tokens": s.tokens,
        "loss": num(s.loss),
        "lr": num(s.lr),
        "tokens_per_s": num(s.tokens_per_s),
        "grad_norm": num(s.grad_norm),
        "seq_log2": s.seq_log2,
        "eval_loss": s.eval_loss.map(num),
        "times": {
            "data": num(t.data_s),
            "forward": num(t.forward_s),
            "backward": num(t.backward_s),
            "all_reduce": num(t.all_reduce_s),
            "optimizer": num(t.optimizer_s),
        },
        "stages": s.stages.iter().map(|g| json!({
            "stage": g.stage,
            "forward": num(g.forward_s),
            "backward": num(g.backward_s),
            "wait": num(g.wait_s),
            "tp_comm": num(g.tp_comm_s),
            "bubble": num(g.bubble),
        })).collect::<Vec<_>>(),
        "bubble_theory": num(s.bubble_theory),
    })
}

/// The coordinator, every job (newest first) and every sweep.
async fn overview(AxumState(http): AxumState<Arc<Http>>) -> Response {
    let engine = http.engine.clone();
    let built = tokio::task::spawn_blocking(move || {
        let jobs = engine.jobs_now();
        let (_, queued, leased) = engine.snapshot();
        let mut views: Vec<(i64, Value)> = jobs
            .iter()
            .map(|(j, waiting)| {
                // Only live jobs need their last step (for the ETA).
                let last = if j.state.is_final() {
                    None
                } else {
                    engine.store().last_step(&j.job_id).ok().flatten()
                };
                (
                    j.submitted_unix_ms,
                    job_json(j, waiting.as_deref(), last.as_ref()),
                )
            })
            .collect();
        views.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        let states: HashMap<&str, &JobRecord> =
            jobs.iter().map(|(j, _)| (j.job_id.as_str(), j)).collect();
        let sweeps: Vec<Value> = engine
            .lock()
            .sweeps
            .values()
            .rev()
            .map(|s| {
                let done = s
                    .points
                    .iter()
                    .filter(|p| {
                        p.job_id
                            .as_deref()
                            .and_then(|id| states.get(id))
                            .is_some_and(|j| j.state.is_final())
                    })
                    .count();
                json!({
                    "id": s.sweep_id,
                    "name": s.name,
                    "state": s.state,
                    "points": s.points.len(),
                    "points_ended": done,
                    "submitted_unix_ms": s.submitted_unix_ms,
                })
            })
            .collect();
        json!({
            "launcher": engine.launcher_description(),
            "slots": engine.inventory().total_slots(),
            "slots_leased": leased,
            "queue_length": queued,
            "now_unix_ms": now_unix_ms(),
            "jobs": views.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
            "sweeps": sweeps,
        })
    })
    .await;
    match built {
        Ok(v) => Json(v).into_response(),
        Err(e) => internal(e),
    }
}

/// A job with its recipe and, while its processes live, its ranks.
async fn job(AxumState(http): AxumState<Arc<Http>>, Path(id): Path<String>) -> Response {
    let engine = http.engine.clone();
    let built = tokio::task::spawn_blocking(move || {
        let (job, waiting, ranks) = engine.job_now(&id)?;
        let last = engine.store().last_step(&id).ok().flatten();
        let mut v = job_json(&job, waiting.as_deref(), last.as_ref());
        v["recipe"] = json!(job.spec_toml);
        v["ranks"] = json!(ranks);
        Some(v)
    })
    .await;
    match built {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => not_found("no such job".into()),
        Err(e) => internal(e),
    }
}

#[derive(serde::Deserialize)]
struct FromStep {
    from: Option<u64>,
}

fn sse(name: &str, data: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().event(name).data(data.to_string()))
}

/// The job's watch stream as server-sent events: `job` (the job now and
/// at each change), `steps` (an array: the history in batches, then each
/// new step), and `end` once the job has ended (the page then closes the
/// stream rather than let the browser reconnect).
async fn events(
    AxumState(http): AxumState<Arc<Http>>,
    Path(id): Path<String>,
    Query(q): Query<FromStep>,
) -> Response {
    let engine = http.engine.clone();
    // Subscribe before reading history so nothing falls in between.
    let (job, rx) = match engine.subscribe(&id) {
        Ok(v) => v,
        Err(e) => return not_found(e.to_string()),
    };
    let read = engine.clone();
    let history = tokio::task::spawn_blocking(move || {
        read.store().flush()?;
        read.store().steps(&id, q.from.unwrap_or(0), 0)
    })
    .await;
    let history = match history {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    let mut closing = engine.closing();
    let stream = event_stream(job, history, rx).take_until(Box::pin(async move {
        let _ = closing.wait_for(|c| *c).await;
    }));
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn event_stream(
    job: JobRecord,
    history: Vec<StepRecord>,
    rx: broadcast::Receiver<Event>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let done = job.state.is_final();
    let last_step = history.last().map_or(0, |s| s.step);
    let mut first = vec![sse("job", &job_json(&job, None, history.last()))];
    first.extend(history.chunks(HISTORY_BATCH).map(|c| {
        sse(
            "steps",
            &Value::Array(c.iter().map(step_json).collect::<Vec<_>>()),
        )
    }));
    if done {
        first.push(sse("end", &json!({ "state": job.state.name() })));
    }
    let live = futures::stream::unfold((rx, done, last_step), |(mut rx, done, last)| async move {
        if done {
            return None;
        }
        loop {
            return match rx.recv().await {
                // Already sent from the history.
                Ok(Event::Step(s)) if s.step <= last => continue,
                Ok(Event::Step(s)) => {
                    let step = s.step;
                    Some((
                        vec![sse("steps", &json!([step_json(&s)]))],
                        (rx, false, step),
                    ))
                }
                Ok(Event::Job(j)) => {
                    let end = j.state.is_final();
                    let mut out = vec![sse("job", &job_json(&j, None, None))];
                    if end {
                        out.push(sse("end", &json!({ "state": j.state.name() })));
                    }
                    Some((out, (rx, end, last)))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => None,
            };
        }
    })
    .flat_map(futures::stream::iter);
    futures::stream::iter(first).chain(live)
}

/// A sweep: its record and each point's job as it is now.
async fn sweep(AxumState(http): AxumState<Arc<Http>>, Path(id): Path<String>) -> Response {
    let engine: Arc<Engine> = http.engine.clone();
    let Some(s) = engine.lock().sweeps.get(&id).cloned() else {
        return not_found(format!("no sweep {id}"));
    };
    let jobs: HashMap<String, JobRecord> = engine
        .jobs_now()
        .into_iter()
        .map(|(j, _)| (j.job_id.clone(), j))
        .collect();
    let points: Vec<Value> = s
        .points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let j = p.job_id.as_deref().and_then(|id| jobs.get(id));
            json!({
                "index": i,
                "label": p.point.label,
                "kind": match p.point.kind {
                    PointKind::Run => "run",
                    PointKind::Stable => "stable",
                    PointKind::Branch { .. } => "branch",
                },
                "fraction": p.point.fraction,
                "job": p.job_id,
                "earlier_jobs": p.earlier_jobs,
                "blocked": p.blocked,
                "state": j.map(|j| j.state.name()),
                "steps_done": j.map(|j| j.steps_done),
                "steps_total": j.map(|j| j.steps_total),
                "last_loss": j.and_then(|j| j.last_loss).map(num),
            })
        })
        .collect();
    Json(json!({
        "id": s.sweep_id,
        "name": s.name,
        "state": s.state,
        "reason": s.reason,
        "max_concurrent": s.max_concurrent,
        "submitted_unix_ms": s.submitted_unix_ms,
        "finished_unix_ms": s.finished_unix_ms,
        "spec": s.spec_toml,
        "points": points,
    }))
    .into_response()
}
