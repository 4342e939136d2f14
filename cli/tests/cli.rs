//! The `strata` binary as a user runs it: exit codes, JSON shapes, files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run strata")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "strata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn plan_reports_sizes_and_every_law_side_by_side() {
    let json = stdout_json(&strata(&["plan", "examples/llama-1b.toml", "--json"]));
    let plan = &json;
    assert_eq!(plan["layout"]["world_size"], 64);
    assert_eq!(plan["params"]["non_embedding"], 973_078_528u64);
    let laws = plan["laws"].as_array().unwrap();
    let names: Vec<&str> = laws.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["recipe", "step-law", "deepseek", "power-wsd"]);
    for law in laws {
        assert!(law["lr"].as_f64().unwrap() > 0.0, "{law}");
        assert!(law.get("batch_tokens").is_some(), "{law}");
    }
    // The recipe asked Step Law for its LR: the two rows agree.
    assert_eq!(laws[0]["lr"], laws[1]["lr"]);
    // Step Law's batch was rounded to the layout and the rounding reported.
    let resolved: Vec<&str> = plan["resolutions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["field"].as_str().unwrap())
        .collect();
    assert!(resolved.contains(&"data.tokens_per_step"), "{resolved:?}");
    assert_eq!(plan["tokens_per_step"], 1_048_576);
    let fits: Vec<&str> = plan["chinchilla"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["fit"].as_str().unwrap())
        .collect();
    assert_eq!(fits, ["hoffmann", "besiroglu"]);
    assert!(!plan["schedule"]["preview"].as_array().unwrap().is_empty());
    // The resolved recipe rides along.
    assert_eq!(json["recipe"]["name"], "llama-1b");
}

#[test]
fn plan_text_names_what_matters() {
    let out = strata(&["plan", "examples/tiny-cpu.toml"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "tp=1 pp=1 dp=2",
        "non-embedding",
        "step-law",
        "hoffmann",
        "D08",
        "warmup",
    ] {
        assert!(text.contains(needle), "plan text lacks {needle:?}:\n{text}");
    }
}

#[test]
fn plan_text_shows_a_mixtures_sources() {
    let out = strata(&["plan", "examples/llama-1b-mixture.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("mixture: web 60% (s3://strata-datasets/fineweb-edu-o200k-dd), code 25%")
            && text.contains("math 15%")
            && text.contains("1 later phase(s)"),
        "{text}"
    );
}

/// `strata plan` says when a recipe reweighs its sequences, and how.
#[test]
fn plan_text_shows_reweighting() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(repo_root().join("examples/tiny-cpu.toml")).unwrap();
    let p = dir.path().join("rw.toml");
    let section =
        "[data.reweighting]\nstrategy = \"linupper\"\ngroup = 16\nstart_tokens = 245760\n";
    std::fs::write(
        &p,
        base.replace("[optimizer]", &format!("{section}\n[optimizer]")),
    )
    .unwrap();
    let out = strata(&["plan", p.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success() && text.contains("reweighting linupper in groups of 16 sequences (temperature 1, delta 1) from 245.8K tokens"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The memory plan: per rank in text and JSON, and a verdict against
/// `[device] memory_gib` naming the rank, its parts and the knobs.
#[test]
fn plan_prints_each_ranks_memory_and_whether_it_fits() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(repo_root().join("examples/tiny-cpu.toml")).unwrap();
    let write = |name: &str, device: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{base}\n[device]\n{device}\n")).unwrap();
        p
    };
    let roomy = write("roomy.toml", "memory_gib = 16");
    let out = strata(&["plan", roomy.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("memory per rank at the step's peak"),
        "{text}"
    );
    assert!(text.contains("fits: the largest rank needs"), "{text}");
    let json = stdout_json(&strata(&["plan", roomy.to_str().unwrap(), "--json"]));
    let ranks = json["memory"]["ranks"].as_array().unwrap();
    assert_eq!(
        ranks.len(),
        1,
        "tp = pp = 1: one rank stands for every replica"
    );
    let r = &ranks[0];
    let params = r["params"].as_u64().unwrap();
    assert_eq!(r["weights_bytes"].as_u64().unwrap(), 4 * params);
    assert_eq!(r["optimizer_bytes"].as_u64().unwrap(), 8 * params);
    let small = write("small.toml", "memory_gib = 0.1");
    let out = strata(&["plan", small.to_str().unwrap()]);
    assert!(out.status.success(), "plan reports, it does not refuse");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("DOES NOT FIT: rank 0 (pipeline stage 0, tensor-parallel rank 0) needs")
            && text.contains("parallel.shard_optimizer = true"),
        "{text}"
    );
}

#[test]
fn budget_plan_gives_n_and_d_per_fit() {
    let json = stdout_json(&strata(&["plan", "--budget-flops", "5.76e23", "--json"]));
    let fits = json["fits"].as_array().unwrap();
    assert_eq!(fits.len(), 2);
    for f in fits {
        let (n, d) = (f["n_opt"].as_f64().unwrap(), f["d_opt"].as_f64().unwrap());
        assert!(((6.0 * n * d) / 5.76e23 - 1.0).abs() < 1e-9, "{f}");
    }
    assert_eq!(fits[0]["fit"], "hoffmann");
    assert_eq!(fits[1]["fit"], "besiroglu");
}

#[test]
fn an_invalid_recipe_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(repo_root().join("examples/tiny-cpu.toml"))
        .unwrap()
        .replace("dp = 2", "dp = 3");
    std::fs::write(&bad, text).unwrap();
    let out = strata(&["plan", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("data.tokens_per_step"), "{err}");
    assert!(err.contains("256·3·1 = 768"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn set_overrides_a_recipe_as_the_file_would() {
    let json = stdout_json(&strata(&[
        "plan",
        "examples/tiny-cpu.toml",
        "--set",
        "parallel.tp=2",
        "--set",
        "parallel.dp=1",
        "--set",
        "optimizer.weight_decay=0.05",
        "--json",
    ]));
    assert_eq!(json["layout"]["tp"], 2, "{}", json["layout"]);
    assert_eq!(json["layout"]["dp"], 1);
    assert_eq!(json["recipe"]["optimizer"]["weight_decay"], 0.05);

    // A wrong key: exit 2, named with the nearest valid one; the same
    // for schedule, bench train and a sweep (before any coordinator).
    for args in [
        &["plan", "examples/tiny-cpu.toml"][..],
        &["schedule", "examples/tiny-cpu.toml"],
        &["bench", "train", "examples/tiny-cpu.toml"],
        &[
            "submit",
            "examples/tiny-cpu.toml",
            "--coordinator",
            "http://127.0.0.1:9",
        ],
        &[
            "sweep",
            "examples/sweeps/lr-size.toml",
            "--coordinator",
            "http://127.0.0.1:9",
        ],
    ] {
        let mut args = args.to_vec();
        args.extend(["--set", "optimizer.weight_decai=0.1"]);
        let out = strata(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("optimizer.weight_decai")
                && err.contains("did you mean `optimizer.weight_decay`?")
                && err.contains("(from --set optimizer.weight_decai=0.1)"),
            "{args:?}: {err}"
        );
    }
    // Typed and validated like the file.
    let out = strata(&["plan", "examples/tiny-cpu.toml", "--set", "parallel.dp=3"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("256·3·1 = 768") && err.contains("--set parallel.dp=3"),
        "{err}"
    );
    let out = strata(&["plan", "examples/tiny-cpu.toml", "--set", "lr"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
}

#[test]
fn a_missing_recipe_exits_2_naming_the_file() {
    let out = strata(&["schedule", "no/such/recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/recipe.toml"));
}

#[test]
fn schedule_json_at_token_counts() {
    let json = stdout_json(&strata(&[
        "schedule",
        "examples/tiny-cpu.toml",
        "--at-tokens",
        "8192,1e6,2.4576M",
        "--json",
    ]));
    let points = json.as_array().unwrap();
    assert_eq!(points.len(), 3);
    assert_eq!(points[0]["tokens"], 8192);
    // Warmup is 245760 tokens to a peak of 3e-3.
    let lr0 = points[0]["lr"].as_f64().unwrap();
    assert!((lr0 - 3e-3 * 8192.0 / 245_760.0).abs() < 1e-15, "{lr0}");
    assert_eq!(points[1]["lr"].as_f64().unwrap(), 3e-3);
    assert_eq!(points[2]["lr"].as_f64().unwrap(), 0.0);
}

#[test]
fn schedule_rejects_a_bad_token_list() {
    let out = strata(&[
        "schedule",
        "examples/tiny-cpu.toml",
        "--at-tokens",
        "1e6,lots",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lots"));
}

#[test]
fn schedule_plot_is_an_svg_with_the_curve_and_phases() {
    let dir = tempfile::tempdir().unwrap();
    let svg_path = dir.path().join("lr.svg");
    let out = strata(&[
        "schedule",
        "examples/power-350m.toml",
        "--at-tokens",
        "5B",
        "--plot",
        svg_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline class=\"lr\"").count(), 1);
    for phase in ["warmup", "power", "decay"] {
        assert!(
            svg.contains(&format!(">{phase}</text>")),
            "no {phase} phase"
        );
    }
    assert_eq!(svg.matches("class=\"mark\"").count(), 1);
    // The curve has all its samples, each a point inside the canvas.
    let points = svg
        .split("points=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let coords: Vec<(f64, f64)> = points
        .split(' ')
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect();
    assert_eq!(coords.len(), 801);
    assert!(
        coords
            .iter()
            .all(|&(x, y)| (0.0..=960.0).contains(&x) && (0.0..=540.0).contains(&y))
    );
    // Only SVG is written; nothing is left behind on refusal.
    let png = dir.path().join("lr.png");
    let out = strata(&[
        "schedule",
        "examples/power-350m.toml",
        "--plot",
        png.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!png.exists());
}

#[test]
fn demo_trains_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let out = strata(&[
        "demo",
        "--steps",
        "3",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("demo-1 succeeded: 3 steps, 3072 tokens"),
        "{stdout}"
    );
    assert!(
        stdout.contains("loss: ") && stdout.contains("tokens/s"),
        "{stdout}"
    );
    assert!(dir.path().join("dataset/manifest.json").exists());
    assert!(
        dir.path()
            .join("state/runs/demo-1/attempt-1/rank-1.log")
            .exists()
    );
}

#[test]
fn demo_takes_tensor_and_pipeline_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let out = strata(&[
        "demo",
        "--steps",
        "2",
        "--tp",
        "2",
        "--pp",
        "2",
        "--dp",
        "1",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "demo failed: {stderr}\n{stdout}");
    assert!(
        stderr.contains("tp = 2 pp = 2 dp = 1 (4 worker processes, 4 microbatches per step)"),
        "{stderr}"
    );
    assert!(
        stdout.contains("demo-1 succeeded: 2 steps, 2048 tokens"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stage 0 computes") && stdout.contains("stage 1 computes"),
        "{stdout}"
    );
    for r in 0..4 {
        assert!(
            dir.path()
                .join(format!("state/runs/demo-1/attempt-1/rank-{r}.log"))
                .exists()
        );
    }
    // A layout the demo model cannot split is refused naming the field.
    let out = strata(&[
        "demo",
        "--steps",
        "1",
        "--tp",
        "3",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("parallel.tp"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
