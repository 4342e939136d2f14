//! What a run may change when it continues from a checkpoint.
//!
//! A checkpoint holds the model's parameters, the optimizer's moments and
//! the data loader's cursor. Whatever those depend on must not change:
//! every field of `[model]` (the parameters' shapes and what they mean),
//! the seed (it keys the curriculum's generator), and the curriculum, its
//! cycles and the tokens per step (the cursor counts steps of that plan).
//! Everything else may: the parallel layout (checkpoints are resharded
//! from their logical slices), the total tokens, the learning-rate
//! schedule (a WSD cooldown branched from a stable-phase checkpoint), the
//! optimizer's hyperparameters, the device and precision, checkpointing
//! itself, and a mixture's weights and phases. The sources, by name and
//! in order, may not change; a dataset may move to another URL if its
//! contents are the same (the worker compares each one's fingerprint).

use crate::{Problem, Recipe};

/// The fields of `now` that cannot continue a run saved under `saved`,
/// each naming the field and both values. Empty when `now` can resume.
pub fn resume_conflicts(saved: &Recipe, now: &Recipe) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut differ = |field: &str, a: String, b: String| {
        if a != b {
            out.push(Problem {
                field: field.to_string(),
                message: format!(
                    "was {a} when the checkpoint was saved, now {b}; a checkpoint continues only the run it was saved from"
                ),
            });
        }
    };
    match (
        toml::Value::try_from(saved.model),
        toml::Value::try_from(now.model),
    ) {
        (Ok(toml::Value::Table(a)), Ok(toml::Value::Table(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let show = |v: Option<&toml::Value>| v.map_or("absent".into(), |v| v.to_string());
                differ(&format!("model.{k}"), show(a.get(k)), show(b.get(k)));
            }
        }
        _ => differ(
            "model",
            format!("{:?}", saved.model),
            format!("{:?}", now.model),
        ),
    }
    differ("seed", saved.seed.to_string(), now.seed.to_string());
    // The cursor holds a position in each source, by order: the sources
    // may move (their contents are fingerprinted) and reweigh, not change.
    let names = |r: &Recipe| {
        let n: Vec<&str> = r.data.sources.iter().map(|s| s.name.as_str()).collect();
        format!("[{}]", n.join(", "))
    };
    differ("data.sources", names(saved), names(now));
    differ(
        "data.curriculum",
        format!("{:?}", saved.data.curriculum),
        format!("{:?}", now.data.curriculum),
    );
    differ(
        "data.cycles",
        saved.data.cycles.to_string(),
        now.data.cycles.to_string(),
    );
    differ(
        "data.tokens_per_step",
        saved.data.tokens_per_step.to_string(),
        now.data.tokens_per_step.to_string(),
    );
    out
}

/// `spec_toml` with its `[parallel]` layout changed where a value is
/// given (comments are not kept). The result still has to pass
/// validation: the new layout must split the model and the batch.
pub fn relayout(
    spec_toml: &str,
    tp: Option<u32>,
    pp: Option<u32>,
    dp: Option<u32>,
) -> Result<String, String> {
    let mut doc: toml::Table = spec_toml
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    let parallel = doc
        .entry("parallel")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(parallel) = parallel.as_table_mut() else {
        return Err("parallel: not a table".into());
    };
    for (key, value) in [("tp", tp), ("pp", pp), ("dp", dp)] {
        if let Some(v) = value {
            parallel.insert(key.into(), toml::Value::Integer(i64::from(v)));
        }
    }
    toml::to_string(&doc).map_err(|e| e.to_string())
}

/// `spec_toml` (whose validated form is `recipe`) with a mixture's
/// weights changed from `at_tokens` on: a phase there with `weights` (by
/// source name), the phases after it dropped, the earlier ones kept, so
/// the recipe still says what the steps before were drawn with. The
/// result still has to pass validation (every source weighed, none
/// unknown).
pub fn reweigh(
    spec_toml: &str,
    recipe: &Recipe,
    at_tokens: u64,
    weights: &[(String, f64)],
) -> Result<String, String> {
    if recipe.data.sources.len() < 2 {
        return Err(
            "the job trains on one dataset; weights apply to a mixture's [[data.sources]]".into(),
        );
    }
    with_phases(spec_toml, recipe, at_tokens, Some(weights))
}

/// `spec_toml` (validated as `recipe`) with the mixture's phases at or
/// after `end_tokens` dropped (a run cut short there), and a phase at
/// `end_tokens` with `weights` when given. Unchanged without phases.
fn with_phases(
    spec_toml: &str,
    recipe: &Recipe,
    end_tokens: u64,
    weights: Option<&[(String, f64)]>,
) -> Result<String, String> {
    let kept: Vec<&crate::MixPhase> = recipe
        .data
        .phases
        .iter()
        .filter(|p| p.at_tokens < end_tokens)
        .collect();
    if weights.is_none() && kept.len() == recipe.data.phases.len() {
        return Ok(spec_toml.to_string());
    }
    let mut doc: toml::Table = spec_toml
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    let data = doc
        .get_mut("data")
        .and_then(toml::Value::as_table_mut)
        .ok_or("[data] is not a table")?;
    let int = |x: u64| toml::Value::Integer(i64::try_from(x).unwrap_or(i64::MAX));
    let phase = |at: u64, w: Vec<(String, f64)>| {
        let mut t = toml::Table::new();
        t.insert("at_tokens".into(), int(at));
        t.insert(
            "weights".into(),
            toml::Value::Table(
                w.into_iter()
                    .map(|(k, v)| (k, toml::Value::Float(v)))
                    .collect(),
            ),
        );
        toml::Value::Table(t)
    };
    let mut phases: Vec<toml::Value> = kept
        .iter()
        .map(|p| {
            let named = recipe
                .data
                .sources
                .iter()
                .zip(&p.weights)
                .map(|(s, w)| (s.name.clone(), *w))
                .collect();
            phase(p.at_tokens, named)
        })
        .collect();
    if let Some(w) = weights {
        phases.push(phase(end_tokens, w.to_vec()));
    }
    if phases.is_empty() {
        data.remove("phases");
    } else {
        data.insert("phases".into(), toml::Value::Array(phases));
    }
    toml::to_string(&doc).map_err(|e| e.to_string())
}

/// A branch's recipe with a mixture's weights for it: the parent's
/// phases up to the branch point, then `weights` (none: the parent's
/// phases up to the branch's end, `end_tokens`).
pub fn branch_weights(
    spec_toml: &str,
    parent: &Recipe,
    (start_tokens, end_tokens): (u64, u64),
    weights: &[(String, f64)],
) -> Result<String, String> {
    if weights.is_empty() {
        with_phases(spec_toml, parent, end_tokens, None)
    } else {
        reweigh(spec_toml, parent, start_tokens, weights)
    }
}

/// A cooldown branch's decay: where it starts (the tokens its checkpoint
/// had seen), how long it lasts, its shape and final fraction (`None`
/// keeps the parent's).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BranchDecay {
    pub start_tokens: u64,
    pub tokens: u64,
    pub shape: Option<String>,
    pub final_lr_fraction: Option<f64>,
}

/// A branch's recipe: the parent's `spec_toml` with its decay starting at
/// `decay.start_tokens` and lasting `decay.tokens`, the run ending there,
/// named `name`; the parent's kept checkpoint steps (its branch points)
/// dropped. The result still has to pass validation.
pub fn branch(spec_toml: &str, decay: &BranchDecay, name: &str) -> Result<String, String> {
    let mut doc: toml::Table = spec_toml
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    let int = |x: u64| toml::Value::Integer(i64::try_from(x).unwrap_or(i64::MAX));
    fn table<'a>(doc: &'a mut toml::Table, key: &str) -> Result<&'a mut toml::Table, String> {
        doc.entry(key)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("[{key}] is not a table"))
    }
    let schedule = table(&mut doc, "schedule")?;
    schedule.insert("decay_start_tokens".into(), int(decay.start_tokens));
    schedule.insert("decay_tokens".into(), int(decay.tokens));
    if let Some(shape) = &decay.shape {
        schedule.insert("decay_shape".into(), toml::Value::String(shape.clone()));
    }
    if let Some(f) = decay.final_lr_fraction {
        schedule.insert("final_lr_fraction".into(), toml::Value::Float(f));
    }
    table(&mut doc, "data")?.insert(
        "total_tokens".into(),
        int(decay.start_tokens.saturating_add(decay.tokens)),
    );
    if let Some(toml::Value::Table(c)) = doc.get_mut("checkpoint") {
        c.remove("keep_steps");
    }
    doc.insert("name".into(), toml::Value::String(name.to_string()));
    toml::to_string(&doc).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = include_str!("../../examples/tiny-cpu.toml");

    fn recipe(edit: &[(&str, &str)]) -> Recipe {
        let mut text = BASE.to_string();
        for (from, to) in edit {
            assert!(text.contains(from), "{from}");
            text = text.replacen(from, to, 1);
        }
        Recipe::from_toml_str(&text, "t").unwrap()
    }

    #[test]
    fn relayout_changes_only_the_layout() {
        let text = relayout(BASE, Some(2), None, Some(1)).unwrap();
        let r = Recipe::from_toml_str(&text, "t").unwrap();
        let l = r.parallel.layout;
        assert_eq!((l.tp, l.pp, l.dp), (2, 1, 1));
        assert_eq!(resume_conflicts(&recipe(&[]), &r), []);
    }

    #[test]
    fn layout_length_and_schedule_may_change() {
        let saved = recipe(&[]);
        let now = recipe(&[
            ("dp = 2", "dp = 1"),
            ("total_tokens = \"2.4576M\"", "total_tokens = \"4.9152M\""),
            ("decay_tokens = 491520", "decay_tokens = 983040"),
            ("lr = 3e-3", "lr = 2e-3"),
        ]);
        assert_eq!(resume_conflicts(&saved, &now), []);
    }

    #[test]
    fn the_model_and_the_data_plan_may_not() {
        let saved = recipe(&[]);
        let now = recipe(&[
            ("d_ffn = 352", "d_ffn = 384"),
            ("vocab_size = 50257", "vocab_size = 50000"),
            ("seed = 1234", "seed = 1"),
            ("tokens_per_step = 8192", "tokens_per_step = 16384"),
            ("cycles = 8", "cycles = 4"),
        ]);
        let fields: Vec<String> = resume_conflicts(&saved, &now)
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(
            fields,
            [
                "model.d_ffn",
                "model.padded_vocab_size",
                "model.vocab_size",
                "seed",
                "data.cycles",
                "data.tokens_per_step"
            ]
        );
        let p = &resume_conflicts(&saved, &recipe(&[("d_ffn = 352", "d_ffn = 384")]))[0];
        assert!(
            p.message.contains("352") && p.message.contains("384"),
            "{p}"
        );
    }
}
