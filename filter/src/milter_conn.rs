//! One connection to one milter: its socket ([`crate::endpoint`]), option negotiation, and
//! commands with their replies under a timeout, the packets being [`crate::milter`]'s.
//!
//! Not here: which commands a message needs and what the replies mean for it
//! ([`crate::chain`]).

use crate::endpoint::{Endpoint, Stream};
use crate::milter::{action, reply_len, step, Command, Reply, ReplyError, VERSION};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufStream};

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

/// An open, negotiated connection.
pub struct Conn {
    io: BufStream<Box<dyn Stream>>,
    /// The steps the milter asked to leave out or not to answer ([`step`]).
    pub steps: u32,
    /// The actions it may take ([`action`]).
    pub actions: u32,
    /// Longest wait for the milter to take what is sent: one that stops reading (its socket
    /// buffer full mid-body) is a failure, not a session stuck for ever.
    write_timeout: Duration,
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
    /// Connects and negotiates, within `timeout` for both; later writes may wait
    /// `write_timeout` each.
    pub async fn open(
        address: &Endpoint,
        timeout: Duration,
        write_timeout: Duration,
    ) -> Result<Conn, MilterError> {
        let io = match tokio::time::timeout(timeout, address.connect()).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(MilterError::Connect(address.to_string(), e)),
            Err(_) => return Err(MilterError::Timeout("connect", timeout)),
        };
        let mut conn = Conn {
            io: BufStream::new(io),
            steps: 0,
            actions: 0,
            write_timeout: timeout,
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
                conn.write_timeout = write_timeout;
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

    /// Queues a packet (sent at the next [`Conn::flush`] or [`Conn::reply`], or now when the
    /// buffer is full).
    pub async fn queue(&mut self, cmd: &Command) -> Result<(), MilterError> {
        let limit = self.write_timeout;
        match tokio::time::timeout(limit, self.io.write_all(&cmd.encode())).await {
            Ok(r) => r.map_err(|e| broken("sending", e)),
            Err(_) => Err(MilterError::Timeout("sending", limit)),
        }
    }

    /// Sends what was queued.
    pub async fn flush(&mut self) -> Result<(), MilterError> {
        let limit = self.write_timeout;
        match tokio::time::timeout(limit, self.io.flush()).await {
            Ok(r) => r.map_err(|e| broken("sending", e)),
            Err(_) => Err(MilterError::Timeout("sending", limit)),
        }
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
