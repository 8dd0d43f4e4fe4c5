//! Mirroring: each local item is copied to every configured peer over the authenticated peer
//! link (channel `ArchiveMirror`), in sequence order, from a durable per-peer cursor in the
//! catalog, so a peer offline for days costs a growing backlog and nothing else. The receiver
//! stores what arrives deduplicated by body hash and envelope, marked mirrored with its
//! origin, and replies once it is durable; the cursor moves only on that reply, so copying is
//! at-least-once on the wire and exactly-once in the store.

use crate::record::Item;
use crate::{Archive, ArchiveError};
use bytes::{BufMut, Bytes, BytesMut};
use peer::link::{self, LinkConfig, LinkError};
use peer::proto::mirror_op;
use peer::{Backoff, Channel, Frame, Role};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Items in flight to a peer without a reply.
const WINDOW: usize = 64;
/// A peer silent this long with requests outstanding is given up on and reconnected.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the backlog figures are recounted.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// What one peer's copier has done, for metrics and `spoolctl archive status`.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Items the peer confirmed.
    pub sent: AtomicU64,
    /// Local items not yet confirmed.
    pub backlog: AtomicU64,
    /// Archive time of the oldest of them, ms since the epoch (0: none).
    pub oldest_ms: AtomicU64,
    /// A session is up.
    pub connected: AtomicBool,
    /// Sessions refused for a wrong shared secret.
    pub auth_failures: AtomicU64,
    /// Sessions that failed otherwise.
    pub errors: AtomicU64,
}

impl PeerStats {
    /// How long the oldest unconfirmed item has waited, ms at `now_ms`; 0 with no backlog.
    /// The two figures are counted at different moments (the backlog as items are confirmed,
    /// the oldest item's time at each recount): an empty backlog has no oldest item, whatever
    /// the last recount saw.
    pub fn oldest_age_ms(&self, now_ms: u64) -> u64 {
        let oldest = self.oldest_ms.load(Ordering::Relaxed);
        if self.backlog.load(Ordering::Relaxed) == 0 || oldest == 0 {
            return 0;
        }
        now_ms.saturating_sub(oldest)
    }
}

/// What the receiving side has done.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Items stored new.
    pub stored: AtomicU64,
    /// Items already held (resent, or archived here too).
    pub duplicates: AtomicU64,
    /// Items refused (hash mismatch, storage error).
    pub refused: AtomicU64,
    /// Connections refused for a wrong shared secret.
    pub auth_failures: AtomicU64,
}

/// What the receiver did with one request: an item stored, or a checkpoint request's answer.
enum Kept {
    Item(crate::Stored),
    Reply(Result<Bytes, ArchiveError>),
}

/// The answer to [`mirror_op::CHECKPOINTS`]: the lines kept of the archive asked for.
fn checkpoints_asked(archive: &Archive, arg: &[u8]) -> Result<Bytes, ArchiveError> {
    let id: [u8; 16] = arg
        .get(..16)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ArchiveError::Refused("checkpoints request cut short".into()))?;
    let since = arg
        .get(16..24)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes);
    let mut out = String::new();
    for cp in archive.peer_checkpoints(crate::ArchiveId(id))? {
        if cp.entries < since {
            continue;
        }
        let line = cp.to_line();
        if out.len() + line.len() + 1 > CHECKPOINT_REPLY_BYTES {
            break;
        }
        out.push_str(&line);
        out.push('\n');
    }
    Ok(Bytes::from(out))
}

fn cursor_name(peer: &str) -> String {
    format!("mirror.{peer}")
}

/// A checkpoints file whose lines every peer is sent (the archive's; the audit log's), and the
/// name of the cursor that counts the lines each peer confirmed.
#[derive(Clone, Debug)]
pub struct CheckpointFile {
    /// The file.
    pub path: std::path::PathBuf,
    /// The cursor's name (`mirror-checkpoints`), made per peer; it counts the bytes of the
    /// file the peer confirmed.
    pub cursor: String,
}

/// The most checkpoint lines one fetch answers.
const CHECKPOINT_REPLY_BYTES: usize = 8 << 20;

fn encode_item(item: &Item, compressed: &[u8]) -> Bytes {
    let meta = item.encode();
    let mut b = BytesMut::with_capacity(4 + meta.len() + compressed.len());
    b.put_u32(meta.len() as u32);
    b.put_slice(&meta);
    b.put_slice(compressed);
    b.freeze()
}

fn decode_item(arg: &[u8]) -> Option<(Item, Vec<u8>)> {
    let n = u32::from_be_bytes(arg.get(..4)?.try_into().ok()?) as usize;
    let meta = arg.get(4..4 + n)?;
    Some((Item::decode(meta)?, arg.get(4 + n..)?.to_vec()))
}

/// Copies local items to the peer at `addr` for ever, reconnecting with backoff.
pub async fn copy_to(
    archive: Arc<Archive>,
    addr: SocketAddr,
    cfg: LinkConfig,
    stats: Arc<PeerStats>,
    wake: Arc<tokio::sync::Notify>,
    checkpoints: Vec<CheckpointFile>,
) {
    let name = addr.to_string();
    let mut backoff = Backoff::new();
    {
        let (archive, stats, name) = (archive.clone(), stats.clone(), name.clone());
        tokio::spawn(async move {
            loop {
                count_backlog(&archive, &name, &stats).await;
                tokio::time::sleep(BACKLOG_EVERY).await;
            }
        });
    }
    loop {
        match link::connect(addr, &cfg, Role::Active, Channel::ArchiveMirror).await {
            Ok(l) => {
                stats.connected.store(true, Ordering::SeqCst);
                tracing::info!(peer = %addr, node = %l.peer.node, "archive mirror connected");
                let r = session(
                    &archive,
                    &name,
                    l,
                    &stats,
                    &wake,
                    &mut backoff,
                    &checkpoints,
                )
                .await;
                stats.connected.store(false, Ordering::SeqCst);
                if let Err(e) = r {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %addr, "archive mirror: {e}");
                }
            }
            Err(LinkError::AuthFailed { node }) => {
                stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(peer = %addr, %node, "archive mirror refused: wrong shared secret");
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %addr, "archive mirror connect: {e}");
            }
        }
        count_backlog(&archive, &name, &stats).await;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn count_backlog(archive: &Arc<Archive>, name: &str, stats: &PeerStats) {
    let (archive, name) = (archive.clone(), name.to_string());
    let r = tokio::task::spawn_blocking(move || {
        let cursor = archive.store().cursor(&cursor_name(&name))?;
        archive.store().backlog_after(cursor, |i| !i.mirrored)
    })
    .await;
    if let Ok(Ok((n, oldest))) = r {
        stats.backlog.store(n, Ordering::Relaxed);
        stats
            .oldest_ms
            .store(oldest.unwrap_or(0), Ordering::Relaxed);
    }
}

fn link_err(e: ArchiveError) -> LinkError {
    LinkError::Protocol(e.to_string())
}

async fn session(
    archive: &Arc<Archive>,
    name: &str,
    l: link::Link,
    stats: &PeerStats,
    wake: &tokio::sync::Notify,
    backoff: &mut Backoff,
    checkpoints: &[CheckpointFile],
) -> Result<(), LinkError> {
    let (r, mut w) = tokio::io::split(l.io);
    let mut replies = link::spawn_reader(r);
    let cursor_key = cursor_name(name);
    loop {
        for file in checkpoints {
            send_checkpoints(archive, name, file, &mut w, &mut replies).await?;
        }
        let (a, key) = (archive.clone(), cursor_key.clone());
        let batch =
            tokio::task::spawn_blocking(move || -> Result<Vec<(Item, Vec<u8>)>, ArchiveError> {
                let cursor = a.store().cursor(&key)?;
                let items = a.store().items_after(cursor, WINDOW, |i| !i.mirrored)?;
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    let (compressed, _) = a.store().compressed(&item.hash)?;
                    out.push((item, compressed));
                }
                Ok(out)
            })
            .await
            .map_err(|e| LinkError::Protocol(e.to_string()))?
            .map_err(link_err)?;
        if batch.is_empty() {
            // Wait for new items; the timeout also notices a store that grew unannounced.
            let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
            continue;
        }
        for (item, compressed) in &batch {
            let f = Frame::Request {
                op: mirror_op::ITEM,
                arg: encode_item(item, compressed),
            };
            link::write_frame(&mut w, &f, &[]).await?;
        }
        w.flush().await?;
        let mut confirmed = 0;
        for _ in 0..batch.len() {
            match tokio::time::timeout(REPLY_TIMEOUT, replies.recv()).await {
                Err(_) => return Err(LinkError::Timeout),
                Ok(None) => return Err(LinkError::Protocol("peer closed the link".into())),
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(Frame::Reply { ok: true, .. }))) => confirmed += 1,
                Ok(Some(Ok(Frame::Reply { ok: false, data }))) => {
                    let why = String::from_utf8_lossy(&data).into_owned();
                    // Items before this one are durable there; move the cursor past them.
                    if confirmed > 0 {
                        let seq = batch[confirmed - 1].0.seq;
                        let _ = archive.store().set_cursor(&cursor_key, seq);
                    }
                    return Err(LinkError::Protocol(format!(
                        "peer refused item {}: {why}",
                        batch[confirmed].0.seq
                    )));
                }
                Ok(Some(Ok(other))) => {
                    return Err(LinkError::Protocol(format!(
                        "expected Reply, got {other:?}"
                    )))
                }
            }
        }
        let last = batch[batch.len() - 1].0.seq;
        let (a, key) = (archive.clone(), cursor_key.clone());
        tokio::task::spawn_blocking(move || a.store().set_cursor(&key, last))
            .await
            .map_err(|e| LinkError::Protocol(e.to_string()))?
            .map_err(link_err)?;
        stats.sent.fetch_add(confirmed as u64, Ordering::Relaxed);
        let left = stats
            .backlog
            .load(Ordering::Relaxed)
            .saturating_sub(confirmed as u64);
        stats.backlog.store(left, Ordering::Relaxed);
        if left == 0 {
            stats.oldest_ms.store(0, Ordering::Relaxed);
        }
        backoff.reset();
    }
}

/// Sends the peer the checkpoints of `file` it does not hold yet (the lines after its cursor),
/// each confirmed durable there before the cursor moves.
async fn send_checkpoints(
    archive: &Arc<Archive>,
    name: &str,
    file: &CheckpointFile,
    w: &mut tokio::io::WriteHalf<Box<dyn link::LinkIo>>,
    replies: &mut tokio::sync::mpsc::Receiver<Result<Frame, LinkError>>,
) -> Result<(), LinkError> {
    let key = format!("{}.{name}", file.cursor);
    let (a, k, path) = (archive.clone(), key.clone(), file.path.clone());
    let (sent, lines) = tokio::task::spawn_blocking(move || -> Result<_, ArchiveError> {
        // The cursor counts the file's bytes the peer holds: the file grows by a line a minute
        // for years, and is read from there, not from its start.
        let sent = a.store().cursor(&k)?;
        Ok((sent, crate::checkpoint::lines_after(&path, sent, WINDOW)?))
    })
    .await
    .map_err(|e| LinkError::Protocol(e.to_string()))?
    .map_err(link_err)?;
    if lines.is_empty() {
        return Ok(());
    }
    for line in &lines {
        let f = Frame::Request {
            op: mirror_op::CHECKPOINT,
            arg: Bytes::copy_from_slice(line.as_bytes()),
        };
        link::write_frame(w, &f, &[]).await?;
    }
    w.flush().await?;
    for _ in &lines {
        match tokio::time::timeout(REPLY_TIMEOUT, replies.recv()).await {
            Err(_) => return Err(LinkError::Timeout),
            Ok(None) => return Err(LinkError::Protocol("peer closed the link".into())),
            Ok(Some(Err(e))) => return Err(e),
            Ok(Some(Ok(Frame::Reply { ok: true, .. }))) => {}
            Ok(Some(Ok(Frame::Reply { ok: false, data }))) => {
                return Err(LinkError::Protocol(format!(
                    "peer refused a checkpoint: {}",
                    String::from_utf8_lossy(&data)
                )))
            }
            Ok(Some(Ok(other))) => {
                return Err(LinkError::Protocol(format!(
                    "expected Reply, got {other:?}"
                )))
            }
        }
    }
    let a = archive.clone();
    let upto = sent + lines.iter().map(|l| l.len() as u64 + 1).sum::<u64>();
    tokio::task::spawn_blocking(move || a.store().set_cursor(&key, upto))
        .await
        .map_err(|e| LinkError::Protocol(e.to_string()))?
        .map_err(link_err)
}

/// Asks the mirror peer at `addr` for the checkpoints of `archive` it keeps (from the one
/// covering `since` entries on), as lines of a checkpoints file.
pub async fn fetch_checkpoints(
    addr: SocketAddr,
    cfg: &LinkConfig,
    archive: crate::ArchiveId,
    since: u64,
) -> Result<String, LinkError> {
    let l = link::connect(addr, cfg, Role::Active, Channel::ArchiveMirror).await?;
    let (r, mut w) = tokio::io::split(l.io);
    let mut replies = link::spawn_reader(r);
    let mut arg = BytesMut::with_capacity(24);
    arg.put_slice(&archive.0);
    arg.put_u64(since);
    let f = Frame::Request {
        op: mirror_op::CHECKPOINTS,
        arg: arg.freeze(),
    };
    link::write_frame(&mut w, &f, &[]).await?;
    w.flush().await?;
    match tokio::time::timeout(REPLY_TIMEOUT, replies.recv()).await {
        Err(_) => Err(LinkError::Timeout),
        Ok(None) => Err(LinkError::Protocol("peer closed the link".into())),
        Ok(Some(Err(e))) => Err(e),
        Ok(Some(Ok(Frame::Reply { ok: true, data }))) => {
            Ok(String::from_utf8_lossy(&data).into_owned())
        }
        Ok(Some(Ok(Frame::Reply { ok: false, data }))) => Err(LinkError::Protocol(format!(
            "peer refused: {}",
            String::from_utf8_lossy(&data)
        ))),
        Ok(Some(Ok(other))) => Err(LinkError::Protocol(format!(
            "expected Reply, got {other:?}"
        ))),
    }
}

/// Accepts mirror peers on `listener` and stores what they send.
pub async fn receive(
    archive: Arc<Archive>,
    listener: tokio::net::TcpListener,
    cfg: LinkConfig,
    stats: Arc<ReceiverStats>,
) {
    let failures = stats.clone();
    link::serve(
        listener,
        cfg,
        Channel::ArchiveMirror,
        "archive mirror",
        move || {
            failures.auth_failures.fetch_add(1, Ordering::Relaxed);
        },
        move |l| {
            let (archive, stats) = (archive.clone(), stats.clone());
            async move {
                tracing::info!(node = %l.peer.node, "archive mirror peer connected");
                receive_session(&archive, l, &stats).await
            }
        },
    )
    .await
}

async fn receive_session(
    archive: &Arc<Archive>,
    l: link::Link,
    stats: &ReceiverStats,
) -> Result<(), LinkError> {
    let (r, mut w) = tokio::io::split(l.io);
    let mut frames = link::spawn_reader(r);
    // The sender sends a window of items before it waits: store them together (one group
    // commit), then reply to each in order.
    while let Some(first) = frames.recv().await {
        let mut batch = vec![first];
        while batch.len() < WINDOW {
            match frames.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut storing = Vec::with_capacity(batch.len());
        for f in batch {
            let arg = match f {
                Ok(Frame::Request {
                    op: mirror_op::ITEM,
                    arg,
                }) => arg,
                Ok(Frame::Request { op, arg })
                    if op == mirror_op::CHECKPOINT || op == mirror_op::CHECKPOINTS =>
                {
                    let a = archive.clone();
                    storing.push(tokio::task::spawn_blocking(move || {
                        Ok(Kept::Reply(if op == mirror_op::CHECKPOINT {
                            a.keep_peer_checkpoint(&arg).map(|()| Bytes::new())
                        } else {
                            checkpoints_asked(&a, &arg)
                        }))
                    }));
                    continue;
                }
                Ok(other) => {
                    return Err(LinkError::Protocol(format!(
                        "archive channel: unexpected {other:?}"
                    )))
                }
                Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            let a = archive.clone();
            storing.push(tokio::task::spawn_blocking(move || {
                match decode_item(&arg) {
                    Some((item, compressed)) => {
                        a.receive_mirrored(item, compressed).map(Kept::Item)
                    }
                    None => Err(ArchiveError::Corrupt("undecodable mirrored item".into())),
                }
            }));
        }
        for task in storing {
            let stored = task.await.map_err(|e| LinkError::Protocol(e.to_string()))?;
            let reply = match stored {
                Ok(Kept::Reply(Ok(data))) => Frame::Reply { ok: true, data },
                Ok(Kept::Reply(Err(e))) => {
                    tracing::warn!("archive mirror: checkpoint request refused: {e}");
                    Frame::Reply {
                        ok: false,
                        data: Bytes::from(e.to_string()),
                    }
                }
                Ok(Kept::Item(s)) => {
                    let c = if s.new {
                        &stats.stored
                    } else {
                        &stats.duplicates
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    Frame::Reply {
                        ok: true,
                        data: Bytes::copy_from_slice(&s.seq.to_be_bytes()),
                    }
                }
                Err(e) => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("mirrored item refused: {e}");
                    Frame::Reply {
                        ok: false,
                        data: Bytes::from(e.to_string()),
                    }
                }
            };
            link::write_frame(&mut w, &reply, &[]).await?;
        }
        w.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod oldest_age_tests {
    use super::PeerStats;
    use std::sync::atomic::Ordering;

    #[test]
    fn an_empty_backlog_has_no_oldest_age_whatever_the_last_recount_saw() {
        // (backlog, oldest_ms at the last recount, now) → age in ms
        let cases = [
            (0, 0, 50_000, 0),
            (0, 20_000, 50_000, 0), // caught up since the recount
            (3, 20_000, 50_000, 30_000),
            (3, 0, 50_000, 0),      // not recounted yet
            (3, 60_000, 50_000, 0), // clock behind the item: never negative
        ];
        for (backlog, oldest, now, want) in cases {
            let s = PeerStats::default();
            s.backlog.store(backlog, Ordering::Relaxed);
            s.oldest_ms.store(oldest, Ordering::Relaxed);
            assert_eq!(s.oldest_age_ms(now), want, "{backlog} {oldest} {now}");
        }
    }
}
