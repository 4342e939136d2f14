//! `strata import`: a Hugging Face Llama folder written as a strata
//! checkpoint (step 0, fresh optimizer state) in a recipe's layout, so
//! `strata eval`, `strata export` and `[init] from` take it like any
//! other.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use strata_dataplane::checkpoint::{self as ckpt, Manifest, SavedLayout};
use strata_dataplane::hf_model::HfModel;
use strata_dataplane::reader::read_manifest;
use strata_dataplane::store::Location;
use strata_recipe::Coords;
use strata_worker::checkpoint::{Snapshot, commit, write_snapshot};
use strata_worker::params::ParamTable;
use strata_worker::train::AdamWState;

use crate::UserError;
use crate::jobs::runtime;

#[derive(Args)]
pub struct ImportArgs {
    /// The Hugging Face Llama folder (config.json and safetensors, one
    /// file or sharded; f32, bf16 or f16): a path, file:// or s3:// URL.
    pub model: String,
    /// The recipe the weights are for: its `[model]` must be the folder's
    /// (every difference is named), its `[parallel]` layout is the one the
    /// checkpoint is written in, its name the checkpoint's job.
    #[arg(long)]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub sets: crate::Sets,
    /// The checkpoint's job folder (a path, file:// or s3:// URL): the
    /// checkpoint is its `step-00000000`, which must not exist yet.
    #[arg(long)]
    pub out: String,
    #[arg(long)]
    pub json: bool,
}

pub fn import(args: ImportArgs) -> anyhow::Result<()> {
    let (recipe, text) = crate::load_recipe(&args.recipe, &args.sets)?;
    runtime()?.block_on(async move {
        let user = |e: &dyn std::fmt::Display| UserError(e.to_string());
        let hf = HfModel::open_checked(&args.model, &recipe.model)
            .await
            .map_err(|e| user(&e))?;
        // The tokenizer against the recipe's dataset, where it can be read.
        let url = recipe.data.first_dataset();
        let tokenizer = match Location::parse(url, false) {
            Ok(loc) => match read_manifest(&loc).await {
                Ok(data) => match hf.check_tokenizer(&[&data.tokenizer]).await {
                    Ok(true) => format!("the same as {url}'s ({})", data.tokenizer.name),
                    Ok(false) => "not checked: the folder has no tokenizer.json".into(),
                    Err(e) => return Err(user(&e).into()),
                },
                Err(e) => format!("not checked: the recipe's dataset is unreadable ({e})"),
            },
            Err(e) => format!("not checked: {e}"),
        };

        let out = Location::parse(&args.out, true).map_err(|e| user(&e))?;
        let dir = ckpt::step_dir(0);
        match out.exists(&format!("{dir}/manifest.json")).await {
            Ok(false) => {}
            Ok(true) => {
                return Err(UserError(format!(
                    "{} already holds a checkpoint; choose another --out",
                    out.url_of(&dir)
                ))
                .into());
            }
            Err(e) => return Err(user(&e).into()),
        }
        let layout = recipe.parallel.layout;
        let virtual_stages = recipe.parallel.virtual_stages;
        let mut manifest = Manifest {
            format: ckpt::FORMAT.into(),
            version: ckpt::VERSION,
            job: recipe.name.clone(),
            attempt: 0,
            step: 0,
            tokens_seen: 0,
            optimizer_steps: 0,
            layout: SavedLayout {
                tp: layout.tp,
                pp: layout.pp,
                dp: layout.dp,
                virtual_stages,
            },
            model: recipe.model,
            recipe: text,
            data: None,
            shards: Vec::new(),
            written_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        // One (pipeline, tensor) rank at a time: no more than its part of
        // the model in memory.
        for pp in 0..layout.pp {
            for tp in 0..layout.tp {
                let table = ParamTable::interleaved(
                    &recipe.model,
                    layout,
                    Coords { dp: 0, pp, tp },
                    virtual_stages,
                );
                let master = hf.read(&recipe.model, &table).await.map_err(|e| user(&e))?;
                let n = master.len();
                let snapshot = Snapshot::take(0, 0, &table, 0, || {
                    (
                        master,
                        AdamWState {
                            step: 0,
                            m: vec![0.0; n],
                            v: vec![0.0; n],
                        },
                    )
                });
                let saved = write_snapshot(&out, "", &snapshot)
                    .await
                    .map_err(|e| user(&e))?;
                manifest.shards.extend(saved.shards);
            }
        }
        commit(&out, "", &manifest).await.map_err(|e| user(&e))?;
        let at = out.url_of(&dir);
        let bytes: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
        if args.json {
            let v = json!({
                "checkpoint": at,
                "from": hf.url(),
                "job": manifest.job,
                "layout": [layout.tp, layout.pp, layout.dp],
                "parameters": recipe.model.total_params(),
                "files": manifest.shards.len(),
                "bytes": bytes,
                "tokenizer": tokenizer,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "imported {} ({} parameters) as {at}: {} files in layout tp·pp·dp = {}·{}·{}",
                hf.url(),
                recipe.model.total_params(),
                manifest.shards.len(),
                layout.tp,
                layout.pp,
                layout.dp
            );
            println!("tokenizer: {tokenizer}");
            println!("start a run from it with [init] from = \"{at}\"");
        }
        Ok(())
    })
}
