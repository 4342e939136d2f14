//! `strata top`: the coordinator's jobs in the terminal (ratatui), live.
//! The job list is asked for every refresh; each live job is followed
//! through its watch stream, which feeds the selected job's curves and
//! numbers. `--once` prints one frame as text (for scripts and logs).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use ratatui::Frame;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Sparkline, Table, TableState};
use strata_proto::v1 as pb;

use crate::format::count;
use crate::jobs::{Client, Connect, runtime, state_name, status_error};

/// Steps kept per followed job (the curves' width is less).
const KEEP: usize = 600;

#[derive(Args)]
pub struct TopArgs {
    /// Print one frame as text and exit (no terminal needed).
    #[arg(long)]
    pub once: bool,
    /// Width of the `--once` frame, in columns.
    #[arg(long, default_value_t = 150)]
    pub width: u16,
    /// Seconds between refreshes of the job list.
    #[arg(long, default_value_t = 1.0)]
    pub refresh_s: f64,
    /// The job to detail first (default: the first listed: live jobs
    /// first, then the newest).
    #[arg(long)]
    pub job: Option<String>,
    #[command(flatten)]
    pub connect: Connect,
}

/// What a followed job's watch stream has said.
#[derive(Default, Clone)]
struct Followed {
    job: Option<pb::Job>,
    steps: VecDeque<pb::StepMetrics>,
    /// The stream ended (the job ended, or the call failed: `error`).
    ended: bool,
    error: Option<String>,
    /// An ended job's history was read (or is being read) when it had
    /// this many steps.
    history_of: Option<u64>,
}

/// Everything one frame shows.
#[derive(Default, Clone)]
struct Snapshot {
    url: String,
    jobs: Vec<pb::Job>,
    followed: BTreeMap<String, Followed>,
    /// Why the last refresh failed.
    error: Option<String>,
}

impl Snapshot {
    /// A job as freshly as known: its stream's view when it has one.
    fn job<'a>(&'a self, j: &'a pb::Job) -> &'a pb::Job {
        self.followed
            .get(&j.job_id)
            .and_then(|f| f.job.as_ref())
            .filter(|s| s.steps_done >= j.steps_done)
            .unwrap_or(j)
    }

    fn steps(&self, id: &str) -> Option<&VecDeque<pb::StepMetrics>> {
        self.followed.get(id).map(|f| &f.steps)
    }
}

fn is_live(j: &pb::Job) -> bool {
    matches!(
        j.state(),
        pb::JobState::Queued | pb::JobState::Running | pb::JobState::Restarting
    )
}

/// Follows job `id` into `shared` until its stream ends.
async fn follow(mut client: Client, id: String, from: u64, shared: Arc<Mutex<Snapshot>>) {
    let update = |f: &dyn Fn(&mut Followed)| {
        let mut s = shared.lock().expect("snapshot");
        f(s.followed.entry(id.clone()).or_default());
    };
    let stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: id.clone(),
            from_step: from,
        })
        .await;
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(e) => {
            let why = status_error("WatchJob", e).to_string();
            update(&|f| {
                f.ended = true;
                f.error = Some(why.clone());
            });
            return;
        }
    };
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(pb::JobEvent {
                event: Some(pb::job_event::Event::Job(j)),
            }) => update(&|f| f.job = Some(j.clone())),
            Ok(pb::JobEvent {
                event: Some(pb::job_event::Event::Step(s)),
            }) => update(&|f| {
                f.steps.push_back(s.clone());
                while f.steps.len() > KEEP {
                    f.steps.pop_front();
                }
            }),
            Ok(_) => {}
            Err(e) => {
                let why = status_error("WatchJob", e).to_string();
                update(&|f| f.error = Some(why.clone()));
                break;
            }
        }
    }
    update(&|f| f.ended = true);
}

/// The last steps (up to [`KEEP`]) of job `j` from its history.
async fn history(client: &mut Client, j: &pb::Job) -> anyhow::Result<Vec<pb::StepMetrics>> {
    Ok(client
        .get_metrics(pb::GetMetricsRequest {
            job_id: j.job_id.clone(),
            from_step: j.steps_done.saturating_sub(KEEP as u64),
            limit: 0,
        })
        .await
        .map_err(|s| status_error("GetMetrics", s))?
        .into_inner()
        .steps)
}

/// Whether the ended job `j`'s curves must be read from its history: it
/// has steps that no stream brought and no read was made at its count.
fn needs_history(snap: &Snapshot, j: &pb::Job) -> bool {
    !is_live(j)
        && j.steps_done > 0
        && snap.followed.get(&j.job_id).is_none_or(|f| {
            f.history_of != Some(j.steps_done)
                && f.steps.back().is_none_or(|s| s.step < j.steps_done)
        })
}

/// Reads the ended job `j`'s history into `shared` (once per count of
/// steps: an ended job's history changes only when it is resumed).
async fn load_history(mut client: Client, j: pb::Job, shared: Arc<Mutex<Snapshot>>) {
    let read = history(&mut client, &j).await;
    let mut s = shared.lock().expect("snapshot");
    let f = s.followed.entry(j.job_id.clone()).or_default();
    f.ended = true;
    match read {
        Ok(steps) => {
            f.steps = steps.into();
            f.error = None;
        }
        Err(e) => f.error = Some(format!("{e:#}")),
    }
}

async fn list(client: &mut Client) -> anyhow::Result<Vec<pb::Job>> {
    let mut jobs = client
        .list_jobs(pb::ListJobsRequest { states: Vec::new() })
        .await
        .map_err(|s| status_error("ListJobs", s))?
        .into_inner()
        .jobs;
    // Live jobs first, then the newest.
    jobs.sort_by_key(|j| (!is_live(j), std::cmp::Reverse(j.submitted_unix_ms)));
    Ok(jobs)
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let mut client = rt.block_on(args.connect.client())?;
    let shared = Arc::new(Mutex::new(Snapshot {
        url: args.connect.url(),
        ..Snapshot::default()
    }));
    if args.once {
        let jobs = rt.block_on(list(&mut client))?;
        let mut snap = shared.lock().expect("snapshot").clone();
        let selected = selected_row(&jobs, args.job.as_deref())?;
        // The live jobs' recent steps and the detailed job's, read once.
        for (i, j) in jobs.iter().enumerate() {
            if is_live(j) || i == selected {
                let steps = rt.block_on(history(&mut client, j))?;
                snap.followed.insert(
                    j.job_id.clone(),
                    Followed {
                        steps: steps.into(),
                        ..Followed::default()
                    },
                );
            }
        }
        snap.jobs = jobs;
        print!("{}", frame_text(&snap, args.width, selected));
        return Ok(());
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return Err(crate::UserError(
            "strata top draws on a terminal and stdout is not one; --once prints one frame as text"
                .into(),
        )
        .into());
    }
    let mut terminal = ratatui::try_init()?;
    let out = interactive(&rt, &mut client, &shared, &mut terminal, &args);
    ratatui::restore();
    out
}

fn interactive(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    shared: &Arc<Mutex<Snapshot>>,
    terminal: &mut ratatui::DefaultTerminal,
    args: &TopArgs,
) -> anyhow::Result<()> {
    let refresh = Duration::from_secs_f64(args.refresh_s.max(0.1));
    let mut table = TableState::default().with_selected(Some(0));
    let mut wanted = args.job.clone();
    let mut next_refresh = Instant::now();
    loop {
        if Instant::now() >= next_refresh {
            next_refresh = Instant::now() + refresh;
            let listed = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), list(client)).await
            });
            let mut s = shared.lock().expect("snapshot");
            match listed {
                Ok(Ok(jobs)) => {
                    for j in jobs.iter().filter(|j| is_live(j)) {
                        // Not followed yet, or its stream ended (an error,
                        // or the job ended and was resumed): follow it.
                        if s.followed.get(&j.job_id).is_none_or(|f| f.ended) {
                            s.followed.insert(j.job_id.clone(), Followed::default());
                            rt.spawn(follow(
                                client.clone(),
                                j.job_id.clone(),
                                j.steps_done.saturating_sub(KEEP as u64),
                                shared.clone(),
                            ));
                        }
                    }
                    if let Some(id) = wanted.take() {
                        table.select(Some(selected_row(&jobs, Some(&id))?));
                    }
                    s.jobs = jobs;
                    s.error = None;
                }
                Ok(Err(e)) => s.error = Some(format!("{e:#}")),
                Err(_) => s.error = Some("ListJobs: no answer in 5 s".into()),
            }
        }
        {
            // Drawn under the lock: the followed steps are not copied per
            // frame (the streams wait a few milliseconds at most).
            let mut snap = shared.lock().expect("snapshot");
            let n = snap.jobs.len();
            if let Some(i) = table.selected()
                && i >= n
            {
                table.select(Some(n.saturating_sub(1)));
            }
            // The selected job ended: its curves come from its history.
            if let Some(j) = table.selected().and_then(|i| snap.jobs.get(i)).cloned()
                && needs_history(&snap, &j)
            {
                snap.followed
                    .entry(j.job_id.clone())
                    .or_default()
                    .history_of = Some(j.steps_done);
                rt.spawn(load_history(client.clone(), j, shared.clone()));
            }
            terminal.draw(|f| draw(f, &snap, &mut table))?;
        }
        if event::poll(Duration::from_millis(200))?
            && let Event::Key(k) = event::read()?
            && k.kind == KeyEventKind::Press
        {
            match k.code {
                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                    return Ok(());
                }
                KeyCode::Down | KeyCode::Char('j') => table.select_next(),
                KeyCode::Up | KeyCode::Char('k') => table.select_previous(),
                KeyCode::Home => table.select_first(),
                KeyCode::End => table.select_last(),
                _ => {}
            }
        }
    }
}

/// The row of job `id` (the first row without one), or an error naming
/// the job when no row is it.
fn selected_row(jobs: &[pb::Job], id: Option<&str>) -> anyhow::Result<usize> {
    match id {
        None => Ok(0),
        Some(id) => jobs.iter().position(|j| j.job_id == id).ok_or_else(|| {
            crate::UserError(format!("--job {id}: no such job at the coordinator")).into()
        }),
    }
}

/// One frame as text, `width` columns wide, row `selected` detailed.
fn frame_text(snap: &Snapshot, width: u16, selected: usize) -> String {
    let height = (snap.jobs.len() as u16 + 4).max(6) + 12;
    let mut terminal =
        ratatui::Terminal::new(TestBackend::new(width, height)).expect("a test backend");
    let mut table = TableState::default().with_selected(Some(selected));
    terminal
        .draw(|f| draw(f, snap, &mut table))
        .expect("drawing into memory");
    let buf = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let mut line = String::new();
        for x in 0..buf.area.width {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn eta(j: &pb::Job, last: Option<&pb::StepMetrics>) -> String {
    let Some(s) = last else {
        return "–".into();
    };
    if !is_live(j) || s.step == 0 || s.tokens_per_s <= 0.0 {
        return "–".into();
    }
    let secs = j.steps_total.saturating_sub(s.step) as f64 * (s.tokens as f64 / s.step as f64)
        / s.tokens_per_s;
    duration(secs)
}

fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, r) => format!("{r}s"),
        (0, m, r) => format!("{m}m{r:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

fn state_style(s: i32) -> Style {
    let c = match state_name(s) {
        "running" => Color::Cyan,
        "succeeded" => Color::Green,
        "failed" => Color::Red,
        "restarting" => Color::Yellow,
        "queued" => Color::Blue,
        _ => Color::Gray,
    };
    Style::new().fg(c).add_modifier(Modifier::BOLD)
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.filter(|v| v.is_finite()).map_or("–".into(), f)
}

fn draw(f: &mut Frame<'_>, snap: &Snapshot, table: &mut TableState) {
    let [head, list, detail] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(11),
    ])
    .areas(f.area());
    let by_state = |name: &str| {
        snap.jobs
            .iter()
            .filter(|j| state_name(snap.job(j).state) == name)
            .count()
    };
    let mut title = vec![
        Span::styled("strata top ", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "{}  {} running · {} queued · {} succeeded · {} failed · {} jobs  (q quits, ↑↓ selects)",
            snap.url,
            by_state("running") + by_state("restarting"),
            by_state("queued"),
            by_state("succeeded"),
            by_state("failed"),
            snap.jobs.len()
        )),
    ];
    if let Some(e) = &snap.error {
        title.push(Span::styled(format!("  {e}"), Style::new().fg(Color::Red)));
    }
    f.render_widget(Paragraph::new(Line::from(title)), head);

    let rows: Vec<Row<'_>> = snap
        .jobs
        .iter()
        .map(|j| {
            let j = snap.job(j);
            let steps = snap.steps(&j.job_id);
            let last = steps.and_then(|s| s.back());
            let eval = steps.and_then(|s| s.iter().rev().find_map(|m| m.eval_loss));
            let layout = j
                .layout
                .as_ref()
                .map_or("?".into(), |l| format!("{}·{}·{}", l.tp, l.pp, l.dp));
            let pct = if j.steps_total > 0 {
                100.0 * j.steps_done as f64 / j.steps_total as f64
            } else {
                0.0
            };
            Row::new(vec![
                Cell::from(j.job_id.clone()),
                Cell::from(j.name.clone()),
                Cell::from(Span::styled(state_name(j.state), state_style(j.state))),
                Cell::from(layout),
                Cell::from(format!("{}/{} {pct:>3.0}%", j.steps_done, j.steps_total)),
                Cell::from(opt(last.map(|s| s.loss).or(j.last_loss), |v| {
                    format!("{v:.4}")
                })),
                Cell::from(opt(eval, |v| format!("{v:.4}"))),
                Cell::from(opt(last.map(|s| s.lr), |v| format!("{v:.2e}"))),
                Cell::from(opt(last.map(|s| s.tokens_per_s), count)),
                Cell::from(eta(j, last)),
                Cell::from(j.attempts.len().to_string()),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(18),
        Constraint::Length(14),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(16),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(3),
    ];
    let header = Row::new([
        "job",
        "name",
        "state",
        "tp·pp·dp",
        "steps",
        "loss",
        "eval",
        "lr",
        "tok/s",
        "ETA",
        "att",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    f.render_stateful_widget(
        Table::new(rows, widths)
            .header(header)
            .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
            .block(Block::bordered().title(" jobs ")),
        list,
        table,
    );

    let Some(j) = table.selected().and_then(|i| snap.jobs.get(i)) else {
        return;
    };
    let j = snap.job(j);
    let steps: Vec<&pb::StepMetrics> = snap
        .steps(&j.job_id)
        .map(|s| s.iter().collect())
        .unwrap_or_default();
    let [curves, facts] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(detail);
    let [loss_area, tps_area] =
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(curves);
    let width = loss_area.width.saturating_sub(2) as usize;
    let tail: Vec<&pb::StepMetrics> = steps.iter().rev().take(width).rev().copied().collect();
    sparkline(
        f,
        loss_area,
        &format!(" {} loss ", j.job_id),
        tail.iter().map(|s| s.loss).collect(),
        true,
    );
    sparkline(
        f,
        tps_area,
        " tokens/s ",
        tail.iter().map(|s| s.tokens_per_s).collect(),
        false,
    );
    let mut lines = Vec::new();
    if let Some(s) = steps.last() {
        lines.push(Line::from(format!(
            "step {}  tokens {}  grad norm {:.3}",
            s.step,
            count(s.tokens as f64),
            s.grad_norm
        )));
        if let Some(t) = &s.times {
            let total = t.data_s + t.forward_s + t.backward_s + t.all_reduce_s + t.optimizer_s;
            lines.push(Line::from(format!("step time {:.3} s (rank 0):", total)));
            for (name, v) in [
                ("data", t.data_s),
                ("forward", t.forward_s),
                ("backward", t.backward_s),
                ("all-reduce", t.all_reduce_s),
                ("optimizer", t.optimizer_s),
            ] {
                let share = if total > 0.0 { v / total } else { 0.0 };
                lines.push(Line::from(format!(
                    "  {name:<10} {v:>8.4} s {:<20}",
                    "█".repeat((share * 20.0).round() as usize)
                )));
            }
        }
        if let Some(b) = s.stages.iter().map(|g| g.bubble).reduce(f64::max) {
            lines.push(Line::from(format!("worst stage bubble {:.1}%", 100.0 * b)));
        }
    }
    if !j.waiting.is_empty() {
        lines.push(Line::styled(
            format!("waiting: {}", j.waiting),
            Style::new().fg(Color::Yellow),
        ));
    }
    if !j.failure_reason.is_empty() {
        lines.push(Line::styled(
            j.failure_reason.lines().next().unwrap_or("").to_string(),
            Style::new().fg(Color::Red),
        ));
    }
    if let Some(e) = snap.followed.get(&j.job_id).and_then(|f| f.error.as_ref()) {
        lines.push(Line::styled(e.clone(), Style::new().fg(Color::Red)));
    }
    if lines.is_empty() {
        lines.push(Line::from("no steps yet"));
    }
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(format!(" {} ", j.name))),
        facts,
    );
}

/// A curve as a sparkline, scaled between its own extremes (the range in
/// the title).
fn sparkline(f: &mut Frame<'_>, area: Rect, title: &str, values: Vec<f64>, fixed: bool) {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    let data: Vec<u64> = values
        .iter()
        .map(|v| {
            if !v.is_finite() || hi <= lo {
                1
            } else {
                1 + ((v - lo) / (hi - lo) * 99.0).round() as u64
            }
        })
        .collect();
    let range = if finite.is_empty() {
        String::new()
    } else if fixed {
        format!("{lo:.3} … {hi:.3} ")
    } else {
        format!("{} … {} ", count(lo), count(hi))
    };
    f.render_widget(
        Sparkline::default()
            .block(Block::bordered().title(format!("{title}{range}")))
            .data(&data)
            .max(100)
            .style(Style::new().fg(Color::Cyan)),
        area,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, state: pb::JobState, done: u64) -> pb::Job {
        pb::Job {
            job_id: id.into(),
            name: "tiny".into(),
            state: state as i32,
            layout: Some(pb::Layout {
                tp: 1,
                pp: 2,
                dp: 2,
                ..pb::Layout::default()
            }),
            steps_done: done,
            steps_total: 100,
            last_loss: Some(3.5),
            ..pb::Job::default()
        }
    }

    #[test]
    fn a_frame_lists_jobs_and_details_the_selected_one() {
        let mut snap = Snapshot {
            url: "http://127.0.0.1:7070".into(),
            jobs: vec![
                job("tiny-2", pb::JobState::Running, 40),
                job("tiny-1", pb::JobState::Succeeded, 100),
            ],
            ..Snapshot::default()
        };
        let steps: VecDeque<pb::StepMetrics> = (1..=40)
            .map(|s| pb::StepMetrics {
                step: s,
                tokens: s * 256,
                loss: 10.0 - s as f64 * 0.1,
                lr: 1e-3,
                tokens_per_s: 512.0,
                eval_loss: (s % 20 == 0).then_some(6.5),
                times: Some(pb::StepTimes {
                    data_s: 0.1,
                    forward_s: 0.2,
                    backward_s: 0.4,
                    all_reduce_s: 0.1,
                    optimizer_s: 0.2,
                }),
                ..pb::StepMetrics::default()
            })
            .collect();
        snap.followed.insert(
            "tiny-2".into(),
            Followed {
                steps,
                ..Followed::default()
            },
        );
        let text = frame_text(&snap, 150, 0);
        assert!(
            text.contains("1 running · 0 queued · 1 succeeded"),
            "{text}"
        );
        let row = text.lines().find(|l| l.contains("tiny-2")).unwrap();
        // The last step's loss, the last held-out loss, lr, tokens/s and
        // the ETA: 60 steps of 256 tokens at 512 tokens/s.
        for want in [
            "running", "1·2·2", "40/100", "6.0000", "6.5000", "1.00e-3", "512", "30s",
        ] {
            assert!(row.contains(want), "{want} not in {row:?}\n{text}");
        }
        assert!(text.contains("step time 1.000 s (rank 0):"), "{text}");
        assert!(text.contains("backward     0.4000 s ████████ "), "{text}");
        let done = text.lines().find(|l| l.contains("tiny-1")).unwrap();
        assert!(
            done.contains("succeeded") && done.contains("3.5000"),
            "{done}"
        );
    }

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(duration(42.0), "42s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(7300.0), "2h01m");
    }
}
