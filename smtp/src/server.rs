//! One SMTP server session (RFC 5321 with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES,
//! SMTPUTF8 and STARTTLS). The session hands each message to a [`Sink`] and replies `250` only
//! after the sink's commit has completed, so the reply means "durable".

use crate::command::{parse, Command, CommandError};
use crate::data::{DataDecoder, DataError};
use crate::policy::{RelayPolicy, RelayVerdict};
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Any byte stream a session can run over (TCP, TLS over TCP, an in-memory pipe in tests).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Bytes asked of the socket per read.
const READ_BYTES: usize = 16 * 1024;
/// Body chunks smaller than this are copied into one buffer instead of each pinning a whole
/// receive buffer: it bounds memory against clients that trickle tiny packets.
const SMALL_CHUNK_BYTES: usize = 4 * 1024;

/// Limits and identity of the server side.
#[derive(Clone)]
pub struct ServerConfig {
    /// Our host name in the greeting, EHLO reply and `Received:`.
    pub hostname: String,
    /// Largest message accepted, in bytes (`552 5.3.4` beyond).
    pub message_bytes_max: u64,
    /// Recipients per message (`452 4.5.3` beyond).
    pub recipients_max: usize,
    /// Longest command line including CRLF (`500 5.5.2` beyond).
    pub line_bytes_max: usize,
    /// Idle time allowed while waiting for the client (`421 4.4.2` after).
    pub idle_timeout: Duration,
    /// Protocol errors allowed before the session is closed with `421 4.7.0`.
    pub errors_max: u32,
    /// STARTTLS is offered when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Who may send to whom.
    pub policy: RelayPolicy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".into(),
            message_bytes_max: 25 * 1024 * 1024,
            recipients_max: 100,
            line_bytes_max: 512,
            idle_timeout: Duration::from_secs(300),
            errors_max: 20,
            tls: None,
            policy: RelayPolicy::default(),
        }
    }
}

/// What a sink is told about a message when its DATA begins.
#[derive(Debug)]
pub struct Transaction<'a> {
    /// The client's address.
    pub peer: SocketAddr,
    /// Its EHLO/HELO argument.
    pub helo: &'a str,
    /// EHLO (true) or HELO (false).
    pub esmtp: bool,
    /// The session is under TLS.
    pub tls: bool,
    /// The client is in the relay policy's trusted networks.
    pub trusted: bool,
    /// Envelope sender, empty for `<>`.
    pub sender: &'a str,
    /// Accepted recipients.
    pub recipients: &'a [String],
    /// `BODY=8BITMIME` was given.
    pub eight_bit: bool,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
}

/// A sink's refusal, mapped to a temporary SMTP reply: losing nothing means saying "later".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// A local problem: `451 4.3.0`.
    #[error("{0}")]
    Temporary(String),
    /// Out of storage: `452 4.3.1`.
    #[error("{0}")]
    Full(String),
    /// A content filter's verdict, sent as it is: `code` (4xx or 5xx) and the text after it
    /// (an enhanced status code first).
    #[error("{code} {text}")]
    Refused {
        /// The SMTP reply code.
        code: u16,
        /// The reply text.
        text: String,
    },
}

/// Where accepted messages go. Implemented by the daemon over the spool.
pub trait Sink: Send + Sync + 'static {
    /// The body writer for one message.
    type Body: BodySink;
    /// Called at MAIL FROM with the declared size (0 if none): may refuse when storage is low.
    /// Must be cheap.
    fn check_capacity(&self, _declared_bytes: u64) -> Result<(), SinkError> {
        Ok(())
    }
    /// Starts a message at DATA (a refusal answers the DATA command, before any of the body).
    fn begin<'a>(
        self: &'a Arc<Self>,
        tx: &'a Transaction<'a>,
    ) -> impl Future<Output = Result<Self::Body, SinkError>> + Send + 'a;
    /// Observes every reply code sent; must be cheap (metrics).
    fn replied(&self, _code: u16) {}
    /// Whether the server still takes mail; when it stops (an HA unit turning passive), open
    /// sessions get `421 4.3.2` at their next command. Must be cheap.
    fn accepting(&self) -> bool {
        true
    }
}

/// Receives one message's body.
pub trait BodySink: Send {
    /// Appends body bytes (dot-unstuffed, CRLF line endings). May block briefly (a spill to
    /// disk) or wait (a content filter reading the body as it arrives: the client waits too,
    /// which bounds memory).
    fn push(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// Makes the message durable; resolves with the queue id once it is.
    fn commit(self) -> impl Future<Output = Result<String, SinkError>> + Send;
    /// Drops the message (client vanished, limit exceeded, protocol error).
    fn abort(self);
}

/// How a session ended, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent QUIT.
    Quit,
    /// The client closed the connection.
    Disconnected,
    /// Idle timeout.
    Timeout,
    /// Bare LF/CR: the session was closed.
    ProtocolViolation,
    /// Too many errors.
    TooManyErrors,
    /// The server is shutting down.
    Shutdown,
    /// TLS handshake failed.
    TlsFailed,
    /// A socket error.
    Io(String),
}

enum Input {
    Line(String),
    TooLong,
    BadBytes,
    End(SessionEnd),
}

struct Mail {
    from: String,
    eight_bit: bool,
    smtputf8: bool,
}

struct Session<S: Sink> {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    cfg: Arc<ServerConfig>,
    sink: Arc<S>,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    mail: Option<Mail>,
    rcpts: Vec<String>,
    errors: u32,
    discarding_long_line: bool,
}

/// Runs one session to its end. `shutdown` turning true makes an idle session answer
/// `421 4.3.2` and close; a message in DATA is finished first.
pub async fn serve<S: Sink>(
    io: impl Io + 'static,
    peer: SocketAddr,
    cfg: Arc<ServerConfig>,
    sink: Arc<S>,
    shutdown: watch::Receiver<bool>,
) -> SessionEnd {
    let mut s = Session {
        io: Box::new(io),
        rbuf: BytesMut::with_capacity(READ_BYTES),
        wbuf: Vec::with_capacity(512),
        cfg,
        sink,
        peer,
        shutdown,
        helo: None,
        esmtp: false,
        tls: false,
        mail: None,
        rcpts: Vec::new(),
        errors: 0,
        discarding_long_line: false,
    };
    if *s.shutdown.borrow() {
        s.reply(421, "4.3.2 Service shutting down, try again later");
        let _ = s.flush().await;
        return SessionEnd::Shutdown;
    }
    let greeting = format!("{} ESMTP Spoolpair", s.cfg.hostname);
    s.reply(220, &greeting);
    let end = s.run().await;
    let _ = s.flush().await;
    let _ = s.io.shutdown().await;
    end
}

impl<S: Sink> Session<S> {
    fn reply(&mut self, code: u16, text: &str) {
        self.sink.replied(code);
        self.wbuf
            .extend_from_slice(format!("{code} {text}\r\n").as_bytes());
    }

    fn reply_multi(&mut self, code: u16, lines: &[String]) {
        self.sink.replied(code);
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            self.wbuf
                .extend_from_slice(format!("{code}{sep}{line}\r\n").as_bytes());
        }
    }

    /// Sends buffered replies. A client that stops reading is cut off after the idle timeout,
    /// so it cannot hold a session (and its buffers) forever.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.cfg.idle_timeout, write).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client not reading",
                ))
            }
        }
        self.wbuf.clear();
        Ok(())
    }

    /// Reads more input, flushing pending replies first (that is what makes PIPELINING work:
    /// replies go out in one write when the client's batch is used up).
    async fn fill(&mut self, watch_shutdown: bool) -> Result<(), SessionEnd> {
        if let Err(e) = self.flush().await {
            return Err(SessionEnd::Io(e.to_string()));
        }
        self.rbuf.reserve(READ_BYTES);
        let timeout = self.cfg.idle_timeout;
        let read = tokio::time::timeout(timeout, self.io.read_buf(&mut self.rbuf));
        let n = if watch_shutdown {
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                r = read => r,
                Ok(_) = shutdown.wait_for(|&s| s) => return Err(SessionEnd::Shutdown),
            }
        } else {
            read.await
        };
        match n {
            Err(_) => Err(SessionEnd::Timeout),
            Ok(Err(e)) => Err(SessionEnd::Io(e.to_string())),
            Ok(Ok(0)) => Err(SessionEnd::Disconnected),
            Ok(Ok(_)) => Ok(()),
        }
    }

    async fn next_line(&mut self) -> Input {
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.rbuf) {
                let line = self.rbuf.split_to(pos + 1);
                if std::mem::take(&mut self.discarding_long_line) {
                    return Input::TooLong;
                }
                if pos == 0 || line[pos - 1] != b'\r' {
                    return Input::End(SessionEnd::ProtocolViolation);
                }
                if line.len() > self.cfg.line_bytes_max {
                    return Input::TooLong;
                }
                let text = &line[..pos - 1];
                if text.contains(&b'\r') || text.contains(&0) {
                    return Input::BadBytes;
                }
                return match std::str::from_utf8(text) {
                    Ok(s) => Input::Line(s.to_string()),
                    Err(_) => Input::BadBytes,
                };
            }
            if self.rbuf.len() > self.cfg.line_bytes_max {
                self.discarding_long_line = true;
                self.rbuf.clear();
            }
            if let Err(end) = self.fill(true).await {
                return Input::End(end);
            }
        }
    }

    fn error(&mut self, code: u16, text: &str) -> Result<(), SessionEnd> {
        self.reply(code, text);
        self.errors += 1;
        if self.errors >= self.cfg.errors_max {
            self.reply(421, "4.7.0 Too many errors, closing connection");
            return Err(SessionEnd::TooManyErrors);
        }
        Ok(())
    }

    fn reset_transaction(&mut self) {
        self.mail = None;
        self.rcpts.clear();
    }

    async fn run(&mut self) -> SessionEnd {
        loop {
            let line = match self.next_line().await {
                Input::Line(l) => l,
                Input::TooLong => match self.error(500, "5.5.2 Error: line too long") {
                    Ok(()) => continue,
                    Err(end) => return end,
                },
                Input::BadBytes => {
                    match self.error(500, "5.5.2 Error: invalid characters in command") {
                        Ok(()) => continue,
                        Err(end) => return end,
                    }
                }
                Input::End(SessionEnd::ProtocolViolation) => {
                    self.reply(550, "5.5.2 Error: bare <LF> received");
                    return SessionEnd::ProtocolViolation;
                }
                Input::End(SessionEnd::Shutdown) => {
                    self.reply(421, "4.3.2 Service shutting down, closing connection");
                    return SessionEnd::Shutdown;
                }
                Input::End(SessionEnd::Timeout) => {
                    self.reply(421, "4.4.2 Error: timeout exceeded");
                    return SessionEnd::Timeout;
                }
                Input::End(end) => return end,
            };
            if !self.sink.accepting() {
                self.reply(
                    421,
                    "4.3.2 Service not available, closing transmission channel",
                );
                return SessionEnd::Shutdown;
            }
            let outcome = match parse(&line) {
                Ok(cmd) => self.command(cmd).await,
                Err(CommandError::Unknown) => {
                    self.error(500, "5.5.1 Error: command not recognized")
                }
                Err(CommandError::Syntax(text)) => self.error(501, &format!("5.5.4 {text}")),
                Err(CommandError::BadAddress { sender: true }) => {
                    self.error(501, "5.1.7 Bad sender address syntax")
                }
                Err(CommandError::BadAddress { sender: false }) => {
                    self.error(501, "5.1.3 Bad recipient address syntax")
                }
            };
            if let Err(end) = outcome {
                return end;
            }
        }
    }

    async fn command(&mut self, cmd: Command) -> Result<(), SessionEnd> {
        match cmd {
            Command::Ehlo(domain) => {
                self.reset_transaction();
                self.helo = Some(domain);
                self.esmtp = true;
                let mut lines = vec![
                    self.cfg.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.cfg.message_bytes_max),
                    "8BITMIME".into(),
                    "ENHANCEDSTATUSCODES".into(),
                    "SMTPUTF8".into(),
                ];
                if self.cfg.tls.is_some() && !self.tls {
                    lines.push("STARTTLS".into());
                }
                self.reply_multi(250, &lines);
            }
            Command::Helo(domain) => {
                self.reset_transaction();
                self.helo = Some(domain);
                self.esmtp = false;
                let text = self.cfg.hostname.clone();
                self.reply(250, &text);
            }
            Command::Mail { from, params } => return self.mail(from, params),
            Command::Rcpt {
                to,
                source_route,
                params,
            } => return self.rcpt(to, source_route, params),
            Command::Data => return self.data().await,
            Command::Rset => {
                self.reset_transaction();
                self.reply(250, "2.0.0 Ok");
            }
            Command::Noop => self.reply(250, "2.0.0 Ok"),
            Command::Quit => {
                self.reply(221, "2.0.0 Bye");
                return Err(SessionEnd::Quit);
            }
            Command::Vrfy => self.reply(252, "2.0.0 Cannot VRFY user, but will accept message"),
            Command::Help => self.reply(214, "2.0.0 See RFC 5321"),
            Command::StartTls => return self.starttls().await,
        }
        Ok(())
    }

    fn mail(
        &mut self,
        from: String,
        params: Vec<(String, Option<String>)>,
    ) -> Result<(), SessionEnd> {
        if self.helo.is_none() {
            return self.error(503, "5.5.1 Error: send HELO/EHLO first");
        }
        if self.mail.is_some() {
            return self.error(503, "5.5.1 Error: nested MAIL command");
        }
        let mut mail = Mail {
            from,
            eight_bit: false,
            smtputf8: false,
        };
        let mut declared = 0u64;
        for (key, value) in params {
            if !self.esmtp {
                return self.error(555, "5.5.4 Error: parameters need EHLO");
            }
            match (key.as_str(), value.as_deref()) {
                ("SIZE", Some(v)) => match v.parse::<u64>() {
                    Ok(n) => declared = n,
                    Err(_) => return self.error(501, "5.5.4 Bad SIZE parameter"),
                },
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => mail.eight_bit = true,
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => {}
                ("SMTPUTF8", None) => mail.smtputf8 = true,
                _ => return self.error(555, "5.5.4 Unsupported MAIL parameter"),
            }
        }
        if declared > self.cfg.message_bytes_max {
            return self.error(552, "5.3.4 Message size exceeds fixed limit");
        }
        if let Err(e) = self.sink.check_capacity(declared) {
            self.sink_error(e);
            return Ok(());
        }
        self.mail = Some(mail);
        self.reply(250, "2.1.0 Ok");
        Ok(())
    }

    fn rcpt(
        &mut self,
        to: String,
        source_route: bool,
        params: Vec<(String, Option<String>)>,
    ) -> Result<(), SessionEnd> {
        if self.mail.is_none() {
            return self.error(503, "5.5.1 Error: need MAIL command");
        }
        if !params.is_empty() {
            return self.error(555, "5.5.4 Unsupported RCPT parameter");
        }
        if self.rcpts.len() >= self.cfg.recipients_max {
            self.reply(452, "4.5.3 Error: too many recipients");
            return Ok(());
        }
        match self.cfg.policy.check(self.peer.ip(), &to, source_route) {
            RelayVerdict::Accept => {}
            RelayVerdict::RelayDenied => return self.error(554, "5.7.1 Relay access denied"),
            RelayVerdict::RoutingDenied => {
                tracing::info!(peer = %self.peer, rcpt = %to, "sender-specified routing refused");
                return self.error(554, "5.7.1 Sender-specified routing is not allowed");
            }
        }
        self.rcpts.push(to);
        self.reply(250, "2.1.5 Ok");
        Ok(())
    }

    fn sink_error(&mut self, e: SinkError) {
        match e {
            SinkError::Temporary(why) => {
                tracing::warn!(peer = %self.peer, error = %why, "temporary local failure");
                self.reply(
                    451,
                    "4.3.0 Error: local problem in processing, try again later",
                )
            }
            SinkError::Full(why) => {
                tracing::warn!(peer = %self.peer, error = %why, "insufficient storage");
                self.reply(
                    452,
                    "4.3.1 Error: insufficient system storage, try again later",
                )
            }
            SinkError::Refused { code, text } => self.reply(code, &text),
        }
    }

    async fn data(&mut self) -> Result<(), SessionEnd> {
        if self.mail.is_none() {
            return self.error(503, "5.5.1 Error: need MAIL command");
        }
        if self.rcpts.is_empty() {
            return self.error(554, "5.5.1 Error: no valid recipients");
        }
        let mail = self
            .mail
            .as_ref()
            .map(|m| (m.from.as_str(), m.eight_bit, m.smtputf8));
        let (sender, eight_bit, smtputf8) = mail.unwrap_or(("", false, false));
        let tx = Transaction {
            peer: self.peer,
            helo: self.helo.as_deref().unwrap_or(""),
            esmtp: self.esmtp,
            tls: self.tls,
            trusted: self.cfg.policy.trusts(self.peer.ip()),
            sender,
            recipients: &self.rcpts,
            eight_bit,
            smtputf8,
        };
        let mut body = match self.sink.begin(&tx).await {
            Ok(b) => b,
            Err(e) => {
                self.reset_transaction();
                self.sink_error(e);
                return Ok(());
            }
        };
        self.reply(354, "End data with <CR><LF>.<CR><LF>");
        let mut decoder = DataDecoder::new(self.cfg.message_bytes_max);
        let mut chunks = Vec::new();
        let mut small = BytesMut::new();
        let mut push_error = None;
        loop {
            let done = match decoder.decode(&mut self.rbuf, &mut chunks) {
                Ok(done) => done,
                Err(e) => {
                    body.abort();
                    self.reset_transaction();
                    let what = match e {
                        DataError::BareLf => "5.5.2 Error: bare <LF> received",
                        DataError::BareCr => "5.5.2 Error: bare <CR> received",
                    };
                    tracing::warn!(peer = %self.peer, "{what}; message discarded, closing");
                    self.reply(550, what);
                    return Err(SessionEnd::ProtocolViolation);
                }
            };
            for chunk in chunks.drain(..) {
                if push_error.is_some() {
                    continue;
                }
                let result = if chunk.len() < SMALL_CHUNK_BYTES {
                    small.extend_from_slice(&chunk);
                    if small.len() >= READ_BYTES {
                        body.push(small.split().freeze()).await
                    } else {
                        Ok(())
                    }
                } else if small.is_empty() {
                    body.push(chunk).await
                } else {
                    match body.push(small.split().freeze()).await {
                        Ok(()) => body.push(chunk).await,
                        Err(e) => Err(e),
                    }
                };
                push_error = result.err();
            }
            if done {
                break;
            }
            if let Err(end) = self.fill(false).await {
                body.abort();
                self.reset_transaction();
                if end == SessionEnd::Timeout {
                    self.reply(421, "4.4.2 Error: timeout exceeded");
                }
                return Err(end);
            }
        }
        self.reset_transaction();
        if decoder.too_big() {
            body.abort();
            return self.error(552, "5.3.4 Error: message size exceeds fixed limit");
        }
        if decoder.saw_nul() {
            body.abort();
            tracing::warn!(peer = %self.peer, "NUL in message content; message discarded");
            return self.error(550, "5.6.0 Error: NUL character in message content");
        }
        if push_error.is_none() && !small.is_empty() {
            push_error = body.push(small.freeze()).await.err();
        }
        if let Some(e) = push_error {
            body.abort();
            self.sink_error(e);
            return Ok(());
        }
        match body.commit().await {
            Ok(queue_id) => self.reply(250, &format!("2.0.0 Ok: queued as {queue_id}")),
            Err(e) => self.sink_error(e),
        }
        Ok(())
    }

    async fn starttls(&mut self) -> Result<(), SessionEnd> {
        let Some(acceptor) = self.cfg.tls.clone() else {
            return self.error(502, "5.5.1 Error: command not implemented");
        };
        if self.tls {
            return self.error(503, "5.5.1 Error: TLS already active");
        }
        self.reply(220, "2.0.0 Ready to start TLS");
        if let Err(e) = self.flush().await {
            return Err(SessionEnd::Io(e.to_string()));
        }
        // Anything pipelined after STARTTLS was sent in clear text: discard it (CVE-2011-0411).
        self.rbuf.clear();
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        match tokio::time::timeout(self.cfg.idle_timeout, acceptor.accept(plain)).await {
            Ok(Ok(tls)) => {
                self.io = Box::new(tls);
                self.tls = true;
                self.helo = None;
                self.esmtp = false;
                self.reset_transaction();
                Ok(())
            }
            _ => Err(SessionEnd::TlsFailed),
        }
    }
}
