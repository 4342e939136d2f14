//! The Llama family's stage as one rank holds it: the layers of its
//! pipeline stage, each tensor-parallel one cut Megatron's way.
//!
//! Under tensor parallelism (Shoeybi et al. 2019) Q, K, V, gate and up are
//! column-parallel (each rank its heads and columns), the attention output
//! and down projections row-parallel (each rank a partial sum,
//! all-reduced: the *g* operator), and the inputs of the column-parallel
//! parts are replicated with their gradients all-reduced (the *f*
//! operator, placed after the norm as in Megatron, so norm gains get
//! identical gradients on every rank). The embedding is split by
//! vocabulary rows and the head by vocabulary columns, with a
//! cross-entropy that never gathers the logits ([`crate::tp`]).
//!
//! # Autodiff across collectives and stages
//!
//! A stage's forward is cut into segments ([`crate::segment`]) at every
//! tensor-parallel sum and at the stage's input; residual additions across
//! a cut are done by the driver (the backward adds the skip gradient).
//! With `tp = 1` nothing needs cutting and the stage is one segment, unless
//! recomputation cuts it at its blocks.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor};
use strata_recipe::{ModelConfig, Precision, Recompute};

use super::llama::{
    Dims, Rope, attention_core, block, branch, fused_head_cross_entropy, linear, linear_grads,
    rms_norm,
};
use super::{Micro, StageForward, StageInput, Tape, per_token, row_sums, weigher};
use crate::collective::CollectiveError;
use crate::cpu::{self, HeadLayout};
use crate::params::{BlockParam, ParamSlot, ParamTable, Role};
use crate::segment::{Fan, GradAccum, Segment};
use crate::tensors::{from_vec, in_dtype, token_ids};
use crate::tp::{Tp, parallel_cross_entropy, vocab_rows};

/// A Llama stage's tape.
pub type LlamaTape<B> = Tape<<B as AutodiffBackend>::InnerBackend, Kept<B>>;

/// The shape a slot's value has in the model: matrices as they are, norm
/// gains as `[1, d]`.
fn slot_shape(s: &ParamSlot) -> [usize; 2] {
    match s.shape[..] {
        [n] => [1, n],
        [r, c] => [r, c],
        _ => unreachable!("parameters have one or two dimensions"),
    }
}

/// The backward of `h + g(branch(f(norm(h))))` from the stream's gradient
/// `dh`: g's backward is the identity, so the branch starts from `dh`.
fn residual_backward<B: AutodiffBackend>(
    dh: Option<Tensor<B::InnerBackend, 2>>,
    norm: Segment<B>,
    branch: Segment<B>,
    acc: &mut GradAccum<B::InnerBackend>,
    tp: &mut Tp<'_>,
) -> Result<Tensor<B::InnerBackend, 2>, CollectiveError> {
    let skip = dh.expect("a residual block has an upstream gradient");
    let dy = branch
        .backward(Some(skip.clone()), acc)
        .expect("branch input");
    through_norm(skip, dy, norm, acc, tp)
}

/// The rest of a residual branch's backward from `dy`, the gradient at
/// the norm's output on this rank: f's backward (the sum over tp), the
/// norm's, and the skip added.
fn through_norm<B: AutodiffBackend>(
    skip: Tensor<B::InnerBackend, 2>,
    dy: Tensor<B::InnerBackend, 2>,
    norm: Segment<B>,
    acc: &mut GradAccum<B::InnerBackend>,
    tp: &mut Tp<'_>,
) -> Result<Tensor<B::InnerBackend, 2>, CollectiveError> {
    let dy = tp.sum_tensor(dy)?;
    let through = norm.backward(Some(dy), acc).expect("norm input");
    Ok(skip + through)
}

enum Piece<B: AutodiffBackend> {
    /// The whole stage in one graph (tp = 1).
    Whole(Segment<B>),
    /// The vocabulary-parallel lookup; its output is this rank's partial
    /// sum of the embeddings.
    Embed(Segment<B>),
    /// `h + g(branch(f(norm(h))))`: the norm on the replicated stream, then
    /// this rank's share of attention or MLP.
    Residual {
        norm: Segment<B>,
        branch: Segment<B>,
    },
    /// The final norm, then this rank's logit columns and its part of the
    /// parallel cross-entropy.
    Head { norm: Segment<B>, head: Segment<B> },
    /// Under full recomputation (tp = 1): a block kept as its input only;
    /// the backward runs its forward again, tracked, and backpropagates
    /// through that.
    Block {
        slots: BlockSlots,
        input: Tensor<B::InnerBackend, 2>,
        rows: usize,
        seq: usize,
    },
    /// Under selective recomputation: a residual branch as its norm's
    /// segment, its projections' (kept, as is their output) and its core
    /// (attention's, or SwiGLU's and the down projection), run again at
    /// the backward from the projections' output.
    Selective {
        norm: Segment<B>,
        projections: Fan<B>,
        core: Core,
    },
    /// Under full recomputation with tensor parallelism: a residual
    /// branch (norm, then this rank's attention or MLP) kept as its input.
    Branch {
        slots: BlockSlots,
        attn: bool,
        input: Tensor<B::InnerBackend, 2>,
        rows: usize,
        seq: usize,
    },
}

/// A residual branch's core under selective recomputation: the
/// projections' output it starts from, and what rebuilds it.
struct Core {
    slots: BlockSlots,
    attn: bool,
    rows: usize,
    seq: usize,
}

/// What a Llama stage's forward keeps for its backward.
pub struct Kept<B: AutodiffBackend> {
    pieces: Vec<Piece<B>>,
    /// The head's gradient (by slot), when the forward computed it with
    /// the loss.
    head_grad: Option<(usize, Tensor<B::InnerBackend, 2>)>,
}

/// A tape of `pieces`.
fn tape<B: AutodiffBackend>(
    pieces: Vec<Piece<B>>,
    loss: f64,
    output: Option<Tensor<B::InnerBackend, 2>>,
    head_grad: Option<(usize, Tensor<B::InnerBackend, 2>)>,
) -> LlamaTape<B> {
    Tape {
        loss,
        output,
        kept: Kept { pieces, head_grad },
        row_loss: Vec::new(),
        row_weight: Vec::new(),
    }
}

/// The indices of a block's parameters in the table.
#[derive(Debug, Clone, Copy)]
struct BlockSlots([usize; 9]);

impl BlockSlots {
    fn get(&self, p: BlockParam) -> usize {
        self.0[p as usize]
    }
}

/// One rank's part of the model: its stage's layers, cut for its
/// tensor-parallel rank, with the parameter values it trains.
pub struct StageModel<B: AutodiffBackend> {
    table: ParamTable,
    /// Current values, one per slot, matrices as they are and norm gains
    /// as `[1, d]`.
    params: Vec<Tensor<B::InnerBackend, 2>>,
    rope: Rope<B::InnerBackend>,
    dims: Dims,
    embed: Option<usize>,
    final_norm: Option<usize>,
    /// The head's slot, or the embedding's when tied.
    head: Option<usize>,
    tied: bool,
    /// Each model chunk's blocks (one chunk unless interleaved).
    blocks: Vec<Vec<BlockSlots>>,
    device: B::Device,
    /// The parameters' and activations' dtype: f32, or bf16 under mixed
    /// precision.
    compute: DType,
    recompute: Recompute,
}

impl<B: AutodiffBackend> StageModel<B> {
    /// The model part described by `table`, with the flat `values` (one
    /// run per slot, in table order).
    pub fn new(
        cfg: &ModelConfig,
        table: ParamTable,
        values: &[f32],
        device: &B::Device,
    ) -> StageModel<B> {
        let mut model = StageModel::new_empty(cfg, table, device);
        model.load(values);
        model
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    /// Replaces every parameter's value from the flat host buffer `values`.
    pub fn load(&mut self, values: &[f32]) {
        assert_eq!(values.len(), self.table.total, "flat parameter buffer");
        self.params = self
            .table
            .slots
            .iter()
            .map(|s| from_vec(values[s.range()].to_vec(), slot_shape(s), &self.device))
            .collect();
    }

    /// The dtype the model computes in.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    fn leaf(&self, slot: usize, leaves: &mut Vec<(usize, Tensor<B, 2>)>) -> Tensor<B, 2> {
        let t = Tensor::<B, 2>::from_inner(self.params[slot].clone()).require_grad();
        leaves.push((slot, t.clone()));
        t
    }

    /// Parameter `slot` outside any graph: operations on it are not
    /// recorded, but run the same kernels as tracked ones.
    fn untracked(&self, slot: usize) -> Tensor<B, 2> {
        Tensor::from_inner(self.params[slot].clone())
    }

    /// One residual branch of block `b` (attention or MLP) on the stream
    /// `h`: the norm's segment, and the branch's from the norm's output
    /// as a leaf.
    fn residual_segments(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        b: &BlockSlots,
        attn: bool,
        (rows, seq): (usize, usize),
    ) -> (Segment<B>, Segment<B>) {
        use BlockParam::*;
        let (norm, y) = self.norm_segment(h, b.get(if attn { AttnNorm } else { MlpNorm }));
        let mut leaves = Vec::new();
        let y_leaf = Tensor::<B, 2>::from_inner(y.inner()).require_grad();
        let weight = |p| self.leaf(b.get(p), &mut leaves);
        let partial = branch(
            y_leaf.clone(),
            attn,
            weight,
            &self.rope(),
            rows,
            seq,
            &self.dims,
        );
        let branch = Segment {
            input: Some(y_leaf),
            output: partial,
            leaves,
        };
        (norm, branch)
    }

    /// The same branch's output, untracked (nothing kept for a backward).
    fn residual_untracked(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        b: &BlockSlots,
        attn: bool,
        (rows, seq): (usize, usize),
    ) -> Tensor<B::InnerBackend, 2> {
        use BlockParam::*;
        let w = |p| self.untracked(b.get(p));
        let y = rms_norm(
            Tensor::<B, 2>::from_inner(h),
            w(if attn { AttnNorm } else { MlpNorm }),
        );
        branch(y, attn, w, &self.rope(), rows, seq, &self.dims).inner()
    }

    /// One residual branch of block `b` on the stream `h` under selective
    /// recomputation: pushes its piece and returns its (partial) output,
    /// the core run untracked.
    fn residual_selective(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        b: &BlockSlots,
        attn: bool,
        (rows, seq): (usize, usize),
        pieces: &mut Vec<Piece<B>>,
    ) -> Tensor<B::InnerBackend, 2> {
        use BlockParam::*;
        let (norm, y) = self.norm_segment(h, b.get(if attn { AttnNorm } else { MlpNorm }));
        let mut leaves = Vec::new();
        let y_leaf = Tensor::<B, 2>::from_inner(y.inner()).require_grad();
        let which: &[BlockParam] = if attn { &[Wq, Wk, Wv] } else { &[WGate, WUp] };
        let kept: Vec<Tensor<B, 2>> = which
            .iter()
            .map(|&p| linear(y_leaf.clone(), self.leaf(b.get(p), &mut leaves)))
            .collect();
        let core = Core {
            slots: *b,
            attn,
            rows,
            seq,
        };
        let z = self.core_forward(
            &core,
            kept.iter()
                .map(|k| Tensor::from_inner(k.clone().inner()))
                .collect(),
        );
        let partial = linear(z, self.untracked(Self::core_out(&core)));
        pieces.push(Piece::Selective {
            norm,
            projections: Fan {
                inputs: vec![y_leaf],
                outputs: kept,
                leaves,
            },
            core,
        });
        partial.inner()
    }

    /// A selective branch's core on the projections it kept (Q, K and V,
    /// or the gate and up products): the input of its last projection
    /// (attention's heads, or SwiGLU's product).
    fn core_forward(&self, core: &Core, kept: Vec<Tensor<B, 2>>) -> Tensor<B, 2> {
        let mut kept = kept.into_iter();
        let mut next = || kept.next().expect("a kept projection");
        if core.attn {
            let qkv = [next(), next(), next()];
            attention_core(qkv, &self.rope(), core.rows, core.seq, &self.dims)
        } else {
            let (a, b) = (next(), next());
            cpu::swiglu(a, b)
        }
    }

    /// The slot of a selective branch's last projection (output or down).
    fn core_out(core: &Core) -> usize {
        core.slots.get(if core.attn {
            BlockParam::Wo
        } else {
            BlockParam::WDown
        })
    }

    /// The pieces and output of one residual branch of block `b` on `h`,
    /// kept as `self.recompute` says (under full recomputation with
    /// tensor parallelism, and under none or selective at any tp).
    fn residual(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        b: &BlockSlots,
        attn: bool,
        dims: (usize, usize),
        pieces: &mut Vec<Piece<B>>,
    ) -> Tensor<B::InnerBackend, 2> {
        match self.recompute {
            Recompute::Full => {
                pieces.push(Piece::Branch {
                    slots: *b,
                    attn,
                    input: h.clone(),
                    rows: dims.0,
                    seq: dims.1,
                });
                self.residual_untracked(h, b, attn, dims)
            }
            Recompute::Selective => self.residual_selective(h, b, attn, dims, pieces),
            Recompute::None => {
                let (norm, branch) = self.residual_segments(h, b, attn, dims);
                let partial = branch.output.clone().inner();
                pieces.push(Piece::Residual { norm, branch });
                partial
            }
        }
    }

    fn rope(&self) -> Rope<B> {
        self.rope.map(Tensor::from_inner)
    }

    /// A segment that norms the replicated stream `h` with gain `slot`;
    /// its output, the input of a column-parallel part.
    fn norm_segment(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        slot: usize,
    ) -> (Segment<B>, Tensor<B, 2>) {
        let mut leaves = Vec::new();
        let h_leaf = Tensor::<B, 2>::from_inner(h).require_grad();
        let y = rms_norm(h_leaf.clone(), self.leaf(slot, &mut leaves));
        let seg = Segment {
            input: Some(h_leaf),
            output: y.clone(),
            leaves,
        };
        (seg, y)
    }

    fn head_weight(&self, leaves: &mut Vec<(usize, Tensor<B, 2>)>) -> Tensor<B, 2> {
        let w = self.leaf(self.head.expect("the last stage has a head"), leaves);
        if self.tied { w.transpose() } else { w }
    }

    /// The stage as one graph (no tensor parallelism).
    fn forward_whole(
        &self,
        chunk: u32,
        input: StageInput<'_, B::InnerBackend>,
        mb: &Micro<'_>,
    ) -> LlamaTape<B> {
        if self.recompute != Recompute::None {
            return self.forward_recomputed(chunk, input, mb);
        }
        let (rows, seq) = (mb.rows, mb.seq);
        let mut leaves = Vec::new();
        let rope = self.rope();
        let (mut x, input) = match input {
            StageInput::Tokens(tokens) => {
                let table = self.leaf(self.embed.expect("the first stage embeds"), &mut leaves);
                (table.select(0, token_ids(tokens, &self.device)), None)
            }
            StageInput::Activation(h) => {
                let leaf = Tensor::<B, 2>::from_inner(in_dtype(h, self.compute)).require_grad();
                (leaf.clone(), Some(leaf))
            }
        };
        for b in &self.blocks[chunk as usize] {
            let weight = |p| self.leaf(b.get(p), &mut leaves);
            x = block(x, weight, &rope, rows, seq, &self.dims);
        }
        if !self.is_last(chunk) {
            let output = x.clone().inner();
            return tape(
                vec![Piece::Whole(Segment {
                    input,
                    output: x,
                    leaves,
                })],
                0.0,
                Some(output),
                None,
            );
        }
        self.fused_head(x, input, leaves, mb)
    }

    /// The stage under recomputation (tp = 1): the embedding as a segment
    /// of its own; each block run untracked and kept as its input (full),
    /// or as its residual branches' selective pieces; the final norm and
    /// the head as one segment from the last block's output.
    fn forward_recomputed(
        &self,
        chunk: u32,
        input: StageInput<'_, B::InnerBackend>,
        mb: &Micro<'_>,
    ) -> LlamaTape<B> {
        let (rows, seq) = (mb.rows, mb.seq);
        let rope = self.rope();
        let mut pieces = Vec::new();
        let mut x = match input {
            StageInput::Tokens(tokens) => {
                let mut leaves = Vec::new();
                let table = self.leaf(self.embed.expect("the first stage embeds"), &mut leaves);
                let e = table.select(0, token_ids(tokens, &self.device));
                pieces.push(Piece::Embed(Segment {
                    input: None,
                    output: e.clone(),
                    leaves,
                }));
                e.inner()
            }
            StageInput::Activation(h) => in_dtype(h, self.compute),
        };
        for b in &self.blocks[chunk as usize] {
            if self.recompute == Recompute::Selective {
                for attn in [true, false] {
                    x = x.clone() + self.residual(x, b, attn, (rows, seq), &mut pieces);
                }
                continue;
            }
            pieces.push(Piece::Block {
                slots: *b,
                input: x.clone(),
                rows,
                seq,
            });
            let weight = |p| self.untracked(b.get(p));
            x = block(
                Tensor::<B, 2>::from_inner(x),
                weight,
                &rope,
                rows,
                seq,
                &self.dims,
            )
            .inner();
        }
        if !self.is_last(chunk) {
            return tape(pieces, 0.0, Some(x), None);
        }
        let leaf = Tensor::<B, 2>::from_inner(x).require_grad();
        let mut end = self.fused_head(leaf.clone(), Some(leaf), Vec::new(), mb);
        pieces.append(&mut end.kept.pieces);
        end.kept.pieces = pieces;
        end
    }

    /// The last stage's end on the stream `x` (a graph from `input`,
    /// `leaves` so far): the final norm, then the head and the loss
    /// outside the graph — their gradients are known as soon as the loss
    /// is, so they are computed now, chunk by chunk, and the graph
    /// continues from `sum(y ⊙ dy)`.
    fn fused_head(
        &self,
        x: Tensor<B, 2>,
        input: Option<Tensor<B, 2>>,
        mut leaves: Vec<(usize, Tensor<B, 2>)>,
        mb: &Micro<'_>,
    ) -> LlamaTape<B> {
        let (targets, denominator) = (mb.targets, mb.denominator);
        let g = self.leaf(self.final_norm.expect("last stage"), &mut leaves);
        let y = rms_norm(x, g);
        let slot = self.head.expect("the last stage has a head");
        let layout = if self.tied {
            HeadLayout::Rows
        } else {
            HeadLayout::Columns
        };
        let targets = targets.expect("the last stage has targets");
        let (mut tokens, mut weights) = (Vec::new(), Vec::new());
        let mut weigh = weigher(mb, &mut weights);
        let (loss, dy, dw) = fused_head_cross_entropy(
            y.clone().inner(),
            self.params[slot].clone(),
            layout,
            targets,
            denominator,
            &self.device,
            per_token(mb, &mut tokens, &mut weigh),
        );
        drop(weigh);
        let surrogate = (y * Tensor::from_inner(dy)).sum();
        let mut done = tape(
            vec![Piece::Whole(Segment {
                input,
                output: surrogate.reshape([1, 1]),
                leaves,
            })],
            loss,
            None,
            Some((slot, dw)),
        );
        done.row_loss = row_sums(&tokens, mb.seq);
        done.row_weight = weights;
        done
    }

    /// Logits `[rows·seq, padded_vocab]` of the whole model for `tokens`
    /// (inference; only for a rank that holds the whole model).
    pub fn logits(&self, tokens: &[u32], rows: usize, seq: usize) -> Tensor<B::InnerBackend, 2> {
        assert!(
            self.is_first(0) && self.is_last(0) && self.table.tp == 1,
            "logits need the whole model on one rank"
        );
        let p = |slot: usize| self.params[slot].clone();
        let t = token_ids(tokens, &self.device);
        let mut x = p(self.embed.expect("embedding")).select(0, t);
        for b in &self.blocks[0] {
            let weight = |q| p(b.get(q));
            x = block(x, weight, &self.rope, rows, seq, &self.dims);
        }
        let y = rms_norm(x, p(self.final_norm.expect("final norm")));
        let w = p(self.head.expect("head"));
        y.matmul(if self.tied { w.transpose() } else { w })
    }
}

impl<B: AutodiffBackend> StageForward<B> for StageModel<B> {
    type Kept = Kept<B>;

    /// The model part described by `table`, its parameters still to be
    /// given by [`StageModel::load`] or [`StageModel::set_params`].
    fn new_empty(cfg: &ModelConfig, table: ParamTable, device: &B::Device) -> StageModel<B> {
        let tp = table.tp as usize;
        let v = cfg.padded_vocab_size as usize;
        let dims = Dims {
            d_model: cfg.d_model as usize,
            heads: cfg.n_heads as usize / tp,
            // With more ranks than KV heads, each rank holds the one its
            // query heads read.
            kv_heads: (cfg.n_kv_heads as usize / tp).max(1),
            head_dim: cfg.head_dim() as usize,
            vocab_start: v / tp * table.tp_rank as usize,
            vocab_len: v / tp,
        };
        let rope = Rope::new(
            cfg.max_seq_len as usize,
            dims.head_dim,
            cfg.rope_theta,
            device,
        );
        let embed = table.index(Role::Embed);
        let final_norm = table.index(Role::FinalNorm);
        let head = if cfg.tie_embeddings {
            final_norm.and(embed)
        } else {
            table.index(Role::Head)
        };
        let blocks = table
            .chunks
            .iter()
            .map(|layers| {
                layers
                    .clone()
                    .map(|layer| {
                        BlockSlots(BlockParam::ALL.map(|param| {
                            table
                                .index(Role::Block { layer, param })
                                .expect("the table holds its stage's blocks")
                        }))
                    })
                    .collect()
            })
            .collect();
        StageModel {
            params: Vec::new(),
            rope,
            dims,
            embed,
            final_norm,
            head,
            tied: cfg.tie_embeddings,
            blocks,
            device: device.clone(),
            table,
            compute: DType::F32,
            recompute: Recompute::None,
        }
    }

    fn table(&self) -> &ParamTable {
        &self.table
    }

    fn device(&self) -> &B::Device {
        &self.device
    }

    fn width(&self) -> usize {
        self.dims.d_model
    }

    /// This rank's model chunks.
    fn chunks(&self) -> u32 {
        self.blocks.len() as u32
    }

    /// Replaces every parameter's value with `flat[slot]`, a device tensor
    /// holding the slot's elements in order (a slice of a master bucket).
    fn set_params(&mut self, flat: Vec<Tensor<B::InnerBackend, 1>>) {
        assert_eq!(flat.len(), self.table.slots.len(), "one tensor per slot");
        self.params = self
            .table
            .slots
            .iter()
            .zip(flat)
            .map(|(s, t)| in_dtype(t.reshape(slot_shape(s)), self.compute))
            .collect();
    }

    /// Drops the parameter values, so that the optimizer owns the only
    /// reference to the master buckets they were sliced from (and updates
    /// them in place where the backend can).
    fn release_params(&mut self) {
        self.params.clear();
    }

    /// Computes in `precision` from the next [`StageModel::set_params`]
    /// on (f32 unless set).
    fn set_precision(&mut self, precision: Precision) {
        self.compute = match precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        };
    }

    /// Keeps only each block's (or residual branch's) input from the
    /// forward when `Full`, rebuilding the rest at the backward.
    fn set_recompute(&mut self, recompute: Recompute) {
        self.recompute = recompute;
    }

    /// Runs model chunk `chunk`'s forward on microbatch `mb`.
    fn forward(
        &self,
        chunk: u32,
        input: StageInput<'_, B::InnerBackend>,
        mb: &Micro<'_>,
        tp: &mut Tp<'_>,
    ) -> Result<LlamaTape<B>, CollectiveError> {
        if tp.size() == 1 {
            return Ok(self.forward_whole(chunk, input, mb));
        }
        let (rows, seq, targets, denominator) = (mb.rows, mb.seq, mb.targets, mb.denominator);
        let device = &self.device;
        let mut pieces = Vec::new();
        let mut h = match input {
            StageInput::Tokens(tokens) => {
                let mut leaves = Vec::new();
                let table = self.leaf(self.embed.expect("the first stage embeds"), &mut leaves);
                let (local, mask) =
                    vocab_rows::<B>(tokens, self.dims.vocab_start, self.dims.vocab_len, device);
                let partial = table.select(0, local) * in_dtype(mask, self.compute);
                let h = tp.sum_tensor(partial.clone().inner())?;
                pieces.push(Piece::Embed(Segment {
                    input: None,
                    output: partial,
                    leaves,
                }));
                h
            }
            StageInput::Activation(h) => in_dtype(h, self.compute),
        };
        for b in &self.blocks[chunk as usize] {
            for attn in [true, false] {
                let partial = self.residual(h.clone(), b, attn, (rows, seq), &mut pieces);
                h = h + tp.sum_tensor(partial)?;
            }
        }
        if !self.is_last(chunk) {
            return Ok(tape(pieces, 0.0, Some(h), None));
        }
        let targets = targets.expect("the last stage has targets");
        let (norm, y) = self.norm_segment(h, self.final_norm.expect("last stage"));
        let mut leaves = Vec::new();
        let y_leaf = Tensor::<B, 2>::from_inner(y.inner()).require_grad();
        let z = y_leaf.clone().matmul(self.head_weight(&mut leaves));
        let (mut tokens, mut weights) = (Vec::new(), Vec::new());
        let mut weigh = weigher(mb, &mut weights);
        let (loss, surrogate) = parallel_cross_entropy(
            z,
            targets,
            self.dims.vocab_start,
            denominator,
            tp,
            per_token(mb, &mut tokens, &mut weigh),
        )?;
        drop(weigh);
        pieces.push(Piece::Head {
            norm,
            head: Segment {
                input: Some(y_leaf),
                output: surrogate.reshape([1, 1]),
                leaves,
            },
        });
        let mut done = tape(pieces, loss, None, None);
        done.row_loss = row_sums(&tokens, seq);
        done.row_weight = weights;
        Ok(done)
    }

    /// Backpropagates one microbatch's tape: `upstream` is the gradient of
    /// the stage's output (none on the last stage, whose output is the
    /// loss). Parameter gradients are added to `acc`; returns the gradient
    /// of the stage's input activations (none on the first stage).
    fn backward(
        &self,
        tape: LlamaTape<B>,
        upstream: Option<Tensor<B::InnerBackend, 2>>,
        acc: &mut GradAccum<B::InnerBackend>,
        tp: &mut Tp<'_>,
    ) -> Result<Option<Tensor<B::InnerBackend, 2>>, CollectiveError> {
        let mut dh = upstream.map(|d| in_dtype(d, self.compute));
        if let Some((slot, g)) = tape.kept.head_grad {
            acc.add(slot, g);
        }
        for piece in tape.kept.pieces.into_iter().rev() {
            match piece {
                Piece::Whole(seg) => dh = seg.backward(dh, acc),
                Piece::Embed(seg) => {
                    seg.backward(dh.take(), acc);
                }
                Piece::Residual { norm, branch } => {
                    dh = Some(residual_backward(dh, norm, branch, acc, tp)?);
                }
                Piece::Head { norm, head } => {
                    let dy = head.backward(None, acc).expect("head input");
                    let dy = tp.sum_tensor(dy)?;
                    dh = norm.backward(Some(dy), acc);
                }
                Piece::Block {
                    slots,
                    input,
                    rows,
                    seq,
                } => {
                    let leaf = Tensor::<B, 2>::from_inner(input).require_grad();
                    let mut leaves = Vec::new();
                    let weight = |p| self.leaf(slots.get(p), &mut leaves);
                    let output = block(leaf.clone(), weight, &self.rope(), rows, seq, &self.dims);
                    let seg = Segment {
                        input: Some(leaf),
                        output,
                        leaves,
                    };
                    dh = seg.backward(dh, acc);
                }
                Piece::Selective {
                    norm,
                    projections,
                    core,
                } => {
                    let skip = dh.expect("a residual block has an upstream gradient");
                    let kept: Vec<Tensor<B, 2>> = projections
                        .outputs
                        .iter()
                        .map(|k| Tensor::from_inner(k.clone().inner()).require_grad())
                        .collect();
                    let z = self.core_forward(&core, kept.clone());
                    // The last projection's gradients by hand: its output
                    // is not needed, so it is not computed again.
                    let slot = Self::core_out(&core);
                    let (dz, dw) = linear_grads(
                        z.clone().inner(),
                        self.params[slot].clone(),
                        in_dtype(skip.clone(), z.dtype()),
                    );
                    acc.add(slot, dw);
                    let rebuilt = Fan {
                        inputs: kept,
                        outputs: vec![z],
                        leaves: Vec::new(),
                    };
                    let dkept = rebuilt.backward(vec![dz], acc);
                    let dkept = dkept
                        .into_iter()
                        .map(|d| d.expect("a kept projection's gradient"))
                        .collect();
                    let dy = projections
                        .backward(dkept, acc)
                        .pop()
                        .flatten()
                        .expect("branch input");
                    dh = Some(through_norm(skip, dy, norm, acc, tp)?);
                }
                Piece::Branch {
                    slots,
                    attn,
                    input,
                    rows,
                    seq,
                } => {
                    let (norm, branch) = self.residual_segments(input, &slots, attn, (rows, seq));
                    dh = Some(residual_backward(dh, norm, branch, acc, tp)?);
                }
            }
        }
        Ok(dh)
    }
}
