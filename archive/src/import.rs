//! Reading mail out of the stores an archive imports from: mbox files (mboxrd or mboxo `From `
//! quoting), Maildir folders, directories of `.eml` files, a single message file. Pure decisions
//! over bytes and names: what is a message, where it starts, its original arrival time, the
//! envelope an imported item gets, and the verdict of what cannot be imported (with its reason).
//!
//! Not here: reading files (the caller maps them), archiving (`Archive::archive`), the report.

use std::path::{Path, PathBuf};

/// How `>From ` lines in an mbox are undone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quoting {
    /// mboxrd: every `>`*`From ` line lost one `>` (reversible: what is read is what was written).
    Rd,
    /// mboxo: only `>From ` became `From ` (lines that began `>From ` before are ambiguous).
    O,
}

/// One message found in a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Where in the source: `byte 1234` of an mbox, or the file.
    pub at: String,
    /// Its bytes, unquoted.
    pub raw: Vec<u8>,
    /// When it arrived where it was kept, ms since the epoch, when the source says.
    pub arrived_ms: Option<u64>,
}

/// What cannot be imported, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Where in the source.
    pub at: String,
    /// Why: `empty file`, `not mail: …`, `truncated at byte N`, `too large: …`.
    pub reason: String,
}

/// The kind of a path given to import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file of many messages.
    Mbox(PathBuf),
    /// One message.
    Message(PathBuf),
    /// A Maildir: its `cur/` and `new/` files, in name order.
    Maildir(Vec<PathBuf>),
    /// Message files of a directory (`.eml`, or every file of a directory that holds no
    /// Maildir), in name order.
    Files(Vec<PathBuf>),
}

/// Whether `bytes` begin like an mbox (a `From ` separator line).
pub fn looks_like_mbox(bytes: &[u8]) -> bool {
    bytes.starts_with(b"From ")
}

/// Gives `each` the messages of an mbox's bytes in order (one at a time: an mbox may be larger
/// than memory), each with its `From ` line's date as its arrival, and what is refused (a
/// message without a header block, or the last one cut short: no line break at the end of the
/// file), with the byte where each ends.
pub fn mbox(
    bytes: &[u8],
    quoting: Quoting,
    size_max: u64,
    mut each: impl FnMut(Result<Found, Refused>, usize),
) {
    if bytes.is_empty() {
        let reason = "empty file".into();
        return each(
            Err(Refused {
                at: "byte 0".into(),
                reason,
            }),
            0,
        );
    }
    if !looks_like_mbox(bytes) {
        let reason = "not an mbox: it does not begin with a `From ` line".into();
        return each(
            Err(Refused {
                at: "byte 0".into(),
                reason,
            }),
            bytes.len(),
        );
    }
    // A separator is a `From ` line at the start of the file or after an empty line.
    let mut from = 0usize;
    while from < bytes.len() {
        let to = next_separator(bytes, from);
        let chunk = &bytes[from..to];
        let at = format!("byte {from}");
        let separator_end = chunk
            .iter()
            .position(|&b| b == b'\n')
            .map_or(chunk.len(), |i| i + 1);
        let separator = &chunk[..separator_end];
        let mut body = &chunk[separator_end..];
        let last = to == bytes.len();
        if last && !body.ends_with(b"\n") {
            let reason = format!(
                "truncated at byte {}: the file ends inside the message",
                bytes.len()
            );
            each(Err(Refused { at, reason }), to);
            from = to;
            continue;
        }
        // The empty line before the next separator (and at the end of the file) is the
        // mbox's, not the message's.
        let ends_empty = body.ends_with(b"\n\n") || body.ends_with(b"\n\r\n");
        if !last || ends_empty {
            body = body
                .strip_suffix(b"\r\n")
                .or_else(|| body.strip_suffix(b"\n"))
                .unwrap_or(body);
        }
        let raw = unquote(body, quoting);
        match verdict(&raw, size_max) {
            Some(reason) => each(Err(Refused { at, reason }), to),
            None => each(
                Ok(Found {
                    at,
                    arrived_ms: separator_date(separator),
                    raw,
                }),
                to,
            ),
        }
        from = to;
    }
}

/// Where the message that starts at `from` ends: at the next `From ` line that follows an empty
/// line, or at the end.
fn next_separator(bytes: &[u8], from: usize) -> usize {
    let mut line_start = from;
    let mut previous_empty = false;
    while line_start < bytes.len() {
        let end = bytes[line_start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| line_start + i + 1);
        let line = &bytes[line_start..end];
        if line_start > from && previous_empty && line.starts_with(b"From ") {
            return line_start;
        }
        previous_empty = line == b"\n" || line == b"\r\n";
        line_start = end;
    }
    bytes.len()
}

/// A message file's bytes (Maildir, `.eml`): the message, or why not.
pub fn message(
    bytes: &[u8],
    at: &str,
    arrived_ms: Option<u64>,
    size_max: u64,
) -> Result<Found, Refused> {
    let refused = |reason: String| Refused {
        at: at.to_string(),
        reason,
    };
    if bytes.is_empty() {
        return Err(refused("empty file".into()));
    }
    if let Some(reason) = verdict(bytes, size_max) {
        return Err(refused(reason));
    }
    Ok(Found {
        at: at.to_string(),
        raw: bytes.to_vec(),
        arrived_ms,
    })
}

/// Why `raw` is not importable as a message, if it is not.
fn verdict(raw: &[u8], size_max: u64) -> Option<String> {
    if raw.len() as u64 > size_max {
        return Some(format!(
            "too large: {} bytes, above the limit of {size_max}",
            raw.len()
        ));
    }
    let header_end = header_block_end(raw)?;
    let headers = &raw[..header_end];
    let mut fields = 0;
    for line in headers.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        match line.iter().position(|&b| b == b':') {
            Some(colon) if colon > 0 && line[..colon].iter().all(|&b| b.is_ascii_graphic()) => {
                fields += 1
            }
            _ => {
                return Some(format!(
                    "not mail: {:?} is not a header field",
                    String::from_utf8_lossy(&line[..line.len().min(40)])
                ))
            }
        }
    }
    (fields == 0).then(|| "not mail: no header fields".to_string())
}

/// Where the header block ends (at its empty line, or the end of a message without a body).
/// `None` (nothing wrong found yet) is answered as "the whole message is headers".
fn header_block_end(raw: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at < raw.len() {
        let end = raw[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |i| at + i + 1);
        let line = &raw[at..end];
        if line == b"\n" || line == b"\r\n" {
            return Some(at);
        }
        at = end;
    }
    Some(raw.len())
}

/// Undoes `From ` quoting.
fn unquote(body: &[u8], quoting: Quoting) -> Vec<u8> {
    evidence::export::unquote(body, quoting == Quoting::O)
}

pub use evidence::export::quote;

/// The `From ` separator line an mbox export writes before a message: its envelope sender
/// (`MAILER-DAEMON` for `<>`) and its arrival, in asctime form (UTC).
pub fn separator(sender: &str, arrived_ms: u64) -> String {
    let when = chrono::DateTime::from_timestamp_millis(arrived_ms as i64)
        .unwrap_or_default()
        .format("%a %b %e %H:%M:%S %Y");
    let sender = if sender.is_empty() || sender.contains(char::is_whitespace) {
        "MAILER-DAEMON"
    } else {
        sender
    };
    format!("From {sender} {when}\n")
}

/// The date of a `From sender date` separator line (asctime: `Sat Jan  3 01:05:34 1996`).
fn separator_date(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let words: Vec<&str> = text.split_whitespace().collect();
    // From sender Www Mmm dd hh:mm:ss yyyy: the weekday is left out (writers get it wrong).
    let tail = words.get(words.len().checked_sub(4)?..)?;
    let joined = tail.join(" ");
    chrono::NaiveDateTime::parse_from_str(&joined, "%b %d %H:%M:%S %Y")
        .ok()
        .map(|t| t.and_utc().timestamp_millis().max(0) as u64)
}

/// A Maildir file name's delivery time (`<seconds>.<unique>:2,<flags>`).
pub fn maildir_time(name: &str) -> Option<u64> {
    let secs: u64 = name.split('.').next()?.parse().ok()?;
    Some(secs.saturating_mul(1000))
}

/// What kind of source `path` is, from its metadata and first bytes (`head`); the files of a
/// directory are given by `list`.
pub fn classify(
    path: &Path,
    is_dir: bool,
    head: &[u8],
    list: impl Fn(&Path) -> Vec<PathBuf>,
) -> Source {
    if !is_dir {
        return if looks_like_mbox(head) {
            Source::Mbox(path.to_path_buf())
        } else {
            Source::Message(path.to_path_buf())
        };
    }
    let cur = path.join("cur");
    let new = path.join("new");
    let mut maildir: Vec<PathBuf> = list(&cur).into_iter().chain(list(&new)).collect();
    if !maildir.is_empty() || (list(path).iter().any(|p| p == &cur)) {
        maildir.sort();
        return Source::Maildir(maildir);
    }
    let mut files = list(path);
    let emls: Vec<PathBuf> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("eml")))
        .cloned()
        .collect();
    if !emls.is_empty() {
        files = emls;
    }
    files.sort();
    Source::Files(files)
}

/// The envelope an imported message gets, from its header fields alone (so the same message
/// from two sources is one item): the sender from `Return-Path`, else `Sender`, else `From`; the
/// recipients from `Delivered-To`/`X-Original-To`, else `To`, `Cc` and `Bcc`. Addresses are the
/// `<…>` part or the bare address; none found gives an empty sender and no recipients.
pub fn envelope(raw: &[u8]) -> (String, Vec<String>) {
    let headers = &raw[..header_block_end(raw).unwrap_or(raw.len())];
    let fields = unfolded(headers);
    let get = |name: &str| -> Vec<&str> {
        fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let sender = ["Return-Path", "Sender", "From"]
        .iter()
        .find_map(|f| get(f).first().and_then(|v| addresses(v).into_iter().next()))
        .unwrap_or_default();
    let mut recipients: Vec<String> = ["Delivered-To", "X-Original-To"]
        .iter()
        .flat_map(|f| get(f))
        .flat_map(addresses)
        .collect();
    if recipients.is_empty() {
        recipients = ["To", "Cc", "Bcc"]
            .iter()
            .flat_map(|f| get(f))
            .flat_map(addresses)
            .collect();
    }
    recipients.sort();
    recipients.dedup();
    (sender, recipients)
}

/// Header fields, unfolded: (name, value).
fn unfolded(headers: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(headers);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    out
}

/// The addresses in a header value: of each comma-separated part, its `<addr>`, else the part
/// itself when it is one word with an `@`.
fn addresses(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            match (part.find('<'), part.rfind('>')) {
                (Some(open), Some(close)) if open < close => {
                    Some(part[open + 1..close].trim().to_string())
                }
                _ => (part.contains('@') && !part.contains(char::is_whitespace))
                    .then(|| part.to_string()),
            }
        })
        .filter(|a| !a.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MAX: u64 = 1 << 20;

    type Read = Vec<Result<Found, Refused>>;

    fn read_all(file: &[u8], quoting: Quoting, max: u64) -> Read {
        let mut out = Vec::new();
        mbox(file, quoting, max, |m, _| out.push(m));
        out
    }

    fn messages(r: &Read) -> Vec<(String, Vec<u8>)> {
        r.iter()
            .map(|m| match m {
                Ok(f) => (f.at.clone(), f.raw.clone()),
                Err(e) => (e.at.clone(), format!("REFUSED {}", e.reason).into_bytes()),
            })
            .collect()
    }

    #[test]
    fn an_mboxrd_round_trip_keeps_every_byte_and_from_lines_in_bodies() {
        let bodies: [&[u8]; 4] = [
            b"Subject: one\r\n\r\nFrom here on\r\n>From there\r\n>>From far\r\n",
            b"Subject: two\n\nplain LF\n\nFrom the start of a line after an empty one\n",
            b"Subject: three\r\n\r\n",
            b"Subject: \xe4\xf6 8-bit\n\nbody\n",
        ];
        let mut file = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            file.extend_from_slice(
                format!("From a{i}@example.com Sat Jan  3 01:05:34 1996\n").as_bytes(),
            );
            quote(b, &mut file);
            file.extend_from_slice(b"\n");
        }
        let read = read_all(&file, Quoting::Rd, MAX);
        let got: Vec<Vec<u8>> = read
            .iter()
            .map(|m| m.as_ref().unwrap().raw.clone())
            .collect();
        assert_eq!(got, bodies.iter().map(|b| b.to_vec()).collect::<Vec<_>>());
        assert_eq!(
            read[0].as_ref().unwrap().arrived_ms,
            Some(820_631_134_000),
            "the separator's date"
        );
        // mboxo undoes one level only where there was one.
        let o = read_all(&file, Quoting::O, MAX);
        assert_eq!(
            o[0].as_ref().unwrap().raw,
            b"Subject: one\r\n\r\nFrom here on\r\n>>From there\r\n>>>From far\r\n".to_vec()
        );
    }

    #[test]
    fn what_is_not_a_message_is_refused_with_its_reason() {
        /// A file, and per message found: its place and how its bytes (or refusal) begin.
        type Case<'a> = (&'a [u8], Vec<(&'a str, &'a str)>);
        let cases: Vec<Case> = vec![
            (b"", vec![("byte 0", "REFUSED empty file")]),
            (b"%PDF-1.4 binary", vec![("byte 0", "REFUSED not an mbox")]),
            (
                b"From x Sat Jan  3 01:05:34 1996\nSubject: ok\n\nbody\n\nFrom y Sat Jan  3 01:05:34 1996\nSubject: cut\n\npart",
                vec![("byte 0", "Subject: ok"), ("byte 51", "REFUSED truncated at byte 101")],
            ),
            (
                b"From x Sat Jan  3 01:05:34 1996\nthis is no header\n\nbody\n",
                vec![("byte 0", "REFUSED not mail: \"this is no header\"")],
            ),
        ];
        for (file, want) in cases {
            let got = messages(&read_all(file, Quoting::Rd, MAX));
            assert_eq!(got.len(), want.len(), "{got:?}");
            for ((at, bytes), (want_at, want_start)) in got.iter().zip(want) {
                assert_eq!(at, want_at);
                let text = String::from_utf8_lossy(bytes);
                assert!(text.starts_with(want_start), "{text} !~ {want_start}");
            }
        }
        let big = vec![b'x'; 100];
        let mut m = b"Subject: big\n\n".to_vec();
        m.extend_from_slice(&big);
        let err = message(&m, "f", None, 50).unwrap_err();
        assert!(err.reason.starts_with("too large: 114 bytes"), "{err:?}");
        assert_eq!(
            message(b"", "f", None, 50).unwrap_err().reason,
            "empty file"
        );
    }

    #[test]
    fn the_envelope_comes_from_the_header_fields() {
        let cases: [(&[u8], &str, &[&str]); 4] = [
            (
                b"Return-Path: <bounce@x.org>\r\nFrom: A <a@x.org>\r\nTo: b@y.org, \"C\" <c@y.org>\r\nCc: d@y.org\r\n\r\nhi\r\n",
                "bounce@x.org",
                &["b@y.org", "c@y.org", "d@y.org"],
            ),
            (
                b"From: A <a@x.org>\nDelivered-To: me@y.org\nTo: list@y.org\n\n",
                "a@x.org",
                &["me@y.org"],
            ),
            (
                b"From: a@x.org\nTo: b@y.org,\n  c@y.org\nBcc: <e@z.org>\n\n",
                "a@x.org",
                &["b@y.org", "c@y.org", "e@z.org"],
            ),
            (b"Subject: none\n\n", "", &[]),
        ];
        for (raw, sender, rcpts) in cases {
            let (s, r) = envelope(raw);
            assert_eq!(s, sender);
            assert_eq!(r, rcpts.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn sources_are_told_apart_by_their_shape() {
        let none = |_: &Path| Vec::new();
        assert_eq!(
            classify(Path::new("a.mbox"), false, b"From x", none),
            Source::Mbox("a.mbox".into())
        );
        assert_eq!(
            classify(Path::new("a.eml"), false, b"Subject: x", none),
            Source::Message("a.eml".into())
        );
        let maildir = |p: &Path| -> Vec<PathBuf> {
            match p.to_str().unwrap() {
                "m" => vec!["m/cur".into(), "m/new".into(), "m/tmp".into()],
                "m/new" => vec!["m/new/2".into()],
                "m/cur" => vec!["m/cur/1".into()],
                _ => vec![],
            }
        };
        assert_eq!(
            classify(Path::new("m"), true, b"", maildir),
            Source::Maildir(vec!["m/cur/1".into(), "m/new/2".into()])
        );
        let emls = |p: &Path| -> Vec<PathBuf> {
            if p == Path::new("d") {
                vec!["d/b.eml".into(), "d/notes.txt".into(), "d/a.EML".into()]
            } else {
                vec![]
            }
        };
        assert_eq!(
            classify(Path::new("d"), true, b"", emls),
            Source::Files(vec!["d/a.EML".into(), "d/b.eml".into()])
        );
        assert_eq!(
            maildir_time("1700000000.M1P2.host:2,S"),
            Some(1_700_000_000_000)
        );
    }
}
