//! Encryption at rest of the archive's records: the keyring and the sealed frame.
//!
//! A sealed frame (`record::Kind::Sealed`) wraps one whole record frame (a body, a chain entry,
//! an unchained record of an older version):
//!
//! ```text
//! key id u32 | nonce (24) | XChaCha20-Poly1305(inner frame) with its tag (16)
//! ```
//!
//! authenticated with `"spoolpair sealed 1" ‖ key id` as associated data. The nonce is random
//! (192 bits: no counter to keep across crashes, no practical chance of a repeat). The key id is
//! the first four bytes of SHA-256(`"spoolpair key id 1"` ‖ key), so a wrong keyring names the
//! id it lacks instead of failing as if the data were damaged.
//!
//! The keyring file holds the data keys in the order they were made (the last one seals new
//! frames, every one opens what it sealed) and the secret that keys the catalog's dedup keys
//! (HMAC-SHA-256, so a copy of the catalog does not tell whether a known message was archived).
//! Not here: which frames are sealed, when keys rotate, re-sealing (the `archive` crate).

use crate::{hex, unhex, EvidenceError};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Associated data: the format and the key id.
const AAD_TAG: &[u8] = b"spoolpair sealed 1";
/// Key id u32 and nonce before the ciphertext.
pub const SEALED_HEAD: usize = 4 + 24;
/// The authentication tag after it.
pub const TAG_LEN: usize = 16;
const FILE_HEADER: &str = "# spoolpair archive keyring 1: data keys in the order made (the last seals new records), \
and the dedup secret. Without this file the archive cannot be read: keep a copy apart from the archive.\n";

/// A data key.
#[derive(Clone)]
struct DataKey {
    id: u32,
    created_ms: u64,
    secret: [u8; 32],
    cipher: XChaCha20Poly1305,
}

/// What the keyring says of a key (never the key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyInfo {
    /// Its id, as sealed frames name it.
    pub id: u32,
    /// When it was made, ms since the epoch.
    pub created_ms: u64,
    /// Whether it seals new records.
    pub current: bool,
}

/// Why a sealed record did not open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The archive is encrypted and no keyring was given.
    #[error("the record is sealed (key {0:08x}) and no keyring was given")]
    NoKeyring(u32),
    /// The keyring lacks the key the record names.
    #[error("the record is sealed with key {0:08x}, which the keyring does not have")]
    UnknownKey(u32),
    /// Authentication failed: the record was altered (or the key with its id is another).
    #[error("the record sealed with key {0:08x} fails authentication: altered")]
    Altered(u32),
    /// Shorter than a sealed record can be.
    #[error("sealed record cut short")]
    Short,
}

/// The keys that seal and open an archive's records.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<DataKey>,
    dedup: [u8; 32],
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a secret.
        write!(f, "Keyring({:?})", self.infos())
    }
}

/// The id of a key: the first four bytes of its tagged digest.
pub fn key_id(secret: &[u8; 32]) -> u32 {
    let d = Sha256::new()
        .chain_update(b"spoolpair key id 1")
        .chain_update(secret)
        .finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn data_key(secret: [u8; 32], created_ms: u64) -> DataKey {
    DataKey {
        id: key_id(&secret),
        created_ms,
        cipher: XChaCha20Poly1305::new(Key::from_slice(&secret)),
        secret,
    }
}

fn aad(id: u32) -> [u8; AAD_TAG.len() + 4] {
    let mut a = [0u8; AAD_TAG.len() + 4];
    a[..AAD_TAG.len()].copy_from_slice(AAD_TAG);
    a[AAD_TAG.len()..].copy_from_slice(&id.to_be_bytes());
    a
}

impl Keyring {
    /// A new keyring: one data key and a dedup secret, random.
    pub fn generate(now_ms: u64) -> Keyring {
        Keyring {
            keys: vec![data_key(rand::random(), now_ms)],
            dedup: rand::random(),
        }
    }

    /// Parses a keyring's text (`source` names it in errors): `dedup <hex>` once and
    /// `key <id hex> <secret hex> <created ms>` lines, `#` comments.
    pub fn parse(text: &str, source: &str) -> Result<Keyring, EvidenceError> {
        let bad = |line: usize, what: &str| {
            EvidenceError::Refused(format!("keyring {source} line {line}: {what}"))
        };
        let mut keys = Vec::new();
        let mut dedup = None;
        for (i, line) in text.lines().enumerate() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                [w, ..] if w.starts_with('#') => {}
                ["dedup", secret] => {
                    if dedup.is_some() {
                        return Err(bad(i + 1, "a second dedup secret"));
                    }
                    dedup = Some(
                        unhex::<32>(secret)
                            .ok_or_else(|| bad(i + 1, "secret not 64 hex digits"))?,
                    );
                }
                ["key", id, secret, created] => {
                    let secret =
                        unhex::<32>(secret).ok_or_else(|| bad(i + 1, "key not 64 hex digits"))?;
                    let created = created
                        .parse()
                        .map_err(|_| bad(i + 1, "creation time not a number"))?;
                    let key = data_key(secret, created);
                    if format!("{:08x}", key.id) != id.to_ascii_lowercase() {
                        return Err(bad(i + 1, "the id is not the key's (a damaged line?)"));
                    }
                    if keys.iter().any(|k: &DataKey| k.id == key.id) {
                        return Err(bad(i + 1, "a key listed twice"));
                    }
                    keys.push(key);
                }
                _ => {
                    return Err(bad(
                        i + 1,
                        "neither `key ID SECRET CREATED_MS` nor `dedup SECRET`",
                    ))
                }
            }
        }
        let dedup = dedup.ok_or_else(|| bad(0, "no dedup secret"))?;
        if keys.is_empty() {
            return Err(bad(0, "no key"));
        }
        Ok(Keyring { keys, dedup })
    }

    /// The keyring's text, as [`Keyring::parse`] reads it.
    pub fn text(&self) -> String {
        let mut t = String::from(FILE_HEADER);
        t.push_str(&format!("dedup {}\n", hex(&self.dedup)));
        for k in &self.keys {
            t.push_str(&format!(
                "key {:08x} {} {}\n",
                k.id,
                hex(&k.secret),
                k.created_ms
            ));
        }
        t
    }

    /// Loads the keyring file at `path`, or `None` when there is none (refused if others may
    /// read it).
    pub fn load(path: &Path) -> Result<Option<Keyring>, EvidenceError> {
        crate::secret::read(path, "keyring")?
            .map(|text| Keyring::parse(&text, &path.display().to_string()))
            .transpose()
    }

    /// Writes the keyring to `path` (0600, atomically, synced; `create_new`: only where there is
    /// none).
    pub fn save(&self, path: &Path, create_new: bool) -> Result<(), EvidenceError> {
        crate::secret::write(path, "keyring", &self.text(), create_new)
    }

    /// Adds a new data key, which seals from now on; answers it.
    pub fn rotate(&mut self, now_ms: u64) -> KeyInfo {
        loop {
            let key = data_key(rand::random(), now_ms);
            // Ids are 32 bits of a digest: a repeat is possible, if absurdly rare, and would
            // make two keys answer to one id.
            if self.keys.iter().all(|k| k.id != key.id) {
                self.keys.push(key);
                break;
            }
        }
        self.current_info()
    }

    /// Whether the keyring holds the key with this id.
    pub fn has(&self, id: u32) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// The keys, oldest first.
    pub fn infos(&self) -> Vec<KeyInfo> {
        let last = self.keys.len() - 1;
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| KeyInfo {
                id: k.id,
                created_ms: k.created_ms,
                current: i == last,
            })
            .collect()
    }

    fn current(&self) -> &DataKey {
        // `parse` and `generate` never make a keyring without a key.
        &self.keys[self.keys.len() - 1]
    }

    /// The key that seals new records.
    pub fn current_info(&self) -> KeyInfo {
        KeyInfo {
            id: self.current().id,
            created_ms: self.current().created_ms,
            current: true,
        }
    }

    /// The secret that keys the dedup keys.
    pub fn dedup_secret(&self) -> &[u8; 32] {
        &self.dedup
    }

    /// Appends to `out` the payload of a sealed frame holding `inner` (a whole frame), sealed
    /// with the current key.
    pub fn seal_payload(&self, inner: &[u8], out: &mut Vec<u8>) {
        let key = self.current();
        let nonce: [u8; 24] = rand::random();
        out.extend_from_slice(&key.id.to_be_bytes());
        out.extend_from_slice(&nonce);
        let at = out.len();
        out.extend_from_slice(inner);
        match key.cipher.encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            &aad(key.id),
            &mut out[at..],
        ) {
            Ok(tag) => out.extend_from_slice(&tag),
            // Only a plaintext beyond 256 GiB fails; a frame is at most 4 GiB.
            Err(_) => unreachable!(
                "XChaCha20-Poly1305 refused a frame of {} bytes",
                inner.len()
            ),
        }
    }

    /// The id of the key that sealed `payload` (a sealed frame's payload).
    pub fn sealed_with(payload: &[u8]) -> Result<u32, OpenError> {
        let id = payload.get(..4).ok_or(OpenError::Short)?;
        Ok(u32::from_be_bytes([id[0], id[1], id[2], id[3]]))
    }

    /// Opens a sealed frame's payload: the inner frame, and the id of the key that sealed it.
    pub fn open(&self, payload: &[u8]) -> Result<(Vec<u8>, u32), OpenError> {
        let id = Keyring::sealed_with(payload)?;
        if payload.len() < SEALED_HEAD + TAG_LEN {
            return Err(OpenError::Short);
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(OpenError::UnknownKey(id))?;
        let (head, rest) = payload.split_at(SEALED_HEAD);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut inner = ciphertext.to_vec();
        key.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(&head[4..]),
                &aad(id),
                &mut inner,
                chacha20poly1305::Tag::from_slice(tag),
            )
            .map_err(|_| OpenError::Altered(id))?;
        Ok((inner, id))
    }
}

/// Opens `payload` with `keys` when there are keys.
pub fn open(keys: Option<&Keyring>, payload: &[u8]) -> Result<(Vec<u8>, u32), OpenError> {
    match keys {
        Some(k) => k.open(payload),
        None => Err(OpenError::NoKeyring(Keyring::sealed_with(payload)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_with_their_key_only_and_tell_what_is_wrong() {
        let mut ring = Keyring::generate(1);
        let first = ring.current_info().id;
        let mut sealed = Vec::new();
        ring.seal_payload(b"the inner frame, in clear", &mut sealed);
        assert!(
            !sealed.windows(9).any(|w| w == b"the inner"),
            "no plaintext in a sealed payload"
        );
        assert_eq!(
            ring.open(&sealed),
            Ok((b"the inner frame, in clear".to_vec(), first))
        );
        // The same plaintext seals to other bytes (a fresh nonce).
        let mut again = Vec::new();
        ring.seal_payload(b"the inner frame, in clear", &mut again);
        assert_ne!(sealed, again);

        // After a rotation the old key still opens what it sealed; new frames name the new key.
        let second = ring.rotate(2).id;
        assert_ne!(first, second);
        assert_eq!(ring.open(&sealed).unwrap().1, first);
        let mut newer = Vec::new();
        ring.seal_payload(b"x", &mut newer);
        assert_eq!(Keyring::sealed_with(&newer), Ok(second));

        // Every byte flipped fails: key id, nonce, ciphertext, tag.
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            let err = ring.open(&bad).unwrap_err();
            assert!(
                matches!(err, OpenError::Altered(_) | OpenError::UnknownKey(_)),
                "byte {i}: {err:?}"
            );
        }
        let other = Keyring::generate(3);
        assert_eq!(other.open(&sealed), Err(OpenError::UnknownKey(first)));
        assert_eq!(open(None, &sealed), Err(OpenError::NoKeyring(first)));
        assert_eq!(ring.open(&sealed[..30]), Err(OpenError::Short));
    }

    #[test]
    fn the_keyring_text_reads_back_and_damage_is_named() {
        let mut ring = Keyring::generate(10);
        ring.rotate(20);
        let text = ring.text();
        let back = Keyring::parse(&text, "k").unwrap();
        assert_eq!(back.infos(), ring.infos());
        assert_eq!(back.dedup_secret(), ring.dedup_secret());
        assert_eq!(back.text(), text);
        assert!(!format!("{ring:?}").contains(&hex(ring.dedup_secret())));

        let cases = [
            (text.replacen("key ", "key 0", 1), "the id is not the key's"),
            (text.replace("dedup", "# dedup"), "no dedup secret"),
            (
                text.lines()
                    .filter(|l| !l.starts_with("key"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                "no key",
            ),
            (
                format!("{text}{}", text.lines().last().unwrap()),
                "a key listed twice",
            ),
            (format!("{text}nonsense\n"), "neither"),
        ];
        for (bad, says) in cases {
            let err = Keyring::parse(&bad, "k").unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
    }
}
