//! What the spool writer tells the sender about the messages it publishes, in memory only: the
//! ids being published (an `ADD` whose files are not in `spool/` yet waits instead of going out
//! as a `DELETE`), the [`Outbox`] of just-published contents, and the wake-up when there is
//! something to send. Shared by the writer's publish hook, the daemon's lifecycle owner and the
//! sender.
//!
//! The publish ordering lives here too ([`Staging::before_publish`],
//! [`Staging::after_publish`]): the writer's hook only calls it.
//!
//! It is not: the log (`txlog`), which decides what is sent.

use crate::outbox::{HeldMessage, Outbox};
use crate::txlog::{Kind, LogError, TxLog};
use bytes::Bytes;
use spool::writer::Published;
use spool::MessageId;
use std::collections::HashSet;
use std::sync::Mutex;
use tokio::sync::Notify;

/// See the module doc.
pub struct Staging {
    publishing: Mutex<HashSet<MessageId>>,
    outbox: Outbox,
    wake: Notify,
}

impl Staging {
    /// Nothing staged; the outbox holds at most `outbox_bytes` (0: nothing, the sender reads
    /// the files).
    pub fn new(outbox_bytes: usize) -> Staging {
        Staging {
            publishing: Mutex::new(HashSet::new()),
            outbox: Outbox::new(outbox_bytes),
            wake: Notify::new(),
        }
    }

    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<MessageId>> {
        self.publishing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks ids whose `ADD` is about to be logged while their files are not yet in `spool/`.
    pub fn mark_publishing(&self, ids: &[&MessageId]) {
        self.set().extend(ids.iter().map(|id| (*id).clone()));
    }

    /// The ids are published (or failed and gone).
    pub fn mark_published(&self, ids: &[&MessageId]) {
        let mut set = self.set();
        for id in ids {
            set.remove(*id);
        }
    }

    /// Whether the writer is still publishing `id`.
    pub fn is_publishing(&self, id: &MessageId) -> bool {
        self.set().contains(id)
    }

    /// Whether the writer is publishing any message.
    pub fn publishing_any(&self) -> bool {
        !self.set().is_empty()
    }

    /// Contents of published messages the sender has not sent yet.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The writer is about to publish `ids`: marks them publishing, then appends their `ADD`s
    /// to `log` (in that order, so the sender never sees an `ADD` whose files it cannot find
    /// and takes the message for gone), then wakes the sender. A refused append (the log is
    /// full) unmarks them; the writer then refuses the messages.
    pub fn before_publish(
        &self,
        log: &TxLog,
        ids: &[&MessageId],
        now_ms: u64,
    ) -> Result<Vec<u64>, LogError> {
        let items: Vec<(Kind, &MessageId)> = ids.iter().map(|id| (Kind::Add, *id)).collect();
        self.mark_publishing(ids);
        let seqs = log
            .append(&items, now_ms)
            .inspect_err(|_| self.mark_published(ids))?;
        self.notify();
        Ok(seqs)
    }

    /// The writer published `messages`: holds each durable one's contents in the outbox (a
    /// body spilled to `tmp/` is large and goes from its file), then unmarks them, in that order
    /// so that the sender, once it may send one, finds it in memory; then wakes the sender.
    pub fn after_publish(&self, messages: &[Published<'_>]) {
        for m in messages
            .iter()
            .filter(|m| m.durable && m.body.spilled.is_none())
        {
            let held = HeldMessage {
                envelope: Bytes::copy_from_slice(m.envelope),
                body: m.body.chunks.clone(),
            };
            self.outbox.hold(m.id.clone(), held);
        }
        let ids: Vec<&MessageId> = messages.iter().map(|m| m.id).collect();
        self.mark_published(&ids);
        self.notify();
    }

    /// Tells the sender there is something to send (actions appended, a message published).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Waits for [`Staging::notify`].
    pub(crate) async fn notified(&self) {
        self.wake.notified().await
    }
}
