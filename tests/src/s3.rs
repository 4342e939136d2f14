//! A real S3-compatible server (s3s-fs, backed by a temporary folder) on
//! 127.0.0.1, for tests that exercise object storage over HTTP.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use strata_dataplane::store::StoreOptions;
use tokio::net::TcpListener;

pub const ACCESS_KEY: &str = "strata-test-access";
pub const SECRET_KEY: &str = "strata-test-secret";

/// The server runs until dropped.
pub struct S3Server {
    addr: SocketAddr,
    root: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
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
        let mut builder = S3ServiceBuilder::new(fs);
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
        S3Server { addr, root, task }
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
