//! A real sweep on this machine, through the `strata` binary and a
//! coordinator on loopback: three sizes × three learning rates, then a
//! branch sweep (one stable run per size, cooldowns at a quarter and half
//! of its tokens) whose held-out losses fall with tokens for every size;
//! the report's table, fits and plots; bad sweeps refused naming the point
//! and the field; cancel and resubmit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use strata_coordinator::Coordinator;
use strata_proto::v1 as pb;

fn strata(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The base recipe: a tiny WSD run with a held-out evaluation every 10
/// steps and a checkpoint only at its end.
fn base(dataset: &str, ck: &Path, steps: u64) -> String {
    format!(
        r#"name = "base"
seed = 11
[model]
n_layers = 1
d_model = 16
n_heads = 2
d_ffn = 32
vocab_size = 50257
max_seq_len = 64
tie_embeddings = true
[data]
dataset = "{dataset}"
curriculum = "uniform"
tokens_per_step = 256
total_tokens = {total}
[optimizer]
lr = 1e-2
[schedule]
kind = "wsd"
warmup_tokens = 1280
decay_tokens = 2560
decay_shape = "linear"
final_lr_fraction = 0.0
[eval]
every_steps = 10
tokens = 4096
[checkpoint]
every_steps = 1000
keep_last = 1
dir = "file://{ck}"
[fault]
max_restarts = 0
"#,
        total = steps * 256,
        ck = ck.display()
    )
}

const SIZES: &str = r#"
[sizes]
s = { n_layers = 1, d_model = 16, n_heads = 2, d_ffn = 48 }
m = { n_layers = 2, d_model = 32, n_heads = 2, d_ffn = 96 }
l = { n_layers = 2, d_model = 64, n_heads = 4, d_ffn = 192 }
"#;

async fn sweep_of(cl: &mut Cl, id: &str) -> pb::Sweep {
    cl.get_sweep(pb::GetSweepRequest {
        sweep_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn sweep_ended(cl: &mut Cl, id: &str, secs: u64) -> pb::Sweep {
    let t = Instant::now();
    loop {
        let s = sweep_of(cl, id).await;
        if s.state() != pb::SweepState::Running {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "sweep {id} did not end in {secs} s: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Writes sweep file `name` and submits it with `strata sweep`: its id,
/// and what the command printed on stderr.
fn submit_file(dir: &Path, name: &str, text: &str, url: &str) -> (String, String) {
    let file = write(dir, name, text);
    let (code, out, err) = strata(&["sweep", file.to_str().unwrap(), "--coordinator", url]);
    assert_eq!(code, 0, "{err}");
    (out.trim().to_string(), err)
}

async fn holdout_dataset(dir: &Path) -> String {
    decompose_holding_out(dir, "sotu-40-holdout", &sotu_40(), 0.1).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grid_and_a_branch_sweep_run_and_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = holdout_dataset(dir.path()).await;
    let mut cfg = config(&dir.path().join("state"), 2, None);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let c = Coordinator::start(cfg).await.unwrap();
    let url = format!("http://{}", c.addr);
    let mut cl = client(&c).await;
    let ck = dir.path().join("ck");
    write(dir.path(), "base.toml", &base(&data, &ck, 60));

    // Bad sweeps: a point whose recipe is invalid (refused by the client
    // before anything is sent), and one the coordinator refuses (its
    // dataset is missing), each naming the point and the field.
    let bad = write(
        dir.path(),
        "bad.toml",
        &format!(
            "name = \"bad\"\nbase = \"base.toml\"\n{SIZES}[sizes.odd]\nd_model = 24\nn_heads = 5\n[grid]\nsize = [\"s\", \"odd\"]\n"
        ),
    );
    let (code, _, err) = strata(&["sweep", bad.to_str().unwrap(), "--coordinator", &url]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("point 2 (size=odd): model.d_model"), "{err}");
    write(
        dir.path(),
        "nodata.toml",
        &base(&format!("file://{}/none", dir.path().display()), &ck, 60),
    );
    let nodata = write(
        dir.path(),
        "nodata-sweep.toml",
        "name = \"nodata\"\nbase = \"nodata.toml\"\n[grid]\nlr = [1e-3, 1e-2]\n",
    );
    let (code, _, err) = strata(&["sweep", nodata.to_str().unwrap(), "--coordinator", &url]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("point 1 (lr=0.001): data.dataset") && err.contains("point 2 (lr=0.01)"),
        "{err}"
    );

    // Three sizes × three learning rates, two jobs at a time.
    let t = Instant::now();
    let (grid_id, err) = submit_file(
        dir.path(),
        "grid.toml",
        &format!(
            "name = \"grid\"\nbase = \"base.toml\"\nmax_concurrent = 2\n{SIZES}[grid]\nsize = [\"s\", \"m\", \"l\"]\nlr = [1e-2, 3e-2, 1e-1]\n"
        ),
        &url,
    );
    assert!(err.contains("9 points, at most 2 at once"), "{err}");
    // Never more than two of its jobs at once.
    let mut most = 0;
    let s = loop {
        let s = sweep_of(&mut cl, &grid_id).await;
        let live = s
            .points
            .iter()
            .filter(|p| {
                matches!(
                    p.job_state(),
                    pb::JobState::Queued | pb::JobState::Running | pb::JobState::Restarting
                ) && !p.job_id.is_empty()
            })
            .count();
        most = most.max(live);
        if s.state() != pb::SweepState::Running {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(600), "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s.state(), pb::SweepState::Succeeded, "{}", s.reason);
    assert_eq!(most, 2);
    let grid_s = t.elapsed().as_secs_f64();

    // The branch sweep: per size a stable run of 80 steps with its own
    // cooldown, and branches ending at 20 and 40 steps.
    let t = Instant::now();
    let (cool_id, _) = submit_file(
        dir.path(),
        "branches.toml",
        &format!(
            "name = \"cool\"\nbase = \"base.toml\"\nmax_concurrent = 2\n{SIZES}[grid]\nsize = [\"s\", \"m\", \"l\"]\ntotal_tokens = [20480]\n[branches]\nfractions = [0.25, 0.5, 1.0]\ncooldown = 0.2\n"
        ),
        &url,
    );
    let s = sweep_ended(&mut cl, &cool_id, 600).await;
    assert_eq!(s.state(), pb::SweepState::Succeeded, "{}", s.reason);
    let cool_s = t.elapsed().as_secs_f64();
    assert_eq!(s.points.len(), 9);
    for p in &s.points {
        let j = get(&mut cl, &p.job_id).await;
        match p.kind.as_str() {
            "stable" => assert!(j.parent_job.is_empty()),
            "branch" => {
                // A branch of its stable point's job, from its kept step.
                let stable = &s.points[p.stable_point as usize];
                assert_eq!(j.parent_job, stable.job_id, "{}", p.label);
                assert_eq!(j.parent_step, p.from_step, "{}", p.label);
            }
            k => panic!("{k}"),
        }
    }

    // The report: table, fits, plots; the cooldowns' held-out losses fall
    // with tokens for every size.
    let out_dir = dir.path().join("report");
    for (id, plots) in [
        (&grid_id, &["loss_vs_compute", "loss_vs_lr"][..]),
        (&cool_id, &["loss_vs_compute", "branches"][..]),
    ] {
        let report = out_dir.join(id);
        let (code, out, err) = strata(&[
            "sweep",
            "report",
            id,
            "--out",
            report.to_str().unwrap(),
            "--bootstrap",
            "20",
            "--json",
            "--coordinator",
            &url,
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["rows"].as_array().unwrap().len(), 9, "{v}");
        for row in v["rows"].as_array().unwrap() {
            assert!(row["eval_loss"].as_f64().unwrap() > 0.0, "{row}");
        }
        for p in plots {
            let svg = std::fs::read_to_string(report.join(format!("{p}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<circle"), "{p}");
            let png = std::fs::read(report.join(format!("{p}.png"))).unwrap();
            assert_eq!(&png[..4], b"\x89PNG", "{p}");
        }
        let csv = std::fs::read_to_string(report.join("results.csv")).unwrap();
        assert_eq!(csv.lines().count(), 10);
        assert!(report.join("results.parquet").exists());
        let fits: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report.join("fits.json")).unwrap())
                .unwrap();
        if id == &grid_id {
            // Three sizes, each with its best lr: the optimal lr's law in N
            // (D is the same for all).
            let lr = &fits["lr"]["fit"];
            assert_eq!(lr["variables"], serde_json::json!(["N"]), "{fits}");
            assert!(lr["exponents"][0].as_f64().unwrap().is_finite(), "{fits}");
            // One token count: L(N, D) cannot be fitted, and says why.
            let why = fits["chinchilla"]["not_fitted"].as_str().unwrap();
            assert!(!why.is_empty(), "{fits}");
            // The batch is not swept: its law is not fitted, saying so.
            let why = fits["batch"]["not_fitted"].as_str().unwrap();
            assert!(why.contains("does not vary it"), "{why}");
            eprintln!("grid sweep fits: {fits}");
        } else {
            let sizes = v["branches"].as_array().unwrap();
            assert_eq!(sizes.len(), 3, "{v}");
            for s in sizes {
                let losses: Vec<f64> = s["points"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["loss"].as_f64().unwrap())
                    .collect();
                assert_eq!(losses.len(), 3, "{s}");
                assert!(
                    losses.windows(2).all(|w| w[1] < w[0]),
                    "size {}: held-out losses after cooldown do not fall with tokens: {losses:?}",
                    s["size"]
                );
                eprintln!("cooldowns, size {}: {losses:?}", s["size"]);
            }
            // Nine (N, D) points: L(N, D) is fitted (or says why), and
            // its frontier is listed with it.
            match fits["chinchilla"]["fit"]["law"]["e"].as_f64() {
                Some(e) => {
                    assert!(e.is_finite() && e > 0.0, "{fits}");
                    assert_eq!(fits["chinchilla"]["frontier"].as_array().unwrap().len(), 9);
                }
                None => assert!(fits["chinchilla"]["not_fitted"].is_string(), "{fits}"),
            }
            eprintln!("branch sweep fits: {}", fits["chinchilla"]);
        }
        // The dashboard's sweep page shows the same plots, byte for byte,
        // and the fits (with the default bootstrap).
        let http = c.http_addr.unwrap();
        let reports_made = || {
            let (_, text) = get_http(http, "/metrics", None);
            text.lines()
                .find_map(|l| l.strip_prefix("strata_sweep_reports_made_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no strata_sweep_reports_made_total:\n{text}"))
        };
        let before = reports_made();
        let started = std::time::Instant::now();
        // Four polls at once, as browser tabs do: one report is made, the
        // others wait for it.
        let polls: Vec<_> = (0..4)
            .map(|_| {
                let path = format!("/api/sweeps/{id}");
                std::thread::spawn(move || get_http(http, &path, None))
            })
            .collect();
        let mut pages: Vec<(u16, String)> = polls.into_iter().map(|p| p.join().unwrap()).collect();
        let (code, body) = pages.pop().unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(pages.iter().all(|p| p == &(code, body.clone())));
        eprintln!(
            "dashboard report of {id} made in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        let names: Vec<&str> = page["plots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, *plots, "{page}");
        for p in plots {
            let (code, svg) = get_http(http, &format!("/api/sweeps/{id}/plots/{p}.svg"), None);
            assert_eq!(code, 200, "{svg}");
            let cli = std::fs::read_to_string(report.join(format!("{p}.svg"))).unwrap();
            assert!(
                svg == cli,
                "{id}: the dashboard's {p}.svg differs from the report's"
            );
        }
        let text = page["fits_text"].as_str().unwrap();
        assert!(text.contains("optimal lr"), "{text}");
        assert_eq!(page["points"].as_array().unwrap().len(), 9, "{page}");
        assert_eq!(
            get_http(http, &format!("/api/sweeps/{id}/plots/nope.svg"), None).0,
            404
        );
        // Every poll and plot above was served from one report.
        assert_eq!(
            reports_made() - before,
            1,
            "{id}: the report was made again"
        );
        // Kept for a look.
        if let Ok(keep) = std::env::var("STRATA_KEEP_REPORT") {
            let to = Path::new(&keep).join(id);
            std::fs::create_dir_all(&to).unwrap();
            for e in std::fs::read_dir(&report).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    // The human view lists the points.
    let (code, out, err) = strata(&["sweep", "status", &cool_id, "--coordinator", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("9/9 points succeeded"), "{out}");
    assert!(
        out.contains("size=m total_tokens=20480 fraction=0.25"),
        "{out}"
    );
    eprintln!("sweep: 9-job grid in {grid_s:.1} s; 9-job branch sweep in {cool_s:.1} s");
    c.stop().await;
}

/// A cancelled sweep stops its jobs and starts no more; a resubmit runs
/// only what did not succeed, as new jobs.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_sweep_resubmits_only_what_did_not_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let data = holdout_dataset(dir.path()).await;
    let c = Coordinator::start(config(&dir.path().join("state"), 2, None))
        .await
        .unwrap();
    let url = format!("http://{}", c.addr);
    let mut cl = client(&c).await;
    write(
        dir.path(),
        "base.toml",
        &base(&data, &dir.path().join("ck"), 30),
    );
    let (id, _) = submit_file(
        dir.path(),
        "sw.toml",
        "name = \"sw\"\nbase = \"base.toml\"\n[grid]\nlr = [1e-3, 2e-3, 3e-3]\ntotal_tokens = [7680, 2560000]\n",
        &url,
    );
    // One at a time: the first point (a short run) succeeds, the second
    // (a long one) is cancelled while it runs.
    let t = Instant::now();
    let s = loop {
        let s = sweep_of(&mut cl, &id).await;
        if s.points[1].job_state() == pb::JobState::Running {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s.points[0].job_state(), pb::JobState::Succeeded);
    assert!(s.points[2].job_id.is_empty());
    let (code, out, err) = strata(&["sweep", "cancel", &id, "--coordinator", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled"), "{out}");
    let long = s.points[1].job_id.clone();
    let j = ended(&mut cl, &long, 60).await;
    assert_eq!(j.state(), pb::JobState::Cancelled);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = sweep_of(&mut cl, &id).await;
    assert_eq!(s.state(), pb::SweepState::Cancelled);
    assert!(
        s.points[2].job_id.is_empty(),
        "nothing starts after a cancel"
    );
    let (code, _, err) = strata(&["sweep", "cancel", &id, "--coordinator", &url]);
    assert_eq!(code, 2);
    assert!(err.contains("already cancelled"), "{err}");

    // Resubmit: the succeeded point keeps its job; the other five run as
    // new jobs (cancel the long ones again to keep this short).
    let first = s.points[0].job_id.clone();
    let (code, _, err) = strata(&["sweep", "resubmit", &id, "--coordinator", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("5 points run again"), "{err}");
    let s = sweep_of(&mut cl, &id).await;
    assert_eq!(s.state(), pb::SweepState::Running);
    assert_eq!(s.points[0].job_id, first);
    assert_eq!(s.points[1].earlier_jobs, std::slice::from_ref(&long));
    assert_ne!(s.points[1].job_id, long);
    let (code, _, err) = strata(&["sweep", "resubmit", &id, "--coordinator", &url]);
    assert_eq!(code, 2);
    assert!(err.contains("is running"), "{err}");
    c.stop().await;
}
