//! The admin socket: a unix socket in the state directory (mode 0600) where `spoolctl` sends one
//! request per connection and gets one answer line back (a recovery that asked for `progress`
//! gets progress lines before it); the requests and replies are typed in the `api` crate. Queue
//! tools in the manner of postqueue/postsuper: list, show, hold, release, requeue, delete,
//! flush; plus insert, role and status. Takeover recovery is in `takeover.rs`.

mod takeover;

use crate::clock::now_ms;
use crate::queue::Queue;
use api::{Cluster, Line, Local, Long, Request};
use evidence::audit::Asker;
use serde::Serialize;
use serde_json::Value;
use spool::recovery::InsertOutcome;
use spool::{Folder, Layout, MessageId, Part, RcptState};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Sends one progress line, if the client asked for them.
async fn write_progress<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    progress: api::Progress,
    asked: bool,
) {
    if asked {
        let _ = w
            .write_all(Line::Progress { progress }.to_wire().as_bytes())
            .await;
    }
}

/// Runs `work`, sending the progress lines it reports (if asked) before its answer.
async fn with_progress<W, T>(
    w: &mut W,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<api::Progress>,
    work: impl std::future::Future<Output = Result<T, String>>,
    asked: bool,
) -> Line
where
    W: tokio::io::AsyncWrite + Unpin,
    T: Serialize,
{
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            biased;
            Some(p) = rx.recv() => write_progress(w, p, asked).await,
            r = &mut work => break r,
        }
    };
    // Steps reported since the last await.
    while let Ok(p) = rx.try_recv() {
        write_progress(w, p, asked).await;
    }
    match result {
        Ok(data) => Line::reply(&data),
        Err(e) => Line::refused(e),
    }
}

/// A typed reply as the answer's data.
fn reply<T: Serialize>(reply: T) -> Result<Value, String> {
    serde_json::to_value(reply).map_err(|e| format!("encode the reply: {e}"))
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
    pub activity: Arc<crate::ha::handover::Activity>,
    /// Every insertion, move and removal goes through it.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// The archive, unless disabled.
    pub archiving: Option<Arc<crate::archiving::Archiving>>,
    /// Who shares clustered settings with this unit.
    pub membership: Arc<crate::clustered::Membership>,
}

/// The archive's passes that report progress.
#[derive(Clone)]
enum ArchivePass {
    Retention,
    Reindex,
    Verify {
        start: evidence::proof::Start,
        /// Compare with the checkpoints the mirror peers keep, and those in the object store.
        against: (bool, bool),
    },
    Rebuild,
    Rekey,
    Import {
        paths: Vec<String>,
        mboxo: bool,
        report: Option<String>,
        imap: Option<api::ImapSource>,
    },
    BulkExport {
        query: String,
        format: String,
        out: String,
    },
}

/// The asker for the audit log: the socket peer's uid and its user name.
fn asker(uid: Option<u32>) -> Asker {
    let Some(uid) = uid else {
        return Asker {
            uid: u32::MAX,
            user: "unknown (no peer credentials)".into(),
        };
    };
    Asker {
        uid,
        user: user_name(uid).unwrap_or_else(|| format!("uid {uid}")),
    }
}

/// The user name of `uid` from the system's user database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: getpwuid_r writes into `pwd` and `buf` (sized as given) and sets `result` to
    // `&pwd` or null; nothing is kept past this call.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(pwd.pw_name)
            .to_str()
            .ok()
            .map(str::to_string)
    }
}

fn folder_named(name: &str) -> Option<Folder> {
    Folder::ALL.into_iter().find(|f| f.name() == name)
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
                // Who asks, for the audit log: the kernel's word for the peer's uid.
                let who = asker(stream.peer_cred().ok().map(|c| c.uid()));
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let mut r = BufReader::new(r).take(1 << 20);
                    if r.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let reply = match serde_json::from_str::<Request>(&line) {
                        Ok(Request::Long(req)) => {
                            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                            let progress = req.progress();
                            with_progress(&mut w, rx, me.long(req, tx, who), progress).await
                        }
                        Ok(req) => match me.answer(req, who).await {
                            Ok(data) => Line::reply(&data),
                            Err(e) => Line::refused(e),
                        },
                        Err(e) => Line::refused(format!("bad request: {e}")),
                    };
                    let _ = w.write_all(reply.to_wire().as_bytes()).await;
                });
            }
        });
        Ok(())
    }

    /// Answers a request in `who`'s name, for the socket and the console alike: local
    /// requests on a blocking thread, cluster requests here. Long work with progress lines is
    /// the socket's (it streams them); the console may start a bulk export without them.
    pub async fn answer(self: &Arc<Self>, req: Request, who: Asker) -> Result<Value, String> {
        match req {
            Request::Local(req) => {
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.handle(req, &who))
                    .await
                    .map_err(|e| e.to_string())?
            }
            Request::Cluster(req) => self.cluster(req).await,
            // A bulk export for the console's download, without progress lines.
            Request::Long(req @ Long::ArchiveBulkExport { .. }) => {
                let (tx, _progress) = tokio::sync::mpsc::unbounded_channel();
                self.long(req, tx, who).await
            }
            Request::Long(_) => Err("long work is started with spoolctl on the unit".into()),
        }
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

    /// Long work with progress lines: takeover recovery (on the async threads, since it waits
    /// on the partner) and the archive's passes (on a blocking thread).
    async fn long(
        self: &Arc<Self>,
        req: Long,
        tx: tokio::sync::mpsc::UnboundedSender<api::Progress>,
        who: Asker,
    ) -> Result<Value, String> {
        let archive_pass = match req {
            Long::Recover {
                dry_run, from_dir, ..
            } => return reply(self.recover(dry_run, from_dir, tx).await?),
            Long::ArchiveRetention { .. } => ArchivePass::Retention,
            Long::ArchiveReindex { .. } => ArchivePass::Reindex,
            Long::ArchiveVerify {
                from_checkpoint,
                since_ms,
                against_peers,
                against_store,
                ..
            } => ArchivePass::Verify {
                start: evidence::proof::Start::from_flags(since_ms, from_checkpoint),
                against: (against_peers, against_store),
            },
            Long::ArchiveRebuild { .. } => ArchivePass::Rebuild,
            Long::ArchiveRekey { .. } => ArchivePass::Rekey,
            Long::ArchiveImport {
                paths,
                mboxo,
                report,
                imap,
                password_file,
                ca_file,
                since,
                ..
            } => ArchivePass::Import {
                paths,
                mboxo,
                report,
                imap: imap.map(|url| api::ImapSource {
                    url,
                    password_file,
                    ca_file,
                    since,
                }),
            },
            Long::ArchiveBulkExport {
                query, format, out, ..
            } => ArchivePass::BulkExport { query, format, out },
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.archive_pass(archive_pass, tx, &who))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Clustered settings, membership and tracking: requests that wait on other units.
    async fn cluster(&self, req: Cluster) -> Result<serde_json::Value, String> {
        let m = &self.membership;
        let settings = self.membership.settings().clone();
        let text = |e: anyhow::Error| format!("{e:#}");
        let json = |v: Result<serde_json::Value, serde_json::Error>| v.map_err(|e| e.to_string());
        use cluster::GroupChange;
        match req {
            Cluster::ConfigSet { key, value, level } => {
                let value = value
                    .map(|v| cluster::parse_value(&key, &v))
                    .transpose()
                    .map_err(text)?;
                let entry = tokio::task::block_in_place(|| settings.set(&key, &level, value))
                    .map_err(text)?;
                self.settings_changed(key, entry.level.to_string()).await
            }
            Cluster::ConfigCopy {
                key,
                from,
                to,
                remove,
            } => {
                tokio::task::block_in_place(|| settings.copy(&key, &from, &to, remove))
                    .map_err(text)?;
                self.settings_changed(key, to).await
            }
            Cluster::ClusterCheck { resolve_from } => json(serde_json::to_value(
                m.check(resolve_from.as_deref()).await.map_err(text)?,
            )),
            Cluster::ClusterStatus => json(serde_json::to_value(m.status())),
            Cluster::ClusterDisconnect { disconnected, node } => {
                m.disconnect(disconnected, node.as_deref())
                    .await
                    .map_err(text)?;
                json(serde_json::to_value(m.status()))
            }
            Cluster::ClusterCreate { name } => {
                json(serde_json::to_value(m.create(&name).await.map_err(text)?))
            }
            Cluster::ClusterJoin { addr } => {
                json(serde_json::to_value(m.join(&addr).await.map_err(text)?))
            }
            Cluster::ClusterLeave => json(serde_json::to_value(m.leave().await.map_err(text)?)),
            Cluster::ClusterRemove { node } => {
                json(serde_json::to_value(m.remove(&node).await.map_err(text)?))
            }
            Cluster::ClusterList => json(serde_json::to_value(m.list(Vec::new()))),
            Cluster::GroupAdd { name } => json(serde_json::to_value(
                m.group(GroupChange::Add(name)).await.map_err(text)?,
            )),
            Cluster::GroupRename { from, to } => json(serde_json::to_value(
                m.group(GroupChange::Rename(from, to)).await.map_err(text)?,
            )),
            Cluster::GroupDelete { name } => json(serde_json::to_value(
                m.group(GroupChange::Delete(name)).await.map_err(text)?,
            )),
            Cluster::MachineSetGroup { node, group } => json(serde_json::to_value(
                m.group(GroupChange::SetGroup(node, group))
                    .await
                    .map_err(text)?,
            )),
            Cluster::UserAdd {
                name,
                role,
                password_hash,
                addresses,
            } => {
                let role: console::policy::Role = role.parse()?;
                let user = console::users::User {
                    role,
                    password: password_hash,
                    addresses,
                };
                self.users_change(&name, "added", |users| {
                    if users.contains_key(&name) {
                        return Err(format!(
                            "user {name} exists (spoolctl user passwd changes a password)"
                        ));
                    }
                    users.insert(name.clone(), user);
                    Ok(())
                })
                .await
            }
            Cluster::UserPasswd {
                name,
                password_hash,
            } => {
                self.users_change(&name, "password changed", |users| {
                    let u = users
                        .get_mut(&name)
                        .ok_or_else(|| format!("no user {name}"))?;
                    u.password = password_hash;
                    Ok(())
                })
                .await
            }
            Cluster::UserDel { name } => {
                self.users_change(&name, "removed", |users| {
                    users
                        .remove(&name)
                        .map(|_| ())
                        .ok_or_else(|| format!("no user {name}"))
                })
                .await
            }
            Cluster::QuarantineList { scope } => {
                json(serde_json::to_value(m.quarantine_list(scope).await?))
            }
            Cluster::QuarantineAct {
                unit,
                id,
                action,
                scope,
                who,
            } => json(serde_json::to_value(
                m.quarantine_act(unit, id, action, scope, who).await?,
            )),
            Cluster::Track { query, limit } => {
                json(serde_json::to_value(m.track(query, limit).await?))
            }
        }
    }

    /// After a change here: sends the settings to every other unit now, and answers what
    /// applies here.
    /// Changes the console's users table (the clustered `console.users`, at the cluster
    /// level), checked as a whole, then sends it to every other unit.
    async fn users_change(
        &self,
        name: &str,
        change: &str,
        edit: impl FnOnce(&mut console::users::Users) -> Result<(), String>,
    ) -> Result<serde_json::Value, String> {
        let settings = self.membership.settings().clone();
        let text = |e: anyhow::Error| format!("{e:#}");
        console::users::check_name(name)?;
        let mut users = settings.effective().map_err(text)?.console.users;
        edit(&mut users)?;
        console::users::check(&users)?;
        let value = serde_json::to_value(&users).map_err(|e| e.to_string())?;
        tokio::task::block_in_place(|| settings.set("console.users", "cluster", Some(value)))
            .map_err(text)?;
        tracing::info!(user = name, change, "console users changed");
        let sent = self.membership.sync_all().await;
        serde_json::to_value(api::UserChanged {
            name: name.to_string(),
            change: change.to_string(),
            sent,
        })
        .map_err(|e| e.to_string())
    }

    async fn settings_changed(
        &self,
        key: String,
        level: String,
    ) -> Result<serde_json::Value, String> {
        let settings = self.membership.settings();
        let sent = self.membership.sync_all().await;
        serde_json::to_value(api::ConfigChanged {
            effective: settings
                .effective_value(&key)
                .map_err(|e| format!("{e:#}"))?,
            key,
            level,
            sent,
        })
        .map_err(|e| e.to_string())
    }

    fn archiving(&self) -> Result<&crate::archiving::Archiving, String> {
        self.archiving
            .as_deref()
            .ok_or_else(|| "the archive is disabled (archive.enabled = false)".to_string())
    }

    /// The archive's long passes, reporting progress.
    fn archive_pass(
        &self,
        pass: ArchivePass,
        tx: tokio::sync::mpsc::UnboundedSender<api::Progress>,
        who: &Asker,
    ) -> Result<Value, String> {
        let a = self.archiving()?;
        let (action, detail) = match pass {
            ArchivePass::Retention => ("archive retention", String::new()),
            ArchivePass::Reindex => ("archive reindex", String::new()),
            ArchivePass::Verify {
                start,
                against: (against_peers, against_store),
            } => (
                "archive verify",
                [
                    match start {
                        evidence::proof::Start::Genesis => String::new(),
                        evidence::proof::Start::NewestCheckpoint => "--from-checkpoint".into(),
                        evidence::proof::Start::Since(ms) => format!("--since {ms}"),
                    },
                    if against_peers {
                        "--against-peers".into()
                    } else {
                        String::new()
                    },
                    if against_store {
                        "--against-store".into()
                    } else {
                        String::new()
                    },
                ]
                .iter()
                .filter(|f| !f.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
            ),
            ArchivePass::Rebuild => ("archive rebuild", String::new()),
            ArchivePass::Rekey => ("archive rekey", String::new()),
            ArchivePass::Import {
                ref paths,
                ref imap,
                ..
            } => (
                "archive import",
                match imap {
                    Some(i) => i.url.clone(),
                    None => paths.join(" "),
                },
            ),
            ArchivePass::BulkExport { .. } => ("archive export", String::new()),
        };
        // A bulk export names its items in its audit line: they are resolved first.
        let (detail, exporting) = match &pass {
            ArchivePass::BulkExport { query, .. } => {
                // Everything archived before the request is searchable first: an export for
                // discovery must not miss what the index has not reached yet.
                a.archive.flush_index().map_err(|e| e.to_string())?;
                let seqs = a.hold_targets(query)?;
                (query.clone(), seqs)
            }
            _ => (detail, Vec::new()),
        };
        a.audited(who, action, &detail, &exporting)?;
        let step = |step: &str, done: u64, total: u64| {
            let _ = tx.send(api::Progress {
                step: step.into(),
                done: done as usize,
                total: total as usize,
            });
        };
        match pass {
            ArchivePass::Retention => {
                let total = a.archive.status().map(|s| s.totals.items).unwrap_or(0);
                reply(a.run_retention(|n| step("expire", n, total))?)
            }
            ArchivePass::Reindex => reply(a.reindex(|d, t| step("reindex", d, t))?),
            ArchivePass::Verify { start, against } => {
                reply(a.verify(start, against, |what, d, t| step(what, d, t))?)
            }
            ArchivePass::Rebuild => reply(a.rebuild(step)?),
            ArchivePass::Import {
                paths,
                mboxo,
                report,
                imap: None,
            } => reply(a.import(&paths, mboxo, report, |d, t| step("import", d, t))?),
            ArchivePass::Import {
                imap: Some(imap),
                report,
                ..
            } => reply(a.import_imap(&imap, report, |d, t| step("import", d, t))?),
            ArchivePass::BulkExport { query, format, out } => {
                reply(a.bulk_export(&exporting, &query, &format, &out, |d, t| {
                    step("export", d, t)
                })?)
            }
            ArchivePass::Rekey => {
                step("rekey", 0, 1);
                let report = a.archive.rekey().map_err(|e| e.to_string())?;
                let (keys, _) = a.archive.data_keys().map_err(|e| e.to_string())?;
                step("rekey", 1, 1);
                reply(api::ArchiveRekeyed {
                    segments: report.segments,
                    resealed: report.resealed,
                    key: keys
                        .iter()
                        .find(|k| k.current)
                        .map(|k| format!("{:08x}", k.id))
                        .unwrap_or_default(),
                })
            }
        }
    }

    /// Requests answered from this unit's own state.
    fn handle(&self, req: Local, who: &Asker) -> Result<Value, String> {
        match req {
            // Archive content: recorded in the audit log (who, what, which items) before the
            // answer; a request the log cannot record is refused.
            Local::ArchiveSearch {
                query,
                limit,
                offset,
                scope,
            } => {
                let a = self.archiving()?;
                let found = a.search(&query, offset, limit, scope.as_deref())?;
                let seqs: Vec<u64> = found.items.iter().map(|i| i.seq).collect();
                a.audited(who, "archive search", &query, &seqs)?;
                reply(found)
            }
            Local::ArchiveShow { id, scope } => {
                let a = self.archiving()?;
                let seq = a.resolve_within(&id, scope.as_deref(), who)?;
                a.audited(who, "archive show", &id, &[seq])?;
                reply(a.show(seq)?)
            }
            Local::ArchiveExport { id, view, scope } => {
                let a = self.archiving()?;
                let seq = a.resolve_within(&id, scope.as_deref(), who)?;
                let action = if view {
                    "archive view"
                } else {
                    "archive export"
                };
                a.audited(who, action, &id, &[seq])?;
                reply(a.export(seq)?)
            }
            Local::ArchiveHold { target, held } => {
                let a = self.archiving()?;
                let seqs = a.hold_targets(&target)?;
                let action = if held {
                    "archive hold"
                } else {
                    "archive unhold"
                };
                a.audited(who, action, &target, &seqs)?;
                reply(a.hold(&seqs, held)?)
            }
            Local::ArchiveStatus => reply(self.archiving()?.status()?),
            Local::UserList => {
                let users = self
                    .membership
                    .settings()
                    .effective()
                    .map_err(|e| format!("{e:#}"))?
                    .console
                    .users;
                reply(
                    users
                        .into_iter()
                        .map(|(name, u)| api::ListedUser {
                            name,
                            role: u.role.name().to_string(),
                            addresses: u.addresses,
                        })
                        .collect::<Vec<_>>(),
                )
            }
            Local::AuditList { from, limit } => {
                let a = self.archiving()?;
                let mut entries: Vec<_> = evidence::audit::list(&a.audit_dir)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .filter(|e| e.n >= from)
                    .collect();
                if let Some(limit) = limit {
                    let cut = entries.len().saturating_sub(limit);
                    entries.drain(..cut);
                }
                reply(entries)
            }
            Local::AuditVerify { against_peers } => {
                reply(self.archiving()?.audit_verify(against_peers)?)
            }
            Local::ArchiveKey => {
                let a = self.archiving()?;
                a.audited(who, "archive key", "", &[])?;
                reply(a.key()?)
            }
            Local::ArchiveKeyRotate => {
                let a = self.archiving()?;
                a.audited(who, "archive key rotate", "", &[])?;
                a.archive.rotate_key().map_err(|e| e.to_string())?;
                reply(a.key()?)
            }
            Local::ArchiveSeal => {
                let a = self.archiving()?;
                reply(api::ArchiveSealed {
                    segment: a.archive.seal().map_err(|e| e.to_string())?,
                    object_store: a.archive.store().remote().is_some(),
                })
            }
            Local::Status => reply(self.status()),
            Local::Role { role } => {
                let r = self
                    .replicator
                    .as_ref()
                    .ok_or("no [ha] section: this unit is standalone")?;
                let role =
                    hasync::proto::Role::parse(&role).ok_or("role must be active or passive")?;
                reply(crate::ha::handover::set_role(r, &self.activity, role)?)
            }
            Local::Insert => {
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
                            corrupt.push(api::Rejected { name, reason });
                        }
                    }
                }
                reply(api::Inserted {
                    inserted,
                    duplicates,
                    corrupt,
                })
            }
            Local::List {
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
                        out.push(api::Listed {
                            id: n,
                            folder: f.name().to_string(),
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
                reply(out)
            }
            Local::Show { id } => {
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
                reply(api::Shown {
                    id: id.to_string(),
                    folder: f.name().to_string(),
                    envelope: String::from_utf8_lossy(&env.encode()).into_owned(),
                    headers: String::from_utf8_lossy(&body[..end.min(64 * 1024)]).into_owned(),
                    attempts: env.attempts,
                    next_attempt_ms: env.next_attempt_ms,
                    last_error: env.last_error.clone(),
                    recipients: env
                        .recipients
                        .iter()
                        .map(|r| api::RecipientState {
                            address: r.address.clone(),
                            state: format!("{:?}", r.state).to_lowercase(),
                        })
                        .collect(),
                })
            }
            Local::Hold { ids } => self.each(&ids, |id, f| {
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
            Local::Release { ids } => self.each(&ids, |id, f| {
                if f != Folder::Hold {
                    return Err(format!("{id}: not held"));
                }
                self.lifecycle
                    .move_to(id, Folder::Hold, Folder::Spool)
                    .map_err(|e| format!("{e:#}"))?;
                self.requeue(id, Folder::Spool)
            }),
            Local::Requeue { ids } => self.each(&ids, |id, f| self.requeue(id, f)),
            Local::Delete { ids } => self.each(&ids, |id, f| {
                if let Some(a) = &self.archiving {
                    // Deleted mail is archived first, as delivered mail is.
                    let env = self
                        .layout
                        .read_envelope(f, id)
                        .map_err(|e| e.to_string())?;
                    a.ensure_blocking(&self.layout, f, &env)
                        .map_err(|e| format!("not deleted: the archive cannot take it: {e}"))?;
                }
                self.lifecycle
                    .remove(id, f, false)
                    .map_err(|e| format!("{e:#}"))?;
                tracing::warn!(id = %id, folder = f.name(), "message deleted by spoolctl");
                self.lifecycle.track().event(
                    id,
                    track::EventKind::Deleted,
                    format!("from {}/ by spoolctl", f.name()),
                );
                Ok(())
            }),
            Local::ConfigExport => {
                let effective = self
                    .membership
                    .settings()
                    .effective()
                    .map_err(|e| format!("{e:#}"))?;
                let text = toml::to_string(&effective).map_err(|e| e.to_string())?;
                reply(api::ConfigExported {
                    toml: format!(
                        "# spoold's configuration in effect on {} (file and clustered settings)\n{text}",
                        effective.node_name
                    ),
                })
            }
            Local::ConfigShow { key } => reply(
                self.membership
                    .settings()
                    .show(key.as_deref())
                    .map_err(|e| format!("{e:#}"))?,
            ),
            Local::Flush => {
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
                reply(api::Flushed { requeued: n })
            }
        }
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
                Err(error) => failed.push(api::Failed {
                    id: id.to_string(),
                    error,
                }),
            }
        }
        reply(api::Each { done, failed })
    }

    fn status(&self) -> api::Status {
        let mut queue = std::collections::BTreeMap::new();
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
            queue.insert(f.name().to_string(), n as u64);
        }
        let ha = self.replicator.as_ref().map(|r| {
            let (pending, oldest) = r.log().depth().unwrap_or((0, None));
            let peer = r.peer();
            api::HaStatus {
                role: r.role().as_str().to_string(),
                link: if r.link_is_up() { "up" } else { "down" }.to_string(),
                split_brain: r.split_brain(),
                pending_actions: pending,
                oldest_pending_age_ms: oldest.map(|o| now_ms().saturating_sub(o)),
                last_lag_ms: r.last_lag_ms(),
                partner: peer.as_ref().map(|p| p.node.clone()),
                partner_role: peer.as_ref().map(|p| p.role.as_str().to_string()),
            }
        });
        api::Status {
            role: self
                .replicator
                .as_ref()
                .map_or("active", |r| r.role().as_str())
                .to_string(),
            ha,
            queue,
            scheduled: self.queue.len() as u64,
        }
    }
}
