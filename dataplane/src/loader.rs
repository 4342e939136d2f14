//! The curriculum loader: which bucket each step draws from, which
//! sources of a mixture fill it, and this data-parallel rank's share.
//!
//! As in the DD paper's Alg. 1, each bucket's sequences are split into
//! `cycles` equal parts. Within a cycle, each step's sequence length is
//! drawn with probability proportional to its odds among the lengths
//! whose parts still hold the step; sequences are read in order without
//! replacement. A step of length 2^k holds `tokens_per_step / 2^k`
//! sequences. The draw uses the same seeded generator on every rank, so
//! every rank picks the same length.
//!
//! A mixture's step takes each source's share of those sequences by the
//! largest-remainder method over the weights of the step's phase (so a
//! share is within one sequence of `weight · sequences`), every source
//! from its own bucket of the drawn length: the sources, in order, make up
//! the step's rows, and rank r of D takes the r-th contiguous D-th of
//! them, whatever the layout (under loss-based reweighting, the r-th D-th
//! of each microbatch's block, [`LoaderConfig::deal_blocks`]). Each source keeps its own cycle and epoch:
//! a length is drawn only while every source with a share can feed it
//! from its current part; a source that can feed no length moves to its
//! next cycle, and past its last cycle it has run out (a new epoch, or an
//! error, as its `exhausted` rule says). One dataset is the mixture of one
//! source, and draws exactly as the single-dataset loader always has.
//!
//! The whole state is a [`Cursor`] (a few integers per source and the
//! generator's one `u64`): restarting from a saved cursor yields exactly
//! the batches an uninterrupted run would have seen; the weights are not
//! in it, so a resume may change them.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};
use strata_recipe::{Curriculum, Exhausted, MixPhase};

use crate::manifest::Manifest;
use crate::reader::{ReadError, Shard, decode_shard};
use crate::rng::SplitMix64;
use crate::store::Location;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{0}")]
    Config(String),
    /// A source whose rule is `exhausted = "stop"` fed every sequence.
    #[error(
        "source {source_name} ran out of sequences at step {step}: it has fed every sequence of its {cycles} cycle(s) and its rule is exhausted = \"stop\" (use \"cycle\" to start it over, or give it less weight)"
    )]
    RanOut {
        source_name: String,
        step: u64,
        cycles: u32,
    },
    #[error(transparent)]
    Read(#[from] Arc<ReadError>),
}

/// A source of a mixture as the loader sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRule {
    pub name: String,
    pub exhausted: Exhausted,
}

/// The sources, in the order of their manifests, and their weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mixture {
    pub sources: Vec<SourceRule>,
    /// Weights (one per source, any positive sum) from a token count on,
    /// earliest first; the first is at 0 tokens.
    pub phases: Vec<MixPhase>,
}

impl Default for Mixture {
    /// One dataset: one source, started over when it runs out.
    fn default() -> Mixture {
        Mixture {
            sources: vec![SourceRule {
                name: strata_recipe::SINGLE_SOURCE.into(),
                exhausted: Exhausted::Cycle,
            }],
            phases: vec![MixPhase {
                at_tokens: 0,
                weights: vec![1.0],
            }],
        }
    }
}

impl Mixture {
    /// The recipe's sources and phases.
    pub fn of(data: &strata_recipe::DataConfig) -> Mixture {
        let mut phases = vec![MixPhase {
            at_tokens: 0,
            weights: data.sources.iter().map(|s| s.weight).collect(),
        }];
        phases.extend(data.phases.iter().filter(|p| p.at_tokens > 0).cloned());
        Mixture {
            sources: data
                .sources
                .iter()
                .map(|s| SourceRule {
                    name: s.name.clone(),
                    exhausted: s.exhausted,
                })
                .collect(),
            phases,
        }
    }

    /// The weights, normalized, of the step that starts after `tokens`.
    pub fn weights_at(&self, tokens: u64) -> Vec<f64> {
        MixPhase::at(&self.phases, tokens)
            .unwrap_or(&self.phases[0])
            .normalized()
    }
}

/// What the loader is asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub curriculum: Curriculum,
    pub cycles: u32,
    pub tokens_per_step: u64,
    pub dp_rank: u32,
    pub dp_size: u32,
    pub seed: u64,
    /// Buckets longer than this are not drawn (the model's context).
    pub max_seq_len: Option<u64>,
    pub mixture: Mixture,
    /// How the step's rows are dealt to the dp ranks: 1 gives rank r the
    /// r-th contiguous D-th; `k` cuts the step into k blocks (the
    /// microbatches) and gives rank r the r-th D-th of each, so that
    /// microbatch i of every replica together is one contiguous block of
    /// the step (what reweighting groups across replicas need).
    #[serde(default = "one_block")]
    pub deal_blocks: u32,
}

fn one_block() -> u32 {
    1
}

impl LoaderConfig {
    /// What data-parallel rank `dp_rank` of a job streams: the coordinator
    /// checks this plan at submission and the worker runs the same one.
    pub fn for_recipe(recipe: &strata_recipe::Recipe, dp_rank: u32) -> LoaderConfig {
        LoaderConfig {
            curriculum: recipe.data.curriculum.clone(),
            cycles: recipe.data.cycles,
            tokens_per_step: recipe.data.tokens_per_step,
            dp_rank,
            dp_size: recipe.parallel.layout.dp,
            seed: recipe.seed,
            max_seq_len: Some(recipe.model.max_seq_len),
            mixture: Mixture::of(&recipe.data),
            deal_blocks: if recipe.data.reweighting.is_some() {
                recipe.parallel.microbatches.max(1)
            } else {
                1
            },
        }
    }
}

/// The loader's whole state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Steps taken so far.
    pub step: u64,
    pub rng: SplitMix64,
    /// Each source's position, in source order.
    pub sources: Vec<SourceCursor>,
}

/// One source's position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    /// Times the source has run out and started over.
    pub epoch: u64,
    pub cycle: u32,
    /// Sequences read from each length's part of the current cycle,
    /// shortest length first.
    pub used: Vec<u64>,
}

/// A source's bucket of one length.
#[derive(Debug, Clone)]
struct Held {
    /// Index into the source's manifest's buckets.
    bucket: usize,
    n_sequences: u64,
}

/// One source's part of a planned step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPart {
    pub source: usize,
    /// Index into the source's manifest's buckets.
    pub bucket: usize,
    pub epoch: u64,
    pub cycle: u32,
    /// The part's rows of that bucket.
    pub rows: Range<u64>,
}

/// One step as planned: its length and each source's rows, all ranks
/// together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    pub step: u64,
    pub seq_len: u64,
    /// The sources with a share of the step, in source order.
    pub parts: Vec<PlannedPart>,
}

impl PlannedStep {
    /// Sequences in the step, all ranks together.
    pub fn n_sequences(&self) -> u64 {
        self.parts.iter().map(|p| p.rows.end - p.rows.start).sum()
    }
}

/// The curriculum as pure bookkeeping over the sources' manifests: no I/O.
#[derive(Debug, Clone)]
pub struct Planner {
    /// The lengths drawn from, shortest first.
    lengths: Vec<u64>,
    odds: Vec<f64>,
    /// `held[source][length]`: the source's bucket of that length.
    held: Vec<Vec<Option<Held>>>,
    mixture: Mixture,
    tokens_per_step: u64,
    cycles: u32,
    seed: u64,
}

/// Splits `n` by `weights` (summing to 1): every share is the floor or
/// the ceiling of `weight · n`, the remainders going to the largest
/// fractions (the earlier source on a tie), never to a weight of 0.
pub fn apportion(n: u64, weights: &[f64]) -> Vec<u64> {
    let quotas: Vec<f64> = weights.iter().map(|w| w * n as f64).collect();
    let mut out: Vec<u64> = quotas.iter().map(|q| q.floor() as u64).collect();
    let mut left = n.saturating_sub(out.iter().sum());
    let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (quotas[a] - quotas[a].floor(), quotas[b] - quotas[b].floor());
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        out[*i] += 1;
        left -= 1;
    }
    out
}

impl Planner {
    /// The plan of one dataset.
    pub fn new(manifest: &Manifest, cfg: &LoaderConfig) -> Result<Planner, LoaderError> {
        Planner::mixture(&[manifest], cfg)
    }

    /// The plan of a mixture: one manifest per source of `cfg.mixture`.
    pub fn mixture(manifests: &[&Manifest], cfg: &LoaderConfig) -> Result<Planner, LoaderError> {
        let bad = |m: String| Err(LoaderError::Config(m));
        let mix = &cfg.mixture;
        if cfg.dp_size == 0 || cfg.dp_rank >= cfg.dp_size {
            return bad(format!(
                "dp rank {} is outside a data-parallel group of {}",
                cfg.dp_rank, cfg.dp_size
            ));
        }
        if cfg.cycles == 0 {
            return bad("cycles must be at least 1".into());
        }
        if manifests.len() != mix.sources.len() || manifests.is_empty() {
            return bad(format!(
                "{} datasets for {} sources",
                manifests.len(),
                mix.sources.len()
            ));
        }
        if let Some(p) = mix
            .phases
            .iter()
            .find(|p| p.weights.len() != mix.sources.len())
        {
            return bad(format!(
                "the phase at {} tokens weighs {} sources, not {}",
                p.at_tokens,
                p.weights.len(),
                mix.sources.len()
            ));
        }
        let first = &manifests[0].tokenizer;
        for (m, s) in manifests.iter().zip(&mix.sources).skip(1) {
            if m.tokenizer != *first {
                return bad(format!(
                    "source {} was tokenized with {} (vocabulary {}), source {} with {} (vocabulary {}): a mixture's sources share one tokenizer",
                    s.name,
                    m.tokenizer.name,
                    m.tokenizer.vocab_size,
                    mix.sources[0].name,
                    first.name,
                    first.vocab_size
                ));
            }
        }
        let fits = |len: u64| cfg.max_seq_len.is_none_or(|m| len <= m);
        let mut lengths: Vec<u64> = manifests
            .iter()
            .flat_map(|m| m.buckets.iter().map(|b| b.seq_len))
            .filter(|&l| fits(l))
            .collect();
        lengths.sort_unstable();
        lengths.dedup();
        if lengths.is_empty() {
            return bad(format!(
                "no bucket of the dataset fits a context of {} tokens",
                cfg.max_seq_len.unwrap_or(0)
            ));
        }
        let odds = match &cfg.curriculum {
            Curriculum::Named(n) => n.odds(lengths.len()),
            Curriculum::Odds(o) if o.len() == lengths.len() => o.clone(),
            Curriculum::Odds(o) => {
                let lens: Vec<String> = lengths.iter().map(u64::to_string).collect();
                return bad(format!(
                    "the curriculum lists {} odds but the dataset has {} usable buckets ({})",
                    o.len(),
                    lengths.len(),
                    lens.join(", ")
                ));
            }
        };
        for &len in &lengths {
            let per_rank = len * u64::from(cfg.dp_size);
            if !cfg.tokens_per_step.is_multiple_of(per_rank) {
                return bad(format!(
                    "tokens_per_step = {} does not split into sequences of {len} tokens over {} data-parallel ranks",
                    cfg.tokens_per_step, cfg.dp_size
                ));
            }
        }
        let held = manifests
            .iter()
            .map(|m| {
                lengths
                    .iter()
                    .map(|&len| {
                        m.buckets
                            .iter()
                            .position(|b| b.seq_len == len)
                            .map(|i| Held {
                                bucket: i,
                                n_sequences: m.buckets[i].n_sequences,
                            })
                    })
                    .collect()
            })
            .collect();
        let planner = Planner {
            lengths,
            odds,
            held,
            mixture: mix.clone(),
            tokens_per_step: cfg.tokens_per_step,
            cycles: cfg.cycles,
            seed: cfg.seed,
        };
        // Every source with weight must feed its share of some step from
        // every cycle's part.
        let weights = mix.weights_at(0);
        for s in 0..mix.sources.len() {
            let feeds = (0..planner.lengths.len()).any(|k| {
                let share = planner.shares(k, &weights)[s];
                planner.odds[k] > 0.0 && planner.part_len(s, k, 0) >= share
            });
            if weights[s] > 0.0 && !feeds {
                let m = manifests[s];
                let have: Vec<String> = m
                    .buckets
                    .iter()
                    .filter(|b| fits(b.seq_len))
                    .map(|b| format!("{} × {} tokens", b.n_sequences, b.seq_len))
                    .collect();
                let whose = if mix.sources.len() > 1 {
                    format!("source {}'s dataset", mix.sources[s].name)
                } else {
                    "the dataset".into()
                };
                let share = if mix.sources.len() > 1 {
                    format!(" (its share: {:.1}%)", 100.0 * weights[s])
                } else {
                    String::new()
                };
                return bad(format!(
                    "{whose} cannot feed one step of {} tokens{share} per cycle of {} (buckets: {})",
                    cfg.tokens_per_step,
                    cfg.cycles,
                    have.join(", ")
                ));
            }
        }
        Ok(planner)
    }

    /// The sources, in order.
    pub fn sources(&self) -> &[SourceRule] {
        &self.mixture.sources
    }

    /// The cursor at the start of training.
    pub fn start(&self) -> Cursor {
        Cursor {
            step: 0,
            rng: SplitMix64::for_key(self.seed, 0x00c0_ffee),
            sources: self
                .held
                .iter()
                .map(|_| SourceCursor {
                    epoch: 0,
                    cycle: 0,
                    used: vec![0; self.lengths.len()],
                })
                .collect(),
        }
    }

    /// Source `s`'s part of its bucket of length `k` in cycle `cycle`.
    fn part(&self, s: usize, k: usize, cycle: u32) -> Range<u64> {
        let n = self.held[s][k].as_ref().map_or(0, |h| h.n_sequences);
        let c = u64::from(self.cycles);
        let cycle = u64::from(cycle);
        (cycle * n / c)..((cycle + 1) * n / c)
    }

    fn part_len(&self, s: usize, k: usize, cycle: u32) -> u64 {
        let p = self.part(s, k, cycle);
        p.end - p.start
    }

    /// Each source's sequences of a step of length `k`.
    fn shares(&self, k: usize, weights: &[f64]) -> Vec<u64> {
        apportion(self.tokens_per_step / self.lengths[k], weights)
    }

    /// Whether `cursor` is a position in this plan: one position per
    /// source, one count per length the curriculum draws from, a cycle
    /// that exists, no part read past its end. A cursor saved under
    /// another dataset or curriculum fails here, naming what does not
    /// fit, rather than silently starting over.
    pub fn check(&self, cursor: &Cursor) -> Result<(), LoaderError> {
        let bad = |m: String| {
            Err(LoaderError::Config(format!(
                "the loader cursor at step {}: {m}",
                cursor.step
            )))
        };
        if cursor.sources.len() != self.held.len() {
            return bad(format!(
                "holds {} sources' positions, but the recipe has {} sources",
                cursor.sources.len(),
                self.held.len()
            ));
        }
        for (s, c) in cursor.sources.iter().enumerate() {
            let name = if self.held.len() > 1 {
                format!("source {}: ", self.mixture.sources[s].name)
            } else {
                String::new()
            };
            if c.used.len() != self.lengths.len() {
                let lens: Vec<String> = self.lengths.iter().map(u64::to_string).collect();
                return bad(format!(
                    "{name}counts draws from {} buckets, but this dataset and curriculum draw from {} ({})",
                    c.used.len(),
                    self.lengths.len(),
                    lens.join(", ")
                ));
            }
            if c.cycle >= self.cycles {
                return bad(format!(
                    "{name}is in cycle {} of a curriculum with {} cycles",
                    c.cycle, self.cycles
                ));
            }
            for (k, &used) in c.used.iter().enumerate() {
                let max = self.part_len(s, k, c.cycle);
                if used > max {
                    return bad(format!(
                        "{name}took {used} sequences from the bucket of {} tokens, which holds {max} in cycle {}",
                        self.lengths[k], c.cycle
                    ));
                }
            }
        }
        Ok(())
    }

    /// Plans the step at `cursor` and advances it.
    ///
    /// # Panics
    /// If `cursor` is not a position in this plan (see [`Planner::check`]).
    pub fn next(&self, cursor: &mut Cursor) -> Result<PlannedStep, LoaderError> {
        assert_eq!(
            cursor.sources.len(),
            self.held.len(),
            "a cursor of another plan (Planner::check refuses it)"
        );
        let weights = self.mixture.weights_at(cursor.step * self.tokens_per_step);
        let shares: Vec<Vec<u64>> = (0..self.lengths.len())
            .map(|k| self.shares(k, &weights))
            .collect();
        // Each turn either draws, or moves at least one source to its
        // next cycle; when every source has gone round all its cycles and
        // still no length can be fed, that is an error.
        let most_turns = self.held.len() * (self.cycles as usize + 1) + 1;
        for _ in 0..most_turns {
            let blockers: Vec<Vec<usize>> = (0..self.lengths.len())
                .map(|k| {
                    (0..self.held.len())
                        .filter(|&s| {
                            let c = &cursor.sources[s];
                            shares[k][s]
                                > c.used
                                    .get(k)
                                    .map_or(0, |u| self.part_len(s, k, c.cycle) - u)
                        })
                        .collect()
                })
                .collect();
            let draw: Vec<f64> = (0..self.lengths.len())
                .map(|k| {
                    if blockers[k].is_empty() {
                        self.odds[k]
                    } else {
                        0.0
                    }
                })
                .collect();
            if draw.iter().any(|w| *w > 0.0) {
                let k = cursor.rng.weighted(&draw);
                let mut parts = Vec::new();
                for (s, c) in cursor.sources.iter_mut().enumerate() {
                    let n = shares[k][s];
                    if n == 0 {
                        continue;
                    }
                    let held = self.held[s][k].as_ref().expect("a feeding source holds it");
                    let start = self.part(s, k, c.cycle).start + c.used[k];
                    parts.push(PlannedPart {
                        source: s,
                        bucket: held.bucket,
                        epoch: c.epoch,
                        cycle: c.cycle,
                        rows: start..start + n,
                    });
                    c.used[k] += n;
                }
                let planned = PlannedStep {
                    step: cursor.step,
                    seq_len: self.lengths[k],
                    parts,
                };
                cursor.step += 1;
                return Ok(planned);
            }
            // No length can be fed: move on the sources that can feed none
            // (a spent cycle), else those in the way of the length the
            // fewest sources block — never a source at the start of its
            // cycle, whose next part would block that length as this one
            // does.
            let drawable: Vec<usize> = (0..self.lengths.len())
                .filter(|&k| self.odds[k] > 0.0)
                .collect();
            let spent: Vec<usize> = (0..self.held.len())
                .filter(|&s| {
                    let wanted = drawable.iter().filter(|&&k| shares[k][s] > 0);
                    wanted.clone().count() > 0
                        && wanted.into_iter().all(|&k| blockers[k].contains(&s))
                })
                .collect();
            let fresh = |s: usize| cursor.sources[s].used.iter().all(|&u| u == 0);
            let movers = if spent.is_empty() {
                drawable
                    .iter()
                    .filter(|&&k| blockers[k].iter().all(|&s| !fresh(s)))
                    .min_by(|&&a, &&b| {
                        blockers[a]
                            .len()
                            .cmp(&blockers[b].len())
                            .then(self.odds[b].total_cmp(&self.odds[a]))
                    })
                    .map(|&k| blockers[k].clone())
                    .unwrap_or_default()
            } else {
                spent
            };
            if movers.is_empty() {
                break;
            }
            for s in movers {
                let c = &mut cursor.sources[s];
                c.used.iter_mut().for_each(|u| *u = 0);
                c.cycle += 1;
                if c.cycle == self.cycles {
                    let rule = &self.mixture.sources[s];
                    if rule.exhausted == Exhausted::Stop {
                        return Err(LoaderError::RanOut {
                            source_name: rule.name.clone(),
                            step: cursor.step + 1,
                            cycles: self.cycles,
                        });
                    }
                    c.cycle = 0;
                    c.epoch += 1;
                }
            }
        }
        Err(self.cannot_feed(cursor, &shares))
    }

    /// Why no step can be drawn at `cursor`, with each source's shares
    /// and what its part holds.
    fn cannot_feed(&self, cursor: &Cursor, shares: &[Vec<u64>]) -> LoaderError {
        let lines: Vec<String> = (0..self.held.len())
            .map(|s| {
                let c = &cursor.sources[s];
                let per: Vec<String> = (0..self.lengths.len())
                    .filter(|&k| self.odds[k] > 0.0)
                    .map(|k| {
                        format!(
                            "{} of {} tokens wanted, {} left",
                            shares[k][s],
                            self.lengths[k],
                            self.part_len(s, k, c.cycle) - c.used[k]
                        )
                    })
                    .collect();
                format!(
                    "{} (cycle {}): {}",
                    self.mixture.sources[s].name,
                    c.cycle,
                    per.join(", ")
                )
            })
            .collect();
        LoaderError::Config(format!(
            "step {}: the sources cannot feed a step of {} tokens together at any length; {}",
            cursor.step + 1,
            self.tokens_per_step,
            lines.join("; ")
        ))
    }

    /// Steps in one epoch of a single dataset: what it feeds before
    /// repeating (a mixture's sources each run out on their own).
    pub fn steps_per_epoch(&self) -> u64 {
        (0..self.cycles)
            .map(|c| {
                (0..self.lengths.len())
                    .filter(|&k| self.odds[k] > 0.0)
                    .map(|k| self.part_len(0, k, c) / (self.tokens_per_step / self.lengths[k]))
                    .sum::<u64>()
            })
            .sum()
    }

    /// Converts a cursor of the single-dataset format that counted
    /// steps per bucket (checkpoints before mixtures) into sequences.
    pub fn from_steps(&self, used_steps: &[u64]) -> Vec<u64> {
        used_steps
            .iter()
            .zip(&self.lengths)
            .map(|(u, len)| u * (self.tokens_per_step / len))
            .collect()
    }
}

/// This rank's share of one step.
#[derive(Debug, Clone)]
pub struct Batch {
    pub step: u64,
    /// The epoch and cycle of the step's first source.
    pub epoch: u64,
    pub cycle: u32,
    pub seq_len: u64,
    /// `log2(seq_len)`.
    pub log2: u32,
    /// Sequences in the whole step (all ranks).
    pub n_sequences_global: u64,
    /// Each source's sequences in the whole step (all ranks), in source
    /// order (0 for a source without a share).
    pub source_sequences: Vec<u64>,
    /// This rank's rows by source: runs of (source, rows), in row order.
    pub runs: Vec<(usize, usize)>,
    /// `n × seq_len` input ids, row-major.
    pub inputs: Vec<u32>,
    /// The inputs shifted by one.
    pub targets: Vec<u32>,
    pub doc_ids: Vec<u64>,
    pub offsets: Vec<u64>,
}

impl Batch {
    pub fn n_sequences(&self) -> usize {
        self.doc_ids.len()
    }
}

type ShardFuture = Shared<BoxFuture<'static, Result<Arc<Shard>, Arc<ReadError>>>>;

/// A shard: (source, bucket, shard index).
type ShardKey = (usize, usize, usize);

/// One shard per bucket of every source, the largest of each: what the
/// loader must hold so that alternating between buckets never refetches.
fn working_set_bytes(manifests: &[(Location, Arc<Manifest>)]) -> u64 {
    manifests
        .iter()
        .flat_map(|(_, m)| m.buckets.iter())
        .map(|b| b.shards.iter().map(|s| s.bytes).max().unwrap_or(0))
        .sum()
}

/// Streams batches for one data-parallel rank, prefetching the shards of
/// the next steps within a memory budget.
pub struct Loader {
    /// Each source's dataset and manifest.
    datasets: Vec<(Location, Arc<Manifest>)>,
    planner: Planner,
    cursor: Cursor,
    dp_rank: u64,
    dp_size: u64,
    /// Blocks of the step the rows are dealt by ([`LoaderConfig::deal_blocks`]).
    blocks: u64,
    /// Cumulative row counts of each source's buckets' shards.
    shard_starts: Vec<Vec<Vec<u64>>>,
    cache: HashMap<ShardKey, ShardFuture>,
    lookahead_steps: usize,
    prefetch_bytes: u64,
}

/// This rank's rows of a planned step, in order: (part index, rows of
/// its bucket). The step is cut into `blocks` equal blocks, and the rank
/// takes the `dp_rank`-th of `dp_size` contiguous parts of each.
fn rank_rows(
    planned: &PlannedStep,
    dp_rank: u64,
    (dp_size, blocks): (u64, u64),
) -> Vec<(usize, Range<u64>)> {
    let block = planned.n_sequences() / blocks;
    let per = block / dp_size;
    let mut out = Vec::new();
    for k in 0..blocks {
        let (lo, hi) = (k * block + dp_rank * per, k * block + (dp_rank + 1) * per);
        let mut at = 0;
        for (i, p) in planned.parts.iter().enumerate() {
            let n = p.rows.end - p.rows.start;
            let (a, b) = (lo.max(at), hi.min(at + n));
            if a < b {
                out.push((i, p.rows.start + a - at..p.rows.start + b - at));
            }
            at += n;
        }
    }
    out
}

impl Loader {
    /// One dataset. `cursor`: where to resume; `None` starts at the
    /// beginning.
    pub fn new(
        dataset: Location,
        manifest: Manifest,
        cfg: &LoaderConfig,
        cursor: Option<Cursor>,
    ) -> Result<Loader, LoaderError> {
        Loader::mixture(vec![(dataset, manifest)], cfg, cursor)
    }

    /// A mixture: each source's dataset and manifest, in the order of
    /// `cfg.mixture`.
    pub fn mixture(
        datasets: Vec<(Location, Manifest)>,
        cfg: &LoaderConfig,
        cursor: Option<Cursor>,
    ) -> Result<Loader, LoaderError> {
        let manifests: Vec<&Manifest> = datasets.iter().map(|(_, m)| m).collect();
        let planner = Planner::mixture(&manifests, cfg)?;
        if let Some(c) = &cursor {
            planner.check(c)?;
        }
        let cursor = cursor.unwrap_or_else(|| planner.start());
        let shard_starts = datasets
            .iter()
            .map(|(_, m)| {
                m.buckets
                    .iter()
                    .map(|b| {
                        let mut acc = 0;
                        let mut starts = vec![0];
                        for s in &b.shards {
                            acc += s.rows;
                            starts.push(acc);
                        }
                        starts
                    })
                    .collect()
            })
            .collect();
        let loader = Loader {
            datasets: datasets
                .into_iter()
                .map(|(l, m)| (l, Arc::new(m)))
                .collect(),
            planner,
            cursor,
            dp_rank: u64::from(cfg.dp_rank),
            dp_size: u64::from(cfg.dp_size),
            blocks: u64::from(cfg.deal_blocks.max(1)),
            shard_starts,
            cache: HashMap::new(),
            lookahead_steps: 8,
            prefetch_bytes: 0,
        };
        Ok(loader.with_prefetch(8, 256 << 20))
    }

    /// Sets how far ahead shards are fetched: `steps` steps, within `bytes`
    /// of shards held. The budget never drops below one shard per bucket
    /// (the largest of each): the curriculum alternates between buckets, so
    /// a smaller budget would evict a shard that the next draw of its
    /// bucket needs again, and fetch it over and over.
    pub fn with_prefetch(mut self, steps: usize, bytes: u64) -> Loader {
        self.lookahead_steps = steps.max(1);
        self.prefetch_bytes = bytes.max(working_set_bytes(&self.datasets));
        self
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// The shards holding `rows` of `bucket` of `source`.
    fn shards_for(&self, source: usize, bucket: usize, rows: &Range<u64>) -> Vec<ShardKey> {
        let starts = &self.shard_starts[source][bucket];
        let first = starts.partition_point(|&s| s <= rows.start) - 1;
        let mut out = Vec::new();
        let mut i = first;
        while i + 1 < starts.len() && starts[i] < rows.end {
            out.push((source, bucket, i));
            i += 1;
        }
        out
    }

    /// This rank's shards of a planned step, in row order.
    fn step_shards(&self, planned: &PlannedStep) -> Vec<ShardKey> {
        rank_rows(planned, self.dp_rank, (self.dp_size, self.blocks))
            .into_iter()
            .flat_map(|(i, rows)| {
                let p = &planned.parts[i];
                self.shards_for(p.source, p.bucket, &rows)
            })
            .collect()
    }

    /// Starts fetching shard `key` as its own task, unless it is cached or
    /// already on its way; the cache keeps the shared handle.
    fn prefetch(&mut self, key: ShardKey) {
        if self.cache.contains_key(&key) {
            return;
        }
        let (dataset, manifest) = &self.datasets[key.0];
        let bucket = &manifest.buckets[key.1];
        let info = bucket.shards[key.2].clone();
        let row_len = bucket.seq_len as usize + 1;
        let dataset = dataset.clone();
        let url = dataset.url_of(&info.key);
        let task_url = url.clone();
        // The GET runs on the async threads; checking and decoding, which
        // are CPU work, on a blocking thread.
        let handle = tokio::spawn(async move {
            let bytes = dataset.get(&info.key).await?;
            let decode_url = task_url.clone();
            tokio::task::spawn_blocking(move || decode_shard(&decode_url, bytes, &info, row_len))
                .await
                .unwrap_or_else(|e| {
                    Err(ReadError::BadShard {
                        url: task_url,
                        why: format!("decoding ended: {e}"),
                    })
                })
        });
        let fut = async move {
            match handle.await {
                Ok(r) => r.map(Arc::new).map_err(Arc::new),
                Err(e) => Err(Arc::new(ReadError::BadShard {
                    url,
                    why: format!("the fetch task ended: {e}"),
                })),
            }
        }
        .boxed()
        .shared();
        self.cache.insert(key, fut);
    }

    /// Shard `key`, fetched now if no prefetch started it.
    async fn shard(&mut self, key: ShardKey) -> Result<Arc<Shard>, Arc<ReadError>> {
        self.prefetch(key);
        self.cache[&key].clone().await
    }

    /// The next step's batch for this rank.
    pub async fn next_batch(&mut self) -> Result<Batch, LoaderError> {
        let epochs: Vec<u64> = self.cursor.sources.iter().map(|c| c.epoch).collect();
        let planned = self.planner.next(&mut self.cursor)?;
        let parts = self.blocks * self.dp_size;
        if !planned.n_sequences().is_multiple_of(parts) {
            return Err(LoaderError::Config(format!(
                "step {} has {} sequences of {}, which do not split into {} microbatches on each of {} data-parallel ranks",
                planned.step + 1,
                planned.n_sequences(),
                planned.seq_len,
                self.blocks,
                self.dp_size
            )));
        }
        for ((rule, c), before) in self
            .planner
            .sources()
            .iter()
            .zip(&self.cursor.sources)
            .zip(epochs)
        {
            if c.epoch > before {
                tracing::warn!(
                    source = %rule.name,
                    step = planned.step + 1,
                    epoch = c.epoch,
                    "the source ran out of sequences and starts over (exhausted = \"cycle\")"
                );
            }
        }
        // Plan the following steps on a copy of the cursor: their shards,
        // within the memory budget, are fetched now; others are dropped.
        // (A step past the data's end is not looked ahead to.)
        let mut ahead = self.cursor.clone();
        let mut wanted: Vec<ShardKey> = Vec::new();
        let mut seen = HashSet::new();
        let mut bytes = 0u64;
        let later = (1..self.lookahead_steps).map_while(|_| self.planner.next(&mut ahead).ok());
        for (i, step) in std::iter::once(planned.clone()).chain(later).enumerate() {
            for key in self.step_shards(&step) {
                let size = self.datasets[key.0].1.buckets[key.1].shards[key.2].bytes;
                if i > 0 && bytes + size > self.prefetch_bytes {
                    break;
                }
                if seen.insert(key) {
                    bytes += size;
                    wanted.push(key);
                }
            }
        }
        self.cache.retain(|k, _| seen.contains(k));
        for key in wanted {
            self.prefetch(key);
        }

        let mine = rank_rows(&planned, self.dp_rank, (self.dp_size, self.blocks));
        let seq = planned.seq_len as usize;
        let n = mine
            .iter()
            .map(|(_, r)| (r.end - r.start) as usize)
            .sum::<usize>();
        let first = &planned.parts[0];
        let mut source_sequences = vec![0; self.datasets.len()];
        for p in &planned.parts {
            source_sequences[p.source] = p.rows.end - p.rows.start;
        }
        let mut batch = Batch {
            step: planned.step,
            epoch: first.epoch,
            cycle: first.cycle,
            seq_len: planned.seq_len,
            log2: planned.seq_len.trailing_zeros(),
            n_sequences_global: planned.n_sequences(),
            source_sequences,
            runs: Vec::with_capacity(mine.len()),
            inputs: Vec::with_capacity(n * seq),
            targets: Vec::with_capacity(n * seq),
            doc_ids: Vec::with_capacity(n),
            offsets: Vec::with_capacity(n),
        };
        for (i, rows) in mine {
            let p = &planned.parts[i];
            batch
                .runs
                .push((p.source, (rows.end - rows.start) as usize));
            for key in self.shards_for(p.source, p.bucket, &rows) {
                let shard = self.shard(key).await?;
                let shard_start = self.shard_starts[key.0][key.1][key.2];
                let lo = rows.start.max(shard_start) - shard_start;
                let hi = rows.end.min(shard_start + shard.rows() as u64) - shard_start;
                for r in lo as usize..hi as usize {
                    let row = shard.row(r);
                    batch.inputs.extend_from_slice(&row[..seq]);
                    batch.targets.extend_from_slice(&row[1..]);
                    batch.doc_ids.push(shard.doc_ids[r]);
                    batch.offsets.push(shard.offsets[r]);
                }
            }
        }
        Ok(batch)
    }
}
