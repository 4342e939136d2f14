//! The durable job store: one redb file in the state folder. A job's
//! record is committed before the coordinator answers the call that
//! changed it. Step metrics, the one high-rate write, go through a writer
//! thread that commits them in batches (one durable commit per 100 ms
//! window, off the async threads); [`Store::flush`] waits for what was
//! queued, and readers of the history flush first. A coordinator that
//! dies loses at most the last window of metrics, which its jobs' next
//! attempts report again.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::job::{JobRecord, StepRecord};
use crate::sweeps::SweepRecord;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const STEPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("steps");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SWEEPS: TableDefinition<&str, &[u8]> = TableDefinition::new("sweeps");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store {path}: {source}")]
    Db { path: PathBuf, source: redb::Error },
    #[error("job store {path} is closed (the coordinator is stopping)")]
    Closed { path: PathBuf },
    #[error("job store {path}: writing step metrics: {why}")]
    Writer { path: PathBuf, why: String },
    #[error("job store {path}: record {key} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        key: String,
        source: serde_json::Error,
    },
}

type Db = Arc<std::sync::RwLock<Option<Database>>>;
/// A batch of a job's steps, with its sequence number.
type Batch = (u64, String, Vec<StepRecord>);
/// The last sequence number committed, and the writer's last failure.
type Committed = Arc<(Mutex<(u64, Option<String>)>, Condvar)>;

pub struct Store {
    /// `None` once closed (the coordinator is stopping).
    db: Db,
    path: PathBuf,
    /// Batches of steps for the writer thread.
    log: Mutex<Option<mpsc::Sender<Batch>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    queued: Mutex<u64>,
    committed: Committed,
}

impl Store {
    /// Opens (or creates) `<dir>/jobs.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("jobs.redb");
        let err = |e: redb::Error| StoreError::Db {
            path: path.clone(),
            source: e,
        };
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        // Create the tables so reads never meet a missing one.
        let tx = db.begin_write().map_err(|e| err(e.into()))?;
        tx.open_table(JOBS).map_err(|e| err(e.into()))?;
        tx.open_table(STEPS).map_err(|e| err(e.into()))?;
        tx.open_table(META).map_err(|e| err(e.into()))?;
        tx.open_table(SWEEPS).map_err(|e| err(e.into()))?;
        tx.commit().map_err(|e| err(e.into()))?;
        let db: Db = Arc::new(std::sync::RwLock::new(Some(db)));
        let (tx, rx) = mpsc::channel();
        let committed = Arc::new((Mutex::new((0, None)), Condvar::new()));
        let writer = {
            let (db, committed, at) = (db.clone(), committed.clone(), path.clone());
            std::thread::Builder::new()
                .name("metrics-writer".into())
                .spawn(move || write_steps(&db, &at, &rx, &committed))
                .map_err(|e| StoreError::Db {
                    path: path.clone(),
                    source: redb::Error::Io(e),
                })?
        };
        Ok(Store {
            db,
            path,
            log: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            queued: Mutex::new(0),
            committed,
        })
    }

    /// Commits what is queued and closes the database file; later calls
    /// fail. A new coordinator can then open it in the same process.
    pub fn close(&self) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
        self.db.write().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Queues `steps` of job `job_id` for the writer thread; they are
    /// durable after the next [`Store::flush`] or within about 100 ms.
    pub fn queue_steps(&self, job_id: &str, steps: Vec<StepRecord>) -> Result<(), StoreError> {
        let mut seq = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = log.as_ref() else {
            return Err(StoreError::Closed {
                path: self.path.clone(),
            });
        };
        *seq += 1;
        tx.send((*seq, job_id.to_string(), steps))
            .map_err(|_| StoreError::Closed {
                path: self.path.clone(),
            })
    }

    /// Waits until every step queued so far is committed; the writer's
    /// last failure, if it had one since.
    pub fn flush(&self) -> Result<(), StoreError> {
        let want = *self.queued.lock().unwrap_or_else(|e| e.into_inner());
        let (lock, cv) = &*self.committed;
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        while done.0 < want {
            let (d, timeout) = cv
                .wait_timeout(done, Duration::from_secs(30))
                .unwrap_or_else(|e| e.into_inner());
            done = d;
            if timeout.timed_out() && done.0 < want {
                return Err(StoreError::Closed {
                    path: self.path.clone(),
                });
            }
        }
        match done.1.take() {
            Some(why) => Err(StoreError::Writer {
                path: self.path.clone(),
                why,
            }),
            None => Ok(()),
        }
    }

    /// The last step recorded for `job_id`.
    pub fn last_step(&self, job_id: &str) -> Result<Option<StepRecord>, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(STEPS).map_err(|e| self.err(e))?;
            let mut range = t
                .range((job_id, 0)..=(job_id, u64::MAX))
                .map_err(|e| self.err(e))?;
            match range.next_back() {
                Some(row) => {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    let (id, step) = k.value();
                    Ok(Some(self.decode(&format!("{id}/{step}"), v.value())?))
                }
                None => Ok(None),
            }
        })
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(StoreError::Closed {
                path: self.path.clone(),
            }),
        }
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
            path: self.path.clone(),
            key: key.to_string(),
            source,
        })
    }

    /// The next job number (1, 2, …), durably consumed.
    pub fn next_job_number(&self) -> Result<u64, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| self.err(e))?;
            let n = {
                let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
                let n = meta
                    .get("next_job")
                    .map_err(|e| self.err(e))?
                    .map_or(1, |v| v.value());
                meta.insert("next_job", n + 1).map_err(|e| self.err(e))?;
                n
            };
            tx.commit().map_err(|e| self.err(e))?;
            Ok(n)
        })
    }

    /// Inserts or replaces a job.
    pub fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.with_db(|db| {
            let bytes = serde_json::to_vec(job).expect("a job serialises");
            let tx = db.begin_write().map_err(|e| self.err(e))?;
            tx.open_table(JOBS)
                .map_err(|e| self.err(e))?
                .insert(job.job_id.as_str(), bytes.as_slice())
                .map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))
        })
    }

    /// Appends steps and updates their job in one transaction, synchronously
    /// (the tests' way to make a history; the coordinator queues steps).
    #[cfg(test)]
    pub fn put_steps(&self, job: &JobRecord, steps: &[StepRecord]) -> Result<(), StoreError> {
        self.with_db(|db| {
            let job_bytes = serde_json::to_vec(job).expect("a job serialises");
            let tx = db.begin_write().map_err(|e| self.err(e))?;
            {
                let mut t = tx.open_table(STEPS).map_err(|e| self.err(e))?;
                for s in steps {
                    let bytes = serde_json::to_vec(s).expect("a step serialises");
                    t.insert((job.job_id.as_str(), s.step), bytes.as_slice())
                        .map_err(|e| self.err(e))?;
                }
                tx.open_table(JOBS)
                    .map_err(|e| self.err(e))?
                    .insert(job.job_id.as_str(), job_bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            tx.commit().map_err(|e| self.err(e))
        })
    }

    /// Replaces a job and deletes its steps after `step` in one
    /// transaction (a resumed job forgets what its abandoned attempt did
    /// past the checkpoint it continues from). Steps still queued for the
    /// writer are committed first, so none lands after the cut.
    pub fn put_job_truncating(&self, job: &JobRecord, step: u64) -> Result<(), StoreError> {
        self.flush()?;
        self.with_db(|db| {
            let job_bytes = serde_json::to_vec(job).expect("a job serialises");
            let tx = db.begin_write().map_err(|e| self.err(e))?;
            {
                let mut t = tx.open_table(STEPS).map_err(|e| self.err(e))?;
                let id = job.job_id.as_str();
                t.retain_in((id, step.saturating_add(1))..=(id, u64::MAX), |_, _| false)
                    .map_err(|e| self.err(e))?;
                tx.open_table(JOBS)
                    .map_err(|e| self.err(e))?
                    .insert(id, job_bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            tx.commit().map_err(|e| self.err(e))
        })
    }

    /// Inserts or replaces a sweep.
    pub fn put_sweep(&self, sweep: &SweepRecord) -> Result<(), StoreError> {
        self.with_db(|db| {
            let bytes = serde_json::to_vec(sweep).expect("a sweep serialises");
            let tx = db.begin_write().map_err(|e| self.err(e))?;
            tx.open_table(SWEEPS)
                .map_err(|e| self.err(e))?
                .insert(sweep.sweep_id.as_str(), bytes.as_slice())
                .map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))
        })
    }

    pub fn sweeps(&self) -> Result<Vec<SweepRecord>, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(SWEEPS).map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                out.push(self.decode(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(JOBS).map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                out.push(self.decode(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    /// Steps `from..` of a job, at most `limit` (0: all), in step order.
    pub fn steps(
        &self,
        job_id: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StepRecord>, StoreError> {
        let mut out = Vec::new();
        self.visit_steps(job_id, from, |s| {
            out.push(s);
            if limit > 0 && out.len() >= limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        Ok(out)
    }

    /// Hands steps `from..` of a job to `f` in step order, until it breaks;
    /// no record after that is read.
    pub fn visit_steps(
        &self,
        job_id: &str,
        from: u64,
        mut f: impl FnMut(StepRecord) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(STEPS).map_err(|e| self.err(e))?;
            for row in t
                .range((job_id, from)..=(job_id, u64::MAX))
                .map_err(|e| self.err(e))?
            {
                let (k, v) = row.map_err(|e| self.err(e))?;
                let (id, step) = k.value();
                if f(self.decode(&format!("{id}/{step}"), v.value())?).is_break() {
                    break;
                }
            }
            Ok(())
        })
    }
}

impl Drop for Store {
    /// The writer thread holds the database too: stop it, so the file is
    /// free for the next store opened on it.
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread: takes every batch queued within 100 ms of the first
/// and commits them in one transaction.
fn write_steps(db: &Db, path: &Path, rx: &mpsc::Receiver<Batch>, committed: &Committed) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let until = std::time::Instant::now() + Duration::from_millis(100);
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => batch.push(b),
                Err(_) => break,
            }
        }
        let last = batch.last().map_or(0, |b| b.0);
        let result = (|| -> Result<(), redb::Error> {
            let guard = db.read().unwrap_or_else(|e| e.into_inner());
            let Some(db) = guard.as_ref() else {
                return Err(redb::Error::Io(std::io::Error::other(
                    "the store is closed",
                )));
            };
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(STEPS)?;
                for (_, job, steps) in &batch {
                    for s in steps {
                        let bytes = serde_json::to_vec(s).expect("a step serialises");
                        t.insert((job.as_str(), s.step), bytes.as_slice())?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })();
        let (lock, cv) = &**committed;
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        done.0 = last;
        if let Err(e) = result {
            tracing::error!(store = %path.display(), error = %e, "step metrics not written");
            done.1 = Some(e.to_string());
        }
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{StageTimes, StepTimes};

    fn job(id: &str) -> JobRecord {
        JobRecord::for_test(id)
    }

    fn step(n: u64) -> StepRecord {
        StepRecord {
            step: n,
            tokens: n * 128,
            loss: 10.0 / n as f64,
            lr: 1e-3,
            tokens_per_s: 1000.0,
            grad_norm: 1.0,
            seq_log2: 6,
            times: StepTimes::default(),
            stages: vec![StageTimes {
                stage: 0,
                bubble: 0.25,
                ..StageTimes::default()
            }],
            bubble_theory: 0.2,
            eval_loss: Some(3.5),
            peak_flops: Some(2e12),
        }
    }

    #[test]
    fn a_resumed_job_forgets_the_steps_after_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (job("a"), job("b"));
        let steps: Vec<StepRecord> = (1..=6).map(step).collect();
        store.put_steps(&a, &steps).unwrap();
        store.put_steps(&b, &steps).unwrap();
        store.put_job_truncating(&a, 4).unwrap();
        let kept: Vec<u64> = store
            .steps("a", 0, 0)
            .unwrap()
            .iter()
            .map(|s| s.step)
            .collect();
        assert_eq!(kept, [1, 2, 3, 4]);
        assert_eq!(
            store.steps("b", 0, 0).unwrap().len(),
            6,
            "another job's steps stay"
        );
    }

    #[test]
    fn jobs_and_steps_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.next_job_number().unwrap(), 1);
            assert_eq!(s.next_job_number().unwrap(), 2);
            s.put_job(&job("a-1")).unwrap();
            let mut b = job("b-2");
            b.steps_done = 3;
            s.put_steps(&b, &[step(1), step(2), step(3)]).unwrap();
            // Another job's steps never leak into this one's range.
            s.put_steps(&job("a-1"), &[step(1)]).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.next_job_number().unwrap(), 3);
        let jobs = s.jobs().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].steps_done, 3);
        assert_eq!(
            s.steps("b-2", 0, 0).unwrap(),
            vec![step(1), step(2), step(3)]
        );
        assert_eq!(s.steps("b-2", 2, 0).unwrap(), vec![step(2), step(3)]);
        assert_eq!(s.steps("b-2", 0, 2).unwrap(), vec![step(1), step(2)]);
        assert_eq!(s.steps("a-1", 0, 0).unwrap(), vec![step(1)]);
        assert!(s.steps("nope", 0, 0).unwrap().is_empty());
    }

    #[test]
    fn a_closed_store_says_so_and_can_be_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.close();
        let e = s.put_job(&job("a-1")).unwrap_err();
        assert!(e.to_string().contains("is closed"), "{e}");
        // The file is free again, as for a restarted coordinator.
        let again = Store::open(dir.path()).unwrap();
        again.put_job(&job("a-1")).unwrap();
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.with_db(|db| {
            let tx = db.begin_write().unwrap();
            tx.open_table(JOBS)
                .unwrap()
                .insert("bad-7", b"{not json".as_slice())
                .unwrap();
            tx.commit().unwrap();
            Ok(())
        })
        .unwrap();
        let e = s.jobs().unwrap_err();
        assert!(e.to_string().contains("record bad-7 is corrupt"), "{e}");
    }
}
