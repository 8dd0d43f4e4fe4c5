//! The message archive: every message a unit accepts, stored once, compressed and
//! content-addressed, searchable, retained by policy, and mirrored to trusted peers.
//!
//! - [`store`]: append-only segment files (zstd bodies keyed by SHA-256, a checksum per record)
//!   and the LMDB catalog, written by one thread in groups (frames `fdatasync`ed, then the
//!   catalog committed); a torn tail is cut at open.
//! - [`index`]: the tantivy full-text index, derived from the catalog by its own thread.
//! - [`query`]: the search language.
//! - [`mirror`]: copying local items to peers over the authenticated peer link, and receiving
//!   theirs.
//! - [`remote`]: sealed segments on an S3-compatible object store (uploaded by a thread of the
//!   archive, read back by range, the local copies kept as a bounded cache).
//!
//! Not here: when a message is archived (the daemon's lifecycle decides), the admin protocol,
//! metrics (callers read [`Archive::status`] and the mirror's counters).

mod basics;
pub use evidence::{chain, checkpoint, proof, record, seal};
pub mod corpus;
pub mod exporter;
pub mod identity;
pub mod imap;
pub mod import;
pub mod importer;
pub use identity::ArchiveId;
pub mod index;
pub mod journal;
pub mod mime;
pub mod mirror;
pub mod query;
pub mod remote;
pub mod store;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_evidence;
#[cfg(test)]
mod tests_seal;

pub use record::Item;
pub use remote::{ObjectStoreConfig, Probe};
pub use store::{CompactReport, RebuildProgress, Rebuilt, RemoteCounters, Stored, Totals};

use basics::now_ms;
use crossbeam_channel::Sender;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use store::{Prepared, Request, Store};

/// Why an archive operation failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// A file operation failed (segment write, fsync, read).
    #[error("archive I/O: {0}")]
    Io(String),
    /// Less free space than `free_bytes_min` on the archive's file system.
    #[error("archive file system has {0} bytes free, below the configured minimum")]
    NoSpace(u64),
    /// The catalog (LMDB) failed.
    #[error("archive catalog: {0}")]
    Catalog(String),
    /// Stored bytes fail their checks.
    #[error("archive corrupt: {0}")]
    Corrupt(String),
    /// The full-text index failed.
    #[error("archive index: {0}")]
    Index(String),
    /// A search query does not parse.
    #[error("query: {0}")]
    Query(String),
    /// No such item.
    #[error("no archived item {0}")]
    NotFound(String),
    /// The bytes given do not match the hash claimed for them.
    #[error("body does not match its SHA-256")]
    HashMismatch,
    /// The archive's threads are gone.
    #[error("archive stopped")]
    Stopped,
    /// The object store failed or refused a request.
    #[error("archive object store: {0}")]
    Remote(String),
    /// The object store's prefix belongs to another archive (or this unit cannot tell it is
    /// its own): nothing is written there.
    #[error("archive object store: {0}")]
    NotOurs(String),
    /// The request does not apply to the archive as it is.
    #[error("archive: {0}")]
    Refused(String),
}

impl From<heed::Error> for ArchiveError {
    fn from(e: heed::Error) -> ArchiveError {
        ArchiveError::Catalog(e.to_string())
    }
}

/// Where and how to keep the archive.
#[derive(Clone, Debug)]
pub struct Options {
    /// The archive's directory (`catalog/`, `segments/`, `index/`).
    pub dir: PathBuf,
    /// Seal a segment past this size.
    pub segment_bytes_max: u64,
    /// Refuse writes with less free space than this.
    pub free_bytes_min: u64,
    /// zstd level for bodies.
    pub zstd_level: i32,
    /// Memory the index writer may buffer before it flushes a segment.
    pub index_heap_bytes: usize,
    /// Sealed segments go to this object store; the local disk keeps the open segment and a
    /// cache of sealed ones.
    pub object_store: Option<ObjectStoreConfig>,
    /// Local bytes of sealed segments already in the object store kept as a read cache.
    pub cache_bytes: u64,
    /// This unit's node name (written in the manifest of an object-store prefix it claims).
    pub node: String,
    /// How long a new archive waits before reading its manifest back ([`store::CLAIM_SETTLE`]).
    pub claim_settle: Duration,
    /// With an object store: seal the open segment once it has held something this long, so
    /// the store lags the unit by this rather than by `segment_bytes_max` (`None`: by size only).
    pub seal_after: Option<Duration>,
    /// Adopt the object store prefix of this archive (a new unit taking over a lost unit's
    /// archive): its catalog is then rebuilt from the store.
    pub adopt: Option<identity::ArchiveId>,
    /// The file of the key that signs the chain's checkpoints (made, 0600, if missing); keep it
    /// outside `dir` so that a copied-out archive carries no secret. `None`: a key in memory
    /// only, new at every open (tests).
    pub signing_key: Option<PathBuf>,
    /// Sign a checkpoint once this many chain entries are unsigned ...
    pub checkpoint_entries: u64,
    /// ... or once an entry has waited this long for one.
    pub checkpoint_after: Duration,
    /// Encryption at rest (`None`: records are written in clear, and sealed ones cannot be read).
    pub encryption: Option<Encryption>,
}

/// Encryption at rest: the keyring, where it is kept, and whether new records are sealed.
#[derive(Clone, Debug)]
pub struct Encryption {
    /// The keys.
    pub keyring: seal::Keyring,
    /// The file it came from, which a rotation rewrites (`None`: from the environment).
    pub file: Option<PathBuf>,
    /// Seal new records (`false`: the keyring only reads what was sealed before).
    pub seal: bool,
}

impl Options {
    /// Defaults for `dir`.
    pub fn new(dir: PathBuf) -> Options {
        Options {
            dir,
            segment_bytes_max: 256 << 20,
            free_bytes_min: 256 << 20,
            zstd_level: 3,
            index_heap_bytes: 16 << 20,
            object_store: None,
            cache_bytes: 1 << 30,
            node: String::new(),
            claim_settle: store::CLAIM_SETTLE,
            seal_after: Some(Duration::from_secs(300)),
            adopt: None,
            signing_key: None,
            checkpoint_entries: 1000,
            checkpoint_after: Duration::from_secs(60),
            encryption: None,
        }
    }
}

/// A message to archive: its envelope as accepted and its verdict.
#[derive(Clone, Debug, Default)]
pub struct Incoming {
    /// Spool id.
    pub id: String,
    /// Node that accepted it.
    pub origin: String,
    /// Accepted at, ms since the epoch.
    pub arrived_ms: u64,
    /// SMTP client address.
    pub client: String,
    /// Envelope sender.
    pub sender: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// Scan verdict.
    pub verdict: String,
    /// SHA-256 of the raw bytes, as the spool recorded it.
    pub hash: [u8; 32],
}

impl Incoming {
    /// Its deduplication key (keyed with `secret`, an encrypted archive's).
    pub fn key(&self, secret: Option<&[u8; 32]>) -> [u8; 32] {
        Item::key_of(&self.hash, &self.sender, &self.recipients, secret)
    }
}

/// Store-wide figures for `spoolctl archive status` and metrics.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Catalog counters.
    pub totals: Totals,
    /// Highest sequence number handed out.
    pub last_seq: u64,
    /// Items searchable, in sequence order, up to this one.
    pub indexed_through: u64,
    /// Object store traffic since start, when there is an object store.
    pub remote: Option<RemoteStats>,
}

/// Object store traffic since start.
#[derive(Clone, Copy, Debug, Default)]
pub struct RemoteStats {
    /// Segments uploaded and confirmed.
    pub uploads: u64,
    /// Bytes of them.
    pub upload_bytes: u64,
    /// Uploads that failed (retried).
    pub upload_failures: u64,
    /// Records read from the store.
    pub fetches: u64,
    /// Reads from the store that failed.
    pub fetch_failures: u64,
    /// Replaced objects deleted.
    pub deletes: u64,
    /// Local copies evicted from the cache.
    pub evictions: u64,
}

/// What [`Archive::verify`] found.
#[derive(Clone, Debug, Default)]
pub struct Verified {
    /// Items in the catalog.
    pub items: u64,
    /// Of them, bodies read back whole.
    pub ok: u64,
    /// The others, and why.
    pub bad: Vec<(u64, String)>,
    /// Entries in the full-text index.
    pub index_entries: u64,
}

/// One search answer.
#[derive(Clone, Debug)]
pub struct SearchResult {
    /// Items matching in the index: all of them when `total_exact`, else a lower bound (the
    /// matches among the newest items, where the search stopped).
    pub total: usize,
    /// Whether `total` counts every match.
    pub total_exact: bool,
    /// The newest matching items, up to the limit.
    pub items: Vec<Hit>,
}

/// One item a search found.
#[derive(Clone, Debug)]
pub struct Hit {
    /// The item.
    pub item: Item,
    /// The fields the query matched it in, as the search language names them.
    pub matched: Vec<&'static str>,
}

/// An open archive: the store, its writer and indexer threads, and the index.
pub struct Archive {
    store: Arc<Store>,
    writer: Sender<Request>,
    indexer: Sender<index::IndexMsg>,
    index: index::SearchIndex,
    compressors: Compressors,
    /// Signs the chain's checkpoints.
    signer: Arc<checkpoint::Signer>,
    /// One peer checkpoint kept at a time (sessions of several peers write beside each other).
    peer_checkpoints_lock: std::sync::Mutex<()>,
    /// Dropped to stop the object store's uploader.
    uploader_stop: Option<Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Archive {
    /// Stops the threads and waits for them, so the catalog is closed when this returns.
    fn drop(&mut self) {
        self.uploader_stop = None;
        let _ = self.writer.send(Request::Stop);
        let _ = self.indexer.send(index::IndexMsg::Stop);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Compression contexts: making one costs more than compressing a small message, and one per
/// thread (the daemon archives from many) costs memory. Compressions wait for one of these;
/// two cores are kept busy by far fewer.
const COMPRESSORS: usize = 4;

/// A few zstd contexts, lent out one per compression.
struct Compressors {
    level: i32,
    /// Idle contexts, and how many exist.
    pool: std::sync::Mutex<(Vec<zstd::bulk::Compressor<'static>>, usize)>,
    returned: std::sync::Condvar,
}

impl Compressors {
    fn new(level: i32) -> Compressors {
        Compressors {
            level,
            pool: std::sync::Mutex::new((Vec::new(), 0)),
            returned: std::sync::Condvar::new(),
        }
    }

    fn compress(&self, raw: &[u8]) -> Result<Vec<u8>, ArchiveError> {
        let io = |e: std::io::Error| ArchiveError::Io(format!("compress: {e}"));
        let mut z = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(z) = pool.0.pop() {
                    break z;
                }
                if pool.1 < COMPRESSORS {
                    pool.1 += 1;
                    drop(pool);
                    match zstd::bulk::Compressor::new(self.level) {
                        Ok(z) => break z,
                        Err(e) => {
                            self.pool.lock().unwrap_or_else(|p| p.into_inner()).1 -= 1;
                            return Err(io(e));
                        }
                    }
                }
                pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
            }
        };
        let out = z.compress(raw).map_err(io);
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .push(z);
        self.returned.notify_one();
        out
    }
}

/// The object store's upkeep: a pass a second while it works; after a failure, waits that
/// double up to [`UPLOAD_BACKOFF_MAX`] (an unreachable store is not hammered), then a pass again.
/// The longest wait between passes while the object store fails: an attempt costs one refused
/// connection or one error reply, and segments should not wait long once it is back.
const UPLOAD_BACKOFF_MAX: Duration = Duration::from_secs(10);

fn upload_loop(
    store: &Store,
    writer: &crossbeam_channel::Sender<Request>,
    stopped: &crossbeam_channel::Receiver<()>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut rebuild_asked: Option<std::time::Instant> = None;
    loop {
        let wait = match store.sync_remote() {
            Ok(_) => {
                // A prefix adopted by this pass's claim (or the daemon's) is rebuilt from; a
                // rebuild that failed is asked again, not more often than every 10 s.
                let progress = &store.rebuild_progress;
                if progress.pending.load(Ordering::SeqCst)
                    && !progress.running.load(Ordering::SeqCst)
                    && rebuild_asked.is_none_or(|at| at.elapsed() > Duration::from_secs(10))
                {
                    let (tx, _) = crossbeam_channel::bounded(1);
                    let _ = writer.send(Request::Rebuild(tx));
                    rebuild_asked = Some(std::time::Instant::now());
                }
                if backoff > Duration::from_secs(1) {
                    tracing::info!("archive: object store reachable again");
                }
                backoff = Duration::from_secs(1);
                backoff
            }
            Err(e) => {
                if matches!(e, ArchiveError::NotOurs(_)) {
                    tracing::error!(
                        retry_in_secs = backoff.as_secs(),
                        "archive: {e}; sealed segments stay local"
                    );
                } else {
                    tracing::warn!(
                        retry_in_secs = backoff.as_secs(),
                        "archive: object store upkeep failed, segments stay local: {e}"
                    );
                }
                let wait = backoff;
                backoff = (backoff * 2).min(UPLOAD_BACKOFF_MAX);
                wait
            }
        };
        if !matches!(
            stopped.recv_timeout(wait),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        ) {
            return;
        }
    }
}

/// How a retention period is named in the tombstones it leaves.
fn retention_rule(retention: Duration) -> String {
    let secs = retention.as_secs();
    if secs.is_multiple_of(86_400) {
        format!("retention {} days", secs / 86_400)
    } else {
        format!("retention {secs} s")
    }
}

impl Archive {
    /// Opens (creating) the archive and starts its threads.
    pub fn open(opts: &Options) -> Result<Archive, ArchiveError> {
        let remote = opts
            .object_store
            .as_ref()
            .map(remote::Remote::new)
            .transpose()?;
        Archive::open_with(opts, remote)
    }

    /// [`Archive::open`] with the object store given (`opts.object_store` is not read).
    pub fn open_with(
        opts: &Options,
        remote: Option<remote::Remote>,
    ) -> Result<Archive, ArchiveError> {
        let has_remote = remote.is_some();
        let mut store = Store::open_with(&opts.dir, remote, opts.cache_bytes, &opts.node)?;
        store.set_claim_settle(opts.claim_settle);
        store.set_adopt(opts.adopt);
        if let Some(enc) = &opts.encryption {
            store.set_keyring(Some(Arc::new(enc.keyring.clone())));
        }
        // Records sealed with a key this unit does not have would read as damage: refuse at
        // start, saying which key is missing.
        if let Some(id) = store.chain_key()? {
            match store.keyring() {
                None => {
                    return Err(ArchiveError::Refused(format!(
                        "the archive's records are sealed (key {id:08x}) and no keyring is configured: restore the keyring file from its backup"
                    )))
                }
                Some(k) if !k.has(id) => {
                    return Err(ArchiveError::Refused(format!(
                        "the keyring lacks key {id:08x}, which the archive's chain names: it is another archive's keyring, or a copy from before a rotation"
                    )))
                }
                Some(_) => {}
            }
        }
        let store = Arc::new(store);
        let (search, indexer) = index::open(
            &opts.dir.join("index"),
            store.clone(),
            opts.index_heap_bytes,
        )?;
        let signer = Arc::new(match &opts.signing_key {
            Some(path) => checkpoint::Signer::load_or_create(path)?,
            None => checkpoint::Signer::ephemeral(),
        });
        let mut writer = store::Writer::new(
            store.clone(),
            opts.segment_bytes_max,
            opts.free_bytes_min,
            signer.clone(),
        )?;
        writer.checkpoint_entries = opts.checkpoint_entries.max(1);
        writer.checkpoint_after = opts.checkpoint_after;
        if let Some(enc) = &opts.encryption {
            writer.seal = enc.seal;
            writer.keyring_file = enc.file.clone();
        }
        // A rebuild stopped between its last transaction and taking in the store's checkpoints
        // finishes that now; with the store unreachable, the writer does it before it signs
        // its next checkpoint (until then nothing of the file is uploaded).
        if let Err(e) = writer.adopt_checkpoints() {
            tracing::warn!("archive: the object store's checkpoints are not taken in yet: {e}");
        }
        writer.chain_items()?;
        // Sealing by age matters where sealed segments leave the unit.
        writer.seal_after = opts.seal_after.filter(|_| has_remote);
        let (wtx, wrx) = crossbeam_channel::bounded(4096);
        let (itx, irx) = crossbeam_channel::unbounded();
        let wake = itx.clone();
        let writer_thread = std::thread::Builder::new()
            .name("archive-writer".into())
            .spawn(move || {
                writer.run(wrx, |_| {
                    let _ = wake.send(index::IndexMsg::Wake);
                })
            })
            .map_err(|e| ArchiveError::Io(e.to_string()))?;
        let index_thread = indexer.start(irx)?;
        let mut threads = vec![writer_thread, index_thread];
        let mut uploader_stop = None;
        // A rebuild marked at open (a lost catalog, or one cut short) runs before anything else.
        if store.rebuilding()? {
            let (tx, _) = crossbeam_channel::bounded(1);
            let _ = wtx.send(Request::Rebuild(tx));
        }
        if store.remote().is_some() {
            let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
            let store = store.clone();
            let writer = wtx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("archive-upload".into())
                    .spawn(move || upload_loop(&store, &writer, &stopped))
                    .map_err(|e| ArchiveError::Io(e.to_string()))?,
            );
            uploader_stop = Some(stop);
        }
        Ok(Archive {
            store,
            writer: wtx,
            indexer: itx,
            index: search,
            compressors: Compressors::new(opts.zstd_level),
            signer,
            peer_checkpoints_lock: std::sync::Mutex::new(()),
            uploader_stop,
            threads,
        })
    }

    /// The item already archived under this message's key, if any.
    pub fn find(&self, m: &Incoming) -> Result<Option<u64>, ArchiveError> {
        self.store.seq_of_key(&m.key(self.dedup_secret().as_ref()))
    }

    /// Archives a message durably (blocking: hashes and compresses here, then waits for the
    /// writer's group commit). The same message archived again answers its first item.
    pub fn archive(&self, m: Incoming, raw: &[u8]) -> Result<Stored, ArchiveError> {
        self.archive_as(m, raw, false, false)
    }

    fn archive_as(
        &self,
        m: Incoming,
        raw: &[u8],
        mirrored: bool,
        held: bool,
    ) -> Result<Stored, ArchiveError> {
        let got: [u8; 32] = Sha256::digest(raw).into();
        if got != m.hash {
            return Err(ArchiveError::HashMismatch);
        }
        let compressed = self.compressors.compress(raw)?;
        let item = Item {
            seq: 0,
            key: m.key(self.dedup_secret().as_ref()),
            hash: m.hash,
            id: m.id,
            origin: m.origin,
            mirrored,
            held,
            arrived_ms: m.arrived_ms,
            archived_ms: now_ms(),
            client: m.client,
            sender: m.sender,
            recipients: m.recipients,
            verdict: m.verdict,
            raw_len: raw.len() as u64,
        };
        self.submit(Prepared { item, compressed })
    }

    /// Stores an item a mirror peer sent (compressed as it travelled), verified first.
    pub fn receive_mirrored(
        &self,
        mut item: Item,
        compressed: Vec<u8>,
    ) -> Result<Stored, ArchiveError> {
        store::decompress_verified(&compressed, item.raw_len, &item.hash)
            .map_err(|_| ArchiveError::HashMismatch)?;
        item.key = Item::key_of(
            &item.hash,
            &item.sender,
            &item.recipients,
            self.dedup_secret().as_ref(),
        );
        item.mirrored = true;
        item.held = false;
        item.archived_ms = now_ms();
        self.submit(Prepared { item, compressed })
    }

    /// The secret that keys dedup keys, when the archive has a keyring.
    fn dedup_secret(&self) -> Option<[u8; 32]> {
        self.store.keyring().map(|k| *k.dedup_secret())
    }

    fn submit(&self, p: Prepared) -> Result<Stored, ArchiveError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writer
            .send(Request::Store(Box::new(p), tx))
            .map_err(|_| ArchiveError::Stopped)?;
        rx.recv().map_err(|_| ArchiveError::Stopped)?
    }

    /// Runs a search; results newest first.
    pub fn search(&self, q: &str, limit: usize) -> Result<SearchResult, ArchiveError> {
        self.search_within(q, limit, None)
    }

    /// [`Archive::search`] among the items whose envelope sender or a recipient is one of
    /// `scope`'s addresses (case does not matter); `None`: every item.
    pub fn search_within(
        &self,
        q: &str,
        limit: usize,
        scope: Option<&[String]>,
    ) -> Result<SearchResult, ArchiveError> {
        let found = self.index.search(q, limit, scope)?;
        let r = self.store.read()?;
        let mut items = Vec::with_capacity(found.seqs.len());
        for (seq, matched) in found.seqs.into_iter().zip(found.matched) {
            if let Some(item) = self.store.item(&r, seq)? {
                items.push(Hit { item, matched });
            }
        }
        Ok(SearchResult {
            total: found.total,
            total_exact: found.total_exact,
            items,
        })
    }

    /// Every item a query matches (for a legal hold by query).
    pub fn search_all(&self, q: &str) -> Result<Vec<u64>, ArchiveError> {
        self.index.search_all(q)
    }

    /// The item numbered `seq`.
    pub fn item(&self, seq: u64) -> Result<Item, ArchiveError> {
        let r = self.store.read()?;
        self.store
            .item(&r, seq)?
            .ok_or_else(|| ArchiveError::NotFound(seq.to_string()))
    }

    /// The exact accepted bytes of item `seq`, verified against its hash.
    pub fn raw(&self, seq: u64) -> Result<(Item, Vec<u8>), ArchiveError> {
        let item = self.item(seq)?;
        let raw = self.body(&item)?;
        Ok((item, raw))
    }

    /// The exact accepted bytes of an item already read (a search hit), verified against its
    /// hash.
    pub fn body(&self, item: &Item) -> Result<Vec<u8>, ArchiveError> {
        self.store.raw(&item.hash)
    }

    /// Puts items on legal hold or releases them; answers how many changed.
    pub fn hold(&self, seqs: &[u64], held: bool) -> Result<u64, ArchiveError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writer
            .send(Request::Hold(seqs.to_vec(), held, tx))
            .map_err(|_| ArchiveError::Stopped)?;
        rx.recv().map_err(|_| ArchiveError::Stopped)?
    }

    /// Removes items accepted more than `retention` ago and not on hold; `progress` hears the
    /// count removed so far. Answers the count removed.
    pub fn expire(
        &self,
        retention: Duration,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ArchiveError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let rule = retention_rule(retention);
        let mut removed_total = 0;
        loop {
            let batch = self.store.expired(cutoff, 4096)?;
            if batch.is_empty() {
                return Ok(removed_total);
            }
            let (tx, rx) = crossbeam_channel::bounded(1);
            self.writer
                .send(Request::Remove(batch, rule.clone(), tx))
                .map_err(|_| ArchiveError::Stopped)?;
            let removed = rx.recv().map_err(|_| ArchiveError::Stopped)??;
            if removed.is_empty() {
                return Ok(removed_total);
            }
            removed_total += removed.len() as u64;
            let _ = self.indexer.send(index::IndexMsg::Delete(removed));
            progress(removed_total);
        }
    }

    /// Rewrites sealed segments whose live share fell below `live_percent_min`.
    pub fn compact(&self, live_percent_min: u32) -> Result<CompactReport, ArchiveError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writer
            .send(Request::Compact(live_percent_min, tx))
            .map_err(|_| ArchiveError::Stopped)?;
        rx.recv().map_err(|_| ArchiveError::Stopped)?
    }

    /// Adds a data key to the keyring (`spoolctl archive key rotate`): saved first, then new
    /// records are sealed with it and the chain names it. Older keys stay to read what they
    /// sealed until [`Archive::rekey`] has moved it.
    pub fn rotate_key(&self) -> Result<seal::KeyInfo, ArchiveError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writer
            .send(Request::RotateKey(tx))
            .map_err(|_| ArchiveError::Stopped)?;
        rx.recv().map_err(|_| ArchiveError::Stopped)?
    }

    /// Seals every record with the current key (`spoolctl archive rekey`): each segment holding
    /// a record in clear or sealed with an older key is rewritten.
    pub fn rekey(&self) -> Result<CompactReport, ArchiveError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writer
            .send(Request::Rekey(tx))
            .map_err(|_| ArchiveError::Stopped)?;
        rx.recv().map_err(|_| ArchiveError::Stopped)?
    }

    /// The data keys (never the keys themselves), oldest first, and the one the chain names.
    pub fn data_keys(&self) -> Result<(Vec<seal::KeyInfo>, Option<u32>), ArchiveError> {
        Ok((
            self.store.keyring().map(|k| k.infos()).unwrap_or_default(),
            self.store.chain_key()?,
        ))
    }

    /// Seals the open segment now if it holds anything (`spoolctl archive seal`); answers the
    /// segment sealed. With an object store, the upload thread takes it at its next pass.
    pub fn seal(&self) -> Result<Option<u32>, ArchiveError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writer
            .send(Request::Seal(tx))
            .map_err(|_| ArchiveError::Stopped)?;
        rx.recv().map_err(|_| ArchiveError::Stopped)?
    }

    /// Rebuilds the catalog from the segments (local, and the object store's once the prefix is
    /// this archive's), or waits for the rebuild under way; `progress` hears how far it got
    /// every 200 ms. Refused for a catalog that holds items and is not rebuilding.
    pub fn rebuild(
        &self,
        mut progress: impl FnMut(&RebuildProgress),
    ) -> Result<Rebuilt, ArchiveError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writer
            .send(Request::Rebuild(tx))
            .map_err(|_| ArchiveError::Stopped)?;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(done) => return done,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    progress(&self.store.rebuild_progress)
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(ArchiveError::Stopped)
                }
            }
        }
    }

    /// Makes everything stored so far searchable before returning.
    pub fn flush_index(&self) -> Result<(), ArchiveError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.indexer
            .send(index::IndexMsg::Flush(tx))
            .map_err(|_| ArchiveError::Stopped)?;
        rx.recv().map_err(|_| ArchiveError::Stopped)
    }

    /// Drops the index and builds it again from the catalog; `progress(done, total)` as it
    /// goes. Returns when the index has caught up.
    pub fn reindex(&self, mut progress: impl FnMut(u64, u64)) -> Result<(), ArchiveError> {
        let total = self.store.last_seq()?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.indexer
            .send(index::IndexMsg::Rebuild(tx))
            .map_err(|_| ArchiveError::Stopped)?;
        rx.recv().map_err(|_| ArchiveError::Stopped)?;
        loop {
            let done = self
                .index
                .indexed_through
                .load(std::sync::atomic::Ordering::SeqCst);
            progress(done.min(total), total);
            if done >= total {
                return self.flush_index();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Reads every item's body back and checks it against its hash; counts the index's entries
    /// (after a flush), which must equal the items. `progress(done, total)` as it goes.
    pub fn verify(&self, mut progress: impl FnMut(u64, u64)) -> Result<Verified, ArchiveError> {
        let total = self.store.totals()?.items;
        let mut v = Verified::default();
        let mut after = 0;
        let mut fetched: Option<u32> = None;
        loop {
            let batch = self.store.items_after(after, 1024, |_| true)?;
            let Some(last) = batch.last() else { break };
            after = last.seq;
            for item in &batch {
                v.items += 1;
                // Segments in the object store come back whole, once each.
                let segment = self.store.segment_of(&item.hash)?;
                if segment != fetched {
                    if let Some(done) = fetched {
                        self.store.release(done);
                    }
                    if let Some(n) = segment {
                        // A failed download leaves the reads below to fetch each record.
                        let _ = self.store.fetch_segment(n);
                    }
                    fetched = segment;
                }
                match self.store.raw(&item.hash) {
                    Ok(_) => v.ok += 1,
                    Err(e) => v.bad.push((item.seq, e.to_string())),
                }
            }
            progress(v.items, total);
        }
        if let Some(done) = fetched {
            self.store.release(done);
        }
        self.flush_index()?;
        v.index_entries = self.index.entries();
        Ok(v)
    }

    /// Proves the archive ([`proof`]): every segment (local or in the object store) read as of
    /// one catalog snapshot, the chain linked and checked against the catalog's head, the
    /// checkpoints file and the checkpoints others keep (`elsewhere`), every item's body hashed.
    /// `trusted`: the signing keys to accept (none: the keys the chain names). From a
    /// checkpoint (`start`), the entries it covers are taken as proved by it. `progress(done, total)` counts segments read (twice: scan, then bodies).
    pub fn prove(
        &self,
        trusted: Vec<[u8; 32]>,
        start: proof::Start,
        elsewhere: &[(String, Vec<checkpoint::Checkpoint>)],
        progress: impl FnMut(u64, u64),
    ) -> Result<proof::Proof, ArchiveError> {
        let (head, segments) = self.store.proof_snapshot()?;
        let checkpoints = checkpoint::read(self.store.dir())?;
        let from = proof::starting_checkpoint(&checkpoints, &trusted, start);
        let lens: std::collections::HashMap<u32, Option<u64>> = segments.iter().copied().collect();
        let numbers: Vec<u32> = segments.iter().map(|s| s.0).collect();
        proof::Prover::new(trusted, from)
            .with_keys(self.store.keyring())
            .run(
                &numbers,
                |n| self.store.segment_bytes(n, lens.get(&n).copied().flatten()),
                (&checkpoints, Some(head), elsewhere),
                progress,
            )
    }

    /// Keeps a checkpoint a mirror peer sent (a line of its checkpoints file): its signature must
    /// hold; it is appended (synced) to `peers/<archive id>.checkpoints` unless already there.
    pub fn keep_peer_checkpoint(&self, line: &[u8]) -> Result<(), ArchiveError> {
        let text = std::str::from_utf8(line)
            .map_err(|_| ArchiveError::Refused("a checkpoint that is not text".into()))?;
        let cp = checkpoint::Checkpoint::from_line(text).map_err(ArchiveError::Refused)?;
        if !cp.signature_holds() {
            return Err(ArchiveError::Refused(
                "a checkpoint whose signature does not hold".into(),
            ));
        }
        let _one = self
            .peer_checkpoints_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let dir = self.store.dir().join("peers");
        std::fs::create_dir_all(&dir).map_err(|e| ArchiveError::Io(e.to_string()))?;
        let path = dir.join(format!("{}.checkpoints", cp.archive));
        checkpoint::cut_torn_file(&path)?;
        // The sender resends from its cursor after a lost reply: a copy of a recent line is
        // already here. Only the file's tail is read (it grows by a line a minute for years).
        if checkpoint::tail(&path, 64 << 10)?.contains(&cp) {
            return Ok(());
        }
        Ok(checkpoint::append_to(&path, &cp)?)
    }

    /// The checkpoints kept of mirror peer archive `archive`, oldest first.
    pub fn peer_checkpoints(
        &self,
        archive: ArchiveId,
    ) -> Result<Vec<checkpoint::Checkpoint>, ArchiveError> {
        let path = self
            .store
            .dir()
            .join("peers")
            .join(format!("{archive}.checkpoints"));
        Ok(checkpoint::read_file(&path)?
            .0
            .into_iter()
            .map(|(_, cp)| cp)
            .collect())
    }

    /// The key that signs this unit's checkpoints (the audit log's too).
    pub fn signer(&self) -> Arc<checkpoint::Signer> {
        self.signer.clone()
    }

    /// The public key that signs this unit's checkpoints, and the archive's id once it has one.
    pub fn signing_key(&self) -> Result<([u8; 32], Option<ArchiveId>), ArchiveError> {
        Ok((self.signer.public(), self.store.archive_id()?))
    }

    /// Signs a checkpoint of the chain now if entries wait for one (tests, `archive verify`).
    pub fn checkpoint_now(&self) -> Result<(), ArchiveError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writer
            .send(Request::Checkpoint(tx))
            .map_err(|_| ArchiveError::Stopped)?;
        rx.recv().map_err(|_| ArchiveError::Stopped)
    }

    /// Store-wide figures.
    pub fn status(&self) -> Result<Status, ArchiveError> {
        Ok(Status {
            totals: self.store.totals()?,
            last_seq: self.store.last_seq()?,
            indexed_through: self
                .index
                .indexed_through
                .load(std::sync::atomic::Ordering::SeqCst),
            remote: self.store.remote().map(|_| {
                let c = &self.store.remote_counters;
                let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                RemoteStats {
                    uploads: get(&c.uploads),
                    upload_bytes: get(&c.upload_bytes),
                    upload_failures: get(&c.upload_failures),
                    fetches: get(&c.fetches),
                    fetch_failures: get(&c.fetch_failures),
                    deletes: get(&c.deletes),
                    evictions: get(&c.evictions),
                }
            }),
        })
    }

    /// Uploads what is waiting and deletes what compaction replaced, now (tests, benchmarks).
    pub fn sync_remote(&self) -> Result<store::SyncReport, ArchiveError> {
        self.store.sync_remote()
    }

    /// Empties the local cache of segments already in the object store; answers how many
    /// local copies went.
    pub fn drop_cache(&self) -> Result<u32, ArchiveError> {
        self.store.drop_cache()
    }

    /// Newest items searched in a search's first pass (tests make it small).
    pub fn set_first_window(&mut self, items: u64) {
        self.index.first_window = items;
    }

    /// The store, for the mirror.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

impl From<evidence::EvidenceError> for ArchiveError {
    fn from(e: evidence::EvidenceError) -> ArchiveError {
        match e {
            evidence::EvidenceError::Refused(why) => ArchiveError::Refused(why),
            other => ArchiveError::Io(other.to_string()),
        }
    }
}
