//! The query language of `spoolctl track`: terms ANDed (`id:`, `msgid:`, `from:`, `to:`,
//! `ev:` (an event's kind: `ev:bounced`), or a bare term matching any of the first four),
//! narrowed by `after:` and `before:` (RFC 3339 or ms since the epoch). Pure: parsing and
//! matching, no files.

use crate::event::Event;

/// What `spoolctl track` asks for: terms ANDed; a bare term matches the id, the Message-ID,
/// the sender or a recipient.
#[derive(Debug, Default)]
pub struct Query {
    terms: Vec<(Field, String)>,
    after: Option<u64>,
    before: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Any,
    Id,
    MsgId,
    From,
    To,
    /// The event's kind (`bounced`, `deferred`, …): selects the messages that had one.
    Event,
}

fn parse_time(v: &str) -> Result<u64, String> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .map_err(|e| format!("{v:?}: not a time (RFC 3339 or ms since the epoch): {e}"))
}

impl Query {
    /// Parses `spoolctl track`'s words: `id:`, `msgid:`, `from:`, `to:`, `after:`, `before:`
    /// or a bare term.
    pub fn parse(text: &str) -> Result<Query, String> {
        let mut q = Query::default();
        for word in text.split_whitespace() {
            let (field, value) = match word.split_once(':') {
                Some(("id", v)) => (Field::Id, v),
                Some(("msgid", v)) => (Field::MsgId, v),
                Some(("from", v)) => (Field::From, v),
                Some(("to", v)) => (Field::To, v),
                Some(("ev", v)) => (Field::Event, v),
                Some(("after", v)) => {
                    q.after = Some(parse_time(v)?);
                    continue;
                }
                Some(("before", v)) => {
                    q.before = Some(parse_time(v)?);
                    continue;
                }
                _ => (Field::Any, word),
            };
            q.terms.push((field, value.to_ascii_lowercase()));
        }
        if q.terms.is_empty() {
            return Err(
                "name the message: id:, msgid:, from:, to: or a bare term (after:/before: narrow)"
                    .into(),
            );
        }
        Ok(q)
    }

    /// Whether `t` (ms since the epoch) is within `after:` and `before:`.
    pub fn in_time(&self, t: u64) -> bool {
        self.after.is_none_or(|a| t >= a) && self.before.is_none_or(|b| t < b)
    }

    /// Whether the event names a message the query asks for.
    pub fn selects(&self, e: &Event) -> bool {
        let has = |v: &str, want: &str| v.to_ascii_lowercase().contains(want);
        // A message has one id: several `id:` terms mean any of them.
        let ids: Vec<&String> = self
            .terms
            .iter()
            .filter(|(f, _)| *f == Field::Id)
            .map(|(_, v)| v)
            .collect();
        if !ids.is_empty() && !ids.iter().any(|w| e.spool_id.to_ascii_lowercase() == **w) {
            return false;
        }
        self.terms
            .iter()
            .filter(|(f, _)| *f != Field::Id)
            .all(|(field, want)| {
                let id = || e.spool_id.to_ascii_lowercase() == *want;
                let msgid = || e.message_id.as_deref().is_some_and(|m| has(m, want));
                let from = || e.sender.as_deref().is_some_and(|f| has(f, want));
                let to = || e.recipients.iter().any(|t| has(t, want));
                match field {
                    Field::Id => true,
                    Field::MsgId => msgid(),
                    Field::From => from(),
                    Field::To => to(),
                    Field::Event => e.kind.as_str() == want,
                    Field::Any => id() || msgid() || from() || to(),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::event::EventKind;

    fn event(id: &str, from: Option<&str>, to: &[&str], msgid: Option<&str>, at_ms: u64) -> Event {
        Event {
            at_ms,
            unit: "gw_a".into(),
            spool_id: id.into(),
            kind: EventKind::Accepted,
            detail: String::new(),
            sender: from.map(Into::into),
            recipients: to.iter().map(|t| t.to_string()).collect(),
            message_id: msgid.map(Into::into),
        }
    }

    #[test]
    fn terms_select_by_field_and_time() {
        let e = event(
            "M1",
            Some("Ann@X.org"),
            &["bob@y.org"],
            Some("<1@x>"),
            1_000,
        );
        let mut bare = event("m2", None, &[], None, 1_000);
        bare.kind = EventKind::Bounced;
        // (query, selects e, selects the id-only event)
        let table: &[(&str, bool, bool)] = &[
            ("id:m1", true, false),
            ("id:m1 id:m2", true, true),
            ("ann@x.org", true, false),
            ("from:x.org", true, false),
            ("to:x.org", false, false),
            ("to:bob", true, false),
            ("msgid:<1@x>", true, false),
            ("m2", false, true),
            ("from:ann to:bob", true, false),
            ("from:ann to:carol", false, false),
            ("ev:bounced", false, true),
            ("ev:accepted from:ann", true, false),
            ("ev:bounced from:ann", false, false),
        ];
        for (text, want_e, want_bare) in table {
            let q = Query::parse(text).unwrap();
            assert_eq!(
                (q.selects(&e), q.selects(&bare)),
                (*want_e, *want_bare),
                "{text}"
            );
        }
        let q = Query::parse("m1 after:999 before:1001").unwrap();
        assert!(q.in_time(999) && q.in_time(1_000) && !q.in_time(1_001));
        let q = Query::parse("m1 after:1970-01-01T00:00:01Z").unwrap();
        assert!(!q.in_time(999) && q.in_time(1_000));
        for bad in ["", "after:5", "m1 after:yesterday"] {
            assert!(Query::parse(bad).is_err(), "{bad:?}");
        }
    }
}
