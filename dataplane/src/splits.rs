//! Which split (train, validation, test, …) each file of a folder holds,
//! decided as Hugging Face `datasets` decides it for a folder or a Hub
//! snapshot without a `configs` list (`datasets/data_files.py`), so that
//! a snapshot's held-out files are never decomposed into training data by
//! accident:
//!
//! 1. files named `data/{split}-NNNNN-of-NNNNN….…` (how the Hub shards a
//!    split) name their split, whatever its name;
//! 2. otherwise, a directory named by a split's keyword (`train/`,
//!    `data_test/`, `dev-2/`) puts the files under it in that split;
//! 3. otherwise, a file named by a keyword (`train.jsonl`,
//!    `c4-validation.00000-of-00008.json.gz`) is in that split;
//! 4. otherwise every file is in `train`.
//!
//! A keyword names a split where it starts the name or follows a
//! separator (`-`, `.`, `_`, space or a digit) and is followed by one (a
//! directory's name may also end with it). Keywords are case-sensitive,
//! as the library's globs are. When a rule applies, the files it puts in
//! no split are in none (`trainer.jsonl` beside `train.jsonl` and
//! `test.jsonl`), as in the library. A saved `DatasetDict`
//! (`dataset_dict.json`) names its splits, one folder each.

/// The splits the keyword rules know, in the library's order.
const KEYWORDS: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// What a folder's files hold: each split with its files (indices into
/// the paths given, in their order), and the files in no split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    pub splits: Vec<(String, Vec<usize>)>,
    pub unclaimed: Vec<usize>,
}

impl Splits {
    /// The files of `name`.
    pub fn files_of(&self, name: &str) -> Option<&[usize]> {
        self.splits
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| f.as_slice())
    }

    /// `train (3 files), test (1 file)`: for messages.
    pub fn describe(&self) -> String {
        self.splits
            .iter()
            .map(|(n, f)| {
                format!(
                    "{n} ({} file{})",
                    f.len(),
                    if f.len() == 1 { "" } else { "s" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn from_claims(n: usize, claims: Vec<(String, Vec<usize>)>) -> Splits {
        let mut claimed = vec![false; n];
        for (_, files) in &claims {
            for &i in files {
                claimed[i] = true;
            }
        }
        Splits {
            splits: claims,
            unclaimed: (0..n).filter(|&i| !claimed[i]).collect(),
        }
    }
}

fn is_sep(c: u8) -> bool {
    matches!(c, b'-' | b'.' | b'_' | b' ' | b'0'..=b'9')
}

/// Whether `name` holds `keyword` at its start or after a separator,
/// followed by a separator (or, with `or_end`, ending there).
fn names(name: &str, keyword: &str, or_end: bool) -> bool {
    let (b, k) = (name.as_bytes(), keyword.as_bytes());
    (0..b.len()).any(|i| {
        b[i..].starts_with(k)
            && (i == 0 || is_sep(b[i - 1]))
            && match b.get(i + k.len()) {
                Some(&c) => is_sep(c),
                None => or_end,
            }
    })
}

/// The split of a file named as the Hub shards one:
/// `data/{split}-NNNNN-of-NNNNN*.*`, the split a word or dotted words.
fn sharded_split(path: &str) -> Option<&str> {
    let name = path.strip_prefix("data/")?;
    if name.contains('/') {
        return None;
    }
    let b = name.as_bytes();
    let shard = |at: usize| {
        let d = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
        b.len() >= at + 15
            && b[at] == b'-'
            && d(at + 1..at + 6)
            && &b[at + 6..at + 10] == b"-of-"
            && d(at + 10..at + 15)
            && name[at + 15..].contains('.')
    };
    // The split is as long as it can be (the library's greedy match).
    let at = (1..name.len()).rev().find(|&at| shard(at))?;
    let split = &name[..at];
    let word = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)
    };
    split.split('.').all(word).then_some(split)
}

/// The splits of the files at `paths` (relative to the folder, with `/`
/// between components), by the rules above.
pub fn infer(paths: &[String]) -> Splits {
    let n = paths.len();
    let mut sharded: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        if let Some(s) = sharded_split(p) {
            match sharded.iter_mut().find(|(n, _)| n == s) {
                Some((_, files)) => files.push(i),
                None => sharded.push((s.to_string(), vec![i])),
            }
        }
    }
    if !sharded.is_empty() {
        let rank = |s: &str| KEYWORDS.iter().position(|(k, _)| *k == s);
        sharded.sort_by(|a, b| {
            (rank(&a.0).is_none(), rank(&a.0), &a.0).cmp(&(rank(&b.0).is_none(), rank(&b.0), &b.0))
        });
        return Splits::from_claims(n, sharded);
    }
    let by = |claims: &dyn Fn(&str, &str) -> bool| -> Vec<(String, Vec<usize>)> {
        KEYWORDS
            .iter()
            .filter_map(|(split, keywords)| {
                let files: Vec<usize> = (0..n)
                    .filter(|&i| keywords.iter().any(|k| claims(&paths[i], k)))
                    .collect();
                (!files.is_empty()).then(|| (split.to_string(), files))
            })
            .collect()
    };
    let dirs = by(&|path, k| {
        let mut parts: Vec<&str> = path.split('/').collect();
        parts.pop();
        parts.iter().any(|d| names(d, k, true))
    });
    if !dirs.is_empty() {
        return Splits::from_claims(n, dirs);
    }
    let files = by(&|path, k| names(path.rsplit('/').next().unwrap_or(path), k, false));
    if !files.is_empty() {
        return Splits::from_claims(n, files);
    }
    Splits::from_claims(n, vec![("train".into(), (0..n).collect())])
}

/// The splits of a saved `DatasetDict`: each split listed in its
/// `dataset_dict.json` holds the files under the folder of its name.
pub fn of_dict(paths: &[String], dict_json: &str, name: &str) -> Result<Splits, String> {
    let v: serde_json::Value =
        serde_json::from_str(dict_json).map_err(|e| format!("{name}: {e}"))?;
    let listed = v
        .get("splits")
        .and_then(|s| s.as_array())
        .ok_or_else(|| format!("{name}: no `splits` list"))?;
    let mut claims = Vec::new();
    for s in listed {
        let split = s
            .as_str()
            .filter(|s| !s.is_empty() && !s.contains('/') && !s.contains(".."))
            .ok_or_else(|| format!("{name}: a split that is not a plain name: {s}"))?;
        let under = format!("{split}/");
        let files: Vec<usize> = (0..paths.len())
            .filter(|&i| paths[i].starts_with(&under))
            .collect();
        claims.push((split.to_string(), files));
    }
    Ok(Splits::from_claims(paths.len(), claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn splits(paths: &[&str]) -> Vec<(String, Vec<String>)> {
        let owned: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        infer(&owned)
            .splits
            .into_iter()
            .map(|(n, f)| (n, f.into_iter().map(|i| owned[i].clone()).collect()))
            .collect()
    }

    fn one(split: &str, files: &[&str]) -> (String, Vec<String>) {
        (
            split.to_string(),
            files.iter().map(|f| f.to_string()).collect(),
        )
    }

    // Each case below is what `datasets` 5.2's get_data_patterns gives
    // for the same files (the CI test checks more against the library).
    #[test]
    fn splits_follow_the_hugging_face_rules() {
        assert_eq!(
            splits(&["train.jsonl", "test.jsonl", "other.jsonl"]),
            vec![one("train", &["train.jsonl"]), one("test", &["test.jsonl"])]
        );
        assert_eq!(
            splits(&["Train.jsonl", "TEST.jsonl"]),
            vec![one("train", &["Train.jsonl", "TEST.jsonl"])]
        );
        assert_eq!(
            splits(&[
                "data/train-00000-of-00002.parquet",
                "data/unsupervised-00000-of-00001.parquet",
                "README.md"
            ]),
            vec![
                one("train", &["data/train-00000-of-00002.parquet"]),
                one(
                    "unsupervised",
                    &["data/unsupervised-00000-of-00001.parquet"]
                )
            ]
        );
        assert_eq!(
            splits(&["a/train/x.txt", "a/dev/y.txt", "z.txt"]),
            vec![
                one("train", &["a/train/x.txt"]),
                one("validation", &["a/dev/y.txt"])
            ]
        );
        assert_eq!(
            splits(&[
                "en/c4-train.00000-of-01024.json.gz",
                "en/c4-validation.00000-of-00008.json.gz"
            ]),
            vec![
                one("train", &["en/c4-train.00000-of-01024.json.gz"]),
                one("validation", &["en/c4-validation.00000-of-00008.json.gz"])
            ]
        );
        assert_eq!(
            splits(&[
                "train2.jsonl",
                "trainer.jsonl",
                "x_val.jsonl",
                "interval.jsonl"
            ]),
            vec![
                one("train", &["train2.jsonl"]),
                one("validation", &["x_val.jsonl"])
            ]
        );
        assert_eq!(
            splits(&["1790_george_washington_n.txt", "moby.txt"]),
            vec![one("train", &["1790_george_washington_n.txt", "moby.txt"])]
        );
        assert_eq!(
            splits(&["test/a.txt", "data_test/b.txt", "train_x/c.txt"]),
            vec![
                one("train", &["train_x/c.txt"]),
                one("test", &["test/a.txt", "data_test/b.txt"])
            ]
        );
        assert_eq!(
            splits(&["evaluation.txt", "eval.txt", "testing.txt"]),
            vec![one("test", &["evaluation.txt", "eval.txt", "testing.txt"])]
        );
        // A directory's rule wins over a file's name.
        assert_eq!(
            splits(&["train/test.jsonl"]),
            vec![one("train", &["train/test.jsonl"])]
        );
    }

    #[test]
    fn a_dataset_dict_names_its_splits() {
        let paths: Vec<String> = ["train/data-00000-of-00001.arrow", "extra/x.arrow"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        let s = of_dict(&paths, r#"{"splits": ["train", "unsupervised"]}"#, "d").unwrap();
        assert_eq!(s.files_of("train"), Some(&[0][..]));
        assert_eq!(s.files_of("unsupervised"), Some(&[][..]));
        assert_eq!(s.unclaimed, vec![1]);
        assert!(of_dict(&paths, r#"{"splits": ["../x"]}"#, "d").is_err());
        assert!(of_dict(&paths, "{}", "d").unwrap_err().contains("splits"));
    }
}
