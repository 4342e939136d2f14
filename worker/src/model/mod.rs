//! A rank's part of the model, whatever its family, as the trainer
//! drives it.
//!
//! [`StageForward`] is what the step needs of a stage: its parameter
//! table, its parameters set from the optimizer's buckets, one
//! microbatch's forward on one model chunk (a [`Tape`]: the loss or the
//! activations for the next stage, and what the backward needs) and that
//! microbatch's backward, with the tensor-parallel group at hand. A model
//! family ([`strata_dataplane::family`]) implements it once; the pipeline
//! schedule, data parallelism, ZeRO-1 and the optimizer never see more.
//!
//! The Llama family: [`llama`] is its mathematics (RMSNorm, rotary
//! embeddings, grouped-query causal attention, SwiGLU, the fused head and
//! cross-entropy), on any backend and any rank's share of the weights;
//! [`stage`] ([`StageModel`]) runs it as one rank holds it, cut into
//! autodiff segments at every tensor-parallel sum and kept as
//! recomputation asks.

use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use strata_recipe::{ModelConfig, Precision, Recompute};

use crate::collective::CollectiveError;
use crate::params::ParamTable;
use crate::segment::GradAccum;
use crate::tp::Tp;

pub mod llama;
pub mod stage;

pub use crate::cpu::HeadLayout;
pub use llama::{
    Dims, PerToken, Rope, causal_attention, cross_entropy, fused_head_cross_entropy, rms_norm,
};
pub use stage::StageModel;

/// What a stage's forward starts from.
pub enum StageInput<'a, I: Backend> {
    /// The first stage: token ids, `rows × seq` row-major.
    Tokens(&'a [u32]),
    /// Later stages: the previous stage's activations `[rows·seq, d]`.
    Activation(Tensor<I, 2>),
}

/// One microbatch as a stage's forward sees it.
pub struct Micro<'a> {
    /// `rows` sequences of `seq` tokens.
    pub rows: usize,
    pub seq: usize,
    /// The next tokens, for the last chunk of the pipeline.
    pub targets: Option<&'a [u32]>,
    /// What the summed loss is divided by: the step's target tokens on
    /// every rank.
    pub denominator: f64,
    /// Whether the last stage reports each sequence's loss
    /// ([`Tape::row_loss`]).
    pub per_row: bool,
    /// Loss-based reweighting of this microbatch's sequences, when on
    /// for the step.
    pub reweigh: Option<&'a dyn RowWeigher>,
}

/// Turns the mean token losses of a microbatch's sequences into their
/// loss multipliers (loss-based reweighting). The trainer's weighs each
/// group of the global step, gathering the losses of the other replicas'
/// part of the microbatch when a group spans them.
pub trait RowWeigher {
    fn weigh(&self, means: &[f64]) -> Vec<f64>;
}

/// Each row's summed token losses: `tokens` holds `rows · seq` of them.
pub fn row_sums(tokens: &[f64], seq: usize) -> Vec<f64> {
    tokens.chunks(seq).map(|r| r.iter().sum()).collect()
}

/// The last stage's per-token requests for microbatch `mb`: its tokens'
/// losses into `tokens` when it reports them by row, and under
/// reweighting a weigher that turns every token's loss into each token's
/// multiplier (its sequence's, from the sequence's mean token loss within
/// its group), keeping each sequence's multiplier in `rows`.
pub fn per_token<'a>(
    mb: &Micro<'_>,
    tokens: &'a mut Vec<f64>,
    weigh: &'a mut Option<Weigher<'_>>,
) -> PerToken<'a> {
    PerToken {
        losses: mb.per_row.then_some(tokens),
        weigh: weigh
            .as_mut()
            .map(|w| w as &mut dyn FnMut(&[f64]) -> Vec<f32>),
    }
}

/// A weigher for [`per_token`]: sequences of `seq` tokens weighed by
/// `reweigh`, each one's multiplier pushed to `rows`.
pub type Weigher<'a> = Box<dyn FnMut(&[f64]) -> Vec<f32> + 'a>;

/// The weigher of microbatch `mb`, when it is reweighted.
pub fn weigher<'a>(mb: &Micro<'a>, rows: &'a mut Vec<f64>) -> Option<Weigher<'a>> {
    let r = mb.reweigh?;
    let seq = mb.seq;
    Some(Box::new(move |tokens: &[f64]| {
        let means: Vec<f64> = row_sums(tokens, seq)
            .into_iter()
            .map(|s| s / seq as f64)
            .collect();
        let m = r.weigh(&means);
        let scales = m
            .iter()
            .flat_map(|&x| std::iter::repeat_n(x as f32, seq))
            .collect();
        *rows = m;
        scales
    }))
}

/// One microbatch's forward on a stage, kept for its backward: what the
/// schedule reads, and what the family keeps (`K`).
pub struct Tape<I: Backend, K> {
    /// On the last stage: the microbatch's summed loss over the step's
    /// denominator.
    pub loss: f64,
    /// On other stages: the activations for the next stage.
    pub output: Option<Tensor<I, 2>>,
    pub kept: K,
    /// On the last stage, when [`Micro::per_row`] asks: each sequence's
    /// summed (undivided) token losses, in row order.
    pub row_loss: Vec<f64>,
    /// On the last stage, under reweighting: each sequence's multiplier.
    pub row_weight: Vec<f64>,
}

/// The tape of stage `S`'s forward.
pub type TapeOf<B, S> = Tape<<B as AutodiffBackend>::InnerBackend, <S as StageForward<B>>::Kept>;

/// What the trainer needs of a rank's part of a model.
pub trait StageForward<B: AutodiffBackend>: Sized {
    /// What a microbatch's forward keeps for its backward.
    type Kept;

    /// The part of `cfg` that `table` describes, its parameters still to
    /// be given by [`StageForward::set_params`].
    fn new_empty(cfg: &ModelConfig, table: ParamTable, device: &B::Device) -> Self;

    fn table(&self) -> &ParamTable;

    fn device(&self) -> &B::Device;

    /// The width of the activations between stages (`[rows·seq, width]`).
    fn width(&self) -> usize;

    /// This rank's model chunks (one unless the pipeline is interleaved).
    fn chunks(&self) -> u32;

    /// Whether model chunk `chunk` is the first of the whole pipeline (it
    /// embeds the tokens).
    fn is_first(&self, chunk: u32) -> bool {
        self.table().stage == 0 && chunk == 0
    }

    /// Whether model chunk `chunk` is the last of the whole pipeline (it
    /// computes the head and the loss).
    fn is_last(&self, chunk: u32) -> bool {
        let t = self.table();
        t.stage + 1 == t.pp && chunk + 1 == self.chunks()
    }

    /// Replaces every parameter's value with `flat[slot]`, a device tensor
    /// holding the slot's elements in order (a slice of a master bucket).
    fn set_params(&mut self, flat: Vec<Tensor<B::InnerBackend, 1>>);

    /// Drops the parameter values, so that the optimizer owns the only
    /// reference to the master buckets they were sliced from.
    fn release_params(&mut self);

    /// Computes in `precision` from the next [`StageForward::set_params`]
    /// on (f32 unless set).
    fn set_precision(&mut self, precision: Precision);

    /// Keeps activations as `recompute` says from the next forward on.
    fn set_recompute(&mut self, recompute: Recompute);

    /// Runs model chunk `chunk`'s forward on microbatch `mb`.
    fn forward(
        &self,
        chunk: u32,
        input: StageInput<'_, B::InnerBackend>,
        mb: &Micro<'_>,
        tp: &mut Tp<'_>,
    ) -> Result<Tape<B::InnerBackend, Self::Kept>, CollectiveError>;

    /// Backpropagates one microbatch's tape: `upstream` is the gradient of
    /// the stage's output (none on the last stage, whose output is the
    /// loss). Parameter gradients are added to `acc`; returns the gradient
    /// of the stage's input activations (none on the first stage).
    fn backward(
        &self,
        tape: Tape<B::InnerBackend, Self::Kept>,
        upstream: Option<Tensor<B::InnerBackend, 2>>,
        acc: &mut GradAccum<B::InnerBackend>,
        tp: &mut Tp<'_>,
    ) -> Result<Option<Tensor<B::InnerBackend, 2>>, CollectiveError>;
}
