//! The settings store of one unit: `<state_dir>/cluster/settings.json` (written whole:
//! temporary file, fsync, rename, directory fsync), the effective configuration it makes of
//! the file's, and every change to it: made here (validated first), merged from another unit
//! ([`crate::merge`]), or a change of membership (create, join, leave).

use crate::entry::{
    find, upsert, Conflict, Entry, Stored, GROUP_KEY, GROUP_MARK_KEY, LINEAGE, MEMBER_KEY,
};
use crate::level::{name_ok, Level};
use crate::merge::merge;
use crate::proto::{Exchange, PROTOCOL};
use crate::schema::Schema;
use crate::stamp::{now_ms, Stamp};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What the store holds in memory: the stored state and the clock.
struct Held {
    stored: Stored,
    /// The newest stamp made or seen here: the next one made is after it.
    clock: Stamp,
}

/// This unit's clustered settings.
pub struct Settings<S: Schema> {
    node: String,
    path: PathBuf,
    schema: S,
    /// The configuration as the file (and command line) gave it.
    file: S::Config,
    held: Mutex<Held>,
}

impl<S: Schema> Settings<S> {
    /// Opens the store of unit `node` under `state_dir/cluster/` (created), on top of the
    /// configuration `file`; `schema.apply` is called with the effective configuration now and
    /// after every change.
    pub fn open(node: &str, state_dir: &Path, file: S::Config, schema: S) -> Result<Settings<S>> {
        let dir = state_dir.join("cluster");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("settings.json");
        let stored: Stored = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{}: unreadable", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let clock = stored.newest().cloned().unwrap_or_default();
        let s = Settings {
            node: node.to_string(),
            path,
            schema,
            file,
            held: Mutex::new(Held { stored, clock }),
        };
        let effective = s.effective()?;
        s.schema.apply(&effective);
        Ok(s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The schema the store was opened with.
    pub fn schema(&self) -> &S {
        &self.schema
    }

    /// This unit's node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A level as an operator writes it (`machine` is this unit's).
    pub fn level(&self, text: &str) -> Result<Level> {
        Ok(Level::parse(text, &self.node)?)
    }

    /// The configuration in effect here: the file's, with the clustered entries on top.
    pub fn effective(&self) -> Result<S::Config> {
        self.effective_with(&self.lock().stored.entries)
    }

    /// The file's configuration with the entries that apply to this unit on top: machine,
    /// then the unit's group, then cluster (a tombstone falls through to the next).
    fn effective_with(&self, entries: &[Entry]) -> Result<S::Config> {
        let mut c = self.file.clone();
        let machine = Level::machine(&self.node);
        let group = find(entries, GROUP_KEY, &machine)
            .and_then(|e| e.value.as_ref()?.as_str().map(Level::group));
        for key in self.schema.keys() {
            let at = |level: &Level| find(entries, key.name, level).and_then(|e| e.value.clone());
            let v = at(&machine)
                .or_else(|| group.as_ref().and_then(at))
                .or_else(|| at(&Level::Cluster));
            if let Some(v) = v {
                (key.set)(&mut c, v).map_err(|e| anyhow!("key `{}`: {e}", key.name))?;
            }
        }
        Ok(c)
    }

    /// Every entry and the conflicts seen.
    pub fn entries(&self) -> (Vec<Entry>, Vec<Conflict>) {
        let held = self.lock();
        (held.stored.entries.clone(), held.stored.conflicts.clone())
    }

    /// The file's value of `key`.
    pub fn file_value(&self, key: &str) -> Option<serde_json::Value> {
        self.value_in(&self.file, key)
    }

    /// The value of `key` in `config`.
    pub fn value_in(&self, config: &S::Config, key: &str) -> Option<serde_json::Value> {
        self.schema.key(key).and_then(|k| (k.get)(config))
    }

    /// The effective value of `key` here.
    pub fn effective_value(&self, key: &str) -> Result<Option<serde_json::Value>> {
        Ok(self.value_in(&self.effective()?, key))
    }

    /// Refuses a key that is not a clusterable setting, saying why.
    pub fn check_key(&self, key: &str) -> Result<()> {
        if self.schema.machine_only().contains(&key) {
            bail!("key `{key}` is machine-only: set it in this unit's configuration file");
        }
        if self.schema.key(key).is_none() {
            bail!(
                "key `{key}` is not clusterable (clusterable: {})",
                self.schema.key_names()
            );
        }
        Ok(())
    }

    /// Sets (`Some`) or unsets (`None`) `key` at `level` (as an operator writes it) here:
    /// validated against the whole effective configuration first (an invalid change is
    /// refused with the key and the reason and goes nowhere), then stored durably and
    /// applied. Answers the entry.
    pub fn set(&self, key: &str, level: &str, value: Option<serde_json::Value>) -> Result<Entry> {
        let level = self.level(level)?;
        if key == GROUP_KEY {
            if !level.is_machine() {
                bail!("key `{GROUP_KEY}`: set it at a machine level (machine or machine:NODE)");
            }
            if let Some(v) = &value {
                if !v.as_str().is_some_and(name_ok) {
                    bail!("key `{GROUP_KEY}`: {v} is not a group name");
                }
            }
        } else {
            self.check_key(key)?;
        }
        self.put(key, &level, value)
    }

    /// Sets or unsets any entry (settings, membership, groups): validated, stored, applied.
    pub fn put(&self, key: &str, level: &Level, value: Option<serde_json::Value>) -> Result<Entry> {
        let mut held = self.lock();
        let stamp = Stamp::next(&held.clock, &self.node, now_ms());
        let supersedes = held
            .stored
            .find(key, level)
            .map(|prev| {
                std::iter::once(prev.stamp.clone())
                    .chain(prev.supersedes.iter().cloned())
                    .take(LINEAGE)
                    .collect()
            })
            .unwrap_or_default();
        let entry = Entry {
            key: key.to_string(),
            level: level.clone(),
            value,
            stamp: stamp.clone(),
            supersedes,
        };
        let mut entries = held.stored.entries.clone();
        upsert(&mut entries, entry.clone());
        let candidate = self.effective_with(&entries)?;
        self.schema.validate(&candidate)?;
        let conflicts = held.stored.conflicts.clone();
        self.commit(&mut held, entries, conflicts, stamp)?;
        drop(held);
        self.schema.apply(&candidate);
        tracing::info!(key, level = %entry.level, "clustered setting changed here");
        Ok(entry)
    }

    /// `config copy|move KEY --from LEVEL --to LEVEL`: the value at `from` set at `to` (and, for
    /// a move, unset at `from`), each step validated like [`Settings::set`].
    pub fn copy(&self, key: &str, from: &str, to: &str, remove: bool) -> Result<()> {
        let from_level = self.level(from)?;
        let value = self
            .lock()
            .stored
            .find(key, &from_level)
            .and_then(|e| e.value.clone())
            .ok_or_else(|| anyhow!("key `{key}` is not set at level `{from}`"))?;
        self.set(key, to, Some(value))?;
        if remove {
            self.set(key, from, None)?;
        }
        Ok(())
    }

    /// Merges entries from another unit ([`crate::merge::merge`]). An outcome that would make
    /// the effective configuration here invalid is refused (and logged). Answers whether
    /// anything changed.
    pub fn merge(&self, theirs: &Exchange) -> Result<bool> {
        let mut held = self.lock();
        let merged = merge(&held.stored, &held.clock, theirs)?;
        for c in &merged.found {
            tracing::warn!(key = %c.lost.key, level = %c.lost.level, lost = %c.lost.stamp, won = %c.winner, "clustered setting: a concurrent change lost");
        }
        if !merged.changed {
            // Nothing newer from there; a race it lost is still recorded here.
            if merged.conflicts != held.stored.conflicts {
                let entries = held.stored.entries.clone();
                self.commit(&mut held, entries, merged.conflicts, merged.clock)?;
            } else {
                held.clock = merged.clock;
            }
            return Ok(false);
        }
        let candidate = self.effective_with(&merged.entries)?;
        self.schema.validate(&candidate).with_context(|| {
            format!(
                "the clustered settings from {} are invalid here: not applied",
                theirs.from
            )
        })?;
        self.commit(&mut held, merged.entries, merged.conflicts, merged.clock)?;
        drop(held);
        self.schema.apply(&candidate);
        tracing::info!(from = %theirs.from, "clustered settings updated");
        Ok(true)
    }

    /// Replaces the entries and conflicts, durably first: if the write fails nothing changes.
    fn commit(
        &self,
        held: &mut Held,
        entries: Vec<Entry>,
        conflicts: Vec<Conflict>,
        clock: Stamp,
    ) -> Result<()> {
        let next = Stored {
            entries,
            conflicts,
            ..held.stored.clone()
        };
        self.persist(&next)?;
        held.stored = next;
        held.clock = clock;
        Ok(())
    }

    /// Whether an operator disconnected this unit from the exchanges.
    pub fn disconnected(&self) -> bool {
        self.lock().stored.disconnected
    }

    /// `spoolctl cluster disconnect|reconnect`: stops or resumes the exchanges (durable).
    pub fn set_disconnected(&self, disconnected: bool) -> Result<()> {
        self.change_stored(|s| s.disconnected = disconnected)
    }

    /// Everything this unit holds, to send.
    pub fn exchange(&self) -> Exchange {
        let held = self.lock();
        Exchange {
            version: PROTOCOL,
            entries: held.stored.entries.clone(),
            peek: false,
            cluster: held.stored.cluster.clone(),
            from: self.node.clone(),
            conflicts: held.stored.conflicts.clone(),
        }
    }

    /// A request for another unit's entries that merges nothing on either side (`cluster
    /// check`, `cluster remove`).
    pub fn peek_request(&self) -> Exchange {
        Exchange {
            version: PROTOCOL,
            entries: Vec::new(),
            peek: true,
            cluster: self.cluster_name(),
            from: self.node.clone(),
            conflicts: Vec::new(),
        }
    }

    /// Answers an exchange from another unit: merges theirs unless only peeking, then sends
    /// ours.
    pub fn answer(&self, theirs: &Exchange) -> Result<Exchange> {
        if !theirs.peek {
            self.merge(theirs)?;
        }
        Ok(self.exchange())
    }

    /// The cluster this unit is a member of.
    pub fn cluster_name(&self) -> Option<String> {
        self.lock().stored.cluster.clone()
    }

    /// Members an operator disconnected this unit from.
    pub fn paused(&self) -> Vec<String> {
        self.lock().stored.paused.clone()
    }

    /// `spoolctl cluster disconnect|reconnect NODE` (durable).
    pub fn set_paused(&self, node: &str, paused: bool) -> Result<()> {
        self.change_stored(|s| {
            s.paused.retain(|n| n != node);
            if paused {
                s.paused.push(node.to_string());
            }
        })
    }

    /// Changes the stored state other than the entries, durably first.
    fn change_stored(&self, change: impl FnOnce(&mut Stored)) -> Result<()> {
        let mut held = self.lock();
        let mut next = held.stored.clone();
        change(&mut next);
        self.persist(&next)?;
        held.stored = next;
        Ok(())
    }

    /// The members (this unit included) and their cluster-link addresses, by node name.
    pub fn members(&self) -> Vec<(String, String)> {
        let held = self.lock();
        let mut m: Vec<(String, String)> = held
            .stored
            .entries
            .iter()
            .filter(|e| e.key == MEMBER_KEY)
            .filter_map(|e| match &e.level {
                Level::Machine(node) => {
                    Some((node.clone(), e.value.as_ref()?.as_str()?.to_string()))
                }
                _ => None,
            })
            .collect();
        m.sort();
        m
    }

    /// The groups: those added, and those a machine names; each with the nodes in it.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let held = self.lock();
        let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for e in &held.stored.entries {
            match (e.key.as_str(), &e.value, &e.level) {
                (GROUP_MARK_KEY, Some(_), Level::Group(g)) => {
                    groups.entry(g.clone()).or_default();
                }
                (GROUP_KEY, Some(serde_json::Value::String(g)), Level::Machine(n)) => {
                    groups.entry(g.clone()).or_default().push(n.clone());
                }
                _ => {}
            }
        }
        groups.into_iter().collect()
    }

    /// `spoolctl cluster create NAME`: this unit becomes the first member, reachable at `addr`;
    /// its settings are the cluster's.
    pub fn create(&self, name: &str, addr: std::net::SocketAddr) -> Result<()> {
        if !name_ok(name) {
            bail!("cluster name {name:?}: 1 to 32 of a-z, 0-9, _ and -");
        }
        self.set_cluster(Some(name.to_string()), |_| {})?;
        self.put(
            MEMBER_KEY,
            &Level::machine(&self.node),
            Some(addr.to_string().into()),
        )?;
        Ok(())
    }

    /// Joining a cluster: this unit's entries are replaced by the cluster's (`theirs`), after
    /// the current store is saved beside it. Answers the backup's path.
    pub fn adopt(&self, theirs: &Exchange) -> Result<PathBuf> {
        let name = theirs
            .cluster
            .clone()
            .ok_or_else(|| anyhow!("{} is in no cluster", theirs.from))?;
        if theirs.version != PROTOCOL {
            bail!(
                "clustered settings protocol {} here, {} at {}: not joined",
                PROTOCOL,
                theirs.version,
                theirs.from
            );
        }
        let candidate = self.effective_with(&theirs.entries)?;
        self.schema
            .validate(&candidate)
            .context("the cluster's settings are invalid on this unit: not joined")?;
        let backup = self
            .path
            .with_file_name(format!("settings.before-join.{}.json", now_ms()));
        persist_to(&self.lock().stored, &backup)?;
        self.set_cluster(Some(name), |st| {
            st.entries = theirs.entries.clone();
            st.conflicts.clear();
        })?;
        self.schema.apply(&candidate);
        Ok(backup)
    }

    /// `spoolctl cluster leave` (after the others were told): this unit is in no cluster and
    /// forgets the members; every setting it used stays, so nothing changes here.
    pub fn leave(&self) -> Result<()> {
        self.set_cluster(None, |st| st.entries.retain(|e| e.key != MEMBER_KEY))
    }

    fn set_cluster(&self, name: Option<String>, change: impl FnOnce(&mut Stored)) -> Result<()> {
        let mut held = self.lock();
        if name.is_some() {
            if let Some(c) = &held.stored.cluster {
                bail!("this unit is already a member of cluster {c:?} (spoolctl cluster leave)");
            }
        }
        let mut next = Stored {
            cluster: name,
            paused: Vec::new(),
            ..held.stored.clone()
        };
        change(&mut next);
        self.persist(&next)?;
        if let Some(newest) = next.newest() {
            if *newest > held.clock {
                held.clock = newest.clone();
            }
        }
        held.stored = next;
        Ok(())
    }

    fn persist(&self, stored: &Stored) -> Result<()> {
        persist_to(stored, &self.path)
    }
}

/// Writes `stored` whole: temporary file, fsync, rename, directory fsync.
fn persist_to(stored: &Stored, path: &Path) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(stored)?;
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("write {}", tmp.display()))?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
