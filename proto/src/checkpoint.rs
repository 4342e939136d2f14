//! Checkpoint manifests and shard records ↔ their wire messages: the one
//! place they are converted (the worker sends them, the coordinator
//! commits them).

use strata_dataplane::checkpoint::{
    DataState, Kind, Manifest, SavedLayout, ShardRecord, SourceState, TensorEntry,
};
use strata_dataplane::loader::{Cursor, SourceCursor};
use strata_dataplane::rng::SplitMix64;
use strata_recipe::ModelConfig;

use crate::v1 as pb;

/// A wire message that does not hold a valid manifest or shard record.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {why}")]
pub struct BadCheckpoint {
    pub field: &'static str,
    pub why: String,
}

fn bad(field: &'static str, why: impl Into<String>) -> BadCheckpoint {
    BadCheckpoint {
        field,
        why: why.into(),
    }
}

fn usize_of(field: &'static str, v: u64) -> Result<usize, BadCheckpoint> {
    usize::try_from(v).map_err(|_| bad(field, format!("{v} does not fit this machine")))
}

pub fn shard_to_pb(s: &ShardRecord) -> pb::CheckpointShard {
    pb::CheckpointShard {
        key: s.key.clone(),
        bytes: s.bytes,
        crc32: s.crc32,
        tensors: s
            .tensors
            .iter()
            .map(|t| pb::CheckpointTensor {
                name: t.name.clone(),
                kind: match t.kind {
                    Kind::Param => pb::TensorKind::Param,
                    Kind::ExpAvg => pb::TensorKind::ExpAvg,
                    Kind::ExpAvgSq => pb::TensorKind::ExpAvgSq,
                } as i32,
                full_shape: t.full_shape.iter().map(|&d| d as u64).collect(),
                slice: t
                    .slice
                    .iter()
                    .flat_map(|&[a, b]| [a as u64, b as u64])
                    .collect(),
            })
            .collect(),
    }
}

pub fn shard_from_pb(s: &pb::CheckpointShard) -> Result<ShardRecord, BadCheckpoint> {
    let mut tensors = Vec::with_capacity(s.tensors.len());
    for t in &s.tensors {
        let kind = match pb::TensorKind::try_from(t.kind) {
            Ok(pb::TensorKind::Param) => Kind::Param,
            Ok(pb::TensorKind::ExpAvg) => Kind::ExpAvg,
            Ok(pb::TensorKind::ExpAvgSq) => Kind::ExpAvgSq,
            Err(_) => {
                return Err(bad(
                    "shards.tensors.kind",
                    format!("unknown kind {}", t.kind),
                ));
            }
        };
        if t.slice.len() != 2 * t.full_shape.len() {
            return Err(bad(
                "shards.tensors.slice",
                format!(
                    "{}: {} bounds for {} dimensions",
                    t.name,
                    t.slice.len(),
                    t.full_shape.len()
                ),
            ));
        }
        let full_shape = t
            .full_shape
            .iter()
            .map(|&d| usize_of("shards.tensors.full_shape", d))
            .collect::<Result<Vec<_>, _>>()?;
        let slice = t
            .slice
            .chunks(2)
            .map(|c| {
                Ok([
                    usize_of("shards.tensors.slice", c[0])?,
                    usize_of("shards.tensors.slice", c[1])?,
                ])
            })
            .collect::<Result<Vec<_>, BadCheckpoint>>()?;
        tensors.push(TensorEntry {
            name: t.name.clone(),
            kind,
            full_shape,
            slice,
        });
    }
    Ok(ShardRecord {
        key: s.key.clone(),
        bytes: s.bytes,
        crc32: s.crc32,
        tensors,
    })
}

pub fn manifest_to_pb(m: &Manifest) -> pb::CheckpointManifest {
    let md = &m.model;
    pb::CheckpointManifest {
        format: m.format.clone(),
        version: m.version,
        job: m.job.clone(),
        attempt: m.attempt,
        step: m.step,
        tokens_seen: m.tokens_seen,
        optimizer_steps: m.optimizer_steps,
        layout: Some(pb::SavedLayout {
            tp: m.layout.tp,
            pp: m.layout.pp,
            dp: m.layout.dp,
            virtual_stages: m.layout.virtual_stages,
        }),
        model: Some(pb::ModelShape {
            n_layers: md.n_layers,
            d_model: md.d_model,
            n_heads: md.n_heads,
            n_kv_heads: md.n_kv_heads,
            d_ffn: md.d_ffn,
            vocab_size: md.vocab_size,
            padded_vocab_size: md.padded_vocab_size,
            max_seq_len: md.max_seq_len,
            rope_theta: md.rope_theta,
            tie_embeddings: md.tie_embeddings,
        }),
        recipe: m.recipe.clone(),
        data: m.data.as_ref().map(|d| pb::LoaderState {
            step: d.cursor.step,
            rng: d.cursor.rng.state(),
            sources: d
                .sources
                .iter()
                .zip(&d.cursor.sources)
                .map(|(s, c)| pb::LoaderSource {
                    name: s.name.clone(),
                    dataset: s.dataset.clone(),
                    fingerprint: s.fingerprint,
                    epoch: c.epoch,
                    cycle: c.cycle,
                    used: c.used.clone(),
                })
                .collect(),
            ..Default::default()
        }),
        shards: m.shards.iter().map(shard_to_pb).collect(),
        written_at: m.written_at,
    }
}

pub fn manifest_from_pb(m: &pb::CheckpointManifest) -> Result<Manifest, BadCheckpoint> {
    let l = m.layout.ok_or_else(|| bad("manifest.layout", "missing"))?;
    let md = m.model.ok_or_else(|| bad("manifest.model", "missing"))?;
    Ok(Manifest {
        format: m.format.clone(),
        version: m.version,
        job: m.job.clone(),
        attempt: m.attempt,
        step: m.step,
        tokens_seen: m.tokens_seen,
        optimizer_steps: m.optimizer_steps,
        layout: SavedLayout {
            tp: l.tp,
            pp: l.pp,
            dp: l.dp,
            virtual_stages: l.virtual_stages,
        },
        model: ModelConfig {
            n_layers: md.n_layers,
            d_model: md.d_model,
            n_heads: md.n_heads,
            n_kv_heads: md.n_kv_heads,
            d_ffn: md.d_ffn,
            vocab_size: md.vocab_size,
            padded_vocab_size: md.padded_vocab_size,
            max_seq_len: md.max_seq_len,
            rope_theta: md.rope_theta,
            tie_embeddings: md.tie_embeddings,
        },
        recipe: m.recipe.clone(),
        data: m.data.as_ref().map(|d| {
            if d.sources.is_empty() {
                return DataState::counting_steps(
                    d.dataset.clone(),
                    d.fingerprint,
                    d.step,
                    (d.epoch, d.cycle, d.used.clone()),
                    SplitMix64::new(d.rng),
                );
            }
            DataState {
                sources: d
                    .sources
                    .iter()
                    .map(|s| SourceState {
                        name: s.name.clone(),
                        dataset: s.dataset.clone(),
                        fingerprint: s.fingerprint,
                    })
                    .collect(),
                cursor: Cursor {
                    step: d.step,
                    rng: SplitMix64::new(d.rng),
                    sources: d
                        .sources
                        .iter()
                        .map(|s| SourceCursor {
                            epoch: s.epoch,
                            cycle: s.cycle,
                            used: s.used.clone(),
                        })
                        .collect(),
                },
                counts_steps: false,
            }
        }),
        shards: m
            .shards
            .iter()
            .map(shard_from_pb)
            .collect::<Result<_, _>>()?,
        written_at: m.written_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_survives_the_wire_exactly() {
        let mut rng = SplitMix64::new(17);
        rng.next_u64();
        let m = Manifest {
            format: strata_dataplane::checkpoint::FORMAT.into(),
            version: strata_dataplane::checkpoint::VERSION,
            job: "tiny-3".into(),
            attempt: 2,
            step: 40,
            tokens_seen: 5120,
            optimizer_steps: 40,
            layout: SavedLayout {
                tp: 2,
                pp: 2,
                dp: 1,
                virtual_stages: 1,
            },
            model: ModelConfig {
                n_layers: 2,
                d_model: 16,
                n_heads: 2,
                n_kv_heads: 1,
                d_ffn: 32,
                vocab_size: 50257,
                padded_vocab_size: 50304,
                max_seq_len: 64,
                rope_theta: 10000.0,
                tie_embeddings: true,
            },
            recipe: "name = \"tiny\"".into(),
            data: Some(DataState {
                sources: vec![
                    SourceState {
                        name: "web".into(),
                        dataset: "file:///d".into(),
                        fingerprint: 0xdead_beef,
                    },
                    SourceState {
                        name: "code".into(),
                        dataset: "s3://b/code".into(),
                        fingerprint: 7,
                    },
                ],
                cursor: Cursor {
                    step: 40,
                    rng,
                    sources: vec![
                        SourceCursor {
                            epoch: 1,
                            cycle: 3,
                            used: vec![4, 0, 9],
                        },
                        SourceCursor {
                            epoch: 0,
                            cycle: 0,
                            used: vec![0, 2, 0],
                        },
                    ],
                },
                counts_steps: false,
            }),
            shards: vec![ShardRecord {
                key: "model/a2-pp00-tp01.safetensors".into(),
                bytes: 1234,
                crc32: 99,
                tensors: vec![TensorEntry {
                    name: "blocks.0.wq".into(),
                    kind: Kind::ExpAvgSq,
                    full_shape: vec![16, 16],
                    slice: vec![[0, 16], [8, 16]],
                }],
            }],
            written_at: 1_700_000_000,
        };
        let back = manifest_from_pb(&manifest_to_pb(&m)).unwrap();
        assert_eq!(back, m);
        // A checkpoint from before mixtures: one dataset, steps per bucket.
        let mut old = manifest_to_pb(&m);
        let d = old.data.as_mut().unwrap();
        d.sources.clear();
        (d.dataset, d.fingerprint, d.epoch, d.cycle, d.used) =
            ("file:///d".into(), 9, 2, 1, vec![3, 5]);
        let data = manifest_from_pb(&old).unwrap().data.unwrap();
        assert!(data.counts_steps);
        assert_eq!(data.sources[0].dataset, "file:///d");
        assert_eq!(data.sources[0].fingerprint, 9);
        assert_eq!(data.cursor.step, 40);
        assert_eq!(
            data.cursor.sources,
            [SourceCursor {
                epoch: 2,
                cycle: 1,
                used: vec![3, 5]
            }]
        );
        let mut broken = manifest_to_pb(&m);
        broken.shards[0].tensors[0].slice.pop();
        let e = manifest_from_pb(&broken).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shards.tensors.slice: blocks.0.wq: 3 bounds for 2 dimensions"
        );
    }
}
