//! What `strata plan` reports about a recipe or a FLOP budget, computed
//! here (pure) so the CLI only formats it.

use serde::Serialize;

use crate::laws::{self, CHINCHILLA_FITS, ComputeOptimal, LawEstimate};
use crate::schedule::Phase;
use crate::{Recipe, Resolution};

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    pub layout: LayoutSummary,
    pub params: ParamSummary,
    /// Training FLOPs per token at `model.max_seq_len` (the upper bound; a
    /// step drawn from a shorter bucket costs less attention).
    pub flops_per_token: f64,
    pub tokens_per_step: u64,
    pub n_steps: u64,
    pub total_tokens: u64,
    /// `flops_per_token · total_tokens`.
    pub total_flops: f64,
    pub tokens_per_param: f64,
    pub schedule: ScheduleSummary,
    /// The recipe's own peak LR beside each law's, for comparison.
    pub laws: Vec<LawEstimate>,
    /// Each Chinchilla fit's predicted loss for this model size and token count.
    pub chinchilla: Vec<PredictedLoss>,
    /// How each bucket's sequences split over data-parallel ranks and
    /// microbatches, for the six largest buckets that fit the context.
    pub buckets: Vec<BucketSplit>,
    pub resolutions: Vec<Resolution>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayoutSummary {
    pub tp: u32,
    pub pp: u32,
    pub dp: u32,
    pub world_size: u32,
    pub microbatches: u32,
    /// Model chunks per stage (interleaved 1F1B above 1).
    pub virtual_stages: u32,
    /// 1F1B's idle fraction of each stage's step, (pp − 1) / (m·v + pp − 1).
    pub bubble_fraction: f64,
    /// Each pipeline stage's layers, `[first, end)` per model chunk.
    pub stage_layers: Vec<Vec<[u32; 2]>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParamSummary {
    /// Step Law's N: attention and MLP weight matrices.
    pub non_embedding: u64,
    /// Every allocated parameter, embeddings and norms included.
    pub total: u64,
    pub padded_vocab_size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScheduleSummary {
    pub kind: &'static str,
    pub max_lr: f64,
    pub first_step_lr: f64,
    pub last_step_lr: f64,
    pub phases: Vec<Phase>,
    pub preview: Vec<LrPoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LrPoint {
    pub tokens: u64,
    pub lr: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PredictedLoss {
    pub fit: &'static str,
    pub loss: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketSplit {
    pub log2: u32,
    pub seq_len: u64,
    pub sequences_per_step: u64,
    pub sequences_per_rank: u64,
    pub sequences_per_microbatch: u64,
}

impl Plan {
    pub fn new(recipe: &Recipe) -> Plan {
        let model = &recipe.model;
        let data = &recipe.data;
        let layout = recipe.parallel.layout;
        let mb = recipe.parallel.microbatches;
        let v = recipe.parallel.virtual_stages;
        let total = data.total_tokens;
        let flops_per_token = model.flops_per_token(model.max_seq_len);
        let schedule = &recipe.schedule;

        let mut laws = laws::estimates(model, total as f64, data.tokens_per_step as f64);
        laws.insert(
            0,
            LawEstimate {
                name: "recipe",
                lr: schedule.max_lr(),
                batch_tokens: Some(data.tokens_per_step as f64),
                basis: format!("schedule.kind = {}", schedule.name()),
            },
        );

        let top = model.max_seq_len.trailing_zeros();
        let buckets = (top.saturating_sub(5)..=top)
            .map(|k| {
                let seq_len = 1u64 << k;
                let per_step = data.tokens_per_step / seq_len;
                BucketSplit {
                    log2: k,
                    seq_len,
                    sequences_per_step: per_step,
                    sequences_per_rank: per_step / u64::from(layout.dp),
                    sequences_per_microbatch: per_step / u64::from(layout.dp * mb),
                }
            })
            .collect();

        Plan {
            name: recipe.name.clone(),
            layout: LayoutSummary {
                tp: layout.tp,
                pp: layout.pp,
                dp: layout.dp,
                world_size: layout.world_size(),
                microbatches: mb,
                virtual_stages: v,
                bubble_fraction: layout.bubble_fraction(mb, v),
                stage_layers: (0..layout.pp)
                    .map(|s| {
                        (0..v)
                            .map(|c| {
                                let r = layout.chunk_layers(model.n_layers as u32, v, s, c);
                                [r.start, r.end]
                            })
                            .collect()
                    })
                    .collect(),
            },
            params: ParamSummary {
                non_embedding: model.non_embedding_params(),
                total: model.total_params(),
                padded_vocab_size: model.padded_vocab_size,
            },
            flops_per_token,
            tokens_per_step: data.tokens_per_step,
            n_steps: data.n_steps(),
            total_tokens: total,
            total_flops: flops_per_token * total as f64,
            tokens_per_param: total as f64 / model.total_params() as f64,
            schedule: ScheduleSummary {
                kind: schedule.name(),
                max_lr: schedule.max_lr(),
                first_step_lr: schedule.lr_for_step(0, data.tokens_per_step),
                last_step_lr: schedule.lr_at(total),
                phases: schedule.phases(),
                preview: preview(recipe),
            },
            laws,
            chinchilla: CHINCHILLA_FITS
                .iter()
                .map(|fit| PredictedLoss {
                    fit: fit.name,
                    loss: fit.loss(model.total_params() as f64, total as f64),
                })
                .collect(),
            buckets,
            resolutions: recipe.resolutions.clone(),
        }
    }
}

/// The LR at each phase boundary and at every tenth of the run that is not
/// next to one, in order.
fn preview(recipe: &Recipe) -> Vec<LrPoint> {
    let s = &recipe.schedule;
    let total = s.total_tokens;
    let mut at: Vec<u64> = s
        .phases()
        .iter()
        .flat_map(|p| [p.start_tokens, p.end_tokens])
        .chain([0, total])
        .collect();
    let near = total / 100;
    for i in 1..10 {
        let t = total / 10 * i;
        if at.iter().all(|&b| b.abs_diff(t) > near) {
            at.push(t);
        }
    }
    at.sort_unstable();
    at.dedup();
    at.into_iter()
        .map(|tokens| LrPoint {
            tokens,
            lr: s.lr_at(tokens),
        })
        .collect()
}

/// `strata plan --budget-flops C`: the compute-optimal split under each fit.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetPlan {
    pub budget_flops: f64,
    pub fits: Vec<ComputeOptimal>,
}

impl BudgetPlan {
    pub fn new(budget_flops: f64) -> BudgetPlan {
        BudgetPlan {
            budget_flops,
            fits: CHINCHILLA_FITS
                .iter()
                .map(|f| f.compute_optimal(budget_flops))
                .collect(),
        }
    }
}
