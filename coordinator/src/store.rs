//! The durable job store: one redb file in the state folder.
//!
//! Every write goes through one writer thread, in the order it was
//! submitted: job and sweep records, step metrics, the cut of a resumed
//! job's abandoned steps, the job counter. [`Store::submit`] only queues
//! (it is called under the engine's lock, and never waits for a disk);
//! it returns a [`Ticket`], and [`Store::durable`] waits, outside any
//! lock, until that write is committed. The writer commits whatever is
//! queued in one transaction (group commit): at once when a record is
//! among it, within 100 ms when only step metrics are (the high-rate
//! write). A coordinator that dies loses at most the step metrics of the
//! last window, which its jobs' next attempts report again. Readers of
//! the history flush first, so they see every step queued before.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::job::{JobId, JobRecord, StepRecord};
use crate::sweep::SweepRecord;

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
    #[error("job store {path} failed its I/O and is being reopened; try again")]
    Reopening { path: PathBuf },
    #[error(
        "job store {path}: a write is not durable after 60 s (its disk failing, or the store closed)"
    )]
    NotDurable { path: PathBuf },
    #[error("job store {path}: record {key} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        key: String,
        source: serde_json::Error,
    },
}

/// One write, applied by the writer thread in submission order.
#[derive(Debug)]
pub enum Write {
    /// Inserts or replaces a job.
    Job(Arc<JobRecord>),
    /// Appends (or replaces) a job's steps.
    Steps(JobId, Vec<StepRecord>),
    /// Deletes a job's steps after this one (a resumed job forgets what
    /// its abandoned attempt did past its checkpoint). Queued after the
    /// steps it cuts, so none of them lands after the cut.
    Truncate(JobId, u64),
    /// Inserts or replaces a sweep.
    Sweep(Arc<SweepRecord>),
    /// The next job number.
    NextJob(u64),
}

impl Write {
    fn is_record(&self) -> bool {
        !matches!(self, Write::Steps(..))
    }
}

/// A queued write: [`Store::durable`] waits until it is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a write is durable only once its ticket is waited for"]
pub struct Ticket(u64);

/// The database: `None` while a reopen after an I/O failure has not
/// succeeded yet, or once closed.
type Db = Arc<std::sync::RwLock<DbSlot>>;

struct DbSlot {
    db: Option<Database>,
    /// Closed on purpose (the coordinator is stopping).
    closed: bool,
}

/// The queue to the writer.
type Queue = Option<mpsc::Sender<(u64, Write)>>;

/// What the writer has committed: the last sequence number. Writes never
/// fail: the writer retries a failing commit until it succeeds, or the
/// coordinator exits.
struct Committed {
    state: Mutex<u64>,
    cv: Condvar,
    /// The same sequence number for async waiters.
    watch: tokio::sync::watch::Sender<u64>,
}

pub struct Store {
    db: Db,
    path: PathBuf,
    /// The queue to the writer and the last sequence number given out,
    /// under one lock so that numbers follow the queue's order.
    queue: Mutex<(u64, Queue)>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    committed: Arc<Committed>,
}

/// How long only step metrics wait for more before they are committed.
const STEP_WINDOW: Duration = Duration::from_millis(100);

impl Store {
    /// Opens (or creates) `<dir>/jobs.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("jobs.redb");
        let err = |e: redb::Error| StoreError::Db {
            path: path.clone(),
            source: e,
        };
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        // Every job's record (and its worker token's digest): the owner's.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| err(redb::Error::Io(e)))?;
        }
        // Create the tables so reads never meet a missing one.
        let tx = db.begin_write().map_err(|e| err(e.into()))?;
        tx.open_table(JOBS).map_err(|e| err(e.into()))?;
        tx.open_table(STEPS).map_err(|e| err(e.into()))?;
        tx.open_table(META).map_err(|e| err(e.into()))?;
        tx.open_table(SWEEPS).map_err(|e| err(e.into()))?;
        tx.commit().map_err(|e| err(e.into()))?;
        let db: Db = Arc::new(std::sync::RwLock::new(DbSlot {
            db: Some(db),
            closed: false,
        }));
        let (tx, rx) = mpsc::channel();
        let committed = Arc::new(Committed {
            state: Mutex::new(0),
            cv: Condvar::new(),
            watch: tokio::sync::watch::Sender::new(0),
        });
        let writer = {
            let (db, committed, at) = (db.clone(), committed.clone(), path.clone());
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || write_loop(&db, &at, &rx, &committed))
                .map_err(|e| StoreError::Db {
                    path: path.clone(),
                    source: redb::Error::Io(e),
                })?
        };
        Ok(Store {
            db,
            path,
            queue: Mutex::new((0, Some(tx))),
            writer: Mutex::new(Some(writer)),
            committed,
        })
    }

    /// Commits what is queued and closes the database file; later calls
    /// fail. A new coordinator can then open it in the same process.
    pub fn close(&self) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        slot.db = None;
        slot.closed = true;
    }

    /// Queues `w` for the writer thread; never blocks on the disk.
    pub fn submit(&self, w: Write) -> Result<Ticket, StoreError> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let closed = || StoreError::Closed {
            path: self.path.clone(),
        };
        let seq = q.0 + 1;
        q.1.as_ref()
            .ok_or_else(closed)?
            .send((seq, w))
            .map_err(|_| closed())?;
        q.0 = seq;
        Ok(Ticket(seq))
    }

    /// The ticket of the last write queued so far.
    fn last_ticket(&self) -> Ticket {
        Ticket(self.queue.lock().unwrap_or_else(|e| e.into_inner()).0)
    }

    /// Waits until the write of `t` is committed.
    pub async fn durable(&self, t: Ticket) -> Result<(), StoreError> {
        let mut rx = self.committed.watch.subscribe();
        let reached = rx.wait_for(|c| *c >= t.0).await.is_ok();
        let state = self
            .committed
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !reached && *state < t.0 {
            return Err(StoreError::Closed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// [`Store::durable`] for threads that may block (never a runtime's).
    pub fn wait(&self, t: Ticket) -> Result<(), StoreError> {
        let (lock, cv) = (&self.committed.state, &self.committed.cv);
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + Duration::from_secs(60);
        while *state < t.0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::NotDurable {
                    path: self.path.clone(),
                });
            }
            state = cv
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Waits until every write queued so far is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.durable(self.last_ticket()).await
    }

    /// [`Store::flush`] for threads that may block.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.wait(self.last_ticket())
    }

    /// Queues `w` and waits until it is committed (start-up, tests).
    pub fn put_blocking(&self, w: Write) -> Result<(), StoreError> {
        let t = self.submit(w)?;
        self.wait(t)
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let slot = self.db.read().unwrap_or_else(|e| e.into_inner());
        match (&slot.db, slot.closed) {
            (Some(db), _) => f(db),
            (None, true) => Err(StoreError::Closed {
                path: self.path.clone(),
            }),
            (None, false) => Err(StoreError::Reopening {
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

    /// A stored step: compact binary ([`encode_step`]), or JSON as
    /// older coordinators wrote it.
    fn decode_step(&self, job: &str, step: u64, bytes: &[u8]) -> Result<StepRecord, StoreError> {
        if bytes.first() == Some(&b'{') {
            return self.decode(&format!("{job}/{step}"), bytes);
        }
        decode_step(bytes).ok_or_else(|| StoreError::Corrupt {
            path: self.path.clone(),
            key: format!("{job}/{step}"),
            source: serde::de::Error::custom("a step record cut short or of an unknown version"),
        })
    }

    /// The next job number to give out (1 on a new store).
    pub fn next_job_number(&self) -> Result<u64, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let meta = tx.open_table(META).map_err(|e| self.err(e))?;
            Ok(meta
                .get("next_job")
                .map_err(|e| self.err(e))?
                .map_or(1, |v| v.value()))
        })
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
                    Ok(Some(self.decode_step(id, step, v.value())?))
                }
                None => Ok(None),
            }
        })
    }

    /// Every job, each with its recipe parsed.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut jobs: Vec<JobRecord> = self.all(JOBS)?;
        for j in &mut jobs {
            j.loaded();
        }
        Ok(jobs)
    }

    pub fn sweeps(&self) -> Result<Vec<SweepRecord>, StoreError> {
        self.all(SWEEPS)
    }

    fn all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(table).map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                // One record that does not decode (written by a newer
                // coordinator, or damaged) must not keep the others from
                // being served: it is left as it is, unread, and named.
                match self.decode(k.value(), v.value()) {
                    Ok(r) => out.push(r),
                    Err(e) => {
                        tracing::error!(key = k.value(), error = %e, "a stored record does not decode; it is left untouched and not served");
                    }
                }
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
                if f(self.decode_step(id, step, v.value())?).is_break() {
                    break;
                }
            }
            Ok(())
        })
    }

    /// One step of every `stride` in `from..=to` (the first recorded in
    /// each stretch), and the last: a long history thinned for a chart
    /// with one seek per point, not a read of every step.
    pub fn sample_steps(
        &self,
        job_id: &str,
        from: u64,
        to: u64,
        stride: u64,
    ) -> Result<Vec<StepRecord>, StoreError> {
        let stride = stride.max(1);
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(STEPS).map_err(|e| self.err(e))?;
            let mut out: Vec<StepRecord> = Vec::new();
            let mut at = from;
            while at <= to {
                let end = at.saturating_add(stride).min(to.saturating_add(1));
                let mut range = t
                    .range((job_id, at)..(job_id, end))
                    .map_err(|e| self.err(e))?;
                if let Some(row) = range.next() {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    let (id, step) = k.value();
                    out.push(self.decode_step(id, step, v.value())?);
                }
                if end == to.saturating_add(1) || end <= at {
                    break;
                }
                at = end;
            }
            // The last step, whatever the stride skipped.
            let last = t
                .range((job_id, from)..=(job_id, to))
                .map_err(|e| self.err(e))?
                .next_back();
            if let Some(row) = last {
                let (k, v) = row.map_err(|e| self.err(e))?;
                let (id, step) = k.value();
                if out.last().is_none_or(|s| s.step < step) {
                    out.push(self.decode_step(id, step, v.value())?);
                }
            }
            Ok(out)
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

/// The writer thread: takes what is queued, commits it in one
/// transaction, and tells the waiters.
fn write_loop(db: &Db, path: &Path, rx: &mpsc::Receiver<(u64, Write)>, committed: &Committed) {
    while let Ok(first) = rx.recv() {
        let start = Instant::now();
        let mut records = first.1.is_record();
        let mut batch = vec![first];
        loop {
            match rx.try_recv() {
                Ok(w) => {
                    records |= w.1.is_record();
                    batch.push(w);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) if records => break,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            // Only step metrics so far: wait a little for more.
            let left = STEP_WINDOW.saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(w) => {
                    records |= w.1.is_record();
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        let last_seq = batch[batch.len() - 1].0;
        commit_retrying(db, path, &batch, RETRY_FOR);
        *committed.state.lock().unwrap_or_else(|e| e.into_inner()) = last_seq;
        committed.cv.notify_all();
        committed.watch.send_replace(last_seq);
    }
}

/// How long a failing commit is retried before the coordinator gives up.
const RETRY_FOR: Duration = Duration::from_secs(300);

/// Commits `batch`, retrying while it fails. After an I/O failure (a full
/// disk, say) redb refuses every later operation, so each retry opens the
/// file afresh; the writes queued behind wait, so nothing is lost or
/// reordered while the cause lasts. Past `limit` a coordinator without its
/// store would look alive and keep nothing: it exits, saying why (what was
/// committed stays; a restart resumes from it). The store is closed only
/// once the writer has ended, so it stays open meanwhile.
fn commit_retrying(db: &Db, path: &Path, batch: &[(u64, Write)], limit: Duration) {
    let begun = Instant::now();
    let mut pause = Duration::from_millis(50);
    let mut tries = 0u32;
    loop {
        let e = match commit(db, batch) {
            Ok(()) => {
                if tries > 0 {
                    tracing::warn!(store = %path.display(), tries, waited_s = begun.elapsed().as_secs_f64(), "job store commit succeeded after failures");
                }
                return;
            }
            Err(e) => e,
        };
        tries += 1;
        if tries == 1 {
            tracing::error!(store = %path.display(), error = %e, writes = batch.len(), "job store commit failed; retrying with the store reopened");
        }
        if begun.elapsed() >= limit {
            tracing::error!(store = %path.display(), error = %e, tries, "the job store failed for too long; the coordinator exits");
            eprintln!(
                "strata coordinator: the job store {} failed for {} s ({e}); exiting",
                path.display(),
                limit.as_secs()
            );
            std::process::exit(70);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(2));
        if let Err(e) = reopen(db, path) {
            tracing::debug!(store = %path.display(), error = %e, "job store not reopened yet");
        }
    }
}

/// Closes the database and opens its file again (redb will not serve
/// again after an I/O error otherwise); left closed if that fails.
fn reopen(db: &Db, path: &Path) -> Result<(), redb::Error> {
    let mut slot = db.write().unwrap_or_else(|e| e.into_inner());
    slot.db = None;
    slot.db = Some(Database::create(path)?);
    Ok(())
}

fn commit(db: &Db, batch: &[(u64, Write)]) -> Result<(), redb::Error> {
    let slot = db.read().unwrap_or_else(|e| e.into_inner());
    let Some(db) = slot.db.as_ref() else {
        return Err(redb::Error::Io(std::io::Error::other(
            "the store is not open (a reopen failed)",
        )));
    };
    let tx = db.begin_write()?;
    {
        let mut steps = tx.open_table(STEPS)?;
        let mut jobs = tx.open_table(JOBS)?;
        let mut sweeps = tx.open_table(SWEEPS)?;
        let mut meta = tx.open_table(META)?;
        for (_, w) in batch {
            match w {
                Write::Job(job) => {
                    let bytes = serde_json::to_vec(&**job).expect("a job serialises");
                    jobs.insert(job.job_id.as_str(), bytes.as_slice())?;
                }
                Write::Steps(job, list) => {
                    for s in list {
                        let bytes = encode_step(s);
                        steps.insert((job.as_str(), s.step), bytes.as_slice())?;
                    }
                }
                Write::Truncate(job, step) => {
                    let id = job.as_str();
                    steps.retain_in((id, step.saturating_add(1))..=(id, u64::MAX), |_, _| false)?;
                }
                Write::Sweep(s) => {
                    let bytes = serde_json::to_vec(&**s).expect("a sweep serialises");
                    sweeps.insert(s.sweep_id.as_str(), bytes.as_slice())?;
                }
                Write::NextJob(n) => {
                    meta.insert("next_job", *n)?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// The version byte of a binary step record (JSON ones start with `{`).
const STEP_V1: u8 = 1;

/// A step as the store keeps it: little-endian, fixed fields, then the
/// optional ones and each pipeline stage. About 110 bytes plus 52 per
/// stage, against 150 per stage as JSON, and non-finite values as they
/// are.
pub fn encode_step(s: &StepRecord) -> Vec<u8> {
    let mut b = Vec::with_capacity(110 + 52 * s.stages.len());
    b.push(STEP_V1);
    b.extend(s.step.to_le_bytes());
    b.extend(s.tokens.to_le_bytes());
    for x in [s.loss, s.lr, s.tokens_per_s, s.grad_norm] {
        b.extend(x.to_le_bytes());
    }
    b.extend(s.seq_log2.to_le_bytes());
    let t = &s.times;
    for x in [
        t.data_s,
        t.forward_s,
        t.backward_s,
        t.all_reduce_s,
        t.optimizer_s,
    ] {
        b.extend(x.to_le_bytes());
    }
    b.extend(s.bubble_theory.to_le_bytes());
    b.push(u8::from(s.eval_loss.is_some()) | (u8::from(s.peak_flops.is_some()) << 1));
    for x in [s.eval_loss, s.peak_flops].into_iter().flatten() {
        b.extend(x.to_le_bytes());
    }
    b.extend((s.stages.len() as u32).to_le_bytes());
    for g in &s.stages {
        b.extend(g.stage.to_le_bytes());
        for x in [
            g.forward_s,
            g.backward_s,
            g.wait_s,
            g.pipeline_s,
            g.bubble,
            g.tp_comm_s,
        ] {
            b.extend(x.to_le_bytes());
        }
    }
    // A mixture's sources, after everything else (records without them
    // end here, as before mixtures), then the reweighting's spread
    // (records without it end after the sources, their count 0 when
    // none).
    if !s.sources.is_empty() || s.weights.is_some() {
        b.extend((s.sources.len() as u32).to_le_bytes());
        for x in &s.sources {
            let name = &x.name.as_bytes()[..x.name.len().min(u16::MAX as usize)];
            b.extend((name.len() as u16).to_le_bytes());
            b.extend(name);
            b.extend(x.tokens.to_le_bytes());
            b.push(u8::from(x.loss.is_some()) | (u8::from(x.eval_loss.is_some()) << 1));
            for v in [x.loss, x.eval_loss].into_iter().flatten() {
                b.extend(v.to_le_bytes());
            }
        }
    }
    if let Some(w) = &s.weights {
        for x in [w.std, w.min, w.max, w.effective] {
            b.extend(x.to_le_bytes());
        }
    }
    b
}

/// [`encode_step`]'s inverse; `None` for bytes it did not write.
pub fn decode_step(b: &[u8]) -> Option<StepRecord> {
    struct R<'a>(&'a [u8]);
    impl R<'_> {
        fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
            let (head, rest) = self.0.split_at_checked(N)?;
            self.0 = rest;
            head.try_into().ok()
        }
        fn u64(&mut self) -> Option<u64> {
            self.take().map(u64::from_le_bytes)
        }
        fn u32(&mut self) -> Option<u32> {
            self.take().map(u32::from_le_bytes)
        }
        fn f64(&mut self) -> Option<f64> {
            self.take().map(f64::from_le_bytes)
        }
        fn bytes(&mut self, n: usize) -> Option<&[u8]> {
            let (head, rest) = self.0.split_at_checked(n)?;
            self.0 = rest;
            Some(head)
        }
    }
    let mut r = R(b);
    if r.take::<1>()? != [STEP_V1] {
        return None;
    }
    let (step, tokens) = (r.u64()?, r.u64()?);
    let (loss, lr, tokens_per_s, grad_norm) = (r.f64()?, r.f64()?, r.f64()?, r.f64()?);
    let seq_log2 = r.u32()?;
    let times = crate::job::StepTimes {
        data_s: r.f64()?,
        forward_s: r.f64()?,
        backward_s: r.f64()?,
        all_reduce_s: r.f64()?,
        optimizer_s: r.f64()?,
    };
    let bubble_theory = r.f64()?;
    let flags = r.take::<1>()?[0];
    let eval_loss = if flags & 1 != 0 { Some(r.f64()?) } else { None };
    let peak_flops = if flags & 2 != 0 { Some(r.f64()?) } else { None };
    let n = r.u32()? as usize;
    if n > r.0.len() / 52 {
        return None;
    }
    let mut stages = Vec::with_capacity(n);
    for _ in 0..n {
        stages.push(crate::job::StageTimes {
            stage: r.u32()?,
            forward_s: r.f64()?,
            backward_s: r.f64()?,
            wait_s: r.f64()?,
            pipeline_s: r.f64()?,
            bubble: r.f64()?,
            tp_comm_s: r.f64()?,
        });
    }
    let mut sources = Vec::new();
    if !r.0.is_empty() {
        let n = r.u32()? as usize;
        if n > r.0.len() / 11 {
            return None;
        }
        for _ in 0..n {
            let len = u16::from_le_bytes(r.take()?) as usize;
            let name = String::from_utf8(r.bytes(len)?.to_vec()).ok()?;
            let tokens = r.u64()?;
            let flags = r.take::<1>()?[0];
            let loss = if flags & 1 != 0 { Some(r.f64()?) } else { None };
            let eval_loss = if flags & 2 != 0 { Some(r.f64()?) } else { None };
            sources.push(crate::job::SourceRecord {
                name,
                tokens,
                loss,
                eval_loss,
            });
        }
    }
    let weights = if r.0.is_empty() {
        None
    } else {
        Some(crate::job::SampleWeights {
            std: r.f64()?,
            min: r.f64()?,
            max: r.f64()?,
            effective: r.f64()?,
        })
    };
    r.0.is_empty().then_some(StepRecord {
        step,
        tokens,
        loss,
        lr,
        tokens_per_s,
        grad_norm,
        seq_log2,
        times,
        stages,
        bubble_theory,
        eval_loss,
        peak_flops,
        sources,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::StageTimes;

    #[test]
    fn an_undecodable_record_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .with_db(|db| {
                let tx = db.begin_write().map_err(|e| store.err(e))?;
                {
                    let mut t = tx.open_table(JOBS).map_err(|e| store.err(e))?;
                    t.insert("job-3", &b"{not json"[..])
                        .map_err(|e| store.err(e))?;
                }
                tx.commit().map_err(|e| store.err(e))
            })
            .unwrap();
        assert!(store.jobs().unwrap().is_empty());
        // The record is still there, as it was.
        let raw = store
            .with_db(|db| {
                let tx = db.begin_read().map_err(|e| store.err(e))?;
                let t = tx.open_table(JOBS).map_err(|e| store.err(e))?;
                Ok(t.get("job-3")
                    .map_err(|e| store.err(e))?
                    .map(|v| v.value().to_vec()))
            })
            .unwrap();
        assert_eq!(raw.as_deref(), Some(&b"{not json"[..]));
    }

    #[test]
    fn steps_are_kept_compact_and_exact_and_old_json_ones_still_read() {
        let mut s = StepRecord::for_test(7);
        s.grad_norm = f64::INFINITY;
        s.loss = f64::NAN;
        s.stages = (0..16)
            .map(|i| StageTimes {
                stage: i,
                bubble: 0.25,
                ..StageTimes::default()
            })
            .collect();
        let b = encode_step(&s);
        // 106 bytes, the held-out loss and the peak (16), 52 per stage.
        assert_eq!(b.len(), 106 + 16 + 52 * 16);
        let back = decode_step(&b).unwrap();
        assert!(back.loss.is_nan() && back.grad_norm == f64::INFINITY);
        assert_eq!(encode_step(&back), b, "a round trip changes no bit");
        assert_eq!(decode_step(&b[..b.len() - 1]), None);
        s.eval_loss = None;
        s.loss = 2.0;
        assert_eq!(decode_step(&encode_step(&s)).unwrap(), s);
        // A mixture's sources follow; a record without them is as before.
        s.sources = vec![
            crate::job::SourceRecord {
                name: "web".into(),
                tokens: 640,
                loss: Some(3.25),
                eval_loss: Some(3.5),
            },
            crate::job::SourceRecord {
                name: "code".into(),
                tokens: 0,
                loss: None,
                eval_loss: None,
            },
        ];
        let b = encode_step(&s);
        assert_eq!(decode_step(&b).unwrap(), s);
        assert_eq!(decode_step(&b[..b.len() - 1]), None);
        // The reweighting's spread follows the sources, with or without
        // them.
        let w = crate::job::SampleWeights {
            std: 0.5,
            min: 0.25,
            max: 2.0,
            effective: 0.8,
        };
        s.weights = Some(w);
        let b = encode_step(&s);
        assert_eq!(decode_step(&b).unwrap(), s);
        assert_eq!(decode_step(&b[..b.len() - 1]), None);
        s.sources.clear();
        let b = encode_step(&s);
        assert_eq!(decode_step(&b).unwrap(), s);
        s.weights = None;
        // A record an older coordinator wrote as JSON reads back.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .with_db(|db| {
                let tx = db.begin_write().unwrap();
                tx.open_table(STEPS)
                    .unwrap()
                    .insert(
                        ("old", 3),
                        serde_json::to_vec(&StepRecord::for_test(3))
                            .unwrap()
                            .as_slice(),
                    )
                    .unwrap();
                tx.commit().unwrap();
                Ok(())
            })
            .unwrap();
        assert_eq!(
            store.steps("old", 0, 0).unwrap(),
            vec![StepRecord::for_test(3)]
        );
    }

    fn job(id: &str) -> Arc<JobRecord> {
        Arc::new(JobRecord::for_test(id))
    }

    fn put_steps(s: &Store, id: &str, steps: Vec<StepRecord>) {
        s.put_blocking(Write::Steps(JobId::new(id), steps)).unwrap();
    }

    #[test]
    fn a_resumed_job_forgets_the_steps_after_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let steps: Vec<StepRecord> = (1..=6).map(StepRecord::for_test).collect();
        put_steps(&store, "a", steps.clone());
        put_steps(&store, "b", steps);
        // Queued behind more steps of "a": the cut applies to them too.
        let _ = store
            .submit(Write::Steps(JobId::new("a"), vec![StepRecord::for_test(7)]))
            .unwrap();
        store
            .put_blocking(Write::Truncate(JobId::new("a"), 4))
            .unwrap();
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
            s.put_blocking(Write::NextJob(3)).unwrap();
            s.put_blocking(Write::Job(job("a-1"))).unwrap();
            let mut b = JobRecord::for_test("b-2");
            b.steps_done = 3;
            s.put_blocking(Write::Job(Arc::new(b))).unwrap();
            put_steps(
                &s,
                "b-2",
                vec![
                    StepRecord::for_test(1),
                    StepRecord::for_test(2),
                    StepRecord::for_test(3),
                ],
            );
            // Another job's steps never leak into this one's range.
            put_steps(&s, "a-1", vec![StepRecord::for_test(1)]);
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.next_job_number().unwrap(), 3);
        let jobs = s.jobs().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].steps_done, 3);
        assert_eq!(
            s.steps("b-2", 0, 0).unwrap(),
            vec![
                StepRecord::for_test(1),
                StepRecord::for_test(2),
                StepRecord::for_test(3)
            ]
        );
        assert_eq!(
            s.steps("b-2", 2, 0).unwrap(),
            vec![StepRecord::for_test(2), StepRecord::for_test(3)]
        );
        assert_eq!(
            s.steps("b-2", 0, 2).unwrap(),
            vec![StepRecord::for_test(1), StepRecord::for_test(2)]
        );
        assert_eq!(s.steps("a-1", 0, 0).unwrap(), vec![StepRecord::for_test(1)]);
        assert!(s.steps("nope", 0, 0).unwrap().is_empty());
    }

    #[test]
    fn a_long_history_is_sampled_with_its_last_step() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        put_steps(&s, "a", (1..=1000).map(StepRecord::for_test).collect());
        let got: Vec<u64> = s
            .sample_steps("a", 1, 1000, 100)
            .unwrap()
            .iter()
            .map(|s| s.step)
            .collect();
        let mut want: Vec<u64> = (1..=1000).step_by(100).collect();
        want.push(1000);
        assert_eq!(got, want);
        assert_eq!(s.sample_steps("a", 995, 1000, 1).unwrap().len(), 6);
    }

    #[test]
    fn a_closed_store_says_so_and_can_be_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.close();
        let e = s.put_blocking(Write::Job(job("a-1"))).unwrap_err();
        assert!(e.to_string().contains("is closed"), "{e}");
        // The file is free again, as for a restarted coordinator.
        let again = Store::open(dir.path()).unwrap();
        again.put_blocking(Write::Job(job("a-1"))).unwrap();
    }
}
