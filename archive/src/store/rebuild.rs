//! Rebuilding the catalog from the segments alone: a unit whose disk was lost (its catalog, or
//! its whole state directory with the archive on an object store). Every item, legal hold and
//! removal is a record in the segments (`crate::record`), so reading every segment in order
//! gives the catalog back: items with their envelopes, verdicts and hold state, the body
//! locations, the counters. The index follows the catalog as it always does.
//!
//! The decision per record is pure ([`apply`], table-tested): of the records of one item the
//! highest revision wins and a removal is final (compaction carries records forward, so their
//! order in the segments is not their order in time). The I/O runs on the writer thread
//! ([`Writer::rebuild`]), one transaction per segment with the segment marked done in it, so a
//! rebuild killed anywhere resumes after the last segment it committed.
//!
//! It is not: a repair of damaged segments (a frame that fails its checksum ends that
//! segment's reading, and `verify` reports the items whose bodies are missing).

use super::*;
use crate::record::Record;
use crate::seal::{self, OpenError};

/// While rebuilding: one past the number of the entry that named the signer found so far.
const SIGNER_AT: &str = "rebuild.signer_at";
/// The entry after the highest key entry applied so far.
const KEY_AT: &str = "rebuild.key_at";

/// What the records read so far say of one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// No record yet.
    Unseen,
    /// Its state as of this revision.
    At(u64),
    /// Removed (final).
    Removed,
}

/// What a record of the item does to the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Write the record's item.
    Put,
    /// Delete the item.
    Delete,
    /// Nothing: the catalog already holds a newer state.
    Keep,
}

/// One item record (`Some(rev)`) or removal (`None`) against what is known.
pub fn apply(known: Known, record: Option<u64>) -> (Known, Effect) {
    match (known, record) {
        (Known::Removed, _) => (Known::Removed, Effect::Keep),
        (_, None) => (Known::Removed, Effect::Delete),
        (Known::Unseen, Some(rev)) => (Known::At(rev), Effect::Put),
        (Known::At(have), Some(rev)) if rev > have => (Known::At(rev), Effect::Put),
        (at @ Known::At(_), Some(_)) => (at, Effect::Keep),
    }
}

/// The rebuild db's value for a removed item.
const REMOVED_MARK: u64 = u64::MAX;
/// Set while a rebuild is under way (or needed: a catalog lost beside its segments).
pub(super) const REBUILDING: &str = "rebuilding";
fn done_key(n: u32) -> String {
    format!("rebuild.done.{n:08}")
}

/// How far a rebuild got.
#[derive(Debug, Default)]
pub struct RebuildProgress {
    /// Whether one is needed or under way (the catalog's mark, cached): the writer stores
    /// nothing meanwhile.
    pub pending: std::sync::atomic::AtomicBool,
    /// Whether one is running.
    pub running: std::sync::atomic::AtomicBool,
    /// Segments read, of `segments`.
    pub done: AtomicU64,
    /// Segments to read.
    pub segments: AtomicU64,
    /// Item records read.
    pub records: AtomicU64,
    /// What the last rebuild in this process found (a request for a rebuild that ran already,
    /// at open or after an adoption, answers it).
    pub last: Mutex<Option<Rebuilt>>,
}

/// What a rebuild found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rebuilt {
    /// Segments read (in this run; a resumed rebuild skips those done before).
    pub segments: u32,
    /// Of them, read from the object store.
    pub from_store: u32,
    /// Items in the catalog at the end.
    pub items: u64,
    /// Of them, on legal hold.
    pub held: u64,
    /// Items removed by retention (their removal records).
    pub removed: u64,
    /// Segments whose reading ended at a damaged or torn frame: (segment, offset).
    pub damaged: Vec<(u32, u64)>,
    /// Items whose body no segment holds.
    pub without_body: Vec<u64>,
}

impl Store {
    /// Whether a rebuild is under way or needed.
    pub fn rebuilding(&self) -> Result<bool, ArchiveError> {
        let r = self.env.read_txn()?;
        let pending = self.meta.get(&r, REBUILDING)?.is_some();
        self.rebuild_progress
            .pending
            .store(pending, Ordering::SeqCst);
        Ok(pending)
    }

    /// The segments to read, ascending: each with whether it comes from the object store.
    fn rebuild_sources(&self) -> Result<Vec<(u32, bool)>, ArchiveError> {
        let mut local = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir(&self.segments_dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let n = path
                .extension()
                .is_some_and(|e| e == "seg")
                .then(|| path.file_stem()?.to_str()?.parse::<u32>().ok())
                .flatten();
            if let Some(n) = n {
                local.insert(n, std::fs::metadata(&path).map_err(io)?.len());
            }
        }
        let remote: std::collections::BTreeMap<u32, u64> = match &self.remote {
            Some(r) => r.list()?.into_iter().collect(),
            None => Default::default(),
        };
        let mut all: std::collections::BTreeMap<u32, bool> = Default::default();
        for (&n, &len) in &local {
            if len > 0 {
                all.insert(n, false);
            }
        }
        // The store's copy is the sealed, confirmed one; a local file is taken instead only when
        // it holds more (a segment sealed but not uploaded before the loss).
        for (&n, &len) in &remote {
            if local.get(&n).is_none_or(|&l| l <= len) {
                all.insert(n, true);
            }
        }
        Ok(all.into_iter().collect())
    }
}

impl Writer {
    /// Rebuilds the catalog from the segments (local files and, once the prefix is claimed, the
    /// object store). Refused for a catalog that holds items and is not rebuilding; resumes one
    /// that is. `stored` hears of the last item, so the index follows.
    pub fn rebuild(&mut self, progress: &RebuildProgress) -> Result<Rebuilt, ArchiveError> {
        let store = self.store.clone();
        {
            let mut w = store.env.write_txn()?;
            if store.meta.get(&w, REBUILDING)?.is_none() {
                if let Some(done) = progress
                    .last
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                {
                    return Ok(done);
                }
                if store.items.first(&w)?.is_some() {
                    return Err(ArchiveError::Refused(
                        "the catalog holds items: a rebuild starts from an empty catalog (move the archive's catalog/ and index/ away, keep segments/)".into(),
                    ));
                }
                store.meta.put(&mut w, REBUILDING, &1)?;
            }
            w.commit()?;
            progress.pending.store(true, Ordering::SeqCst);
        }
        if store.remote.is_some() {
            store.claim()?;
        }
        progress.running.store(true, Ordering::SeqCst);
        let result = self.rebuild_segments(progress);
        progress.running.store(false, Ordering::SeqCst);
        if let Ok(done) = &result {
            *progress.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(done.clone());
        }
        result
    }

    fn rebuild_segments(&mut self, progress: &RebuildProgress) -> Result<Rebuilt, ArchiveError> {
        let store = self.store.clone();
        let sources = store.rebuild_sources()?;
        progress
            .segments
            .store(sources.len() as u64, Ordering::SeqCst);
        progress.done.store(0, Ordering::SeqCst);
        let mut report = Rebuilt::default();
        for &(n, from_store) in &sources {
            let r = store.env.read_txn()?;
            let done = store.meta.get(&r, &done_key(n))?.is_some();
            drop(r);
            if !done {
                if let Some(at) = self.rebuild_segment(n, from_store, progress)? {
                    report.damaged.push((n, at));
                }
                report.segments += 1;
                report.from_store += u32::from(from_store);
            }
            progress.done.fetch_add(1, Ordering::SeqCst);
            failpoint_after_segment(report.segments);
        }
        let last = sources.last().map_or(0, |s| s.0);
        self.finish_rebuild(last, &mut report)?;
        self.adopt_checkpoints()?;
        self.chain_items()?;
        tracing::info!(
            segments = report.segments,
            from_store = report.from_store,
            items = report.items,
            removed = report.removed,
            damaged = report.damaged.len(),
            without_body = report.without_body.len(),
            "archive: catalog rebuilt from the segments"
        );
        Ok(report)
    }

    /// Reads segment `n` into the catalog in one transaction that also marks it done. Answers
    /// where its reading stopped short, if it did.
    fn rebuild_segment(
        &mut self,
        n: u32,
        from_store: bool,
        progress: &RebuildProgress,
    ) -> Result<Option<u64>, ArchiveError> {
        let store = self.store.clone();
        let path = seg_path(&store.segments_dir, n);
        if let (Some(remote), true) = (&store.remote, from_store) {
            // Downloaded into the local cache (which the index and `verify` then read instead
            // of one ranged request per item; eviction trims it later). A local file that
            // differs from the store's copy (an empty open segment of a fresh unit) is replaced.
            let part = path.with_extension("part");
            remote.download(n, &part)?;
            std::fs::rename(&part, &path).map_err(io)?;
        }
        // Mapped, not read: a segment is up to `segment_bytes_max` (256 MiB by default). Nothing
        // writes it meanwhile (the writer is this thread; the upload thread only reads).
        let file = File::open(&path).map_err(io)?;
        let empty = file.metadata().map_err(io)?.len() == 0;
        // SAFETY: the file is not written or truncated while mapped (see above; the cut of a
        // torn tail below happens after the map is dropped).
        let map = if empty {
            None
        } else {
            Some(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        let data: &[u8] = map.as_deref().unwrap_or(&[]);
        let mut w = store.env.write_txn()?;
        let keys = store.keyring();
        let mut at = 0usize;
        let mut stopped = None;
        while at < data.len() {
            let opened: Vec<u8>;
            let parsed = match record::next(&data[at..]) {
                Ok((Record::Sealed(payload), len)) => match seal::open(keys.as_deref(), payload) {
                    Ok((inner, _)) => {
                        opened = inner;
                        record::next(&opened)
                            .map(|(rec, _)| (rec, len))
                            .map_err(String::from)
                    }
                    // Without the key nothing sealed can be read: a catalog rebuilt without
                    // those records would be an archive with holes, said to be whole.
                    Err(e @ (OpenError::NoKeyring(_) | OpenError::UnknownKey(_))) => {
                        return Err(ArchiveError::Refused(format!(
                            "segment {n} offset {at}: {e}; the archive cannot be rebuilt without its keyring (archive.keyring_file, or SPOOLD_ARCHIVE_KEYRING)"
                        )))
                    }
                    Err(e) => Err(e.to_string()),
                },
                Ok(r) => Ok(r),
                Err(e) => Err(e.to_string()),
            };
            let (rec, len) = match parsed {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(
                        segment = n,
                        offset = at,
                        "archive rebuild: {e}; the rest of this segment is not read"
                    );
                    stopped = Some(at as u64);
                    break;
                }
            };
            self.apply_record(&mut w, rec, n, at, len, progress)?;
            at += len;
        }
        drop(map);
        if stopped.is_some() && !from_store {
            // A torn tail (the open segment at the loss): cut, so the segment uploads clean.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io)?;
            f.set_len(at as u64).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        let total = at as u64;
        store.meta.put(&mut w, &seg_key(n, "total"), &total)?;
        add(&store, &mut w, &seg_key(n, "live"), total as i64)?;
        store.meta.put(&mut w, &seg_key(n, "sealed"), &now_ms())?;
        if from_store {
            store.meta.put(&mut w, &seg_key(n, "remote"), &1)?;
        }
        store.meta.put(&mut w, &done_key(n), &1)?;
        store.meta.put(&mut w, NEXT_REV, &self.next_rev)?;
        w.commit()?;
        Ok(stopped)
    }

    /// One record of segment `n` (its frame at `at`, `len` bytes) into the catalog.
    fn apply_record(
        &mut self,
        w: &mut RwTxn<'_>,
        rec: Record<'_>,
        n: u32,
        at: usize,
        len: usize,
        progress: &RebuildProgress,
    ) -> Result<(), ArchiveError> {
        let store = self.store.clone();
        match rec {
            Record::Body(hash, compressed) => {
                // A later copy (compaction's) supersedes an earlier one.
                if let Some(old) = store.blobs.get(w, &hash)?.and_then(BlobLoc::decode) {
                    add(
                        &store,
                        w,
                        &seg_key(old.segment, "live"),
                        -i64::from(old.len),
                    )?;
                }
                let loc = BlobLoc {
                    segment: n,
                    offset: at as u64,
                    len: len as u32,
                    raw_len: zstd::zstd_safe::get_frame_content_size(compressed)
                        .ok()
                        .flatten()
                        .unwrap_or(0),
                    refs: 0,
                };
                store.blobs.put(w, &hash, &loc.encode())?;
            }
            Record::Item(rev, item) => self.apply_item(w, rev, &item, progress)?,
            Record::Removed(seq) => self.apply_removal(w, seq)?,
            Record::Entry(entry) => self.apply_entry(w, &entry, progress)?,
            // The segment loop opens sealed frames; one inside another is not written.
            Record::Sealed(_) => {
                return Err(ArchiveError::Corrupt(format!(
                    "segment {n} offset {at}: a sealed record inside a sealed record"
                )))
            }
            Record::Copied(frames) => {
                let keys = store.keyring();
                let mut inner = 0;
                while inner < frames.len() {
                    let mut opened = Vec::new();
                    let (rec, len, _) =
                        record::next_opened(&frames[inner..], keys.as_deref(), &mut opened)
                            .map_err(|e| {
                                ArchiveError::Corrupt(format!(
                                    "segment {n} offset {at}: copied entries: {e}"
                                ))
                            })?;
                    match rec {
                        Record::Entry(entry) => self.apply_entry(w, &entry, progress)?,
                        _ => {
                            return Err(ArchiveError::Corrupt(format!(
                            "segment {n} offset {at}: copied entries hold another kind of record"
                        )))
                        }
                    }
                    inner += len;
                }
            }
        }
        Ok(())
    }

    /// A chain entry: its event into the catalog, and the chain's head, the archive's id and
    /// the signer it names as far as the entries read so far go.
    fn apply_entry(
        &mut self,
        w: &mut RwTxn<'_>,
        entry: &chain::Entry,
        progress: &RebuildProgress,
    ) -> Result<(), ArchiveError> {
        let store = self.store.clone();
        match &entry.event {
            Event::Item { rev, item, .. } => self.apply_item(w, *rev, item, progress)?,
            Event::Removed(t) => self.apply_removal(w, t.seq)?,
            Event::Genesis {
                archive, signer, ..
            } => {
                if get_id(&store.meta, w, ARCHIVE_ID)?.is_none() {
                    put_id(&store.meta, w, ARCHIVE_ID, *archive)?;
                }
                self.apply_signer(w, entry.n, signer)?;
            }
            Event::Signer { key, .. } => self.apply_signer(w, entry.n, key)?,
            Event::Key { id, .. } => {
                if entry.n + 1 > store.meta.get(w, KEY_AT)?.unwrap_or(0) {
                    store.meta.put(w, KEY_AT, &(entry.n + 1))?;
                    store.meta.put(w, CHAIN_KEY, &u64::from(*id))?;
                }
            }
        }
        if entry.n >= store.meta.get(w, CHAIN_NEXT)?.unwrap_or(0) {
            store.meta.put(w, CHAIN_NEXT, &(entry.n + 1))?;
            store.hashes.put(w, CHAIN_HEAD, &entry.hash())?;
        }
        Ok(())
    }

    /// The chain's latest signer so far is the one named by the highest entry.
    fn apply_signer(
        &mut self,
        w: &mut RwTxn<'_>,
        n: u64,
        key: &[u8; 32],
    ) -> Result<(), ArchiveError> {
        let store = &self.store;
        if n + 1 > store.meta.get(w, SIGNER_AT)?.unwrap_or(0) {
            store.meta.put(w, SIGNER_AT, &(n + 1))?;
            store.hashes.put(w, CHAIN_SIGNER, key)?;
        }
        Ok(())
    }

    fn apply_item(
        &mut self,
        w: &mut RwTxn<'_>,
        rev: u64,
        item: &Item,
        progress: &RebuildProgress,
    ) -> Result<(), ArchiveError> {
        let store = self.store.clone();
        {
            {
                progress.records.fetch_add(1, Ordering::Relaxed);
                let known = known(store.rebuild.get(w, &item.seq)?);
                let (now, effect) = apply(known, Some(rev));
                if effect == Effect::Put {
                    if let Some(old) = store.items.get(w, &item.seq)?.and_then(Item::decode) {
                        store.keys.delete(w, &old.key)?;
                    }
                    store.items.put(w, &item.seq, &item.encode())?;
                    store.keys.put(w, &item.key, &item.seq)?;
                }
                store.rebuild.put(w, &item.seq, &mark(now))?;
                self.next_rev = self.next_rev.max(rev + 1);
            }
        }
        Ok(())
    }

    fn apply_removal(&mut self, w: &mut RwTxn<'_>, seq: u64) -> Result<(), ArchiveError> {
        let store = &self.store;
        {
            {
                let (now, _) = apply(known(store.rebuild.get(w, &seq)?), None);
                if let Some(old) = store.items.get(w, &seq)?.and_then(Item::decode) {
                    store.keys.delete(w, &old.key)?;
                    store.items.delete(w, &seq)?;
                }
                store.rebuild.put(w, &seq, &mark(now))?;
            }
        }
        Ok(())
    }

    /// After a rebuild, the object store's checkpoints become this unit's (see
    /// [`Store::take_in_checkpoints`]): they sign the chain it continues, and a proof against
    /// the store finds them here.
    pub fn adopt_checkpoints(&mut self) -> Result<(), ArchiveError> {
        let Some(remote) = &self.store.remote else {
            return Ok(());
        };
        // Looked at first without the lock, which an upload pass holds across its requests:
        // the writer asks before every checkpoint and must not wait on the store for nothing.
        if !self.store.checkpoints_to_take_in()? {
            return Ok(());
        }
        // No upload pass runs meanwhile: one that saw the adopted file but not yet its cursor
        // would put the store's own checkpoints back into it from offset 0.
        let store = self.store.clone();
        let _uploads = store
            .checkpoints_uploaded
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some((signed, lines)) = store.take_in_checkpoints(remote)? else {
            return Ok(());
        };
        self.checkpointed = (
            signed,
            (self.chain.next > signed).then(std::time::Instant::now),
        );
        tracing::info!(
            checkpoints = lines,
            "archive: the store's checkpoints taken as this unit's"
        );
        Ok(())
    }

    /// Counts, references and the open segment, in one transaction; the rebuild's own marks go.
    fn finish_rebuild(&mut self, last: u32, report: &mut Rebuilt) -> Result<(), ArchiveError> {
        let store = self.store.clone();
        let open = last + 1;
        let file = new_segment_file(&store.segments_dir, open)?;
        let mut w = store.env.write_txn()?;
        let mut refs: HashMap<[u8; 32], (u32, u64)> = HashMap::new();
        let (mut items, mut raw, mut held, mut max_seq) = (0u64, 0u64, 0u64, 0u64);
        for kv in store.items.iter(&w)? {
            let (seq, b) = kv?;
            let Some(item) = Item::decode(b) else {
                continue;
            };
            items += 1;
            raw += item.raw_len;
            held += u64::from(item.held);
            max_seq = max_seq.max(seq);
            let r = refs.entry(item.hash).or_insert((0, item.raw_len));
            r.0 += 1;
            if store.blobs.get(&w, &item.hash)?.is_none() {
                report.without_body.push(seq);
            }
        }
        for kv in store.rebuild.iter(&w)? {
            let (seq, state) = kv?;
            max_seq = max_seq.max(seq);
            report.removed += u64::from(state == REMOVED_MARK);
        }
        let blobs: Vec<([u8; 32], BlobLoc)> = store
            .blobs
            .iter(&w)?
            .filter_map(|kv| kv.ok())
            .filter_map(|(k, v)| Some((k.try_into().ok()?, BlobLoc::decode(v)?)))
            .collect();
        for (hash, mut loc) in blobs {
            match refs.get(&hash) {
                Some(&(n, raw_len)) => {
                    loc.refs = n;
                    loc.raw_len = raw_len;
                    store.blobs.put(&mut w, &hash, &loc.encode())?;
                }
                None => {
                    store.blobs.delete(&mut w, &hash)?;
                    add(
                        &store,
                        &mut w,
                        &seg_key(loc.segment, "live"),
                        -i64::from(loc.len),
                    )?;
                }
            }
        }
        store.rebuild.clear(&mut w)?;
        let marks: Vec<String> = store
            .meta
            .prefix_iter(&w, "rebuild.")?
            .filter_map(|kv| kv.ok().map(|(k, _)| k.to_string()))
            .collect();
        for k in marks {
            store.meta.delete(&mut w, &k)?;
        }
        for (key, value) in [
            (ITEMS, items),
            (RAW_BYTES, raw),
            (HELD, held),
            (NEXT_SEQ, max_seq + 1),
            (NEXT_REV, self.next_rev),
            (OPEN_SEGMENT, u64::from(open)),
            (OPEN_LEN, 0),
            (DESCRIBED, 1),
        ] {
            store.meta.put(&mut w, key, &value)?;
        }
        store.meta.put(&mut w, &seg_key(open, "total"), &0)?;
        store.meta.delete(&mut w, REBUILDING)?;
        // The store's checkpoints are taken in next; until that is done (a crash in between
        // included), nothing is uploaded over them.
        if store.remote.is_some() {
            store.meta.put(&mut w, CHECKPOINTS_TO_TAKE_IN, &1)?;
        }
        // Entries found: the chain goes on from the highest (an archive from before the chain
        // gets its entries from the migration, after this).
        self.chain = store.chain_head(&w)?;
        self.chain_signer = store.chain_signer(&w)?;
        if self.chain.next > 0 {
            store.meta.put(&mut w, CHAINED, &1)?;
        }
        // A local file of a segment read from the store that is not its copy (the empty open
        // segment a restart mid-rebuild creates again) would shadow the object: it goes.
        for seg in store.segments_in(&w)? {
            let path = seg_path(&store.segments_dir, seg.n);
            if seg.remote && std::fs::metadata(&path).is_ok_and(|m| m.len() != seg.total) {
                std::fs::remove_file(&path).map_err(io)?;
            }
        }
        w.commit()?;
        // Reads made while rebuilding (the index waits, but a search may not) must not keep a
        // file that went.
        store
            .open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        store
            .rebuild_progress
            .pending
            .store(false, Ordering::SeqCst);
        self.file = file;
        self.segment = open;
        self.len = 0;
        self.holding_since = None;
        report.items = items;
        report.held = held;
        Ok(())
    }
}

/// Crash-test hook: with `SPOOLD_FAILPOINT=archive-rebuild` in the environment the process
/// dies on the spot (like `kill -9`) once a rebuild has committed its second segment. Unset in
/// production, where it costs one environment lookup per segment.
fn failpoint_after_segment(committed: u32) {
    if committed == 2 && std::env::var("SPOOLD_FAILPOINT").is_ok_and(|v| v == "archive-rebuild") {
        tracing::error!(failpoint = "archive-rebuild", "failpoint reached: aborting");
        std::process::abort();
    }
}

fn known(mark: Option<u64>) -> Known {
    match mark {
        None => Known::Unseen,
        Some(REMOVED_MARK) => Known::Removed,
        Some(rev) => Known::At(rev),
    }
}

fn mark(k: Known) -> u64 {
    match k {
        Known::Unseen => 0,
        Known::At(rev) => rev,
        Known::Removed => REMOVED_MARK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_record_of_an_item_wins_and_a_removal_is_final() {
        use Effect::*;
        use Known::*;
        // (what is known, the record: Some(rev) an item record, None a removal, expected)
        let table = [
            (Unseen, Some(4), (At(4), Put)),
            (At(4), Some(7), (At(7), Put)),
            (At(7), Some(4), (At(7), Keep)),
            (At(7), Some(7), (At(7), Keep)),
            (At(7), None, (Removed, Delete)),
            (Unseen, None, (Removed, Delete)),
            (Removed, Some(9), (Removed, Keep)),
            (Removed, None, (Removed, Keep)),
        ];
        for (known, record, expected) in table {
            assert_eq!(apply(known, record), expected, "{known:?} + {record:?}");
        }
    }
}
