//! The next hops: the routing table (exact domains, `*.parent` wildcards, the default next
//! hop), the per-destination connection limit (a message waits in the queue, not holding a
//! global slot, while every connection of its next hop is taken), the pool of idle connections,
//! and one SMTP transaction to a next hop with its per-recipient results.
//!
//! It is not: what to do with the results (the queue manager in `mod.rs` records them).

use super::{Delivery, RcptResult};
use crate::config::{Config, TlsSetting};
use crate::delivery::dsn::Failure;
use crate::queue::Queue;
use smtp::client::{ClientError, Connection, TlsPolicy};
use spool::Envelope;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Idle pooled connections older than this are closed instead of reused.
const POOL_IDLE_MAX: Duration = Duration::from_secs(30);

/// A route's target.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Hop {
    /// `host:port`.
    pub(super) address: String,
    pub(super) tls: TlsSetting,
}

/// Routing table: exact domains, `*.parent` wildcards, then the default next hop.
pub struct Routes {
    exact: HashMap<String, Hop>,
    wildcard: HashMap<String, Hop>,
    default: Option<Hop>,
}

impl Routes {
    /// Builds the table from `[delivery]`.
    pub fn from_config(cfg: &Config) -> Routes {
        let d = &cfg.delivery;
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for r in &d.routes {
            let hop = Hop {
                address: r.next_hop.clone(),
                tls: r.tls.unwrap_or(d.tls),
            };
            match r.domain.strip_prefix("*.") {
                Some(parent) => wildcard.insert(parent.to_ascii_lowercase(), hop),
                None => exact.insert(r.domain.to_ascii_lowercase(), hop),
            };
        }
        let default = d.default_next_hop.as_ref().map(|a| Hop {
            address: a.clone(),
            tls: d.tls,
        });
        Routes {
            exact,
            wildcard,
            default,
        }
    }

    pub(super) fn lookup(&self, rcpt: &str) -> Option<&Hop> {
        let domain = smtp::command::domain_of(rcpt).unwrap_or_default();
        if let Some(h) = self.exact.get(&domain) {
            return Some(h);
        }
        let mut rest = domain.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(h) = self.wildcard.get(parent) {
                return Some(h);
            }
            rest = parent;
        }
        self.default.as_ref()
    }
}

impl Delivery {
    pub(super) fn destination_limit(&self, hop: &Hop) -> Arc<Semaphore> {
        let mut m = self
            .per_destination
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.entry(hop.address.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_destination_max)))
            .clone()
    }

    fn pooled(&self, hop: &Hop) -> Option<Connection> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.get_mut(hop)?;
        while let Some((since, c)) = conns.pop() {
            if since.elapsed() < POOL_IDLE_MAX {
                return Some(c);
            }
            tokio::spawn(c.quit());
        }
        None
    }

    fn give_back(&self, hop: &Hop, c: Connection) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.entry(hop.clone()).or_default();
        if conns.len() < self.per_destination_max {
            conns.push((Instant::now(), c));
        } else {
            tokio::spawn(c.quit());
        }
    }

    async fn connect(&self, hop: &Hop) -> Result<Connection, ClientError> {
        let (host, _) = hop
            .address
            .rsplit_once(':')
            .unwrap_or((hop.address.as_str(), "25"));
        let addrs = tokio::net::lookup_host(&hop.address)
            .await
            .map_err(|e| ClientError::Io {
                phase: "resolve",
                detail: format!("{}: {e}", hop.address),
            })?;
        let policy = match hop.tls {
            TlsSetting::None => TlsPolicy::None,
            TlsSetting::May => TlsPolicy::May,
            TlsSetting::Encrypt => TlsPolicy::Encrypt,
        };
        let mut last = None;
        for addr in addrs {
            match Connection::connect(addr, host.trim_matches(['[', ']']), &self.client, policy)
                .await
            {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClientError::Io {
            phase: "resolve",
            detail: format!("{}: no address", hop.address),
        }))
    }

    pub(super) async fn send_to(
        &self,
        hop: &Hop,
        env: &Envelope,
        rcpts: &[&str],
        body: &[u8],
    ) -> Vec<RcptResult> {
        // Taken only if free now: a message never waits for a busy next hop while holding one
        // of the global slots (head-of-line blocking); it waits in the queue instead.
        let _slot = match self.destination_limit(hop).try_acquire_owned() {
            Ok(permit) => DestinationSlot {
                permit: Some(permit),
                queue: &self.queue,
                hop: &hop.address,
            },
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                return vec![RcptResult::Busy; rcpts.len()]
            }
            Err(tokio::sync::TryAcquireError::Closed) => {
                return vec![RcptResult::Deferred("shutting down".into()); rcpts.len()]
            }
        };
        let eight_bit = env.body_type == spool::BodyType::EightBitMime;
        // A pooled connection may have been closed by the next hop: one retry on a fresh one.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut conn, reused) = match self.pooled(hop) {
                Some(c) => (c, true),
                None => match self.connect(hop).await {
                    Ok(c) => (c, false),
                    Err(e) => return all(rcpts, &e, &hop.address),
                },
            };
            // Checked again right before the transaction: the role may have changed while this
            // attempt waited for a connection.
            if self.held() {
                self.give_back(hop, conn);
                return vec![RcptResult::NotTried; rcpts.len()];
            }
            match conn
                .send(&env.sender, rcpts, body, eight_bit, env.smtputf8)
                .await
            {
                Ok(outcome) => {
                    // No RSET: a transaction that reached its final reply is over (RFC 5321
                    // 4.1.1.9), and a connection the next hop closed meanwhile costs one retry
                    // on a fresh one (above), not a round trip after every message.
                    self.give_back(hop, conn);
                    self.metrics
                        .deliveries
                        .with_label_values(&[hop.address.as_str()])
                        .inc();
                    return outcome
                        .recipients
                        .into_iter()
                        .zip(rcpts)
                        .map(|(reply, rcpt)| {
                            if reply.is_positive() {
                                RcptResult::Delivered
                            } else if reply.is_permanent() {
                                RcptResult::Failed(Failure {
                                    recipient: rcpt.to_string(),
                                    diagnostic: reply.to_string().replace('\n', " "),
                                    remote: Some(hop.address.clone()),
                                })
                            } else {
                                RcptResult::Deferred(format!(
                                    "{}: {}",
                                    hop.address,
                                    reply.to_string().replace('\n', " ")
                                ))
                            }
                        })
                        .collect();
                }
                Err(e) if reused && attempt == 1 && !matches!(e, ClientError::Rejected { .. }) => {
                    continue
                }
                Err(e) => return all(rcpts, &e, &hop.address),
            }
        }
    }
}

/// A connection slot of one next hop; when it is given back, one message parked for that hop
/// becomes due.
struct DestinationSlot<'a> {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    queue: &'a Queue,
    hop: &'a str,
}

impl Drop for DestinationSlot<'_> {
    fn drop(&mut self) {
        // The permit first: a message parking concurrently then sees the free slot.
        drop(self.permit.take());
        self.queue.unpark_one(self.hop);
    }
}

/// The same result for every recipient of a failed transaction.
fn all(rcpts: &[&str], e: &ClientError, hop: &str) -> Vec<RcptResult> {
    let diagnostic = match e {
        ClientError::Rejected { reply, .. } => reply.to_string().replace('\n', " "),
        other => other.to_string(),
    };
    rcpts
        .iter()
        .map(|rcpt| {
            if e.is_temporary() {
                RcptResult::Deferred(format!("{hop}: {diagnostic}"))
            } else {
                RcptResult::Failed(Failure {
                    recipient: rcpt.to_string(),
                    diagnostic: diagnostic.clone(),
                    remote: Some(hop.to_string()),
                })
            }
        })
        .collect()
}
