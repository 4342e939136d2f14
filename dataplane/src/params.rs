//! The named parameter table: the one description of a model's parameters
//! that sharding, the optimizer's flat buffers, checkpoints, resharding and
//! export all read.
//!
//! Every parameter has a logical name (`embed`, `blocks.3.wq`, …, the
//! model's module paths), a full (unsharded) shape, and a [`Split`]: kept
//! whole on every tensor-parallel rank, or cut along one dimension into
//! `tp` equal parts. A pipeline stage holds the parameters of its layers;
//! the embedding lives on the first stage and, when the output head is tied
//! to it, a mirror of it on the last. A rank's [`ParamTable`] lists the
//! parameters it holds, each with its slice of the full tensor and its place
//! in the rank's flat buffers (master weights, AdamW moments, gradients).
//!
//! Initial values are drawn for the whole logical tensor from a stream
//! keyed by the run's seed and the parameter's name, in row-major order, and
//! a shard takes its slice of that stream (the generator seeks; a shard
//! never draws the values before it). Every layout therefore starts from
//! the same model, and a shard equals the slice of the unsharded tensor.

use std::ops::Range;

use crate::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use strata_recipe::{Coords, Layout, ModelConfig};

/// How a parameter is divided over the tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Every rank holds the whole tensor (norm gains); its gradient is the
    /// same on every rank of the group.
    Replicated,
    /// Cut along `dim` into `tp` equal, contiguous parts; rank r holds
    /// part r.
    Dim(usize),
    /// Cut along `dim` into `groups` equal blocks (grouped KV heads). With
    /// `tp ≤ groups` rank r holds blocks `r·groups/tp ..` (`groups/tp` of
    /// them); with `tp > groups` each block is held by `tp/groups`
    /// consecutive ranks, each of which computes a partial gradient for it
    /// (from its own query heads), summed over those ranks.
    Groups { dim: usize, groups: usize },
}

/// How a parameter's initial values are made.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// N(0, std²) from the parameter's keyed stream.
    Normal {
        std: f64,
    },
    Ones,
}

/// Which tensor of a transformer block (the Llama family's; a family with
/// other block tensors adds its own here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockParam {
    AttnNorm,
    Wq,
    Wk,
    Wv,
    Wo,
    MlpNorm,
    WGate,
    WUp,
    WDown,
}

impl BlockParam {
    pub const ALL: [BlockParam; 9] = [
        BlockParam::AttnNorm,
        BlockParam::Wq,
        BlockParam::Wk,
        BlockParam::Wv,
        BlockParam::Wo,
        BlockParam::MlpNorm,
        BlockParam::WGate,
        BlockParam::WUp,
        BlockParam::WDown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BlockParam::AttnNorm => "attn_norm",
            BlockParam::Wq => "wq",
            BlockParam::Wk => "wk",
            BlockParam::Wv => "wv",
            BlockParam::Wo => "wo",
            BlockParam::MlpNorm => "mlp_norm",
            BlockParam::WGate => "w_gate",
            BlockParam::WUp => "w_up",
            BlockParam::WDown => "w_down",
        }
    }
}

/// What a parameter is to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `[padded_vocab, d_model]`, split by vocabulary rows.
    Embed,
    /// `[d_model, d_model]`'s gain `[d_model]` before the head.
    FinalNorm,
    /// `[d_model, padded_vocab]`, split by vocabulary columns; absent when
    /// tied to the embedding.
    Head,
    Block {
        layer: u32,
        param: BlockParam,
    },
}

/// One logical parameter, independent of any layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub role: Role,
    /// The unsharded shape.
    pub full_shape: Vec<usize>,
    pub split: Split,
    pub init: Init,
    /// AdamW's decoupled weight decay applies (matrices, not norm gains).
    pub decay: bool,
}

/// One parameter as a rank holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSlot {
    pub spec: ParamSpec,
    /// This rank's part of the full tensor, one range per dimension.
    pub slice: Vec<Range<usize>>,
    /// The shape of that part.
    pub shape: Vec<usize>,
    /// Where it lives in the rank's flat buffers.
    pub offset: usize,
    pub len: usize,
    /// How many tensor-parallel ranks hold this same slice (1 for a part
    /// of its own, `tp` for a replicated parameter), and which of them this
    /// rank is.
    pub replicas: u32,
    pub replica: u32,
    /// This rank's gradient is only its share, to be summed over the
    /// replicas (KV heads shared by several ranks' query heads).
    pub partial_grad: bool,
    /// Whether this copy's gradient counts toward the global gradient norm:
    /// only the first replica of a slice counts, and not the tied
    /// embedding's mirror on the last pipeline stage, so that every logical
    /// element is counted exactly once.
    pub in_norm: bool,
    /// The last stage's copy of a tied embedding (pp > 1); the first
    /// stage owns the parameter (checkpoints read it from there).
    pub mirror: bool,
}

impl ParamSlot {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// The logical parameters of `cfg`, in model order, as its model family
/// ([`crate::family::of`]) declares them.
pub fn logical_params(cfg: &ModelConfig) -> Vec<ParamSpec> {
    crate::family::of(cfg).params(cfg)
}

/// Where a rank sits, for [`ParamTable::from_specs`].
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub n_layers: u32,
    /// The head is the embedding (its mirror on the last stage).
    pub tied: bool,
    pub layout: Layout,
    pub coords: Coords,
    /// Model chunks per stage (interleaved 1F1B; 1 otherwise).
    pub chunks: u32,
}

/// The parameters one rank holds, with their slices and flat offsets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamTable {
    pub slots: Vec<ParamSlot>,
    /// Elements in the rank's flat buffers.
    pub total: usize,
    pub tp: u32,
    pub tp_rank: u32,
    pub pp: u32,
    pub stage: u32,
    /// The layers of each of this stage's model chunks (one chunk unless
    /// the pipeline is interleaved).
    pub chunks: Vec<Range<u32>>,
}

impl ParamTable {
    /// The table of the rank at `coords` in `layout`. Data-parallel
    /// replicas get identical tables.
    pub fn new(cfg: &ModelConfig, layout: Layout, coords: Coords) -> ParamTable {
        ParamTable::interleaved(cfg, layout, coords, 1)
    }

    /// The table of the rank at `coords` in `layout` when each pipeline
    /// stage holds `chunks` model chunks (interleaved 1F1B).
    pub fn interleaved(
        cfg: &ModelConfig,
        layout: Layout,
        coords: Coords,
        chunks: u32,
    ) -> ParamTable {
        let placement = Placement {
            n_layers: cfg.n_layers as u32,
            tied: cfg.tie_embeddings,
            layout,
            coords,
            chunks,
        };
        ParamTable::from_specs(logical_params(cfg), placement)
    }

    /// The table of the rank `placement` describes over a family's logical
    /// parameters `specs`: a stage holds the blocks of its layers, the
    /// first the embedding, the last the final norm and head (and a
    /// mirror of a tied embedding); each tensor is cut by its split.
    pub fn from_specs(specs: Vec<ParamSpec>, placement: Placement) -> ParamTable {
        let Placement {
            n_layers,
            tied,
            layout,
            coords,
            chunks,
        } = placement;
        let (tp, pp, stage) = (layout.tp, layout.pp, coords.pp);
        let chunks: Vec<Range<u32>> = (0..chunks.max(1))
            .map(|c| layout.chunk_layers(n_layers, chunks.max(1), stage, c))
            .collect();
        let (first, last) = (stage == 0, stage + 1 == pp);
        let mut slots = Vec::new();
        let mut offset = 0;
        for spec in specs {
            let (held, mirror) = match spec.role {
                Role::Embed => (first || (last && tied), !first),
                Role::FinalNorm | Role::Head => (last, false),
                Role::Block { layer, .. } => (chunks.iter().any(|c| c.contains(&layer)), false),
            };
            if !held {
                continue;
            }
            let (t, r) = (tp as usize, coords.tp as usize);
            // The split dimension, into how many blocks, and how many ranks
            // share each block.
            let (cut, blocks, replicas) = match spec.split {
                Split::Replicated => (None, 1, t),
                Split::Dim(d) => (Some(d), t, 1),
                Split::Groups { dim, groups } if t <= groups => (Some(dim), t, 1),
                Split::Groups { dim, groups } => (Some(dim), groups, t / groups),
            };
            let slice: Vec<Range<usize>> = spec
                .full_shape
                .iter()
                .enumerate()
                .map(|(dim, &n)| {
                    if cut == Some(dim) {
                        let (block, b) = (n / blocks, r / replicas);
                        block * b..block * (b + 1)
                    } else {
                        0..n
                    }
                })
                .collect();
            let shape: Vec<usize> = slice.iter().map(|r| r.len()).collect();
            let len = shape.iter().product();
            let replica = (r % replicas) as u32;
            slots.push(ParamSlot {
                partial_grad: cut.is_some() && replicas > 1,
                in_norm: !mirror && replica == 0,
                replicas: replicas as u32,
                replica,
                spec,
                slice,
                shape,
                offset,
                len,
                mirror,
            });
            offset += len;
        }
        ParamTable {
            slots,
            total: offset,
            tp,
            tp_rank: coords.tp,
            pp,
            stage,
            chunks,
        }
    }

    /// The table of a single process holding the whole model.
    pub fn whole(cfg: &ModelConfig) -> ParamTable {
        ParamTable::new(
            cfg,
            Layout::new(1, 1, 1),
            Coords {
                dp: 0,
                pp: 0,
                tp: 0,
            },
        )
    }

    pub fn get(&self, name: &str) -> Option<&ParamSlot> {
        self.slots.iter().find(|s| s.spec.name == name)
    }

    /// Index of the slot with `role`.
    pub fn index(&self, role: Role) -> Option<usize> {
        self.slots.iter().position(|s| s.spec.role == role)
    }

    /// The flat initial values of every slot, from `seed`.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.total);
        for slot in &self.slots {
            match slot.spec.init {
                Init::Ones => out.extend(std::iter::repeat_n(1.0f32, slot.len)),
                Init::Normal { std } => {
                    for run in runs(&slot.spec.full_shape, &slot.slice) {
                        out.extend(normal_range(seed, &slot.spec.name, run, std));
                    }
                }
            }
        }
        out
    }

    /// This rank's part of `slot`, cut from the full row-major tensor
    /// `full` (a checkpoint's or another framework's values).
    pub fn shard_of(slot: &ParamSlot, full: &[f32]) -> Vec<f32> {
        assert_eq!(
            full.len(),
            slot.spec.full_shape.iter().product::<usize>(),
            "{}: full tensor of {} elements for shape {:?}",
            slot.spec.name,
            full.len(),
            slot.spec.full_shape
        );
        let mut out = Vec::with_capacity(slot.len);
        for run in runs(&slot.spec.full_shape, &slot.slice) {
            out.extend_from_slice(&full[run]);
        }
        out
    }

    /// Writes this rank's part `shard` of `slot` into the full row-major
    /// tensor `full` (the inverse of [`ParamTable::shard_of`]).
    pub fn place_shard(slot: &ParamSlot, shard: &[f32], full: &mut [f32]) {
        let mut at = 0;
        for run in runs(&slot.spec.full_shape, &slot.slice) {
            let n = run.len();
            full[run].copy_from_slice(&shard[at..at + n]);
            at += n;
        }
    }
}

/// The contiguous runs of flat row-major indices that make up `slice` of
/// a tensor of `shape` (one or two dimensions), in order.
fn runs(shape: &[usize], slice: &[Range<usize>]) -> Vec<Range<usize>> {
    match (shape, slice) {
        ([_], [r]) => vec![r.clone()],
        ([_, cols], [rows, c]) if c.len() == *cols => {
            std::iter::once(rows.start * cols..rows.end * cols).collect()
        }
        ([_, cols], [rows, c]) => rows
            .clone()
            .map(|row| row * cols + c.start..row * cols + c.end)
            .collect(),
        _ => panic!("parameters have one or two dimensions, not {shape:?}"),
    }
}

/// The stream of parameter `name` under `seed`.
fn stream(seed: u64, name: &str) -> SplitMix64 {
    let key = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    SplitMix64::for_key(seed, key)
}

/// Elements `range` of parameter `name`'s N(0, std²) values: element k of
/// the row-major tensor comes from uniforms 2⌊k/2⌋ and 2⌊k/2⌋ + 1 of the
/// parameter's stream by Box–Muller (cosine for even k, sine for odd).
pub fn normal_range(seed: u64, name: &str, range: Range<usize>, std: f64) -> Vec<f32> {
    let mut rng = stream(seed, name);
    let first_pair = range.start / 2;
    rng.skip(2 * first_pair as u64);
    let mut out = Vec::with_capacity(range.len());
    let mut k = 2 * first_pair;
    while k < range.end {
        let u1 = 1.0 - rng.next_f64();
        let u2 = rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = std::f64::consts::TAU * u2;
        for (i, x) in [(k, r * a.cos()), (k + 1, r * a.sin())] {
            if range.contains(&i) {
                out.push(x as f32);
            }
        }
        k += 2;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cfg(tie: bool) -> ModelConfig {
        ModelConfig {
            n_layers: 3,
            d_model: 8,
            n_heads: 4,
            n_kv_heads: 2,
            d_ffn: 12,
            vocab_size: 250,
            padded_vocab_size: 256,
            max_seq_len: 16,
            rope_theta: 10000.0,
            tie_embeddings: tie,
        }
    }

    fn coords(tp: u32, pp: u32) -> Coords {
        Coords { dp: 0, pp, tp }
    }

    #[test]
    fn a_slice_of_the_stream_equals_the_slice_of_the_whole() {
        let whole = normal_range(5, "blocks.0.wq", 0..101, 0.02);
        for (a, b) in [(0, 1), (1, 2), (3, 50), (50, 101), (100, 101), (7, 7)] {
            assert_eq!(normal_range(5, "blocks.0.wq", a..b, 0.02), whole[a..b]);
        }
        assert_ne!(normal_range(6, "blocks.0.wq", 0..4, 0.02), whole[0..4]);
        assert_ne!(normal_range(5, "blocks.0.wk", 0..4, 0.02), whole[0..4]);
    }

    #[test]
    fn shards_are_slices_of_the_unsharded_tensors() {
        for tie in [false, true] {
            let c = cfg(tie);
            let whole = ParamTable::whole(&c);
            let values = whole.init(11);
            for tp in [2u32, 4] {
                for pp in [1u32, 3] {
                    // tp = 4 shares each of the 2 KV heads between 2 ranks.
                    let layout = Layout::new(tp, pp, 1);
                    for s in 0..pp {
                        for r in 0..tp {
                            let t = ParamTable::new(&c, layout, coords(r, s));
                            let mine = t.init(11);
                            for slot in &t.slots {
                                let full = &values[whole.get(&slot.spec.name).unwrap().range()];
                                assert_eq!(
                                    &mine[slot.range()],
                                    &ParamTable::shard_of(slot, full)[..],
                                    "{} on tp {r}/{tp}, stage {s}/{pp}",
                                    slot.spec.name
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_logical_element_is_held_and_counted_once() {
        for tie in [false, true] {
            let c = cfg(tie);
            let whole = ParamTable::whole(&c);
            for (tp, pp) in [(1, 1), (2, 1), (1, 3), (4, 3), (2, 2), (4, 1)] {
                let layout = Layout::new(tp, pp, 1);
                let mut counted = vec![0usize; whole.total];
                let mut held = vec![0usize; whole.total];
                for s in 0..pp {
                    for r in 0..tp {
                        let t = ParamTable::new(&c, layout, coords(r, s));
                        for slot in &t.slots {
                            let w = whole.get(&slot.spec.name).unwrap();
                            let mut mark = vec![0f32; w.len];
                            ParamTable::place_shard(slot, &vec![1.0; slot.len], &mut mark);
                            for (i, m) in mark.iter().enumerate() {
                                if *m == 1.0 {
                                    held[w.offset + i] += 1;
                                    counted[w.offset + i] += usize::from(slot.in_norm);
                                }
                            }
                        }
                    }
                }
                assert!(
                    counted.iter().all(|&c| c == 1),
                    "tp {tp} pp {pp} tied {tie}: an element counted {:?} times",
                    counted.iter().find(|&&c| c != 1)
                );
                assert!(held.iter().all(|&h| h >= 1));
            }
        }
    }

    #[test]
    fn kv_heads_are_shared_when_tp_exceeds_them() {
        // 2 KV heads over 4 ranks: ranks 0 and 1 hold head 0, 2 and 3 head 1.
        let c = cfg(false);
        let layout = Layout::new(4, 1, 1);
        let hd = (c.d_model / c.n_heads) as usize;
        for r in 0..4u32 {
            let t = ParamTable::new(&c, layout, coords(r, 0));
            let wk = t.get("blocks.0.wk").unwrap();
            let head = r as usize / 2;
            assert_eq!(wk.slice[1], head * hd..(head + 1) * hd);
            assert_eq!((wk.replicas, wk.replica, wk.partial_grad), (2, r % 2, true));
            assert_eq!(wk.in_norm, r % 2 == 0);
            let wq = t.get("blocks.0.wq").unwrap();
            assert_eq!((wq.replicas, wq.partial_grad), (1, false));
            let g = t.get("blocks.0.attn_norm").unwrap();
            assert_eq!((g.replicas, g.partial_grad, g.in_norm), (4, false, r == 0));
        }
        // With tp ≤ KV heads each rank has heads of its own.
        let t = ParamTable::new(&c, Layout::new(2, 1, 1), coords(1, 0));
        let wk = t.get("blocks.0.wk").unwrap();
        assert_eq!((wk.slice[1].clone(), wk.replicas), (hd..2 * hd, 1));
    }

    #[test]
    fn interleaved_stages_hold_their_chunks() {
        let mut c = cfg(false);
        c.n_layers = 8;
        let layout = Layout::new(1, 2, 1);
        let t = ParamTable::interleaved(&c, layout, coords(0, 1), 2);
        assert_eq!(t.chunks, vec![2..4, 6..8]);
        let blocks: Vec<String> = t
            .slots
            .iter()
            .filter(|s| s.spec.name.ends_with(".wq"))
            .map(|s| s.spec.name.clone())
            .collect();
        assert_eq!(
            blocks,
            ["blocks.2.wq", "blocks.3.wq", "blocks.6.wq", "blocks.7.wq"]
        );
        assert!(t.get("final_norm").is_some() && t.get("head").is_some());
    }

    #[test]
    fn stages_hold_their_layers_and_the_tied_embedding_is_mirrored() {
        let c = cfg(true);
        let layout = Layout::new(1, 2, 1);
        let first = ParamTable::new(&c, layout, coords(0, 0));
        let last = ParamTable::new(&c, layout, coords(0, 1));
        let names = |t: &ParamTable| {
            t.slots
                .iter()
                .map(|s| s.spec.name.clone())
                .filter(|n| !n.starts_with("blocks") || n.ends_with(".wq"))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&first), ["embed", "blocks.0.wq", "blocks.1.wq"]);
        assert_eq!(names(&last), ["embed", "blocks.2.wq", "final_norm"]);
        assert!(!first.get("embed").unwrap().mirror);
        assert!(last.get("embed").unwrap().mirror);
        assert_eq!(first.init(3)[..16], last.init(3)[..16]);
    }

    #[test]
    fn another_familys_specs_are_placed_by_their_roles() {
        // A family of attention-only blocks: the table places whatever
        // specs it is given by role, layer and split.
        let c = cfg(false);
        let specs: Vec<ParamSpec> = logical_params(&c)
            .into_iter()
            .filter(|s| {
                !matches!(
                    s.role,
                    Role::Block {
                        param: BlockParam::WGate | BlockParam::WUp | BlockParam::WDown,
                        ..
                    }
                )
            })
            .collect();
        let placement = Placement {
            n_layers: 3,
            tied: false,
            layout: Layout::new(2, 2, 1),
            coords: coords(1, 1),
            chunks: 1,
        };
        let t = ParamTable::from_specs(specs, placement);
        let names: Vec<&str> = t.slots.iter().map(|s| s.spec.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "blocks.2.attn_norm",
                "blocks.2.wq",
                "blocks.2.wk",
                "blocks.2.wv",
                "blocks.2.wo",
                "blocks.2.mlp_norm",
                "final_norm",
                "head"
            ]
        );
        let mut at = 0;
        for s in &t.slots {
            assert_eq!(s.offset, at, "{}", s.spec.name);
            at += s.len;
        }
        assert_eq!(t.total, at);
        // tp rank 1 of 2 holds the second half of the head's columns.
        assert_eq!(t.get("head").unwrap().slice, [0..8, 128..256]);
    }
}
