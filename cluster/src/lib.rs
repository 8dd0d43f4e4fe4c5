//! `cluster`: clustered settings and membership. Settings changed on any unit reach the
//! others (the HA partner, or every member of the unit's cluster) and apply live, validated
//! where they are made. Each setting is stored per [`Level`] (cluster, group, machine) with a
//! hybrid-logical-clock [`Stamp`]; the newest stamp of a (key, level) wins on every unit, and
//! a change that loses a race is kept in the list of conflicts everywhere.
//!
//! - `level`, `stamp`, `entry`: the vocabulary; `merge`: the pure merge, table-tested;
//! - `settings` (and `report`): one unit's store on disk and the effective configuration;
//! - `schema`: what the daemon tells the store of its configuration (one table of keys);
//! - `proto`: the typed requests and replies between units and their codec;
//! - `membership`: who exchanges with whom, over the cluster link or through a [`Partner`].
//!
//! Membership is stored as entries that merge like settings: `cluster.member` at
//! `machine:<node>` (the member's cluster-link address; unset when it left) and
//! `cluster.group` at `group:<name>` (the group exists). The cluster's name is the unit's own:
//! set by `create` or `join`, cleared by `leave`.
//!
//! Not here: the daemon's configuration and what its keys mean (spoold implements
//! [`Schema`]), the peer link's transport and authentication (`peer`), the tracking log
//! (`track`).

pub mod entry;
pub mod level;
pub mod membership;
pub mod merge;
pub mod proto;
mod report;
pub mod schema;
pub mod settings;
pub mod stamp;

pub use entry::{Conflict, Entry, GROUP_KEY, GROUP_MARK_KEY, MEMBER_KEY};
pub use level::Level;
pub use membership::{Gauges, GroupChange, Membership, Partner, SYNC_EVERY};
pub use proto::{Exchange, PROTOCOL};
pub use schema::{parse_value, Key, Schema};
pub use settings::Settings;
pub use stamp::Stamp;
