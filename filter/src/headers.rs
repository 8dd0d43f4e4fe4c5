//! A message's header block as milters see it and change it. Pure: bytes in, bytes out.
//!
//! [`HeaderReader`] follows a message as it arrives in chunks and hands out each complete
//! header field (name, value as folded) until the blank line, then says where the body
//! begins; its memory is one field, at most [`FIELD_BYTES_MAX`]. [`apply`] rewrites a header
//! block with the changes milters asked for (add, insert, change, delete), keeping every
//! untouched field byte for byte.
//!
//! Not here: talking to milters, or where the bytes are stored.

/// A field longer than this reaches milters cut at this length (the spooled bytes are not
/// cut): Postfix's `header_size_limit` is 100 KiB; no legitimate field comes near.
pub const FIELD_BYTES_MAX: usize = 64 * 1024;

/// One header field as a milter receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Its name, as written.
    pub name: String,
    /// Its value after the colon, folded lines separated by a bare LF (as libmilter's
    /// `xxfi_header` documents it: "lines are separated by LF (not CR/LF)"), no line end at
    /// its end, with leading whitespace unless `keep_leading_space` was false.
    pub value: String,
}

/// Where the reader stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line inside the header block.
    LineStart,
    /// Inside a field's line.
    InField,
    /// Saw the CR of a line end.
    AfterCr,
    /// The header block ended; everything from here is body.
    Body,
}

/// Splits the start of a message into header fields as its chunks arrive.
#[derive(Debug)]
pub struct HeaderReader {
    state: State,
    /// The field being read (its bytes, cut at [`FIELD_BYTES_MAX`]).
    field: Vec<u8>,
    /// Whether `field` holds a started field.
    open: bool,
    /// Bytes consumed so far (the header block's length once in `Body`).
    offset: u64,
    keep_leading_space: bool,
}

/// What one chunk held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Fields completed in this chunk.
    pub fields: Vec<Field>,
    /// The header block ended in this chunk.
    pub ended: bool,
    /// Where the body starts within this chunk (when it did, or did before).
    pub body_from: Option<usize>,
}

impl HeaderReader {
    /// A reader at a message's first byte. `keep_leading_space`: the milter asked for the
    /// value's leading whitespace (`SMFIP_HDR_LEADSPC`).
    pub fn new(keep_leading_space: bool) -> Self {
        HeaderReader {
            state: State::LineStart,
            field: Vec::new(),
            open: false,
            offset: 0,
            keep_leading_space,
        }
    }

    /// Whether the header block has ended.
    pub fn in_body(&self) -> bool {
        self.state == State::Body
    }

    /// The header block's length in bytes (the blank line included), once it ended.
    pub fn header_len(&self) -> Option<u64> {
        self.in_body().then_some(self.offset)
    }

    fn finish_field(&mut self, out: &mut Vec<Field>) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        let raw = std::mem::take(&mut self.field);
        // A line without a colon is not a field: RFC 5322 has none, and a milter is better
        // off not seeing it than seeing it named wrongly (the spooled bytes keep it).
        let Some(colon) = raw.iter().position(|&b| b == b':') else {
            return;
        };
        let name = String::from_utf8_lossy(&raw[..colon])
            .trim_end()
            .to_string();
        let mut value = &raw[colon + 1..];
        if !self.keep_leading_space {
            while let [b' ' | b'\t', rest @ ..] = value {
                value = rest;
            }
        }
        out.push(Field {
            name,
            value: String::from_utf8_lossy(value).into_owned(),
        });
    }

    fn keep(&mut self, b: u8) {
        if self.field.len() < FIELD_BYTES_MAX {
            self.field.push(b);
        }
    }

    /// Reads the next chunk of the message.
    pub fn read(&mut self, chunk: &[u8]) -> Split {
        let mut split = Split::default();
        if self.state == State::Body {
            split.body_from = Some(0);
            return split;
        }
        for (i, &b) in chunk.iter().enumerate() {
            self.offset += 1;
            match self.state {
                // Left by the return below as soon as it is reached.
                State::Body => {}
                State::LineStart => match b {
                    b'\r' => {
                        // Either the blank line or a stray CR: the blank line is CRLF
                        // (the DATA decoder refuses bare CR), so this ends the block.
                        self.finish_field(&mut split.fields);
                        self.state = State::AfterCr;
                        self.open = false;
                        self.field.clear();
                        // Marked as the block's end when the LF follows.
                        self.field.push(b'\r');
                    }
                    b' ' | b'\t' if self.open => {
                        // A folded continuation of the open field.
                        self.keep(b'\n');
                        self.keep(b);
                        self.state = State::InField;
                    }
                    _ => {
                        self.finish_field(&mut split.fields);
                        self.open = true;
                        self.keep(b);
                        self.state = State::InField;
                    }
                },
                State::InField => {
                    if b == b'\r' {
                        self.state = State::AfterCr;
                    } else {
                        self.keep(b);
                    }
                }
                State::AfterCr => {
                    if !self.open && self.field == b"\r" {
                        // CR LF at a line start: the blank line.
                        self.field.clear();
                        self.state = State::Body;
                        split.ended = true;
                        split.body_from = Some(i + 1);
                        return split;
                    }
                    // The end of a field's line (b is LF: the decoder allows no bare CR).
                    self.state = State::LineStart;
                }
            }
        }
        split
    }

    /// The message ended: a field still open is complete (a message without a blank line
    /// is all header).
    pub fn finish(&mut self) -> Vec<Field> {
        let mut out = Vec::new();
        if self.state != State::Body {
            self.finish_field(&mut out);
        }
        out
    }
}

/// A change a milter asked for, in the protocol's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Append a field after the last one. (Every value here is the bytes after the colon,
    /// its leading space included.)
    Add {
        /// Name.
        name: String,
        /// Value.
        value: String,
    },
    /// Insert a field before the `index`-th (0: first; past the end: last).
    Insert {
        /// Position.
        index: u32,
        /// Name.
        name: String,
        /// Value.
        value: String,
    },
    /// Change the `index`-th (from 1) field named `name`; an empty value deletes it; a field
    /// that is not there is added (as Sendmail does).
    Change {
        /// Occurrence, from 1.
        index: u32,
        /// Name (case-insensitive).
        name: String,
        /// New value; empty deletes.
        value: String,
    },
}

/// A field's bytes as written: `Name:` and the value as given (its leading space included),
/// folding lines ending in CRLF whatever the milter used, CRLF at the end.
fn render(name: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + value.len() + 4);
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    for &b in value.as_bytes() {
        match b {
            b'\r' => {}
            b'\n' => out.extend_from_slice(b"\r\n"),
            // A NUL or a lone control would make a header a client could not parse.
            0 => {}
            _ => out.push(b),
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The fields of a header block as byte ranges (each with its folded lines and CRLF), and
/// where the blank line (or the end) starts.
fn field_spans(head: &[u8]) -> (Vec<(usize, usize)>, usize) {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while at < head.len() {
        let line_end = head[at..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| at + p + 2)
            .unwrap_or(head.len());
        let line = &head[at..line_end];
        if line == b"\r\n" {
            return (spans, at);
        }
        match (line.first(), spans.last_mut()) {
            (Some(b' ' | b'\t'), Some(last)) => last.1 = line_end,
            _ => spans.push((at, line_end)),
        }
        at = line_end;
    }
    (spans, head.len())
}

fn field_name(bytes: &[u8]) -> &[u8] {
    let colon = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
    bytes[..colon].trim_ascii_end()
}

/// `head` (a header block, its blank line included if it has one) with `edits` applied in
/// order. A value is written as given after the colon: the caller puts the space there.
pub fn apply(head: &[u8], edits: &[Edit]) -> Vec<u8> {
    let (spans, end) = field_spans(head);
    let mut fields: Vec<Vec<u8>> = spans.iter().map(|&(a, b)| head[a..b].to_vec()).collect();
    for edit in edits {
        match edit {
            Edit::Add { name, value } => fields.push(render(name, value)),
            Edit::Insert { index, name, value } => {
                let at = (*index as usize).min(fields.len());
                fields.insert(at, render(name, value));
            }
            Edit::Change { index, name, value } => {
                let found = fields
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| field_name(f).eq_ignore_ascii_case(name.as_bytes()))
                    .nth((*index as usize).saturating_sub(1))
                    .map(|(i, _)| i);
                match (found, value.is_empty()) {
                    (Some(i), true) => {
                        fields.remove(i);
                    }
                    (Some(i), false) => {
                        // The field keeps its name as the message spelled it.
                        let own = String::from_utf8_lossy(field_name(&fields[i])).into_owned();
                        fields[i] = render(&own, value);
                    }
                    (None, true) => {}
                    (None, false) => fields.push(render(name, value)),
                }
            }
        }
    }
    let mut out = Vec::with_capacity(head.len() + 256);
    for f in fields {
        out.extend_from_slice(&f);
    }
    out.extend_from_slice(&head[end..]);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn field(name: &str, value: &str) -> Field {
        Field {
            name: name.into(),
            value: value.into(),
        }
    }

    const MESSAGE: &[u8] = b"Received: from a\r\n\tby b; Mon\r\nSubject:  hi\r\nX-Empty:\r\nno colon here\r\n\r\nbody\r\n\r\nmore\r\n";

    #[test]
    fn fields_and_the_body_start_whatever_the_chunking() {
        let expected = vec![
            field("Received", "from a\n\tby b; Mon"),
            field("Subject", "hi"),
            field("X-Empty", ""),
        ];
        let header_len = MESSAGE.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        for size in [1, 2, 3, 5, 7, 16, MESSAGE.len()] {
            let mut r = HeaderReader::new(false);
            let mut fields = Vec::new();
            let mut body = Vec::new();
            for chunk in MESSAGE.chunks(size) {
                let s = r.read(chunk);
                fields.extend(s.fields);
                if let Some(from) = s.body_from {
                    body.extend_from_slice(&chunk[from..]);
                }
            }
            fields.extend(r.finish());
            assert_eq!(fields, expected, "chunks of {size}");
            assert_eq!(body, b"body\r\n\r\nmore\r\n", "chunks of {size}");
            assert_eq!(r.header_len(), Some(header_len as u64));
        }
    }

    #[test]
    fn leading_space_is_kept_when_asked_and_long_fields_are_cut() {
        let mut r = HeaderReader::new(true);
        let s = r.read(b"Subject:  hi\r\n\r\n");
        assert_eq!(s.fields, vec![field("Subject", "  hi")]);
        let mut long = b"X-Long: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 3 * FIELD_BYTES_MAX));
        long.extend_from_slice(b"\r\nTo: b\r\n\r\n");
        let mut r = HeaderReader::new(false);
        let s = r.read(&long);
        assert_eq!(s.fields.len(), 2);
        assert_eq!(
            s.fields[0].value.len(),
            FIELD_BYTES_MAX - "X-Long:".len() - 1
        );
        assert_eq!(s.fields[1], field("To", "b"));
    }

    #[test]
    fn a_message_without_a_blank_line_is_all_header() {
        let mut r = HeaderReader::new(false);
        let s = r.read(b"Subject: a\r\nTo: b\r\n");
        assert_eq!(s.fields, vec![field("Subject", "a")]);
        assert_eq!(r.finish(), vec![field("To", "b")]);
        assert!(!r.in_body());
    }

    #[test]
    fn edits_apply_in_order_and_leave_other_bytes_alone() {
        let head = b"Received: x\r\nSubject: a\r\n folded\r\nX-S: 1\r\nx-s: 2\r\n\r\n";
        let add = |n: &str, v: &str| Edit::Add {
            name: n.into(),
            value: v.into(),
        };
        let table: Vec<(Vec<Edit>, &[u8])> = vec![
            (vec![], head),
            (
                vec![add("X-Spam", " yes")],
                b"Received: x\r\nSubject: a\r\n folded\r\nX-S: 1\r\nx-s: 2\r\nX-Spam: yes\r\n\r\n",
            ),
            (
                vec![Edit::Insert {
                    index: 0,
                    name: "DKIM-Signature".into(),
                    value: " v=1;\n\tb=abc".into(),
                }],
                b"DKIM-Signature: v=1;\r\n\tb=abc\r\nReceived: x\r\nSubject: a\r\n folded\r\nX-S: 1\r\nx-s: 2\r\n\r\n",
            ),
            (
                vec![Edit::Insert {
                    index: 99,
                    name: "A".into(),
                    value: " b".into(),
                }],
                b"Received: x\r\nSubject: a\r\n folded\r\nX-S: 1\r\nx-s: 2\r\nA: b\r\n\r\n",
            ),
            (
                vec![Edit::Change {
                    index: 2,
                    name: "X-S".into(),
                    value: "".into(),
                }],
                b"Received: x\r\nSubject: a\r\n folded\r\nX-S: 1\r\n\r\n",
            ),
            (
                vec![Edit::Change {
                    index: 1,
                    name: "subject".into(),
                    value: " [SPAM] a".into(),
                }],
                b"Received: x\r\nSubject: [SPAM] a\r\nX-S: 1\r\nx-s: 2\r\n\r\n",
            ),
            (
                vec![Edit::Change {
                    index: 3,
                    name: "X-S".into(),
                    value: " 3".into(),
                }],
                b"Received: x\r\nSubject: a\r\n folded\r\nX-S: 1\r\nx-s: 2\r\nX-S: 3\r\n\r\n",
            ),
            (
                vec![Edit::Change {
                    index: 3,
                    name: "X-S".into(),
                    value: "".into(),
                }],
                head,
            ),
        ];
        for (edits, expected) in table {
            assert_eq!(
                String::from_utf8_lossy(&apply(head, &edits)),
                String::from_utf8_lossy(expected),
                "{edits:?}"
            );
        }
        // A head without its blank line (all header) keeps not having one.
        assert_eq!(apply(b"A: 1\r\n", &[add("B", " 2")]), b"A: 1\r\nB: 2\r\n");
        assert_eq!(apply(b"\r\n", &[add("B", "\t2")]), b"B:\t2\r\n\r\n");
    }
}
