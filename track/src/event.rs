//! One line of the tracking log, and what `spoolctl track` shows: the record that units send
//! each other and the admin socket answers (`api` re-exports it). The field names on the wire
//! are the log's short ones (`t`, `ev`, `msgid`, ...), so logs written before stay readable.

use serde::{Deserialize, Serialize};

/// What happened to a message. Kebab-case on the wire (`replica-removed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// Accepted over SMTP and spooled (`250` sent).
    Accepted,
    /// Taken from `input/` into the spool.
    Inserted,
    /// Stored here as the partner's replica.
    Replicated,
    /// The content filter's verdict.
    Scanned,
    /// A milter's verdict or changes before the `250` (a rejected message has its id too).
    Milter,
    /// Delivered to one recipient.
    Delivered,
    /// A recipient's delivery was put off (temporary failure).
    Deferred,
    /// A recipient's delivery failed for good.
    Failed,
    /// A delivery status notification went to the sender.
    Bounced,
    /// Written to the archive.
    Archived,
    /// Left the spool (every recipient done).
    Removed,
    /// Deleted by an operator.
    Deleted,
    /// Copied here from the partner by takeover recovery.
    Recovered,
    /// The partner's replica removed here (it left the partner's spool).
    ReplicaRemoved,
    /// A kind this version does not know (a newer unit's event): shown, never written here.
    #[serde(other)]
    Unknown,
}

impl EventKind {
    /// The name on the wire and in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Inserted => "inserted",
            EventKind::Replicated => "replicated",
            EventKind::Scanned => "scanned",
            EventKind::Milter => "milter",
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Failed => "failed",
            EventKind::Bounced => "bounced",
            EventKind::Archived => "archived",
            EventKind::Removed => "removed",
            EventKind::Deleted => "deleted",
            EventKind::Recovered => "recovered",
            EventKind::ReplicaRemoved => "replica-removed",
            EventKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`: column widths in `spoolctl track` apply.
        f.pad(self.as_str())
    }
}

/// One thing that happened to a message on a unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When, ms since the epoch.
    #[serde(rename = "t")]
    pub at_ms: u64,
    /// The unit (node name) where it happened.
    pub unit: String,
    /// The message's spool id.
    #[serde(rename = "id")]
    pub spool_id: String,
    /// What happened.
    #[serde(rename = "ev")]
    pub kind: EventKind,
    /// Details (client and size, next hop and reply, verdict, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Envelope sender, on events that name the envelope.
    #[serde(rename = "from", default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// Envelope recipients, on events that name the envelope.
    #[serde(rename = "to", default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// The Message-ID header, on events that name the envelope.
    #[serde(rename = "msgid", default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kinds_are_kebab_case_on_the_wire_and_unknown_ones_still_read() {
        for kind in [
            EventKind::Accepted,
            EventKind::Inserted,
            EventKind::Replicated,
            EventKind::Scanned,
            EventKind::Delivered,
            EventKind::Deferred,
            EventKind::Failed,
            EventKind::Bounced,
            EventKind::Archived,
            EventKind::Removed,
            EventKind::Deleted,
            EventKind::Recovered,
            EventKind::ReplicaRemoved,
        ] {
            let wire = serde_json::to_string(&kind).unwrap();
            assert_eq!(wire, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<EventKind>(&wire).unwrap(), kind);
        }
        let line = r#"{"t":5,"unit":"gw_a","id":"m1","ev":"teleported","to":["b@x"]}"#;
        let e: Event = serde_json::from_str(line).unwrap();
        assert_eq!(
            (e.kind, e.at_ms, e.recipients),
            (EventKind::Unknown, 5, vec!["b@x".to_string()])
        );
        assert_eq!(
            format!("{:<10}|", EventKind::ReplicaRemoved),
            "replica-removed|"
        );
        assert_eq!(format!("{:<10}|", EventKind::Failed), "failed    |");
    }
}
