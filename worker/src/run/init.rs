//! `[init] from`: a new run's first weights, this rank's part only, read
//! from a Hugging Face folder or from another run's checkpoint (its master
//! weights; the optimizer starts fresh and the run at step 0).

use strata_dataplane::checkpoint as ckpt;
use strata_dataplane::hf_model::HfModel;
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
    let Some(from) = &recipe.init else {
        return Ok(table.init(recipe.seed));
    };
    let bad = |e: &dyn std::fmt::Display| WorkerError::Setup(format!("init.from {from}: {e}"));
    let values = match from {
        InitFrom::HuggingFace(url) => {
            let hf = HfModel::open_checked(url, &recipe.model)
                .await
                .map_err(|e| bad(&e))?;
            hf.read(&recipe.model, table).await.map_err(|e| bad(&e))?
        }
        InitFrom::Checkpoint(url) => {
            let (loc, manifest) = ckpt::open_step_of(url, &recipe.model)
                .await
                .map_err(|e| bad(&e))?;
            read_weights(&loc, "", &manifest, table)
                .await
                .map_err(|e| bad(&e))?
        }
    };
    tracing::info!(from = %from, params = values.len(), "first weights read");
    Ok(values)
}
