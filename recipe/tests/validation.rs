//! Recipe validation, case by case: each case breaks one field of a valid
//! recipe and asserts that the error names the field and shows the numbers.

use strata_recipe::{Recipe, RecipeError};
use toml::Value;

const BASE: &str = r#"
name = "base"
seed = 7

[model]
n_layers = 4
d_model = 256
n_heads = 8
n_kv_heads = 4
d_ffn = 1024
vocab_size = 50304
max_seq_len = 512

[parallel]
tp = 2
pp = 2
dp = 2
microbatches = 4

[data]
dataset = "file:///data/sotu"
curriculum = "grow-p2"
cycles = 8
tokens_per_step = 65536
total_tokens = 65536000

[optimizer]
lr = 3e-3

[schedule]
kind = "wsd"
warmup_tokens = 6553600
decay_tokens = 13107200
decay_shape = "one_minus_sqrt"

[checkpoint]
every_steps = 100
dir = "file:///tmp/ck"
"#;

enum Edit {
    Set(&'static str, Value),
    Remove(&'static str),
}
use Edit::{Remove, Set};

fn edited(edits: &[Edit]) -> String {
    let mut doc: toml::Table = BASE.parse().unwrap();
    for edit in edits {
        let (path, value) = match edit {
            Set(p, v) => (*p, Some(v.clone())),
            Remove(p) => (*p, None),
        };
        let mut keys: Vec<&str> = path.split('.').collect();
        let last = keys.pop().unwrap();
        let mut table = &mut doc;
        for k in keys {
            table = table
                .entry(k)
                .or_insert_with(|| Value::Table(Default::default()))
                .as_table_mut()
                .unwrap();
        }
        match value {
            Some(v) => {
                table.insert(last.to_string(), v);
            }
            None => {
                table.remove(last);
            }
        }
    }
    toml::to_string(&doc).unwrap()
}

fn parse(edits: &[Edit]) -> Result<Recipe, RecipeError> {
    Recipe::from_toml_str(&edited(edits), "fallback")
}

/// Asserts the recipe is rejected with a problem on `field` whose message
/// contains every one of `shows`.
fn check(edits: &[Edit], field: &str, shows: &[&str]) {
    match parse(edits) {
        Ok(_) => panic!("accepted a recipe with a bad {field}"),
        Err(e) => shows_problem(&e, field, shows),
    }
}

/// Asserts `err` has a problem on `field` showing every one of `shows`.
fn shows_problem(err: &RecipeError, field: &str, shows: &[&str]) {
    let problem = err
        .problems
        .iter()
        .find(|p| p.field == field)
        .unwrap_or_else(|| panic!("no problem names {field}: {err}"));
    for s in shows {
        assert!(
            problem.message.contains(s),
            "{field}: message {:?} does not show {s:?}",
            problem.message
        );
    }
    // The rendered error names the field too.
    assert!(err.to_string().contains(field), "{err}");
}

fn int(v: i64) -> Value {
    Value::Integer(v)
}
fn float(v: f64) -> Value {
    Value::Float(v)
}
fn string(v: &str) -> Value {
    Value::String(v.to_string())
}

#[test]
fn the_base_recipe_is_valid() {
    let r = parse(&[]).unwrap();
    assert_eq!(r.name, "base");
    assert_eq!(r.data.n_steps(), 1000);
    assert_eq!(r.parallel.layout.world_size(), 8);
    assert!(r.resolutions.is_empty(), "{:?}", r.resolutions);
}

#[test]
fn layout_sizes_must_be_positive() {
    check(
        &[Set("parallel.tp", int(0))],
        "parallel.tp",
        &["positive", "0"],
    );
    check(
        &[Set("parallel.pp", int(0))],
        "parallel.pp",
        &["positive", "0"],
    );
    check(
        &[Set("parallel.dp", int(0))],
        "parallel.dp",
        &["positive", "0"],
    );
    check(&[Set("parallel.dp", int(-2))], "parallel.dp", &["-2"]);
    check(
        &[Set("parallel.microbatches", int(0))],
        "parallel.microbatches",
        &["0"],
    );
}

#[test]
fn tensor_parallel_must_divide_heads_kv_heads_and_ffn() {
    check(
        &[Set("parallel.tp", int(3))],
        "parallel.tp",
        &["3", "model.n_heads = 8"],
    );
    check(
        &[
            Set("model.d_model", int(384)),
            Set("model.n_heads", int(12)),
            Set("model.n_kv_heads", int(6)),
            Set("parallel.tp", int(4)),
        ],
        "parallel.tp",
        &["4", "model.n_kv_heads = 6"],
    );
    // More ranks than KV heads: each KV head is shared by tp / n_kv_heads
    // ranks (multi-query attention included).
    for kv in [1, 2] {
        let r = parse(&[Set("model.n_kv_heads", int(kv)), Set("parallel.tp", int(4))]).unwrap();
        assert_eq!(r.parallel.layout.tp, 4);
    }
    check(
        &[Set("model.d_ffn", int(1025))],
        "parallel.tp",
        &["2", "model.d_ffn = 1025"],
    );
}

#[test]
fn every_pipeline_stage_needs_a_layer() {
    check(
        &[Set("model.n_layers", int(1))],
        "parallel.pp",
        &["2", "model.n_layers = 1"],
    );
    // Uneven splits are placed, not refused.
    let r = parse(&[Set("model.n_layers", int(5))]).unwrap();
    assert_eq!(r.parallel.layout.stage_layers(5, 0), 0..3);
    assert_eq!(r.parallel.layout.stage_layers(5, 1), 3..5);
}

#[test]
fn kv_heads_must_divide_heads() {
    check(
        &[Set("model.n_kv_heads", int(3))],
        "model.n_kv_heads",
        &["3", "model.n_heads = 8"],
    );
}

#[test]
fn one_f_one_b_takes_fewer_microbatches_than_stages() {
    let r = parse(&[Set("parallel.microbatches", int(1))]).unwrap();
    assert_eq!(r.parallel.microbatches, 1);
}

#[test]
fn tokens_per_step_must_split_evenly() {
    check(
        &[Set("data.tokens_per_step", int(100_000))],
        "data.tokens_per_step",
        &["100000", "512·2·4 = 4096", "98304 or 102400"],
    );
}

#[test]
fn sizes_must_be_positive() {
    for (field, v) in [
        ("model.n_layers", 0),
        ("model.d_model", -256),
        ("model.n_heads", 0),
        ("model.d_ffn", -1),
        ("model.vocab_size", 0),
        ("model.max_seq_len", -512),
        ("data.cycles", 0),
        ("checkpoint.every_steps", 0),
    ] {
        check(&[Set(field, int(v))], field, &[&v.to_string()]);
    }
    check(
        &[Set("data.tokens_per_step", int(-65536))],
        "data.tokens_per_step",
        &["-65536"],
    );
    check(
        &[Set("data.total_tokens", int(0))],
        "data.total_tokens",
        &["positive"],
    );
    check(
        &[Set("data.total_tokens", float(1.5))],
        "data.total_tokens",
        &["whole", "1.5"],
    );
    check(&[Set("seed", int(-1))], "seed", &["-1"]);
    check(
        &[Set("checkpoint.keep_last", int(-3))],
        "checkpoint.keep_last",
        &["-3"],
    );
    check(
        &[Set(
            "checkpoint.keep_steps",
            Value::Array(vec![int(5), int(0)]),
        )],
        "checkpoint.keep_steps[1]",
        &["a step of the run", "got 0"],
    );
    check(
        &[Set("fault.max_restarts", int(-1))],
        "fault.max_restarts",
        &["-1"],
    );
    check(
        &[Set("fault.hang_timeout_s", int(0))],
        "fault.hang_timeout_s",
        &["positive"],
    );
    let r = parse(&[Set("fault.max_restarts", int(0))]).unwrap();
    assert_eq!(r.fault.max_restarts, 0);
    assert_eq!(r.fault.hang_timeout_s, 600, "the default");
}

#[test]
fn model_shape_rules() {
    check(
        &[Set("model.d_model", int(250))],
        "model.d_model",
        &["250", "model.n_heads = 8"],
    );
    // 264 / 8 = 33: an odd head dimension cannot be rotated in pairs.
    check(&[Set("model.d_model", int(264))], "model.d_model", &["33"]);
    check(
        &[Set("model.max_seq_len", int(1000))],
        "model.max_seq_len",
        &["1000", "512 or 1024"],
    );
    check(
        &[Set("model.rope_theta", float(-1.0))],
        "model.rope_theta",
        &["-1"],
    );
}

#[test]
fn unknown_keys_are_named_with_their_path() {
    check(
        &[Set("model.n_layer", int(4))],
        "model.n_layer",
        &["unknown field"],
    );
    check(&[Set("sed", int(4))], "sed", &["unknown field"]);
    check(
        &[Set("schedule.warmup", int(4))],
        "schedule.warmup",
        &["unknown field"],
    );
    check(
        &[Set("parallel.zero", int(1))],
        "parallel.zero",
        &["unknown field"],
    );
    check(&[Set("extra.x", int(1))], "extra", &["unknown field"]);
}

#[test]
fn wrong_types_name_the_field_and_line() {
    check(
        &[Set("model.n_layers", string("four"))],
        "model.n_layers",
        &["line"],
    );
    check(
        &[Set("data.curriculum", string("grow-cubic"))],
        "data.curriculum",
        &["grow-cubic", "grow-p2"],
    );
    check(
        &[Set("schedule.decay_shape", string("quadratic"))],
        "schedule.decay_shape",
        &["quadratic"],
    );
    check(
        &[Set("schedule.kind", string("linear"))],
        "schedule.kind",
        &["linear", "wsd"],
    );
}

#[test]
fn schedule_phases_must_fit_the_run() {
    check(
        &[Set("schedule.decay_tokens", int(60_000_000))],
        "schedule.decay_tokens",
        &["6553600 + 60000000 = 66553600", "65536000"],
    );
    check(
        &[Set("schedule.warmup_tokens", int(70_000_000))],
        "schedule.warmup_tokens",
        &["70000000", "65536000"],
    );
    check(
        &[Set("schedule.decay_start_tokens", int(60_000_000))],
        "schedule.decay_start_tokens",
        &["60000000 + 13107200", "65536000"],
    );
    check(
        &[Set("schedule.decay_start_tokens", int(1_000_000))],
        "schedule.decay_start_tokens",
        &["1000000", "warmup", "6553600"],
    );
    check(
        &[Set("schedule.decay_tokens", int(0))],
        "schedule.decay_tokens",
        &["positive"],
    );
    check(
        &[Set("schedule.final_lr_fraction", float(1.5))],
        "schedule.final_lr_fraction",
        &["1.5"],
    );
    check(
        &[Set("data.total_tokens", int(32768))],
        "data.total_tokens",
        &["32768", "65536"],
    );
}

#[test]
fn schedule_keys_must_belong_to_the_kind() {
    check(
        &[Set("schedule.lr_max", float(0.01))],
        "schedule.lr_max",
        &["not used", "wsd"],
    );
    check(
        &[Set("schedule.kind", string("cosine"))],
        "schedule.decay_tokens",
        &["not used", "cosine", "final_lr_fraction"],
    );
    check(
        &[Remove("schedule.decay_tokens")],
        "schedule.decay_tokens",
        &["missing"],
    );
}

#[test]
fn optimizer_rules() {
    check(&[Remove("optimizer.lr")], "optimizer.lr", &["missing"]);
    check(
        &[Set("optimizer.lr", float(-1e-3))],
        "optimizer.lr",
        &["-0.001"],
    );
    check(
        &[Set("optimizer.lr", string("fast"))],
        "optimizer.lr",
        &["fast"],
    );
    check(
        &[Set("optimizer.beta2", float(1.0))],
        "optimizer.beta2",
        &["[0, 1)", "1"],
    );
    check(&[Set("optimizer.eps", float(0.0))], "optimizer.eps", &["0"]);
    check(
        &[Set("optimizer.weight_decay", float(-0.1))],
        "optimizer.weight_decay",
        &["-0.1"],
    );
    check(
        &[Set("optimizer.grad_clip", float(f64::NAN))],
        "optimizer.grad_clip",
        &["NaN"],
    );
}

#[test]
fn storage_urls() {
    check(
        &[Set("data.dataset", string("gs://bucket/x"))],
        "data.dataset",
        &["gs://bucket/x", "unsupported scheme `gs`"],
    );
    check(
        &[Set("data.dataset", string(""))],
        "data.dataset",
        &["empty"],
    );
    check(
        &[Set("data.dataset", string("s3:///prefix"))],
        "data.dataset",
        &["bucket"],
    );
    check(
        &[Set("checkpoint.dir", string("file://relative/dir"))],
        "checkpoint.dir",
        &["absolute"],
    );
    // Plain paths and proper URLs are fine; existence is checked at submission.
    for ok in [
        "datasets/sotu",
        "/abs/sotu",
        "file:///abs",
        "s3://bucket",
        "s3://b/p/q",
    ] {
        assert!(parse(&[Set("data.dataset", string(ok))]).is_ok(), "{ok}");
    }
}

#[test]
fn curriculum_odds() {
    check(
        &[Set("data.curriculum", Value::Array(vec![]))],
        "data.curriculum",
        &["one entry per bucket"],
    );
    check(
        &[Set(
            "data.curriculum",
            Value::Array(vec![int(1), float(-2.0)]),
        )],
        "data.curriculum",
        &["[1] = -2"],
    );
    check(
        &[Set("data.curriculum", Value::Array(vec![int(0), int(0)]))],
        "data.curriculum",
        &["0"],
    );
    let r = parse(&[Set(
        "data.curriculum",
        Value::Array(vec![int(4), float(2.5), int(1)]),
    )])
    .unwrap();
    assert_eq!(
        r.data.curriculum,
        strata_recipe::Curriculum::Odds(vec![4.0, 2.5, 1.0])
    );
}

#[test]
fn power_schedule_rules() {
    let power = |extra: &[Edit]| {
        let mut e = vec![
            Remove("optimizer.lr"),
            Remove("schedule.decay_shape"),
            Set("schedule.kind", string("power")),
        ];
        e.extend(extra.iter().map(|x| match x {
            Set(p, v) => Set(p, v.clone()),
            Remove(p) => Remove(p),
        }));
        e
    };
    let r = parse(&power(&[])).unwrap();
    let strata_recipe::ScheduleKind::Power { law, decay } = r.schedule.kind else {
        panic!("not power")
    };
    // β defaults to tokens_per_step / 4096; the decay to exponential, f = 0.
    assert_eq!(law.batch_sequences, 16.0);
    assert_eq!((law.a, law.b, law.lr_max), (4.0, -0.51, 0.02));
    assert_eq!(decay.shape, strata_recipe::DecayShape::Exponential);
    assert_eq!(decay.final_lr_fraction, 0.0);
    assert!(
        r.resolutions
            .iter()
            .any(|x| x.field == "schedule.batch_sequences")
    );

    check(
        &power(&[Set("optimizer.lr", float(1e-3))]),
        "optimizer.lr",
        &["power"],
    );
    check(
        &power(&[Set("schedule.b", float(0.5))]),
        "schedule.b",
        &["negative"],
    );
    check(
        &power(&[Set("schedule.a", float(0.0))]),
        "schedule.a",
        &["0"],
    );
    check(
        &power(&[Set("schedule.lr_max", float(-1.0))]),
        "schedule.lr_max",
        &["-1"],
    );
    check(
        &power(&[Set("schedule.batch_sequences", float(0.0))]),
        "schedule.batch_sequences",
        &["0"],
    );
    // A power schedule may run without a decay, but then has no decay start.
    assert!(parse(&power(&[Set("schedule.decay_tokens", int(0))])).is_ok());
    check(
        &power(&[
            Set("schedule.decay_tokens", int(0)),
            Set("schedule.decay_start_tokens", int(10_000_000)),
        ]),
        "schedule.decay_start_tokens",
        &["decay_tokens is 0"],
    );
}

#[test]
fn inverse_sqrt_needs_a_warmup() {
    check(
        &[
            Set("schedule.kind", string("inverse_sqrt")),
            Remove("schedule.decay_tokens"),
            Remove("schedule.decay_shape"),
            Set("schedule.warmup_tokens", int(0)),
        ],
        "schedule.warmup_tokens",
        &["positive"],
    );
}

#[test]
fn names() {
    check(&[Set("name", string("my job"))], "name", &["my job"]);
    let r = Recipe::from_toml_str(&edited(&[Remove("name")]), "from file/stem").unwrap();
    assert_eq!(r.name, "from-file-stem");
    // A leading '-' would read as a flag where the name is passed on.
    check(
        &[Set("name", string("-x"))],
        "name",
        &["starting with a letter"],
    );
    check(&[Set("name", string("--help"))], "name", &["\"--help\""]);
    let r = Recipe::from_toml_str(&edited(&[Remove("name")]), "--evil").unwrap();
    assert_eq!(r.name, "evil");
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = parse(&[
        Set("parallel.tp", int(3)),
        Set("optimizer.beta1", float(2.0)),
        Set("schedule.decay_tokens", int(60_000_000)),
        Set("data.dataset", string("ftp://x")),
    ])
    .unwrap_err();
    for field in [
        "parallel.tp",
        "optimizer.beta1",
        "schedule.decay_tokens",
        "data.dataset",
    ] {
        assert!(err.names(field), "{field} missing from {err}");
    }
    assert!(err.problems.len() >= 4);
    assert!(err.to_string().contains("problems"));
}

#[test]
fn vocab_padding_rule_is_stated() {
    let r = parse(&[Set("model.vocab_size", int(50257))]).unwrap();
    assert_eq!(r.model.vocab_size, 50257);
    assert_eq!(r.model.padded_vocab_size, 50304);
    let note = r
        .resolutions
        .iter()
        .find(|x| x.field == "model.vocab_size")
        .expect("padding reported");
    assert!(note.how.contains("50257") && note.how.contains("50304"));
}

#[test]
fn vocab_multiple_sets_the_padding_and_init_from_is_read_once() {
    // An imported model's own rows: no padding at tp 1, tp's multiple above.
    let r = parse(&[
        Set("model.vocab_size", int(50257)),
        Set("model.vocab_multiple", int(1)),
        Set("parallel.tp", int(1)),
    ])
    .unwrap();
    assert_eq!(r.model.padded_vocab_size, 50257);
    assert!(!r.resolutions.iter().any(|x| x.field == "model.vocab_size"));
    let r = parse(&[
        Set("model.vocab_size", int(32000)),
        Set("model.vocab_multiple", int(64)),
    ])
    .unwrap();
    assert_eq!(r.model.padded_vocab_size, 32000);
    let err = parse(&[Set("model.vocab_multiple", int(0))]).unwrap_err();
    assert!(err.names("model.vocab_multiple"), "{err}");

    use strata_recipe::InitFrom;
    for (from, want) in [
        (
            "hf:/models/llama",
            InitFrom::HuggingFace("/models/llama".into()),
        ),
        (
            "hf:s3://bucket/llama/",
            InitFrom::HuggingFace("s3://bucket/llama".into()),
        ),
        (
            "s3://ck/run/step-00001000",
            InitFrom::Checkpoint("s3://ck/run/step-00001000".into()),
        ),
    ] {
        let r = parse(&[Set("init.from", string(from))]).unwrap();
        assert_eq!(r.init, Some(want), "{from}");
    }
    for bad in [
        "hf:",
        "hf:gs://x/y",
        "/ck/run",
        "s3://ck/run/step-12",
        "ftp://x/step-00000001",
    ] {
        let err = parse(&[Set("init.from", string(bad))]).unwrap_err();
        assert!(err.names("init.from"), "{bad}: {err}");
    }
}

#[test]
fn step_law_resolves_lr_and_batch() {
    let r = parse(&[
        Set("optimizer.lr", string("step-law")),
        Set("data.tokens_per_step", string("step-law")),
        Set("data.total_tokens", string("10B")),
        Set("schedule.warmup_tokens", string("100M")),
        Set("schedule.decay_tokens", string("1B")),
    ])
    .unwrap();
    // B = 0.58·(1e10)^0.571 ≈ 299,520 tokens → the nearest multiple of 4096.
    let b = 0.58 * 1e10f64.powf(0.571);
    let expected_b = ((b / 4096.0).round() as u64) * 4096;
    assert_eq!(r.data.tokens_per_step, expected_b);
    let n = r.model.non_embedding_params() as f64;
    let d = r.data.total_tokens as f64;
    let lr = 1.79 * n.powf(-0.713) * d.powf(0.307);
    assert_eq!(r.schedule.max_lr(), lr);
    let fields: Vec<&str> = r.resolutions.iter().map(|x| x.field.as_str()).collect();
    assert!(fields.contains(&"optimizer.lr"), "{fields:?}");
    assert!(fields.contains(&"data.tokens_per_step"), "{fields:?}");
    // 1e10 is not a whole number of such steps: the rounding is reported.
    assert!(fields.contains(&"data.total_tokens"), "{fields:?}");
    assert_eq!(r.data.total_tokens % r.data.tokens_per_step, 0);
    assert_eq!(r.schedule.total_tokens, r.data.total_tokens);
}

#[test]
fn step_law_cannot_choose_token_counts() {
    check(
        &[Set("data.total_tokens", string("step-law"))],
        "data.total_tokens",
        &["step-law"],
    );
}

#[test]
fn token_counts_accept_suffixes_and_floats() {
    let r = parse(&[
        Set("data.total_tokens", string("65.536M")),
        Set("schedule.warmup_tokens", float(6.5536e6)),
    ])
    .unwrap();
    assert_eq!(r.data.total_tokens, 65_536_000);
    assert_eq!(r.schedule.warmup_tokens, 6_553_600);
}

#[test]
fn a_syntax_error_names_its_line() {
    let err = Recipe::from_toml_str("seed = 1\n[model\nn_layers = 2\n", "x").unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert!(err.problems[0].message.contains("line 2"), "{err}");
}

#[test]
fn every_unknown_key_and_wrong_type_is_reported_in_one_pass() {
    let err = parse(&[
        Set("model.n_layer", int(4)),
        Set("parallel.zero", int(1)),
        Set("optimizer.beta1", string("high")),
        Set("checkpoint.evry_steps", int(5)),
    ])
    .unwrap_err();
    for field in [
        "model.n_layer",
        "parallel.zero",
        "optimizer.beta1",
        "checkpoint.evry_steps",
    ] {
        assert!(err.names(field), "{field} missing from {err}");
    }
    assert_eq!(err.problems.len(), 4, "{err}");
    // Each names its line in the original text.
    assert!(
        err.problems.iter().all(|p| p.message.contains("line ")),
        "{err}"
    );
}

#[test]
fn a_missing_required_key_is_named() {
    check(&[Remove("model.d_ffn")], "model.d_ffn", &["missing field"]);
    check(
        &[Remove("data.dataset")],
        "data.dataset",
        &["missing", "[[data.sources]]"],
    );
}

/// The base recipe's one dataset replaced by a mixture (`sources`: name,
/// weight) with `phases` (at tokens, weights by name), as TOML text.
fn mixture(sources: &[(&str, f64)], phases: &str) -> String {
    let mut text = edited(&[Remove("data.dataset")]);
    for (name, weight) in sources {
        text.push_str(&format!(
            "\n[[data.sources]]\nname = \"{name}\"\ndataset = \"file:///data/{name}\"\nweight = {weight:?}\n"
        ));
    }
    text + phases
}

fn mixture_problem(text: &str, field: &str, shows: &[&str]) {
    let err = Recipe::from_toml_str(text, "x").expect_err("a bad mixture was accepted");
    shows_problem(&err, field, shows);
}

#[test]
fn a_mixture_names_its_sources_and_weighs_them_by_phase() {
    let phases =
        "\n[[data.phases]]\nat_tokens = 32768000\nweights = { web = 1, code = 1, math = 2 }\n";
    let r = Recipe::from_toml_str(
        &mixture(&[("web", 5.0), ("code", 3.0), ("math", 2.0)], phases),
        "x",
    )
    .unwrap();
    let d = &r.data;
    assert!(d.is_mixture());
    let names: Vec<&str> = d.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "code", "math"]);
    assert_eq!(d.weights_at(0), [0.5, 0.3, 0.2]);
    assert_eq!(d.weights_at(32_768_000 - 1), [0.5, 0.3, 0.2]);
    assert_eq!(d.weights_at(32_768_000), [0.25, 0.25, 0.5]);
    // One dataset is a single source of weight 1.
    let one = parse(&[]).unwrap();
    assert!(!one.data.is_mixture());
    assert_eq!(one.data.first_dataset(), "file:///data/sotu");
    assert_eq!(one.data.weights_at(0), [1.0]);
}

#[test]
fn bad_mixtures_are_refused_naming_the_entry() {
    let both = mixture(&[("web", 1.0)], "").replace("[data]", "[data]\ndataset = \"file:///x\"");
    mixture_problem(&both, "data.dataset", &["not both"]);
    mixture_problem(
        &mixture(&[("web", 1.0), ("web", 2.0)], ""),
        "data.sources[1].name",
        &["\"web\" also names data.sources[0]"],
    );
    mixture_problem(
        &mixture(&[("web site", 1.0)], ""),
        "data.sources[0].name",
        &["web site"],
    );
    mixture_problem(
        &mixture(&[("web", 1.0), ("code", -1.0)], ""),
        "data.sources[1].weight",
        &["-1"],
    );
    mixture_problem(
        &mixture(&[("web", 0.0), ("code", 0.0)], ""),
        "data.sources",
        &["every source's weight is 0"],
    );
    let sources = [("web", 1.0), ("code", 1.0)];
    mixture_problem(
        &mixture(
            &sources,
            "\n[[data.phases]]\nat_tokens = 1000\nweights = { web = 1, cod = 1 }\n",
        ),
        "data.phases[0].weights",
        &["\"cod\" names no source", "no weight for code"],
    );
    mixture_problem(
        &mixture(
            &sources,
            "\n[[data.phases]]\nat_tokens = 2000\nweights = { web = 1, code = 1 }\n[[data.phases]]\nat_tokens = 1000\nweights = { web = 1, code = 0 }\n",
        ),
        "data.phases[1].at_tokens",
        &["1000 is not after data.phases[0].at_tokens = 2000"],
    );
    mixture_problem(
        &mixture(
            &sources,
            "\n[[data.phases]]\nat_tokens = 65536000\nweights = { web = 1, code = 1 }\n",
        ),
        "data.phases[0].at_tokens",
        &["not before the run's end at 65536000"],
    );
    mixture_problem(
        &mixture(
            &sources,
            "\n[[data.phases]]\nat_tokens = 1000\nweights = { web = 0, code = 0 }\n",
        ),
        "data.phases[0].weights",
        &["every weight is 0"],
    );
    mixture_problem(
        &mixture(&sources, "").replace("name = \"code\"", "name = \"code\"\nexhausted = \"never\""),
        "data.sources[1].exhausted",
        &["never", "`cycle` or `stop`"],
    );
}

#[test]
fn missing_sections_are_named() {
    let text = edited(&[]).replace("[optimizer]", "[optimiser]");
    let err = Recipe::from_toml_str(&text, "x").unwrap_err();
    assert!(err.names("optimiser"), "{err}");
}

#[test]
fn defaults_fill_what_is_left_out() {
    let r = parse(&[
        Remove("model.n_kv_heads"),
        Remove("parallel.microbatches"),
        Set("parallel.pp", int(1)),
        Remove("checkpoint"),
    ])
    .unwrap();
    assert_eq!(r.model.n_kv_heads, r.model.n_heads);
    assert_eq!(r.model.rope_theta, 10_000.0);
    assert!(!r.model.tie_embeddings);
    assert_eq!(r.parallel.microbatches, 1);
    assert_eq!(r.optimizer.beta1, 0.9);
    assert_eq!(r.optimizer.beta2, 0.95);
    assert_eq!(r.optimizer.grad_clip, Some(1.0));
    assert_eq!(r.checkpoint, None);
    let r = parse(&[Set("optimizer.grad_clip", float(0.0))]).unwrap();
    assert_eq!(r.optimizer.grad_clip, None);
}

#[test]
fn a_resolved_recipe_round_trips_through_json() {
    let r = parse(&[Set("model.vocab_size", int(50257))]).unwrap();
    let json = serde_json::to_string(&r).unwrap();
    let back: Recipe = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}

#[test]
fn interleaved_pipelines_need_a_layer_per_chunk_and_groups_of_pp_microbatches() {
    // BASE: 4 layers, pp = 2, 4 microbatches.
    let r = parse(&[Set("parallel.virtual_stages", int(2))]).unwrap();
    assert_eq!(r.parallel.virtual_stages, 2);
    check(
        &[Set("parallel.virtual_stages", int(3))],
        "parallel.virtual_stages",
        &["2·3", "model.n_layers = 4"],
    );
    check(
        &[
            Set("parallel.virtual_stages", int(2)),
            Set("parallel.microbatches", int(3)),
            Set("data.tokens_per_step", int(3 * 512 * 2 * 64)),
        ],
        "parallel.microbatches",
        &["3", "parallel.pp = 2"],
    );
    check(
        &[
            Set("parallel.virtual_stages", int(2)),
            Set("parallel.pp", int(1)),
        ],
        "parallel.virtual_stages",
        &["parallel.pp = 1"],
    );
    check(
        &[Set("parallel.virtual_stages", int(0))],
        "parallel.virtual_stages",
        &["0"],
    );
}

#[test]
fn the_device_is_the_cpu_unless_the_recipe_names_cuda() {
    use strata_recipe::DeviceKind;
    assert_eq!(parse(&[]).unwrap().device, DeviceKind::Cpu);
    let r = parse(&[Set("device.backend", string("cuda"))]).unwrap();
    assert_eq!(r.device, DeviceKind::Cuda);
    let e = parse(&[Set("device.backend", string("tpu"))]).unwrap_err();
    assert!(e.names("device.backend"), "{e}");
    assert!(e.to_string().contains("tpu"), "{e}");
    let e = parse(&[Set("device.gpus", int(2))]).unwrap_err();
    assert!(e.names("device.gpus"), "{e}");
}

#[test]
fn precision_is_bf16_on_gpus_and_f32_on_the_cpu_unless_the_recipe_says() {
    use strata_recipe::{DeviceKind, Precision};
    assert_eq!(parse(&[]).unwrap().precision, Precision::F32);
    let r = parse(&[Set("device.backend", string("cuda"))]).unwrap();
    assert_eq!(r.precision, Precision::Bf16);
    let r = parse(&[
        Set("device.backend", string("cuda")),
        Set("device.precision", string("f32")),
    ])
    .unwrap();
    assert_eq!(r.precision, Precision::F32);
    let r = parse(&[Set("device.precision", string("bf16"))]).unwrap();
    assert_eq!((r.device, r.precision), (DeviceKind::Cpu, Precision::Bf16));
    let e = parse(&[Set("device.precision", string("fp8"))]).unwrap_err();
    assert!(e.names("device.precision"), "{e}");
    // wgpu: f32, and bf16 refused (WGSL has no bf16 type).
    let r = parse(&[Set("device.backend", string("wgpu"))]).unwrap();
    assert_eq!((r.device, r.precision), (DeviceKind::Wgpu, Precision::F32));
    check(
        &[
            Set("device.backend", string("wgpu")),
            Set("device.precision", string("bf16")),
        ],
        "device.precision",
        &["WGSL has no bf16"],
    );
}

#[test]
fn a_device_peak_is_a_positive_number_of_tflops() {
    assert_eq!(parse(&[]).unwrap().peak_tflops, None);
    let r = parse(&[Set("device.peak_tflops", float(989.4))]).unwrap();
    assert_eq!(r.peak_tflops, Some(989.4));
    for bad in [0.0, -1.0, f64::NAN] {
        let e = parse(&[Set("device.peak_tflops", float(bad))]).unwrap_err();
        assert!(e.names("device.peak_tflops"), "{e}");
    }
}

#[test]
fn a_known_gpu_gives_the_device_s_memory_and_peak() {
    let cuda = || Set("device.backend", string("cuda"));
    let r = parse(&[cuda(), Set("device.gpu", string("h200"))]).unwrap();
    assert_eq!(r.gpu.as_deref(), Some("H200"));
    let (gib, from) = r.device_memory().unwrap();
    assert!((gib - 140.4).abs() < 0.1, "{gib}");
    assert_eq!(from, "device.gpu = H200");
    assert_eq!(r.device_peak_tflops(), Some(989.4));
    // What the recipe says itself wins.
    let r = parse(&[
        cuda(),
        Set("device.gpu", string("H100")),
        Set("device.memory_gib", float(70.0)),
        Set("device.peak_tflops", float(900.0)),
    ])
    .unwrap();
    assert_eq!(r.device_memory().unwrap().0, 70.0);
    assert_eq!(r.device_peak_tflops(), Some(900.0));
    // An unknown GPU, one whose memory varies, and a GPU on the CPU
    // backend are named.
    let e = parse(&[cuda(), Set("device.gpu", string("V100"))]).unwrap_err();
    assert!(
        e.names("device.gpu") && e.to_string().contains("H100-PCIe"),
        "{e}"
    );
    let e = parse(&[cuda(), Set("device.gpu", string("GH200"))]).unwrap_err();
    assert!(e.to_string().contains("give device.memory_gib too"), "{e}");
    let e = parse(&[Set("device.gpu", string("H100"))]).unwrap_err();
    assert!(e.to_string().contains("set backend = \"cuda\""), "{e}");
}

#[test]
fn eval_needs_a_window_per_microbatch_of_every_replica() {
    let r = parse(&[
        Set("eval.every_steps", int(50)),
        Set("eval.tokens", string("8M")),
    ])
    .unwrap();
    let ev = r.eval.unwrap();
    assert_eq!((ev.every_steps, ev.tokens), (50, 8_000_000));
    assert_eq!(ev.rows(512), 8_000_000 / 513);
    // dp 2 × 4 microbatches need 8 windows of 513 tokens.
    check(
        &[
            Set("eval.every_steps", int(50)),
            Set("eval.tokens", int(4000)),
        ],
        "eval.tokens",
        &["4000 tokens make 7 windows", "513", "need 8"],
    );
    check(
        &[
            Set("eval.every_steps", int(0)),
            Set("eval.tokens", int(100_000)),
        ],
        "eval.every_steps",
        &["0"],
    );
    check(
        &[Set("slurm.time", string("an hour"))],
        "slurm.time",
        &["an hour"],
    );
}

#[test]
fn kept_checkpoint_steps_are_saved_besides_the_interval() {
    let r = parse(&[Set(
        "checkpoint.keep_steps",
        Value::Array(vec![int(7), int(3), int(7)]),
    )])
    .unwrap();
    let ck = r.checkpoint.unwrap();
    assert_eq!(ck.keep_steps, [3, 7]);
    let n = r.data.n_steps();
    assert!(n > 200, "{n}");
    let saved: Vec<u64> = (1..=n).filter(|&s| ck.saves_at(s, n)).collect();
    assert_eq!(&saved[..4], [3, 7, 100, 200]);
    assert_eq!(saved.last(), Some(&n));
}

mod adversarial {
    //! Recipes come from users and from files on shared storage: whatever
    //! they hold, parsing gives a recipe or errors that name fields, never
    //! a panic (an overflow, an index) and never a buffer sized by a
    //! claimed number.
    use super::*;
    use proptest::prelude::*;

    const INTEGERS: &[&str] = &[
        "seed",
        "model.n_layers",
        "model.d_model",
        "model.n_heads",
        "model.n_kv_heads",
        "model.d_ffn",
        "model.vocab_size",
        "model.max_seq_len",
        "parallel.tp",
        "parallel.pp",
        "parallel.dp",
        "parallel.microbatches",
        "data.cycles",
        "data.tokens_per_step",
        "data.total_tokens",
        "schedule.warmup_tokens",
        "schedule.decay_tokens",
        "checkpoint.every_steps",
    ];

    fn extreme() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(i64::MAX),
            Just(i64::MIN),
            Just(u32::MAX as i64),
            Just(u32::MAX as i64 + 1),
            Just(1 << 40),
            any::<i64>(),
            0i64..100_000,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Up to three integer fields set to extreme values at once.
        #[test]
        fn extreme_numbers_are_named_errors(
            edits in proptest::collection::vec((0..INTEGERS.len(), extreme()), 1..4)
        ) {
            let edits: Vec<Edit> = edits
                .into_iter()
                .map(|(i, v)| Set(INTEGERS[i], int(v)))
                .collect();
            if let Err(e) = parse(&edits) {
                prop_assert!(!e.problems.is_empty(), "{e}");
            }
        }

        /// Any text at all.
        #[test]
        fn any_text_parses_or_is_refused(text in "\\PC{0,400}") {
            let _ = Recipe::from_toml_str(&text, "fuzz");
        }

        /// The base recipe cut or with a byte changed.
        #[test]
        fn damaged_recipes_parse_or_are_refused(cut in 0usize..BASE.len(), byte in any::<u8>()) {
            let mut b = BASE.as_bytes().to_vec();
            b[cut] = byte;
            if let Ok(text) = std::str::from_utf8(&b) {
                let _ = Recipe::from_toml_str(text, "fuzz");
            }
            let _ = Recipe::from_toml_str(&BASE[..BASE.floor_char_boundary(cut)], "fuzz");
        }
    }
}

#[test]
fn a_resume_or_branch_reweighs_a_mixture_from_its_checkpoint() {
    use strata_recipe::resume::{branch_weights, reweigh};
    let phases = "\n[[data.phases]]\nat_tokens = 1000\nweights = { web = 1, code = 3 }\n[[data.phases]]\nat_tokens = 50000000\nweights = { web = 3, code = 1 }\n";
    let text = mixture(&[("web", 1.0), ("code", 1.0)], phases);
    let r = Recipe::from_toml_str(&text, "x").unwrap();
    // New weights from 2000 tokens: the phase before kept, the one after gone.
    let w = [("web".to_string(), 0.9), ("code".to_string(), 0.1)];
    let now = Recipe::from_toml_str(&reweigh(&text, &r, 2000, &w).unwrap(), "x").unwrap();
    let at: Vec<u64> = now.data.phases.iter().map(|p| p.at_tokens).collect();
    assert_eq!(at, [1000, 2000]);
    assert_eq!(now.data.weights_at(0), [0.5, 0.5]);
    assert_eq!(now.data.weights_at(1999), [0.25, 0.75]);
    assert_eq!(now.data.weights_at(2000), [0.9, 0.1]);
    assert!(strata_recipe::resume_conflicts(&r, &now).is_empty());
    // A branch ending at 3000 tokens without new weights keeps the phases
    // before its end.
    let cut =
        Recipe::from_toml_str(&branch_weights(&text, &r, (2000, 3000), &[]).unwrap(), "x").unwrap();
    assert_eq!(cut.data.phases.len(), 1);
    // One dataset has no weights to change.
    let one = parse(&[]).unwrap();
    let e = reweigh(&edited(&[]), &one, 2000, &w).unwrap_err();
    assert!(e.contains("one dataset"), "{e}");
    // Renamed sources cannot continue.
    let renamed = Recipe::from_toml_str(
        &text
            .replace("\"code\"", "\"cod\"")
            .replace("code =", "cod ="),
        "x",
    )
    .unwrap();
    let c = strata_recipe::resume_conflicts(&r, &renamed);
    assert!(c.iter().any(|p| p.field == "data.sources"), "{c:?}");
}

#[test]
fn reweighting_takes_the_papers_strategies_and_groups_inside_a_microbatch() {
    let on = |group: i64| {
        vec![
            Set("data.reweighting.strategy", string("linupper")),
            Set("data.reweighting.group", int(group)),
            Set("data.reweighting.start_tokens", int(6553600)),
        ]
    };
    let r = parse(&on(4)).unwrap().data.reweighting.unwrap();
    assert_eq!(r.strategy, strata_recipe::Strategy::Linupper);
    assert_eq!((r.group, r.temperature, r.delta), (4, 1.0, 1.0));
    assert!(!r.active_at(6553600 - 65536) && r.active_at(6553600));
    assert!(parse(&[]).unwrap().data.reweighting.is_none());
    // 65536 tokens / (512 · 4 microbatches) = 32 sequences per microbatch
    // of the step, 16 on each of the 2 replicas: a group may span them.
    parse(&on(32)).unwrap();
    check(
        &on(5),
        "data.reweighting.group",
        &["5 does not divide the 32 sequences", "1, 2, 4, 8, 16, 32"],
    );
    let mut e = on(4);
    e.push(Set("data.reweighting.strategy", string("mid")));
    check(
        &e,
        "data.reweighting.strategy",
        &["\"mid\"", "\"linupper\""],
    );
    let mut e = on(4);
    e.push(Set("data.reweighting.temperature", float(0.0)));
    check(&e, "data.reweighting.temperature", &["positive", "0"]);
    let mut e = on(4);
    e.push(Set("data.reweighting.start_tokens", int(65536000)));
    check(&e, "data.reweighting.start_tokens", &["never start"]);
    let mut e = on(4);
    e.push(Set("data.reweighting.groups", int(4)));
    check(&e, "data.reweighting.groups", &["unknown field"]);
    // More microbatches split a group of 64: refused at resume too, since
    // a resumed recipe is validated whole. More replicas do not.
    let mut e = on(64);
    e.push(Set("parallel.dp", int(4)));
    e.push(Set("parallel.microbatches", int(2)));
    parse(&e).unwrap();
    e.push(Set("parallel.microbatches", int(4)));
    check(
        &e,
        "data.reweighting.group",
        &["64 does not divide the 32 sequences"],
    );
}
