//! The bridge from SMTP to the spool: each DATA becomes a `PendingBody` and an `Envelope`,
//! committed by the group-commit writer; the `250` waits for the writer's completion.

use crate::clock::now_ms;
use crate::metrics::Metrics;
use bytes::Bytes;
use smtp::{BodySink, Sink, SinkError, Transaction};
use spool::writer::CommitRequest;
use spool::{
    BodyType, CommitError, Envelope, IdGenerator, Layout, MessageId, PendingBody, RcptState,
    Recipient, SpoolWriter,
};
use std::sync::Arc;

/// Accepts messages into the spool.
pub struct SpoolSink {
    /// Paths of the state directory.
    pub layout: Layout,
    /// Id source for this node.
    pub ids: IdGenerator,
    /// The group-commit writer.
    pub writer: Arc<SpoolWriter>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Our SMTP host name.
    pub hostname: String,
    /// Our node name.
    pub node: String,
    /// Bodies larger than this stream to `tmp/`.
    pub spill_bytes: usize,
    /// Minimum free space on the spool file system.
    pub free_bytes_min: u64,
    /// Replication, when configured.
    pub replicator: Option<Arc<hasync::Replicator>>,
    /// Sync replication: wait for the partner before `250`.
    pub sync: Option<SyncPolicy>,
    /// Counts, schedules and removes messages (see [`crate::lifecycle`]).
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// Transactions in flight, which a handover waits for.
    pub activity: Arc<crate::ha::handover::Activity>,
    /// The milter chain before the `250` (`[[filter.milter]]`), in order.
    pub milters: Vec<Arc<filter::chain::MilterSpec>>,
}

/// `ha.replication = "sync"` settings.
pub struct SyncPolicy {
    /// Longest wait for the partner's acknowledgement.
    pub timeout: std::time::Duration,
    /// Withdraw and answer 451 (true) or accept as async (false) when the partner is down/late.
    pub reject: bool,
}

impl SpoolSink {
    /// In sync mode, waits until the partner acknowledged `seq`; returns false if it did not
    /// (partner down, or not within the timeout).
    async fn partner_confirmed(&self, seq: u64) -> bool {
        let (Some(policy), Some(r)) = (&self.sync, self.replicator.as_ref()) else {
            return true;
        };
        if r.role() != hasync::proto::Role::Active || !r.link_is_up() {
            return false;
        }
        let mut acked = r.watch_acked();
        let confirmed = tokio::time::timeout(policy.timeout, acked.wait_for(|&a| a >= seq)).await;
        matches!(confirmed, Ok(Ok(_)))
    }

    /// Takes back a message whose partner acknowledgement never came (sync mode, `reject`):
    /// logs its `DELETE` first, then removes it, so neither unit keeps it. (Not counted in the
    /// gauges yet, so not uncounted either.)
    fn withdraw(&self, id: &MessageId) -> anyhow::Result<()> {
        self.lifecycle.withdraw(id)
    }
}

/// Free bytes for unprivileged users on the file system holding `path`.
fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Where a message comes from, for its envelope and its `Received:` header.
struct Origin<F: FnOnce(&MessageId, &str) -> String> {
    client: String,
    helo: String,
    received: F,
}

impl SpoolSink {
    /// A new message and its `Received:` header (pushed by the caller, so the milters see it
    /// first too).
    fn start<F: FnOnce(&MessageId, &str) -> String>(
        self: &Arc<Self>,
        origin: Origin<F>,
        sender: &str,
        recipients: &[String],
        eight_bit: bool,
        smtputf8: bool,
    ) -> (SpoolBody, Bytes) {
        let id = self.ids.next_id();
        let received = (origin.received)(&id, &self.hostname);
        let envelope = Envelope {
            id: id.clone(),
            origin: self.node.clone(),
            arrived_ms: now_ms(),
            client: origin.client,
            helo: origin.helo,
            sender: sender.to_string(),
            body_type: if eight_bit {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8,
            recipients: recipients
                .iter()
                .map(|r| Recipient {
                    address: r.clone(),
                    state: RcptState::Pending,
                })
                .collect(),
            body_len: 0,
            body_sha256: [0; 32],
            attempts: 0,
            next_attempt_ms: 0,
            scan: Default::default(),
            last_error: None,
        };
        let body = SpoolBody {
            sink: self.clone(),
            pending: PendingBody::new(self.layout.clone(), id, self.spill_bytes),
            envelope,
            head: Vec::new(),
            screening: None,
        };
        (body, Bytes::from(received))
    }

    /// Counts, logs and tracks what each milter did with message `id`.
    fn milters_reported(&self, id: &MessageId, reports: &[filter::chain::Report]) {
        use filter::chain::Action;
        for r in reports {
            let action = r.action.as_str();
            self.metrics
                .milter_actions
                .with_label_values(&[r.milter.as_str(), action])
                .inc();
            if r.action != Action::NotAsked {
                self.metrics
                    .milter_seconds
                    .with_label_values(&[r.milter.as_str()])
                    .observe(r.seconds);
            }
            if r.action != Action::Accept || !r.detail.is_empty() {
                self.lifecycle.track().event(
                    id,
                    track::EventKind::Milter,
                    format!("{}: {action} {}", r.milter, r.detail)
                        .trim_end()
                        .to_string(),
                );
            }
            if !matches!(r.action, Action::Accept | Action::NotAsked) {
                tracing::info!(id = %id, milter = %r.milter, action, detail = %r.detail, "milter verdict");
            }
        }
    }

    /// Spools a locally generated message (a bounce) the same durable way as SMTP mail.
    pub async fn inject(
        self: &Arc<Self>,
        sender: &str,
        recipients: &[String],
        body: Vec<u8>,
    ) -> Result<String, SinkError> {
        let origin = Origin {
            client: "127.0.0.1".into(),
            helo: "localhost".into(),
            received: |id: &MessageId, host: &str| {
                format!(
                    "Received: by {host} (Spoolpair) id {id};\r\n\t{}\r\n",
                    chrono::Utc::now().to_rfc2822()
                )
            },
        };
        let (mut b, received) = self.start(origin, sender, recipients, false, false);
        b.push(received).await?;
        b.push(Bytes::from(body)).await?;
        b.commit().await
    }
}

impl Sink for SpoolSink {
    type Body = SpoolBody;

    fn check_capacity(&self, declared_bytes: u64) -> Result<(), SinkError> {
        match free_bytes(self.layout.root()) {
            Ok(free) if free < self.free_bytes_min.saturating_add(declared_bytes) => Err(
                SinkError::Full(format!("{free} bytes free, below spool.free_bytes_min")),
            ),
            Ok(_) => Ok(()),
            Err(e) => Err(SinkError::Temporary(format!("statvfs on the spool: {e}"))),
        }
    }

    async fn begin(self: &Arc<Self>, tx: &Transaction<'_>) -> Result<SpoolBody, SinkError> {
        let protocol = match (tx.esmtp, tx.tls) {
            (true, true) => "ESMTPS",
            (true, false) => "ESMTP",
            (false, true) => "SMTPS",
            (false, false) => "SMTP",
        };
        let for_clause = match tx.recipients {
            [only] => format!("\r\n\tfor <{only}>"),
            _ => String::new(),
        };
        let origin = Origin {
            client: tx.peer.ip().to_string(),
            helo: tx.helo.to_string(),
            received: |id: &MessageId, host: &str| {
                format!(
                    "Received: from {} ({})\r\n\tby {host} (Spoolpair) with {protocol} id {id}{for_clause};\r\n\t{}\r\n",
                    tx.helo,
                    tx.peer.ip(),
                    chrono::Utc::now().to_rfc2822(),
                )
            },
        };
        let (mut body, received) =
            self.start(origin, tx.sender, tx.recipients, tx.eight_bit, tx.smtputf8);
        if !self.milters.is_empty() {
            let id = body.envelope.id.to_string();
            let ctx = filter::chain::Context {
                queue_id: &id,
                hostname: &self.hostname,
                client: tx.peer,
                helo: tx.helo,
                trusted: tx.trusted,
                sender: tx.sender,
                recipients: tx.recipients,
            };
            let screening = filter::chain::Screening::begin(&self.milters, &ctx).await;
            if let Some(refusal) = screening.refusal() {
                let reports = screening.abort().await;
                self.milters_reported(&body.envelope.id, &reports);
                body.pending.discard();
                return Err(refused(refusal));
            }
            body.screening = Some(screening);
        }
        body.push(received).await?;
        Ok(body)
    }

    fn accepting(&self) -> bool {
        self.replicator
            .as_ref()
            .is_none_or(|r| r.role() == hasync::proto::Role::Active)
    }

    fn replied(&self, code: u16) {
        self.metrics
            .smtp_replies
            .with_label_values(&[code.to_string().as_str()])
            .inc();
    }
}

/// One message on its way into the spool.
pub struct SpoolBody {
    sink: Arc<SpoolSink>,
    pending: PendingBody,
    envelope: Envelope,
    /// The first bytes, where the Message-ID header is looked for (message tracking).
    head: Vec<u8>,
    /// The milters' conversation about it, when there are milters.
    screening: Option<filter::chain::Screening>,
}

/// A milter chain's reject or tempfail as the SMTP reply.
fn refused(v: filter::chain::Verdict) -> SinkError {
    use filter::chain::Verdict;
    match v {
        Verdict::Reject(code, text) | Verdict::Tempfail(code, text) => {
            SinkError::Refused { code, text }
        }
        // Not refusals: never passed here.
        Verdict::Accept | Verdict::Discard | Verdict::Quarantine(_) => SinkError::Refused {
            code: 451,
            text: "4.7.1 Service unavailable - try again later".into(),
        },
    }
}

/// Bytes of a message's start kept for its Message-ID.
const HEAD_BYTES: usize = 16 << 10;

fn commit_error(e: CommitError) -> SinkError {
    match e {
        CommitError::DiskFull(e) => SinkError::Full(e.to_string()),
        other => SinkError::Temporary(other.to_string()),
    }
}

impl BodySink for SpoolBody {
    async fn push(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        if self.head.len() < HEAD_BYTES {
            let take = chunk.len().min(HEAD_BYTES - self.head.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        let will_touch_disk = self.pending.len() as usize + chunk.len() >= self.sink.spill_bytes;
        if let Some(s) = self.screening.as_mut() {
            s.push(&chunk).await;
        }
        let pending = &mut self.pending;
        blocking_if(will_touch_disk, || pending.push(chunk)).map_err(|e| commit_error(e.into()))
    }

    async fn commit(self) -> Result<String, SinkError> {
        let SpoolBody {
            sink,
            mut pending,
            mut envelope,
            head,
            screening,
        } = self;
        if let Some(screening) = screening {
            let header_len = screening.header_len();
            let outcome = screening.end().await;
            sink.milters_reported(&envelope.id, &outcome.reports);
            match apply_outcome(&mut pending, &mut envelope, header_len, outcome) {
                Ok(Kept::Yes) => {}
                Ok(Kept::Discarded) => {
                    pending.discard();
                    tracing::info!(id = %envelope.id, "message discarded by a milter");
                    return Ok(envelope.id.to_string());
                }
                Err(e) => {
                    pending.discard();
                    return Err(e);
                }
            }
        }
        // Counted from the end of data, not from DATA: a handover waits for commits that may
        // end in a 250, never for a client that stalls (or whose address moved to the
        // partner) mid-DATA. Counted before the role is read, so a handover that has begun
        // either waits for this commit or this commit sees the unit leaving.
        let _in_flight = sink.activity.transaction();
        if !sink.accepting() {
            return Err(SinkError::Temporary(
                "this unit is handing over to its partner; try again".into(),
            ));
        }
        let (body, len, sha) = pending.finish();
        envelope.body_len = len;
        envelope.body_sha256 = sha;
        let id = envelope.id.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = CommitRequest {
            id: id.clone(),
            envelope: envelope.encode(),
            body,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
            replicate: true,
        };
        // `submit` blocks only when 4096 requests already wait for the disk.
        sink.writer.submit(req);
        match rx.await {
            Ok(Ok(receipt)) => {
                if let Some(seq) = receipt.log_seq.filter(|_| sink.sync.is_some()) {
                    if !sink.partner_confirmed(seq).await {
                        let reject = sink.sync.as_ref().is_some_and(|p| p.reject);
                        if reject {
                            sink.metrics.ha_sync_rejected.inc();
                            tracing::warn!(id = %id, "sync replication: partner did not confirm; message withdrawn");
                            if let Err(e) = sink.withdraw(&id) {
                                tracing::error!(id = %id, "withdraw after sync timeout: {e:#}");
                            }
                            return Err(SinkError::Temporary(
                                "partner did not confirm the replica".into(),
                            ));
                        }
                        sink.metrics.ha_sync_fallbacks.inc();
                    }
                }
                sink.metrics.accepted_messages.inc();
                sink.metrics.accepted_bytes.inc_by(len);
                sink.lifecycle.accepted(&id);
                sink.lifecycle.track().event_with(
                    &id,
                    track::EventKind::Accepted,
                    format!("client={} size={len}", envelope.client),
                    crate::lifecycle::tracked(&envelope, &head),
                );
                tracing::info!(
                    id = %id,
                    from = %format_args!("<{}>", envelope.sender),
                    nrcpt = envelope.recipients.len(),
                    size = len,
                    client = %envelope.client,
                    "message accepted"
                );
                Ok(id.to_string())
            }
            Ok(Err(e)) => {
                tracing::error!(id = %id, error = %e, "message not committed");
                Err(commit_error(e))
            }
            Err(_) => Err(SinkError::Temporary("spool writer stopped".into())),
        }
    }

    fn abort(self) {
        tracing::debug!(id = %self.envelope.id, "message aborted before commit");
        self.pending.discard();
    }
}

/// Whether a message the milters let through is spooled.
enum Kept {
    Yes,
    Discarded,
}

/// Applies the milter chain's outcome to a message before its commit: the header changes to
/// the bytes (so the spool, the partner and the archive hold the same), the envelope's
/// changes, a quarantine as the envelope's `scan held`; a reject or tempfail as the reply.
fn apply_outcome(
    pending: &mut PendingBody,
    envelope: &mut Envelope,
    header_len: Option<u64>,
    outcome: filter::chain::Outcome,
) -> Result<Kept, SinkError> {
    use filter::chain::Verdict;
    match outcome.verdict {
        Verdict::Reject(..) | Verdict::Tempfail(..) => return Err(refused(outcome.verdict)),
        Verdict::Discard => return Ok(Kept::Discarded),
        Verdict::Quarantine(reason) => envelope.scan = spool::ScanState::Held(reason),
        Verdict::Accept => {}
    }
    if !outcome.edits.is_empty() {
        let head_len = header_len.unwrap_or(pending.len());
        let edits = outcome.edits;
        blocking_if(true, || {
            pending.replace_head(head_len, |h| filter::headers::apply(h, &edits))
        })
        .map_err(|e| commit_error(e.into()))?;
    }
    if let Some(sender) = outcome.sender {
        envelope.sender = sender;
    }
    envelope.recipients.retain(|r| {
        !outcome
            .remove_recipients
            .iter()
            .any(|x| x.eq_ignore_ascii_case(&r.address))
    });
    for address in outcome.add_recipients {
        if !envelope
            .recipients
            .iter()
            .any(|r| r.address.eq_ignore_ascii_case(&address))
        {
            envelope.recipients.push(Recipient {
                address,
                state: RcptState::Pending,
            });
        }
    }
    if envelope.recipients.is_empty() {
        // Every recipient removed: nothing to deliver, as a discard.
        return Ok(Kept::Discarded);
    }
    Ok(Kept::Yes)
}

/// Runs file work from an async task: told to the runtime (`block_in_place`, so other tasks
/// move to another worker) when `touches_disk` and the runtime has other workers; else at once.
fn blocking_if<T>(touches_disk: bool, f: impl FnOnce() -> T) -> T {
    if touches_disk && in_multi_thread_runtime() {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

fn in_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        .unwrap_or(false)
}
