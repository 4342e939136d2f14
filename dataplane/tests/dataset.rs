//! Writing and reading datasets on local object storage: round trips against
//! the source text, bad input, crash safety, and the curriculum loader.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use strata_dataplane::corpus::{DecomposeSummary, Quiet, decompose_corpus, doc_id};
use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::loader::{Loader, LoaderConfig, LoaderError, Mixture, Planner, SourceRule};
use strata_dataplane::manifest::{Layout, Manifest, TokenizerInfo};
use strata_dataplane::reader::{ReadError, read_holdout, read_manifest, read_shard};
use strata_dataplane::store::Location;
use strata_dataplane::tokenize::TokenizerKind;
use strata_dataplane::writer::{DatasetWriter, WriteError, WriterOptions};
use strata_recipe::{Curriculum, Exhausted, MixPhase, NamedCurriculum};

fn corpora() -> PathBuf {
    // As strata_tests::corpora(), which this crate cannot depend on.
    std::env::var_os("STRATA_CORPORA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/corpora"))
}

fn opts(layout: Layout, min: u32, max: u32) -> WriterOptions {
    WriterOptions {
        tokenizer: TokenizerInfo::of(&TokenizerKind::R50k.load()),
        layout,
        buckets: Buckets::new(min, max).unwrap(),
        seed: 7,
        shard_bytes: 256 << 10,
        overwrite: false,
    }
}

fn dd() -> Layout {
    Layout::Decomposed {
        split_long: SplitLong::Largest,
    }
}

/// A few State of the Union addresses copied into `dir`, plus their texts in
/// document-id order.
fn small_corpus(dir: &Path) -> Vec<String> {
    let src = corpora().join("sotu");
    let mut names: Vec<_> = std::fs::read_dir(&src)
        .expect("test corpora: set STRATA_CORPORA or see .ci/run")
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut texts = Vec::new();
    for name in names.iter().step_by(23).take(8) {
        let text = std::fs::read_to_string(src.join(name)).unwrap();
        std::fs::write(dir.join(name), &text).unwrap();
        texts.push(text);
    }
    texts
}

/// Decomposes every document under `input` into a new dataset at `out`.
async fn decompose_into(
    input: &Path,
    out: &Path,
    min: u32,
    max: u32,
) -> (Location, DecomposeSummary) {
    let loc = Location::parse(out.to_str().unwrap(), true).unwrap();
    let w = DatasetWriter::create(loc.clone(), opts(dd(), min, max))
        .await
        .unwrap();
    let s = decompose_corpus(
        &[input.to_path_buf()],
        TokenizerKind::R50k.load(),
        w,
        &Quiet,
    )
    .await
    .unwrap();
    (loc, s)
}

async fn all_rows(loc: &Location, m: &Manifest) -> Vec<(u64, Vec<u32>, u64, u64)> {
    let mut rows = Vec::new();
    for b in &m.buckets {
        for s in &b.shards {
            let shard = read_shard(loc, s, b.seq_len as usize + 1).await.unwrap();
            for r in 0..shard.rows() {
                rows.push((
                    b.seq_len,
                    shard.row(r).to_vec(),
                    shard.doc_ids[r],
                    shard.offsets[r],
                ));
            }
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompose_round_trips_to_the_source_text() {
    let input = tempfile::tempdir().unwrap();
    let texts = small_corpus(input.path());
    let out = tempfile::tempdir().unwrap();
    let loc = Location::parse(out.path().to_str().unwrap(), true).unwrap();
    let writer = DatasetWriter::create(loc.clone(), opts(dd(), 8, 11))
        .await
        .unwrap();
    let tok = TokenizerKind::R50k.load();
    let summary = decompose_corpus(&[input.path().to_path_buf()], tok.clone(), writer, &Quiet)
        .await
        .unwrap();
    let m = read_manifest(&loc).await.unwrap();
    assert_eq!(m, summary.manifest);
    assert_eq!(m.n_documents, texts.len() as u64);
    let stored: u64 = m.buckets.iter().map(|b| b.n_tokens).sum();
    assert_eq!(stored + m.n_tokens_dropped, m.n_tokens_in);
    // Small shards: buckets span several, and every sequence is written.
    assert!(m.buckets.iter().any(|b| b.shards.len() > 1));

    let docs: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode_document(t)).collect();
    assert_eq!(
        m.n_tokens_in,
        docs.iter().map(|d| d.len() as u64).sum::<u64>()
    );
    let rows = all_rows(&loc, &m).await;
    // A document's id is its text's hash.
    let by_id: HashMap<u64, usize> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (doc_id(t.as_bytes()), i))
        .collect();
    let mut covered: HashMap<u64, u64> = HashMap::new();
    for (seq_len, row, doc_id, offset) in &rows {
        assert_eq!(row.len() as u64, seq_len + 1);
        let doc = &docs[by_id[doc_id]];
        let start = *offset as usize;
        assert_eq!(
            &doc[start..start + row.len()],
            row.as_slice(),
            "doc {doc_id} at {offset}"
        );
        *covered.entry(*doc_id).or_default() += row.len() as u64;
    }
    // Each document is covered but for a tail under 2^8 + 1 tokens.
    for (id, doc) in docs.iter().enumerate() {
        let c = covered
            .get(&doc_id(texts[id].as_bytes()))
            .copied()
            .unwrap_or(0);
        assert!(
            doc.len() as u64 - c < 257,
            "doc {id}: {} of {}",
            c,
            doc.len()
        );
    }
    // Shards are shuffled: rows are not in document order.
    let d8: Vec<usize> = rows
        .iter()
        .filter(|r| r.0 == 256)
        .map(|r| by_id[&r.2])
        .collect();
    assert!(
        d8.windows(2).any(|w| w[0] > w[1]),
        "D08 rows are in input order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_writes_the_same_dataset() {
    let input = tempfile::tempdir().unwrap();
    small_corpus(input.path());
    let mut manifests = Vec::new();
    for _ in 0..2 {
        let out = tempfile::tempdir().unwrap();
        let (_, s) = decompose_into(input.path(), out.path(), 8, 10).await;
        manifests.push(s.manifest);
    }
    // Identical shard checksums: identical bytes.
    assert_eq!(manifests[0], manifests[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_are_skipped_and_counted() {
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("a.txt"), "word ".repeat(400)).unwrap();
    std::fs::write(input.path().join("b.txt"), [0x66, 0x6f, 0xff, 0xfe]).unwrap();
    std::fs::write(input.path().join("c.txt"), "  \n").unwrap();
    std::fs::write(
        input.path().join("d.jsonl"),
        "{\"text\": \"one two three\"}\n{\"body\": 1}\nnot json\n\n{\"text\": \"\"}\n{\"text\": \"four\"}\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let (loc, s) = decompose_into(input.path(), out.path(), 0, 6).await;
    let m = &s.manifest;
    // a, b, c, then five JSONL lines (the blank line is no document).
    assert_eq!(m.n_documents, 8);
    assert_eq!(m.n_documents_skipped, 5);
    let joined = s.skipped.join("\n");
    for needle in [
        "b.txt: not UTF-8",
        "c.txt: empty",
        "d.jsonl:2: no string `text`",
        "d.jsonl:3: not JSON",
        "d.jsonl:5: empty",
    ] {
        assert!(joined.contains(needle), "{needle} not in {joined}");
    }
    // Document ids are their texts' hashes: "four" is in, the skipped
    // ones (which take the empty text's) are not.
    let rows = all_rows(&loc, m).await;
    assert!(rows.iter().any(|r| r.2 == doc_id(b"four")));
    assert!(rows.iter().all(|r| r.2 != doc_id(b"")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_dataset_is_kept_unless_replaced_and_an_incomplete_one_is_cleaned() {
    let out = tempfile::tempdir().unwrap();
    let loc = Location::parse(out.path().to_str().unwrap(), true).unwrap();
    let doc: Vec<u32> = (0..1000).collect();
    let mut w = DatasetWriter::create(loc.clone(), opts(dd(), 4, 8))
        .await
        .unwrap();
    w.add_document(&doc).await.unwrap();
    let first = w.finish().await.unwrap();

    // A second write refuses, and the dataset is untouched.
    let err = DatasetWriter::create(loc.clone(), opts(dd(), 4, 8))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, WriteError::Complete { .. }), "{err}");
    assert!(err.to_string().contains("--overwrite"));
    assert_eq!(read_manifest(&loc).await.unwrap(), first);

    // A crash mid-write: shards, no manifest. Simulate with a stray shard
    // and a file that is not ours.
    std::fs::remove_file(out.path().join("manifest.json")).unwrap();
    std::fs::create_dir_all(out.path().join("D05")).unwrap();
    std::fs::write(out.path().join("D05/part-00099.arrow"), b"half").unwrap();
    std::fs::write(out.path().join("README.txt"), b"keep me").unwrap();
    assert!(matches!(
        read_manifest(&loc).await,
        Err(ReadError::NoManifest { .. })
    ));

    let mut w = DatasetWriter::create(loc.clone(), opts(dd(), 4, 8))
        .await
        .unwrap();
    w.add_document(&doc[..600]).await.unwrap();
    let second = w.finish().await.unwrap();
    assert!(!out.path().join("D05/part-00099.arrow").exists());
    assert!(out.path().join("README.txt").exists());
    assert_ne!(second, first);

    // --overwrite replaces a complete dataset.
    let mut o = opts(dd(), 4, 8);
    o.overwrite = true;
    let mut w = DatasetWriter::create(loc.clone(), o).await.unwrap();
    w.add_document(&doc).await.unwrap();
    assert_eq!(w.finish().await.unwrap(), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_missing_objects_are_named() {
    let out = tempfile::tempdir().unwrap();
    let url = out.path().to_str().unwrap().to_string();
    let loc = Location::parse(&url, true).unwrap();
    let mut w = DatasetWriter::create(loc.clone(), opts(dd(), 4, 6))
        .await
        .unwrap();
    w.add_document(&(0..500).collect::<Vec<u32>>())
        .await
        .unwrap();
    let m = w.finish().await.unwrap();
    let b = &m.buckets[2];
    let shard = &b.shards[0];

    // Flip one byte: the checksum catches it and the error names the object.
    let path = out.path().join(&shard.key);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = read_shard(&loc, shard, b.seq_len as usize + 1)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("{url}/{}", shard.key)),
        "{err}"
    );
    assert!(err.to_string().contains("checksum"), "{err}");

    std::fs::remove_file(&path).unwrap();
    let err = read_shard(&loc, shard, b.seq_len as usize + 1)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&shard.key) && err.to_string().contains("not found"),
        "{err}"
    );

    std::fs::write(out.path().join("manifest.json"), b"{ not json").unwrap();
    let err = read_manifest(&loc).await.unwrap_err();
    assert!(
        err.to_string().contains("manifest.json") && err.to_string().contains("corrupt"),
        "{err}"
    );

    let missing = Location::parse(&format!("{url}/nope"), false).unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concat_and_chunk_writes_one_bucket_across_documents() {
    let out = tempfile::tempdir().unwrap();
    let loc = Location::parse(out.path().to_str().unwrap(), true).unwrap();
    let mut w = DatasetWriter::create(
        loc.clone(),
        opts(Layout::ConcatChunk { seq_len: 16 }, 8, 13),
    )
    .await
    .unwrap();
    let docs: Vec<Vec<u32>> = vec![
        (0..10).collect(),
        (100..130).collect(),
        (200..203).collect(),
    ];
    for d in &docs {
        w.add_document(d).await.unwrap();
    }
    let m = w.finish().await.unwrap();
    assert_eq!(m.buckets.len(), 1);
    assert_eq!((m.min_log2, m.max_log2), (4, 4));
    // 43 tokens = 2 sequences of 17 + 9 dropped.
    assert_eq!(m.buckets[0].n_sequences, 2);
    assert_eq!(m.n_tokens_dropped, 9);
    let mut rows = all_rows(&loc, &m).await;
    rows.sort_by_key(|r| (r.2, r.3));
    let stream: Vec<u32> = docs.concat();
    assert_eq!(rows[0].1, stream[..17].to_vec());
    assert_eq!((rows[0].2, rows[0].3), (0, 0));
    assert_eq!(rows[1].1, stream[17..34].to_vec());
    // The second sequence starts in document 1 at offset 7.
    assert_eq!((rows[1].2, rows[1].3), (1, 7));

    let bad = DatasetWriter::create(loc, opts(Layout::ConcatChunk { seq_len: 1000 }, 8, 13)).await;
    assert!(bad.err().unwrap().to_string().contains("power of two"));
}

/// A synthetic dataset with `per_bucket` sequences in each bucket
/// 2^min..2^max: every document is exactly one piece, tokens = its doc id.
async fn synthetic(dir: &Path, min: u32, max: u32, per_bucket: u64) -> (Location, Manifest) {
    let loc = Location::parse(dir.to_str().unwrap(), true).unwrap();
    let mut w = DatasetWriter::create(loc.clone(), opts(dd(), min, max))
        .await
        .unwrap();
    let mut id = 0u32;
    for k in min..=max {
        for _ in 0..per_bucket {
            w.add_document(&vec![id; (1usize << k) + 1]).await.unwrap();
            id += 1;
        }
    }
    (loc.clone(), w.finish().await.unwrap())
}

fn cfg(curriculum: Curriculum, cycles: u32, tps: u64, rank: u32, size: u32) -> LoaderConfig {
    LoaderConfig {
        curriculum,
        cycles,
        tokens_per_step: tps,
        dp_rank: rank,
        dp_size: size,
        seed: 11,
        max_seq_len: None,
        mixture: Mixture::default(),
        deal_blocks: 1,
    }
}

fn grow() -> Curriculum {
    Curriculum::Named(NamedCurriculum::GrowP2)
}

/// A synthetic dataset (buckets 8 to 64), a loader of its whole steps of
/// `tps` tokens and one per rank of `dp`, dealt by `blocks`.
async fn whole_and_ranks(
    dir: &Path,
    tps: u64,
    dp: u32,
    blocks: u32,
) -> ((Location, Manifest), Loader, Vec<Loader>) {
    let (loc, m) = synthetic(dir, 3, 6, 256).await;
    let whole = Loader::new(loc.clone(), m.clone(), &cfg(grow(), 2, tps, 0, 1), None).unwrap();
    let ranks = (0..dp)
        .map(|r| {
            let c = LoaderConfig {
                deal_blocks: blocks,
                ..cfg(grow(), 2, tps, r, dp)
            };
            Loader::new(loc.clone(), m.clone(), &c, None).unwrap()
        })
        .collect();
    ((loc, m), whole, ranks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_agree_on_the_bucket_and_split_each_step_disjointly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut whole, mut ranks) = whole_and_ranks(dir.path(), 256, 4, 1).await;
    for _ in 0..60 {
        let all = whole.next_batch().await.unwrap();
        let mut parts = Vec::new();
        for l in ranks.iter_mut() {
            parts.push(l.next_batch().await.unwrap());
        }
        for p in &parts {
            assert_eq!((p.step, p.seq_len), (all.step, all.seq_len));
            assert_eq!(p.n_sequences() as u64 * 4, all.n_sequences() as u64);
            assert_eq!(p.inputs.len(), p.n_sequences() * p.seq_len as usize);
        }
        // Concatenated in rank order, the shares are exactly the whole step.
        let joined: Vec<u64> = parts.iter().flat_map(|p| p.doc_ids.clone()).collect();
        assert_eq!(joined, all.doc_ids);
        let joined_inputs: Vec<u32> = parts.iter().flat_map(|p| p.inputs.clone()).collect();
        assert_eq!(joined_inputs, all.inputs);
        assert_eq!(all.n_sequences() as u64 * all.seq_len, 256);
        // Targets are the inputs shifted by one within each sequence.
        let s = all.seq_len as usize;
        assert_eq!(all.targets[..s - 1], all.inputs[1..s]);
    }
}

/// Dealt by microbatch (for reweighting groups that span replicas):
/// each rank holds its part of every block, and block k of every rank,
/// in rank order, is the k-th block of the whole step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_dealt_by_microbatch_tile_each_block_in_rank_order() {
    let dir = tempfile::tempdir().unwrap();
    let (data, mut whole, mut ranks) = whole_and_ranks(dir.path(), 512, 2, 2).await;
    for _ in 0..40 {
        let all = whole.next_batch().await.unwrap();
        let mut parts = Vec::new();
        for l in ranks.iter_mut() {
            parts.push(l.next_batch().await.unwrap());
        }
        let quarter = all.doc_ids.len() / 4;
        let mut joined = Vec::new();
        for k in 0..2 {
            for p in &parts {
                joined.extend_from_slice(&p.doc_ids[k * quarter..(k + 1) * quarter]);
            }
        }
        assert_eq!(joined, all.doc_ids, "step {}", all.step);
    }
    // A step that cannot be cut so is refused, naming the numbers.
    let c = LoaderConfig {
        deal_blocks: 3,
        ..cfg(grow(), 2, 512, 0, 2)
    };
    let e = Loader::new(data.0, data.1, &c, None)
        .unwrap()
        .next_batch()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("3 microbatches on each of 2"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_are_read_without_replacement_within_an_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (loc, m) = synthetic(dir.path(), 3, 5, 64).await;
    let c = cfg(Curriculum::Named(NamedCurriculum::Uniform), 4, 64, 0, 1);
    let mut loader = Loader::new(loc, m.clone(), &c, None).unwrap();
    let per_epoch = loader.planner().steps_per_epoch();
    // 64 sequences per bucket in 4 parts of 16; batches of 8, 4 and 2.
    assert_eq!(per_epoch, 4 * (2 + 4 + 8));
    let mut seen = HashSet::new();
    for _ in 0..per_epoch {
        let b = loader.next_batch().await.unwrap();
        assert_eq!(b.epoch, 0);
        for (d, o) in b.doc_ids.iter().zip(&b.offsets) {
            assert!(seen.insert((*d, *o)), "sequence {d}@{o} read twice");
        }
    }
    assert_eq!(
        seen.len() as u64,
        m.buckets.iter().map(|b| b.n_sequences).sum::<u64>()
    );
    // Then the next epoch begins.
    assert_eq!(loader.next_batch().await.unwrap().epoch, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_frequencies_follow_the_curriculum_odds() {
    let dir = tempfile::tempdir().unwrap();
    // Enough of every bucket that none runs out in the steps sampled.
    let (_, m) = synthetic(dir.path(), 2, 5, 4096).await;
    for (curriculum, odds) in [
        (NamedCurriculum::GrowP2, [8.0, 4.0, 2.0, 1.0]),
        (NamedCurriculum::GrowLinear, [4.0, 3.0, 2.0, 1.0]),
        (NamedCurriculum::Uniform, [1.0, 1.0, 1.0, 1.0]),
    ] {
        let planner = Planner::new(&m, &cfg(Curriculum::Named(curriculum), 1, 32, 0, 1)).unwrap();
        let mut cursor = planner.start();
        let n = 1000;
        let mut counts = [0f64; 4];
        for _ in 0..n {
            let s = planner.next(&mut cursor).unwrap();
            counts[s.seq_len.trailing_zeros() as usize - 2] += 1.0;
        }
        // Pearson's chi-square against the odds, 3 degrees of freedom: below
        // 16.27 unless the draw is off (p = 0.001).
        let total: f64 = odds.iter().sum();
        let chi2: f64 = counts
            .iter()
            .zip(odds)
            .map(|(c, o)| {
                let e = n as f64 * o / total;
                (c - e).powi(2) / e
            })
            .sum();
        assert!(
            chi2 < 16.27,
            "{curriculum:?}: counts {counts:?}, chi2 {chi2}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_a_cursor_continues_the_same_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (loc, m) = synthetic(dir.path(), 3, 6, 128).await;
    let c = cfg(Curriculum::Named(NamedCurriculum::GrowLinear), 3, 128, 1, 2);
    let mut straight = Loader::new(loc.clone(), m.clone(), &c, None).unwrap();
    let mut expected = Vec::new();
    for _ in 0..120 {
        let b = straight.next_batch().await.unwrap();
        expected.push((b.step, b.seq_len, b.doc_ids, b.inputs));
    }
    let mut first = Loader::new(loc.clone(), m.clone(), &c, None).unwrap();
    let mut got = Vec::new();
    for _ in 0..47 {
        let b = first.next_batch().await.unwrap();
        got.push((b.step, b.seq_len, b.doc_ids, b.inputs));
    }
    // The cursor survives a trip through JSON, as a checkpoint would carry it.
    let saved = serde_json::to_string(first.cursor()).unwrap();
    drop(first);
    let mut resumed = Loader::new(loc, m, &c, Some(serde_json::from_str(&saved).unwrap())).unwrap();
    for _ in 47..120 {
        let b = resumed.next_batch().await.unwrap();
        got.push((b.step, b.seq_len, b.doc_ids, b.inputs));
    }
    assert_eq!(got, expected);
}

/// A cursor saved under another plan is refused with what does not fit,
/// never silently restarted: fewer buckets (a shorter context), fewer
/// cycles, or a count past what its bucket holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_another_plan_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (loc, m) = synthetic(dir.path(), 3, 6, 128).await;
    let c = cfg(Curriculum::Named(NamedCurriculum::GrowLinear), 3, 128, 0, 1);
    let mut loader = Loader::new(loc.clone(), m.clone(), &c, None).unwrap();
    for _ in 0..60 {
        loader.next_batch().await.unwrap();
    }
    let saved = loader.cursor().clone();
    assert!(
        saved.sources[0].cycle > 0,
        "the cursor has left the first cycle"
    );
    let err =
        |cfg: &LoaderConfig, cursor| match Loader::new(loc.clone(), m.clone(), cfg, Some(cursor)) {
            Ok(_) => panic!("a cursor of another plan was taken"),
            Err(e) => e.to_string(),
        };
    let shorter = LoaderConfig {
        max_seq_len: Some(32),
        ..c.clone()
    };
    let e = err(&shorter, saved.clone());
    assert!(
        e.contains("step 60") && e.contains("4 buckets") && e.contains("draw from 3"),
        "{e}"
    );
    let e = err(
        &LoaderConfig {
            cycles: 1,
            ..c.clone()
        },
        saved.clone(),
    );
    assert!(e.contains("cycle") && e.contains("1 cycles"), "{e}");
    let mut over = saved.clone();
    over.sources[0].used[0] = 1_000;
    let e = err(&c, over);
    assert!(
        e.contains("took 1000 sequences from the bucket of 8 tokens"),
        "{e}"
    );
    assert!(Loader::new(loc, m, &c, Some(saved)).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_that_cannot_feed_the_step_is_refused_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (_, m) = synthetic(dir.path(), 3, 4, 4).await;
    // 4 sequences of 8 and of 16 tokens cannot make a step of 1024 tokens.
    let err = Planner::new(
        &m,
        &cfg(Curriculum::Named(NamedCurriculum::Uniform), 1, 1024, 0, 1),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot feed one step of 1024 tokens"),
        "{err}"
    );
    // 24 tokens do not split into sequences of 16.
    let err = Planner::new(
        &m,
        &cfg(Curriculum::Named(NamedCurriculum::Uniform), 1, 24, 0, 1),
    )
    .unwrap_err();
    assert!(err.to_string().contains("tokens_per_step = 24"), "{err}");
    let err =
        Planner::new(&m, &cfg(Curriculum::Odds(vec![1.0, 2.0, 3.0]), 1, 32, 0, 1)).unwrap_err();
    assert!(
        err.to_string()
            .contains("3 odds but the dataset has 2 usable buckets (8, 16)"),
        "{err}"
    );
    let err = Planner::new(
        &m,
        &cfg(Curriculum::Named(NamedCurriculum::Uniform), 1, 32, 2, 2),
    )
    .unwrap_err();
    assert!(err.to_string().contains("dp rank 2"), "{err}");
}

/// A quarter of 200 documents held out: whole documents, never in a
/// bucket, their tokens in order in the held-out object, the same ones for
/// the same seed; the split is recorded and checked like a shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_out_documents_stay_whole_and_out_of_training() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, fraction: f64| {
        let loc = Location::parse(dir.path().join(name).to_str().unwrap(), true).unwrap();
        async move {
            let mut w = DatasetWriter::create(loc.clone(), opts(dd(), 4, 6))
                .await
                .unwrap();
            w.hold_out(fraction).unwrap();
            // Document d: 40 + d % 50 tokens, every one of them d.
            for d in 0..200u32 {
                w.add_document(&vec![d; 40 + (d % 50) as usize])
                    .await
                    .unwrap();
            }
            let m = w.finish().await.unwrap();
            (loc, m)
        }
    };
    let (loc, m) = write("a", 0.25).await;
    let h = m.holdout.clone().unwrap();
    assert!((35..=65).contains(&h.n_documents), "{h:?}");
    let held = read_holdout(&loc, &m).await.unwrap().unwrap();
    assert_eq!(held.len() as u64, h.n_tokens);
    let mut docs: Vec<u32> = held.clone();
    docs.dedup();
    assert_eq!(docs.len() as u64, h.n_documents);
    assert!(docs.windows(2).all(|w| w[0] < w[1]), "documents in order");
    for &d in &docs {
        let n = held.iter().filter(|&&t| t == d).count();
        assert_eq!(n, 40 + (d % 50) as usize, "document {d} whole");
    }
    let trained: std::collections::HashSet<u32> = all_rows(&loc, &m)
        .await
        .into_iter()
        .flat_map(|r| r.1)
        .collect();
    assert!(
        docs.iter().all(|d| !trained.contains(d)),
        "a held-out document was trained on"
    );
    assert_eq!(
        m.n_tokens_in,
        m.buckets.iter().map(|b| b.n_tokens).sum::<u64>() + m.n_tokens_dropped
    );
    // The same seed holds out the same documents; no split, no record.
    let (_, again) = write("b", 0.25).await;
    assert_eq!(again.holdout.as_ref().map(|h| h.crc32), Some(h.crc32));
    let (loc_c, none) = write("c", 0.0).await;
    assert!(none.holdout.is_none());
    assert_eq!(read_holdout(&loc_c, &none).await.unwrap(), None);
    // A damaged split is named.
    std::fs::write(dir.path().join("a").join(&h.key), b"\0\0\0\0").unwrap();
    let e = read_holdout(&loc, &m).await.unwrap_err().to_string();
    assert!(
        e.contains("holdout/tokens.u32le") && e.contains("4 bytes"),
        "{e}"
    );
    // Fractions outside [0, 1) are refused.
    let loc_d = Location::parse(dir.path().join("d").to_str().unwrap(), true).unwrap();
    let mut w = DatasetWriter::create(loc_d, opts(dd(), 4, 6))
        .await
        .unwrap();
    assert!(w.hold_out(1.0).unwrap_err().to_string().contains("below 1"));
}

/// `--holdout-docs`: exactly N of the corpus's documents, chosen by the
/// seed, the same ones again for the same seed; a skipped document chosen
/// leaves the split one short, counted; N must leave training something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_number_of_documents_is_held_out() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, n: u64, skip: Option<u32>| {
        let loc = Location::parse(dir.path().join(name).to_str().unwrap(), true).unwrap();
        async move {
            let mut w = DatasetWriter::create(loc.clone(), opts(dd(), 4, 6))
                .await
                .unwrap();
            w.hold_out_documents(n, 200).unwrap();
            for d in 0..200u32 {
                if Some(d) == skip {
                    w.skip_document();
                } else {
                    w.add_document(&[d; 40]).await.unwrap();
                }
            }
            let m = w.finish().await.unwrap();
            let held = read_holdout(&loc, &m).await.unwrap().unwrap();
            let mut docs = held;
            docs.dedup();
            (m.holdout.unwrap(), docs)
        }
    };
    let (h, docs) = write("a", 17, None).await;
    assert_eq!((h.n_documents, docs.len()), (17, 17));
    assert!((h.fraction - 17.0 / 200.0).abs() < 1e-12);
    let (_, again) = write("b", 17, None).await;
    assert_eq!(again, docs);
    let (h, _) = write("c", 17, Some(docs[3])).await;
    assert_eq!(h.n_documents, 16);
    let loc = Location::parse(dir.path().join("d").to_str().unwrap(), true).unwrap();
    let mut w = DatasetWriter::create(loc, opts(dd(), 4, 6)).await.unwrap();
    let e = w.hold_out_documents(200, 200).unwrap_err().to_string();
    assert!(
        e.contains("leave at least one for training (the corpus has 200)"),
        "{e}"
    );
}

/// Shards and manifests on shared storage may be damaged or crafted with
/// matching checksums: decoding gives rows or an error naming the object,
/// never a panic, and no buffer is sized by a claimed count.
mod adversarial {
    use super::*;
    use proptest::prelude::*;
    use strata_dataplane::manifest::ShardInfo;
    use strata_dataplane::reader::decode_shard;

    /// A real shard's bytes and its manifest entry.
    fn a_shard() -> (Vec<u8>, ShardInfo, usize) {
        static SHARD: std::sync::OnceLock<(Vec<u8>, ShardInfo, usize)> = std::sync::OnceLock::new();
        SHARD
            .get_or_init(|| {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async {
                    let out = tempfile::tempdir().unwrap();
                    let loc = Location::parse(out.path().to_str().unwrap(), true).unwrap();
                    let mut w = DatasetWriter::create(loc, opts(dd(), 4, 6)).await.unwrap();
                    w.add_document(&(0..500).collect::<Vec<u32>>())
                        .await
                        .unwrap();
                    let m = w.finish().await.unwrap();
                    let b = &m.buckets[2];
                    let bytes = std::fs::read(out.path().join(&b.shards[0].key)).unwrap();
                    (bytes, b.shards[0].clone(), b.seq_len as usize + 1)
                })
            })
            .clone()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Bytes changed (and the checksum made to match), or cut short.
        #[test]
        fn damaged_shards_are_named_errors(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let (mut bytes, mut info, row_len) = a_shard();
            for (at, v) in edits {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len()));
            }
            info.bytes = bytes.len() as u64;
            info.crc32 = crc32fast::hash(&bytes);
            let got = std::panic::catch_unwind(|| {
                decode_shard("file:///d/shard", bytes::Bytes::from(bytes), &info, row_len)
            });
            prop_assert!(got.is_ok(), "decoding panicked");
            if let Ok(Err(e)) = got {
                prop_assert!(e.to_string().contains("file:///d/shard"), "{e}");
            }
        }

        /// A dataset manifest of any bytes.
        #[test]
        fn any_manifest_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let out = tempfile::tempdir().unwrap();
            std::fs::write(out.path().join("manifest.json"), &bytes).unwrap();
            let loc = Location::parse(out.path().to_str().unwrap(), false).unwrap();
            let _ = rt.block_on(read_manifest(&loc));
        }
    }
}

/// Three sources (`per_bucket` sequences of 8 to 64 tokens each) weighed
/// `weights`, with `phases` after them.
fn mixture_cfg(
    weights: &[f64],
    phases: &[(u64, &[f64])],
    exhausted: &[Exhausted],
    rank: u32,
    size: u32,
) -> LoaderConfig {
    let names = ["web", "code", "math"];
    let mut all = vec![MixPhase {
        at_tokens: 0,
        weights: weights.to_vec(),
    }];
    all.extend(phases.iter().map(|(at, w)| MixPhase {
        at_tokens: *at,
        weights: w.to_vec(),
    }));
    LoaderConfig {
        mixture: Mixture {
            sources: (0..weights.len())
                .map(|i| SourceRule {
                    name: names[i].into(),
                    exhausted: exhausted[i],
                })
                .collect(),
            phases: all,
        },
        ..cfg(
            Curriculum::Named(NamedCurriculum::Uniform),
            2,
            1280,
            rank,
            size,
        )
    }
}

async fn three_sources(dir: &Path, per_bucket: [u64; 3]) -> Vec<(Location, Manifest)> {
    let mut out = Vec::new();
    for (i, n) in per_bucket.into_iter().enumerate() {
        let sub = dir.join(format!("s{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        out.push(synthetic(&sub, 3, 6, n).await);
    }
    out
}

/// (source, doc id) of every row of a batch, in row order.
fn rows_by_source(b: &strata_dataplane::loader::Batch) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(s, n) in &b.runs {
        out.extend(b.doc_ids[at..at + n].iter().map(|&d| (s, d)));
        at += n;
    }
    assert_eq!(at, b.n_sequences(), "the runs cover the rows");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixture_gives_every_source_its_share_to_one_sequence_under_any_layout() {
    let dir = tempfile::tempdir().unwrap();
    let data = three_sources(dir.path(), [3000, 3000, 3000]).await;
    let weights = [0.5, 0.3, 0.2];
    let later: &[f64] = &[0.2, 0.2, 0.6];
    let phases = [(1280 * 30, later)];
    let stop = [Exhausted::Stop; 3];
    let mut whole = Loader::mixture(
        data.clone(),
        &mixture_cfg(&weights, &phases, &stop, 0, 1),
        None,
    )
    .unwrap();
    let mut ranks: Vec<Loader> = (0..4)
        .map(|r| {
            Loader::mixture(
                data.clone(),
                &mixture_cfg(&weights, &phases, &stop, r, 4),
                None,
            )
            .unwrap()
        })
        .collect();
    let mut lengths = HashSet::new();
    let mut seen = HashSet::new();
    for step in 0..60u64 {
        let all = whole.next_batch().await.unwrap();
        lengths.insert(all.seq_len);
        let n = all.n_sequences_global;
        assert_eq!(n * all.seq_len, 1280);
        assert_eq!(all.source_sequences.iter().sum::<u64>(), n);
        let w = if step < 30 { &weights[..] } else { later };
        for (s, (&got, &w)) in all.source_sequences.iter().zip(w).enumerate() {
            let want = w * n as f64;
            assert!(
                (got as f64 - want).abs() < 1.0,
                "step {step}: source {s} has {got} of {n} sequences, its weight {w} asks {want}"
            );
        }
        // Each source's rows are its own, in source order, never repeated.
        let rows = rows_by_source(&all);
        for (s, d) in &rows {
            assert!(seen.insert((*s, *d)), "{s}/{d} twice");
        }
        let mut counts = vec![0u64; 3];
        rows.iter().for_each(|(s, _)| counts[*s] += 1);
        assert_eq!(counts, all.source_sequences);
        // Four ranks' shares, in rank order, are the step.
        let mut joined = Vec::new();
        for l in ranks.iter_mut() {
            let b = l.next_batch().await.unwrap();
            assert_eq!(
                (b.step, b.seq_len, &b.source_sequences),
                (all.step, all.seq_len, &all.source_sequences)
            );
            joined.extend(rows_by_source(&b));
        }
        assert_eq!(joined, rows);
    }
    assert!(
        lengths.len() > 2,
        "the curriculum drew several lengths: {lengths:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixture_resumed_with_new_weights_continues_each_source_from_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let data = three_sources(dir.path(), [2000, 2000, 2000]).await;
    let cycle = [Exhausted::Cycle; 3];
    let before = mixture_cfg(&[0.5, 0.3, 0.2], &[], &cycle, 0, 1);
    let mut first = Loader::mixture(data.clone(), &before, None).unwrap();
    let mut read: Vec<HashSet<u64>> = vec![HashSet::new(); 3];
    for _ in 0..25 {
        let b = first.next_batch().await.unwrap();
        for (s, d) in rows_by_source(&b) {
            assert!(read[s].insert(d));
        }
    }
    let saved: strata_dataplane::loader::Cursor =
        serde_json::from_str(&serde_json::to_string(first.cursor()).unwrap()).unwrap();
    // The same weights resume exactly where the run was.
    let mut straight = first;
    let mut same = Loader::mixture(data.clone(), &before, Some(saved.clone())).unwrap();
    for _ in 0..10 {
        let (a, b) = (
            straight.next_batch().await.unwrap(),
            same.next_batch().await.unwrap(),
        );
        assert_eq!((a.step, rows_by_source(&a)), (b.step, rows_by_source(&b)));
    }
    // New weights: the shares follow them at once, and no source repeats
    // a sequence it had read in this epoch.
    let after = mixture_cfg(&[0.1, 0.1, 0.8], &[], &cycle, 0, 1);
    let mut resumed = Loader::mixture(data.clone(), &after, Some(saved)).unwrap();
    for _ in 0..10 {
        let b = resumed.next_batch().await.unwrap();
        let n = b.n_sequences_global as f64;
        assert!((b.source_sequences[2] as f64 - 0.8 * n).abs() < 1.0);
        for (s, d) in rows_by_source(&b) {
            assert!(read[s].insert(d), "source {s} reread {d} after the resume");
        }
    }
    // Another number of sources is refused, naming it.
    let two = LoaderConfig {
        mixture: Mixture {
            sources: after.mixture.sources[..2].to_vec(),
            phases: vec![MixPhase {
                at_tokens: 0,
                weights: vec![1.0, 1.0],
            }],
        },
        ..after.clone()
    };
    let e = Loader::mixture(data[..2].to_vec(), &two, Some(resumed.cursor().clone()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("holds 3 sources' positions, but the recipe has 2"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_runs_out_starts_over_or_stops_the_run_by_name() {
    let dir = tempfile::tempdir().unwrap();
    // `code` is small: a tenth of the others.
    let data = three_sources(dir.path(), [2000, 200, 2000]).await;
    let weights = [0.4, 0.3, 0.3];
    let rules = [Exhausted::Cycle, Exhausted::Stop, Exhausted::Cycle];
    let mut stops = Loader::mixture(
        data.clone(),
        &mixture_cfg(&weights, &[], &rules, 0, 1),
        None,
    )
    .unwrap();
    let mut steps = 0;
    let err = loop {
        match stops.next_batch().await {
            Ok(_) => steps += 1,
            Err(e) => break e,
        }
        assert!(steps < 1000, "code never ran out");
    };
    let e = err.to_string();
    assert!(
        e.contains("source code ran out of sequences at step")
            && e.contains("exhausted = \"stop\""),
        "{e}"
    );
    assert!(matches!(err, LoaderError::RanOut { step, .. } if step == steps + 1));
    // With "cycle", it starts a second epoch and the run goes on.
    let cycles = [Exhausted::Cycle; 3];
    let mut goes_on =
        Loader::mixture(data, &mixture_cfg(&weights, &[], &cycles, 0, 1), None).unwrap();
    for _ in 0..steps + 20 {
        goes_on.next_batch().await.unwrap();
    }
    assert_eq!(goes_on.cursor().sources[1].epoch, 1);
    assert_eq!(goes_on.cursor().sources[0].epoch, 0);
}

#[test]
fn apportioned_shares_are_within_one_of_the_quota_and_sum_to_the_whole() {
    use strata_dataplane::loader::apportion;
    assert_eq!(apportion(10, &[0.5, 0.3, 0.2]), [5, 3, 2]);
    assert_eq!(apportion(7, &[0.5, 0.3, 0.2]), [4, 2, 1]);
    assert_eq!(apportion(1, &[0.5, 0.5]), [1, 0]);
    assert_eq!(apportion(3, &[0.0, 1.0]), [0, 3]);
    let mut rng = strata_dataplane::rng::SplitMix64::new(3);
    for _ in 0..2000 {
        let k = 1 + rng.below(6) as usize;
        let raw: Vec<f64> = (0..k).map(|_| rng.next_f64()).collect();
        let sum: f64 = raw.iter().sum();
        let w: Vec<f64> = raw.iter().map(|x| x / sum).collect();
        let n = rng.below(5000);
        let got = apportion(n, &w);
        assert_eq!(got.iter().sum::<u64>(), n);
        for (g, w) in got.iter().zip(&w) {
            assert!(
                (*g as f64 - w * n as f64).abs() < 1.0,
                "{got:?} for {w:?} of {n}"
            );
        }
    }
}

/// Sources whose short buckets are too small for their shares block
/// each other's lengths: the one in the way that has read part of its
/// cycle moves on (here, past its end: a "stop" source runs out), never
/// one that has just started its cycle, which would block as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_blocking_each_other_move_on_the_one_that_can() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = Vec::new();
    // web: 2 sequences of 8 and of 16 tokens, 400 of 32; code: 400 of 8
    // and 16, 3 of 32.
    for (name, per) in [("web", [2u64, 2, 400]), ("code", [400, 400, 3])] {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let loc = Location::parse(sub.to_str().unwrap(), true).unwrap();
        let mut w = DatasetWriter::create(loc.clone(), opts(dd(), 3, 5))
            .await
            .unwrap();
        let mut id = 0u32;
        for (k, n) in (3..=5).zip(per) {
            for _ in 0..n {
                w.add_document(&vec![id; (1usize << k) + 1]).await.unwrap();
                id += 1;
            }
        }
        data.push((loc, w.finish().await.unwrap()));
    }
    let rules = [Exhausted::Cycle, Exhausted::Stop];
    let mut c = mixture_cfg(&[0.5, 0.5], &[], &rules, 0, 1);
    c.tokens_per_step = 128;
    c.cycles = 1;
    let mut loader = Loader::mixture(data, &c, None).unwrap();
    let mut steps = 0u64;
    let err = loop {
        match loader.next_batch().await {
            Ok(b) => {
                // Only 32-token steps can be fed: web lacks short sequences.
                assert_eq!(b.seq_len, 32);
                steps += 1;
            }
            Err(e) => break e,
        }
    };
    // code's 3 sequences of 32 feed its 2 per step once.
    assert_eq!(steps, 1);
    assert!(
        matches!(&err, LoaderError::RanOut { source_name, step: 2, .. } if source_name == "code"),
        "{err}"
    );
}
