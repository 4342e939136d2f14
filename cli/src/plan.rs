//! `strata plan`.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use strata_dataplane::memory::{MemoryInputs, MemoryPlan, gib};
use strata_recipe::plan::{BudgetPlan, Plan};
use strata_recipe::quantity::parse_with_suffix;
use strata_recipe::{Curriculum, Recipe};

use crate::format::{count, sci, table};
use crate::{UserError, load_recipe};

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["job", "budget_flops"])))]
pub struct PlanArgs {
    /// The job recipe (TOML).
    job: Option<PathBuf>,
    #[command(flatten)]
    sets: crate::Sets,
    /// A training compute budget in FLOPs (e.g. 1e21, 5.76e23): report the
    /// compute-optimal parameter and token counts under each Chinchilla fit.
    #[arg(long, value_name = "C", value_parser = parse_flops)]
    budget_flops: Option<f64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_flops(s: &str) -> Result<f64, String> {
    match parse_with_suffix(s) {
        Some(c) if c.is_finite() && c > 0.0 => Ok(c),
        _ => Err(format!("`{s}` is not a positive FLOP count (e.g. 1e21)")),
    }
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    if let Some(c) = args.budget_flops {
        if args.job.is_some() {
            return Err(UserError("give a recipe or --budget-flops, not both".into()).into());
        }
        let plan = BudgetPlan::new(c);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print!("{}", budget_text(&plan));
        }
        return Ok(());
    }
    let path = args.job.expect("clap requires a recipe or a budget");
    let (recipe, _) = load_recipe(&path, &args.sets)?;
    let plan = Plan::new(&recipe);
    let inputs = MemoryInputs::of(&recipe);
    let memory = MemoryPlan::new(&inputs);
    if args.json {
        let json = PlanJson {
            plan: &plan,
            memory: &memory,
            recipe: &recipe,
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", plan_text(&recipe, &plan));
        print!("{}", memory_text(&inputs, &memory));
    }
    Ok(())
}

/// `plan --json`: the plan's fields at the top level, and the resolved recipe.
#[derive(serde::Serialize)]
struct PlanJson<'a> {
    #[serde(flatten)]
    plan: &'a Plan,
    memory: &'a MemoryPlan,
    recipe: &'a Recipe,
}

fn budget_text(plan: &BudgetPlan) -> String {
    let mut out = format!(
        "compute-optimal split of C = {} FLOPs (C ≈ 6·N·D)\n",
        sci(plan.budget_flops)
    );
    let mut rows = vec![vec![
        "fit".to_string(),
        "N* params".into(),
        "D* tokens".into(),
        "tokens/param".into(),
        "loss".into(),
    ]];
    for f in &plan.fits {
        rows.push(vec![
            f.fit.to_string(),
            count(f.n_opt),
            count(f.d_opt),
            format!("{:.1}", f.tokens_per_param),
            format!("{:.4}", f.loss),
        ]);
    }
    out.push_str(&table("  ", &rows));
    out
}

fn plan_text(recipe: &Recipe, plan: &Plan) -> String {
    let m = &recipe.model;
    let l = &plan.layout;
    let mut out = String::new();
    let _ = writeln!(out, "strata plan: {}", plan.name);

    let mb = if l.microbatches == 1 {
        "1 microbatch".to_string()
    } else {
        format!("{} microbatches", l.microbatches)
    };
    let vocab = if m.padded_vocab_size == m.vocab_size {
        format!("vocab {}", m.vocab_size)
    } else {
        format!("vocab {} (padded {})", m.vocab_size, m.padded_vocab_size)
    };
    let curriculum = match &recipe.data.curriculum {
        Curriculum::Named(n) => n.name().to_string(),
        Curriculum::Odds(o) => format!("odds {o:?}"),
    };
    let stages = if l.pp > 1 {
        let layers: Vec<String> = l
            .stage_layers
            .iter()
            .map(|chunks| {
                let n: Vec<String> = chunks.iter().map(|[a, b]| format!("{}", b - a)).collect();
                n.join("+")
            })
            .collect();
        let chunks = if l.virtual_stages > 1 {
            format!(", interleaved ({} chunks per stage)", l.virtual_stages)
        } else {
            String::new()
        };
        format!("{chunks}, layers per stage {}", layers.join("/"))
    } else {
        String::new()
    };
    let rows = vec![
        vec![
            "layout".to_string(),
            format!(
                "tp={} pp={} dp={} (world {}), {mb}, 1F1B bubble {:.1}%{stages}",
                l.tp,
                l.pp,
                l.dp,
                l.world_size,
                100.0 * l.bubble_fraction
            ),
        ],
        vec![
            "model".into(),
            format!(
                "{} layers, d_model {}, {} heads ({} KV), d_ffn {}, {vocab}, context {}{}",
                m.n_layers,
                m.d_model,
                m.n_heads,
                m.n_kv_heads,
                m.d_ffn,
                m.max_seq_len,
                if m.tie_embeddings {
                    ", tied embeddings"
                } else {
                    ""
                }
            ),
        ],
        vec![
            "parameters".into(),
            format!(
                "{} non-embedding (Step Law's N), {} total",
                count(plan.params.non_embedding as f64),
                count(plan.params.total as f64)
            ),
        ],
        vec![
            "data".into(),
            format!(
                "{} tokens = {} steps × {} tokens/step ({:.1} tokens/param); {curriculum}, {} cycles; {}",
                count(plan.total_tokens as f64),
                plan.n_steps,
                plan.tokens_per_step,
                plan.tokens_per_param,
                recipe.data.cycles,
                data_sources(&recipe.data) + &reweighting(&recipe.data)
            ),
        ],
        vec![
            "compute".into(),
            format!(
                "{} FLOPs/token at {} tokens (6N + 12·L·H·Q·T), {} FLOPs in all",
                sci(plan.flops_per_token),
                m.max_seq_len,
                sci(plan.total_flops)
            ),
        ],
        vec![
            "schedule".into(),
            format!(
                "{}, max LR {}, first step {}, last step {}",
                plan.schedule.kind,
                sci(plan.schedule.max_lr),
                sci(plan.schedule.first_step_lr),
                sci(plan.schedule.last_step_lr)
            ),
        ],
    ];
    out.push_str(&table("  ", &rows));

    if !plan.resolutions.is_empty() {
        out.push_str("\nresolved\n");
        let rows: Vec<Vec<String>> = plan
            .resolutions
            .iter()
            .map(|r| {
                vec![
                    r.field.clone(),
                    format!("{} ({})", fmt_value(r.value), r.how),
                ]
            })
            .collect();
        out.push_str(&table("  ", &rows));
    }

    out.push_str("\nlearning rate and batch, by law\n");
    let mut rows = vec![vec![
        "law".to_string(),
        "lr".into(),
        "batch tokens".into(),
        "basis".into(),
    ]];
    for law in &plan.laws {
        rows.push(vec![
            law.name.to_string(),
            sci(law.lr),
            law.batch_tokens
                .map_or("(batch-agnostic)".to_string(), count),
            law.basis.clone(),
        ]);
    }
    out.push_str(&table("  ", &rows));

    out.push_str("\npredicted loss, Chinchilla L(N total, D)\n");
    let rows: Vec<Vec<String>> = plan
        .chinchilla
        .iter()
        .map(|c| vec![c.fit.to_string(), format!("{:.4}", c.loss)])
        .collect();
    out.push_str(&table("  ", &rows));

    out.push_str("\nsequences per step by bucket\n");
    let mut rows = vec![vec![
        "bucket".to_string(),
        "per step".into(),
        "per dp rank".into(),
        "per microbatch".into(),
    ]];
    for b in &plan.buckets {
        rows.push(vec![
            format!("D{:02} ({} tokens)", b.log2, b.seq_len),
            b.sequences_per_step.to_string(),
            b.sequences_per_rank.to_string(),
            b.sequences_per_microbatch.to_string(),
        ]);
    }
    out.push_str(&table("  ", &rows));

    out.push_str("\nschedule preview\n");
    let mut rows = vec![vec!["tokens".to_string(), "lr".into(), "phase".into()]];
    let phases = &plan.schedule.phases;
    for p in &plan.schedule.preview {
        let phase = phases
            .iter()
            .find(|ph| p.tokens >= ph.start_tokens && p.tokens < ph.end_tokens)
            .or(phases.last())
            .map_or("", |ph| ph.name);
        rows.push(vec![count(p.tokens as f64), sci(p.lr), phase.to_string()]);
    }
    out.push_str(&table("  ", &rows));
    out
}

/// Each (stage, tp rank)'s bytes at its step's peak, the worst first
/// when there are many, against the device's memory.
fn memory_text(inp: &MemoryInputs, plan: &MemoryPlan) -> String {
    let mut out = format!(
        "\nmemory per rank at the step's peak (GiB; {} tokens per microbatch{}{})\n",
        inp.tokens_per_microbatch,
        if inp.shard_optimizer && inp.layout.dp > 1 {
            ", optimizer sharded over dp"
        } else {
            ""
        },
        match plan.device_bytes {
            Some(b) => format!(", device {:.2} GiB", gib(b)),
            None => ", device memory not given ([device] memory_gib or gpu)".into(),
        }
    );
    let mut rows = vec![
        [
            "rank",
            "stage",
            "tp",
            "weights",
            "grads",
            "optimizer",
            "activations",
            "transient",
            "ckpt copy",
            "total",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut ranks: Vec<_> = plan.ranks.iter().collect();
    const SHOWN: usize = 16;
    if ranks.len() > SHOWN {
        ranks.sort_by_key(|r| std::cmp::Reverse(r.total_bytes));
        ranks.truncate(SHOWN);
    }
    for r in &ranks {
        rows.push(vec![
            r.rank.to_string(),
            r.stage.to_string(),
            r.tp_rank.to_string(),
            format!("{:.3}", gib(r.weights_bytes + r.compute_copy_bytes)),
            format!("{:.3}", gib(r.grads_bytes)),
            format!("{:.3}", gib(r.optimizer_bytes)),
            format!(
                "{:.3} ({}×{:.3})",
                gib(r.activations_bytes),
                r.in_flight,
                gib(r.activations_per_microbatch_bytes)
            ),
            format!("{:.3} {}", gib(r.transient_bytes), r.transient),
            format!("{:.3}", gib(r.checkpoint_bytes)),
            format!("{:.3}", gib(r.total_bytes)),
        ]);
    }
    out.push_str(&table("  ", &rows));
    if let Some(r) = plan.ranks.first().filter(|r| r.pool_pages_bytes > 0) {
        let _ = writeln!(
            out,
            "  each total counts {:.3} GiB of the device pools' pages (up to one part-used page per pool)",
            gib(r.pool_pages_bytes)
        );
    }
    if plan.ranks.len() > SHOWN {
        let _ = writeln!(out, "  (the {SHOWN} largest of {} ranks)", plan.ranks.len());
    }
    match plan.refusal(inp) {
        Some(why) => {
            let _ = writeln!(out, "  DOES NOT FIT: {why}");
        }
        None if plan.device_bytes.is_some() => {
            let _ = writeln!(
                out,
                "  fits: the largest rank needs {:.2} GiB",
                gib(plan.worst().total_bytes)
            );
        }
        None => {}
    }
    out
}

fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        sci(v)
    }
}

/// Loss-based reweighting, when on: `; reweighting …`.
fn reweighting(data: &strata_recipe::DataConfig) -> String {
    let Some(r) = data.reweighting else {
        return String::new();
    };
    format!(
        "; reweighting {} in groups of {} sequences (temperature {}, delta {}) from {} tokens",
        r.strategy.name(),
        r.group,
        r.temperature,
        r.delta,
        count(r.start_tokens as f64)
    )
}

/// The dataset, or a mixture's sources with their weights at the start.
fn data_sources(data: &strata_recipe::DataConfig) -> String {
    if !data.is_mixture() {
        return data.first_dataset().to_string();
    }
    let w = data.weights_at(0);
    let parts: Vec<String> = data
        .sources
        .iter()
        .zip(w)
        .map(|(s, w)| format!("{} {:.0}% ({})", s.name, 100.0 * w, s.dataset))
        .collect();
    let phases = if data.phases.is_empty() {
        String::new()
    } else {
        format!(", {} later phase(s)", data.phases.len())
    };
    format!("mixture: {}{phases}", parts.join(", "))
}
