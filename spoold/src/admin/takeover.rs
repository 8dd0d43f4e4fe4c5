//! Takeover recovery (`spoolctl recover`): bring the partner's leftovers (or a spool folder
//! copied out of a dead unit) to this active unit, exactly once. A pure [`plan`] decides what
//! happens to each leftover; the steps below carry it out, each idempotent, so a recovery cut
//! short anywhere (this daemon, `spoolctl` or the partner dying) is finished by running it again:
//!
//! 1. list the leftovers; 2. plan; 3. copy the ones to move into `input/`, checksums verified;
//! 4. insert them and verify each is spooled; 5. only then remove, on the partner, what was moved
//!    and the duplicates; 6. remove here what the partner delivered while it was active (its
//!    ledger), with a `DELETE` first; 7. ask replication to rebuild, so the partner gets replicas
//!    of everything held here, the moved mail included.
//!
//! It is not: the protocol (typed in `hasync::recovery`) nor the admin socket (`mod.rs`).

use super::Admin;
use api::{Failed, Planned, Progress, Recovered};
use hasync::{Held, RecoveryClient};
use spool::hex;
use spool::{Folder, MessageId, Part};
use std::path::PathBuf;

/// Where a recovery reports how far it got; a closed receiver is ignored.
pub type ProgressSender = tokio::sync::mpsc::UnboundedSender<Progress>;

fn report(progress: &ProgressSender, step: &str, done: usize, total: usize) {
    let _ = progress.send(Progress {
        step: step.to_string(),
        done,
        total,
    });
}

fn failed(id: impl ToString, error: impl ToString) -> Failed {
    Failed {
        id: id.to_string(),
        error: error.to_string(),
    }
}

/// Crash-test hook: with `SPOOLD_FAILPOINT=<name>` in its environment the daemon dies on the
/// spot (like `kill -9`) when recovery reaches that point. Unset in production, where this is
/// one environment lookup per recovery step (the daemon warns at start when it is set).
fn failpoint(name: &str) {
    if std::env::var("SPOOLD_FAILPOINT").is_ok_and(|v| v == name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}

/// What recovery does with one leftover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A copy of a message held here (same checksum): a replica. This unit delivers the message
    /// once and its `DELETE` removes the copy there; removing it now would only leave the
    /// message without a replica.
    Kept,
    /// This unit delivered it: the copy there is a duplicate, removed there.
    Duplicate,
    /// Mail only the partner has: moved here.
    Move,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Action::Kept => "held here (kept)",
            Action::Duplicate => "duplicate (delivered here)",
            Action::Move => "move",
        }
    }
}

/// The plan: an action for each leftover, from whether a message with the same checksum is
/// held here and whether this unit delivered it (held wins: a message held here is never
/// taken for delivered).
pub fn plan(
    leftovers: &[Held],
    held_here: impl Fn(&Held) -> bool,
    delivered_here: impl Fn(&MessageId) -> bool,
) -> Vec<Action> {
    leftovers
        .iter()
        .map(|l| {
            if held_here(l) {
                Action::Kept
            } else if delivered_here(&l.id) {
                Action::Duplicate
            } else {
                Action::Move
            }
        })
        .collect()
}

/// Where the leftovers come from.
enum Source {
    Partner(Box<RecoveryClient>),
    Folder,
}

impl Admin {
    fn held_locally(&self, l: &Held) -> bool {
        Folder::LIVE.into_iter().any(|f| {
            self.layout
                .read_envelope(f, &l.id)
                .is_ok_and(|e| hex(&e.body_sha256) == l.sha256)
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

    /// Step 1 from a copied-out folder: its `spool/`, `vscan/`, or the folder itself.
    fn list_folder(dir: &str, failures: &mut Vec<Failed>) -> Vec<Held> {
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
                let decoded = std::fs::read(e.path())
                    .map_err(|e| e.to_string())
                    .and_then(|b| spool::Envelope::decode(&b).map_err(|e| e.to_string()));
                match decoded {
                    Ok(env) if env.id.to_string() == stem => out.push(Held {
                        folder: sub.display().to_string(),
                        size: env.body_len,
                        sha256: hex(&env.body_sha256),
                        id: env.id,
                    }),
                    Ok(_) => {
                        failures.push(failed(stem, "envelope id does not match its file name"))
                    }
                    Err(e) => failures.push(failed(stem, e)),
                }
            }
        }
        out
    }

    /// Step 3 for one leftover: its pair, read from the partner or the folder.
    async fn fetch(source: &mut Source, l: &Held) -> Result<(Vec<u8>, Vec<u8>), String> {
        match source {
            Source::Partner(c) => c.fetch(&l.id).await.map_err(|e| e.to_string()),
            Source::Folder => tokio::task::block_in_place(|| {
                let dir = PathBuf::from(&l.folder);
                std::fs::read(dir.join(format!("{}.env", l.id)))
                    .and_then(|e| Ok((e, std::fs::read(dir.join(format!("{}.body", l.id)))?)))
                    .map_err(|e| e.to_string())
            }),
        }
    }

    /// Takeover recovery, every step idempotent (see the module doc).
    pub(crate) async fn recover(
        &self,
        dry_run: bool,
        from_dir: Option<String>,
        progress: ProgressSender,
    ) -> Result<Recovered, String> {
        let mut failures: Vec<Failed> = Vec::new();
        let (mut source, leftovers) = self.leftovers(from_dir.as_deref(), &mut failures).await?;
        report(&progress, "list", leftovers.len(), leftovers.len());
        let actions = self.plan(&leftovers);
        let planned: Vec<Planned> = leftovers
            .iter()
            .zip(&actions)
            .map(|(l, a)| Planned {
                id: l.id.to_string(),
                folder: l.folder.clone(),
                size: l.size,
                action: a.label().to_string(),
            })
            .collect();
        if dry_run {
            return Ok(Recovered {
                dry_run: true,
                plan: planned,
                failed: failures,
                ..Recovered::default()
            });
        }
        let with = |want: Action| -> Vec<&Held> {
            leftovers
                .iter()
                .zip(&actions)
                .filter(|(_, a)| **a == want)
                .map(|(l, _)| l)
                .collect()
        };
        let (to_move, dups, kept) = (
            with(Action::Move),
            with(Action::Duplicate),
            with(Action::Kept),
        );
        failpoint("recover-after-plan");
        let copied = self
            .copy_to_input(&mut source, &to_move, &mut failures, &progress)
            .await;
        failpoint("recover-after-copy");
        let moved = self.insert_copied(copied, &mut failures)?;
        report(&progress, "insert", moved.len(), to_move.len());
        failpoint("recover-after-insert");
        let removed_on_partner = match &mut source {
            Source::Partner(c) => Self::remove_on_partner(c, &moved, &dups, &progress).await?,
            Source::Folder => 0,
        };
        failpoint("recover-after-partner-removal");
        let removed_here = match &mut source {
            Source::Partner(c) => self.remove_delivered_by_partner(c).await?,
            Source::Folder => Vec::new(),
        };
        failpoint("recover-after-local-removal");
        // 7. What the partner holds changed (moved ids removed there): replicate anew what is
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
            failed = failures.len(),
            "takeover recovery done"
        );
        let ids = |v: &[&Held]| v.iter().map(|l| l.id.to_string()).collect::<Vec<_>>();
        Ok(Recovered {
            dry_run: false,
            plan: planned,
            moved: moved.iter().map(|i| i.to_string()).collect(),
            duplicates: ids(&dups),
            held_here_kept: ids(&kept),
            removed_on_partner,
            delivered_by_partner_removed_here: removed_here,
            failed: failures,
        })
    }

    /// Step 1: the leftovers, from a copied-out folder or the partner.
    async fn leftovers(
        &self,
        from_dir: Option<&str>,
        failures: &mut Vec<Failed>,
    ) -> Result<(Source, Vec<Held>), String> {
        if let Some(dir) = from_dir {
            let listed = tokio::task::block_in_place(|| Self::list_folder(dir, failures));
            return Ok((Source::Folder, listed));
        }
        let r = self
            .replicator
            .as_ref()
            .ok_or("no [ha] section: use --from-dir for a copied-out spool")?;
        let mut c = r
            .recovery_client()
            .await
            .map_err(|e| format!("partner: {e}"))?;
        let listed = c.list().await.map_err(|e| e.to_string())?;
        Ok((Source::Partner(Box::new(c)), listed))
    }

    /// Step 2: what happens to each leftover ([`plan`], with what this unit holds and what
    /// its ledger says it delivered).
    fn plan(&self, leftovers: &[Held]) -> Vec<Action> {
        let ledger = self.replicator.as_ref().map(|r| r.log().clone());
        plan(
            leftovers,
            |l| self.held_locally(l),
            |id| {
                ledger
                    .as_ref()
                    .is_some_and(|g| g.was_delivered(id).unwrap_or(false))
            },
        )
    }

    /// Step 3: each leftover to move copied into `input/`, its checksum and length verified;
    /// answers the ids copied.
    async fn copy_to_input(
        &self,
        source: &mut Source,
        to_move: &[&Held],
        failures: &mut Vec<Failed>,
        progress: &ProgressSender,
    ) -> Vec<MessageId> {
        let mut copied = Vec::new();
        for (k, l) in to_move.iter().enumerate() {
            let fetched = Self::fetch(source, l).await;
            // File I/O and fsyncs: off the async worker, which SMTP sessions share.
            let checked = tokio::task::block_in_place(|| {
                fetched.and_then(|(env, body)| self.copy_one(l, &env, &body))
            });
            match checked {
                Ok(()) => {
                    copied.push(l.id.clone());
                    if copied.len() == 1 {
                        failpoint("recover-mid-copy");
                    }
                }
                Err(e) => failures.push(failed(&l.id, e)),
            }
            report(progress, "copy", k + 1, to_move.len());
            // A copy from a local folder never waits: let the progress line out.
            tokio::task::yield_now().await;
        }
        copied
    }

    /// One pair into `input/`, if it is the one listed. Blocking.
    fn copy_one(&self, l: &Held, env: &[u8], body: &[u8]) -> Result<(), String> {
        let decoded = spool::Envelope::decode(env).map_err(|e| e.to_string())?;
        if decoded.id != l.id
            || hex(&spool::body::sha256(body)) != l.sha256
            || decoded.body_len != body.len() as u64
        {
            return Err("checksum or length does not match the envelope".into());
        }
        self.put_input(&l.id, env, body)
            .map_err(|e| e.to_string())?;
        self.lifecycle.track().event_with(
            &l.id,
            track::EventKind::Recovered,
            format!(
                "copied from the partner's {}/ by takeover recovery",
                l.folder
            ),
            crate::lifecycle::tracked(&decoded, body),
        );
        Ok(())
    }

    /// Step 4: `input/` inserted, and every copied id verified spooled; answers those moved.
    fn insert_copied(
        &self,
        copied: Vec<MessageId>,
        failures: &mut Vec<Failed>,
    ) -> Result<Vec<MessageId>, String> {
        tokio::task::block_in_place(|| self.lifecycle.insert_input())
            .map_err(|e| format!("{e:#}"))?;
        let mut moved = Vec::new();
        for id in copied {
            if self.layout.path(Folder::Spool, &id, Part::Env).exists() {
                tracing::info!(id = %id, "new mail inserted (id={id}) by takeover recovery");
                moved.push(id);
            } else {
                failures.push(failed(&id, "not spooled after insertion (see corrupt/)"));
            }
        }
        Ok(moved)
    }

    /// Step 5: only now, on the partner, what was moved and the duplicates removed.
    async fn remove_on_partner(
        c: &mut RecoveryClient,
        moved: &[MessageId],
        dups: &[&Held],
        progress: &ProgressSender,
    ) -> Result<usize, String> {
        let ids: Vec<MessageId> = moved
            .iter()
            .cloned()
            .chain(dups.iter().map(|l| l.id.clone()))
            .collect();
        let removed = c.remove(&ids).await.map_err(|e| e.to_string())?;
        report(progress, "partner-removal", removed, ids.len());
        Ok(removed)
    }

    /// Step 6: what the partner delivered while it was active must not go out again from here
    /// (removed, its `DELETE` first); answers the ids removed.
    async fn remove_delivered_by_partner(
        &self,
        c: &mut RecoveryClient,
    ) -> Result<Vec<String>, String> {
        let delivered = c.ledger().await.map_err(|e| e.to_string())?;
        let mut removed_here = Vec::new();
        tokio::task::block_in_place(|| -> Result<(), String> {
            for id in delivered {
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
        Ok(removed_here)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_keeps_replicas_drops_duplicates_and_moves_the_rest() {
        let ids = spool::IdGenerator::new("gw_b").unwrap();
        let leftover = |sha: &str| Held {
            id: ids.next_id(),
            folder: "spool".into(),
            size: 10,
            sha256: sha.into(),
        };
        // (held here with this checksum, delivered here) → action
        let table = [
            (false, false, Action::Move),
            (true, false, Action::Kept),
            (false, true, Action::Duplicate),
            // Held here wins: a message still held was not delivered for good.
            (true, true, Action::Kept),
        ];
        let leftovers: Vec<Held> = table.iter().map(|_| leftover("ab")).collect();
        let held = |l: &Held| table[leftovers.iter().position(|x| x.id == l.id).unwrap()].0;
        let delivered =
            |id: &MessageId| table[leftovers.iter().position(|x| &x.id == id).unwrap()].1;
        let actions = plan(&leftovers, held, delivered);
        let want: Vec<Action> = table.iter().map(|t| t.2).collect();
        assert_eq!(actions, want);
        assert_eq!(plan(&[], |_| true, |_| true), Vec::<Action>::new());
    }
}
