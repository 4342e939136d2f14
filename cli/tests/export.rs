//! `strata export` and `strata eval` on checkpoints of real jobs: the
//! Hugging Face export of a model trained under a parallel layout, tied
//! and untied, loaded by `transformers`' LlamaForCausalLM
//! (`scripts/hf_eval.py`), gives `strata eval --tokens`' loss on the same
//! sequences within 1e-4 relative, whole and sharded.
//!
//! The Python side runs where torch and transformers are installed; without
//! them that part says it was skipped, unless `STRATA_REQUIRE_TRANSFORMERS`
//! is set (then it fails).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use strata_coordinator::Coordinator;
use strata_proto::v1 as pb;

fn strata(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = strata(args);
    assert!(ok, "strata {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Whether Python can load `transformers` models.
fn transformers_here() -> bool {
    strata_tests::python::has("torch transformers", "STRATA_REQUIRE_TRANSFORMERS")
}

/// `scripts/hf_eval.py`'s loss of the export in `dir` on `tokens`.
fn hf_loss(dir: &Path, tokens: &Path) -> serde_json::Value {
    strata_tests::python::script_json("hf_eval.py", &[dir, tokens])
}

/// `scripts/hf_generate.py`'s greedy generation from the export in `dir`.
fn hf_generate(dir: &Path, prompt: &str) -> serde_json::Value {
    strata_tests::python::script_json("hf_generate.py", &[dir.as_os_str(), prompt.as_ref()])
}

/// Fixed token sequences of several lengths, ids below GPT-2's 50257.
fn sequences(dir: &Path) -> std::path::PathBuf {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 50257) as u32
    };
    let seqs: Vec<Vec<u32>> = [64usize, 33, 2, 17]
        .iter()
        .map(|&n| (0..n).map(|_| next()).collect())
        .collect();
    let path = dir.join("tokens.json");
    std::fs::write(&path, serde_json::to_string(&seqs).unwrap()).unwrap();
    path
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_from_any_layout_gives_strata_evals_loss_in_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    let c = Coordinator::start(config(&dir.path().join("state"), 4, None))
        .await
        .unwrap();
    let mut cl = client(&c).await;
    let url = format!("http://{}", c.addr);
    let tokens = sequences(dir.path());
    let python = transformers_here();

    for (tied, layout) in [(true, (2, 2, 1)), (false, (1, 2, 2))] {
        let spec = format!(
            "{}[checkpoint]\nevery_steps = 4\ndir = \"file://{}\"\n",
            recipe3d(&data, 8, layout, tied),
            dir.path().join("ck").display()
        );
        let id = submit(&mut cl, spec).await.unwrap();
        let j = ended(&mut cl, &id, 300).await;
        assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
        let what = format!("tied={tied} layout={layout:?}");

        let out = dir.path().join(format!("hf-{id}"));
        let e = json_of(&[
            "export",
            &id,
            "--coordinator",
            &url,
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            "f32",
            "--json",
        ]);
        assert_eq!(e["step"], 8, "{what}");
        // By default bf16: half the bytes, the tokenizer beside it.
        let bf16 = dir.path().join(format!("hf-{id}-bf16"));
        let b = json_of(&[
            "export",
            &id,
            "--coordinator",
            &url,
            "--out",
            bf16.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(b["dtype"], "bfloat16");
        assert_eq!(
            2 * b["bytes"].as_u64().unwrap(),
            e["bytes"].as_u64().unwrap(),
            "{what}"
        );
        for f in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(bf16.join(f).is_file(), "{what}: {f} in {b}");
        }
        let generation: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(bf16.join("generation_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(generation["eos_token_id"], 50256);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["tie_word_embeddings"], tied, "{what}");
        assert_eq!(config["num_key_value_heads"], 2);
        assert_eq!(config["vocab_size"], 50304);
        assert_eq!(config["rms_norm_eps"], 1e-5);
        assert_eq!(config["rope_theta"], 10000.0);

        let ours = json_of(&[
            "eval",
            &id,
            "--coordinator",
            &url,
            "--tokens",
            tokens.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(ours["tokens"], 63 + 32 + 1 + 16, "{what}");
        let loss = ours["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{what}: {loss}");
        // An earlier step by its number, through the checkpoint's URL.
        let ck = dir.path().join("ck").join(&id).join("step-00000004");
        let early = json_of(&[
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(early["step"], 4);
        assert_ne!(early["loss"], ours["loss"], "{what}");

        // The same weights in shards of at most 1 MiB (the embedding alone
        // is 3 MiB), with an index.
        let sharded = dir.path().join(format!("hf-{id}-sharded"));
        let e = json_of(&[
            "export",
            &id,
            "--coordinator",
            &url,
            "--out",
            sharded.to_str().unwrap(),
            "--max-shard-mib",
            "1",
            "--dtype",
            "f32",
            "--json",
        ]);
        let files: Vec<&str> = e["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        assert!(files.contains(&"model.safetensors.index.json"), "{files:?}");
        assert!(files.len() >= 4, "{files:?}");

        if python {
            for d in [&out, &sharded] {
                let hf = hf_loss(d, &tokens);
                let theirs = hf["loss"].as_f64().unwrap();
                assert_eq!(hf["tied"], tied, "{what}");
                assert!(
                    relative(loss, theirs) < 1e-4,
                    "{what} {}: strata {loss} vs transformers {theirs}",
                    d.display()
                );
                eprintln!("export {what}: strata {loss:.8} transformers {theirs:.8}");
            }
            // The bf16 weights give the loss to bf16's precision.
            let theirs = hf_loss(&bf16, &tokens)["loss"].as_f64().unwrap();
            assert!(
                relative(loss, theirs) < 1e-3,
                "{what} bf16: strata {loss} vs transformers {theirs}"
            );
            eprintln!("export {what} bf16: strata {loss:.8} transformers {theirs:.8}");
            // The folder loads as it is and generates; its tokenizer
            // encodes as the dataset's did.
            let prompt = "The President of the United States, in his address to Congress,";
            let g = hf_generate(&bf16, prompt);
            let ours = strata_dataplane::tokenize::TokenizerKind::R50k
                .load()
                .encode(prompt);
            assert_eq!(g["prompt_ids"], serde_json::json!(ours), "{what}: {g}");
            assert_eq!(g["new_ids"].as_array().unwrap().len(), 8, "{what}: {g}");
            assert_eq!(g["dtype"], "torch.bfloat16", "{what}: {g}");
            assert_eq!(g["eos_token"], "<|endoftext|>", "{what}: {g}");
            eprintln!("generated ({what}): {}", g["text"]);
        }
    }

    // Bad input names the culprit.
    let id = "layout-2-2-1-1";
    let long = dir.path().join("long.json");
    std::fs::write(&long, format!("[[1, 2], {:?}]", vec![7u32; 66])).unwrap();
    let (ok, _, err) = strata(&[
        "eval",
        id,
        "--coordinator",
        &url,
        "--tokens",
        long.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("sequence 1: 66 tokens, more than max_seq_len + 1 = 65"),
        "{err}"
    );
    let (ok, _, err) = strata(&[
        "eval",
        id,
        "--coordinator",
        &url,
        "--step",
        "5",
        "--tokens",
        long.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("no complete checkpoint at step 5 (it has: 4, 8)"),
        "{err}"
    );
    let (ok, _, err) = strata(&["eval", id, "--coordinator", &url]);
    assert!(!ok && err.contains("--tokens"), "{err}");

    // The held-out split of a dataset decomposed with one: by default,
    // and capped.
    let held = decompose_holding_out(dir.path(), "held", &sotu_40(), 0.2).await;
    // [eval] on it: 16 windows of 65 tokens after every 2 steps, under
    // one process, (1, 2, 2) and (2, 2, 1), give the same held-out losses,
    // and
    // `strata eval` of the step-4 checkpoint on the same windows agrees.
    let with_eval = |layout: (u32, u32, u32)| {
        format!(
            "{}[checkpoint]\nevery_steps = 4\ndir = \"file://{}\"\n[eval]\nevery_steps = 2\ntokens = 1040\n",
            recipe3d(&held, 4, layout, true).replace("name = \"layout", "name = \"held"),
            dir.path().join("ck").display()
        )
    };
    let mut evals = Vec::new();
    let mut h = String::new();
    for layout in [(1, 1, 1), (1, 2, 2), (2, 2, 1)] {
        let id = submit(&mut cl, with_eval(layout)).await.unwrap();
        let j = ended(&mut cl, &id, 300).await;
        assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
        let steps = metrics(&mut cl, &id).await;
        let e: Vec<(u64, f64)> = steps
            .iter()
            .filter_map(|s| s.eval_loss.map(|l| (s.step, l)))
            .collect();
        assert_eq!(
            e.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![2, 4],
            "{layout:?}"
        );
        evals.push(e);
        if layout == (1, 1, 1) {
            h = id;
        }
    }
    for (a, b) in evals[0].iter().zip(&evals[1]) {
        assert!(
            relative(a.1, b.1) < 1e-5,
            "step {}: {} vs {}",
            a.0,
            a.1,
            b.1
        );
    }
    let same = json_of(&[
        "eval",
        &h,
        "--coordinator",
        &url,
        "--holdout-tokens",
        "1040",
        "--json",
    ]);
    assert_eq!(same["tokens"], 16 * 64, "{same}");
    let theirs = same["loss"].as_f64().unwrap();
    assert!(
        relative(evals[0][1].1, theirs) < 1e-5,
        "[eval] {} vs strata eval {theirs}",
        evals[0][1].1
    );
    // [eval] on a dataset without a held-out split is refused at submission.
    let no_split = submit(&mut cl, with_eval((1, 1, 1)).replace(&held, &data))
        .await
        .unwrap_err();
    assert!(
        no_split.message().contains("eval: the dataset"),
        "{no_split:?}"
    );
    let all = json_of(&["eval", &h, "--coordinator", &url, "--json"]);
    assert!(
        all["source"].as_str().unwrap().contains("held-out split"),
        "{all}"
    );
    assert!(all["tokens"].as_u64().unwrap() > 1000, "{all}");
    let capped = json_of(&[
        "eval",
        &h,
        "--coordinator",
        &url,
        "--holdout-tokens",
        "200",
        "--json",
    ]);
    // 200 tokens in windows of 65: 65 + 65 + 65 + 5, each predicting all
    // but its first.
    assert_eq!(capped["tokens"], 196, "{capped}");
    assert_eq!(capped["sequences"], 4, "{capped}");

    // A text file, tokenized with the dataset's tokenizer.
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "Fellow-Citizens of the Senate and House of Representatives: ".repeat(20),
    )
    .unwrap();
    let r = json_of(&[
        "eval",
        id,
        "--coordinator",
        &url,
        "--input",
        text.to_str().unwrap(),
        "--json",
    ]);
    assert!(r["sequences"].as_u64().unwrap() >= 2, "{r}");
    assert!(r["loss"].as_f64().unwrap().is_finite(), "{r}");
    c.stop().await;
}
