//! The admin socket: a unix socket in the state directory (mode 0600) where `spoolctl` sends one
//! JSON request per connection and gets one JSON response line back (a recovery that asked for
//! `progress` gets `{"progress": ...}` lines before it). Queue tools in the manner of
//! postqueue/postsuper: list, show, hold, release, requeue, delete, flush; plus insert, role and
//! status.

use crate::queue::Queue;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use spool::recovery::InsertOutcome;
use spool::{Folder, Layout, MessageId, Part, RcptState};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Role, partner link, lag, pending actions, queue depth by folder.
    Status,
    /// Set the role.
    Role {
        /// `active` or `passive`.
        role: String,
    },
    /// Insert `input/` (the SIGUSR2 equivalent).
    Insert,
    /// List messages.
    List {
        /// One folder (default: spool, vscan, hold, quarantine).
        folder: Option<String>,
        /// Sender contains.
        sender: Option<String>,
        /// Some recipient contains.
        rcpt: Option<String>,
        /// Older than this many seconds.
        older_than_secs: Option<u64>,
    },
    /// One message: envelope, headers, history.
    Show {
        /// Its id.
        id: String,
    },
    /// Move to hold/ (not delivered until released).
    Hold {
        /// Ids.
        ids: Vec<String>,
    },
    /// Move from hold/ back to spool/ and schedule now.
    Release {
        /// Ids.
        ids: Vec<String>,
    },
    /// Retry now.
    Requeue {
        /// Ids.
        ids: Vec<String>,
    },
    /// Remove for good (logged for the partner first).
    Delete {
        /// Ids.
        ids: Vec<String>,
    },
    /// Retry every deferred message now.
    Flush,
    /// Takeover recovery: bring the partner's leftovers (or a copied-out spool folder) here.
    Recover {
        /// Only report the plan.
        dry_run: bool,
        /// Offline: a spool folder copied from a dead unit instead of the partner.
        from_dir: Option<String>,
        /// Send a `{"progress": {"step", "done", "total"}}` line as each step advances.
        #[serde(default)]
        progress: bool,
    },
}

/// Where a recovery reports how far it got; a closed receiver is ignored.
type ProgressSender = tokio::sync::mpsc::UnboundedSender<Value>;

fn report(progress: &ProgressSender, step: &str, done: usize, total: usize) {
    let _ = progress.send(json!({ "step": step, "done": done, "total": total }));
}

/// Sends one progress line, if the client asked for them.
async fn write_progress<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, p: Value, asked: bool) {
    if asked {
        let _ = w
            .write_all(format!("{}\n", json!({ "progress": p })).as_bytes())
            .await;
    }
}

/// One leftover message found on the partner or in a folder.
struct Leftover {
    id: MessageId,
    folder: String,
    size: u64,
    sha: String,
}

/// Crash-test hook: with `SPOOLD_FAILPOINT=<name>` in its environment the daemon dies on the
/// spot (like `kill -9`) when recovery reaches that point. Unset in production, where this is
/// one environment lookup per recovery step.
fn failpoint(name: &str) {
    if std::env::var("SPOOLD_FAILPOINT").is_ok_and(|v| v == name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Serialize)]
struct Listed {
    id: String,
    folder: &'static str,
    size: u64,
    sender: String,
    recipients: Vec<String>,
    arrived_ms: u64,
    attempts: u32,
    next_attempt_ms: u64,
    last_error: Option<String>,
}

/// What the admin socket needs.
pub struct Admin {
    /// Paths.
    pub layout: Layout,
    /// The delivery schedule.
    pub queue: Arc<Queue>,
    /// Replication, if configured.
    pub replicator: Option<Arc<hasync::Replicator>>,
    /// Work in flight, which a handover to passive waits for.
    pub activity: Arc<crate::handover::Activity>,
    /// Every insertion, move and removal goes through it.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
}

fn folder_named(name: &str) -> Option<Folder> {
    Folder::ALL.into_iter().find(|f| f.name() == name)
}

fn now_ms() -> u64 {
    crate::sink::now_ms()
}

impl Admin {
    /// The socket's path.
    pub fn socket_path(layout: &Layout) -> PathBuf {
        layout.root().join("spoold.sock")
    }

    /// Serves the socket until the process ends.
    pub async fn serve(self: Arc<Self>) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = Self::socket_path(&self.layout);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let mut r = BufReader::new(r).take(1 << 20);
                    if r.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let reply = match serde_json::from_str::<Request>(&line) {
                        Ok(Request::Recover {
                            dry_run,
                            from_dir,
                            progress,
                        }) => {
                            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                            let work = me.recover(dry_run, from_dir, tx);
                            tokio::pin!(work);
                            let result = loop {
                                tokio::select! {
                                    biased;
                                    Some(p) = rx.recv() => write_progress(&mut w, p, progress).await,
                                    r = &mut work => break r,
                                }
                            };
                            // Steps reported since the last await.
                            while let Ok(p) = rx.try_recv() {
                                write_progress(&mut w, p, progress).await;
                            }
                            match result {
                                Ok(data) => json!({ "ok": true, "data": data }),
                                Err(e) => json!({ "ok": false, "error": e }),
                            }
                        }
                        Ok(req) => {
                            let me2 = me.clone();
                            match tokio::task::spawn_blocking(move || me2.handle(req)).await {
                                Ok(Ok(data)) => json!({ "ok": true, "data": data }),
                                Ok(Err(e)) => json!({ "ok": false, "error": e }),
                                Err(e) => json!({ "ok": false, "error": e.to_string() }),
                            }
                        }
                        Err(e) => json!({ "ok": false, "error": format!("bad request: {e}") }),
                    };
                    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                });
            }
        });
        Ok(())
    }

    fn ids(ids: &[String]) -> Result<Vec<MessageId>, String> {
        ids.iter()
            .map(|s| s.parse::<MessageId>().map_err(|e| e.to_string()))
            .collect()
    }

    fn locate(&self, id: &MessageId) -> Option<Folder> {
        Folder::LIVE
            .into_iter()
            .find(|&f| self.layout.path(f, id, Part::Env).exists())
    }

    fn handle(&self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status => Ok(self.status()),
            Request::Role { role } => {
                let r = self
                    .replicator
                    .as_ref()
                    .ok_or("no [ha] section: this unit is standalone")?;
                let role =
                    hasync::proto::Role::parse(&role).ok_or("role must be active or passive")?;
                crate::handover::set_role(r, &self.activity, role)
            }
            Request::Insert => {
                let outcomes = self
                    .lifecycle
                    .insert_input()
                    .map_err(|e| format!("{e:#}"))?;
                let mut inserted = Vec::new();
                let mut duplicates = Vec::new();
                let mut corrupt = Vec::new();
                for o in outcomes {
                    match o {
                        InsertOutcome::Inserted(id) => inserted.push(id.to_string()),
                        InsertOutcome::Duplicate(id) => duplicates.push(id.to_string()),
                        InsertOutcome::Corrupt { name, reason } => {
                            corrupt.push(json!({ "name": name, "reason": reason }));
                        }
                    }
                }
                Ok(json!({ "inserted": inserted, "duplicates": duplicates, "corrupt": corrupt }))
            }
            Request::List {
                folder,
                sender,
                rcpt,
                older_than_secs,
            } => {
                let folders: Vec<Folder> = match folder {
                    Some(f) => vec![folder_named(&f).ok_or(format!("no folder {f:?}"))?],
                    None => Folder::LIVE.to_vec(),
                };
                let cutoff = older_than_secs.map(|s| now_ms().saturating_sub(s * 1000));
                let mut out = Vec::new();
                for f in folders {
                    let Ok(dir) = std::fs::read_dir(self.layout.dir(f)) else {
                        continue;
                    };
                    let mut names: Vec<String> = dir
                        .flatten()
                        .filter_map(|e| {
                            e.file_name()
                                .to_str()
                                .and_then(|n| n.strip_suffix(".env"))
                                .map(str::to_string)
                        })
                        .collect();
                    names.sort();
                    for n in names {
                        let Ok(id) = n.parse::<MessageId>() else {
                            continue;
                        };
                        let Ok(env) = self.layout.read_envelope(f, &id) else {
                            continue;
                        };
                        if sender
                            .as_ref()
                            .is_some_and(|s| !env.sender.contains(s.as_str()))
                            || rcpt.as_ref().is_some_and(|r| {
                                !env.recipients
                                    .iter()
                                    .any(|x| x.address.contains(r.as_str()))
                            })
                            || cutoff.is_some_and(|c| env.arrived_ms > c)
                        {
                            continue;
                        }
                        out.push(Listed {
                            id: n,
                            folder: f.name(),
                            size: env.body_len,
                            sender: env.sender.clone(),
                            recipients: env
                                .recipients
                                .iter()
                                .filter(|r| r.state == RcptState::Pending)
                                .map(|r| r.address.clone())
                                .collect(),
                            arrived_ms: env.arrived_ms,
                            attempts: env.attempts,
                            next_attempt_ms: env.next_attempt_ms,
                            last_error: env.last_error.clone(),
                        });
                    }
                }
                serde_json::to_value(out).map_err(|e| e.to_string())
            }
            Request::Show { id } => {
                let id: MessageId = id.parse().map_err(|e: spool::id::IdError| e.to_string())?;
                let f = self.locate(&id).ok_or(format!("{id}: not queued"))?;
                let env = self
                    .layout
                    .read_envelope(f, &id)
                    .map_err(|e| e.to_string())?;
                let body = std::fs::read(self.layout.path(f, &id, Part::Body))
                    .map_err(|e| e.to_string())?;
                let end = body
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| p + 2)
                    .unwrap_or(body.len());
                Ok(json!({
                    "id": id.to_string(),
                    "folder": f.name(),
                    "envelope": String::from_utf8_lossy(&env.encode()),
                    "headers": String::from_utf8_lossy(&body[..end.min(64 * 1024)]),
                    "attempts": env.attempts,
                    "next_attempt_ms": env.next_attempt_ms,
                    "last_error": env.last_error,
                    "recipients": env.recipients.iter().map(|r| json!({
                        "address": r.address,
                        "state": format!("{:?}", r.state).to_lowercase(),
                    })).collect::<Vec<_>>(),
                }))
            }
            Request::Hold { ids } => self.each(&ids, |id, f| {
                if f != Folder::Spool {
                    return Err(format!(
                        "{id}: in {}/, only spool/ messages can be held",
                        f.name()
                    ));
                }
                self.lifecycle
                    .move_to(id, Folder::Spool, Folder::Hold)
                    .map_err(|e| format!("{e:#}"))
            }),
            Request::Release { ids } => self.each(&ids, |id, f| {
                if f != Folder::Hold {
                    return Err(format!("{id}: not held"));
                }
                self.lifecycle
                    .move_to(id, Folder::Hold, Folder::Spool)
                    .map_err(|e| format!("{e:#}"))?;
                self.requeue(id, Folder::Spool)
            }),
            Request::Requeue { ids } => self.each(&ids, |id, f| self.requeue(id, f)),
            Request::Delete { ids } => self.each(&ids, |id, f| {
                self.lifecycle
                    .remove(id, f, false)
                    .map_err(|e| format!("{e:#}"))?;
                tracing::warn!(id = %id, folder = f.name(), "message deleted by spoolctl");
                Ok(())
            }),
            Request::Recover { .. } => Err("recover is handled asynchronously".into()),
            Request::Flush => {
                let mut n = 0;
                for e in std::fs::read_dir(self.layout.dir(Folder::Spool))
                    .map_err(|e| e.to_string())?
                    .flatten()
                {
                    let id = e
                        .file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".env"))
                        .and_then(|n| n.parse().ok());
                    if let Some(id) = id {
                        if self.requeue(&id, Folder::Spool).is_ok() {
                            n += 1;
                        }
                    }
                }
                Ok(json!({ "requeued": n }))
            }
        }
    }

    fn held_locally(&self, id: &MessageId, sha: &str) -> bool {
        Folder::LIVE.into_iter().any(|f| {
            self.layout
                .read_envelope(f, id)
                .is_ok_and(|e| hex(&e.body_sha256) == sha)
        })
    }

    /// Writes a pair into `input/` durably: body, then envelope (the commit record), each via
    /// `tmp/` + fsync + rename, then one fsync of `input/`.
    fn put_input(&self, id: &MessageId, env: &[u8], body: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        for (part, bytes) in [(Part::Body, body), (Part::Env, env)] {
            let tmp = self
                .layout
                .dir(Folder::Tmp)
                .join(format!("{id}.recover.{}", part.ext()));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.layout.path(Folder::Input, id, part))?;
        }
        spool::layout::fsync_dir(&self.layout.dir(Folder::Input))
    }

    /// Takeover recovery, every step idempotent (see `spoolctl recover --help`).
    async fn recover(
        &self,
        dry_run: bool,
        from_dir: Option<String>,
        progress: ProgressSender,
    ) -> Result<Value, String> {
        use hasync::proto::recovery_op::{FETCH, LEDGER, LIST, REMOVE};
        let mut client = None;
        let mut failed: Vec<Value> = Vec::new();
        // 1. The leftovers.
        let leftovers: Vec<Leftover> = match &from_dir {
            Some(dir) => tokio::task::block_in_place(|| {
                let base = PathBuf::from(dir);
                let mut out = Vec::new();
                for sub in [base.join("spool"), base.join("vscan"), base.clone()] {
                    let Ok(rd) = std::fs::read_dir(&sub) else {
                        continue;
                    };
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let Some(stem) = name.strip_suffix(".env") else {
                            continue;
                        };
                        match std::fs::read(e.path()).map_err(|e| e.to_string()).and_then(|b| {
                                spool::Envelope::decode(&b).map_err(|e| e.to_string())
                            }) {
                                Ok(env) if env.id.to_string() == stem => out.push(Leftover {
                                    folder: sub.display().to_string(),
                                    size: env.body_len,
                                    sha: hex(&env.body_sha256),
                                    id: env.id,
                                }),
                                Ok(_) => failed.push(json!({ "id": stem, "error": "envelope id does not match its file name" })),
                                Err(e) => failed.push(json!({ "id": stem, "error": e })),
                            }
                    }
                }
                out
            }),
            None => {
                let r = self
                    .replicator
                    .as_ref()
                    .ok_or("no [ha] section: use --from-dir for a copied-out spool")?;
                let mut c = r
                    .recovery_client()
                    .await
                    .map_err(|e| format!("partner: {e}"))?;
                let list = c.call(LIST, b"").await.map_err(|e| e.to_string())??;
                client = Some(c);
                String::from_utf8_lossy(&list)
                    .lines()
                    .filter_map(|l| {
                        let mut it = l.split(' ');
                        Some(Leftover {
                            id: it.next()?.parse().ok()?,
                            folder: it.next()?.to_string(),
                            size: it.next()?.parse().ok()?,
                            sha: it.next()?.to_string(),
                        })
                    })
                    .collect()
            }
        };
        report(&progress, "list", leftovers.len(), leftovers.len());
        // 2. Classify.
        let ledger = self.replicator.as_ref().map(|r| r.log().clone());
        let mut plan = Vec::new();
        let (mut to_move, mut dups, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        for l in &leftovers {
            // A copy of a message held here is a replica: this unit delivers the message once
            // and its DELETE removes the copy there. Removing it now would only leave the
            // message without a replica.
            let action = if self.held_locally(&l.id, &l.sha) {
                kept.push(l.id.to_string());
                "held here (kept)"
            } else if ledger
                .as_ref()
                .is_some_and(|g| g.was_delivered(&l.id).unwrap_or(false))
            {
                dups.push(l.id.clone());
                "duplicate (delivered here)"
            } else {
                to_move.push(l);
                "move"
            };
            plan.push(json!({ "id": l.id.to_string(), "folder": l.folder, "size": l.size, "action": action }));
        }
        if dry_run {
            return Ok(json!({ "dry_run": true, "plan": plan, "failed": failed }));
        }
        failpoint("recover-after-plan");
        // 3. Copy into input/, verifying checksums.
        let mut copied = Vec::new();
        let copy_total = to_move.len();
        for (k, l) in to_move.into_iter().enumerate() {
            let fetched: Result<(Vec<u8>, Vec<u8>), String> = match (&mut client, &from_dir) {
                (Some(c), _) => match c.call(FETCH, l.id.to_string().as_bytes()).await {
                    Ok(Ok(d)) if d.len() >= 4 => {
                        let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
                        if d.len() < 4 + n {
                            Err("short pair".into())
                        } else {
                            Ok((d[4..4 + n].to_vec(), d[4 + n..].to_vec()))
                        }
                    }
                    Ok(Ok(_)) => Err("short pair".into()),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.to_string()),
                },
                (None, Some(_)) => tokio::task::block_in_place(|| {
                    let dir = PathBuf::from(&l.folder);
                    std::fs::read(dir.join(format!("{}.env", l.id)))
                        .and_then(|e| Ok((e, std::fs::read(dir.join(format!("{}.body", l.id)))?)))
                        .map_err(|e| e.to_string())
                }),
                (None, None) => Err("no source".into()),
            };
            // File I/O and fsyncs: off the async worker, which SMTP sessions share.
            let checked = tokio::task::block_in_place(|| {
                fetched.and_then(|(env, body)| {
                    let decoded = spool::Envelope::decode(&env).map_err(|e| e.to_string())?;
                    if decoded.id != l.id
                        || hex(&spool::body::sha256(&body)) != l.sha
                        || decoded.body_len != body.len() as u64
                    {
                        return Err("checksum or length does not match the envelope".into());
                    }
                    self.put_input(&l.id, &env, &body)
                        .map_err(|e| e.to_string())
                })
            });
            match checked {
                Ok(()) => {
                    copied.push(l.id.clone());
                    if copied.len() == 1 {
                        failpoint("recover-mid-copy");
                    }
                }
                Err(e) => failed.push(json!({ "id": l.id.to_string(), "error": e })),
            }
            report(&progress, "copy", k + 1, copy_total);
            // A copy from a local folder never waits: let the progress line out.
            tokio::task::yield_now().await;
        }
        failpoint("recover-after-copy");
        // 4. Insert and verify every copied id is spooled now.
        tokio::task::block_in_place(|| self.lifecycle.insert_input())
            .map_err(|e| format!("{e:#}"))?;
        let mut moved = Vec::new();
        for id in copied {
            if self.layout.path(Folder::Spool, &id, Part::Env).exists() {
                tracing::info!(id = %id, "new mail inserted (id={id}) by takeover recovery");
                moved.push(id);
            } else {
                failed.push(json!({ "id": id.to_string(), "error": "not spooled after insertion (see corrupt/)" }));
            }
        }
        report(&progress, "insert", moved.len(), copy_total);
        failpoint("recover-after-insert");
        // 5. Only now remove, on the partner, what was moved and the duplicates.
        let mut removed_on_partner = 0;
        if let Some(c) = client.as_mut() {
            let ids: String = moved
                .iter()
                .chain(dups.iter())
                .map(|i| format!("{i}\n"))
                .collect();
            if !ids.is_empty() {
                let n = c
                    .call(REMOVE, ids.as_bytes())
                    .await
                    .map_err(|e| e.to_string())??;
                removed_on_partner = String::from_utf8_lossy(&n).parse::<usize>().unwrap_or(0);
            }
            report(
                &progress,
                "partner-removal",
                removed_on_partner,
                moved.len() + dups.len(),
            );
        }
        failpoint("recover-after-partner-removal");
        // 6. What the partner delivered while it was active must not go out again from here.
        let mut removed_here = Vec::new();
        if let Some(c) = client.as_mut() {
            let delivered = c.call(LEDGER, b"").await.map_err(|e| e.to_string())??;
            tokio::task::block_in_place(|| -> Result<(), String> {
                for line in String::from_utf8_lossy(&delivered).lines() {
                    let Ok(id) = line.parse::<MessageId>() else {
                        continue;
                    };
                    for f in Folder::REPLICATED {
                        if self.layout.path(f, &id, Part::Env).exists() {
                            self.lifecycle
                                .remove(&id, f, false)
                                .map_err(|e| format!("{e:#}"))?;
                            removed_here.push(id.to_string());
                            if removed_here.len() == 1 {
                                failpoint("recover-mid-local-removal");
                            }
                        }
                    }
                }
                Ok(())
            })?;
        }
        failpoint("recover-after-local-removal");
        // What the partner holds changed (moved ids removed there): replicate anew what is
        // held here, moved mail included.
        if let Some(r) = &self.replicator {
            r.log().request_rebuild();
            r.notify();
        }
        tracing::warn!(
            moved = moved.len(),
            duplicates = dups.len(),
            held_here_kept = kept.len(),
            removed_here = removed_here.len(),
            failed = failed.len(),
            "takeover recovery done"
        );
        Ok(json!({
            "dry_run": false,
            "plan": plan,
            "moved": moved.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            "duplicates": dups.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            "held_here_kept": kept,
            "removed_on_partner": removed_on_partner,
            "delivered_by_partner_removed_here": removed_here,
            "failed": failed,
        }))
    }

    /// Makes a spool/ message due now (its envelope's next attempt reset durably).
    fn requeue(&self, id: &MessageId, f: Folder) -> Result<(), String> {
        if f != Folder::Spool {
            return Err(format!("{id}: in {}/, not spool/", f.name()));
        }
        let mut env = self
            .layout
            .read_envelope(f, id)
            .map_err(|e| e.to_string())?;
        if env.next_attempt_ms != 0 {
            env.next_attempt_ms = 0;
            self.layout
                .rewrite_envelope(f, &env)
                .map_err(|e| e.to_string())?;
        }
        self.queue.add(id.clone(), 0);
        Ok(())
    }

    fn each(
        &self,
        ids: &[String],
        op: impl Fn(&MessageId, Folder) -> Result<(), String>,
    ) -> Result<Value, String> {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for id in Self::ids(ids)? {
            let r = match self.locate(&id) {
                Some(f) => op(&id, f),
                None => Err(format!("{id}: not queued")),
            };
            match r {
                Ok(()) => done.push(id.to_string()),
                Err(e) => failed.push(json!({ "id": id.to_string(), "error": e })),
            }
        }
        Ok(json!({ "done": done, "failed": failed }))
    }

    fn status(&self) -> Value {
        let mut depth = serde_json::Map::new();
        for f in Folder::LIVE
            .iter()
            .chain([Folder::Input, Folder::Corrupt].iter())
        {
            let n = std::fs::read_dir(self.layout.dir(*f))
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".env"))
                        .count()
                })
                .unwrap_or(0);
            depth.insert(f.name().into(), json!(n));
        }
        let ha = self.replicator.as_ref().map(|r| {
            let (pending, oldest) = r.log().depth().unwrap_or((0, None));
            let peer = r.peer();
            json!({
                "role": r.role().as_str(),
                "link": if r.link_is_up() { "up" } else { "down" },
                "split_brain": r.split_brain(),
                "pending_actions": pending,
                "oldest_pending_age_ms": oldest.map(|o| now_ms().saturating_sub(o)),
                "last_lag_ms": r.last_lag_ms(),
                "partner": peer.as_ref().map(|p| p.node.clone()),
                "partner_role": peer.as_ref().map(|p| p.role.as_str()),
            })
        });
        json!({
            "role": self.replicator.as_ref().map(|r| r.role().as_str()).unwrap_or("active"),
            "ha": ha,
            "queue": depth,
            "scheduled": self.queue.len(),
        })
    }
}
