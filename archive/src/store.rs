//! The durable part of the archive: append-only segment files holding compressed bodies, one
//! per distinct body hash, and the LMDB catalog (items, dedup keys, blob locations, counters,
//! mirror cursors). One writer thread makes every change to items, keys and blobs, in groups:
//! frames appended and `fdatasync`ed first, then the catalog committed, so the catalog never
//! names bytes that are not on disk. Whatever a crash leaves past the committed length of the
//! open segment is cut at the next open.
//!
//! With an object store, sealed segments are uploaded by [`Store::sync_remote`] and marked in
//! the catalog once the store confirms them; only then may their local files be evicted (the
//! local copies are a bounded read cache). A read whose segment is not local fetches the
//! record's byte range and checks it like a local read. Compaction marks a replaced object
//! `gone` and deletes it only once the segment its live records moved to is confirmed.

use crate::basics::{hex, now_ms};
use crate::chain::{self, Event, Head, Why};
use crate::checkpoint::{self, Signer};
use crate::identity::{decide, ArchiveId, Claim, Found, Manifest, MANIFEST_FORMAT};
use crate::record::{self, BlobLoc, Item, Record};
use crate::remote::Remote;
use crate::seal::{KeyInfo, Keyring};
use crate::ArchiveError;
use crossbeam_channel::{Receiver, Sender};
use heed::byteorder::BE;
use heed::types::{Bytes, Str, U64};
use heed::{Database, Env, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod rebuild;
use rebuild::REBUILDING;
pub use rebuild::{RebuildProgress, Rebuilt};

const NEXT_SEQ: &str = "next_seq";
const OPEN_SEGMENT: &str = "open_segment";
const OPEN_LEN: &str = "open_len";
const ITEMS: &str = "items";
const RAW_BYTES: &str = "raw_bytes";
const HELD: &str = "held";
/// The revision the next item record takes (records of one item: the highest wins).
const NEXT_REV: &str = "next_rev";
/// Set once every item has a record in the segments (new archives from the start; an archive
/// written before item records, after the migration at its first open).
const DESCRIBED: &str = "described";
/// Set once every item has an entry in the hash chain (new archives from the start; an archive
/// from before the chain, after the migration at its first open by a version that keeps one).
const CHAINED: &str = "chained";
/// The chain's length: the number its next entry takes.
const CHAIN_NEXT: &str = "chain.next";
/// The migration into the chain got this far (items after it are still to describe).
const CHAIN_DESCRIBED_THROUGH: &str = "chain.described_through";
/// `hashes`: the chain's last entry's hash.
const CHAIN_HEAD: &str = "chain.head";
/// `hashes`: the public key that the chain says signs its checkpoints now.
const CHAIN_SIGNER: &str = "chain.signer";
/// The id of the data key the chain names now (records are sealed with it from there on).
const CHAIN_KEY: &str = "chain.key";
/// The cursor of the checkpoints file's bytes the object store holds.
const STORE_CHECKPOINTS: &str = "store-checkpoints";
/// Set by a rebuild's last transaction while the object store's checkpoints are still to be
/// taken into the local checkpoints file ([`Store::take_in_checkpoints`]).
const CHECKPOINTS_TO_TAKE_IN: &str = "checkpoints.to_take_in";
/// Checkpoints go to the store with every segment uploaded, and at least this often.
const CHECKPOINTS_TO_STORE_EVERY: std::time::Duration = std::time::Duration::from_secs(900);
/// How long a new archive waits after writing its manifest before it reads it back (see
/// [`Store::claim`]).
pub const CLAIM_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);
/// The archive's id (`crate::identity`), as two halves.
const ARCHIVE_ID: [&str; 2] = ["archive_id.hi", "archive_id.lo"];
/// This catalog's writer id (`crate::identity::still_writer`), as two halves.
const WRITER_ID: [&str; 2] = ["writer.hi", "writer.lo"];

/// An id kept in the catalog's `meta` as two halves under two keys.
fn get_id(
    meta: &Database<Str, U64<BE>>,
    r: &RoTxn<'_>,
    [hi, lo]: [&str; 2],
) -> Result<Option<ArchiveId>, ArchiveError> {
    let (hi, lo) = (meta.get(r, hi)?, meta.get(r, lo)?);
    Ok(hi.zip(lo).map(|(hi, lo)| ArchiveId::from_halves(hi, lo)))
}

fn put_id(
    meta: &Database<Str, U64<BE>>,
    w: &mut RwTxn<'_>,
    [hi, lo]: [&str; 2],
    id: ArchiveId,
) -> Result<(), ArchiveError> {
    let (h, l) = id.halves();
    meta.put(w, hi, &h)?;
    meta.put(w, lo, &l)?;
    Ok(())
}
/// LMDB reader slots: more than the read transactions that can be open at once (the blocking
/// threads of a runtime, the index and mirror threads). A slot costs 64 bytes of the lock file.
const READERS_MAX: u32 = 1024;
/// Requests taken into one group commit at most.
const GROUP_MAX: usize = 512;
const GROUP_BYTES_MAX: usize = 32 << 20;
/// After a failed read from the object store, reads of evicted segments fail at once for this
/// long (a search listing items then shows them without their subjects, quickly).
const FETCH_PAUSE_MS: u64 = 5_000;

/// The catalog and the segment files.
pub struct Store {
    env: Env<WithoutTls>,
    items: Database<U64<BE>, Bytes>,
    keys: Database<Bytes, U64<BE>>,
    blobs: Database<Bytes, Bytes>,
    meta: Database<Str, U64<BE>>,
    /// While a rebuild runs: what the records read so far say of each item (`rebuild.rs`).
    rebuild: Database<U64<BE>, U64<BE>>,
    /// Hashes by name: the chain's head (`chain.head`) and the key that signs its checkpoints
    /// now (`chain.signer`).
    hashes: Database<Str, Bytes>,
    segments_dir: PathBuf,
    open_files: Mutex<HashMap<u32, Arc<File>>>,
    remote: Option<Remote>,
    /// Local bytes of confirmed sealed segments to keep.
    cache_bytes: u64,
    /// When each segment was last read (a counter), for evicting the least recently read.
    last_read: Mutex<HashMap<u32, u64>>,
    reads: AtomicU64,
    /// When a read from the object store last failed (ms): reads soon after fail at once
    /// instead of each waiting for its own timeouts and retries.
    fetch_failed_ms: AtomicU64,
    /// Segments brought back whole for a bulk read, not evicted until released.
    pinned: Mutex<std::collections::HashSet<u32>>,
    /// Object store traffic since start.
    pub remote_counters: RemoteCounters,
    /// This unit's node name, for the manifest it creates.
    node: String,
    /// Whether the object store's prefix was found to be this archive's (nothing is written
    /// there before).
    claimed: std::sync::atomic::AtomicBool,
    /// One claim at a time: the daemon's check at start and the upload thread's first pass
    /// would otherwise each make an id.
    claiming: Mutex<()>,
    /// How long a new archive waits after writing its manifest before reading it back.
    claim_settle: std::time::Duration,
    /// One upkeep pass at a time: a pass that evicts a confirmed segment's file must not run
    /// beside one still uploading it (the upload thread's pass and an explicit one).
    upkeep: Mutex<()>,
    /// Adopt the object store's prefix when its manifest names this archive id and the catalog
    /// is empty (a new unit rebuilding a lost one's archive).
    adopt: Option<ArchiveId>,
    /// How far a rebuild got.
    pub rebuild_progress: RebuildProgress,
    /// When checkpoints last went to the object store (this process). Held while checkpoints
    /// are uploaded or adopted, so that the checkpoints file's length and its upload cursor are
    /// read and moved together.
    checkpoints_uploaded: Mutex<Option<std::time::Instant>>,
    /// The keys that open sealed records (and, when sealing is on, seal new ones); replaced
    /// whole at a rotation.
    keyring: std::sync::RwLock<Option<Arc<Keyring>>>,
    /// Write no item records, as versions before them (tests of the migration).
    #[cfg(test)]
    pub(crate) as_before_item_records: std::sync::atomic::AtomicBool,
}

/// A segment's bytes for a proof: a local file mapped, or an object read; with the length to
/// read, if not all.
pub enum SegmentBytes {
    /// A local file, mapped.
    Mapped(memmap2::Mmap, Option<usize>),
    /// Read from the object store.
    Read(Vec<u8>, Option<usize>),
}

impl SegmentBytes {
    fn cut(self, len: Option<u64>) -> SegmentBytes {
        let len = len.map(|l| l as usize);
        match self {
            SegmentBytes::Mapped(m, _) => SegmentBytes::Mapped(m, len),
            SegmentBytes::Read(v, _) => SegmentBytes::Read(v, len),
        }
    }
}

impl std::ops::Deref for SegmentBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let (all, len): (&[u8], Option<usize>) = match self {
            SegmentBytes::Mapped(m, len) => (m, *len),
            SegmentBytes::Read(v, len) => (v, *len),
        };
        &all[..len.unwrap_or(all.len()).min(all.len())]
    }
}

/// A segment a proof reads: its number, and the length to read (`None`: whole).
pub type ToRead = (u32, Option<u64>);

/// Object store traffic since start.
#[derive(Debug, Default)]
pub struct RemoteCounters {
    /// Segments uploaded and confirmed.
    pub uploads: AtomicU64,
    /// Bytes of them.
    pub upload_bytes: AtomicU64,
    /// Uploads (or confirmations) that failed.
    pub upload_failures: AtomicU64,
    /// Records read from the store (not in the local cache).
    pub fetches: AtomicU64,
    /// Reads from the store that failed.
    pub fetch_failures: AtomicU64,
    /// Objects deleted (replaced by compaction).
    pub deletes: AtomicU64,
    /// Local copies evicted from the cache.
    pub evictions: AtomicU64,
}

/// What one [`Store::sync_remote`] pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Segments uploaded and confirmed.
    pub uploaded: u32,
    /// Replaced objects deleted.
    pub deleted: u32,
    /// Local copies evicted.
    pub evicted: u32,
}

/// A segment as the catalog knows it.
#[derive(Clone, Copy, Debug)]
struct Segment {
    n: u32,
    total: u64,
    live: u64,
    remote: bool,
    sealed_ms: u64,
}

/// A body compressed and hashed off the writer thread, ready to be stored.
pub struct Prepared {
    /// The item (its `seq` is assigned by the writer).
    pub item: Item,
    /// zstd of the raw bytes.
    pub compressed: Vec<u8>,
}

/// What became of a stored item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Its sequence number here.
    pub seq: u64,
    /// False when the same message (same body and envelope) was archived before.
    pub new: bool,
}

/// The writer thread's work.
pub enum Request {
    /// Store items durably.
    Store(Box<Prepared>, Sender<Result<Stored, ArchiveError>>),
    /// Remove these items by this rule (retention: `retention 365 days`), a tombstone each;
    /// answers the sequences removed.
    Remove(Vec<u64>, String, Sender<Result<Vec<u64>, ArchiveError>>),
    /// Put these items on legal hold (`true`) or release them; answers how many changed.
    Hold(Vec<u64>, bool, Sender<Result<u64, ArchiveError>>),
    /// Rewrite sealed segments whose live share is below the bound (percent).
    Compact(u32, Sender<Result<CompactReport, ArchiveError>>),
    /// Add a data key to the keyring (saved first), which seals from now on; the chain names it.
    RotateKey(Sender<Result<KeyInfo, ArchiveError>>),
    /// Rewrite every segment holding a record in clear or sealed with another key than the
    /// current one, sealing each with it (the open segment is sealed first when it holds one).
    Rekey(Sender<Result<CompactReport, ArchiveError>>),
    /// Seal the open segment now if it holds anything; answers the segment sealed.
    Seal(Sender<Result<Option<u32>, ArchiveError>>),
    /// Rebuild the catalog from the segments (an empty or rebuilding catalog only).
    Rebuild(Sender<Result<Rebuilt, ArchiveError>>),
    /// Sign a checkpoint now if entries wait for one.
    Checkpoint(Sender<()>),
    /// Finish: the archive is closing.
    Stop,
}

/// Result of a compaction pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Segments rewritten and deleted.
    pub segments: u32,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Records sealed anew with the current key (a rekey).
    pub resealed: u64,
}

/// Counters of the whole store.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    /// Items.
    pub items: u64,
    /// Raw bytes of all items.
    pub raw_bytes: u64,
    /// Items on hold.
    pub held: u64,
    /// Bytes in segment files.
    pub stored_bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Sealed segments confirmed in the object store, and their bytes.
    pub remote_segments: u64,
    /// Bytes of them.
    pub remote_bytes: u64,
    /// Sealed segments waiting for upload, their bytes, and when the oldest was sealed (ms).
    pub pending_segments: u64,
    /// Bytes of them.
    pub pending_bytes: u64,
    /// When the oldest waiting segment was sealed (ms since the epoch), 0 with none.
    pub pending_oldest_ms: u64,
    /// Bytes of confirmed segments also kept locally (the read cache).
    pub cached_bytes: u64,
}

fn seg_key(n: u32, what: &str) -> String {
    format!("seg.{n:08}.{what}")
}

fn seg_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

fn io(e: std::io::Error) -> ArchiveError {
    ArchiveError::Io(e.to_string())
}

impl Store {
    /// Opens (creating) the store under `dir`, cutting a torn tail off the open segment and
    /// deleting segments the catalog no longer refers to (a compaction that crashed after its
    /// commit).
    pub fn open(dir: &Path) -> Result<Store, ArchiveError> {
        Store::open_with(dir, None, 0, "")
    }

    /// [`Store::open`], with sealed segments kept in an object store and `cache_bytes` of them
    /// kept locally; `node` is this unit's name, written in the manifest of a prefix it claims.
    pub fn open_with(
        dir: &Path,
        remote: Option<Remote>,
        cache_bytes: u64,
        node: &str,
    ) -> Result<Store, ArchiveError> {
        let catalog = dir.join("catalog");
        let segments_dir = dir.join("segments");
        std::fs::create_dir_all(&catalog).map_err(io)?;
        std::fs::create_dir_all(&segments_dir).map_err(io)?;
        // Without thread-local reader slots: LMDB's default ties a slot to every thread that ever
        // read until that thread ends, and archiving runs on the runtime's blocking threads (up to
        // 512 of them), which exhausted the default table of 126 (MDB_READERS_FULL). Here a slot is
        // held only for the life of a read transaction, and the table is sized beyond the
        // blocking-thread limit anyway.
        // SAFETY: the environment is opened once per process (spoold owns its archive dir).
        let env = unsafe {
            EnvOpenOptions::new()
                .read_txn_without_tls()
                .max_readers(READERS_MAX)
                .map_size(1 << 38)
                .max_dbs(8)
                .open(&catalog)?
        };
        let mut w = env.write_txn()?;
        let items = env.create_database(&mut w, Some("items"))?;
        let keys = env.create_database(&mut w, Some("keys"))?;
        let blobs = env.create_database(&mut w, Some("blobs"))?;
        let meta = env.create_database(&mut w, Some("meta"))?;
        let rebuild = env.create_database(&mut w, Some("rebuild"))?;
        let hashes = env.create_database(&mut w, Some("hashes"))?;
        w.commit()?;
        let store = Store {
            env,
            items,
            keys,
            blobs,
            meta,
            rebuild,
            hashes,
            segments_dir,
            open_files: Mutex::new(HashMap::new()),
            remote,
            cache_bytes,
            last_read: Mutex::new(HashMap::new()),
            reads: AtomicU64::new(0),
            fetch_failed_ms: AtomicU64::new(0),
            pinned: Mutex::new(std::collections::HashSet::new()),
            remote_counters: RemoteCounters::default(),
            node: node.to_string(),
            claimed: std::sync::atomic::AtomicBool::new(false),
            claiming: Mutex::new(()),
            claim_settle: CLAIM_SETTLE,
            upkeep: Mutex::new(()),
            adopt: None,
            rebuild_progress: RebuildProgress::default(),
            checkpoints_uploaded: Mutex::new(None),
            keyring: std::sync::RwLock::new(None),
            #[cfg(test)]
            as_before_item_records: std::sync::atomic::AtomicBool::new(false),
        };
        store.notice_a_lost_catalog()?;
        if !store.rebuilding()? {
            store.tidy_segments()?;
        }
        Ok(store)
    }

    /// The keyring that opens sealed records, if any.
    pub fn keyring(&self) -> Option<Arc<Keyring>> {
        self.keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets the keyring (at open, and at a rotation).
    pub fn set_keyring(&self, keys: Option<Arc<Keyring>>) {
        *self.keyring.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// The id of the data key the chain names now, if records were ever sealed.
    pub fn chain_key(&self) -> Result<Option<u32>, ArchiveError> {
        let r = self.env.read_txn()?;
        Ok(self.meta.get(&r, CHAIN_KEY)?.map(|id| id as u32))
    }

    /// A new catalog beside segments that hold records: the catalog was lost. The segments are
    /// kept (not tidied away as unknown) and a rebuild is marked needed.
    fn notice_a_lost_catalog(&self) -> Result<(), ArchiveError> {
        let mut w = self.env.write_txn()?;
        let fresh = self.meta.get(&w, OPEN_SEGMENT)?.is_none() && self.items.first(&w)?.is_none();
        if !fresh || self.meta.get(&w, REBUILDING)?.is_some() {
            return Ok(());
        }
        let holds_records = std::fs::read_dir(&self.segments_dir)
            .map_err(io)?
            .flatten()
            .any(|e| {
                e.path().extension().is_some_and(|x| x == "seg")
                    && e.metadata().is_ok_and(|m| m.len() > 0)
            });
        if holds_records {
            tracing::warn!(
                dir = %self.segments_dir.display(),
                "archive: segments without a catalog: the catalog is rebuilt from them"
            );
            self.meta.put(&mut w, REBUILDING, &1)?;
            w.commit()?;
        }
        Ok(())
    }

    /// Adopts the prefix whose manifest names archive `id`, if this catalog is empty (see
    /// [`crate::identity::adoptable`]).
    pub fn set_adopt(&mut self, id: Option<ArchiveId>) {
        self.adopt = id;
    }

    fn tidy_segments(&self) -> Result<(), ArchiveError> {
        let r = self.env.read_txn()?;
        let open = self.meta.get(&r, OPEN_SEGMENT)?.unwrap_or(1) as u32;
        let open_len = self.meta.get(&r, OPEN_LEN)?.unwrap_or(0);
        for entry in std::fs::read_dir(&self.segments_dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "part") {
                // A segment download cut short.
                std::fs::remove_file(&path).map_err(io)?;
                continue;
            }
            let Some(n) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let known = self.meta.get(&r, &seg_key(n, "total"))?.is_some();
            if n != open && !known {
                tracing::warn!(
                    segment = n,
                    "archive: segment no longer in the catalog removed"
                );
                std::fs::remove_file(&path).map_err(io)?;
            }
        }
        let path = seg_path(&self.segments_dir, open);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        if len > open_len {
            tracing::warn!(
                segment = open,
                bytes = len - open_len,
                "archive: uncommitted tail of the open segment cut"
            );
            f.set_len(open_len).map_err(io)?;
            f.sync_all().map_err(io)?;
        } else if len < open_len {
            return Err(ArchiveError::Corrupt(format!(
                "segment {} is {len} bytes, the catalog committed {open_len}",
                path.display()
            )));
        }
        sync_dir(&self.segments_dir)?;
        Ok(())
    }

    fn file(&self, n: u32) -> std::io::Result<Arc<File>> {
        let mut files = self.open_files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(&n) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(seg_path(&self.segments_dir, n))?);
        if files.len() > 256 {
            files.clear();
        }
        files.insert(n, f.clone());
        Ok(f)
    }

    /// A read transaction.
    pub fn read(&self) -> Result<RoTxn<'_, WithoutTls>, ArchiveError> {
        Ok(self.env.read_txn()?)
    }

    /// The item numbered `seq`.
    pub fn item(&self, r: &RoTxn<'_, WithoutTls>, seq: u64) -> Result<Option<Item>, ArchiveError> {
        match self.items.get(r, &seq)? {
            None => Ok(None),
            Some(b) => Item::decode(b)
                .map(Some)
                .ok_or_else(|| ArchiveError::Corrupt(format!("catalog item {seq} undecodable"))),
        }
    }

    /// The item stored under a dedup key, if any.
    pub fn seq_of_key(&self, key: &[u8; 32]) -> Result<Option<u64>, ArchiveError> {
        let r = self.env.read_txn()?;
        Ok(self.keys.get(&r, key)?)
    }

    /// Up to `limit` items after `seq`, in order, those matching `keep`.
    pub fn items_after(
        &self,
        seq: u64,
        limit: usize,
        keep: impl Fn(&Item) -> bool,
    ) -> Result<Vec<Item>, ArchiveError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for kv in self.items.range(&r, &(seq.saturating_add(1)..))? {
            let (s, b) = kv?;
            let item = Item::decode(b)
                .ok_or_else(|| ArchiveError::Corrupt(format!("catalog item {s} undecodable")))?;
            if keep(&item) {
                out.push(item);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Count of items after `seq` matching `keep`, and the oldest one's archive time.
    pub fn backlog_after(
        &self,
        seq: u64,
        keep: impl Fn(&Item) -> bool,
    ) -> Result<(u64, Option<u64>), ArchiveError> {
        let r = self.env.read_txn()?;
        let (mut n, mut oldest) = (0, None);
        for kv in self.items.range(&r, &(seq.saturating_add(1)..))? {
            let (_, b) = kv?;
            if let Some(item) = Item::decode(b).filter(|i| keep(i)) {
                n += 1;
                oldest.get_or_insert(item.archived_ms);
            }
        }
        Ok((n, oldest))
    }

    /// The highest sequence number handed out.
    pub fn last_seq(&self) -> Result<u64, ArchiveError> {
        let r = self.env.read_txn()?;
        Ok(self.meta.get(&r, NEXT_SEQ)?.unwrap_or(1).saturating_sub(1))
    }

    /// The compressed frame payload of a body, checksum verified.
    pub fn compressed(&self, hash: &[u8; 32]) -> Result<(Vec<u8>, u64), ArchiveError> {
        let loc = {
            let r = self.env.read_txn()?;
            self.blobs
                .get(&r, hash)?
                .and_then(BlobLoc::decode)
                .ok_or_else(|| ArchiveError::Corrupt(format!("no body stored for {}", hex(hash))))?
        };
        let buf = self.read_record(loc.segment, loc.offset, u64::from(loc.len))?;
        let keys = self.keyring();
        let mut opened = Vec::new();
        let (got, compressed) = record::unframe_opened(&buf, keys.as_deref(), &mut opened)
            .map_err(|e| {
                ArchiveError::Corrupt(format!(
                    "segment {} offset {}: {e}",
                    loc.segment, loc.offset
                ))
            })?;
        if &got != hash {
            return Err(ArchiveError::Corrupt(format!(
                "segment {} offset {}: record of another body",
                loc.segment, loc.offset
            )));
        }
        Ok((compressed.to_vec(), loc.raw_len))
    }

    /// Bytes of a segment: from the local file when there is one, else from the object store.
    fn read_record(&self, n: u32, offset: u64, len: u64) -> Result<Vec<u8>, ArchiveError> {
        let tick = self.reads.fetch_add(1, Ordering::Relaxed);
        self.last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n, tick);
        let mut buf = vec![0u8; len as usize];
        match self.file(n).and_then(|f| f.read_exact_at(&mut buf, offset)) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(remote) = &self.remote else {
                    return Err(ArchiveError::Corrupt(format!(
                        "segment {n} is not on disk{}",
                        if self.segment(n)?.is_some_and(|s| s.remote) {
                            " (it is in an object store, which is not configured)"
                        } else {
                            ""
                        }
                    )));
                };
                let failed = self.fetch_failed_ms.load(Ordering::Relaxed);
                if now_ms().saturating_sub(failed) < FETCH_PAUSE_MS {
                    return Err(ArchiveError::Remote(format!(
                        "segment {n} is in the object store, which failed a read less than {} s ago",
                        FETCH_PAUSE_MS / 1000
                    )));
                }
                let c = &self.remote_counters;
                c.fetches.fetch_add(1, Ordering::Relaxed);
                remote.read_range(n, offset, len).inspect_err(|_| {
                    c.fetch_failures.fetch_add(1, Ordering::Relaxed);
                    self.fetch_failed_ms.store(now_ms(), Ordering::Relaxed);
                })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The whole of segment `n`, local or fetched.
    fn read_segment(&self, n: u32) -> Result<Vec<u8>, ArchiveError> {
        match std::fs::read(seg_path(&self.segments_dir, n)) {
            Ok(data) => Ok(data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match &self.remote {
                Some(remote) => remote.read_all(n),
                None => Err(io(e)),
            },
            Err(e) => Err(io(e)),
        }
    }

    /// What a proof of the archive reads, as of one catalog snapshot: the chain's head, and
    /// each segment with the length to read (the open segment's committed length; sealed ones
    /// whole).
    pub fn proof_snapshot(&self) -> Result<(Head, Vec<ToRead>), ArchiveError> {
        let r = self.env.read_txn()?;
        let head = self.chain_head(&r)?;
        let open = self.meta.get(&r, OPEN_SEGMENT)?.unwrap_or(1) as u32;
        let open_len = self.meta.get(&r, OPEN_LEN)?.unwrap_or(0);
        let segments = self
            .segments_in(&r)?
            .into_iter()
            .map(|s| (s.n, (s.n == open).then_some(open_len)))
            .collect();
        Ok((head, segments))
    }

    /// Segment `n`'s bytes, up to `len` if given (the proof's reads).
    /// A local file is mapped, not read (a segment is up to 256 MiB); one only in the store is
    /// read from it whole.
    pub fn segment_bytes(&self, n: u32, len: Option<u64>) -> Result<SegmentBytes, ArchiveError> {
        let bytes = match File::open(seg_path(&self.segments_dir, n)) {
            Ok(f) if f.metadata().map_err(io)?.len() > 0 => {
                // SAFETY: segment files are only appended to while this unit runs (the open
                // segment grows past what is read; sealed ones never change); a compaction may
                // unlink one, which leaves the mapping valid. The torn-tail cut happens only at
                // open, before anything can read.
                SegmentBytes::Mapped(unsafe { memmap2::Mmap::map(&f) }.map_err(io)?, None)
            }
            Ok(_) => SegmentBytes::Read(Vec::new(), None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                SegmentBytes::Read(self.read_segment(n)?, None)
            }
            Err(e) => return Err(io(e)),
        };
        Ok(bytes.cut(len))
    }

    /// The segment holding a body.
    pub fn segment_of(&self, hash: &[u8; 32]) -> Result<Option<u32>, ArchiveError> {
        let r = self.env.read_txn()?;
        Ok(self
            .blobs
            .get(&r, hash)?
            .and_then(BlobLoc::decode)
            .map(|l| l.segment))
    }

    /// Brings segment `n` back from the object store into the local cache whole, for a read of
    /// many of its records (one GET instead of one per record), and keeps it from eviction
    /// until [`Store::release`]. Nothing to do when it is local or not in the store.
    pub fn fetch_segment(&self, n: u32) -> Result<(), ArchiveError> {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n);
        let path = seg_path(&self.segments_dir, n);
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        if path.exists() || !self.segment(n)?.is_some_and(|s| s.remote) {
            return Ok(());
        }
        let part = path.with_extension("part");
        let c = &self.remote_counters;
        c.fetches.fetch_add(1, Ordering::Relaxed);
        let got = remote
            .download(n, &part)
            .and_then(|_| std::fs::rename(&part, &path).map_err(io));
        if got.is_err() {
            c.fetch_failures.fetch_add(1, Ordering::Relaxed);
            let _ = std::fs::remove_file(&part);
        }
        got
    }

    /// Lets segment `n` be evicted again.
    pub fn release(&self, n: u32) {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&n);
    }

    fn segment(&self, n: u32) -> Result<Option<Segment>, ArchiveError> {
        Ok(self.segments()?.into_iter().find(|s| s.n == n))
    }

    /// Every segment the catalog counts, in order, the open one included.
    fn segments(&self) -> Result<Vec<Segment>, ArchiveError> {
        let r = self.env.read_txn()?;
        self.segments_in(&r)
    }

    /// [`Store::segments`], as transaction `r` sees them (a write transaction's own changes).
    fn segments_in(&self, r: &RoTxn<'_>) -> Result<Vec<Segment>, ArchiveError> {
        let mut out = Vec::new();
        for kv in self.meta.prefix_iter(r, "seg.")? {
            let (k, total) = kv?;
            let Some(n) = k
                .strip_prefix("seg.")
                .and_then(|s| s.strip_suffix(".total"))
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            out.push(Segment {
                n,
                total,
                live: self.meta.get(r, &seg_key(n, "live"))?.unwrap_or(0),
                remote: self.meta.get(r, &seg_key(n, "remote"))?.is_some(),
                sealed_ms: self.meta.get(r, &seg_key(n, "sealed"))?.unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// One pass of the object store's upkeep: uploads sealed segments not yet there (oldest
    /// first) and marks each once confirmed; deletes objects compaction replaced once their
    /// records' new segment is confirmed; evicts the least recently read local copies of
    /// confirmed segments past `cache_bytes`. Stops at the first failure (the caller backs off).
    pub fn sync_remote(&self) -> Result<SyncReport, ArchiveError> {
        let Some(remote) = &self.remote else {
            return Ok(SyncReport::default());
        };
        let _one = self.upkeep.lock().unwrap_or_else(|p| p.into_inner());
        self.claim()?;
        let c = &self.remote_counters;
        let mut report = SyncReport::default();
        let (open, replaced, segments) = {
            let r = self.env.read_txn()?;
            let open = self.meta.get(&r, OPEN_SEGMENT)?.unwrap_or(1) as u32;
            let replaced = self.meta.prefix_iter(&r, "gone.")?.next().is_some();
            (open, replaced, self.segments_in(&r)?)
        };
        let to_upload: Vec<Segment> = segments
            .into_iter()
            .filter(|s| s.n != open && !s.remote)
            .collect();
        if replaced || !to_upload.is_empty() {
            // One read of the manifest per pass that writes: a replaced unit stops here. A
            // store that does not answer fails the pass's uploads here: counted as such.
            if let Err(e) = self.check_still_writer(remote) {
                c.upload_failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        }
        for seg in to_upload {
            let path = seg_path(&self.segments_dir, seg.n);
            let bytes = match remote.upload(seg.n, &path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    c.upload_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            };
            let mut w = self.env.write_txn()?;
            let still = self.meta.get(&w, &seg_key(seg.n, "total"))?.is_some();
            if still {
                self.meta.put(&mut w, &seg_key(seg.n, "remote"), &1)?;
            }
            w.commit()?;
            if !still {
                // Compacted away while it was uploading.
                remote.delete(seg.n)?;
                continue;
            }
            c.uploads.fetch_add(1, Ordering::Relaxed);
            c.upload_bytes.fetch_add(bytes, Ordering::Relaxed);
            report.uploaded += 1;
            tracing::info!(
                segment = seg.n,
                bytes,
                "archive: segment in the object store"
            );
        }
        self.upload_checkpoints(remote, report.uploaded > 0)?;
        // Replaced objects whose records' new home is confirmed.
        let gone: Vec<(u32, u32)> = {
            let r = self.env.read_txn()?;
            let mut v = Vec::new();
            for kv in self.meta.prefix_iter(&r, "gone.")? {
                let (k, holder) = kv?;
                if let Some(n) = k.strip_prefix("gone.").and_then(|s| s.parse().ok()) {
                    v.push((n, holder as u32));
                }
            }
            v
        };
        for (n, holder) in gone {
            if !self.segment(holder)?.is_some_and(|s| s.remote) {
                continue;
            }
            remote.delete(n)?;
            let mut w = self.env.write_txn()?;
            self.meta.delete(&mut w, &format!("gone.{n:08}"))?;
            w.commit()?;
            c.deletes.fetch_add(1, Ordering::Relaxed);
            report.deleted += 1;
        }
        report.evicted = self.evict(open, self.cache_bytes)?;
        Ok(report)
    }

    /// Sets how long a new archive waits before reading its manifest back (tests on a store
    /// that honours `If-None-Match` need not wait).
    pub fn set_claim_settle(&mut self, settle: std::time::Duration) {
        self.claim_settle = settle;
    }

    /// This archive's id, once it has met its object store.
    pub fn archive_id(&self) -> Result<Option<ArchiveId>, ArchiveError> {
        let r = self.env.read_txn()?;
        get_id(&self.meta, &r, ARCHIVE_ID)
    }

    /// The archive's directory (`catalog/`, `segments/`, `checkpoints`).
    pub fn dir(&self) -> &Path {
        self.segments_dir.parent().unwrap_or(&self.segments_dir)
    }

    /// Where the hash chain stands, as committed.
    fn chain_head(&self, r: &RoTxn<'_, WithoutTls>) -> Result<Head, ArchiveError> {
        Ok(Head {
            next: self.meta.get(r, CHAIN_NEXT)?.unwrap_or(0),
            hash: self
                .hashes
                .get(r, CHAIN_HEAD)?
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 32]),
        })
    }

    /// The key the chain names as its signer now.
    fn chain_signer(&self, r: &RoTxn<'_, WithoutTls>) -> Result<Option<[u8; 32]>, ArchiveError> {
        Ok(self
            .hashes
            .get(r, CHAIN_SIGNER)?
            .and_then(|b| b.try_into().ok()))
    }

    /// Puts the checkpoints signed since the last upload into the store as one object, with a
    /// pass that uploaded a segment or once [`CHECKPOINTS_TO_STORE_EVERY`] has passed (a
    /// checkpoint comes every minute or 1,000 entries: an object each would be too many). The
    /// cursor counts the checkpoints file's bytes the store holds.
    fn upload_checkpoints(&self, remote: &Remote, with_segment: bool) -> Result<(), ArchiveError> {
        // The file's length and the cursor are read under the lock, which the adoption of a
        // lost unit's checkpoints holds too (passes themselves run one at a time, under
        // `upkeep`): read before it, a pass could see the adopted file with the cursor not yet
        // moved and upload the store's own checkpoints from offset 0, over the lost unit's
        // first object on a store that ignores `If-None-Match` (twice in the store then).
        let mut last = self
            .checkpoints_uploaded
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // After a rebuild, nothing goes up before the writer has taken the store's checkpoints
        // in (it alone appends to the file).
        if self.checkpoints_to_take_in()? {
            return Ok(());
        }
        let path = self.dir().join(checkpoint::FILE);
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        let done = self.cursor(STORE_CHECKPOINTS)?;
        let due = with_segment || last.is_none_or(|t| t.elapsed() >= CHECKPOINTS_TO_STORE_EVERY);
        if len <= done || !due {
            return Ok(());
        }
        let lines = checkpoint::lines_after(&path, done, 100_000)?;
        if lines.is_empty() {
            return Ok(());
        }
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        self.check_still_writer(remote)?;
        remote.put_checkpoints(done, &text)?;
        self.set_cursor(STORE_CHECKPOINTS, done + text.len() as u64)?;
        *last = Some(std::time::Instant::now());
        Ok(())
    }

    /// Whether a rebuild left the store's checkpoints to take in.
    fn checkpoints_to_take_in(&self) -> Result<bool, ArchiveError> {
        let r = self.env.read_txn()?;
        Ok(self.meta.get(&r, CHECKPOINTS_TO_TAKE_IN)?.is_some())
    }

    /// After a rebuild (whose last transaction set [`CHECKPOINTS_TO_TAKE_IN`]): the local
    /// checkpoints file becomes the store's checkpoints, in the store's order, followed by any
    /// line of its own that the store lacks (signed after the rebuild, or never uploaded), and
    /// the upload cursor points past the store's part. A rebuilt catalog starts its cursor at
    /// 0: uploading the local file from there would put lines the store holds under a new
    /// offset, or over the lost unit's first object on a store that ignores `If-None-Match`.
    /// The file is replaced whole (a temporary file renamed over it), then the cursor and the
    /// flag go in one transaction: a crash anywhere leaves the flag, and the next call does it
    /// again. Call from the writer (the only one that appends to the file) with the uploads
    /// lock held. Answers, when it took them in, the entries the last checkpoint signs and the
    /// lines of the file.
    fn take_in_checkpoints(&self, remote: &Remote) -> Result<Option<(u64, usize)>, ArchiveError> {
        if !self.checkpoints_to_take_in()? {
            return Ok(None);
        }
        let mut theirs = remote.checkpoints()?;
        if !theirs.is_empty() && !theirs.ends_with('\n') {
            theirs.push('\n');
        }
        let path = self.dir().join(checkpoint::FILE);
        let local = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let in_store: std::collections::HashSet<&str> = theirs.lines().collect();
        let own: String = local
            .lines()
            .filter(|l| !l.trim().is_empty() && !in_store.contains(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let merged = format!("{theirs}{own}");
        if merged != local {
            checkpoint::replace(self.dir(), &merged)?;
        }
        let mut w = self.env.write_txn()?;
        self.meta.put(
            &mut w,
            &cursor_key(STORE_CHECKPOINTS),
            &(theirs.len() as u64),
        )?;
        self.meta.delete(&mut w, CHECKPOINTS_TO_TAKE_IN)?;
        w.commit()?;
        let signed = checkpoint::parse(&merged)
            .0
            .last()
            .map_or(0, |(_, cp)| cp.entries);
        Ok(Some((signed, merged.lines().count())))
    }

    /// The archive's id: the one the catalog has, or `proposed`, recorded now. The two makers of
    /// an id (a claim of the object store, the chain's genesis) race; the catalog's write lock
    /// makes the first one the id.
    fn ensure_archive_id(&self, proposed: ArchiveId) -> Result<ArchiveId, ArchiveError> {
        let mut w = self.env.write_txn()?;
        if let Some(id) = get_id(&self.meta, &w, ARCHIVE_ID)? {
            return Ok(id);
        }
        put_id(&self.meta, &mut w, ARCHIVE_ID, proposed)?;
        w.commit()?;
        Ok(proposed)
    }

    /// This catalog's writer id, once it created or adopted its archive's manifest.
    fn writer_id(&self) -> Result<Option<ArchiveId>, ArchiveError> {
        let r = self.env.read_txn()?;
        get_id(&self.meta, &r, WRITER_ID)
    }

    /// The writer id of a catalog that creates or adopts its archive's manifest: the one it
    /// has, or a new one recorded now.
    fn make_writer_id(&self) -> Result<ArchiveId, ArchiveError> {
        if let Some(w) = self.writer_id()? {
            return Ok(w);
        }
        let w = ArchiveId::random();
        let mut txn = self.env.write_txn()?;
        put_id(&self.meta, &mut txn, WRITER_ID, w)?;
        txn.commit()?;
        Ok(w)
    }

    /// Checks, before a pass writes under the prefix, that no other unit adopted the archive
    /// since this one claimed it: a unit that was replaced writes nothing more.
    fn check_still_writer(&self, remote: &Remote) -> Result<(), ArchiveError> {
        let Some(m) = remote.manifest()? else {
            return Ok(());
        };
        crate::identity::still_writer(self.writer_id()?, &m).map_err(|why| {
            self.claimed
                .store(false, std::sync::atomic::Ordering::Release);
            ArchiveError::NotOurs(format!("prefix {:?} of the bucket: {why}", remote.prefix()))
        })
    }

    /// Adopts the prefix of archive `adopt` for this (empty) catalog: the manifest names this
    /// catalog its writer, then the catalog takes the archive's id and marks a rebuild. Answers
    /// why it may not, if it may not (`crate::identity::adoptable`).
    fn adopt_prefix(
        &self,
        remote: &Remote,
        adopt: ArchiveId,
        ours: Option<ArchiveId>,
        found: &Found,
    ) -> Result<Option<String>, ArchiveError> {
        let empty = self.rebuilding()? || self.totals()?.items == 0;
        if let Err(no) = crate::identity::adoptable(adopt, ours, empty, found) {
            return Ok(Some(no));
        }
        // The manifest first: from then on the unit it names (if it comes back) writes nothing
        // more. A crash before the commit below adopts again.
        let writer = self.make_writer_id()?;
        if let Some(m) = &found.manifest {
            remote.replace_manifest(&Manifest {
                node: self.node.clone(),
                writer: Some(writer.to_string()),
                adopted_ms: Some(now_ms()),
                ..m.clone()
            })?;
        }
        // The id and the rebuild mark in one commit: from now on the prefix is this archive's,
        // and its catalog is rebuilt before anything is written.
        let mut w = self.env.write_txn()?;
        put_id(&self.meta, &mut w, ARCHIVE_ID, adopt)?;
        self.meta.put(&mut w, REBUILDING, &1)?;
        w.commit()?;
        self.rebuild_progress.pending.store(true, Ordering::SeqCst);
        tracing::warn!(archive = %adopt, prefix = remote.prefix(), "archive: adopted the object store's prefix; the catalog is rebuilt from it");
        Ok(None)
    }

    /// Makes sure the object store's prefix is this archive's before anything is written there
    /// (`crate::identity`): answers at once once it was; creates the manifest of a new
    /// archive (its id recorded in the catalog first, so a crash in between finds it again);
    /// refuses a prefix that belongs to another archive.
    pub fn claim(&self) -> Result<(), ArchiveError> {
        use std::sync::atomic::Ordering::{Acquire, Release};
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        if self.claimed.load(Acquire) {
            return Ok(());
        }
        let _one = self.claiming.lock().unwrap_or_else(|p| p.into_inner());
        if self.claimed.load(Acquire) {
            return Ok(());
        }
        let ours = self.archive_id()?;
        let uploaded_here = {
            let r = self.env.read_txn()?;
            let mut marks = self.meta.prefix_iter(&r, "seg.")?;
            let any = marks.any(|kv| kv.is_ok_and(|(k, _)| k.ends_with(".remote")));
            drop(marks);
            any || self.meta.prefix_iter(&r, "gone.")?.next().is_some()
        };
        // The prefix is listed only when there is no manifest: that is the one case the
        // segments decide, and a prefix of a large archive holds many thousands of them.
        let found = |manifest: Option<Manifest>| -> Result<Found, ArchiveError> {
            let segments = manifest.is_none() && !remote.list()?.is_empty();
            Ok(Found { manifest, segments })
        };
        let refused = |why: String| {
            ArchiveError::NotOurs(format!(
                "prefix {:?} of the bucket: {why}; nothing is written there (give each archive its own prefix)",
                remote.prefix()
            ))
        };
        let mut ours = ours;
        for _attempt in 0..3 {
            let looked = std::time::Instant::now();
            let manifest = remote.manifest()?;
            match decide(ours, uploaded_here, &found(manifest.clone())?) {
                Claim::Ours => {
                    if let Some(m) = &manifest {
                        crate::identity::still_writer(self.writer_id()?, m).map_err(refused)?;
                    }
                    self.claimed.store(true, Release);
                    return Ok(());
                }
                Claim::Refuse(why) => match self.adopt {
                    None => {
                        // A new unit meeting another archive: say how a replacement takes it.
                        let hint = match (&manifest, ours) {
                            (Some(m), None) => format!(
                                " (a unit replacing that archive's lost unit takes it over with `archive.object_store.adopt = \"{}\"`, then rebuilds)",
                                m.archive
                            ),
                            _ => String::new(),
                        };
                        return Err(refused(format!("{why}{hint}")));
                    }
                    Some(adopt) => {
                        let found = found(remote.manifest()?)?;
                        if let Some(no) = self.adopt_prefix(remote, adopt, ours, &found)? {
                            return Err(refused(format!("{why}; it cannot be adopted: {no}")));
                        }
                        self.claimed.store(true, Release);
                        return Ok(());
                    }
                },
                Claim::Create(id) => {
                    // The id first: a crash before the manifest is written finds it again. The
                    // chain's genesis may have made one since this pass looked: that one.
                    let id = self.ensure_archive_id(id)?;
                    ours = Some(id);
                    let writer = self.make_writer_id()?;
                    remote.create_manifest(&Manifest {
                        format: MANIFEST_FORMAT,
                        archive: id.to_string(),
                        node: self.node.clone(),
                        created_ms: now_ms(),
                        writer: Some(writer.to_string()),
                        adopted_ms: None,
                    })?;
                    // A store that ignores `If-None-Match` (Garage 2.5 does) keeps the last
                    // writer's manifest. Another unit that looked before this one wrote has
                    // written within `claim_settle / 2` of its look; after `claim_settle` every
                    // racer reads the same last manifest. A look this old is tried again.
                    if !self.claim_settle.is_zero() && looked.elapsed() > self.claim_settle / 2 {
                        continue;
                    }
                    std::thread::sleep(self.claim_settle);
                    if let Claim::Refuse(why) =
                        decide(Some(id), uploaded_here, &found(remote.manifest()?)?)
                    {
                        return Err(refused(why));
                    }
                    tracing::info!(archive = %id, prefix = remote.prefix(), "archive: the object store's prefix is this archive's");
                    self.claimed.store(true, Release);
                    return Ok(());
                }
            }
        }
        Err(ArchiveError::Remote(format!(
            "prefix {:?}: the object store answered too slowly to claim it (tried 3 times)",
            remote.prefix()
        )))
    }

    /// Deletes local copies of confirmed sealed segments, least recently read first, until at
    /// most `keep_bytes` of them remain. Answers how many went.
    pub fn evict(&self, open: u32, keep_bytes: u64) -> Result<u32, ArchiveError> {
        let last_read = self
            .last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let pinned = self
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut cached: Vec<(u64, u32, u64)> = Vec::new();
        for seg in self.segments()? {
            if seg.n == open || !seg.remote || pinned.contains(&seg.n) {
                continue;
            }
            if let Ok(m) = std::fs::metadata(seg_path(&self.segments_dir, seg.n)) {
                cached.push((last_read.get(&seg.n).copied().unwrap_or(0), seg.n, m.len()));
            }
        }
        let mut local: u64 = cached.iter().map(|c| c.2).sum();
        cached.sort_unstable();
        let mut evicted = 0;
        for (_, n, len) in cached {
            if local <= keep_bytes {
                break;
            }
            self.open_files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&n);
            std::fs::remove_file(seg_path(&self.segments_dir, n)).map_err(io)?;
            local -= len;
            evicted += 1;
            self.remote_counters
                .evictions
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(evicted)
    }

    /// Empties the local cache of confirmed segments (`spoolctl archive cache drop`, tests).
    pub fn drop_cache(&self) -> Result<u32, ArchiveError> {
        let _one = self.upkeep.lock().unwrap_or_else(|p| p.into_inner());
        let open = {
            let r = self.env.read_txn()?;
            self.meta.get(&r, OPEN_SEGMENT)?.unwrap_or(1) as u32
        };
        self.evict(open, 0)
    }

    /// The object store, when there is one.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// The exact raw bytes of a body, verified against its hash.
    pub fn raw(&self, hash: &[u8; 32]) -> Result<Vec<u8>, ArchiveError> {
        let (compressed, raw_len) = self.compressed(hash)?;
        decompress_verified(&compressed, raw_len, hash)
    }

    /// Items archived before `cutoff_ms` and not on hold, oldest first, at most `limit`.
    pub fn expired(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<u64>, ArchiveError> {
        let r = self.env.read_txn()?;
        let mut out = Vec::new();
        for kv in self.items.iter(&r)? {
            let (seq, b) = kv?;
            if let Some(item) = Item::decode(b) {
                if !item.held && item.arrived_ms < cutoff_ms {
                    out.push(seq);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Store-wide counters.
    pub fn totals(&self) -> Result<Totals, ArchiveError> {
        let r = self.env.read_txn()?;
        let get = |k: &str| -> Result<u64, ArchiveError> { Ok(self.meta.get(&r, k)?.unwrap_or(0)) };
        let mut t = Totals {
            items: get(ITEMS)?,
            raw_bytes: get(RAW_BYTES)?,
            held: get(HELD)?,
            ..Totals::default()
        };
        let open = self.meta.get(&r, OPEN_SEGMENT)?.unwrap_or(1) as u32;
        drop(r);
        for seg in self.segments()? {
            t.segments += 1;
            t.stored_bytes += seg.total;
            if seg.remote {
                t.remote_segments += 1;
                t.remote_bytes += seg.total;
                if seg_path(&self.segments_dir, seg.n).exists() {
                    t.cached_bytes += seg.total;
                }
            } else if seg.n != open && self.remote.is_some() {
                t.pending_segments += 1;
                t.pending_bytes += seg.total;
                if t.pending_oldest_ms == 0 || seg.sealed_ms < t.pending_oldest_ms {
                    t.pending_oldest_ms = seg.sealed_ms;
                }
            }
        }
        Ok(t)
    }

    /// A cursor kept in the catalog (mirror progress, the index's mark).
    pub fn cursor(&self, name: &str) -> Result<u64, ArchiveError> {
        let r = self.env.read_txn()?;
        Ok(self.meta.get(&r, &cursor_key(name))?.unwrap_or(0))
    }

    /// Moves a cursor forward (never back).
    pub fn set_cursor(&self, name: &str, seq: u64) -> Result<(), ArchiveError> {
        let key = cursor_key(name);
        let mut w = self.env.write_txn()?;
        if self.meta.get(&w, &key)?.unwrap_or(0) < seq {
            self.meta.put(&mut w, &key, &seq)?;
            w.commit()?;
        }
        Ok(())
    }
}

/// What a catalog says of its archive, read without opening it for writing (`--check-config`,
/// beside a running daemon or before the first start): `(archive id, writer id, holds items)`;
/// all empty when there is no catalog yet.
pub fn peek_identity(
    dir: &Path,
) -> Result<(Option<ArchiveId>, Option<ArchiveId>, bool), ArchiveError> {
    let catalog = dir.join("catalog");
    if !catalog.join("data.mdb").exists() {
        return Ok((None, None, false));
    }
    // SAFETY: read-only; LMDB allows other processes (the daemon) to have it open, and this
    // process opens the environment once.
    let env = unsafe {
        let mut o = EnvOpenOptions::new().read_txn_without_tls();
        o.max_dbs(8).flags(heed::EnvFlags::READ_ONLY);
        o.open(&catalog)?
    };
    let r = env.read_txn()?;
    let meta: Option<Database<Str, U64<BE>>> = env.open_database(&r, Some("meta"))?;
    let items: Option<Database<U64<BE>, Bytes>> = env.open_database(&r, Some("items"))?;
    let holds_items = match &items {
        Some(db) => db.first(&r)?.is_some(),
        None => false,
    };
    Ok(match &meta {
        Some(m) => (
            get_id(m, &r, ARCHIVE_ID)?,
            get_id(m, &r, WRITER_ID)?,
            holds_items,
        ),
        None => (None, None, holds_items),
    })
}

/// Decompresses a body and checks its length and hash.
pub fn decompress_verified(
    compressed: &[u8],
    raw_len: u64,
    hash: &[u8; 32],
) -> Result<Vec<u8>, ArchiveError> {
    thread_local! {
        /// One decompression context per thread, kept: making one per body (as
        /// `zstd::bulk::decompress` does) allocated and initialised ~100 KiB for every item the
        /// indexer, a search or a mirror read.
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let raw = DECOMPRESSOR
        .with(|cell| {
            let mut cell = cell.borrow_mut();
            let d = match cell.as_mut() {
                Some(d) => d,
                None => cell.insert(zstd::bulk::Decompressor::new()?),
            };
            d.decompress(compressed, raw_len as usize)
        })
        .map_err(|e| {
            ArchiveError::Corrupt(format!("body {} does not decompress: {e}", hex(hash)))
        })?;
    let got: [u8; 32] = Sha256::digest(&raw).into();
    if raw.len() as u64 != raw_len || &got != hash {
        return Err(ArchiveError::Corrupt(format!(
            "body {} fails its hash",
            hex(hash)
        )));
    }
    Ok(raw)
}

/// Creates (empty) the file of segment `n`, its directory entry synced: the new open segment.
fn new_segment_file(dir: &Path, n: u32) -> Result<File, ArchiveError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(seg_path(dir, n))
        .map_err(io)?;
    sync_dir(dir)?;
    Ok(file)
}

#[cfg(test)]
impl Store {
    /// The state a crash leaves between a rebuild's last transaction and the taking in of the
    /// store's checkpoints: no local checkpoints file, the upload cursor at 0, the flag set.
    pub(crate) fn as_if_stopped_before_taking_in_checkpoints(&self) -> Result<(), ArchiveError> {
        let _ = std::fs::remove_file(self.dir().join(checkpoint::FILE));
        let mut w = self.env.write_txn()?;
        self.meta.put(&mut w, CHECKPOINTS_TO_TAKE_IN, &1)?;
        self.meta.delete(&mut w, &cursor_key(STORE_CHECKPOINTS))?;
        w.commit()?;
        Ok(())
    }
}

/// The catalog's `meta` key of the cursor `name`.
fn cursor_key(name: &str) -> String {
    format!("cursor.{name}")
}

fn sync_dir(dir: &Path) -> Result<(), ArchiveError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// The writer thread's state: the open segment.
pub struct Writer {
    store: Arc<Store>,
    file: File,
    segment: u32,
    len: u64,
    /// Seal the open segment past this size.
    pub segment_bytes_max: u64,
    /// Refuse to write with less free space than this on the archive's file system.
    pub free_bytes_min: u64,
    /// Seal the open segment once it has held something this long (`None`: by size only).
    pub seal_after: Option<std::time::Duration>,
    /// Since when the open segment holds something (in this process: a segment found holding
    /// something at start counts from the start).
    holding_since: Option<std::time::Instant>,
    /// The revision the next item record takes.
    next_rev: u64,
    /// Where the hash chain stands (committed).
    chain: Head,
    /// The key the chain names as its signer now (committed), if any.
    chain_signer: Option<[u8; 32]>,
    /// The signer the write being prepared names (a genesis or signer entry), if it does.
    preparing: Option<[u8; 32]>,
    /// Seal new records with the keyring's current key (encryption at rest).
    pub seal: bool,
    /// Where the keyring is kept (a rotation rewrites it); `None`: it came from elsewhere (the
    /// environment) and cannot be rotated here.
    pub keyring_file: Option<PathBuf>,
    /// The data key the chain names now (committed), if any.
    chain_key: Option<u32>,
    /// The data key the write being prepared names (a key entry), if it does.
    preparing_key: Option<u32>,
    /// Signs checkpoints.
    signer: Arc<Signer>,
    /// Sign a checkpoint once this many entries are unsigned, or ...
    pub checkpoint_entries: u64,
    /// ... once an entry has waited this long for one.
    pub checkpoint_after: std::time::Duration,
    /// The entries the last checkpoint covered, and since when entries wait for the next.
    checkpointed: (u64, Option<std::time::Instant>),
}

/// How long the writer waits for work when no seal is due.
const IDLE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Writer {
    /// Takes over the open segment.
    pub fn new(
        store: Arc<Store>,
        segment_bytes_max: u64,
        free_bytes_min: u64,
        signer: Arc<Signer>,
    ) -> Result<Writer, ArchiveError> {
        let (segment, len, next_rev, chain, chain_signer, chain_key) = {
            let r = store.env.read_txn()?;
            (
                store.meta.get(&r, OPEN_SEGMENT)?.unwrap_or(1) as u32,
                store.meta.get(&r, OPEN_LEN)?.unwrap_or(0),
                store.meta.get(&r, NEXT_REV)?.unwrap_or(1),
                store.chain_head(&r)?,
                store.chain_signer(&r)?,
                store.meta.get(&r, CHAIN_KEY)?.map(|id| id as u32),
            )
        };
        // The checkpoints file says what was signed; entries past it wait for the next one.
        checkpoint::cut_torn_tail(store.dir())?;
        let signed = checkpoint::tail(&store.dir().join(checkpoint::FILE), 64 << 10)?
            .last()
            .map_or(0, |cp| cp.entries);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(seg_path(&store.segments_dir, segment))
            .map_err(io)?;
        Ok(Writer {
            store,
            file,
            segment,
            len,
            segment_bytes_max,
            free_bytes_min,
            seal_after: None,
            holding_since: (len > 0).then(std::time::Instant::now),
            next_rev,
            chain,
            chain_signer,
            preparing: None,
            seal: false,
            keyring_file: None,
            chain_key,
            preparing_key: None,
            signer,
            checkpoint_entries: 1000,
            checkpoint_after: std::time::Duration::from_secs(60),
            checkpointed: (signed, (chain.next > signed).then(std::time::Instant::now)),
        })
    }

    /// The migration of an archive from before the hash chain: one entry per item (`described`),
    /// appended to the open segment in batches, so that the chain covers every item and a
    /// rebuild finds each. Runs once (the catalog remembers; a crash part-way resumes after the
    /// last batch committed). Not while a rebuild is pending: it runs after it.
    pub fn chain_items(&mut self) -> Result<u64, ArchiveError> {
        let store = self.store.clone();
        let r = store.env.read_txn()?;
        if store.meta.get(&r, CHAINED)?.is_some() || store.meta.get(&r, REBUILDING)?.is_some() {
            return Ok(0);
        }
        let mut after = store.meta.get(&r, CHAIN_DESCRIBED_THROUGH)?.unwrap_or(0);
        drop(r);
        let mut described = 0;
        loop {
            let batch = store.items_after(after, 4096, |_| true)?;
            let Some(last) = batch.last() else { break };
            after = last.seq;
            let mut frames = Vec::new();
            let (mut head, keys) = self.open_entries(&mut frames)?;
            for item in batch.iter() {
                let event = Event::Item {
                    why: Why::Described,
                    rev: self.take_rev(),
                    item: Box::new(item.clone()),
                };
                put_entry(keys.as_deref(), &head.append(&event), &mut frames);
            }
            self.append_and_commit(&frames, head, |w| {
                store.meta.put(w, CHAIN_DESCRIBED_THROUGH, &after)?;
                Ok(())
            })?;
            described += batch.len() as u64;
        }
        let mut w = store.env.write_txn()?;
        store.meta.put(&mut w, CHAINED, &1)?;
        store.meta.put(&mut w, DESCRIBED, &1)?;
        store.meta.delete(&mut w, CHAIN_DESCRIBED_THROUGH)?;
        w.commit()?;
        if described > 0 {
            tracing::info!(
                items = described,
                "archive: every item described at the start of the archive's hash chain"
            );
        }
        Ok(described)
    }

    /// Begins a write's chain entries in `frames`: the genesis when the chain is empty (with the
    /// archive's id, made now if the archive has none yet), or a signer entry when this unit's
    /// key is not the one the chain names; then, when sealing, a key entry when the keyring's
    /// current key is not the one the chain names. Answers the head the write's own entries
    /// follow, and the keyring that seals the write (`None`: in clear).
    fn open_entries(
        &mut self,
        frames: &mut Vec<u8>,
    ) -> Result<(Head, Option<Arc<Keyring>>), ArchiveError> {
        let mut head = self.chain;
        let key = self.signer.public();
        let keys = self.seal.then(|| self.store.keyring()).flatten();
        self.preparing = None;
        self.preparing_key = None;
        if head.next == 0 {
            let archive = self.store.ensure_archive_id(ArchiveId::random())?;
            let genesis = Event::Genesis {
                archive,
                created_ms: now_ms(),
                node: self.store.node.clone(),
                signer: key,
            };
            put_entry(keys.as_deref(), &head.append(&genesis), frames);
            self.preparing = Some(key);
        } else if self.chain_signer != Some(key) {
            let signer = Event::Signer {
                key,
                node: self.store.node.clone(),
            };
            put_entry(keys.as_deref(), &head.append(&signer), frames);
            self.preparing = Some(key);
        }
        if let Some(k) = &keys {
            let current = k.current_info();
            if self.chain_key != Some(current.id) {
                let event = Event::Key {
                    id: current.id,
                    created_ms: current.created_ms,
                };
                put_entry(Some(k), &head.append(&event), frames);
                self.preparing_key = Some(current.id);
            }
        }
        Ok((head, keys))
    }

    fn take_rev(&mut self) -> u64 {
        self.next_rev += 1;
        self.next_rev - 1
    }

    /// Appends `frames` to the open segment, `fdatasync`s it, then commits `changes` with the
    /// segment's counters and the revision counter in one transaction; on any failure the
    /// segment is cut back, so the catalog never names bytes that are not on disk.
    fn append_and_commit(
        &mut self,
        frames: &[u8],
        head: Head,
        changes: impl FnOnce(&mut RwTxn<'_>) -> Result<(), ArchiveError>,
    ) -> Result<(), ArchiveError> {
        let new_signer = self.preparing.take();
        let new_key = self.preparing_key.take();
        if !frames.is_empty() {
            let written = self
                .file
                .write_all_at(frames, self.len)
                .and_then(|()| self.file.sync_data());
            if let Err(e) = written {
                let _ = self.file.set_len(self.len);
                return Err(io(e));
            }
        }
        let store = self.store.clone();
        let committed = (|| -> Result<(), ArchiveError> {
            let mut w = store.env.write_txn()?;
            changes(&mut w)?;
            self.appended(&mut w, frames.len() as u64)?;
            store.meta.put(&mut w, NEXT_REV, &self.next_rev)?;
            if head != self.chain {
                store.meta.put(&mut w, CHAIN_NEXT, &head.next)?;
                store.hashes.put(&mut w, CHAIN_HEAD, &head.hash)?;
            }
            if let Some(key) = new_signer {
                store.hashes.put(&mut w, CHAIN_SIGNER, &key)?;
            }
            if let Some(id) = new_key {
                store.meta.put(&mut w, CHAIN_KEY, &u64::from(id))?;
            }
            w.commit()?;
            Ok(())
        })();
        if let Err(e) = committed {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += frames.len() as u64;
        if head.next > self.chain.next && self.checkpointed.1.is_none() {
            self.checkpointed.1 = Some(std::time::Instant::now());
        }
        self.chain = head;
        if new_signer.is_some() {
            self.chain_signer = new_signer;
        }
        if new_key.is_some() {
            self.chain_key = new_key;
        }
        if self.chain.next - self.checkpointed.0 >= self.checkpoint_entries {
            self.checkpoint();
        }
        Ok(())
    }

    /// Signs a checkpoint of the chain's head and appends it to the checkpoints file. A failure
    /// is logged and tried again at the next write or wait (the entries stay unsigned till then).
    pub fn checkpoint(&mut self) {
        // The store's checkpoints first, where a rebuild stopped before taking them in and the
        // store did not answer at the open.
        if let Err(e) = self.adopt_checkpoints() {
            tracing::warn!("archive: the object store's checkpoints are not taken in yet: {e}");
        }
        if self.chain.next == self.checkpointed.0 {
            return;
        }
        let signed = (|| -> Result<(), ArchiveError> {
            let archive = self.store.archive_id()?.ok_or_else(|| {
                ArchiveError::Corrupt("a chain without an archive id in the catalog".into())
            })?;
            let cp = self
                .signer
                .sign(archive, self.chain.next, self.chain.hash, now_ms());
            Ok(checkpoint::append(self.store.dir(), &cp)?)
        })();
        match signed {
            Ok(()) => self.checkpointed = (self.chain.next, None),
            Err(e) => tracing::error!("archive: signing a checkpoint failed: {e}"),
        }
    }

    /// Signs a checkpoint if entries have waited `checkpoint_after` for one; answers how long
    /// until one is due.
    fn checkpoint_if_due(&mut self) -> std::time::Duration {
        let Some(since) = self.checkpointed.1 else {
            return IDLE_WAIT;
        };
        if since.elapsed() >= self.checkpoint_after {
            self.checkpoint();
            if self.checkpointed.1.is_some() {
                return self.checkpoint_after;
            }
            return IDLE_WAIT;
        }
        self.checkpoint_after - since.elapsed()
    }

    /// Seals the open segment if it has held something for `seal_after`, and answers how long
    /// to wait for work before looking again.
    fn seal_if_due(&mut self) -> std::time::Duration {
        let (Some(after), Some(since)) = (self.seal_after, self.holding_since) else {
            return IDLE_WAIT;
        };
        let age = since.elapsed();
        if age < after {
            return after - age;
        }
        match self.seal_now() {
            Ok(Some(n)) => tracing::info!(segment = n, "archive: segment sealed by age"),
            Ok(None) => {}
            Err(e) => {
                tracing::error!("archive: sealing by age failed: {e}");
                return after;
            }
        }
        IDLE_WAIT
    }

    /// Seals the open segment if it holds anything: answers the segment sealed.
    fn seal_now(&mut self) -> Result<Option<u32>, ArchiveError> {
        if self.len == 0 {
            return Ok(None);
        }
        let n = self.segment;
        self.seal()?;
        Ok(Some(n))
    }

    /// Serves requests until every sender is gone; `stored` hears of each new item.
    pub fn run(mut self, rx: Receiver<Request>, stored: impl Fn(u64)) {
        loop {
            let wait = self.seal_if_due().min(self.checkpoint_if_due());
            let first = match rx.recv_timeout(wait) {
                Ok(r) => r,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    self.checkpoint();
                    return;
                }
            };
            if matches!(first, Request::Stop) {
                // A clean stop leaves the whole chain signed.
                self.checkpoint();
                return;
            }
            match first {
                Request::Store(p, reply) => {
                    let mut group = vec![(*p, reply)];
                    let mut bytes = group[0].0.compressed.len();
                    let mut other = None;
                    while group.len() < GROUP_MAX && bytes < GROUP_BYTES_MAX {
                        match rx.try_recv() {
                            Ok(Request::Store(p, reply)) => {
                                bytes += p.compressed.len();
                                group.push((*p, reply));
                            }
                            Ok(o) => {
                                other = Some(o);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let (items, replies): (Vec<Prepared>, Vec<_>) = group.into_iter().unzip();
                    match self.store_group(items) {
                        Ok(results) => {
                            let last = results.iter().filter(|s| s.new).map(|s| s.seq).max();
                            for (s, reply) in results.into_iter().zip(replies) {
                                let _ = reply.send(Ok(s));
                            }
                            if let Some(seq) = last {
                                stored(seq);
                            }
                        }
                        Err(e) => {
                            tracing::error!("archive write failed: {e}");
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                    match other {
                        Some(Request::Stop) => {
                            self.checkpoint();
                            return;
                        }
                        Some(o) => {
                            if let Some(seq) = self.serve_other(o) {
                                stored(seq);
                            }
                        }
                        None => {}
                    }
                }
                o => {
                    if let Some(seq) = self.serve_other(o) {
                        stored(seq);
                    }
                }
            }
            if self.len > 0 && self.holding_since.is_none() {
                self.holding_since = Some(std::time::Instant::now());
            }
        }
    }

    /// Serves a request other than `Store`; answers the newest item the index should hear of.
    fn serve_other(&mut self, r: Request) -> Option<u64> {
        match r {
            Request::Store(..) | Request::Stop => {}
            Request::Remove(seqs, rule, reply) => {
                let _ = reply.send(self.remove(&seqs, &rule));
            }
            Request::Hold(seqs, held, reply) => {
                let _ = reply.send(self.set_held(&seqs, held));
            }
            Request::Compact(percent, reply) => {
                let _ = reply.send(self.compact(percent));
            }
            Request::RotateKey(reply) => {
                let _ = reply.send(self.rotate_key());
            }
            Request::Rekey(reply) => {
                let _ = reply.send(self.rekey());
            }
            Request::Seal(reply) => {
                let _ = reply.send(self.seal_now());
            }
            Request::Checkpoint(reply) => {
                self.checkpoint();
                let _ = reply.send(());
            }
            Request::Rebuild(reply) => {
                let store = self.store.clone();
                let rebuilt = self.rebuild(&store.rebuild_progress);
                let _ = reply.send(rebuilt);
                // The index follows the rebuilt catalog.
                return store.last_seq().ok().filter(|&s| s > 0);
            }
        }
        None
    }

    fn check_space(&self) -> Result<(), ArchiveError> {
        let free = free_bytes(&self.store.segments_dir)?;
        if free < self.free_bytes_min {
            return Err(ArchiveError::NoSpace(free));
        }
        Ok(())
    }

    fn store_group(&mut self, group: Vec<Prepared>) -> Result<Vec<Stored>, ArchiveError> {
        if self.store.rebuild_progress.pending.load(Ordering::SeqCst) {
            // Numbering new items now would collide with the items the rebuild brings back.
            return Err(ArchiveError::Refused(
                "the catalog is being rebuilt: new items wait until it is done".into(),
            ));
        }
        self.check_space()?;
        let store = self.store.clone();
        let r = store.env.read_txn()?;
        let mut next_seq = store.meta.get(&r, NEXT_SEQ)?.unwrap_or(1);
        let mut frames = Vec::new();
        let mut new_blobs: HashMap<[u8; 32], BlobLoc> = HashMap::new();
        let mut ref_more: HashMap<[u8; 32], u32> = HashMap::new();
        let mut new_keys: HashMap<[u8; 32], u64> = HashMap::new();
        let mut results = Vec::with_capacity(group.len());
        let mut new_items = Vec::new();
        let in_chain = !written_before_item_records(&store);
        let (mut head, keys) = if in_chain {
            self.open_entries(&mut frames)?
        } else {
            (self.chain, None)
        };
        for p in group {
            let mut item = p.item;
            if let Some(seq) = store
                .keys
                .get(&r, &item.key)?
                .or(new_keys.get(&item.key).copied())
            {
                results.push(Stored { seq, new: false });
                continue;
            }
            item.seq = next_seq;
            next_seq += 1;
            new_keys.insert(item.key, item.seq);
            if let Some(b) = new_blobs.get_mut(&item.hash) {
                b.refs += 1;
            } else if store.blobs.get(&r, &item.hash)?.is_some() {
                *ref_more.entry(item.hash).or_default() += 1;
            } else {
                let offset = self.len + frames.len() as u64;
                let before = frames.len();
                record::frame(&item.hash, &p.compressed, &mut frames);
                record::seal_from(keys.as_deref(), &mut frames, before);
                new_blobs.insert(
                    item.hash,
                    BlobLoc {
                        segment: self.segment,
                        offset,
                        len: (frames.len() - before) as u32,
                        raw_len: item.raw_len,
                        refs: 1,
                    },
                );
            }
            // The item's own entry, after its body: the segments describe the catalog.
            if in_chain {
                let event = chain::item_event(Why::Stored, self.take_rev(), &item);
                put_entry(keys.as_deref(), &head.append_encoded(&event), &mut frames);
            }
            results.push(Stored {
                seq: item.seq,
                new: true,
            });
            new_items.push(item);
        }
        drop(r);
        if new_items.is_empty() {
            return Ok(results);
        }
        self.append_and_commit(&frames, head, |w| {
            for item in &new_items {
                store.items.put(w, &item.seq, &item.encode())?;
                store.keys.put(w, &item.key, &item.seq)?;
            }
            for (hash, loc) in &new_blobs {
                store.blobs.put(w, hash, &loc.encode())?;
            }
            for (hash, more) in &ref_more {
                if let Some(mut loc) = store.blobs.get(w, hash)?.and_then(BlobLoc::decode) {
                    loc.refs += more;
                    store.blobs.put(w, hash, &loc.encode())?;
                }
            }
            let raw: u64 = new_items.iter().map(|i| i.raw_len).sum();
            add(&store, w, ITEMS, new_items.len() as i64)?;
            add(&store, w, RAW_BYTES, raw as i64)?;
            add(
                &store,
                w,
                HELD,
                new_items.iter().filter(|i| i.held).count() as i64,
            )?;
            store.meta.put(w, NEXT_SEQ, &next_seq)?;
            Ok(())
        })?;
        if self.len >= self.segment_bytes_max {
            self.seal()?;
        }
        Ok(results)
    }

    /// Records in `w` that `bytes` of live frames were appended to the open segment (its
    /// counters and committed length).
    fn appended(&self, w: &mut RwTxn<'_>, bytes: u64) -> Result<(), ArchiveError> {
        for what in ["total", "live"] {
            add(&self.store, w, &seg_key(self.segment, what), bytes as i64)?;
        }
        self.store.meta.put(w, OPEN_LEN, &(self.len + bytes))?;
        Ok(())
    }

    /// Starts a new open segment; the old one is sealed (never written again).
    fn seal(&mut self) -> Result<(), ArchiveError> {
        let next = self.segment + 1;
        let file = new_segment_file(&self.store.segments_dir, next)?;
        let mut w = self.store.env.write_txn()?;
        self.store
            .meta
            .put(&mut w, &seg_key(self.segment, "sealed"), &now_ms())?;
        self.store
            .meta
            .put(&mut w, OPEN_SEGMENT, &u64::from(next))?;
        self.store.meta.put(&mut w, OPEN_LEN, &0)?;
        add(&self.store, &mut w, &seg_key(next, "total"), 0)?;
        w.commit()?;
        self.file = file;
        self.segment = next;
        self.len = 0;
        self.holding_since = None;
        Ok(())
    }

    /// Removes items (retention), each with its tombstone in the chain first: what it was, when
    /// it went and by which `rule`.
    fn remove(&mut self, seqs: &[u64], rule: &str) -> Result<Vec<u64>, ArchiveError> {
        let store = self.store.clone();
        let r = store.env.read_txn()?;
        let mut going = Vec::new();
        for &seq in seqs {
            if let Some(item) = store.items.get(&r, &seq)?.and_then(Item::decode) {
                if !item.held {
                    going.push(item);
                }
            }
        }
        drop(r);
        if going.is_empty() {
            return Ok(Vec::new());
        }
        let mut frames = Vec::new();
        let (mut head, keys) = self.open_entries(&mut frames)?;
        let removed_ms = now_ms();
        for item in &going {
            let tombstone = Event::Removed(Box::new(chain::Tombstone {
                seq: item.seq,
                id: item.id.clone(),
                hash: item.hash,
                arrived_ms: item.arrived_ms,
                removed_ms,
                rule: rule.to_string(),
            }));
            put_entry(keys.as_deref(), &head.append(&tombstone), &mut frames);
        }
        self.append_and_commit(&frames, head, |w| {
            let mut raw = 0u64;
            for item in &going {
                store.items.delete(w, &item.seq)?;
                store.keys.delete(w, &item.key)?;
                if let Some(mut loc) = store.blobs.get(w, &item.hash)?.and_then(BlobLoc::decode) {
                    loc.refs = loc.refs.saturating_sub(1);
                    if loc.refs == 0 {
                        store.blobs.delete(w, &item.hash)?;
                        add(
                            &store,
                            w,
                            &seg_key(loc.segment, "live"),
                            -i64::from(loc.len),
                        )?;
                    } else {
                        store.blobs.put(w, &item.hash, &loc.encode())?;
                    }
                }
                raw += item.raw_len;
            }
            add(&store, w, ITEMS, -(going.len() as i64))?;
            add(&store, w, RAW_BYTES, -(raw as i64))?;
            Ok(())
        })?;
        self.seal_if_full()?;
        Ok(going.into_iter().map(|i| i.seq).collect())
    }

    /// Sets or clears legal hold, each change an item record in the open segment first;
    /// answers how many items changed.
    fn set_held(&mut self, seqs: &[u64], held: bool) -> Result<u64, ArchiveError> {
        let store = self.store.clone();
        let r = store.env.read_txn()?;
        let mut changing = Vec::new();
        for &seq in seqs {
            if let Some(mut item) = store.items.get(&r, &seq)?.and_then(Item::decode) {
                if item.held != held {
                    item.held = held;
                    changing.push(item);
                }
            }
        }
        drop(r);
        if changing.is_empty() {
            return Ok(0);
        }
        let mut frames = Vec::new();
        let (mut head, keys) = self.open_entries(&mut frames)?;
        let why = if held { Why::Held } else { Why::Released };
        for item in &changing {
            let event = chain::item_event(why, self.take_rev(), item);
            put_entry(keys.as_deref(), &head.append_encoded(&event), &mut frames);
        }
        let changed = changing.len() as i64;
        self.append_and_commit(&frames, head, |w| {
            for item in &changing {
                store.items.put(w, &item.seq, &item.encode())?;
            }
            add(&store, w, HELD, if held { changed } else { -changed })?;
            Ok(())
        })?;
        self.seal_if_full()?;
        Ok(changed as u64)
    }

    fn seal_if_full(&mut self) -> Result<(), ArchiveError> {
        if self.len >= self.segment_bytes_max {
            self.seal()?;
        }
        Ok(())
    }

    /// Copies the live records of sparse sealed segments into the open one, commits their new
    /// places, then deletes the old files.
    fn compact(&mut self, live_percent_min: u32) -> Result<CompactReport, ArchiveError> {
        let small_bytes = if self.store.remote.is_some() {
            self.segment_bytes_max / SMALL_SEGMENT_DIVISOR
        } else {
            0
        };
        // Segments sealed small by age are merged where each segment is an object to keep.
        let sparse = to_compact(
            &self.store.segments()?,
            self.segment,
            live_percent_min,
            small_bytes,
        );
        self.rewrite(sparse, None)
    }

    /// Adds a data key: the keyring with it is saved (synced) before anything is sealed with
    /// it, then the chain names it.
    fn rotate_key(&mut self) -> Result<KeyInfo, ArchiveError> {
        if !self.seal {
            return Err(ArchiveError::Refused(
                "encryption at rest is off (archive.encryption): there is no key to rotate".into(),
            ));
        }
        let path = self.keyring_file.clone().ok_or_else(|| {
            ArchiveError::Refused(
                "the keyring came from the environment (SPOOLD_ARCHIVE_KEYRING), which this unit cannot rewrite: add a key there and restart".into(),
            )
        })?;
        let Some(current) = self.store.keyring() else {
            return Err(ArchiveError::Refused("no keyring is loaded".into()));
        };
        let mut next = (*current).clone();
        let info = next.rotate(now_ms());
        next.save(&path, false)?;
        self.store.set_keyring(Some(Arc::new(next)));
        self.name_current_key()?;
        tracing::info!(key = %format!("{:08x}", info.id), "archive: a new data key seals from now on");
        Ok(info)
    }

    /// Writes the entries a write would begin with (the key entry of a new current key) now.
    fn name_current_key(&mut self) -> Result<(), ArchiveError> {
        let mut frames = Vec::new();
        let (head, _) = self.open_entries(&mut frames)?;
        if !frames.is_empty() {
            self.append_and_commit(&frames, head, |_| Ok(()))?;
        }
        Ok(())
    }

    /// Seals every record with the current key: the segments holding one in clear or sealed
    /// with an older key are rewritten (the open one sealed first), bodies that are gone left
    /// behind as in a compaction.
    fn rekey(&mut self) -> Result<CompactReport, ArchiveError> {
        let keys = match (self.seal, self.store.keyring()) {
            (true, Some(keys)) => keys,
            _ => {
                return Err(ArchiveError::Refused(
                    "encryption at rest is off (archive.encryption): nothing to seal with".into(),
                ))
            }
        };
        // What is sealed with a key the chain names (a proof checks it).
        self.name_current_key()?;
        // The open segment's records are moved too: seal it, so that it can be rewritten.
        if self.len > 0 {
            let mut open = vec![0u8; self.len as usize];
            self.file.read_exact_at(&mut open, 0).map_err(io)?;
            if needs_rekey(&open, &keys) {
                self.seal()?;
            }
        }
        let all: Vec<(u32, u64)> = self
            .store
            .segments()?
            .into_iter()
            .filter(|s| s.n < self.segment)
            .map(|s| (s.n, s.total))
            .collect();
        let report = self.rewrite(all, Some(keys))?;
        if report.resealed > 0 {
            tracing::info!(
                segments = report.segments,
                records = report.resealed,
                "archive: every record is sealed with the current key"
            );
        }
        Ok(report)
    }

    /// Rewrites `segments` (number, total bytes): their live records go on in the open
    /// segment (sealed anew with `rekey`'s current key where they are not yet; only segments
    /// that hold such a record, then), their new places are committed, the old files deleted.
    fn rewrite(
        &mut self,
        segments: Vec<(u32, u64)>,
        rekey: Option<Arc<Keyring>>,
    ) -> Result<CompactReport, ArchiveError> {
        let store = self.store.clone();
        let keys = store.keyring();
        let mut report = CompactReport::default();
        for (n, total) in segments {
            self.check_space()?;
            let data = store.read_segment(n)?;
            if rekey.as_ref().is_some_and(|k| !needs_rekey(&data, k)) {
                continue;
            }
            let mut frames = Vec::new();
            let mut moved: Vec<([u8; 32], BlobLoc)> = Vec::new();
            // Chain entries go on byte for byte (or sealed anew, whole), never rewritten: runs
            // of them in `Copied` frames, so that entries written fresh stay in the chain's
            // order in the stream.
            let mut entries = Vec::new();
            {
                let r = store.env.read_txn()?;
                let chained = store.meta.get(&r, CHAINED)?.is_some();
                let corrupt = |at: usize, e: String| {
                    ArchiveError::Corrupt(format!("segment {n} offset {at}: {e}"))
                };
                let mut at = 0usize;
                while at < data.len() {
                    let mut opened = Vec::new();
                    let (what, len, sealed_by) =
                        match record::next_opened(&data[at..], keys.as_deref(), &mut opened) {
                            Ok((rec, len, by)) => (Kept::of(&rec), len, by),
                            Err(e) => return Err(corrupt(at, e)),
                        };
                    let raw = &data[at..at + len];
                    let inner = if sealed_by.is_some() {
                        &opened[..]
                    } else {
                        raw
                    };
                    let mut put = |out: &mut Vec<u8>| {
                        report.resealed +=
                            u64::from(put_frame(raw, sealed_by, inner, rekey.as_deref(), out));
                    };
                    match what {
                        Kept::Body(hash) => {
                            let Some(loc) = store.blobs.get(&r, &hash)?.and_then(BlobLoc::decode)
                            else {
                                at += len;
                                continue;
                            };
                            if loc.segment == n && loc.offset == at as u64 {
                                let before = frames.len();
                                let offset = self.len + before as u64;
                                put(&mut frames);
                                moved.push((
                                    hash,
                                    BlobLoc {
                                        segment: self.segment,
                                        offset,
                                        len: (frames.len() - before) as u32,
                                        ..loc
                                    },
                                ));
                            }
                        }
                        // An item record from before the chain: every item has an entry since
                        // (the migration at open), so it goes; before that it goes on as it is.
                        Kept::OldItem if chained => {}
                        // Removals are final and small: kept, so that no older record of the
                        // item, in a segment not compacted yet, brings it back in a rebuild.
                        Kept::OldItem | Kept::Removed => put(&mut frames),
                        Kept::Entry => put(&mut entries),
                        Kept::Copied => {
                            flush_copied(&mut entries, &mut frames);
                            match &rekey {
                                None => frames.extend_from_slice(raw),
                                Some(k) => {
                                    let copied = match record::next(raw) {
                                        Ok((Record::Copied(c), _)) => c,
                                        _ => {
                                            return Err(corrupt(
                                                at,
                                                "copied entries unreadable".into(),
                                            ))
                                        }
                                    };
                                    let mut resealed = Vec::new();
                                    let mut i = 0;
                                    while i < copied.len() {
                                        let mut opened = Vec::new();
                                        let (l, by) =
                                            match record::next_opened(
                                                &copied[i..],
                                                keys.as_deref(),
                                                &mut opened,
                                            ) {
                                                Ok((Record::Entry(_), l, by)) => (l, by),
                                                Ok(_) => return Err(corrupt(
                                                    at,
                                                    "copied entries hold another kind of record"
                                                        .into(),
                                                )),
                                                Err(e) => {
                                                    return Err(corrupt(
                                                        at,
                                                        format!("copied entries: {e}"),
                                                    ))
                                                }
                                            };
                                        let raw = &copied[i..i + l];
                                        let inner = if by.is_some() { &opened[..] } else { raw };
                                        report.resealed += u64::from(put_frame(
                                            raw,
                                            by,
                                            inner,
                                            Some(k),
                                            &mut resealed,
                                        ));
                                        i += l;
                                    }
                                    record::frame_copied(&resealed, &mut frames);
                                }
                            }
                        }
                    }
                    at += len;
                }
                flush_copied(&mut entries, &mut frames);
            }
            if !frames.is_empty() {
                self.file.write_all_at(&frames, self.len).map_err(io)?;
                self.file.sync_data().map_err(io)?;
            }
            let mut w = store.env.write_txn()?;
            for (hash, loc) in &moved {
                store.blobs.put(&mut w, hash, &loc.encode())?;
            }
            self.appended(&mut w, frames.len() as u64)?;
            store.meta.put(&mut w, NEXT_REV, &self.next_rev)?;
            let was_remote = store.meta.get(&w, &seg_key(n, "remote"))?.is_some();
            for what in ["total", "live", "remote", "sealed"] {
                store.meta.delete(&mut w, &seg_key(n, what))?;
            }
            // Its object (and any it was waiting on for its own records) goes once the open
            // segment, which now holds the records, is confirmed in the store.
            let waiting: Vec<String> = store
                .meta
                .prefix_iter(&w, "gone.")?
                .filter_map(|kv| kv.ok())
                .filter(|(_, holder)| *holder == u64::from(n))
                .map(|(k, _)| k.to_string())
                .collect();
            for k in waiting {
                store.meta.put(&mut w, &k, &u64::from(self.segment))?;
            }
            if was_remote {
                store
                    .meta
                    .put(&mut w, &format!("gone.{n:08}"), &u64::from(self.segment))?;
            }
            w.commit()?;
            self.len += frames.len() as u64;
            store
                .open_files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&n);
            match std::fs::remove_file(seg_path(&store.segments_dir, n)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
            sync_dir(&store.segments_dir)?;
            report.segments += 1;
            report.bytes_freed += total.saturating_sub(frames.len() as u64);
            if self.len >= self.segment_bytes_max {
                self.seal()?;
            }
        }
        Ok(report)
    }
}

/// What compaction does with a record: its kind, and a body's hash.
enum Kept {
    Body([u8; 32]),
    OldItem,
    Removed,
    Entry,
    Copied,
}

impl Kept {
    fn of(rec: &Record<'_>) -> Kept {
        match rec {
            Record::Body(hash, _) => Kept::Body(*hash),
            Record::Item(..) => Kept::OldItem,
            Record::Removed(_) => Kept::Removed,
            Record::Entry(_) => Kept::Entry,
            // `next_opened` never answers a sealed record; a copied one is carried whole.
            Record::Copied(_) | Record::Sealed(_) => Kept::Copied,
        }
    }
}

/// Puts a record's frame (`raw`, sealed by `sealed_by`; `inner` the frame it holds, or `raw`
/// itself in clear) into `out`: as it is, or with `rekey`, sealed with the current key unless
/// it already is. Answers whether it was sealed anew.
fn put_frame(
    raw: &[u8],
    sealed_by: Option<u32>,
    inner: &[u8],
    rekey: Option<&Keyring>,
    out: &mut Vec<u8>,
) -> bool {
    match rekey {
        Some(k) if sealed_by != Some(k.current_info().id) => {
            record::frame_sealed(k, inner, out);
            true
        }
        _ => {
            out.extend_from_slice(raw);
            false
        }
    }
}

/// Whether `data` (a segment's bytes) holds a record in clear or sealed with a key other than
/// `keys`' current one (a frame it cannot parse counts: the rewrite then names it).
fn needs_rekey(data: &[u8], keys: &Keyring) -> bool {
    let current = keys.current_info().id;
    let mut at = 0;
    while at < data.len() {
        match record::next(&data[at..]) {
            Ok((Record::Sealed(p), len)) => {
                if Keyring::sealed_with(p) != Ok(current) {
                    return true;
                }
                at += len;
            }
            Ok((Record::Copied(inner), len)) => {
                if needs_rekey(inner, keys) {
                    return true;
                }
                at += len;
            }
            _ => return true,
        }
    }
    false
}

/// Frames a chain entry's payload into `frames`, sealed when there are keys.
fn put_entry(keys: Option<&Keyring>, payload: &[u8], frames: &mut Vec<u8>) {
    let start = frames.len();
    record::frame_entry(payload, frames);
    record::seal_from(keys, frames, start);
}

/// Frames the entry frames gathered in `entries` (if any) as one `Copied` record into `frames`.
fn flush_copied(entries: &mut Vec<u8>, frames: &mut Vec<u8>) {
    if !entries.is_empty() {
        record::frame_copied(entries, frames);
        entries.clear();
    }
}

/// Whether this store writes as versions before item records did (bodies only): tests of the
/// migration make such archives.
fn written_before_item_records(_store: &Store) -> bool {
    #[cfg(test)]
    return _store.as_before_item_records.load(Ordering::SeqCst);
    #[cfg(not(test))]
    false
}

#[cfg(test)]
impl Store {
    /// Makes the catalog look like one written before item records (tests of the migration).
    pub(crate) fn forget_described(&self) -> Result<(), ArchiveError> {
        let mut w = self.env.write_txn()?;
        self.meta.delete(&mut w, DESCRIBED)?;
        self.meta.delete(&mut w, CHAINED)?;
        w.commit()?;
        Ok(())
    }
}

/// With an object store, a sealed segment below `segment_bytes_max` / this is small: merged by
/// compaction with the other small ones (a quiet site seals one by age every `seal_secs`).
const SMALL_SEGMENT_DIVISOR: u64 = 8;

/// The sealed segments a compaction pass rewrites into the open one (`(n, total)`, in order):
/// those whose live share is below `live_percent_min`, and, when at least two are smaller than
/// `small_bytes`, the small ones (one alone would only move).
fn to_compact(
    segments: &[Segment],
    open: u32,
    live_percent_min: u32,
    small_bytes: u64,
) -> Vec<(u32, u64)> {
    let sealed = || segments.iter().filter(move |s| s.n != open && s.total > 0);
    let small = |s: &Segment| s.total < small_bytes;
    let merge_small = sealed().filter(|s| small(s)).count() >= 2;
    sealed()
        .filter(|s| {
            s.live * 100 < s.total * u64::from(live_percent_min) || (merge_small && small(s))
        })
        .map(|s| (s.n, s.total))
        .collect()
}

fn add(store: &Store, w: &mut RwTxn<'_>, key: &str, delta: i64) -> Result<(), ArchiveError> {
    let v = store.meta.get(w, key)?.unwrap_or(0);
    store.meta.put(
        w,
        key,
        &(v as i64).saturating_add(delta).max(0).cast_unsigned(),
    )?;
    Ok(())
}

/// Bytes available to unprivileged writers on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64, ArchiveError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| ArchiveError::Io("path with NUL".into()))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `s` a valid out-pointer for the call's duration.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

#[cfg(test)]
mod compaction_tests {
    use super::*;

    #[test]
    fn sparse_segments_and_small_ones_in_company_are_compacted() {
        let seg = |n: u32, total: u64, live: u64| Segment {
            n,
            total,
            live,
            remote: true,
            sealed_ms: 0,
        };
        // (case, segments, open, small bytes, expected)
        type Row = (&'static str, Vec<Segment>, u32, u64, Vec<u32>);
        let table: Vec<Row> = vec![
            (
                "full ones stay",
                vec![seg(1, 100, 100), seg(2, 100, 60)],
                3,
                0,
                vec![],
            ),
            (
                "a sparse one goes",
                vec![seg(1, 100, 49), seg(2, 100, 50)],
                3,
                0,
                vec![1],
            ),
            (
                "the open one never",
                vec![seg(1, 100, 10), seg(2, 100, 0)],
                2,
                0,
                vec![1],
            ),
            (
                "small ones merge",
                vec![seg(1, 10, 10), seg(2, 100, 100), seg(3, 20, 20)],
                4,
                50,
                vec![1, 3],
            ),
            (
                "one small one alone stays",
                vec![seg(1, 10, 10), seg(2, 100, 100)],
                3,
                50,
                vec![],
            ),
            (
                "an empty open one is no company",
                vec![seg(1, 10, 10), seg(2, 0, 0)],
                2,
                50,
                vec![],
            ),
            (
                "without a store nothing is small",
                vec![seg(1, 10, 10), seg(3, 20, 20)],
                4,
                0,
                vec![],
            ),
        ];
        for (case, segments, open, small, expected) in table {
            let got: Vec<u32> = to_compact(&segments, open, 50, small)
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            assert_eq!(got, expected, "{case}");
        }
    }
}
