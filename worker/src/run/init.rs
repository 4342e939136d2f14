//! `[init] from`: a new run's first weights, this rank's part only, read
//! from a Hugging Face folder or from another run's checkpoint (its master
//! weights; the optimizer starts fresh and the run at step 0).

use strata_dataplane::checkpoint as ckpt;
use strata_dataplane::hf_model::HfModel;
use strata_dataplane::store::Location;
use strata_recipe::{InitFrom, Recipe};

use super::WorkerError;
use crate::checkpoint::read_weights;
use crate::params::ParamTable;

/// The values `table`'s slots start from: `[init] from`'s, or drawn from
/// the seed when the recipe has none.
pub(super) async fn first_weights(
    recipe: &Recipe,
    table: &ParamTable,
) -> Result<Vec<f32>, WorkerError> {
    let bad = |what: &InitFrom, e: &dyn std::fmt::Display| {
        WorkerError::Setup(format!("init.from {what}: {e}"))
    };
    let Some(from) = &recipe.init else {
        return Ok(table.init(recipe.seed));
    };
    let values = match from {
        InitFrom::HuggingFace(url) => {
            let loc = Location::parse(url, false).map_err(|e| bad(from, &e))?;
            let hf = HfModel::open(loc).await.map_err(|e| bad(from, &e))?;
            hf.check(&recipe.model).map_err(|e| bad(from, &e))?;
            hf.read(&recipe.model, table)
                .await
                .map_err(|e| bad(from, &e))?
        }
        InitFrom::Checkpoint(url) => {
            let (loc, manifest) = ckpt::open_step(url).await.map_err(|e| bad(from, &e))?;
            let differ = recipe.model.weight_differences(&manifest.model);
            if !differ.is_empty() {
                return Err(bad(from, &differ.join("; ")));
            }
            read_weights(&loc, "", &manifest, table)
                .await
                .map_err(|e| bad(from, &e))?
        }
    };
    tracing::info!(from = %from, params = values.len(), "first weights read");
    Ok(values)
}
