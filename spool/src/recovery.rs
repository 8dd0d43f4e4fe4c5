//! Startup recovery and `input/` insertion: turning whatever a crash or an operator left in the
//! state directory into a consistent spool.
//!
//! Recovery, in order: empty `tmp/`; in each queue folder, re-unite an envelope with a body that
//! a crash left in another folder mid-move; set aside in `corrupt/` (with a `<name>.reason`
//! file) an envelope without its body or a file whose name is not a message id; remove bodies
//! without an envelope (never acknowledged); report the rest.
//!
//! Recovery works from file names alone and reads no envelope: on a cold cache a million
//! envelopes are a million random reads, minutes before the unit could take mail. Like
//! Postfix's queue manager, the daemon checks each message when it first works on it (the
//! envelope decodes and names the file's message, the body has its length and checksum) and
//! sets aside there what fails.

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

/// A message found on disk: its envelope and body are both there (neither was read).
#[derive(Clone, Debug)]
pub struct FoundMessage {
    /// Its id.
    pub id: MessageId,
    /// Where it is.
    pub folder: Folder,
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
    /// Messages whose two files are there, sorted by id (arrival order) within each folder.
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

#[derive(Clone, Copy, Default)]
struct Pair {
    env: bool,
    body: bool,
}

impl Pair {
    fn of(part: Part) -> Pair {
        Pair {
            env: part == Part::Env,
            body: part == Part::Body,
        }
    }

    fn merge(&mut self, other: Pair) {
        self.env |= other.env;
        self.body |= other.body;
    }
}

/// The pairs of one folder: those named by a message id, sorted by it, in one vector (a
/// folder may hold two million files: no map node or string per file), and the few named
/// otherwise (an operator's copy gone wrong).
struct Listing {
    folder: Folder,
    pairs: Vec<(MessageId, Pair)>,
    strangers: BTreeMap<String, Pair>,
}

impl Listing {
    fn find(&self, id: &MessageId) -> Option<usize> {
        self.pairs.binary_search_by(|(p, _)| p.cmp(id)).ok()
    }
}

fn list_pairs(layout: &Layout, folder: Folder) -> io::Result<Listing> {
    let mut pairs: Vec<(MessageId, Pair)> = Vec::new();
    let mut strangers: BTreeMap<String, Pair> = BTreeMap::new();
    for entry in fs::read_dir(layout.dir(folder))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((stem, part)) = split_file_name(name) else {
            continue;
        };
        match stem.parse::<MessageId>() {
            Ok(id) => pairs.push((id, Pair::of(part))),
            Err(_) => strangers
                .entry(stem.to_string())
                .or_default()
                .merge(Pair::of(part)),
        }
    }
    pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    // The two files of a pair are adjacent now: fold the later into the earlier.
    pairs.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            earlier.1.merge(later.1);
        }
        same
    });
    Ok(Listing {
        folder,
        pairs,
        strangers,
    })
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

/// An interrupted `move_pair` leaves the body in the destination and the envelope in the
/// source: the body goes back next to its envelope. Returns how many were re-united.
fn reunite(layout: &Layout, listings: &mut [Listing]) -> io::Result<usize> {
    let mut reunited = 0;
    for i in 0..listings.len() {
        for k in 0..listings[i].pairs.len() {
            let (id, pair) = &listings[i].pairs[k];
            if !pair.env || pair.body {
                continue;
            }
            let elsewhere = (0..listings.len()).filter(|&j| j != i).find_map(|j| {
                let at = listings[j].find(id)?;
                let p = listings[j].pairs[at].1;
                (p.body && !p.env).then_some((j, at))
            });
            let Some((j, at)) = elsewhere else { continue };
            let (here, there) = (listings[i].folder, listings[j].folder);
            let name = format!("{id}.body");
            fs::rename(layout.dir(there).join(&name), layout.dir(here).join(&name))?;
            fsync_dir(&layout.dir(here))?;
            fsync_dir(&layout.dir(there))?;
            listings[j].pairs[at].1.body = false;
            listings[i].pairs[k].1.body = true;
            reunited += 1;
        }
    }
    Ok(reunited)
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

    let mut listings: Vec<Listing> = MESSAGE_FOLDERS
        .iter()
        .map(|&f| list_pairs(layout, f))
        .collect::<io::Result<_>>()?;
    report.reunited = reunite(layout, &mut listings)?;

    for listing in listings {
        let folder = listing.folder;
        let dir = layout.dir(folder);
        let mut removed_any = false;
        let mut orphan = |stem: &str| -> io::Result<()> {
            // The envelope is written last: a lone body was never acknowledged.
            remove_if_exists(&dir.join(format!("{stem}.body")))?;
            tracing::info!(name = %stem, folder = folder.name(), "removed orphan body");
            removed_any = true;
            Ok(())
        };
        let mut corrupt = Vec::new();
        for (id, pair) in listing.pairs {
            match (pair.env, pair.body) {
                (true, true) => report.found.push(FoundMessage { id, folder }),
                (true, false) => corrupt.push((id.to_string(), "body missing".to_string())),
                (false, true) => {
                    orphan(&id.to_string())?;
                    report.orphans_removed += 1;
                }
                // A body re-united with its envelope elsewhere.
                (false, false) => {}
            }
        }
        for (stem, pair) in listing.strangers {
            if pair.env {
                corrupt.push((stem, "file name is not a message id".to_string()));
            } else {
                orphan(&stem)?;
                report.orphans_removed += 1;
            }
        }
        if removed_any {
            fsync_dir(&dir)?;
        }
        for (name, reason) in corrupt {
            tracing::error!(name = %name, folder = folder.name(), %reason, "moved to corrupt/");
            set_aside(layout, folder, &name, &reason)?;
            report.corrupt.push(CorruptPair {
                name,
                folder,
                reason,
            });
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
    let listing = list_pairs(layout, Folder::Input)?;
    let stems = listing
        .pairs
        .into_iter()
        .map(|(id, pair)| (id.to_string(), pair))
        .chain(listing.strangers);
    for (stem, pair) in stems {
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
