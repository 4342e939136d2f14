//! One data-parallel rank's training step: forward and backward over its
//! microbatches, one bucketed all-reduce of the gradients (and the loss),
//! clipping by the global gradient norm, and AdamW.
//!
//! The optimizer works on a flat host copy of the parameters (the master
//! weights) with its moments beside them, so its whole state is three
//! vectors and a step count: easy to checkpoint and to shard later.

use std::time::{Duration, Instant};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use strata_recipe::AdamWConfig;

use crate::collective::{Collective, CollectiveError};
use crate::model::{Llama, cross_entropy};

/// Largest all-reduce call, in elements (16 MiB of f32).
pub const BUCKET_ELEMS: usize = 4 << 20;

/// Where one parameter lives in the flat buffers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSlot {
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// Weight decay applies to matrices, not to norm gains or biases.
    pub decay: bool,
}

/// AdamW's state: the step count and both moments, flat like the master
/// weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over every token of the global step.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub forward: Duration,
    pub backward: Duration,
    pub all_reduce: Duration,
    pub optimizer: Duration,
}

/// One rank's share of a step: `rows` sequences of `seq_len` tokens.
pub struct LocalBatch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [u32],
    pub seq_len: usize,
}

struct Collect<'a> {
    slots: &'a mut Vec<ParamSlot>,
    values: &'a mut Vec<f32>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let data: Vec<f32> = t.into_data().convert::<f32>().into_vec().expect("f32 data");
        self.slots.push(ParamSlot {
            offset: self.values.len(),
            len: data.len(),
            decay: D >= 2,
            shape,
        });
        self.values.extend_from_slice(&data);
    }
}

struct CollectGrads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    slots: &'a [ParamSlot],
    next: usize,
    /// Gradients are added here (microbatches accumulate).
    out: &'a mut [f32],
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let slot = &self.slots[self.next];
        self.next += 1;
        if let Some(g) = param.val().grad(self.grads) {
            let g: Vec<f32> = g.into_data().convert::<f32>().into_vec().expect("f32 grad");
            for (o, x) in self.out[slot.offset..slot.offset + slot.len]
                .iter_mut()
                .zip(g)
            {
                *o += x;
            }
        }
    }
}

struct Load<'a> {
    slots: &'a [ParamSlot],
    values: &'a [f32],
    next: usize,
}

impl<B: Backend> ModuleMapper<B> for Load<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let slot = &self.slots[self.next];
        self.next += 1;
        let values = self.values[slot.offset..slot.offset + slot.len].to_vec();
        let shape: [usize; D] = slot.shape.clone().try_into().expect("slot rank");
        param.map(|t| {
            let device = t.device();
            Tensor::from_data(TensorData::new(values, shape), &device).require_grad()
        })
    }
}

/// A model replica with its optimizer, for one data-parallel rank.
pub struct Trainer<B: AutodiffBackend> {
    model: Option<Llama<B>>,
    slots: Vec<ParamSlot>,
    master: Vec<f32>,
    state: AdamWState,
    cfg: AdamWConfig,
    grads: Vec<f32>,
    device: B::Device,
}

impl<B: AutodiffBackend> Trainer<B> {
    pub fn new(model: Llama<B>, cfg: AdamWConfig, device: B::Device) -> Trainer<B> {
        let mut slots = Vec::new();
        let mut master = Vec::new();
        model.visit(&mut Collect {
            slots: &mut slots,
            values: &mut master,
        });
        let n = master.len();
        Trainer {
            model: Some(model),
            slots,
            master,
            state: AdamWState {
                step: 0,
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            cfg,
            grads: vec![0.0; n + 1],
            device,
        }
    }

    pub fn model(&self) -> &Llama<B> {
        self.model.as_ref().expect("model present between steps")
    }

    pub fn n_params(&self) -> usize {
        self.master.len()
    }

    pub fn master(&self) -> &[f32] {
        &self.master
    }

    pub fn optimizer_state(&self) -> &AdamWState {
        &self.state
    }

    /// One optimizer step. `micro` are this rank's microbatches;
    /// `global_tokens` counts the target tokens of the whole step on every
    /// rank; `dp` all-reduces over the data-parallel group.
    pub fn step(
        &mut self,
        micro: &[LocalBatch<'_>],
        global_tokens: u64,
        lr: f64,
        dp: &mut dyn Collective,
    ) -> Result<StepStats, CollectiveError> {
        let n = self.master.len();
        self.grads.iter_mut().for_each(|g| *g = 0.0);
        let (mut forward, mut backward) = (Duration::ZERO, Duration::ZERO);
        let mut local_loss = 0.0f64;
        for mb in micro {
            let rows = mb.inputs.len() / mb.seq_len;
            let t = Instant::now();
            let model = self.model();
            let ids = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
            let inputs = Tensor::<B, 2, Int>::from_data(
                TensorData::new(ids(mb.inputs), [rows, mb.seq_len]),
                &self.device,
            );
            let targets = Tensor::<B, 1, Int>::from_data(
                TensorData::new(ids(mb.targets), [rows * mb.seq_len]),
                &self.device,
            );
            let loss = cross_entropy(model.forward(inputs), targets, global_tokens as f64);
            local_loss += loss
                .clone()
                .into_data()
                .convert::<f64>()
                .into_vec::<f64>()
                .expect("scalar loss")[0];
            forward += t.elapsed();
            let t = Instant::now();
            let g = loss.backward();
            let mut collect = CollectGrads::<B> {
                grads: &g,
                slots: &self.slots,
                next: 0,
                out: &mut self.grads[..n],
            };
            self.model
                .as_ref()
                .expect("model present between steps")
                .visit(&mut collect);
            backward += t.elapsed();
        }

        // The loss rides along in the last element: one collective per bucket.
        let t = Instant::now();
        self.grads[n] = local_loss as f32;
        for bucket in self.grads.chunks_mut(BUCKET_ELEMS) {
            dp.all_reduce_sum(bucket)?;
        }
        let all_reduce = t.elapsed();
        let loss = f64::from(self.grads[n]);

        let t = Instant::now();
        let grad_norm = self.grads[..n]
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()
            .sqrt();
        let clip = match self.cfg.grad_clip {
            Some(max) if grad_norm > max => (max / (grad_norm + 1e-6)) as f32,
            _ => 1.0,
        };
        self.adamw(lr, clip);
        let model = self.model.take().expect("model present");
        self.model = Some(model.map(&mut Load {
            slots: &self.slots,
            values: &self.master,
            next: 0,
        }));
        let optimizer = t.elapsed();
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            forward,
            backward,
            all_reduce,
            optimizer,
        })
    }

    /// AdamW with decoupled weight decay (Loshchilov & Hutter), as PyTorch
    /// computes it, on gradients scaled by `clip`.
    fn adamw(&mut self, lr: f64, clip: f32) {
        self.state.step += 1;
        let t = self.state.step as i32;
        let (b1, b2) = (self.cfg.beta1 as f32, self.cfg.beta2 as f32);
        let bc1 = 1.0 - self.cfg.beta1.powi(t);
        let bc2 = 1.0 - self.cfg.beta2.powi(t);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.cfg.eps as f32;
        for slot in &self.slots {
            let decay = if slot.decay {
                1.0 - (lr * self.cfg.weight_decay) as f32
            } else {
                1.0
            };
            let r = slot.offset..slot.offset + slot.len;
            let p = &mut self.master[r.clone()];
            let m = &mut self.state.m[r.clone()];
            let v = &mut self.state.v[r.clone()];
            let g = &self.grads[r];
            for i in 0..p.len() {
                let gi = g[i] * clip;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] = p[i] * decay - step_size * m[i] / denom;
            }
        }
    }
}
