//! What is stored and exchanged: one entry per (key, level), the conflicts seen, and a unit's
//! whole stored state.

use crate::level::Level;
use crate::stamp::Stamp;
use serde::{Deserialize, Serialize};

/// One setting at one level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key, e.g. `smtp.relay_domains`.
    pub key: String,
    /// Where it applies.
    pub level: Level,
    /// The value (TOML, as JSON); `None`: unset at this level (a tombstone).
    pub value: Option<serde_json::Value>,
    /// When and where it was made.
    pub stamp: Stamp,
    /// The stamps of the entries it replaced where it was made, newest first (at most
    /// [`LINEAGE`]): an older entry among them was seen and overridden, not lost in a race.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<Stamp>,
}

/// Entries of a lineage remembered in [`Entry::supersedes`].
pub const LINEAGE: usize = 8;

impl Entry {
    /// Whether `older` lost to this entry in a race (neither made on the same node, nor seen
    /// and replaced where this one was made).
    pub fn raced(&self, older: &Entry) -> bool {
        self.stamp.node != older.stamp.node && !self.supersedes.contains(&older.stamp)
    }

    /// Whether this is the entry of `key` at `level`.
    pub fn is(&self, key: &str, level: &Level) -> bool {
        self.key == key && self.level == *level
    }
}

/// A change that lost to a newer one for the same key and level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The losing entry.
    pub lost: Entry,
    /// The stamp that won.
    pub winner: Stamp,
}

/// Conflicts kept (the newest).
pub const CONFLICTS_KEPT: usize = 100;

/// A unit's stored state: `<state_dir>/cluster/settings.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Every entry this unit holds.
    pub entries: Vec<Entry>,
    /// The conflicts it knows of.
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
    /// An operator disconnected this unit from the exchanges (`spoolctl cluster disconnect`,
    /// for an upgrade): changes stay here until `reconnect`.
    #[serde(default)]
    pub disconnected: bool,
    /// The cluster this unit is a member of (`create`, `join`; cleared by `leave`).
    #[serde(default)]
    pub cluster: Option<String>,
    /// Members an operator disconnected this unit from (`cluster disconnect NODE`).
    #[serde(default)]
    pub paused: Vec<String>,
}

impl Stored {
    /// The entry of `key` at `level`.
    pub fn find(&self, key: &str, level: &Level) -> Option<&Entry> {
        find(&self.entries, key, level)
    }

    /// The newest stamp among the entries.
    pub fn newest(&self) -> Option<&Stamp> {
        self.entries.iter().map(|e| &e.stamp).max()
    }
}

/// The entry of `key` at `level` in `entries`.
pub fn find<'a>(entries: &'a [Entry], key: &str, level: &Level) -> Option<&'a Entry> {
    entries.iter().find(|e| e.is(key, level))
}

/// Puts `e` in place of the entry of its key and level, or adds it.
pub fn upsert(entries: &mut Vec<Entry>, e: Entry) {
    match entries.iter_mut().find(|m| m.is(&e.key, &e.level)) {
        Some(m) => *m = e,
        None => entries.push(e),
    }
}

/// Membership: the address of a member's cluster link, at `machine:<node>`.
pub const MEMBER_KEY: &str = "cluster.member";
/// A group exists (`spoolctl group add`), at `group:<name>`.
pub const GROUP_MARK_KEY: &str = "cluster.group";
/// The key that puts a node in a group (set at `machine:<node>`; its value is the group name).
pub const GROUP_KEY: &str = "machine.group";
