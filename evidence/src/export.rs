//! Bulk exports as evidence (an mbox, a Maildir or a zip of `.eml` files): the manifest an
//! export writes beside its messages (one line per item, closed by a line signed with the
//! unit's key), `From ` quoting of mboxrd files, and the
//! check a receiver runs with the public key alone (`spoolctl archive verify-export`): the
//! signature over the item lines, then each message in the export against its line (hash,
//! size), nothing missing and nothing added.
//!
//! Not here: writing exports (`archive::exporter`), reading mail sources (`archive::import`).

use crate::proof::Break;
use crate::{hex, unhex, EvidenceError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What a manifest's closing signature covers.
pub const MANIFEST_CONTEXT: &[u8] = b"spoolpair export 1";

/// One item's line of the manifest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestItem {
    /// Its number in the archive.
    pub item: u64,
    /// The spool id it had.
    pub id: String,
    /// SHA-256 of its bytes (hex).
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Envelope sender.
    pub sender: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// Accepted at, ms since the epoch.
    pub arrived_ms: u64,
    /// Where it is in the export: `byte N` of the mbox, or the Maildir file's name.
    pub at: String,
}

/// The manifest's closing line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEnd {
    /// The query that selected the items.
    pub query: String,
    /// Items exported.
    pub count: u64,
    /// The archive's id.
    pub archive: Option<String>,
    /// The newest checkpoint of the archive's chain at the export (its JSON line).
    pub checkpoint: Option<String>,
    /// SHA-256 (hex) of the manifest's item lines, each with its line break.
    pub items_sha256: String,
    /// The unit's Ed25519 public key (hex).
    pub key: String,
    /// Its signature (hex) over [`MANIFEST_CONTEXT`] ‖ the item lines' digest.
    pub signature: String,
}

/// The manifest of an export at `out`.
pub fn manifest_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".manifest.jsonl");
    out.with_file_name(name)
}

/// Quotes a message for an mboxrd file (every `>`*`From ` line gets one `>` more), so that
/// [`unquote`] gives it back byte for byte.
pub fn quote(raw: &[u8], out: &mut Vec<u8>) {
    for line in raw.split_inclusive(|&b| b == b'\n') {
        let quotes = line.iter().take_while(|&&b| b == b'>').count();
        if line[quotes..].starts_with(b"From ") {
            out.push(b'>');
        }
        out.extend_from_slice(line);
    }
}

/// Undoes `From ` quoting: mboxrd (every `>`*`From ` line loses one `>`), or with
/// `single_only` mboxo (only `>From `).
pub fn unquote(body: &[u8], single_only: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    for line in body.split_inclusive(|&b| b == b'\n') {
        let quotes = line.iter().take_while(|&&b| b == b'>').count();
        let quoted = quotes > 0 && line[quotes..].starts_with(b"From ");
        let undo = quoted && (!single_only || quotes == 1);
        out.extend_from_slice(if undo { &line[1..] } else { line });
    }
    out
}

/// What the check of an export found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportProof {
    /// Items the manifest lists.
    pub items: u64,
    /// Of them, found in the export with their hash and size.
    pub whole: u64,
    /// The query the export answered.
    pub query: String,
    /// The key that signed the manifest (hex).
    pub key: String,
    /// Whether that key was one the verifier gave (else: the key the manifest names).
    pub keys_given: bool,
    /// Everything that does not hold.
    pub breaks: Vec<Break>,
}

impl ExportProof {
    /// Whether nothing broke.
    pub fn holds(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Checks the export at `out` (an mbox file or a Maildir) against its manifest, with the
/// `trusted` keys (none: the key the manifest names, said so).
pub fn verify(out: &Path, trusted: &[[u8; 32]]) -> Result<ExportProof, EvidenceError> {
    let manifest = manifest_path(out);
    let text = std::fs::read_to_string(&manifest)
        .map_err(|e| EvidenceError::Io(format!("{}: {e}", manifest.display())))?;
    let mut p = ExportProof {
        keys_given: !trusted.is_empty(),
        ..ExportProof::default()
    };
    let mut broke = |at: String, what: String| p.breaks.push(Break { at, what });
    let lines: Vec<&str> = text.lines().collect();
    let Some((last, item_lines)) = lines.split_last() else {
        return Err(EvidenceError::Refused(format!(
            "{}: empty",
            manifest.display()
        )));
    };
    let end: ManifestEnd = serde_json::from_str(last).map_err(|e| {
        EvidenceError::Refused(format!("{}: the closing line: {e}", manifest.display()))
    })?;
    let digest: [u8; 32] = item_lines
        .iter()
        .fold(Sha256::new(), |h, l| {
            h.chain_update(l.as_bytes()).chain_update(b"\n")
        })
        .finalize()
        .into();
    let key = unhex::<32>(&end.key);
    let signature = unhex::<64>(&end.signature);
    match (key, signature) {
        (Some(key), Some(sig)) => {
            if !crate::checkpoint::digest_signature_holds(&key, MANIFEST_CONTEXT, &digest, &sig) {
                broke(
                    "manifest".into(),
                    "its signature does not hold over its item lines: a line was changed, added or removed".into(),
                );
            }
            if !trusted.is_empty() && !trusted.contains(&key) {
                broke(
                    "manifest".into(),
                    format!("it is signed by {}, a key not given", end.key),
                );
            }
        }
        _ => broke("manifest".into(), "its key or signature is not hex".into()),
    }
    if hex(&digest) != end.items_sha256 {
        broke(
            "manifest".into(),
            "its item lines do not hash to the digest it names".into(),
        );
    }
    let mut items = Vec::new();
    for (i, l) in item_lines.iter().enumerate() {
        match serde_json::from_str::<ManifestItem>(l) {
            Ok(item) => items.push(item),
            Err(e) => broke(
                format!("manifest line {}", i + 1),
                format!("unreadable: {e}"),
            ),
        }
    }
    if end.count != items.len() as u64 {
        broke(
            "manifest".into(),
            format!("it says {} items and lists {}", end.count, items.len()),
        );
    }
    p.items = items.len() as u64;
    p.query = end.query.clone();
    p.key = end.key.clone();
    let found = if out.is_dir() {
        maildir_messages(out, &items, &mut broke)
    } else if is_zip(out) {
        zip_messages(out, &items, &mut broke)?
    } else {
        mbox_messages(out, &items, &mut broke)?
    };
    for (item, raw) in items.iter().zip(found) {
        let Some(raw) = raw else { continue };
        let got = hex(&Sha256::digest(&raw));
        if got != item.sha256 || raw.len() as u64 != item.size {
            broke(
                format!("item {} ({})", item.item, item.at),
                format!(
                    "its bytes ({} bytes, SHA-256 {got}) are not the {} bytes with SHA-256 {} the manifest names",
                    raw.len(),
                    item.size,
                    item.sha256
                ),
            );
        } else {
            p.whole += 1;
        }
    }
    Ok(p)
}

fn is_zip(path: &Path) -> bool {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok_and(|()| head == *b"PK\x03\x04")
}

/// Each listed item's bytes in a zip export (`None` where missing); an entry not listed is a
/// break.
fn zip_messages(
    out: &Path,
    items: &[ManifestItem],
    broke: &mut impl FnMut(String, String),
) -> Result<Vec<Option<Vec<u8>>>, EvidenceError> {
    let file = std::fs::File::open(out)
        .map_err(|e| EvidenceError::Io(format!("{}: {e}", out.display())))?;
    let mut z = zip::ZipArchive::new(file)
        .map_err(|e| EvidenceError::Refused(format!("{}: {e}", out.display())))?;
    let listed: std::collections::HashSet<&str> = items.iter().map(|i| i.at.as_str()).collect();
    for name in z.file_names() {
        if !listed.contains(name) {
            broke(
                name.to_string(),
                "a message the manifest does not list".into(),
            );
        }
    }
    Ok(items
        .iter()
        .map(|i| {
            let mut entry = match z.by_name(&i.at) {
                Ok(e) => e,
                Err(e) => {
                    broke(
                        format!("item {} ({})", i.item, i.at),
                        format!("missing: {e}"),
                    );
                    return None;
                }
            };
            let mut bytes = Vec::new();
            match std::io::Read::read_to_end(&mut entry, &mut bytes) {
                Ok(_) => Some(bytes),
                Err(e) => {
                    broke(
                        format!("item {} ({})", i.item, i.at),
                        format!("unreadable: {e}"),
                    );
                    None
                }
            }
        })
        .collect())
}

/// Each listed item's bytes in a Maildir export (`None` where missing); a file not listed is a
/// break.
fn maildir_messages(
    out: &Path,
    items: &[ManifestItem],
    broke: &mut impl FnMut(String, String),
) -> Vec<Option<Vec<u8>>> {
    let listed: std::collections::HashSet<&str> = items.iter().map(|i| i.at.as_str()).collect();
    for sub in ["new", "cur"] {
        for e in std::fs::read_dir(out.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !listed.contains(name.as_str()) {
                broke(
                    format!("{sub}/{name}"),
                    "a message the manifest does not list".into(),
                );
            }
        }
    }
    items
        .iter()
        .map(|i| match std::fs::read(out.join("new").join(&i.at)) {
            Ok(b) => Some(b),
            Err(e) => {
                broke(
                    format!("item {} ({})", i.item, i.at),
                    format!("missing: {e}"),
                );
                None
            }
        })
        .collect()
}

/// Each listed item's bytes in an mbox export: from its `byte N` to the next item's (or the
/// end), its separator line and closing empty line taken off, unquoted.
fn mbox_messages(
    out: &Path,
    items: &[ManifestItem],
    broke: &mut impl FnMut(String, String),
) -> Result<Vec<Option<Vec<u8>>>, EvidenceError> {
    let data =
        std::fs::read(out).map_err(|e| EvidenceError::Io(format!("{}: {e}", out.display())))?;
    let offsets: Vec<Option<usize>> = items
        .iter()
        .map(|i| i.at.strip_prefix("byte ").and_then(|n| n.parse().ok()))
        .collect();
    let mut starts: Vec<usize> = offsets.iter().flatten().copied().collect();
    starts.sort_unstable();
    if starts.first().is_some_and(|&s| s > 0) || (starts.is_empty() && !data.is_empty()) {
        broke(
            "byte 0".into(),
            "bytes before the first listed message: a message the manifest does not list".into(),
        );
    }
    Ok(items
        .iter()
        .zip(offsets)
        .map(|(item, at)| {
            let place = format!("item {} ({})", item.item, item.at);
            let Some(at) = at.filter(|&a| a < data.len()) else {
                broke(place, "not in the mbox".into());
                return None;
            };
            let end = starts
                .iter()
                .find(|&&s| s > at)
                .copied()
                .unwrap_or(data.len());
            let chunk = &data[at..end];
            if !chunk.starts_with(b"From ") {
                broke(place, "no `From ` line where the manifest places it".into());
                return None;
            }
            let body_start = chunk
                .iter()
                .position(|&b| b == b'\n')
                .map_or(chunk.len(), |i| i + 1);
            let body = &chunk[body_start..];
            let body = body.strip_suffix(b"\n").unwrap_or(body);
            Some(unquote(body, false))
        })
        .collect())
}
