//! The replica store: replicas from the partner stored through the same durable writer as
//! SMTP mail (not logged again), moved and removed through the lifecycle owner; and the
//! partner's requests over the replication link answered.

use crate::lifecycle::Lifecycle;
use bytes::Bytes;
use hasync::txlog::TxLog;
use hasync::ReplicaStore;
use spool::writer::CommitRequest;
use spool::SpoolWriter;
use spool::{BodyParts, CommitError, Envelope, Folder, Layout, MessageId, Part};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Stores replicas through the same durable writer as SMTP mail (not logged again).
pub struct SpoolReplicas {
    /// The writer that stores the pairs (shared with SMTP ingress).
    pub writer: Arc<SpoolWriter>,
    /// Counts, moves and schedules.
    pub lifecycle: Arc<Lifecycle>,
    /// Clustered settings, which a partner in no cluster exchanges over this link.
    pub settings: Arc<crate::clustered::Settings>,
    /// This unit's quarantine inbox, which a partner in no cluster asks over this link.
    pub desk: Arc<crate::quarantine::Desk>,
    /// The delivered ledger: an `ADD` for a message delivered here is stale.
    pub log: Arc<TxLog>,
    /// Paths.
    pub layout: Layout,
}

impl SpoolReplicas {
    /// A replica arriving at a unit that is active already (from a partner that was active
    /// too, or is leaving) is mail this unit must deliver: nothing else would schedule it.
    fn schedule_if_active(&self, id: &MessageId, deliver_here: bool) {
        if deliver_here {
            self.lifecycle.schedule_now(id);
        }
    }
}

impl ReplicaStore for SpoolReplicas {
    fn store(
        &self,
        id: MessageId,
        held: bool,
        deliver_here: bool,
        env: Bytes,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>> {
        enum Step {
            Nothing,
            Move(Folder),
            /// The commit's answer, and what tracking records once the replica is on disk.
            Write(
                tokio::sync::oneshot::Receiver<Result<spool::writer::CommitReceipt, CommitError>>,
                track::Envelope,
                u64,
            ),
        }
        let target = if held { Folder::Hold } else { Folder::Spool };
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let decoded = Envelope::decode(&env).map_err(|e| invalid(format!("replica {id}: {e}")));
        let step = decoded.and_then(|e| {
            if e.id != id || e.body_len != body.len() as u64 {
                return Err(invalid(format!("replica {id}: envelope does not match")));
            }
            // Where a replica with this content is already (one look per folder).
            let current = Folder::REPLICATED.into_iter().find(|&f| {
                self.layout
                    .read_envelope(f, &id)
                    .is_ok_and(|old| old.body_sha256 == e.body_sha256)
            });
            match current {
                Some(f) if f == target || (!held && f == Folder::Vscan) => {
                    tracing::debug!(id = %id, "replica already held");
                    // An ADD seen again (idempotent). Scheduled again in case the first store
                    // completed after its link broke, which left it unscheduled.
                    if !held {
                        self.schedule_if_active(&id, deliver_here);
                    }
                    return Ok(Step::Nothing);
                }
                // Held, or released, on the active unit since the replica was written.
                Some(from) => return Ok(Step::Move(from)),
                None => {}
            }
            // An ADD resent for a message this unit delivered itself (it took the replica over
            // during a split brain or a handover) is stale: storing it would deliver it again.
            let delivered_here = self.log.was_delivered(&id).unwrap_or(false);
            if delivered_here {
                tracing::info!(id = %id, "replica of a message delivered here: ignored");
                return Ok(Step::Nothing);
            }
            let tracked = crate::lifecycle::tracked(&e, &body);
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.writer.submit(CommitRequest {
                id: id.clone(),
                envelope: env.to_vec(),
                body: BodyParts {
                    spilled: None,
                    chunks: vec![body],
                },
                done: Box::new(move |r| {
                    let _ = tx.send(r);
                }),
                replicate: false,
            });
            Ok(Step::Write(rx, tracked, e.body_len))
        });
        Box::pin(async move {
            let from = match step? {
                Step::Nothing => return Ok(()),
                Step::Move(from) => from,
                Step::Write(rx, tracked, body_len) => {
                    match rx.await {
                        Ok(Ok(_)) => tracing::debug!(id = %id, "replica stored"),
                        Ok(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                        Err(_) => return Err(std::io::Error::other("spool writer stopped")),
                    }
                    // Recorded once the replica is on disk: "replicated" is a promise that the
                    // partner survives losing the unit that accepted the message.
                    self.lifecycle.track().event_with(
                        &id,
                        track::EventKind::Replicated,
                        format!("from the partner, {body_len} bytes"),
                        tracked,
                    );
                    self.lifecycle.replica_stored();
                    Folder::Spool
                }
            };
            if from != target {
                let (lifecycle, moved) = (self.lifecycle.clone(), id.clone());
                tokio::task::spawn_blocking(move || lifecycle.replica_moved(&moved, from, target))
                    .await
                    .map_err(|e| std::io::Error::other(format!("replica move: {e}")))??;
                tracing::debug!(id = %id, from = from.name(), to = target.name(), "replica moved");
            }
            if !held {
                self.schedule_if_active(&id, deliver_here);
            }
            Ok(())
        })
    }

    fn remove(&self, id: &MessageId) -> std::io::Result<()> {
        self.remove_many(std::slice::from_ref(id))
    }

    fn remove_many(&self, ids: &[MessageId]) -> std::io::Result<()> {
        let mut touched = [false; Folder::LIVE.len()];
        for id in ids {
            tracing::debug!(id = %id, "replica removed");
            for (k, f) in Folder::LIVE.into_iter().enumerate() {
                if self.layout.path(f, id, Part::Env).exists()
                    || self.layout.path(f, id, Part::Body).exists()
                {
                    self.lifecycle.replica_removed(id, f)?;
                    touched[k] = true;
                }
            }
        }
        // One directory fsync per folder for the whole group.
        for (k, f) in Folder::LIVE.into_iter().enumerate() {
            if touched[k] {
                spool::layout::fsync_dir(&self.layout.dir(f))?;
            }
        }
        Ok(())
    }

    fn answer(&self, op: u8, request: &[u8]) -> Result<Bytes, String> {
        cluster::membership::answer_partner(
            &self.settings,
            self.lifecycle.track(),
            self.desk.as_ref(),
            op,
            request,
        )
        .unwrap_or_else(|| Err(format!("operation {op} is not answered here")))
    }
}
