//! Raw text in: finding documents in files and folders, and turning a corpus
//! into a dataset (`strata decompose`).
//!
//! [`Corpus::open_inputs`] finds the files under its inputs (local paths, or
//! folders on object storage: an object is spooled to a local temporary
//! file while it is read, one at a time), each of a kind
//! [`crate::formats`] reads (plain text, JSON lines, Parquet, Arrow IPC;
//! `.gz` and `.zst` around the text ones), and checks them all before
//! anything is written: a file of a kind strata cannot read, or an input
//! that yields no document, is an error naming it. Files are read in
//! sorted path order (a Hugging Face `datasets` folder in its
//! `state.json`'s order), so document ids (and everything seeded by them)
//! do not depend on the file system's listing order; a folder that holds
//! Parquet or Arrow files (a Hub snapshot) reads its data files only, and
//! one of JSON lines not the README beside them. A folder's files are in
//! splits as Hugging Face `datasets` puts them ([`crate::splits`]): a
//! folder of one split reads it, one of several reads the split
//! [`CorpusOptions::split`] names and is refused without it.
//!
//! A document's id is a hash of its text ([`doc_id`]), and every draw that
//! cuts it or holds it out is seeded by that id: a document is cut alike
//! whatever file, format or shard it arrives in, so any run of the files
//! ([`Corpus::part`]) cuts its documents exactly as the whole corpus does
//! (a decomposition spread over workers, [`crate::parts`], equals one made
//! in one process), and copies of a document are held out together.
//!
//! Documents stream: a batch of about [`BATCH_BYTES`] of text is read,
//! tokenized on all cores (results keep input order) and written before
//! the next is read, so memory is bounded by the batch, not the corpus.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::formats::{self, Doc, FileKind, Format, FormatError, SavedDataset};
use crate::manifest::Manifest;
use crate::splits::{self, Splits};
use crate::store::{Location, StoreError, StoreOptions};
use crate::tokenize::Tokenizer;
use crate::writer::{DatasetWriter, WriteError};

/// Text read per tokenization batch: the bound on a decompose's memory
/// for documents (plus one document, or one record batch, over it).
pub const BATCH_BYTES: usize = 16 << 20;
/// Skipped documents listed by name in a summary (all are counted).
const MAX_LISTED_SKIPS: usize = 20;
/// Metadata files of Hugging Face datasets, never documents.
const DATASETS_METADATA: &[&str] = &[
    "dataset_info.json",
    "dataset_infos.json",
    "state.json",
    "dataset_dict.json",
];

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Unreadable { path: PathBuf, why: String },
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("{input}: {why}")]
    Splits { input: String, why: String },
    #[error("no documents found in {inputs}")]
    Empty { inputs: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("stopped: {0}")]
    Stopped(String),
}

/// How a corpus's files are read.
#[derive(Debug, Clone)]
pub struct CorpusOptions {
    /// The JSON field, or Parquet/Arrow column, that holds the text.
    pub text_field: String,
    /// Text read per tokenization batch.
    pub batch_bytes: usize,
    /// The split to read from folders of several (train, validation,
    /// test, or any a `DatasetDict` or the Hub's shard names name); a
    /// folder of one split reads it without this.
    pub split: Option<String>,
}

impl Default for CorpusOptions {
    fn default() -> CorpusOptions {
        CorpusOptions {
            text_field: "text".into(),
            batch_bytes: BATCH_BYTES,
            split: None,
        }
    }
}

/// Where a corpus is: a local file or folder, or a folder on object
/// storage (`s3://bucket/prefix`, `file:///…`).
#[derive(Debug, Clone)]
pub enum Input {
    Path(PathBuf),
    Store(Location),
}

impl Input {
    /// `input` as a URL when it has a scheme, a path otherwise.
    pub fn parse(input: &str, options: &StoreOptions) -> Result<Input, StoreError> {
        if input.contains("://") {
            Location::open(input, false, options).map(Input::Store)
        } else {
            Ok(Input::Path(PathBuf::from(input)))
        }
    }

    fn name(&self) -> String {
        match self {
            Input::Path(p) => p.display().to_string(),
            Input::Store(l) => l.url().to_string(),
        }
    }
}

/// Where one file is.
#[derive(Debug, Clone)]
enum Place {
    Local(PathBuf),
    Remote { at: Location, key: String },
}

#[derive(Debug, Clone)]
struct Source {
    place: Place,
    /// The path or URL, for messages.
    name: String,
    kind: FileKind,
    bytes: u64,
}

/// An open file's documents; a remote file is read from a local spool
/// that lives as long as they do.
struct Opened {
    docs: Box<dyn Iterator<Item = Result<Doc, FormatError>> + Send>,
    _spool: Option<tempfile::TempPath>,
}

impl Iterator for Opened {
    type Item = Result<Doc, FormatError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.docs.next()
    }
}

impl Source {
    async fn open(&self, text_field: &str) -> Result<Opened, CorpusError> {
        match &self.place {
            Place::Local(path) => Ok(Opened {
                docs: formats::documents(path, &self.name, self.kind, text_field)?,
                _spool: None,
            }),
            Place::Remote { at, key } => {
                let spool = tempfile::NamedTempFile::new()
                    .map_err(io(Path::new("a temporary file")))?
                    .into_temp_path();
                at.download(key, &spool).await?;
                Ok(Opened {
                    docs: formats::documents(&spool, &self.name, self.kind, text_field)?,
                    _spool: Some(spool),
                })
            }
        }
    }
}

/// The error for the file or object named `name` that cannot be read as
/// strata reads it.
fn unreadable(name: &str) -> impl FnOnce(String) -> CorpusError + '_ {
    move |why| CorpusError::Unreadable {
        path: PathBuf::from(name),
        why,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CorpusError + '_ {
    move |source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether a path inside a folder is read as part of a corpus: nothing
/// hidden on the way, and not a `datasets` metadata file.
fn readable_path(rel: &str) -> bool {
    rel.split('/').all(|c| !c.starts_with('.'))
        && !DATASETS_METADATA.contains(&rel.rsplit('/').next().unwrap_or(rel))
}

/// A folder input: a local directory or a prefix on object storage.
#[derive(Clone, Copy)]
enum Folder<'a> {
    Local(&'a Path),
    Remote(&'a Location),
}

impl Folder<'_> {
    /// Every file under the folder, relative (`/` between components),
    /// sorted component by component (a folder's files before the next
    /// name's), whatever order the listing came in.
    async fn list(self) -> Result<Vec<String>, CorpusError> {
        let mut paths = match self {
            Folder::Local(root) => {
                let mut out = Vec::new();
                let mut dirs = vec![root.to_path_buf()];
                while let Some(dir) = dirs.pop() {
                    for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
                        let path = entry.map_err(io(&dir))?.path();
                        if path
                            .file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                        {
                            continue;
                        }
                        if std::fs::metadata(&path).map_err(io(&path))?.is_dir() {
                            dirs.push(path);
                        } else if let Ok(rel) = path.strip_prefix(root) {
                            let parts: Vec<_> = rel
                                .components()
                                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                                .collect();
                            out.push(parts.join("/"));
                        }
                    }
                }
                out
            }
            Folder::Remote(at) => at.list().await?,
        };
        paths.sort_by(|a, b| a.split('/').cmp(b.split('/')));
        Ok(paths)
    }

    fn name_of(self, rel: &str) -> String {
        match self {
            Folder::Local(root) => root.join(rel).display().to_string(),
            Folder::Remote(at) => at.url_of(rel),
        }
    }

    async fn read(self, rel: &str) -> Result<String, CorpusError> {
        match self {
            Folder::Local(root) => {
                let path = root.join(rel);
                std::fs::read_to_string(&path).map_err(io(&path))
            }
            Folder::Remote(at) => Ok(String::from_utf8_lossy(&at.get(rel).await?).into_owned()),
        }
    }

    /// The file at `rel`, its kind checked against its first bytes.
    async fn source(self, rel: &str) -> Result<Source, CorpusError> {
        match self {
            Folder::Local(root) => {
                let path = root.join(rel);
                let len = std::fs::metadata(&path).map_err(io(&path))?.len();
                local_source(&path, len)
            }
            Folder::Remote(at) => {
                let (bytes, head) = at.head_bytes(rel, formats::HEAD_BYTES as u64).await?;
                let name = at.url_of(rel);
                let kind = formats::kind_of(Path::new(rel), &head).map_err(unreadable(&name))?;
                Ok(Source {
                    place: Place::Remote {
                        at: at.clone(),
                        key: rel.to_string(),
                    },
                    name,
                    kind,
                    bytes,
                })
            }
        }
    }

    /// The files of the folder to read, in reading order, and those left
    /// out as no split's (see [`crate::splits`]).
    ///
    /// A folder holding a `state.json` (a saved `datasets` Dataset) reads
    /// the files it lists, in that order; a saved `DatasetDict`
    /// (`dataset_dict.json`) names its splits; other folders' splits
    /// follow the Hub's file naming. A folder of one split reads it; one
    /// of several reads the split `split` names and is refused without
    /// it, so held-out files are never trained on by accident.
    async fn sources(self, split: Option<&str>) -> Result<(Vec<Source>, Vec<String>), CorpusError> {
        let all = self.list().await?;
        let mut saved: Vec<(String, SavedDataset)> = Vec::new();
        for rel in all
            .iter()
            .filter(|p| *p == "state.json" || p.ends_with("/state.json"))
        {
            let name = self.name_of(rel);
            let text = self.read(rel).await?;
            if let Some(s) = formats::saved_dataset(&text, &name).map_err(unreadable(&name))? {
                let dir = rel.strip_suffix("state.json").unwrap_or_default();
                saved.push((dir.to_string(), s));
            }
        }
        let paths =
            arrange(&all, &saved).map_err(|(rel, why)| unreadable(&self.name_of(&rel))(why))?;
        let splits = if all.iter().any(|p| p == "dataset_dict.json") {
            let name = self.name_of("dataset_dict.json");
            let text = self.read("dataset_dict.json").await?;
            splits::of_dict(&paths, &text, &name).map_err(unreadable(&name))?
        } else if let Some((_, s)) = saved.iter().find(|(dir, _)| dir.is_empty()) {
            let name = s.split.clone().unwrap_or_else(|| "train".into());
            Splits {
                splits: vec![(name, (0..paths.len()).collect())],
                unclaimed: Vec::new(),
            }
        } else {
            splits::infer(&paths)
        };
        let folder = self.name_of("");
        let folder = folder.trim_end_matches('/');
        let chosen = match (split, splits.splits.as_slice()) {
            (_, []) => &[][..],
            (None, [(_, files)]) => files.as_slice(),
            (None, _) => {
                return Err(CorpusError::Splits {
                    input: folder.to_string(),
                    why: format!(
                        "it holds the splits {} (as Hugging Face datasets names them); \
                         choose one with --split",
                        splits.describe()
                    ),
                });
            }
            (Some(want), _) => match splits.files_of(want) {
                Some(files) if !files.is_empty() => files,
                _ => {
                    return Err(CorpusError::Splits {
                        input: folder.to_string(),
                        why: format!(
                            "no files of the split `{want}`; it holds {}",
                            splits.describe()
                        ),
                    });
                }
            },
        };
        let mut sources = Vec::with_capacity(chosen.len());
        for &i in chosen {
            sources.push(self.source(&paths[i]).await?);
        }
        let unclaimed = splits
            .unclaimed
            .iter()
            .map(|&i| self.name_of(&paths[i]))
            .collect();
        Ok((sources, unclaimed))
    }
}

/// `all` (sorted) as read: where a folder holds a saved dataset, its
/// listed files in their order in place of whatever is under it; no
/// metadata or hidden files. A listed file that is missing is an error
/// (the `state.json`, why).
fn arrange(
    all: &[String],
    saved: &[(String, SavedDataset)],
) -> Result<Vec<String>, (String, String)> {
    let mut out = Vec::new();
    let mut done = vec![false; saved.len()];
    for rel in all {
        // The innermost saved dataset that holds this path.
        let holder = saved
            .iter()
            .enumerate()
            .filter(|(_, (dir, _))| rel.starts_with(dir.as_str()))
            .max_by_key(|(_, (dir, _))| dir.len());
        match holder {
            Some((i, (dir, s))) => {
                if std::mem::replace(&mut done[i], true) {
                    continue;
                }
                for f in &s.files {
                    let path = format!("{dir}{f}");
                    if all
                        .binary_search_by(|p| p.split('/').cmp(path.split('/')))
                        .is_err()
                    {
                        return Err((
                            format!("{dir}state.json"),
                            format!("lists the data file {f}, which is not there"),
                        ));
                    }
                    out.push(path);
                }
            }
            None if readable_path(rel) => out.push(rel.clone()),
            None => {}
        }
    }
    Ok(out)
}

fn local_source(path: &Path, bytes: u64) -> Result<Source, CorpusError> {
    let mut head = Vec::with_capacity(formats::HEAD_BYTES);
    let file = std::fs::File::open(path).map_err(io(path))?;
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, formats::HEAD_BYTES as u64),
        &mut head,
    )
    .map_err(io(path))?;
    let kind = formats::kind_of(path, &head).map_err(|why| CorpusError::Unreadable {
        path: path.to_path_buf(),
        why,
    })?;
    Ok(Source {
        place: Place::Local(path.to_path_buf()),
        name: path.display().to_string(),
        kind,
        bytes,
    })
}

/// A document's id: XXH3-64 of its text (a specified hash, the same on
/// every platform and release). A document that is skipped (not UTF-8,
/// empty) takes the id of the empty text.
pub fn doc_id(text: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text)
}

/// One file of a corpus as a plan names it: its path or URL and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CorpusFile {
    pub name: String,
    pub bytes: u64,
}

/// A corpus's files, found and checked.
#[derive(Debug, Clone)]
pub struct Corpus {
    sources: Vec<Source>,
    options: CorpusOptions,
    /// Files left out of folders: in no split, or plain text beside data
    /// files (a README).
    pub ignored: Vec<String>,
}

impl Corpus {
    /// Finds the files under `inputs` (local files or folders) and checks
    /// them as [`Corpus::open_inputs`] does.
    pub async fn open(inputs: &[PathBuf], options: CorpusOptions) -> Result<Corpus, CorpusError> {
        let inputs: Vec<Input> = inputs.iter().cloned().map(Input::Path).collect();
        Corpus::open_inputs(&inputs, options).await
    }

    /// [`Corpus::open_inputs`] for inputs as the user wrote them: paths,
    /// or URLs on object storage reached with `store`.
    pub async fn open_named(
        inputs: &[String],
        store: &StoreOptions,
        options: CorpusOptions,
    ) -> Result<Corpus, CorpusError> {
        let inputs = inputs
            .iter()
            .map(|i| Input::parse(i, store))
            .collect::<Result<Vec<_>, _>>()?;
        Corpus::open_inputs(&inputs, options).await
    }

    /// Finds the files under `inputs` and checks that each is of a kind
    /// strata reads and that each input yields a document.
    pub async fn open_inputs(
        inputs: &[Input],
        options: CorpusOptions,
    ) -> Result<Corpus, CorpusError> {
        let mut sources = Vec::new();
        let mut ignored = Vec::new();
        for input in inputs {
            let split = options.split.as_deref();
            let (mut found, unclaimed, folder) = match input {
                Input::Path(p) => {
                    let meta = std::fs::metadata(p).map_err(io(p))?;
                    if meta.is_dir() {
                        let (found, unclaimed) = Folder::Local(p).sources(split).await?;
                        (found, unclaimed, true)
                    } else {
                        (vec![local_source(p, meta.len())?], Vec::new(), false)
                    }
                }
                Input::Store(at) => {
                    let (found, unclaimed) = Folder::Remote(at).sources(split).await?;
                    (found, unclaimed, true)
                }
            };
            for f in &unclaimed {
                tracing::warn!(file = %f, "in no split of its folder: left out");
            }
            ignored.extend(unclaimed);
            // A folder of Parquet or Arrow files reads those only, not
            // plain text beside them; one of any data files (JSON lines
            // too) not the README that `datasets` never reads either.
            if folder {
                let tabular = found
                    .iter()
                    .any(|s| matches!(s.kind.format, Format::Parquet | Format::Arrow));
                let data = found.iter().any(|s| s.kind.format != Format::Text);
                let (kept, left): (Vec<Source>, Vec<Source>) = found.into_iter().partition(|s| {
                    s.kind.format != Format::Text
                        || !(tabular || data && s.name.rsplit('/').next() == Some("README.md"))
                });
                for t in &left {
                    tracing::warn!(file = %t.name, "not a data file beside data files: left out");
                }
                ignored.extend(left.into_iter().map(|s| s.name));
                found = kept;
            }
            let mut any = false;
            'files: for src in &found {
                for doc in src.open(&options.text_field).await? {
                    if let Doc::Text(_) = doc? {
                        any = true;
                        break 'files;
                    }
                }
            }
            if !any {
                return Err(CorpusError::Empty {
                    inputs: format!(
                        "{} ({} file{} read{})",
                        input.name(),
                        found.len(),
                        if found.len() == 1 { "" } else { "s" },
                        if found.is_empty() {
                            String::new()
                        } else {
                            format!("; no document had a `{}`", options.text_field)
                        }
                    ),
                });
            }
            sources.extend(found);
        }
        if sources.is_empty() {
            return Err(CorpusError::Empty {
                inputs: "no inputs".into(),
            });
        }
        Ok(Corpus {
            sources,
            options,
            ignored,
        })
    }

    /// Bytes of the files to read.
    pub fn bytes(&self) -> u64 {
        self.sources.iter().map(|s| s.bytes).sum()
    }

    /// The files, in reading order.
    pub fn files(&self) -> Vec<CorpusFile> {
        self.sources
            .iter()
            .map(|s| CorpusFile {
                name: s.name.clone(),
                bytes: s.bytes,
            })
            .collect()
    }

    /// CRC-32 of the files' names and sizes in reading order: what a plan
    /// of parts was made for.
    pub fn fingerprint(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        for s in &self.sources {
            h.update(s.name.as_bytes());
            h.update(&[0]);
            h.update(&s.bytes.to_le_bytes());
        }
        h.finalize()
    }

    /// The `count` files from file `first` on.
    pub fn part(&self, first: usize, count: usize) -> Corpus {
        let end = (first + count).min(self.sources.len());
        let first = first.min(end);
        Corpus {
            sources: self.sources[first..end].to_vec(),
            options: self.options.clone(),
            ignored: Vec::new(),
        }
    }

    /// How many documents the corpus offers, the unreadable ones included,
    /// as [`Corpus::decompose`] numbers them.
    pub async fn count_documents(&self) -> Result<u64, CorpusError> {
        let mut n = 0u64;
        for src in &self.sources {
            for doc in src.open(&self.options.text_field).await? {
                doc?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Tokenizes every document and writes the dataset through `writer`.
    pub async fn decompose(
        &self,
        tokenizer: Tokenizer,
        mut writer: DatasetWriter,
        progress: &dyn Progress,
    ) -> Result<DecomposeSummary, CorpusError> {
        let start = Instant::now();
        let input_bytes = self.bytes();
        progress.total_bytes(input_bytes);
        let mut skipped = Vec::new();
        let mut tokenize = Duration::ZERO;
        let field = &self.options.text_field;
        let mut files = self.sources.iter();
        let mut current: Option<(u64, Opened)> = None;
        loop {
            // One batch of documents, about batch_bytes of text.
            let mut docs = Vec::new();
            let (mut text_bytes, mut file_bytes) = (0usize, 0u64);
            while text_bytes < self.options.batch_bytes {
                if current.is_none() {
                    let Some(src) = files.next() else { break };
                    current = Some((src.bytes, src.open(field).await?));
                }
                let (bytes, docs_of) = current.as_mut().expect("a file is open");
                match docs_of.next() {
                    None => {
                        file_bytes += *bytes;
                        current = None;
                    }
                    Some(doc) => {
                        let doc = doc?;
                        text_bytes += match &doc {
                            Doc::Text(t) => t.len(),
                            Doc::Skipped(why) => why.len(),
                        };
                        docs.push(doc);
                    }
                }
            }
            if docs.is_empty() && current.is_none() {
                progress.advance(file_bytes, 0);
                break;
            }
            let t0 = Instant::now();
            let tokenized: Vec<(u64, Option<Vec<u32>>)> = docs
                .par_iter()
                .map(|d| match d {
                    Doc::Text(t) => (doc_id(t.as_bytes()), Some(tokenizer.encode_document(t))),
                    Doc::Skipped(_) => (doc_id(b""), None),
                })
                .collect();
            tokenize += t0.elapsed();
            let mut batch_tokens = 0u64;
            for (doc, (id, tokens)) in docs.iter().zip(tokenized) {
                match (doc, tokens) {
                    (_, Some(tokens)) => {
                        batch_tokens += tokens.len() as u64;
                        writer.add_document_as(id, &tokens).await?;
                    }
                    (Doc::Skipped(why), None) => {
                        tracing::warn!(document = %why, "skipped document");
                        if skipped.len() < MAX_LISTED_SKIPS {
                            skipped.push(why.clone());
                        }
                        writer.skip_document_as(id);
                    }
                    (Doc::Text(_), None) => unreachable!("text is always tokenized"),
                }
            }
            progress.advance(file_bytes, batch_tokens);
            progress.batch_written()?;
        }
        let manifest = writer.finish().await?;
        let elapsed = start.elapsed().as_secs_f64();
        Ok(DecomposeSummary {
            tokens_per_s: manifest.n_tokens_in as f64 / elapsed.max(1e-9),
            manifest,
            input_bytes,
            skipped,
            ignored: self.ignored.clone(),
            elapsed_s: elapsed,
            tokenize_s: tokenize.as_secs_f64(),
        })
    }
}

/// What `strata decompose` did.
#[derive(Debug, Clone, Serialize)]
pub struct DecomposeSummary {
    pub manifest: Manifest,
    pub input_bytes: u64,
    /// Documents skipped, with why (the first few).
    pub skipped: Vec<String>,
    /// Files left out of folders: in no split, or plain text beside data
    /// files (a README).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignored: Vec<String>,
    pub elapsed_s: f64,
    /// Wall time spent tokenizing (all threads busy).
    pub tokenize_s: f64,
    pub tokens_per_s: f64,
}

/// Progress of a running decompose, for a progress bar.
pub trait Progress: Sync {
    fn total_bytes(&self, _bytes: u64) {}
    fn advance(&self, _bytes: u64, _tokens: u64) {}
    /// A batch of documents is written: a worker's pulse, and where it
    /// may be told to stop (an error here ends the decompose, leaving no
    /// manifest).
    fn batch_written(&self) -> Result<(), CorpusError> {
        Ok(())
    }
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {}

/// Tokenizes every document under `inputs` (read with the default
/// options) and writes the dataset through `writer`.
pub async fn decompose_corpus(
    inputs: &[PathBuf],
    tokenizer: Tokenizer,
    writer: DatasetWriter,
    progress: &dyn Progress,
) -> Result<DecomposeSummary, CorpusError> {
    Corpus::open(inputs, CorpusOptions::default())
        .await?
        .decompose(tokenizer, writer, progress)
        .await
}
