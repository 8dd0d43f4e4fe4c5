//! The queue manager: takes due messages from the [`Queue`], runs the vscan stage, delivers to
//! next hops over reused SMTP connections, records each recipient's outcome durably in the
//! `.env`, retries with backoff, bounces permanent failures with a DSN, and removes finished
//! messages. Routing, per-destination limits, pooled connections and the SMTP transaction
//! itself are in `delivery/nexthop.rs`.
//!
//! Crash window, by design: between a next hop's `250` and the `.env` rewrite that records it, a
//! crash makes the message go out again after restart (at-least-once, like every MTA).

use crate::clock::now_ms;
use crate::config::Config;
use crate::ingest::sink::SpoolSink;
use crate::metrics::Metrics;
use crate::queue::Queue;
use dsn::Failure;
use filter::{StageOutcome, VscanStage};
use smtp::client::{ClientConfig, Connection};
use spool::{Envelope, Folder, Layout, MappedBody, MessageId, Part, RcptState};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use track::EventKind;

pub mod dsn;
mod nexthop;
use nexthop::{Hop, Routes};

/// Everything the queue manager needs.
pub struct Delivery {
    pub layout: Layout,
    pub queue: Arc<Queue>,
    pub sink: Arc<SpoolSink>,
    pub metrics: Arc<Metrics>,
    pub stage: VscanStage,
    /// Routes (with their TLS policy), retry schedule, queue lifetime and the filter policy:
    /// clustered settings, so they can change while the daemon runs; each attempt reads them
    /// once.
    pub policy: tokio::sync::watch::Receiver<Arc<DeliveryPolicy>>,
    pub client: ClientConfig,
    pub hostname: String,
    pub enabled: bool,
    pub concurrency: Arc<Semaphore>,
    pub per_destination_max: usize,
    per_destination: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// HA replication, when configured: holds delivery on a passive or standing-down node and
    /// learns of every message leaving the spool.
    pub ha: Option<Arc<hasync::Replicator>>,
    pool: Mutex<HashMap<Hop, Vec<(Instant, Connection)>>>,
    /// Removes delivered messages in groups, one directory fsync per group.
    remover: spool::remover::Remover,
    /// Messages in process, which a handover waits for.
    activity: Arc<crate::ha::handover::Activity>,
    /// The archive: a message leaves the spool only once it is archived.
    archiving: Option<Arc<crate::archiving::Archiving>>,
}

/// The parts of `[delivery]` that clustered settings may change live.
pub struct DeliveryPolicy {
    routes: Routes,
    retry_schedule: Vec<Duration>,
    lifetime: Duration,
    /// The filter policy: a scanner without a verdict lets mail through unscanned.
    scan_fail_open: bool,
    /// How soon a message whose scan failed is scanned again.
    scan_retry: Duration,
    /// Tell the sender of a quarantined message.
    notify_quarantine: bool,
    /// Journal addresses (lower case): archived, never delivered.
    journal: Vec<String>,
}

impl DeliveryPolicy {
    /// From a (validated) configuration.
    pub fn from_config(cfg: &Config) -> DeliveryPolicy {
        let d = &cfg.delivery;
        DeliveryPolicy {
            routes: Routes::from_config(cfg),
            retry_schedule: d
                .retry_schedule_secs
                .iter()
                .map(|&s| Duration::from_secs(s))
                .collect(),
            lifetime: Duration::from_secs(d.queue_lifetime_secs),
            scan_fail_open: cfg.filter.fail_open,
            scan_retry: Duration::from_secs(cfg.filter.retry_secs),
            notify_quarantine: cfg.filter.notify_sender,
            journal: cfg.archive.journal(),
        }
    }
}

/// How long a message waits (in the spool, delivered) for an archive that could not take it.
const ARCHIVE_RETRY: Duration = Duration::from_secs(15);

/// When the queue manager looks at a message again.
enum Next {
    /// Never: it left the spool (or was not there).
    Done,
    /// At this time, ms since the epoch.
    At(u64),
    /// When the next hop has a free connection slot: the message waits in the queue, holding
    /// none of the global slots that other destinations need.
    WhenFree(Hop),
}

/// What became of one recipient in one attempt.
#[derive(Clone)]
enum RcptResult {
    /// No transaction was started: the unit may no longer deliver (handover, stand-down).
    NotTried,
    /// No transaction was started: every connection slot of the next hop is taken.
    Busy,
    Delivered,
    Deferred(String),
    Failed(Failure),
}

impl Delivery {
    /// Assembles the manager.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &Config,
        layout: Layout,
        queue: Arc<Queue>,
        sink: Arc<SpoolSink>,
        metrics: Arc<Metrics>,
        stage: VscanStage,
        client: ClientConfig,
        policy: tokio::sync::watch::Receiver<Arc<DeliveryPolicy>>,
        ha: Option<Arc<hasync::Replicator>>,
        remover: spool::remover::Remover,
        activity: Arc<crate::ha::handover::Activity>,
        archiving: Option<Arc<crate::archiving::Archiving>>,
    ) -> Delivery {
        let d = &cfg.delivery;
        Delivery {
            layout,
            queue,
            sink,
            metrics,
            stage,
            policy,
            client,
            hostname: cfg.hostname.clone(),
            enabled: d.enabled,
            concurrency: Arc::new(Semaphore::new(d.concurrency_max)),
            per_destination_max: d.per_destination_max,
            per_destination: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            remover,
            activity,
            ha,
            archiving,
        }
    }

    /// Runs until `shutdown`: takes due messages while the concurrency limit allows.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if !self.enabled {
            tracing::warn!("delivery.enabled = false: mail stays queued");
            return;
        }
        if spool::failpoint::active("panic-in-queue-manager") {
            tokio::time::sleep(Duration::from_millis(500)).await;
            #[allow(clippy::panic)]
            {
                panic!("fail-point panic-in-queue-manager");
            }
        }
        let mut last_gauges = Instant::now() - Duration::from_secs(10);
        loop {
            if *shutdown.borrow() {
                return;
            }
            if self.held() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let free = self.concurrency.available_permits();
            for id in self.queue.take_due(now_ms(), free) {
                let Ok(permit) = self.concurrency.clone().acquire_owned().await else {
                    return;
                };
                let me = self.clone();
                let in_flight = self.activity.delivery();
                tokio::spawn(async move {
                    let _in_flight = in_flight;
                    match me.process(&id).await {
                        Next::Done => me.queue.finish(&id, None),
                        Next::At(due) => me.queue.finish(&id, Some(due)),
                        Next::WhenFree(hop) => {
                            let limit = me.destination_limit(&hop);
                            me.queue.finish_parked(&id, &hop.address, now_ms(), || {
                                limit.available_permits() > 0
                            });
                        }
                    }
                    drop(permit);
                    me.queue.wake.notify_one();
                });
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                self.update_gauges();
                last_gauges = Instant::now();
            }
            let wait = self
                .queue
                .next_due()
                .map(|due| Duration::from_millis(due.saturating_sub(now_ms())))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            tokio::select! {
                _ = self.queue.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Only an active unit whose partner has released it delivers; in a split brain the
    /// lower-priority unit holds too. See [`crate::ha::handover`].
    fn held(&self) -> bool {
        !crate::ha::handover::may_deliver(self.ha.as_ref())
    }

    /// `env` leaves the spool for good: see [`crate::lifecycle::Lifecycle::leaving`].
    fn log_leaving(&self, env: &Envelope) -> anyhow::Result<()> {
        let delivered = env
            .recipients
            .iter()
            .any(|x| x.state == RcptState::Delivered);
        self.sink.lifecycle.leaving(&env.id, delivered)
    }

    fn update_gauges(&self) {
        let now = now_ms();
        self.metrics.queue_scheduled.set(self.queue.len() as i64);
        self.metrics
            .queue_deferred
            .set(self.queue.deferred(now) as i64);
        let age = self
            .queue
            .oldest_arrival_micros()
            .map(|a| (now as f64 / 1000.0 - a as f64 / 1e6).max(0.0))
            .unwrap_or(0.0);
        self.metrics.oldest_message_age.set(age);
    }

    /// One step for one message; returns when to look at it again.
    async fn process(&self, id: &MessageId) -> Next {
        match self.process_inner(id).await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(id = %id, "queue manager: {e:#}");
                Next::At(now_ms() + 60_000)
            }
        }
    }

    async fn process_inner(&self, id: &MessageId) -> anyhow::Result<Next> {
        // Read where it most likely is; a look elsewhere only when it is not there. Recovery
        // read no envelope: this is the first look at a message found at startup, and one
        // whose file does not hold its envelope is set aside here.
        let mut read = None;
        for folder in Folder::SCHEDULED {
            match self.layout.read_envelope(folder, id) {
                Ok(env) => {
                    read = Some((folder, env));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    self.set_aside(id, folder, &format!("envelope unusable: {e}"))?;
                    return Ok(Next::Done);
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Removed meanwhile (an operator, or a duplicate schedule).
        let Some((folder, mut env)) = read else {
            return Ok(Next::Done);
        };
        if let spool::ScanState::Held(reason) = &env.scan {
            return self.hold_in_quarantine(folder, &env, reason).await;
        }
        if env.scan == spool::ScanState::Pending || folder == Folder::Vscan {
            let started = Instant::now();
            let policy = self.policy.borrow().clone();
            let outcome = match self
                .stage
                .run(folder, &mut env, policy.scan_fail_open)
                .await
            {
                Err(filter::StageError::Corrupt { detail, .. }) => {
                    let reason = format!("body unusable at the scan: {detail}");
                    self.set_aside(id, Folder::Vscan, &reason)?;
                    return Ok(Next::Done);
                }
                outcome => outcome?,
            };
            self.metrics
                .scan_seconds
                .observe(started.elapsed().as_secs_f64());
            let lifecycle = &self.sink.lifecycle;
            let (label, verdict) = match &outcome {
                StageOutcome::Clean => ("clean", "clean".to_string()),
                StageOutcome::Unscanned => ("unscanned", "unscanned".to_string()),
                StageOutcome::Quarantined(name) => {
                    ("infected", format!("infected: {name}; quarantined"))
                }
                StageOutcome::Retry(why) => ("error", format!("scan failed, retried: {why}")),
            };
            self.metrics.scan_verdicts.with_label_values(&[label]).inc();
            lifecycle
                .track()
                .event(id, track::EventKind::Scanned, verdict);
            match outcome {
                StageOutcome::Clean | StageOutcome::Unscanned => {}
                StageOutcome::Quarantined(name) => {
                    tracing::warn!(id = %id, virus = %name, "message quarantined");
                    if let Some(a) = &self.archiving {
                        // Kept in quarantine/ whatever happens here: nothing is lost.
                        if let Err(e) = a.ensure(&self.layout, Folder::Quarantine, &env).await {
                            tracing::error!(id = %id, "quarantined message not archived: {e}");
                        }
                    }
                    self.log_leaving(&env)?;
                    if policy.notify_quarantine && !env.sender.is_empty() {
                        let notice = dsn::quarantine_notice(&self.hostname, &env, &name);
                        if let Err(e) = self
                            .sink
                            .inject("", std::slice::from_ref(&env.sender), notice)
                            .await
                        {
                            tracing::error!(id = %id, "quarantine notice not spooled: {e}");
                        }
                    }
                    return Ok(Next::Done);
                }
                StageOutcome::Retry(why) => {
                    tracing::warn!(id = %id, error = %why, "scan failed; message waits in vscan/");
                    return Ok(Next::At(now_ms() + policy.scan_retry.as_millis() as u64));
                }
            }
        }
        if env.next_attempt_ms > now_ms() {
            return Ok(Next::At(env.next_attempt_ms));
        }
        // Archived while it is delivered: the two overlap, and only the removal waits for the
        // archive record (see `deliver`).
        let archived = self
            .archiving
            .as_ref()
            .map(|a| a.spawn_ensure(&self.layout, Folder::Spool, &env));
        self.deliver(env, archived).await
    }

    /// A message a milter quarantined before its `250` (the envelope says `scan held`, so a
    /// crash before this move changes nothing): into `quarantine/`, archived, and gone from
    /// the partner, as the scan stage does with a virus; its recipients may release it.
    async fn hold_in_quarantine(
        &self,
        folder: Folder,
        env: &spool::Envelope,
        reason: &str,
    ) -> anyhow::Result<Next> {
        let id = env.id.clone();
        let lifecycle = self.sink.lifecycle.clone();
        tokio::task::spawn_blocking(move || {
            filter::Mover::move_pair(lifecycle.as_ref(), &id, folder, Folder::Quarantine)
        })
        .await??;
        tracing::warn!(id = %env.id, reason, "message quarantined by a milter");
        self.sink.lifecycle.track().event(
            &env.id,
            track::EventKind::Scanned,
            format!("held by a milter: {reason}; quarantined"),
        );
        if let Some(a) = &self.archiving {
            if let Err(e) = a.ensure(&self.layout, Folder::Quarantine, env).await {
                tracing::error!(id = %env.id, "quarantined message not archived: {e}");
            }
        }
        self.log_leaving(env)?;
        Ok(Next::Done)
    }

    /// Delivers to the pending recipients; once none is left, removes the message — after its
    /// archive record is durable. An archive that cannot write holds the removal back: the
    /// recipients' outcomes are recorded in the `.env` (so nothing is delivered again) and the
    /// message waits in the spool, counted and said in /readyz, while mail keeps coming in.
    async fn deliver(
        &self,
        mut env: Envelope,
        archived: Option<tokio::task::JoinHandle<Result<(), String>>>,
    ) -> anyhow::Result<Next> {
        let Some(body) = self.open_body(&env)? else {
            if let (Some(task), Some(a)) = (archived, &self.archiving) {
                // It could not read the body either; the message is not waiting for it.
                let _ = task.await;
                a.forget(&env.id);
            }
            return Ok(Next::Done);
        };
        let policy = self.policy.borrow().clone();
        let (results, busy) = self.attempt(&env, body.bytes(), &policy).await;
        drop(body);
        if !results.is_empty()
            && results
                .iter()
                .all(|(_, r)| matches!(r, RcptResult::NotTried | RcptResult::Busy))
        {
            // Nothing happened: no attempt to record. Looked at again when the busy next hop
            // has a free slot, or once delivery may resume.
            return Ok(match busy {
                Some(hop) => Next::WhenFree(hop),
                None => Next::At(now_ms() + 1000),
            });
        }
        let (mut failures, mut deferred) = self.record(&mut env, results);
        env.attempts += 1;
        failures.extend(expire_if_too_old(&mut env, &mut deferred, policy.lifetime));
        if !failures.is_empty() {
            self.bounce(&env, &failures).await?;
        }
        let archive_failed = self.archive_outcome(&env.id, archived).await;
        let all_final = env.recipients.iter().all(|r| r.state != RcptState::Pending);
        match (all_final, archive_failed) {
            (true, Some(why)) => self.hold_for_archive(env, &why).await,
            (true, None) => self.remove_finished(&env).await,
            (false, _) => self.reschedule(env, deferred, busy, &policy).await,
        }
    }

    /// The message's body, checked against its envelope; one that cannot be used is set aside
    /// in `corrupt/` (`None`).
    fn open_body(&self, env: &Envelope) -> anyhow::Result<Option<MappedBody>> {
        let body_path = self.layout.path(Folder::Spool, &env.id, Part::Body);
        match MappedBody::open_verified(&body_path, env.body_len, &env.body_sha256) {
            Ok(b) => Ok(Some(b)),
            Err(e) => {
                self.set_aside(
                    &env.id,
                    Folder::Spool,
                    &format!("body unusable at delivery: {e}"),
                )?;
                Ok(None)
            }
        }
    }

    /// Sets a message that cannot be used aside in `corrupt/`, saying why.
    fn set_aside(&self, id: &MessageId, folder: Folder, reason: &str) -> anyhow::Result<()> {
        tracing::error!(id = %id, %reason, "moved to corrupt/");
        self.sink.lifecycle.set_aside(id, folder, reason)
    }

    /// One attempt for every pending recipient, grouped by next hop: each recipient's result
    /// (tracked as it comes), and a next hop that was busy.
    async fn attempt(
        &self,
        env: &Envelope,
        body: &[u8],
        policy: &DeliveryPolicy,
    ) -> (Vec<(usize, RcptResult)>, Option<Hop>) {
        let mut groups: BTreeMap<Option<Hop>, Vec<usize>> = BTreeMap::new();
        let mut results: Vec<(usize, RcptResult)> = Vec::new();
        for (i, r) in env.recipients.iter().enumerate() {
            if r.state == RcptState::Pending
                && policy
                    .journal
                    .iter()
                    .any(|j| j.eq_ignore_ascii_case(&r.address))
            {
                // A journal address: the archive is its destination (the message is removed
                // only once its archive record is durable).
                self.sink.lifecycle.track().event(
                    &env.id,
                    EventKind::Delivered,
                    format!("{} journaled: archived, not delivered", r.address),
                );
                results.push((i, RcptResult::Delivered));
            } else if r.state == RcptState::Pending {
                groups
                    .entry(policy.routes.lookup(&r.address).cloned())
                    .or_default()
                    .push(i);
            }
        }
        let mut busy = None;
        for (hop, idx) in groups {
            if self.held() {
                results.extend(idx.into_iter().map(|i| (i, RcptResult::NotTried)));
                continue;
            }
            let rcpts: Vec<&str> = idx
                .iter()
                .map(|&i| env.recipients[i].address.as_str())
                .collect();
            let outcome = match &hop {
                None => vec![RcptResult::Deferred("no route to the recipient's domain (set delivery.default_next_hop or a route)".into()); idx.len()],
                Some(hop) => self.send_to(hop, env, &rcpts, body).await,
            };
            if outcome.iter().any(|r| matches!(r, RcptResult::Busy)) {
                busy = hop.clone();
            }
            let via = hop.as_ref().map_or("no route", |h| h.address.as_str());
            for (&i, r) in idx.iter().zip(&outcome) {
                let rcpt = &env.recipients[i].address;
                let (ev, detail) = match r {
                    RcptResult::Delivered => (EventKind::Delivered, format!("{rcpt} via {via}")),
                    RcptResult::Deferred(why) => {
                        (EventKind::Deferred, format!("{rcpt} via {via}: {why}"))
                    }
                    RcptResult::Failed(f) => (
                        EventKind::Failed,
                        format!("{rcpt} via {via}: {}", f.diagnostic),
                    ),
                    RcptResult::NotTried | RcptResult::Busy => continue,
                };
                self.sink.lifecycle.track().event(&env.id, ev, detail);
            }
            results.extend(idx.into_iter().zip(outcome));
        }
        (results, busy)
    }

    /// Records each recipient's result in the envelope (not yet on disk) and the metrics:
    /// the permanent failures, and the last reason for a deferral.
    fn record(
        &self,
        env: &mut Envelope,
        results: Vec<(usize, RcptResult)>,
    ) -> (Vec<Failure>, Option<String>) {
        let mut failures = Vec::new();
        let mut deferred = None;
        for (i, r) in results {
            let rcpt = &mut env.recipients[i];
            match r {
                RcptResult::NotTried | RcptResult::Busy => {}
                RcptResult::Delivered => {
                    rcpt.state = RcptState::Delivered;
                    self.metrics
                        .delivery_attempts
                        .with_label_values(&["delivered"])
                        .inc();
                }
                RcptResult::Deferred(why) => {
                    self.metrics
                        .delivery_attempts
                        .with_label_values(&["deferred"])
                        .inc();
                    tracing::info!(id = %env.id, rcpt = %rcpt.address, reason = %why, "deferred");
                    deferred = Some(why);
                }
                RcptResult::Failed(f) => {
                    rcpt.state = RcptState::Failed;
                    self.metrics
                        .delivery_attempts
                        .with_label_values(&["failed"])
                        .inc();
                    tracing::info!(id = %env.id, rcpt = %rcpt.address, reason = %f.diagnostic, "failed permanently");
                    failures.push(f);
                }
            }
        }
        (failures, deferred)
    }

    /// Waits for the archive's record of the message, made while it was delivered; answers
    /// why it failed, if it did.
    async fn archive_outcome(
        &self,
        id: &MessageId,
        archived: Option<tokio::task::JoinHandle<Result<(), String>>>,
    ) -> Option<String> {
        let task = archived?;
        let failed = task.await.map_err(|e| e.to_string()).and_then(|r| r).err();
        if failed.is_none() {
            self.sink
                .lifecycle
                .track()
                .event(id, track::EventKind::Archived, String::new());
        }
        failed
    }

    /// Every recipient is done but the archive failed: the message stays in the spool until it
    /// is archived.
    async fn hold_for_archive(&self, mut env: Envelope, why: &str) -> anyhow::Result<Next> {
        tracing::warn!(id = %env.id, "archive failed: the message stays in the spool until it is archived: {why}");
        env.next_attempt_ms = now_ms() + ARCHIVE_RETRY.as_millis() as u64;
        let next = env.next_attempt_ms;
        let layout = self.layout.clone();
        tokio::task::spawn_blocking(move || layout.rewrite_envelope(Folder::Spool, &env)).await??;
        Ok(Next::At(next))
    }

    /// Every recipient is done and the message archived: its `DELETE` is logged, then its files
    /// go (the group remover), then it is counted out.
    async fn remove_finished(&self, env: &Envelope) -> anyhow::Result<Next> {
        self.log_leaving(env)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.remover.remove(
            env.id.clone(),
            Folder::Spool,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await
            .map_err(|_| anyhow::anyhow!("spool remover stopped"))??;
        self.message_removed(env);
        Ok(Next::Done)
    }

    /// Recipients remain: the next attempt by the retry schedule (or as soon as a busy next
    /// hop has a slot), written in the envelope.
    async fn reschedule(
        &self,
        mut env: Envelope,
        deferred: Option<String>,
        busy: Option<Hop>,
        policy: &DeliveryPolicy,
    ) -> anyhow::Result<Next> {
        let step = (env.attempts as usize)
            .saturating_sub(1)
            .min(policy.retry_schedule.len().saturating_sub(1));
        // Recipients of a busy next hop were not tried: they go as soon as it has a slot.
        env.next_attempt_ms = if busy.is_some() {
            0
        } else {
            now_ms()
                + policy
                    .retry_schedule
                    .get(step)
                    .map_or(60_000, |d| d.as_millis() as u64)
        };
        env.last_error = deferred;
        let next = env.next_attempt_ms;
        let layout = self.layout.clone();
        tokio::task::spawn_blocking(move || layout.rewrite_envelope(Folder::Spool, &env)).await??;
        Ok(match busy {
            Some(hop) => Next::WhenFree(hop),
            None => Next::At(next),
        })
    }

    /// THE event "a message left the spool for good" (every recipient delivered or failed), after
    /// its files are gone; [`Delivery::log_leaving`] has already logged the replication DELETE.
    fn message_removed(&self, env: &Envelope) {
        self.sink.lifecycle.removed(&env.id, Folder::Spool);
        let delivered = env
            .recipients
            .iter()
            .filter(|r| r.state == RcptState::Delivered)
            .count();
        tracing::info!(id = %env.id, delivered, failed = env.recipients.len() - delivered, "message removed from the spool");
        self.sink.lifecycle.track().event(
            &env.id,
            track::EventKind::Removed,
            format!(
                "{delivered} delivered, {} failed",
                env.recipients.len() - delivered
            ),
        );
    }

    async fn bounce(&self, env: &Envelope, failures: &[Failure]) -> anyhow::Result<()> {
        if env.sender.is_empty() {
            // Never bounce a bounce: RFC 5321 §6.1.
            tracing::warn!(id = %env.id, failed = failures.len(), "null-sender message failed; dropped without a bounce");
            return Ok(());
        }
        let path = self.layout.path(Folder::Spool, &env.id, Part::Body);
        let original = MappedBody::open_verified(&path, env.body_len, &env.body_sha256)?;
        let report = dsn::build(&self.hostname, env, original.bytes(), failures);
        let dsn_id = self
            .sink
            .inject("", std::slice::from_ref(&env.sender), report)
            .await
            .map_err(|e| anyhow::anyhow!("spool the bounce for {}: {e}", env.id))?;
        self.metrics.bounces.inc();
        tracing::info!(id = %env.id, dsn = %dsn_id, to = %env.sender, "bounce generated");
        self.sink.lifecycle.track().event(
            &env.id,
            track::EventKind::Bounced,
            format!("DSN {dsn_id} to <{}>", env.sender),
        );
        Ok(())
    }
}

/// Past its queue lifetime, a message still deferred fails for its pending recipients: their
/// failures (the last deferral's reason in each), for the bounce.
fn expire_if_too_old(
    env: &mut Envelope,
    deferred: &mut Option<String>,
    lifetime: Duration,
) -> Vec<Failure> {
    let age = Duration::from_millis(now_ms().saturating_sub(env.arrived_ms));
    if deferred.is_none() || age < lifetime {
        return Vec::new();
    }
    let why = format!(
        "queue lifetime exceeded; last error: {}",
        deferred.take().unwrap_or_default()
    );
    env.recipients
        .iter_mut()
        .filter(|r| r.state == RcptState::Pending)
        .map(|r| {
            r.state = RcptState::Failed;
            Failure {
                recipient: r.address.clone(),
                diagnostic: why.clone(),
                remote: None,
            }
        })
        .collect()
}
