//! The dataplane against a real S3-compatible server on 127.0.0.1: decompose
//! and stream round trip, identical to local files, and the errors a bad
//! endpoint or an incomplete dataset gives.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use strata_dataplane::corpus::{Quiet, decompose_corpus};
use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::loader::{Loader, LoaderConfig};
use strata_dataplane::manifest::{Layout, TokenizerInfo};
use strata_dataplane::reader::{ReadError, read_manifest};
use strata_dataplane::store::{Location, StoreOptions};
use strata_dataplane::tokenize::TokenizerKind;
use strata_dataplane::writer::{DatasetWriter, WriterOptions};
use strata_recipe::{Curriculum, NamedCurriculum};
use strata_tests::s3::S3Server;

fn moby_dick() -> PathBuf {
    strata_tests::corpora().join("moby-dick")
}

fn writer_options() -> WriterOptions {
    WriterOptions {
        tokenizer: TokenizerInfo::of(&TokenizerKind::R50k.load()),
        layout: Layout::Decomposed {
            split_long: SplitLong::Random,
        },
        buckets: Buckets::new(6, 10).unwrap(),
        seed: 3,
        shard_bytes: 1 << 20,
        overwrite: false,
    }
}

async fn decompose_to(loc: &Location) -> strata_dataplane::manifest::Manifest {
    let w = DatasetWriter::create(loc.clone(), writer_options())
        .await
        .unwrap();
    decompose_corpus(&[moby_dick()], TokenizerKind::R50k.load(), w, &Quiet)
        .await
        .unwrap()
        .manifest
}

async fn stream(loc: &Location, rank: u32, steps: usize) -> Vec<(u64, Vec<u64>, Vec<u32>)> {
    let manifest = read_manifest(loc).await.unwrap();
    let cfg = LoaderConfig {
        curriculum: Curriculum::Named(NamedCurriculum::GrowP2),
        cycles: 4,
        tokens_per_step: 8192,
        dp_rank: rank,
        dp_size: 2,
        seed: 5,
        max_seq_len: None,
        mixture: Default::default(),
        deal_blocks: 1,
    };
    let mut loader = Loader::new(loc.clone(), manifest, &cfg, None).unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let b = loader.next_batch().await.unwrap();
        out.push((b.seq_len, b.doc_ids, b.inputs));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompose_and_stream_round_trip_through_s3() {
    let server = S3Server::start(&["strata"]).await;
    let opts = server.store_options(Duration::from_secs(10));
    let s3 = Location::open("s3://strata/datasets/moby", true, &opts).unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let local = Location::parse(local_dir.path().to_str().unwrap(), true).unwrap();

    let on_s3 = decompose_to(&s3).await;
    let on_disk = decompose_to(&local).await;
    // Same bytes (every shard's CRC) whatever the store.
    assert_eq!(on_s3, on_disk);
    assert_eq!(read_manifest(&s3).await.unwrap(), on_s3);
    // The objects really are on the server, under the bucket and prefix.
    let key = &on_s3.buckets[0].shards[0].key;
    assert!(
        server
            .root()
            .join("strata/datasets/moby")
            .join(key)
            .exists()
    );

    for rank in 0..2 {
        let a = stream(&s3, rank, 25).await;
        let b = stream(&local, rank, 25).await;
        assert_eq!(a, b, "rank {rank}");
    }

    // A rerun into a complete dataset on S3 is refused.
    let err = DatasetWriter::create(s3.clone(), writer_options())
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("s3://strata/datasets/moby"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_dataset_on_s3_is_never_read() {
    let server = S3Server::start(&["strata"]).await;
    let opts = server.store_options(Duration::from_secs(10));
    let s3 = Location::open("s3://strata/empty", true, &opts).unwrap();
    s3.put("D08/part-00000.arrow", "half a shard".into())
        .await
        .unwrap();
    match read_manifest(&s3).await {
        Err(ReadError::NoManifest { url }) => assert_eq!(url, "s3://strata/empty"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_retried_then_named() {
    // Nothing listens on port 1 of loopback.
    let opts = StoreOptions {
        retry_timeout: Duration::from_secs(2),
        ..StoreOptions::default()
    }
    .with_s3("aws_endpoint_url", "http://127.0.0.1:1")
    .with_s3("aws_allow_http", "true")
    .with_s3("aws_access_key_id", "x")
    .with_s3("aws_secret_access_key", "y")
    .with_s3("aws_region", "us-east-1");
    let s3 = Location::open("s3://nowhere/data", false, &opts).unwrap();
    let start = Instant::now();
    let err = read_manifest(&s3).await.unwrap_err().to_string();
    let waited = start.elapsed();
    assert!(err.contains("s3://nowhere/data/manifest.json"), "{err}");
    // It retried with backoff (not an instant failure) and gave up in time.
    assert!(
        waited >= Duration::from_millis(200),
        "gave up after {waited:?}"
    );
    assert!(waited < Duration::from_secs(20), "took {waited:?}");
}

fn text_batch(docs: &[&str]) -> arrow_array::RecordBatch {
    use arrow_schema::{DataType, Field, Schema};
    let schema = Schema::new(vec![Field::new("text", DataType::Utf8, false)]);
    let text = arrow_array::StringArray::from_iter_values(docs.iter());
    arrow_array::RecordBatch::try_new(std::sync::Arc::new(schema), vec![std::sync::Arc::new(text)])
        .unwrap()
}

/// Two halves of documents as two Parquet objects.
fn parquet_objects((a, b): (&[&str], &[&str])) -> Vec<(String, Vec<u8>)> {
    [a, b]
        .iter()
        .enumerate()
        .map(|(i, docs)| {
            let batch = text_batch(docs);
            let mut out = Vec::new();
            let mut w =
                parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            (format!("data/train-{i:05}-of-00002.parquet"), out)
        })
        .collect()
}

/// A `save_to_disk` folder: Arrow IPC streams listed by `state.json`,
/// the second half's file first by name.
fn datasets_objects((a, b): (&[&str], &[&str])) -> Vec<(String, Vec<u8>)> {
    let mut objects: Vec<(String, Vec<u8>)> = [(1, a), (0, b)]
        .iter()
        .map(|(n, docs)| {
            let batch = text_batch(docs);
            let mut out = Vec::new();
            let mut w =
                arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
            w.write(&batch).unwrap();
            w.finish().unwrap();
            drop(w);
            (format!("data-0000{n}-of-00002.arrow"), out)
        })
        .collect();
    let state = r#"{"_data_files": [{"filename": "data-00001-of-00002.arrow"},
        {"filename": "data-00000-of-00002.arrow"}], "_split": null}"#;
    objects.push(("state.json".into(), state.as_bytes().to_vec()));
    objects.push(("dataset_info.json".into(), b"{}".to_vec()));
    objects
}

/// Two halves as gzip JSON lines.
fn gzip_objects((a, b): (&[&str], &[&str])) -> Vec<(String, Vec<u8>)> {
    use std::io::Write;
    [a, b]
        .iter()
        .enumerate()
        .map(|(i, docs)| {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            for d in *docs {
                writeln!(enc, "{}", serde_json::json!({ "text": d })).unwrap();
            }
            (
                format!("c4-train.{i:05}-of-00002.json.gz"),
                enc.finish().unwrap(),
            )
        })
        .collect()
}

/// A corpus read from S3 (`strata decompose --input s3://…`): Moby-Dick's
/// chapters as zstd JSON-lines objects, each object spooled while it is
/// read, gives the dataset the same objects give from a local folder, and
/// so do the chapters as Parquet, a `datasets` folder and gzip JSON lines
/// on S3; an object of a kind strata cannot read is named by its URL
/// before anything is written; splits are found and chosen as on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_on_s3_decomposes_as_the_same_files_on_disk() {
    use strata_dataplane::corpus::{Corpus, CorpusOptions, Input};
    let server = S3Server::start(&["strata"]).await;
    let opts = server.store_options(Duration::from_secs(10));
    let text = std::fs::read_to_string(moby_dick().join("moby-dick.txt")).unwrap();
    let chapters: Vec<&str> = text.split("\nCHAPTER ").collect();
    let local = tempfile::tempdir().unwrap();
    let corpus = Location::open("s3://strata/corpora/moby", true, &opts).unwrap();
    for (i, part) in chapters.chunks(40).enumerate() {
        let mut lines = String::new();
        for c in part {
            lines.push_str(&serde_json::json!({ "text": c }).to_string());
            lines.push('\n');
        }
        let z = zstd::stream::encode_all(lines.as_bytes(), 3).unwrap();
        let name = format!("shard-{i:03}.jsonl.zst");
        std::fs::write(local.path().join(&name), &z).unwrap();
        corpus.put(&name, z.into()).await.unwrap();
    }
    corpus
        .put(".gitattributes", "*.zst binary\n".into())
        .await
        .unwrap();
    let n_chapters = chapters.len() as u64;
    let decompose = |input: Input, out: Location| async move {
        let c = Corpus::open_inputs(&[input], CorpusOptions::default())
            .await
            .unwrap();
        assert_eq!(c.count_documents().await.unwrap(), n_chapters);
        let w = DatasetWriter::create(out, writer_options()).await.unwrap();
        c.decompose(TokenizerKind::R50k.load(), w, &Quiet)
            .await
            .unwrap()
            .manifest
    };
    let out_s3 = Location::open("s3://strata/datasets/moby-from-s3", true, &opts).unwrap();
    let from_s3 = decompose(
        Input::parse("s3://strata/corpora/moby", &opts).unwrap(),
        out_s3,
    )
    .await;
    let out_dir = tempfile::tempdir().unwrap();
    let out_local = Location::parse(out_dir.path().to_str().unwrap(), true).unwrap();
    let from_disk = decompose(Input::Path(local.path().to_path_buf()), out_local).await;
    // Every shard's CRC and row count: the same bytes.
    assert_eq!(from_s3, from_disk);
    assert_eq!(from_s3.n_documents, chapters.len() as u64);

    // The same chapters in the other formats, each read from S3: Parquet
    // shards, a `datasets` folder (Arrow streams listed by state.json,
    // out of name order), gzip JSON lines. The same dataset.
    let halves = chapters.split_at(chapters.len() / 2);
    for (format, objects) in [
        ("parquet", parquet_objects(halves)),
        ("datasets", datasets_objects(halves)),
        ("jsonl.gz", gzip_objects(halves)),
    ] {
        let url = format!("s3://strata/corpora/moby-{format}");
        let at = Location::open(&url, true, &opts).unwrap();
        for (key, bytes) in objects {
            at.put(&key, bytes.into()).await.unwrap();
        }
        let out =
            Location::open(&format!("s3://strata/datasets/moby-{format}"), true, &opts).unwrap();
        let got = decompose(Input::parse(&url, &opts).unwrap(), out).await;
        assert_eq!(got, from_disk, "{format} from S3");
    }

    // A bzip2 object among them: named by its URL, nothing written.
    corpus
        .put("zz.jsonl.bz2", b"BZh91AY&SY"[..].to_vec().into())
        .await
        .unwrap();
    let err = Corpus::open_inputs(
        &[Input::parse("s3://strata/corpora/moby", &opts).unwrap()],
        CorpusOptions::default(),
    )
    .await
    .expect_err("refused")
    .to_string();
    assert!(
        err.contains("s3://strata/corpora/moby/zz.jsonl.bz2") && err.contains("bzip2"),
        "{err}"
    );

    // Splits on S3 as on disk: train/ and validation/ folders beside a
    // README are refused without --split, and the split named is read
    // alone (the README in no split, listed as left out).
    let split_at = Location::open("s3://strata/corpora/splits", true, &opts).unwrap();
    for (split, part) in [
        ("train", &chapters[..100]),
        ("validation", &chapters[100..]),
    ] {
        let mut lines = String::new();
        for c in part {
            lines.push_str(&serde_json::json!({ "text": c }).to_string());
            lines.push('\n');
        }
        split_at
            .put(&format!("{split}/00000.jsonl"), lines.into_bytes().into())
            .await
            .unwrap();
    }
    split_at
        .put("README.md", "# chapters\n".into())
        .await
        .unwrap();
    let open = |split: Option<&str>| {
        let input = Input::parse("s3://strata/corpora/splits", &opts).unwrap();
        let options = CorpusOptions {
            split: split.map(str::to_string),
            ..CorpusOptions::default()
        };
        async move { Corpus::open_inputs(&[input], options).await }
    };
    let err = open(None)
        .await
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("s3://strata/corpora/splits")
            && err.contains("train (1 file), validation (1 file)"),
        "{err}"
    );
    let validation = open(Some("validation")).await.unwrap();
    assert_eq!(
        validation.count_documents().await.unwrap(),
        n_chapters - 100
    );
    assert_eq!(
        validation.ignored,
        vec!["s3://strata/corpora/splits/README.md".to_string()]
    );
}
