//! Checkpoints on a real S3-compatible server over HTTP: written by a
//! tensor-parallel pair, read back by one process with every element in
//! place; failed writes retried, a save that cannot be written reported
//! without stopping the next; a corrupt object named.

use std::time::Duration;

use burn::backend::{Autodiff, Flex};
use strata_dataplane::store::Location;
use strata_recipe::{AdamWConfig, Layout, ModelConfig};
use strata_tests::s3::S3Server;
use strata_worker::checkpoint::{
    self, FORMAT, Manifest, SavedLayout, Saver, Snapshot, VERSION, read_rank,
};
use strata_worker::params::ParamTable;
use strata_worker::train::{Groups, LocalBatch, Trainer};

type B = Autodiff<Flex>;

const ROOT: &str = "job-3";

fn model() -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        d_model: 32,
        n_heads: 4,
        n_kv_heads: 2,
        d_ffn: 64,
        vocab_size: 250,
        padded_vocab_size: 256,
        max_seq_len: 16,
        rope_theta: 10000.0,
        tie_embeddings: false,
    }
}

fn adamw() -> AdamWConfig {
    AdamWConfig::default()
}

/// Two steps under tp = 2, so that the moments are not zero; each rank's
/// snapshot of step 2 and its (master, table) for comparison.
fn trained_pair() -> Vec<(Snapshot, Vec<f32>, ParamTable)> {
    let cfg = model();
    let layout = Layout::new(2, 1, 1);
    let world = Groups::local_world(layout, false, 1);
    std::thread::scope(|s| {
        let ranks: Vec<_> = world
            .into_iter()
            .map(|(c, groups)| {
                s.spawn(move || {
                    let table = ParamTable::new(&cfg, layout, c);
                    let mut t = Trainer::<B>::new(
                        &cfg,
                        table.clone(),
                        5,
                        adamw(),
                        groups,
                        Default::default(),
                    );
                    let inputs: Vec<u32> = (0..64).map(|i| (i * 7 % 250) as u32).collect();
                    let targets: Vec<u32> = (0..64).map(|i| ((i + 1) * 7 % 250) as u32).collect();
                    for step in 1..=2 {
                        let micro = [LocalBatch {
                            inputs: &inputs,
                            targets: &targets,
                            seq_len: 16,
                            groups: &[],
                        }];
                        t.step(step, &micro, 64, 1e-3).unwrap();
                    }
                    let snap = Snapshot::take(2, 1, &table, c.dp, || {
                        (t.master(), t.held_optimizer_state())
                    });
                    (snap, t.master(), table)
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn manifest(shards: Vec<checkpoint::ShardRecord>) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        job: ROOT.into(),
        attempt: 1,
        step: 2,
        tokens_seen: 128,
        optimizer_steps: 2,
        layout: SavedLayout {
            tp: 2,
            pp: 1,
            dp: 1,
            virtual_stages: 1,
        },
        model: model(),
        recipe: String::new(),
        data: None,
        shards,
        written_at: 0,
    }
}

#[test]
fn checkpoints_on_s3_survive_failed_writes_and_name_corrupt_objects() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3Server::start(&["ckpt"]));
    // The store's own retries off: every failure reaches the saver.
    let mut opts = server.store_options(Duration::from_secs(1));
    opts.max_retries = 0;
    let loc = Location::open("s3://ckpt/runs", false, &opts).unwrap();
    let ranks = trained_pair();

    // Two failed PUTs are retried; the files land.
    server.fail_next_puts(2);
    let mut shards = Vec::new();
    let mut retries = 0;
    for (snap, _, _) in &ranks {
        let saved = rt
            .block_on(checkpoint::write_snapshot(&loc, ROOT, snap))
            .unwrap();
        retries += saved.retries;
        shards.extend(saved.shards);
    }
    assert_eq!(retries, 2);
    rt.block_on(checkpoint::commit(&loc, ROOT, &manifest(shards)))
        .unwrap();
    let (found, _) = rt.block_on(checkpoint::list(&loc, ROOT)).unwrap();
    assert_eq!(found.len(), 1);

    // One process reads the pair's checkpoint: every element in place.
    let whole = ParamTable::whole(&model());
    let restored = rt
        .block_on(read_rank(&loc, ROOT, &found[0], &whole))
        .unwrap();
    for slot in &whole.slots {
        let mut want = vec![f32::NAN; slot.spec.full_shape.iter().product()];
        for (_, master, table) in &ranks {
            let mine = table.get(&slot.spec.name).unwrap();
            ParamTable::place_shard(mine, &master[mine.range()], &mut want);
        }
        let got = &restored.master[slot.range()];
        assert!(
            want.iter()
                .zip(got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}",
            slot.spec.name
        );
    }
    assert_eq!(restored.state.step, 2);
    assert!(restored.state.v.iter().any(|v| *v > 0.0));

    // A save whose writes keep failing is reported, and the next one is
    // written.
    let loc2 = loc.clone();
    let mut saver = Saver::new(loc2, "job-4".into(), rt.handle().clone());
    let snap = |step| {
        let (_, master, table) = &ranks[0];
        let master = master.clone();
        Snapshot::take(step, 1, table, 0, move || {
            let n = master.len();
            (
                master,
                strata_worker::train::AdamWState {
                    step,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                },
            )
        })
    };
    server.fail_next_puts(1000);
    saver.save(snap(1));
    let failed = saver.wait();
    let e = failed[0].as_ref().unwrap_err().to_string();
    assert!(
        e.contains("step 1") && e.contains("s3://ckpt/runs/job-4/step-00000001/"),
        "{e}"
    );
    server.fail_next_puts(0);
    saver.save(snap(2));
    assert!(saver.wait()[0].is_ok());

    // A flipped byte in an object is caught by its CRC-32, naming it.
    let object = server
        .root()
        .join("ckpt/runs")
        .join(ROOT)
        .join("step-00000002/optim/a1-pp00-tp01.safetensors");
    let mut bytes = std::fs::read(&object).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&object, bytes).unwrap();
    let e = rt
        .block_on(read_rank(&loc, ROOT, &found[0], &whole))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("s3://ckpt/runs/job-3/step-00000002/optim/a1-pp00-tp01.safetensors")
            && e.contains("CRC-32"),
        "{e}"
    );
}

/// A Hugging Face folder on S3 (`[init] from = "hf:s3://…"`): every rank
/// of (2,2,1) reads the same values as from disk, with ranged GETs of its
/// part (a few requests per tensor, not one per row), and its config is
/// checked as on disk.
#[test]
fn a_hugging_face_folder_on_s3_reads_as_it_does_from_disk() {
    use strata_dataplane::hf_model::HfModel;
    use strata_recipe::Coords;
    use strata_worker::export::{WeightDtype, write_hf};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3Server::start(&["models"]));
    let cfg = model();
    let whole = ParamTable::whole(&cfg);
    let master = whole.init(11);
    // Sharded files of at most 40 kB, written where the server keeps the
    // bucket's objects.
    let dir = server.root().join("models").join("llama");
    let out = write_hf(&dir, &cfg, &whole, &master, 40_000, WeightDtype::F32, None).unwrap();
    assert!(out.files.len() > 3, "{:?}", out.files);
    let opts = server.store_options(Duration::from_secs(5));
    let remote = rt
        .block_on(HfModel::open(
            Location::open("s3://models/llama", false, &opts).unwrap(),
        ))
        .unwrap();
    remote.check(&cfg).unwrap();
    let local = rt
        .block_on(HfModel::open(
            Location::parse(dir.to_str().unwrap(), false).unwrap(),
        ))
        .unwrap();
    let layout = Layout::new(2, 2, 1);
    for tp in 0..2 {
        for pp in 0..2 {
            let table = ParamTable::new(&cfg, layout, Coords { dp: 0, pp, tp });
            let (before, _) = server.requests();
            let got = rt.block_on(remote.read(&cfg, &table)).unwrap();
            let (after, _) = server.requests();
            let want = rt.block_on(local.read(&cfg, &table)).unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "tp {tp} pp {pp}"
            );
            // At most two GETs per slot (a column slice's rows are merged).
            let slots = table.slots.len() as u64;
            assert!(
                after - before <= 2 * slots,
                "tp {tp} pp {pp}: {} requests for {slots} slots",
                after - before
            );
        }
    }
    // A missing object is named by its URL.
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = rt
        .block_on(HfModel::open(
            Location::open("s3://models/llama", false, &opts).unwrap(),
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("s3://models/llama/config.json"), "{e}");
}
