//! The task that follows the HA role: becoming active schedules every message the spool holds
//! (replicas included); the HA gauges are kept current. (SMTP reads the role itself at accept
//! time.)

use crate::metrics::Metrics;
use crate::queue::Queue;
use spool::{Folder, Layout};
use std::sync::Arc;
use std::time::Duration;

/// Follows the role: becoming active schedules every message the spool holds (replicas
/// included). Also keeps the HA gauges current. (SMTP reads the role itself at accept time.)
pub async fn follow_role(
    r: Arc<hasync::Replicator>,
    queue: Arc<Queue>,
    layout: Layout,
    metrics: Arc<Metrics>,
) {
    let mut role = r.watch_role();
    let mut last = None;
    loop {
        let now = *role.borrow();
        if last != Some(now) {
            let active = now == hasync::proto::Role::Active;
            metrics.ha_active.set(i64::from(active));
            if active && last.is_some() {
                let mut n = 0;
                for folder in Folder::SCHEDULED {
                    for e in std::fs::read_dir(layout.dir(folder))
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        let name = e.file_name();
                        let id = name
                            .to_str()
                            .and_then(|n| n.strip_suffix(".env"))
                            .and_then(|n| n.parse().ok());
                        if let Some(id) = id {
                            queue.add(id, 0);
                            n += 1;
                        }
                    }
                }
                tracing::warn!(
                    messages = n,
                    "now active: scheduling every message held, replicas included"
                );
            }
            last = Some(now);
        }
        if let Ok((pending, oldest)) = r.log().depth() {
            metrics.ha_pending.set(pending as i64);
            let age = oldest
                .map(|o| (crate::clock::now_ms().saturating_sub(o)) as f64 / 1000.0)
                .unwrap_or(0.0);
            metrics.ha_oldest_pending.set(age);
        }
        metrics
            .ha_rebuild_pending
            .set(i64::from(r.log().needs_rebuild()));
        let outbox = r.staging().outbox();
        metrics.ha_outbox_messages.set(outbox.len() as i64);
        metrics.ha_outbox_bytes.set(outbox.bytes() as i64);
        tokio::select! {
            c = role.changed() => if c.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
