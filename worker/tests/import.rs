//! A Hugging Face folder read back into strata's parameters: what `write_hf`
//! writes (f32 whole or sharded, bf16) reads back bit for bit (bf16: to
//! its rounding), on any rank of any layout only its own part, tied and
//! untied; a `config.json` that differs from `[model]` is refused naming
//! every field.

use strata_dataplane::hf_model::{HfModel, ImportError};
use strata_dataplane::store::Location;
use strata_recipe::{Coords, Layout, ModelConfig};
use strata_worker::export::{WeightDtype, write_hf};
use strata_worker::params::ParamTable;

fn cfg(tied: bool) -> ModelConfig {
    ModelConfig {
        n_layers: 4,
        d_model: 32,
        n_heads: 4,
        n_kv_heads: 2,
        d_ffn: 64,
        vocab_size: 250,
        padded_vocab_size: 256,
        max_seq_len: 16,
        rope_theta: 10000.0,
        tie_embeddings: tied,
    }
}

async fn open(dir: &std::path::Path) -> Result<HfModel, ImportError> {
    HfModel::open(Location::parse(dir.to_str().unwrap(), false).unwrap()).await
}

#[tokio::test]
async fn an_export_reads_back_on_every_rank_of_any_layout() {
    for tied in [true, false] {
        let cfg = cfg(tied);
        let whole = ParamTable::whole(&cfg);
        let master = whole.init(7);
        let dir = tempfile::tempdir().unwrap();
        for (name, dtype, shard_bytes) in [
            ("f32", WeightDtype::F32, 1 << 30),
            ("f32-sharded", WeightDtype::F32, 20_000),
            ("bf16", WeightDtype::Bf16, 1 << 30),
        ] {
            let at = dir.path().join(name);
            let out = write_hf(&at, &cfg, &whole, &master, shard_bytes, dtype, None).unwrap();
            if name == "f32-sharded" {
                assert!(out.files.len() > 3, "{:?}", out.files);
            }
            let hf = open(&at).await.unwrap();
            hf.check(&cfg).unwrap();
            let want: Vec<f32> = match dtype {
                WeightDtype::F32 => master.clone(),
                WeightDtype::Bf16 => master
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect(),
            };
            let got = hf.read(&cfg, &whole).await.unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "tied={tied} {name}: the whole model differs"
            );
            // Every rank of (2, 2, 1) and (1, 2, 2) reads its own part.
            for layout in [Layout::new(2, 2, 1), Layout::new(1, 2, 2)] {
                for tp in 0..layout.tp {
                    for pp in 0..layout.pp {
                        let table = ParamTable::new(&cfg, layout, Coords { dp: 0, pp, tp });
                        let got = hf.read(&cfg, &table).await.unwrap();
                        for slot in &table.slots {
                            let full_slot = whole.get(&slot.spec.name).unwrap();
                            let part = ParamTable::shard_of(slot, &want[full_slot.range()]);
                            assert!(
                                got[slot.range()]
                                    .iter()
                                    .zip(&part)
                                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                                "tied={tied} {name} {layout:?} tp {tp} pp {pp}: {}",
                                slot.spec.name
                            );
                        }
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn a_config_that_differs_is_refused_naming_every_field() {
    let cfg = cfg(true);
    let whole = ParamTable::whole(&cfg);
    let dir = tempfile::tempdir().unwrap();
    write_hf(
        dir.path(),
        &cfg,
        &whole,
        &whole.init(1),
        1 << 30,
        WeightDtype::F32,
        None,
    )
    .unwrap();
    let path = dir.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["hidden_size"] = 64.into();
    c["num_key_value_heads"] = 4.into();
    c["rope_theta"] = 500000.0.into();
    c["tie_word_embeddings"] = false.into();
    c["vocab_size"] = 250.into();
    c["attention_bias"] = true.into();
    std::fs::write(&path, c.to_string()).unwrap();
    let e = open(dir.path()).await.unwrap().check(&cfg).unwrap_err();
    let ImportError::Mismatch { fields, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(fields.len(), 6, "{e}");
    for want in [
        "hidden_size is 64, model.d_model is 32",
        "num_key_value_heads is 4, model.n_kv_heads is 2",
        "rope_theta is 500000, model.rope_theta is 10000",
        "tie_word_embeddings is false, model.tie_embeddings is true",
        "vocab_size is 250, strata's model has 256 rows (model.vocab_size 250 padded)",
        "attention_bias is true",
    ] {
        assert!(e.to_string().contains(want), "{want} not in {e}");
    }
    // A folder without weights, or with a truncated file, is named.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = open(dir.path()).await.unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}
