//! Checkpoint benchmarks, printed as one JSON object:
//! `cargo bench -p strata-tests --bench checkpoint [-- LAYERS D_MODEL]`.
//!
//! One rank holding a whole model (8 layers, d = 512, a 50k vocabulary by
//! default: 52M parameters, 0.63 GB with AdamW's moments) on the CPU
//! backend: the step's stall (copying the state out), the background write
//! (safetensors encoding, CRC-32 and upload) against a raw write of the
//! same bytes as the same number of objects to the same store, and the
//! read back, on local files and on an S3 server on loopback.

use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use strata_dataplane::store::Location;
use strata_recipe::{AdamWConfig, ModelConfig};
use strata_tests::s3::S3Server;
use strata_worker::checkpoint::{self, FORMAT, Manifest, SavedLayout, Snapshot, VERSION};
use strata_worker::params::ParamTable;
use strata_worker::train::{Groups, Trainer};

/// Writes objects of `sizes` under `prefix`, as one checkpoint's files
/// would be, from buffers made beforehand; the seconds taken.
async fn raw_write(loc: &Location, prefix: &str, sizes: &[u64]) -> f64 {
    let bufs: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| (i * 31 % 251) as u8).collect())
        .collect();
    let t = Instant::now();
    for (i, b) in bufs.into_iter().enumerate() {
        loc.put(&format!("{prefix}/raw-{i}"), b.into())
            .await
            .unwrap();
    }
    t.elapsed().as_secs_f64()
}

type B = Autodiff<Flex>;

fn gib_per_s(bytes: u64, s: f64) -> f64 {
    bytes as f64 / s / f64::from(1u32 << 30)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let layers: u64 = args.first().map_or(8, |a| a.parse().unwrap());
    let d: u64 = args.get(1).map_or(512, |a| a.parse().unwrap());
    let cfg = ModelConfig {
        n_layers: layers,
        d_model: d,
        n_heads: d / 64,
        n_kv_heads: d / 64,
        d_ffn: d * 8 / 3 / 64 * 64,
        vocab_size: 50257,
        padded_vocab_size: 50304,
        max_seq_len: 256,
        rope_theta: 10000.0,
        tie_embeddings: true,
    };
    let table = ParamTable::whole(&cfg);
    let adamw = AdamWConfig::default();
    let trainer = Trainer::<B>::new(
        &cfg,
        table.clone(),
        1,
        adamw,
        Groups::single(),
        Default::default(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3Server::start(&["bench"]));
    let dir = tempfile::tempdir().unwrap();
    let stores = [
        (
            "local",
            Location::parse(dir.path().to_str().unwrap(), false).unwrap(),
        ),
        (
            "s3",
            Location::open(
                "s3://bench/runs",
                false,
                &server.store_options(Duration::from_secs(30)),
            )
            .unwrap(),
        ),
    ];
    let mut results = serde_json::Map::new();
    for (name, loc) in &stores {
        let t = Instant::now();
        let snap = Snapshot::take(1, 1, &table, 0, || {
            (trainer.master(), trainer.held_optimizer_state())
        });
        let stall = t.elapsed().as_secs_f64();
        let saved = rt
            .block_on(checkpoint::write_snapshot(loc, "job", &snap))
            .unwrap();
        drop(snap);
        let sizes: Vec<u64> = saved.shards.iter().map(|s| s.bytes).collect();
        let raw_s = rt.block_on(raw_write(loc, "raw", &sizes));
        let m = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            job: "job".into(),
            attempt: 1,
            step: 1,
            tokens_seen: 0,
            optimizer_steps: 0,
            layout: SavedLayout {
                tp: 1,
                pp: 1,
                dp: 1,
                virtual_stages: 1,
            },
            model: cfg,
            recipe: String::new(),
            data: None,
            shards: saved.shards.clone(),
            written_at: 0,
        };
        rt.block_on(checkpoint::commit(loc, "job", &m)).unwrap();
        let t = Instant::now();
        let back = rt
            .block_on(checkpoint::read_rank(loc, "job", &m, &table))
            .unwrap();
        let read_s = t.elapsed().as_secs_f64();
        assert_eq!(back.master.len(), table.total);
        results.insert(
            (*name).into(),
            serde_json::json!({
                "bytes": saved.bytes,
                "stall_s": stall,
                "write_s": saved.write_s,
                "write_gib_per_s": gib_per_s(saved.bytes, saved.write_s),
                "raw_write_s": raw_s,
                "raw_write_gib_per_s": gib_per_s(saved.bytes, raw_s),
                "write_vs_raw": raw_s / saved.write_s,
                "read_s": read_s,
                "read_gib_per_s": gib_per_s(saved.bytes, read_s),
            }),
        );
    }
    let out = serde_json::json!({
        "model": {"n_layers": layers, "d_model": d, "params": table.total},
        "stores": results,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
