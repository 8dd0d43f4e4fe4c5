//! Where a setting applies: the whole cluster, a group of units, or one unit. Stored and sent
//! as text (`cluster`, `group:<name>`, `machine:<node>`), so stores written before read the
//! same.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The level of a setting. Effective value on a unit: its machine entry, else its group's,
/// else the cluster's, else the configuration file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Every member.
    Cluster,
    /// The units whose `machine.group` names this group.
    Group(String),
    /// One unit, by node name.
    Machine(String),
}

/// A level, cluster or group name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("level `{0}`: must be cluster, group:NAME or machine[:NODE] (names: a-z, 0-9, _ and -)")]
pub struct BadLevel(pub String);

/// Whether `name` may name a group, a cluster or a machine level: 1 to 32 of a-z, 0-9, `_`, `-`.
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Level {
    /// A level as an operator writes it; a bare `machine` is this unit's (`node`).
    pub fn parse(text: &str, node: &str) -> Result<Level, BadLevel> {
        match text.split_once(':') {
            None if text == "cluster" => Ok(Level::Cluster),
            None if text == "machine" => Ok(Level::Machine(node.to_string())),
            Some(("group", g)) if name_ok(g) => Ok(Level::Group(g.to_string())),
            Some(("machine", n)) if name_ok(n) => Ok(Level::Machine(n.to_string())),
            _ => Err(BadLevel(text.to_string())),
        }
    }

    /// The group's level.
    pub fn group(name: &str) -> Level {
        Level::Group(name.to_string())
    }

    /// The unit's level.
    pub fn machine(node: &str) -> Level {
        Level::Machine(node.to_string())
    }

    /// Whether this is a machine level.
    pub fn is_machine(&self) -> bool {
        matches!(self, Level::Machine(_))
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Level::Cluster => f.write_str("cluster"),
            Level::Group(g) => write!(f, "group:{g}"),
            Level::Machine(n) => write!(f, "machine:{n}"),
        }
    }
}

impl Serialize for Level {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Level, D::Error> {
        let text = String::deserialize(d)?;
        // Stored levels name their machine; a bare `machine` is never written.
        match text.split_once(':') {
            None if text == "cluster" => Ok(Level::Cluster),
            Some(("group", g)) if !g.is_empty() => Ok(Level::Group(g.to_string())),
            Some(("machine", n)) if !n.is_empty() => Ok(Level::Machine(n.to_string())),
            _ => Err(serde::de::Error::custom(BadLevel(text))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn levels_parse_print_and_travel_as_text() {
        let ok: &[(&str, Level)] = &[
            ("cluster", Level::Cluster),
            ("machine", Level::machine("gw_a")),
            ("machine:gw_b", Level::machine("gw_b")),
            ("group:edge-1", Level::group("edge-1")),
        ];
        for (text, level) in ok {
            assert_eq!(Level::parse(text, "gw_a").as_ref(), Ok(level), "{text}");
            let wire = serde_json::to_string(level).unwrap();
            assert_eq!(serde_json::from_str::<Level>(&wire).unwrap(), *level);
        }
        assert_eq!(Level::machine("gw_b").to_string(), "machine:gw_b");
        for bad in [
            "group",
            "group:",
            "group:Edge",
            "cluster:x",
            "node:a",
            "",
            "machine:a b",
        ] {
            assert!(Level::parse(bad, "gw_a").is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<Level>("\"machine\"").is_err());
        assert!(!name_ok(&"a".repeat(33)) && name_ok(&"a".repeat(32)));
    }
}
