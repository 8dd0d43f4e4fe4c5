//! The search language, as mail clients and archivers spell it: `from:` `to:` `subject:`
//! `body:` `filename:` `msgid:` `id:` `origin:` `after:DATE` `before:DATE` `has:attachment`
//! `size:>N` `size:<N` (N with an optional `k`, `m` or `g`), bare words and "quoted phrases",
//! all of them required (AND). Dates are `YYYY-MM-DD`, UTC; `after:` includes the day,
//! `before:` excludes it. This module only parses; [`crate::index`] runs the clauses.

/// A text field a `name:` prefix searches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextField {
    /// Envelope sender and the From header (names and addresses).
    From,
    /// Envelope recipients and the To and Cc headers.
    To,
    /// The Subject header.
    Subject,
    /// Text of text parts, HTML reduced to text, text attachments.
    Body,
    /// Attachment file names.
    Filename,
}

/// One required condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clause {
    /// Words (a phrase if several) in one field.
    Text(TextField, String),
    /// Words in any text field, or an exact Message-ID or spool id.
    Anywhere(String),
    /// The Message-ID header, exactly (angle brackets optional).
    MessageId(String),
    /// The spool id the message had.
    Id(String),
    /// The node that accepted it.
    Origin(String),
    /// Accepted at or after this time, ms since the epoch.
    After(u64),
    /// Accepted before this time, ms since the epoch.
    Before(u64),
    /// Larger than this many bytes.
    SizeAbove(u64),
    /// Smaller than this many bytes.
    SizeBelow(u64),
    /// Has at least one attachment.
    HasAttachment,
}

/// Parses a query; the error says which part is wrong.
pub fn parse(q: &str) -> Result<Vec<Clause>, String> {
    let mut out = Vec::new();
    for (prefix, value) in split(q)? {
        let clause = match prefix.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => Clause::Anywhere(value),
            Some("from") => Clause::Text(TextField::From, value),
            Some("to") => Clause::Text(TextField::To, value),
            Some("subject") => Clause::Text(TextField::Subject, value),
            Some("body") => Clause::Text(TextField::Body, value),
            Some("filename") => Clause::Text(TextField::Filename, value),
            Some("msgid") => Clause::MessageId(value),
            Some("id") => Clause::Id(value),
            Some("origin") => Clause::Origin(value),
            Some("after") => Clause::After(date_ms(&value)?),
            Some("before") => Clause::Before(date_ms(&value)?),
            Some("has") if value.eq_ignore_ascii_case("attachment") => Clause::HasAttachment,
            Some("has") => return Err(format!("has:{value}: only has:attachment is known")),
            Some("size") => {
                if let Some(n) = value.strip_prefix('>') {
                    Clause::SizeAbove(size(n)?)
                } else if let Some(n) = value.strip_prefix('<') {
                    Clause::SizeBelow(size(n)?)
                } else {
                    return Err(format!("size:{value}: write size:>N or size:<N"));
                }
            }
            Some(p) => {
                return Err(format!(
                    "{p}: unknown field (known: from to subject body filename msgid id origin after before has size)"
                ))
            }
        };
        out.push(clause);
    }
    Ok(out)
}

/// Splits into `(prefix, value)` pairs: `word`, `"a phrase"`, `name:word`, `name:"a phrase"`.
fn split(q: &str) -> Result<Vec<(Option<String>, String)>, String> {
    let mut out = Vec::new();
    let mut chars = q.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut prefix = None;
        let mut word = String::new();
        loop {
            match chars.peek() {
                None => break,
                Some(c) if c.is_whitespace() => break,
                Some('"') => {
                    chars.next();
                    let mut phrase = String::new();
                    loop {
                        match chars.next() {
                            None => return Err("a quoted phrase is not closed".into()),
                            Some('"') => break,
                            Some(c) => phrase.push(c),
                        }
                    }
                    word.push_str(&phrase);
                }
                Some(':')
                    if prefix.is_none()
                        && !word.is_empty()
                        && word.chars().all(|c| c.is_ascii_alphabetic()) =>
                {
                    chars.next();
                    prefix = Some(std::mem::take(&mut word));
                }
                Some(&c) => {
                    chars.next();
                    word.push(c);
                }
            }
        }
        if word.is_empty() {
            return Err(match prefix {
                Some(p) => format!("{p}: has no value"),
                None => "empty phrase".into(),
            });
        }
        out.push((prefix, word));
    }
}

fn date_ms(v: &str) -> Result<u64, String> {
    let d = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| format!("{v}: not a date (YYYY-MM-DD)"))?;
    let ms = d
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp_millis())
        .ok_or_else(|| format!("{v}: not a date"))?;
    u64::try_from(ms).map_err(|_| format!("{v}: before 1970"))
}

fn size(v: &str) -> Result<u64, String> {
    let lower = v.to_ascii_lowercase();
    let (digits, unit) = match lower.strip_suffix(['k', 'm', 'g']) {
        Some(d) => (d, &lower[d.len()..]),
        None => (lower.as_str(), ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{v}: not a size"))?;
    let mult = match unit {
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => 1,
    };
    n.checked_mul(mult).ok_or_else(|| format!("{v}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_language() {
        let q = parse(r#"from:alice@example.com subject:"quarterly report" invoice has:attachment size:>10k before:2026-02-01 msgid:<a@b>"#)
            .unwrap();
        assert_eq!(
            q,
            vec![
                Clause::Text(TextField::From, "alice@example.com".into()),
                Clause::Text(TextField::Subject, "quarterly report".into()),
                Clause::Anywhere("invoice".into()),
                Clause::HasAttachment,
                Clause::SizeAbove(10 << 10),
                Clause::Before(1_769_904_000_000),
                Clause::MessageId("<a@b>".into()),
            ]
        );
        assert_eq!(
            parse("\"two words\"").unwrap(),
            vec![Clause::Anywhere("two words".into())]
        );
        assert_eq!(parse("  ").unwrap(), vec![]);
        // A colon inside a value is kept.
        assert_eq!(
            parse("msgid:a:b@c").unwrap(),
            vec![Clause::MessageId("a:b@c".into())]
        );
    }

    #[test]
    fn errors_name_the_part() {
        for (q, want) in [
            ("colour:red", "colour: unknown field"),
            ("after:yesterday", "yesterday: not a date"),
            ("size:big", "write size:>N"),
            ("size:>lots", "lots: not a size"),
            ("has:wings", "only has:attachment"),
            ("subject:\"open", "not closed"),
            ("from:", "from: has no value"),
        ] {
            let e = parse(q).unwrap_err();
            assert!(e.contains(want), "{q}: {e}");
        }
    }
}
