//! Proving an archive: that its segments hold every entry of its hash chain in sequence, each
//! linked to the one before, every body an item needs equal to its hash, every checkpoint
//! signed by a trusted key over the chain as it is, and every removal a tombstone. It names
//! each break exactly (where, and what differs), the first one first.
//!
//! The proof reads segment bytes and checkpoint lines only: no catalog, no daemon, no signing
//! key (an encrypted archive's keyring opens its sealed records: [`Prover::with_keys`]; each
//! record sealed with a key it lacks is a break, and each key that sealed records must be named
//! by the chain). So it runs the same on a unit (`spoolctl archive verify`) and on an auditor's
//! machine over a copied-out archive (`spoolctl archive verify --dir`). The reading
//! of files and objects is the caller's; this module is the decision, in three steps:
//!
//! 1. [`Prover::scan`] each segment, in number order: frames checked (checksum, kind), entries
//!    gathered, entries written fresh checked to rise through the stream (compaction's copies
//!    come in `Copied` frames, rising within each), bodies hashed (all of them, or with a
//!    starting checkpoint only those [`Prover::wanted`] later).
//! 2. [`Prover::link`] the chain: numbers without gaps or duplicates from the start, each
//!    entry's `prev` the hash of the one before, items' states and tombstones, checkpoints
//!    against the chain (and the catalog's head, on a unit; peers' copies, given).
//! 3. [`Prover::body`] for each body still wanted ([`Prover::wanted`]), then [`Prover::finish`].
//!
//! Not here: repair (a break is reported, never mended), and what the full-text index holds.

use crate::chain::{Entry, Event, Head};
use crate::checkpoint::{self, Checkpoint};
use crate::record::{self, Record};
use crate::seal::Keyring;
use crate::{hex, ArchiveId};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Breaks kept in a proof's report (more are counted, not listed).
const BREAKS_LISTED: usize = 1000;

/// One thing that does not hold, and where.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Break {
    /// Where: `segment 3 offset 1024`, `entry 17`, `checkpoints line 4`, `item 9`.
    pub at: String,
    /// What differs.
    pub what: String,
}

/// What a proof found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Proof {
    /// The archive the chain's genesis names.
    pub archive: Option<String>,
    /// Segments read.
    pub segments: u32,
    /// Entries of the chain proved in sequence (`0 .. entries`), and its head's hash (hex).
    pub entries: u64,
    /// The last entry's hash (hex).
    pub head: String,
    /// The first entry whose link was checked (0, or the starting checkpoint's entries).
    pub from: u64,
    /// Items the chain says the archive holds.
    pub items: u64,
    /// Of them, bodies read back equal to their hash.
    pub bodies: u64,
    /// Items removed, each with its tombstone.
    pub tombstones: u64,
    /// Records from before the chain (item and removal records of an older version).
    pub unchained: u64,
    /// Checkpoints whose signature and hash hold.
    pub checkpoints: u64,
    /// The newest of them: entries it covers, when it was signed (ms).
    pub last_checkpoint: Option<(u64, u64)>,
    /// Checkpoints other holders keep (mirror peers, a copy given) compared with the chain.
    #[serde(default)]
    pub compared: u64,
    /// The keys the chain names as its signers (hex), oldest first.
    pub signers: Vec<String>,
    /// Whether the signers were checked against keys given by the verifier (`false`: against
    /// the keys the chain itself names).
    pub keys_given: bool,
    /// Records sealed (encrypted at rest), by the id of the key that sealed them (hex).
    #[serde(default)]
    pub sealed: BTreeMap<String, u64>,
    /// Records in clear (written before encryption, or with it off).
    #[serde(default)]
    pub clear: u64,
    /// The data keys the chain names (hex), oldest first.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Everything that does not hold, first break first (at most [`BREAKS_LISTED`]).
    pub breaks: Vec<Break>,
    /// Breaks found, listed or not.
    pub break_count: u64,
}

impl Proof {
    /// Whether nothing broke.
    pub fn holds(&self) -> bool {
        self.break_count == 0
    }
}

/// What one entry says, as much as the proof needs after the scan.
#[derive(Clone, Debug)]
enum Fact {
    Genesis(ArchiveId, [u8; 32]),
    Signer([u8; 32]),
    Item { seq: u64, rev: u64, body: [u8; 32] },
    Removed { seq: u64, body: [u8; 32] },
    Key(u32),
}

#[derive(Clone, Debug)]
struct Seen {
    prev: [u8; 32],
    hash: [u8; 32],
    at: (u32, u64),
    fact: Fact,
}

/// An item's state: its highest revision and body, or removed.
#[derive(Clone, Copy, Debug)]
struct State {
    rev: u64,
    body: [u8; 32],
    removed: bool,
    /// The entry that set it, when it came from the chain.
    entry: Option<u64>,
}

/// Where a body frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyAt {
    /// Segment.
    pub segment: u32,
    /// Frame offset.
    pub offset: u64,
    /// Frame length.
    pub len: u32,
}

/// What a proof's chain is held against ([`Prover::link`]): the checkpoints file's lines, the
/// head a catalog holds, checkpoints kept elsewhere (a holder's name, its checkpoints).
pub type Against<'a> = (
    &'a checkpoint::Lines,
    Option<Head>,
    &'a [(String, Vec<Checkpoint>)],
);

/// A proof under way.
pub struct Prover {
    trusted: Vec<[u8; 32]>,
    /// Entries below this are taken as proved by a checkpoint (their links not checked).
    from: Option<Checkpoint>,
    hash_on_scan: bool,
    entries: BTreeMap<u64, Seen>,
    last_fresh: Option<(u64, u32, u64)>,
    states: HashMap<u64, State>,
    bodies_ok: HashSet<[u8; 32]>,
    bodies_bad: HashMap<[u8; 32], (u32, u64, String)>,
    body_at: HashMap<[u8; 32], BodyAt>,
    wanted: Vec<([u8; 32], u64)>,
    keys: Option<Arc<Keyring>>,
    sealed_by: BTreeMap<u32, u64>,
    proof: Proof,
}

impl Prover {
    /// A proof that trusts these signing keys (none: the keys the chain names, said so in the
    /// report), and, with `from`, takes the entries a checkpoint covers as proved by it (its
    /// signature is checked; bodies are hashed only for items changed after it).
    pub fn new(trusted: Vec<[u8; 32]>, from: Option<Checkpoint>) -> Prover {
        Prover {
            proof: Proof {
                keys_given: !trusted.is_empty(),
                from: from.as_ref().map_or(0, |c| c.entries),
                ..Proof::default()
            },
            trusted,
            hash_on_scan: from.is_none(),
            from,
            entries: BTreeMap::new(),
            last_fresh: None,
            states: HashMap::new(),
            bodies_ok: HashSet::new(),
            bodies_bad: HashMap::new(),
            body_at: HashMap::new(),
            wanted: Vec::new(),
            keys: None,
            sealed_by: BTreeMap::new(),
        }
    }

    /// Opens sealed records with `keys` (without them a sealed record is a break that names
    /// its key).
    pub fn with_keys(mut self, keys: Option<Arc<Keyring>>) -> Prover {
        self.keys = keys;
        self
    }

    /// Parses the frame at the start of `b` (sealed or not), tallying who sealed it.
    fn next<'a>(
        &mut self,
        b: &'a [u8],
        opened: &'a mut Vec<u8>,
    ) -> Result<(Record<'a>, usize), (String, Option<usize>)> {
        match record::next_opened(b, self.keys.as_deref(), opened) {
            Ok((rec, len, sealed)) => {
                match sealed {
                    Some(id) => *self.sealed_by.entry(id).or_default() += 1,
                    // Copied entries are counted one by one, not their frame.
                    None if matches!(rec, Record::Copied(_)) => {}
                    None => self.proof.clear += 1,
                }
                Ok((rec, len))
            }
            // A sealed frame that does not open is still a whole frame: the rest reads on.
            Err(e) => Err((e, record::next(b).ok().map(|(_, len)| len))),
        }
    }

    fn broke(&mut self, at: impl Into<String>, what: impl Into<String>) {
        self.proof.break_count += 1;
        if self.proof.breaks.len() < BREAKS_LISTED {
            self.proof.breaks.push(Break {
                at: at.into(),
                what: what.into(),
            });
        }
    }

    /// Step 1: the bytes of segment `n` (segments in number order).
    pub fn scan(&mut self, n: u32, data: &[u8]) {
        self.proof.segments += 1;
        let mut at = 0usize;
        while at < data.len() {
            let mut opened = Vec::new();
            let (rec, len) = match self.next(&data[at..], &mut opened) {
                Ok(r) => r,
                Err((e, Some(len))) => {
                    self.broke(format!("segment {n} offset {at}"), e);
                    at += len;
                    continue;
                }
                Err((e, None)) => {
                    self.broke(
                        format!("segment {n} offset {at}"),
                        format!(
                            "{e}; the rest of the segment ({} bytes) is unread",
                            data.len() - at
                        ),
                    );
                    return;
                }
            };
            let here = (n, at as u64);
            match rec {
                Record::Body(hash, compressed) => {
                    self.body_at.insert(
                        hash,
                        BodyAt {
                            segment: n,
                            offset: at as u64,
                            len: len as u32,
                        },
                    );
                    if self.hash_on_scan {
                        self.check_body(here, hash, compressed);
                    }
                }
                Record::Item(rev, item) => {
                    self.proof.unchained += 1;
                    self.state(item.seq, rev, item.hash, false, None);
                }
                Record::Removed(seq) => {
                    self.proof.unchained += 1;
                    self.state(seq, u64::MAX, [0; 32], true, None);
                }
                Record::Entry(entry) => {
                    if let Some((last, seg, off)) = self.last_fresh {
                        if entry.n <= last {
                            self.broke(
                                format!("segment {n} offset {at}"),
                                format!(
                                    "entry {} comes after entry {last} (segment {seg} offset {off}): entries are out of their order",
                                    entry.n
                                ),
                            );
                        }
                    }
                    self.last_fresh = Some((entry.n, n, at as u64));
                    self.entry(&entry, here);
                }
                Record::Copied(frames) => self.copied(frames, here),
                Record::Sealed(_) => self.broke(
                    format!("segment {n} offset {at}"),
                    "a sealed record inside a sealed record",
                ),
            }
            at += len;
        }
    }

    fn copied(&mut self, frames: &[u8], here: (u32, u64)) {
        let mut inner = 0usize;
        let mut last: Option<u64> = None;
        while inner < frames.len() {
            let at = format!(
                "segment {} offset {} (copied entries, +{inner})",
                here.0, here.1
            );
            let mut opened = Vec::new();
            match self.next(&frames[inner..], &mut opened) {
                Ok((Record::Entry(entry), len)) => {
                    if last.is_some_and(|l| entry.n <= l) {
                        self.broke(at, format!("entry {} is out of its order", entry.n));
                    }
                    last = Some(entry.n);
                    self.entry(&entry, here);
                    inner += len;
                }
                Ok(_) => {
                    self.broke(
                        at,
                        "a record that is not a chain entry among copied entries",
                    );
                    return;
                }
                Err((e, Some(len))) => {
                    self.broke(at, e);
                    inner += len;
                }
                Err((e, None)) => {
                    self.broke(at, e);
                    return;
                }
            }
        }
    }

    fn check_body(&mut self, (n, at): (u32, u64), hash: [u8; 32], compressed: &[u8]) {
        let holds = zstd::stream::decode_all(compressed)
            .map_err(|e| format!("its bytes do not decompress: {e}"))
            .and_then(|raw| {
                let got: [u8; 32] = Sha256::digest(&raw).into();
                if got == hash {
                    Ok(())
                } else {
                    Err(format!(
                        "its content hashes to {}, not to the {} it is stored under",
                        hex(&got),
                        hex(&hash)
                    ))
                }
            });
        match holds {
            Ok(()) => {
                self.bodies_ok.insert(hash);
            }
            Err(why) => {
                if self.hash_on_scan {
                    // Damage is named where it is, whether or not an item needs the body.
                    self.broke(
                        format!("segment {n} offset {at}"),
                        format!("a body record: {why}"),
                    );
                }
                self.bodies_bad.insert(hash, (n, at, why));
            }
        }
    }

    fn state(&mut self, seq: u64, rev: u64, body: [u8; 32], removed: bool, entry: Option<u64>) {
        let s = self.states.entry(seq).or_insert(State {
            rev,
            body,
            removed,
            entry,
        });
        if s.removed {
            return;
        }
        if removed || rev > s.rev {
            *s = State {
                rev,
                body: if removed { s.body } else { body },
                removed,
                entry,
            };
        }
    }

    fn entry(&mut self, entry: &Entry, at: (u32, u64)) {
        let fact = match &entry.event {
            Event::Genesis {
                archive, signer, ..
            } => Fact::Genesis(*archive, *signer),
            Event::Signer { key, .. } => Fact::Signer(*key),
            Event::Item { rev, item, .. } => Fact::Item {
                seq: item.seq,
                rev: *rev,
                body: item.hash,
            },
            Event::Removed(t) => Fact::Removed {
                seq: t.seq,
                body: t.hash,
            },
            Event::Key { id, .. } => Fact::Key(*id),
        };
        let seen = Seen {
            prev: entry.prev,
            hash: entry.hash(),
            at,
            fact,
        };
        if let Some(other) = self.entries.get(&entry.n) {
            // The same entry twice is a compaction that stopped between its copy and the
            // old segment's deletion; two different ones is a forgery.
            if other.hash != seen.hash {
                let (s, o) = other.at;
                self.broke(
                    format!("segment {} offset {}", at.0, at.1),
                    format!(
                        "entry {} is here and, with other contents, at segment {s} offset {o}",
                        entry.n
                    ),
                );
            }
            return;
        }
        self.entries.insert(entry.n, seen);
    }

    /// Step 2: links the chain; checks the checkpoints (each with its line in the file, and the
    /// lines that are not checkpoints), the head a catalog holds (`expected`, on a unit) and
    /// the checkpoints other holders keep (`elsewhere`: a name, its checkpoints).
    pub fn link(
        &mut self,
        checkpoints: &checkpoint::Lines,
        expected: Option<Head>,
        elsewhere: &[(String, Vec<Checkpoint>)],
    ) {
        let entries = std::mem::take(&mut self.entries);
        let start = self.from.as_ref().map_or(0, |c| c.entries);
        if let Some(cp) = self.from.clone() {
            self.checkpoint_signature("the starting checkpoint", &cp);
        }
        let mut prev_hash = match &self.from {
            Some(cp) => cp.chain,
            None => [0; 32],
        };
        let mut next = start;
        let mut archive: Option<ArchiveId> = None;
        let mut signers: Vec<[u8; 32]> = Vec::new();
        let mut hashes: HashMap<u64, [u8; 32]> = HashMap::new();
        if let Some(cp) = &self.from {
            hashes.insert(cp.entries.wrapping_sub(1), cp.chain);
            archive = Some(cp.archive);
        }
        for (&n, seen) in &entries {
            // Facts are read from every entry (the items' states need them all); links only
            // from the start.
            match seen.fact {
                Fact::Genesis(id, key) => {
                    if n != 0 {
                        self.broke(
                            format!("entry {n}"),
                            "a second genesis (the chain's start is entry 0)",
                        );
                    }
                    archive = Some(id);
                    signers.push(key);
                }
                Fact::Signer(key) => signers.push(key),
                Fact::Key(id) => {
                    if !self.proof.keys.contains(&format!("{id:08x}")) {
                        self.proof.keys.push(format!("{id:08x}"));
                    }
                }
                Fact::Item { seq, rev, body } => self.state(seq, rev, body, false, Some(n)),
                Fact::Removed { seq, body } => {
                    self.proof.tombstones += 1;
                    let known = self.states.get(&seq).copied();
                    if let Some(s) = known.filter(|s| !s.removed && s.body != body) {
                        self.broke(
                            format!("entry {n}"),
                            format!(
                                "the tombstone of item {seq} names body {} but the item's body was {}",
                                hex(&body),
                                hex(&s.body)
                            ),
                        );
                    }
                    self.state(seq, u64::MAX, body, true, Some(n));
                }
            }
            if n < start {
                continue;
            }
            if n > next {
                self.broke(
                    format!("entry {n}"),
                    format!(
                        "entries {next}..{} are missing (found at segment {} offset {})",
                        n - 1,
                        seen.at.0,
                        seen.at.1
                    ),
                );
            } else if seen.prev != prev_hash {
                self.broke(
                    format!("entry {n}"),
                    format!(
                        "it carries {} as the hash of entry {}, which hashes to {} (segment {} offset {})",
                        hex(&seen.prev),
                        n.wrapping_sub(1) as i64,
                        hex(&prev_hash),
                        seen.at.0,
                        seen.at.1
                    ),
                );
            }
            prev_hash = seen.hash;
            hashes.insert(n, seen.hash);
            next = n + 1;
        }
        if start == 0 && !entries.contains_key(&0) && !entries.is_empty() {
            self.broke(
                "entry 0",
                "the genesis is missing: the archive's id and first signer are unknown",
            );
        }
        self.proof.entries = next;
        self.proof.head = hex(&prev_hash);
        self.proof.archive = archive.map(|a| a.to_string());
        self.proof.signers = signers.iter().map(|k| hex(k)).collect();
        if self.trusted.is_empty() {
            self.trusted = signers.clone();
        } else {
            for k in &signers {
                if !self.trusted.contains(k) {
                    self.broke(
                        "the chain",
                        format!(
                            "it names {} as a signer, a key not given to the verifier",
                            hex(k)
                        ),
                    );
                }
            }
        }
        // Checkpoints.
        let (good, bad) = checkpoints;
        for (line, why) in bad {
            self.broke(format!("checkpoints line {line}"), why.clone());
        }
        let mut last: Option<(u64, u64)> = None;
        for (line, cp) in good {
            let at = format!("checkpoints line {line}");
            if self.checkpoint(&at, cp, archive, &hashes, next) {
                self.proof.checkpoints += 1;
            }
            if let Some((entries, time)) = last {
                if cp.entries < entries || cp.time_ms < time {
                    self.broke(&at, format!("it signs {} entries at {} ms, after one of {entries} entries at {time} ms", cp.entries, cp.time_ms));
                }
            }
            last = Some((cp.entries, cp.time_ms));
        }
        self.proof.last_checkpoint = last;
        for (holder, theirs) in elsewhere {
            for cp in theirs {
                self.proof.compared += 1;
                let at = format!("{holder}'s checkpoint of {} entries", cp.entries);
                self.checkpoint(&at, cp, archive, &hashes, next);
                if !good.iter().any(|(_, ours)| ours == cp) {
                    self.broke(&at, "the local checkpoints file does not hold it");
                }
            }
        }
        if let Some(head) = expected {
            if head.next != next {
                self.broke(
                    "the catalog",
                    format!(
                        "it says the chain has {} entries; the segments prove {next}",
                        head.next
                    ),
                );
            } else if head.hash != prev_hash {
                self.broke(
                    "the catalog",
                    format!(
                        "its chain head is {}; the segments' is {}",
                        hex(&head.hash),
                        hex(&prev_hash)
                    ),
                );
            }
        }
        // Items: which bodies are still wanted.
        let mut states: Vec<(u64, State)> = self.states.iter().map(|(k, v)| (*k, *v)).collect();
        states.sort_by_key(|s| s.0);
        for (seq, s) in states {
            if s.removed {
                continue;
            }
            self.proof.items += 1;
            if s.entry.is_some_and(|n| n < start) && !self.hash_on_scan {
                // Unchanged since the starting checkpoint: proved by it.
                continue;
            }
            self.wanted.push((s.body, seq));
        }
    }

    /// Checks one checkpoint against the chain; answers whether it holds.
    fn checkpoint(
        &mut self,
        at: &str,
        cp: &Checkpoint,
        archive: Option<ArchiveId>,
        hashes: &HashMap<u64, [u8; 32]>,
        proved: u64,
    ) -> bool {
        if !self.checkpoint_signature(at, cp) {
            return false;
        }
        if archive.is_some_and(|a| a != cp.archive) {
            self.broke(at, format!("it signs archive {}, not this one", cp.archive));
            return false;
        }
        if cp.entries > proved {
            self.broke(
                at,
                format!(
                    "it signs {} entries; the segments prove {proved} (entries {proved}..{} are missing: cut off or deleted)",
                    cp.entries,
                    cp.entries - 1
                ),
            );
            return false;
        }
        if cp.entries == 0 {
            return true;
        }
        match hashes.get(&(cp.entries - 1)) {
            Some(h) if *h == cp.chain => true,
            Some(h) => {
                self.broke(
                    at,
                    format!(
                        "it signs {} as the hash of entry {}; the segments give {} (the chain was rewritten)",
                        hex(&cp.chain),
                        cp.entries - 1,
                        hex(h)
                    ),
                );
                false
            }
            // Before the starting checkpoint: proved by it, not checked again.
            None => true,
        }
    }

    fn checkpoint_signature(&mut self, at: &str, cp: &Checkpoint) -> bool {
        if !cp.signature_holds() {
            self.broke(at, "its signature does not hold");
            return false;
        }
        if !self.trusted.is_empty() && !self.trusted.contains(&cp.key) {
            self.broke(
                at,
                format!(
                    "it is signed by {}, a key {}",
                    hex(&cp.key),
                    if self.proof.keys_given {
                        "not given to the verifier"
                    } else {
                        "the chain does not name"
                    }
                ),
            );
            return false;
        }
        true
    }

    /// Step 3: where the bodies still wanted are, by segment (the caller reads each frame and
    /// gives it to [`Prover::body`]); a body no segment holds is a break already.
    pub fn wanted(&mut self) -> BTreeMap<u32, Vec<BodyAt>> {
        let mut by_segment: BTreeMap<u32, Vec<BodyAt>> = BTreeMap::new();
        let wanted = std::mem::take(&mut self.wanted);
        let mut asked = HashSet::new();
        for (body, seq) in wanted {
            if self.bodies_ok.contains(&body) {
                self.proof.bodies += 1;
                continue;
            }
            if let Some((n, at, why)) = self.bodies_bad.get(&body).cloned() {
                self.broke(
                    format!("item {seq}"),
                    format!("its body {} at segment {n} offset {at}: {why}", hex(&body)),
                );
                continue;
            }
            match self.body_at.get(&body).copied() {
                Some(loc) => {
                    self.wanted.push((body, seq));
                    if asked.insert(body) {
                        by_segment.entry(loc.segment).or_default().push(loc);
                    }
                }
                None => self.broke(
                    format!("item {seq}"),
                    format!("its body {} is in no segment", hex(&body)),
                ),
            }
        }
        by_segment
    }

    /// A frame [`Prover::wanted`] asked for (the bytes at its place, its length).
    pub fn body(&mut self, at: BodyAt, frame: &[u8]) {
        let mut opened = Vec::new();
        match record::next_opened(frame, self.keys.as_deref(), &mut opened) {
            Ok((Record::Body(hash, compressed), _, _)) => {
                self.check_body((at.segment, at.offset), hash, compressed)
            }
            Ok(_) => self.broke(
                format!("segment {} offset {}", at.segment, at.offset),
                "not a body record",
            ),
            Err(e) => self.broke(format!("segment {} offset {}", at.segment, at.offset), e),
        }
    }

    /// The three steps over `segments` (numbers ascending), each read by `read` (once for the
    /// scan, again for the bodies still wanted); `against` is what [`Prover::link`] takes:
    /// checkpoint lines, a catalog's head, checkpoints kept elsewhere. `progress(done, total)`
    /// counts segments read.
    pub fn run<B, E>(
        mut self,
        segments: &[u32],
        mut read: impl FnMut(u32) -> Result<B, E>,
        (checkpoints, expected, elsewhere): Against<'_>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Proof, E>
    where
        B: std::ops::Deref<Target = [u8]>,
    {
        let total = 2 * segments.len() as u64;
        for (i, &n) in segments.iter().enumerate() {
            self.scan(n, &read(n)?);
            progress(i as u64 + 1, total);
        }
        self.link(checkpoints, expected, elsewhere);
        for (i, (n, places)) in self.wanted().into_iter().enumerate() {
            let data = read(n)?;
            for at in places {
                let frame = data
                    .get(at.offset as usize..(at.offset + u64::from(at.len)) as usize)
                    .unwrap_or(&[]);
                self.body(at, frame);
            }
            progress(segments.len() as u64 + i as u64 + 1, total);
        }
        Ok(self.finish())
    }

    /// The report.
    pub fn finish(mut self) -> Proof {
        for (id, count) in std::mem::take(&mut self.sealed_by) {
            let hex_id = format!("{id:08x}");
            if !self.proof.keys.contains(&hex_id) {
                self.broke(
                    format!("key {hex_id}"),
                    format!(
                        "{count} records are sealed with it, and no entry of the chain names it"
                    ),
                );
            }
            self.proof.sealed.insert(hex_id, count);
        }
        for (body, seq) in std::mem::take(&mut self.wanted) {
            if self.bodies_ok.contains(&body) {
                self.proof.bodies += 1;
            } else if let Some((n, at, why)) = self.bodies_bad.get(&body).cloned() {
                self.broke(
                    format!("item {seq}"),
                    format!("its body {} at segment {n} offset {at}: {why}", hex(&body)),
                );
            } else {
                self.broke(
                    format!("item {seq}"),
                    format!("its body {} was not read", hex(&body)),
                );
            }
        }
        self.proof
    }
}

/// Where a proof starts linking the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At the genesis: everything.
    Genesis,
    /// At the newest checkpoint that holds (`--from-checkpoint`).
    NewestCheckpoint,
    /// At the newest checkpoint that holds and was signed at or before this time, ms
    /// (`--since`): what changed since then is proved, what came before is taken as proved by it.
    Since(u64),
}

impl Start {
    /// From `verify`'s flags: `--since` wins over `--from-checkpoint`.
    pub fn from_flags(since_ms: Option<u64>, from_checkpoint: bool) -> Start {
        match (since_ms, from_checkpoint) {
            (Some(ms), _) => Start::Since(ms),
            (None, true) => Start::NewestCheckpoint,
            (None, false) => Start::Genesis,
        }
    }
}

/// The checkpoint a proof starts at: the newest whose signature holds under a trusted key (any
/// key when none is given), signed at or before the time asked if one is; `None` for the genesis
/// (or when no checkpoint qualifies: everything is proved then).
pub fn starting_checkpoint(
    checkpoints: &checkpoint::Lines,
    trusted: &[[u8; 32]],
    start: Start,
) -> Option<Checkpoint> {
    let before = match start {
        Start::Genesis => return None,
        Start::NewestCheckpoint => u64::MAX,
        Start::Since(ms) => ms,
    };
    checkpoints
        .0
        .iter()
        .rev()
        .map(|(_, cp)| cp)
        .find(|cp| {
            cp.time_ms <= before
                && cp.signature_holds()
                && (trusted.is_empty() || trusted.contains(&cp.key))
        })
        .cloned()
}

/// Proves the archive in `dir` (its `segments/` and `checkpoints`, as copied out): every step
/// over local files. `from_checkpoint` starts at the newest checkpoint whose signature holds.
pub fn prove_dir(
    dir: &std::path::Path,
    trusted: Vec<[u8; 32]>,
    start: Start,
    elsewhere: &[(String, Vec<Checkpoint>)],
    keys: Option<Arc<Keyring>>,
) -> Result<Proof, crate::EvidenceError> {
    let io = |e: std::io::Error| crate::EvidenceError::Io(format!("{}: {e}", dir.display()));
    let checkpoints = checkpoint::read(dir)?;
    let from = starting_checkpoint(&checkpoints, &trusted, start);
    let mut segments = BTreeMap::new();
    for entry in std::fs::read_dir(dir.join("segments")).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if let Some(n) = segment_number(&path) {
            segments.insert(n, path);
        }
    }
    let numbers: Vec<u32> = segments.keys().copied().collect();
    Prover::new(trusted, from).with_keys(keys).run(
        &numbers,
        |n| mapped(&segments[&n]).map_err(io),
        (&checkpoints, None, elsewhere),
        |_, _| {},
    )
}

/// A segment file's bytes, mapped (a segment is up to 256 MiB; an empty file has none to map).
struct Mapped(Option<memmap2::Mmap>);

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

fn mapped(path: &std::path::Path) -> std::io::Result<Mapped> {
    let f = std::fs::File::open(path)?;
    if f.metadata()?.len() == 0 {
        return Ok(Mapped(None));
    }
    // SAFETY: a copied-out archive is not written while it is proved (on a unit the daemon's
    // proof maps through the store, which only appends); nothing truncates it meanwhile.
    Ok(Mapped(Some(unsafe { memmap2::Mmap::map(&f) }?)))
}

/// The number of a segment file's name (`00000012.seg`).
pub fn segment_number(path: &std::path::Path) -> Option<u32> {
    if path.extension()? != "seg" {
        return None;
    }
    path.file_stem()?.to_str()?.parse().ok()
}
