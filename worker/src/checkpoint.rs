//! Sharded checkpoints on object storage, read back under any layout.
//!
//! The format ([`strata_dataplane::checkpoint`], re-exported here) keys
//! each tensor by its logical name (the [`ParamTable`]'s) and its slice of
//! the full tensor. Every
//! element is written once: only data-parallel replica 0 writes, only the
//! first tensor-parallel holder of a slice (replicated norm gains, KV heads
//! shared by several ranks), and never the last stage's mirror of a tied
//! embedding. A rank reading it back cuts the slices its own table needs
//! out of whichever files hold them, so a run resumes on another
//! (tp, pp, dp) layout from the same files.
//!
//! Saving is in two parts: [`Snapshot::take`] copies the rank's state to
//! host memory (the only time the step stalls), and a [`Saver`] thread
//! encodes and uploads it while training goes on, retrying failed writes.
//! Once every writing rank's files are up, one party [`commit`]s the
//! manifest.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use bytes::Bytes;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
pub use strata_dataplane::checkpoint::{
    CheckpointError, DataState, FILES, FORMAT, Kind, Manifest, SavedLayout, ShardRecord,
    SourceState, TensorEntry, VERSION, join, list, prune, shard_name, step_dir, tensor_entry,
    write_manifest, written_slots,
};
use strata_dataplane::reader::verify_object;
use strata_dataplane::store::Location;

use crate::params::{ParamSlot, ParamTable};
use crate::train::AdamWState;

/// Attempts at each object write before a save is given up.
const WRITE_ATTEMPTS: u32 = 4;

type Result<T> = std::result::Result<T, CheckpointError>;

pub use strata_dataplane::checkpoint::check_complete;

/// A file ready to upload.
struct Encoded {
    key: String,
    data: Vec<u8>,
    tensors: Vec<TensorEntry>,
}

/// A rank's state copied to host memory at the end of a step, ready to
/// be written in the background.
pub struct Snapshot {
    pub step: u64,
    /// `a1-pp00-tp00`: the attempt and the rank's place in the saving
    /// layout.
    name: String,
    /// The slots this rank writes.
    slots: Vec<ParamSlot>,
    /// The rank's flat master weights, exp_avg and exp_avg_sq (empty when
    /// it writes nothing): slices of them are written, never copied again.
    flat: [Vec<f32>; 3],
    /// Seconds the copy took (the step's stall).
    pub copy_s: f64,
}

impl Snapshot {
    /// The parts of `table`'s parameters this rank writes, cut from its
    /// flat master weights and moments (`values`, `state`). Empty on
    /// data-parallel replicas other than 0. The files' names carry
    /// `attempt`, so that a worker of an ended attempt still writing can
    /// never overwrite a file the next attempt's manifest lists.
    pub fn take(
        step: u64,
        attempt: u32,
        table: &ParamTable,
        dp_rank: u32,
        values: impl FnOnce() -> (Vec<f32>, AdamWState),
    ) -> Snapshot {
        let t = Instant::now();
        let name = shard_name(attempt, table.stage, table.tp_rank);
        let writes: Vec<&ParamSlot> = written_slots(table, dp_rank).collect();
        let flat = if writes.is_empty() {
            Default::default()
        } else {
            let (master, state) = values();
            [master, state.m, state.v]
        };
        Snapshot {
            step,
            name,
            slots: writes.into_iter().cloned().collect(),
            flat,
            copy_s: t.elapsed().as_secs_f64(),
        }
    }

    /// Whether this rank writes anything.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The model and optimizer files, in safetensors.
    fn encode(&self) -> Result<Vec<Encoded>> {
        if self.slots.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (folder, kinds) in FILES {
            let mut tensors = Vec::new();
            let mut views = Vec::new();
            for slot in &self.slots {
                for &kind in kinds {
                    let entry = tensor_entry(slot, kind);
                    let data = &self.flat[kind as usize][slot.range()];
                    let view =
                        TensorView::new(Dtype::F32, slot.shape.clone(), bytemuck::cast_slice(data))
                            .map_err(|e| {
                                CheckpointError::Invalid(format!("{}: {e}", entry.name))
                            })?;
                    views.push((kind.key(&entry.name), view));
                    tensors.push(entry);
                }
            }
            let slices: HashMap<String, (&[usize], &[[usize; 2]])> = tensors
                .iter()
                .map(|t| (kind_key(t), (&t.full_shape[..], &t.slice[..])))
                .collect();
            let info = HashMap::from([
                ("format".to_string(), FORMAT.to_string()),
                ("step".to_string(), self.step.to_string()),
                (
                    "slices".to_string(),
                    serde_json::to_string(&slices).expect("slices serialize"),
                ),
            ]);
            let data = safetensors::serialize(views, Some(info))
                .map_err(|e| CheckpointError::Invalid(format!("{}: {e}", self.name)))?;
            out.push(Encoded {
                key: format!("{folder}/{}.safetensors", self.name),
                data,
                tensors,
            });
        }
        Ok(out)
    }
}

fn kind_key(t: &TensorEntry) -> String {
    t.kind.key(&t.name)
}

/// What writing one rank's files did.
#[derive(Debug, Clone)]
pub struct Saved {
    pub step: u64,
    pub shards: Vec<ShardRecord>,
    pub bytes: u64,
    /// Encoding and upload, in the background.
    pub write_s: f64,
    /// Writes that failed and were tried again.
    pub retries: u32,
}

/// A save that failed after its retries; training goes on.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint of step {step}: {error}")]
pub struct SaveFailed {
    pub step: u64,
    #[source]
    pub error: CheckpointError,
}

/// What became of one save.
pub type SaveResult = std::result::Result<Saved, SaveFailed>;

/// Writes `snapshot`'s files under `root/step-…/`, each tried up to four
/// times (0.5, 1 and 2 s apart) before the save fails.
pub async fn write_snapshot(loc: &Location, root: &str, snapshot: &Snapshot) -> Result<Saved> {
    let t = Instant::now();
    let dir = join(root, &step_dir(snapshot.step));
    let mut shards = Vec::new();
    let mut retries = 0;
    for file in snapshot.encode()? {
        let key = join(&dir, &file.key);
        let crc32 = crc32fast::hash(&file.data);
        let bytes = file.data.len() as u64;
        let data = Bytes::from(file.data);
        let mut wait = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match loc.put_durable(&key, data.clone()).await {
                Ok(()) => break,
                Err(e) if attempt < WRITE_ATTEMPTS => {
                    tracing::warn!(key = %loc.url_of(&key), attempt, error = %e, "checkpoint write failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                    retries += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        shards.push(ShardRecord {
            key: file.key,
            bytes,
            crc32,
            tensors: file.tensors,
        });
    }
    Ok(Saved {
        step: snapshot.step,
        bytes: shards.iter().map(|s| s.bytes).sum(),
        shards,
        write_s: t.elapsed().as_secs_f64(),
        retries,
    })
}

/// Makes step `manifest.step`'s checkpoint exist: checks that its files
/// cover the whole model, then writes its manifest.
pub async fn commit(loc: &Location, root: &str, manifest: &Manifest) -> Result<()> {
    check_complete(manifest)?;
    write_manifest(loc, root, manifest).await
}

/// A rank's state read back from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// The master weights in the table's flat layout.
    pub master: Vec<f32>,
    pub state: AdamWState,
}

/// Reads the parts of `manifest`'s checkpoint that `table` holds, from
/// whichever files hold them, checking each file's size and CRC-32.
pub async fn read_rank(
    loc: &Location,
    root: &str,
    manifest: &Manifest,
    table: &ParamTable,
) -> Result<Restored> {
    let [master, m, v] = read_kinds(loc, root, manifest, table, &Kind::ALL).await?;
    Ok(Restored {
        master,
        state: AdamWState {
            step: manifest.optimizer_steps,
            m,
            v,
        },
    })
}

/// [`read_rank`]'s master weights alone: the optimizer's files are not
/// read (a new run starting from another's weights).
pub async fn read_weights(
    loc: &Location,
    root: &str,
    manifest: &Manifest,
    table: &ParamTable,
) -> Result<Vec<f32>> {
    let [master, _, _] = read_kinds(loc, root, manifest, table, &[Kind::Param]).await?;
    Ok(master)
}

/// The `kinds` of `table`'s parts (the others left empty).
async fn read_kinds(
    loc: &Location,
    root: &str,
    manifest: &Manifest,
    table: &ParamTable,
    kinds: &[Kind],
) -> Result<[Vec<f32>; 3]> {
    check_complete(manifest)?;
    let dir = join(root, &step_dir(manifest.step));
    let mut flat: [Vec<f32>; 3] = std::array::from_fn(|k| {
        if kinds.iter().any(|&x| x as usize == k) {
            vec![0f32; table.total]
        } else {
            Vec::new()
        }
    });
    let mut filled = vec![[0usize; 3]; table.slots.len()];
    for shard in &manifest.shards {
        let needed = shard.tensors.iter().any(|t| {
            kinds.contains(&t.kind)
                && table
                    .slots
                    .iter()
                    .any(|s| s.spec.name == t.name && overlap(&s.slice, &t.ranges()).is_some())
        });
        if !needed {
            continue;
        }
        let key = join(&dir, &shard.key);
        let url = loc.url_of(&key);
        let corrupt = |why: String| CheckpointError::Corrupt {
            url: url.clone(),
            why,
        };
        let data = loc.get(&key).await?;
        verify_object(&data, shard.bytes, shard.crc32).map_err(corrupt)?;
        let file = SafeTensors::deserialize(&data).map_err(|e| corrupt(e.to_string()))?;
        for t in shard.tensors.iter().filter(|t| kinds.contains(&t.kind)) {
            let src_slice = t.ranges();
            for (i, slot) in table.slots.iter().enumerate() {
                if slot.spec.name != t.name {
                    continue;
                }
                let Some(common) = overlap(&slot.slice, &src_slice) else {
                    continue;
                };
                let view = file
                    .tensor(&t.kind.key(&t.name))
                    .map_err(|e| corrupt(format!("`{}`: {e}", t.kind.key(&t.name))))?;
                let want: Vec<usize> = src_slice.iter().map(|r| r.len()).collect();
                if view.dtype() != Dtype::F32 || view.shape() != want {
                    return Err(corrupt(format!(
                        "`{}` is {:?} {:?}, the manifest says F32 {want:?}",
                        t.kind.key(&t.name),
                        view.dtype(),
                        view.shape()
                    )));
                }
                let out = &mut flat[t.kind as usize][slot.range()];
                filled[i][t.kind as usize] +=
                    copy_region(view.data(), &src_slice, out, &slot.slice, &common);
            }
        }
    }
    for (slot, got) in table.slots.iter().zip(&filled) {
        for &kind in kinds {
            if got[kind as usize] != slot.len {
                return Err(CheckpointError::Invalid(format!(
                    "step {}: the files hold {} of the {} elements of `{}` ({kind:?}) this rank needs",
                    manifest.step, got[kind as usize], slot.len, slot.spec.name
                )));
            }
        }
    }
    Ok(flat)
}

/// The intersection of two slices, if not empty.
fn overlap(a: &[Range<usize>], b: &[Range<usize>]) -> Option<Vec<Range<usize>>> {
    let r: Vec<Range<usize>> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.start.max(y.start)..x.end.min(y.end))
        .collect();
    r.iter().all(|x| x.start < x.end).then_some(r)
}

/// Copies `region` of the full tensor from `src` (little-endian f32 bytes
/// of slice `src_slice`, row-major) into `dst` (slice `dst_slice`).
/// Returns the elements copied.
fn copy_region(
    src: &[u8],
    src_slice: &[Range<usize>],
    dst: &mut [f32],
    dst_slice: &[Range<usize>],
    region: &[Range<usize>],
) -> usize {
    // Row-major strides of both slices, and the region's rows as runs of
    // the last dimension.
    let strides = |s: &[Range<usize>]| {
        let mut st = vec![1usize; s.len()];
        for d in (0..s.len().saturating_sub(1)).rev() {
            st[d] = st[d + 1] * s[d + 1].len();
        }
        st
    };
    let (ss, ds) = (strides(src_slice), strides(dst_slice));
    let last = region.len() - 1;
    let run = region[last].len();
    let outer: Vec<Range<usize>> = region[..last].to_vec();
    let mut index: Vec<usize> = outer.iter().map(|r| r.start).collect();
    let mut copied = 0;
    loop {
        let at = |slice: &[Range<usize>], st: &[usize]| {
            let mut off = (region[last].start - slice[last].start) * st[last];
            for (d, &i) in index.iter().enumerate() {
                off += (i - slice[d].start) * st[d];
            }
            off
        };
        let (s, d) = (at(src_slice, &ss), at(dst_slice, &ds));
        for (k, x) in dst[d..d + run].iter_mut().enumerate() {
            let b = (s + k) * 4;
            *x = f32::from_le_bytes([src[b], src[b + 1], src[b + 2], src[b + 3]]);
        }
        copied += run;
        // Next index of the outer dimensions, last fastest.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return copied;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < outer[d].end {
                break;
            }
            index[d] = outer[d].start;
        }
    }
}

/// A checkpoint a run continues from, with the newer ones passed over.
#[derive(Debug)]
pub struct Resumed {
    pub manifest: Manifest,
    pub restored: Restored,
    /// Newer checkpoints that could not be read, newest first: step and
    /// why (as this rank saw it, or that another rank refused it).
    pub skipped: Vec<(u64, String)>,
}

/// Picks the newest checkpoint among `candidates` (oldest first, as
/// [`list`] gives them) that every rank can read, and reads this rank's
/// part. `agree(ok)` must return whether every rank of the job passed
/// `ok = true` for the same candidate (a collective over the world), so
/// that all ranks fall back together when one finds a corrupt file.
/// `None` when no candidate can be read.
pub fn resume_agreed(
    rt: &tokio::runtime::Handle,
    loc: &Location,
    root: &str,
    candidates: &[Manifest],
    table: &ParamTable,
    mut agree: impl FnMut(bool) -> std::result::Result<bool, String>,
) -> std::result::Result<Option<Resumed>, String> {
    let mut skipped = Vec::new();
    for m in candidates.iter().rev() {
        let mine = rt.block_on(read_rank(loc, root, m, table));
        let ok = agree(mine.is_ok())?;
        match (mine, ok) {
            (Ok(restored), true) => {
                return Ok(Some(Resumed {
                    manifest: m.clone(),
                    restored,
                    skipped,
                }));
            }
            (Err(e), _) => {
                tracing::warn!(step = m.step, error = %e, "checkpoint unusable; trying the one before");
                skipped.push((m.step, e.to_string()));
            }
            (Ok(_), false) => {
                tracing::warn!(
                    step = m.step,
                    "another rank could not read this checkpoint; trying the one before"
                );
                skipped.push((m.step, "another rank could not read its part".to_string()));
            }
        }
    }
    Ok(None)
}

/// Writes rank snapshots in the background, one at a time, on a thread of
/// its own (with its own runtime for the object store's I/O).
pub struct Saver {
    tx: Option<mpsc::Sender<Snapshot>>,
    rx: mpsc::Receiver<SaveResult>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: usize,
}

impl Saver {
    /// A saver writing under `root` of `loc`.
    ///
    /// The writes run on `rt` (a multi-threaded runtime, whose I/O is
    /// always driven), the runtime the rest of the process reaches `loc`
    /// through: an HTTP client's pooled connections belong to the runtime
    /// that opened them, and one opened on a runtime of the saver's own,
    /// idle between saves, would stall the next reader that reuses it.
    pub fn new(loc: Location, root: String, rt: tokio::runtime::Handle) -> Saver {
        let (tx, jobs) = mpsc::channel::<Snapshot>();
        let (done, rx) = mpsc::channel();
        // Writes are traced under the span the saver was made in (the
        // worker's attempt), not under the step that handed them over.
        let parent = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("checkpoint-saver".into())
            .spawn(move || {
                for snapshot in jobs {
                    let span = tracing::info_span!(parent: &parent, "checkpoint_write", step = snapshot.step);
                    let r = rt
                        .block_on(write_snapshot(&loc, &root, &snapshot).instrument(span))
                        .map_err(|error| SaveFailed {
                            step: snapshot.step,
                            error,
                        });
                    drop(snapshot);
                    if done.send(r).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the checkpoint saver");
        Saver {
            tx: Some(tx),
            rx,
            thread: Some(thread),
            in_flight: 0,
        }
    }

    /// Hands `snapshot` to the background thread. A save still in flight
    /// is waited for first (one snapshot in memory at a time); its result
    /// is returned with the time waited.
    pub fn save(&mut self, snapshot: Snapshot) -> (Vec<SaveResult>, Duration) {
        let t = Instant::now();
        let done = self.wait();
        self.tx
            .as_ref()
            .expect("the saver is open")
            .send(snapshot)
            .expect("the checkpoint saver thread is alive");
        self.in_flight += 1;
        (done, t.elapsed())
    }

    /// The saves finished since the last call, without waiting.
    pub fn finished(&mut self) -> Vec<SaveResult> {
        let mut out = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            self.in_flight -= 1;
            out.push(r);
        }
        out
    }

    /// Waits for every save handed over.
    pub fn wait(&mut self) -> Vec<SaveResult> {
        let mut out = Vec::new();
        while self.in_flight > 0 {
            out.push(
                self.rx
                    .recv()
                    .expect("the checkpoint saver thread is alive"),
            );
            self.in_flight -= 1;
        }
        out
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
