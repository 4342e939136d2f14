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
use crate::job::{JobRecord, JobState, StepRecord, now_unix_ms};
use crate::server::{Engine, Event};
use crate::sweeps::SweepRecord;
use strata_sweep::report::{BOOTSTRAP, Run, TOLERANCE, fits, fits_text, plots, size_of};
use strata_sweep::results::{JobFacts, ResultRow};
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
        .route("/api/sweeps/{id}/plots/{file}", get(sweep_plot))
}

/// An embedded file, never cached stale (the binary may change).
fn embedded(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    embedded("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    embedded("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    embedded("text/css; charset=utf-8", STYLE)
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
        "peak_flops": s.peak_flops.map(num),
    })
}

/// The coordinator, every job (newest first) and every sweep.
async fn overview(AxumState(http): AxumState<Arc<Http>>) -> Response {
    let engine = http.engine.clone();
    let built = tokio::task::spawn_blocking(move || {
        let (jobs, queued, leased) = engine.snapshot();
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
        // MFU's numerator per token/s (the job page's; the list has none).
        v["flops_per_token"] = json!(
            strata_recipe::Recipe::from_toml_str(&job.spec_toml, &job.name)
                .ok()
                .map(|r| strata_recipe::plan::Plan::new(&r).flops_per_token)
        );
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

/// A sweep's report as the dashboard shows it: what `strata sweep
/// report` prints and plots, with the same defaults.
pub(crate) struct SweepReport {
    /// The points' jobs and their states when it was made: it is made
    /// again only when they change.
    key: Vec<(String, &'static str, u64)>,
    fits_text: String,
    /// Why there are no fits yet.
    not_yet: Option<String>,
    /// (file stem, title, SVG).
    plots: Vec<(String, String, String)>,
}

/// Reports made, by sweep.
pub(crate) type Reports = std::sync::Mutex<HashMap<String, Arc<SweepReport>>>;

fn report_key(
    s: &SweepRecord,
    jobs: &HashMap<String, JobRecord>,
) -> Vec<(String, &'static str, u64)> {
    s.points
        .iter()
        .filter_map(|p| jobs.get(p.job_id.as_deref()?))
        .map(|j| (j.job_id.clone(), j.state.name(), j.steps_done))
        .collect()
}

/// The report of sweep `s`: its succeeded points' rows (from the store's
/// steps), fitted and plotted.
fn make_report(
    engine: &Engine,
    s: &SweepRecord,
    jobs: &HashMap<String, JobRecord>,
    key: Vec<(String, &'static str, u64)>,
) -> Result<SweepReport, String> {
    let mut runs = Vec::new();
    for p in &s.points {
        let Some(j) = p.job_id.as_deref().and_then(|id| jobs.get(id)) else {
            continue;
        };
        if j.state != JobState::Succeeded {
            continue;
        }
        let mut evals = Vec::new();
        let mut train_loss = None;
        engine
            .store()
            .visit_steps(&j.job_id, 0, |st| {
                if let Some(e) = st.eval_loss {
                    evals.push((st.tokens as f64, e));
                }
                train_loss = Some(st.loss);
                std::ops::ControlFlow::Continue(())
            })
            .map_err(|e| e.to_string())?;
        let parent = j.parent.as_ref();
        let row = ResultRow::of(&JobFacts {
            job: &j.job_id,
            name: &j.name,
            state: j.state.name(),
            parent: parent.map_or("", |p| p.job.as_str()),
            parent_step: parent.map_or(0, |p| p.step),
            spec_toml: &j.spec_toml,
            tokens_done: j.tokens_done,
            first_start_unix_ms: j
                .attempts
                .first()
                .map_or(j.started_unix_ms, |a| a.started_unix_ms),
            end_unix_ms: j.finished_unix_ms.max(j.started_unix_ms),
            train_loss,
            eval_loss: evals.last().map(|e| e.1),
        })?;
        runs.push(Run {
            size: size_of(&p.point.label, &row),
            kind: kind_name(&p.point.kind).into(),
            fraction: p.point.fraction,
            evals,
            row,
        });
    }
    if runs.is_empty() {
        return Ok(SweepReport {
            key,
            fits_text: String::new(),
            not_yet: Some("no point has succeeded yet".into()),
            plots: Vec::new(),
        });
    }
    let good: Vec<&Run> = runs.iter().collect();
    let f = fits(&good, BOOTSTRAP, TOLERANCE);
    Ok(SweepReport {
        key,
        fits_text: fits_text(&f, BOOTSTRAP),
        not_yet: None,
        plots: plots(&s.name, &good, &f)
            .into_iter()
            .map(|(stem, chart)| (stem.to_string(), chart.title.clone(), chart.svg()))
            .collect(),
    })
}

fn kind_name(k: &PointKind) -> &'static str {
    match k {
        PointKind::Run => "run",
        PointKind::Stable => "stable",
        PointKind::Branch { .. } => "branch",
    }
}

/// Sweep `id`'s report, made again when its jobs have changed.
async fn report_of(
    http: &Arc<Http>,
    s: SweepRecord,
    jobs: HashMap<String, JobRecord>,
) -> Result<Arc<SweepReport>, String> {
    let key = report_key(&s, &jobs);
    if let Some(r) = http.reports.lock().expect("reports").get(&s.sweep_id)
        && r.key == key
    {
        return Ok(r.clone());
    }
    let engine = http.engine.clone();
    let made = tokio::task::spawn_blocking(move || {
        make_report(&engine, &s, &jobs, key).map(|r| (s.sweep_id, Arc::new(r)))
    })
    .await
    .map_err(|e| e.to_string())??;
    http.reports
        .lock()
        .expect("reports")
        .insert(made.0, made.1.clone());
    Ok(made.1)
}

fn sweep_and_jobs(engine: &Engine, id: &str) -> Option<(SweepRecord, HashMap<String, JobRecord>)> {
    let s = engine.lock().sweeps.get(id).cloned()?;
    let jobs = engine
        .snapshot()
        .0
        .into_iter()
        .map(|(j, _)| (j.job_id.clone(), j))
        .collect();
    Some((s, jobs))
}

/// One of a sweep's plots, as SVG (`STEM.svg`).
async fn sweep_plot(
    AxumState(http): AxumState<Arc<Http>>,
    Path((id, file)): Path<(String, String)>,
) -> Response {
    let Some((s, jobs)) = sweep_and_jobs(&http.engine, &id) else {
        return not_found(format!("no sweep {id}"));
    };
    let report = match report_of(&http, s, jobs).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let stem = file.strip_suffix(".svg").unwrap_or(&file);
    match report.plots.iter().find(|p| p.0 == stem) {
        Some((_, _, svg)) => (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            svg.clone(),
        )
            .into_response(),
        None => not_found(format!("sweep {id} has no plot {file}")),
    }
}

/// A sweep: its record, each point's job as it is now, and its report.
async fn sweep(AxumState(http): AxumState<Arc<Http>>, Path(id): Path<String>) -> Response {
    let Some((s, jobs)) = sweep_and_jobs(&http.engine, &id) else {
        return not_found(format!("no sweep {id}"));
    };
    let report = report_of(&http, s.clone(), jobs.clone()).await;
    let points: Vec<Value> = s
        .points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let j = p.job_id.as_deref().and_then(|id| jobs.get(id));
            json!({
                "index": i,
                "label": p.point.label,
                "kind": kind_name(&p.point.kind),
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
        "fits_text": report.as_ref().map_or("", |r| r.fits_text.as_str()),
        "fits_error": match &report {
            Ok(r) => r.not_yet.clone(),
            Err(e) => Some(e.clone()),
        },
        "plots": report.as_ref().map_or(Vec::new(), |r| r.plots.iter().map(|(name, title, _)| json!({ "name": name, "title": title })).collect()),
    }))
    .into_response()
}
