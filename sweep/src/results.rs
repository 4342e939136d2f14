//! A sweep's results table: one row per run, as CSV (what `strata fit`
//! reads) and Parquet (arrow's writer), both built in memory.

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use serde::Serialize;

/// One run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultRow {
    pub job: String,
    pub name: String,
    pub state: String,
    /// A branch's parent job and step; empty and 0 otherwise.
    pub parent: String,
    pub parent_step: u64,
    /// Non-embedding parameters (Step Law's N).
    pub n: u64,
    /// All parameters, embeddings included.
    pub n_total: u64,
    /// Tokens trained.
    pub d: u64,
    /// Training FLOPs: the plan's FLOPs per token (6N plus attention) × D.
    pub flops: f64,
    /// The schedule's peak learning rate.
    pub lr: f64,
    /// Tokens per optimizer step.
    pub batch: u64,
    /// The last step's training loss.
    pub train_loss: Option<f64>,
    /// The last held-out loss (`[eval]`).
    pub eval_loss: Option<f64>,
    /// Seconds from the first start to the end.
    pub wall_s: f64,
}

const COLUMNS: [&str; 15] = [
    "job",
    "name",
    "state",
    "parent",
    "parent_step",
    "n",
    "n_total",
    "d",
    "flops",
    "lr",
    "batch",
    "train_loss",
    "eval_loss",
    "wall_s",
    "loss",
];

/// What a job's row is made of.
#[derive(Debug, Clone, Copy)]
pub struct JobFacts<'a> {
    pub job: &'a str,
    pub name: &'a str,
    pub state: &'a str,
    pub parent: &'a str,
    pub parent_step: u64,
    /// Its recipe.
    pub spec_toml: &'a str,
    pub tokens_done: u64,
    /// When its first attempt started, and when it ended (or its last
    /// start while it runs).
    pub first_start_unix_ms: i64,
    pub end_unix_ms: i64,
    /// Its last step's loss, and its last held-out loss.
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
}

impl ResultRow {
    /// A job's row: its recipe's sizes and schedule, its last losses. The
    /// error names the job whose recipe does not read.
    pub fn of(j: &JobFacts<'_>) -> Result<ResultRow, String> {
        let recipe = strata_recipe::Recipe::from_toml_str(j.spec_toml, j.name)
            .map_err(|e| format!("job {}: its recipe: {e}", j.job))?;
        let plan = strata_recipe::plan::Plan::new(&recipe);
        Ok(ResultRow {
            job: j.job.to_string(),
            name: j.name.to_string(),
            state: j.state.to_string(),
            parent: j.parent.to_string(),
            parent_step: j.parent_step,
            n: plan.params.non_embedding,
            n_total: plan.params.total,
            d: j.tokens_done,
            flops: plan.flops_per_token * j.tokens_done as f64,
            lr: recipe.schedule.max_lr(),
            batch: recipe.data.tokens_per_step,
            train_loss: j.train_loss,
            eval_loss: j.eval_loss,
            wall_s: (j.end_unix_ms - j.first_start_unix_ms).max(0) as f64 / 1e3,
        })
    }

    /// The loss a fit should use: the held-out one when measured, the
    /// training one otherwise.
    pub fn loss(&self) -> Option<f64> {
        self.eval_loss.or(self.train_loss)
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or(String::new(), |x| x.to_string())
}

/// The table as CSV with a header row; `loss` is [`ResultRow::loss`].
pub fn to_csv(rows: &[ResultRow]) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(COLUMNS).expect("CSV into memory");
    for r in rows {
        w.write_record([
            r.job.clone(),
            r.name.clone(),
            r.state.clone(),
            r.parent.clone(),
            r.parent_step.to_string(),
            r.n.to_string(),
            r.n_total.to_string(),
            r.d.to_string(),
            r.flops.to_string(),
            r.lr.to_string(),
            r.batch.to_string(),
            opt(r.train_loss),
            opt(r.eval_loss),
            r.wall_s.to_string(),
            opt(r.loss()),
        ])
        .expect("CSV into memory");
    }
    String::from_utf8(w.into_inner().expect("CSV into memory")).expect("CSV of strings is UTF-8")
}

/// The table as one Parquet file (a row group; missing losses null).
pub fn to_parquet(rows: &[ResultRow]) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let text = |f: fn(&ResultRow) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let int = |f: fn(&ResultRow) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(f)))
    };
    let float = |f: fn(&ResultRow) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from_iter(rows.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        text(|r| &r.job),
        text(|r| &r.name),
        text(|r| &r.state),
        text(|r| &r.parent),
        int(|r| r.parent_step),
        int(|r| r.n),
        int(|r| r.n_total),
        int(|r| r.d),
        float(|r| Some(r.flops)),
        float(|r| Some(r.lr)),
        int(|r| r.batch),
        float(|r| r.train_loss),
        float(|r| r.eval_loss),
        float(|r| Some(r.wall_s)),
        float(ResultRow::loss),
    ];
    let fields: Vec<Field> = COLUMNS
        .iter()
        .zip(&columns)
        .map(|(name, c)| {
            let nullable = matches!(*name, "train_loss" | "eval_loss" | "loss");
            Field::new(*name, c.data_type().clone(), nullable)
        })
        .collect();
    debug_assert!(fields.iter().all(|f| f.data_type() != &DataType::Null));
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn row(job: &str, eval: Option<f64>) -> ResultRow {
        ResultRow {
            job: job.into(),
            name: "tiny, \"a\"".into(),
            state: "succeeded".into(),
            parent: String::new(),
            parent_step: 0,
            n: 1_000_000,
            n_total: 2_000_000,
            d: 40_000_000,
            flops: 2.4e14,
            lr: 3e-3,
            batch: 4096,
            train_loss: Some(4.5),
            eval_loss: eval,
            wall_s: 12.5,
        }
    }

    #[test]
    fn csv_and_parquet_hold_the_same_table() {
        let rows = vec![row("a-1", Some(4.25)), row("b-2", None)];
        let csv = to_csv(&rows);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], COLUMNS.join(","));
        assert!(
            lines[1].starts_with("a-1,\"tiny, \"\"a\"\"\",succeeded,,0,1000000,"),
            "{}",
            lines[1]
        );
        assert!(lines[1].ends_with(",4.5,4.25,12.5,4.25"), "{}", lines[1]);
        assert!(lines[2].ends_with(",4.5,,12.5,4.5"), "{}", lines[2]);

        let bytes = to_parquet(&rows).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        let b = &batches[0];
        let eval = b
            .column_by_name("eval_loss")
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(eval.value(0), 4.25);
        assert!(eval.is_null(1));
        let n = b
            .column_by_name("n")
            .unwrap()
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap();
        assert_eq!(n.value(1), 1_000_000);
    }
}
