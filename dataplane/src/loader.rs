//! The curriculum loader: which bucket each step draws from, and this
//! data-parallel rank's share of the step's sequences.
//!
//! As in the DD paper's Alg. 1, each bucket's sequences are split into
//! `cycles` equal parts. Within a cycle, each step's bucket is drawn with
//! probability proportional to its odds among the buckets whose part still
//! holds a whole step; sequences are read in order without replacement. A
//! step of bucket 2^k holds `tokens_per_step / 2^k` sequences; rank r of D
//! takes the r-th contiguous D-th of them. The draw uses the same seeded
//! generator on every rank, so every rank picks the same bucket. When every
//! cycle is used up, the next epoch starts over.
//!
//! The whole state is a [`Cursor`] (a few integers and the generator's one
//! `u64`): restarting from a saved cursor yields exactly the batches an
//! uninterrupted run would have seen.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};
use strata_recipe::Curriculum;

use crate::manifest::{BucketInfo, Manifest};
use crate::reader::{ReadError, Shard, decode_shard};
use crate::rng::SplitMix64;
use crate::store::Location;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Read(#[from] Arc<ReadError>),
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
        }
    }
}

/// The loader's whole state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Steps taken so far.
    pub step: u64,
    pub epoch: u64,
    pub cycle: u32,
    /// Steps taken from each bucket in the current cycle.
    pub used: Vec<u64>,
    pub rng: SplitMix64,
}

/// A bucket the curriculum draws from.
#[derive(Debug, Clone)]
struct Source {
    /// Index into the manifest's buckets.
    bucket: usize,
    seq_len: u64,
    /// Sequences per step, all ranks together.
    batch: u64,
    n_sequences: u64,
    odds: f64,
}

/// One step as planned: the bucket and the global rows (of that bucket) it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    pub step: u64,
    pub epoch: u64,
    pub cycle: u32,
    /// Index into the manifest's buckets.
    pub bucket: usize,
    pub seq_len: u64,
    /// The step's rows, all ranks together.
    pub rows: Range<u64>,
}

/// The curriculum as pure bookkeeping over a manifest: no I/O.
#[derive(Debug, Clone)]
pub struct Planner {
    sources: Vec<Source>,
    cycles: u32,
    seed: u64,
}

impl Planner {
    pub fn new(manifest: &Manifest, cfg: &LoaderConfig) -> Result<Planner, LoaderError> {
        let bad = |m: String| Err(LoaderError::Config(m));
        if cfg.dp_size == 0 || cfg.dp_rank >= cfg.dp_size {
            return bad(format!(
                "dp rank {} is outside a data-parallel group of {}",
                cfg.dp_rank, cfg.dp_size
            ));
        }
        if cfg.cycles == 0 {
            return bad("cycles must be at least 1".into());
        }
        let eligible: Vec<(usize, &BucketInfo)> = manifest
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| cfg.max_seq_len.is_none_or(|m| b.seq_len <= m))
            .collect();
        if eligible.is_empty() {
            return bad(format!(
                "no bucket of the dataset fits a context of {} tokens",
                cfg.max_seq_len.unwrap_or(0)
            ));
        }
        let odds = match &cfg.curriculum {
            Curriculum::Named(n) => n.odds(eligible.len()),
            Curriculum::Odds(o) if o.len() == eligible.len() => o.clone(),
            Curriculum::Odds(o) => {
                let lens: Vec<String> = eligible
                    .iter()
                    .map(|(_, b)| b.seq_len.to_string())
                    .collect();
                return bad(format!(
                    "the curriculum lists {} odds but the dataset has {} usable buckets ({})",
                    o.len(),
                    eligible.len(),
                    lens.join(", ")
                ));
            }
        };
        let mut sources = Vec::new();
        for ((idx, b), odds) in eligible.into_iter().zip(odds) {
            let per_rank = b.seq_len * u64::from(cfg.dp_size);
            if !cfg.tokens_per_step.is_multiple_of(per_rank) {
                return bad(format!(
                    "tokens_per_step = {} does not split into sequences of {} tokens over {} data-parallel ranks",
                    cfg.tokens_per_step, b.seq_len, cfg.dp_size
                ));
            }
            sources.push(Source {
                bucket: idx,
                seq_len: b.seq_len,
                batch: cfg.tokens_per_step / b.seq_len,
                n_sequences: b.n_sequences,
                odds,
            });
        }
        let planner = Planner {
            sources,
            cycles: cfg.cycles,
            seed: cfg.seed,
        };
        if (0..planner.sources.len())
            .all(|i| planner.steps_in_part(i, 0) == 0 || planner.sources[i].odds == 0.0)
        {
            let have: Vec<String> = planner
                .sources
                .iter()
                .map(|s| format!("{} × {} tokens", s.n_sequences, s.seq_len))
                .collect();
            return bad(format!(
                "the dataset cannot feed one step of {} tokens per cycle of {} (buckets: {})",
                cfg.tokens_per_step,
                cfg.cycles,
                have.join(", ")
            ));
        }
        Ok(planner)
    }

    /// The cursor at the start of training.
    pub fn start(&self) -> Cursor {
        Cursor {
            step: 0,
            epoch: 0,
            cycle: 0,
            used: vec![0; self.sources.len()],
            rng: SplitMix64::for_key(self.seed, 0x00c0_ffee),
        }
    }

    fn part(&self, i: usize, cycle: u32) -> Range<u64> {
        let n = self.sources[i].n_sequences;
        let c = u64::from(self.cycles);
        let cycle = u64::from(cycle);
        (cycle * n / c)..((cycle + 1) * n / c)
    }

    fn steps_in_part(&self, i: usize, cycle: u32) -> u64 {
        let p = self.part(i, cycle);
        (p.end - p.start) / self.sources[i].batch
    }

    /// Whether `cursor` is a position in this plan: one count per bucket
    /// the curriculum draws from, a cycle that exists, no bucket drawn past
    /// its part of the cycle. A cursor saved under another dataset or
    /// curriculum fails here, naming what does not fit, rather than
    /// silently starting over.
    pub fn check(&self, cursor: &Cursor) -> Result<(), LoaderError> {
        let bad = |m: String| {
            Err(LoaderError::Config(format!(
                "the loader cursor at step {}: {m}",
                cursor.step
            )))
        };
        if cursor.used.len() != self.sources.len() {
            let lens: Vec<String> = self.sources.iter().map(|s| s.seq_len.to_string()).collect();
            return bad(format!(
                "counts draws from {} buckets, but this dataset and curriculum draw from {} ({})",
                cursor.used.len(),
                self.sources.len(),
                lens.join(", ")
            ));
        }
        if cursor.cycle >= self.cycles {
            return bad(format!(
                "is in cycle {} of a curriculum with {} cycles",
                cursor.cycle, self.cycles
            ));
        }
        for (i, (&used, s)) in cursor.used.iter().zip(&self.sources).enumerate() {
            let max = self.steps_in_part(i, cursor.cycle);
            if used > max {
                return bad(format!(
                    "took {used} steps from the bucket of {} tokens, which holds {max} in cycle {}",
                    s.seq_len, cursor.cycle
                ));
            }
        }
        Ok(())
    }

    /// Plans the step at `cursor` and advances it.
    ///
    /// # Panics
    /// If `cursor` is not a position in this plan (see [`Planner::check`]).
    pub fn next(&self, cursor: &mut Cursor) -> PlannedStep {
        assert_eq!(
            cursor.used.len(),
            self.sources.len(),
            "a cursor of another plan (Planner::check refuses it)"
        );
        loop {
            let weights: Vec<f64> = (0..self.sources.len())
                .map(|i| {
                    if cursor.used[i] < self.steps_in_part(i, cursor.cycle) {
                        self.sources[i].odds
                    } else {
                        0.0
                    }
                })
                .collect();
            if weights.iter().any(|w| *w > 0.0) {
                let i = cursor.rng.weighted(&weights);
                let s = &self.sources[i];
                let start = self.part(i, cursor.cycle).start + cursor.used[i] * s.batch;
                let planned = PlannedStep {
                    step: cursor.step,
                    epoch: cursor.epoch,
                    cycle: cursor.cycle,
                    bucket: s.bucket,
                    seq_len: s.seq_len,
                    rows: start..start + s.batch,
                };
                cursor.used[i] += 1;
                cursor.step += 1;
                return planned;
            }
            cursor.used.iter_mut().for_each(|u| *u = 0);
            cursor.cycle += 1;
            if cursor.cycle == self.cycles {
                cursor.cycle = 0;
                cursor.epoch += 1;
            }
        }
    }

    /// Steps in one epoch: what the dataset feeds before repeating.
    pub fn steps_per_epoch(&self) -> u64 {
        (0..self.cycles)
            .map(|c| {
                (0..self.sources.len())
                    .filter(|&i| self.sources[i].odds > 0.0)
                    .map(|i| self.steps_in_part(i, c))
                    .sum::<u64>()
            })
            .sum()
    }
}

/// This rank's share of one step.
#[derive(Debug, Clone)]
pub struct Batch {
    pub step: u64,
    pub epoch: u64,
    pub cycle: u32,
    pub seq_len: u64,
    /// `log2(seq_len)`.
    pub log2: u32,
    /// Sequences in the whole step (all ranks).
    pub n_sequences_global: u64,
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

/// One shard per bucket, the largest of each: what the loader must hold so
/// that alternating between buckets never refetches.
fn working_set_bytes(manifest: &Manifest) -> u64 {
    manifest
        .buckets
        .iter()
        .map(|b| b.shards.iter().map(|s| s.bytes).max().unwrap_or(0))
        .sum()
}

/// Streams batches for one data-parallel rank, prefetching the shards of
/// the next steps within a memory budget.
pub struct Loader {
    dataset: Location,
    manifest: Arc<Manifest>,
    planner: Planner,
    cursor: Cursor,
    dp_rank: u64,
    dp_size: u64,
    /// Cumulative row counts of each bucket's shards.
    shard_starts: Vec<Vec<u64>>,
    cache: HashMap<(usize, usize), ShardFuture>,
    lookahead_steps: usize,
    prefetch_bytes: u64,
}

impl Loader {
    /// `cursor`: where to resume; `None` starts at the beginning.
    pub fn new(
        dataset: Location,
        manifest: Manifest,
        cfg: &LoaderConfig,
        cursor: Option<Cursor>,
    ) -> Result<Loader, LoaderError> {
        let planner = Planner::new(&manifest, cfg)?;
        if let Some(c) = &cursor {
            planner.check(c)?;
        }
        let cursor = cursor.unwrap_or_else(|| planner.start());
        let shard_starts = manifest
            .buckets
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
            .collect();
        let loader = Loader {
            dataset,
            manifest: Arc::new(manifest),
            planner,
            cursor,
            dp_rank: u64::from(cfg.dp_rank),
            dp_size: u64::from(cfg.dp_size),
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
        self.prefetch_bytes = bytes.max(working_set_bytes(&self.manifest));
        self
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    fn rank_rows(&self, planned: &PlannedStep) -> Range<u64> {
        let n = planned.rows.end - planned.rows.start;
        let per = n / self.dp_size;
        let start = planned.rows.start + self.dp_rank * per;
        start..start + per
    }

    /// The shards (bucket, shard index) holding `rows` of `bucket`.
    fn shards_for(&self, bucket: usize, rows: &Range<u64>) -> Vec<(usize, usize)> {
        let starts = &self.shard_starts[bucket];
        let first = starts.partition_point(|&s| s <= rows.start) - 1;
        let mut out = Vec::new();
        let mut i = first;
        while i + 1 < starts.len() && starts[i] < rows.end {
            out.push((bucket, i));
            i += 1;
        }
        out
    }

    /// Starts fetching shard `key` as its own task, unless it is cached or
    /// already on its way; the cache keeps the shared handle.
    fn prefetch(&mut self, key: (usize, usize)) {
        if self.cache.contains_key(&key) {
            return;
        }
        let bucket = &self.manifest.buckets[key.0];
        let info = bucket.shards[key.1].clone();
        let row_len = bucket.seq_len as usize + 1;
        let dataset = self.dataset.clone();
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
    async fn shard(&mut self, key: (usize, usize)) -> Result<Arc<Shard>, Arc<ReadError>> {
        self.prefetch(key);
        self.cache[&key].clone().await
    }

    /// The next step's batch for this rank.
    pub async fn next_batch(&mut self) -> Result<Batch, LoaderError> {
        let planned = self.planner.next(&mut self.cursor);
        // Plan the following steps on a copy of the cursor: their shards,
        // within the memory budget, are fetched now; others are dropped.
        let mut ahead = self.cursor.clone();
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        let mut seen = HashSet::new();
        let mut bytes = 0u64;
        for (i, step) in std::iter::once(planned.clone())
            .chain((1..self.lookahead_steps).map(|_| self.planner.next(&mut ahead)))
            .enumerate()
        {
            for key in self.shards_for(step.bucket, &self.rank_rows(&step)) {
                let size = self.manifest.buckets[key.0].shards[key.1].bytes;
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

        let rows = self.rank_rows(&planned);
        let seq = planned.seq_len as usize;
        let n = (rows.end - rows.start) as usize;
        let mut batch = Batch {
            step: planned.step,
            epoch: planned.epoch,
            cycle: planned.cycle,
            seq_len: planned.seq_len,
            log2: planned.seq_len.trailing_zeros(),
            n_sequences_global: planned.rows.end - planned.rows.start,
            inputs: Vec::with_capacity(n * seq),
            targets: Vec::with_capacity(n * seq),
            doc_ids: Vec::with_capacity(n),
            offsets: Vec::with_capacity(n),
        };
        for key in self.shards_for(planned.bucket, &rows) {
            let shard = self.shard(key).await?;
            let shard_start = self.shard_starts[key.0][key.1];
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
        Ok(batch)
    }
}
