//! The contents of just-published messages, held in memory for the sender so that an `ADD`
//! goes out from the buffers SMTP received it into instead of from the files it was just
//! written to (reopening, reading, mapping, verifying and unmapping each message was most of
//! what async replication cost the active unit; BENCHMARKS.md has the figures).
//!
//! It is a cache, not a queue: bounded by bytes, it refuses what does not fit, and the sender
//! falls back to the files for anything it does not find here (after a restart, a reconnect,
//! a backlog, a body spilled to disk). It never decides *whether* a message is sent; the log
//! does.

use bytes::Bytes;
use spool::MessageId;
use std::collections::HashMap;
use std::sync::Mutex;

/// Default bound on the bytes held (as charged by [`HeldMessage`]).
pub const OUTBOX_BYTES_DEFAULT: usize = 16 * 1024 * 1024;

/// The least a held piece is charged: a piece of a received body can share its allocation
/// with the rest of a receive buffer (16 KiB in `smtp`), which it keeps alive.
const PIECE_CHARGE_MIN: usize = 16 * 1024;

/// An envelope and its body, as written to the spool.
#[derive(Clone, Debug)]
pub struct HeldMessage {
    /// The encoded `.env`.
    pub envelope: Bytes,
    /// The `.body`, in the pieces it was received in.
    pub body: Vec<Bytes>,
}

impl HeldMessage {
    /// What holding it costs, counted so that the bound holds for the memory kept alive.
    fn charge(&self) -> usize {
        let pieces = self.body.iter().map(|b| b.len().max(PIECE_CHARGE_MIN));
        self.envelope.len() + pieces.sum::<usize>()
    }
}

/// Messages waiting for the sender, by id.
pub struct Outbox {
    max_bytes: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    by_id: HashMap<MessageId, HeldMessage>,
    bytes: usize,
}

impl Outbox {
    /// An empty outbox holding at most `max_bytes` of envelopes and bodies.
    pub fn new(max_bytes: usize) -> Outbox {
        Outbox {
            max_bytes,
            held: Mutex::new(Held::default()),
        }
    }

    /// Holds `message` for the sender, unless it would take the outbox past its bound.
    pub fn hold(&self, id: MessageId, message: HeldMessage) -> bool {
        let size = message.charge();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.bytes + size > self.max_bytes {
            return false;
        }
        held.bytes += size;
        if let Some(old) = held.by_id.insert(id, message) {
            held.bytes -= old.charge();
        }
        true
    }

    /// Takes the message held for `id`, if any.
    pub fn take(&self, id: &MessageId) -> Option<HeldMessage> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let message = held.by_id.remove(id)?;
        held.bytes -= message.charge();
        Some(message)
    }

    /// Drops everything held (a unit that turned passive sends nothing until it is active
    /// again, and then the files serve).
    pub fn clear(&self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        *held = Held::default();
    }

    /// Bytes held now, as charged against the bound.
    pub fn bytes(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Messages held now.
    pub fn len(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &'static [u8]) -> HeldMessage {
        HeldMessage {
            envelope: Bytes::from_static(b"env"),
            body: vec![Bytes::from_static(body)],
        }
    }

    #[test]
    fn holds_up_to_its_bound_and_gives_each_message_once() {
        let ids = spool::IdGenerator::new("a").expect("node name");
        // Each message is charged 3 bytes of envelope and one piece's minimum.
        let outbox = Outbox::new(PIECE_CHARGE_MIN + 3 + 5);
        let (first, second, third) = (ids.next_id(), ids.next_id(), ids.next_id());
        assert!(outbox.hold(first.clone(), message(b"1234")));
        assert_eq!(outbox.bytes(), 3 + PIECE_CHARGE_MIN);
        assert!(!outbox.hold(second.clone(), message(b"5678")));
        assert_eq!(
            outbox.take(&first).map(|m| m.body),
            Some(vec![Bytes::from_static(b"1234")])
        );
        assert!(outbox.take(&first).is_none());
        assert!(outbox.hold(third.clone(), message(b"5678")));
        assert!(outbox.take(&second).is_none());
        assert!(outbox.take(&third).is_some());
        assert!(outbox.is_empty());
        assert_eq!(outbox.bytes(), 0);
    }
}
