//! Command-line overrides of a recipe's fields: `--set optimizer.lr=1e-3
//! --set parallel.tp=2` (as Megatron, NeMo and Levanter take `key=value`).
//!
//! An [`Override`] is a dotted path (a segment may index an array:
//! `data.sources[1].weight`) and a TOML value (`1e-3`, `2`, `true`,
//! `"text"`, `[1, 2]`, `{ kind = "wsd" }`; anything that is not TOML is a
//! string, so `--set name=my-run` needs no quotes). [`apply`] writes the
//! overrides into the recipe's table, creating the tables on the way, and
//! the result is parsed and validated exactly as a file is: an unknown
//! field or a value of the wrong type is refused like one in the file, and
//! [`explain`] names the override at fault with the nearest valid key.

use std::fmt;
use std::str::FromStr;

use crate::{Problem, RecipeError};

/// One step of an override's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `PATH=VALUE`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The path as written (`data.sources[1].weight`).
    pub path: String,
    segments: Vec<Segment>,
    pub value: toml::Value,
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.path, self.value)
    }
}

impl FromStr for Override {
    type Err = String;

    fn from_str(s: &str) -> Result<Override, String> {
        let (path, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected KEY=VALUE, such as optimizer.lr=1e-3"))?;
        let path = path.trim();
        let mut segments = Vec::new();
        for part in path.split('.') {
            let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
            let plain = |k: &str| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            };
            if !plain(key) {
                return Err(format!(
                    "{path:?}: `{part}` is not a key (letters, digits, `_` and `-`, \
                     optionally indexed as `key[0]`)"
                ));
            }
            segments.push(Segment::Key(key.to_string()));
            while !rest.is_empty() {
                let (index, after) = rest
                    .split_once(']')
                    .ok_or_else(|| format!("{path:?}: an index without `]`"))?;
                let index = index
                    .parse::<usize>()
                    .map_err(|_| format!("{path:?}: `[{index}]` is not an index"))?;
                segments.push(Segment::Index(index));
                rest = after.strip_prefix('[').unwrap_or(after);
                if !after.is_empty() && !after.starts_with('[') {
                    return Err(format!("{path:?}: `{after}` after an index"));
                }
            }
        }
        let value = value.trim();
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        Ok(Override {
            path: path.to_string(),
            segments,
            value,
        })
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Writes `sets` into `table`, in order (a later one wins), creating the
/// tables a path goes through. A path through a value that is not a
/// table, or an index past an array's end, is refused naming it.
pub fn apply(table: &mut toml::Table, sets: &[Override]) -> Result<(), RecipeError> {
    let mut problems = Vec::new();
    for set in sets {
        if let Err(message) = apply_one(table, set) {
            problems.push(Problem {
                field: set.path.clone(),
                message: format!("{message} (from --set {set})"),
            });
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RecipeError { problems })
    }
}

fn apply_one(table: &mut toml::Table, set: &Override) -> Result<(), String> {
    let mut root = toml::Value::Table(std::mem::take(table));
    let written = write(&mut root, &set.segments, &set.value, String::new());
    let toml::Value::Table(t) = root else {
        unreachable!("the root stays a table")
    };
    *table = t;
    written
}

/// Writes `value` at `path` under `at` (`walked`: the path so far).
fn write(
    at: &mut toml::Value,
    path: &[Segment],
    value: &toml::Value,
    walked: String,
) -> Result<(), String> {
    let Some((seg, rest)) = path.split_first() else {
        *at = value.clone();
        return Ok(());
    };
    let here = if walked.is_empty() {
        "the recipe"
    } else {
        &walked
    };
    let next = match (at, seg) {
        (toml::Value::Table(t), Segment::Key(k)) => t
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new())),
        (toml::Value::Array(a), Segment::Index(i)) => {
            let n = a.len();
            a.get_mut(*i).ok_or_else(|| {
                let entries = if n == 1 { "entry" } else { "entries" };
                format!("{here} has {n} {entries}: [{i}] is past its end")
            })?
        }
        (v, Segment::Key(k)) => {
            return Err(format!(
                "{here} is {}, not a table: it has no key `{k}`",
                type_name(v)
            ));
        }
        (v, Segment::Index(i)) => {
            return Err(format!(
                "{here} is {}, not an array: [{i}] cannot index it",
                type_name(v)
            ));
        }
    };
    let walked = match seg {
        Segment::Key(k) if walked.is_empty() => k.clone(),
        Segment::Key(k) => format!("{walked}.{k}"),
        Segment::Index(i) => format!("{walked}[{i}]"),
    };
    write(next, rest, value, walked)
}

/// `text` (a recipe's TOML) with `sets` written into it, as TOML again,
/// headed by a comment that lists them. Without overrides, `text` as it
/// is.
pub fn apply_to_text(text: &str, sets: &[Override]) -> Result<String, RecipeError> {
    if sets.is_empty() {
        return Ok(text.to_string());
    }
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| RecipeError {
        problems: vec![Problem {
            field: String::new(),
            message: e.message().trim().to_string(),
        }],
    })?;
    apply(&mut table, sets)?;
    Ok(format!(
        "{}{}",
        header(sets),
        toml::to_string(&table).expect("a TOML table serializes")
    ))
}

/// The comment line that heads a text `sets` were written into.
pub fn header(sets: &[Override]) -> String {
    let mut out = String::from("# With overrides:");
    for s in sets {
        out.push_str(&format!(" --set {s}"));
    }
    out.push('\n');
    out
}

/// The problems `sets` cause in `text` (a recipe they were written into,
/// perhaps one a sweep completes later): an unknown key or a value of the
/// wrong type, each naming its override. Problems of the rest are left to
/// whoever completes the recipe.
pub fn check_structure(text: &str, sets: &[Override]) -> Result<(), RecipeError> {
    let Err(e) = crate::RecipeSpec::from_toml_str(text) else {
        return Ok(());
    };
    let mut e = explain(e, sets);
    e.problems
        .retain(|p| sets.iter().any(|s| caused(s, &p.field)));
    if e.problems.is_empty() {
        Ok(())
    } else {
        Err(e)
    }
}

/// `err`, found in a recipe `sets` were written into, with each problem
/// that an override caused naming it, and an unknown key the valid key
/// nearest to it (`optimizer.lrr` → `optimizer.lr`).
pub fn explain(mut err: RecipeError, sets: &[Override]) -> RecipeError {
    for p in &mut err.problems {
        let Some(set) = sets
            .iter()
            .rev()
            .find(|s| caused(s, &p.field))
            .or_else(|| sets.iter().rev().find(|s| mentions(&p.message, &s.path)))
        else {
            continue;
        };
        if let Some(near) = nearest_key(&p.message) {
            let (unknown, better) = near;
            let path = replace_segment(&set.path, &unknown, &better);
            p.message = format!("{} — did you mean `{path}`?", p.message);
        }
        p.message = format!("{} (from --set {set})", p.message);
    }
    err
}

/// Whether a problem at `field` comes from `set`: the same path, a key
/// inside what it set, or a table on its way.
fn caused(set: &Override, field: &str) -> bool {
    let (a, b) = (set.path.as_str(), field);
    let under = |long: &str, short: &str| {
        long.strip_prefix(short)
            .is_some_and(|r| r.starts_with('.') || r.starts_with('['))
    };
    a == b || under(a, b) || under(b, a)
}

/// Whether `message` names the field at `path` (as a whole dotted name:
/// `parallel.dp` in "… = 256·3·1 because parallel.dp …", not in
/// `parallel.dpx`).
fn mentions(message: &str, path: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    message.match_indices(path).any(|(at, _)| {
        !message[..at].ends_with(part) && !message[at + path.len()..].starts_with(part)
    })
}

/// From serde's "unknown field `x`, expected one of `a`, `b`" (or "`a` or
/// `b`"): the unknown name and the expected one nearest to it.
fn nearest_key(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected")?.1;
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(unknown, c), *c))
        .min()?;
    // Only a near miss is a suggestion (a third of the name, at least 2).
    (best.0 <= (unknown.len() / 3).max(2)).then(|| (unknown.to_string(), best.1.to_string()))
}

/// `path` with its segment `from` as `to`.
fn replace_segment(path: &str, from: &str, to: &str) -> String {
    path.split('.')
        .map(|part| {
            let (key, index) = part
                .split_once('[')
                .map_or((part, None), |(k, r)| (k, Some(r)));
            let key = if key == from { to } else { key };
            match index {
                Some(r) => format!("{key}[{r}"),
                None => key.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> Override {
        s.parse().unwrap()
    }

    #[test]
    fn values_are_toml_or_else_strings() {
        assert_eq!(set("optimizer.lr=1e-3").value, toml::Value::Float(1e-3));
        assert_eq!(set("parallel.tp = 2").value, toml::Value::Integer(2));
        assert_eq!(set("a=true").value, toml::Value::Boolean(true));
        assert_eq!(
            set("name=my-run").value,
            toml::Value::String("my-run".into())
        );
        assert_eq!(set("name=\"x y\"").value, toml::Value::String("x y".into()));
        assert_eq!(set("x=").value, toml::Value::String(String::new()));
        assert!(matches!(set("a.b=[1, 2]").value, toml::Value::Array(_)));
        assert!(matches!(
            set("a={ kind = \"wsd\" }").value,
            toml::Value::Table(_)
        ));
        // The first `=` splits: the value may hold more.
        assert_eq!(set("name=a=b").value, toml::Value::String("a=b".into()));
        for bad in ["lr", "=3", "a..b=1", "a[x]=1", "a[1=2", "a b=1", "a[0]x=1"] {
            assert!(bad.parse::<Override>().is_err(), "{bad}");
        }
    }

    #[test]
    fn overrides_write_through_tables_and_arrays() {
        let mut t: toml::Table = "[optimizer]\nlr = 1.0\n[[data.sources]]\nname = \"a\"\n\
                                  [[data.sources]]\nname = \"b\"\nweight = 0.5\n"
            .parse()
            .unwrap();
        apply(
            &mut t,
            &[
                set("optimizer.lr=2e-3"),
                set("parallel.tp=2"),
                set("data.sources[1].weight=0.25"),
                set("name=run"),
            ],
        )
        .unwrap();
        assert_eq!(t["optimizer"]["lr"], toml::Value::Float(2e-3));
        assert_eq!(t["parallel"]["tp"], toml::Value::Integer(2));
        assert_eq!(t["data"]["sources"][1]["weight"], toml::Value::Float(0.25));
        assert_eq!(t["name"], toml::Value::String("run".into()));
        let e = apply(&mut t, &[set("data.sources[2].weight=1"), set("name.x=1")]).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(
            e.problems[0].message.contains("data.sources has 2 entries"),
            "{e}"
        );
        assert!(
            e.problems[1]
                .message
                .contains("name is a string, not a table"),
            "{e}"
        );
        assert!(
            e.problems[1].message.contains("(from --set name.x=1)"),
            "{e}"
        );
    }

    const RECIPE: &str = include_str!("../../examples/tiny-cpu.toml");

    #[test]
    fn a_recipe_with_overrides_is_checked_like_the_file() {
        let sets = [
            set("optimizer.lr=1e-3"),
            set("parallel.tp=2"),
            set("parallel.dp=1"),
        ];
        let (r, text) = crate::Recipe::from_toml_with(RECIPE, "x", &sets).unwrap();
        assert!(matches!(
            r.schedule.kind,
            crate::ScheduleKind::Wsd { peak_lr, .. } if peak_lr == 1e-3
        ));
        assert_eq!((r.parallel.layout.tp, r.parallel.layout.dp), (2, 1));
        assert!(
            text.starts_with("# With overrides: --set optimizer.lr=0.001"),
            "{text}"
        );
        // The text submitted parses to the same recipe.
        assert_eq!(crate::Recipe::from_toml_str(&text, "x").unwrap(), r);

        let refused = |s: &str| {
            crate::Recipe::from_toml_with(RECIPE, "x", &[set(s)])
                .unwrap_err()
                .to_string()
        };
        let e = refused("optimizer.lrr=1e-3");
        assert!(
            e.contains("optimizer.lrr") && e.contains("did you mean `optimizer.lr`?"),
            "{e}"
        );
        let e = refused("paralel.tp=2");
        assert!(e.contains("did you mean `parallel.tp`?"), "{e}");
        // Typed like the file: a string where a number goes.
        let e = refused("parallel.tp=two");
        assert!(
            e.contains("parallel.tp") && e.contains("(from --set parallel.tp=\"two\")"),
            "{e}"
        );
        // Validated like the file: a layout that does not divide.
        let e = refused("parallel.tp=3");
        assert!(e.contains("(from --set parallel.tp=3)"), "{e}");
        // Without overrides the text is the file's, comments and all.
        let (_, same) = crate::Recipe::from_toml_with(RECIPE, "x", &[]).unwrap();
        assert_eq!(same, RECIPE);
    }

    #[test]
    fn an_unknown_key_is_named_with_the_nearest() {
        let m = "unknown field `lrr`, expected one of `lr`, `weight_decay`, `beta1`";
        assert_eq!(nearest_key(m), Some(("lrr".into(), "lr".into())));
        let m = "unknown field `paralel`, expected `parallel` or `model`";
        assert_eq!(nearest_key(m), Some(("paralel".into(), "parallel".into())));
        let m = "unknown field `zzz`, expected one of `lr`, `beta1`";
        assert_eq!(nearest_key(m), None, "nothing near");
        assert!(mentions(
            "by model.max_seq_len·parallel.dp·x",
            "parallel.dp"
        ));
        assert!(!mentions("by parallel.dpx", "parallel.dp"));
        assert!(!mentions("by xparallel.dp.y", "parallel.dp"));
        let err = RecipeError {
            problems: vec![Problem {
                field: "paralel".into(),
                message: "unknown field `paralel`, expected `parallel` or `model`".into(),
            }],
        };
        let e = explain(err, &[set("paralel.tp=2")]);
        assert!(
            e.problems[0]
                .message
                .ends_with("did you mean `parallel.tp`? (from --set paralel.tp=2)"),
            "{e}"
        );
    }
}
