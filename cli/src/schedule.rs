//! `strata schedule`.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use strata_recipe::quantity::parse_with_suffix;

use crate::format::{count, sci, table};
use crate::{UserError, load_recipe, plot, write_atomically};

#[derive(Args)]
pub struct ScheduleArgs {
    /// The job recipe (TOML).
    job: PathBuf,
    #[command(flatten)]
    sets: crate::Sets,
    /// Comma-separated token counts (1e9, 5e9, "2.5B", …). Without it, the
    /// run's tenths and phase boundaries.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_tokens)]
    at_tokens: Vec<u64>,
    /// Write the LR curve over the run, phases marked, to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Print JSON: an array of {"tokens", "lr"}.
    #[arg(long)]
    json: bool,
}

fn parse_tokens(s: &str) -> Result<u64, String> {
    match parse_with_suffix(s) {
        Some(x) if x.is_finite() && x >= 0.0 && x <= 2f64.powi(53) => Ok(x.round() as u64),
        _ => Err(format!("`{s}` is not a token count (e.g. 1e9 or 2.5B)")),
    }
}

#[derive(Serialize)]
struct LrAt {
    tokens: u64,
    lr: f64,
}

pub fn run(args: ScheduleArgs) -> anyhow::Result<()> {
    let (recipe, _) = load_recipe(&args.job, &args.sets)?;
    let schedule = &recipe.schedule;
    if let Some(path) = &args.plot {
        let is_svg = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
        if !is_svg {
            return Err(UserError(format!(
                "--plot {}: strata writes SVG plots; name the file *.svg (browsers and `rsvg-convert` render it, also to PNG)",
                path.display()
            ))
            .into());
        }
        let svg = plot::schedule_svg(&recipe, &args.at_tokens);
        write_atomically(path, svg.as_bytes())?;
        if !args.json {
            eprintln!("wrote {}", path.display());
        }
    }
    let at: Vec<u64> = if args.at_tokens.is_empty() {
        strata_recipe::plan::Plan::new(&recipe)
            .schedule
            .preview
            .iter()
            .map(|p| p.tokens)
            .collect()
    } else {
        args.at_tokens.clone()
    };
    let points: Vec<LrAt> = at
        .iter()
        .map(|&tokens| LrAt {
            tokens,
            lr: schedule.lr_at(tokens),
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&points)?);
    } else if args.plot.is_none() || !args.at_tokens.is_empty() {
        let mut rows = vec![vec!["tokens".to_string(), "lr".into()]];
        rows.extend(points.iter().map(|p| {
            vec![
                format!("{} ({})", p.tokens, count(p.tokens as f64)),
                sci(p.lr),
            ]
        }));
        print!("{}", table("", &rows));
    }
    Ok(())
}
