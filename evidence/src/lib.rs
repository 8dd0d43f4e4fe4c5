//! The archive as evidence: what its segments hold and how anyone proves it.
//!
//! - [`item`]: the catalog's item encoding.
//! - [`record`]: the segment frame (bodies, chain entries, and
//!   the unchained records of older versions).
//! - [`chain`]: the hash chain over the archive's history (every item stored, held, released,
//!   removed; every signer), numbered without gaps.
//! - [`checkpoint`]: Ed25519-signed checkpoints of the chain's head, and the signing key file.
//! - [`proof`]: the verifier: segment bytes and checkpoints in, every break named out.
//! - [`seal`]: encryption at rest: the keyring and the sealed frame.
//! - [`export`]: bulk exports' manifests, mboxrd quoting, and their check.
//! - [`audit`]: the record of who looked, a hash-chained and signed log of its own.
//!
//! Not here: writing segments, the catalog, the index, the object store (the `archive` crate).
//! This crate needs no catalog and no daemon, so `spoolctl archive verify --dir` runs on an
//! auditor's machine over a copied-out archive.

pub mod audit;
pub mod chain;
pub mod checkpoint;
pub mod export;
pub mod item;
pub mod proof;
pub mod record;
pub mod seal;
pub mod secret;

/// Why an evidence operation failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// A key or a file is not as it must be.
    #[error("{0}")]
    Refused(String),
}

/// An archive's id: 16 random bytes, shown as 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchiveId(pub [u8; 16]);

impl ArchiveId {
    /// A new, random id.
    pub fn random() -> ArchiveId {
        ArchiveId(rand::random())
    }

    /// From its hex text.
    pub fn parse(text: &str) -> Option<ArchiveId> {
        unhex(text).map(ArchiveId)
    }

    /// The id as two numbers (the catalog's counters are u64s).
    pub fn halves(&self) -> (u64, u64) {
        let (hi, lo) = self.0.split_at(8);
        let n = |s: &[u8]| s.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        (n(hi), n(lo))
    }

    /// From [`ArchiveId::halves`].
    pub fn from_halves(hi: u64, lo: u64) -> ArchiveId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&hi.to_be_bytes());
        b[8..].copy_from_slice(&lo.to_be_bytes());
        ArchiveId(b)
    }
}

impl std::fmt::Display for ArchiveId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of lower- or upper-case hex text of exactly `N` bytes.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut b = [0u8; N];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(b)
}
