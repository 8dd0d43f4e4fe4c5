//! The daemon's side of HA replication: the log and its staging (made first and shared), the
//! writer's publish hook that logs `ADD`s, the replica store over the spool writer's shared
//! handle, the metrics observer, and the setup of the [`Replicator`].

use crate::config::{Config, HaConfig};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::sink::now_ms;
use anyhow::{Context, Result};
use bytes::Bytes;
use hasync::link::LinkConfig;
use hasync::proto::Role;
use hasync::staging::Staging;
use hasync::txlog::TxLog;
use hasync::{ReplicaStore, ReplicationObserver, Replicator, ReplicatorConfig};
use spool::writer::{CommitRequest, PublishHook, Published};
use spool::SpoolWriter;
use spool::{BodyParts, CommitError, Envelope, Folder, Layout, MessageId, Part};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The replication log and its staging (publishing marks, outbox, the sender's wake-up):
/// made first, then shared by the writer's hook, the lifecycle owner and the replicator, so
/// none of them waits for another to exist.
#[derive(Clone)]
pub struct ReplicationLog {
    /// The log.
    pub log: Arc<TxLog>,
    /// What the writer tells the sender.
    pub staging: Arc<Staging>,
}

impl ReplicationLog {
    /// Wakes the sender.
    pub fn notify(&self) {
        self.staging.notify();
    }
}

/// Logs an `ADD` for every message the writer is about to publish, then wakes the sender.
pub struct LogHook {
    /// The log and its staging.
    pub repl: ReplicationLog,
    /// Counts refusals when the log is at `ha.pending_max`.
    pub metrics: Arc<Metrics>,
}

impl PublishHook for LogHook {
    fn before_publish(&self, ids: &[&MessageId]) -> std::io::Result<Vec<u64>> {
        let started = std::time::Instant::now();
        let appended = self
            .repl
            .staging
            .before_publish(&self.repl.log, ids, now_ms());
        self.metrics
            .ha_log_append_seconds
            .observe(started.elapsed().as_secs_f64());
        appended.map_err(|e| {
            if matches!(e, hasync::txlog::LogError::Full(_)) {
                self.metrics.ha_log_full.inc();
                tracing::error!("replication log full (ha.pending_max): refusing new mail with 451 until the partner catches up");
            }
            std::io::Error::other(e)
        })
    }

    fn after_publish(&self, messages: &[Published<'_>]) {
        self.repl.staging.after_publish(messages);
    }
}

/// Stores replicas through the same durable writer as SMTP mail (not logged again).
pub struct SpoolReplicas {
    /// The writer that stores the pairs (shared with SMTP ingress).
    pub writer: Arc<SpoolWriter>,
    /// Counts, moves and schedules.
    pub lifecycle: Arc<Lifecycle>,
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
            self.lifecycle.queue.ensure(id.clone(), 0);
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
            Write(
                tokio::sync::oneshot::Receiver<Result<spool::writer::CommitReceipt, CommitError>>,
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
            self.lifecycle.track.event_with(
                &id,
                track::EventKind::Replicated,
                format!("from the partner, {} bytes", e.body_len),
                crate::lifecycle::tracked(&e, &body),
            );
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
            Ok(Step::Write(rx))
        });
        Box::pin(async move {
            let from = match step? {
                Step::Nothing => return Ok(()),
                Step::Move(from) => from,
                Step::Write(rx) => {
                    match rx.await {
                        Ok(Ok(_)) => tracing::debug!(id = %id, "replica stored"),
                        Ok(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                        Err(_) => return Err(std::io::Error::other("spool writer stopped")),
                    }
                    self.lifecycle.arrived(Folder::Spool);
                    Folder::Spool
                }
            };
            if from != target {
                let (layout, moved) = (self.layout.clone(), id.clone());
                tokio::task::spawn_blocking(move || layout.move_pair(&moved, from, target))
                    .await
                    .map_err(|e| std::io::Error::other(format!("replica move: {e}")))??;
                self.lifecycle.moved(from, target);
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
                    self.layout.discard_pair(id, f)?;
                    self.lifecycle.removed(id, f);
                    self.lifecycle.track.event(
                        id,
                        track::EventKind::ReplicaRemoved,
                        format!("from {}: delivered or removed on the partner", f.name()),
                    );
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
            &self.lifecycle.settings,
            &self.lifecycle.track,
            op,
            request,
        )
        .unwrap_or_else(|| Err(format!("operation {op} is not answered here")))
    }
}

/// The HA partner as the cluster crate asks it: over the replication link's
/// `PartnerRequests` channel.
pub struct PartnerLink(pub Arc<hasync::Replicator>);

impl cluster::Partner for PartnerLink {
    fn name(&self) -> Option<String> {
        self.0.peer().map(|p| p.node)
    }

    fn ask(
        &self,
        op: u8,
        arg: Vec<u8>,
    ) -> futures_util::future::BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            self.0
                .ask_partner(op, &arg)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

impl ReplicationObserver for Metrics {
    fn link_up(&self, up: bool) {
        self.ha_link_up.set(i64::from(up));
    }
    fn reconnect(&self) {
        self.ha_reconnects.inc();
    }
    fn auth_failure(&self) {
        self.ha_auth_failures.inc();
    }
    fn acknowledged(&self, lag: Duration) {
        self.ha_lag.observe(lag.as_secs_f64());
    }
    fn sent(&self, bytes: u64) {
        self.ha_bytes_sent.inc_by(bytes);
    }
    fn split_brain(&self, on: bool) {
        self.ha_split_brain.set(i64::from(on));
    }
    fn add_sent(&self, from_outbox: bool) {
        let from = if from_outbox { "outbox" } else { "spool" };
        self.ha_adds_sent.with_label_values(&[from]).inc();
    }
}

/// Opens the log and builds the link identity; the replicator itself is made once the writer
/// exists ([`finish`]).
pub struct HaSetup {
    /// The `[ha]` section.
    pub cfg: HaConfig,
    /// The log and its staging.
    pub repl: ReplicationLog,
    link: LinkConfig,
}

/// First half of the HA setup (before the writer starts).
pub fn prepare(cfg: &Config, layout: &Layout) -> Result<Option<HaSetup>> {
    let Some(ha) = cfg.ha.clone() else {
        return Ok(None);
    };
    let secret = ha.load_secret()?;
    let link = match (&ha.tls_cert, &ha.tls_key) {
        (Some(cert), Some(key)) => {
            let (certs, key) = crate::tls::pem_identity("ha", cert, key)?;
            LinkConfig::new(cfg.node_name.clone(), secret, ha.priority, certs, key)
                .context("keys `ha.tls_cert`/`ha.tls_key`")?
        }
        // The shared secret authenticates the link; a certificate made at start serves TLS.
        _ => LinkConfig::self_signed(&cfg.node_name, &secret, ha.priority)
            .context("make the peer link's self-signed certificate")?,
    };
    let log = Arc::new(
        TxLog::open(&layout.root().join("txlog"), ha.pending_max)
            .with_context(|| format!("open {}/txlog", layout.root().display()))?,
    );
    let staging = Arc::new(Staging::new(ha.outbox_bytes));
    Ok(Some(HaSetup {
        cfg: ha,
        repl: ReplicationLog { log, staging },
        link,
    }))
}

/// Second half: the replicator (storing replicas through `writer`), its receiver listener and
/// sender task.
pub async fn finish(
    setup: &HaSetup,
    layout: &Layout,
    writer: Arc<SpoolWriter>,
    lifecycle: Arc<Lifecycle>,
    metrics: Arc<Metrics>,
) -> Result<Arc<Replicator>> {
    let persisted = setup.repl.log.role().context("read the persisted role")?;
    let configured = Role::parse(&setup.cfg.role);
    let role = if setup.cfg.role_forced {
        configured
    } else {
        persisted.as_deref().and_then(Role::parse).or(configured)
    }
    .unwrap_or(Role::Passive);
    setup
        .repl
        .log
        .set_role(role.as_str())
        .context("persist the role")?;
    let replicator = Replicator::new(
        ReplicatorConfig {
            link: setup.link.clone(),
            partner: setup.cfg.partner,
            window: setup.cfg.window,
        },
        setup.repl.log.clone(),
        setup.repl.staging.clone(),
        layout.clone(),
        Arc::new(SpoolReplicas {
            writer,
            lifecycle,
            log: setup.repl.log.clone(),
            layout: layout.clone(),
        }),
        metrics,
        role,
    );
    let listener = tokio::net::TcpListener::bind(setup.cfg.listen)
        .await
        .with_context(|| format!("key `ha.listen`: bind {}", setup.cfg.listen))?;
    tokio::spawn(replicator.clone().run_receiver(listener));
    tokio::spawn(replicator.clone().run_sender());
    tracing::info!(role = role.as_str(), partner = %setup.cfg.partner, listen = %setup.cfg.listen, "HA replication started");
    Ok(replicator)
}
