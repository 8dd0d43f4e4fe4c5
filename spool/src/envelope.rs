//! The `.env` envelope record: a versioned, line-oriented text file an operator can read.
//!
//! The byte-level grammar is documented in `spool/FORMAT.md`. The last line carries a CRC-32C of
//! every byte before it, so a torn or foreign file is recognised; the `.env` is the commit record
//! of a message (it is renamed into place after the body).

use crate::id::{validate_node_name, MessageId};
use std::fmt::Write as _;

/// First line of every version-1 envelope.
pub const MAGIC_V1: &str = "spoolpair-envelope 1";
/// Largest envelope accepted when decoding; keeps a foreign file from being read whole.
pub const ENVELOPE_BYTES_MAX: usize = 1 << 20;

/// How far delivery to one recipient has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RcptState {
    /// Not yet delivered; will be tried.
    Pending,
    /// Accepted by the next hop.
    Delivered,
    /// Permanently failed (bounced or dropped).
    Failed,
}

impl RcptState {
    fn as_str(self) -> &'static str {
        match self {
            RcptState::Pending => "pending",
            RcptState::Delivered => "delivered",
            RcptState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => RcptState::Pending,
            "delivered" => RcptState::Delivered,
            "failed" => RcptState::Failed,
            _ => return None,
        })
    }
}

/// The declared body type from `MAIL FROM ... BODY=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BodyType {
    /// No BODY parameter or `BODY=7BIT`.
    #[default]
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// Where the message stands with the virus-scan stage.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ScanState {
    /// Not scanned yet.
    #[default]
    Pending,
    /// Scanned and clean.
    Clean,
    /// Delivered without a scan (no scanner configured, or `fail_open` while it was down).
    Unscanned,
    /// Found infected; the name the scanner gave.
    Infected(String),
    /// Quarantined by a milter before the `250` (spam); the reason it gave. Never delivered
    /// until released (then `Pending`: the scan stage still runs).
    Held(String),
}

/// One recipient and its delivery state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The address as given in `RCPT TO:<...>`, without the angle brackets.
    pub address: String,
    /// Delivery state.
    pub state: RcptState,
}

/// Everything about a message except its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The message id; also the file name stem.
    pub id: MessageId,
    /// Node that first accepted the message (equals `id.node()` except for re-inserted mail).
    pub origin: String,
    /// Arrival time, milliseconds since the Unix epoch.
    pub arrived_ms: u64,
    /// Client IP address as text.
    pub client: String,
    /// The client's EHLO/HELO argument.
    pub helo: String,
    /// Envelope sender; empty for the null sender `<>`.
    pub sender: String,
    /// Declared body type.
    pub body_type: BodyType,
    /// `SMTPUTF8` was given on MAIL FROM.
    pub smtputf8: bool,
    /// Recipients, at least one.
    pub recipients: Vec<Recipient>,
    /// Length of the `.body` file in bytes.
    pub body_len: u64,
    /// SHA-256 of the `.body` file.
    pub body_sha256: [u8; 32],
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Earliest next delivery attempt, milliseconds since the Unix epoch (0: now).
    pub next_attempt_ms: u64,
    /// The scan stage's verdict so far.
    pub scan: ScanState,
    /// Why the last delivery attempt did not finish, if it did not.
    pub last_error: Option<String>,
}

/// Why bytes are not a valid envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Larger than [`ENVELOPE_BYTES_MAX`].
    #[error("envelope larger than {ENVELOPE_BYTES_MAX} bytes")]
    TooLarge,
    /// The first line is not a known format version.
    #[error("not a spoolpair envelope (unknown first line)")]
    NotAnEnvelope,
    /// The file ends before its `end` record: a torn write or truncation.
    #[error("torn envelope: no end record")]
    Torn,
    /// The `end` checksum does not match the content.
    #[error("envelope checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum {
        /// Checksum in the file.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// A line is missing, out of order or malformed.
    #[error("line {line}: {what}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What was expected.
        what: String,
    },
}

/// Escapes an address or HELO for one envelope field: bytes that are controls, space, `%`, `<`,
/// `>` or DEL become `%XX`; everything else (including UTF-8) stays as it is.
pub fn escape_field(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() && (c <= ' ' || matches!(c, '%' | '<' | '>' | '\x7f')) {
            let _ = write!(out, "%{:02X}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// Reverses [`escape_field`]; `None` for a bad escape or a raw byte that must have been escaped.
pub fn unescape_field(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b <= b' ' || matches!(b, b'<' | b'>' | 0x7f) => return None,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Lower-case hex of `bytes` (how a `body-sha256` is written).
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Envelope {
    /// A fresh envelope for a locally made message (a bounce, a test, a benchmark): origin is
    /// the id's node, every recipient pending, no attempts, body length and SHA-256 from `body`.
    pub fn new(id: MessageId, sender: &str, recipients: &[&str], body: &[u8]) -> Envelope {
        use sha2::Digest;
        let arrived_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Envelope {
            origin: id.node().to_string(),
            id,
            arrived_ms,
            client: "127.0.0.1".into(),
            helo: "localhost".into(),
            sender: sender.to_string(),
            body_type: BodyType::SevenBit,
            smtputf8: false,
            recipients: recipients
                .iter()
                .map(|a| Recipient {
                    address: a.to_string(),
                    state: RcptState::Pending,
                })
                .collect(),
            body_len: body.len() as u64,
            body_sha256: sha2::Sha256::digest(body).into(),
            attempts: 0,
            next_attempt_ms: 0,
            scan: ScanState::Pending,
            last_error: None,
        }
    }

    /// Encodes the envelope in the version-1 text format, `end` record included.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::with_capacity(256 + 64 * self.recipients.len());
        let _ = writeln!(s, "{MAGIC_V1}");
        let _ = writeln!(s, "id {}", self.id);
        let _ = writeln!(s, "origin {}", self.origin);
        let _ = writeln!(s, "arrived {}", self.arrived_ms);
        let _ = writeln!(s, "client {}", escape_field(&self.client));
        let _ = writeln!(s, "helo {}", escape_field(&self.helo));
        if self.sender.is_empty() {
            s.push_str("sender <>\n");
        } else {
            let _ = writeln!(s, "sender {}", escape_field(&self.sender));
        }
        let body_type = match self.body_type {
            BodyType::SevenBit => "7bit",
            BodyType::EightBitMime => "8bitmime",
        };
        let _ = writeln!(s, "body-type {body_type}");
        let _ = writeln!(s, "smtputf8 {}", if self.smtputf8 { "yes" } else { "no" });
        for r in &self.recipients {
            let _ = writeln!(s, "rcpt {} {}", r.state.as_str(), escape_field(&r.address));
        }
        let _ = writeln!(s, "body-len {}", self.body_len);
        let _ = writeln!(s, "body-sha256 {}", hex(&self.body_sha256));
        let _ = writeln!(s, "attempts {}", self.attempts);
        let _ = writeln!(s, "next-attempt {}", self.next_attempt_ms);
        match &self.scan {
            ScanState::Pending => s.push_str("scan pending\n"),
            ScanState::Clean => s.push_str("scan clean\n"),
            ScanState::Unscanned => s.push_str("scan unscanned\n"),
            ScanState::Held(reason) => {
                let _ = writeln!(s, "scan held {}", escape_field(reason));
            }
            ScanState::Infected(name) => {
                let _ = writeln!(s, "scan infected {}", escape_field(name));
            }
        }
        if let Some(e) = &self.last_error {
            let _ = writeln!(s, "last-error {}", escape_field(e));
        }
        let crc = crc32c::crc32c(s.as_bytes());
        let _ = writeln!(s, "end {crc:08x}");
        s.into_bytes()
    }

    /// Decodes and verifies an envelope. Strict: fields in their fixed order, no unknown lines.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if bytes.len() > ENVELOPE_BYTES_MAX {
            return Err(EnvelopeError::TooLarge);
        }
        let first_line = MAGIC_V1.len() + 1;
        if bytes.len() < first_line || &bytes[..first_line] != format!("{MAGIC_V1}\n").as_bytes() {
            return Err(EnvelopeError::NotAnEnvelope);
        }
        // The end record is the last line: "end " + 8 hex + "\n".
        const END_LEN: usize = 4 + 8 + 1;
        if bytes.len() < first_line + END_LEN || !bytes.ends_with(b"\n") {
            return Err(EnvelopeError::Torn);
        }
        let (content, end) = bytes.split_at(bytes.len() - END_LEN);
        if !end.starts_with(b"end ") {
            return Err(EnvelopeError::Torn);
        }
        let stored = std::str::from_utf8(&end[4..12])
            .ok()
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or(EnvelopeError::Torn)?;
        let computed = crc32c::crc32c(content);
        if stored != computed {
            return Err(EnvelopeError::Checksum { stored, computed });
        }
        let text = std::str::from_utf8(content).map_err(|_| EnvelopeError::Syntax {
            line: 0,
            what: "not UTF-8".into(),
        })?;
        Parser::new(text).envelope()
    }
}

struct Parser<'a> {
    lines: std::iter::Peekable<std::iter::Enumerate<std::str::Lines<'a>>>,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        let mut lines = text.lines().enumerate().peekable();
        lines.next(); // magic, already checked
        Parser { lines }
    }

    fn err(line: usize, what: impl Into<String>) -> EnvelopeError {
        EnvelopeError::Syntax {
            line: line + 1,
            what: what.into(),
        }
    }

    /// The value of the next line, which must be `key value`.
    fn field(&mut self, key: &str) -> Result<(usize, &'a str), EnvelopeError> {
        let (n, line) = self
            .lines
            .next()
            .ok_or_else(|| Self::err(usize::MAX - 1, format!("missing {key}")))?;
        match line.split_once(' ') {
            Some((k, v)) if k == key => Ok((n, v)),
            _ => Err(Self::err(n, format!("expected {key}"))),
        }
    }

    fn number<T: std::str::FromStr>(&mut self, key: &str) -> Result<T, EnvelopeError> {
        let (n, v) = self.field(key)?;
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Self::err(n, format!("{key} is not a number")));
        }
        v.parse()
            .map_err(|_| Self::err(n, format!("{key} out of range")))
    }

    fn escaped(&mut self, key: &str) -> Result<String, EnvelopeError> {
        let (n, v) = self.field(key)?;
        unescape_field(v).ok_or_else(|| Self::err(n, format!("bad escape in {key}")))
    }

    fn envelope(mut self) -> Result<Envelope, EnvelopeError> {
        let (n, id) = self.field("id")?;
        let id: MessageId = id.parse().map_err(|_| Self::err(n, "bad id"))?;
        let (n, origin) = self.field("origin")?;
        validate_node_name(origin).map_err(|_| Self::err(n, "bad origin node"))?;
        let arrived_ms = self.number("arrived")?;
        let client = self.escaped("client")?;
        let helo = self.escaped("helo")?;
        let (n, sender) = self.field("sender")?;
        let sender = if sender == "<>" {
            String::new()
        } else {
            unescape_field(sender)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| Self::err(n, "bad sender"))?
        };
        let (n, bt) = self.field("body-type")?;
        let body_type = match bt {
            "7bit" => BodyType::SevenBit,
            "8bitmime" => BodyType::EightBitMime,
            _ => return Err(Self::err(n, "bad body-type")),
        };
        let (n, u) = self.field("smtputf8")?;
        let smtputf8 = match u {
            "yes" => true,
            "no" => false,
            _ => return Err(Self::err(n, "bad smtputf8")),
        };
        let mut recipients = Vec::new();
        while let Some((n, line)) = self.lines.next_if(|(_, l)| l.starts_with("rcpt ")) {
            let rest = &line[5..];
            let parsed = rest.split_once(' ').and_then(|(state, addr)| {
                Some(Recipient {
                    state: RcptState::parse(state)?,
                    address: unescape_field(addr).filter(|a| !a.is_empty())?,
                })
            });
            recipients.push(parsed.ok_or_else(|| Self::err(n, "bad rcpt"))?);
        }
        if recipients.is_empty() {
            return Err(Self::err(0, "no recipients"));
        }
        let body_len = self.number("body-len")?;
        let (n, sha) = self.field("body-sha256")?;
        let body_sha256 = parse_hex32(sha).ok_or_else(|| Self::err(n, "bad body-sha256"))?;
        let attempts = self.number("attempts")?;
        let next_attempt_ms = self.number("next-attempt")?;
        let (n, scan) = self.field("scan")?;
        let scan = match scan.split_once(' ') {
            None if scan == "pending" => ScanState::Pending,
            None if scan == "clean" => ScanState::Clean,
            None if scan == "unscanned" => ScanState::Unscanned,
            Some(("infected", name)) => ScanState::Infected(
                unescape_field(name).ok_or_else(|| Self::err(n, "bad virus name"))?,
            ),
            Some(("held", reason)) => ScanState::Held(
                unescape_field(reason).ok_or_else(|| Self::err(n, "bad held reason"))?,
            ),
            _ => return Err(Self::err(n, "bad scan state")),
        };
        let last_error = match self.lines.next_if(|(_, l)| l.starts_with("last-error ")) {
            Some((n, l)) => {
                Some(unescape_field(&l[11..]).ok_or_else(|| Self::err(n, "bad last-error"))?)
            }
            None => None,
        };
        if let Some((n, _)) = self.lines.next() {
            return Err(Self::err(n, "unexpected line"));
        }
        Ok(Envelope {
            id,
            origin: origin.to_string(),
            arrived_ms,
            client,
            helo,
            sender,
            body_type,
            smtputf8,
            recipients,
            body_len,
            body_sha256,
            attempts,
            next_attempt_ms,
            scan,
            last_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGenerator;

    fn sample() -> Envelope {
        let id = IdGenerator::new("gw_a").unwrap().next_id();
        Envelope {
            origin: "gw_a".into(),
            id,
            arrived_ms: 1_732_370_000_123,
            client: "192.0.2.7".into(),
            helo: "client host".into(),
            sender: "alice%x@example.com".into(),
            body_type: BodyType::EightBitMime,
            smtputf8: true,
            recipients: vec![
                Recipient {
                    address: "bob@example.org".into(),
                    state: RcptState::Pending,
                },
                Recipient {
                    address: "\"odd <person>\"@exämple.org".into(),
                    state: RcptState::Delivered,
                },
            ],
            body_len: 4096,
            body_sha256: [0xab; 32],
            attempts: 3,
            next_attempt_ms: 1_732_370_060_000,
            scan: ScanState::Infected("Eicar Test".into()),
            last_error: Some("451 4.3.0 try later".into()),
        }
    }

    #[test]
    fn round_trip() {
        let env = sample();
        let bytes = env.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("spoolpair-envelope 1\nid "));
        assert!(text.contains("\nhelo client%20host\n"));
        assert!(text.contains("\nsender alice%25x@example.com\n"));
        assert!(text.contains("\nrcpt delivered \"odd%20%3Cperson%3E\"@exämple.org\n"));
        assert!(text
            .contains("\nscan infected Eicar%20Test\nlast-error 451%204.3.0%20try%20later\nend "));
        assert_eq!(Envelope::decode(&bytes).unwrap(), env);

        let mut held = sample();
        held.scan = ScanState::Held("rspamd: score 16.2 > 15".into());
        let bytes = held.encode();
        assert!(String::from_utf8_lossy(&bytes)
            .contains("\nscan held rspamd:%20score%2016.2%20%3E%2015\n"));
        assert_eq!(Envelope::decode(&bytes).unwrap(), held);

        let mut null_sender = sample();
        null_sender.sender.clear();
        null_sender.scan = ScanState::Clean;
        null_sender.last_error = None;
        let bytes = null_sender.encode();
        assert!(String::from_utf8_lossy(&bytes).contains("\nsender <>\n"));
        assert_eq!(Envelope::decode(&bytes).unwrap(), null_sender);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Envelope::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn every_single_byte_flip_is_rejected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(Envelope::decode(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn foreign_files_are_rejected() {
        assert_eq!(
            Envelope::decode(b"From: someone\r\n\r\nhello\r\n"),
            Err(EnvelopeError::NotAnEnvelope)
        );
        assert_eq!(
            Envelope::decode(b"spoolpair-envelope 2\nid x\n"),
            Err(EnvelopeError::NotAnEnvelope)
        );
        assert_eq!(Envelope::decode(b""), Err(EnvelopeError::NotAnEnvelope));
        // Right checksum but a field out of order is still rejected.
        let text = String::from_utf8(sample().encode()).unwrap();
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with("end "))
            .map(|l| format!("{l}\n"))
            .collect();
        let swapped = body.replace("attempts 3\nnext-attempt", "next-attempt");
        assert_ne!(swapped, body);
        let swapped = format!("{swapped}attempts 3\n");
        let crc = crc32c::crc32c(swapped.as_bytes());
        let forged = format!("{swapped}end {crc:08x}\n");
        assert!(matches!(
            Envelope::decode(forged.as_bytes()),
            Err(EnvelopeError::Syntax { .. })
        ));
    }

    #[test]
    fn escape_round_trips_awkward_strings() {
        for s in ["", "a b", "%%", "<>", "\t\r\n", "ünï côdé", "\x7f"] {
            assert_eq!(unescape_field(&escape_field(s)).as_deref(), Some(s));
        }
        assert_eq!(unescape_field("a b"), None);
        assert_eq!(unescape_field("%G0"), None);
        assert_eq!(unescape_field("%4"), None);
    }
}
