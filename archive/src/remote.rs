//! Sealed segments on an S3-compatible object store (S3, MinIO, Ceph RGW, Garage), through the
//! `object_store` crate: upload confirmed by the store's own size and MD5 ETag, ranged reads of
//! single records, whole reads for compaction, deletes. One small tokio runtime of its own
//! serves the requests, so callers on any thread (plain, blocking or async) simply wait.
//!
//! Not here: which segments to upload, keep or delete, and when (the [`crate::store`]); record
//! checks (a fetched range is verified by the caller like a local read).

use crate::identity::Manifest;
use crate::ArchiveError;
use md5::{Digest, Md5};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The manifest's object name under the prefix.
pub const MANIFEST_OBJECT: &str = "archive.json";

/// Where the sealed segments go. The credentials are never printed (`Debug` hides them).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ObjectStoreConfig {
    /// `http(s)://host:port` of the S3 API, one per node of the store: a request goes to the
    /// one that answered last, and to the next when it does not answer.
    pub endpoints: Vec<String>,
    /// The bucket.
    pub bucket: String,
    /// Its region (`garage` for a default Garage, `us-east-1` for many others).
    pub region: String,
    /// Key prefix: two units may share a bucket with different prefixes.
    pub prefix: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

impl fmt::Debug for ObjectStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreConfig")
            .field("endpoints", &self.endpoints)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"(hidden)")
            .finish()
    }
}

/// What a probe of the store found.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// The store answered and the credentials work.
    Ok,
    /// The store refused the credentials or the bucket: a configuration error.
    Refused(String),
    /// The store did not answer (down, unreachable): not a configuration error.
    Unreachable(String),
}

/// A connection to the object store.
pub struct Remote {
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
    /// One client per endpoint (node) of the store.
    stores: Vec<Arc<dyn ObjectStore>>,
    /// The endpoint that answered last: requests go there first.
    current: std::sync::atomic::AtomicUsize,
    prefix: String,
}

/// Whether an error is the store's answer (the same on every node) rather than a node that
/// did not answer or failed (another node may serve the request).
fn is_answer(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotModified { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
    )
}

impl Drop for Remote {
    /// Without waiting: a runtime may not block while it is dropped from async code (the
    /// daemon's), and nothing in flight here matters once the archive closes.
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn remote_err(what: &str, e: object_store::Error) -> ArchiveError {
    ArchiveError::Remote(format!("{what}: {e}"))
}

impl Remote {
    /// Connects (lazily: nothing is sent until the first request).
    pub fn new(config: &ObjectStoreConfig) -> Result<Remote, ArchiveError> {
        if config.endpoints.is_empty() {
            return Err(ArchiveError::Remote(
                "object store configuration: no endpoint".into(),
            ));
        }
        let stores = config
            .endpoints
            .iter()
            .map(|endpoint| Remote::client(config, endpoint))
            .collect::<Result<Vec<_>, _>>()?;
        Remote::over_each(stores, &config.prefix)
    }

    /// The client of one endpoint.
    fn client(
        config: &ObjectStoreConfig,
        endpoint: &str,
    ) -> Result<Arc<dyn ObjectStore>, ArchiveError> {
        // The HTTP client's TLS takes the process's crypto provider: the same as the peer link's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Short retries here: the uploader retries on its own schedule, and a read should
        // fail in seconds, not minutes, when the store is down.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_region(&config.region)
            .with_bucket_name(&config.bucket)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(120)),
            )
            .with_retry(retry)
            .build()
            .map_err(|e| ArchiveError::Remote(format!("object store configuration: {e}")))?;
        Ok(Arc::new(store))
    }

    /// Over any `object_store` implementation (tests use its in-memory store).
    pub fn over(store: Arc<dyn ObjectStore>, prefix: &str) -> Result<Remote, ArchiveError> {
        Remote::over_each(vec![store], prefix)
    }

    /// Over several clients of one store (its nodes), tried in turn.
    pub fn over_each(
        stores: Vec<Arc<dyn ObjectStore>>,
        prefix: &str,
    ) -> Result<Remote, ArchiveError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("archive-remote")
            .enable_all()
            .build()
            .map_err(|e| ArchiveError::Io(format!("object store runtime: {e}")))?;
        Ok(Remote {
            runtime: Some(runtime),
            stores,
            current: std::sync::atomic::AtomicUsize::new(0),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// Runs a request on the endpoint that answered last; when that one does not answer (or
    /// fails on its own), on each other in turn. The first that answers is used from then on.
    fn call<T, Fut>(
        &self,
        op: impl Fn(Arc<dyn ObjectStore>) -> Fut,
    ) -> Result<Result<T, object_store::Error>, ArchiveError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, object_store::Error>> + Send + 'static,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.stores.len();
        let first = self.current.load(Relaxed) % n;
        for k in 0..n {
            let i = (first + k) % n;
            let got = self.wait(op(self.stores[i].clone()))?;
            match got {
                Err(e) if !is_answer(&e) && k + 1 < n => {
                    tracing::warn!(
                        endpoint = i,
                        "archive: object store endpoint failed, trying the next: {e}"
                    );
                }
                got => {
                    if k > 0 && got.as_ref().map_or_else(is_answer, |_| true) {
                        tracing::info!(endpoint = i, "archive: object store endpoint now in use");
                        self.current.store(i, Relaxed);
                    }
                    return Ok(got);
                }
            }
        }
        unreachable!("the last endpoint's result is returned")
    }

    fn wait<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, ArchiveError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if let Some(rt) = &self.runtime {
            rt.spawn(async move {
                let _ = tx.send(f.await);
            });
        }
        // No answer: the runtime dropped the task, which it does only at shutdown.
        rx.recv().map_err(|_| ArchiveError::Stopped)
    }

    /// The object `name` under the prefix.
    fn under_prefix(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// The object name of segment `n`.
    pub fn object(&self, n: u32) -> ObjectPath {
        self.under_prefix(&format!("segments/{n:08}.seg"))
    }

    /// The prefix, as configured (for messages).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The manifest under the prefix, if there is one (`crate::identity`).
    pub fn manifest(&self) -> Result<Option<Manifest>, ArchiveError> {
        let path = self.under_prefix(MANIFEST_OBJECT);
        let got = self.call(|store| {
            let path = path.clone();
            async move { store.get(&path).await?.bytes().await }
        })?;
        match got {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                ArchiveError::Remote(format!(
                    "{MANIFEST_OBJECT} under prefix {:?}: {e}",
                    self.prefix
                ))
            }),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote_err("read of the manifest", e)),
        }
    }

    /// Creates the manifest unless one exists (`If-None-Match: *`: a store that honours it
    /// lets one of two racing units win; one that ignores it lets the last writer win, which
    /// the caller's read-back then sees). Answers false when one existed.
    pub fn create_manifest(&self, m: &Manifest) -> Result<bool, ArchiveError> {
        let body = serde_json::to_vec_pretty(m).map_err(|e| ArchiveError::Remote(e.to_string()))?;
        let path = self.under_prefix(MANIFEST_OBJECT);
        self.create(path, bytes::Bytes::from(body), "creation of the manifest")
    }

    /// Puts `body` at `path` unless an object is there (`If-None-Match: *`); answers false when
    /// one was. `what` names the request in errors.
    fn create(
        &self,
        path: ObjectPath,
        body: bytes::Bytes,
        what: &str,
    ) -> Result<bool, ArchiveError> {
        let put = self.call(|store| {
            let (path, body) = (path.clone(), body.clone());
            async move {
                let opts = object_store::PutOptions {
                    mode: object_store::PutMode::Create,
                    ..Default::default()
                };
                store.put_opts(&path, PutPayload::from(body), opts).await
            }
        })?;
        match put {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(remote_err(what, e)),
        }
    }

    /// Writes the manifest over the one there (an adoption: the prefix changes writer).
    pub fn replace_manifest(&self, m: &Manifest) -> Result<(), ArchiveError> {
        let body = serde_json::to_vec_pretty(m).map_err(|e| ArchiveError::Remote(e.to_string()))?;
        let path = self.under_prefix(MANIFEST_OBJECT);
        let body = bytes::Bytes::from(body);
        self.call(|store| {
            let (path, body) = (path.clone(), body.clone());
            async move { store.put(&path, PutPayload::from(body)).await }
        })?
        .map_err(|e| remote_err("write of the manifest", e))?;
        Ok(())
    }

    /// Asks for an object that does not exist: "not found" means the store answered and took
    /// the credentials.
    pub fn probe(&self) -> Probe {
        let path = self.object(0);
        let answer = match self.call(|store| {
            let path = path.clone();
            async move { store.head(&path).await }
        }) {
            Ok(answer) => answer,
            Err(e) => return Probe::Unreachable(e.to_string()),
        };
        match answer {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Probe::Ok,
            Err(
                e @ (object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }),
            ) => Probe::Refused(e.to_string()),
            Err(e) => {
                let text = e.to_string();
                // S3 error codes for a wrong key or secret, a missing bucket.
                if [
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                    "AccessDenied",
                    "NoSuchBucket",
                    "403",
                ]
                .iter()
                .any(|c| text.contains(c))
                {
                    Probe::Refused(text)
                } else {
                    Probe::Unreachable(text)
                }
            }
        }
    }

    /// Uploads the file of segment `n` and confirms it: the store's size must match the file,
    /// and its ETag the file's MD5 (what S3-compatible stores give for a single-part upload); a
    /// store whose ETags are not MD5s has the object read back and hashed instead. Answers the
    /// bytes uploaded.
    pub fn upload(&self, n: u32, file: &Path) -> Result<u64, ArchiveError> {
        let f = std::fs::File::open(file)
            .map_err(|e| ArchiveError::Io(format!("{}: {e}", file.display())))?;
        let len = f
            .metadata()
            .map_err(|e| ArchiveError::Io(e.to_string()))?
            .len();
        let body = if len == 0 {
            bytes::Bytes::new()
        } else {
            // SAFETY: sealed segments are never written again; a mapping of one stays valid
            // even if compaction unlinks the file meanwhile.
            let map = unsafe { memmap2::Mmap::map(&f) }
                .map_err(|e| ArchiveError::Io(format!("{}: {e}", file.display())))?;
            bytes::Bytes::from_owner(map)
        };
        let md5 = crate::basics::hex(&Md5::digest(&body));
        let path = self.object(n);
        let meta = self.call(|store| {
            let (path, body) = (path.clone(), body.clone());
            async move {
                store.put(&path, PutPayload::from(body)).await?;
                store.head(&path).await
            }
        })?;
        let meta = meta.map_err(|e| remote_err(&format!("upload of segment {n}"), e))?;
        let etag = meta.e_tag.unwrap_or_default();
        let etag = etag.trim_matches('"');
        let is_md5 = etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit());
        let stored_md5 = if is_md5 {
            etag.to_ascii_lowercase()
        } else {
            crate::basics::hex(&Md5::digest(self.read_all(n)?))
        };
        if meta.size != len || stored_md5 != md5 {
            return Err(ArchiveError::Remote(format!(
                "upload of segment {n} not confirmed: the store has {} bytes, ETag {etag}; the file {len} bytes, MD5 {md5}",
                meta.size
            )));
        }
        Ok(len)
    }

    /// Bytes `offset..offset + len` of segment `n`.
    pub fn read_range(&self, n: u32, offset: u64, len: u64) -> Result<Vec<u8>, ArchiveError> {
        let path = self.object(n);
        let got = self.call(|store| {
            let path = path.clone();
            async move { store.get_range(&path, offset..offset + len).await }
        })?;
        let got = got.map_err(|e| remote_err(&format!("read of segment {n}"), e))?;
        if got.len() as u64 != len {
            return Err(ArchiveError::Remote(format!(
                "read of segment {n} at {offset}: {} bytes, wanted {len}",
                got.len()
            )));
        }
        Ok(got.to_vec())
    }

    /// The whole of segment `n`.
    pub fn read_all(&self, n: u32) -> Result<Vec<u8>, ArchiveError> {
        let path = self.object(n);
        let got = self.call(|store| {
            let path = path.clone();
            async move { store.get(&path).await?.bytes().await }
        })?;
        Ok(got
            .map_err(|e| remote_err(&format!("read of segment {n}"), e))?
            .to_vec())
    }

    /// Downloads segment `n` into the file `to` (streamed: a segment is never all in memory),
    /// synced; answers its length.
    pub fn download(&self, n: u32, to: &Path) -> Result<u64, ArchiveError> {
        use futures_util::StreamExt;
        use std::io::Write;
        let path = self.object(n);
        let to = to.to_path_buf();
        let got = self.call(|store| {
            let (path, to) = (path.clone(), to.clone());
            async move {
                let mut stream = store.get(&path).await?.into_stream();
                let local = |e: std::io::Error| object_store::Error::Generic {
                    store: "local file",
                    source: Box::new(e),
                };
                // Created again by a retry on another endpoint: never half of two downloads.
                let mut file = std::fs::File::create(&to).map_err(local)?;
                let mut len = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    len += chunk.len() as u64;
                    file.write_all(&chunk).map_err(local)?;
                }
                Ok::<u64, object_store::Error>(len)
            }
        })?;
        got.map_err(|e| remote_err(&format!("download of segment {n}"), e))
    }

    /// Deletes segment `n` (gone already counts as done).
    pub fn delete(&self, n: u32) -> Result<(), ArchiveError> {
        let path = self.object(n);
        match self.call(|store| {
            let path = path.clone();
            async move { store.delete(&path).await }
        })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote_err(&format!("delete of segment {n}"), e)),
        }
    }

    /// Puts a batch of checkpoint lines as the object `checkpoints/<offset>.jsonl` (`offset`: where
    /// the batch starts in the unit's checkpoints file, so names rise and never repeat), created
    /// only if absent. Answers false when it existed (a pass that uploaded it and crashed before
    /// its cursor moved).
    pub fn put_checkpoints(&self, offset: u64, lines: &str) -> Result<bool, ArchiveError> {
        let path = self.under_prefix(&format!("checkpoints/{offset:016}.jsonl"));
        self.create(
            path,
            bytes::Bytes::from(lines.to_string()),
            "upload of checkpoints",
        )
    }

    /// Every checkpoint line in the store's `checkpoints/` objects, oldest first (one `GET` per
    /// object: an object per upload pass that had new checkpoints).
    pub fn checkpoints(&self) -> Result<String, ArchiveError> {
        let mut names: Vec<ObjectPath> = self
            .list_under("checkpoints", "list of checkpoints")?
            .into_iter()
            .map(|m| m.location)
            .collect();
        names.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        let mut out = String::new();
        for name in names {
            let got = self.call(|store| {
                let name = name.clone();
                async move { store.get(&name).await?.bytes().await }
            })?;
            let bytes = got.map_err(|e| remote_err("read of checkpoints", e))?;
            out.push_str(&String::from_utf8_lossy(&bytes));
        }
        Ok(out)
    }

    /// The objects under `<prefix>/<dir>`; `what` names the request in errors.
    fn list_under(
        &self,
        dir: &str,
        what: &str,
    ) -> Result<Vec<object_store::ObjectMeta>, ArchiveError> {
        use futures_util::TryStreamExt;
        let dir = self.under_prefix(dir);
        let metas = self.call(|store| {
            let dir = dir.clone();
            async move {
                store
                    .list(Some(&dir))
                    .try_collect::<Vec<object_store::ObjectMeta>>()
                    .await
            }
        })?;
        metas.map_err(|e| remote_err(what, e))
    }

    /// Every object under the prefix, name and bytes (tests: what the store sees).
    pub fn every_object(&self) -> Result<Vec<(String, Vec<u8>)>, ArchiveError> {
        let mut out = Vec::new();
        for meta in self.list_under("", "list")? {
            let name = meta.location;
            let got = self.call(|store| {
                let name = name.clone();
                async move { store.get(&name).await?.bytes().await }
            })?;
            let bytes = got.map_err(|e| remote_err("read", e))?;
            out.push((name.to_string(), bytes.to_vec()));
        }
        Ok(out)
    }

    /// Names and sizes of the segments in the store (tests, `verify`).
    pub fn list(&self) -> Result<Vec<(u32, u64)>, ArchiveError> {
        let metas = self.list_under("segments", "list")?;
        let mut out: Vec<(u32, u64)> = metas
            .iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let n = name.strip_suffix(".seg")?.parse::<u32>().ok()?;
                Some((n, m.size))
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }
}
