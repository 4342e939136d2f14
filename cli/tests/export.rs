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
    let Setup {
        dir,
        data,
        c,
        mut cl,
        url,
    } = setup().await;
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

/// `scripts/hf_make.py`: a random Llama saved by transformers in `dir`,
/// shaped as [`recipe3d`]'s model.
fn hf_make(dir: &Path, tied: bool, dtype: &str, vocab: u64) -> serde_json::Value {
    let config = serde_json::json!({
        "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 32, "vocab_size": vocab,
        "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
    })
    .to_string();
    strata_tests::python::script_json(
        "hf_make.py",
        &[
            dir.to_str().unwrap(),
            &config,
            "--dtype",
            dtype,
            "--max-shard-size",
            "1MB",
        ],
    )
}

/// Every parameter of the Hugging Face folder `dir`, as strata reads it.
async fn hf_weights(dir: &Path, model: &strata_recipe::ModelConfig) -> Vec<f32> {
    use strata_dataplane::hf_model::HfModel;
    let loc = strata_dataplane::store::Location::parse(dir.to_str().unwrap(), false).unwrap();
    let hf = HfModel::open(loc).await.unwrap();
    hf.read(model, &strata_worker::params::ParamTable::whole(model))
        .await
        .unwrap()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[tokio::test(flavor = "multi_thread")]
async fn hugging_face_weights_import_into_any_layout_and_start_a_job() {
    let Setup {
        dir,
        data,
        c,
        mut cl,
        url,
    } = setup().await;
    let tokens = sequences(dir.path());
    let tokens = tokens.to_str().unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let ck = dir.path().join("ck");
    let recipe = |steps: u64, layout: (u32, u32, u32), tied: bool, name: &str| {
        recipe3d(&data, steps, layout, tied)
            .replace("name = \"layout", &format!("name = \"{name}"))
            .replace("lr = 3e-3", "lr = 1e-2")
    };
    let write_recipe = |text: &str, name: &str| {
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        path(&p)
    };

    // The parent: 40 steps from random weights, exported in f32 with its
    // tokenizer.
    let parent_spec = format!(
        "{}[checkpoint]\nevery_steps = 40\ndir = \"file://{}\"\n",
        recipe(40, (1, 1, 1), false, "parent"),
        ck.display()
    );
    let parent = submit(&mut cl, parent_spec).await.unwrap();
    let j = ended(&mut cl, &parent, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    let hf = dir.path().join("hf-parent");
    json_of(&[
        "export",
        &parent,
        "--coordinator",
        &url,
        "--out",
        &path(&hf),
        "--dtype",
        "f32",
        "--json",
    ]);
    let parent_eval = json_of(&[
        "eval",
        &parent,
        "--coordinator",
        &url,
        "--tokens",
        tokens,
        "--json",
    ]);

    // HF -> strata (written in (2,2,1) and (1,2,2)) -> HF gives the same
    // bytes, and strata eval of the import the parent's loss exactly.
    for layout in [(2, 2, 1), (1, 2, 2)] {
        let what = format!("{layout:?}");
        let r = write_recipe(
            &recipe(40, layout, false, "imported"),
            &format!("import-{}-{}-{}", layout.0, layout.1, layout.2),
        );
        let out = dir
            .path()
            .join(format!("imported-{}{}{}", layout.0, layout.1, layout.2));
        let i = json_of(&[
            "import",
            &path(&hf),
            "--recipe",
            &r,
            "--out",
            &path(&out),
            "--json",
        ]);
        assert_eq!(
            i["files"],
            2 * layout.0 * layout.1,
            "{what}: a model and an optimizer file per (pp, tp) rank: {i}"
        );
        assert!(
            i["tokenizer"].as_str().unwrap().starts_with("the same as"),
            "{what}: {i}"
        );
        let step0 = path(&out.join("step-00000000"));
        let back = dir
            .path()
            .join(format!("back-{}{}{}", layout.0, layout.1, layout.2));
        let e = json_of(&[
            "export",
            "--checkpoint",
            &step0,
            "--out",
            &path(&back),
            "--dtype",
            "f32",
            "--json",
        ]);
        assert_eq!(e["step"], 0, "{what}");
        assert!(
            std::fs::read(hf.join("model.safetensors")).unwrap()
                == std::fs::read(back.join("model.safetensors")).unwrap(),
            "{what}: the round trip changed model.safetensors"
        );
        let ev = json_of(&["eval", "--checkpoint", &step0, "--tokens", tokens, "--json"]);
        assert_eq!(ev["loss"], parent_eval["loss"], "{what}");
        // A second import into the same folder is refused; the first stays.
        let (ok, _, err) = strata(&["import", &path(&hf), "--recipe", &r, "--out", &path(&out)]);
        assert!(!ok && err.contains("already holds a checkpoint"), "{err}");
        assert!(out.join("step-00000000/manifest.json").is_file());
    }

    // A child continues pretraining from the parent's export under
    // (2,2,1), another from its import under (1,2,2): both start at the
    // parent's loss, not at a random model's.
    let imported = path(&dir.path().join("imported-221").join("step-00000000"));
    let mut firsts = Vec::new();
    for (layout, from) in [
        ((2, 2, 1), format!("hf:{}", path(&hf))),
        ((1, 2, 2), imported.clone()),
    ] {
        let spec = format!(
            "{}[init]\nfrom = \"{from}\"\n",
            recipe(4, layout, false, "child")
        );
        let id = submit(&mut cl, spec).await.unwrap();
        let j = ended(&mut cl, &id, 300).await;
        assert_eq!(
            j.state(),
            pb::JobState::Succeeded,
            "{from}: {}",
            j.failure_reason
        );
        firsts.push(metrics(&mut cl, &id).await[0].loss);
    }
    let p = metrics(&mut cl, &parent).await;
    let tail = p[36..].iter().map(|s| s.loss).sum::<f64>() / 4.0;
    eprintln!(
        "parent: step 1 {:.4}, steps 37-40 {tail:.4}; children's step 1: {:.4} (hf, 2-2-1), {:.4} (import, 1-2-2)",
        p[0].loss, firsts[0], firsts[1]
    );
    // The child's first batch is the parent's first, which the parent
    // trained on 40 steps earlier: near the parent's last losses (below
    // them, if anything), far from a random model's 10.8.
    for f in &firsts {
        assert!(
            (f - tail).abs() < 1.0 && *f < p[0].loss - 3.0,
            "a child's first loss {f}: the parent began at {} and ended near {tail}",
            p[0].loss
        );
    }
    assert!(
        relative(firsts[0], firsts[1]) < 1e-4,
        "the same weights and data under two layouts: {firsts:?}"
    );

    // Refusals name the culprit.
    let kv4 = format!(
        "{}[init]\nfrom = \"hf:{}\"\n",
        recipe(4, (1, 1, 1), false, "kv4").replace("n_kv_heads = 2", "n_kv_heads = 4"),
        path(&hf)
    );
    let e = submit(&mut cl, kv4).await.unwrap_err();
    assert!(
        e.message().contains("init.from")
            && e.message()
                .contains("num_key_value_heads is 2, model.n_kv_heads is 4"),
        "{e:?}"
    );
    let tied = write_recipe(&recipe(4, (1, 1, 1), true, "tied"), "tied");
    let (ok, _, err) = strata(&[
        "import",
        &path(&hf),
        "--recipe",
        &tied,
        "--out",
        &path(&dir.path().join("never")),
    ]);
    assert!(
        !ok && err.contains("tie_word_embeddings is false, model.tie_embeddings is true"),
        "{err}"
    );
    let bad_from = format!(
        "{}[init]\nfrom = \"gs://x/y\"\n",
        recipe(4, (1, 1, 1), false, "bad")
    );
    let e = submit(&mut cl, bad_from).await.unwrap_err();
    assert!(e.message().contains("init.from"), "{e:?}");
    // Another tokenizer: one token's text changed.
    let other = dir.path().join("hf-other-tokenizer");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(&hf).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
    }
    let mut tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tj["model"]["vocab"].as_object_mut().unwrap();
    let token = vocab
        .iter()
        .find(|(_, id)| id.as_u64() == Some(1000))
        .map(|(t, _)| t.clone())
        .unwrap();
    vocab.remove(&token);
    vocab.insert("not-r50k".into(), 1000.into());
    std::fs::write(other.join("tokenizer.json"), tj.to_string()).unwrap();
    let e = submit(
        &mut cl,
        format!(
            "{}[init]\nfrom = \"hf:{}\"\n",
            recipe(4, (1, 1, 1), false, "tok"),
            path(&other)
        ),
    )
    .await
    .unwrap_err();
    assert!(
        e.message()
            .contains("is not the tokenizer of the dataset (r50k)")
            && e.message().contains("id 1000 is \"not-r50k\""),
        "{e:?}"
    );

    // Folders transformers wrote itself (bf16, tied, 50304 rows; f32
    // sharded, untied, GPT-2's 50257 rows unpadded): imported under (2,2,1)
    // and (1,2,2), strata eval gives transformers' loss, and the export
    // gives back the same numbers.
    if transformers_here() {
        for (tied, layout, dtype, vocab) in [
            (true, (2, 2, 1), "bfloat16", 50304),
            (false, (1, 2, 2), "float32", 50257),
        ] {
            let what = format!("tied={tied} {layout:?} {dtype} vocab {vocab}");
            let made = dir.path().join(format!("made-{tied}"));
            let m = hf_make(&made, tied, dtype, vocab);
            let mut text = recipe(40, layout, tied, "made");
            if vocab == 50257 {
                // As the refusal says: strata's padding would add 47 rows.
                let r = write_recipe(&text, "made-padded");
                let (ok, _, err) = strata(&[
                    "import",
                    &path(&made),
                    "--recipe",
                    &r,
                    "--out",
                    &path(&dir.path().join("never")),
                ]);
                assert!(
                    !ok && err.contains(
                        "vocab_size is 50257, strata's model has 50304 rows (model.vocab_size 50257 padded); for 50257 rows set model.vocab_size = 50257 and model.vocab_multiple = 1"
                    ),
                    "{err}"
                );
                text = text.replace(
                    "vocab_size = 50257\n",
                    "vocab_size = 50257\nvocab_multiple = 1\n",
                );
            }
            let model = strata_recipe::Recipe::from_toml_str(&text, "made")
                .unwrap()
                .model;
            let r = write_recipe(&text, &format!("made-{tied}"));
            let out = dir.path().join(format!("made-ck-{tied}"));
            let i = json_of(&[
                "import",
                &path(&made),
                "--recipe",
                &r,
                "--out",
                &path(&out),
                "--json",
            ]);
            assert!(
                i["tokenizer"]
                    .as_str()
                    .unwrap()
                    .contains("no tokenizer.json"),
                "{what}: {i}"
            );
            let step0 = path(&out.join("step-00000000"));
            let ours = json_of(&["eval", "--checkpoint", &step0, "--tokens", tokens, "--json"]);
            let ours = ours["loss"].as_f64().unwrap();
            let theirs = hf_loss(&made, Path::new(tokens))["loss"].as_f64().unwrap();
            eprintln!("import {what} ({m}): strata {ours:.8} transformers {theirs:.8}");
            assert!(
                relative(ours, theirs) < 1e-4,
                "{what}: strata {ours} vs transformers {theirs}"
            );
            let back = dir.path().join(format!("made-back-{tied}"));
            let export_dtype = if dtype == "float32" { "f32" } else { "bf16" };
            json_of(&[
                "export",
                "--checkpoint",
                &step0,
                "--out",
                &path(&back),
                "--dtype",
                export_dtype,
                "--json",
            ]);
            assert!(
                same_bits(
                    &hf_weights(&made, &model).await,
                    &hf_weights(&back, &model).await
                ),
                "{what}: the exported weights differ from transformers'"
            );
        }
    }
    c.stop().await;
}
