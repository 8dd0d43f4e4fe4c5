//! The daemon's side of HA replication: the setup of the [`Replicator`], the metrics observer,
//! and the partner as the cluster crate asks it. In this folder: the log and its staging
//! (`log.rs`), the replica store (`replicas.rs`), the task that follows the role (`role.rs`),
//! role changes as a handover (`handover.rs`).

pub mod handover;
pub mod log;
mod replicas;
pub mod role;

pub use log::{LogHook, ReplicationLog};
use replicas::SpoolReplicas;

use crate::config::{Config, HaConfig};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use anyhow::{Context, Result};
use bytes::Bytes;
use hasync::link::LinkConfig;
use hasync::proto::Role;
use hasync::staging::Staging;
use hasync::txlog::TxLog;
use hasync::{ReplicationObserver, Replicator, ReplicatorConfig};
use spool::Layout;
use spool::SpoolWriter;
use std::sync::Arc;
use std::time::Duration;

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
    settings: Arc<crate::clustered::Settings>,
    desk: Arc<crate::quarantine::Desk>,
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
            settings,
            desk,
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
