//! Object storage: a dataset lives under a URL (`file:///…`, a local path, or
//! `s3://bucket/prefix`), and every object is named by its key relative to
//! that URL. Errors name the full URL of the object involved.

use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{url}: {why}")]
    BadUrl { url: String, why: String },
    #[error("{url}: not found")]
    NotFound { url: String },
    #[error("{url}: {source}")]
    Io {
        url: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A folder on object storage.
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    /// The folder of a local (or network-mounted) location.
    local: Option<PathBuf>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({})", self.url)
    }
}

/// How to reach object storage: S3 settings and retries. Passed in rather
/// than read from the process environment deep inside, so tests and
/// embedding programs can supply their own.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `aws_*` settings as object_store names them (`aws_endpoint_url`,
    /// `aws_allow_http`, `aws_access_key_id`, `aws_region`, …).
    pub s3: Vec<(String, String)>,
    /// Retries with exponential backoff (100 ms doubling, at most 5 s apart)
    /// until this much time has passed; then the error names the URL.
    pub retry_timeout: Duration,
    pub max_retries: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            s3: Vec::new(),
            retry_timeout: Duration::from_secs(30),
            max_retries: 6,
        }
    }
}

impl StoreOptions {
    /// The standard `AWS_*` variables of the process environment
    /// (`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, credentials, region, …).
    pub fn from_env() -> StoreOptions {
        StoreOptions {
            s3: std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            ..StoreOptions::default()
        }
    }

    /// Adds or replaces one S3 setting.
    pub fn with_s3(mut self, key: &str, value: &str) -> StoreOptions {
        self.s3.retain(|(k, _)| k != key);
        self.s3.push((key.to_string(), value.to_string()));
        self
    }

    fn retry(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        }
    }
}

fn install_tls_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one already; either
        // way a provider is in place afterwards.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Location {
    /// Opens `url` with S3 settings from the environment; see [`Location::open`].
    pub fn parse(url: &str, create: bool) -> Result<Location, StoreError> {
        Location::open(url, create, &StoreOptions::from_env())
    }

    /// Opens `url`. `create` makes a local folder if it is missing (for
    /// writing); reading a missing local folder is an error naming it.
    pub fn open(url: &str, create: bool, options: &StoreOptions) -> Result<Location, StoreError> {
        let bad = |why: &str| StoreError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let url = url.trim_end_matches('/');
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("names no bucket (s3://bucket/prefix)"));
            }
            install_tls_provider();
            let mut builder = AmazonS3Builder::new();
            for (key, value) in &options.s3 {
                // Unknown AWS_* variables (profiles, SDK settings) are not ours.
                if let Ok(key) = key.parse::<AmazonS3ConfigKey>() {
                    builder = builder.with_config(key, value);
                }
            }
            let store = builder
                .with_bucket_name(bucket)
                .with_retry(options.retry())
                .build()
                .map_err(|e| StoreError::Io {
                    url: url.to_string(),
                    source: Box::new(e),
                })?;
            return Ok(Location {
                store: Arc::new(store),
                prefix: ObjectPath::from(prefix),
                url: url.to_string(),
                local: None,
            });
        }
        let path = match url.split_once("://") {
            Some(("file", p)) if p.starts_with('/') => PathBuf::from(p),
            Some(("file", _)) => return Err(bad("a file URL needs an absolute path (file:///…)")),
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "unsupported scheme `{scheme}`; use file:///…, s3://bucket/prefix or a path"
                )));
            }
            None if url.is_empty() => return Err(bad("empty location")),
            None => PathBuf::from(url),
        };
        if create {
            std::fs::create_dir_all(&path).map_err(|e| StoreError::Io {
                url: url.to_string(),
                source: Box::new(e),
            })?;
        } else if !path.is_dir() {
            return Err(StoreError::NotFound {
                url: url.to_string(),
            });
        }
        let path = path.canonicalize().map_err(|e| StoreError::Io {
            url: url.to_string(),
            source: Box::new(e),
        })?;
        let store = LocalFileSystem::new_with_prefix(&path).map_err(|e| StoreError::Io {
            url: url.to_string(),
            source: Box::new(e),
        })?;
        Ok(Location {
            store: Arc::new(store.with_automatic_cleanup(true)),
            prefix: ObjectPath::from(""),
            url: url.to_string(),
            local: Some(path),
        })
    }

    /// The folder `folder` under this location, on the same store (a
    /// local one is made if missing).
    pub fn child(&self, folder: &str) -> Result<Location, StoreError> {
        let folder = folder.trim_matches('/');
        let url = self.url_of(folder);
        let io = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Io {
            url: url.clone(),
            source: e,
        };
        if let Some(root) = &self.local {
            let path = root.join(folder);
            std::fs::create_dir_all(&path).map_err(|e| io(Box::new(e)))?;
            let store = LocalFileSystem::new_with_prefix(&path).map_err(|e| io(Box::new(e)))?;
            return Ok(Location {
                store: Arc::new(store.with_automatic_cleanup(true)),
                prefix: ObjectPath::from(""),
                url,
                local: Some(path),
            });
        }
        Ok(Location {
            store: self.store.clone(),
            prefix: self.path(folder),
            url,
            local: None,
        })
    }

    /// The location's URL as the user wrote it (without a trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full URL of the object at `key`, for messages.
    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.url)
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.as_ref().is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn io(&self, key: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                url: self.url_of(key),
            },
            other => StoreError::Io {
                url: self.url_of(key),
                source: Box::new(other),
            },
        }
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let result = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| self.io(key, e))?;
        result.bytes().await.map_err(|e| self.io(key, e))
    }

    /// The size of the object at `key`, and its first `n` bytes (fewer
    /// when it is shorter).
    pub async fn head_bytes(&self, key: &str, n: u64) -> Result<(u64, Bytes), StoreError> {
        let path = self.path(key);
        let meta = self.store.head(&path).await.map_err(|e| self.io(key, e))?;
        let end = n.min(meta.size);
        let head = if end == 0 {
            Bytes::new()
        } else {
            self.store
                .get_range(&path, 0..end)
                .await
                .map_err(|e| self.io(key, e))?
        };
        Ok((meta.size, head))
    }

    /// The bytes of `ranges` of the object at `key`, in order: positioned
    /// reads of a local file; on S3, requests for nearby ranges merged
    /// (object_store coalesces gaps under 1 MiB).
    pub async fn get_ranges(
        &self,
        key: &str,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<Bytes>, StoreError> {
        self.store
            .get_ranges(&self.path(key), ranges)
            .await
            .map_err(|e| self.io(key, e))
    }

    /// Copies the object at `key` into the local file `to` as it arrives,
    /// never holding more of it than one chunk (written as it comes: for
    /// callers that read local files in place anyway).
    pub async fn download(&self, key: &str, to: &std::path::Path) -> Result<(), StoreError> {
        use std::io::Write;
        let local = |e: std::io::Error| StoreError::Io {
            url: format!("{} (to {})", self.url_of(key), to.display()),
            source: Box::new(e),
        };
        let result = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| self.io(key, e))?;
        let mut file = std::io::BufWriter::new(std::fs::File::create(to).map_err(local)?);
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.try_next().await.map_err(|e| self.io(key, e))? {
            file.write_all(&chunk).map_err(local)?;
        }
        file.flush().map_err(local)
    }

    /// Whether `key` exists (a failure other than "not found" is an error).
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.store.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.io(key, e)),
        }
    }

    /// Writes `key` whole: readers see the old object or the new one, never
    /// a part (a local file is written aside and renamed; S3 puts are atomic).
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.store
            .put(&self.path(key), PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(|e| self.io(key, e))
    }

    /// [`put`](Self::put), and on a file system (local or network) the
    /// file and every folder from its own up to the location's root
    /// flushed to the disk before this returns: after a crash the object is
    /// whole and named, not a rename the kernel had yet to write. (An S3
    /// put is durable once acknowledged.) For what a later write names as
    /// complete: checkpoint files before they are reported, a manifest
    /// before its commit is answered.
    pub async fn put_durable(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.put(key, data).await?;
        let Some(root) = self.local.clone() else {
            return Ok(());
        };
        let file = root.join(key);
        tokio::task::spawn_blocking(move || sync_path(&root, &file))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| StoreError::Io {
                url: self.url_of(key),
                source: Box::new(e),
            })
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.io(key, e)),
        }
    }

    /// Every key under this location, relative to it, sorted.
    pub async fn list(&self) -> Result<Vec<String>, StoreError> {
        self.list_in("").await
    }

    /// Every key under `folder` of this location (all of it when empty),
    /// relative to the location, sorted. Only that folder is listed.
    pub async fn list_in(&self, folder: &str) -> Result<Vec<String>, StoreError> {
        let path = if folder.is_empty() {
            self.prefix.clone()
        } else {
            self.path(folder.trim_end_matches('/'))
        };
        let prefix = (!path.as_ref().is_empty()).then_some(&path);
        let metas: Vec<_> = self
            .store
            .list(prefix)
            .try_collect()
            .await
            .map_err(|e| self.io(folder, e))?;
        let strip = if self.prefix.as_ref().is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut keys: Vec<String> = metas
            .into_iter()
            .map(|m| {
                let k = m.location.to_string();
                k.strip_prefix(&strip).unwrap_or(&k).to_string()
            })
            .collect();
        keys.sort();
        Ok(keys)
    }
}

/// fsync of `file`, then of each folder from its own up to `root`.
fn sync_path(root: &std::path::Path, file: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(file)?.sync_all()?;
    let mut dir = file.parent();
    while let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
        if d == root || !d.starts_with(root) {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod durable_tests {
    use super::*;

    #[tokio::test]
    async fn a_durable_put_lands_whole_under_new_folders() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::parse(dir.path().to_str().unwrap(), true).unwrap();
        loc.put_durable(
            "job/step-00000001/model/a1-pp00-tp00.safetensors",
            Bytes::from_static(b"abc"),
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read(
                dir.path()
                    .join("job/step-00000001/model/a1-pp00-tp00.safetensors")
            )
            .unwrap(),
            b"abc"
        );
        // Past the root nothing is touched; a file that vanished is an
        // error naming it.
        let e = sync_path(dir.path(), &dir.path().join("gone")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
