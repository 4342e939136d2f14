//! A sweep file: a base recipe and axes, expanded into the jobs of a
//! sweep. Every point's recipe is validated here, before any job exists,
//! and a problem names the point and the field.
//!
//! ```toml
//! name = "lr-size"
//! base = "tiny.toml"        # the CLI inlines it as a [recipe] table
//! max_concurrent = 2
//!
//! [sizes]                    # [model] fields over the base's
//! s = { n_layers = 2, d_model = 32, n_heads = 2, d_ffn = 96 }
//!
//! [grid]                     # every combination is a job
//! size = ["s", "4x256"]      # a [sizes] name, or LAYERSxD_MODEL
//! lr = [1e-3, 3e-3]          # optimizer.lr; any dotted recipe path works
//!
//! [branches]                 # optional: each grid point is a stable run…
//! fractions = [0.25, 0.5, 1] # …with cooldowns ending at these shares of its tokens
//! cooldown = 0.2             # each cooldown's share of its own tokens
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use strata_recipe::resume::{BranchDecay, branch};
use strata_recipe::{Problem, Recipe};

/// Why a sweep file was refused: every problem found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct SweepError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for SweepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "invalid sweep: {one}"),
            many => {
                write!(f, "invalid sweep ({} problems):", many.len())?;
                for p in many {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepSpec {
    name: String,
    /// The base recipe's file, relative to the sweep file; read by the
    /// client, which sends it inlined as `recipe`.
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    recipe: Option<toml::Table>,
    #[serde(default = "one")]
    max_concurrent: i64,
    #[serde(default)]
    sizes: BTreeMap<String, toml::Table>,
    #[serde(default)]
    grid: BTreeMap<String, Vec<toml::Value>>,
    #[serde(default)]
    branches: Option<BranchesSpec>,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchesSpec {
    fractions: Vec<f64>,
    #[serde(default = "default_cooldown")]
    cooldown: f64,
    #[serde(default)]
    decay_shape: Option<String>,
    #[serde(default)]
    final_lr_fraction: Option<f64>,
}

fn default_cooldown() -> f64 {
    0.2
}

/// Most points one sweep may have.
pub const MAX_POINTS: usize = 10_000;

/// What a point runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PointKind {
    /// A job of its own (a grid point).
    Run,
    /// A branch sweep's stable run: it keeps the branch points'
    /// checkpoints and runs its own cooldown at the end (fraction 1).
    Stable,
    /// A cooldown branch of point `stable`'s job from its checkpoint of
    /// `from_step`.
    Branch {
        stable: usize,
        from_step: u64,
        decay: BranchDecay,
    },
}

/// One job of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The axes' values, `axis=value` joined by spaces.
    pub label: String,
    pub coords: Vec<(String, String)>,
    /// The job's name.
    pub name: String,
    pub kind: PointKind,
    /// The token budget as a share of the stable run's (branch sweeps).
    pub fraction: Option<f64>,
    /// The recipe the job runs (a branch's is what branching gives).
    pub recipe: String,
}

/// A sweep file expanded: its points in order, each validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub max_concurrent: u32,
    pub points: Vec<Point>,
}

/// An axis value: its label, and the recipe edits (path, value) it makes.
type AxisValue = (String, Vec<(String, toml::Value)>);

/// Short names for the axes people sweep most.
const ALIASES: [(&str, &str); 5] = [
    ("lr", "optimizer.lr"),
    ("total_tokens", "data.total_tokens"),
    ("batch_tokens", "data.tokens_per_step"),
    ("schedule", "schedule"),
    ("seed", "seed"),
];

/// `base` from a sweep file's text: the base recipe's path, if it names
/// one (the client reads it and calls [`inline_base`]).
pub fn base_path(text: &str) -> Result<Option<String>, SweepError> {
    let spec = parse(text)?;
    Ok(spec.base)
}

/// The sweep file with the base recipe's text inlined as its `[recipe]`
/// table (what the coordinator stores: self-contained).
pub fn inline_base(text: &str, base_toml: &str, base_name: &str) -> Result<String, SweepError> {
    let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| SweepError {
        problems: vec![problem("sweep", e.message().to_string())],
    })?;
    let recipe: toml::Table = base_toml.parse().map_err(|e: toml::de::Error| SweepError {
        problems: vec![problem(
            format!("base ({base_name})"),
            e.message().to_string(),
        )],
    })?;
    doc.remove("base");
    doc.insert("recipe".into(), toml::Value::Table(recipe));
    toml::to_string(&doc).map_err(|e| SweepError {
        problems: vec![problem("sweep", e.to_string())],
    })
}

fn parse(text: &str) -> Result<SweepSpec, SweepError> {
    toml::from_str(text).map_err(|e: toml::de::Error| SweepError {
        problems: vec![problem("sweep", e.message().to_string())],
    })
}

/// A value as a label shows it.
fn show(v: &toml::Value, index: usize) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Table(t) => match t.get("kind") {
            Some(toml::Value::String(k)) => k.clone(),
            _ => format!("#{}", index + 1),
        },
        other => other.to_string(),
    }
}

/// Model dimensions from `LAYERSxD_MODEL` (heads of 64, SwiGLU width
/// ≈ 8/3·d rounded up to 64).
fn shorthand(name: &str) -> Option<toml::Table> {
    let (l, d) = name.split_once('x')?;
    let (l, d): (i64, i64) = (l.parse().ok()?, d.parse().ok()?);
    if l < 1 || d < 64 || d % 64 != 0 {
        return None;
    }
    let mut t = toml::Table::new();
    t.insert("n_layers".into(), toml::Value::Integer(l));
    t.insert("d_model".into(), toml::Value::Integer(d));
    t.insert("n_heads".into(), toml::Value::Integer(d / 64));
    t.insert("n_kv_heads".into(), toml::Value::Integer(d / 64));
    t.insert(
        "d_ffn".into(),
        toml::Value::Integer((8 * d / 3 + 63) / 64 * 64),
    );
    Some(t)
}

/// Sets `path` (dotted) in `doc` to `value`.
fn set_path(doc: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("split yields one part");
    let mut at = doc;
    for (i, p) in parts.iter().enumerate() {
        at = at
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("{} is not a table", parts[..=i].join(".")))?;
    }
    at.insert(last.to_string(), value);
    Ok(())
}

/// Expands a self-contained sweep file (its base recipe inlined) into
/// its points, validating every one.
pub fn expand(text: &str) -> Result<Plan, SweepError> {
    let spec = parse(text)?;
    let mut problems = Vec::new();
    macro_rules! fail {
        ($field:expr, $m:expr $(,)?) => {{
            let m: String = $m;
            problems.push(problem($field, m))
        }};
    }
    if spec.name.trim().is_empty() {
        fail!("name", "must not be empty".into());
    }
    let max_concurrent = match u32::try_from(spec.max_concurrent) {
        Ok(n) if n >= 1 => n,
        _ => {
            fail!(
                "max_concurrent",
                format!("must be 1 or more, got {}", spec.max_concurrent),
            );
            1
        }
    };
    let Some(base) = spec.recipe.clone() else {
        let why = match &spec.base {
            Some(b) => format!(
                "the base recipe {b} was not inlined (submit the sweep with `strata sweep`)"
            ),
            None => {
                "the sweep has no base recipe: give `base = \"RECIPE.toml\"` or a [recipe] table"
                    .into()
            }
        };
        fail!("base", why);
        return Err(SweepError { problems });
    };
    // The axes, `size` first, then by name; each value resolved to a
    // (path, value) edit.
    let mut axes: Vec<(String, Vec<AxisValue>)> = Vec::new();
    let mut names: Vec<&String> = spec.grid.keys().collect();
    names.sort_by_key(|n| (n.as_str() != "size", n.as_str()));
    for axis in names {
        let values = &spec.grid[axis];
        let field = format!("grid.{axis}");
        if values.is_empty() {
            fail!(&field, "has no values".into());
            continue;
        }
        let mut resolved = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let edits = if axis == "size" {
                let dims = match v {
                    toml::Value::String(s) => {
                        match spec.sizes.get(s).cloned().or_else(|| shorthand(s)) {
                            Some(t) => t,
                            None => {
                                let known: Vec<&str> =
                                    spec.sizes.keys().map(|k| k.as_str()).collect();
                                fail!(
                                    &at,
                                    format!(
                                        "{s:?} is neither a [sizes] name ({}) nor LAYERSxD_MODEL with D_MODEL a multiple of 64 (e.g. \"4x256\")",
                                        if known.is_empty() {
                                            "none".into()
                                        } else {
                                            known.join(", ")
                                        }
                                    ),
                                );
                                continue;
                            }
                        }
                    }
                    toml::Value::Table(t) => t.clone(),
                    other => {
                        fail!(
                            &at,
                            format!("a size is a name or a table of [model] fields, got {other}")
                        );
                        continue;
                    }
                };
                dims.into_iter()
                    .map(|(k, v)| (format!("model.{k}"), v))
                    .collect()
            } else {
                let path = ALIASES
                    .iter()
                    .find(|(a, _)| a == axis)
                    .map_or(axis.as_str(), |(_, p)| p);
                let path = match (path, v) {
                    ("schedule", toml::Value::String(_)) => "schedule.kind",
                    ("schedule", toml::Value::Table(_)) => "schedule",
                    ("schedule", other) => {
                        fail!(
                            &at,
                            format!("a schedule is a kind or a [schedule] table, got {other}")
                        );
                        continue;
                    }
                    (p, _) => p,
                };
                vec![(path.to_string(), v.clone())]
            };
            resolved.push((show(v, i), edits));
        }
        axes.push((axis.clone(), resolved));
    }
    let count = axes
        .iter()
        .try_fold(1usize, |n, (_, v)| n.checked_mul(v.len().max(1)));
    let fractions = spec
        .branches
        .as_ref()
        .map_or(1, |b| b.fractions.len().max(1));
    if count
        .and_then(|n| n.checked_mul(fractions))
        .is_none_or(|n| n > MAX_POINTS)
    {
        fail!(
            "grid",
            format!("the axes give more than {MAX_POINTS} points; split the sweep"),
        );
    }
    if !problems.is_empty() {
        return Err(SweepError { problems });
    }

    // The grid's combinations, the last axis fastest.
    let mut combos: Vec<Vec<usize>> = vec![Vec::new()];
    for (_, values) in &axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                (0..values.len()).map(move |i| {
                    let mut c = c.clone();
                    c.push(i);
                    c
                })
            })
            .collect();
    }
    let mut points = Vec::new();
    for (number, combo) in combos.into_iter().enumerate() {
        let coords: Vec<(String, String)> = combo
            .iter()
            .zip(&axes)
            .map(|(&i, (axis, values))| (axis.clone(), values[i].0.clone()))
            .collect();
        let label = label_of(&coords);
        let mut doc = base.clone();
        let mut ok = true;
        for (&i, (axis, values)) in combo.iter().zip(&axes) {
            for (path, v) in &values[i].1 {
                if let Err(e) = set_path(&mut doc, path, v.clone()) {
                    fail!(&format!("grid.{axis}"), format!("{path}: {e}"));
                    ok = false;
                }
            }
        }
        let mut name = spec.name.clone();
        for (_, v) in &coords {
            name.push('-');
            name.push_str(v);
        }
        doc.insert("name".into(), toml::Value::String(name.clone()));
        if !ok {
            continue;
        }
        let at = |field: &str| {
            if label.is_empty() {
                field.to_string()
            } else {
                format!("point {} ({label}): {field}", number + 1)
            }
        };
        let text = toml::to_string(&doc).expect("a TOML table serialises");
        let recipe = match Recipe::from_toml_str(&text, &name) {
            Ok(r) => r,
            Err(e) => {
                problems.extend(
                    e.problems
                        .into_iter()
                        .map(|p| problem(at(&p.field), p.message)),
                );
                continue;
            }
        };
        match &spec.branches {
            None => points.push(Point {
                label,
                coords,
                name,
                kind: PointKind::Run,
                fraction: None,
                recipe: text,
            }),
            Some(b) => match branch_points(b, &doc, &recipe, &name, &coords, points.len()) {
                Ok(mut more) => points.append(&mut more),
                Err(ps) => {
                    problems.extend(ps.into_iter().map(|p| problem(at(&p.field), p.message)))
                }
            },
        }
    }
    if !problems.is_empty() {
        return Err(SweepError { problems });
    }
    Ok(Plan {
        name: spec.name,
        max_concurrent,
        points,
    })
}

fn label_of(coords: &[(String, String)]) -> String {
    coords
        .iter()
        .map(|(a, v)| format!("{a}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A grid point made a stable run (its own cooldown at the end, the
/// branch points' checkpoints kept) and its branches, the stable run at
/// index `first`.
fn branch_points(
    b: &BranchesSpec,
    doc: &toml::Table,
    recipe: &Recipe,
    name: &str,
    coords: &[(String, String)],
    first: usize,
) -> Result<Vec<Point>, Vec<Problem>> {
    let mut problems = Vec::new();
    if !(b.cooldown > 0.0 && b.cooldown < 1.0) {
        problems.push(problem(
            "branches.cooldown",
            format!("must be in (0, 1), got {}", b.cooldown),
        ));
    }
    if b.fractions.is_empty() {
        problems.push(problem("branches.fractions", "has no values"));
    }
    if recipe.schedule.decay().is_none() {
        problems.push(problem(
            "schedule.kind",
            format!(
                "{}: a branch sweep decays the stable phase of a wsd or power run",
                recipe.schedule.name()
            ),
        ));
    }
    if recipe.checkpoint.is_none() {
        problems.push(problem(
            "checkpoint",
            "a branch sweep needs the base recipe's [checkpoint] (its dir holds the branch points)",
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let tps = recipe.data.tokens_per_step;
    let n_steps = recipe.data.n_steps();
    let warmup_steps = recipe.schedule.warmup_tokens.div_ceil(tps);
    let cooldown_steps = |steps: f64| ((b.cooldown * steps).round() as u64).max(1);
    let stable_decay = cooldown_steps(n_steps as f64);
    let decay_start = n_steps.saturating_sub(stable_decay);
    // Each branch: its checkpoint step and its decay's steps.
    let mut branches: Vec<(usize, f64, u64, u64)> = Vec::new();
    for (i, &f) in b.fractions.iter().enumerate() {
        if f == 1.0 {
            continue;
        }
        let steps = f * n_steps as f64;
        let decay = cooldown_steps(steps);
        let from = (steps.round() as u64).saturating_sub(decay);
        let field = format!("branches.fractions[{i}]");
        if !(f > 0.0 && f < 1.0) {
            problems.push(problem(field, format!("must be in (0, 1], got {f}")));
        } else if from < warmup_steps.max(1) {
            problems.push(problem(
                field,
                format!(
                    "{f} of {n_steps} steps branches at step {from}, inside the warmup ({warmup_steps} steps): give a larger fraction or a longer run"
                ),
            ));
        } else if from >= decay_start {
            problems.push(problem(
                field,
                format!(
                    "{f} of {n_steps} steps branches at step {from}, past the stable run's own decay start (step {decay_start}): use 1 for the stable run's cooldown"
                ),
            ));
        } else if let Some(j) = branches.iter().position(|x| x.2 == from) {
            problems.push(problem(
                field,
                format!(
                    "branches at step {from} like fractions[{}]: the run is too short to tell them apart",
                    branches[j].0
                ),
            ));
        } else {
            branches.push((i, f, from, decay));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    branches.sort_by_key(|x| x.2);

    // The stable run: its own cooldown over the last share of its steps,
    // the branch points kept.
    let mut stable = doc.clone();
    let int = |x: u64| toml::Value::Integer(i64::try_from(x).unwrap_or(i64::MAX));
    let edit = |doc: &mut toml::Table, path: &str, v: toml::Value| {
        set_path(doc, path, v).map_err(|e| vec![problem(path, e)])
    };
    edit(
        &mut stable,
        "schedule.decay_tokens",
        int(stable_decay * tps),
    )?;
    if let Some(toml::Value::Table(s)) = stable.get_mut("schedule") {
        s.remove("decay_start_tokens");
    }
    if let Some(shape) = &b.decay_shape {
        edit(
            &mut stable,
            "schedule.decay_shape",
            toml::Value::String(shape.clone()),
        )?;
    }
    if let Some(f) = b.final_lr_fraction {
        edit(
            &mut stable,
            "schedule.final_lr_fraction",
            toml::Value::Float(f),
        )?;
    }
    let mut keep: Vec<u64> = branches.iter().map(|x| x.2).collect();
    if let Some(ck) = &recipe.checkpoint {
        keep.extend(&ck.keep_steps);
    }
    keep.sort_unstable();
    keep.dedup();
    edit(
        &mut stable,
        "checkpoint.keep_steps",
        toml::Value::Array(keep.into_iter().map(int).collect()),
    )?;
    let text = toml::to_string(&stable).expect("a TOML table serialises");
    if let Err(e) = Recipe::from_toml_str(&text, name) {
        return Err(e.problems);
    }
    let mut coords_f = coords.to_vec();
    coords_f.push(("fraction".into(), "1".into()));
    let mut out = vec![Point {
        label: label_of(&coords_f),
        coords: coords_f,
        name: name.to_string(),
        kind: PointKind::Stable,
        fraction: Some(1.0),
        recipe: text.clone(),
    }];
    for (_, f, from, decay) in branches {
        let mut coords_f = coords.to_vec();
        coords_f.push(("fraction".into(), f.to_string()));
        let decay = BranchDecay {
            start_tokens: from * tps,
            tokens: decay * tps,
            shape: b.decay_shape.clone(),
            final_lr_fraction: b.final_lr_fraction,
        };
        let bname = format!("{name}-f{f}");
        let btext = branch(&text, &decay, &bname).map_err(|e| vec![problem("branch", e)])?;
        if let Err(e) = Recipe::from_toml_str(&btext, &bname) {
            let at = format!("fraction={f}");
            return Err(e
                .problems
                .into_iter()
                .map(|p| problem(format!("{at}: {}", p.field), p.message))
                .collect());
        }
        out.push(Point {
            label: label_of(&coords_f),
            coords: coords_f,
            name: bname,
            kind: PointKind::Branch {
                stable: first,
                from_step: from,
                decay,
            },
            fraction: Some(f),
            recipe: btext,
        });
    }
    Ok(out)
}
