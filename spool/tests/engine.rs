//! The spool engine end to end on a real file system: writer backends, recovery, insertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use spool::recovery::{insert_input, recover, InsertOutcome};
use spool::writer::{SyncMode, WriterOptions};
use spool::{
    BackendChoice, BodyParts, Envelope, Folder, IdGenerator, Layout, MappedBody, MessageId, Part,
    PendingBody, SpoolWriter,
};
use std::fs;
use std::sync::Arc;

fn envelope(id: &MessageId, body: &[u8]) -> Envelope {
    Envelope::new(id.clone(), "a@example.com", &["b@example.org"], body)
}

fn setup() -> (tempfile::TempDir, Layout, IdGenerator) {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path().join("state"));
    layout.create().unwrap();
    (dir, layout, IdGenerator::new("node_a").unwrap())
}

/// The pair of `id` is in `spool/`, its envelope decodes, and its body is exactly `body`.
fn assert_spooled_whole(layout: &Layout, id: &MessageId, body: &[u8]) {
    let env =
        Envelope::decode(&fs::read(layout.path(Folder::Spool, id, Part::Env)).unwrap()).unwrap();
    let mapped = MappedBody::open_verified(
        &layout.path(Folder::Spool, id, Part::Body),
        env.body_len,
        &env.body_sha256,
    )
    .unwrap();
    assert_eq!(mapped.bytes(), body);
}

fn body_of(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| b'a' + ((i + j) % 26) as u8).collect()
}

/// The writer runs the backend a test claims to test: io_uring works on the machines this
/// project targets (a silent fallback to the portable writer must not pass as io_uring).
fn assert_backend(writer: &SpoolWriter, asked: BackendChoice) {
    let want = match asked {
        BackendChoice::Portable => spool::Backend::Portable,
        _ => spool::Backend::IoUring,
    };
    assert_eq!(writer.backend(), want, "asked {asked:?}");
}

fn commit_many(backend: BackendChoice, sync: SyncMode, nameless: bool) {
    let (_d, layout, ids) = setup();
    let writer = Arc::new(
        SpoolWriter::start(
            layout.clone(),
            WriterOptions {
                backend,
                batch_max: 64,
                sync,
                nameless,
            },
            None,
        )
        .unwrap(),
    );
    if !nameless {
        assert!(!writer.nameless(), "named files when asked");
    }
    assert_backend(&writer, backend);
    let mut expected = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let writer = writer.clone();
                let ids = &ids;
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..50 {
                        let body = body_of(t * 100 + i, 100 + i * 37);
                        let id = ids.next_id();
                        // Split into several chunks to exercise writev.
                        let b = Bytes::from(body.clone());
                        let chunks = vec![b.slice(..body.len() / 3), b.slice(body.len() / 3..)];
                        let env = envelope(&id, &body).encode();
                        writer
                            .commit_blocking(
                                id.clone(),
                                env,
                                BodyParts {
                                    spilled: None,
                                    chunks,
                                },
                            )
                            .unwrap();
                        mine.push((id, body));
                    }
                    mine
                })
            })
            .collect();
        for h in handles {
            expected.extend(h.join().unwrap());
        }
    });
    for (id, body) in &expected {
        assert_spooled_whole(&layout, id, body);
    }
    assert_eq!(fs::read_dir(layout.dir(Folder::Tmp)).unwrap().count(), 0);
    assert_eq!(
        fs::read_dir(layout.dir(Folder::Spool)).unwrap().count(),
        800
    );
    let report = recover(&layout).unwrap();
    assert_eq!(report.found.len(), 400);
    assert!(report.corrupt.is_empty());
}

#[test]
fn io_uring_writer_commits_concurrent_messages_whole() {
    commit_many(BackendChoice::Auto, SyncMode::PerFile, true);
}

#[test]
fn portable_writer_commits_concurrent_messages_whole() {
    commit_many(BackendChoice::Portable, SyncMode::PerFile, true);
}

#[test]
fn named_tmp_files_and_rename_commit_concurrent_messages_whole() {
    commit_many(BackendChoice::Auto, SyncMode::PerFile, false);
    commit_many(BackendChoice::Portable, SyncMode::PerFile, false);
}

#[test]
fn syncfs_rounds_commit_concurrent_messages_whole() {
    commit_many(BackendChoice::Auto, SyncMode::FileSystem, true);
    commit_many(BackendChoice::Portable, SyncMode::FileSystem, true);
}

#[test]
fn spilled_bodies_are_committed_whole() {
    let (_d, layout, ids) = setup();
    for choice in [BackendChoice::Auto, BackendChoice::Portable] {
        let writer = SpoolWriter::start(
            layout.clone(),
            WriterOptions {
                backend: choice,
                batch_max: 8,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_backend(&writer, choice);
        let id = ids.next_id();
        let mut pending = PendingBody::new(layout.clone(), id.clone(), 1000);
        let mut all = Vec::new();
        for i in 0..100 {
            let chunk = body_of(i, 333);
            all.extend_from_slice(&chunk);
            pending.push(Bytes::from(chunk)).unwrap();
        }
        assert!(
            layout.path(Folder::Tmp, &id, Part::Body).exists(),
            "spilled to tmp/"
        );
        let (parts, len, sha) = pending.finish();
        let mut env = envelope(&id, &all);
        assert_eq!((len, sha), (env.body_len, env.body_sha256));
        env.body_len = len;
        writer
            .commit_blocking(id.clone(), env.encode(), parts)
            .unwrap();
        assert_eq!(
            fs::read(layout.path(Folder::Spool, &id, Part::Body)).unwrap(),
            all
        );
        writer.shutdown();
    }
}

/// A milter's header change rewrites the head of a body in memory or spilled (then the rest
/// follows in the new file, and a chunk that came after the change is kept too); the length and
/// SHA-256 the envelope gets are those of the bytes committed.
#[test]
fn a_changed_head_is_committed_with_the_rest_of_the_body() {
    let (_d, layout, ids) = setup();
    let writer = SpoolWriter::start(layout.clone(), WriterOptions::default(), None).unwrap();
    for (chunks, spill) in [(3, 100_000), (100, 1000)] {
        let id = ids.next_id();
        let mut pending = PendingBody::new(layout.clone(), id.clone(), spill);
        let mut all = b"Subject: x\r\n\r\n".to_vec();
        pending.push(Bytes::from(all.clone())).unwrap();
        for i in 0..chunks {
            let chunk = body_of(i, 333);
            all.extend_from_slice(&chunk);
            pending.push(Bytes::from(chunk)).unwrap();
        }
        pending
            .replace_head(12, |head| {
                assert_eq!(head, b"Subject: x\r\n");
                b"X-Spam: no\r\nSubject: x\r\n".to_vec()
            })
            .unwrap();
        pending.push(Bytes::from_static(b"tail\r\n")).unwrap();
        let mut expected = b"X-Spam: no\r\n".to_vec();
        expected.extend_from_slice(&all);
        expected.extend_from_slice(b"tail\r\n");
        let (parts, len, sha) = pending.finish();
        let env = envelope(&id, &expected);
        assert_eq!(
            (len, sha),
            (env.body_len, env.body_sha256),
            "{chunks} chunks"
        );
        writer
            .commit_blocking(id.clone(), env.encode(), parts)
            .unwrap();
        assert_eq!(
            fs::read(layout.path(Folder::Spool, &id, Part::Body)).unwrap(),
            expected,
            "{chunks} chunks"
        );
    }
    writer.shutdown();
}

#[test]
fn recovery_handles_every_partial_state() {
    let (_d, layout, ids) = setup();
    let writer = SpoolWriter::start(layout.clone(), WriterOptions::default(), None).unwrap();
    let mut committed = Vec::new();
    for i in 0..6 {
        let id = ids.next_id();
        let body = body_of(i, 500);
        let env = envelope(&id, &body).encode();
        writer
            .commit_blocking(
                id.clone(),
                env,
                BodyParts {
                    spilled: None,
                    chunks: vec![body.into()],
                },
            )
            .unwrap();
        committed.push(id);
    }
    writer.shutdown();
    // 0: left alone. 1: torn envelope. 2: body missing length. 3: interrupted move to vscan/
    // (body already there, envelope still in spool/). 4: orphan body. 5: foreign envelope.
    // Recovery reads no envelope: 1, 2 and 5 are found (the queue manager sets them aside when
    // it reads them); what file names tell is repaired here.
    let env_path = |id: &MessageId| layout.path(Folder::Spool, id, Part::Env);
    let env1 = fs::read(env_path(&committed[1])).unwrap();
    fs::write(env_path(&committed[1]), &env1[..env1.len() - 5]).unwrap();
    let body2 = layout.path(Folder::Spool, &committed[2], Part::Body);
    fs::write(&body2, b"short").unwrap();
    fs::rename(
        layout.path(Folder::Spool, &committed[3], Part::Body),
        layout.path(Folder::Vscan, &committed[3], Part::Body),
    )
    .unwrap();
    fs::remove_file(env_path(&committed[4])).unwrap();
    fs::write(
        env_path(&committed[5]),
        b"From: x\r\n\r\nnot an envelope\r\n",
    )
    .unwrap();
    fs::write(layout.dir(Folder::Tmp).join("junk.body"), b"x").unwrap();
    // An envelope without its body, in hold/; a pair and a lone body whose names are no id.
    let lone = ids.next_id();
    fs::write(
        layout.path(Folder::Hold, &lone, Part::Env),
        envelope(&lone, b"x").encode(),
    )
    .unwrap();
    fs::write(layout.dir(Folder::Spool).join("copy.env"), b"x").unwrap();
    fs::write(layout.dir(Folder::Spool).join("copy.body"), b"x").unwrap();
    fs::write(layout.dir(Folder::Spool).join("stray.body"), b"x").unwrap();

    let report = recover(&layout).unwrap();
    let found: Vec<(&MessageId, Folder)> = report.found.iter().map(|m| (&m.id, m.folder)).collect();
    let in_spool = |i: usize| (&committed[i], Folder::Spool);
    assert_eq!(
        found,
        vec![
            in_spool(0),
            in_spool(1),
            in_spool(2),
            in_spool(3),
            in_spool(5)
        ]
    );
    assert!(layout
        .path(Folder::Spool, &committed[3], Part::Body)
        .exists());
    assert_eq!(report.tmp_removed, 1);
    assert_eq!(report.orphans_removed, 2);
    assert_eq!(report.reunited, 1);
    let corrupt: Vec<(String, Folder, String)> = report
        .corrupt
        .iter()
        .map(|c| (c.name.clone(), c.folder, c.reason.clone()))
        .collect();
    assert_eq!(
        corrupt,
        vec![
            (
                "copy".to_string(),
                Folder::Spool,
                "file name is not a message id".to_string()
            ),
            (lone.to_string(), Folder::Hold, "body missing".to_string()),
        ]
    );
    for name in ["copy.env", "copy.body", "copy.reason"] {
        assert!(layout.dir(Folder::Corrupt).join(name).exists(), "{name}");
    }
    assert!(layout
        .dir(Folder::Corrupt)
        .join(format!("{lone}.reason"))
        .exists());
    assert!(!layout
        .path(Folder::Spool, &committed[4], Part::Body)
        .exists());
    assert!(!layout.dir(Folder::Spool).join("stray.body").exists());
    // Idempotent.
    let again = recover(&layout).unwrap();
    assert_eq!(again.found.len(), 5);
    assert!(again.corrupt.is_empty() && again.orphans_removed == 0 && again.reunited == 0);
}

#[test]
fn input_insertion_validates_and_dedups() {
    let (_d, layout, ids) = setup();
    let put = |folder: Folder, id: &MessageId, body: &[u8], env: &Envelope| {
        fs::write(layout.path(folder, id, Part::Body), body).unwrap();
        fs::write(layout.path(folder, id, Part::Env), env.encode()).unwrap();
    };
    let good = ids.next_id();
    put(
        Folder::Input,
        &good,
        b"hello\r\n",
        &envelope(&good, b"hello\r\n"),
    );
    let bad_sum = ids.next_id();
    put(
        Folder::Input,
        &bad_sum,
        b"tampered\r\n",
        &envelope(&bad_sum, b"original\r\n"),
    );
    let dup = ids.next_id();
    put(
        Folder::Spool,
        &dup,
        b"same\r\n",
        &envelope(&dup, b"same\r\n"),
    );
    put(
        Folder::Input,
        &dup,
        b"same\r\n",
        &envelope(&dup, b"same\r\n"),
    );
    let half = ids.next_id();
    fs::write(layout.path(Folder::Input, &half, Part::Body), b"copying").unwrap();

    let out = insert_input(&layout).unwrap();
    assert!(out.contains(&InsertOutcome::Inserted(good.clone())));
    assert!(out.contains(&InsertOutcome::Duplicate(dup.clone())));
    assert!(out
        .iter()
        .any(|o| matches!(o, InsertOutcome::Corrupt { name, reason } if *name == bad_sum.to_string() && reason.contains("checksum"))));
    assert_eq!(out.len(), 3);
    assert!(layout.path(Folder::Spool, &good, Part::Env).exists());
    assert!(!layout.path(Folder::Input, &dup, Part::Env).exists());
    assert!(layout.path(Folder::Corrupt, &bad_sum, Part::Body).exists());
    assert!(
        layout.path(Folder::Input, &half, Part::Body).exists(),
        "half-copied pair left alone"
    );
}

#[test]
fn removed_files_are_recycled_for_new_mail_and_hold_only_its_bytes() {
    let (_d, layout, ids) = setup();
    layout.set_recycling(8);
    let writer = SpoolWriter::start(layout.clone(), WriterOptions::default(), None).unwrap();
    let commit = |i: usize, len: usize| {
        let id = ids.next_id();
        let body = body_of(i, len);
        writer
            .commit_blocking(
                id.clone(),
                envelope(&id, &body).encode(),
                BodyParts {
                    spilled: None,
                    chunks: vec![Bytes::from(body.clone())],
                },
            )
            .unwrap();
        (id, body)
    };
    // Large old messages, then small new ones: the reused files must hold only the new bytes.
    let old: Vec<_> = (0..6).map(|i| commit(i, 5000)).collect();
    for (id, _) in &old {
        layout.remove_pair(id, Folder::Spool).unwrap();
        assert!(!layout.path(Folder::Spool, id, Part::Env).exists());
    }
    assert_eq!(layout.recycled(), 8, "the pool keeps at most its maximum");
    assert_eq!(fs::read_dir(layout.dir(Folder::Tmp)).unwrap().count(), 8);
    let new: Vec<_> = (0..5).map(|i| commit(100 + i, 70)).collect();
    assert!(layout.recycled() < 8, "new mail took recycled files");
    for (id, body) in &new {
        assert_spooled_whole(&layout, id, body);
    }
    writer.shutdown();
    let report = recover(&layout).unwrap();
    assert_eq!(report.found.len(), 5);
    assert_eq!(
        fs::read_dir(layout.dir(Folder::Tmp)).unwrap().count(),
        0,
        "recovery empties the pool"
    );
}

/// Files are reused by overwriting their old bytes in place (not emptied first): new mail of
/// the same size, of a larger size and of a smaller one each holds exactly its own bytes.
#[test]
fn recycled_files_overwritten_in_place_hold_exactly_the_new_bytes() {
    let (_d, layout, ids) = setup();
    layout.set_recycling(64);
    let writer = SpoolWriter::start(layout.clone(), WriterOptions::default(), None).unwrap();
    let commit = |i: usize, len: usize| {
        let id = ids.next_id();
        let body = body_of(i, len);
        let parts = BodyParts {
            spilled: None,
            chunks: vec![Bytes::from(body.clone())],
        };
        writer
            .commit_blocking(id.clone(), envelope(&id, &body).encode(), parts)
            .unwrap();
        (id, body)
    };
    for (round, len) in [(0, 4096), (1, 4096), (2, 9000), (3, 100), (4, 4096)] {
        let spooled: Vec<_> = (0..8).map(|i| commit(round * 100 + i, len)).collect();
        for (id, body) in &spooled {
            assert_spooled_whole(&layout, id, body);
        }
        for (id, _) in &spooled {
            layout.remove_pair(id, Folder::Spool).unwrap();
        }
    }
    writer.shutdown();
}

/// An envelope read just as its message was removed and the file reused for another message
/// is "gone", never the other message's envelope under this one's id.
#[test]
fn an_envelope_file_that_names_another_message_is_invalid_and_a_removed_one_is_gone() {
    // A reader that opened a file just before it was recycled for another message reads that
    // message's envelope; by then the name is gone, and a second look says NotFound. A name
    // that still holds another message's envelope is a wrong copy: InvalidData, which the
    // queue manager sets aside.
    let (_d, layout, ids) = setup();
    let (a, b) = (ids.next_id(), ids.next_id());
    let path = layout.path(Folder::Spool, &a, Part::Env);
    fs::write(&path, envelope(&b, b"x").encode()).unwrap();
    let err = layout.read_envelope(Folder::Spool, &a).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains(&b.to_string()), "{err}");
    fs::write(&path, b"From: x\r\n\r\nnot an envelope\r\n").unwrap();
    let err = layout.read_envelope(Folder::Spool, &a).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    fs::write(&path, envelope(&a, b"x").encode()).unwrap();
    assert_eq!(layout.read_envelope(Folder::Spool, &a).unwrap().id, a);
    fs::remove_file(&path).unwrap();
    let err = layout.read_envelope(Folder::Spool, &a).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
}

/// Panics on the writer thread, in the middle of a round.
struct PanickingHook;

impl spool::writer::PublishHook for PanickingHook {
    fn before_publish(&self, _ids: &[&MessageId]) -> std::io::Result<Vec<u64>> {
        panic!("hook panics on the writer thread");
    }
}

/// Fail-stop: a panic on the writer thread ends the whole process with SIGABRT (so that
/// systemd restarts it and recovery runs) instead of leaving every waiter hanging. Runs the
/// scenario in a child process: this test binary again, filtered to this test.
#[test]
fn a_panic_on_the_writer_thread_aborts_the_process() {
    const CHILD: &str = "SPOOL_TEST_WRITER_PANIC_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let (_d, layout, ids) = setup();
        let writer = SpoolWriter::start_with_hook(
            layout,
            WriterOptions::default(),
            None,
            Some(Arc::new(PanickingHook)),
        )
        .unwrap();
        let id = ids.next_id();
        let result = writer.commit_blocking(
            id.clone(),
            envelope(&id, b"x\r\n").encode(),
            BodyParts {
                spilled: None,
                chunks: vec![Bytes::from_static(b"x\r\n")],
            },
        );
        // The round's waiters see `Closed` as the panic unwinds, a moment before the abort
        // (the daemon answers them 451); give the abort that moment.
        std::thread::sleep(std::time::Duration::from_secs(10));
        println!("writer survived its panic: {result:?}");
        std::process::exit(0);
    }
    use std::os::unix::process::ExitStatusExt;
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_panic_on_the_writer_thread_aborts_the_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert_eq!(
        child.status.signal(),
        Some(libc::SIGABRT),
        "child ended with {:?}; stdout: {}; stderr: {stderr}",
        child.status,
        String::from_utf8_lossy(&child.stdout)
    );
    assert!(
        stderr.contains("hook panics on the writer thread"),
        "{stderr}"
    );
}

/// What the hook saw of one message: id, durable, envelope, body, both files in `spool/`.
type SeenMessage = (MessageId, bool, Vec<u8>, Vec<u8>, bool);

/// Records what the writer tells its publish hook after each round.
#[derive(Default)]
struct RecordingHook {
    seen: std::sync::Mutex<Vec<SeenMessage>>,
    layout: std::sync::OnceLock<Layout>,
}

impl spool::writer::PublishHook for RecordingHook {
    fn before_publish(&self, ids: &[&MessageId]) -> std::io::Result<Vec<u64>> {
        Ok((1..=ids.len() as u64).collect())
    }
    fn after_publish(&self, messages: &[spool::writer::Published<'_>]) {
        let layout = self.layout.get().unwrap();
        for m in messages {
            let body: Vec<u8> = m.body.chunks.iter().flat_map(|c| c.to_vec()).collect();
            let in_spool = layout.path(Folder::Spool, m.id, Part::Env).exists()
                && layout.path(Folder::Spool, m.id, Part::Body).exists();
            let seen = (m.id.clone(), m.durable, m.envelope.to_vec(), body, in_spool);
            self.seen.lock().unwrap().push(seen);
        }
    }
}

/// The hook hears of each published message once it is in `spool/`, with the envelope and the
/// body exactly as written (replication sends them from there, not from the files).
#[test]
fn the_publish_hook_gets_each_published_message_with_its_contents() {
    let (_d, layout, ids) = setup();
    let hook = Arc::new(RecordingHook::default());
    hook.layout.set(layout.clone()).unwrap();
    let writer = SpoolWriter::start_with_hook(
        layout.clone(),
        WriterOptions::default(),
        None,
        Some(hook.clone()),
    )
    .unwrap();
    let id = ids.next_id();
    let env = envelope(&id, b"Received: x\r\n\r\nbody\r\n").encode();
    let chunks = ["Received: x\r\n", "\r\nbody\r\n"].map(|s| Bytes::from_static(s.as_bytes()));
    let body = BodyParts {
        spilled: None,
        chunks: chunks.to_vec(),
    };
    let receipt = writer
        .commit_blocking(id.clone(), env.clone(), body)
        .unwrap();
    assert_eq!(receipt.log_seq, Some(1));
    writer.shutdown();
    let seen = hook.seen.lock().unwrap().clone();
    let expected = (id, true, env, b"Received: x\r\n\r\nbody\r\n".to_vec(), true);
    assert_eq!(seen, vec![expected]);
}

/// Regression: a removed message's files are recycled, shortened and rewritten in place for new
/// mail; a reader still mapping the old body (a replication sender, a delivery's DSN, the
/// archive) then touched pages past the new end of file and the process died of SIGBUS, without
/// a line in its log. A mapped file is not reused while it is mapped.
#[test]
fn a_body_still_mapped_is_not_recycled_under_its_reader() {
    for backend in [BackendChoice::Portable, BackendChoice::Auto] {
        let (_d, layout, ids) = setup();
        layout.set_recycling(16);
        let writer = SpoolWriter::start(
            layout.clone(),
            WriterOptions {
                backend,
                batch_max: 64,
                sync: SyncMode::PerFile,
                nameless: true,
            },
            None,
        )
        .unwrap();
        let commit = |body: &[u8]| {
            let id = ids.next_id();
            let env = envelope(&id, body).encode();
            let parts = BodyParts {
                spilled: None,
                chunks: vec![Bytes::from(body.to_vec())],
            };
            writer.commit_blocking(id.clone(), env, parts).unwrap();
            id
        };
        // Past the size that is read rather than mapped.
        let mapped_len = 2 * spool::body::READ_BYTES_MAX;
        let old_body = body_of(7, mapped_len as usize);
        let old = commit(&old_body);
        let mapped =
            MappedBody::open(&layout.path(Folder::Spool, &old, Part::Body), mapped_len).unwrap();
        layout.remove_pair(&old, Folder::Spool).unwrap();
        assert_eq!(layout.recycled(), 2, "both files kept for reuse");
        // New mail, shorter: it takes recycled files (but not the one still mapped).
        for i in 0..4 {
            let body = body_of(100 + i, 10);
            let id = commit(&body);
            assert_spooled_whole(&layout, &id, &body);
        }
        assert_eq!(
            mapped.bytes(),
            &old_body[..],
            "{backend:?}: the mapping reads the old body"
        );
        drop(mapped);
        // Unmapped, it is reused like any other.
        let id = commit(&body_of(200, 10));
        assert_spooled_whole(&layout, &id, &body_of(200, 10));
        assert_eq!(layout.recycled(), 0, "{backend:?}");
        // A small body is read, not mapped: its copy holds nothing back, and new mail written
        // over its recycled file leaves the copy as it was.
        let small_body = body_of(300, 4096);
        let small = commit(&small_body);
        let copy = MappedBody::open(&layout.path(Folder::Spool, &small, Part::Body), 4096).unwrap();
        layout.remove_pair(&small, Folder::Spool).unwrap();
        assert_eq!(layout.recycled(), 2, "{backend:?}");
        let id = commit(&body_of(301, 4000));
        assert_spooled_whole(&layout, &id, &body_of(301, 4000));
        assert_eq!(
            layout.recycled(),
            0,
            "{backend:?}: the read body's file was reused"
        );
        assert_eq!(copy.bytes(), &small_body[..], "{backend:?}");
    }
}
