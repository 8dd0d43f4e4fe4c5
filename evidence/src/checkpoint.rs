//! Signed checkpoints: a unit's Ed25519 signature over (archive id, entries, chain hash, time),
//! made every so many entries or seconds. A checkpoint pins the chain up to its entries: a
//! record altered, removed or cut off before that point no longer gives the signed hash, and
//! with copies of the checkpoints elsewhere (the object store, mirror peers) even a rewrite of
//! the whole local chain and its local checkpoints is caught.
//!
//! Checkpoints are JSON lines in `<archive>/checkpoints` (appended, `fdatasync`ed), one object
//! each: `{"archive","entries","chain","time_ms","key","signature"}` (hex). The signed bytes:
//!
//! ```text
//! "spoolpair checkpoint 1" ‖ archive (16) ‖ entries (u64 BE) ‖ chain (32) ‖ time_ms (u64 BE)
//! ```
//!
//! The signing key is a file of its own (`crate::checkpoint::Signer`), 0600, outside the archive
//! directory, so that a copied-out archive carries no secret. Cryptography is `ed25519-dalek`.
//! This module signs, checks and stores; when to sign is the writer's (`store.rs`).

use crate::{hex, unhex, ArchiveId, EvidenceError};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use std::io::Write as _;
use std::path::Path;

/// The checkpoints' file name in the archive directory.
pub const FILE: &str = "checkpoints";

/// One signed checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The archive.
    pub archive: ArchiveId,
    /// Entries covered: entries `0 .. entries` of the chain.
    pub entries: u64,
    /// The hash of entry `entries - 1`.
    pub chain: [u8; 32],
    /// When it was signed, ms since the epoch.
    pub time_ms: u64,
    /// The Ed25519 public key that signed it.
    pub key: [u8; 32],
    /// The signature over [`Checkpoint::signed_bytes`].
    pub signature: [u8; 64],
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    archive: String,
    entries: u64,
    chain: String,
    time_ms: u64,
    key: String,
    signature: String,
}

impl Checkpoint {
    fn signed_bytes(archive: &ArchiveId, entries: u64, chain: &[u8; 32], time_ms: u64) -> Vec<u8> {
        let mut b = Vec::with_capacity(96);
        b.extend_from_slice(b"spoolpair checkpoint 1");
        b.extend_from_slice(&archive.0);
        b.extend_from_slice(&entries.to_be_bytes());
        b.extend_from_slice(chain);
        b.extend_from_slice(&time_ms.to_be_bytes());
        b
    }

    /// Whether the signature is `key`'s over the checkpoint's fields.
    pub fn signature_holds(&self) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.key) else {
            return false;
        };
        let signed =
            Checkpoint::signed_bytes(&self.archive, self.entries, &self.chain, self.time_ms);
        key.verify(&signed, &Signature::from_bytes(&self.signature))
            .is_ok()
    }

    /// Its line in the checkpoints file (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(&Line {
            archive: self.archive.to_string(),
            entries: self.entries,
            chain: hex(&self.chain),
            time_ms: self.time_ms,
            key: hex(&self.key),
            signature: hex(&self.signature),
        })
        .unwrap_or_default()
    }

    /// Parses a line of the checkpoints file.
    pub fn from_line(line: &str) -> Result<Checkpoint, String> {
        let l: Line = serde_json::from_str(line).map_err(|e| format!("not a checkpoint: {e}"))?;
        let field = |name: &str| format!("not a checkpoint: {name} is not hex of its length");
        Ok(Checkpoint {
            archive: ArchiveId::parse(&l.archive).ok_or_else(|| field("archive"))?,
            entries: l.entries,
            chain: unhex(&l.chain).ok_or_else(|| field("chain"))?,
            time_ms: l.time_ms,
            key: unhex(&l.key).ok_or_else(|| field("key"))?,
            signature: unhex(&l.signature).ok_or_else(|| field("signature"))?,
        })
    }
}

/// A unit's signing key.
pub struct Signer {
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        write!(f, "Signer({})", hex(&self.public()))
    }
}

impl Signer {
    /// A key that lives in memory only (tests, benchmarks).
    pub fn ephemeral() -> Signer {
        Signer {
            key: SigningKey::from_bytes(&rand::random()),
        }
    }

    /// Loads the key at `path`, or makes one there (0600, synced) when there is none. A key
    /// file others may read is refused: whoever reads it can sign checkpoints.
    pub fn load_or_create(path: &Path) -> Result<Signer, EvidenceError> {
        const WHAT: &str = "signing key";
        if let Some(text) = crate::secret::read(path, WHAT)? {
            let seed: [u8; 32] = unhex(text.trim()).ok_or_else(|| {
                EvidenceError::Refused(format!(
                    "signing key {} is not 64 hex digits",
                    path.display()
                ))
            })?;
            return Ok(Signer {
                key: SigningKey::from_bytes(&seed),
            });
        }
        let seed: [u8; 32] = rand::random();
        crate::secret::write(path, WHAT, &format!("{}\n", hex(&seed)), true)?;
        let key = SigningKey::from_bytes(&seed);
        tracing::info!(key = %hex(&key.verifying_key().to_bytes()), path = %path.display(), "archive: made a checkpoint signing key");
        Ok(Signer { key })
    }

    /// The public key (what verifiers are given).
    pub fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs a checkpoint of `archive` at `entries` entries whose last hash is `chain`.
    pub fn sign(
        &self,
        archive: ArchiveId,
        entries: u64,
        chain: [u8; 32],
        time_ms: u64,
    ) -> Checkpoint {
        let signed = Checkpoint::signed_bytes(&archive, entries, &chain, time_ms);
        Checkpoint {
            archive,
            entries,
            chain,
            time_ms,
            key: self.public(),
            signature: self.key.sign(&signed).to_bytes(),
        }
    }
}

impl Signer {
    /// Signs `context ‖ digest` (a manifest's digest, say): the context names what is signed,
    /// so a signature over one kind of thing is never taken for another.
    pub fn sign_digest(&self, context: &[u8], digest: &[u8; 32]) -> [u8; 64] {
        let mut msg = context.to_vec();
        msg.extend_from_slice(digest);
        self.key.sign(&msg).to_bytes()
    }
}

/// Whether `signature` by `key` over `context ‖ digest` holds ([`Signer::sign_digest`]).
pub fn digest_signature_holds(
    key: &[u8; 32],
    context: &[u8],
    digest: &[u8; 32],
    signature: &[u8; 64],
) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(key) else {
        return false;
    };
    let mut msg = context.to_vec();
    msg.extend_from_slice(digest);
    key.verify(&msg, &Signature::from_bytes(signature)).is_ok()
}

/// Appends `cp` to the checkpoints file in `dir` and syncs it.
pub fn append(dir: &Path, cp: &Checkpoint) -> Result<(), EvidenceError> {
    append_to(&dir.join(FILE), cp)
}

/// Appends `cp` to the checkpoints file `path` and syncs it.
pub fn append_to(path: &Path, cp: &Checkpoint) -> Result<(), EvidenceError> {
    let io = |e: std::io::Error| EvidenceError::Io(format!("{}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(io)?;
    let before = f.metadata().map_err(io)?.len();
    let written = f
        .write_all(format!("{}\n", cp.to_line()).as_bytes())
        .and_then(|()| f.sync_data());
    if let Err(e) = written {
        // A line cut short by a full disk must not stay for the next one to follow.
        let _ = f.set_len(before);
        return Err(io(e));
    }
    Ok(())
}

/// Replaces the checkpoints file in `dir` with `text`, whole: a temporary file beside it,
/// synced, renamed over it, and the directory synced (a crash leaves the old file or the new
/// one, never a mix).
pub fn replace(dir: &Path, text: &str) -> Result<(), EvidenceError> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.replacing"));
    let io = |e: std::io::Error| EvidenceError::Io(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Cuts a line a crash left half-written at the end of the checkpoints file in `dir` (a
/// checkpoint is appended whole, then synced: only the last line can be torn). Answers the bytes
/// cut.
pub fn cut_torn_tail(dir: &Path) -> Result<u64, EvidenceError> {
    cut_torn_file(&dir.join(FILE))
}

/// [`cut_torn_tail`] of any file of lines appended whole.
pub fn cut_torn_file(path: &Path) -> Result<u64, EvidenceError> {
    let io = |e: std::io::Error| EvidenceError::Io(format!("{}: {e}", path.display()));
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    if text.is_empty() || text.ends_with(b"\n") {
        return Ok(0);
    }
    let keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io)?;
    f.set_len(keep as u64)
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    tracing::warn!(
        bytes = text.len() - keep,
        file = %path.display(),
        "archive: a line half-written at a crash was cut"
    );
    Ok((text.len() - keep) as u64)
}

/// The checkpoints in a checkpoints file's text, each with its line number, and the lines that
/// are not checkpoints (line number, why). A file that does not exist has none.
pub type Lines = (Vec<(usize, Checkpoint)>, Vec<(usize, String)>);

/// Reads the checkpoints file in `dir` ([`Lines`]).
pub fn read(dir: &Path) -> Result<Lines, EvidenceError> {
    read_file(&dir.join(FILE))
}

/// [`read`] of the checkpoints file `path`.
pub fn read_file(path: &Path) -> Result<Lines, EvidenceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(EvidenceError::Io(format!("{}: {e}", path.display()))),
    };
    Ok(parse(&text))
}

/// Up to `max` whole lines of the file `path` from byte `offset` on (a line not yet ended by
/// its newline is left for later); none when there is no file or nothing past `offset`.
pub fn lines_after(path: &Path, offset: u64, max: usize) -> Result<Vec<String>, EvidenceError> {
    use std::io::{Read as _, Seek as _};
    let io = |e: std::io::Error| EvidenceError::Io(format!("{}: {e}", path.display()));
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    if f.metadata().map_err(io)?.len() <= offset {
        return Ok(Vec::new());
    }
    f.seek(std::io::SeekFrom::Start(offset)).map_err(io)?;
    // A checkpoint line is about 300 bytes.
    let mut buf = Vec::with_capacity(max * 512);
    f.take((max * 1024) as u64)
        .read_to_end(&mut buf)
        .map_err(io)?;
    let whole = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    Ok(String::from_utf8_lossy(&buf[..whole])
        .lines()
        .take(max)
        .map(str::to_string)
        .collect())
}

/// The checkpoints in the last `bytes` of the file `path` (a line cut by the start of the
/// window is skipped); none when there is no file.
pub fn tail(path: &Path, bytes: u64) -> Result<Vec<Checkpoint>, EvidenceError> {
    use std::io::{Read as _, Seek as _};
    let io = |e: std::io::Error| EvidenceError::Io(format!("{}: {e}", path.display()));
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let len = f.metadata().map_err(io)?.len();
    f.seek(std::io::SeekFrom::Start(len.saturating_sub(bytes)))
        .map_err(io)?;
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(io)?;
    Ok(parse(&text).0.into_iter().map(|(_, cp)| cp).collect())
}

/// Every line of `text` as a checkpoint (another holder's copy, compared whole): `Err` names
/// the first line that is not one.
pub fn parse_all(text: &str) -> Result<Vec<Checkpoint>, String> {
    let (good, bad) = parse(text);
    if let Some((line, why)) = bad.first() {
        return Err(format!("line {line}: {why}"));
    }
    Ok(good.into_iter().map(|(_, cp)| cp).collect())
}

/// [`read`] of text already read.
pub fn parse(text: &str) -> Lines {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match Checkpoint::from_line(line) {
            Ok(cp) => good.push((i + 1, cp)),
            Err(e) => bad.push((i + 1, e)),
        }
    }
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn replace_leaves_the_new_text_whole_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "old line\nanother\n").unwrap();
        replace(dir.path(), "new line\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FILE)).unwrap(),
            "new line\n"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE]);
    }

    #[test]
    fn a_checkpoint_holds_until_any_field_or_its_key_changes() {
        let signer = Signer::ephemeral();
        let cp = signer.sign(ArchiveId([1; 16]), 10, [2; 32], 1234);
        assert!(cp.signature_holds());
        let back = Checkpoint::from_line(&cp.to_line()).unwrap();
        assert_eq!(back, cp);
        let changes: [fn(&mut Checkpoint); 6] = [
            |c| c.archive.0[0] ^= 1,
            |c| c.entries += 1,
            |c| c.chain[31] ^= 1,
            |c| c.time_ms += 1,
            |c| c.signature[0] ^= 1,
            |c| c.key = Signer::ephemeral().public(),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut c = cp.clone();
            change(&mut c);
            assert!(!c.signature_holds(), "change {i} still holds");
        }
    }

    #[test]
    fn the_key_file_is_made_private_once_and_a_readable_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/archive.key");
        let a = Signer::load_or_create(&path).unwrap();
        let b = Signer::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!format!("{a:?}").contains(&std::fs::read_to_string(&path).unwrap()[..64]));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Signer::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("readable by others (mode 644)"), "{e}");
    }

    #[test]
    fn a_torn_last_line_is_cut_and_whole_lines_stay() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::ephemeral();
        let cp = signer.sign(ArchiveId([1; 16]), 10, [2; 32], 1234);
        append(dir.path(), &cp).unwrap();
        assert_eq!(cut_torn_tail(dir.path()).unwrap(), 0);
        let whole = std::fs::read(dir.path().join(FILE)).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(&whole[..30]);
        std::fs::write(dir.path().join(FILE), &torn).unwrap();
        assert_eq!(cut_torn_tail(dir.path()).unwrap(), 30);
        assert_eq!(std::fs::read(dir.path().join(FILE)).unwrap(), whole);
        assert_eq!(read(dir.path()).unwrap().0, vec![(1, cp)]);
    }

    #[test]
    fn lines_are_read_from_a_byte_offset_whole_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one\ntwo\nthree\nfour").unwrap();
        assert_eq!(lines_after(&path, 0, 10).unwrap(), ["one", "two", "three"]);
        assert_eq!(lines_after(&path, 4, 1).unwrap(), ["two"]);
        assert_eq!(lines_after(&path, 8, 10).unwrap(), ["three"]);
        assert!(
            lines_after(&path, 14, 10).unwrap().is_empty(),
            "no newline yet"
        );
        assert!(lines_after(&dir.path().join("none"), 0, 10)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn lines_that_are_not_checkpoints_are_named_by_number() {
        let signer = Signer::ephemeral();
        let cp = signer.sign(ArchiveId([1; 16]), 10, [2; 32], 1234);
        let text = format!("{}\n{{\"archive\":1}}\n\n{}", cp.to_line(), "{\"arch");
        let (good, bad) = parse(&text);
        assert_eq!(good, vec![(1, cp)]);
        assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), [2, 4]);
    }
}
