//! Clustered configuration: settings changed on any unit reach the others (the HA partner, or
//! every member of the unit's cluster) and apply live, validated where they are made. Each setting is stored per level (`cluster`,
//! `group:<name>`, or `machine:<node>`), with a hybrid logical clock stamp; the newest stamp of
//! a (key, level) wins on every unit, and a change that loses is logged and kept in the list of
//! conflicts. The store is `<state_dir>/cluster/settings.json` (written whole: temporary file,
//! fsync, rename, directory fsync).
//!
//! Effective value of a key on a unit: its `machine` entry, else its group's (the group is the
//! `machine.group` entry of the node), else the `cluster` entry, else the configuration file.
//! An entry may hold an explicit empty list (which overrides) or be a tombstone
//! (`config unset`: the level no longer sets it).
//!
//! Membership is stored here too, as entries that merge like settings: `cluster.member` at
//! `machine:<node>` (the member's cluster-link address; unset when it left) and `cluster.group`
//! at `group:<name>` (the group exists). The cluster's name is this unit's own: set by
//! `create` or `join`, cleared by `leave`; exchanges between units of different clusters (or a
//! member and a unit in none) are refused.
//!
//! Not here: the transport and who is asked (`membership.rs`).

use crate::config::Config;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Mutex;

/// Keys that can be clustered, and that apply live.
pub const CLUSTERABLE: &[&str] = &[
    "smtp.relay_domains",
    "smtp.trusted_networks",
    "smtp.message_bytes_max",
    "smtp.recipients_max",
    "smtp.idle_timeout_secs",
    "delivery.default_next_hop",
    "delivery.routes",
    "delivery.retry_schedule_secs",
    "delivery.queue_lifetime_secs",
    "delivery.tls",
    "filter.fail_open",
    "filter.retry_secs",
    "filter.notify_sender",
    "archive.retention_days",
];

/// Keys that never leave their unit (its identity, addresses, secrets and role).
pub const MACHINE_ONLY: &[&str] = &[
    "node_name",
    "hostname",
    "state_dir",
    "smtp.listen",
    "smtp.tls_cert",
    "smtp.tls_key",
    "http.listen",
    "ha.partner",
    "ha.listen",
    "ha.secret",
    "ha.secret_file",
    "ha.tls_cert",
    "ha.tls_key",
    "ha.role",
    "ha.priority",
    "archive.dir",
    "archive.listen",
    "archive.secret",
    "archive.secret_file",
    "cluster.listen",
    "cluster.advertise",
    "cluster.secret",
    "cluster.secret_file",
];

/// Membership: the address of a member's cluster link, at `machine:<node>`.
pub const MEMBER_KEY: &str = "cluster.member";
/// A group exists (`spoolctl group add`), at `group:<name>`.
pub const GROUP_MARK_KEY: &str = "cluster.group";

/// A hybrid logical clock stamp: ms since the epoch, a counter within the ms, the node that
/// made it. Ordered in that order, so ties between nodes resolve the same way everywhere.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    /// Wall-clock ms (never behind any stamp seen).
    pub ms: u64,
    /// Orders stamps made within one ms.
    pub counter: u32,
    /// The node that made the change.
    pub node: String,
}

/// One setting at one level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key, e.g. `smtp.relay_domains`.
    pub key: String,
    /// `cluster`, `group:<name>` or `machine:<node>`.
    pub level: String,
    /// The value (TOML, as JSON); `None`: unset at this level.
    pub value: Option<serde_json::Value>,
    /// When and where it was made.
    pub stamp: Stamp,
    /// The stamps of the entries it replaced where it was made, newest first (a few): an older
    /// entry among them was seen and overridden, not lost in a race.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<Stamp>,
}

/// Entries of a lineage remembered in [`Entry::supersedes`].
const LINEAGE: usize = 8;

impl Entry {
    /// Whether `older` lost to this entry in a race (neither made on the same node, nor seen
    /// and replaced where this one was made).
    fn raced(&self, older: &Entry) -> bool {
        self.stamp.node != older.stamp.node && !self.supersedes.contains(&older.stamp)
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

/// What units exchange: every entry one holds (the receiver keeps the newest of each).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Exchange {
    /// Protocol version; a unit refuses another version's entries and says so.
    pub version: u32,
    /// The entries.
    pub entries: Vec<Entry>,
    /// Only asking: the answerer sends its entries and merges nothing (`cluster check`).
    #[serde(default)]
    pub peek: bool,
    /// The sender's cluster (none: a pair outside any cluster); units of different clusters
    /// exchange nothing.
    #[serde(default)]
    pub cluster: Option<String>,
    /// The sender's node name.
    #[serde(default)]
    pub from: String,
    /// The conflicts the sender knows of: every unit reports every lost change, wherever the
    /// race was seen.
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
}

/// The protocol version of [`Exchange`].
pub const PROTOCOL: u32 = 1;

#[derive(Default, Serialize, Deserialize)]
struct Stored {
    entries: Vec<Entry>,
    #[serde(default)]
    conflicts: Vec<Conflict>,
    /// An operator disconnected this unit from the exchanges (`spoolctl cluster disconnect`,
    /// for an upgrade): changes stay here until `reconnect`.
    #[serde(default)]
    disconnected: bool,
    /// The cluster this unit is a member of (`create`, `join`; cleared by `leave`).
    #[serde(default)]
    cluster: Option<String>,
    /// Members an operator disconnected this unit from (`cluster disconnect NODE`).
    #[serde(default)]
    paused: Vec<String>,
}

/// This unit's clustered settings.
pub struct Settings {
    node: String,
    path: PathBuf,
    /// The configuration as the file (and command line) gave it.
    file: Config,
    state: Mutex<(Stored, Stamp)>,
    /// Told the effective configuration after every change.
    apply: Box<dyn Fn(&Config) + Send + Sync>,
}

fn now_ms() -> u64 {
    crate::sink::now_ms()
}

/// A level as stored: `cluster` or `machine:<node>`.
pub fn level_name(level: &str, node: &str) -> Result<String> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 32
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    match level.split_once(':') {
        None if level == "cluster" => Ok("cluster".into()),
        None if level == "machine" => Ok(format!("machine:{node}")),
        Some(("group", g)) if name_ok(g) => Ok(level.to_string()),
        Some(("machine", n)) if name_ok(n) => Ok(level.to_string()),
        _ => bail!(
            "level `{level}`: must be cluster, group:NAME or machine[:NODE] (names: a-z, 0-9, _ and -)"
        ),
    }
}

/// The key that puts a node in a group (set at `machine:<node>`; its value is the group name).
pub const GROUP_KEY: &str = "machine.group";

impl Settings {
    /// Opens the store under `state_dir/cluster/` (created); `apply` is called with the
    /// effective configuration now and after every change.
    pub fn open(file: &Config, apply: Box<dyn Fn(&Config) + Send + Sync>) -> Result<Settings> {
        let dir = file.state_dir.join("cluster");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("settings.json");
        let stored: Stored = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{}: unreadable", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let last = stored
            .entries
            .iter()
            .map(|e| e.stamp.clone())
            .max()
            .unwrap_or(Stamp {
                ms: 0,
                counter: 0,
                node: String::new(),
            });
        let s = Settings {
            node: file.node_name.clone(),
            path,
            file: file.clone(),
            state: Mutex::new((stored, last)),
            apply,
        };
        let effective = s.effective()?;
        (s.apply)(&effective);
        Ok(s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Stored, Stamp)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration in effect here: the file's, with the clustered entries on top.
    pub fn effective(&self) -> Result<Config> {
        effective(&self.file, &self.node, &self.lock().0.entries)
    }

    /// Every entry and the conflicts seen.
    pub fn entries(&self) -> (Vec<Entry>, Vec<Conflict>) {
        let st = self.lock();
        (st.0.entries.clone(), st.0.conflicts.clone())
    }

    /// The file's value of `key`, as TOML text.
    pub fn file_value(&self, key: &str) -> Option<serde_json::Value> {
        value_of(&self.file, key)
    }

    /// The effective value of `key` here.
    pub fn effective_value(&self, key: &str) -> Result<Option<serde_json::Value>> {
        Ok(value_of(&self.effective()?, key))
    }

    /// Sets (`Some`) or unsets (`None`) `key` at `level` here: validated against the whole
    /// effective configuration first (an invalid change is refused with the key and the reason
    /// and goes nowhere), then stored durably and applied. Answers the entry.
    pub fn set(&self, key: &str, level: &str, value: Option<serde_json::Value>) -> Result<Entry> {
        if key == GROUP_KEY {
            if !level.starts_with("machine") {
                bail!("key `{GROUP_KEY}`: set it at a machine level (machine or machine:NODE)");
            }
            if let Some(v) = &value {
                let g = v.as_str().unwrap_or("");
                level_name(&format!("group:{g}"), &self.node)
                    .with_context(|| format!("key `{GROUP_KEY}`: {v} is not a group name"))?;
            }
        } else if MACHINE_ONLY.contains(&key) {
            bail!("key `{key}` is machine-only: set it in this unit's configuration file");
        } else if !CLUSTERABLE.contains(&key) {
            bail!(
                "key `{key}` is not clusterable (clusterable: {})",
                CLUSTERABLE.join(", ")
            );
        }
        self.put(key, level, value)
    }

    /// Sets or unsets any entry (settings, membership, groups): validated, stored, applied.
    pub fn put(&self, key: &str, level: &str, value: Option<serde_json::Value>) -> Result<Entry> {
        let level = level_name(level, &self.node)?;
        let mut st = self.lock();
        let stamp = next_stamp(&st.1, &self.node);
        let supersedes =
            st.0.entries
                .iter()
                .find(|e| e.key == key && e.level == level)
                .map(|prev| {
                    std::iter::once(prev.stamp.clone())
                        .chain(prev.supersedes.iter().cloned())
                        .take(LINEAGE)
                        .collect()
                })
                .unwrap_or_default();
        let entry = Entry {
            key: key.to_string(),
            level,
            value,
            stamp: stamp.clone(),
            supersedes,
        };
        let mut entries = st.0.entries.clone();
        upsert(&mut entries, entry.clone());
        let candidate = effective(&self.file, &self.node, &entries)?;
        candidate.validate()?;
        let conflicts = st.0.conflicts.clone();
        self.commit(&mut st, entries, conflicts, stamp)?;
        drop(st);
        (self.apply)(&candidate);
        tracing::info!(key, level = %entry.level, "clustered setting changed here");
        Ok(entry)
    }

    /// `config copy|move KEY --from LEVEL --to LEVEL`: the value at `from` set at `to` (and, for
    /// a move, unset at `from`), each step validated like [`Settings::set`].
    pub fn copy(&self, key: &str, from: &str, to: &str, remove: bool) -> Result<()> {
        let from_level = level_name(from, &self.node)?;
        let value = self
            .lock()
            .0
            .entries
            .iter()
            .find(|e| e.key == key && e.level == from_level)
            .and_then(|e| e.value.clone())
            .ok_or_else(|| anyhow::anyhow!("key `{key}` is not set at level `{from}`"))?;
        self.set(key, to, Some(value))?;
        if remove {
            self.set(key, from, None)?;
        }
        Ok(())
    }

    /// Merges entries from another unit: the newest stamp of each (key, level) wins; losers on
    /// either side are recorded as conflicts. An entry that would make the effective
    /// configuration here invalid is refused (and logged). Answers whether anything changed.
    pub fn merge(&self, theirs: &Exchange) -> Result<bool> {
        if self.disconnected() {
            bail!("this unit is disconnected from the clustered settings by an operator (spoolctl cluster reconnect)");
        }
        if theirs.version != PROTOCOL {
            bail!(
                "clustered settings protocol {} here, {} from {}: not exchanged",
                PROTOCOL,
                theirs.version,
                theirs.from
            );
        }
        let mut st = self.lock();
        if st.0.cluster != theirs.cluster {
            let name = |c: &Option<String>| {
                c.as_ref()
                    .map_or("no cluster".to_string(), |c| format!("cluster {c:?}"))
            };
            bail!(
                "{} is in {}, this unit in {}: settings not exchanged",
                theirs.from,
                name(&theirs.cluster),
                name(&st.0.cluster)
            );
        }
        if st.0.paused.contains(&theirs.from) {
            bail!(
                "this unit is disconnected from {} by an operator (spoolctl cluster reconnect {})",
                theirs.from,
                theirs.from
            );
        }
        let mut entries = st.0.entries.clone();
        let mut conflicts = st.0.conflicts.clone();
        let mut changed = false;
        let mut last = st.1.clone();
        for e in &theirs.entries {
            if e.stamp > last {
                last = e.stamp.clone();
            }
            match entries
                .iter()
                .find(|m| m.key == e.key && m.level == e.level)
            {
                Some(mine) if mine.stamp == e.stamp => {}
                Some(mine) if mine.stamp > e.stamp => {
                    // Theirs is older: a change made there that lost a race to one made here, or
                    // one this side saw and replaced (the other has not caught up yet).
                    if mine.raced(e) && !conflicts.iter().any(|c| c.lost == *e) {
                        tracing::warn!(key = %e.key, level = %e.level, lost = ?e.stamp, won = ?mine.stamp, "clustered setting: a concurrent change lost");
                        conflicts.push(Conflict {
                            lost: e.clone(),
                            winner: mine.stamp.clone(),
                        });
                    }
                }
                mine => {
                    if let Some(mine) = mine.filter(|m| e.raced(m)) {
                        tracing::warn!(key = %e.key, level = %e.level, lost = ?mine.stamp, won = ?e.stamp, "clustered setting: a change made here lost to a newer one");
                        conflicts.push(Conflict {
                            lost: mine.clone(),
                            winner: e.stamp.clone(),
                        });
                    }
                    upsert(&mut entries, e.clone());
                    changed = true;
                }
            }
        }
        // Within a cluster, only members exchange: one that was removed is refused (its own
        // exchange may carry the entry that says it joined, so this looks after the merge).
        if let Some(name) = &st.0.cluster {
            let its_own =
                |e: &&Entry| e.key == MEMBER_KEY && e.level == format!("machine:{}", theirs.from);
            let member = entries.iter().filter(its_own).any(|e| e.value.is_some());
            // A member's last exchange as it leaves carries its own tombstone.
            let leaving = theirs
                .entries
                .iter()
                .filter(its_own)
                .any(|e| e.value.is_none() && e.stamp.node == theirs.from);
            if !member && !leaving {
                bail!(
                    "{} is not a member of cluster {name:?} (it left or was removed): spoolctl cluster join",
                    theirs.from
                );
            }
        }
        for c in &theirs.conflicts {
            if !conflicts.contains(c) {
                conflicts.push(c.clone());
            }
        }
        // The last 100 conflicts are kept.
        let keep = conflicts.len().saturating_sub(100);
        conflicts.drain(..keep);
        if !changed {
            // Nothing newer from there; a race it lost is still recorded here.
            if conflicts != st.0.conflicts {
                let entries = st.0.entries.clone();
                self.commit(&mut st, entries, conflicts, last)?;
            } else {
                st.1 = last;
            }
            return Ok(false);
        }
        let candidate = effective(&self.file, &self.node, &entries)?;
        candidate.validate().with_context(|| {
            format!(
                "the clustered settings from {} are invalid here: not applied",
                theirs.from
            )
        })?;
        self.commit(&mut st, entries, conflicts, last)?;
        drop(st);
        (self.apply)(&candidate);
        tracing::info!(from = %theirs.from, "clustered settings updated");
        Ok(true)
    }

    /// Replaces the entries and conflicts, durably first: if the write fails nothing changes.
    fn commit(
        &self,
        st: &mut (Stored, Stamp),
        entries: Vec<Entry>,
        conflicts: Vec<Conflict>,
        last: Stamp,
    ) -> Result<()> {
        let next = Stored {
            entries,
            conflicts,
            disconnected: st.0.disconnected,
            cluster: st.0.cluster.clone(),
            paused: st.0.paused.clone(),
        };
        self.persist(&next)?;
        st.0 = next;
        st.1 = last;
        Ok(())
    }

    /// Whether an operator disconnected this unit from the exchanges.
    pub fn disconnected(&self) -> bool {
        self.lock().0.disconnected
    }

    /// `spoolctl cluster disconnect|reconnect`: stops or resumes the exchanges (durable).
    pub fn set_disconnected(&self, disconnected: bool) -> Result<()> {
        let mut st = self.lock();
        st.0.disconnected = disconnected;
        self.persist(&st.0)
    }

    /// Everything this unit holds, to send.
    pub fn exchange(&self) -> Exchange {
        let st = self.lock();
        Exchange {
            version: PROTOCOL,
            entries: st.0.entries.clone(),
            peek: false,
            cluster: st.0.cluster.clone(),
            from: self.node.clone(),
            conflicts: st.0.conflicts.clone(),
        }
    }

    /// A request for another unit's entries that merges nothing on either side (`cluster
    /// check`, `cluster remove`).
    pub fn peek_request(&self) -> Result<Vec<u8>> {
        let st = self.lock();
        Ok(serde_json::to_vec(&Exchange {
            version: PROTOCOL,
            entries: Vec::new(),
            peek: true,
            cluster: st.0.cluster.clone(),
            from: self.node.clone(),
            conflicts: Vec::new(),
        })?)
    }

    /// This unit's node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster this unit is a member of.
    pub fn cluster_name(&self) -> Option<String> {
        self.lock().0.cluster.clone()
    }

    /// Members an operator disconnected this unit from.
    pub fn paused(&self) -> Vec<String> {
        self.lock().0.paused.clone()
    }

    /// `spoolctl cluster disconnect|reconnect NODE` (durable).
    pub fn set_paused(&self, node: &str, paused: bool) -> Result<()> {
        let mut st = self.lock();
        let mut next: Vec<String> = st.0.paused.iter().filter(|n| *n != node).cloned().collect();
        if paused {
            next.push(node.to_string());
        }
        let before = std::mem::replace(&mut st.0.paused, next);
        if let Err(e) = self.persist(&st.0) {
            st.0.paused = before;
            return Err(e);
        }
        Ok(())
    }

    /// The members (this unit included) and their cluster-link addresses, by node name.
    pub fn members(&self) -> Vec<(String, String)> {
        let st = self.lock();
        let mut m: Vec<(String, String)> =
            st.0.entries
                .iter()
                .filter(|e| e.key == MEMBER_KEY)
                .filter_map(|e| {
                    let node = e.level.strip_prefix("machine:")?;
                    Some((node.to_string(), e.value.as_ref()?.as_str()?.to_string()))
                })
                .collect();
        m.sort();
        m
    }

    /// The groups: those added, and those a machine names; each with the nodes in it.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let st = self.lock();
        let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for e in &st.0.entries {
            match (e.key.as_str(), &e.value) {
                (GROUP_MARK_KEY, Some(_)) => {
                    if let Some(g) = e.level.strip_prefix("group:") {
                        groups.entry(g.to_string()).or_default();
                    }
                }
                (GROUP_KEY, Some(serde_json::Value::String(g))) => {
                    if let Some(n) = e.level.strip_prefix("machine:") {
                        groups.entry(g.clone()).or_default().push(n.to_string());
                    }
                }
                _ => {}
            }
        }
        groups.into_iter().collect()
    }

    /// `spoolctl cluster create NAME`: this unit becomes the first member, reachable at `addr`;
    /// its settings are the cluster's.
    pub fn create(&self, name: &str, addr: std::net::SocketAddr) -> Result<()> {
        level_name(&format!("group:{name}"), &self.node)
            .map_err(|_| anyhow::anyhow!("cluster name {name:?}: 1 to 32 of a-z, 0-9, _ and -"))?;
        self.set_cluster(Some(name.to_string()), |_| Ok(()))?;
        self.put(MEMBER_KEY, "machine", Some(addr.to_string().into()))?;
        Ok(())
    }

    /// Joining a cluster: this unit's entries are replaced by the cluster's (`theirs`), after
    /// the current store is saved beside it. Answers the backup's path.
    pub fn adopt(&self, theirs: &Exchange) -> Result<PathBuf> {
        let name = theirs
            .cluster
            .clone()
            .ok_or_else(|| anyhow::anyhow!("{} is in no cluster", theirs.from))?;
        if theirs.version != PROTOCOL {
            bail!(
                "clustered settings protocol {} here, {} at {}: not joined",
                PROTOCOL,
                theirs.version,
                theirs.from
            );
        }
        let candidate = effective(&self.file, &self.node, &theirs.entries)?;
        candidate
            .validate()
            .context("the cluster's settings are invalid on this unit: not joined")?;
        let backup = self
            .path
            .with_file_name(format!("settings.before-join.{}.json", now_ms()));
        {
            let st = self.lock();
            self.persist_to(&st.0, &backup)?;
        }
        self.set_cluster(Some(name), |st| {
            st.entries = theirs.entries.clone();
            st.conflicts.clear();
            Ok(())
        })?;
        (self.apply)(&candidate);
        Ok(backup)
    }

    /// `spoolctl cluster leave` (after the others were told): this unit is in no cluster and
    /// forgets the members; every setting it used stays, so nothing changes here.
    pub fn leave(&self) -> Result<()> {
        self.set_cluster(None, |st| {
            st.entries.retain(|e| e.key != MEMBER_KEY);
            Ok(())
        })
    }

    fn set_cluster(
        &self,
        name: Option<String>,
        change: impl FnOnce(&mut Stored) -> Result<()>,
    ) -> Result<()> {
        let mut st = self.lock();
        if name.is_some() {
            if let Some(c) = &st.0.cluster {
                bail!("this unit is already a member of cluster {c:?} (spoolctl cluster leave)");
            }
        }
        let mut next = Stored {
            entries: st.0.entries.clone(),
            conflicts: st.0.conflicts.clone(),
            disconnected: st.0.disconnected,
            cluster: name,
            paused: Vec::new(),
        };
        change(&mut next)?;
        self.persist(&next)?;
        if let Some(last) = next.entries.iter().map(|e| e.stamp.clone()).max() {
            if last > st.1 {
                st.1 = last;
            }
        }
        st.0 = next;
        Ok(())
    }

    fn persist(&self, stored: &Stored) -> Result<()> {
        self.persist_to(stored, &self.path)
    }

    /// Writes `stored` whole: temporary file, fsync, rename, directory fsync.
    fn persist_to(&self, stored: &Stored, path: &std::path::Path) -> Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(stored)?;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("write {}", tmp.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Answers an exchange from another unit (the HA partner's recovery channel or the cluster
/// link): merges theirs unless only peeking, then sends ours.
pub fn answer_exchange(settings: &Settings, request: &[u8]) -> Result<bytes::Bytes, String> {
    let theirs: Exchange = serde_json::from_slice(request).map_err(|e| e.to_string())?;
    if !theirs.peek {
        settings.merge(&theirs).map_err(|e| format!("{e:#}"))?;
    }
    serde_json::to_vec(&settings.exchange())
        .map(bytes::Bytes::from)
        .map_err(|e| e.to_string())
}

/// `spoolctl cluster check [--resolve-from NODE]` on the entries every other unit holds:
/// each key and level whose entry differs between this unit and another; with `resolve_from`,
/// that unit's value of each is set again here (with a new stamp, so it wins everywhere at the
/// next exchange).
pub fn check(
    settings: &Settings,
    theirs: &[(String, Exchange)],
    resolve_from: Option<&str>,
) -> Result<api::ClusterChecked> {
    let (ours, _) = settings.entries();
    if let Some(n) = resolve_from {
        if n != settings.node && !theirs.iter().any(|(m, _)| m == n) {
            bail!(
                "--resolve-from {n}: not a member compared (here: {}; others: {})",
                settings.node,
                theirs
                    .iter()
                    .map(|(m, _)| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let show = |e: Option<&Entry>| match e {
        None => "(not set)".to_string(),
        Some(e) => e
            .value
            .as_ref()
            .map_or("(unset)".to_string(), |v| v.to_string()),
    };
    let mut keys: Vec<(String, String)> = ours
        .iter()
        .chain(theirs.iter().flat_map(|(_, t)| &t.entries))
        .map(|e| (e.key.clone(), e.level.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    let mut differences = Vec::new();
    let mut resolved = 0;
    for (key, level) in keys {
        let find = |v: &[Entry]| v.iter().find(|e| e.key == key && e.level == level).cloned();
        let mine = find(&ours);
        let others: Vec<(&str, Option<Entry>)> = theirs
            .iter()
            .map(|(n, t)| (n.as_str(), find(&t.entries)))
            .collect();
        if others.iter().all(|(_, e)| *e == mine) {
            continue;
        }
        differences.push(format!(
            "{key} {level}: here {}, {}",
            show(mine.as_ref()),
            others
                .iter()
                .map(|(n, e)| format!("{n} {}", show(e.as_ref())))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let pick = match resolve_from {
            None => continue,
            Some(n) if n == settings.node => mine,
            Some(n) => others
                .iter()
                .find(|(m, _)| *m == n)
                .and_then(|(_, e)| e.clone()),
        };
        if let Some(e) = pick {
            settings.put(&e.key, &e.level, e.value.clone())?;
            resolved += 1;
        }
    }
    Ok(api::ClusterChecked {
        differences,
        resolved,
        notes: Vec::new(),
    })
}

/// `spoolctl config show`.
pub fn show(settings: &Settings, key: Option<&str>) -> Result<api::ConfigShown> {
    let keys: Vec<&str> = match key {
        Some(k) if CLUSTERABLE.contains(&k) || k == GROUP_KEY => vec![k],
        Some(k) if MACHINE_ONLY.contains(&k) => {
            bail!("key `{k}` is machine-only: it is in this unit's configuration file")
        }
        Some(k) => bail!(
            "key `{k}` is not clusterable (clusterable: {})",
            CLUSTERABLE.join(", ")
        ),
        None => CLUSTERABLE
            .iter()
            .copied()
            .chain(std::iter::once(GROUP_KEY))
            .collect(),
    };
    let (entries, conflicts) = settings.entries();
    let effective = settings.effective()?;
    let stamp = |s: &Stamp| format!("{}.{}@{}", s.ms, s.counter, s.node);
    Ok(api::ConfigShown {
        keys: keys
            .into_iter()
            .map(|k| api::ConfigKey {
                key: k.to_string(),
                file: settings.file_value(k),
                levels: entries
                    .iter()
                    .filter(|e| e.key == k)
                    .map(|e| api::LevelValue {
                        level: e.level.clone(),
                        value: e.value.clone(),
                        stamp: stamp(&e.stamp),
                    })
                    .collect(),
                effective: if k == GROUP_KEY {
                    entries
                        .iter()
                        .find(|e| e.key == k && e.level == format!("machine:{}", settings.node))
                        .and_then(|e| e.value.clone())
                } else {
                    value_of(&effective, k)
                },
            })
            .collect(),
        conflicts: conflicts
            .iter()
            .map(|c| api::ConfigConflict {
                key: c.lost.key.clone(),
                level: c.lost.level.clone(),
                value: c.lost.value.clone(),
                stamp: stamp(&c.lost.stamp),
                lost_to: stamp(&c.winner),
            })
            .collect(),
        machine_only: MACHINE_ONLY.iter().map(|k| k.to_string()).collect(),
    })
}

fn next_stamp(last: &Stamp, node: &str) -> Stamp {
    let now = now_ms();
    if now > last.ms {
        Stamp {
            ms: now,
            counter: 0,
            node: node.to_string(),
        }
    } else {
        Stamp {
            ms: last.ms,
            counter: last.counter + 1,
            node: node.to_string(),
        }
    }
}

fn upsert(entries: &mut Vec<Entry>, e: Entry) {
    match entries
        .iter_mut()
        .find(|m| m.key == e.key && m.level == e.level)
    {
        Some(m) => *m = e,
        None => entries.push(e),
    }
}

/// The file's configuration with the entries that apply to `node` on top.
fn effective(file: &Config, node: &str, entries: &[Entry]) -> Result<Config> {
    let mut c = file.clone();
    let at = |key: &str, level: &str| {
        entries
            .iter()
            .find(|e| e.key == key && e.level == level)
            .and_then(|e| e.value.clone())
    };
    let machine = format!("machine:{node}");
    let group = at(GROUP_KEY, &machine).and_then(|g| g.as_str().map(|g| format!("group:{g}")));
    for key in CLUSTERABLE {
        // machine, then the node's group, then cluster.
        let v = at(key, &machine)
            .or_else(|| group.as_deref().and_then(|g| at(key, g)))
            .or_else(|| at(key, "cluster"));
        if let Some(v) = v {
            set_value(&mut c, key, v)?;
        }
    }
    Ok(c)
}

fn set_value(c: &mut Config, key: &str, v: serde_json::Value) -> Result<()> {
    let bad = |e: serde_json::Error| anyhow::anyhow!("key `{key}`: {e}");
    match key {
        "smtp.relay_domains" => c.smtp.relay_domains = serde_json::from_value(v).map_err(bad)?,
        "smtp.trusted_networks" => {
            c.smtp.trusted_networks = serde_json::from_value(v).map_err(bad)?
        }
        "smtp.message_bytes_max" => {
            c.smtp.message_bytes_max = serde_json::from_value(v).map_err(bad)?
        }
        "smtp.recipients_max" => c.smtp.recipients_max = serde_json::from_value(v).map_err(bad)?,
        "smtp.idle_timeout_secs" => {
            c.smtp.idle_timeout_secs = serde_json::from_value(v).map_err(bad)?
        }
        "delivery.default_next_hop" => {
            c.delivery.default_next_hop = serde_json::from_value(v).map_err(bad)?
        }
        "delivery.routes" => c.delivery.routes = serde_json::from_value(v).map_err(bad)?,
        "delivery.retry_schedule_secs" => {
            c.delivery.retry_schedule_secs = serde_json::from_value(v).map_err(bad)?
        }
        "delivery.queue_lifetime_secs" => {
            c.delivery.queue_lifetime_secs = serde_json::from_value(v).map_err(bad)?
        }
        "delivery.tls" => c.delivery.tls = serde_json::from_value(v).map_err(bad)?,
        "filter.fail_open" => c.filter.fail_open = serde_json::from_value(v).map_err(bad)?,
        "filter.retry_secs" => c.filter.retry_secs = serde_json::from_value(v).map_err(bad)?,
        "filter.notify_sender" => {
            c.filter.notify_sender = serde_json::from_value(v).map_err(bad)?
        }
        "archive.retention_days" => {
            c.archive.retention_days = serde_json::from_value(v).map_err(bad)?
        }
        other => bail!("key `{other}` is not clusterable"),
    }
    Ok(())
}

fn value_of(c: &Config, key: &str) -> Option<serde_json::Value> {
    match key {
        "smtp.relay_domains" => serde_json::to_value(&c.smtp.relay_domains).ok(),
        "smtp.trusted_networks" => serde_json::to_value(&c.smtp.trusted_networks).ok(),
        "smtp.message_bytes_max" => serde_json::to_value(c.smtp.message_bytes_max).ok(),
        "smtp.recipients_max" => serde_json::to_value(c.smtp.recipients_max).ok(),
        "smtp.idle_timeout_secs" => serde_json::to_value(c.smtp.idle_timeout_secs).ok(),
        "delivery.default_next_hop" => serde_json::to_value(&c.delivery.default_next_hop).ok(),
        "delivery.routes" => serde_json::to_value(&c.delivery.routes).ok(),
        "delivery.retry_schedule_secs" => {
            serde_json::to_value(&c.delivery.retry_schedule_secs).ok()
        }
        "delivery.queue_lifetime_secs" => serde_json::to_value(c.delivery.queue_lifetime_secs).ok(),
        "delivery.tls" => serde_json::to_value(c.delivery.tls).ok(),
        "filter.fail_open" => serde_json::to_value(c.filter.fail_open).ok(),
        "filter.retry_secs" => serde_json::to_value(c.filter.retry_secs).ok(),
        "filter.notify_sender" => serde_json::to_value(c.filter.notify_sender).ok(),
        "archive.retention_days" => serde_json::to_value(c.archive.retention_days).ok(),
        _ => None,
    }
}

/// A value as `spoolctl config set` gives it: TOML (`["a.example", "b.example"]`, `[]`).
pub fn parse_value(key: &str, text: &str) -> Result<serde_json::Value> {
    let doc: toml::Table = toml::from_str(&format!("v = {text}"))
        .map_err(|e| anyhow::anyhow!("key `{key}`: {text:?} is not a TOML value: {e}"))?;
    let v = doc
        .get("v")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("key `{key}`: no value"))?;
    Ok(serde_json::to_value(v)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    fn settings(node: &str, dir: &std::path::Path) -> (Settings, Arc<Mutex<Vec<String>>>) {
        let c = Config {
            node_name: node.into(),
            state_dir: dir.to_path_buf(),
            ..Config::default()
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let s = Settings::open(
            &c,
            Box::new(move |c: &Config| s2.lock().unwrap().push(c.smtp.relay_domains.join(","))),
        )
        .unwrap();
        (s, seen)
    }

    #[test]
    fn levels_validation_merge_and_conflicts() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, seen_a) = settings("gw_a", da.path());
        let (b, _) = settings("gw_b", db.path());
        let v = |t: &str| parse_value("smtp.relay_domains", t).unwrap();
        // Refused at the origin: a bad value, a machine-only key, an unknown level.
        assert!(a
            .set(
                "smtp.relay_domains",
                "cluster",
                Some(v(r#"["not a domain"]"#))
            )
            .is_err());
        assert!(a.set("smtp.listen", "cluster", Some(v("[]"))).is_err());
        assert!(a.set("smtp.relay_domains", "group", Some(v("[]"))).is_err());
        assert!(a.entries().0.is_empty());
        // A cluster value reaches B through an exchange.
        a.set("smtp.relay_domains", "cluster", Some(v(r#"["x.example"]"#)))
            .unwrap();
        assert_eq!(seen_a.lock().unwrap().last().unwrap(), "x.example");
        assert!(b.merge(&a.exchange()).unwrap());
        assert_eq!(b.effective().unwrap().smtp.relay_domains, ["x.example"]);
        assert!(!b.merge(&a.exchange()).unwrap(), "idempotent");
        // A machine override on A (an explicit empty list) stays A's.
        a.set("smtp.relay_domains", "machine", Some(v("[]")))
            .unwrap();
        assert!(a.effective().unwrap().smtp.relay_domains.is_empty());
        b.merge(&a.exchange()).unwrap();
        assert_eq!(b.effective().unwrap().smtp.relay_domains, ["x.example"]);
        // Unset at the machine level: the cluster value applies again.
        a.set("smtp.relay_domains", "machine", None).unwrap();
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["x.example"]);
        // A change made on B after it saw A's is no conflict, whatever order the exchanges take.
        let x = a.entries().0;
        b.set("smtp.relay_domains", "cluster", Some(v(r#"["y.example"]"#)))
            .unwrap();
        b.merge(&Exchange {
            entries: x,
            ..a.exchange()
        })
        .unwrap();
        a.merge(&b.exchange()).unwrap();
        assert!(
            a.entries().1.is_empty() && b.entries().1.is_empty(),
            "no conflict"
        );
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["y.example"]);
        // Concurrent changes: the newer stamp wins on both, the loser is recorded on both.
        a.set("smtp.relay_domains", "cluster", Some(v(r#"["a.example"]"#)))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        b.set("smtp.relay_domains", "cluster", Some(v(r#"["b.example"]"#)))
            .unwrap();
        let (ea, eb) = (a.exchange(), b.exchange());
        a.merge(&eb).unwrap();
        b.merge(&ea).unwrap();
        for s in [&a, &b] {
            assert_eq!(s.effective().unwrap().smtp.relay_domains, ["b.example"]);
            assert_eq!(s.entries().1.len(), 1, "the loser is reported");
            assert_eq!(s.entries().1[0].lost.stamp.node, "gw_a");
        }
        // Groups: machine beats the node's group, which beats cluster.
        a.set(GROUP_KEY, "machine", Some(serde_json::json!("edge")))
            .unwrap();
        a.set(
            "smtp.relay_domains",
            "group:edge",
            Some(v(r#"["edge.example"]"#)),
        )
        .unwrap();
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["edge.example"]);
        b.merge(&a.exchange()).unwrap();
        assert_eq!(
            b.effective().unwrap().smtp.relay_domains,
            ["b.example"],
            "B is in no group"
        );
        a.set(GROUP_KEY, "machine:gw_b", Some(serde_json::json!("edge")))
            .unwrap();
        b.merge(&a.exchange()).unwrap();
        assert_eq!(b.effective().unwrap().smtp.relay_domains, ["edge.example"]);
        assert!(a
            .set(GROUP_KEY, "cluster", Some(serde_json::json!("edge")))
            .is_err());
        assert!(a
            .set(GROUP_KEY, "machine", Some(serde_json::json!("Bad Name")))
            .is_err());
        // Move: the group's value to the cluster level; the group no longer sets it.
        a.copy("smtp.relay_domains", "group:edge", "cluster", true)
            .unwrap();
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["edge.example"]);
        assert!(a
            .copy("smtp.relay_domains", "group:edge", "cluster", false)
            .is_err());
        a.set(GROUP_KEY, "machine", None).unwrap();
        a.set("smtp.relay_domains", "cluster", Some(v(r#"["b.example"]"#)))
            .unwrap();
        b.merge(&a.exchange()).unwrap();
        // The filter, TLS and archive policies are clustered too, and validated.
        let set = |k: &str, t: &str| a.set(k, "cluster", Some(parse_value(k, t).unwrap()));
        set("delivery.tls", r#""encrypt""#).unwrap();
        assert!(set("delivery.tls", r#""sometimes""#).is_err());
        set("filter.fail_open", "true").unwrap();
        assert!(set("filter.retry_secs", "0").is_err());
        set("archive.retention_days", "30").unwrap();
        b.merge(&a.exchange()).unwrap();
        let eb = b.effective().unwrap();
        assert!(eb.filter.fail_open && eb.archive.retention_days == 30);
        assert_eq!(
            value_of(&eb, "delivery.tls"),
            Some(serde_json::json!("encrypt"))
        );
        // Another protocol version is refused.
        let mut other = a.exchange();
        other.version = 99;
        assert!(b.merge(&other).is_err());
        // Durable: reopened, the same.
        drop(a);
        let (a, _) = settings("gw_a", da.path());
        assert_eq!(a.effective().unwrap().smtp.relay_domains, ["b.example"]);
    }
}
