//! The sender's decisions, as pure functions: what the daemon's sender does and what the
//! deterministic simulation (`tests/simulation.rs`) runs, so that the simulation tests these
//! rules and not a model written beside them.
//!
//! It is not: I/O. Callers read the log, look for files and send frames.

use crate::txlog::Kind;

/// What the sender does when the partner says where it resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// Ship the actions after this sequence.
    pub next: u64,
    /// Ask for a rebuild of the log's `ADD`s: the partner resumes behind what it acknowledged
    /// (a crash before its lazily persisted mark caught up, or a lost state directory, whose
    /// replicas only a rebuild sends again; acknowledged actions are gone from the log).
    pub request_rebuild: bool,
}

/// The partner resumes after `partner_applied`; this unit last saw `acknowledged`.
pub fn on_resume(partner_applied: u64, acknowledged: u64) -> Resume {
    Resume {
        next: partner_applied,
        request_rebuild: partner_applied < acknowledged,
    }
}

/// How many actions may be sent now: the window in actions, and none once `bytes_max` are in
/// flight (which bounds the partner's memory when messages are large).
pub fn room(in_flight: usize, in_flight_bytes: u64, window: usize, bytes_max: u64) -> usize {
    if in_flight_bytes >= bytes_max {
        0
    } else {
        window.saturating_sub(in_flight)
    }
}

/// How one pending action goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ship {
    /// The message, as it is now.
    Add,
    /// Its removal: a `DELETE`, or an `ADD` whose message is gone by now.
    Delete,
    /// Not yet: an `ADD` whose message is still being published (logged, files not yet in
    /// `spool/`); sent once it is, never taken for gone.
    Wait,
}

/// An action of `kind` for a message that is being published (`publishing`, asked first) and
/// is or is not `held` in a replicated folder.
pub fn ship(kind: Kind, publishing: bool, held: bool) -> Ship {
    match kind {
        Kind::Delete => Ship::Delete,
        Kind::Add if publishing => Ship::Wait,
        Kind::Add if held => Ship::Add,
        Kind::Add => Ship::Delete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_on_a_table() {
        assert_eq!(
            on_resume(5, 5),
            Resume {
                next: 5,
                request_rebuild: false
            }
        );
        assert_eq!(
            on_resume(3, 9),
            Resume {
                next: 3,
                request_rebuild: true
            }
        );
        assert_eq!(
            on_resume(9, 3),
            Resume {
                next: 9,
                request_rebuild: false
            }
        );
        assert_eq!(room(3, 0, 8, 100), 5);
        assert_eq!(room(9, 0, 8, 100), 0);
        assert_eq!(room(0, 100, 8, 100), 0, "the byte bound");
        assert_eq!(ship(Kind::Delete, true, true), Ship::Delete);
        assert_eq!(ship(Kind::Add, true, false), Ship::Wait, "publishing wins");
        assert_eq!(ship(Kind::Add, false, true), Ship::Add);
        assert_eq!(
            ship(Kind::Add, false, false),
            Ship::Delete,
            "gone: sent as a DELETE"
        );
    }
}
