//! Requests over the replication link, typed in one place: the partner's answers (takeover
//! recovery's list, fetch, remove and ledger, and the rebuild's `MISSING`), the client that asks
//! them, and the text each one travels as (a `Request` frame's op code and argument, a `Reply`
//! frame's data).
use super::*;

/// A message the partner holds in `spool/` or `vscan/`, as its `LIST` answer names it (a line
/// `id folder size sha256hex`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The message.
    pub id: MessageId,
    /// Where it is there (`spool`, `vscan`, or a path for a copied-out folder).
    pub folder: String,
    /// Its body's length.
    pub size: u64,
    /// Its body's SHA-256, lower-case hex.
    pub sha256: String,
}

impl Held {
    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.id, self.folder, self.size, self.sha256
        )
    }

    fn parse(line: &str) -> Option<Held> {
        let mut it = line.split(' ');
        Some(Held {
            id: it.next()?.parse().ok()?,
            folder: it.next()?.to_string(),
            size: it.next()?.parse().ok()?,
            sha256: it.next()?.to_string(),
        })
    }
}

use spool::hex;

/// A pair as `FETCH` answers it: `u32` envelope length, envelope, body.
fn pair_bytes(env: &[u8], body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(4 + env.len() + body.len());
    out.extend_from_slice(&(env.len() as u32).to_be_bytes());
    out.extend_from_slice(env);
    out.extend_from_slice(body);
    Bytes::from(out)
}

fn parse_pair(d: &[u8]) -> Result<(Vec<u8>, Vec<u8>), RecoveryError> {
    let short = || RecoveryError::Malformed("short pair".into());
    let n = u32::from_be_bytes(
        d.get(..4)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?,
    ) as usize;
    let env = d.get(4..4 + n).ok_or_else(short)?;
    Ok((env.to_vec(), d[4 + n..].to_vec()))
}

fn id_lines<'a>(ids: impl IntoIterator<Item = &'a MessageId>) -> String {
    ids.into_iter().map(|id| format!("{id}\n")).collect()
}

fn parse_ids(text: &str) -> Result<Vec<MessageId>, String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse()
                .map_err(|e: spool::id::IdError| format!("{l:?}: {e}"))
        })
        .collect()
}

/// Why a request to the partner failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    /// The link broke or was never made.
    #[error("partner link: {0}")]
    Link(#[from] LinkError),
    /// The partner answered with an error.
    #[error("partner refused: {0}")]
    Refused(String),
    /// The partner's answer could not be read.
    #[error("partner's answer malformed: {0}")]
    Malformed(String),
}

impl Replicator {
    /// Answers a takeover-recovery request from the partner (see [`proto::partner_op`]).
    pub(crate) fn answer(&self, op: u8, arg: &[u8]) -> Result<Bytes, String> {
        use proto::partner_op::*;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match op {
            LIST => {
                let mut out = String::new();
                for folder in [Folder::Spool, Folder::Vscan] {
                    for id in self.layout.ids(folder).map_err(|e| e.to_string())? {
                        let Ok(env) = self.layout.read_envelope(folder, &id) else {
                            continue;
                        };
                        let held = Held {
                            id,
                            folder: folder.name().to_string(),
                            size: env.body_len,
                            sha256: hex(&env.body_sha256),
                        };
                        out.push_str(&held.line());
                    }
                }
                Ok(Bytes::from(out))
            }
            MISSING => {
                let mut out = String::new();
                for line in text(arg).lines().filter(|l| !l.is_empty()) {
                    let (id, on_hold) = match line.split_once(' ') {
                        Some((id, "hold")) => (id, true),
                        _ => (line, false),
                    };
                    let id: MessageId =
                        id.parse().map_err(|e: spool::id::IdError| e.to_string())?;
                    // Held in the place the asking side has it: hold/ for a message on hold,
                    // else anywhere it is worked on (a replica this unit quarantined or is
                    // scanning counts).
                    let places: &[Folder] = if on_hold {
                        &[Folder::Hold]
                    } else {
                        &[Folder::Spool, Folder::Vscan, Folder::Quarantine]
                    };
                    let held = places
                        .iter()
                        .any(|&f| self.layout.path(f, &id, Part::Env).exists());
                    // Delivered here during a takeover: not a gap to fill but a leftover on the
                    // asking side, for takeover recovery to remove there.
                    let delivered = self.log.was_delivered(&id).map_err(|e| e.to_string())?;
                    if !held && !delivered {
                        out.push_str(&id.to_string());
                        out.push('\n');
                    }
                }
                Ok(Bytes::from(out))
            }
            FETCH => {
                let id: MessageId = text(arg)
                    .parse()
                    .map_err(|e: spool::id::IdError| e.to_string())?;
                for folder in [Folder::Spool, Folder::Vscan] {
                    let Ok(env) = std::fs::read(self.layout.path(folder, &id, Part::Env)) else {
                        continue;
                    };
                    let decoded = spool::Envelope::decode(&env).map_err(|e| e.to_string())?;
                    let body = spool::MappedBody::open_verified(
                        &self.layout.path(folder, &id, Part::Body),
                        decoded.body_len,
                        &decoded.body_sha256,
                    )
                    .map_err(|e| e.to_string())?;
                    return Ok(pair_bytes(&env, body.bytes()));
                }
                Err(format!("{id}: not held"))
            }
            REMOVE => {
                let ids = parse_ids(&text(arg))?;
                self.store.remove_many(&ids).map_err(|e| e.to_string())?;
                let n = ids.len();
                tracing::warn!(
                    removed = n,
                    "takeover recovery: leftovers removed at the partner's request"
                );
                Ok(Bytes::from(n.to_string()))
            }
            LEDGER => Ok(Bytes::from(
                self.log.delivered().map_err(|e| e.to_string())?.join("\n"),
            )),
            TRACK | SETTINGS | QUARANTINE => self.store.answer(op, arg),
            other => Err(format!("unknown recovery operation {other}")),
        }
    }

    /// Opens a takeover-recovery session with the partner over the authenticated link.
    pub async fn recovery_client(&self) -> Result<RecoveryClient, LinkError> {
        let link = link::connect(
            self.cfg.partner,
            &self.cfg.link,
            self.role(),
            proto::Channel::PartnerRequests,
        )
        .await?;
        let (r, w) = tokio::io::split(link.io);
        let mut frames = link::spawn_reader(r);
        match frames.recv().await {
            Some(Ok(Frame::Resume(_))) => Ok(RecoveryClient { frames, w }),
            Some(Err(e)) => Err(e),
            other => Err(LinkError::Protocol(format!(
                "expected Resume, got {other:?}"
            ))),
        }
    }
}

impl Replicator {
    /// One request the daemon defines (`TRACK`, `SETTINGS`) in a session of its own: opened,
    /// asked, closed cleanly.
    pub async fn ask_partner(&self, op: u8, request: &[u8]) -> Result<Bytes, RecoveryError> {
        let mut client = self.recovery_client().await?;
        let answer = client.ask(op, request).await;
        client.close().await;
        answer
    }
}

/// The client side of takeover recovery: requests to the partner, one at a time.
pub struct RecoveryClient {
    frames: tokio::sync::mpsc::Receiver<Result<Frame, LinkError>>,
    w: tokio::io::WriteHalf<Box<dyn link::LinkIo>>,
}

impl RecoveryClient {
    /// Sends one request and waits for its reply (heartbeats in between are skipped).
    async fn call(&mut self, op: u8, arg: &[u8]) -> Result<Bytes, RecoveryError> {
        request(&mut self.frames, &mut self.w, op, arg)
            .await?
            .map_err(RecoveryError::Refused)
    }

    /// The messages the partner holds in `spool/` and `vscan/`.
    pub async fn list(&mut self) -> Result<Vec<Held>, RecoveryError> {
        let data = self.call(proto::partner_op::LIST, b"").await?;
        String::from_utf8_lossy(&data)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| Held::parse(l).ok_or_else(|| RecoveryError::Malformed(l.to_string())))
            .collect()
    }

    /// One pair the partner holds: (envelope, body), as stored (not yet verified).
    pub async fn fetch(&mut self, id: &MessageId) -> Result<(Vec<u8>, Vec<u8>), RecoveryError> {
        let data = self
            .call(proto::partner_op::FETCH, id.to_string().as_bytes())
            .await?;
        parse_pair(&data)
    }

    /// Removes `ids` on the partner (durably); returns how many it removed.
    pub async fn remove(&mut self, ids: &[MessageId]) -> Result<usize, RecoveryError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let data = self
            .call(proto::partner_op::REMOVE, id_lines(ids).as_bytes())
            .await?;
        let text = String::from_utf8_lossy(&data);
        text.parse()
            .map_err(|_| RecoveryError::Malformed(format!("count {text:?}")))
    }

    /// The partner's answer to a request the daemon defines (`TRACK`, `SETTINGS`; both sides
    /// in the daemon's format).
    pub async fn ask(&mut self, op: u8, request: &[u8]) -> Result<Bytes, RecoveryError> {
        self.call(op, request).await
    }

    /// Ends the session cleanly (a TLS close, then the socket's), so the partner sees a hang-up,
    /// not a broken link.
    pub async fn close(mut self) {
        let _ = self.w.shutdown().await;
    }

    /// The ids in the partner's delivered ledger.
    pub async fn ledger(&mut self) -> Result<Vec<MessageId>, RecoveryError> {
        let data = self.call(proto::partner_op::LEDGER, b"").await?;
        parse_ids(&String::from_utf8_lossy(&data)).map_err(RecoveryError::Malformed)
    }
}

pub(crate) use link::request;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_reads_back_as_it_was_written() {
        let ids = spool::IdGenerator::new("a").unwrap();
        let held = Held {
            id: ids.next_id(),
            folder: "vscan".into(),
            size: 1234,
            sha256: hex(&[0xab; 32]),
        };
        assert_eq!(Held::parse(held.line().trim_end()), Some(held.clone()));
        assert_eq!(Held::parse("not-an-id spool 1 ab"), None);
        assert_eq!(Held::parse("x"), None);
        let pair = pair_bytes(b"env", b"body\r\n");
        assert_eq!(
            parse_pair(&pair).unwrap(),
            (b"env".to_vec(), b"body\r\n".to_vec())
        );
        assert!(parse_pair(&pair[..5]).is_err(), "cut inside the envelope");
        assert!(parse_pair(&[0, 0]).is_err());
        let list = [ids.next_id(), ids.next_id()];
        assert_eq!(parse_ids(&id_lines(&list)).unwrap(), list);
        assert!(parse_ids("bad\n").is_err());
    }
}
