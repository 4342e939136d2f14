//! Checkpoints through real files: a run stopped after a checkpoint and
//! resumed continues bit for bit on the same layout, within 1e-4 on
//! another one (resharded from the logical slices), and falls back past a
//! corrupt or truncated checkpoint to the one before, on every rank at
//! once. Ranks run on threads, joined by the in-process backend.

mod common;

use std::ops::RangeInclusive;

use burn::backend::{Autodiff, Flex};
use common::{LR, adamw, micro, rank_batch, tiny};
use strata_dataplane::store::Location;
use strata_recipe::{Coords, Layout, ModelConfig};
use strata_worker::checkpoint::{
    self, FORMAT, Manifest, SavedLayout, Saver, Snapshot, VERSION, step_dir,
};
use strata_worker::params::ParamTable;
use strata_worker::train::{Groups, Trainer};

type B = Autodiff<Flex>;

const TOKENS: usize = 512;
const ROOT: &str = "job-7";

/// A run's per-step losses and gradient norms, by step number.
#[derive(Debug, Default, PartialEq)]
struct Losses {
    steps: Vec<u64>,
    losses: Vec<f64>,
    norms: Vec<f64>,
}

/// What a resumed segment saw.
struct Segment {
    losses: Losses,
    /// The checkpoint it started from, and the newer ones it passed over.
    resumed_from: Option<u64>,
    skipped: Vec<(u64, String)>,
}

/// Trains `steps` under `layout` with `m` microbatches per replica,
/// resuming from the newest readable checkpoint under `ROOT` when `resume`,
/// and saving after each step in `save` (every rank writes its part in the
/// background; the manifests are committed once all ranks are done).
fn segment(
    cfg: &ModelConfig,
    layout: Layout,
    m: usize,
    steps: RangeInclusive<u64>,
    loc: &Location,
    resume: bool,
    save: &[u64],
) -> Segment {
    segment_sharded(cfg, layout, m, steps, loc, resume, save, false)
}

/// [`segment`], the optimizer sharded over the data-parallel group when
/// `sharded` (ZeRO-1).
#[allow(clippy::too_many_arguments)]
fn segment_sharded(
    cfg: &ModelConfig,
    layout: Layout,
    m: usize,
    steps: RangeInclusive<u64>,
    loc: &Location,
    resume: bool,
    save: &[u64],
    sharded: bool,
) -> Segment {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let world = Groups::local_world(layout, cfg.tie_embeddings, 1);
    let candidates = if resume {
        rt.block_on(checkpoint::list(loc, ROOT)).unwrap().0
    } else {
        Vec::new()
    };
    let handle = rt.handle().clone();
    let results = std::thread::scope(|s| {
        let ranks: Vec<_> = world
            .into_iter()
            .map(|(c, groups)| {
                let (steps, candidates, handle) = (steps.clone(), &candidates, handle.clone());
                s.spawn(move || {
                    let table = ParamTable::new(cfg, layout, c);
                    let mut trainer = Trainer::<B>::new(
                        cfg,
                        table.clone(),
                        7,
                        adamw(),
                        groups,
                        Default::default(),
                    )
                    .with_sharded_optimizer(sharded);
                    assert_eq!(trainer.shards_optimizer(), sharded && layout.dp > 1);
                    let (mut from, mut skipped) = (None, Vec::new());
                    if resume {
                        let r = checkpoint::resume_agreed(
                            &handle,
                            loc,
                            ROOT,
                            candidates,
                            &table,
                            |ok| trainer.all_ok(ok).map_err(|e| e.to_string()),
                        )
                        .unwrap()
                        .expect("a readable checkpoint");
                        assert_eq!(
                            r.manifest.step + 1,
                            *steps.start(),
                            "resumed where it stopped"
                        );
                        trainer.restore(&r.restored.master, &r.restored.state);
                        from = Some(r.manifest.step);
                        skipped = r.skipped;
                    }
                    let mut saver = Saver::new(loc.clone(), ROOT.to_string(), handle.clone());
                    let mut out = Losses::default();
                    let mut saved = Vec::new();
                    for step in steps {
                        let i = step as usize - 1;
                        let (inputs, targets, seq) = rank_batch(i, TOKENS, layout.dp, c.dp);
                        let micro = micro(&inputs, &targets, m, seq);
                        let st = trainer.step(step, &micro, TOKENS as u64, LR).unwrap();
                        out.steps.push(step);
                        out.losses.push(st.loss);
                        out.norms.push(st.grad_norm);
                        if save.contains(&step) {
                            // Every rank gathers (a sharded optimizer's
                            // moments are all-gathered over dp).
                            let state = trainer.optimizer_state().unwrap();
                            let snap =
                                Snapshot::take(step, 1, &table, c.dp, || (trainer.master(), state));
                            saved.extend(saver.save(snap).0.into_iter().map(|r| r.unwrap()));
                        }
                    }
                    saved.extend(saver.wait().into_iter().map(|r| r.unwrap()));
                    (c, out, saved, from, skipped)
                })
            })
            .collect();
        ranks
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect::<Vec<_>>()
    });
    // Commit each saved step once every rank's files are written.
    for &step in save {
        let shards: Vec<_> = results
            .iter()
            .flat_map(|(_, _, saved, _, _)| saved.iter().filter(|s| s.step == step))
            .flat_map(|s| s.shards.clone())
            .collect();
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            job: ROOT.into(),
            attempt: 0,
            step,
            tokens_seen: step * TOKENS as u64,
            optimizer_steps: step,
            layout: SavedLayout {
                tp: layout.tp,
                pp: layout.pp,
                dp: layout.dp,
                virtual_stages: 1,
            },
            model: *cfg,
            recipe: String::new(),
            data: None,
            shards,
            written_at: 0,
        };
        rt.block_on(checkpoint::commit(loc, ROOT, &manifest))
            .unwrap();
    }
    let first = &results[0];
    for (c, l, _, f, _) in &results {
        assert_eq!(l, &first.1, "{layout}: rank {c:?} reports the same losses");
        assert_eq!(
            f, &first.3,
            "{layout}: rank {c:?} resumed from the same step"
        );
    }
    let (_, losses, _, resumed_from, skipped) = results.into_iter().next().unwrap();
    Segment {
        losses,
        resumed_from,
        skipped,
    }
}

fn files() -> (tempfile::TempDir, Location) {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::parse(dir.path().to_str().unwrap(), false).unwrap();
    (dir, loc)
}

fn tail(l: &Losses, from: u64) -> Losses {
    let keep: Vec<usize> = (0..l.steps.len()).filter(|&i| l.steps[i] >= from).collect();
    Losses {
        steps: keep.iter().map(|&i| l.steps[i]).collect(),
        losses: keep.iter().map(|&i| l.losses[i]).collect(),
        norms: keep.iter().map(|&i| l.norms[i]).collect(),
    }
}

/// 20 steps straight against 10, a checkpoint, and 10 more from it.
fn bit_exact(cfg: &ModelConfig, layout: Layout, m: usize) {
    let (_d1, loc) = files();
    let straight = segment(cfg, layout, m, 1..=20, &loc, false, &[]);
    let (_d2, loc) = files();
    let first = segment(cfg, layout, m, 1..=10, &loc, false, &[10]);
    assert_eq!(first.losses, tail(&straight.losses, 1).with_steps(1..=10));
    let resumed = segment(cfg, layout, m, 11..=20, &loc, true, &[]);
    assert_eq!(resumed.resumed_from, Some(10));
    assert!(resumed.skipped.is_empty());
    // Bit for bit: the same f64s.
    assert_eq!(resumed.losses, tail(&straight.losses, 11), "{layout}");
}

impl Losses {
    fn with_steps(&self, r: RangeInclusive<u64>) -> Losses {
        let keep: Vec<usize> = (0..self.steps.len())
            .filter(|&i| r.contains(&self.steps[i]))
            .collect();
        Losses {
            steps: keep.iter().map(|&i| self.steps[i]).collect(),
            losses: keep.iter().map(|&i| self.losses[i]).collect(),
            norms: keep.iter().map(|&i| self.norms[i]).collect(),
        }
    }
}

#[test]
fn resume_is_bit_exact_in_one_process() {
    bit_exact(&tiny(false), Layout::new(1, 1, 1), 1);
}

#[test]
fn resume_is_bit_exact_under_tp2_pp2_dp2() {
    bit_exact(&tiny(true), Layout::new(2, 2, 2), 2);
}

/// ZeRO-1 changes nothing a checkpoint holds: saved with the optimizer
/// sharded, resumed without, and the reverse, both continue bit for bit
/// like the uninterrupted unsharded run.
#[test]
fn a_sharded_optimizer_checkpoint_resumes_without_it_and_the_reverse() {
    let cfg = tiny(true);
    let layout = Layout::new(1, 2, 2);
    let (_d, loc) = files();
    let straight = segment(&cfg, layout, 2, 1..=12, &loc, false, &[]);
    for (before, after) in [(true, false), (false, true)] {
        let (_d, loc) = files();
        let first = segment_sharded(&cfg, layout, 2, 1..=6, &loc, false, &[6], before);
        assert_eq!(first.losses, straight.losses.with_steps(1..=6));
        let resumed = segment_sharded(&cfg, layout, 2, 7..=12, &loc, true, &[], after);
        assert_eq!(resumed.resumed_from, Some(6));
        assert_eq!(
            resumed.losses,
            tail(&straight.losses, 7),
            "sharded {before} then {after}"
        );
    }
}

/// Saved at (tp 2, pp 2, dp 1), resumed at (1, 1, 2) and (1, 2, 2): the
/// losses follow the uninterrupted run within 1e-4.
#[test]
fn resume_on_another_layout_reshards() {
    let cfg = tiny(true);
    let saved_at = Layout::new(2, 2, 1);
    let (_d1, loc) = files();
    let straight = segment(&cfg, saved_at, 2, 1..=20, &loc, false, &[]);
    let (_d2, loc) = files();
    segment(&cfg, saved_at, 2, 1..=10, &loc, false, &[10]);
    for layout in [Layout::new(1, 1, 2), Layout::new(1, 2, 2)] {
        let resumed = segment(&cfg, layout, 2, 11..=20, &loc, true, &[]);
        assert_eq!(resumed.resumed_from, Some(10));
        let want = tail(&straight.losses, 11);
        for (s, (x, y)) in resumed.losses.losses.iter().zip(&want.losses).enumerate() {
            let rel = (x - y).abs() / y.abs();
            assert!(
                rel < 1e-4,
                "{layout}: step {} loss {x} vs {y} (rel {rel:e})",
                s + 11
            );
        }
    }
}

/// A run starting from another's weights reads only the model files: with
/// the optimizer's files gone, the weights still read, on any layout, equal
/// to what a resume restores; a resume needs them and names the file.
#[test]
fn weights_alone_are_read_without_the_optimizer_files() {
    let cfg = tiny(false);
    let (dir, loc) = files();
    segment(&cfg, Layout::new(2, 2, 1), 1, 1..=4, &loc, false, &[4]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (found, _) = rt.block_on(checkpoint::list(&loc, ROOT)).unwrap();
    let m = &found[0];
    let whole = ParamTable::whole(&cfg);
    let full = rt
        .block_on(checkpoint::read_rank(&loc, ROOT, m, &whole))
        .unwrap();
    std::fs::remove_dir_all(dir.path().join(ROOT).join(step_dir(4)).join("optim")).unwrap();
    for layout in [Layout::new(1, 1, 1), Layout::new(1, 2, 2)] {
        for pp in 0..layout.pp {
            let table = ParamTable::new(&cfg, layout, Coords { dp: 0, pp, tp: 0 });
            let got = rt
                .block_on(checkpoint::read_weights(&loc, ROOT, m, &table))
                .unwrap();
            for slot in &table.slots {
                let want = ParamTable::shard_of(
                    slot,
                    &full.master[whole.get(&slot.spec.name).unwrap().range()],
                );
                assert_eq!(
                    &got[slot.range()],
                    &want[..],
                    "{layout} pp {pp}: {}",
                    slot.spec.name
                );
            }
        }
    }
    let e = rt
        .block_on(checkpoint::read_rank(&loc, ROOT, m, &whole))
        .unwrap_err()
        .to_string();
    assert!(e.contains("optim/a1-pp00-tp00.safetensors"), "{e}");
}

/// A corrupt and a truncated file each make their checkpoint unusable:
/// every rank falls back to the newest readable one, and says why.
#[test]
fn a_corrupt_checkpoint_falls_back_to_the_one_before() {
    let cfg = tiny(false);
    let layout = Layout::new(2, 1, 1);
    let (dir, loc) = files();
    let straight = segment(&cfg, layout, 1, 1..=10, &loc, false, &[4, 6, 8]);
    let ck = |step: u64, file: &str| dir.path().join(ROOT).join(step_dir(step)).join(file);
    // Step 8: one flipped byte in tp rank 1's optimizer file.
    let path = ck(8, "optim/a1-pp00-tp01.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    // Step 6: tp rank 0's model file cut short.
    let path = ck(6, "model/a1-pp00-tp00.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

    let resumed = segment(&cfg, layout, 1, 5..=10, &loc, true, &[]);
    assert_eq!(resumed.resumed_from, Some(4));
    let steps: Vec<u64> = resumed.skipped.iter().map(|s| s.0).collect();
    assert_eq!(steps, [8, 6]);
    // Rank 0 reads both files of a step only where it needs them: its own
    // tp slice. It saw step 6's truncation itself and step 8 through its
    // peer's refusal.
    assert!(
        resumed.skipped[1].1.contains("a1-pp00-tp00.safetensors")
            && resumed.skipped[1].1.contains("bytes"),
        "{:?}",
        resumed.skipped
    );
    assert!(
        resumed.skipped[0].1.contains("another rank"),
        "{:?}",
        resumed.skipped
    );
    assert_eq!(resumed.losses, tail(&straight.losses, 5));
}

/// A checkpoint whose manifest was never written does not exist; pruning
/// keeps the newest complete ones and deletes the rest, manifest first.
#[test]
fn only_committed_checkpoints_exist_and_pruning_keeps_the_newest() {
    let cfg = tiny(false);
    let layout = Layout::new(1, 1, 1);
    let (dir, loc) = files();
    segment(&cfg, layout, 1, 1..=6, &loc, false, &[2, 4, 6]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Files of a step 7 that nobody committed.
    std::fs::create_dir_all(dir.path().join(ROOT).join(step_dir(7)).join("model")).unwrap();
    std::fs::write(
        dir.path()
            .join(ROOT)
            .join(step_dir(7))
            .join("model/a1-pp00-tp00.safetensors"),
        b"half",
    )
    .unwrap();
    let (found, unreadable) = rt.block_on(checkpoint::list(&loc, ROOT)).unwrap();
    assert!(unreadable.is_empty());
    assert_eq!(found.iter().map(|m| m.step).collect::<Vec<_>>(), [2, 4, 6]);
    let m = &found[2];
    assert_eq!(m.shards.len(), 2, "one model and one optimizer file");
    assert_eq!(m.bytes(), m.shards.iter().map(|s| s.bytes).sum::<u64>());
    let deleted = rt.block_on(checkpoint::prune(&loc, ROOT, 2, &[])).unwrap();
    assert_eq!(deleted, [2]);
    assert!(
        !dir.path()
            .join(ROOT)
            .join(step_dir(2))
            .join("manifest.json")
            .exists()
    );
    assert!(
        !dir.path()
            .join(ROOT)
            .join(step_dir(2))
            .join("model/a1-pp00-tp00.safetensors")
            .exists()
    );
    let (found, _) = rt.block_on(checkpoint::list(&loc, ROOT)).unwrap();
    assert_eq!(found.iter().map(|m| m.step).collect::<Vec<_>>(), [4, 6]);
    // A pinned step (a branch point) is neither deleted nor counted.
    let deleted = rt.block_on(checkpoint::prune(&loc, ROOT, 1, &[4])).unwrap();
    assert!(deleted.is_empty(), "{deleted:?}");
    let deleted = rt.block_on(checkpoint::prune(&loc, ROOT, 0, &[4])).unwrap();
    assert_eq!(deleted, [6]);
    let (found, _) = rt.block_on(checkpoint::list(&loc, ROOT)).unwrap();
    assert_eq!(found.iter().map(|m| m.step).collect::<Vec<_>>(), [4]);
}

/// Every element is written once: the manifest of a (2, 2, 2) tied run
/// covers each parameter and moment exactly, with no file from a
/// data-parallel replica or the tied embedding's mirror; a manifest
/// missing a file is refused at commit, naming the parameter.
#[test]
fn every_element_is_written_once() {
    let cfg = tiny(true);
    let (_d, loc) = files();
    segment(&cfg, Layout::new(2, 2, 2), 2, 1..=1, &loc, false, &[1]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (found, _) = rt.block_on(checkpoint::list(&loc, ROOT)).unwrap();
    let m = &found[0];
    checkpoint::check_complete(m).unwrap();
    let keys: Vec<&str> = m.shards.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        keys.len(),
        8,
        "model and optim files for each of 4 (pp, tp) places: {keys:?}"
    );
    let mut partial = m.clone();
    partial
        .shards
        .retain(|s| s.key != "model/a1-pp01-tp01.safetensors");
    partial.step = 2;
    let e = rt
        .block_on(checkpoint::commit(&loc, ROOT, &partial))
        .unwrap_err()
        .to_string();
    assert!(e.contains("step 2") && e.contains("Param"), "{e}");
    let (found, _) = rt.block_on(checkpoint::list(&loc, ROOT)).unwrap();
    assert_eq!(found.len(), 1, "the refused manifest was not written");
}

/// One saved checkpoint (step 1, one rank) to damage: its folder, the
/// committed manifest and the rank's table.
struct Saved {
    _dir: tempfile::TempDir,
    loc: Location,
    manifest: Manifest,
    table: ParamTable,
    root: std::path::PathBuf,
}

fn saved_once() -> &'static std::sync::Mutex<Saved> {
    static SAVED: std::sync::OnceLock<std::sync::Mutex<Saved>> = std::sync::OnceLock::new();
    SAVED.get_or_init(|| {
        let cfg = tiny(false);
        let layout = Layout::new(1, 1, 1);
        let (dir, loc) = files();
        segment(&cfg, layout, 1, 1..=1, &loc, false, &[1]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let manifest = rt
            .block_on(checkpoint::list(&loc, ROOT))
            .unwrap()
            .0
            .remove(0);
        let coords = Groups::local_world(layout, cfg.tie_embeddings, 1)
            .into_iter()
            .next()
            .unwrap()
            .0;
        let root = dir.path().join(ROOT).join(step_dir(manifest.step));
        std::sync::Mutex::new(Saved {
            _dir: dir,
            loc,
            manifest,
            table: ParamTable::new(&cfg, layout, coords),
            root,
        })
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// A safetensors file whose header was crafted (its length word, bytes
    /// of its JSON), with a manifest that vouches for it (size and CRC
    /// recomputed): reading it is a named error or a restore, never a
    /// panic or an allocation the header sizes.
    #[test]
    fn a_crafted_safetensors_header_is_an_error_not_a_panic(
        shard in 0usize..4,
        length in proptest::option::of(proptest::prelude::any::<u64>()),
        edits in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..12),
    ) {
        let saved = saved_once().lock().unwrap_or_else(|e| e.into_inner());
        let mut manifest = saved.manifest.clone();
        let i = shard % manifest.shards.len();
        let path = saved.root.join(&manifest.shards[i].key);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        if let Some(n) = length {
            bytes[..8].copy_from_slice(&n.to_le_bytes());
        }
        for (at, b) in edits {
            let at = 8 + at % header.min(bytes.len() - 8);
            bytes[at] = b;
        }
        std::fs::write(&path, &bytes).unwrap();
        manifest.shards[i].bytes = bytes.len() as u64;
        manifest.shards[i].crc32 = crc32fast::hash(&bytes);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let read = rt.block_on(checkpoint::read_rank(&saved.loc, ROOT, &manifest, &saved.table));
        std::fs::write(&path, &original).unwrap();
        if let Err(e) = read {
            proptest::prop_assert!(!e.to_string().is_empty());
        }
    }
}
