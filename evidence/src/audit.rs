//! The record of who looked: every request that reads or changes archive content is one line of
//! an append-only log, written and synced before the request is answered (a request that cannot
//! be logged is refused by the caller). The log is a hash chain of its own and every entry is
//! followed by a signed checkpoint (`crate::checkpoint`, in `audit.checkpoints`), so an edit, a
//! removal, a reordering or a cut is named by [`prove`].
//!
//! A line is a JSON object, fields in this order:
//! `{"n","prev","time_ms","uid","user","action","detail","items","which"}`; line 0 is the
//! genesis (`action` `genesis`, `detail` the log's id and its first signer). Each line's hash is
//! SHA-256 over `"spoolpair audit 1\n"` and the line's bytes as written; the next line carries it
//! as `prev` (hex; zeros for line 0). An entry names at most [`WHICH_MAX`] items (`items`
//! counts them all).
//!
//! Not here: deciding which requests are audited, and who the asker is (the daemon's admin
//! socket gives the peer's uid).

use crate::checkpoint::{self, Checkpoint, Signer};
use crate::proof::Break;
use crate::{hex, unhex, ArchiveId, EvidenceError};
use sha2::{Digest, Sha256};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The log's file name.
pub const LOG: &str = "audit.log";
/// Its checkpoints' file name.
pub const CHECKPOINTS: &str = "audit.checkpoints";
/// Items an entry names (more are counted).
pub const WHICH_MAX: usize = 1000;

/// One audited request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Its number: 0 for the genesis, then one more each.
    pub n: u64,
    /// The previous line's hash (hex).
    pub prev: String,
    /// When, ms since the epoch.
    pub time_ms: u64,
    /// The asker's uid.
    pub uid: u32,
    /// The asker's user name (`uid N` when it has none).
    pub user: String,
    /// What was asked: `archive search`, `archive show`, `archive hold`, ...
    pub action: String,
    /// Its arguments: the query, the target, the rule.
    pub detail: String,
    /// Items it read or changed.
    pub items: u64,
    /// Which (archive sequence numbers, or ids), up to [`WHICH_MAX`].
    pub which: Vec<String>,
}

/// Who asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asker {
    /// Their uid.
    pub uid: u32,
    /// Their user name.
    pub user: String,
}

fn line_hash(line: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"spoolpair audit 1\n");
    h.update(line.as_bytes());
    h.finalize().into()
}

/// The open log: appends, syncs, signs.
pub struct AuditLog {
    dir: PathBuf,
    file: std::fs::File,
    len: u64,
    next: u64,
    head: [u8; 32],
    id: ArchiveId,
    signer: Arc<Signer>,
}

impl AuditLog {
    /// Opens (creating, with its genesis) the log in `dir`; a line a crash left half-written
    /// is cut.
    pub fn open(dir: &Path, signer: Arc<Signer>) -> Result<AuditLog, EvidenceError> {
        let path = dir.join(LOG);
        let io = |e: std::io::Error| EvidenceError::Io(format!("{}: {e}", path.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        cut_torn(&path)?;
        checkpoint::cut_torn_file(&dir.join(CHECKPOINTS))?;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let mut log = AuditLog {
            dir: dir.to_path_buf(),
            file,
            len: text.len() as u64,
            next: 0,
            head: [0; 32],
            id: ArchiveId([0; 16]),
            signer,
        };
        for line in text.lines() {
            let e: Entry = serde_json::from_str(line).map_err(|e| {
                EvidenceError::Refused(format!(
                    "{}: line {} is not an audit entry ({e}): run `spoolctl audit verify`",
                    path.display(),
                    log.next + 1
                ))
            })?;
            if e.n == 0 {
                log.id = genesis_id(&e.detail).unwrap_or(log.id);
            }
            log.next = e.n + 1;
            log.head = line_hash(line);
        }
        if log.next == 0 {
            let id = ArchiveId::random();
            let public = hex(&log.signer.public());
            log.append(
                &Asker {
                    uid: 0,
                    user: "spoold".into(),
                },
                "genesis",
                &format!("log {id} signer {public}"),
                &[],
                0,
            )?;
        }
        Ok(log)
    }

    /// The log's id (its checkpoints sign it as their `archive`).
    pub fn id(&self) -> ArchiveId {
        self.id
    }

    /// Appends one entry and its checkpoint, both synced; answers its number. On any failure
    /// the log is as before and the caller refuses the request.
    pub fn append(
        &mut self,
        who: &Asker,
        action: &str,
        detail: &str,
        which: &[String],
        items: u64,
    ) -> Result<u64, EvidenceError> {
        let entry = Entry {
            n: self.next,
            prev: hex(&self.head),
            time_ms: now_ms(),
            uid: who.uid,
            user: who.user.clone(),
            action: action.into(),
            detail: detail.into(),
            items,
            which: which.iter().take(WHICH_MAX).cloned().collect(),
        };
        let line = serde_json::to_string(&entry)
            .map_err(|e| EvidenceError::Io(format!("audit entry: {e}")))?;
        let path = self.dir.join(LOG);
        let written = self
            .file
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            return Err(EvidenceError::Io(format!(
                "{}: {e}: the request is refused",
                path.display()
            )));
        }
        let head = line_hash(&line);
        if entry.n == 0 {
            self.id = genesis_id(&entry.detail).unwrap_or(self.id);
        }
        let cp = self.signer.sign(self.id, entry.n + 1, head, entry.time_ms);
        if let Err(e) = checkpoint::append_to(&self.dir.join(CHECKPOINTS), &cp) {
            let _ = self.file.set_len(self.len);
            return Err(EvidenceError::Io(format!("{e}: the request is refused")));
        }
        self.len += line.len() as u64 + 1;
        self.next += 1;
        self.head = head;
        Ok(entry.n)
    }
}

fn genesis_id(detail: &str) -> Option<ArchiveId> {
    ArchiveId::parse(detail.strip_prefix("log ")?.split(' ').next()?)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn cut_torn(path: &Path) -> Result<(), EvidenceError> {
    checkpoint::cut_torn_file(path).map(|_| ())
}

/// The entries of the log in `dir` (lines that do not parse are skipped: [`prove`] names them).
pub fn list(dir: &Path) -> Result<Vec<Entry>, EvidenceError> {
    let path = dir.join(LOG);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| EvidenceError::Io(format!("{}: {e}", path.display())))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// What a proof of the audit log found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditProof {
    /// Entries proved in sequence.
    pub entries: u64,
    /// Checkpoints whose signature and hash hold.
    pub checkpoints: u64,
    /// The signer the genesis names (hex).
    pub signer: Option<String>,
    /// Whether signatures were checked against keys given to the verifier.
    pub keys_given: bool,
    /// Checkpoints other holders keep (mirror peers) compared with the log.
    #[serde(default)]
    pub compared: u64,
    /// What does not hold, first first.
    pub breaks: Vec<Break>,
}

impl AuditProof {
    /// Whether nothing broke.
    pub fn holds(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Proves the audit log in `dir`: every line an entry, numbered in sequence, each carrying the
/// hash of the line before; every checkpoint signed by a trusted key (given, or the one the
/// genesis names) over a line that is there; the newest checkpoint covering the last line; and
/// every checkpoint other holders keep (`elsewhere`: a name, its checkpoints) holding over the
/// log and present in the local file.
pub fn prove(
    dir: &Path,
    trusted: &[[u8; 32]],
    elsewhere: &[(String, Vec<Checkpoint>)],
) -> Result<AuditProof, EvidenceError> {
    let path = dir.join(LOG);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| EvidenceError::Io(format!("{}: {e}", path.display())))?;
    let mut p = AuditProof {
        keys_given: !trusted.is_empty(),
        ..AuditProof::default()
    };
    let mut broke = |at: String, what: String| p.breaks.push(Break { at, what });
    let mut hashes = Vec::new();
    let mut prev = [0u8; 32];
    let mut id = None;
    let mut signer = None;
    for (i, line) in text.lines().enumerate() {
        let at = format!("audit line {}", i + 1);
        let entry: Entry = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(e) => {
                broke(at, format!("not an audit entry: {e}"));
                hashes.push(line_hash(line));
                prev = line_hash(line);
                continue;
            }
        };
        if entry.n != i as u64 {
            broke(
                at.clone(),
                format!("it is entry {}; entry {i} belongs here", entry.n),
            );
        }
        if unhex::<32>(&entry.prev) != Some(prev) {
            broke(
                at.clone(),
                format!(
                    "it carries {} as the previous line's hash, which is {}",
                    entry.prev,
                    hex(&prev)
                ),
            );
        }
        if i == 0 {
            id = genesis_id(&entry.detail);
            signer = entry
                .detail
                .split(" signer ")
                .nth(1)
                .and_then(|k| unhex::<32>(k.trim()));
        }
        prev = line_hash(line);
        hashes.push(prev);
    }
    p.entries = hashes.len() as u64;
    p.signer = signer.map(|k| hex(&k));
    let keys: Vec<[u8; 32]> = if trusted.is_empty() {
        signer.into_iter().collect()
    } else {
        trusted.to_vec()
    };
    let (good, bad) = checkpoint::read_file(&dir.join(CHECKPOINTS))?;
    for (line, why) in bad {
        broke(format!("audit checkpoints line {line}"), why);
    }
    let mut newest = 0;
    for (line, cp) in &good {
        let at = format!("audit checkpoints line {line}");
        match check(cp, id, &keys, &hashes) {
            Ok(()) => {
                p.checkpoints += 1;
                newest = newest.max(cp.entries);
            }
            Err(why) => broke(at, why),
        }
    }
    for (holder, theirs) in elsewhere {
        for cp in theirs {
            p.compared += 1;
            let at = format!("{holder}'s audit checkpoint of {} entries", cp.entries);
            if let Err(why) = check(cp, id, &keys, &hashes) {
                broke(at.clone(), why);
            }
            if !good.iter().any(|(_, ours)| ours == cp) {
                broke(
                    at,
                    "the local audit checkpoints file does not hold it".into(),
                );
            }
        }
    }
    if newest < p.entries {
        broke(
            "the audit log".into(),
            format!(
                "entries {newest}..{} are covered by no checkpoint (written after the last one, or the checkpoints were cut)",
                p.entries.saturating_sub(1)
            ),
        );
    }
    Ok(p)
}

fn check(
    cp: &Checkpoint,
    id: Option<ArchiveId>,
    keys: &[[u8; 32]],
    hashes: &[[u8; 32]],
) -> Result<(), String> {
    if !cp.signature_holds() {
        return Err("its signature does not hold".into());
    }
    if !keys.contains(&cp.key) {
        return Err(format!(
            "it is signed by {}, a key not trusted",
            hex(&cp.key)
        ));
    }
    if id.is_some_and(|id| id != cp.archive) {
        return Err(format!("it signs log {}, not this one", cp.archive));
    }
    match cp
        .entries
        .checked_sub(1)
        .and_then(|i| hashes.get(i as usize))
    {
        Some(h) if *h == cp.chain => Ok(()),
        Some(h) => Err(format!(
            "it signs {} as the hash of line {}; the line hashes to {} (the log was edited)",
            hex(&cp.chain),
            cp.entries,
            hex(h)
        )),
        None => Err(format!(
            "it signs {} entries; the log has {} (entries were cut off)",
            cp.entries,
            hashes.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asker() -> Asker {
        Asker {
            uid: 1000,
            user: "ann".into(),
        }
    }

    fn written(dir: &Path) -> Arc<Signer> {
        let signer = Arc::new(Signer::ephemeral());
        let mut log = AuditLog::open(dir, signer.clone()).unwrap();
        log.append(
            &asker(),
            "archive search",
            "from:bob",
            &["3".into(), "4".into()],
            2,
        )
        .unwrap();
        log.append(&asker(), "archive show", "3", &["3".into()], 1)
            .unwrap();
        drop(log);
        let mut log = AuditLog::open(dir, signer.clone()).unwrap();
        log.append(&asker(), "archive hold", "from:bob", &["3".into()], 1)
            .unwrap();
        signer
    }

    #[test]
    fn a_log_reopened_goes_on_and_proves() {
        let dir = tempfile::tempdir().unwrap();
        let signer = written(dir.path());
        let entries = list(dir.path()).unwrap();
        assert_eq!(
            entries
                .iter()
                .map(|e| e.action.as_str())
                .collect::<Vec<_>>(),
            ["genesis", "archive search", "archive show", "archive hold"]
        );
        assert_eq!(entries[1].which, ["3", "4"]);
        let p = prove(dir.path(), &[signer.public()], &[]).unwrap();
        assert!(p.holds(), "{:?}", p.breaks);
        assert_eq!((p.entries, p.checkpoints), (4, 4));
    }

    #[test]
    fn every_edit_of_the_log_is_named() {
        type Edit = fn(&Path);
        let cases: [(&str, Edit, &str, &str); 5] = [
            (
                "a query changed",
                |d| edit(d, LOG, |t| t.replacen("from:bob", "from:eve", 1)),
                "audit line 3",
                "as the previous line's hash",
            ),
            (
                "an entry removed",
                |d| {
                    edit_lines(d, |l| {
                        l.remove(2);
                    })
                },
                "audit line 3",
                "entry 3; entry 2 belongs here",
            ),
            (
                "the last entry cut",
                |d| edit_lines(d, |l| l.truncate(3)),
                "audit checkpoints line 4",
                "entries were cut off",
            ),
            (
                "two entries swapped",
                |d| edit_lines(d, |l| l.swap(1, 2)),
                "audit line 2",
                "entry 2; entry 1 belongs here",
            ),
            (
                "a checkpoint's signature altered",
                |d| {
                    edit(d, CHECKPOINTS, |t| {
                        let at = t.find("\"signature\":\"").unwrap() + 13;
                        let mut b = t.into_bytes();
                        b[at] = if b[at] == b'0' { b'1' } else { b'0' };
                        String::from_utf8(b).unwrap()
                    })
                },
                "audit checkpoints line 1",
                "signature does not hold",
            ),
        ];
        for (name, change, at, what) in cases {
            let dir = tempfile::tempdir().unwrap();
            let signer = written(dir.path());
            change(dir.path());
            let p = prove(dir.path(), &[signer.public()], &[]).unwrap();
            let first = p.breaks.first().unwrap_or_else(|| panic!("{name}: holds"));
            assert!(
                first.at == at && first.what.contains(what),
                "{name}: expected {at} / {what}, got {first:?}"
            );
        }
    }

    /// The log's lines, changed by `f`.
    fn edit_lines(dir: &Path, f: fn(&mut Vec<&str>)) {
        let path = dir.join(LOG);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        f(&mut lines);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    }

    fn edit(dir: &Path, file: &str, f: fn(String) -> String) {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, f(text)).unwrap();
    }
}
