//! The one owner of every change of a message's place that is not the spool writer's own
//! publication: insertion from `input/` (SIGUSR2, `spoolctl insert`, takeover recovery), moves
//! between folders (hold, release, the vscan stage's outcome, corrupt), and removal for good
//! (delivered, bounced, quarantined, deleted, withdrawn, recovery dedup). Each operation does
//! its side effects in one fixed order:
//!
//! 1. the replication log: an `ADD` for a message now in a replicated folder (the partner
//!    stores or moves its replica), a durable `DELETE` (and the delivered ledger) before files
//!    go, so the partner can never keep a replica of mail that was handled here;
//! 2. the files;
//! 3. the folder gauges (`spoold_queue_messages{folder}`) and the schedule.
//!
//! Every move goes through here: the vscan stage's (as its [`filter::Mover`]), a replica's
//! (stored, moved, removed at the partner's word), a withdrawn sync-mode message, a body set
//! aside as corrupt. The one removal made elsewhere is the group remover's, for delivered mail,
//! whose completion is counted here ([`Lifecycle::removed`]).
//!
//! It is not: the write path of new mail (the writer's publish hook logs those `ADD`s), nor the
//! decision of what happens to a message (the queue manager and the admin socket decide).

use crate::metrics::Metrics;
use crate::queue::Queue;
use anyhow::{Context, Result};
use hasync::txlog::Kind;
use spool::recovery::{insert_input, InsertOutcome};
use spool::{Folder, Layout, MessageId, Part};
use std::sync::Arc;

/// See the module doc.
pub struct Lifecycle {
    /// What happened to each message here (`spoolctl track`).
    track: Arc<track::Tracker>,
    /// Paths.
    layout: Layout,
    /// Folder gauges.
    metrics: Arc<Metrics>,
    /// The delivery schedule.
    queue: Arc<Queue>,
    /// The replication log (absent on a standalone unit).
    replication: Option<crate::ha::log::ReplicationLog>,
    /// How long delivered ids are remembered for takeover dedup, ms.
    ledger_retention_ms: u64,
}

/// The first bytes of a body file (its headers: the Message-ID, the Subject); empty if
/// unreadable.
pub fn read_head(path: &std::path::Path) -> Vec<u8> {
    use std::io::Read;
    let mut head = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(16 << 10).read_to_end(&mut head);
    }
    head
}

/// The tracking log's view of an envelope, with the Message-ID from the message's head.
pub fn tracked(env: &spool::Envelope, head: &[u8]) -> track::Envelope {
    track::Envelope {
        sender: env.sender.clone(),
        recipients: env.recipients.iter().map(|r| r.address.clone()).collect(),
        message_id: track::message_id(head),
    }
}

impl Lifecycle {
    /// The owner of the moves in `layout`, counted in `metrics`, scheduled in `queue`, logged in
    /// `replication` (with delivered ids kept `ledger_retention_ms`) and recorded in `track`.
    pub fn new(
        layout: Layout,
        metrics: Arc<Metrics>,
        queue: Arc<Queue>,
        replication: Option<crate::ha::log::ReplicationLog>,
        ledger_retention_ms: u64,
        track: Arc<track::Tracker>,
    ) -> Lifecycle {
        Lifecycle {
            track,
            layout,
            metrics,
            queue,
            replication,
            ledger_retention_ms,
        }
    }

    /// The tracking log, for the events of those who decide (delivery attempts, verdicts).
    pub fn track(&self) -> &Arc<track::Tracker> {
        &self.track
    }

    fn ha(&self) -> Option<&crate::ha::log::ReplicationLog> {
        self.replication.as_ref()
    }

    /// Logs `ADD`s for messages that are now in a replicated folder and wakes the sender.
    fn log_adds(&self, ids: &[&MessageId]) -> Result<()> {
        let Some(r) = self.ha() else { return Ok(()) };
        if ids.is_empty() {
            return Ok(());
        }
        let items: Vec<(Kind, &MessageId)> = ids.iter().map(|id| (Kind::Add, *id)).collect();
        r.log
            .append(&items, crate::clock::now_ms())
            .context("log ADD")?;
        r.notify();
        Ok(())
    }

    /// Inserts `input/`: each valid pair moves to `spool/`, gets its `ADD` like SMTP mail, is
    /// counted and scheduled; invalid pairs go to `corrupt/`. Blocking.
    pub fn insert_input(&self) -> Result<Vec<InsertOutcome>> {
        let outcomes = insert_input(&self.layout).context("insert input/")?;
        let inserted: Vec<&MessageId> = outcomes
            .iter()
            .filter_map(|o| match o {
                InsertOutcome::Inserted(id) => Some(id),
                _ => None,
            })
            .collect();
        // The files are in spool/ already (insertion is a rename): a crash before this
        // append is repaired by the rebuild after the restart, as for SMTP mail.
        self.log_adds(&inserted)?;
        for o in &outcomes {
            match o {
                InsertOutcome::Inserted(id) => {
                    if let Ok(env) = self.layout.read_envelope(Folder::Spool, id) {
                        let head = read_head(&self.layout.path(Folder::Spool, id, Part::Body));
                        self.track.event_with(
                            id,
                            track::EventKind::Inserted,
                            format!("from input/, {} bytes", env.body_len),
                            tracked(&env, &head),
                        );
                    }
                    self.metrics.inserted.inc();
                    self.metrics.queue_add(Folder::Spool, 1);
                    self.queue.add(id.clone(), 0);
                }
                InsertOutcome::Corrupt { .. } => {
                    self.metrics.corrupt.inc();
                    self.metrics.queue_add(Folder::Corrupt, 1);
                }
                InsertOutcome::Duplicate(_) => {}
            }
        }
        Ok(outcomes)
    }

    /// Moves a pair between folders (hold, release): files, then the partner's copy follows (an
    /// `ADD` carrying the new place), then gauges and schedule. Blocking.
    pub fn move_to(&self, id: &MessageId, from: Folder, to: Folder) -> Result<()> {
        self.layout
            .move_pair(id, from, to)
            .with_context(|| format!("move {id} from {}/ to {}/", from.name(), to.name()))?;
        if Folder::REPLICATED.contains(&to) {
            self.log_adds(&[id])?;
        }
        self.moved(from, to);
        if Folder::SCHEDULED.contains(&to) {
            self.queue.add(id.clone(), 0);
        }
        Ok(())
    }

    /// Counts a move made here.
    fn moved(&self, from: Folder, to: Folder) {
        if from != to {
            self.metrics.queue_add(from, -1);
            self.metrics.queue_add(to, 1);
        }
    }

    /// The message leaves the replicated folders for good (delivered, bounced, quarantined,
    /// deleted): its `DELETE` is durable, and when `delivered` its id is in the ledger, before
    /// its files go.
    pub fn leaving(&self, id: &MessageId, delivered: bool) -> Result<()> {
        let Some(r) = self.ha() else { return Ok(()) };
        let now = crate::clock::now_ms();
        r.log
            .append(&[(Kind::Delete, id)], now)
            .with_context(|| format!("log DELETE {id}"))?;
        if delivered {
            r.log
                .record_delivered(&[id], now, self.ledger_retention_ms)
                .with_context(|| format!("record {id} as delivered"))?;
        }
        r.notify();
        Ok(())
    }

    /// Removes a message for good in one step (an operator's delete, a withdrawn sync-mode
    /// message, recovery dedup): [`Lifecycle::leaving`], the files, the gauge. Blocking.
    pub fn remove(&self, id: &MessageId, folder: Folder, delivered: bool) -> Result<()> {
        self.leaving(id, delivered)?;
        self.layout
            .remove_pair(id, folder)
            .with_context(|| format!("remove {id} from {}/", folder.name()))?;
        self.removed(id, folder);
        Ok(())
    }

    /// Counts a removal whose files someone else took away (the group remover, a replica's
    /// `DELETE`) and drops the id from the schedule.
    pub fn removed(&self, id: &MessageId, folder: Folder) {
        self.metrics.queue_add(folder, -1);
        self.queue.forget(id);
    }

    /// Counts and schedules a message the writer published in `spool/` (SMTP, a DSN).
    pub fn accepted(&self, id: &MessageId) {
        self.metrics.queue_add(Folder::Spool, 1);
        self.queue.add(id.clone(), 0);
    }

    /// Counts a replica the writer stored in `spool/` for the partner.
    pub fn replica_stored(&self) {
        self.metrics.queue_add(Folder::Spool, 1);
    }

    /// Moves a replica to the place the partner holds it in (hold, release, the vscan stage
    /// there): files and gauges; the partner's log is the truth, so nothing is logged. Blocking.
    pub fn replica_moved(&self, id: &MessageId, from: Folder, to: Folder) -> std::io::Result<()> {
        self.layout.move_pair(id, from, to)?;
        self.moved(from, to);
        Ok(())
    }

    /// Removes a replica the partner delivered or removed, from `folder`: files (the caller
    /// syncs the folder once for a batch), gauge, schedule, tracking. Blocking.
    pub fn replica_removed(&self, id: &MessageId, folder: Folder) -> std::io::Result<()> {
        self.layout.discard_pair(id, folder)?;
        self.removed(id, folder);
        self.track.event(
            id,
            track::EventKind::ReplicaRemoved,
            format!(
                "from {}: delivered or removed on the partner",
                folder.name()
            ),
        );
        Ok(())
    }

    /// Schedules a message for delivery now, unless it is scheduled already.
    pub fn schedule_now(&self, id: &MessageId) {
        self.queue.ensure(id.clone(), 0);
    }

    /// Takes back a message whose partner acknowledgement never came (sync mode, `reject`):
    /// its `DELETE` first, then its files, so neither unit keeps it. Not counted in the gauges
    /// yet (the `250` was never sent), so not uncounted either. Blocking.
    pub fn withdraw(&self, id: &MessageId) -> Result<()> {
        self.leaving(id, false)?;
        self.layout
            .remove_pair(id, Folder::Spool)
            .with_context(|| format!("withdraw {id}"))
    }

    /// Sets a message whose body cannot be used aside in `corrupt/`, with the reason.
    /// Blocking.
    pub fn set_aside(&self, id: &MessageId, from: Folder, reason: &str) -> Result<()> {
        spool::recovery::set_aside(&self.layout, from, &id.to_string(), reason)?;
        self.metrics.corrupt.inc();
        self.moved(from, Folder::Corrupt);
        Ok(())
    }
}

/// The vscan stage's moves (into `vscan/`, then to `spool/` or `quarantine/` with the verdict):
/// files and gauges. The partner's replica stays where it is: the outcome settles it (a
/// quarantined message's `DELETE`, a delivery).
impl filter::Mover for Lifecycle {
    fn move_pair(&self, id: &MessageId, from: Folder, to: Folder) -> std::io::Result<()> {
        self.layout.move_pair(id, from, to)?;
        self.moved(from, to);
        Ok(())
    }
}
