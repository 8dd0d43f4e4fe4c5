//! The replication log and its staging, made before the writer and shared, and the writer's
//! publish hook that logs an `ADD` for every message it publishes.

use crate::clock::now_ms;
use crate::metrics::Metrics;
use hasync::staging::Staging;
use hasync::txlog::TxLog;
use spool::writer::{PublishHook, Published};
use spool::MessageId;
use std::sync::Arc;

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
