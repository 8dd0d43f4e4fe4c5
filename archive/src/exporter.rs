//! Bulk export for discovery (`spoolctl archive export --query … --format … --out …`): the
//! items a query selects, their exact bytes, as an mbox (mboxrd), a Maildir or a zip of `.eml`
//! files, with a manifest
//! beside them: one JSON line per item (number, id, SHA-256, size, envelope, arrival, where it
//! is in the export), then a signed closing line (the query, the count, the archive, the newest
//! checkpoint of its chain, the SHA-256 of the lines before, the unit's public key and its
//! Ed25519 signature over `"spoolpair export 1"` ‖ that digest). A receiver checks the set is
//! complete and unaltered with the public key alone: the signature over the item lines, each
//! item's bytes against its hash.
//!
//! Not here: which items (the query, resolved by the caller), who may export (the admin
//! socket), the audit line.

use crate::basics::hex;
use crate::{checkpoint, Archive, ArchiveError};
pub use evidence::export::{manifest_path, ManifestEnd, ManifestItem, MANIFEST_CONTEXT};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The export's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One mboxrd file (`From ` lines quoted; `spoolctl archive import` reads it back exactly).
    Mbox,
    /// A Maildir (`cur/ new/ tmp/`), one file per item in `new/`.
    Maildir,
    /// A zip file of `<item>.eml` files (deflated).
    EmlZip,
}

impl Format {
    /// From its name on the command line.
    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "mbox" => Some(Format::Mbox),
            "maildir" => Some(Format::Maildir),
            "eml-zip" => Some(Format::EmlZip),
            _ => None,
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exported {
    /// Items.
    pub items: u64,
    /// Bytes of mail.
    pub bytes: u64,
    /// The manifest.
    pub manifest: PathBuf,
}

/// Where an export's messages go.
enum Sink {
    Mbox(std::io::BufWriter<std::fs::File>),
    Maildir,
    Zip(Box<zip::ZipWriter<std::fs::File>>),
}

fn io(what: &Path, e: std::io::Error) -> ArchiveError {
    ArchiveError::Io(format!("export {}: {e}", what.display()))
}

/// Writes items `seqs` to `out` (which must not exist) as `format`, and the manifest beside it;
/// `progress(done, total)` counts items.
pub fn export(
    archive: &Archive,
    seqs: &[u64],
    query: &str,
    format: Format,
    out: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<Exported, ArchiveError> {
    let manifest = manifest_path(out);
    for p in [out, manifest.as_path()] {
        if p.exists() {
            return Err(ArchiveError::Refused(format!(
                "{} exists: an export never writes over anything",
                p.display()
            )));
        }
    }
    let mut sink = match format {
        Format::Mbox => Sink::Mbox(std::io::BufWriter::new(
            std::fs::File::create_new(out).map_err(|e| io(out, e))?,
        )),
        Format::Maildir => {
            for sub in ["cur", "new", "tmp"] {
                std::fs::create_dir_all(out.join(sub)).map_err(|e| io(out, e))?;
            }
            Sink::Maildir
        }
        Format::EmlZip => Sink::Zip(Box::new(zip::ZipWriter::new(
            std::fs::File::create_new(out).map_err(|e| io(out, e))?,
        ))),
    };
    let mut lines = std::io::BufWriter::new(
        std::fs::File::create_new(&manifest).map_err(|e| io(&manifest, e))?,
    );
    let mut digest = Sha256::new();
    let (mut offset, mut bytes) = (0u64, 0u64);
    for (i, &seq) in seqs.iter().enumerate() {
        let (item, raw) = archive.raw(seq)?;
        let at = match &mut sink {
            Sink::Mbox(w) => {
                let mut framed =
                    crate::import::separator(&item.sender, item.arrived_ms).into_bytes();
                evidence::export::quote(&raw, &mut framed);
                framed.push(b'\n');
                w.write_all(&framed).map_err(|e| io(out, e))?;
                let at = format!("byte {offset}");
                offset += framed.len() as u64;
                at
            }
            Sink::Zip(z) => {
                let name = format!("{seq}.eml");
                let options = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated)
                    .large_file(raw.len() as u64 >= u64::from(u32::MAX));
                z.start_file(name.as_str(), options)
                    .map_err(|e| ArchiveError::Io(format!("export {}: {e}", out.display())))?;
                z.write_all(&raw).map_err(|e| io(out, e))?;
                name
            }
            Sink::Maildir => {
                // Maildir delivery: written in tmp/, synced, then renamed into new/.
                let name = format!("{}.{seq}.spoolpair", item.arrived_ms / 1000);
                let tmp = out.join("tmp").join(&name);
                let mut f = std::fs::File::create_new(&tmp).map_err(|e| io(&tmp, e))?;
                f.write_all(&raw)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io(&tmp, e))?;
                std::fs::rename(&tmp, out.join("new").join(&name)).map_err(|e| io(&tmp, e))?;
                name
            }
        };
        let line = ManifestItem {
            item: seq,
            id: item.id.clone(),
            sha256: hex(&item.hash),
            size: raw.len() as u64,
            sender: item.sender.clone(),
            recipients: item.recipients.clone(),
            arrived_ms: item.arrived_ms,
            at,
        };
        let mut text = serde_json::to_string(&line).map_err(|e| ArchiveError::Io(e.to_string()))?;
        text.push('\n');
        digest.update(text.as_bytes());
        lines
            .write_all(text.as_bytes())
            .map_err(|e| io(&manifest, e))?;
        bytes += raw.len() as u64;
        progress(i as u64 + 1, seqs.len() as u64);
    }
    match sink {
        Sink::Mbox(mut w) => w
            .flush()
            .and_then(|()| w.get_ref().sync_all())
            .map_err(|e| io(out, e))?,
        Sink::Zip(z) => z
            .finish()
            .map_err(|e| ArchiveError::Io(format!("export {}: {e}", out.display())))?
            .sync_all()
            .map_err(|e| io(out, e))?,
        Sink::Maildir => {}
    }
    let items_sha256: [u8; 32] = digest.finalize().into();
    let signer = archive.signer();
    let (_, archive_id) = archive.signing_key()?;
    // The chain as of the export, signed: the reference a receiver can hold the items against.
    archive.checkpoint_now()?;
    let checkpoint = checkpoint::tail(&archive.store().dir().join(checkpoint::FILE), 64 << 10)?
        .last()
        .map(checkpoint::Checkpoint::to_line);
    let end = ManifestEnd {
        query: query.to_string(),
        count: seqs.len() as u64,
        archive: archive_id.map(|a| a.to_string()),
        checkpoint,
        items_sha256: hex(&items_sha256),
        key: hex(&signer.public()),
        signature: hex(&signer.sign_digest(MANIFEST_CONTEXT, &items_sha256)),
    };
    let mut text = serde_json::to_string(&end).map_err(|e| ArchiveError::Io(e.to_string()))?;
    text.push('\n');
    lines
        .write_all(text.as_bytes())
        .and_then(|()| lines.flush())
        .and_then(|()| lines.get_ref().sync_all())
        .map_err(|e| io(&manifest, e))?;
    Ok(Exported {
        items: seqs.len() as u64,
        bytes,
        manifest,
    })
}
