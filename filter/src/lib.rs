//! `filter`: the content filters: the milter chain before the `250` and the vscan stage
//! after it.
//!
//! It is: the [`Filter`] trait that every content check implements, the clamd client
//! ([`Clamd`], INSTREAM over a unix or TCP socket), the milter chain that runs before the
//! `250` ([`chain`] over [`milter_conn`], [`milter`] and [`headers`]), and [`VscanStage`],
//! which moves a message `spool/ → vscan/` while it is scanned and then back to `spool/` (clean), on to
//! `quarantine/` (infected), or leaves it in `vscan/` to retry (scanner unreachable).
//!
//! It is not: delivery or scheduling. The queue manager decides when to call the stage and what
//! to do next; further filters (an external command, a milter) implement [`Filter`] without
//! touching it.

pub mod chain;
pub mod endpoint;
pub mod headers;
pub mod milter;
pub mod milter_conn;

use spool::{Envelope, Folder, Layout, MappedBody, MessageId, ScanState};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A scanner's answer for one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing found.
    Clean,
    /// Found something; the scanner's name for it.
    Infected(String),
}

/// Why a scan gave no verdict. Always temporary: the message waits and is scanned again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// The scanner could not be reached.
    #[error("scanner unreachable: {0}")]
    Unreachable(std::io::Error),
    /// The scanner took longer than the timeout.
    #[error("scanner timed out after {0:?}")]
    Timeout(Duration),
    /// The scanner answered with an error or something unreadable.
    #[error("scanner error: {0}")]
    Scanner(String),
}

/// Boxed future returned by [`Filter::scan`].
pub type ScanFuture<'a> = Pin<Box<dyn Future<Output = Result<Verdict, ScanError>> + Send + 'a>>;

/// A content check. `scan` gets the whole body (memory-mapped) and must not modify anything;
/// it may take as long as the scanner needs, bounded by the implementation's own timeout.
pub trait Filter: Send + Sync {
    /// A short name for logs and metrics.
    fn name(&self) -> &str;
    /// Scans one body.
    fn scan<'a>(&'a self, body: &'a [u8]) -> ScanFuture<'a>;
}

/// Where clamd listens: `unix:/path` or `tcp:host:port` ([`endpoint::Endpoint`]).
pub type ClamdAddress = endpoint::Endpoint;

/// clamd's INSTREAM client.
pub struct Clamd {
    address: ClamdAddress,
    timeout: Duration,
}

/// Bytes per INSTREAM chunk; clamd's StreamMaxLength bounds the total.
const CHUNK: usize = 64 * 1024;

impl Clamd {
    /// A client for `address`; every scan is bounded by `timeout`.
    pub fn new(address: ClamdAddress, timeout: Duration) -> Self {
        Clamd { address, timeout }
    }

    async fn instream<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        body: &[u8],
    ) -> std::io::Result<String> {
        s.write_all(b"zINSTREAM\0").await?;
        for chunk in body.chunks(CHUNK) {
            s.write_all(&(chunk.len() as u32).to_be_bytes()).await?;
            s.write_all(chunk).await?;
        }
        s.write_all(&0u32.to_be_bytes()).await?;
        s.flush().await?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await?;
        Ok(String::from_utf8_lossy(&reply)
            .trim_end_matches(['\0', '\n'])
            .to_string())
    }

    async fn scan_inner(&self, body: &[u8]) -> Result<Verdict, ScanError> {
        let s = self
            .address
            .connect()
            .await
            .map_err(ScanError::Unreachable)?;
        let reply = Self::instream(s, body)
            .await
            .map_err(|e| ScanError::Scanner(format!("INSTREAM: {e}")))?;
        parse_clamd_reply(&reply)
    }
}

/// Reads clamd's answer: `stream: OK`, `stream: NAME FOUND`, or `... ERROR`.
pub fn parse_clamd_reply(reply: &str) -> Result<Verdict, ScanError> {
    let text = reply.strip_prefix("stream: ").unwrap_or(reply);
    if text == "OK" {
        Ok(Verdict::Clean)
    } else if let Some(name) = text.strip_suffix(" FOUND") {
        Ok(Verdict::Infected(name.to_string()))
    } else {
        Err(ScanError::Scanner(reply.chars().take(200).collect()))
    }
}

impl Filter for Clamd {
    fn name(&self) -> &str {
        "clamd"
    }

    fn scan<'a>(&'a self, body: &'a [u8]) -> ScanFuture<'a> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.scan_inner(body)).await {
                Ok(r) => r,
                Err(_) => Err(ScanError::Timeout(self.timeout)),
            }
        })
    }
}

/// What the stage did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum StageOutcome {
    /// Clean: back in `spool/` with `scan clean`, ready for delivery.
    Clean,
    /// Not scanned (no filter, or `fail_open` with the scanner down): back in `spool/` with
    /// `scan unscanned`.
    Unscanned,
    /// Infected: in `quarantine/` with the name in its envelope.
    Quarantined(String),
    /// No verdict: left in `vscan/`; scan again later.
    Retry(String),
}

/// Why the stage could not move or read a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// A file operation failed.
    #[error("vscan stage {id}: {source}")]
    Io {
        /// The message.
        id: MessageId,
        /// The error.
        source: std::io::Error,
    },
    /// The body does not match its envelope.
    #[error("vscan stage {id}: {detail}")]
    Corrupt {
        /// The message.
        id: MessageId,
        /// What is wrong.
        detail: String,
    },
}

/// Moves a message's pair between folders for the stage: the daemon's one owner of message
/// moves, which also keeps its folder counts. Blocking.
pub trait Mover: Send + Sync {
    /// Moves `id` from `from` to `to`.
    fn move_pair(&self, id: &MessageId, from: Folder, to: Folder) -> std::io::Result<()>;
}

/// The vscan stage over a state directory.
pub struct VscanStage {
    layout: Layout,
    filter: Option<Arc<dyn Filter>>,
    mover: Arc<dyn Mover>,
}

impl VscanStage {
    /// A stage with `filter` (none: every message passes as unscanned) whose moves `mover`
    /// makes.
    pub fn new(layout: Layout, filter: Option<Arc<dyn Filter>>, mover: Arc<dyn Mover>) -> Self {
        VscanStage {
            layout,
            filter,
            mover,
        }
    }

    async fn blocking<T: Send + 'static>(
        id: &MessageId,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, StageError> {
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r.map_err(|source| StageError::Io {
                id: id.clone(),
                source,
            }),
            Err(e) => Err(StageError::Io {
                id: id.clone(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// Runs the stage for a message currently in `from` (`spool/`, or `vscan/` after a crash
    /// mid-scan) whose envelope is `env`; updates `env` to what was written. With `fail_open`,
    /// a scanner without a verdict lets the message through unscanned instead of holding it.
    pub async fn run(
        &self,
        from: Folder,
        env: &mut Envelope,
        fail_open: bool,
    ) -> Result<StageOutcome, StageError> {
        let id = env.id.clone();
        let layout = self.layout.clone();
        if self.filter.is_none() && from == Folder::Spool {
            // Nothing to scan with: no moves, no rewrite; the caller records the state with
            // its next envelope write.
            env.scan = ScanState::Unscanned;
            return Ok(StageOutcome::Unscanned);
        }
        if from != Folder::Vscan {
            let (m, i) = (self.mover.clone(), id.clone());
            Self::blocking(&id, move || m.move_pair(&i, from, Folder::Vscan)).await?;
        }
        let verdict = match &self.filter {
            None => Err(None),
            Some(filter) => {
                let path = layout.path(Folder::Vscan, &id, spool::Part::Body);
                let body = MappedBody::open_verified(&path, env.body_len, &env.body_sha256)
                    .map_err(|e| StageError::Corrupt {
                        id: id.clone(),
                        detail: e.to_string(),
                    })?;
                let started = std::time::Instant::now();
                let v = filter.scan(body.bytes()).await;
                tracing::debug!(id = %id, elapsed_ms = started.elapsed().as_millis() as u64, "scanned");
                v.map_err(Some)
            }
        };
        let (outcome, scan, to) = match verdict {
            Ok(Verdict::Clean) => (StageOutcome::Clean, ScanState::Clean, Folder::Spool),
            Ok(Verdict::Infected(name)) => (
                StageOutcome::Quarantined(name.clone()),
                ScanState::Infected(name),
                Folder::Quarantine,
            ),
            Err(None) => (StageOutcome::Unscanned, ScanState::Unscanned, Folder::Spool),
            Err(Some(e)) if fail_open => {
                tracing::warn!(id = %id, error = %e, "scanner failed; fail_open delivers unscanned");
                (StageOutcome::Unscanned, ScanState::Unscanned, Folder::Spool)
            }
            Err(Some(e)) => return Ok(StageOutcome::Retry(e.to_string())),
        };
        env.scan = scan;
        let (l, m, e, i) = (layout, self.mover.clone(), env.clone(), id.clone());
        Self::blocking(&id, move || {
            l.rewrite_envelope(Folder::Vscan, &e)?;
            m.move_pair(&i, Folder::Vscan, to)
        })
        .await?;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamd_replies() {
        assert_eq!(parse_clamd_reply("stream: OK").unwrap(), Verdict::Clean);
        assert_eq!(
            parse_clamd_reply("stream: Eicar-Test-Signature FOUND").unwrap(),
            Verdict::Infected("Eicar-Test-Signature".into())
        );
        assert!(parse_clamd_reply("INSTREAM size limit exceeded. ERROR").is_err());
        assert_eq!(
            "unix:/run/clamd.sock".parse::<ClamdAddress>(),
            Ok(ClamdAddress::Unix("/run/clamd.sock".into()))
        );
        assert!("/run/clamd.sock".parse::<ClamdAddress>().is_err());
    }

    #[tokio::test]
    async fn instream_framing_and_unreachable_scanner() {
        // A fake clamd on a unix socket checks the framing and answers FOUND.
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("clamd.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut cmd = [0u8; 10];
            s.read_exact(&mut cmd).await.unwrap();
            assert_eq!(&cmd, b"zINSTREAM\0");
            let mut total = Vec::new();
            loop {
                let mut len = [0u8; 4];
                s.read_exact(&mut len).await.unwrap();
                let n = u32::from_be_bytes(len) as usize;
                if n == 0 {
                    break;
                }
                let mut buf = vec![0u8; n];
                s.read_exact(&mut buf).await.unwrap();
                total.extend(buf);
            }
            s.write_all(b"stream: Test.Virus FOUND\0").await.unwrap();
            total
        });
        let clamd = Clamd::new(ClamdAddress::Unix(sock.clone()), Duration::from_secs(5));
        let body = vec![7u8; 200_000];
        assert_eq!(
            clamd.scan(&body).await.unwrap(),
            Verdict::Infected("Test.Virus".into())
        );
        assert_eq!(server.await.unwrap(), body);
        let gone = Clamd::new(
            ClamdAddress::Unix(dir.path().join("none.sock")),
            Duration::from_secs(1),
        );
        assert!(matches!(
            gone.scan(b"x").await,
            Err(ScanError::Unreachable(_))
        ));
    }
}
