//! The archive's history as a hash chain: every change to what the archive holds (an item
//! stored, put on hold or released, removed by retention, a new signing key, a new data key) is an entry
//! numbered from 0 without gaps, and each entry carries the hash of the one before. Altering,
//! removing, inserting or reordering an entry breaks every hash after it; signed checkpoints
//! (`crate::checkpoint`) pin the chain's head so that a rewrite of the whole chain is caught too.
//!
//! An entry's hash covers its number, the previous hash and the SHA-256 of its event's bytes:
//!
//! ```text
//! hash(n) = SHA-256("spoolpair chain 1" ‖ n ‖ hash(n-1) ‖ SHA-256(event))    hash(-1) = 0³²
//! ```
//!
//! so that a verifier can link an entry whose event it cannot read (a later redaction keeps the
//! event's digest only). Entry 0 is the genesis: the archive's id and the first signing key.
//!
//! This module is bytes and hashes only: where entries are written is `store.rs`, how they are
//! framed in a segment `record.rs`, how a chain is proved `proof.rs`.

use crate::item::{put_str, Item, Reader};
use crate::ArchiveId;
use sha2::{Digest, Sha256};

/// Why an item's state was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Why {
    /// Stored (archived here, or received from a mirror peer).
    Stored = 0,
    /// Put on legal hold.
    Held = 1,
    /// Released from legal hold.
    Released = 2,
    /// Described at the start of the chain: the item was archived before the archive kept a
    /// chain (its earlier history is in unchained records).
    Described = 3,
}

impl Why {
    fn from_u8(b: u8) -> Option<Why> {
        [Why::Stored, Why::Held, Why::Released, Why::Described]
            .into_iter()
            .find(|w| *w as u8 == b)
    }

    /// A word for reports.
    pub fn name(self) -> &'static str {
        match self {
            Why::Stored => "stored",
            Why::Held => "held",
            Why::Released => "released",
            Why::Described => "described",
        }
    }
}

/// What retention left of an item it removed: what it was, when it went and by which rule.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tombstone {
    /// The item's sequence number.
    pub seq: u64,
    /// Its spool id.
    pub id: String,
    /// Its body's SHA-256.
    pub hash: [u8; 32],
    /// When it was accepted, ms since the epoch.
    pub arrived_ms: u64,
    /// When it was removed, ms since the epoch.
    pub removed_ms: u64,
    /// The rule that removed it (`retention 365 days`).
    pub rule: String,
}

/// One change to the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The chain's start: the archive it belongs to and the key that signs its checkpoints.
    Genesis {
        /// The archive's id.
        archive: ArchiveId,
        /// When the chain began, ms since the epoch.
        created_ms: u64,
        /// The unit that began it.
        node: String,
        /// The Ed25519 public key that signs checkpoints from here.
        signer: [u8; 32],
    },
    /// An item's state as of revision `rev` (the catalog's encoding of the item).
    Item {
        /// Why it was recorded.
        why: Why,
        /// Its revision (of one item's records the highest is its state).
        rev: u64,
        /// The item.
        item: Box<Item>,
    },
    /// An item removed by retention (final: sequence numbers are never reused).
    Removed(Box<Tombstone>),
    /// Checkpoints are signed by this key from here (a unit that adopted the archive, or one
    /// whose key was replaced).
    Signer {
        /// The Ed25519 public key.
        key: [u8; 32],
        /// The unit that holds it.
        node: String,
    },
    /// Records are sealed with this data key from here (`crate::seal`): the archive's first
    /// key, or a rotation. The key itself is never in the chain, only its id.
    Key {
        /// Its id, as sealed frames name it.
        id: u32,
        /// When it was made, ms since the epoch.
        created_ms: u64,
    },
}

const TAG_GENESIS: u8 = 0;
const TAG_ITEM: u8 = 1;
const TAG_REMOVED: u8 = 2;
const TAG_SIGNER: u8 = 3;
const TAG_KEY: u8 = 4;

impl Event {
    /// The event's bytes (what the entry's hash covers through their digest).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(256);
        match self {
            Event::Genesis {
                archive,
                created_ms,
                node,
                signer,
            } => {
                b.push(TAG_GENESIS);
                b.extend_from_slice(&archive.0);
                b.extend_from_slice(&created_ms.to_be_bytes());
                put_str(&mut b, node);
                b.extend_from_slice(signer);
            }
            Event::Item { why, rev, item } => return item_event(*why, *rev, item),
            Event::Removed(t) => {
                b.push(TAG_REMOVED);
                b.extend_from_slice(&t.seq.to_be_bytes());
                put_str(&mut b, &t.id);
                b.extend_from_slice(&t.hash);
                b.extend_from_slice(&t.arrived_ms.to_be_bytes());
                b.extend_from_slice(&t.removed_ms.to_be_bytes());
                put_str(&mut b, &t.rule);
            }
            Event::Signer { key, node } => {
                b.push(TAG_SIGNER);
                b.extend_from_slice(key);
                put_str(&mut b, node);
            }
            Event::Key { id, created_ms } => {
                b.push(TAG_KEY);
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&created_ms.to_be_bytes());
            }
        }
        b
    }

    /// Parses an event's bytes.
    pub fn decode(b: &[u8]) -> Option<Event> {
        let mut r = Reader(b);
        let event = match r.u8()? {
            TAG_GENESIS => Event::Genesis {
                archive: ArchiveId(r.array()?),
                created_ms: r.u64()?,
                node: r.str()?,
                signer: r.array()?,
            },
            TAG_ITEM => {
                let why = Why::from_u8(r.u8()?)?;
                let rev = r.u64()?;
                let item = Item::decode(r.0)?;
                r.0 = &[];
                Event::Item {
                    why,
                    rev,
                    item: Box::new(item),
                }
            }
            TAG_REMOVED => Event::Removed(Box::new(Tombstone {
                seq: r.u64()?,
                id: r.str()?,
                hash: r.array()?,
                arrived_ms: r.u64()?,
                removed_ms: r.u64()?,
                rule: r.str()?,
            })),
            TAG_SIGNER => Event::Signer {
                key: r.array()?,
                node: r.str()?,
            },
            TAG_KEY => Event::Key {
                id: r.u32()?,
                created_ms: r.u64()?,
            },
            _ => return None,
        };
        r.0.is_empty().then_some(event)
    }
}

/// The bytes of [`Event::Item`] for an item borrowed (the writer's hot path: no copy of it).
pub fn item_event(why: Why, rev: u64, item: &Item) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    b.push(TAG_ITEM);
    b.push(why as u8);
    b.extend_from_slice(&rev.to_be_bytes());
    b.extend_from_slice(&item.encode());
    b
}

/// One entry of the chain, as read from a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its number: 0 for the genesis, then one more each.
    pub n: u64,
    /// The hash of entry `n - 1` (zeros for the genesis).
    pub prev: [u8; 32],
    /// SHA-256 of the event's bytes.
    pub digest: [u8; 32],
    /// The event.
    pub event: Event,
}

impl Entry {
    /// This entry's hash: what entry `n + 1` carries as `prev`.
    pub fn hash(&self) -> [u8; 32] {
        link(self.n, &self.prev, &self.digest)
    }

    /// The entry's frame payload: `n ‖ prev ‖ event`.
    pub fn payload(n: u64, prev: &[u8; 32], event: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(40 + event.len());
        b.extend_from_slice(&n.to_be_bytes());
        b.extend_from_slice(prev);
        b.extend_from_slice(event);
        b
    }

    /// Parses a frame payload.
    pub fn parse(payload: &[u8]) -> Result<Entry, &'static str> {
        let mut r = Reader(payload);
        let n = r.u64().ok_or("chain entry cut short")?;
        let prev = r.array().ok_or("chain entry cut short")?;
        let event = Event::decode(r.0).ok_or("chain entry's event unreadable")?;
        Ok(Entry {
            n,
            prev,
            digest: Sha256::digest(r.0).into(),
            event,
        })
    }
}

/// The hash of entry `n` from its parts.
pub fn link(n: u64, prev: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"spoolpair chain 1");
    h.update(n.to_be_bytes());
    h.update(prev);
    h.update(digest);
    h.finalize().into()
}

/// Where the chain stands: the number the next entry takes and the hash it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Head {
    /// Entries so far (the next entry's number).
    pub next: u64,
    /// The last entry's hash (zeros before the genesis).
    pub hash: [u8; 32],
}

impl Head {
    /// Appends `event` as the next entry: answers its payload and moves the head past it.
    pub fn append(&mut self, event: &Event) -> Vec<u8> {
        self.append_encoded(&event.encode())
    }

    /// [`Head::append`] of an event's bytes ([`Event::encode`], [`item_event`]).
    pub fn append_encoded(&mut self, event: &[u8]) -> Vec<u8> {
        let payload = Entry::payload(self.next, &self.hash, event);
        self.hash = link(self.next, &self.hash, &Sha256::digest(event).into());
        self.next += 1;
        payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> Vec<Event> {
        vec![
            Event::Genesis {
                archive: ArchiveId([7; 16]),
                created_ms: 1,
                node: "a".into(),
                signer: [9; 32],
            },
            Event::Item {
                why: Why::Held,
                rev: 4,
                item: Box::new(Item {
                    seq: 3,
                    id: "a-3".into(),
                    recipients: vec!["r@x".into()],
                    ..Item::default()
                }),
            },
            Event::Removed(Box::new(Tombstone {
                seq: 3,
                id: "a-3".into(),
                hash: [5; 32],
                arrived_ms: 2,
                removed_ms: 3,
                rule: "retention 1 days".into(),
            })),
            Event::Signer {
                key: [8; 32],
                node: "b".into(),
            },
            Event::Key {
                id: 0xfeed_beef,
                created_ms: 5,
            },
        ]
    }

    #[test]
    fn every_event_round_trips_and_a_cut_or_longer_one_is_refused() {
        for e in events() {
            let b = e.encode();
            assert_eq!(Event::decode(&b).as_ref(), Some(&e));
            for cut in 0..b.len() {
                assert_eq!(Event::decode(&b[..cut]), None, "{e:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            if !matches!(e, Event::Item { .. }) {
                assert_eq!(Event::decode(&longer), None, "{e:?} with a byte more");
            }
        }
    }

    #[test]
    fn each_entry_carries_the_hash_of_the_one_before_and_any_change_moves_the_head() {
        let mut head = Head::default();
        let mut entries = Vec::new();
        for e in events() {
            entries.push(Entry::parse(&head.append(&e)).unwrap());
        }
        assert_eq!(head.next, 5);
        assert_eq!(entries[0].prev, [0; 32]);
        for pair in entries.windows(2) {
            assert_eq!(pair[1].prev, pair[0].hash());
            assert_eq!(pair[1].n, pair[0].n + 1);
        }
        assert_eq!(entries[4].hash(), head.hash);
        // The same events in another order, or one changed, give another head.
        let mut swapped = Head::default();
        let mut evs = events();
        evs.swap(1, 2);
        for e in &evs {
            swapped.append(e);
        }
        assert_ne!(swapped.hash, head.hash);
        let mut changed = Head::default();
        let mut evs = events();
        if let Event::Removed(t) = &mut evs[2] {
            t.rule = "retention 2 days".into();
        }
        for e in &evs {
            changed.append(e);
        }
        assert_ne!(changed.hash, head.hash);
    }
}
