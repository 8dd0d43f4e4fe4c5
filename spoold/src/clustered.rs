//! The daemon's side of clustered settings ([`cluster::Schema`]): the one table of
//! configuration keys that can be clustered (name, how to read it, how to write it), the keys
//! that never leave a unit, and what putting an effective configuration into effect means
//! here: the watch channels that SMTP sessions, delivery attempts and archive retention read
//! when they start.
//!
//! Not here: the store, the merge and the exchanges (the `cluster` crate).

use crate::config::Config;
use crate::delivery::DeliveryPolicy;
use cluster::Key;
use std::sync::Arc;
use tokio::sync::watch;

/// This unit's clustered settings.
pub type Settings = cluster::Settings<LiveConfig>;
/// Who shares them with this unit.
pub type Membership = cluster::Membership<LiveConfig>;

/// A row of the key table: `key!("smtp.relay_domains", smtp.relay_domains)`.
macro_rules! key {
    ($name:literal, $($field:ident).+) => {
        Key {
            name: $name,
            get: |c: &Config| serde_json::to_value(&c.$($field).+).ok(),
            set: |c: &mut Config, v| {
                c.$($field).+ = serde_json::from_value(v)?;
                Ok(())
            },
        }
    };
}

/// Keys that can be clustered, and that apply live.
static KEYS: &[Key<Config>] = &[
    key!("smtp.relay_domains", smtp.relay_domains),
    key!("smtp.trusted_networks", smtp.trusted_networks),
    key!("smtp.message_bytes_max", smtp.message_bytes_max),
    key!("smtp.recipients_max", smtp.recipients_max),
    key!("smtp.idle_timeout_secs", smtp.idle_timeout_secs),
    key!("delivery.default_next_hop", delivery.default_next_hop),
    key!("delivery.routes", delivery.routes),
    key!("delivery.retry_schedule_secs", delivery.retry_schedule_secs),
    key!("delivery.queue_lifetime_secs", delivery.queue_lifetime_secs),
    key!("delivery.tls", delivery.tls),
    key!("filter.fail_open", filter.fail_open),
    key!("filter.retry_secs", filter.retry_secs),
    key!("filter.notify_sender", filter.notify_sender),
    key!("archive.retention_days", archive.retention_days),
    key!("console.users", console.users),
];

/// Keys that never leave their unit (its identity, addresses, secrets and role).
const MACHINE_ONLY: &[&str] = &[
    "node_name",
    "hostname",
    "state_dir",
    "smtp.listen",
    "smtp.tls_cert",
    "smtp.tls_key",
    "http.listen",
    "ha.partner",
    "ha.listen",
    "ha.secret",
    "ha.secret_file",
    "ha.tls_cert",
    "ha.tls_key",
    "ha.role",
    "ha.priority",
    "archive.dir",
    "archive.listen",
    "archive.secret",
    "archive.secret_file",
    "cluster.listen",
    "cluster.advertise",
    "cluster.secret",
    "cluster.secret_file",
    "console.enabled",
    "console.listen",
    "console.tls_cert",
    "console.tls_key",
];

/// Where the effective configuration goes live: what SMTP sessions, delivery attempts and
/// the archive's retention pass read when they start.
pub struct LiveConfig {
    /// The SMTP server's settings (relay policy, limits, idle timeout).
    pub smtp: watch::Sender<Arc<smtp::ServerConfig>>,
    /// Routes, retry schedule, TLS policy, filter policy.
    pub delivery: watch::Sender<Arc<DeliveryPolicy>>,
    /// `archive.retention_days`.
    pub retention_days: watch::Sender<u64>,
    /// `console.users`: who may log in to the console, read on every request.
    pub users: watch::Sender<Arc<console::users::Users>>,
}

/// The receiving ends of [`LiveConfig`].
pub struct LiveReceivers {
    /// For the SMTP accept loop.
    pub smtp: watch::Receiver<Arc<smtp::ServerConfig>>,
    /// For the queue manager.
    pub delivery: watch::Receiver<Arc<DeliveryPolicy>>,
    /// For the archive's retention pass.
    pub retention_days: watch::Receiver<u64>,
    /// For the console.
    pub users: watch::Receiver<Arc<console::users::Users>>,
}

impl LiveConfig {
    /// The channels, holding the file's configuration `cfg` (and the SMTP server's TLS
    /// identity, which is not clustered) until the store applies the effective one.
    pub fn channels(
        cfg: &Config,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (LiveConfig, LiveReceivers) {
        let (smtp, smtp_rx) = watch::channel(Arc::new(smtp::ServerConfig {
            hostname: cfg.hostname.clone(),
            message_bytes_max: cfg.smtp.message_bytes_max,
            recipients_max: cfg.smtp.recipients_max,
            line_bytes_max: cfg.smtp.line_bytes_max,
            idle_timeout: cfg.idle_timeout(),
            errors_max: 20,
            tls,
            policy: smtp::RelayPolicy::default(),
        }));
        let (delivery, delivery_rx) = watch::channel(Arc::new(DeliveryPolicy::from_config(cfg)));
        let (retention_days, retention_days_rx) = watch::channel(cfg.archive.retention_days);
        let (users, users_rx) = watch::channel(Arc::new(cfg.console.users.clone()));
        (
            LiveConfig {
                smtp,
                delivery,
                retention_days,
                users,
            },
            LiveReceivers {
                smtp: smtp_rx,
                delivery: delivery_rx,
                retention_days: retention_days_rx,
                users: users_rx,
            },
        )
    }
}

impl cluster::Schema for LiveConfig {
    type Config = Config;

    fn keys(&self) -> &'static [Key<Config>] {
        KEYS
    }

    fn machine_only(&self) -> &'static [&'static str] {
        MACHINE_ONLY
    }

    fn validate(&self, config: &Config) -> anyhow::Result<()> {
        config.validate()
    }

    fn apply(&self, c: &Config) {
        self.delivery
            .send_replace(Arc::new(DeliveryPolicy::from_config(c)));
        self.retention_days.send_replace(c.archive.retention_days);
        self.users.send_replace(Arc::new(c.console.users.clone()));
        let policy = smtp::RelayPolicy {
            relay_domains: c.smtp.relay_domains.clone(),
            trusted_networks: c.smtp.trusted_networks.clone(),
            allow_untrusted_routing: c.smtp.allow_untrusted_routing,
            journal_recipients: c.archive.journal(),
        };
        let (size, rcpts, idle) = (
            c.smtp.message_bytes_max,
            c.smtp.recipients_max,
            c.idle_timeout(),
        );
        self.smtp.send_modify(|s| {
            let mut next = (**s).clone();
            next.policy = policy;
            next.message_bytes_max = size;
            next.recipients_max = rcpts;
            next.idle_timeout = idle;
            *s = Arc::new(next);
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cluster::{parse_value, Exchange, GROUP_KEY};

    /// The store of unit `node`, and what its apply put into effect for SMTP sessions.
    fn settings(
        node: &str,
        dir: &std::path::Path,
    ) -> (Settings, watch::Receiver<Arc<smtp::ServerConfig>>) {
        let c = Config {
            node_name: node.into(),
            state_dir: dir.to_path_buf(),
            ..Config::default()
        };
        let (live, receivers) = LiveConfig::channels(&c, None);
        let s = Settings::open(node, dir, c, live).unwrap();
        (s, receivers.smtp)
    }

    fn value_of(s: &Settings, c: &Config, key: &str) -> Option<serde_json::Value> {
        s.value_in(c, key)
    }

    #[test]
    fn levels_validation_merge_and_conflicts() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, seen_a) = settings("gw_a", da.path());
        let (b, _) = settings("gw_b", db.path());
        let v = |t: &str| parse_value("smtp.relay_domains", t).unwrap();
        // Refused at the origin: a bad value, a machine-only key, an unknown level.
        assert!(a
            .set(
                "smtp.relay_domains",
                "cluster",
                Some(v(r#"["not a domain"]"#))
            )
            .is_err());
        assert!(a.set("smtp.listen", "cluster", Some(v("[]"))).is_err());
        assert!(a.set("smtp.relay_domains", "group", Some(v("[]"))).is_err());
        assert!(a.entries().0.is_empty());
        // A cluster value reaches B through an exchange.
        a.set("smtp.relay_domains", "cluster", Some(v(r#"["x.example"]"#)))
            .unwrap();
        assert_eq!(seen_a.borrow().policy.relay_domains.join(","), "x.example");
        assert!(b.merge(&a.exchange()).unwrap());
        assert_eq!(b.effective().unwrap().smtp.relay_domains, ["x.example"]);
        assert!(!b.merge(&a.exchange()).unwrap(), "idempotent");
        // A machine override on A (an explicit empty list) stays A's.
        a.set("smtp.relay_domains", "machine", Some(v("[]")))
            .unwrap();
        assert!(a.effective().unwrap().smtp.relay_domains.is_empty());
        b.merge(&a.exchange()).unwrap();
        assert_eq!(b.effective().unwrap().smtp.relay_domains, ["x.example"]);
        // Unset at the machine level: the cluster value applies again.
        a.set("smtp.relay_domains", "machine", None).unwrap();
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["x.example"]);
        // A change made on B after it saw A's is no conflict, whatever order the exchanges take.
        let x = a.entries().0;
        b.set("smtp.relay_domains", "cluster", Some(v(r#"["y.example"]"#)))
            .unwrap();
        b.merge(&Exchange {
            entries: x,
            ..a.exchange()
        })
        .unwrap();
        a.merge(&b.exchange()).unwrap();
        assert!(
            a.entries().1.is_empty() && b.entries().1.is_empty(),
            "no conflict"
        );
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["y.example"]);
        // Concurrent changes: the newer stamp wins on both, the loser is recorded on both.
        a.set("smtp.relay_domains", "cluster", Some(v(r#"["a.example"]"#)))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        b.set("smtp.relay_domains", "cluster", Some(v(r#"["b.example"]"#)))
            .unwrap();
        let (ea, eb) = (a.exchange(), b.exchange());
        a.merge(&eb).unwrap();
        b.merge(&ea).unwrap();
        for s in [&a, &b] {
            assert_eq!(s.effective().unwrap().smtp.relay_domains, ["b.example"]);
            assert_eq!(s.entries().1.len(), 1, "the loser is reported");
            assert_eq!(s.entries().1[0].lost.stamp.node, "gw_a");
        }
        // Groups: machine beats the node's group, which beats cluster.
        a.set(GROUP_KEY, "machine", Some(serde_json::json!("edge")))
            .unwrap();
        a.set(
            "smtp.relay_domains",
            "group:edge",
            Some(v(r#"["edge.example"]"#)),
        )
        .unwrap();
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["edge.example"]);
        b.merge(&a.exchange()).unwrap();
        assert_eq!(
            b.effective().unwrap().smtp.relay_domains,
            ["b.example"],
            "B is in no group"
        );
        a.set(GROUP_KEY, "machine:gw_b", Some(serde_json::json!("edge")))
            .unwrap();
        b.merge(&a.exchange()).unwrap();
        assert_eq!(b.effective().unwrap().smtp.relay_domains, ["edge.example"]);
        assert!(a
            .set(GROUP_KEY, "cluster", Some(serde_json::json!("edge")))
            .is_err());
        assert!(a
            .set(GROUP_KEY, "machine", Some(serde_json::json!("Bad Name")))
            .is_err());
        // Move: the group's value to the cluster level; the group no longer sets it.
        a.copy("smtp.relay_domains", "group:edge", "cluster", true)
            .unwrap();
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["edge.example"]);
        assert!(a
            .copy("smtp.relay_domains", "group:edge", "cluster", false)
            .is_err());
        a.set(GROUP_KEY, "machine", None).unwrap();
        a.set("smtp.relay_domains", "cluster", Some(v(r#"["b.example"]"#)))
            .unwrap();
        b.merge(&a.exchange()).unwrap();
        // The filter, TLS and archive policies are clustered too, and validated.
        let set = |k: &str, t: &str| a.set(k, "cluster", Some(parse_value(k, t).unwrap()));
        set("delivery.tls", r#""encrypt""#).unwrap();
        assert!(set("delivery.tls", r#""sometimes""#).is_err());
        set("filter.fail_open", "true").unwrap();
        assert!(set("filter.retry_secs", "0").is_err());
        set("archive.retention_days", "30").unwrap();
        b.merge(&a.exchange()).unwrap();
        let eb = b.effective().unwrap();
        assert!(eb.filter.fail_open && eb.archive.retention_days == 30);
        assert_eq!(
            value_of(&b, &eb, "delivery.tls"),
            Some(serde_json::json!("encrypt"))
        );
        // Another protocol version is refused.
        let mut other = a.exchange();
        other.version = 99;
        assert!(b.merge(&other).is_err());
        // Durable: reopened, the same.
        drop(a);
        let (a, _) = settings("gw_a", da.path());
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["b.example"]);
    }
}
