//! The replicator's unit tests: the receiver's ordering, the sender's window and shipping
//! rules, the outbox.
use super::*;

struct NoStore;
impl ReplicaStore for NoStore {
    fn store(
        &self,
        _id: MessageId,
        _held: bool,
        _deliver_here: bool,
        _env: Bytes,
        _body: Bytes,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }
    fn remove(&self, _id: &MessageId) -> std::io::Result<()> {
        Ok(())
    }
}

struct NoObserver;
impl ReplicationObserver for NoObserver {
    fn link_up(&self, _up: bool) {}
    fn reconnect(&self) {}
    fn auth_failure(&self) {}
    fn acknowledged(&self, _lag: Duration) {}
    fn sent(&self, _bytes: u64) {}
    fn split_brain(&self, _on: bool) {}
}

/// A link identity with a fresh self-signed certificate.
fn test_link_config(node: &str, secret: &[u8]) -> link::LinkConfig {
    link::LinkConfig::self_signed(node, secret, 1).unwrap()
}

/// A fresh state directory and transaction log for one test.
fn state_and_log() -> (tempfile::TempDir, Layout, Arc<TxLog>) {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path().join("state"));
    layout.create().unwrap();
    let log = Arc::new(TxLog::open(&dir.path().join("log"), 100).unwrap());
    (dir, layout, log)
}

/// A replicator named `node` in `role` over `layout` and `log`, storing into `store`; its
/// partner address leads nowhere.
fn replicator(
    node: &str,
    role: Role,
    layout: Layout,
    log: Arc<TxLog>,
    store: Arc<dyn ReplicaStore>,
) -> Arc<Replicator> {
    let cfg = ReplicatorConfig {
        link: test_link_config(node, b"s"),
        partner: "127.0.0.1:9".parse().unwrap(),
        window: 8,
    };
    let staging = Arc::new(staging::Staging::new(outbox::OUTBOX_BYTES_DEFAULT));
    Replicator::new(cfg, log, staging, layout, store, Arc::new(NoObserver), role)
}

/// The sender keeps at most `window` actions unacknowledged in flight, and ships more only
/// as acknowledgements come: a partner that reads but does not acknowledge gets exactly the
/// window.
#[tokio::test]
async fn the_sender_keeps_at_most_the_window_in_flight() {
    let (_dir, layout, log) = state_and_log();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = ReplicatorConfig {
        link: test_link_config("a", b"s"),
        partner: listener.local_addr().unwrap(),
        window: 8,
    };
    let sender = Replicator::new(
        cfg,
        log.clone(),
        Arc::new(staging::Staging::new(0)),
        layout.clone(),
        Arc::new(NoStore),
        Arc::new(NoObserver),
        Role::Active,
    );
    let ids = spool::IdGenerator::new("a").unwrap();
    let mut seqs = Vec::new();
    for i in 0..20 {
        let id = ids.next_id();
        let body = format!("Subject: {i}\r\n\r\nbody\r\n");
        let env = spool::Envelope::new(id.clone(), "a@x.test", &["b@y.test"], body.as_bytes());
        std::fs::write(layout.path(Folder::Spool, &id, Part::Body), &body).unwrap();
        std::fs::write(layout.path(Folder::Spool, &id, Part::Env), env.encode()).unwrap();
        seqs.extend(log.append(&[(Kind::Add, &id)], now_ms()).unwrap());
    }
    tokio::spawn(sender.clone().run_sender());

    let (tcp, _) = listener.accept().await.unwrap();
    let l = link::accept(tcp, &test_link_config("b", b"s"), Role::Passive)
        .await
        .unwrap();
    let (r, mut w) = tokio::io::split(l.io);
    let mut frames = link::spawn_reader(r);
    link::write_frame(&mut w, &Frame::Resume(0), &[])
        .await
        .unwrap();
    w.flush().await.unwrap();
    // Counts the ADDs that arrive within `ms`, answering the rebuild's question.
    async fn adds_within(
        frames: &mut tokio::sync::mpsc::Receiver<Result<Frame, LinkError>>,
        w: &mut tokio::io::WriteHalf<Box<dyn link::LinkIo>>,
        ms: u64,
    ) -> usize {
        let mut adds = 0;
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(Some(f)) = tokio::time::timeout_at(until, frames.recv()).await {
            match f.unwrap() {
                Frame::Add { .. } => adds += 1,
                Frame::Request { .. } => {
                    let reply = Frame::Reply {
                        ok: true,
                        data: Bytes::new(),
                    };
                    link::write_frame(w, &reply, &[]).await.unwrap();
                    w.flush().await.unwrap();
                }
                _ => {}
            }
        }
        adds
    }
    assert_eq!(adds_within(&mut frames, &mut w, 700).await, 8, "the window");
    link::write_frame(&mut w, &Frame::Ack(seqs[3]), &[])
        .await
        .unwrap();
    w.flush().await.unwrap();
    assert_eq!(
        adds_within(&mut frames, &mut w, 700).await,
        4,
        "four acknowledged, four more sent"
    );
}

/// Holds every `store` until the test opens the gate, and records what happens in order.
#[derive(Default)]
struct GatedStore {
    gate: tokio::sync::Notify,
    events: std::sync::Mutex<Vec<String>>,
}

impl GatedStore {
    fn note(&self, event: String) {
        self.events.lock().unwrap().push(event);
    }
    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

impl ReplicaStore for GatedStore {
    fn store(
        &self,
        id: MessageId,
        _held: bool,
        _deliver_here: bool,
        _env: Bytes,
        _body: Bytes,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>> {
        self.note(format!("store {id} submitted"));
        Box::pin(async move {
            self.gate.notified().await;
            self.note(format!("store {id} durable"));
            Ok(())
        })
    }
    fn remove(&self, id: &MessageId) -> std::io::Result<()> {
        self.note(format!("remove {id}"));
        Ok(())
    }
}

/// The next acknowledgement within `ms`, skipping heartbeats.
async fn acked_within(
    frames: &mut tokio::sync::mpsc::Receiver<Result<Frame, LinkError>>,
    ms: u64,
) -> Option<u64> {
    let next_ack = async {
        loop {
            match frames.recv().await {
                Some(Ok(Frame::Ack(seq))) => return seq,
                Some(Ok(Frame::Heartbeat { .. })) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(ms), next_ack)
        .await
        .ok()
}

/// The pipelined receiver keeps reading while an `ADD` is being made durable, but a
/// `DELETE` of the same id waits for that `ADD` (else the replica would be removed first
/// and then written, and outlive its message), and nothing is acknowledged before it is
/// durable.
#[tokio::test]
async fn a_delete_waits_for_the_add_of_the_same_id_and_acks_follow_durability() {
    let (_dir, layout, log) = state_and_log();
    let store = Arc::new(GatedStore::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = replicator("b", Role::Passive, layout, log, store.clone());
    tokio::spawn(receiver.run_receiver(listener));

    let sender = link::connect(
        addr,
        &test_link_config("a", b"s"),
        Role::Active,
        proto::Channel::Replication,
    )
    .await
    .unwrap();
    let (r, mut w) = tokio::io::split(sender.io);
    let mut frames = link::spawn_reader(r);
    assert!(matches!(frames.recv().await, Some(Ok(Frame::Resume(0)))));
    let id: MessageId = spool::IdGenerator::new("a").unwrap().next_id();
    let mut batch = link::FrameBatch::default();
    batch.push(
        &Frame::Add {
            seq: 1,
            id: id.to_string(),
            held: false,
            env: Bytes::from_static(b"env"),
            body: Bytes::new(),
        },
        link::BodyPieces::None,
    );
    batch.push(
        &Frame::Delete {
            seq: 2,
            id: id.to_string(),
        },
        link::BodyPieces::None,
    );
    batch.write_to(&mut w).await.unwrap();
    w.flush().await.unwrap();

    assert_eq!(
        acked_within(&mut frames, 300).await,
        None,
        "acked before durable"
    );
    assert_eq!(store.events(), vec![format!("store {id} submitted")]);

    store.gate.notify_one();
    let mut last = 0;
    while last < 2 {
        last = acked_within(&mut frames, 5_000)
            .await
            .expect("no acknowledgement after the ADD became durable");
    }
    assert_eq!(
        store.events(),
        vec![
            format!("store {id} submitted"),
            format!("store {id} durable"),
            format!("remove {id}"),
        ]
    );
}

/// An `ADD` whose files are not there yet is held while the writer is publishing it, sent
/// as an `ADD` once published, and as a `DELETE` (0 bytes of message) only when it is not
/// being published and is gone. (The race fixed in `ship`, a publication between its two
/// checks, needs a thread in between and is covered by the replication tests.)
#[tokio::test]
async fn an_add_being_published_waits_and_is_never_sent_as_a_delete() {
    let (_dir, layout, log) = state_and_log();
    let replicator = replicator(
        "a",
        Role::Active,
        layout.clone(),
        log.clone(),
        Arc::new(NoStore),
    );
    let id = spool::IdGenerator::new("a").unwrap().next_id();
    replicator.staging().mark_publishing(&[&id]);
    log.append(&[(Kind::Add, &id)], now_ms()).unwrap();
    let action = log.pending_after(0, 10).unwrap().remove(0);

    let mut batch = link::FrameBatch::default();
    assert_eq!(replicator.ship(&mut batch, &action), None);
    assert!(
        batch.is_empty(),
        "nothing is sent while the message is being published"
    );

    let body = b"Subject: x\r\n\r\nhello\r\n";
    let env = spool::Envelope::new(id.clone(), "a@example.com", &["b@example.org"], body);
    std::fs::write(layout.path(Folder::Spool, &id, Part::Body), body).unwrap();
    std::fs::write(layout.path(Folder::Spool, &id, Part::Env), env.encode()).unwrap();
    replicator.staging().mark_published(&[&id]);
    let sent = replicator.ship(&mut batch, &action);
    let mut wire = Vec::new();
    batch.write_to(&mut wire).await.unwrap();
    assert!(
        sent.is_some_and(|n| n > body.len() as u64),
        "sent as an ADD: {sent:?}"
    );
    assert!(
        wire.windows(body.len()).any(|w| w == body),
        "the ADD carries the body"
    );

    layout.remove_pair(&id, Folder::Spool).unwrap();
    assert_eq!(replicator.ship(&mut batch, &action), Some(0));
    assert!(!batch.is_empty(), "a DELETE frame is queued");
}

/// An `ADD` held in the outbox goes out from memory, once; after that (a resend) the files
/// are the source, and a `DELETE` drops what is still held for its id.
#[tokio::test]
async fn an_add_held_in_the_outbox_is_sent_from_memory_once() {
    let (_dir, layout, log) = state_and_log();
    let replicator = replicator("a", Role::Active, layout, log.clone(), Arc::new(NoStore));
    let ids = spool::IdGenerator::new("a").unwrap();
    let (held, deleted) = (ids.next_id(), ids.next_id());
    let hold = |id: &MessageId| {
        let message = outbox::HeldMessage {
            envelope: Bytes::from_static(b"envelope\n"),
            body: vec![
                Bytes::from_static(b"Received: by a\r\n"),
                Bytes::from_static(b"\r\nhello\r\n"),
            ],
        };
        assert!(replicator.staging().outbox().hold(id.clone(), message));
    };
    hold(&held);
    hold(&deleted);
    log.append(&[(Kind::Add, &held), (Kind::Delete, &deleted)], now_ms())
        .unwrap();
    let actions = log.pending_after(0, 10).unwrap();

    // No files exist: only the outbox can supply the ADD.
    let mut batch = link::FrameBatch::default();
    let sent = replicator.ship(&mut batch, &actions[0]);
    let mut wire = Vec::new();
    batch.write_to(&mut wire).await.unwrap();
    let frame = link::read_frame(&mut &wire[..]).await.unwrap();
    let proto::Frame::Add { env, body, .. } = frame else {
        panic!("expected an ADD, got {frame:?}");
    };
    assert_eq!(&env[..], b"envelope\n");
    assert_eq!(&body[..], b"Received: by a\r\n\r\nhello\r\n");
    assert_eq!(sent, Some(9 + 25));

    assert_eq!(
        replicator.ship(&mut batch, &actions[0]),
        Some(0),
        "resent without files: a DELETE, so the outbox gave it only once"
    );
    assert_eq!(replicator.ship(&mut batch, &actions[1]), Some(0));
    assert!(
        replicator.staging().outbox().is_empty(),
        "the DELETE dropped the held copy"
    );

    hold(&held);
    replicator.set_role(Role::Passive).unwrap();
    assert!(
        replicator.staging().outbox().is_empty(),
        "a passive unit holds nothing for sending"
    );
}
