//! One connection to one milter: the socket (`unix:` or `inet:`), option negotiation, and
//! commands with their replies under a timeout, the packets being [`crate::milter`]'s.
//!
//! Not here: which commands a message needs and what the replies mean for it
//! ([`crate::chain`]).

use crate::milter::{action, reply_len, step, Command, Reply, ReplyError, VERSION};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};

/// Where a milter listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `unix:/path`.
    Unix(PathBuf),
    /// `inet:host:port` (or Sendmail's `inet:port@host`).
    Inet(String),
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Address, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("`{s}`: a unix socket's path must be absolute"));
            }
            return Ok(Address::Unix(path.into()));
        }
        if let Some(rest) = s.strip_prefix("inet:") {
            let hostport = match rest.split_once('@') {
                Some((port, host)) => format!("{host}:{port}"),
                None => rest.to_string(),
            };
            let valid = hostport
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !valid {
                return Err(format!("`{s}`: expected inet:HOST:PORT"));
            }
            return Ok(Address::Inet(hostport));
        }
        Err(format!("`{s}`: expected unix:/path or inet:HOST:PORT"))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Inet(h) => write!(f, "inet:{h}"),
        }
    }
}

/// Why a milter gave no usable answer: the chain then applies its `default_action`.
#[derive(Debug, thiserror::Error)]
pub enum MilterError {
    /// The socket could not be opened.
    #[error("connect to {0}: {1}")]
    Connect(String, std::io::Error),
    /// No reply (or no progress) within the stage's time.
    #[error("no reply to {0} within {1:?}")]
    Timeout(&'static str, Duration),
    /// The milter closed the connection.
    #[error("the milter closed the connection during {0}")]
    Closed(&'static str),
    /// A reading or writing error.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    /// A reply that breaks the protocol.
    #[error("{0}")]
    Protocol(#[from] ReplyError),
    /// The negotiation failed.
    #[error("negotiation: {0}")]
    Negotiation(String),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open, negotiated connection.
pub struct Conn {
    io: BufStream<Box<dyn Stream>>,
    /// The steps the milter asked to leave out or not to answer ([`step`]).
    pub steps: u32,
    /// The actions it may take ([`action`]).
    pub actions: u32,
}

/// Every action spoold can honour (a body replacement is refused when it comes, with a log
/// line; it is offered because libmilter ends a negotiation that lacks one it registered).
const ACTIONS_OFFERED: u32 = action::ADD_HEADERS
    | action::CHANGE_BODY
    | action::ADD_RCPT
    | action::DELETE_RCPT
    | action::CHANGE_HEADERS
    | action::QUARANTINE
    | action::CHANGE_FROM
    | action::ADD_RCPT_PAR
    | action::SET_SYMLIST;

impl Conn {
    /// Connects and negotiates, within `timeout` for both.
    pub async fn open(address: &Address, timeout: Duration) -> Result<Conn, MilterError> {
        let connect = async {
            let io: Box<dyn Stream> = match address {
                Address::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
                Address::Inet(hostport) => {
                    let s = tokio::net::TcpStream::connect(hostport.as_str()).await?;
                    s.set_nodelay(true)?;
                    Box::new(s)
                }
            };
            Ok::<_, std::io::Error>(io)
        };
        let io = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(MilterError::Connect(address.to_string(), e)),
            Err(_) => return Err(MilterError::Timeout("connect", timeout)),
        };
        let mut conn = Conn {
            io: BufStream::new(io),
            steps: 0,
            actions: 0,
        };
        conn.send(&Command::Negotiate {
            actions: ACTIONS_OFFERED,
            protocol: step::ALL,
        })
        .await?;
        match conn.reply("negotiation", timeout).await? {
            Reply::Negotiated {
                version,
                actions,
                protocol,
            } => {
                if !(2..=VERSION).contains(&version) {
                    return Err(MilterError::Negotiation(format!(
                        "protocol version {version} (spoold speaks 2 to {VERSION})"
                    )));
                }
                if protocol & !step::ALL != 0 || actions & !ACTIONS_OFFERED != 0 {
                    return Err(MilterError::Negotiation(format!(
                        "asked for actions 0x{actions:x} and steps 0x{protocol:x}, beyond those offered"
                    )));
                }
                conn.steps = protocol;
                conn.actions = actions;
                Ok(conn)
            }
            other => Err(MilterError::Negotiation(format!(
                "answered {other:?} to the options"
            ))),
        }
    }

    /// Whether the milter asked for `flag` ([`step`]).
    pub fn wants(&self, flag: u32) -> bool {
        self.steps & flag != 0
    }

    /// Queues a packet (sent at the next [`Conn::flush`] or [`Conn::reply`]).
    pub async fn queue(&mut self, cmd: &Command) -> Result<(), MilterError> {
        self.io
            .write_all(&cmd.encode())
            .await
            .map_err(|e| broken("sending", e))
    }

    /// Sends what was queued.
    pub async fn flush(&mut self) -> Result<(), MilterError> {
        self.io.flush().await.map_err(|e| broken("sending", e))
    }

    /// Queues a packet and sends everything queued.
    pub async fn send(&mut self, cmd: &Command) -> Result<(), MilterError> {
        self.queue(cmd).await?;
        self.flush().await
    }

    /// Reads one reply of `stage` (sending what is queued first): a progress reply restarts
    /// the clock and is not returned.
    pub async fn reply(
        &mut self,
        stage: &'static str,
        timeout: Duration,
    ) -> Result<Reply, MilterError> {
        self.flush().await?;
        loop {
            let read = async {
                let mut len = [0u8; 4];
                self.io.read_exact(&mut len).await?;
                let total = match reply_len(&len) {
                    Ok(Some(t)) => t,
                    Ok(None) | Err(_) => {
                        return Ok(Err(ReplyError::Length(u32::from_be_bytes(len) as usize)))
                    }
                };
                let mut packet = vec![0u8; total];
                packet[..4].copy_from_slice(&len);
                self.io.read_exact(&mut packet[4..]).await?;
                Ok::<_, std::io::Error>(Reply::decode(&packet))
            };
            let reply = match tokio::time::timeout(timeout, read).await {
                Err(_) => return Err(MilterError::Timeout(stage, timeout)),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(MilterError::Closed(stage))
                }
                Ok(Err(e)) => return Err(MilterError::Io(stage, e)),
                Ok(Ok(r)) => r?,
            };
            if reply != Reply::Progress {
                return Ok(reply);
            }
        }
    }
}

fn broken(what: &'static str, e: std::io::Error) -> MilterError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
            MilterError::Closed(what)
        }
        _ => MilterError::Io(what, e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses_parse_or_say_what_is_wrong() {
        let table: &[(&str, Result<Address, &str>)] = &[
            (
                "unix:/run/rspamd/milter.sock",
                Ok(Address::Unix("/run/rspamd/milter.sock".into())),
            ),
            (
                "inet:127.0.0.1:11332",
                Ok(Address::Inet("127.0.0.1:11332".into())),
            ),
            (
                "inet:8891@localhost",
                Ok(Address::Inet("localhost:8891".into())),
            ),
            ("inet:[::1]:8891", Ok(Address::Inet("[::1]:8891".into()))),
            ("unix:run/x", Err("must be absolute")),
            ("inet:localhost", Err("expected inet:HOST:PORT")),
            ("inet::25", Err("expected inet:HOST:PORT")),
            (
                "tcp:1.2.3.4:5",
                Err("expected unix:/path or inet:HOST:PORT"),
            ),
        ];
        for (text, expected) in table {
            match (text.parse::<Address>(), expected) {
                (Ok(a), Ok(e)) => assert_eq!(&a, e),
                (Err(a), Err(e)) => assert!(a.contains(e), "{text}: {a}"),
                (a, e) => panic!("{text}: {a:?}, expected {e:?}"),
            }
        }
    }
}
