//! A real S3-compatible server (s3s-fs, backed by a temporary folder) on
//! 127.0.0.1, for tests that exercise object storage over HTTP.
//!
//! s3s-fs streams GET bodies in 4 KiB reads, each a trip through Tokio's
//! blocking pool; on two cores that caps it near 150 MiB/s and makes the
//! server, not the client under test, the bottleneck. [`LargeReads`] serves
//! the same bytes in 1 MiB reads and passes every other call to s3s-fs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result};
use strata_dataplane::store::StoreOptions;
use tokio::net::TcpListener;

pub const ACCESS_KEY: &str = "strata-test-access";
pub const SECRET_KEY: &str = "strata-test-secret";

/// The server runs until dropped.
pub struct S3Server {
    addr: SocketAddr,
    root: tempfile::TempDir,
    faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

/// The failures the server is asked to inject.
#[derive(Default)]
struct Faults {
    /// PUTs still to fail.
    puts: AtomicUsize,
    /// The share of every request that fails, in thousandths.
    per_mille: AtomicU32,
    /// Requests seen, and those failed on purpose.
    seen: AtomicU64,
    failed: AtomicU64,
}

impl Faults {
    /// Whether this request fails: `per_mille` of them do, spread evenly
    /// by a multiplicative hash of the request's number (reproducible,
    /// and no two neighbours alike).
    fn this_one(&self) -> S3Result<()> {
        let n = self.seen.fetch_add(1, Ordering::SeqCst);
        let rate = u64::from(self.per_mille.load(Ordering::SeqCst));
        if rate > 0 && (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 1000 < rate {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(s3s::s3_error!(ServiceUnavailable, "failing on request"));
        }
        Ok(())
    }
}

impl S3Server {
    /// Starts a server on an ephemeral port with `buckets` created. Must be
    /// called inside a Tokio runtime.
    pub async fn start(buckets: &[&str]) -> S3Server {
        let root = tempfile::tempdir().expect("temporary folder for the S3 server");
        for b in buckets {
            std::fs::create_dir_all(root.path().join(b)).expect("bucket folder");
        }
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over a folder");
        let faults = Arc::new(Faults::default());
        let mut builder = S3ServiceBuilder::new(LargeReads {
            inner: fs,
            root: root.path().to_path_buf(),
            faults: faults.clone(),
        });
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3Server {
            addr,
            root,
            faults,
            task,
        }
    }

    /// The next `n` PUTs fail with `503 Service Unavailable` (an
    /// overloaded or restarting store), as seen by the client.
    pub fn fail_next_puts(&self, n: usize) {
        self.faults.puts.store(n, Ordering::SeqCst);
    }

    /// From now on `per_mille` thousandths of all requests, of every kind,
    /// fail with `503 Service Unavailable` (0: none).
    pub fn fail_share(&self, per_mille: u32) {
        self.faults
            .per_mille
            .store(per_mille.min(1000), Ordering::SeqCst);
    }

    /// Requests served so far, and those failed on purpose.
    pub fn requests(&self) -> (u64, u64) {
        (
            self.faults.seen.load(Ordering::SeqCst),
            self.faults.failed.load(Ordering::SeqCst),
        )
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The folder behind the server: `<root>/<bucket>/<key>`.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The `AWS_*` environment a client process needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    /// Store options that reach this server, retrying for at most `retry`.
    pub fn store_options(&self, retry: Duration) -> StoreOptions {
        let mut o = StoreOptions {
            retry_timeout: retry,
            ..StoreOptions::default()
        };
        for (k, v) in self.env() {
            o = o.with_s3(&k.to_ascii_lowercase(), &v);
        }
        o
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// s3s-fs with GET bodies read 1 MiB at a time, and requests that fail
/// on request.
struct LargeReads {
    inner: s3s_fs::FileSystem,
    root: PathBuf,
    faults: Arc<Faults>,
}

const READ_CHUNK: usize = 1 << 20;

/// The impl, with `$name: $input => $output` calls passed to s3s-fs (written
/// out before `async_trait` rewrites the impl).
macro_rules! delegating_impl {
    ($($name:ident: $input:ident => $output:ident),* $(,)?; $($own:item)*) => {
        #[async_trait::async_trait]
        impl S3 for LargeReads {
            $(
                async fn $name(&self, req: S3Request<$input>) -> S3Result<S3Response<$output>> {
                    self.faults.this_one()?;
                    self.inner.$name(req).await
                }
            )*
            $($own)*
        }
    };
}

delegating_impl! {
        head_object: HeadObjectInput => HeadObjectOutput,
        delete_object: DeleteObjectInput => DeleteObjectOutput,
        delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
        copy_object: CopyObjectInput => CopyObjectOutput,
        list_objects: ListObjectsInput => ListObjectsOutput,
        list_objects_v2: ListObjectsV2Input => ListObjectsV2Output,
        list_buckets: ListBucketsInput => ListBucketsOutput,
        head_bucket: HeadBucketInput => HeadBucketOutput,
        create_bucket: CreateBucketInput => CreateBucketOutput,
        create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
        upload_part: UploadPartInput => UploadPartOutput,
        complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
        abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput;

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.faults.this_one()?;
        let failing = self
            .faults
            .puts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(s3s::s3_error!(ServiceUnavailable, "failing on request"));
        }
        self.inner.put_object(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        self.faults.this_one()?;
        let path = self.root.join(&req.input.bucket).join(&req.input.key);
        let range = req.input.range;
        // s3s-fs checks the request, finds the object and fills in the
        // headers; only its body is replaced.
        let mut resp = self.inner.get_object(req).await?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| s3s::s3_error!(e, NoSuchKey))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| s3s::s3_error!(e, InternalError))?
            .len();
        let span = match range {
            Some(r) => r
                .check(len)
                .map_err(|_| s3s::s3_error!(InvalidRange))?,
            None => 0..len,
        };
        file.seek(std::io::SeekFrom::Start(span.start))
            .await
            .map_err(|e| s3s::s3_error!(e, InternalError))?;
        let body = tokio_util::io::ReaderStream::with_capacity(
            file.take(span.end - span.start),
            READ_CHUNK,
        );
        resp.output.body = Some(StreamingBlob::wrap(body));
        Ok(resp)
    }
}
