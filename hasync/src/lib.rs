//! `hasync`: one-way replication from the active unit of an HA pair to the passive one.
//!
//! It is: the transaction log ([`txlog`], LMDB), the in-memory [`outbox`] of just-published
//! messages, and the [`Replicator`] over the `peer` crate's authenticated link (re-exported as
//! [`link`] and [`proto`]), which runs the sender (on the
//! active node: ship pending `ADD`/`DELETE` actions with a bounded window, resume from the
//! partner's last applied sequence, retry with capped backoff) and the receiver (apply actions
//! idempotently, make them durable, then acknowledge), plus heartbeats and split-brain
//! detection. This file holds the replicator's state and role logic (roles, the partner gate,
//! split brain); `sender.rs`, `receiver.rs` and `recovery.rs` (requests over the link) hold
//! the rest.
//!
//! It is not: leader election (an operator or a cluster manager sets roles), the spool's write
//! path (replicas are stored through a [`ReplicaStore`] the daemon provides), or metrics (a
//! [`ReplicationObserver`] is told what happens).

pub mod decide;
pub mod outbox;
pub mod staging;
pub use peer::{link, proto};
pub use peer::{HEARTBEAT, SILENCE_MAX};
mod receiver;
mod recovery;
mod sender;
pub mod txlog;

pub use recovery::{Held, RecoveryClient, RecoveryError};

use bytes::Bytes;
use link::{LinkConfig, LinkError};
use proto::{Frame, Role};
use spool::{Folder, Layout, MessageId, Part};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use txlog::{Kind, TxLog};

/// How long a unit that became active (or started active) waits to hear its partner before it
/// takes the partner for dead and delivers: a live partner answers the sender's connection
/// within milliseconds, so two heartbeats are ample.
pub const PARTNER_GRACE: Duration = Duration::from_secs(2);
/// Bytes in flight to the partner before the sender waits for acknowledgements, whatever the
/// window in actions: bounds the receiver's memory when messages are large.
pub const WINDOW_BYTES: u64 = 16 << 20;
/// How often acknowledged actions are pruned from the log at most.
const PRUNE_EVERY: Duration = Duration::from_millis(50);

/// Ids asked per `MISSING` request in the rebuild (about 30 bytes each).
const REBUILD_CHUNK: usize = 16_384;
/// How long the partner may take over one `MISSING` answer before the session is retried.
const REBUILD_ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Where replicas are written: the daemon's durable spool writer.
pub trait ReplicaStore: Send + Sync {
    /// Stores a replica pair durably in `spool/`, or in `hold/` when `held` (idempotent: the
    /// same id and content again is fine; a replica held in the other folder is moved).
    /// `deliver_here`: this unit is active, so the replica is mail it must deliver (it came from
    /// a partner that was active too, or is leaving). Must hand the work to the writer before
    /// returning, so that many stores submitted together share a commit round; the future
    /// only waits for completion.
    fn store(
        &self,
        id: MessageId,
        held: bool,
        deliver_here: bool,
        env: Bytes,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>>;
    /// Removes a replica from whichever folder of [`Folder::LIVE`] holds it; a missing one is
    /// fine.
    fn remove(&self, id: &MessageId) -> std::io::Result<()>;
    /// Removes several replicas durably; implementations should sync each folder once.
    fn remove_many(&self, ids: &[MessageId]) -> std::io::Result<()> {
        ids.iter().try_for_each(|id| self.remove(id))
    }
    /// Answers the partner's requests that the daemon defines ([`proto::partner_op::TRACK`]:
    /// message tracking; [`proto::partner_op::SETTINGS`]: clustered settings;
    /// [`proto::partner_op::QUARANTINE`]: the quarantine inbox); the request and the answer
    /// are the daemon's own format.
    fn answer(&self, op: u8, _request: &[u8]) -> Result<Bytes, String> {
        Err(format!("operation {op} is not answered here"))
    }
}

/// Told what replication does; every method must be cheap.
pub trait ReplicationObserver: Send + Sync {
    /// The link to the partner went up or down.
    fn link_up(&self, up: bool);
    /// A connection attempt failed or a link broke.
    fn reconnect(&self);
    /// A peer failed authentication.
    fn auth_failure(&self);
    /// An action was acknowledged `lag` after it was logged.
    fn acknowledged(&self, lag: Duration);
    /// Bytes sent to the partner.
    fn sent(&self, bytes: u64);
    /// Split brain began (true) or ended (false).
    fn split_brain(&self, on: bool);
    /// An `ADD` was sent from the outbox (true) or read from the spool's files (false).
    fn add_sent(&self, _from_outbox: bool) {}
}

/// What this node knows about its partner.
#[derive(Clone, Debug)]
pub struct PeerStatus {
    /// Partner's node name.
    pub node: String,
    /// Partner's role at its last heartbeat.
    pub role: Role,
    /// Partner's priority.
    pub priority: u32,
    /// When we last heard from it.
    pub seen: Instant,
}

/// Replication settings.
pub struct ReplicatorConfig {
    /// The link identity and secret.
    pub link: LinkConfig,
    /// Partner's peer-link address (where our sender connects).
    pub partner: SocketAddr,
    /// Actions in flight without an acknowledgement.
    pub window: usize,
}

/// The replication engine of one node.
pub struct Replicator {
    cfg: ReplicatorConfig,
    log: Arc<TxLog>,
    layout: Layout,
    store: Arc<dyn ReplicaStore>,
    observer: Arc<dyn ReplicationObserver>,
    role: watch::Sender<Role>,
    /// Publishing marks, the outbox and the sender's wake-up, shared with the writer's hook.
    staging: Arc<staging::Staging>,
    acked: watch::Sender<u64>,
    /// Receiver: highest sequence applied durably here (in memory; persisted lazily).
    applied: AtomicU64,
    applied_persisted: AtomicU64,
    peer: Mutex<Option<PeerStatus>>,
    split: AtomicBool,
    link_up: AtomicBool,
    last_lag_ms: AtomicU64,
    /// Replication sessions (either direction) open with the partner now: split brain needs a
    /// live link carrying two active roles, not a heartbeat remembered from a dead unit.
    live_links: AtomicUsize,
    /// When this unit last became active (or started active).
    activated_at: Mutex<Instant>,
    /// Latched once the partner is known passive (or dead) since [`Replicator::activated_at`].
    released: AtomicBool,
}

/// Counts one open replication session for as long as it lives.
struct LiveLink<'a>(&'a Replicator);

impl<'a> LiveLink<'a> {
    fn open(r: &'a Replicator) -> LiveLink<'a> {
        r.live_links.fetch_add(1, Ordering::SeqCst);
        LiveLink(r)
    }
}

impl Drop for LiveLink<'_> {
    fn drop(&mut self) {
        self.0.live_links.fetch_sub(1, Ordering::SeqCst);
        self.0.check_split_brain();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Replicator {
    /// A replicator over `log`, starting in `role`.
    pub fn new(
        cfg: ReplicatorConfig,
        log: Arc<TxLog>,
        staging: Arc<staging::Staging>,
        layout: Layout,
        store: Arc<dyn ReplicaStore>,
        observer: Arc<dyn ReplicationObserver>,
        role: Role,
    ) -> Arc<Replicator> {
        Arc::new(Replicator {
            cfg,
            log,
            layout,
            store,
            observer,
            role: watch::channel(role).0,
            staging,
            acked: watch::channel(0).0,
            applied: AtomicU64::new(0),
            applied_persisted: AtomicU64::new(0),
            peer: Mutex::new(None),
            split: AtomicBool::new(false),
            link_up: AtomicBool::new(false),
            last_lag_ms: AtomicU64::new(0),
            live_links: AtomicUsize::new(0),
            activated_at: Mutex::new(Instant::now()),
            released: AtomicBool::new(false),
        })
    }

    /// The log.
    pub fn log(&self) -> &Arc<TxLog> {
        &self.log
    }

    /// Publishing marks, the outbox and the sender's wake-up.
    pub fn staging(&self) -> &Arc<staging::Staging> {
        &self.staging
    }

    /// Current role.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// Watches role changes.
    pub fn watch_role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Changes and persists the role. `Leaving` is persisted as `passive`: a unit stopped
    /// while handing over comes back as the operator asked. A unit becoming active delivers
    /// only once [`Replicator::partner_released`] says so.
    pub fn set_role(&self, role: Role) -> Result<(), txlog::LogError> {
        let persisted = if role == Role::Leaving {
            Role::Passive
        } else {
            role
        };
        self.log.set_role(persisted.as_str())?;
        let was = self.role.send_replace(role);
        if role == Role::Active && was != Role::Active {
            *self.activated_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            self.released.store(false, Ordering::SeqCst);
        }
        if role == Role::Passive {
            self.staging.outbox().clear();
        }
        self.check_split_brain();
        Ok(())
    }

    /// Whether this active unit may deliver as far as its partner is concerned: the partner
    /// was heard passive since this unit became active (a unit handing over reports itself
    /// passive only once its last `DELETE`s are acknowledged here, so nothing it delivered is
    /// delivered again), or was not heard at all for [`PARTNER_GRACE`] (dead, or cut off),
    /// or is active too and loses the split-brain priority. Cheap: no I/O.
    pub fn partner_released(&self) -> bool {
        if self.role() != Role::Active {
            return false;
        }
        if self.released.load(Ordering::SeqCst) {
            return true;
        }
        let since = *self.activated_at.lock().unwrap_or_else(|p| p.into_inner());
        let (released, why) = match self.peer() {
            Some(p) if p.seen >= since => match p.role {
                Role::Passive => (true, "the partner is passive"),
                Role::Leaving => (false, ""),
                Role::Active => (
                    !self.loses_to(&p),
                    "the partner is active with a lower priority",
                ),
            },
            _ => (
                since.elapsed() >= PARTNER_GRACE,
                "the partner was not heard since this unit became active",
            ),
        };
        if released && !self.released.swap(true, Ordering::SeqCst) {
            tracing::info!(
                waited_ms = since.elapsed().as_millis() as u64,
                "delivery may start: {why}"
            );
        }
        released
    }

    /// Whether everything this unit logged has reached the partner: no action pending above
    /// what the partner acknowledged, none being published, no rebuild due.
    pub fn drained(&self) -> Result<bool, txlog::LogError> {
        if self.log.needs_rebuild() || self.staging.publishing_any() {
            return Ok(false);
        }
        let acked = *self.acked.borrow();
        Ok(self.log.pending_after(acked, 1)?.is_empty())
    }

    /// Tells the sender that actions were appended.
    pub fn notify(&self) {
        self.staging.notify();
    }

    /// Watches the highest sequence the partner acknowledged.
    pub fn watch_acked(&self) -> watch::Receiver<u64> {
        self.acked.subscribe()
    }

    /// The partner as last heard, if any.
    pub fn peer(&self) -> Option<PeerStatus> {
        self.peer.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Both units active on a live link, the partner heard active since this unit became active.
    pub fn split_brain(&self) -> bool {
        self.check_split_brain();
        self.split.load(Ordering::SeqCst)
    }

    /// Whether this node should hold delivery: split brain and we have the lower priority (ties:
    /// the lexically greater node name stands down).
    pub fn stand_down(&self) -> bool {
        self.split_brain() && self.peer().is_some_and(|p| self.loses_to(&p))
    }

    /// Whether `peer` wins over this unit when both are active.
    fn loses_to(&self, peer: &PeerStatus) -> bool {
        let me = (
            self.cfg.link.priority,
            std::cmp::Reverse(self.cfg.link.node.as_str()),
        );
        let them = (peer.priority, std::cmp::Reverse(peer.node.as_str()));
        me < them
    }

    /// Whether the sender's link is up.
    pub fn link_is_up(&self) -> bool {
        self.link_up.load(Ordering::SeqCst)
    }

    /// Lag of the last acknowledged action, ms.
    pub fn last_lag_ms(&self) -> u64 {
        self.last_lag_ms.load(Ordering::SeqCst)
    }

    fn heard(&self, node: &str, role: Role, priority: u32) {
        *self.peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(PeerStatus {
            node: node.to_string(),
            role,
            priority,
            seen: Instant::now(),
        });
        self.check_split_brain();
    }

    /// Split brain: a live link carrying two active roles, the partner's heard since this unit
    /// became active (a heartbeat from before that, of a unit that died since, is no claim).
    fn check_split_brain(&self) {
        let live = self.live_links.load(Ordering::SeqCst) > 0;
        let since = *self.activated_at.lock().unwrap_or_else(|p| p.into_inner());
        let peer_active = live
            && self.peer().is_some_and(|p| {
                p.role == Role::Active && p.seen >= since && p.seen.elapsed() < HEARTBEAT * 3
            });
        let split = peer_active && self.role() == Role::Active;
        if self.split.swap(split, Ordering::SeqCst) != split {
            if split {
                tracing::error!(
                    peer = ?self.peer().map(|p| p.node),
                    "SPLIT BRAIN: both units are active; the lower-priority one holds delivery until an operator resolves it"
                );
            } else {
                tracing::warn!("split brain resolved");
            }
            self.observer.split_brain(split);
        }
    }
}

pub(crate) use peer::within;

#[cfg(test)]
mod tests;
