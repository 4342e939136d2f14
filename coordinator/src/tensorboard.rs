//! TensorBoard event files for every job, in its run folder
//! (`RUN_DIR/tensorboard/`), so `tensorboard --logdir` and `wandb sync
//! --sync-tensorboard` read strata's runs as they read every other
//! framework's.
//!
//! The engine hands each report of steps over a channel, under its lock
//! and without I/O; one thread of this module's own writes them. An
//! event file is TFRecord framing (length, masked CRC-32C of the length,
//! the record, masked CRC-32C of the record) around `tensorflow.Event`
//! protobufs, encoded here with prost: first the file's version
//! (`brain.Event:2`), then per step one event of scalars. Each attempt
//! writes a file of its own, opened with a `SessionLog` START at its first
//! step: TensorBoard's reader then drops what earlier attempts wrote from
//! that step on (its "orphaned data"), so a run that restarted from a
//! checkpoint, or was resumed, reads as one curve without the steps it
//! ran twice. Files are flushed at least every [`FLUSH_EVERY`] and when
//! the job ends.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::job::StepRecord;

/// Longest a written step waits in a buffer before it reaches the file.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// `tensorflow.Event` (the fields strata writes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    pub session_log: Option<SessionLog>,
}

/// `tensorflow.Summary`: scalars only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorflow.SessionLog`; status 1 is START.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    #[prost(int32, tag = "1")]
    pub status: i32,
}

const SESSION_START: i32 = 1;

/// TFRecord's masked CRC-32C.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record, framed.
pub fn frame(record: &[u8]) -> Vec<u8> {
    let len = (record.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(record.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(record);
    out.extend_from_slice(&masked_crc(record).to_le_bytes());
    out
}

/// The scalars of one step, by tag: what `strata metrics --json` and
/// `/metrics` show. MFU needs the model's FLOPs per token.
pub fn scalars(s: &StepRecord, flops_per_token: Option<f64>) -> Vec<(String, f64)> {
    let t = &s.times;
    let mut out = vec![
        ("train/loss".to_string(), s.loss),
        ("train/lr".into(), s.lr),
        ("train/grad_norm".into(), s.grad_norm),
        ("train/tokens".into(), s.tokens as f64),
        ("train/seq_len".into(), (1u64 << s.seq_log2) as f64),
        ("perf/tokens_per_s".into(), s.tokens_per_s),
        ("time/data_s".into(), t.data_s),
        ("time/forward_s".into(), t.forward_s),
        ("time/backward_s".into(), t.backward_s),
        ("time/all_reduce_s".into(), t.all_reduce_s),
        ("time/optimizer_s".into(), t.optimizer_s),
        (
            "time/step_s".into(),
            t.data_s + t.forward_s + t.backward_s + t.all_reduce_s + t.optimizer_s,
        ),
    ];
    if let Some(b) = s.stages.iter().map(|g| g.bubble).reduce(f64::max) {
        out.push(("perf/bubble".into(), b));
    }
    if let (Some(per_token), Some(peak)) = (flops_per_token, s.peak_flops.filter(|p| *p > 0.0)) {
        out.push(("perf/mfu".into(), per_token * s.tokens_per_s / peak));
    }
    if let Some(e) = s.eval_loss {
        out.push(("eval/loss".into(), e));
    }
    for src in &s.sources {
        if let Some(l) = src.loss {
            out.push((format!("sources/{}/loss", src.name), l));
        }
        out.push((format!("sources/{}/tokens", src.name), src.tokens as f64));
        if let Some(e) = src.eval_loss {
            out.push((format!("sources/{}/eval_loss", src.name), e));
        }
    }
    if let Some(w) = &s.weights {
        out.push(("weights/std".into(), w.std));
        out.push(("weights/effective".into(), w.effective));
    }
    out
}

/// Steps a job's attempt reported, for its event file.
struct Report {
    job: String,
    run_dir: String,
    attempt: u32,
    recipe: Option<Arc<strata_recipe::Recipe>>,
    steps: Vec<StepRecord>,
}

enum Msg {
    Steps(Report),
    Ended(String),
}

/// The writer's handle; dropping it flushes every file and ends the
/// writer's thread.
pub struct TensorBoard {
    tx: mpsc::Sender<Msg>,
}

impl TensorBoard {
    /// Starts the writer's thread.
    pub fn start() -> Arc<TensorBoard> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("tensorboard".into())
            .spawn(move || write_loop(rx))
            .expect("a thread for the event files");
        Arc::new(TensorBoard { tx })
    }

    /// Steps of attempt `attempt` of `job`, whose run folder is `run_dir`
    /// (no I/O: the writer's thread writes them; the recipe gives MFU).
    pub fn steps(
        &self,
        job: &str,
        run_dir: &str,
        attempt: u32,
        recipe: Option<Arc<strata_recipe::Recipe>>,
        steps: Vec<StepRecord>,
    ) {
        if run_dir.is_empty() || steps.is_empty() {
            return;
        }
        let _ = self.tx.send(Msg::Steps(Report {
            job: job.to_string(),
            run_dir: run_dir.to_string(),
            attempt,
            recipe,
            steps,
        }));
    }

    /// `job` ended: its file is flushed and closed.
    pub fn ended(&self, job: &str) {
        let _ = self.tx.send(Msg::Ended(job.to_string()));
    }
}

/// A job's open event file.
struct Open {
    attempt: u32,
    flops_per_token: Option<f64>,
    path: PathBuf,
    out: BufWriter<File>,
    dirty_since: Option<Instant>,
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn write_loop(rx: mpsc::Receiver<Msg>) {
    let mut files: HashMap<String, Open> = HashMap::new();
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "strata".into());
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(Msg::Steps(r)) => {
                if let Err(e) = append(&mut files, &host, &r) {
                    tracing::warn!(job = %r.job, error = %e, "tensorboard: cannot write the event file");
                }
            }
            Ok(Msg::Ended(job)) => {
                if let Some(mut f) = files.remove(&job) {
                    flush(&mut f);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                for f in files.values_mut() {
                    flush(f);
                }
                return;
            }
        }
        for f in files.values_mut() {
            if f.dirty_since.is_some_and(|t| t.elapsed() >= FLUSH_EVERY) {
                flush(f);
            }
        }
    }
}

fn flush(f: &mut Open) {
    if let Err(e) = f.out.flush() {
        tracing::warn!(file = %f.path.display(), error = %e, "tensorboard: cannot flush");
    }
    f.dirty_since = None;
}

fn append(files: &mut HashMap<String, Open>, host: &str, r: &Report) -> std::io::Result<()> {
    let first = r.steps[0].step as i64;
    let reopen = files.get(&r.job).is_none_or(|f| f.attempt != r.attempt);
    if reopen {
        if let Some(mut old) = files.remove(&r.job) {
            flush(&mut old);
        }
        let dir = Path::new(&r.run_dir).join("tensorboard");
        std::fs::create_dir_all(&dir)?;
        // Names sort as the attempts ran: by time, then attempt.
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.{host}.a{:04}",
            now_s() as u64,
            r.attempt
        ));
        let mut out = BufWriter::new(File::create(&path)?);
        let wall = now_s();
        for e in [
            Event {
                wall_time: wall,
                file_version: Some("brain.Event:2".into()),
                ..Event::default()
            },
            Event {
                wall_time: wall,
                step: first,
                session_log: Some(SessionLog {
                    status: SESSION_START,
                }),
                ..Event::default()
            },
        ] {
            out.write_all(&frame(&prost::Message::encode_to_vec(&e)))?;
        }
        files.insert(
            r.job.clone(),
            Open {
                attempt: r.attempt,
                flops_per_token: r
                    .recipe
                    .as_ref()
                    .map(|rc| strata_recipe::plan::Plan::new(rc).flops_per_token),
                path,
                out,
                dirty_since: None,
            },
        );
    }
    let f = files.get_mut(&r.job).expect("opened above");
    let wall = now_s();
    for s in &r.steps {
        let value = scalars(s, f.flops_per_token)
            .into_iter()
            .map(|(tag, v)| SummaryValue {
                tag,
                simple_value: Some(v as f32),
            })
            .collect();
        let e = Event {
            wall_time: wall,
            step: s.step as i64,
            summary: Some(Summary { value }),
            ..Event::default()
        };
        f.out
            .write_all(&frame(&prost::Message::encode_to_vec(&e)))?;
    }
    f.dirty_since.get_or_insert_with(Instant::now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of every record in `bytes`, each frame's CRCs checked.
    fn events(bytes: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes));
            let record = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(record));
            out.push(<Event as prost::Message>::decode(record).unwrap());
            at += 16 + len;
        }
        out
    }

    /// A running job's steps reach its file within the flush interval,
    /// without its end; a second attempt gets a file of its own opening
    /// with a restart at its first step.
    #[test]
    fn steps_reach_the_file_while_the_job_runs() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().to_str().unwrap();
        let tb = TensorBoard::start();
        tb.steps(
            "j",
            run,
            1,
            None,
            vec![StepRecord::for_test(1), StepRecord::for_test(2)],
        );
        std::thread::sleep(FLUSH_EVERY + Duration::from_secs(2));
        let folder = dir.path().join("tensorboard");
        let files: Vec<_> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        let e = events(&std::fs::read(&files[0]).unwrap());
        assert_eq!(e[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(
            e[1].session_log.as_ref().map(|l| l.status),
            Some(SESSION_START)
        );
        assert_eq!(e[1].step, 1);
        let steps: Vec<i64> = e[2..].iter().map(|x| x.step).collect();
        assert_eq!(steps, [1, 2], "flushed before the job ended");
        let loss = e[3]
            .summary
            .as_ref()
            .unwrap()
            .value
            .iter()
            .find(|v| v.tag == "train/loss");
        assert_eq!(loss.unwrap().simple_value, Some(5.0));

        // Attempt 2 from step 2, then the job's end.
        tb.steps(
            "j",
            run,
            2,
            None,
            vec![StepRecord::for_test(2), StepRecord::for_test(3)],
        );
        tb.ended("j");
        drop(tb);
        std::thread::sleep(Duration::from_millis(1500));
        let mut files: Vec<_> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert_eq!(files.len(), 2);
        let e = events(&std::fs::read(&files[1]).unwrap());
        assert_eq!(
            e[1].session_log.as_ref().map(|l| l.status),
            Some(SESSION_START)
        );
        assert_eq!(e[1].step, 2);
        assert_eq!(e[2..].iter().map(|x| x.step).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn records_are_framed_with_masked_crc32c() {
        // TFRecord's reference: the masked CRC-32C of an empty record.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        let r = frame(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[12..15], b"abc");
    }
}
