//! What a simulated job needs: a small real dataset (the coordinator
//! checks a job's dataset and curriculum at submission) and a recipe of
//! any world size, with checkpoints the coordinator commits.

use std::path::Path;

use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::manifest::{Layout, TokenizerInfo};
use strata_dataplane::store::Location;
use strata_dataplane::tokenize::TokenizerKind;
use strata_dataplane::writer::{DatasetWriter, WriterOptions};
use strata_recipe::Layout as Parallel;

/// Writes a dataset of 4,096 sequences of 64 tokens (one bucket) under
/// `dir`; its URL. Enough for one step of any layout up to 128
/// data-parallel replicas of 16 microbatches.
pub async fn dataset(dir: &Path) -> Result<String, String> {
    let loc = Location::parse(&dir.display().to_string(), true).map_err(|e| e.to_string())?;
    let mut w = DatasetWriter::create(
        loc,
        WriterOptions {
            tokenizer: TokenizerInfo::of(&TokenizerKind::R50k.load()),
            layout: Layout::Decomposed {
                split_long: SplitLong::Largest,
            },
            buckets: Buckets::new(6, 6).map_err(|e| e.to_string())?,
            seed: 7,
            shard_bytes: 1 << 20,
            overwrite: true,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    for d in 0..4096u32 {
        let doc: Vec<u32> = (0..65).map(|i| (d * 65 + i) % 50000).collect();
        w.add_document(&doc).await.map_err(|e| e.to_string())?;
    }
    w.finish().await.map_err(|e| e.to_string())?;
    Ok(format!("file://{}", dir.display()))
}

/// A layout of `ranks` ranks as jobs of that size run: tensor-parallel 8
/// inside a node, pipeline stages up to 16, the rest data-parallel.
pub fn layout_for(ranks: u32) -> Parallel {
    let tp = [8, 4, 2, 1]
        .into_iter()
        .find(|t| ranks.is_multiple_of(*t))
        .unwrap_or(1);
    let rest = ranks / tp;
    let pp = [16, 8, 4, 2, 1]
        .into_iter()
        .find(|p| rest.is_multiple_of(*p) && rest / p >= *p / 2)
        .unwrap_or(1);
    Parallel::new(tp, pp, rest / pp)
}

/// A recipe of `layout` on `dataset` running `steps` steps, saving a
/// checkpoint every `every` steps into `checkpoints` (keeping two).
pub fn recipe(
    name: &str,
    dataset: &str,
    checkpoints: &Path,
    layout: Parallel,
    steps: u64,
    every: u64,
    fault: &str,
) -> String {
    let microbatches = layout.pp;
    let tokens_per_step = 64 * u64::from(layout.dp) * u64::from(microbatches);
    format!(
        r#"name = "{name}"
seed = 1
[model]
n_layers = {layers}
d_model = 64
n_heads = 8
n_kv_heads = 8
d_ffn = 128
vocab_size = 50257
max_seq_len = 64
[parallel]
tp = {tp}
pp = {pp}
dp = {dp}
microbatches = {microbatches}
[data]
dataset = "{dataset}"
curriculum = "uniform"
tokens_per_step = {tokens_per_step}
total_tokens = {total}
[optimizer]
lr = 1e-3
[schedule]
kind = "constant"
[checkpoint]
every_steps = {every}
keep_last = 2
dir = "file://{ck}"
[fault]
max_restarts = 20
{fault}
"#,
        layers = 2 * layout.pp,
        tp = layout.tp,
        pp = layout.pp,
        dp = layout.dp,
        total = tokens_per_step * steps,
        ck = checkpoints.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_fill_the_ranks() {
        for (n, want) in [
            (16384, (8, 16, 128)),
            (4096, (8, 16, 32)),
            (1024, (8, 16, 8)),
            (256, (8, 8, 4)),
            (2, (2, 1, 1)),
        ] {
            let l = layout_for(n);
            assert_eq!((l.tp, l.pp, l.dp), want, "{n}");
            assert_eq!(l.world_size(), n);
        }
    }
}
