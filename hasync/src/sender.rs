//! The sender, on the active (or leaving) unit: keeps a link to the partner, resumes from its
//! applied mark, rebuilds the log's `ADD`s after a start, ships pending actions within the
//! window, and prunes what the partner acknowledged.
use super::*;
use crate::recovery::request;

impl Replicator {
    /// Runs the sender: while this node is active (or leaving, to ship its last actions), keep
    /// a link to the partner and ship actions.
    pub async fn run_sender(self: Arc<Self>) {
        tokio::spawn(self.clone().prune_acknowledged());
        let mut role = self.watch_role();
        let mut backoff = peer::Backoff::new();
        loop {
            while *role.borrow() == Role::Passive {
                if role.changed().await.is_err() {
                    return;
                }
            }
            match self.clone().send_session().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    if matches!(e, LinkError::AuthFailed { .. }) {
                        self.observer.auth_failure();
                    }
                    tracing::warn!(partner = %self.cfg.partner, "replication link: {e}");
                    self.observer.reconnect();
                }
            }
            if self.link_up.swap(false, Ordering::SeqCst) {
                self.observer.link_up(false);
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    pub(crate) async fn send_session(self: Arc<Self>) -> Result<(), LinkError> {
        let link = link::connect(
            self.cfg.partner,
            &self.cfg.link,
            self.role(),
            proto::Channel::Replication,
        )
        .await?;
        let _live = LiveLink::open(&self);
        self.heard(&link.peer.node, link.peer.role, link.peer.priority);
        let (r, mut w) = tokio::io::split(link.io);
        let mut frames = link::spawn_reader(r);
        let mut next = match frames.recv().await {
            Some(Ok(Frame::Resume(seq))) => seq,
            Some(Ok(other)) => {
                return Err(LinkError::Protocol(format!(
                    "expected Resume, got {other:?}"
                )))
            }
            Some(Err(e)) => return Err(e),
            None => return Err(LinkError::Protocol("link closed before Resume".into())),
        };
        self.log.advance_past(next);
        let resume = decide::on_resume(next, *self.acked.borrow());
        next = resume.next;
        if resume.request_rebuild {
            tracing::info!(
                resume_after = next,
                acknowledged = *self.acked.borrow(),
                "the partner resumes behind what it acknowledged: rebuilding"
            );
            self.log.request_rebuild();
        }
        if self.log.needs_rebuild() {
            self.rebuild(&mut frames, &mut w, next).await?;
        }
        self.raise_acked(next);
        self.link_up.store(true, Ordering::SeqCst);
        self.observer.link_up(true);
        tracing::info!(partner = %link.peer.node, resume_after = next, "replication link up");
        // (seq, logged at ms, bytes) of every action sent and not yet acknowledged.
        let mut in_flight: VecDeque<(u64, u64, u64)> = Default::default();
        let mut in_flight_bytes = 0u64;
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut role = self.watch_role();
        let mut heard_at = Instant::now();
        loop {
            if *role.borrow() == Role::Passive || self.log.needs_rebuild() {
                return Ok(()); // a rebuild starts a session afresh
            }
            // Fill the window.
            let room = decide::room(
                in_flight.len(),
                in_flight_bytes,
                self.cfg.window,
                WINDOW_BYTES,
            );
            let mut publishing = false;
            if room > 0 {
                let actions = self
                    .log
                    .pending_after(next, room)
                    .map_err(|e| LinkError::Protocol(e.to_string()))?;
                let mut shipped = 0;
                let mut batch = link::FrameBatch::default();
                for a in &actions {
                    let Some(sent) = self.ship(&mut batch, a) else {
                        // Logged but not yet renamed into spool/: try again shortly.
                        publishing = true;
                        break;
                    };
                    self.observer.sent(sent);
                    in_flight.push_back((a.seq, a.logged_ms, sent));
                    in_flight_bytes += sent;
                    next = a.seq;
                    shipped += 1;
                    if in_flight_bytes >= WINDOW_BYTES {
                        break;
                    }
                }
                if shipped > 0 {
                    within(SILENCE_MAX, async {
                        batch.write_to(&mut w).await?;
                        w.flush().await?;
                        Ok(())
                    })
                    .await?;
                    if !publishing {
                        continue;
                    }
                }
            }
            let retry = async {
                if publishing {
                    tokio::time::sleep(Duration::from_millis(2)).await
                } else {
                    std::future::pending::<()>().await
                }
            };
            tokio::select! {
                f = frames.recv() => match f.inspect(|_| heard_at = Instant::now()) {
                    Some(Ok(Frame::Ack(seq))) => {
                        let now = now_ms();
                        while in_flight.front().is_some_and(|(s, _, _)| *s <= seq) {
                            if let Some((_, logged, bytes)) = in_flight.pop_front() {
                                in_flight_bytes -= bytes;
                                let lag = now.saturating_sub(logged);
                                self.last_lag_ms.store(lag, Ordering::SeqCst);
                                self.observer.acknowledged(Duration::from_millis(lag));
                            }
                        }
                        // Pruning the log is left to `prune_acknowledged`, off this loop.
                        self.raise_acked(seq);
                    }
                    Some(Ok(Frame::Heartbeat { role, priority })) => self.heard(&link.peer.node, role, priority),
                    Some(Ok(other)) => return Err(LinkError::Protocol(format!("unexpected {other:?}"))),
                    Some(Err(e)) => return Err(e),
                    None => return Err(LinkError::Closed),
                },
                _ = self.staging.notified() => {}
                _ = tick.tick() => {
                    if heard_at.elapsed() >= SILENCE_MAX {
                        return Err(LinkError::Protocol(format!("partner silent for {SILENCE_MAX:?}")));
                    }
                    within(SILENCE_MAX, async {
                        link::write_frame(&mut w, &Frame::Heartbeat { role: self.role(), priority: self.cfg.link.priority }, &[]).await?;
                        w.flush().await?;
                        Ok(())
                    }).await?;
                    self.check_split_brain();
                }
                _ = role.changed() => {
                    // The partner learns at once (not at the next tick) that this unit is
                    // leaving, and keeps accepting what it ships.
                    link::write_frame(&mut w, &Frame::Heartbeat { role: self.role(), priority: self.cfg.link.priority }, &[]).await?;
                    w.flush().await?;
                }
                _ = retry => {}
            }
        }
    }

    /// After a start (or when asked, after takeover recovery), before anything is shipped:
    /// asks the partner which of the messages held here (in `spool/`, `vscan/`,
    /// `quarantine/`, whatever their origin) it lacks, and logs their `ADD`s, which live in
    /// memory and may have died with the previous process (see [`txlog`]). A message published
    /// meanwhile may get a second `ADD`, applied idempotently; one removed meanwhile goes as a
    /// `DELETE` (see [`Replicator::ship`]). A partner too old to answer gets every message
    /// again.
    pub(crate) async fn rebuild(
        &self,
        frames: &mut tokio::sync::mpsc::Receiver<Result<Frame, LinkError>>,
        w: &mut tokio::io::WriteHalf<Box<dyn link::LinkIo>>,
        resume_after: u64,
    ) -> Result<(), LinkError> {
        let started = Instant::now();
        let asked = self.log.rebuild_asked();
        let layout = self.layout.clone();
        let ours =
            tokio::task::spawn_blocking(move || -> std::io::Result<Vec<(MessageId, bool)>> {
                let mut ours = Vec::new();
                for folder in Folder::REPLICATED {
                    let held = folder == Folder::Hold;
                    ours.extend(layout.ids(folder)?.into_iter().map(|id| (id, held)));
                }
                Ok(ours)
            })
            .await
            .map_err(|e| LinkError::Protocol(format!("rebuild listing: {e}")))??;
        let mut missing = Vec::new();
        for chunk in ours.chunks(REBUILD_CHUNK) {
            let arg: String = chunk
                .iter()
                .map(|(id, held)| {
                    if *held {
                        format!("{id} hold\n")
                    } else {
                        format!("{id}\n")
                    }
                })
                .collect();
            let asked = request(frames, w, proto::partner_op::MISSING, arg.as_bytes());
            let answer = tokio::time::timeout(REBUILD_ANSWER_WITHIN, asked)
                .await
                .map_err(|_| LinkError::Protocol("partner did not answer the rebuild".into()))?;
            match answer? {
                Ok(reply) => {
                    for line in String::from_utf8_lossy(&reply).lines() {
                        let id = line
                            .parse()
                            .map_err(|_| LinkError::Protocol(format!("bad id {line:?}")))?;
                        missing.push(id);
                    }
                }
                Err(refused) => {
                    tracing::warn!(%refused, "partner cannot say which messages it lacks; sending them all again");
                    missing.extend(chunk.iter().map(|(id, _)| id.clone()));
                }
            }
        }
        let log = self.log.clone();
        let n = missing.len();
        let appended =
            tokio::task::spawn_blocking(move || log.rebuilt(&missing, resume_after, asked))
                .await
                .map_err(|e| LinkError::Protocol(format!("rebuild: {e}")))?
                .map_err(|e| LinkError::Protocol(e.to_string()))?;
        tracing::info!(
            held = ours.len(),
            missing_on_partner = n,
            appended = appended.len(),
            ms = started.elapsed().as_millis() as u64,
            "replication log rebuilt"
        );
        Ok(())
    }

    /// Records that the partner holds everything up to `seq`; never moves backwards.
    pub(crate) fn raise_acked(&self, seq: u64) {
        self.acked.send_if_modified(|a| {
            let newer = seq > *a;
            *a = (*a).max(seq);
            newer
        });
    }

    /// Removes acknowledged actions from the log, coalescing acknowledgements that arrive
    /// within [`PRUNE_EVERY`] into one LMDB transaction run off the async threads. Not
    /// durable by itself and need not be: after a restart the sender resumes from the
    /// partner's applied mark, and anything resent applies idempotently.
    pub(crate) async fn prune_acknowledged(self: Arc<Self>) {
        let mut acked = self.watch_acked();
        let mut pruned = 0;
        loop {
            let seq = *acked.borrow_and_update();
            if seq > pruned {
                let log = self.log.clone();
                match tokio::task::spawn_blocking(move || log.acknowledge(seq)).await {
                    Ok(Ok(_)) => pruned = seq,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not prune acknowledged actions")
                    }
                    Err(e) => tracing::warn!(error = %e, "pruning task failed"),
                }
                tokio::time::sleep(PRUNE_EVERY).await;
                continue;
            }
            if acked.changed().await.is_err() {
                return;
            }
        }
    }

    /// Queues one action in `batch`, as [`decide::ship`] says: an `ADD` whose message is gone by
    /// now goes as a `DELETE`. Returns the bytes queued, or `None` for an `ADD` whose message is
    /// still being published (its files are in `tmp/` or half renamed): that one must wait.
    pub(crate) fn ship(&self, batch: &mut link::FrameBatch, a: &txlog::Action) -> Option<u64> {
        let id = a.id.to_string();
        // Publishing is asked before looking for the files: asked after, the writer could
        // publish the message between a look that finds nothing and the answer "not
        // publishing", and a message that exists would be sent as gone.
        let publishing = a.kind == Kind::Add && self.staging.is_publishing(&a.id);
        let found = if a.kind == Kind::Add && !publishing {
            self.find(&a.id)
        } else {
            None
        };
        match decide::ship(a.kind, publishing, found.is_some()) {
            decide::Ship::Wait => None,
            decide::Ship::Add => {
                let (frame, body, sent, from_outbox) = match found? {
                    Found::Outbox(held) => {
                        let sent = (held.envelope.len()
                            + held.body.iter().map(Bytes::len).sum::<usize>())
                            as u64;
                        let frame = Frame::Add {
                            seq: a.seq,
                            id,
                            held: false,
                            env: held.envelope,
                            body: Bytes::new(),
                        };
                        (frame, link::BodyPieces::Received(held.body), sent, true)
                    }
                    Found::Files { env, body, folder } => {
                        let sent = (env.len() + body.bytes().len()) as u64;
                        let frame = Frame::Add {
                            seq: a.seq,
                            id,
                            held: folder == Folder::Hold,
                            env: Bytes::from(env),
                            body: Bytes::new(),
                        };
                        (frame, link::BodyPieces::Mapped(Box::new(body)), sent, false)
                    }
                };
                batch.push(&frame, body);
                self.observer.add_sent(from_outbox);
                Some(sent)
            }
            decide::Ship::Delete => {
                if a.kind == Kind::Add {
                    tracing::debug!(id = %a.id, seq = a.seq, "message gone before it was shipped; sending DELETE");
                }
                // A message deleted before its ADD was sent may still be held.
                self.staging.outbox().take(&a.id);
                batch.push(&Frame::Delete { seq: a.seq, id }, link::BodyPieces::None);
                Some(0)
            }
        }
    }

    /// Where a message to replicate is now: the outbox (taken from it), or its files in a
    /// replicated folder (the body memory-mapped and checksum-verified).
    fn find(&self, id: &MessageId) -> Option<Found> {
        if let Some(held) = self.staging.outbox().take(id) {
            return Some(Found::Outbox(held));
        }
        Folder::REPLICATED.into_iter().find_map(|folder| {
            let env = std::fs::read(self.layout.path(folder, id, Part::Env)).ok()?;
            let decoded = spool::Envelope::decode(&env).ok()?;
            let body = spool::MappedBody::open_verified(
                &self.layout.path(folder, id, Part::Body),
                decoded.body_len,
                &decoded.body_sha256,
            )
            .ok()?;
            Some(Found::Files { env, body, folder })
        })
    }
}

/// A message found for its `ADD`.
enum Found {
    Outbox(outbox::HeldMessage),
    Files {
        env: Vec<u8>,
        body: spool::MappedBody,
        folder: Folder,
    },
}
