//! The merge of another unit's entries into this unit's: pure (no files, no clock, no log),
//! so every case is a row in the table below. The store (`settings.rs`) validates the outcome
//! against the configuration, writes it and applies it.
//!
//! The newest stamp of each (key, level) wins on every unit. A change that lost a race (made
//! on another node, without having seen the winner) is a conflict, recorded wherever it is
//! seen and carried with the exchanges, so every unit lists it.

use crate::entry::{upsert, Conflict, Entry, Stored, CONFLICTS_KEPT, MEMBER_KEY};
use crate::level::Level;
use crate::proto::{Exchange, PROTOCOL};
use crate::stamp::Stamp;

/// Why another unit's entries were not merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// An operator disconnected this unit from every exchange.
    #[error("this unit is disconnected from the clustered settings by an operator (spoolctl cluster reconnect)")]
    Disconnected,
    /// The other unit speaks another version of the exchange.
    #[error("clustered settings protocol {ours} here, {theirs} from {from}: not exchanged")]
    Protocol {
        /// [`PROTOCOL`].
        ours: u32,
        /// Theirs.
        theirs: u32,
        /// The sender.
        from: String,
    },
    /// The units are in different clusters (or one is in none).
    #[error("{from} is in {}, this unit in {}: settings not exchanged", cluster_name(.theirs), cluster_name(.ours))]
    OtherCluster {
        /// The sender.
        from: String,
        /// Its cluster.
        theirs: Option<String>,
        /// This unit's.
        ours: Option<String>,
    },
    /// An operator disconnected this unit from the sender.
    #[error(
        "this unit is disconnected from {from} by an operator (spoolctl cluster reconnect {from})"
    )]
    Paused {
        /// The sender.
        from: String,
    },
    /// Within a cluster only members exchange: the sender left or was removed.
    #[error("{from} is not a member of cluster {cluster:?} (it left or was removed): spoolctl cluster join")]
    NotMember {
        /// The sender.
        from: String,
        /// This unit's cluster.
        cluster: String,
    },
}

fn cluster_name(c: &Option<String>) -> String {
    c.as_ref()
        .map_or("no cluster".to_string(), |c| format!("cluster {c:?}"))
}

/// What a merge comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The entries after the merge.
    pub entries: Vec<Entry>,
    /// The conflicts after the merge (the newest [`CONFLICTS_KEPT`]).
    pub conflicts: Vec<Conflict>,
    /// The newest stamp made or seen here after the merge.
    pub clock: Stamp,
    /// Whether any entry came in (the effective configuration may have changed).
    pub changed: bool,
    /// The races this merge found (also in `conflicts`), for the log.
    pub found: Vec<Conflict>,
}

/// Merges `theirs` into `mine`, whose newest stamp made or seen is `clock`.
pub fn merge(mine: &Stored, clock: &Stamp, theirs: &Exchange) -> Result<Merged, Refused> {
    if mine.disconnected {
        return Err(Refused::Disconnected);
    }
    if theirs.version != PROTOCOL {
        return Err(Refused::Protocol {
            ours: PROTOCOL,
            theirs: theirs.version,
            from: theirs.from.clone(),
        });
    }
    if mine.cluster != theirs.cluster {
        return Err(Refused::OtherCluster {
            from: theirs.from.clone(),
            theirs: theirs.cluster.clone(),
            ours: mine.cluster.clone(),
        });
    }
    if mine.paused.contains(&theirs.from) {
        return Err(Refused::Paused {
            from: theirs.from.clone(),
        });
    }
    let mut entries = mine.entries.clone();
    let mut conflicts = mine.conflicts.clone();
    let mut found = Vec::new();
    let mut changed = false;
    let mut clock = clock.clone();
    for e in &theirs.entries {
        if e.stamp > clock {
            clock = e.stamp.clone();
        }
        match entries.iter().find(|m| m.is(&e.key, &e.level)) {
            Some(m) if m.stamp == e.stamp => {}
            Some(m) if m.stamp > e.stamp => {
                // Theirs is older: a change made there that lost a race to one made here, or
                // one this side saw and replaced (the other has not caught up yet).
                if m.raced(e) && !conflicts.iter().any(|c| c.lost == *e) {
                    let c = Conflict {
                        lost: e.clone(),
                        winner: m.stamp.clone(),
                    };
                    found.push(c.clone());
                    conflicts.push(c);
                }
            }
            m => {
                if let Some(m) = m.filter(|m| e.raced(m)) {
                    let c = Conflict {
                        lost: m.clone(),
                        winner: e.stamp.clone(),
                    };
                    found.push(c.clone());
                    conflicts.push(c);
                }
                upsert(&mut entries, e.clone());
                changed = true;
            }
        }
    }
    // Within a cluster, only members exchange: one that was removed is refused (its own
    // exchange may carry the entry that says it joined, so this looks after the merge).
    if let Some(name) = &mine.cluster {
        let level = Level::machine(&theirs.from);
        let its_own = |e: &&Entry| e.is(MEMBER_KEY, &level);
        let member = entries.iter().filter(its_own).any(|e| e.value.is_some());
        // A member's last exchange as it leaves carries its own tombstone.
        let leaving = theirs
            .entries
            .iter()
            .filter(its_own)
            .any(|e| e.value.is_none() && e.stamp.node == theirs.from);
        if !member && !leaving {
            return Err(Refused::NotMember {
                from: theirs.from.clone(),
                cluster: name.clone(),
            });
        }
    }
    for c in &theirs.conflicts {
        if !conflicts.contains(c) {
            conflicts.push(c.clone());
        }
    }
    let drop = conflicts.len().saturating_sub(CONFLICTS_KEPT);
    conflicts.drain(..drop);
    Ok(Merged {
        entries,
        conflicts,
        clock,
        changed,
        found,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn stamp(ms: u64, node: &str) -> Stamp {
        Stamp {
            ms,
            counter: 0,
            node: node.into(),
        }
    }

    /// `relay` at the cluster level, set to `v` at `ms` on `node`, having replaced `seen`.
    fn relay(v: &str, ms: u64, node: &str, seen: &[Stamp]) -> Entry {
        Entry {
            key: "smtp.relay_domains".into(),
            level: Level::Cluster,
            value: Some(json!([v])),
            stamp: stamp(ms, node),
            supersedes: seen.to_vec(),
        }
    }

    fn member(node: &str, ms: u64, up: bool) -> Entry {
        Entry {
            key: MEMBER_KEY.into(),
            level: Level::machine(node),
            value: up.then(|| json!("127.0.0.1:1")),
            stamp: stamp(ms, node),
            supersedes: Vec::new(),
        }
    }

    fn from(node: &str, entries: Vec<Entry>) -> Exchange {
        Exchange {
            version: PROTOCOL,
            entries,
            from: node.into(),
            ..Exchange::default()
        }
    }

    fn stored(entries: Vec<Entry>) -> Stored {
        Stored {
            entries,
            ..Stored::default()
        }
    }

    /// The value of the cluster `relay` entry after the merge.
    fn relay_of(m: &Merged) -> Option<String> {
        m.entries
            .iter()
            .find(|e| e.key == "smtp.relay_domains")
            .and_then(|e| e.value.as_ref())
            .map(|v| v[0].as_str().unwrap().to_string())
    }

    #[test]
    fn the_newest_stamp_wins_and_only_a_race_is_a_conflict() {
        let a1 = relay("a.example", 100, "gw_a", &[]);
        let saw_a1 = std::slice::from_ref(&a1.stamp);
        // (case, mine, theirs, value after, changed, conflicts found: the loser's node)
        type Row<'a> = (&'a str, Vec<Entry>, Vec<Entry>, &'a str, bool, Vec<&'a str>);
        let table: Vec<Row> = vec![
            (
                "new here",
                vec![],
                vec![a1.clone()],
                "a.example",
                true,
                vec![],
            ),
            (
                "the same",
                vec![a1.clone()],
                vec![a1.clone()],
                "a.example",
                false,
                vec![],
            ),
            (
                "theirs newer, made after seeing mine",
                vec![a1.clone()],
                vec![relay("b.example", 200, "gw_b", saw_a1)],
                "b.example",
                true,
                vec![],
            ),
            (
                "theirs newer, made without seeing mine: mine lost a race",
                vec![a1.clone()],
                vec![relay("b.example", 200, "gw_b", &[])],
                "b.example",
                true,
                vec!["gw_a"],
            ),
            (
                "theirs older, raced: theirs lost",
                vec![relay("b.example", 200, "gw_b", &[])],
                vec![a1.clone()],
                "b.example",
                false,
                vec!["gw_a"],
            ),
            (
                "theirs older, seen and replaced here: no conflict",
                vec![relay("b.example", 200, "gw_b", saw_a1)],
                vec![a1.clone()],
                "b.example",
                false,
                vec![],
            ),
            (
                "older from the same node: replaced there, no conflict",
                vec![relay("c.example", 300, "gw_a", &[])],
                vec![a1.clone()],
                "c.example",
                false,
                vec![],
            ),
        ];
        for (case, mine, theirs, value, changed, losers) in table {
            let m = merge(&stored(mine), &Stamp::default(), &from("gw_b", theirs)).unwrap();
            assert_eq!(relay_of(&m).as_deref(), Some(value), "{case}");
            assert_eq!(m.changed, changed, "{case}");
            let found: Vec<&str> = m.found.iter().map(|c| c.lost.stamp.node.as_str()).collect();
            assert_eq!(found, losers, "{case}");
            assert_eq!(m.conflicts.len(), losers.len(), "{case}");
        }
    }

    #[test]
    fn the_clock_moves_to_the_newest_stamp_seen() {
        let theirs = from("gw_b", vec![relay("b.example", 500, "gw_b", &[])]);
        let m = merge(&stored(vec![]), &stamp(300, "gw_a"), &theirs).unwrap();
        assert_eq!(m.clock, stamp(500, "gw_b"));
        let m = merge(&stored(vec![]), &stamp(900, "gw_a"), &theirs).unwrap();
        assert_eq!(m.clock, stamp(900, "gw_a"));
    }

    #[test]
    fn conflicts_travel_once_and_the_newest_are_kept() {
        let lost = Conflict {
            lost: relay("a.example", 1, "gw_a", &[]),
            winner: stamp(2, "gw_c"),
        };
        let mut theirs = from("gw_b", vec![]);
        theirs.conflicts = vec![lost.clone()];
        let mut mine = stored(vec![]);
        mine.conflicts = vec![lost.clone()];
        assert_eq!(
            merge(&mine, &Stamp::default(), &theirs).unwrap().conflicts,
            [lost]
        );
        mine.conflicts = (0..CONFLICTS_KEPT as u64)
            .map(|ms| Conflict {
                lost: relay("x.example", ms, "gw_a", &[]),
                winner: stamp(ms + 1, "gw_c"),
            })
            .collect();
        let m = merge(&mine, &Stamp::default(), &theirs).unwrap();
        assert_eq!(m.conflicts.len(), CONFLICTS_KEPT);
        assert_eq!(
            m.conflicts.first().unwrap().lost.stamp.ms,
            1,
            "the oldest went"
        );
    }

    #[test]
    fn refusals_name_why() {
        let mut mine = stored(vec![]);
        let mut theirs = from("gw_b", vec![]);
        // (case, change to mine, change to theirs, refusal)
        type Change<T> = fn(&mut T);
        let table: Vec<(&str, Change<Stored>, Change<Exchange>, Refused)> = vec![
            (
                "disconnected",
                |m| m.disconnected = true,
                |_| {},
                Refused::Disconnected,
            ),
            (
                "another version",
                |_| {},
                |t| t.version = 99,
                Refused::Protocol {
                    ours: PROTOCOL,
                    theirs: 99,
                    from: "gw_b".into(),
                },
            ),
            (
                "another cluster",
                |m| m.cluster = Some("eu".into()),
                |t| t.cluster = Some("us".into()),
                Refused::OtherCluster {
                    from: "gw_b".into(),
                    theirs: Some("us".into()),
                    ours: Some("eu".into()),
                },
            ),
            (
                "a member and a unit in none",
                |m| m.cluster = Some("eu".into()),
                |_| {},
                Refused::OtherCluster {
                    from: "gw_b".into(),
                    theirs: None,
                    ours: Some("eu".into()),
                },
            ),
            (
                "paused",
                |m| m.paused = vec!["gw_b".into()],
                |_| {},
                Refused::Paused {
                    from: "gw_b".into(),
                },
            ),
            (
                "removed from the cluster",
                |m| {
                    m.cluster = Some("eu".into());
                    m.entries = vec![member("gw_b", 5, false)];
                },
                |t| t.cluster = Some("eu".into()),
                Refused::NotMember {
                    from: "gw_b".into(),
                    cluster: "eu".into(),
                },
            ),
        ];
        for (case, change_mine, change_theirs, want) in table {
            let (mut m, mut t) = (mine.clone(), theirs.clone());
            change_mine(&mut m);
            change_theirs(&mut t);
            assert_eq!(merge(&m, &Stamp::default(), &t), Err(want), "{case}");
        }
        // A member that joined (its own entry comes with its exchange) and one leaving (its
        // own tombstone) are heard.
        mine.cluster = Some("eu".into());
        theirs.cluster = Some("eu".into());
        theirs.entries = vec![member("gw_b", 5, true)];
        assert!(merge(&mine, &Stamp::default(), &theirs).is_ok());
        mine.entries = vec![member("gw_b", 5, true)];
        theirs.entries = vec![member("gw_b", 6, false)];
        assert!(merge(&mine, &Stamp::default(), &theirs).is_ok());
    }
}
