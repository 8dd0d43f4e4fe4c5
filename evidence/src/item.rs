//! The catalog's encoding of an archived item (the catalog's `items` value, and the item inside
//! a chain entry), and the byte helpers the record formats share. Every decoder answers `None` on
//! bytes it does not understand instead of panicking.

use sha2::{Digest, Sha256};

/// One archived message as the catalog knows it (the body lives in a segment).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Item {
    /// Local sequence number: the item's id on this unit, in archive order.
    pub seq: u64,
    /// Deduplication key: SHA-256 over the body hash, the sender and the recipients.
    pub key: [u8; 32],
    /// SHA-256 of the raw message bytes (the `.body` as accepted).
    pub hash: [u8; 32],
    /// The spool id the message had where it was accepted.
    pub id: String,
    /// Node that accepted it.
    pub origin: String,
    /// Received from a mirror peer rather than archived here.
    pub mirrored: bool,
    /// On legal hold: never removed by retention.
    pub held: bool,
    /// Accepted at, ms since the epoch.
    pub arrived_ms: u64,
    /// Archived here at, ms since the epoch.
    pub archived_ms: u64,
    /// SMTP client address.
    pub client: String,
    /// Envelope sender; empty for `<>`.
    pub sender: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// Scan verdict: `clean`, `unscanned`, `infected: NAME`.
    pub verdict: String,
    /// Raw message length in bytes.
    pub raw_len: u64,
}

const ITEM_VERSION: u8 = 1;

impl Item {
    /// The deduplication key of a message: the same bytes for the same envelope are one item.
    /// With a `secret` (an encrypted archive's) it is an HMAC-SHA-256, so that whoever holds a
    /// copy of the catalog cannot test whether a message they know was archived.
    pub fn key_of(
        hash: &[u8; 32],
        sender: &str,
        recipients: &[String],
        secret: Option<&[u8; 32]>,
    ) -> [u8; 32] {
        let mut sorted: Vec<&String> = recipients.iter().collect();
        sorted.sort();
        let feed = |update: &mut dyn FnMut(&[u8])| {
            update(hash);
            update(sender.as_bytes());
            for r in &sorted {
                update(b"\0");
                update(r.as_bytes());
            }
        };
        match secret {
            None => {
                let mut h = Sha256::new();
                feed(&mut |b| h.update(b));
                h.finalize().into()
            }
            Some(secret) => {
                use hmac::Mac as _;
                let mut m = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(secret)
                    .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
                m.update(b"spoolpair dedup 1");
                feed(&mut |b| m.update(b));
                m.finalize().into_bytes().into()
            }
        }
    }

    /// Catalog value bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(160 + self.recipients.iter().map(|r| r.len() + 4).sum::<usize>());
        b.push(ITEM_VERSION);
        b.push(u8::from(self.mirrored) | (u8::from(self.held) << 1));
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&self.hash);
        b.extend_from_slice(&self.arrived_ms.to_be_bytes());
        b.extend_from_slice(&self.archived_ms.to_be_bytes());
        b.extend_from_slice(&self.raw_len.to_be_bytes());
        for s in [
            &self.id,
            &self.origin,
            &self.client,
            &self.sender,
            &self.verdict,
        ] {
            put_str(&mut b, s);
        }
        b.extend_from_slice(&(self.recipients.len() as u32).to_be_bytes());
        for r in &self.recipients {
            put_str(&mut b, r);
        }
        b
    }

    /// Parses catalog value bytes.
    pub fn decode(b: &[u8]) -> Option<Item> {
        let mut r = Reader(b);
        if r.u8()? != ITEM_VERSION {
            return None;
        }
        let flags = r.u8()?;
        let seq = r.u64()?;
        let key = r.array()?;
        let hash = r.array()?;
        let arrived_ms = r.u64()?;
        let archived_ms = r.u64()?;
        let raw_len = r.u64()?;
        let id = r.str()?;
        let origin = r.str()?;
        let client = r.str()?;
        let sender = r.str()?;
        let verdict = r.str()?;
        let n = r.u32()? as usize;
        let mut recipients = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            recipients.push(r.str()?);
        }
        Some(Item {
            seq,
            key,
            hash,
            id,
            origin,
            mirrored: flags & 1 != 0,
            held: flags & 2 != 0,
            arrived_ms,
            archived_ms,
            client,
            sender,
            recipients,
            verdict,
            raw_len,
        })
    }
}

pub(crate) fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// A cursor over bytes that answers `None` past the end.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl Reader<'_> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    pub(crate) fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_round_trips_and_truncation_is_refused() {
        let item = Item {
            seq: 7,
            key: [1; 32],
            hash: [2; 32],
            id: "a-1".into(),
            origin: "a".into(),
            mirrored: true,
            held: true,
            arrived_ms: 5,
            archived_ms: 6,
            client: "127.0.0.1".into(),
            sender: "s@x".into(),
            recipients: vec!["r@y".into(), "q@z".into()],
            verdict: "clean".into(),
            raw_len: 99,
        };
        let b = item.encode();
        assert_eq!(Item::decode(&b), Some(item));
        for cut in 0..b.len() {
            assert_eq!(Item::decode(&b[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn key_ignores_recipient_order() {
        let a = Item::key_of(&[1; 32], "s", &["a".into(), "b".into()], None);
        let b = Item::key_of(&[1; 32], "s", &["b".into(), "a".into()], None);
        let c = Item::key_of(&[1; 32], "t", &["b".into(), "a".into()], None);
        // Keyed: the same order-free key under one secret, another under another, and never
        // the unkeyed one.
        let secret = Some(&[3u8; 32]);
        let ka = Item::key_of(&[1; 32], "s", &["a".into(), "b".into()], secret);
        let kb = Item::key_of(&[1; 32], "s", &["b".into(), "a".into()], secret);
        let other = Item::key_of(&[1; 32], "s", &["a".into(), "b".into()], Some(&[4u8; 32]));
        assert_eq!(ka, kb);
        assert_ne!(ka, a);
        assert_ne!(ka, other);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
