//! The SMTP client side: deliver one message at a time over a connection that can be reused
//! (a transaction that reached its final reply needs no RSET; one abandoned midway gets one),
//! with EHLO, PIPELINING when offered, SIZE, 8BITMIME, STARTTLS by
//! policy, and a timeout on every phase. The body is written straight from the caller's slice
//! (for spoold, the memory-mapped `.body`), dot-stuffed on the way without a per-message copy.

use crate::server::Io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

/// When to use STARTTLS toward a next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// Never.
    None,
    /// When the server offers it (the default): opportunistic.
    #[default]
    May,
    /// Always; a server without STARTTLS, or a failed handshake, is a temporary failure.
    Encrypt,
}

/// Client settings shared by all connections.
#[derive(Clone)]
pub struct ClientConfig {
    /// Our name in EHLO.
    pub helo: String,
    /// TCP connect and greeting.
    pub connect_timeout: Duration,
    /// Each command's reply.
    pub command_timeout: Duration,
    /// Sending the body and waiting for the final reply.
    pub data_timeout: Duration,
    /// TLS settings for STARTTLS; `None` disables STARTTLS whatever the policy.
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

/// One SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit code.
    pub code: u16,
    /// The text of all lines, joined with spaces (enhanced code included).
    pub text: String,
}

impl Reply {
    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Why a delivery attempt did not get per-recipient answers; all temporary unless `Rejected`
/// carries a 5xx.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// TCP connect failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A phase took too long.
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    /// Socket error or the server closed the connection.
    #[error("connection lost during {phase}: {detail}")]
    Io {
        /// The phase.
        phase: &'static str,
        /// Detail.
        detail: String,
    },
    /// The server answered something unusable.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused the session or transaction as a whole (greeting, EHLO, MAIL, DATA).
    #[error("{phase} rejected: {reply}")]
    Rejected {
        /// The phase.
        phase: &'static str,
        /// The reply.
        reply: Reply,
    },
    /// TLS was required and could not be had.
    #[error("TLS: {0}")]
    Tls(String),
}

impl ClientError {
    /// True when retrying later may succeed.
    pub fn is_temporary(&self) -> bool {
        !matches!(self, ClientError::Rejected { reply, .. } if reply.is_permanent())
    }
}

/// Per-recipient answers of one transaction.
#[derive(Debug)]
pub struct Outcome {
    /// In the order of the recipients given; the final reply to DATA for accepted recipients,
    /// the RCPT reply for refused ones.
    pub recipients: Vec<Reply>,
}

#[derive(Default, Debug, Clone, Copy)]
struct Extensions {
    pipelining: bool,
    starttls: bool,
    eight_bit: bool,
    smtputf8: bool,
    size: Option<u64>,
}

/// An open session with a next hop.
pub struct Connection {
    io: BufReader<Box<dyn Io>>,
    ext: Extensions,
    tls: bool,
    cfg: ClientConfig,
}

async fn timed<T>(
    limit: Duration,
    phase: &'static str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(limit, f).await {
        Err(_) => Err(ClientError::Timeout(phase)),
        Ok(Err(e)) => Err(ClientError::Io {
            phase,
            detail: e.to_string(),
        }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Reply lines longer than this are a protocol error (RFC 5321: 512).
const REPLY_LINE_MAX: usize = 2048;

impl Connection {
    /// Connects, reads the greeting, says EHLO (HELO if EHLO is refused) and, by `policy`,
    /// upgrades with STARTTLS. `server_name` is checked against the certificate.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        cfg: &ClientConfig,
        policy: TlsPolicy,
    ) -> Result<Connection, ClientError> {
        let tcp = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ClientError::Timeout("connect")),
            Ok(Err(source)) => return Err(ClientError::Connect { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let mut c = Connection {
            io: BufReader::new(Box::new(tcp)),
            ext: Extensions::default(),
            tls: false,
            cfg: cfg.clone(),
        };
        let greeting = c.read_reply("greeting", cfg.connect_timeout).await?;
        if greeting.code != 220 {
            return Err(ClientError::Rejected {
                phase: "greeting",
                reply: greeting,
            });
        }
        c.hello().await?;
        let want_tls = policy != TlsPolicy::None && cfg.tls.is_some();
        if want_tls && c.ext.starttls {
            c.starttls(server_name).await?;
            c.hello().await?;
        } else if policy == TlsPolicy::Encrypt {
            return Err(ClientError::Tls(
                "next hop does not offer STARTTLS and policy is encrypt".into(),
            ));
        }
        Ok(c)
    }

    /// Whether the session is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    async fn hello(&mut self) -> Result<(), ClientError> {
        let helo = self.cfg.helo.clone();
        let r = self.command(&format!("EHLO {helo}"), "EHLO").await?;
        if r.is_positive() {
            self.ext = Extensions::default();
            for word in r.text.split('\n').skip(1) {
                let mut parts = word.split_whitespace();
                match parts.next().map(str::to_ascii_uppercase).as_deref() {
                    Some("PIPELINING") => self.ext.pipelining = true,
                    Some("STARTTLS") => self.ext.starttls = true,
                    Some("8BITMIME") => self.ext.eight_bit = true,
                    Some("SMTPUTF8") => self.ext.smtputf8 = true,
                    Some("SIZE") => {
                        self.ext.size = parts.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0)
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        let r = self.command(&format!("HELO {helo}"), "HELO").await?;
        if !r.is_positive() {
            return Err(ClientError::Rejected {
                phase: "HELO",
                reply: r,
            });
        }
        self.ext = Extensions::default();
        Ok(())
    }

    async fn starttls(&mut self, server_name: &str) -> Result<(), ClientError> {
        let r = self.command("STARTTLS", "STARTTLS").await?;
        if r.code != 220 {
            return Err(ClientError::Tls(format!("STARTTLS refused: {r}")));
        }
        let Some(tls) = self.cfg.tls.clone() else {
            return Err(ClientError::Tls("no TLS configuration".into()));
        };
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| ClientError::Tls(format!("server name {server_name:?}: {e}")))?;
        let plain = std::mem::replace(&mut self.io, BufReader::new(Box::new(tokio::io::empty())));
        if !plain.buffer().is_empty() {
            return Err(ClientError::Protocol(
                "data pipelined after STARTTLS reply".into(),
            ));
        }
        let connector = tokio_rustls::TlsConnector::from(tls);
        let stream = match tokio::time::timeout(
            self.cfg.command_timeout,
            connector.connect(name, plain.into_inner()),
        )
        .await
        {
            Err(_) => return Err(ClientError::Timeout("TLS handshake")),
            Ok(Err(e)) => return Err(ClientError::Tls(e.to_string())),
            Ok(Ok(s)) => s,
        };
        self.io = BufReader::new(Box::new(stream));
        self.tls = true;
        Ok(())
    }

    async fn read_reply(
        &mut self,
        phase: &'static str,
        limit: Duration,
    ) -> Result<Reply, ClientError> {
        let mut lines: Vec<String> = Vec::new();
        let mut code: u16;
        loop {
            let mut line = String::new();
            let n = timed(limit, phase, async {
                let mut taken = (&mut self.io).take(REPLY_LINE_MAX as u64);
                taken.read_line(&mut line).await
            })
            .await?;
            if n == 0 {
                return Err(ClientError::Io {
                    phase,
                    detail: "connection closed".into(),
                });
            }
            let line = line.trim_end_matches(['\r', '\n']);
            let parsed: Option<u16> = line.get(..3).and_then(|c| c.parse().ok());
            let Some(this) = parsed.filter(|c| (200..600).contains(c)) else {
                return Err(ClientError::Protocol(format!(
                    "bad reply line in {phase}: {:?}",
                    line.chars().take(80).collect::<String>()
                )));
            };
            code = this;
            lines.push(line.get(4..).unwrap_or("").to_string());
            match line.as_bytes().get(3) {
                Some(b'-') => continue,
                _ => break,
            }
        }
        Ok(Reply {
            code,
            text: lines.join("\n"),
        })
    }

    async fn write(&mut self, bytes: &[u8], phase: &'static str) -> Result<(), ClientError> {
        let limit = self.cfg.command_timeout;
        let io = self.io.get_mut();
        timed(limit, phase, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await
    }

    async fn command(&mut self, line: &str, phase: &'static str) -> Result<Reply, ClientError> {
        self.write(format!("{line}\r\n").as_bytes(), phase).await?;
        self.read_reply(phase, self.cfg.command_timeout).await
    }

    /// Sends one message. Recipient-level refusals come back in the outcome; a refusal of the
    /// whole transaction (MAIL or DATA) or a broken connection is an error.
    pub async fn send(
        &mut self,
        sender: &str,
        recipients: &[&str],
        body: &[u8],
        eight_bit: bool,
        smtputf8: bool,
    ) -> Result<Outcome, ClientError> {
        let mut mail = format!("MAIL FROM:<{sender}>");
        if self.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={}", body.len()));
        }
        if eight_bit && self.ext.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if smtputf8 && self.ext.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if let Some(max) = self.ext.size {
            if body.len() as u64 > max {
                return Err(ClientError::Rejected {
                    phase: "SIZE",
                    reply: Reply {
                        code: 552,
                        text: format!(
                            "5.3.4 message size {} exceeds next hop's limit {max}",
                            body.len()
                        ),
                    },
                });
            }
        }
        let mut script: Vec<String> = vec![mail];
        script.extend(recipients.iter().map(|r| format!("RCPT TO:<{r}>")));
        script.push("DATA".into());
        let replies = if self.ext.pipelining {
            let batch: String = script.iter().map(|l| format!("{l}\r\n")).collect();
            self.write(batch.as_bytes(), "MAIL").await?;
            let mut replies = Vec::with_capacity(script.len());
            for _ in &script {
                replies.push(
                    self.read_reply("MAIL/RCPT/DATA", self.cfg.command_timeout)
                        .await?,
                );
            }
            replies
        } else {
            let mut replies = Vec::new();
            for (i, line) in script.iter().enumerate() {
                let r = self.command(line, "MAIL/RCPT/DATA").await?;
                let stop = (i == 0 && !r.is_positive())
                    || (i == script.len() - 2
                        && !replies
                            .iter()
                            .skip(1)
                            .chain(std::iter::once(&r))
                            .any(Reply::is_positive));
                replies.push(r);
                if stop {
                    break;
                }
            }
            replies
        };
        let mail_reply = replies[0].clone();
        if !mail_reply.is_positive() {
            self.abandon_transaction(&replies, script.len()).await;
            return Err(ClientError::Rejected {
                phase: "MAIL",
                reply: mail_reply,
            });
        }
        let rcpt_replies: Vec<Reply> = replies[1..replies.len().min(1 + recipients.len())].to_vec();
        let any_accepted = rcpt_replies.iter().any(Reply::is_positive);
        let data_reply = replies.get(1 + recipients.len()).cloned();
        match (&data_reply, any_accepted) {
            (Some(r), true) if r.code == 354 => {}
            (Some(r), true) => {
                self.rset().await;
                return Err(ClientError::Rejected {
                    phase: "DATA",
                    reply: r.clone(),
                });
            }
            (Some(r), false) if r.code == 354 => {
                // Pipelined DATA got 354 although no recipient was accepted: end it empty.
                self.write(b".\r\n", "DATA").await?;
                let _ = self.read_reply("DATA", self.cfg.data_timeout).await;
                return Ok(Outcome {
                    recipients: rcpt_replies,
                });
            }
            _ => {
                self.rset().await;
                return Ok(Outcome {
                    recipients: rcpt_replies,
                });
            }
        }
        self.write_body(body).await?;
        let final_reply = self
            .read_reply("end of data", self.cfg.data_timeout)
            .await?;
        let recipients = rcpt_replies
            .into_iter()
            .map(|r| {
                if r.is_positive() {
                    final_reply.clone()
                } else {
                    r
                }
            })
            .collect();
        Ok(Outcome { recipients })
    }

    async fn abandon_transaction(&mut self, replies: &[Reply], sent: usize) {
        // With PIPELINING, DATA may have been accepted (354) even though MAIL failed.
        if replies.len() == sent && replies.last().is_some_and(|r| r.code == 354) {
            let _ = self.write(b".\r\n", "DATA").await;
            let _ = self.read_reply("DATA", self.cfg.data_timeout).await;
        }
        self.rset().await;
    }

    async fn rset(&mut self) {
        let _ = self.command("RSET", "RSET").await;
    }

    /// Readies the connection for another message; false if it is no longer usable.
    pub async fn reset(&mut self) -> bool {
        matches!(self.command("RSET", "RSET").await, Ok(r) if r.is_positive())
    }

    /// Says QUIT and closes.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT", "QUIT").await;
    }

    /// Writes the body dot-stuffed, ending with CRLF . CRLF, straight from `body`.
    async fn write_body(&mut self, body: &[u8]) -> Result<(), ClientError> {
        let limit = self.cfg.data_timeout;
        let io = self.io.get_mut();
        timed(limit, "DATA body", async {
            let mut out = BufWriter::with_capacity(64 * 1024, io);
            let mut start = 0;
            let mut at_line_start = true;
            let mut i = 0;
            while i < body.len() {
                if at_line_start && body[i] == b'.' {
                    out.write_all(&body[start..=i]).await?;
                    out.write_all(b".").await?;
                    start = i + 1;
                }
                match memchr::memchr(b'\n', &body[i..]) {
                    Some(p) => {
                        i += p + 1;
                        at_line_start = true;
                    }
                    None => break,
                }
            }
            out.write_all(&body[start..]).await?;
            if !body.is_empty() && !body.ends_with(b"\r\n") {
                out.write_all(b"\r\n").await?;
            }
            out.write_all(b".\r\n").await?;
            out.flush().await
        })
        .await
    }
}
