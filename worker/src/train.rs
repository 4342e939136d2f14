//! One rank's training step under any (tp, pp, dp) layout: the 1F1B
//! schedule over its microbatches (activations forward and gradients back
//! by tagged point-to-point messages), tensor-parallel collectives inside
//! the model, one bucketed all-reduce of the gradients (and the loss) over
//! the data-parallel group, the tied embedding's gradients summed over the
//! embedding group, clipping by the global gradient norm, and AdamW.
//!
//! The optimizer's state (master weights, both moments) and the gradients
//! live on the backend's device as flat buckets laid out by the rank's
//! [`ParamTable`]; only scalars cross to the host per step, besides the
//! activations and host-collective staging that parallel layouts need.

use std::ops::Range;
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};
use strata_recipe::{
    AdamWConfig, Coords, Layout, ModelConfig, Precision, Recompute, Reweighting, WeightSpread,
};

use crate::collective::{
    Collective, CollectiveError, DeviceCollective, Staged, Tag, gather_ranges, local_group,
    shard_ranges,
};
use crate::cpu;
use crate::model::{Micro, RowWeigher, StageForward, StageInput, StageModel, TapeOf};
use crate::params::{ParamTable, Role};
use crate::pipeline::{ChunkOp, PipeOp, schedule};
use crate::segment::GradAccum;
use crate::tensors::{accumulate, from_vec, to_vec};
use crate::tp::Tp;

/// Largest all-reduce call, in elements (16 MiB of f32).
pub const BUCKET_ELEMS: usize = 4 << 20;

/// AdamW's state: the step count and both moments, flat like the master
/// weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// A rank's process groups.
pub struct Groups {
    pub tp: Box<dyn Collective>,
    pub pp: Box<dyn Collective>,
    pub dp: Box<dyn Collective>,
    /// The first and last stages of a pipeline whose head is tied to the
    /// embedding (pp > 1): they keep the embedding's gradients equal
    /// (Megatron's embedding group). Member 0 is the first stage.
    pub emb: Option<Box<dyn Collective>>,
    /// The first and last stages of an interleaved pipeline: activations
    /// go round from the last stage's chunk c to the first stage's chunk
    /// c + 1, and gradients back. Member 0 is the first stage.
    pub wrap: Option<Box<dyn Collective>>,
}

impl Groups {
    /// A single process: every group has one member.
    pub fn single() -> Groups {
        let one = || -> Box<dyn Collective> { Box::new(local_group(1).remove(0)) };
        Groups {
            tp: one(),
            pp: one(),
            dp: one(),
            emb: None,
            wrap: None,
        }
    }

    /// Every rank's groups for `layout` in one process (threads joined by
    /// the in-process backend), in world-rank order: for tests and
    /// benchmarks of parallel layouts without worker processes.
    pub fn local_world(layout: Layout, tied: bool, chunks: u32) -> Vec<(Coords, Groups)> {
        Groups::world(layout, tied, chunks, |_, size| {
            local_group(size)
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn Collective>)
                .collect()
        })
    }

    /// Every rank's groups for `layout` with `chunks` model chunks per
    /// stage, each group made by `make(name, size)` (members in group-rank
    /// order), in world-rank order.
    pub fn world(
        layout: Layout,
        tied: bool,
        chunks: u32,
        mut make: impl FnMut(&str, usize) -> Vec<Box<dyn Collective>>,
    ) -> Vec<(Coords, Groups)> {
        use std::collections::HashMap;
        let (tp, pp, dp) = (layout.tp, layout.pp, layout.dp);
        type Pool = HashMap<(u32, u32), Vec<Option<Box<dyn Collective>>>>;
        let mut pools: [Pool; 5] = Default::default();
        let mut take = |kind: usize, key: (u32, u32), size: u32, member: u32| {
            let pool = pools[kind].entry(key).or_insert_with(|| {
                let name = format!(
                    "{}-{}-{}",
                    ["tp", "pp", "dp", "emb", "wrap"][kind],
                    key.0,
                    key.1
                );
                make(&name, size as usize).into_iter().map(Some).collect()
            });
            pool[member as usize]
                .take()
                .expect("each member taken once")
        };
        (0..layout.world_size())
            .map(|r| {
                let c = layout.coords(strata_recipe::Rank(r)).expect("in the world");
                let groups = Groups {
                    tp: take(0, (c.dp, c.pp), tp, c.tp),
                    pp: take(1, (c.dp, c.tp), pp, c.pp),
                    dp: take(2, (c.pp, c.tp), dp, c.dp),
                    emb: (tied && pp > 1 && (c.pp == 0 || c.pp + 1 == pp))
                        .then(|| take(3, (c.dp, c.tp), 2, u32::from(c.pp != 0))),
                    wrap: (chunks > 1 && pp > 1 && (c.pp == 0 || c.pp + 1 == pp))
                        .then(|| take(4, (c.dp, c.tp), 2, u32::from(c.pp != 0))),
                };
                (c, groups)
            })
            .collect()
    }
}

/// Which of a rank's groups a collective failed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Tensor,
    Pipeline,
    Data,
    Embedding,
    /// The interleaved pipeline's link from the last stage to the first.
    Wrap,
}

impl std::fmt::Display for GroupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GroupKind::Tensor => "tensor-parallel",
            GroupKind::Pipeline => "pipeline",
            GroupKind::Data => "data-parallel",
            GroupKind::Embedding => "embedding",
            GroupKind::Wrap => "pipeline wrap-around",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{group} group: {source}")]
pub struct TrainError {
    pub group: GroupKind,
    #[source]
    pub source: CollectiveError,
}

fn in_group(group: GroupKind) -> impl FnOnce(CollectiveError) -> TrainError {
    move |source| TrainError { group, source }
}

/// One pipeline stage's timings of a step, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    pub forward_s: f64,
    pub backward_s: f64,
    /// Time blocked waiting for the neighbouring stages' activations and
    /// gradients.
    pub wait_s: f64,
    /// Wall time of the 1F1B schedule (forwards, backwards and waits).
    pub pipeline_s: f64,
    /// Time in tensor-parallel collectives (inside forward and backward).
    pub tp_comm_s: f64,
}

impl StageStats {
    /// The measured bubble: the share of the schedule spent waiting.
    pub fn bubble(&self) -> f64 {
        if self.pipeline_s > 0.0 {
            self.wait_s / self.pipeline_s
        } else {
            0.0
        }
    }
}

/// What one step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over every token of the global step.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// This rank's compute time (tensor-parallel collectives included).
    pub forward: Duration,
    pub backward: Duration,
    /// Data-parallel (and embedding-group) all-reduce of the gradients.
    pub all_reduce: Duration,
    pub optimizer: Duration,
    /// Every pipeline stage's timings, first stage first (this rank's
    /// tensor-parallel rank and data-parallel replica).
    pub stages: Vec<StageStats>,
    /// Some rank asked to stop after this step (agreed by every rank, in
    /// the same reductions as the loss and the norm).
    pub stop: bool,
    /// With [`Trainer::with_row_groups`]: each group's summed token losses
    /// over the whole step (every replica's rows), undivided.
    pub group_loss: Vec<f64>,
    /// Under [`Trainer::reweigh`]: the spread of every sequence's
    /// multiplier in the step.
    pub weights: Option<WeightSpread>,
}

/// One microbatch of a rank's share of a step: `rows` sequences of
/// `seq_len` tokens.
pub struct LocalBatch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [u32],
    pub seq_len: usize,
    /// Each row's group (say, the source of a mixture it came from), when
    /// the trainer sums losses by group; empty otherwise.
    pub groups: &'a [u32],
}

/// A run of whole slots that the optimizer treats as one flat tensor:
/// every slot in it shares whether weight decay applies and whether it
/// counts toward the gradient norm, so AdamW and the norm are a few tensor
/// operations per bucket, with no masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Slot indices in the table.
    pub slots: Range<usize>,
    /// Elements of the rank's flat layout (the table's offsets).
    pub range: Range<usize>,
    pub decay: bool,
    pub in_norm: bool,
}

impl Bucket {
    /// `table`'s slots in runs of equal (decay, in-norm), each at most
    /// [`BUCKET_ELEMS`] long unless one slot is longer; the embedding has
    /// a bucket of its own (the embedding group reduces it alone).
    pub fn of(table: &ParamTable) -> Vec<Bucket> {
        let embed = table.index(Role::Embed);
        let mut out: Vec<Bucket> = Vec::new();
        for (i, s) in table.slots.iter().enumerate() {
            let key = (s.spec.decay, s.in_norm);
            let alone = Some(i) == embed;
            match out.last_mut() {
                Some(b)
                    if (b.decay, b.in_norm) == key
                        && !alone
                        && Some(b.slots.start) != embed
                        && b.range.len() + s.len <= BUCKET_ELEMS =>
                {
                    b.slots.end = i + 1;
                    b.range.end = s.offset + s.len;
                }
                _ => out.push(Bucket {
                    slots: i..i + 1,
                    range: s.range(),
                    decay: key.0,
                    in_norm: key.1,
                }),
            }
        }
        out
    }
}

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// A model part with its optimizer, for one rank of any layout.
///
/// Everything model-sized stays on the backend's device: the master
/// weights, both AdamW moments and the step's gradients are flat f32
/// tensors, one per [`Bucket`]; the model's parameters are slices of the
/// master buckets. Per step only scalars (the loss, the squared gradient
/// norm, timings) reach the host, plus the activations a pipeline stage
/// exchanges and the staging copies of host collectives (data-parallel
/// and embedding-group all-reduces over TCP).
///
/// The model is the stage of its family (`S`, [`StageForward`]); the
/// trainer knows nothing of its layers.
pub struct Trainer<B: AutodiffBackend, S: StageForward<B> = StageModel<B>> {
    model: S,
    buckets: Vec<Bucket>,
    /// Each bucket's elements this rank owns in the data-parallel group
    /// (bucket-relative, [`shard_ranges`]): what a sharded optimizer
    /// keeps, and what the rank adds to the gradient norm in either mode.
    shards: Vec<Vec<Range<usize>>>,
    /// ZeRO-1: `m`, `v` and the last step's gradients hold only this
    /// rank's shard of each bucket; the updated shards of the master are
    /// all-gathered after the step.
    sharded: bool,
    master: Vec<Tensor<Inner<B>, 1>>,
    m: Vec<Tensor<Inner<B>, 1>>,
    v: Vec<Tensor<Inner<B>, 1>>,
    /// The last step's gradients after the data-parallel sum, before
    /// clipping (this rank's shards when `sharded`), kept after the step
    /// only when `keep_grads` (for inspection; otherwise they are freed
    /// with the step).
    grads: Vec<Tensor<Inner<B>, 1>>,
    keep_grads: bool,
    steps: u64,
    cfg: AdamWConfig,
    groups: Groups,
    /// The data-parallel sum on device memory (NCCL), when the backend
    /// has one; otherwise `groups.dp` through [`Staged`].
    dp_device: Option<DeviceDp<B>>,
    /// Row groups whose losses each step sums ([`Trainer::with_row_groups`]).
    row_groups: usize,
    /// Loss-based reweighting of the next steps' sequences
    /// ([`Trainer::reweigh`]).
    reweigh: Option<Reweighting>,
}

/// A data-parallel group's collectives on the trainer's device.
pub type DeviceDp<B> = Box<dyn DeviceCollective<Inner<B>> + Send>;

/// The Llama family's ranks.
impl<B: AutodiffBackend> Trainer<B> {
    /// The rank holding `table`'s parameters, initialised from `seed`.
    pub fn new(
        model: &ModelConfig,
        table: ParamTable,
        seed: u64,
        cfg: AdamWConfig,
        groups: Groups,
        device: B::Device,
    ) -> Trainer<B> {
        let values = table.init(seed);
        Trainer::from_values(model, table, values, cfg, groups, device)
    }

    /// A rank holding `table`'s parameters with the given flat values.
    pub fn from_values(
        model: &ModelConfig,
        table: ParamTable,
        values: Vec<f32>,
        cfg: AdamWConfig,
        groups: Groups,
        device: B::Device,
    ) -> Trainer<B> {
        Trainer::build(model, table, values, cfg, groups, device)
    }
}

impl<B: AutodiffBackend, S: StageForward<B>> Trainer<B, S> {
    /// A rank of family stage `S` holding `table`'s parameters with the
    /// given flat values.
    pub fn build(
        model: &ModelConfig,
        table: ParamTable,
        values: Vec<f32>,
        cfg: AdamWConfig,
        groups: Groups,
        device: B::Device,
    ) -> Trainer<B, S> {
        assert_eq!(values.len(), table.total, "flat parameter values");
        for (name, g, want) in [
            ("tensor-parallel", &groups.tp, table.tp),
            ("pipeline", &groups.pp, table.pp),
        ] {
            assert_eq!(g.size() as u32, want, "{name} group size");
        }
        let ends = table.stage == 0 || table.stage + 1 == table.pp;
        assert_eq!(
            groups.wrap.is_some(),
            table.chunks.len() > 1 && table.pp > 1 && ends,
            "an interleaved pipeline's first and last stages have a wrap-around group"
        );
        let buckets = Bucket::of(&table);
        let master: Vec<Tensor<Inner<B>, 1>> = buckets
            .iter()
            .map(|b| from_vec(values[b.range.clone()].to_vec(), [b.range.len()], &device))
            .collect();
        let zeros = || -> Vec<Tensor<Inner<B>, 1>> {
            buckets
                .iter()
                .map(|b| Tensor::zeros([b.range.len()], &device))
                .collect()
        };
        let (m, v) = (zeros(), zeros());
        let (dp, dp_rank) = (groups.dp.size(), groups.dp.rank());
        let shards = buckets
            .iter()
            .map(|b| shard_ranges(b.range.len(), BUCKET_ELEMS, dp, dp_rank))
            .collect();
        let model = S::new_empty(model, table, &device);
        let mut trainer = Trainer {
            model,
            buckets,
            shards,
            sharded: false,
            master,
            m,
            v,
            grads: Vec::new(),
            keep_grads: false,
            steps: 0,
            cfg,
            groups,
            dp_device: None,
            row_groups: 0,
            reweigh: None,
        };
        trainer.refresh_params();
        trainer
    }

    /// Computes in `precision` from now on: under bf16 the parameters are
    /// cast from the f32 master buckets after every optimizer step, the
    /// activations and matrix products are bf16, norms, the attention
    /// softmax and the cross-entropy run in f32, and gradients are summed
    /// into the f32 buckets.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.model.set_precision(precision);
        self.refresh_params();
        self
    }

    /// Sums each step's losses over `n` groups of rows as well
    /// ([`LocalBatch::groups`], [`StepStats::group_loss`]): one more
    /// number per group in the step's scalar reductions.
    pub fn with_row_groups(mut self, n: usize) -> Self {
        self.row_groups = n;
        self
    }

    /// Weighs each sequence of the next steps' by its loss as `r` says
    /// (none: every sequence alike). Every rank of the run is told the
    /// same for the same steps; each microbatch holds whole groups (the
    /// recipe's validation sees to it). The steps' [`StepStats::weights`]
    /// then say how the multipliers spread.
    pub fn reweigh(&mut self, r: Option<Reweighting>) {
        self.reweigh = r.filter(|r| r.strategy != strata_recipe::Strategy::Uniform);
    }

    /// Recomputes activations at the backward as `recompute` says
    /// (bit-identical results, less memory held between a microbatch's
    /// forward and its backward).
    pub fn with_recompute(mut self, recompute: Recompute) -> Self {
        self.model.set_recompute(recompute);
        self
    }

    /// Sums gradients over the data-parallel replicas through `dp` (the
    /// same members as the host dp group, which still carries the loss)
    /// instead of staging them through host memory.
    pub fn with_device_dp(mut self, dp: DeviceDp<B>) -> Self {
        assert_eq!(dp.size(), self.groups.dp.size(), "the dp group's members");
        assert_eq!(dp.rank(), self.groups.dp.rank(), "this rank's place in dp");
        self.dp_device = Some(dp);
        self
    }

    /// Shards the optimizer over the data-parallel group (ZeRO-1) when
    /// `on` and the group has more than one member: each rank keeps both
    /// moments of its shard of every bucket only, gradients are
    /// reduce-scattered instead of all-reduced, and the updated shards of
    /// the master weights are all-gathered after AdamW. Losses, norms and
    /// weights are bit-identical to the unsharded run with host
    /// collectives (the shards are the ring's own chunks).
    pub fn with_sharded_optimizer(mut self, on: bool) -> Self {
        if on && self.groups.dp.size() > 1 && !self.sharded {
            let state = self.held_optimizer_state();
            self.sharded = true;
            self.m = self.upload_state(&state.m);
            self.v = self.upload_state(&state.v);
        }
        self
    }

    /// Keeps each step's summed gradients until the next step, for
    /// [`Trainer::grads`] (they cost a gradient's memory between steps).
    pub fn keeping_grads(mut self) -> Self {
        self.keep_grads = true;
        self
    }

    /// Whether the optimizer is sharded over the data-parallel group.
    pub fn shards_optimizer(&self) -> bool {
        self.sharded
    }

    pub fn model(&self) -> &S {
        &self.model
    }

    pub fn table(&self) -> &ParamTable {
        self.model.table()
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    pub fn n_params(&self) -> usize {
        self.table().total
    }

    /// The master weights, copied to the host in the table's flat layout.
    pub fn master(&self) -> Vec<f32> {
        self.flat_on_host(&self.master)
    }

    /// The last step's gradients (summed over data-parallel replicas, not
    /// clipped), copied to the host like [`Trainer::master`]; under a
    /// sharded optimizer, this rank's shards of the buckets only, in order.
    /// Empty unless built [`Trainer::keeping_grads`].
    pub fn grads(&self) -> Vec<f32> {
        self.flat_on_host(&self.grads)
    }

    /// Optimizer steps taken (AdamW's bias corrections count them).
    pub fn optimizer_steps(&self) -> u64 {
        self.steps
    }

    /// The optimizer's state in the table's flat layout, copied to the
    /// host. Under a sharded optimizer both moments are all-gathered over
    /// the data-parallel group first, so every member of it must call this
    /// at the same point.
    pub fn optimizer_state(&mut self) -> Result<AdamWState, TrainError> {
        if !self.sharded {
            return Ok(self.held_optimizer_state());
        }
        let mut dp = Staged::new(self.groups.dp.as_mut(), BUCKET_ELEMS);
        let mut gather = |shards: &[Tensor<Inner<B>, 1>]| {
            shards
                .iter()
                .zip(&self.buckets)
                .map(|(s, b)| {
                    DeviceCollective::<Inner<B>>::all_gather_shard(
                        &mut dp,
                        s.clone(),
                        b.range.len(),
                        BUCKET_ELEMS,
                    )
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(in_group(GroupKind::Data))
        };
        let (m, v) = (gather(&self.m)?, gather(&self.v)?);
        Ok(AdamWState {
            step: self.steps,
            m: self.flat_on_host(&m),
            v: self.flat_on_host(&v),
        })
    }

    /// The moments as this rank holds them, copied to the host: the
    /// table's flat layout, or under a sharded optimizer its shards of the
    /// buckets, in order.
    pub fn held_optimizer_state(&self) -> AdamWState {
        AdamWState {
            step: self.steps,
            m: self.flat_on_host(&self.m),
            v: self.flat_on_host(&self.v),
        }
    }

    /// Optimizer state (or gradients) for this rank from the table's flat
    /// layout: whole buckets, or this rank's shards of them when sharded.
    fn upload_state(&self, flat: &[f32]) -> Vec<Tensor<Inner<B>, 1>> {
        let device = self.model.device();
        self.buckets
            .iter()
            .zip(&self.shards)
            .map(|(b, shards)| {
                let bucket = &flat[b.range.clone()];
                let mine: Vec<f32> = if self.sharded {
                    shards
                        .iter()
                        .flat_map(|r| &bucket[r.clone()])
                        .copied()
                        .collect()
                } else {
                    bucket.to_vec()
                };
                let n = mine.len();
                from_vec(mine, [n], device)
            })
            .collect()
    }

    /// Whether every rank of the job passed `ok = true`: a flag reduced
    /// over the tensor-, pipeline- and data-parallel groups in turn, which
    /// together span the world. Every rank must call it.
    pub fn all_ok(&mut self, ok: bool) -> Result<bool, TrainError> {
        let mut bad = [if ok { 0.0f32 } else { 1.0 }];
        for (kind, g) in [
            (GroupKind::Tensor, &mut self.groups.tp),
            (GroupKind::Pipeline, &mut self.groups.pp),
            (GroupKind::Data, &mut self.groups.dp),
        ] {
            g.all_reduce_max(&mut bad).map_err(in_group(kind))?;
        }
        Ok(bad[0] == 0.0)
    }

    /// Continues from a checkpoint: the master weights (the table's flat
    /// layout) and AdamW's state replace the trainer's, on its device.
    ///
    /// # Panics
    /// If a buffer's length is not the table's.
    pub fn restore(&mut self, master: &[f32], state: &AdamWState) {
        let n = self.n_params();
        for (what, len) in [
            ("master weights", master.len()),
            ("exp_avg", state.m.len()),
            ("exp_avg_sq", state.v.len()),
        ] {
            assert_eq!(len, n, "restored {what} for a table of {n} elements");
        }
        self.model.release_params();
        let device = self.model.device().clone();
        self.master = self
            .buckets
            .iter()
            .map(|b| from_vec(master[b.range.clone()].to_vec(), [b.range.len()], &device))
            .collect();
        self.m = self.upload_state(&state.m);
        self.v = self.upload_state(&state.v);
        self.steps = state.step;
        self.refresh_params();
    }

    fn flat_on_host(&self, buckets: &[Tensor<Inner<B>, 1>]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n_params());
        for t in buckets {
            if !cpu::extend_host(t, &mut out) {
                out.extend(to_vec(t.clone()));
            }
        }
        out
    }

    /// Points the model's parameters at slices of the master buckets.
    fn refresh_params(&mut self) {
        let table = self.model.table();
        let mut flat = Vec::with_capacity(table.slots.len());
        for (b, master) in self.buckets.iter().zip(&self.master) {
            for s in &table.slots[b.slots.clone()] {
                let at = s.offset - b.range.start;
                flat.push(master.clone().slice(at..at + s.len));
            }
        }
        self.model.set_params(flat);
    }

    /// One optimizer step, number `step` (tags its pipeline messages).
    /// `micro` are this rank's microbatches (every rank of a data-parallel
    /// replica is given the same ones); `global_tokens` counts the target
    /// tokens of the whole step on every replica.
    pub fn step(
        &mut self,
        step: u64,
        micro: &[LocalBatch<'_>],
        global_tokens: u64,
        lr: f64,
    ) -> Result<StepStats, TrainError> {
        self.step_agreeing(step, micro, global_tokens, lr, &|| false)
    }

    /// [`Trainer::step`], agreeing at its end whether to stop after it:
    /// `wants_stop` is read once the gradients are in, just before the
    /// step's scalar reductions, and the flag rides in them (the loss and
    /// norm's sum over dp, the norm's over tp, the stages' record over
    /// pp), so that stopping costs no reduction of its own. Every rank
    /// returns the same [`StepStats::stop`].
    pub fn step_agreeing(
        &mut self,
        step: u64,
        micro: &[LocalBatch<'_>],
        global_tokens: u64,
        lr: f64,
        wants_stop: &dyn Fn() -> bool,
    ) -> Result<StepStats, TrainError> {
        self.grads.clear();
        let table = self.model.table();
        let (stages, stage) = (table.pp, table.stage);
        let last = stage + 1 == stages;
        let d = self.model.width();
        let m = micro.len() as u32;

        let mut acc = GradAccum::new(table.slots.len());
        let chunks = self.model.chunks();
        let mut tapes: Vec<Option<TapeOf<B, S>>> = (0..m * chunks).map(|_| None).collect();
        let mut tp = Tp::new(self.groups.tp.as_mut());
        let mut links = Links {
            pp: self.groups.pp.as_mut(),
            wrap: self.groups.wrap.as_deref_mut(),
            stage: stage as usize,
            stages: stages as usize,
        };
        let mut own = StageStats::default();
        let mut local_loss = 0.0f64;
        let n_groups = self.row_groups;
        assert!(
            n_groups == 0
                || micro
                    .iter()
                    .all(|mb| mb.groups.len() == mb.inputs.len() / mb.seq_len),
            "every row of every microbatch has its group"
        );
        let mut group_loss = vec![0.0f64; n_groups];
        let reweighted = self.reweigh.is_some();
        let weigher = self.reweigh.map(|r| DpWeigher {
            r,
            dp: std::cell::RefCell::new(self.groups.dp.as_mut()),
            failed: std::cell::RefCell::new(None),
        });
        let mut spread = WeightSpread::default();
        let pipeline_start = Instant::now();
        let mut wait = Duration::ZERO;
        let (mut forward, mut backward) = (Duration::ZERO, Duration::ZERO);
        for ChunkOp { op, chunk } in schedule(stages, stage, m, chunks) {
            // This chunk's virtual stage: the one messages are tagged for.
            let vs = chunk * stages + stage;
            match op {
                PipeOp::Forward(i) => {
                    let _span = tracing::info_span!("forward", microbatch = i, chunk).entered();
                    let t = Instant::now();
                    let (tape, waited) = forward_one(
                        &self.model,
                        &mut links,
                        &mut tp,
                        (step, chunk, i),
                        &micro[i as usize],
                        global_tokens,
                        (n_groups > 0, weigher.as_ref().map(|w| w as &dyn RowWeigher)),
                    )?;
                    if let Some(e) = weigher.as_ref().and_then(|w| w.failed.take()) {
                        return Err(in_group(GroupKind::Data)(e));
                    }
                    wait += waited;
                    forward += t.elapsed() - waited;
                    local_loss += tape.loss;
                    for (r, l) in tape.row_loss.iter().enumerate() {
                        group_loss[micro[i as usize].groups[r] as usize] += l;
                    }
                    for &w in &tape.row_weight {
                        spread.push(w);
                    }
                    tapes[(chunk * m + i) as usize] = Some(tape);
                }
                PipeOp::Backward(i) => {
                    let _span = tracing::info_span!("backward", microbatch = i, chunk).entered();
                    let tape = tapes[(chunk * m + i) as usize]
                        .take()
                        .expect("forward before backward");
                    let mb = &micro[i as usize];
                    let upstream = if self.model.is_last(chunk) {
                        None
                    } else {
                        let mut buf = vec![0f32; mb.inputs.len() * d];
                        let t = Instant::now();
                        links.recv(true, Tag::gradient(step, vs, i), &mut buf)?;
                        wait += t.elapsed();
                        Some(from_vec(buf, [mb.inputs.len(), d], self.model.device()))
                    };
                    let t = Instant::now();
                    let dx = self
                        .model
                        .backward(tape, upstream, &mut acc, &mut tp)
                        .map_err(in_group(GroupKind::Tensor))?;
                    if !self.model.is_first(chunk) {
                        let dx = to_vec(dx.expect("a later stage's input has a gradient"));
                        links.send(false, Tag::gradient(step, vs - 1, i), &dx)?;
                    }
                    backward += t.elapsed();
                }
            }
        }
        drop(weigher);
        tracing::debug!(step, "forward and backward done");
        own.pipeline_s = pipeline_start.elapsed().as_secs_f64();
        own.wait_s = wait.as_secs_f64();
        own.forward_s = forward.as_secs_f64();
        own.backward_s = backward.as_secs_f64();
        own.tp_comm_s = tp.comm.as_secs_f64();

        // KV heads shared by several tensor-parallel ranks: each computed
        // the gradient from its own query heads; sum them over the group
        // (each rank places its share at its block of the slot's part of a
        // staging buffer, zeros elsewhere). Small: only K and V.
        let mut slot_grads = acc.grads;
        let mut len = 0;
        let places: Vec<(usize, usize)> = table
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.partial_grad)
            .map(|(i, s)| {
                let mine = len + (table.tp_rank / s.replicas) as usize * s.len;
                len += (table.tp / s.replicas) as usize * s.len;
                (i, mine)
            })
            .collect();
        if !places.is_empty() {
            let t = Instant::now();
            let mut buf = vec![0f32; len];
            for &(i, at) in &places {
                if let Some(g) = slot_grads[i].take() {
                    buf[at..at + table.slots[i].len].copy_from_slice(&to_vec(g));
                }
            }
            self.groups
                .tp
                .all_reduce_sum(&mut buf)
                .map_err(in_group(GroupKind::Tensor))?;
            for &(i, at) in &places {
                let n = table.slots[i].len;
                slot_grads[i] = Some(from_vec(
                    buf[at..at + n].to_vec(),
                    [1, n],
                    self.model.device(),
                ));
            }
            own.tp_comm_s += t.elapsed().as_secs_f64();
        }

        // The slots' gradients as flat buckets on the device.
        let device = self.model.device().clone();
        let mut grads: Vec<Tensor<Inner<B>, 1>> = self
            .buckets
            .iter()
            .map(|b| {
                let parts: Vec<Tensor<Inner<B>, 1>> = b
                    .slots
                    .clone()
                    .map(|i| match slot_grads[i].take() {
                        Some(g) => g.reshape([table.slots[i].len]),
                        None => Tensor::zeros([table.slots[i].len], &device),
                    })
                    .collect();
                if parts.len() == 1 {
                    parts.into_iter().next().expect("one part")
                } else {
                    Tensor::cat(parts, 0)
                }
            })
            .collect();

        // Data-parallel sum of every bucket (reduce-scattered to the
        // shards a sharded optimizer owns), then the tied embedding's over
        // the embedding group. Host collectives stage the bucket through
        // host memory.
        let reduce_span = tracing::info_span!("all_reduce").entered();
        let t = Instant::now();
        if self.groups.dp.size() > 1 {
            let mut staged;
            let dp: &mut dyn DeviceCollective<Inner<B>> = match self.dp_device.as_deref_mut() {
                Some(device) => device,
                None => {
                    staged = Staged::new(self.groups.dp.as_mut(), BUCKET_ELEMS);
                    &mut staged
                }
            };
            for g in &mut grads {
                *g = if self.sharded {
                    dp.reduce_scatter_shard(g.clone(), BUCKET_ELEMS)
                } else {
                    dp.all_reduce_sum(g.clone())
                }
                .map_err(in_group(GroupKind::Data))?;
            }
        }
        if let (Some(emb), Some(i)) = (self.groups.emb.as_mut(), table.index(Role::Embed)) {
            let b = self
                .buckets
                .iter()
                .position(|b| b.slots.start == i)
                .expect("the embedding has a bucket of its own");
            grads[b] = Staged::new(emb.as_mut(), BUCKET_ELEMS)
                .all_reduce_sum(grads[b].clone())
                .map_err(in_group(GroupKind::Embedding))?;
        }
        let all_reduce = t.elapsed();
        drop(reduce_span);

        let _optimizer_span = tracing::info_span!("optimizer").entered();
        let t = Instant::now();
        // Squared norm over what this rank counts of its data-parallel
        // shard (one scalar from the device; the same elements, summed the
        // same way, whether the optimizer is sharded or not), summed with
        // the loss over the data-parallel group in member order, then over
        // the tensor-parallel group, then over the stages (with the loss
        // from the last and every stage's timings).
        let mut sq: Option<Tensor<Inner<B>, 1>> = None;
        for ((b, g), shards) in self.buckets.iter().zip(&grads).zip(&self.shards) {
            if b.in_norm {
                let mine = if self.sharded {
                    g.clone()
                } else {
                    gather_ranges(g.clone(), shards)
                };
                accumulate(&mut sq, mine.powi_scalar(2).sum());
            }
        }
        let shard_sq = sq.map_or(0.0, |t| f64::from(to_vec(t)[0]));
        tracing::debug!(step, shard_sq, "gradient norm read");
        // How many ranks want to stop, counted along (exact: small
        // integers in the sums' f64s).
        let stopping = f64::from(u8::from(wants_stop()));
        let mut scalars = vec![local_loss, shard_sq, stopping];
        scalars.extend(&group_loss);
        if reweighted {
            scalars.extend([spread.rows as f64, spread.sum_sq]);
        }
        let summed = sum_f64_ordered_slice(self.groups.dp.as_mut(), &scalars)
            .map_err(in_group(GroupKind::Data))?;
        let (local_loss, local_sq, stopping) = (summed[0], summed[1], summed[2]);
        let local_groups = &summed[3..3 + n_groups];
        // The multipliers' extremes over the replicas: one more small
        // reduction, only under reweighting (every rank agrees on it).
        let mut extremes = [spread.max as f32, -spread.min as f32];
        if reweighted && self.groups.dp.size() > 1 {
            self.groups
                .dp
                .all_reduce_max(&mut extremes)
                .map_err(in_group(GroupKind::Data))?;
        }
        let local_spread = reweighted.then(|| WeightSpread {
            rows: summed[3 + n_groups] as u64,
            sum_sq: summed[4 + n_groups],
            min: -f64::from(extremes[1]),
            max: f64::from(extremes[0]),
        });
        let [stage_sq, stopping] = sum_f64s(self.groups.tp.as_mut(), [local_sq, stopping])
            .map_err(in_group(GroupKind::Tensor))?;
        let loss = if last { local_loss } else { 0.0 };
        let record_len = RECORD + 2 * n_groups + if reweighted { SPREAD } else { 0 };
        let mut record = Vec::with_capacity(record_len);
        record.extend(split_f64(stage_sq));
        record.extend(split_f64(loss));
        record.push(stopping as f32);
        record.extend(
            [
                own.forward_s,
                own.backward_s,
                own.wait_s,
                own.pipeline_s,
                own.tp_comm_s,
            ]
            .map(|x| x as f32),
        );
        for &g in local_groups {
            record.extend(split_f64(if last { g } else { 0.0 }));
        }
        if let Some(w) = local_spread {
            let mine = |x: f64| if last { x } else { 0.0 };
            record.extend(split_f64(mine(w.rows as f64)));
            record.extend(split_f64(mine(w.sum_sq)));
            let high = |x: f32| if last { x } else { f32::NEG_INFINITY };
            record.extend([high(extremes[0]), high(extremes[1])]);
        }
        let mut gathered = vec![0f32; record_len * stages as usize];
        self.groups
            .pp
            .all_gather(&record, &mut gathered)
            .map_err(in_group(GroupKind::Pipeline))?;
        let (mut sq, mut loss, mut stop) = (0.0f64, 0.0f64, false);
        let mut group_loss = vec![0.0f64; n_groups];
        let mut weights = reweighted.then(WeightSpread::default);
        let mut stage_stats = Vec::with_capacity(stages as usize);
        for r in gathered.chunks(record_len) {
            sq += f64::from(r[0]) + f64::from(r[1]);
            loss += f64::from(r[2]) + f64::from(r[3]);
            stop |= r[4] > 0.0;
            stage_stats.push(StageStats {
                forward_s: f64::from(r[5]),
                backward_s: f64::from(r[6]),
                wait_s: f64::from(r[7]),
                pipeline_s: f64::from(r[8]),
                tp_comm_s: f64::from(r[9]),
            });
            for (g, pair) in group_loss.iter_mut().zip(r[RECORD..].chunks(2)) {
                *g += f64::from(pair[0]) + f64::from(pair[1]);
            }
            if let Some(w) = &mut weights {
                let x = &r[RECORD + 2 * n_groups..];
                w.rows += (f64::from(x[0]) + f64::from(x[1])) as u64;
                w.sum_sq += f64::from(x[2]) + f64::from(x[3]);
                w.max = w.max.max(f64::from(x[4]));
                w.min = w.min.min(-f64::from(x[5]));
            }
        }
        if stages == 1 {
            // Exact when nothing had to cross a group.
            sq = stage_sq;
            loss = local_loss;
            group_loss = local_groups.to_vec();
            weights = local_spread;
        }
        let grad_norm = sq.sqrt();
        // PyTorch's clip_grad_norm_: scale by max / (norm + 1e-6), at most 1.
        let clip = match self.cfg.grad_clip {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0) as f32,
            None => 1.0,
        };
        self.grads = grads;
        self.adamw(lr, clip)?;
        let optimizer = t.elapsed();
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            forward,
            backward,
            all_reduce,
            optimizer,
            stages: stage_stats,
            stop,
            group_loss,
            weights,
        })
    }

    /// The mean next-token loss of an evaluation batch, forward only:
    /// `micro` are this rank's microbatches of it (every rank of a
    /// data-parallel replica is given the same ones, as in a step) and
    /// `global_tokens` counts the batch's targets on every replica. The
    /// pipeline runs the training schedule's forwards in its order (the
    /// backwards and their messages left out, so it cannot deadlock where
    /// the schedule does not), tagged apart from training steps; nothing
    /// is kept for a backward and the parameters do not change. Every rank
    /// returns the same value.
    pub fn evaluate(
        &mut self,
        step: u64,
        micro: &[LocalBatch<'_>],
        global_tokens: u64,
    ) -> Result<f64, TrainError> {
        // Bit 23 of the tag's 24 step bits marks evaluation traffic.
        let tag_step = step | 1 << 23;
        let table = self.model.table();
        let (stages, stage) = (table.pp, table.stage);
        let m = micro.len() as u32;
        let chunks = self.model.chunks();
        let mut tp = Tp::new(self.groups.tp.as_mut());
        let mut links = Links {
            pp: self.groups.pp.as_mut(),
            wrap: self.groups.wrap.as_deref_mut(),
            stage: stage as usize,
            stages: stages as usize,
        };
        let mut local_loss = 0.0f64;
        for ChunkOp { op, chunk } in schedule(stages, stage, m, chunks) {
            let PipeOp::Forward(i) = op else { continue };
            let (tape, _) = forward_one(
                &self.model,
                &mut links,
                &mut tp,
                (tag_step, chunk, i),
                &micro[i as usize],
                global_tokens,
                (false, None),
            )?;
            local_loss += tape.loss;
        }
        // The last stage's sum, over the replicas, then over the stages.
        let [replicas] =
            sum_f64s(self.groups.dp.as_mut(), [local_loss]).map_err(in_group(GroupKind::Data))?;
        let [loss] =
            sum_f64s(self.groups.pp.as_mut(), [replicas]).map_err(in_group(GroupKind::Pipeline))?;
        Ok(loss)
    }

    /// AdamW with decoupled weight decay (Loshchilov & Hutter) on
    /// gradients scaled by `clip`, as tensor operations over each bucket on
    /// the device, in the arithmetic of PyTorch's single-tensor AdamW:
    /// scalars formed in f64 and rounded once to f32, the first moment by
    /// `lerp`, the second by `mul` then `addcmul`. The model's parameters
    /// are released first, so that each master bucket has one owner and
    /// the backend may update it in place, then sliced from the new master.
    ///
    /// Sharded, each rank updates its shards (the master's cut from the
    /// whole bucket) and the updated shards are all-gathered into whole
    /// master buckets over the data-parallel group.
    fn adamw(&mut self, lr: f64, clip: f32) -> Result<(), TrainError> {
        self.model.release_params();
        self.steps += 1;
        let t = self.steps as i32;
        let c = &self.cfg;
        let s = cpu::AdamWStep {
            clip,
            b1_weight: (1.0 - c.beta1) as f32,
            b2: c.beta2 as f32,
            b2_weight: (1.0 - c.beta2) as f32,
            step_size: (lr / (1.0 - c.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
            eps: c.eps as f32,
            decay: Some((1.0 - lr * c.weight_decay) as f32),
        };
        let (masters, ms, vs) = (
            std::mem::take(&mut self.master),
            std::mem::take(&mut self.m),
            std::mem::take(&mut self.v),
        );
        let flex = cpu::is_flex::<Inner<B>>();
        let mut staged;
        let dp: &mut dyn DeviceCollective<Inner<B>> = match self.dp_device.as_deref_mut() {
            Some(device) => device,
            None => {
                staged = Staged::new(self.groups.dp.as_mut(), BUCKET_ELEMS);
                &mut staged
            }
        };
        for ((((b, shards), g), (p, m)), v) in self
            .buckets
            .iter()
            .zip(&self.shards)
            .zip(&self.grads)
            .zip(masters.into_iter().zip(ms))
            .zip(vs)
        {
            let s = cpu::AdamWStep {
                decay: s.decay.filter(|_| b.decay),
                ..s
            };
            let p = if self.sharded {
                gather_ranges(p, shards)
            } else {
                p
            };
            let [p, m, v] = if flex {
                cpu::adamw(p, m, v, g, &s)
            } else {
                adamw_by_tensor_ops(p, m, v, g, &s)
            };
            let p = if self.sharded {
                dp.all_gather_shard(p, b.range.len(), BUCKET_ELEMS)
                    .map_err(in_group(GroupKind::Data))?
            } else {
                p
            };
            self.master.push(p);
            self.m.push(m);
            self.v.push(v);
        }
        self.refresh_params();
        if !self.keep_grads {
            self.grads.clear();
        }
        Ok(())
    }
}

/// One forward of a pipeline schedule: microbatch `i` of model chunk
/// `chunk`, its input received from the previous virtual stage (unless the
/// chunk embeds) and its output sent to the next (unless it ends the
/// model), messages tagged with `tag_step`. The tape, and the time blocked
/// receiving.
fn forward_one<B: AutodiffBackend, S: StageForward<B>>(
    model: &S,
    links: &mut Links<'_>,
    tp: &mut Tp<'_>,
    (tag_step, chunk, i): (u64, u32, u32),
    mb: &LocalBatch<'_>,
    global_tokens: u64,
    (per_row, reweigh): (bool, Option<&dyn RowWeigher>),
) -> Result<(TapeOf<B, S>, Duration), TrainError> {
    let stages = model.table().pp;
    let vs = chunk * stages + model.table().stage;
    let d = model.width();
    let seq = mb.seq_len;
    let rows = mb.inputs.len() / seq;
    let mut waited = Duration::ZERO;
    let input = if model.is_first(chunk) {
        StageInput::Tokens(mb.inputs)
    } else {
        let mut buf = vec![0f32; rows * seq * d];
        let t = Instant::now();
        links.recv(false, Tag::activation(tag_step, vs, i), &mut buf)?;
        waited = t.elapsed();
        StageInput::Activation(from_vec(buf, [rows * seq, d], model.device()))
    };
    let last = model.is_last(chunk);
    let micro = Micro {
        rows,
        seq,
        targets: last.then_some(mb.targets),
        denominator: global_tokens as f64,
        per_row,
        reweigh,
    };
    let tape = model
        .forward(chunk, input, &micro, tp)
        .map_err(in_group(GroupKind::Tensor))?;
    if let Some(out) = &tape.output {
        links.send(
            true,
            Tag::activation(tag_step, vs + 1, i),
            &to_vec(out.clone()),
        )?;
    }
    Ok((tape, waited))
}

/// [`cpu::adamw`] as tensor operations, for every other backend.
fn adamw_by_tensor_ops<I: Backend>(
    p: Tensor<I, 1>,
    m: Tensor<I, 1>,
    v: Tensor<I, 1>,
    g: &Tensor<I, 1>,
    s: &cpu::AdamWStep,
) -> [Tensor<I, 1>; 3] {
    let g = if s.clip == 1.0 {
        g.clone()
    } else {
        g.clone().mul_scalar(s.clip)
    };
    let m = m.clone() + (g.clone() - m).mul_scalar(s.b1_weight);
    let v = v.mul_scalar(s.b2) + (g.clone() * g).mul_scalar(s.b2_weight);
    let denom = v.clone().sqrt().div_scalar(s.bc2_sqrt).add_scalar(s.eps);
    let p = match s.decay {
        Some(d) => p.mul_scalar(d),
        None => p,
    };
    [p - m.clone().mul_scalar(s.step_size) / denom, m, v]
}

/// A stage's neighbours in the pipeline: stages s − 1 and s + 1 through
/// the pipeline group, and, in an interleaved pipeline, the last stage's
/// next and the first stage's previous through the wrap-around group (so
/// that each direction of each link carries one kind of message, in the
/// order both ends expect).
struct Links<'a> {
    pp: &'a mut dyn Collective,
    wrap: Option<&'a mut (dyn Collective + 'static)>,
    stage: usize,
    stages: usize,
}

impl Links<'_> {
    fn wrap(&mut self) -> Result<&mut dyn Collective, TrainError> {
        match self.wrap.as_deref_mut() {
            Some(w) => Ok(w),
            None => Err(TrainError {
                group: GroupKind::Wrap,
                source: CollectiveError::NoSuchPeer { peer: 0, size: 0 },
            }),
        }
    }

    /// The group and member index of the next stage (`forward`) or the
    /// previous one.
    fn peer(
        &mut self,
        forward: bool,
    ) -> Result<(&mut dyn Collective, usize, GroupKind), TrainError> {
        let (s, n) = (self.stage, self.stages);
        match (forward, s + 1 < n, s > 0) {
            (true, true, _) => Ok((&mut *self.pp, s + 1, GroupKind::Pipeline)),
            (false, _, true) => Ok((&mut *self.pp, s - 1, GroupKind::Pipeline)),
            // The wrap-around group: member 0 is the first stage, 1 the last.
            (true, false, _) => Ok((self.wrap()?, 0, GroupKind::Wrap)),
            (false, _, false) => Ok((self.wrap()?, 1, GroupKind::Wrap)),
        }
    }

    fn send(&mut self, forward: bool, tag: Tag, data: &[f32]) -> Result<(), TrainError> {
        let (g, peer, kind) = self.peer(forward)?;
        g.send_tagged(peer, tag, data).map_err(in_group(kind))
    }

    fn recv(&mut self, forward: bool, tag: Tag, out: &mut [f32]) -> Result<(), TrainError> {
        let (g, peer, kind) = self.peer(forward)?;
        g.recv_tagged(peer, tag, out).map_err(in_group(kind))
    }
}

/// Floats per stage in the step's pipeline all-gather: the squared norm and
/// the loss as two f32 each, the count of ranks that want to stop, then
/// five timings.
const RECORD: usize = 10;

/// The step's reweighting, for the last stage's microbatches: each group
/// of `r.group` consecutive sequences of the global step weighed by its
/// sequences' mean losses. The loader deals a reweighted step's rows by
/// microbatch ([`strata_dataplane::loader::LoaderConfig::deal_blocks`]),
/// so microbatch i of the dp replicas, in rank order, is one contiguous
/// block of the step: a group that spans replicas is weighed from the
/// block's losses, all-gathered over dp (one small collective per
/// microbatch); one that a replica's part holds whole needs none. Either
/// way every layout weighs the same groups alike (the losses are rounded
/// to f32 on both paths).
struct DpWeigher<'a> {
    r: Reweighting,
    dp: std::cell::RefCell<&'a mut dyn Collective>,
    /// A failed gather, for the step to return (the head that asked gets
    /// uniform weights meanwhile).
    failed: std::cell::RefCell<Option<CollectiveError>>,
}

impl RowWeigher for DpWeigher<'_> {
    fn weigh(&self, means: &[f64]) -> Vec<f64> {
        let n = means.len();
        let mine: Vec<f32> = means.iter().map(|&x| x as f32).collect();
        if n.is_multiple_of(self.r.group as usize) {
            let local: Vec<f64> = mine.iter().map(|&x| f64::from(x)).collect();
            return self.r.multipliers(&local);
        }
        let mut dp = self.dp.borrow_mut();
        let (rank, size) = (dp.rank(), dp.size());
        let mut block = vec![0f32; n * size];
        if let Err(e) = dp.all_gather(&mine, &mut block) {
            *self.failed.borrow_mut() = Some(e);
            return vec![1.0; n];
        }
        let block: Vec<f64> = block.into_iter().map(f64::from).collect();
        self.r.multipliers(&block)[rank * n..(rank + 1) * n].to_vec()
    }
}

/// Floats a stage adds to its record under reweighting: the sequences
/// weighed and the sum of their squared multipliers (two f32 each), the
/// largest multiplier and the negated smallest.
const SPREAD: usize = 6;

/// `x` as the sum of two f32s (high and low parts), so that sums over a
/// group keep about 48 bits of it.
fn split_f64(x: f64) -> [f32; 2] {
    let hi = x as f32;
    [hi, (x - f64::from(hi)) as f32]
}

/// The group's sums of the values in `x`, each carried as two f32s per
/// member, gathered and added in member order (so the result does not
/// depend on which member reduces which part, as a ring's would).
fn sum_f64_ordered_slice(
    group: &mut dyn Collective,
    x: &[f64],
) -> Result<Vec<f64>, CollectiveError> {
    let n = group.size();
    if n == 1 {
        return Ok(x.to_vec());
    }
    let mine: Vec<f32> = x.iter().flat_map(|&v| split_f64(v)).collect();
    let mut all = vec![0f32; mine.len() * n];
    group.all_gather(&mine, &mut all)?;
    let mut out = vec![0f64; x.len()];
    for member in all.chunks(2 * x.len()) {
        for (o, pair) in out.iter_mut().zip(member.chunks(2)) {
            *o += f64::from(pair[0]) + f64::from(pair[1]);
        }
    }
    Ok(out)
}

/// The group's sums of the values in `x`, each carried in two f32s per
/// member.
fn sum_f64s<const N: usize>(
    group: &mut dyn Collective,
    x: [f64; N],
) -> Result<[f64; N], CollectiveError> {
    if group.size() == 1 {
        return Ok(x);
    }
    let mut buf: Vec<f32> = x.iter().flat_map(|&v| split_f64(v)).collect();
    group.all_reduce_sum(&mut buf)?;
    let mut out = [0f64; N];
    for (o, pair) in out.iter_mut().zip(buf.chunks(2)) {
        *o = f64::from(pair[0]) + f64::from(pair[1]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// The CPU kernel's AdamW is the tensor operations' AdamW, bit for
    /// bit, with and without clipping and decay, in place and on a master
    /// that another tensor still shares (which must not change).
    #[test]
    fn the_adamw_kernel_is_bit_identical_to_the_tensor_ops() {
        let n = 100_003;
        let wave = |k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>();
        let dev = Default::default();
        let t = |x: Vec<f32>| from_vec::<Flex, 1>(x, [n], &dev);
        for (clip, decay) in [(1.0, None), (0.37, Some(0.999_7))] {
            let s = cpu::AdamWStep {
                clip,
                b1_weight: 0.1,
                b2: 0.95,
                b2_weight: 0.05,
                step_size: 3e-3,
                bc2_sqrt: 0.31,
                eps: 1e-8,
                decay,
            };
            let (p, m, v, g) = (wave(0.1), wave(0.2), wave(0.3), wave(0.7));
            let v: Vec<f32> = v.iter().map(|x| x * x).collect();
            let want =
                adamw_by_tensor_ops(t(p.clone()), t(m.clone()), t(v.clone()), &t(g.clone()), &s);
            let shared = t(p.clone());
            let got = cpu::adamw(shared.clone(), t(m), t(v), &t(g), &s);
            for (w, g) in want.into_iter().zip(got) {
                let (w, g) = (to_vec(w), to_vec(g));
                assert!(w.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
            assert_eq!(to_vec(shared), p, "a shared master is copied, not written");
        }
    }
}
