//! The receiver, on the partner: accepts links, applies `ADD`s and `DELETE`s idempotently
//! through the [`ReplicaStore`], acknowledges in order what is durable, and answers the
//! requests that come on the same link.
use super::*;

/// One action the receiver is applying: its sequence, the id for an `ADD`, and its completion.
struct Applying<'a> {
    seq: u64,
    adding: Option<MessageId>,
    done: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>>,
}

/// What woke the receiver.
enum Event {
    Applied(std::io::Result<()>),
    Frame(Option<Result<Frame, LinkError>>),
    Tick,
}

impl Replicator {
    /// Runs the receiver: accept partner links and apply what they send.
    pub async fn run_receiver(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((tcp, from)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                match link::accept(tcp, &me.cfg.link, me.role()).await {
                    // This listener serves replication and its requests; the archive mirror
                    // and cluster configuration will have services of their own.
                    Ok(l)
                        if !matches!(
                            l.peer.channel,
                            proto::Channel::Replication | proto::Channel::PartnerRequests
                        ) =>
                    {
                        tracing::warn!(%from, channel = ?l.peer.channel, "peer link for a channel not served here: closed");
                    }
                    Ok(l) => {
                        let requests = l.peer.channel == proto::Channel::PartnerRequests;
                        match me.clone().receive_session(l).await {
                            Ok(()) => {}
                            // A request session (recovery, tracking, settings) ends when the
                            // asker has its answers and hangs up: not a fault.
                            Err(LinkError::Closed) if requests => {
                                tracing::debug!(%from, "request session ended");
                            }
                            Err(LinkError::Io(e))
                                if requests && e.kind() == std::io::ErrorKind::UnexpectedEof =>
                            {
                                tracing::debug!(%from, "request session ended without a TLS close: {e}");
                            }
                            Err(e) => tracing::warn!(%from, "replication receiver: {e}"),
                        }
                    }
                    Err(e) => {
                        if matches!(e, LinkError::AuthFailed { .. }) {
                            me.observer.auth_failure();
                        }
                        tracing::warn!(%from, "replication link refused: {e}");
                    }
                }
            });
        }
    }

    async fn receive_session(self: Arc<Self>, link: link::Link) -> Result<(), LinkError> {
        let _live = LiveLink::open(&self);
        let peer = link.peer.clone();
        self.heard(&peer.node, peer.role, peer.priority);
        let (r, mut w) = tokio::io::split(link.io);
        let mut frames = link::spawn_reader(r);
        let durable = self
            .log
            .applied()
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let resume = durable.max(self.applied.load(Ordering::SeqCst));
        link::write_frame(&mut w, &Frame::Resume(resume), &[]).await?;
        w.flush().await?;
        let mut tick = tokio::time::interval(HEARTBEAT);
        // Actions handed to the writer (or to a blocking removal), in sequence order. The receiver
        // keeps reading while they complete, so batch n+1 is submitted while batch n is being
        // made durable; acknowledgements go out strictly in order.
        let mut applying: VecDeque<Applying<'_>> = VecDeque::new();
        let mut heard_at = Instant::now();
        loop {
            let event = {
                let head = async {
                    match applying.front_mut() {
                        Some(a) => a.done.as_mut().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = head => Event::Applied(r),
                    f = frames.recv() => Event::Frame(f),
                    _ = tick.tick() => Event::Tick,
                }
            };
            match event {
                Event::Applied(result) => {
                    result?;
                    let mut last = applying.pop_front().map(|a| a.seq);
                    // Acknowledge everything else already durable in one frame.
                    while let Some(a) = applying.front_mut() {
                        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                        match a.done.as_mut().poll(&mut cx) {
                            std::task::Poll::Ready(r) => {
                                r?;
                                last = applying.pop_front().map(|a| a.seq);
                            }
                            std::task::Poll::Pending => break,
                        }
                    }
                    if let Some(seq) = last {
                        self.acknowledge_applied(&peer, &mut w, seq).await?;
                    }
                }
                Event::Tick => {
                    if heard_at.elapsed() >= SILENCE_MAX {
                        return Err(LinkError::Protocol(format!(
                            "partner silent for {SILENCE_MAX:?}"
                        )));
                    }
                    within(SILENCE_MAX, async {
                        link::write_frame(
                            &mut w,
                            &Frame::Heartbeat {
                                role: self.role(),
                                priority: self.cfg.link.priority,
                            },
                            &[],
                        )
                        .await?;
                        w.flush().await?;
                        Ok(())
                    })
                    .await?;
                    self.check_split_brain();
                    self.persist_applied();
                }
                Event::Frame(first) => {
                    heard_at = Instant::now();
                    let mut batch = vec![first];
                    while batch.len() < 256 {
                        match frames.try_recv() {
                            Ok(f) => batch.push(Some(f)),
                            Err(_) => break,
                        }
                    }
                    let mut removals: Vec<(u64, MessageId)> = Vec::new();
                    for f in batch {
                        match f {
                            None => return Err(LinkError::Closed),
                            Some(Err(e)) => return Err(e),
                            Some(Ok(Frame::Heartbeat { role, priority })) => {
                                self.heard(&peer.node, role, priority)
                            }
                            Some(Ok(Frame::Add {
                                seq,
                                id,
                                held,
                                env,
                                body,
                            })) => {
                                let id: MessageId = id
                                    .parse()
                                    .map_err(|_| LinkError::Protocol(format!("bad id {id:?}")))?;
                                self.queue_removals(&mut applying, std::mem::take(&mut removals));
                                applying.push_back(Applying {
                                    seq,
                                    adding: Some(id.clone()),
                                    done: self.store.store(
                                        id,
                                        held,
                                        self.role() == Role::Active,
                                        env,
                                        body,
                                    ),
                                });
                            }
                            Some(Ok(Frame::Delete { seq, id })) => {
                                let id: MessageId = id
                                    .parse()
                                    .map_err(|_| LinkError::Protocol(format!("bad id {id:?}")))?;
                                if applying.iter().any(|a| a.adding.as_ref() == Some(&id)) {
                                    // Its ADD must be on disk before the removal runs.
                                    self.queue_removals(
                                        &mut applying,
                                        std::mem::take(&mut removals),
                                    );
                                    self.drain(&peer, &mut w, &mut applying).await?;
                                }
                                removals.push((seq, id));
                            }
                            Some(Ok(Frame::Request { op, arg })) => {
                                self.queue_removals(&mut applying, std::mem::take(&mut removals));
                                self.drain(&peer, &mut w, &mut applying).await?;
                                let reply = match self.answer(op, &arg) {
                                    Ok(data) => Frame::Reply { ok: true, data },
                                    Err(e) => Frame::Reply {
                                        ok: false,
                                        data: Bytes::from(e),
                                    },
                                };
                                link::write_frame(&mut w, &reply, &[]).await?;
                                w.flush().await?;
                            }
                            Some(Ok(other)) => {
                                return Err(LinkError::Protocol(format!("unexpected {other:?}")))
                            }
                        }
                    }
                    self.queue_removals(&mut applying, removals);
                }
            }
        }
    }

    /// Queues a group of `DELETE`s as one blocking task: every removal, then one directory
    /// fsync per folder touched.
    fn queue_removals<'a>(
        &self,
        applying: &mut VecDeque<Applying<'a>>,
        removals: Vec<(u64, MessageId)>,
    ) {
        let Some(seq) = removals.last().map(|r| r.0) else {
            return;
        };
        let store = self.store.clone();
        let ids: Vec<MessageId> = removals.into_iter().map(|r| r.1).collect();
        let task = tokio::task::spawn_blocking(move || store.remove_many(&ids));
        applying.push_back(Applying {
            seq,
            adding: None,
            done: Box::pin(async move {
                task.await
                    .map_err(|e| std::io::Error::other(format!("removal task: {e}")))?
            }),
        });
    }

    /// Waits for everything queued and acknowledges it.
    async fn drain<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        peer: &link::PeerInfo,
        w: &mut W,
        applying: &mut VecDeque<Applying<'_>>,
    ) -> Result<(), LinkError> {
        let mut last = None;
        while let Some(a) = applying.pop_front() {
            a.done.await?;
            last = Some(a.seq);
        }
        if let Some(seq) = last {
            self.acknowledge_applied(peer, w, seq).await?;
        }
        Ok(())
    }

    /// Acknowledges every action up to `seq`, now durable here. The applied mark is kept in
    /// memory and persisted lazily (each heartbeat): a mark behind the truth only makes the
    /// sender resend actions that apply idempotently.
    async fn acknowledge_applied<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        peer: &link::PeerInfo,
        w: &mut W,
        seq: u64,
    ) -> Result<(), LinkError> {
        // Acknowledged even in a split brain: a replica stored on an active unit is scheduled
        // there (the winner delivers it, the loser holds it), and a DELETE is always safe to
        // apply, so the two spools converge instead of the link breaking and reconnecting.
        let _ = peer;
        self.applied.fetch_max(seq, Ordering::SeqCst);
        link::write_frame(w, &Frame::Ack(seq), &[]).await?;
        w.flush().await?;
        Ok(())
    }

    /// Writes the in-memory applied mark to the log, off the async threads.
    fn persist_applied(&self) {
        let mark = self.applied.load(Ordering::SeqCst);
        if self.applied_persisted.fetch_max(mark, Ordering::SeqCst) >= mark {
            return;
        }
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = log.set_applied(mark) {
                tracing::warn!(error = %e, "could not persist the applied mark (kept in memory)");
            }
        });
    }
}
