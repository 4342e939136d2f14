//! The dashboard: one page of embedded HTML, CSS and JavaScript (no build
//! step, no library) and the JSON it reads. The job list and the sweeps
//! come from the engine's snapshot; a job page follows the job's watch
//! stream as server-sent events (its history in pages, thinned for the
//! charts when long, then each step and each change of the job as they
//! happen; every event carries an id, and a reconnect resumes after
//! `Last-Event-ID`), and asks every few seconds for its ranks summed up
//! (per node, per stage, the slowest) and one page of them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde_json::{Value, json};

use super::Http;
use crate::engine::watch::{WatchItem, WatchOptions};
use crate::engine::{Engine, RankRow, RanksSnapshot};
use crate::job::{JobRecord, JobState, StepRecord, now_unix_ms};
use crate::sweep::SweepRecord;
use strata_sweep::report::{BOOTSTRAP, Run, TOLERANCE, fits, fits_text, plots, size_of};
use strata_sweep::results::{JobFacts, ResultRow};
use strata_sweep::spec::PointKind;

const PAGE: &str = include_str!("../../assets/dashboard.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

/// Ranks per page of the job page's rank list, by default and at most.
const RANKS_PAGE: usize = 50;
const RANKS_PAGE_MAX: usize = 1000;

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
        .route("/api/jobs/{id}/ranks", get(ranks_page))
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
        "earlier_attempts": job.earlier_attempts,
        "attempts_total": job.attempts_total(),
        "blamed_nodes": job.blamed_nodes,
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
        "sources": s.sources.iter().map(|x| json!({
            "name": x.name,
            "tokens": x.tokens,
            "loss": x.loss.map(num),
            "eval_loss": x.eval_loss.map(num),
        })).collect::<Vec<_>>(),
    })
}

/// The coordinator, every job (newest first) and every sweep.
async fn overview(AxumState(http): AxumState<Arc<Http>>) -> Response {
    let engine = &http.engine;
    let snap = engine.snapshot();
    let mut views: Vec<(i64, Value)> = snap
        .jobs
        .iter()
        .map(|v| {
            (
                v.job.submitted_unix_ms,
                job_json(&v.job, v.waiting.as_deref(), v.last_step.as_ref()),
            )
        })
        .collect();
    views.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
    let sweeps: Vec<Value> = engine
        .sweeps_view()
        .iter()
        .rev()
        .map(|(s, jobs)| {
            let done = jobs
                .iter()
                .filter(|j| j.as_ref().is_some_and(|j| j.state.is_final()))
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
    Json(json!({
        "launcher": engine.launcher_description(),
        "slots": engine.inventory().total_slots(),
        "slots_leased": snap.slots_leased,
        "queue_length": snap.queue_length,
        "now_unix_ms": now_unix_ms(),
        "jobs": views.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "sweeps": sweeps,
    }))
    .into_response()
}

fn rank_json(snap: &RanksSnapshot, r: &RankRow) -> Value {
    json!({
        "rank": r.rank,
        "node": &*snap.nodes[r.node as usize],
        "gpu": r.gpu,
        "addr": snap.addrs.get(r.rank as usize).filter(|a| !a.is_empty()),
        "heartbeat_age_s": r.heartbeat_age_s,
        "step": r.step,
        "step_age_s": r.step_age_s,
        "done": r.done,
        "activity": r.activity,
        "last_step": r.last_step,
    })
}

#[derive(serde::Deserialize)]
struct RanksQuery {
    offset: Option<usize>,
    limit: Option<usize>,
    /// `rank` (default) or `slowest`.
    order: Option<String>,
}

/// One page of the ranks, in rank order or slowest first.
fn page_of(snap: &RanksSnapshot, q: &RanksQuery) -> Value {
    let mut rows: Vec<&RankRow> = snap.rows.iter().collect();
    if q.order.as_deref() == Some("slowest") {
        let wall = |r: &RankRow| r.last_step.map_or(0.0, |s| s.wall_s);
        rows.sort_by(|a, b| wall(b).total_cmp(&wall(a)).then(a.rank.cmp(&b.rank)));
    }
    let offset = q.offset.unwrap_or(0).min(rows.len());
    let limit = q.limit.unwrap_or(RANKS_PAGE).clamp(1, RANKS_PAGE_MAX);
    // The widest step of all, so that bars of every page compare.
    let widest = snap
        .rows
        .iter()
        .filter_map(|r| r.last_step.map(|s| s.wall_s))
        .fold(0.0, f64::max);
    json!({
        "total": rows.len(),
        "offset": offset,
        "limit": limit,
        "widest_step_s": widest,
        "ranks": rows[offset..(offset + limit).min(rows.len())]
            .iter()
            .map(|r| rank_json(snap, r))
            .collect::<Vec<_>>(),
    })
}

/// A job with its recipe and, while its processes live, its ranks summed
/// up and their first page.
async fn job(AxumState(http): AxumState<Arc<Http>>, Path(id): Path<String>) -> Response {
    let engine = http.engine.clone();
    let view = match engine.job_view(&id) {
        Ok(v) => v,
        Err(e) => return not_found(e.to_string()),
    };
    // An ended job's last step is no longer in memory: the store has it.
    let last = match view.last_step.clone() {
        Some(s) => Some(s),
        None => {
            let (e, id) = (engine.clone(), id.clone());
            tokio::task::spawn_blocking(move || e.store().last_step(&id).ok().flatten())
                .await
                .ok()
                .flatten()
        }
    };
    let snap = engine.ranks(&id);
    let job = &view.job;
    let mut v = job_json(job, view.waiting.as_deref(), last.as_ref());
    v["recipe"] = json!(job.spec_toml);
    v["ranks_summary"] = json!((!snap.rows.is_empty()).then(|| snap.summary()));
    v["ranks"] = page_of(
        &snap,
        &RanksQuery {
            offset: None,
            limit: None,
            order: None,
        },
    );
    // MFU's numerator per token/s (the job page's; the list has none).
    v["flops_per_token"] = json!(
        job.recipe
            .as_ref()
            .map(|r| strata_recipe::plan::Plan::new(r).flops_per_token)
    );
    Json(v).into_response()
}

/// A page of job `id`'s live ranks.
async fn ranks_page(
    AxumState(http): AxumState<Arc<Http>>,
    Path(id): Path<String>,
    Query(q): Query<RanksQuery>,
) -> Response {
    if let Err(e) = http.engine.job(&id) {
        return not_found(e.to_string());
    }
    Json(page_of(&http.engine.ranks(&id), &q)).into_response()
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    /// The first step to send (a reconnect's `Last-Event-ID` wins).
    from: Option<u64>,
    /// Thin a longer history to about this many steps.
    points: Option<u64>,
}

fn sse(name: &str, data: &Value, id: Option<u64>) -> Result<SseEvent, Infallible> {
    let e = SseEvent::default().event(name).data(data.to_string());
    Ok(match id {
        Some(id) => e.id(id.to_string()),
        None => e,
    })
}

/// The job's watch stream as server-sent events: `job` (the job now and
/// at each change), `steps` (an array: the history in pages, then each
/// new step), and `end` once the job has ended (the page then closes the
/// stream rather than let the browser reconnect). Every event carries the
/// last step sent as its id: a browser that reconnects sends it back as
/// `Last-Event-ID`, and the stream resumes after it, so no step comes
/// twice.
async fn events(
    AxumState(http): AxumState<Arc<Http>>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|last| last + 1);
    let from = resume.or(q.from).unwrap_or(0);
    let items = match http.engine.watch(
        &id,
        WatchOptions {
            from_step: from,
            points: q.points,
        },
    ) {
        Ok(s) => s,
        Err(e) => return not_found(e.to_string()),
    };
    let mut last: Option<u64> = from.checked_sub(1).filter(|_| resume.is_some());
    let events = items.map(move |item| match item {
        Ok(WatchItem::Job(j)) => sse("job", &job_json(&j, None, None), last),
        Ok(WatchItem::Steps(steps)) => {
            last = steps.last().map(|s| s.step).or(last);
            sse(
                "steps",
                &Value::Array(steps.iter().map(step_json).collect()),
                last,
            )
        }
        Ok(WatchItem::End(state)) => sse("end", &json!({ "state": state.name() }), last),
        Err(e) => sse("error", &json!({ "error": e.to_string() }), last),
    });
    let mut closing = http.engine.closing();
    let stream = events.take_until(Box::pin(async move {
        let _ = closing.wait_for(|c| *c).await;
    }));
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
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

/// The report last made of each sweep, behind a lock of its own: one
/// report is made at a time per sweep, and polls that come meanwhile wait
/// for it instead of fitting again.
pub(crate) type Reports =
    std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Arc<SweepReport>>>>>>;

/// What a report depends on: its succeeded points only (a running point's
/// progress changes nothing in it).
fn report_key(jobs: &[Option<Arc<JobRecord>>]) -> Vec<(String, &'static str, u64)> {
    jobs.iter()
        .flatten()
        .filter(|j| j.state == JobState::Succeeded)
        .map(|j| (j.job_id.to_string(), j.state.name(), j.steps_done))
        .collect()
}

/// The report of sweep `s`: its succeeded points' rows (from the store's
/// steps), fitted and plotted.
fn make_report(
    engine: &Engine,
    s: &SweepRecord,
    jobs: &[Option<Arc<JobRecord>>],
    key: Vec<(String, &'static str, u64)>,
) -> Result<SweepReport, String> {
    let mut runs = Vec::new();
    for (p, j) in s.points.iter().zip(jobs) {
        let Some(j) = j else {
            continue;
        };
        if j.state != JobState::Succeeded {
            continue;
        }
        let mut evals = Vec::new();
        let mut train_loss = None;
        engine
            .store()
            .visit_steps(j.job_id.as_str(), 0, |st| {
                if let Some(e) = st.eval_loss {
                    evals.push((st.tokens as f64, e));
                }
                train_loss = Some(st.loss);
                std::ops::ControlFlow::Continue(())
            })
            .map_err(|e| e.to_string())?;
        let parent = j.parent.as_ref();
        let row = ResultRow::of(&JobFacts {
            job: j.job_id.as_str(),
            name: &j.name,
            state: j.state.name(),
            parent: parent.map_or("", |p| p.job.as_str()),
            parent_step: parent.map_or(0, |p| p.step),
            spec_toml: &j.spec_toml,
            tokens_done: j.tokens_done,
            first_start_unix_ms: j.first_started_unix_ms(),
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
    s: Arc<SweepRecord>,
    jobs: Vec<Option<Arc<JobRecord>>>,
) -> Result<Arc<SweepReport>, String> {
    let key = report_key(&jobs);
    let slot = http
        .reports
        .lock()
        .expect("reports")
        .entry(s.sweep_id.clone())
        .or_default()
        .clone();
    let mut last = slot.lock().await;
    if let Some(r) = last.as_ref()
        && r.key == key
    {
        return Ok(r.clone());
    }
    let engine = http.engine.clone();
    http.engine.metrics.sweep_reports.inc();
    let made = tokio::task::spawn_blocking(move || make_report(&engine, &s, &jobs, key))
        .await
        .map_err(|e| e.to_string())??;
    let made = Arc::new(made);
    *last = Some(made.clone());
    Ok(made)
}

fn sweep_and_jobs(engine: &Engine, id: &str) -> Option<crate::engine::sweeps::SweepView> {
    engine.sweep_view(id).ok()
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
        .zip(&jobs)
        .enumerate()
        .map(|(i, (p, j))| {
            let j = j.as_deref();
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
