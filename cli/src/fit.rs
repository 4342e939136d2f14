//! `strata fit`: scaling laws fitted to a table of runs.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use strata_sweep::fit::{
    ChinchillaOptions, Interval, LossPoint, chinchilla_intervals, fit_chinchilla, fit_power_law,
    power_law_intervals,
};

use crate::UserError;
use crate::format::sci;

#[derive(Args)]
pub struct FitArgs {
    /// A CSV of runs with a header row (`strata results --csv` writes
    /// one): columns `n` (parameters), `d` (tokens) and a loss for
    /// Chinchilla's law, plus `lr` and/or `batch` for their power laws in
    /// N and D. Lines starting with `#` are comments.
    pub runs: PathBuf,
    /// The loss column [default: `loss`, else `eval_loss`, else
    /// `train_loss`].
    #[arg(long)]
    pub loss_column: Option<String>,
    /// Bootstrap resamples for the 95% intervals (0: none).
    #[arg(long, default_value_t = 200)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

/// The CSV's named columns; a column is read as numbers when asked for.
struct Table {
    path: String,
    columns: Vec<String>,
    /// Each row's cells and its line number.
    rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    fn read(path: &Path) -> anyhow::Result<Table> {
        let file = std::fs::File::open(path)
            .map_err(|e| UserError(format!("cannot read {}: {e}", path.display())))?;
        let mut reader = csv::ReaderBuilder::new()
            .comment(Some(b'#'))
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(file);
        let bad = |e: csv::Error| {
            let line = e
                .position()
                .map_or(String::new(), |p| format!(":{}", p.line()));
            UserError(format!("{}{line}: {e}", path.display()))
        };
        let columns: Vec<String> = reader
            .headers()
            .map_err(bad)?
            .iter()
            .map(|c| c.to_lowercase())
            .collect();
        if columns.iter().all(String::is_empty) {
            return Err(UserError(format!("{}: no header row", path.display())).into());
        }
        let mut rows = Vec::new();
        for record in reader.records() {
            let record = record.map_err(bad)?;
            let line = record.position().map_or(0, |p| p.line() as usize);
            if record.len() != columns.len() {
                return Err(UserError(format!(
                    "{}:{line}: {} cells for {} columns",
                    path.display(),
                    record.len(),
                    columns.len()
                ))
                .into());
            }
            rows.push((line, record.iter().map(str::to_string).collect()));
        }
        Ok(Table {
            path: path.display().to_string(),
            columns,
            rows,
        })
    }

    /// Column `name` as numbers (`None` without such a column); a cell
    /// that is not one is named by line and column.
    fn column(&self, name: &str) -> anyhow::Result<Option<Vec<f64>>> {
        let Some(j) = self.columns.iter().position(|c| c == name) else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(self.rows.len());
        for (line, cells) in &self.rows {
            let c = cells[j].trim();
            out.push(c.parse::<f64>().map_err(|_| {
                UserError(format!(
                    "{}:{line}: column {name}: {c:?} is not a number",
                    self.path
                ))
            })?);
        }
        Ok(Some(out))
    }

    fn has(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c == name)
    }
}

fn intervals_json(ci: &Option<Vec<Interval>>) -> serde_json::Value {
    match ci {
        Some(ci) => json!(ci),
        None => json!(null),
    }
}

fn print_intervals(ci: &Option<Vec<Interval>>, values: &[(&str, f64)]) {
    for (i, (name, v)) in values.iter().enumerate() {
        match ci.as_ref().and_then(|c| c.get(i)) {
            Some(c) => println!(
                "  {name:<16} {:>12}  [{}, {}]",
                sci(*v),
                sci(c.low),
                sci(c.high)
            ),
            None => println!("  {name:<16} {:>12}", sci(*v)),
        }
    }
}

pub fn run(args: FitArgs) -> anyhow::Result<()> {
    let t = Table::read(&args.runs)?;
    let what = args.runs.display().to_string();
    let (Some(n), Some(d)) = (t.column("n")?, t.column("d")?) else {
        return Err(UserError(format!(
            "{what}: needs columns n and d (found: {})",
            t.columns.join(", ")
        ))
        .into());
    };
    let mut out = serde_json::Map::new();
    let mut fitted = false;
    let loss_column = match &args.loss_column {
        Some(c) => Some(c.to_lowercase()),
        None => ["loss", "eval_loss", "train_loss"]
            .iter()
            .find(|c| t.has(c))
            .map(|c| c.to_string()),
    };
    if let Some(col) = &loss_column
        && !t.has(col)
    {
        return Err(UserError(format!("{what}: no column {col}")).into());
    }
    let loss = match &loss_column {
        Some(c) => t.column(c)?,
        None => None,
    };
    if let Some(loss) = loss {
        let points: Vec<LossPoint> = (0..n.len())
            .map(|i| LossPoint {
                n: n[i],
                d: d[i],
                loss: loss[i],
            })
            .collect();
        let opts = ChinchillaOptions::default();
        let fit = fit_chinchilla(&points, &opts).map_err(|e| UserError(format!("{what}: {e}")))?;
        let ci = (args.bootstrap > 0)
            .then(|| chinchilla_intervals(&points, &fit, &opts, args.bootstrap, args.seed))
            .flatten();
        let l = fit.law;
        if !args.json {
            println!(
                "L(N, D) = E + A/N^alpha + B/D^beta over {} runs (rms log residual {:.4}; 95% bootstrap intervals of {} resamples):",
                fit.points, fit.rms_log_residual, args.bootstrap
            );
            print_intervals(
                &ci,
                &[
                    ("E", l.e),
                    ("A", l.a),
                    ("B", l.b),
                    ("alpha", l.alpha),
                    ("beta", l.beta),
                    ("N* ~ C^a, a =", l.n_exponent()),
                ],
            );
            for c in [1e18, 1e20, 1e22, 1e24] {
                let (n, d) = l.optimal(c);
                println!(
                    "  compute-optimal at C = {}: N = {}, D = {}, L = {:.4}",
                    sci(c),
                    sci(n),
                    sci(d),
                    l.loss(n, d)
                );
            }
        }
        let frontier: Vec<_> = [1e18, 1e20, 1e22, 1e24]
            .iter()
            .map(|&c| {
                let (n, d) = l.optimal(c);
                json!({ "flops": c, "n": n, "d": d, "loss": l.loss(n, d) })
            })
            .collect();
        out.insert(
            "chinchilla".into(),
            json!({ "fit": fit, "intervals": intervals_json(&ci), "frontier": frontier }),
        );
        fitted = true;
    }
    for col in ["lr", "batch"] {
        let Some(y) = t.column(col)? else { continue };
        let xs: Vec<Vec<f64>> = (0..n.len()).map(|i| vec![n[i], d[i]]).collect();
        let fit = fit_power_law(&["N", "D"], &xs, &y)
            .map_err(|e| UserError(format!("{what}: {col}: {e}")))?;
        let ci = (args.bootstrap > 0)
            .then(|| power_law_intervals(&xs, &y, &fit, args.bootstrap, args.seed))
            .flatten();
        if !args.json {
            println!(
                "{col} = c * N^p * D^q over {} runs (R² in logs {:.4}):",
                fit.points, fit.r2_log
            );
            print_intervals(
                &ci,
                &[
                    ("c", fit.coefficient),
                    ("p (N)", fit.exponents[0]),
                    ("q (D)", fit.exponents[1]),
                ],
            );
        }
        out.insert(
            col.into(),
            json!({ "fit": fit, "intervals": intervals_json(&ci) }),
        );
        fitted = true;
    }
    if !fitted {
        return Err(UserError(format!(
            "{what}: nothing to fit: give a loss, lr or batch column"
        ))
        .into());
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::Value::Object(out))?
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_tables_name_the_bad_cell() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.csv");
        std::fs::write(
            &path,
            "# a sweep\nN,D,loss,name\n1e8,2e9,3.1,\"a, b\"\n1e9,2e10,x,c\n",
        )
        .unwrap();
        let t = Table::read(&path).unwrap();
        assert_eq!(t.column("n").unwrap(), Some(vec![1e8, 1e9]));
        let e = t.column("loss").err().unwrap().to_string();
        assert!(
            e.ends_with("runs.csv:4: column loss: \"x\" is not a number"),
            "{e}"
        );
        assert_eq!(t.rows[0].1[3], "a, b");
        std::fs::write(&path, "n,d,loss\n1e8,2e9\n").unwrap();
        let e = Table::read(&path).err().unwrap().to_string();
        assert!(e.ends_with("runs.csv:2: 2 cells for 3 columns"), "{e}");
        std::fs::write(&path, "n,d,loss\n1e8,2e9,3.5\n").unwrap();
        let t = Table::read(&path).unwrap();
        assert_eq!(t.column("loss").unwrap(), Some(vec![3.5]));
        assert_eq!(t.column("lr").unwrap(), None);
        // A quoted cell may hold quotes and a newline; the line named
        // after it counts the newline.
        std::fs::write(
            &path,
            "n,d,loss,name\n1e8,2e9,3.5,\"say \"\"hi\"\",\nthen go\"\n1e9,2e10,y,z\n",
        )
        .unwrap();
        let t = Table::read(&path).unwrap();
        assert_eq!(t.rows[0].1[3], "say \"hi\",\nthen go");
        let e = t.column("loss").err().unwrap().to_string();
        assert!(
            e.ends_with("runs.csv:4: column loss: \"y\" is not a number"),
            "{e}"
        );
    }
}
