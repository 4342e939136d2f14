//! `strata decompose` and `strata data inspect|stream` as a user runs them,
//! on local files and on an S3 server on loopback.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use strata_tests::s3::S3Server;

fn strata(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run strata")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "strata failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Twelve State of the Union addresses in a temporary folder.
fn corpus() -> tempfile::TempDir {
    let src = strata_tests::corpora().join("sotu");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let dir = tempfile::tempdir().unwrap();
    for p in names.iter().step_by(19).take(12) {
        std::fs::copy(p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn decompose_inspect_and_stream_on_local_files() {
    let input = corpus();
    let out = tempfile::tempdir().unwrap();
    let url = out.path().join("ds");
    let url = url.to_str().unwrap();
    let input = input.path().to_str().unwrap();

    let summary: Value = serde_json::from_str(&ok(&strata(
        &[
            "decompose",
            "--input",
            input,
            "--output",
            url,
            "--min-log2",
            "6",
            "--max-log2",
            "10",
            "--json",
        ],
        &[],
    )))
    .unwrap();
    let m = &summary["manifest"];
    assert_eq!(m["n_documents"], 12);
    assert_eq!(m["buckets"].as_array().unwrap().len(), 5);
    assert!(summary["tokens_per_s"].as_f64().unwrap() > 0.0);

    let inspected: Value =
        serde_json::from_str(&ok(&strata(&["data", "inspect", url, "--json"], &[]))).unwrap();
    assert_eq!(&inspected, m);
    let text = ok(&strata(&["data", "inspect", url], &[]));
    assert!(
        text.contains("D06 (64)") && text.contains("D10 (1024)"),
        "{text}"
    );

    // A second decompose into a complete dataset is refused (exit 2).
    let again = strata(&["decompose", "--input", input, "--output", url], &[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));

    // Two data-parallel ranks agree on every step's bucket and each gets half.
    let stream = |rank: &str, steps: &str, extra: &[&str]| {
        let mut args = vec![
            "data",
            "stream",
            url,
            "--curriculum",
            "grow-p2",
            "--cycles",
            "2",
            "--tokens-per-step",
            "4096",
            "--dp-size",
            "2",
            "--dp-rank",
            rank,
            "--steps",
            steps,
            "--json",
        ];
        args.extend_from_slice(extra);
        lines(&ok(&strata(&args, &[])))
    };
    let r0 = stream("0", "20", &[]);
    let r1 = stream("1", "20", &[]);
    assert_eq!(r0.len(), 20);
    for (a, b) in r0.iter().zip(&r1) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["log2"], b["log2"]);
        let n = a["n_sequences"].as_u64().unwrap();
        assert_eq!(n * 2, a["n_sequences_global"].as_u64().unwrap());
        assert_eq!(n << a["log2"].as_u64().unwrap(), 2048);
        assert_eq!(a["doc_ids"].as_array().unwrap().len() as u64, n);
    }

    // Stop after 8 steps, resume from the cursor: the same 20 steps.
    let dir = tempfile::tempdir().unwrap();
    let cursor = dir.path().join("cursor.json");
    let cursor = cursor.to_str().unwrap();
    let mut resumed = stream("1", "8", &["--cursor-out", cursor]);
    resumed.extend(stream("1", "12", &["--cursor-in", cursor]));
    assert_eq!(resumed, r1);
}

/// A folder of `.jsonl.zst` shards (the way FineWeb, Dolma and The Stack
/// ship) decomposes into their documents, with `--text-field` naming the
/// field; an input it cannot read is refused (exit 2, naming the file)
/// before the output is touched, even with `--overwrite`.
#[test]
fn compressed_json_lines_decompose_and_unreadable_inputs_touch_nothing() {
    let input = tempfile::tempdir().unwrap();
    let src = corpus();
    let mut texts: Vec<PathBuf> = std::fs::read_dir(src.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    texts.sort();
    for (i, pair) in texts.chunks(4).enumerate() {
        let mut lines = String::new();
        for p in pair {
            let content = std::fs::read_to_string(p).unwrap();
            lines.push_str(&serde_json::json!({ "content": content }).to_string());
            lines.push('\n');
        }
        let z = zstd::stream::encode_all(lines.as_bytes(), 3).unwrap();
        std::fs::write(input.path().join(format!("{i:05}.jsonl.zst")), z).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let url = out.path().join("ds");
    let url = url.to_str().unwrap();
    let input = input.path().to_str().unwrap();
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "decompose",
            "--input",
            input,
            "--output",
            url,
            "--min-log2",
            "6",
            "--max-log2",
            "10",
            "--json",
        ];
        a.extend_from_slice(extra);
        a
    };
    // Without the field: nothing to read is an error, not an empty dataset.
    let none = strata(&args(&[]), &[]);
    assert_eq!(none.status.code(), Some(2));
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("no document had a `text`") && err.contains(input),
        "{err}"
    );
    assert!(!out.path().join("ds/manifest.json").exists());

    let summary: Value =
        serde_json::from_str(&ok(&strata(&args(&["--text-field", "content"]), &[]))).unwrap();
    assert_eq!(summary["manifest"]["n_documents"], 12);
    assert_eq!(summary["manifest"]["n_documents_skipped"], 0);
    let manifest = std::fs::read(out.path().join("ds/manifest.json")).unwrap();

    // A zip among the shards: refused by name; the dataset is as it was.
    let zip = std::path::Path::new(input).join("extra.zip");
    std::fs::write(&zip, b"PK\x03\x04\x14\x00\x00\x00").unwrap();
    let refused = strata(&args(&["--text-field", "content", "--overwrite"]), &[]);
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("extra.zip") && err.contains("zip archive"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.path().join("ds/manifest.json")).unwrap(),
        manifest
    );
}

#[test]
fn missing_datasets_and_bad_flags_exit_2_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let out = strata(&["data", "inspect", missing.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    // A folder without a manifest is an incomplete dataset.
    let out = strata(&["data", "inspect", dir.path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no manifest"));

    let out = strata(
        &[
            "decompose",
            "--input",
            "/no/such/corpus",
            "--output",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/corpus"));

    let out = strata(
        &[
            "decompose",
            "--input",
            ".",
            "--output",
            "gs://bucket/x",
            "--tokenizer",
            "r50k",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gs://bucket/x"));

    let out = strata(
        &[
            "decompose",
            "--input",
            ".",
            "--output",
            "x",
            "--tokenizer",
            "gpt9",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gpt9"));

    // A folder of train and test files: refused without --split (no
    // dataset written), read split by split with it.
    let splits = dir.path().join("splits");
    std::fs::create_dir_all(&splits).unwrap();
    for (name, n) in [("train.jsonl", 5), ("test.jsonl", 2)] {
        let lines: String = (0..n)
            .map(|i| format!("{}\n", serde_json::json!({ "text": format!("{name} {i}") })))
            .collect();
        std::fs::write(splits.join(name), lines).unwrap();
    }
    let out_dir = dir.path().join("from-splits");
    let decompose = |split: &[&str]| {
        let mut args = vec![
            "decompose",
            "--input",
            splits.to_str().unwrap(),
            "--output",
            out_dir.to_str().unwrap(),
            "--min-log2",
            "1",
            "--max-log2",
            "4",
            "--overwrite",
            "--json",
        ];
        args.extend(split);
        strata(&args, &[])
    };
    let out = decompose(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("splits")
            && err.contains("train (1 file), test (1 file)")
            && err.contains("--split"),
        "{err}"
    );
    assert!(!out_dir.exists(), "nothing written");
    for (split, docs) in [("train", 5), ("test", 2)] {
        let summary: Value = serde_json::from_str(&ok(&decompose(&["--split", split]))).unwrap();
        assert_eq!(
            summary["manifest"]["n_documents"], docs,
            "{split}: {summary}"
        );
    }
}

#[test]
fn decompose_and_stream_through_s3() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3Server::start(&["datasets"]));
    let env = server.env();
    let input = corpus();
    let url = "s3://datasets/sotu-r50k";
    ok(&strata(
        &[
            "decompose",
            "--input",
            input.path().to_str().unwrap(),
            "--output",
            url,
            "--min-log2",
            "6",
            "--max-log2",
            "9",
        ],
        &env,
    ));
    let m: Value =
        serde_json::from_str(&ok(&strata(&["data", "inspect", url, "--json"], &env))).unwrap();
    assert_eq!(m["n_documents"], 12);
    let steps = lines(&ok(&strata(
        &[
            "data",
            "stream",
            url,
            "--tokens-per-step",
            "2048",
            "--steps",
            "5",
            "--json",
        ],
        &env,
    )));
    assert_eq!(steps.len(), 5);
    // Without the server's address the same URL is an error naming it.
    let out = strata(
        &["data", "inspect", "s3://datasets/missing"],
        &[
            ("AWS_ENDPOINT_URL".into(), server.endpoint()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), "wrong".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "wrong".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("s3://datasets/missing"));
}
