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
        if *name == "hub" {
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
