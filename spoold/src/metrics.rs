//! Prometheus metrics of the daemon (`spoold_*`), registered in one registry served at `/metrics`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use spool::Folder;
use std::time::Duration;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Items in the archive.
    pub archive_items: IntGauge,
    /// Raw bytes of the archived items.
    pub archive_raw_bytes: IntGauge,
    /// Bytes of the archive's segment files.
    pub archive_stored_bytes: IntGauge,
    /// Archived items on legal hold.
    pub archive_held: IntGauge,
    /// Items stored but not yet searchable.
    pub archive_index_lag: IntGauge,
    /// Messages archived, by result (new; duplicates are not counted).
    pub archive_archived: IntCounterVec,
    /// Archive writes that failed (the message waits in the spool).
    pub archive_failures: IntCounter,
    /// Messages waiting in the spool because the archive could not take them.
    pub archive_waiting: IntGauge,
    /// Requests recorded in the audit log.
    pub archive_audit_entries: IntCounter,
    /// The console's logins, lockouts and refusals, by event.
    pub console_events: IntCounterVec,
    /// Requests refused because the audit log could not record them.
    pub archive_audit_failures: IntCounter,
    /// Local items not yet confirmed by a mirror peer, by peer.
    pub archive_mirror_backlog: IntGaugeVec,
    /// Age of the oldest of them, by peer.
    pub archive_mirror_oldest: prometheus::GaugeVec,
    /// 1 while the link to a mirror peer is up, by peer.
    pub archive_mirror_up: IntGaugeVec,
    /// Items a mirror peer confirmed, by peer.
    pub archive_mirror_sent: IntCounterVec,
    /// Mirror links refused for a wrong shared secret, by peer (`incoming` for the listener).
    pub archive_mirror_auth_failures: IntCounterVec,
    /// Items received from mirror peers, by result (new, duplicate, refused).
    pub archive_mirror_received: IntCounterVec,
    /// Sealed segments by place: `remote` (confirmed in the object store), `pending` (waiting
    /// for upload).
    pub archive_remote_segments: IntGaugeVec,
    /// Bytes of segments waiting for upload.
    pub archive_remote_pending_bytes: IntGauge,
    /// Age of the oldest segment waiting for upload.
    pub archive_remote_pending_oldest: prometheus::Gauge,
    /// Local bytes of confirmed segments (the read cache).
    pub archive_cache_bytes: IntGauge,
    /// Object store operations, by operation and result.
    pub archive_remote_ops: IntCounterVec,
    /// Bytes uploaded and confirmed.
    pub archive_remote_upload_bytes: IntCounter,
    /// Message tracking events dropped because the tracking log's writer was behind.
    pub track_dropped: IntCounter,
    /// Messages acknowledged with 250.
    pub accepted_messages: IntCounter,
    /// Body bytes of acknowledged messages.
    pub accepted_bytes: IntCounter,
    /// SMTP replies sent, by code.
    pub smtp_replies: IntCounterVec,
    /// SMTP sessions open now.
    pub smtp_sessions: IntGauge,
    /// Sessions refused because `sessions_max` was reached.
    pub smtp_sessions_refused: IntCounter,
    /// Messages per commit round.
    pub commit_batch: Histogram,
    /// Duration of a commit round (write, fsync, rename, directory fsync).
    pub commit_seconds: Histogram,
    /// Messages on disk by state folder.
    pub queue: IntGaugeVec,
    /// 1 when the writer uses io_uring.
    pub io_uring: IntGauge,
    /// Pairs moved to `corrupt/`.
    pub corrupt: IntCounter,
    /// Pairs inserted from `input/`.
    pub inserted: IntCounter,
    /// Duration of the last startup recovery.
    pub recovery_seconds: prometheus::Gauge,
    /// Delivery attempts per recipient, by result.
    pub delivery_attempts: IntCounterVec,
    /// Transactions completed with a next hop, by next hop.
    pub deliveries: IntCounterVec,
    /// Messages known to the queue manager.
    pub queue_scheduled: IntGauge,
    /// Messages waiting for a retry.
    pub queue_deferred: IntGauge,
    /// Age of the oldest queued message.
    pub oldest_message_age: prometheus::Gauge,
    /// Scan verdicts.
    pub scan_verdicts: IntCounterVec,
    /// Scan stage duration.
    pub scan_seconds: Histogram,
    /// Bounces (DSNs) generated.
    pub bounces: IntCounter,
    /// 1 while the replication link to the partner is up.
    pub ha_link_up: IntGauge,
    /// Failed connection attempts and broken links.
    pub ha_reconnects: IntCounter,
    /// Peers refused for a wrong secret or a replayed proof.
    pub ha_auth_failures: IntCounter,
    /// Local commit → partner acknowledgement.
    pub ha_lag: Histogram,
    /// Duration of logging a round's `ADD`s (one LMDB commit), inside the commit round.
    pub ha_log_append_seconds: Histogram,
    /// Bytes sent to the partner.
    pub ha_bytes_sent: IntCounter,
    /// `ADD`s sent, by where their contents came from (`outbox`: memory; `spool`: the files).
    pub ha_adds_sent: IntCounterVec,
    /// 1 while both units claim active.
    pub ha_split_brain: IntGauge,
    /// Role: 1 active, 0 passive.
    pub ha_active: IntGauge,
    /// Actions waiting for the partner's acknowledgement.
    pub ha_pending: IntGauge,
    /// Age of the oldest pending action.
    pub ha_oldest_pending: prometheus::Gauge,
    /// 1 until the sender has asked the partner which held messages it lacks after a start.
    pub ha_rebuild_pending: IntGauge,
    /// Messages held in memory for the sender, and the bytes they are charged.
    pub ha_outbox_messages: IntGauge,
    pub ha_outbox_bytes: IntGauge,
    /// Messages refused because the replication log reached `ha.pending_max` (alert on > 0).
    pub ha_log_full: IntCounter,
    /// Sync mode: messages accepted without the partner's acknowledgement (fallback to async).
    pub ha_sync_fallbacks: IntCounter,
    /// Sync mode: messages withdrawn and answered 451 for want of the partner's acknowledgement.
    pub ha_sync_rejected: IntCounter,
    /// 1 while the last settings exchange with a member (or the partner) succeeded, by member.
    pub cluster_member_up: IntGaugeVec,
    /// Changes that lost a race to a newer one, as this unit knows them.
    pub cluster_conflicts: IntGauge,
    /// Cluster links refused for a wrong shared secret or a replayed proof.
    pub cluster_auth_failures: IntCounter,
    /// Milters' verdicts on messages, by milter and action.
    pub milter_actions: IntCounterVec,
    /// Time from a milter's first command to its verdict, by milter.
    pub milter_seconds: prometheus::HistogramVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<Histogram> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let smtp_replies = IntCounterVec::new(
            Opts::new(
                "spoold_smtp_replies_total",
                "SMTP replies sent, by reply code.",
            ),
            &["code"],
        )?;
        registry.register(Box::new(smtp_replies.clone()))?;
        let queue = IntGaugeVec::new(
            Opts::new(
                "spoold_queue_messages",
                "Messages on disk, by state folder.",
            ),
            &["folder"],
        )?;
        registry.register(Box::new(queue.clone()))?;
        let recovery_seconds = prometheus::Gauge::new(
            "spoold_recovery_duration_seconds",
            "Duration of the last startup recovery.",
        )?;
        registry.register(Box::new(recovery_seconds.clone()))?;
        let vec = |name: &str, help: &str, label: &str| -> prometheus::Result<IntCounterVec> {
            let v = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(v.clone()))?;
            Ok(v)
        };
        let oldest_message_age = prometheus::Gauge::new(
            "spoold_queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue.",
        )?;
        registry.register(Box::new(oldest_message_age.clone()))?;
        let gauge_vec = |name: &str, help: &str, label: &str| -> prometheus::Result<IntGaugeVec> {
            let v = IntGaugeVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(v.clone()))?;
            Ok(v)
        };
        let archive_mirror_oldest = prometheus::GaugeVec::new(
            Opts::new(
                "spoold_archive_mirror_oldest_age_seconds",
                "Age of the oldest local item not yet confirmed by a mirror peer, by peer.",
            ),
            &["peer"],
        )?;
        registry.register(Box::new(archive_mirror_oldest.clone()))?;
        let archive_remote_pending_oldest = prometheus::Gauge::new(
            "spoold_archive_remote_pending_oldest_age_seconds",
            "Age of the oldest sealed archive segment waiting for upload to the object store.",
        )?;
        registry.register(Box::new(archive_remote_pending_oldest.clone()))?;
        let archive_remote_ops = IntCounterVec::new(
            Opts::new(
                "spoold_archive_remote_operations_total",
                "Object store operations of the archive, by operation (upload, fetch, delete, evict) and result (ok, failed).",
            ),
            &["op", "result"],
        )?;
        registry.register(Box::new(archive_remote_ops.clone()))?;
        let milter_actions = IntCounterVec::new(
            Opts::new(
                "spoold_milter_actions_total",
                "Milters' verdicts on messages, by milter and action (accept, reject, tempfail, discard, quarantine, failed: down, late or broken, its default_action applied; not-asked: an earlier milter decided).",
            ),
            &["milter", "action"],
        )?;
        registry.register(Box::new(milter_actions.clone()))?;
        let milter_seconds = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "spoold_milter_duration_seconds",
                "Time from a milter's first command about a message to its verdict, by milter.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
            ]),
            &["milter"],
        )?;
        registry.register(Box::new(milter_seconds.clone()))?;
        Ok(Metrics {
            milter_actions,
            milter_seconds,
            archive_remote_segments: gauge_vec(
                "spoold_archive_remote_segments",
                "Sealed archive segments by place: remote (confirmed in the object store), pending (waiting for upload).",
                "state",
            )?,
            archive_remote_pending_bytes: gauge(
                "spoold_archive_remote_pending_bytes",
                "Bytes of sealed archive segments waiting for upload.",
            )?,
            archive_remote_pending_oldest,
            archive_cache_bytes: gauge(
                "spoold_archive_cache_bytes",
                "Local bytes of archive segments already in the object store (the read cache).",
            )?,
            archive_remote_ops,
            cluster_member_up: gauge_vec(
                "spoold_cluster_member_up",
                "1 while the last clustered-settings exchange with a member (or the partner) succeeded, by member.",
                "member",
            )?,
            cluster_conflicts: gauge(
                "spoold_cluster_conflicts",
                "Clustered-setting changes that lost a race to a newer one (the last 100 are kept).",
            )?,
            cluster_auth_failures: counter(
                "spoold_cluster_auth_failures_total",
                "Cluster links refused for a wrong shared secret or a replayed proof.",
            )?,
            track_dropped: counter(
                "spoold_track_events_dropped_total",
                "Message tracking events dropped because the tracking log's writer was behind (mail never waits for it).",
            )?,
            archive_remote_upload_bytes: counter(
                "spoold_archive_remote_upload_bytes_total",
                "Bytes of archive segments uploaded to the object store and confirmed.",
            )?,
            archive_items: gauge("spoold_archive_items", "Items in the archive.")?,
            archive_raw_bytes: gauge(
                "spoold_archive_raw_bytes",
                "Raw bytes of the archived messages.",
            )?,
            archive_stored_bytes: gauge(
                "spoold_archive_stored_bytes",
                "Bytes of the archive's segment files (compressed, deduplicated).",
            )?,
            archive_held: gauge(
                "spoold_archive_held_items",
                "Archived items on legal hold.",
            )?,
            archive_index_lag: gauge(
                "spoold_archive_index_lag_items",
                "Archived items not yet searchable.",
            )?,
            archive_archived: vec(
                "spoold_archive_archived_total",
                "Messages archived here, by result.",
                "result",
            )?,
            archive_failures: counter(
                "spoold_archive_failures_total",
                "Archive writes that failed; the message waited in the spool.",
            )?,
            console_events: vec(
                "spoold_console_events_total",
                "Console events: login, login_failed, login_locked (tried during a lockout), lockout (begun), csrf_refused, forbidden.",
                "event",
            )?,
            archive_audit_entries: counter(
                "spoold_archive_audit_entries_total",
                "Requests for archive content recorded in the audit log.",
            )?,
            archive_audit_failures: counter(
                "spoold_archive_audit_failures_total",
                "Requests for archive content refused because the audit log could not record them.",
            )?,
            archive_waiting: gauge(
                "spoold_archive_waiting_messages",
                "Messages held back in the spool because the archive could not take them.",
            )?,
            archive_mirror_backlog: gauge_vec(
                "spoold_archive_mirror_backlog_items",
                "Local items not yet confirmed by a mirror peer, by peer.",
                "peer",
            )?,
            archive_mirror_oldest,
            archive_mirror_up: gauge_vec(
                "spoold_archive_mirror_up",
                "1 while the link to a mirror peer is up, by peer.",
                "peer",
            )?,
            archive_mirror_sent: vec(
                "spoold_archive_mirror_sent_total",
                "Items a mirror peer confirmed, by peer.",
                "peer",
            )?,
            archive_mirror_auth_failures: vec(
                "spoold_archive_mirror_auth_failures_total",
                "Mirror links refused for a wrong shared secret, by peer (incoming: our listener).",
                "peer",
            )?,
            archive_mirror_received: vec(
                "spoold_archive_mirror_received_total",
                "Items received from mirror peers, by result (new, duplicate, refused).",
                "result",
            )?,
            delivery_attempts: vec(
                "spoold_delivery_attempts_total",
                "Delivery attempts per recipient, by result (delivered, deferred, failed).",
                "result",
            )?,
            deliveries: vec(
                "spoold_deliveries_total",
                "SMTP transactions completed with a next hop, by next hop.",
                "next_hop",
            )?,
            queue_scheduled: gauge(
                "spoold_queue_scheduled_messages",
                "Messages known to the queue manager.",
            )?,
            queue_deferred: gauge(
                "spoold_queue_deferred_messages",
                "Messages waiting for a retry.",
            )?,
            oldest_message_age,
            scan_verdicts: vec(
                "spoold_scan_verdicts_total",
                "Scan stage results (clean, infected, error, unscanned).",
                "verdict",
            )?,
            scan_seconds: histogram(
                "spoold_scan_duration_seconds",
                "Duration of the vscan stage for one message.",
                vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0],
            )?,
            bounces: counter(
                "spoold_bounces_total",
                "Delivery status notifications generated.",
            )?,
            ha_link_up: gauge(
                "spoold_ha_link_up",
                "1 while the replication link to the partner is up.",
            )?,
            ha_reconnects: counter(
                "spoold_ha_reconnects_total",
                "Failed replication connection attempts and broken links.",
            )?,
            ha_auth_failures: counter(
                "spoold_ha_auth_failures_total",
                "Peer links refused for a wrong shared secret or a replayed proof.",
            )?,
            ha_lag: histogram(
                "spoold_ha_replication_lag_seconds",
                "Time from logging an action to the partner's acknowledgement.",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0,
                ],
            )?,
            ha_log_append_seconds: histogram(
                "spoold_ha_log_append_duration_seconds",
                "Duration of logging a commit round's ADD actions in the transaction log (one LMDB commit, part of the round).",
                vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
                ],
            )?,
            ha_adds_sent: vec(
                "spoold_ha_sent_adds_total",
                "ADD actions sent to the partner, by where their contents came from (outbox: memory, spool: the files).",
                "from",
            )?,
            ha_bytes_sent: counter(
                "spoold_ha_sent_bytes_total",
                "Bytes of envelopes and bodies sent to the partner.",
            )?,
            ha_split_brain: gauge(
                "spoold_ha_split_brain",
                "1 while both units of the pair claim the active role.",
            )?,
            ha_active: gauge(
                "spoold_ha_role_active",
                "1 when this unit is active, 0 when passive.",
            )?,
            ha_pending: gauge(
                "spoold_ha_pending_actions",
                "Replication actions waiting for the partner's acknowledgement.",
            )?,
            ha_rebuild_pending: gauge(
                "spoold_ha_log_rebuild_pending",
                "1 from a start until the sender has asked the partner which held messages it lacks (until then pending_actions leaves out the ADDs a crash lost).",
            )?,
            ha_outbox_messages: gauge(
                "spoold_ha_outbox_messages",
                "Just-spooled messages held in memory for the replication sender.",
            )?,
            ha_outbox_bytes: gauge(
                "spoold_ha_outbox_bytes",
                "Memory charged to the replication outbox (bounded by ha.outbox_bytes).",
            )?,
            ha_log_full: counter(
                "spoold_ha_log_full_total",
                "Messages refused (451) because the replication log reached ha.pending_max; alert on any increase.",
            )?,
            ha_sync_fallbacks: counter(
                "spoold_ha_sync_fallbacks_total",
                "Sync replication: messages accepted without the partner's acknowledgement.",
            )?,
            ha_sync_rejected: counter(
                "spoold_ha_sync_rejected_total",
                "Sync replication: messages withdrawn (451) for want of the partner's acknowledgement.",
            )?,
            ha_oldest_pending: {
                let g = prometheus::Gauge::new(
                    "spoold_ha_oldest_pending_age_seconds",
                    "Age of the oldest unacknowledged replication action.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            accepted_messages: counter(
                "spoold_accepted_messages_total",
                "Messages acknowledged with 250 after they were durable.",
            )?,
            accepted_bytes: counter(
                "spoold_accepted_bytes_total",
                "Body bytes of messages acknowledged with 250.",
            )?,
            smtp_replies,
            smtp_sessions: gauge("spoold_smtp_sessions", "SMTP sessions open now.")?,
            smtp_sessions_refused: counter(
                "spoold_smtp_sessions_refused_total",
                "SMTP sessions refused with 421 because sessions_max was reached.",
            )?,
            commit_batch: histogram(
                "spoold_commit_batch_messages",
                "Messages per group-commit round.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            )?,
            commit_seconds: histogram(
                "spoold_commit_duration_seconds",
                "Duration of a group-commit round: writes, fsyncs, renames, directory fsync.",
                vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
                ],
            )?,
            queue,
            io_uring: gauge(
                "spoold_io_uring_in_use",
                "1 when the spool writer uses io_uring, 0 for the portable writer.",
            )?,
            corrupt: counter(
                "spoold_corrupt_messages_total",
                "Pairs moved to corrupt/ at recovery or insertion.",
            )?,
            inserted: counter(
                "spoold_inserted_messages_total",
                "Pairs inserted from input/.",
            )?,
            recovery_seconds,
            registry,
        })
    }

    /// Adds `delta` to the gauge of `folder`.
    pub fn queue_add(&self, folder: Folder, delta: i64) {
        self.queue.with_label_values(&[folder.name()]).add(delta);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl spool::writer::RoundObserver for Metrics {
    fn round(&self, batch: usize, elapsed: Duration) {
        self.commit_batch.observe(batch as f64);
        self.commit_seconds.observe(elapsed.as_secs_f64());
    }
}
