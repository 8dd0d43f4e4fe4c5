//! Startup recovery and `input/` insertion: turning whatever a crash or an operator left in the
//! state directory into a consistent spool.
//!
//! Recovery, in order: empty `tmp/`; in each queue folder, re-unite an envelope with a body that
//! a crash left in another folder mid-move; move pairs that fail validation to `corrupt/` with a
//! `<name>.reason` file; remove bodies without an envelope (never acknowledged); report the rest.

use crate::body::MappedBody;
use crate::envelope::Envelope;
use crate::id::MessageId;
use crate::layout::{fsync_dir, remove_if_exists, split_file_name, Folder, Layout, Part};
use std::collections::BTreeMap;
use std::fs;
use std::io;

/// Folders whose pairs are live messages and take part in recovery.
pub const MESSAGE_FOLDERS: [Folder; 4] = [
    Folder::Spool,
    Folder::Vscan,
    Folder::Quarantine,
    Folder::Hold,
];

/// A valid message found on disk.
#[derive(Clone, Debug)]
pub struct FoundMessage {
    /// Its id.
    pub id: MessageId,
    /// Where it is.
    pub folder: Folder,
    /// Body length from the (verified) envelope.
    pub body_len: u64,
    /// When to try it next, ms since the epoch.
    pub next_attempt_ms: u64,
}

/// A pair set aside for an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptPair {
    /// File stem as found.
    pub name: String,
    /// Folder it was found in.
    pub folder: Folder,
    /// Why it was rejected.
    pub reason: String,
}

/// What recovery did.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Valid messages, sorted by id (arrival order) within each folder.
    pub found: Vec<FoundMessage>,
    /// Files removed from `tmp/`.
    pub tmp_removed: usize,
    /// Bodies without an envelope, removed.
    pub orphans_removed: usize,
    /// Bodies moved back next to their envelope after an interrupted move.
    pub reunited: usize,
    /// Pairs moved to `corrupt/`.
    pub corrupt: Vec<CorruptPair>,
}

#[derive(Default)]
struct Pair {
    env: bool,
    body: bool,
}

fn list_pairs(layout: &Layout, folder: Folder) -> io::Result<BTreeMap<String, Pair>> {
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    for entry in fs::read_dir(layout.dir(folder))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((stem, part)) = split_file_name(name) {
            let p = pairs.entry(stem.to_string()).or_default();
            match part {
                Part::Env => p.env = true,
                Part::Body => p.body = true,
            }
        }
    }
    Ok(pairs)
}

/// Reads and checks an envelope whose file is named `stem`: decodes it, checks the id matches
/// the file name and the body's length on disk. With `verify_body` the body's SHA-256 too.
pub fn validate_pair(
    layout: &Layout,
    folder: Folder,
    stem: &str,
    verify_body: bool,
) -> Result<Envelope, String> {
    let dir = layout.dir(folder);
    let env_path = dir.join(format!("{stem}.env"));
    let bytes = fs::read(&env_path).map_err(|e| format!("read envelope: {e}"))?;
    let env = Envelope::decode(&bytes).map_err(|e| e.to_string())?;
    if env.id.to_string() != stem {
        return Err(format!("envelope id {} does not match file name", env.id));
    }
    let body_path = dir.join(format!("{stem}.body"));
    if verify_body {
        MappedBody::open_verified(&body_path, env.body_len, &env.body_sha256)
            .map_err(|e| e.to_string())?;
    } else {
        let len = fs::metadata(&body_path)
            .map_err(|e| format!("body: {e}"))?
            .len();
        if len != env.body_len {
            return Err(format!(
                "body is {len} bytes, envelope says {}",
                env.body_len
            ));
        }
    }
    Ok(env)
}

/// Moves whatever exists of pair `stem` from `folder` to `corrupt/` with a reason file.
pub fn set_aside(layout: &Layout, folder: Folder, stem: &str, reason: &str) -> io::Result<()> {
    let from = layout.dir(folder);
    let to = layout.dir(Folder::Corrupt);
    for ext in ["body", "env"] {
        let name = format!("{stem}.{ext}");
        match fs::rename(from.join(&name), to.join(&name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let reason_line = format!("{}: {reason}\n", folder.name());
    fs::write(to.join(format!("{stem}.reason")), reason_line)?;
    fsync_dir(&to)?;
    fsync_dir(&from)
}

/// Runs startup recovery. Idempotent: running it twice changes nothing the second time.
pub fn recover(layout: &Layout) -> io::Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
    let tmp = layout.dir(Folder::Tmp);
    for entry in fs::read_dir(&tmp)? {
        remove_if_exists(&entry?.path())?;
        report.tmp_removed += 1;
    }
    fsync_dir(&tmp)?;

    let mut listings: Vec<(Folder, BTreeMap<String, Pair>)> = MESSAGE_FOLDERS
        .iter()
        .map(|&f| list_pairs(layout, f).map(|p| (f, p)))
        .collect::<io::Result<_>>()?;

    // An interrupted move_pair leaves the body in the destination and the envelope in the source.
    for i in 0..listings.len() {
        let stems: Vec<String> = listings[i]
            .1
            .iter()
            .filter(|(_, p)| p.env && !p.body)
            .map(|(s, _)| s.clone())
            .collect();
        for stem in stems {
            let here = listings[i].0;
            let elsewhere = (0..listings.len())
                .find(|&j| j != i && listings[j].1.get(&stem).is_some_and(|p| p.body && !p.env));
            if let Some(j) = elsewhere {
                let there = listings[j].0;
                let name = format!("{stem}.body");
                fs::rename(layout.dir(there).join(&name), layout.dir(here).join(&name))?;
                fsync_dir(&layout.dir(here))?;
                fsync_dir(&layout.dir(there))?;
                listings[j].1.remove(&stem);
                if let Some(p) = listings[i].1.get_mut(&stem) {
                    p.body = true;
                }
                report.reunited += 1;
            }
        }
    }

    for (folder, pairs) in listings {
        let dir = layout.dir(folder);
        let mut removed_any = false;
        for (stem, pair) in pairs {
            if !pair.env {
                // The envelope is written last: a lone body was never acknowledged.
                remove_if_exists(&dir.join(format!("{stem}.body")))?;
                report.orphans_removed += 1;
                removed_any = true;
                tracing::info!(name = %stem, folder = folder.name(), "removed orphan body");
                continue;
            }
            match validate_pair(layout, folder, &stem, false) {
                Ok(env) => report.found.push(FoundMessage {
                    id: env.id,
                    folder,
                    body_len: env.body_len,
                    next_attempt_ms: env.next_attempt_ms,
                }),
                Err(reason) => {
                    tracing::error!(name = %stem, folder = folder.name(), %reason, "moved to corrupt/");
                    set_aside(layout, folder, &stem, &reason)?;
                    report.corrupt.push(CorruptPair {
                        name: stem,
                        folder,
                        reason,
                    });
                }
            }
        }
        if removed_any {
            fsync_dir(&dir)?;
        }
    }
    Ok(report)
}

/// What insertion did with one pair from `input/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Moved into `spool/`.
    Inserted(MessageId),
    /// Already spooled with the same content; removed from `input/`.
    Duplicate(MessageId),
    /// Failed validation; moved to `corrupt/`.
    Corrupt {
        /// File stem.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Inserts every pair in `input/` whose envelope is present: full validation (body checksum
/// included), then a move into `spool/`. Bodies without an envelope are left alone: an operator
/// may still be copying (copy the `.body` first, then the `.env`).
pub fn insert_input(layout: &Layout) -> io::Result<Vec<InsertOutcome>> {
    let mut outcomes = Vec::new();
    let mut inserted = Vec::new();
    for (stem, pair) in list_pairs(layout, Folder::Input)? {
        if !pair.env {
            continue;
        }
        let env = match validate_pair(layout, Folder::Input, &stem, true) {
            Ok(env) => env,
            Err(reason) => {
                tracing::error!(name = %stem, %reason, "input pair rejected, moved to corrupt/");
                set_aside(layout, Folder::Input, &stem, &reason)?;
                outcomes.push(InsertOutcome::Corrupt { name: stem, reason });
                continue;
            }
        };
        let held = MESSAGE_FOLDERS
            .iter()
            .find(|&&f| layout.path(f, &env.id, Part::Env).exists());
        if let Some(&folder) = held {
            match validate_pair(layout, folder, &stem, false) {
                Ok(existing) if existing.body_sha256 == env.body_sha256 => {
                    remove_if_exists(&layout.path(Folder::Input, &env.id, Part::Env))?;
                    remove_if_exists(&layout.path(Folder::Input, &env.id, Part::Body))?;
                    tracing::info!(id = %env.id, "input pair already spooled, removed from input/");
                    outcomes.push(InsertOutcome::Duplicate(env.id));
                }
                _ => {
                    let reason =
                        format!("id already held in {}/ with other content", folder.name());
                    set_aside(layout, Folder::Input, &stem, &reason)?;
                    outcomes.push(InsertOutcome::Corrupt { name: stem, reason });
                }
            }
            continue;
        }
        fs::rename(
            layout.path(Folder::Input, &env.id, Part::Body),
            layout.path(Folder::Spool, &env.id, Part::Body),
        )?;
        fs::rename(
            layout.path(Folder::Input, &env.id, Part::Env),
            layout.path(Folder::Spool, &env.id, Part::Env),
        )?;
        inserted.push(env.id);
    }
    fsync_dir(&layout.dir(Folder::Spool))?;
    fsync_dir(&layout.dir(Folder::Input))?;
    for id in inserted {
        tracing::info!(id = %id, "new mail inserted (id={id})");
        outcomes.push(InsertOutcome::Inserted(id));
    }
    Ok(outcomes)
}
