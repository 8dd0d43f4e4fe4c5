//! The daemon's side of the archive: opening it from `[archive]`, archiving a message once it
//! has a scan verdict (before it may be delivered, so nothing leaves the spool unarchived),
//! holding a message back while the archive cannot write, the mirror copiers and listener, and
//! the archive's gauges. What is stored and how is the `archive` crate's business.

use crate::config::{ArchiveConfig, Config};
use crate::metrics::Metrics;
use anyhow::{Context, Result};
use archive::mirror::{PeerStats, ReceiverStats};
use archive::{Archive, Incoming};
use sha2::{Digest, Sha256};
use spool::{Envelope, Folder, Layout, MappedBody, MessageId, Part, ScanState};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often retention runs by itself (when `retention_days` is set) and gauges refresh.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
const GAUGES_EVERY: Duration = Duration::from_secs(2);
/// Segments whose live share falls below this are rewritten after a retention pass.
pub const COMPACT_LIVE_PERCENT: u32 = 50;

/// The archive as the daemon runs it.
pub struct Archiving {
    /// The store and index.
    pub archive: Arc<Archive>,
    /// Archive quarantined messages too.
    pub quarantined: bool,
    /// Keep items this many days (0: for ever): a clustered setting, so it can change while
    /// the daemon runs.
    retention_days: tokio::sync::watch::Receiver<u64>,
    /// Messages waiting because the archive could not take them.
    waiting: Mutex<HashSet<MessageId>>,
    /// The last failure, until an archive write succeeds again.
    failing: Mutex<Option<String>>,
    /// Copiers to each mirror peer.
    pub mirrors: Vec<(String, Arc<PeerStats>)>,
    /// The receiving side, when `archive.listen` is set.
    pub received: Arc<ReceiverStats>,
    wake: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
    /// Archive writes in flight from the async side: each holds a blocking thread, and a backlog
    /// drained at full speed must not turn into hundreds of threads waiting on one catalog.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The file of the key that signs the archive's checkpoints.
    signing_key_file: std::path::PathBuf,
    /// Where the archive's keyring came from (a file, or the environment), when it has one.
    keyring_source: Option<String>,
    /// Whether new records are sealed.
    encryption: bool,
    /// Imported messages larger than this are refused (`smtp.message_bytes_max`).
    import_size_max: u64,
    /// This unit's node name (the origin of imported items).
    node: String,
    /// Journal addresses (lower case): what is sent to them is archived as `archive::journal`
    /// reads it.
    journal: Vec<String>,
    /// The record of who looked (`evidence::audit`): one entry per request that reads or
    /// changes archive content, synced before the request is answered.
    audit: Mutex<evidence::audit::AuditLog>,
    /// Where the audit log is.
    pub audit_dir: std::path::PathBuf,
    /// Each mirror peer's address and link settings, for asking it the checkpoints it keeps.
    mirror_links: Mutex<Vec<(std::net::SocketAddr, peer::link::LinkConfig)>>,
}

/// Archive writes started at once from the async side; the catalog takes one writer at a time,
/// so more only add threads.
const IN_FLIGHT_MAX: usize = 8;

/// The verdict as the archive records it.
fn verdict(scan: &ScanState) -> String {
    match scan {
        ScanState::Pending => "pending".into(),
        ScanState::Clean => "clean".into(),
        ScanState::Unscanned => "unscanned".into(),
        ScanState::Infected(name) => format!("infected: {name}"),
        ScanState::Held(reason) => format!("held: {reason}"),
    }
}

/// `--check-config`: whether the start would find the object store's prefix this archive's (the
/// manifest there against the catalog on disk, read-only, and `adopt`); an error names the key.
pub fn check_prefix(cfg: &Config, o: &crate::config::ObjectStoreToml) -> Result<()> {
    let store = o.resolve()?;
    let remote = archive::remote::Remote::new(&store)?;
    let manifest = remote.manifest()?;
    let (ours, writer, holds_items) =
        archive::store::peek_identity(&cfg.archive.dir(&cfg.state_dir))?;
    let adopt = o.adopt.as_deref().and_then(archive::ArchiveId::parse);
    archive::identity::check_before_start(ours, writer, holds_items, adopt, manifest.as_ref())
        .map_err(|why| {
            crate::config::Misconfigured(format!(
                "key `archive.object_store.prefix`: prefix {:?} of the bucket: {why}",
                remote.prefix()
            ))
            .into()
        })
}

/// Asks the object store whether it takes these credentials: an error when it refuses them
/// (a configuration error), `Some(why)` when it does not answer (not one: it may come back).
pub fn probe_object_store(store: &archive::ObjectStoreConfig) -> Result<Option<String>> {
    let remote = archive::remote::Remote::new(store)?;
    match remote.probe() {
        archive::Probe::Ok => Ok(None),
        archive::Probe::Refused(why) => Err(crate::config::Misconfigured(format!(
            "key `archive.object_store`: {} refused bucket {:?} with access key {:?}: {why}",
            store.endpoints.join(", "),
            store.bucket,
            store.access_key_id
        ))
        .into()),
        archive::Probe::Unreachable(why) => Ok(Some(why)),
    }
}

/// A path an admin request gives the daemon to read or write: it must be absolute (the
/// daemon's working directory is not the asker's).
fn from_root(p: &str) -> Result<&std::path::Path, String> {
    let path = std::path::Path::new(p);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(format!(
            "{p:?}: give an absolute path (the daemon reads and writes it)"
        ))
    }
}

/// The environment variable that may hold the archive's keyring (its text) instead of a file.
pub const KEYRING_ENV: &str = "SPOOLD_ARCHIVE_KEYRING";

/// The archive's keyring: from the environment, else the file (made there when encryption is
/// on and there is none yet); `None` when encryption is off and there is none.
fn load_keyring(
    a: &crate::config::ArchiveConfig,
    state_dir: &std::path::Path,
) -> Result<Option<archive::Encryption>> {
    use crate::config::Misconfigured;
    if let Ok(text) = std::env::var(KEYRING_ENV) {
        let keyring = archive::seal::Keyring::parse(&text, KEYRING_ENV)
            .map_err(|e| Misconfigured(format!("environment variable {KEYRING_ENV}: {e}")))?;
        return Ok(Some(archive::Encryption {
            keyring,
            file: None,
            seal: a.encryption,
        }));
    }
    let path = a.keyring_file(state_dir);
    let loaded = archive::seal::Keyring::load(&path)
        .map_err(|e| Misconfigured(format!("key `archive.keyring_file`: {e}")))?;
    let keyring = match loaded {
        Some(k) => k,
        None if a.encryption => {
            let k = archive::seal::Keyring::generate(crate::clock::now_ms());
            k.save(&path, true)
                .map_err(|e| Misconfigured(format!("key `archive.keyring_file`: {e}")))?;
            tracing::warn!(
                path = %path.display(),
                key = %format!("{:08x}", k.current_info().id),
                "archive: made a keyring; without it the archive cannot be read: keep a copy apart from this unit"
            );
            k
        }
        None => return Ok(None),
    };
    Ok(Some(archive::Encryption {
        keyring,
        file: Some(path),
        seal: a.encryption,
    }))
}

impl Archiving {
    /// Opens the archive of `[archive]`, or nothing when it is disabled.
    /// `retention_days` follows `archive.retention_days` as clustered settings change it.
    pub fn open(
        cfg: &Config,
        metrics: Arc<Metrics>,
        retention_days: tokio::sync::watch::Receiver<u64>,
    ) -> Result<Option<Arc<Archiving>>> {
        let a = &cfg.archive;
        if !a.enabled {
            return Ok(None);
        }
        let dir = a.dir(&cfg.state_dir);
        let mut opts = archive::Options::new(dir.clone());
        opts.free_bytes_min = a.free_bytes_min;
        opts.segment_bytes_max = a.segment_bytes_max;
        opts.cache_bytes = a.cache_bytes;
        opts.node = cfg.node_name.clone();
        opts.seal_after = (a.seal_secs > 0).then(|| std::time::Duration::from_secs(a.seal_secs));
        opts.signing_key = Some(a.signing_key_file(&cfg.state_dir));
        opts.checkpoint_entries = a.checkpoint_entries;
        opts.checkpoint_after = std::time::Duration::from_secs(a.checkpoint_secs);
        opts.encryption = load_keyring(a, &cfg.state_dir)?;
        let keyring_source = opts.encryption.as_ref().map(|e| match &e.file {
            Some(f) => f.display().to_string(),
            None => format!("the environment ({KEYRING_ENV})"),
        });
        let mut reachable = false;
        if let Some(o) = &a.object_store {
            let store = o.resolve()?;
            match probe_object_store(&store)? {
                None => reachable = true,
                Some(unreachable) => tracing::warn!(
                    "archive: the object store at {} does not answer ({unreachable}): sealed segments stay local until it does",
                    store.endpoints.join(", ")
                ),
            }
            opts.object_store = Some(store);
            opts.adopt = o.adopt.as_deref().and_then(archive::ArchiveId::parse);
        }
        let archive = Arc::new(
            Archive::open(&opts)
                .with_context(|| format!("open the archive in {}", dir.display()))?,
        );
        // The record of who looked, beside the archive unless it has a volume of its own.
        let audit_dir = a.audit_dir.clone().unwrap_or_else(|| dir.clone());
        let audit = evidence::audit::AuditLog::open(&audit_dir, archive.signer())
            .with_context(|| format!("open the audit log in {}", audit_dir.display()))?;
        if reachable {
            // Whose prefix it is, before this unit writes anything there: another archive's
            // is a configuration error (the same store settings copied to a second unit, or a
            // unit reinstalled with an empty state directory).
            match archive.store().claim() {
                Ok(()) => {}
                Err(e @ archive::ArchiveError::NotOurs(_)) => {
                    return Err(crate::config::Misconfigured(format!(
                        "key `archive.object_store.prefix`: {e}"
                    ))
                    .into())
                }
                Err(e) => tracing::warn!(
                    "archive: the object store's prefix was not checked now ({e}): nothing is uploaded until it is"
                ),
            }
        }
        let mirrors = a
            .mirror
            .iter()
            .map(|m| (m.peer.to_string(), Arc::new(PeerStats::default())))
            .collect();
        Ok(Some(Arc::new(Archiving {
            archive,
            quarantined: a.archive_quarantined,
            retention_days,
            waiting: Mutex::new(HashSet::new()),
            failing: Mutex::new(None),
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX)),
            signing_key_file: a.signing_key_file(&cfg.state_dir),
            keyring_source,
            encryption: a.encryption,
            import_size_max: cfg.smtp.message_bytes_max,
            node: cfg.node_name.clone(),
            journal: a.journal(),
            audit: Mutex::new(audit),
            audit_dir,
            mirror_links: Mutex::new(Vec::new()),
            mirrors,
            received: Arc::new(ReceiverStats::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
            metrics,
        })))
    }

    /// Starts the mirror copiers, the listener, retention and the gauges.
    pub async fn start(self: &Arc<Self>, cfg: &Config) -> Result<()> {
        let a: &ArchiveConfig = &cfg.archive;
        if a.listen.is_some() || !a.mirror.is_empty() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        if let Some(listen) = a.listen {
            let secret = a.load_secret().context("key `archive.secret_file`")?;
            let link = link_config(&cfg.node_name, secret)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("bind archive mirror listener {listen}"))?;
            tokio::spawn(archive::mirror::receive(
                self.archive.clone(),
                listener,
                link,
                self.received.clone(),
            ));
        }
        for (m, (_, stats)) in a.mirror.iter().zip(&self.mirrors) {
            let secret = m
                .load_secret(a)
                .with_context(|| format!("mirror {}", m.peer))?;
            let link = link_config(&cfg.node_name, secret)?;
            self.mirror_links
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((m.peer, link.clone()));
            tokio::spawn(archive::mirror::copy_to(
                self.archive.clone(),
                m.peer,
                link,
                stats.clone(),
                self.wake.clone(),
                self.checkpoint_files(),
            ));
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.refresh_gauges().await;
                tokio::time::sleep(GAUGES_EVERY).await;
            }
        });
        {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    // Without retention, compaction still merges the small segments sealed by
                    // age when they are objects in a store.
                    let with_store = me.archive.store().remote().is_some();
                    if me.retention().is_none() && !with_store {
                        tokio::time::sleep(RETENTION_EVERY).await;
                        continue;
                    }
                    let m = me.clone();
                    let pass = move || match m.retention() {
                        Some(retention) => m.retention_pass(retention, |_| {}),
                        None => m.archive.compact(COMPACT_LIVE_PERCENT).map(|c| (0, c)),
                    };
                    match tokio::task::spawn_blocking(pass).await {
                        Ok(Ok((removed, report))) if removed > 0 || report.segments > 0 => {
                            tracing::info!(
                                removed,
                                segments_compacted = report.segments,
                                bytes_freed = report.bytes_freed,
                                "archive retention pass"
                            )
                        }
                        Ok(Err(e)) => tracing::error!("archive retention pass: {e}"),
                        _ => {}
                    }
                    tokio::time::sleep(RETENTION_EVERY).await;
                }
            });
        }
        Ok(())
    }

    /// How long items are kept now (None: for ever).
    pub fn retention(&self) -> Option<Duration> {
        let days = *self.retention_days.borrow();
        (days > 0).then(|| Duration::from_secs(days.saturating_mul(86_400)))
    }

    /// Removes expired items (not those on hold) and compacts what they left sparse.
    pub fn retention_pass(
        &self,
        retention: Duration,
        progress: impl FnMut(u64),
    ) -> Result<(u64, archive::CompactReport), archive::ArchiveError> {
        let removed = self.archive.expire(retention, progress)?;
        let report = self.archive.compact(COMPACT_LIVE_PERCENT)?;
        Ok((removed, report))
    }

    /// Archives the message in `folder` unless it already is; `Err` says why it could not be,
    /// and the caller keeps the message where it is.
    pub async fn ensure(
        self: &Arc<Self>,
        layout: &Layout,
        folder: Folder,
        env: &Envelope,
    ) -> Result<(), String> {
        self.spawn_ensure(layout, folder, env)
            .await
            .map_err(|e| e.to_string())?
    }

    /// [`Archiving::ensure`] started now and awaited later, at most [`IN_FLIGHT_MAX`] at once.
    pub fn spawn_ensure(
        self: &Arc<Self>,
        layout: &Layout,
        folder: Folder,
        env: &Envelope,
    ) -> tokio::task::JoinHandle<Result<(), String>> {
        let (me, layout, env) = (self.clone(), layout.clone(), env.clone());
        tokio::spawn(async move {
            let _permit = me
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            tokio::task::spawn_blocking(move || me.ensure_blocking(&layout, folder, &env))
                .await
                .map_err(|e| e.to_string())?
        })
    }

    /// [`Archiving::ensure`] from a blocking context (the admin socket, the async version).
    pub fn ensure_blocking(
        &self,
        layout: &Layout,
        folder: Folder,
        env: &Envelope,
    ) -> Result<(), String> {
        let Some(incoming) = self.incoming(env) else {
            return Ok(());
        };
        let path = layout.path(folder, &env.id, Part::Body);
        if env.recipients.iter().any(|r| {
            self.journal
                .iter()
                .any(|j| j.eq_ignore_ascii_case(&r.address))
        }) {
            let outcome = self.journaled(incoming, &path, env.body_len);
            return self.record(&env.id, outcome);
        }
        let outcome = store(&self.archive, incoming, &path, env.body_len);
        self.record(&env.id, outcome)
    }

    /// A message sent to a journal address: archived as what it stands for (an envelope journal
    /// report's original, with the report's envelope, and the report beside it; a plain copy as
    /// it is, its envelope from its header fields).
    fn journaled(
        &self,
        incoming: Incoming,
        path: &std::path::Path,
        len: u64,
    ) -> Result<bool, String> {
        let body = MappedBody::open(path, len).map_err(|e| format!("read the body: {e}"))?;
        let j = archive::journal::read(body.bytes());
        let mut new = false;
        if j.from_report {
            // The report itself, as it came (its envelope the journal transaction's).
            let report = Incoming {
                id: format!("{}.report", incoming.id),
                ..incoming.clone()
            };
            new |= self
                .archive
                .archive(report, body.bytes())
                .map_err(|e| e.to_string())?
                .new;
        }
        let original = Incoming {
            sender: j.sender,
            recipients: j.recipients,
            hash: Sha256::digest(&j.raw).into(),
            verdict: if j.from_report {
                format!("{}; journal report", incoming.verdict)
            } else {
                format!("{}; journal", incoming.verdict)
            },
            ..incoming
        };
        new |= self
            .archive
            .archive(original, &j.raw)
            .map_err(|e| e.to_string())?
            .new;
        Ok(new)
    }

    /// What the archive is given of a message, or `None` when it is not archived.
    fn incoming(&self, env: &Envelope) -> Option<Incoming> {
        if matches!(env.scan, ScanState::Infected(_)) && !self.quarantined {
            return None;
        }
        Some(Incoming {
            id: env.id.to_string(),
            origin: env.origin.clone(),
            arrived_ms: env.arrived_ms,
            client: env.client.clone(),
            sender: env.sender.clone(),
            recipients: env.recipients.iter().map(|r| r.address.clone()).collect(),
            verdict: verdict(&env.scan),
            hash: env.body_sha256,
        })
    }

    /// Counts an outcome: new items, failures, the messages waiting.
    fn record(&self, id: &MessageId, outcome: Result<bool, String>) -> Result<(), String> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let result = match outcome {
            Ok(new) => {
                waiting.remove(id);
                if new {
                    self.metrics
                        .archive_archived
                        .with_label_values(&["new"])
                        .inc();
                    self.wake.notify_waiters();
                }
                *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(())
            }
            Err(e) => {
                waiting.insert(id.clone());
                self.metrics.archive_failures.inc();
                *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                Err(e)
            }
        };
        self.metrics.archive_waiting.set(waiting.len() as i64);
        result
    }

    /// The message left the spool another way (set aside as corrupt): not waiting any more.
    pub fn forget(&self, id: &MessageId) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.remove(id);
        self.metrics.archive_waiting.set(waiting.len() as i64);
    }

    /// Why the archive is failing now, for `/readyz` and `spoolctl archive status`.
    pub fn failing(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn refresh_gauges(&self) {
        let archive = self.archive.clone();
        let Ok(Ok(st)) = tokio::task::spawn_blocking(move || archive.status()).await else {
            return;
        };
        let m = &self.metrics;
        m.archive_items.set(st.totals.items as i64);
        m.archive_raw_bytes.set(st.totals.raw_bytes as i64);
        m.archive_stored_bytes.set(st.totals.stored_bytes as i64);
        m.archive_held.set(st.totals.held as i64);
        m.archive_index_lag
            .set(st.last_seq.saturating_sub(st.indexed_through) as i64);
        let now = crate::clock::now_ms();
        if let Some(r) = st.remote {
            let t = &st.totals;
            m.archive_remote_segments
                .with_label_values(&["remote"])
                .set(t.remote_segments as i64);
            m.archive_remote_segments
                .with_label_values(&["pending"])
                .set(t.pending_segments as i64);
            m.archive_remote_pending_bytes.set(t.pending_bytes as i64);
            m.archive_remote_pending_oldest
                .set(if t.pending_oldest_ms == 0 {
                    0.0
                } else {
                    now.saturating_sub(t.pending_oldest_ms) as f64 / 1000.0
                });
            m.archive_cache_bytes.set(t.cached_bytes as i64);
            set_counter(&m.archive_remote_upload_bytes, r.upload_bytes);
            for (op, ok, failed) in [
                ("upload", r.uploads, r.upload_failures),
                (
                    "fetch",
                    r.fetches.saturating_sub(r.fetch_failures),
                    r.fetch_failures,
                ),
                ("delete", r.deletes, 0),
                ("evict", r.evictions, 0),
            ] {
                set_counter(&m.archive_remote_ops.with_label_values(&[op, "ok"]), ok);
                set_counter(
                    &m.archive_remote_ops.with_label_values(&[op, "failed"]),
                    failed,
                );
            }
        }
        for (peer, s) in &self.mirrors {
            let age = s.oldest_age_ms(now) as f64 / 1000.0;
            m.archive_mirror_backlog
                .with_label_values(&[peer])
                .set(s.backlog.load(Ordering::Relaxed) as i64);
            m.archive_mirror_oldest.with_label_values(&[peer]).set(age);
            m.archive_mirror_up
                .with_label_values(&[peer])
                .set(i64::from(s.connected.load(Ordering::Relaxed)));
            set_counter(
                &m.archive_mirror_sent.with_label_values(&[peer]),
                s.sent.load(Ordering::Relaxed),
            );
            set_counter(
                &m.archive_mirror_auth_failures.with_label_values(&[peer]),
                s.auth_failures.load(Ordering::Relaxed),
            );
        }
        let r = &self.received;
        for (result, v) in [
            ("new", &r.stored),
            ("duplicate", &r.duplicates),
            ("refused", &r.refused),
        ] {
            set_counter(
                &m.archive_mirror_received.with_label_values(&[result]),
                v.load(Ordering::Relaxed),
            );
        }
        set_counter(
            &m.archive_mirror_auth_failures
                .with_label_values(&["incoming"]),
            r.auth_failures.load(Ordering::Relaxed),
        );
    }
}

/// Archives a message's body from `path` unless its item exists; true when stored new.
fn store(
    archive: &Archive,
    incoming: Incoming,
    path: &std::path::Path,
    len: u64,
) -> Result<bool, String> {
    if archive
        .find(&incoming)
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(false);
    }
    // The archive checks the bytes against the envelope's hash itself.
    let body = MappedBody::open(path, len).map_err(|e| format!("read the body: {e}"))?;
    let stored = archive
        .archive(incoming, body.bytes())
        .map_err(|e| e.to_string())?;
    Ok(stored.new)
}

/// Brings a counter up to a total kept elsewhere.
fn set_counter(c: &prometheus::IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

/// A peer-link identity for the mirror (the shared secret authenticates).
fn link_config(node: &str, secret: Vec<u8>) -> Result<peer::link::LinkConfig> {
    peer::link::LinkConfig::self_signed(node, &secret, 0).context("archive link TLS settings")
}

/// The admin socket's archive requests.
impl Archiving {
    fn listed(item: &archive::Item) -> api::ArchiveItem {
        api::ArchiveItem {
            seq: item.seq,
            id: item.id.clone(),
            origin: item.origin.clone(),
            mirrored: item.mirrored,
            held: item.held,
            arrived_ms: item.arrived_ms,
            sender: item.sender.clone(),
            recipients: item.recipients.clone(),
            verdict: item.verdict.clone(),
            size: item.raw_len,
            sha256: spool::hex(&item.hash),
            subject: None,
            message_id: None,
            matched: Vec::new(),
        }
    }

    /// An item by number, or by the spool id it had.
    pub fn resolve(&self, id: &str) -> Result<u64, String> {
        if let Ok(seq) = id.parse::<u64>() {
            return Ok(seq);
        }
        if id.parse::<MessageId>().is_err() {
            return Err(format!("{id:?} is neither an item number nor a message id"));
        }
        let found = self
            .archive
            .search(&format!("id:{id}"), 1)
            .map_err(|e| e.to_string())?;
        found
            .items
            .first()
            .map(|hit| hit.item.seq)
            .ok_or_else(|| format!("no archived item for message {id}"))
    }

    /// [`Archiving::resolve`], then, with a `scope`, whether the item's envelope sender or a
    /// recipient is one of its addresses: an item outside it is answered as not found (its
    /// existence is not for this asker to learn) and the refused attempt is audited.
    pub fn resolve_within(
        &self,
        id: &str,
        scope: Option<&[String]>,
        who: &evidence::audit::Asker,
    ) -> Result<u64, String> {
        let seq = self.resolve(id)?;
        let Some(scope) = scope else {
            return Ok(seq);
        };
        let inside = self.archive.item(seq).ok().is_some_and(|item| {
            std::iter::once(&item.sender)
                .chain(&item.recipients)
                .any(|a| scope.iter().any(|s| s.eq_ignore_ascii_case(a)))
        });
        if inside {
            Ok(seq)
        } else {
            self.audited(
                who,
                "archive read refused (outside the user's addresses)",
                id,
                &[],
            )?;
            Err(format!("no archived item {id}"))
        }
    }

    /// `archive search`: the newest `limit` matches after the first `offset`, within a
    /// `scope` of addresses if one is given.
    pub fn search(
        &self,
        query: &str,
        offset: usize,
        limit: usize,
        scope: Option<&[String]>,
    ) -> Result<api::ArchiveFound, String> {
        let wanted = offset.saturating_add(limit).clamp(1, 10_000);
        let found = self
            .archive
            .search_within(query, wanted, scope)
            .map_err(|e| e.to_string())?;
        let mut items = Vec::with_capacity(found.items.len());
        // Only the page shown is read back for its headline.
        for hit in found.items.iter().skip(offset) {
            let mut listed = Self::listed(&hit.item);
            // The subject and Message-ID from the stored bytes: a search result is read by a
            // person, who matches it back to a message by its Message-ID.
            if let Ok(raw) = self.archive.body(&hit.item) {
                let headline = archive::mime::headline(&raw);
                listed.subject = headline.subject;
                listed.message_id = headline.message_id;
            }
            listed.matched = hit.matched.iter().map(|m| m.to_string()).collect();
            items.push(listed);
        }
        Ok(api::ArchiveFound {
            total: found.total,
            total_exact: found.total_exact,
            items,
        })
    }

    /// `archive show` of item `seq` ([`Archiving::resolve`]).
    pub fn show(&self, seq: u64) -> Result<api::ArchiveShown, String> {
        let (item, raw) = self.archive.raw(seq).map_err(|e| e.to_string())?;
        let (headers, parts) = archive::mime::describe(&raw);
        Ok(api::ArchiveShown {
            item: Self::listed(&item),
            headers,
            parts: parts
                .into_iter()
                .map(|p| api::ArchivePart {
                    content_type: p.content_type,
                    name: p.name,
                    size: p.size,
                })
                .collect(),
        })
    }

    /// `archive export` of item `seq` ([`Archiving::resolve`]).
    pub fn export(&self, seq: u64) -> Result<api::ArchiveExported, String> {
        use base64::Engine;
        let (item, raw) = self.archive.raw(seq).map_err(|e| e.to_string())?;
        Ok(api::ArchiveExported {
            item: Self::listed(&item),
            base64: base64::engine::general_purpose::STANDARD.encode(raw),
        })
    }

    /// Records a request in the audit log before it is answered: `Err` (and the request
    /// refused) when it cannot be recorded.
    pub fn audited(
        &self,
        who: &evidence::audit::Asker,
        action: &str,
        detail: &str,
        seqs: &[u64],
    ) -> Result<(), String> {
        let which: Vec<String> = seqs.iter().map(u64::to_string).collect();
        let logged = self.audit.lock().unwrap_or_else(|p| p.into_inner()).append(
            who,
            action,
            detail,
            &which,
            seqs.len() as u64,
        );
        match logged {
            Ok(_) => {
                self.metrics.archive_audit_entries.inc();
                Ok(())
            }
            Err(e) => {
                self.metrics.archive_audit_failures.inc();
                tracing::error!(action, uid = who.uid, "archive: audit log: {e}");
                Err(format!("refused: the audit log cannot record it ({e})"))
            }
        }
    }

    /// The items `archive hold|unhold` acts on: one item, or every item a query matches.
    pub fn hold_targets(&self, target: &str) -> Result<Vec<u64>, String> {
        Ok(match self.resolve(target) {
            Ok(seq) => vec![seq],
            Err(_) => {
                let total = self
                    .archive
                    .search(target, 1)
                    .map_err(|e| e.to_string())?
                    .total;
                self.archive
                    .search(target, total.max(1))
                    .map_err(|e| e.to_string())?
                    .items
                    .iter()
                    .map(|hit| hit.item.seq)
                    .collect()
            }
        })
    }

    /// `archive hold|unhold` of the items [`Archiving::hold_targets`] named.
    pub fn hold(&self, seqs: &[u64], held: bool) -> Result<api::ArchiveHeld, String> {
        let changed = self.archive.hold(seqs, held).map_err(|e| e.to_string())?;
        Ok(api::ArchiveHeld {
            matched: seqs.len() as u64,
            changed,
        })
    }

    /// `archive status`.
    pub fn status(&self) -> Result<api::ArchiveStatus, String> {
        let st = self.archive.status().map_err(|e| e.to_string())?;
        let now = crate::clock::now_ms();
        Ok(api::ArchiveStatus {
            items: st.totals.items,
            raw_bytes: st.totals.raw_bytes,
            stored_bytes: st.totals.stored_bytes,
            segments: st.totals.segments,
            held: st.totals.held,
            last_seq: st.last_seq,
            indexed_through: st.indexed_through,
            failing: self.failing(),
            waiting: self.waiting.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
            mirrors: self
                .mirrors
                .iter()
                .map(|(peer, s)| api::MirrorState {
                    peer: peer.clone(),
                    connected: s.connected.load(Ordering::Relaxed),
                    backlog: s.backlog.load(Ordering::Relaxed),
                    oldest_age_secs: s.oldest_age_ms(now) / 1000,
                    sent: s.sent.load(Ordering::Relaxed),
                    auth_failures: s.auth_failures.load(Ordering::Relaxed),
                })
                .collect(),
            object_store: st.remote.map(|r| {
                let t = &st.totals;
                api::ObjectStoreState {
                    remote_segments: t.remote_segments,
                    remote_bytes: t.remote_bytes,
                    pending_segments: t.pending_segments,
                    pending_bytes: t.pending_bytes,
                    pending_oldest_age_secs: if t.pending_oldest_ms == 0 {
                        0
                    } else {
                        now.saturating_sub(t.pending_oldest_ms) / 1000
                    },
                    cached_bytes: t.cached_bytes,
                    uploads: r.uploads,
                    upload_failures: r.upload_failures,
                    fetches: r.fetches,
                    fetch_failures: r.fetch_failures,
                    archive: self
                        .archive
                        .store()
                        .archive_id()
                        .ok()
                        .flatten()
                        .map(|id| id.to_string()),
                }
            }),
            rebuilding: {
                use std::sync::atomic::Ordering::SeqCst;
                let p = &self.archive.store().rebuild_progress;
                p.pending
                    .load(SeqCst)
                    .then(|| (p.done.load(SeqCst), p.segments.load(SeqCst)))
            },
        })
    }

    /// `archive retention`: the pass run by hand (with no retention set, nothing expires,
    /// compaction still runs).
    pub fn run_retention(&self, progress: impl FnMut(u64)) -> Result<api::ArchiveExpired, String> {
        let (removed, report) = match self.retention() {
            Some(r) => self.retention_pass(r, progress),
            None => self.archive.compact(COMPACT_LIVE_PERCENT).map(|c| (0, c)),
        }
        .map_err(|e| e.to_string())?;
        Ok(api::ArchiveExpired {
            removed,
            segments_compacted: report.segments,
            bytes_freed: report.bytes_freed,
        })
    }

    /// The checkpoints files every mirror peer is sent: the archive's and the audit log's.
    fn checkpoint_files(&self) -> Vec<archive::mirror::CheckpointFile> {
        vec![
            archive::mirror::CheckpointFile {
                path: self.archive.store().dir().join(evidence::checkpoint::FILE),
                cursor: "mirror-checkpoints".into(),
            },
            archive::mirror::CheckpointFile {
                path: self.audit_dir.join(evidence::audit::CHECKPOINTS),
                cursor: "mirror-audit-checkpoints".into(),
            },
        ]
    }

    /// `audit verify [--against-peers]`: the audit log proved, against the checkpoints each
    /// mirror peer keeps of it when asked.
    pub fn audit_verify(&self, against_peers: bool) -> Result<evidence::audit::AuditProof, String> {
        let elsewhere = if against_peers {
            let id = self.audit.lock().unwrap_or_else(|p| p.into_inner()).id();
            self.peers_checkpoints(Some(id))?
        } else {
            Vec::new()
        };
        let (public, _) = self.archive.signing_key().map_err(|e| e.to_string())?;
        evidence::audit::prove(&self.audit_dir, &[public], &elsewhere).map_err(|e| e.to_string())
    }

    /// The checkpoints of archive (or audit log) `id` each mirror peer keeps (`verify
    /// --against-peers`; `None`: this archive's): a peer that does not answer fails the verify
    /// (it was asked to compare).
    fn peers_checkpoints(
        &self,
        id: Option<archive::ArchiveId>,
    ) -> Result<Vec<(String, Vec<evidence::checkpoint::Checkpoint>)>, String> {
        let links = self
            .mirror_links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if links.is_empty() {
            return Err("--against-peers: this unit has no [[archive.mirror]] peers".into());
        }
        let id = match id {
            Some(id) => Some(id),
            None => self.archive.signing_key().map_err(|e| e.to_string())?.1,
        };
        let Some(id) = id else {
            return Ok(links
                .iter()
                .map(|(a, _)| (a.to_string(), Vec::new()))
                .collect());
        };
        let handle = tokio::runtime::Handle::current();
        let mut out = Vec::new();
        for (addr, link) in links {
            let text = handle
                .block_on(archive::mirror::fetch_checkpoints(addr, &link, id, 0))
                .map_err(|e| format!("mirror peer {addr}: its checkpoints: {e}"))?;
            let theirs = evidence::checkpoint::parse_all(&text)
                .map_err(|e| format!("mirror peer {addr}: its checkpoints, {e}"))?;
            out.push((format!("mirror peer {addr}"), theirs));
        }
        Ok(out)
    }

    /// `archive key`.
    pub fn key(&self) -> Result<api::ArchiveKey, String> {
        let (public, archive) = self.archive.signing_key().map_err(|e| e.to_string())?;
        let (keys, chain_key) = self.archive.data_keys().map_err(|e| e.to_string())?;
        Ok(api::ArchiveKey {
            public_key: evidence::hex(&public),
            archive: archive.map(|a| a.to_string()),
            key_file: self.signing_key_file.display().to_string(),
            encryption: self.encryption,
            keyring: self.keyring_source.clone(),
            data_keys: keys
                .into_iter()
                .map(|k| api::DataKey {
                    id: format!("{:08x}", k.id),
                    created_ms: k.created_ms,
                    current: k.current,
                })
                .collect(),
            chain_key: chain_key.map(|id| format!("{id:08x}")),
            checkpoints: self
                .archive
                .store()
                .dir()
                .join(evidence::checkpoint::FILE)
                .display()
                .to_string(),
        })
    }

    /// `archive verify`: the proof of the chain, checkpoints and bodies (every segment, as of
    /// one catalog snapshot), then every catalog item's body and the index's count.
    pub fn verify(
        &self,
        start: evidence::proof::Start,
        (against_peers, against_store): (bool, bool),
        mut progress: impl FnMut(&str, u64, u64),
    ) -> Result<api::ArchiveVerified, String> {
        let mut elsewhere = if against_peers {
            self.peers_checkpoints(None)?
        } else {
            Vec::new()
        };
        if against_store {
            let remote = self
                .archive
                .store()
                .remote()
                .ok_or("--against-store: this unit has no [archive.object_store]")?;
            let text = remote
                .checkpoints()
                .map_err(|e| format!("the object store's checkpoints: {e}"))?;
            let theirs = evidence::checkpoint::parse_all(&text)
                .map_err(|e| format!("the object store's checkpoints, {e}"))?;
            elsewhere.push(("the object store".to_string(), theirs));
        }
        let proof = self
            .archive
            .prove(vec![], start, &elsewhere, |d, t| progress("prove", d, t))
            .map_err(|e| e.to_string())?;
        if !proof.holds() {
            tracing::error!(
                breaks = proof.break_count,
                first = ?proof.breaks.first(),
                "archive: the proof of the archive found breaks"
            );
        }
        let v = self
            .archive
            .verify(|d, t| progress("verify", d, t))
            .map_err(|e| e.to_string())?;
        Ok(api::ArchiveVerified {
            proof: Some(proof),
            items: v.items,
            ok: v.ok,
            failed: v
                .bad
                .into_iter()
                .map(|(seq, error)| api::Failed {
                    id: seq.to_string(),
                    error,
                })
                .collect(),
            index_entries: v.index_entries,
        })
    }

    /// `archive rebuild`: waits for the catalog's rebuild from the segments (or runs it, for an
    /// empty catalog), then verifies every item.
    pub fn rebuild(
        &self,
        mut progress: impl FnMut(&str, u64, u64),
    ) -> Result<api::ArchiveRebuilt, String> {
        use std::sync::atomic::Ordering::SeqCst;
        let r = self
            .archive
            .rebuild(|p| progress("rebuild", p.done.load(SeqCst), p.segments.load(SeqCst)))
            .map_err(|e| e.to_string())?;
        let verified = self.verify(
            evidence::proof::Start::Genesis,
            (false, false),
            &mut progress,
        )?;
        Ok(api::ArchiveRebuilt {
            segments: r.segments,
            from_store: r.from_store,
            items: r.items,
            held: r.held,
            removed: r.removed,
            damaged: r
                .damaged
                .iter()
                .map(|(n, at)| format!("segment {n} from offset {at}"))
                .collect(),
            without_body: r.without_body,
            verified,
        })
    }

    /// `archive import`: the files the daemon reads (absolute paths), every message archived
    /// once, a verdict each (in the report file when one is named).
    pub fn import(
        &self,
        paths: &[String],
        mboxo: bool,
        report: Option<String>,
        progress: impl FnMut(u64, u64),
    ) -> Result<api::ArchiveImported, String> {
        for p in paths.iter().chain(&report) {
            from_root(p)?;
        }
        let opts = self.import_options(mboxo, &report);
        let paths: Vec<std::path::PathBuf> = paths.iter().map(std::path::PathBuf::from).collect();
        let done = archive::importer::import(&self.archive, &paths, &opts, progress)
            .map_err(|e| e.to_string())?;
        Ok(Self::imported(done, report))
    }

    fn import_options(
        &self,
        mboxo: bool,
        report: &Option<String>,
    ) -> archive::importer::ImportOptions {
        archive::importer::ImportOptions {
            quoting: if mboxo {
                archive::import::Quoting::O
            } else {
                archive::import::Quoting::Rd
            },
            size_max: self.import_size_max,
            origin: self.node.clone(),
            report: report.clone().map(std::path::PathBuf::from),
        }
    }

    /// `archive import --imap`: the mailbox's messages after the UID the last import reached.
    pub fn import_imap(
        &self,
        imap: &api::ImapSource,
        report: Option<String>,
        progress: impl FnMut(u64, u64),
    ) -> Result<api::ArchiveImported, String> {
        let password_file = imap.password_file.as_deref().ok_or(
            "an IMAP import needs --password-file (the password is never on the command line)",
        )?;
        for p in [
            Some(password_file),
            imap.ca_file.as_deref(),
            report.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            from_root(p)?;
        }
        let password = std::fs::read_to_string(password_file)
            .map_err(|e| format!("password file {password_file}: {e}"))?
            .trim_end_matches(['\r', '\n'])
            .to_string();
        let since = imap
            .since
            .as_deref()
            .map(|d| {
                chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
                    .map(|d| d.format("%-d-%b-%Y").to_string())
                    .map_err(|e| format!("--since {d:?}: {e} (YYYY-MM-DD)"))
            })
            .transpose()?;
        let source = archive::importer::ImapImport {
            url: imap.url.clone(),
            password,
            ca_file: imap.ca_file.as_deref().map(std::path::PathBuf::from),
            since,
            state_dir: self.archive.store().dir().join("imports"),
        };
        let done = archive::importer::import_imap(
            &self.archive,
            &source,
            &self.import_options(false, &report),
            progress,
        )
        .map_err(|e| e.to_string())?;
        Ok(Self::imported(done, report))
    }

    /// The answer of an import.
    fn imported(
        done: archive::importer::ImportReport,
        report: Option<String>,
    ) -> api::ArchiveImported {
        let (archived, duplicates, rejected) = done.totals();
        tracing::info!(archived, duplicates, rejected, "archive: import done");
        api::ArchiveImported {
            sources: done
                .sources
                .into_iter()
                .map(|s| api::ImportedSource {
                    path: s.path,
                    kind: s.kind,
                    archived: s.archived,
                    duplicates: s.duplicates,
                    rejected: s.rejected,
                    bytes: s.bytes,
                })
                .collect(),
            archived,
            duplicates,
            rejected,
            refusals: done
                .refusals
                .into_iter()
                .map(|r| api::ImportRefusal {
                    source: r.source,
                    at: r.at,
                    reason: r.reason,
                })
                .collect(),
            report,
        }
    }

    /// `archive export --query`: items `seqs` (what `query` selected) written to `out` as
    /// `format`, with the signed manifest beside it.
    pub fn bulk_export(
        &self,
        seqs: &[u64],
        query: &str,
        format: &str,
        out: &str,
        progress: impl FnMut(u64, u64),
    ) -> Result<api::ArchiveBulkExported, String> {
        let format = archive::exporter::Format::parse(format)
            .ok_or_else(|| format!("format {format:?}: mbox, maildir or eml-zip"))?;
        let path = from_root(out)?;
        let mut seqs = seqs.to_vec();
        seqs.sort_unstable();
        let done = archive::exporter::export(&self.archive, &seqs, query, format, path, progress)
            .map_err(|e| e.to_string())?;
        Ok(api::ArchiveBulkExported {
            items: done.items,
            bytes: done.bytes,
            out: out.to_string(),
            manifest: done.manifest.display().to_string(),
        })
    }

    /// `archive reindex`.
    pub fn reindex(&self, progress: impl FnMut(u64, u64)) -> Result<api::ArchiveReindexed, String> {
        self.archive.reindex(progress).map_err(|e| e.to_string())?;
        let st = self.archive.status().map_err(|e| e.to_string())?;
        Ok(api::ArchiveReindexed {
            items: st.totals.items,
        })
    }
}
