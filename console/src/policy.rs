//! Who may do what: the roles and the one decision every page and action asks before it
//! touches anything. Pure: no I/O, table-tested.
//!
//! Separation of duties is the point: an `admin` runs the gateway (status, queue, settings) and
//! reads no mail; an `auditor` reads the archive and its audit log and changes nothing on the
//! gateway; a `user` reads only mail from or to their own addresses.

use serde::{Deserialize, Serialize};

/// A console user's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the gateway: pair and cluster status, the queue, settings. No message content.
    Admin,
    /// Reads the archive: search, view, export, legal hold, the audit log.
    Auditor,
    /// Searches and views the archived mail from or to their own addresses only.
    User,
}

impl Role {
    /// Every role, for listings and messages.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Auditor, Role::User];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::User => "user",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("{s:?} is not a role (admin, auditor, user)"))
    }
}

/// What a request asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Pair status: role, link, lag, queue by folder.
    Status,
    /// The queue's list (envelopes, attempts, errors: no content).
    QueueList,
    /// Hold, release, requeue or delete queued messages.
    QueueChange,
    /// Read the clustered settings.
    SettingsRead,
    /// Change a clustered setting.
    SettingsChange,
    /// Search the archive.
    Search,
    /// View or download an archived message.
    View,
    /// Export a query's matches in bulk.
    BulkExport,
    /// Put items on legal hold or take them off.
    LegalHold,
    /// Read the audit log.
    AuditLog,
    /// Follow a message by its Message-ID through the units.
    Track,
    /// The quarantine inbox: one's own quarantined mail, on every unit.
    Quarantine,
}

impl Action {
    /// Every action, for tables.
    pub const ALL: [Action; 12] = [
        Action::Status,
        Action::QueueList,
        Action::QueueChange,
        Action::SettingsRead,
        Action::SettingsChange,
        Action::Search,
        Action::View,
        Action::BulkExport,
        Action::LegalHold,
        Action::AuditLog,
        Action::Track,
        Action::Quarantine,
    ];
}

/// Whose mail an archive request may reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every item.
    All,
    /// Only items whose envelope sender or a recipient is one of these addresses.
    Addresses(Vec<String>),
}

/// Whether `role` may do `action`; archive reads come with the scope they are limited to.
pub fn allowed(role: Role, action: Action) -> Option<Scope> {
    use Action::*;
    let all = Some(Scope::All);
    match (role, action) {
        (Role::Admin, Status | QueueList | QueueChange | SettingsRead | SettingsChange | Track) => {
            all
        }
        (Role::Auditor, Search | View | BulkExport | LegalHold | AuditLog | Track) => all,
        // A user's own addresses are added by the caller (`scope_for`).
        (Role::User, Search | View | Quarantine) => Some(Scope::Addresses(Vec::new())),
        _ => None,
    }
}

/// The scope of `action` for a user with `role` and `addresses`; `None`: refused.
pub fn scope_for(role: Role, addresses: &[String], action: Action) -> Option<Scope> {
    match allowed(role, action)? {
        Scope::All => Some(Scope::All),
        Scope::Addresses(_) if addresses.is_empty() => None,
        Scope::Addresses(_) => Some(Scope::Addresses(
            addresses.iter().map(|a| a.to_ascii_lowercase()).collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    #[test]
    fn each_role_may_do_exactly_its_own_work() {
        let table: [(Role, &[Action]); 3] = [
            (
                Role::Admin,
                &[
                    Status,
                    QueueList,
                    QueueChange,
                    SettingsRead,
                    SettingsChange,
                    Track,
                ],
            ),
            (
                Role::Auditor,
                &[Search, View, BulkExport, LegalHold, AuditLog, Track],
            ),
            (Role::User, &[Search, View, Quarantine]),
        ];
        for (role, may) in table {
            for action in Action::ALL {
                assert_eq!(
                    allowed(role, action).is_some(),
                    may.contains(&action),
                    "{role:?} {action:?}"
                );
            }
        }
    }

    #[test]
    fn a_user_reads_only_their_own_addresses_and_without_any_nothing() {
        let mine = vec!["Alice@Example.org".to_string()];
        assert_eq!(
            scope_for(Role::User, &mine, View),
            Some(Scope::Addresses(vec!["alice@example.org".into()]))
        );
        assert_eq!(scope_for(Role::User, &[], Search), None);
        assert_eq!(scope_for(Role::Auditor, &[], View), Some(Scope::All));
        assert_eq!(scope_for(Role::Admin, &mine, View), None, "no content");
    }

    #[test]
    fn roles_are_named_and_parsed_back() {
        for r in Role::ALL {
            assert_eq!(r.name().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
