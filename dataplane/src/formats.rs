//! Documents out of the files corpora ship as.
//!
//! A file's kind is its name (`.jsonl`, `.json`, `.ndjson`: JSON lines;
//! `.parquet`; `.arrow`: Arrow IPC, as Hugging Face `datasets` saves;
//! anything else: plain text, the whole file one document), under an
//! optional compression (`.gz`, `.zst`), checked against the file's first
//! bytes: a file whose bytes say it is an archive or a compression strata
//! cannot read (zip, tar, bzip2, xz, 7z), or whose name and bytes disagree
//! (a `.gz` that is not gzip, a `.parquet` that is not Parquet), is refused
//! by name before anything is written.
//!
//! Every kind is read as a stream: JSON lines line by line through the
//! decompressor, Parquet by record batches of the text column alone, Arrow
//! IPC batch by batch. What a reader holds is one batch (or, for a plain
//! text file, its one document), whatever the file's size.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use arrow_array::{Array, LargeStringArray, RecordBatch, StringArray, StringViewArray};
use arrow_schema::{DataType, Schema};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Rows per record batch read from Parquet.
const PARQUET_BATCH_ROWS: usize = 1024;

/// How a file's documents are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The whole file is one document.
    Text,
    /// One JSON object per line; a string field holds the document.
    Jsonl,
    /// A column of strings, one document per row.
    Parquet,
    /// Arrow IPC (stream or file), a column of strings.
    Arrow,
}

/// A compression around the file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// What a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKind {
    pub format: Format,
    pub compression: Compression,
}

/// Bytes [`kind_of`] reads from a file's start.
pub const HEAD_BYTES: usize = 512;

/// Kinds of file a corpus may hold that strata does not read, by their
/// first bytes.
const UNREADABLE: &[(&[u8], &str)] = &[
    (b"PK\x03\x04", "a zip archive"),
    (b"BZh", "bzip2-compressed"),
    (&[0xFD, b'7', b'z', b'X', b'Z', 0x00], "xz-compressed"),
    (&[b'7', b'z', 0xBC, 0xAF, 0x27, 0x1C], "a 7z archive"),
    (&[0x04, 0x22, 0x4D, 0x18], "lz4-compressed"),
];

const GZIP: &[u8] = &[0x1F, 0x8B];
const ZSTD: &[u8] = &[0x28, 0xB5, 0x2F, 0xFD];

/// The kind of the file named `name` whose first bytes are `head`, or why
/// strata cannot read it.
pub fn kind_of(name: &Path, head: &[u8]) -> Result<FileKind, String> {
    let file = name
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if let Some((_, what)) = UNREADABLE.iter().find(|(magic, _)| head.starts_with(magic)) {
        return Err(format!(
            "{what}, which strata does not read (it reads text, JSON lines, Parquet and Arrow, \
             plain, .gz or .zst)"
        ));
    }
    if head.len() > 262 && &head[257..262] == b"ustar" {
        return Err("a tar archive, which strata does not read; unpack it first".into());
    }
    let (stem, named) = match file.rsplit_once('.') {
        Some((stem, "gz")) => (stem, Compression::Gzip),
        Some((stem, "zst" | "zstd")) => (stem, Compression::Zstd),
        _ => (file.as_str(), Compression::None),
    };
    let compression = if head.starts_with(GZIP) {
        Compression::Gzip
    } else if head.starts_with(ZSTD) {
        Compression::Zstd
    } else {
        Compression::None
    };
    if named != Compression::None && named != compression {
        return Err(format!(
            "named as {} but its bytes are not",
            match named {
                Compression::Gzip => "gzip (.gz)",
                _ => "zstd (.zst)",
            }
        ));
    }
    let format = match stem.rsplit_once('.').map(|(_, ext)| ext) {
        Some("jsonl" | "ndjson" | "json") => Format::Jsonl,
        Some("parquet") => Format::Parquet,
        Some("arrow") => Format::Arrow,
        _ => Format::Text,
    };
    if compression != Compression::None && matches!(format, Format::Parquet | Format::Arrow) {
        return Err("a compressed Parquet or Arrow file; strata reads them uncompressed".into());
    }
    match format {
        Format::Parquet if !head.starts_with(b"PAR1") => {
            return Err("named .parquet but its bytes are not Parquet".into());
        }
        Format::Arrow if !(head.starts_with(b"ARROW1") || head.starts_with(&[0xFF; 4])) => {
            return Err("named .arrow but its bytes are not Arrow IPC".into());
        }
        _ => {}
    }
    if compression == Compression::None && format == Format::Text {
        if head.starts_with(b"PAR1") {
            return Err("Parquet without a .parquet name; rename it".into());
        }
        if head.starts_with(b"ARROW1") {
            return Err("Arrow IPC without an .arrow name; rename it".into());
        }
    }
    Ok(FileKind {
        format,
        compression,
    })
}

/// A document as read: its text, or why it was skipped (the file, and the
/// line or row, in the reason).
#[derive(Debug)]
pub enum Doc {
    Text(String),
    Skipped(String),
}

/// Why a file could not be read on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

type Docs = Box<dyn Iterator<Item = Result<Doc, FormatError>> + Send>;
type Batches = Box<dyn Iterator<Item = Result<RecordBatch, String>> + Send>;

/// The documents of the file at `path` (shown as `name`) of kind `kind`,
/// the text in field or column `text_field`.
pub fn documents(
    path: &Path,
    name: &str,
    kind: FileKind,
    text_field: &str,
) -> Result<Docs, FormatError> {
    let err = |e: &dyn std::fmt::Display| FormatError(format!("{name}: {e}"));
    let file = File::open(path).map_err(|e| err(&e))?;
    let name = name.to_string();
    match kind.format {
        Format::Text => {
            let mut bytes = Vec::new();
            decompressed(file, kind.compression)
                .map_err(|e| err(&e))?
                .read_to_end(&mut bytes)
                .map_err(|e| err(&e))?;
            let doc = match String::from_utf8(bytes) {
                Err(e) => Doc::Skipped(format!(
                    "{name}: not UTF-8 (byte {})",
                    e.utf8_error().valid_up_to()
                )),
                Ok(t) if t.trim().is_empty() => Doc::Skipped(format!("{name}: empty")),
                Ok(t) => Doc::Text(t),
            };
            Ok(Box::new(std::iter::once(Ok(doc))))
        }
        Format::Jsonl => {
            let reader = decompressed(file, kind.compression).map_err(|e| err(&e))?;
            Ok(Box::new(JsonLines {
                reader: BufReader::with_capacity(1 << 20, reader),
                name,
                field: text_field.to_string(),
                line_no: 0,
                line: Vec::new(),
            }))
        }
        Format::Parquet => {
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(&e))?;
            let column = text_column(builder.schema(), text_field).map_err(|e| err(&e))?;
            let mask = ProjectionMask::roots(builder.parquet_schema(), [column]);
            let reader = builder
                .with_projection(mask)
                .with_batch_size(PARQUET_BATCH_ROWS)
                .build()
                .map_err(|e| err(&e))?;
            Ok(Box::new(Rows::new(
                name,
                reader.map(|b| b.map_err(|e| e.to_string())),
            )))
        }
        Format::Arrow => arrow_documents(file, name, text_field),
    }
}

fn decompressed(file: File, compression: Compression) -> std::io::Result<Box<dyn Read + Send>> {
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file)?),
    })
}

/// The index of the string column `field` in `schema`, or what the file
/// has instead.
fn text_column(schema: &Schema, field: &str) -> Result<usize, String> {
    let Ok(i) = schema.index_of(field) else {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(format!(
            "no column `{field}` (it has {}); pick one with --text-field",
            names.join(", ")
        ));
    };
    match schema.field(i).data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(i),
        other => Err(format!("column `{field}` holds {other}, not strings")),
    }
}

fn arrow_documents(mut file: File, name: String, field: &str) -> Result<Docs, FormatError> {
    let err = |e: &dyn std::fmt::Display| FormatError(format!("{name}: {e}"));
    let mut magic = [0u8; 6];
    let n = file.read(&mut magic).map_err(|e| err(&e))?;
    file.rewind().map_err(|e| err(&e))?;
    /// The text column of every batch `reader` yields.
    fn column_of<R>(reader: R, schema: &Schema, field: &str) -> Result<Batches, String>
    where
        R: Iterator<Item = Result<RecordBatch, arrow_schema::ArrowError>> + Send + 'static,
    {
        let column = text_column(schema, field)?;
        Ok(Box::new(reader.map(move |b| {
            b.map(|b| b.project(&[column]).expect("the column exists"))
                .map_err(|e| e.to_string())
        })))
    }
    let batches = if n == 6 && &magic == b"ARROW1" {
        let reader = arrow_ipc::reader::FileReader::try_new(BufReader::new(file), None)
            .map_err(|e| err(&e))?;
        let schema = reader.schema();
        column_of(reader, &schema, field)
    } else {
        let reader = arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None)
            .map_err(|e| err(&e))?;
        let schema = reader.schema();
        column_of(reader, &schema, field)
    }
    .map_err(|e| err(&e))?;
    Ok(Box::new(Rows::new(name, batches)))
}

/// JSON lines: one document per non-blank line.
struct JsonLines<R> {
    reader: BufReader<R>,
    name: String,
    field: String,
    line_no: u64,
    line: Vec<u8>,
}

impl<R: Read> Iterator for JsonLines<R> {
    type Item = Result<Doc, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.line.clear();
            match self.reader.read_until(b'\n', &mut self.line) {
                Err(e) => {
                    return Some(Err(FormatError(format!(
                        "{}: after line {}: {e}",
                        self.name, self.line_no
                    ))));
                }
                Ok(0) => return None,
                Ok(_) => {}
            }
            self.line_no += 1;
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Ok(self.parse()));
        }
    }
}

impl<R> JsonLines<R> {
    fn parse(&self) -> Doc {
        let (name, n, field) = (&self.name, self.line_no, &self.field);
        let Ok(line) = std::str::from_utf8(&self.line) else {
            return Doc::Skipped(format!("{name}:{n}: not UTF-8"));
        };
        match serde_json::from_str::<serde_json::Value>(line) {
            Err(e) => Doc::Skipped(format!("{name}:{n}: not JSON ({e})")),
            Ok(v) => match v.get(field).and_then(|t| t.as_str()) {
                None => Doc::Skipped(format!("{name}:{n}: no string `{field}` field")),
                Some(t) if t.trim().is_empty() => Doc::Skipped(format!("{name}:{n}: empty")),
                Some(t) => Doc::Text(t.to_string()),
            },
        }
    }
}

/// The rows of a one-column stream of record batches, one document each.
struct Rows<I> {
    name: String,
    batches: I,
    batch: Option<Arc<dyn Array>>,
    at: usize,
    row: u64,
}

impl<I> Rows<I> {
    fn new(name: String, batches: I) -> Rows<I> {
        Rows {
            name,
            batches,
            batch: None,
            at: 0,
            row: 0,
        }
    }
}

impl<I: Iterator<Item = Result<RecordBatch, String>>> Iterator for Rows<I> {
    type Item = Result<Doc, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(col) = &self.batch
                && self.at < col.len()
            {
                let (i, row) = (self.at, self.row);
                self.at += 1;
                self.row += 1;
                let text = if col.is_null(i) {
                    None
                } else if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
                    Some(a.value(i))
                } else if let Some(a) = col.as_any().downcast_ref::<LargeStringArray>() {
                    Some(a.value(i))
                } else {
                    let a = col.as_any().downcast_ref::<StringViewArray>();
                    Some(a.expect("a string column").value(i))
                };
                let name = &self.name;
                return Some(Ok(match text {
                    None => Doc::Skipped(format!("{name}: row {row}: null")),
                    Some(t) if t.trim().is_empty() => {
                        Doc::Skipped(format!("{name}: row {row}: empty"))
                    }
                    Some(t) => Doc::Text(t.to_string()),
                }));
            }
            match self.batches.next()? {
                Err(e) => {
                    return Some(Err(FormatError(format!(
                        "{}: after row {}: {e}",
                        self.name, self.row
                    ))));
                }
                Ok(b) => {
                    self.batch = Some(b.column(0).clone());
                    self.at = 0;
                }
            }
        }
    }
}

/// A Hugging Face `datasets` folder saved with `save_to_disk`, as its
/// `state.json` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedDataset {
    /// Its data files (`_data_files`), in their order.
    pub files: Vec<String>,
    /// The split it was saved from (`_split`), when it says.
    pub split: Option<String>,
}

/// The saved dataset that a `state.json` (`text`, read from `name`)
/// describes, or `None` when it names no data files.
pub fn saved_dataset(text: &str, name: &str) -> Result<Option<SavedDataset>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("{name}: {e}"))?;
    let Some(files) = v.get("_data_files").and_then(|f| f.as_array()) else {
        return Ok(None);
    };
    let files = files
        .iter()
        .map(|f| {
            f.get("filename")
                .and_then(|n| n.as_str())
                .filter(|n| !n.contains('/') && !n.contains(".."))
                .map(str::to_string)
                .ok_or_else(|| format!("{name}: a _data_files entry without a plain filename"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let split = v.get("_split").and_then(|s| s.as_str()).map(str::to_string);
    Ok(Some(SavedDataset { files, split }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(name: &str, head: &[u8]) -> Result<FileKind, String> {
        kind_of(Path::new(name), head)
    }

    #[test]
    fn kinds_come_from_names_checked_against_bytes() {
        let k = |format, compression| {
            Ok(FileKind {
                format,
                compression,
            })
        };
        assert_eq!(kind("a.txt", b"hello"), k(Format::Text, Compression::None));
        assert_eq!(kind("a", b"hello"), k(Format::Text, Compression::None));
        assert_eq!(kind("a.jsonl", b"{}"), k(Format::Jsonl, Compression::None));
        assert_eq!(
            kind("c4.json.gz", &[0x1F, 0x8B, 8]),
            k(Format::Jsonl, Compression::Gzip)
        );
        assert_eq!(
            kind("x.JSONL.ZST", &[0x28, 0xB5, 0x2F, 0xFD]),
            k(Format::Jsonl, Compression::Zstd)
        );
        assert_eq!(
            kind("b.txt.gz", &[0x1F, 0x8B]),
            k(Format::Text, Compression::Gzip)
        );
        assert_eq!(
            kind("d.parquet", b"PAR1...."),
            k(Format::Parquet, Compression::None)
        );
        assert_eq!(
            kind("data-00000-of-00001.arrow", &[0xFF; 8]),
            k(Format::Arrow, Compression::None)
        );
        for (name, head, why) in [
            ("a.jsonl.gz", &b"{\"text\":1}"[..], "named as gzip"),
            ("a.zip", b"PK\x03\x04rest", "zip archive"),
            ("a.jsonl.bz2", b"BZh91AY", "bzip2"),
            ("a.parquet", b"{\"text\"", "not Parquet"),
            ("a.bin", b"PAR1", "rename it"),
        ] {
            let e = kind(name, head).unwrap_err();
            assert!(e.contains(why), "{name}: {e}");
        }
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert!(kind("a.tar", &tar).unwrap_err().contains("tar archive"));
    }
}
