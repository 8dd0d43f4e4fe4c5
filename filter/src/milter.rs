//! The milter protocol (version 6, as Sendmail's libmilter and Postfix speak it to rspamd,
//! OpenDKIM and the rest), the MTA's side: the packets spoold sends ([`Command`]) and the
//! replies it reads ([`Reply`]), framed as a 32-bit big-endian length, a command byte and its
//! data. Pure: bytes in, bytes out, no sockets; every malformed reply is an error naming what
//! is wrong, never a panic, and a reply longer than [`REPLY_BYTES_MAX`] is refused before its
//! data is read.
//!
//! Not here: the socket and negotiation (`milter_conn`), the conversation about a message
//! (`chain`).
//!
//! Written by hand: `rmilter` (2020, unmaintained) and `miltr-client` (which calls itself "an
//! example client to mess around with") were the crates looked at.

/// The protocol version spoken.
pub const VERSION: u32 = 6;
/// A reply longer than this is refused (a header change or a reply text is far smaller).
pub const REPLY_BYTES_MAX: usize = 1 << 20;
/// Body bytes per `B` packet at most (libmilter's `MILTER_CHUNK_SIZE`).
pub const BODY_CHUNK_MAX: usize = 65_535;

/// Actions a milter may take (`SMFIF_*`), offered in negotiation.
pub mod action {
    /// Add headers.
    pub const ADD_HEADERS: u32 = 0x01;
    /// Replace the body.
    pub const CHANGE_BODY: u32 = 0x02;
    /// Add recipients.
    pub const ADD_RCPT: u32 = 0x04;
    /// Remove recipients.
    pub const DELETE_RCPT: u32 = 0x08;
    /// Change or delete headers.
    pub const CHANGE_HEADERS: u32 = 0x10;
    /// Quarantine the message.
    pub const QUARANTINE: u32 = 0x20;
    /// Change the envelope sender.
    pub const CHANGE_FROM: u32 = 0x40;
    /// Add recipients with ESMTP arguments.
    pub const ADD_RCPT_PAR: u32 = 0x80;
    /// Ask for macros per stage.
    pub const SET_SYMLIST: u32 = 0x100;
}

/// Protocol steps (`SMFIP_*`): which the milter may ask the MTA to leave out (`NO_*`) or
/// not to wait for a reply to (`NR_*`).
pub mod step {
    /// No `C`.
    pub const NO_CONNECT: u32 = 0x01;
    /// No `H`.
    pub const NO_HELO: u32 = 0x02;
    /// No `M`.
    pub const NO_MAIL: u32 = 0x04;
    /// No `R`.
    pub const NO_RCPT: u32 = 0x08;
    /// No `B`.
    pub const NO_BODY: u32 = 0x10;
    /// No `L`.
    pub const NO_HEADERS: u32 = 0x20;
    /// No `N`.
    pub const NO_EOH: u32 = 0x40;
    /// No reply to `L`.
    pub const NR_HEADER: u32 = 0x80;
    /// No unknown commands (spoold sends none).
    pub const NO_UNKNOWN: u32 = 0x100;
    /// No `T`.
    pub const NO_DATA: u32 = 0x200;
    /// The milter may answer `s` (skip the rest of the body).
    pub const SKIP: u32 = 0x400;
    /// Rejected recipients too (spoold sends only accepted ones: it asks milters after the
    /// relay policy).
    pub const RCPT_REJECTED: u32 = 0x800;
    /// No reply to `C`.
    pub const NR_CONNECT: u32 = 0x1000;
    /// No reply to `H`.
    pub const NR_HELO: u32 = 0x2000;
    /// No reply to `M`.
    pub const NR_MAIL: u32 = 0x4000;
    /// No reply to `R`.
    pub const NR_RCPT: u32 = 0x8000;
    /// No reply to `T`.
    pub const NR_DATA: u32 = 0x10000;
    /// No reply to unknown commands.
    pub const NR_UNKNOWN: u32 = 0x20000;
    /// No reply to `N`.
    pub const NR_EOH: u32 = 0x40000;
    /// No reply to `B`.
    pub const NR_BODY: u32 = 0x80000;
    /// Header values with their leading whitespace.
    pub const HEADER_LEADING_SPACE: u32 = 0x100000;
    /// Every step above: libmilter refuses an MTA that does not offer what a milter
    /// registered, so spoold offers all it can honour.
    pub const ALL: u32 = 0x1F_FFFF;
}

/// A packet to the milter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `O`: option negotiation: our version, the actions we allow, protocol flags.
    Negotiate {
        /// Actions allowed ([`action`]).
        actions: u32,
        /// Protocol steps the milter may skip (`SMFIP_*`).
        protocol: u32,
    },
    /// `D`: macros for the stage of `stage` (the command byte they go with).
    Macros {
        /// The command they precede (`b'C'`, `b'M'`, …).
        stage: u8,
        /// Name and value pairs (`{client_addr}`, `i`, …).
        pairs: Vec<(String, String)>,
    },
    /// `C`: the client's host name, and its address (`family` `4` or `6`, port, address), or
    /// `U` (unknown) with neither.
    Connect {
        /// The client's host name (or its address in brackets).
        hostname: String,
        /// Its address and port; `None`: unknown.
        addr: Option<std::net::SocketAddr>,
    },
    /// `H`: the HELO/EHLO name.
    Helo(String),
    /// `M`: `MAIL FROM` (the address in angle brackets, then ESMTP arguments).
    Mail(Vec<String>),
    /// `R`: `RCPT TO` (the address in angle brackets, then ESMTP arguments).
    Rcpt(Vec<String>),
    /// `T`: DATA begins.
    Data,
    /// `L`: one header field (name, value as it came, without the CRLF at its end).
    Header {
        /// Its name.
        name: String,
        /// Its value, folded as received.
        value: String,
    },
    /// `N`: the end of the headers.
    EndOfHeaders,
    /// `B`: a piece of the body (at most [`BODY_CHUNK_MAX`] bytes).
    Body(Vec<u8>),
    /// `E`: the end of the message: the milter answers with its modifications, then its verdict.
    EndOfMessage,
    /// `A`: forget this message (the connection stays).
    Abort,
    /// `Q`: the end of the connection.
    Quit,
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

impl Command {
    /// The packet's bytes: length, command byte, data.
    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::new();
        let code = match self {
            Command::Negotiate { actions, protocol } => {
                data.extend_from_slice(&VERSION.to_be_bytes());
                data.extend_from_slice(&actions.to_be_bytes());
                data.extend_from_slice(&protocol.to_be_bytes());
                b'O'
            }
            Command::Macros { stage, pairs } => {
                data.push(*stage);
                for (name, value) in pairs {
                    cstr(&mut data, name);
                    cstr(&mut data, value);
                }
                b'D'
            }
            Command::Connect { hostname, addr } => {
                cstr(&mut data, hostname);
                match addr {
                    Some(a) => {
                        data.push(if a.is_ipv4() { b'4' } else { b'6' });
                        data.extend_from_slice(&a.port().to_be_bytes());
                        cstr(&mut data, &a.ip().to_string());
                    }
                    None => data.push(b'U'),
                }
                b'C'
            }
            Command::Helo(name) => {
                cstr(&mut data, name);
                b'H'
            }
            Command::Mail(args) | Command::Rcpt(args) => {
                for a in args {
                    cstr(&mut data, a);
                }
                if matches!(self, Command::Mail(_)) {
                    b'M'
                } else {
                    b'R'
                }
            }
            Command::Data => b'T',
            Command::Header { name, value } => {
                cstr(&mut data, name);
                cstr(&mut data, value);
                b'L'
            }
            Command::EndOfHeaders => b'N',
            Command::Body(bytes) => {
                data.extend_from_slice(bytes);
                b'B'
            }
            Command::EndOfMessage => b'E',
            Command::Abort => b'A',
            Command::Quit => b'Q',
        };
        let mut out = Vec::with_capacity(5 + data.len());
        out.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
        out.push(code);
        out.extend_from_slice(&data);
        out
    }
}

/// A reply from the milter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `O`: its side of the negotiation.
    Negotiated {
        /// Its protocol version.
        version: u32,
        /// The actions it wants.
        actions: u32,
        /// The steps it does not want (`SMFIP_*`).
        protocol: u32,
    },
    /// `c`: go on.
    Continue,
    /// `a`: accept the message; no more of it is needed.
    Accept,
    /// `r`: reject (`550 5.7.1` unless a reply code came).
    Reject,
    /// `t`: temporary failure (`451 4.7.1`).
    Tempfail,
    /// `d`: accept and drop silently.
    Discard,
    /// `y`: reject or tempfail with this SMTP reply (`554 5.7.1 text`).
    ReplyCode(String),
    /// `p`: still working (resets the stage's timeout).
    Progress,
    /// `s`: skip the rest of the body.
    Skip,
    /// `h`: add a header field at the end.
    AddHeader {
        /// Its name.
        name: String,
        /// Its value.
        value: String,
    },
    /// `i`: insert a header field at `index` (0: first).
    InsertHeader {
        /// Where.
        index: u32,
        /// Its name.
        name: String,
        /// Its value.
        value: String,
    },
    /// `m`: change the `index`-th (from 1) field called `name`; an empty value deletes it.
    ChangeHeader {
        /// Which occurrence of the name, from 1.
        index: u32,
        /// Its name.
        name: String,
        /// The new value; empty: delete the field.
        value: String,
    },
    /// `e`: change the envelope sender (and its ESMTP arguments).
    ChangeFrom {
        /// The new sender, in angle brackets.
        sender: String,
        /// ESMTP arguments, if any.
        args: Option<String>,
    },
    /// `+` or `2`: add a recipient (with ESMTP arguments for `2`).
    AddRcpt {
        /// The recipient, in angle brackets.
        rcpt: String,
        /// ESMTP arguments, if any.
        args: Option<String>,
    },
    /// `-`: remove a recipient.
    DeleteRcpt(String),
    /// `b`: a piece of a new body.
    ReplaceBody(Vec<u8>),
    /// `q`: quarantine the message, for this reason.
    Quarantine(String),
}

/// Why a reply could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Its length says more than [`REPLY_BYTES_MAX`] (or zero).
    #[error("milter reply of {0} bytes refused (at most {REPLY_BYTES_MAX})")]
    Length(usize),
    /// The data does not fit the command.
    #[error("milter reply '{0}': {1}")]
    Malformed(char, &'static str),
    /// A command byte the protocol does not have.
    #[error("milter reply with unknown command 0x{0:02x}")]
    Unknown(u8),
}

/// How many bytes a reply's packet takes, from its first four (the length): `Ok(None)` until
/// four bytes are there.
pub fn reply_len(buf: &[u8]) -> Result<Option<usize>, ReplyError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len == 0 || len > REPLY_BYTES_MAX {
        return Err(ReplyError::Length(len));
    }
    Ok(Some(4 + len))
}

/// The NUL-terminated strings of `data`, all of them terminated.
fn strings(code: char, data: &[u8]) -> Result<Vec<String>, ReplyError> {
    let Some(body) = data.strip_suffix(&[0]) else {
        return Err(ReplyError::Malformed(
            code,
            "a string is not NUL-terminated",
        ));
    };
    Ok(body
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

fn u32_at(code: char, data: &[u8], at: usize) -> Result<u32, ReplyError> {
    data.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(ReplyError::Malformed(code, "too short"))
}

fn exactly<const N: usize>(code: char, v: Vec<String>) -> Result<[String; N], ReplyError> {
    v.try_into()
        .map_err(|_| ReplyError::Malformed(code, "wrong number of strings"))
}

impl Reply {
    /// Reads one whole packet (as long as [`reply_len`] said).
    pub fn decode(packet: &[u8]) -> Result<Reply, ReplyError> {
        let total = reply_len(packet)?.ok_or(ReplyError::Length(packet.len()))?;
        if packet.len() != total {
            return Err(ReplyError::Length(packet.len()));
        }
        let code = packet[4];
        let data = &packet[5..];
        let c = code as char;
        let empty = |r: Reply| {
            if data.is_empty() {
                Ok(r)
            } else {
                Err(ReplyError::Malformed(c, "unexpected data"))
            }
        };
        match code {
            b'O' => Ok(Reply::Negotiated {
                version: u32_at(c, data, 0)?,
                actions: u32_at(c, data, 4)?,
                protocol: u32_at(c, data, 8)?,
            }),
            b'c' => empty(Reply::Continue),
            b'a' => empty(Reply::Accept),
            b'r' => empty(Reply::Reject),
            b't' => empty(Reply::Tempfail),
            b'd' => empty(Reply::Discard),
            b'p' => empty(Reply::Progress),
            b's' => empty(Reply::Skip),
            b'y' => {
                let [text] = exactly(c, strings(c, data)?)?;
                let well_formed = text.len() >= 3
                    && text.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                    && matches!(text.as_bytes()[0], b'4' | b'5');
                if !well_formed {
                    return Err(ReplyError::Malformed(c, "not a 4xx or 5xx reply"));
                }
                Ok(Reply::ReplyCode(text))
            }
            b'h' => {
                let [name, value] = exactly(c, strings(c, data)?)?;
                Ok(Reply::AddHeader { name, value })
            }
            b'i' | b'm' => {
                let index = u32_at(c, data, 0)?;
                let [name, value] = exactly(c, strings(c, &data[4..])?)?;
                Ok(if code == b'i' {
                    Reply::InsertHeader { index, name, value }
                } else {
                    Reply::ChangeHeader { index, name, value }
                })
            }
            b'e' | b'2' => {
                let mut v = strings(c, data)?.into_iter();
                let first = v.next().ok_or(ReplyError::Malformed(c, "no address"))?;
                let args = v.next();
                if v.next().is_some() {
                    return Err(ReplyError::Malformed(c, "wrong number of strings"));
                }
                Ok(if code == b'e' {
                    Reply::ChangeFrom {
                        sender: first,
                        args,
                    }
                } else {
                    Reply::AddRcpt { rcpt: first, args }
                })
            }
            b'+' => {
                let [rcpt] = exactly(c, strings(c, data)?)?;
                Ok(Reply::AddRcpt { rcpt, args: None })
            }
            b'-' => {
                let [rcpt] = exactly(c, strings(c, data)?)?;
                Ok(Reply::DeleteRcpt(rcpt))
            }
            b'b' => Ok(Reply::ReplaceBody(data.to_vec())),
            b'q' => {
                let [reason] = exactly(c, strings(c, data)?)?;
                Ok(Reply::Quarantine(reason))
            }
            other => Err(ReplyError::Unknown(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn packet(code: u8, data: &[u8]) -> Vec<u8> {
        let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(code);
        p.extend_from_slice(data);
        p
    }

    #[test]
    fn commands_encode_as_libmilter_reads_them() {
        let table: Vec<(Command, Vec<u8>)> = vec![
            (
                Command::Negotiate {
                    actions: action::ADD_HEADERS | action::QUARANTINE,
                    protocol: 0,
                },
                packet(b'O', &[0, 0, 0, 6, 0, 0, 0, 0x21, 0, 0, 0, 0]),
            ),
            (
                Command::Connect {
                    hostname: "mx.example.org".into(),
                    addr: Some("192.0.2.7:2525".parse().unwrap()),
                },
                packet(b'C', b"mx.example.org\x004\x09\xdd192.0.2.7\x00"),
            ),
            (
                Command::Connect {
                    hostname: "[::1]".into(),
                    addr: Some("[::1]:25".parse().unwrap()),
                },
                packet(b'C', b"[::1]\x006\x00\x19::1\x00"),
            ),
            (
                Command::Connect {
                    hostname: "localhost".into(),
                    addr: None,
                },
                packet(b'C', b"localhost\x00U"),
            ),
            (
                Command::Macros {
                    stage: b'M',
                    pairs: vec![("i".into(), "661f-a".into())],
                },
                packet(b'D', b"Mi\x00661f-a\x00"),
            ),
            (
                Command::Helo("client.example".into()),
                packet(b'H', b"client.example\x00"),
            ),
            (
                Command::Mail(vec!["<a@x>".into(), "SIZE=10".into()]),
                packet(b'M', b"<a@x>\x00SIZE=10\x00"),
            ),
            (
                Command::Rcpt(vec!["<b@y>".into()]),
                packet(b'R', b"<b@y>\x00"),
            ),
            (
                Command::Header {
                    name: "Subject".into(),
                    value: "hi".into(),
                },
                packet(b'L', b"Subject\x00hi\x00"),
            ),
            (
                Command::Body(b"line\r\n".to_vec()),
                packet(b'B', b"line\r\n"),
            ),
            (Command::Data, packet(b'T', b"")),
            (Command::EndOfHeaders, packet(b'N', b"")),
            (Command::EndOfMessage, packet(b'E', b"")),
            (Command::Abort, packet(b'A', b"")),
            (Command::Quit, packet(b'Q', b"")),
        ];
        for (command, bytes) in table {
            assert_eq!(command.encode(), bytes, "{command:?}");
        }
    }

    #[test]
    fn replies_decode_and_malformed_ones_are_named() {
        let ok: Vec<(Vec<u8>, Reply)> = vec![
            (
                packet(b'O', &[0, 0, 0, 6, 0, 0, 0, 0x01, 0, 0, 0, 0x10]),
                Reply::Negotiated {
                    version: 6,
                    actions: 1,
                    protocol: 0x10,
                },
            ),
            (packet(b'c', b""), Reply::Continue),
            (packet(b'a', b""), Reply::Accept),
            (packet(b'r', b""), Reply::Reject),
            (packet(b't', b""), Reply::Tempfail),
            (packet(b'd', b""), Reply::Discard),
            (packet(b'p', b""), Reply::Progress),
            (
                packet(b'y', b"554 5.7.1 Gtube pattern\x00"),
                Reply::ReplyCode("554 5.7.1 Gtube pattern".into()),
            ),
            (
                packet(b'h', b"X-Spam\x00Yes\x00"),
                Reply::AddHeader {
                    name: "X-Spam".into(),
                    value: "Yes".into(),
                },
            ),
            (
                packet(
                    b'i',
                    b"\x00\x00\x00\x00DKIM-Signature\x00v=1; a=rsa-sha256\x00",
                ),
                Reply::InsertHeader {
                    index: 0,
                    name: "DKIM-Signature".into(),
                    value: "v=1; a=rsa-sha256".into(),
                },
            ),
            (
                packet(b'm', b"\x00\x00\x00\x01Subject\x00\x00"),
                Reply::ChangeHeader {
                    index: 1,
                    name: "Subject".into(),
                    value: String::new(),
                },
            ),
            (
                packet(b'e', b"<new@x>\x00"),
                Reply::ChangeFrom {
                    sender: "<new@x>".into(),
                    args: None,
                },
            ),
            (
                packet(b'2', b"<c@z>\x00NOTIFY=NEVER\x00"),
                Reply::AddRcpt {
                    rcpt: "<c@z>".into(),
                    args: Some("NOTIFY=NEVER".into()),
                },
            ),
            (
                packet(b'-', b"<b@y>\x00"),
                Reply::DeleteRcpt("<b@y>".into()),
            ),
            (
                packet(b'b', b"new body"),
                Reply::ReplaceBody(b"new body".to_vec()),
            ),
            (
                packet(b'q', b"spam score 15\x00"),
                Reply::Quarantine("spam score 15".into()),
            ),
        ];
        for (bytes, want) in ok {
            assert_eq!(Reply::decode(&bytes), Ok(want), "{bytes:?}");
        }
        let bad: Vec<(Vec<u8>, &str)> = vec![
            (packet(b'y', b"hello\x00"), "not a 4xx or 5xx reply"),
            (packet(b'y', b"250 ok\x00"), "not a 4xx or 5xx reply"),
            (packet(b'h', b"X-Spam\x00Yes"), "not NUL-terminated"),
            (packet(b'h', b"X-Spam\x00"), "wrong number of strings"),
            (packet(b'm', b"\x00\x00"), "too short"),
            (packet(b'c', b"x"), "unexpected data"),
            (packet(b'O', &[0, 0, 0, 6]), "too short"),
            (packet(b'Z', b""), "unknown command 0x5a"),
            (vec![0, 0, 0, 0], "0 bytes refused"),
            (vec![0x7f, 0, 0, 0, b'c'], "refused (at most"),
        ];
        for (bytes, want) in bad {
            let e = Reply::decode(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{bytes:?}: {e}");
        }
        assert_eq!(reply_len(&[0, 0]), Ok(None));
        assert_eq!(reply_len(&[0, 0, 0, 1, b'c']), Ok(Some(5)));
    }
}
