//! The hybrid logical clock that orders changes to a setting across units: wall-clock ms, a
//! counter within the ms, and the node that made the change. A unit's next stamp is never
//! behind any stamp it has seen, so a change made after seeing another always wins over it,
//! whatever the clocks say; ties between nodes resolve the same way everywhere (by name).

use serde::{Deserialize, Serialize};

/// A hybrid logical clock stamp. Ordered by `ms`, then `counter`, then `node`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Wall-clock ms (never behind any stamp seen).
    pub ms: u64,
    /// Orders stamps made within one ms.
    pub counter: u32,
    /// The node that made the change.
    pub node: String,
}

impl Stamp {
    /// The stamp for a change made at `node` now (`now_ms`), after `last`, the newest stamp
    /// this unit has made or seen.
    pub fn next(last: &Stamp, node: &str, now_ms: u64) -> Stamp {
        if now_ms > last.ms {
            Stamp {
                ms: now_ms,
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
}

/// Milliseconds since the Unix epoch: the wall-clock part of a new stamp, and the crate's one
/// clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl std::fmt::Display for Stamp {
    /// `ms.counter@node`, as `spoolctl config show` and `cluster status` print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}@{}", self.ms, self.counter, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ms: u64, counter: u32, node: &str) -> Stamp {
        Stamp {
            ms,
            counter,
            node: node.into(),
        }
    }

    #[test]
    fn the_next_stamp_is_never_behind_the_last_one_seen() {
        // (last, node, now, next)
        let table = [
            (stamp(0, 0, ""), "a", 100, stamp(100, 0, "a")),
            (stamp(100, 0, "b"), "a", 101, stamp(101, 0, "a")),
            // Same ms, or a clock behind the last stamp seen: the counter moves on.
            (stamp(100, 0, "b"), "a", 100, stamp(100, 1, "a")),
            (stamp(100, 7, "b"), "a", 40, stamp(100, 8, "a")),
        ];
        for (last, node, now, want) in table {
            let next = Stamp::next(&last, node, now);
            assert_eq!(next, want);
            assert!(next > last);
        }
        // Ties between nodes order by name, everywhere the same.
        assert!(stamp(5, 0, "b") > stamp(5, 0, "a"));
        assert_eq!(stamp(5, 2, "gw_a").to_string(), "5.2@gw_a");
    }
}
