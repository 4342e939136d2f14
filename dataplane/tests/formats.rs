//! One corpus written in every format corpora ship in — JSON lines plain,
//! gzip and zstd, Parquet (snappy and zstd pages, several row groups, other
//! columns beside the text), a Hugging Face `datasets` folder
//! (`save_to_disk`'s Arrow IPC streams and `state.json`), an Arrow IPC file
//! and a Hub snapshot (Parquet shards under `data/` with a README) — gives
//! byte-identical datasets; inputs strata cannot read are refused by name
//! before anything is written.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use strata_dataplane::corpus::{Corpus, CorpusError, CorpusOptions, Quiet};
use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::manifest::{Layout, TokenizerInfo};
use strata_dataplane::store::Location;
use strata_dataplane::tokenize::TokenizerKind;
use strata_dataplane::writer::{DatasetWriter, WriterOptions};

/// Documents of many lengths, with newlines, quotes and non-ASCII text
/// (which JSON escapes and Arrow stores as they are), one of them blank.
fn documents() -> Vec<String> {
    let words = [
        "whale",
        "sea",
        "Ishmael",
        "\"harpoon\"",
        "naïve",
        "état",
        "—",
        "line\nbreak",
        "tab\t",
        "ship",
        "白鯨",
        "captain",
    ];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..600)
        .map(|i| {
            if i == 17 {
                return "   ".to_string();
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = 1 + (x % 700) as usize;
            (0..n)
                .map(|k| words[(x as usize + k * 7) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn jsonl(docs: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let line = serde_json::json!({ "id": i, "text": d, "meta": { "source": "test" } });
        writeln!(out, "{line}").unwrap();
    }
    out
}

fn batch(docs: &[String], first: usize) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("text", DataType::Utf8, true),
    ]));
    let ids = Int64Array::from_iter_values((first..first + docs.len()).map(|i| i as i64));
    let text = StringArray::from_iter_values(docs.iter());
    RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(text)]).unwrap()
}

fn parquet(path: &Path, docs: &[String], first: usize, compression: Compression) {
    let props = WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_row_count(Some(97))
        .build();
    let b = batch(docs, first);
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        b.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
}

/// Arrow IPC in `save_to_disk`'s form: a stream of 100-row batches.
fn arrow_stream(path: &Path, docs: &[String], first: usize) {
    let b = batch(docs, first);
    let file = std::fs::File::create(path).unwrap();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(file, &b.schema()).unwrap();
    for start in (0..docs.len()).step_by(100) {
        let n = 100.min(docs.len() - start);
        w.write(&b.slice(start, n)).unwrap();
    }
    w.finish().unwrap();
}

/// The corpus in every format, each a folder (or file) to decompose.
fn write_all(root: &Path, docs: &[String]) -> Vec<(&'static str, PathBuf)> {
    let half = docs.len() / 2;
    let (a, b) = docs.split_at(half);
    let mut inputs = Vec::new();
    let mut add = |name: &'static str| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        inputs.push((name, dir.clone()));
        dir
    };
    let dir = add("jsonl");
    std::fs::write(dir.join("part-0.jsonl"), jsonl(a)).unwrap();
    std::fs::write(dir.join("part-1.jsonl"), jsonl(b)).unwrap();

    let dir = add("jsonl.gz");
    for (i, part) in [a, b].iter().enumerate() {
        let f = std::fs::File::create(dir.join(format!("c4-{i:05}.json.gz"))).unwrap();
        let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        enc.write_all(&jsonl(part)).unwrap();
        enc.finish().unwrap();
    }

    let dir = add("jsonl.zst");
    for (i, part) in [a, b].iter().enumerate() {
        let z = zstd::stream::encode_all(&jsonl(part)[..], 3).unwrap();
        std::fs::write(dir.join(format!("shard_{i}.jsonl.zst")), z).unwrap();
    }
    std::fs::write(dir.join("README.md"), "# Shards of a corpus\n").unwrap();

    let dir = add("parquet");
    parquet(&dir.join("0.parquet"), a, 0, Compression::SNAPPY);
    parquet(
        &dir.join("1.parquet"),
        b,
        half,
        Compression::ZSTD(ZstdLevel::default()),
    );

    let dir = add("datasets");
    // Listed in state.json's order, which is not the names' order.
    arrow_stream(&dir.join("data-00001-of-00002.arrow"), a, 0);
    arrow_stream(&dir.join("data-00000-of-00002.arrow"), b, half);
    std::fs::write(
        dir.join("state.json"),
        r#"{"_data_files": [{"filename": "data-00001-of-00002.arrow"},
            {"filename": "data-00000-of-00002.arrow"}], "_split": "train"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("dataset_info.json"), r#"{"features": {}}"#).unwrap();

    let dir = add("arrow-file");
    let whole = batch(docs, 0);
    let f = std::fs::File::create(dir.join("corpus.arrow")).unwrap();
    let mut w = arrow_ipc::writer::FileWriter::try_new(f, &whole.schema()).unwrap();
    w.write(&whole).unwrap();
    w.finish().unwrap();

    let dir = add("hub");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("README.md"), "---\nlicense: pd\n---\n# A corpus\n").unwrap();
    std::fs::write(dir.join(".gitattributes"), "*.parquet filter=lfs\n").unwrap();
    parquet(
        &dir.join("data/train-00000-of-00002.parquet"),
        a,
        0,
        Compression::SNAPPY,
    );
    parquet(
        &dir.join("data/train-00001-of-00002.parquet"),
        b,
        half,
        Compression::UNCOMPRESSED,
    );
    inputs
}

fn writer_options() -> WriterOptions {
    WriterOptions {
        tokenizer: TokenizerInfo::of(&TokenizerKind::R50k.load()),
        layout: Layout::Decomposed {
            split_long: SplitLong::Largest,
        },
        buckets: Buckets::new(4, 9).unwrap(),
        seed: 11,
        shard_bytes: 64 << 10,
        overwrite: false,
    }
}

/// Every file of the dataset at `dir`, by relative path.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_gives_the_same_dataset() {
    let root = tempfile::tempdir().unwrap();
    let docs = documents();
    let inputs = write_all(root.path(), &docs);
    let mut datasets = Vec::new();
    for (name, input) in &inputs {
        let out = root.path().join(format!("out-{name}"));
        let options = CorpusOptions {
            // Small batches: documents stream through several of them.
            batch_bytes: 64 << 10,
            ..CorpusOptions::default()
        };
        let corpus = Corpus::open(std::slice::from_ref(input), options)
            .await
            .unwrap();
        assert_eq!(corpus.count_documents().await.unwrap(), 600, "{name}");
        let loc = Location::parse(out.to_str().unwrap(), true).unwrap();
        let w = DatasetWriter::create(loc, writer_options()).await.unwrap();
        let s = corpus
            .decompose(TokenizerKind::R50k.load(), w, &Quiet)
            .await
            .unwrap();
        assert_eq!(s.manifest.n_documents, 600, "{name}");
        assert_eq!(s.manifest.n_documents_skipped, 1, "{name}: the blank one");
        if *name == "hub" || *name == "jsonl.zst" {
            assert_eq!(s.ignored.len(), 1, "the README: {:?}", s.ignored);
            assert!(s.ignored[0].ends_with("README.md"));
        }
        datasets.push((name, files(&out)));
    }
    let (first, want) = &datasets[0];
    assert!(want.len() > 3, "{:?}", want.keys());
    for (name, got) in &datasets[1..] {
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name} vs {first}"
        );
        for (k, v) in want {
            assert!(got[k] == *v, "{name}: {k} differs from {first}'s");
        }
    }
}

async fn refused(input: &Path, options: CorpusOptions) -> String {
    match Corpus::open(&[input.to_path_buf()], options).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{} was accepted", input.display()),
    }
}

#[tokio::test]
async fn inputs_that_cannot_be_read_are_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let docs = documents();
    // A zip beside good files: refused, named, whatever else is there.
    let dir = root.path().join("mixed");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.jsonl"), jsonl(&docs[..3])).unwrap();
    std::fs::write(dir.join("b.zip"), b"PK\x03\x04\x14\x00rest").unwrap();
    let e = refused(&dir, CorpusOptions::default()).await;
    assert!(e.contains("b.zip") && e.contains("zip archive"), "{e}");

    // A .jsonl.gz that is not gzip.
    let f = root.path().join("fake.jsonl.gz");
    std::fs::write(&f, jsonl(&docs[..3])).unwrap();
    let e = refused(&f, CorpusOptions::default()).await;
    assert!(e.contains("fake.jsonl.gz") && e.contains("gzip"), "{e}");

    // JSON lines without the field asked for: the input yields nothing.
    let f = root.path().join("other-field.jsonl");
    std::fs::write(&f, jsonl(&docs[..3])).unwrap();
    let e = refused(
        &f,
        CorpusOptions {
            text_field: "content".into(),
            ..CorpusOptions::default()
        },
    )
    .await;
    assert!(
        e.contains("other-field.jsonl") && e.contains("no document had a `content`"),
        "{e}"
    );

    // Parquet without the column: named, with the columns it has.
    let f = root.path().join("t.parquet");
    parquet(&f, &docs[..3], 0, Compression::SNAPPY);
    let e = refused(
        &f,
        CorpusOptions {
            text_field: "body".into(),
            ..CorpusOptions::default()
        },
    )
    .await;
    assert!(e.contains("t.parquet") && e.contains("id, text"), "{e}");

    // An empty folder.
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = refused(&empty, CorpusOptions::default()).await;
    assert!(e.contains("empty") && e.contains("0 files"), "{e}");
    assert!(matches!(
        Corpus::open(&[empty], CorpusOptions::default()).await,
        Err(CorpusError::Empty { .. })
    ));
}

/// Whether python3 has Hugging Face `datasets` (the tests' independent
/// side); `STRATA_REQUIRE_DATASETS` makes its absence a failure.
fn datasets_here() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import datasets"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("STRATA_REQUIRE_DATASETS").is_none(),
            "STRATA_REQUIRE_DATASETS is set and python3 cannot import datasets"
        );
        eprintln!("SKIPPED: python3 cannot import datasets (pip install datasets)");
    }
    ok
}

/// `scripts/hf_datasets.py` with `args`: its standard output as JSON.
fn hf_datasets(args: &[&Path]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/hf_datasets.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hf_datasets.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn with_split(split: Option<&str>) -> CorpusOptions {
    CorpusOptions {
        batch_bytes: 64 << 10,
        split: split.map(str::to_string),
        ..CorpusOptions::default()
    }
}

async fn open_split(input: &Path, options: CorpusOptions) -> Result<Corpus, CorpusError> {
    Corpus::open(&[input.to_path_buf()], options).await
}

/// Decomposes `input` (reading `split`) to `out`: the dataset's files.
async fn decompose_to(
    input: &Path,
    split: Option<&str>,
    out: &Path,
) -> (BTreeMap<String, Vec<u8>>, Vec<String>) {
    let corpus = Corpus::open(&[input.to_path_buf()], with_split(split))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
    let loc = Location::parse(out.to_str().unwrap(), true).unwrap();
    let w = DatasetWriter::create(loc, writer_options()).await.unwrap();
    let s = corpus
        .decompose(TokenizerKind::R50k.load(), w, &Quiet)
        .await
        .unwrap();
    (files(out), s.ignored)
}

/// Folders written by the real `datasets` library (a `save_to_disk`
/// Dataset in three shards, a saved DatasetDict, a Hub snapshot's Parquet
/// shards by `to_parquet`) give the dataset the JSON lines they were
/// loaded from give; a folder of several splits is refused without
/// `split` and reads the one it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folders_written_by_hugging_face_datasets_give_the_same_dataset() {
    if !datasets_here() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let docs = documents();
    let jsonl_path = root.path().join("corpus.jsonl");
    std::fs::write(&jsonl_path, jsonl(&docs)).unwrap();
    let hf = root.path().join("hf");
    let said = hf_datasets(&[Path::new("save"), &jsonl_path, &hf]);
    assert_eq!(said["rows"], 600, "{said}");

    let (want, _) = decompose_to(&jsonl_path, None, &root.path().join("out-jsonl")).await;
    assert!(want.len() > 3, "{:?}", want.keys());
    let same = |name: &str, got: &BTreeMap<String, Vec<u8>>| {
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, v) in &want {
            assert!(got[k] == *v, "{name}: {k} differs from the JSON lines'");
        }
    };

    let (got, _) = decompose_to(&hf.join("saved"), None, &root.path().join("out-saved")).await;
    same("save_to_disk", &got);

    for input in [hf.join("dict"), hf.join("hub")] {
        let e = open_split(&input, with_split(None))
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, CorpusError::Splits { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains(&input.display().to_string())
                && e.contains("train (")
                && e.contains("validation (1 file)")
                && e.contains("--split"),
            "{e}"
        );
        let name = input.file_name().unwrap().to_string_lossy().into_owned();
        let (got, ignored) = decompose_to(
            &input,
            Some("train"),
            &root.path().join(format!("out-{name}")),
        )
        .await;
        same(&name, &got);
        if name == "hub" {
            assert_eq!(ignored.len(), 1, "{ignored:?}");
            assert!(ignored[0].ends_with("README.md"), "{ignored:?}");
        }
        let validation = open_split(&input, with_split(Some("validation")))
            .await
            .unwrap();
        assert_eq!(validation.count_documents().await.unwrap(), 7, "{name}");
        let e = open_split(&input, with_split(Some("test")))
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no files of the split `test`"), "{e}");
    }
}

/// Which files of a folder are in which split, as `datasets` resolves
/// them, for layouts of every rule: the Hub's sharded names, split
/// folders, split words in file names, none at all. (Plain-text READMEs
/// and `config.json`, which the library never reads, are left out of the
/// cases: strata reads a README unless data files sit beside it.)
#[tokio::test]
async fn splits_are_the_ones_hugging_face_datasets_finds() {
    if !datasets_here() {
        return;
    }
    let cases: &[&[&str]] = &[
        &["train.jsonl", "test.jsonl", "other.jsonl"],
        &["Train.txt", "TEST.txt"],
        &[
            "data/train-00000-of-00002.jsonl",
            "data/train-00001-of-00002.jsonl",
            "data/unsupervised-00000-of-00001.jsonl",
            "data/test.jsonl",
            "extra.jsonl",
        ],
        &["a/train/x.txt", "a/dev/y.txt", "z.txt"],
        &[
            "en/c4-train.00000-of-01024.jsonl",
            "en/c4-train.00001-of-01024.jsonl",
            "en/c4-validation.00000-of-00008.jsonl",
        ],
        &["train2.txt", "trainer.txt", "x_val.txt", "interval.txt"],
        &[
            "1790_george_washington_n.txt",
            "moby.txt",
            "sub/deeper/x.txt",
        ],
        &["test/a.txt", "data_test/b.txt", "train_x/c.txt"],
        &["evaluation.txt", "eval.txt", "testing.txt", "devil.txt"],
        &["train/test.txt", "valid-set/x.txt", "training_data.txt"],
        &[
            "wiki.train.tokens.txt",
            "wiki.valid.tokens.txt",
            "wiki.test.tokens.txt",
        ],
    ];
    let root = tempfile::tempdir().unwrap();
    for (c, names) in cases.iter().enumerate() {
        let dir = root.path().join(format!("case{c}"));
        for name in *names {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let text = format!("the file {name}");
            let body = if name.ends_with(".jsonl") {
                format!("{}\n", serde_json::json!({ "text": text }))
            } else {
                text
            };
            std::fs::write(&path, body).unwrap();
        }
        let theirs = hf_datasets(&[Path::new("splits"), &dir]);
        let theirs = theirs.as_object().unwrap();
        let prefix = format!("{}/", dir.display());
        let relative = |names: Vec<String>| -> Vec<String> {
            let mut r: Vec<String> = names
                .into_iter()
                .map(|n| n.strip_prefix(&prefix).unwrap().to_string())
                .collect();
            r.sort();
            r
        };
        let mut claimed = std::collections::BTreeSet::new();
        for (split, files) in theirs {
            let want: Vec<String> = serde_json::from_value(files.clone()).unwrap();
            claimed.extend(want.iter().cloned());
            let corpus = open_split(&dir, with_split(Some(split)))
                .await
                .unwrap_or_else(|e| panic!("{names:?}, split {split}: {e}"));
            let ours = relative(corpus.files().into_iter().map(|f| f.name).collect());
            assert_eq!(ours, want, "{names:?}: split {split}");
            let left_out = relative(corpus.ignored.clone());
            let unclaimed: Vec<String> = names
                .iter()
                .map(|n| n.to_string())
                .filter(|n| {
                    !theirs
                        .values()
                        .any(|f| f.as_array().unwrap().iter().any(|x| x == n))
                })
                .collect();
            let mut unclaimed = unclaimed;
            unclaimed.sort();
            assert_eq!(left_out, unclaimed, "{names:?}: files in no split");
        }
        let alone = open_split(&dir, with_split(None)).await;
        assert_eq!(
            alone.is_ok(),
            theirs.len() == 1,
            "{names:?}: {theirs:?} read without a split"
        );
        let e = open_split(&dir, with_split(Some("nosuch")))
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no files of the split `nosuch`"), "{e}");
    }
}
