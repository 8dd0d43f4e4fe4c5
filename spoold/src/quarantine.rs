//! The quarantine as its recipients see it in the console's inbox: this unit's `quarantine/`
//! folder listed for a scope of addresses (with the reason and the Subject), and the one
//! decision of what a recipient may do with a quarantined message ([`may`], table-tested).
//! Other units ask for it over the cluster link or the partner link
//! (`cluster::membership::Quarantine`).
//!
//! Not here: the scan stage that puts mail in quarantine (`filter`), the operator's queue
//! tools (`spoolctl queue`, the admin socket), which may do anything with it.

use spool::envelope::ScanState;
use spool::id::MessageId;
use spool::{Folder, Layout, Part};

/// What a recipient asks to do with a quarantined message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Deliver it after all.
    Release,
    /// Remove it for good.
    Delete,
}

/// Whether a recipient may do `act` with a message quarantined for `scan`. An infected message
/// is never released or deleted by its recipient: the virus stays with the operator, who
/// decides (`spoolctl queue`). Mail a milter held (spam) is the recipient's to release (it
/// then passes the virus scan like any other) or delete.
pub fn may(scan: &ScanState, act: Act) -> bool {
    match (scan, act) {
        (ScanState::Infected(_), _) => false,
        (ScanState::Held(_), Act::Release | Act::Delete) => true,
        // Anything else in quarantine/ was put there by an operator: theirs.
        (ScanState::Pending | ScanState::Clean | ScanState::Unscanned, _) => false,
    }
}

/// Why a message is held, as its recipient reads it.
fn reason(scan: &ScanState) -> String {
    match scan {
        ScanState::Infected(name) => format!("virus: {name}"),
        ScanState::Held(why) => format!("held by a filter: {why}"),
        ScanState::Pending | ScanState::Clean | ScanState::Unscanned => {
            "held by the operator".to_string()
        }
    }
}

/// This unit's quarantine desk.
pub struct Desk {
    /// Paths.
    pub layout: Layout,
    /// This unit's node name.
    pub node: String,
    /// Moves and removals (logged for the partner, counted, scheduled).
    pub lifecycle: std::sync::Arc<crate::lifecycle::Lifecycle>,
    /// Per milter name, the command that learns a released message as ham
    /// (`filter.milter.learn_on_release`).
    pub learners: std::collections::HashMap<String, Vec<String>>,
}

/// The milter that held a message, from its `scan held` reason (`NAME: why`).
fn held_by(scan: &ScanState) -> Option<&str> {
    match scan {
        ScanState::Held(reason) => reason.split_once(": ").map(|(name, _)| name),
        _ => None,
    }
}

fn within(scope: Option<&[String]>, address: &str) -> bool {
    scope.is_none_or(|s| s.iter().any(|a| a.eq_ignore_ascii_case(address)))
}

impl Desk {
    fn subject(&self, id: &MessageId) -> Option<String> {
        let head =
            crate::lifecycle::read_head(&self.layout.path(Folder::Quarantine, id, Part::Body));
        archive::mime::headline(&head).subject
    }
}

impl cluster::membership::Quarantine for Desk {
    fn list(&self, scope: Option<&[String]>) -> Result<Vec<api::Quarantined>, String> {
        let dir = match std::fs::read_dir(self.layout.dir(Folder::Quarantine)) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("quarantine/: {e}")),
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".env"))
                .and_then(|n| n.parse::<MessageId>().ok())
            else {
                continue;
            };
            let Ok(env) = self.layout.read_envelope(Folder::Quarantine, &id) else {
                continue;
            };
            let recipients: Vec<String> = env
                .recipients
                .iter()
                .map(|r| r.address.clone())
                .filter(|a| within(scope, a))
                .collect();
            if recipients.is_empty() && !within(scope, &env.sender) {
                continue;
            }
            out.push(api::Quarantined {
                unit: self.node.clone(),
                id: id.to_string(),
                arrived_ms: env.arrived_ms,
                sender: env.sender.clone(),
                recipients,
                size: env.body_len,
                reason: reason(&env.scan),
                subject: self.subject(&id),
                releasable: may(&env.scan, Act::Release),
                deletable: may(&env.scan, Act::Delete),
            });
        }
        Ok(out)
    }

    fn act(
        &self,
        id: &str,
        action: &str,
        scope: Option<&[String]>,
        who: &str,
    ) -> Result<api::QuarantineActed, String> {
        let act = match action {
            "release" => Act::Release,
            "delete" => Act::Delete,
            other => return Err(format!("{other:?} is not release or delete")),
        };
        let not_found = || format!("no quarantined message {id} on {}", self.node);
        let id: MessageId = id.parse().map_err(|_| not_found())?;
        let env = self
            .layout
            .read_envelope(Folder::Quarantine, &id)
            .map_err(|_| not_found())?;
        let mine =
            env.recipients.iter().any(|r| within(scope, &r.address)) || within(scope, &env.sender);
        if !mine {
            return Err(not_found());
        }
        if !may(&env.scan, act) {
            tracing::warn!(
                %id,
                who,
                action,
                reason = %reason(&env.scan),
                "quarantine: a recipient's request refused by the policy"
            );
            return Err(format!(
                "{id} is held for {}: only an administrator can {action} it",
                reason(&env.scan)
            ));
        }
        let failed = |e: anyhow::Error| {
            tracing::error!(%id, who, action, "quarantine: {e:#}");
            format!("{action} of {id} failed on {}", self.node)
        };
        match act {
            Act::Release => {
                let learner = held_by(&env.scan)
                    .and_then(|m| self.learners.get(m))
                    .cloned();
                // Back to the start of the way out: the scan stage, then delivery.
                let mut env = env;
                env.scan = ScanState::Pending;
                env.next_attempt_ms = 0;
                self.layout
                    .rewrite_envelope(Folder::Quarantine, &env)
                    .map_err(|e| failed(e.into()))?;
                self.lifecycle
                    .move_to(&id, Folder::Quarantine, Folder::Spool)
                    .map_err(failed)?;
                if let Some(argv) = learner {
                    learn(
                        argv,
                        self.layout.path(Folder::Spool, &id, Part::Body),
                        id.clone(),
                    );
                }
            }
            Act::Delete => self
                .lifecycle
                .remove(&id, Folder::Quarantine, false)
                .map_err(failed)?,
        }
        let done = if act == Act::Release {
            "released"
        } else {
            "deleted"
        };
        self.lifecycle.track().event(
            &id,
            track::EventKind::Deleted,
            format!("{done} from quarantine by {who}"),
        );
        tracing::info!(%id, who, "quarantine: {done} by a recipient");
        Ok(api::QuarantineActed {
            unit: self.node.clone(),
            id: id.to_string(),
            done: done.to_string(),
        })
    }
}

/// Runs a milter's `learn_on_release` command with the released message on its standard
/// input, on a thread of its own: the release is done whatever the scorer says, and the log
/// has the outcome. (The body is read at once: delivery may remove the file soon.)
fn learn(argv: Vec<String>, body: std::path::PathBuf, id: MessageId) {
    let bytes = match std::fs::read(&body) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(%id, "learn on release: read the message: {e}");
            return;
        }
    };
    std::thread::spawn(move || {
        use std::io::Write;
        let Some((program, args)) = argv.split_first() else {
            return;
        };
        let run = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(&bytes)?;
                }
                child.wait_with_output()
            });
        match run {
            Ok(out) if out.status.success() => {
                tracing::info!(%id, command = %program, "learn on release: done")
            }
            Ok(out) => tracing::warn!(
                %id,
                command = %program,
                status = %out.status,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "learn on release: the command failed"
            ),
            Err(e) => tracing::warn!(%id, command = %program, "learn on release: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipient_never_releases_or_deletes_an_infected_message() {
        let infected = ScanState::Infected("Eicar-Test-Signature".into());
        let table = [
            (&infected, Act::Release, false),
            (&infected, Act::Delete, false),
            (&ScanState::Clean, Act::Release, false),
            (&ScanState::Pending, Act::Delete, false),
            (&ScanState::Held("spam".into()), Act::Release, true),
            (&ScanState::Held("spam".into()), Act::Delete, true),
        ];
        for (scan, act, want) in table {
            assert_eq!(may(scan, act), want, "{scan:?} {act:?}");
        }
        assert_eq!(reason(&infected), "virus: Eicar-Test-Signature");
    }

    #[test]
    fn scopes_compare_addresses_whole_and_without_case() {
        let scope = vec!["bob@example.org".to_string()];
        assert!(within(Some(&scope), "Bob@Example.org"));
        assert!(!within(Some(&scope), "bob@example.org.evil"));
        assert!(!within(Some(&[]), "bob@example.org"));
        assert!(within(None, "anyone@example.net"));
    }
}
