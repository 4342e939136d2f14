//! Autodiff across collectives and stages.
//!
//! burn 0.21 has no backward from a given gradient. A stage's forward is
//! therefore cut into *segments* at every collective (and at the stage's
//! input): a segment starts from fresh leaves — its input as a tensor that
//! requires grad, and its own leaves of the parameters it reads — so every
//! segment of every microbatch is a graph of its own. A segment's backward
//! runs from `sum(output ⊙ upstream gradient)`, which yields its
//! parameters' gradients (added to a [`GradAccum`]) and its input's
//! gradient to pass on; the gradient of that root with respect to the
//! output is the upstream gradient exactly, so cutting a graph changes no
//! bit of any gradient. Several microbatches' graphs can be alive at once
//! (1F1B): they share no autodiff node, only the parameter values.
//! Recomputation reuses the cuts: a piece kept as its input is rebuilt as
//! a segment at the backward ([`crate::model`]).

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

use crate::tensors::{accumulate, in_dtype};

/// A piece of a stage's graph between cuts.
pub(crate) struct Segment<B: AutodiffBackend> {
    /// The leaf the segment started from, when its input has a gradient
    /// to pass on.
    pub input: Option<Tensor<B, 2>>,
    pub output: Tensor<B, 2>,
    /// This segment's own leaves of the parameters it read, by slot.
    pub leaves: Vec<(usize, Tensor<B, 2>)>,
}

/// A piece of graph with several inputs and outputs: selective
/// recomputation's projections (the norm's output in; Q, K and V, or gate
/// and up, out) and its rebuilt cores (those in, the branch's output out).
pub(crate) struct Fan<B: AutodiffBackend> {
    pub inputs: Vec<Tensor<B, 2>>,
    pub outputs: Vec<Tensor<B, 2>>,
    pub leaves: Vec<(usize, Tensor<B, 2>)>,
}

impl<B: AutodiffBackend> Fan<B> {
    /// Backpropagates from `Σ sum(outputᵢ ⊙ upstreamᵢ)`; returns each
    /// input's gradient.
    pub fn backward(
        self,
        upstream: Vec<Tensor<B::InnerBackend, 2>>,
        acc: &mut GradAccum<B::InnerBackend>,
    ) -> Vec<Option<Tensor<B::InnerBackend, 2>>> {
        let root = self
            .outputs
            .into_iter()
            .zip(upstream)
            .map(|(o, d)| {
                let d = in_dtype(d, o.dtype());
                (o * Tensor::from_inner(d)).sum()
            })
            .reduce(|a, b| a + b)
            .expect("an output");
        let grads = root.backward();
        for (slot, leaf) in &self.leaves {
            if let Some(g) = leaf.grad(&grads) {
                acc.add(*slot, g);
            }
        }
        self.inputs.iter().map(|x| x.grad(&grads)).collect()
    }
}

/// Per-slot gradient sums on the device, over segments and microbatches.
pub struct GradAccum<I: Backend> {
    pub grads: Vec<Option<Tensor<I, 2>>>,
}

impl<I: Backend> GradAccum<I> {
    pub fn new(n: usize) -> GradAccum<I> {
        GradAccum {
            grads: (0..n).map(|_| None).collect(),
        }
    }

    /// Adds a gradient, in f32 whatever the compute precision.
    pub fn add(&mut self, slot: usize, g: Tensor<I, 2>) {
        accumulate(&mut self.grads[slot], in_dtype(g, DType::F32));
    }
}

impl<B: AutodiffBackend> Segment<B> {
    /// Backpropagates from `sum(output ⊙ upstream)` (from `output` itself
    /// when it is the loss); returns the input's gradient.
    pub fn backward(
        self,
        upstream: Option<Tensor<B::InnerBackend, 2>>,
        acc: &mut GradAccum<B::InnerBackend>,
    ) -> Option<Tensor<B::InnerBackend, 2>> {
        let root = match upstream {
            Some(d) => {
                let d = in_dtype(d, self.output.dtype());
                (self.output * Tensor::from_inner(d)).sum()
            }
            None => self.output.sum(),
        };
        let grads = root.backward();
        for (slot, leaf) in &self.leaves {
            if let Some(g) = leaf.grad(&grads) {
                acc.add(*slot, g);
            }
        }
        self.input.and_then(|x| x.grad(&grads))
    }
}
