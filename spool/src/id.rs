//! Message ids: unique across an HA pair and over time, sortable by arrival, safe as file names.
//!
//! An id is `<stamp>-<node>`: `stamp` is 16 lowercase hex digits of `micros_since_epoch << 12 | n`,
//! where `n` counts ids issued within one microsecond, and `node` is the origin node's name.
//! Fixed-width hex makes lexical order equal arrival order on one node; the node suffix keeps ids
//! of the two units of a pair apart even when their clocks agree. Ids never derive from inodes, so
//! a spool can be copied to another host and keep its meaning.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest node name accepted; keeps file names short and predictable.
pub const NODE_NAME_LEN_MAX: usize = 32;

/// Bits of the stamp used to count ids within one microsecond.
const SEQ_BITS: u32 = 12;

/// A message id. Cheap to clone (no allocation), ordered by arrival on its origin node.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    stamp: u64,
    node: Arc<str>,
}

/// Node names seen so far, shared by every id that names them: a spool of a million messages
/// from two nodes holds two copies of the names, not a million (the schedule and recovery keep
/// an id per message in memory).
const INTERNED_NODES_MAX: usize = 1024;

fn interned(node: &str) -> Arc<str> {
    static NODES: OnceLock<Mutex<HashSet<Arc<str>>>> = OnceLock::new();
    let mut nodes = NODES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(known) = nodes.get(node) {
        return known.clone();
    }
    let name: Arc<str> = node.into();
    // Bounded whatever the input (ids come from files and the partner): past the limit a name
    // gets its own copy, as every id did before names were shared.
    if nodes.len() < INTERNED_NODES_MAX {
        nodes.insert(name.clone());
    }
    name
}

/// Why a string is not a valid id or node name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    /// The id does not have the `<16 hex>-<node>` shape.
    #[error("malformed message id {0:?}")]
    Malformed(String),
    /// A node name must be 1..=32 characters of `[a-z0-9_]`.
    #[error("invalid node name {0:?}: use 1 to 32 characters of a-z, 0-9 and _")]
    BadNode(String),
}

/// Checks a node name: lowercase letters, digits and `_`, 1 to 32 characters.
pub fn validate_node_name(node: &str) -> Result<(), IdError> {
    let ok = !node.is_empty()
        && node.len() <= NODE_NAME_LEN_MAX
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(IdError::BadNode(node.to_string()))
    }
}

impl MessageId {
    /// The origin node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Arrival time in microseconds since the Unix epoch.
    pub fn arrival_micros(&self) -> u64 {
        self.stamp >> SEQ_BITS
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.stamp, self.node)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MessageId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || IdError::Malformed(s.chars().take(80).collect());
        let (hex, node) = s.split_once('-').ok_or_else(malformed)?;
        if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(malformed());
        }
        validate_node_name(node).map_err(|_| malformed())?;
        let stamp = u64::from_str_radix(hex, 16).map_err(|_| malformed())?;
        Ok(MessageId {
            stamp,
            node: interned(node),
        })
    }
}

/// Issues ids for one node. Thread-safe; ids from one generator strictly increase even if the
/// wall clock steps back (it then borrows from the future until the clock catches up).
pub struct IdGenerator {
    node: Arc<str>,
    last: Mutex<u64>,
}

impl IdGenerator {
    /// A generator for `node`, which must pass [`validate_node_name`].
    pub fn new(node: &str) -> Result<Self, IdError> {
        validate_node_name(node)?;
        Ok(IdGenerator {
            node: interned(node),
            last: Mutex::new(0),
        })
    }

    /// The next id.
    pub fn next_id(&self) -> MessageId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let candidate = now << SEQ_BITS;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = candidate.max(*last + 1);
        *last = stamp;
        MessageId {
            stamp,
            node: self.node.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sort_by_arrival() {
        let g = IdGenerator::new("gw_a").unwrap();
        let ids: Vec<MessageId> = (0..10_000).map(|_| g.next_id()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(pair[0].to_string() < pair[1].to_string());
        }
        let s = ids[5].to_string();
        assert_eq!(s.len(), 16 + 1 + 4);
        assert_eq!(s.parse::<MessageId>().unwrap(), ids[5]);
        assert_eq!(ids[5].node(), "gw_a");
    }

    #[test]
    fn ids_of_one_node_share_its_name() {
        let a: MessageId = "0123456789abcdef-shared_node".parse().unwrap();
        let b: MessageId = "0123456789abcdf0-shared_node".parse().unwrap();
        let c = IdGenerator::new("shared_node").unwrap().next_id();
        assert!(Arc::ptr_eq(&a.node, &b.node) && Arc::ptr_eq(&a.node, &c.node));
        assert_eq!(std::mem::size_of::<MessageId>(), 24);
    }

    #[test]
    fn rejects_malformed_ids_and_nodes() {
        for bad in [
            "",
            "abc",
            "0123456789abcdef",
            "0123456789abcdef-",
            "0123456789ABCDEF-a",
            "0123456789abcdef-A",
            "0123456789abcde-a",
            "0123456789abcdef-a/b",
            "0123456789abcdef-../x",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?}");
        }
        assert!(IdGenerator::new("Node").is_err());
        assert!(IdGenerator::new(&"a".repeat(33)).is_err());
    }
}
