//! What `spoolctl config show` and `spoolctl cluster check` answer, made from the store.

use crate::entry::{find, Entry, GROUP_KEY};
use crate::level::Level;
use crate::proto::Exchange;
use crate::schema::Schema;
use crate::settings::Settings;
use anyhow::{bail, Result};

impl<S: Schema> Settings<S> {
    /// `spoolctl cluster check [--resolve-from NODE]` on the entries every other unit holds:
    /// each key and level whose entry differs between this unit and another; with
    /// `resolve_from`, that unit's value of each is set again here (with a new stamp, so it
    /// wins everywhere at the next exchange).
    pub fn check(
        &self,
        theirs: &[(String, Exchange)],
        resolve_from: Option<&str>,
    ) -> Result<api::ClusterChecked> {
        let (ours, _) = self.entries();
        if let Some(n) = resolve_from {
            if n != self.node() && !theirs.iter().any(|(m, _)| m == n) {
                bail!(
                    "--resolve-from {n}: not a member compared (here: {}; others: {})",
                    self.node(),
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
        let mut keys: Vec<(String, Level)> = ours
            .iter()
            .chain(theirs.iter().flat_map(|(_, t)| &t.entries))
            .map(|e| (e.key.clone(), e.level.clone()))
            .collect();
        keys.sort();
        keys.dedup();
        let mut differences = Vec::new();
        let mut resolved = 0;
        for (key, level) in keys {
            let mine = find(&ours, &key, &level).cloned();
            let others: Vec<(&str, Option<Entry>)> = theirs
                .iter()
                .map(|(n, t)| (n.as_str(), find(&t.entries, &key, &level).cloned()))
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
                Some(n) if n == self.node() => mine,
                Some(n) => others
                    .iter()
                    .find(|(m, _)| *m == n)
                    .and_then(|(_, e)| e.clone()),
            };
            if let Some(e) = pick {
                self.put(&e.key, &e.level, e.value.clone())?;
                resolved += 1;
            }
        }
        Ok(api::ClusterChecked {
            differences,
            resolved,
            notes: Vec::new(),
        })
    }

    /// `spoolctl config show [KEY]`.
    pub fn show(&self, key: Option<&str>) -> Result<api::ConfigShown> {
        let keys: Vec<&str> = match key {
            Some(k) if k == GROUP_KEY => vec![GROUP_KEY],
            Some(k) => {
                self.check_key(k).map_err(|e| {
                    if self.schema().machine_only().contains(&k) {
                        anyhow::anyhow!(
                            "key `{k}` is machine-only: it is in this unit's configuration file"
                        )
                    } else {
                        e
                    }
                })?;
                vec![k]
            }
            None => self
                .schema()
                .keys()
                .iter()
                .map(|k| k.name)
                .chain(std::iter::once(GROUP_KEY))
                .collect(),
        };
        let (entries, conflicts) = self.entries();
        let effective = self.effective()?;
        let machine = Level::machine(self.node());
        Ok(api::ConfigShown {
            keys: keys
                .into_iter()
                .map(|k| api::ConfigKey {
                    key: k.to_string(),
                    file: self.file_value(k),
                    levels: entries
                        .iter()
                        .filter(|e| e.key == k)
                        .map(|e| api::LevelValue {
                            level: e.level.to_string(),
                            value: e.value.clone(),
                            stamp: e.stamp.to_string(),
                        })
                        .collect(),
                    effective: if k == GROUP_KEY {
                        find(&entries, k, &machine).and_then(|e| e.value.clone())
                    } else {
                        self.value_in(&effective, k)
                    },
                })
                .collect(),
            conflicts: conflicts
                .iter()
                .map(|c| api::ConfigConflict {
                    key: c.lost.key.clone(),
                    level: c.lost.level.to_string(),
                    value: c.lost.value.clone(),
                    stamp: c.lost.stamp.to_string(),
                    lost_to: c.winner.to_string(),
                })
                .collect(),
            machine_only: self
                .schema()
                .machine_only()
                .iter()
                .map(|k| k.to_string())
                .collect(),
        })
    }
}
