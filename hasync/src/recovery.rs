//! Requests over the replication link: the partner's answers (takeover recovery's list, fetch,
//! remove and ledger, and the rebuild's `MISSING`) and the client that asks them.
use super::*;

impl Replicator {
    /// Answers a takeover-recovery request from the partner (see [`proto::recovery_op`]).
    pub(crate) fn answer(&self, op: u8, arg: &[u8]) -> Result<Bytes, String> {
        use proto::recovery_op::*;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match op {
            LIST => {
                let mut out = String::new();
                for folder in [Folder::Spool, Folder::Vscan] {
                    for id in self.layout.ids(folder).map_err(|e| e.to_string())? {
                        let Ok(env) = self.layout.read_envelope(folder, &id) else {
                            continue;
                        };
                        let sha: String =
                            env.body_sha256.iter().map(|b| format!("{b:02x}")).collect();
                        out.push_str(&format!("{id} {} {} {sha}\n", folder.name(), env.body_len));
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
                    let mut out = Vec::with_capacity(4 + env.len() + body.bytes().len());
                    out.extend_from_slice(&(env.len() as u32).to_be_bytes());
                    out.extend_from_slice(&env);
                    out.extend_from_slice(body.bytes());
                    return Ok(Bytes::from(out));
                }
                Err(format!("{id}: not held"))
            }
            REMOVE => {
                let mut n = 0;
                for line in text(arg).lines().filter(|l| !l.is_empty()) {
                    let id: MessageId = line
                        .parse()
                        .map_err(|e: spool::id::IdError| e.to_string())?;
                    self.store.remove(&id).map_err(|e| e.to_string())?;
                    n += 1;
                }
                tracing::warn!(
                    removed = n,
                    "takeover recovery: leftovers removed at the partner's request"
                );
                Ok(Bytes::from(n.to_string()))
            }
            LEDGER => Ok(Bytes::from(
                self.log.delivered().map_err(|e| e.to_string())?.join("\n"),
            )),
            other => Err(format!("unknown recovery operation {other}")),
        }
    }

    /// Opens a takeover-recovery session with the partner over the authenticated link.
    pub async fn recovery_client(&self) -> Result<RecoveryClient, LinkError> {
        let link = link::connect(self.cfg.partner, &self.cfg.link, self.role()).await?;
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

/// The client side of takeover recovery: requests to the partner, one at a time.
pub struct RecoveryClient {
    frames: tokio::sync::mpsc::Receiver<Result<Frame, LinkError>>,
    w: tokio::io::WriteHalf<Box<dyn link::LinkIo>>,
}

impl RecoveryClient {
    /// Sends one request and waits for its reply (heartbeats in between are skipped).
    pub async fn call(&mut self, op: u8, arg: &[u8]) -> Result<Result<Bytes, String>, LinkError> {
        request(&mut self.frames, &mut self.w, op, arg).await
    }
}

/// Sends one request on a link and waits for its reply; nothing else may be in flight.
pub(crate) async fn request(
    frames: &mut tokio::sync::mpsc::Receiver<Result<Frame, LinkError>>,
    w: &mut tokio::io::WriteHalf<Box<dyn link::LinkIo>>,
    op: u8,
    arg: &[u8],
) -> Result<Result<Bytes, String>, LinkError> {
    link::write_frame(
        w,
        &Frame::Request {
            op,
            arg: Bytes::copy_from_slice(arg),
        },
        &[],
    )
    .await?;
    w.flush().await?;
    loop {
        match frames.recv().await {
            Some(Ok(Frame::Reply { ok: true, data })) => return Ok(Ok(data)),
            Some(Ok(Frame::Reply { ok: false, data })) => {
                return Ok(Err(String::from_utf8_lossy(&data).into_owned()))
            }
            Some(Ok(Frame::Heartbeat { .. })) => continue,
            Some(Ok(other)) => return Err(LinkError::Protocol(format!("unexpected {other:?}"))),
            Some(Err(e)) => return Err(e),
            None => return Err(LinkError::Protocol("link closed".into())),
        }
    }
}
