//! The archive alone: storing, dedup, exact retrieval of awkward mail, search, torn tails,
//! retention with holds, compaction, and mirroring between two archives over a real link.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use std::time::Duration;

use crate::corpus::{awkward, PLAIN};

pub(crate) fn incoming(id: &str, raw: &[u8], rcpt: &str) -> Incoming {
    Incoming {
        id: id.into(),
        origin: "a".into(),
        arrived_ms: now_ms(),
        client: "127.0.0.1".into(),
        sender: "alice@example.com".into(),
        recipients: vec![rcpt.into()],
        verdict: "clean".into(),
        hash: Sha256::digest(raw).into(),
    }
}

/// Options for a test archive in `dir`: no free-space floor, the index's smallest heap, and no
/// wait after creating a manifest (the in-memory store honours `If-None-Match`).
pub(crate) fn options(dir: &std::path::Path) -> Options {
    let mut o = Options::new(dir.to_path_buf());
    o.free_bytes_min = 0;
    o.index_heap_bytes = 15 << 20;
    o.claim_settle = Duration::ZERO;
    o
}

fn open(dir: &std::path::Path) -> Archive {
    Archive::open(&options(dir)).unwrap()
}

#[test]
fn awkward_mail_comes_back_byte_exact_and_is_searchable() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let mut seqs = Vec::new();
    for (i, (what, raw)) in awkward().into_iter().enumerate() {
        let s = a
            .archive(incoming(&format!("a-{i}"), &raw, "bob@example.net"), &raw)
            .unwrap();
        assert!(s.new, "{what}");
        seqs.push((s.seq, raw));
    }
    for (seq, raw) in &seqs {
        assert_eq!(&a.raw(*seq).unwrap().1, raw);
    }
    a.flush_index().unwrap();
    let hits = |q: &str| -> Vec<u64> {
        a.search(q, 10)
            .unwrap()
            .items
            .iter()
            .map(|i| i.item.seq)
            .collect()
    };
    assert_eq!(hits("subject:quarterly"), vec![seqs[0].0]);
    assert_eq!(
        hits("from:alice@example.com").len(),
        seqs.len(),
        "envelope sender of all"
    );
    assert_eq!(hits("from:carol"), vec![seqs[3].0]);
    assert_eq!(
        hits("zebrafish"),
        vec![seqs[3].0],
        "HTML part reduced to text"
    );
    assert_eq!(
        hits("pangolin"),
        vec![seqs[3].0],
        "quoted-printable text attachment"
    );
    assert_eq!(hits("filename:invoice-2026.pdf"), vec![seqs[3].0]);
    assert_eq!(hits("has:attachment"), vec![seqs[3].0]);
    assert_eq!(hits("msgid:<inv-7@example.org>"), vec![seqs[3].0]);
    assert_eq!(hits("Grüße"), vec![seqs[1].0], "8-bit subject");
    assert_eq!(hits("size:>15k"), vec![seqs[2].0]);
    assert_eq!(hits("\"revenue grew\""), vec![seqs[0].0]);
    assert_eq!(
        hits("\"grew revenue\""),
        Vec::<u64>::new(),
        "a phrase keeps its order"
    );
    assert_eq!(hits("to:dave subject:invoice"), vec![seqs[3].0]);
    assert_eq!(
        hits("to:dave subject:quarterly"),
        Vec::<u64>::new(),
        "AND by default"
    );
    assert!(hits("after:2000-01-01").len() == seqs.len());
    assert!(hits("before:2000-01-01").is_empty());
    assert!(matches!(
        a.search("colour:red", 10),
        Err(ArchiveError::Query(_))
    ));
}

#[test]
fn each_hit_names_the_fields_the_query_matched_it_in() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let mails = [
        // 1: the word in the subject only
        "From: carol@example.org\r\nSubject: otter report\r\nMessage-ID: <m1@x>\r\n\r\nnothing\r\n",
        // 2: in the body only
        "From: carol@example.org\r\nSubject: weekly\r\nMessage-ID: <m2@x>\r\n\r\nan otter swam\r\n",
        // 3: in the subject, the body and an attachment's name
        concat!(
            "From: dave@example.org\r\nSubject: otter photos\r\nMessage-ID: <m3@x>\r\n",
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n",
            "--b\r\nContent-Type: text/plain\r\n\r\nsee the otter\r\n",
            "--b\r\nContent-Type: image/png\r\nContent-Disposition: attachment; filename=otter.png\r\n",
            "Content-Transfer-Encoding: base64\r\n\r\niVBORw0K\r\n--b--\r\n"
        ),
        // 4: no otter at all
        "From: carol@example.org\r\nSubject: badger\r\nMessage-ID: <m4@x>\r\n\r\nbadger\r\n",
    ];
    let mut seqs = Vec::new();
    for (i, raw) in mails.iter().enumerate() {
        let s = a
            .archive(
                incoming(&format!("a-{i}"), raw.as_bytes(), "bob@example.net"),
                raw.as_bytes(),
            )
            .unwrap();
        seqs.push(s.seq);
    }
    a.flush_index().unwrap();
    let matched = |q: &str| -> Vec<(u64, Vec<&'static str>)> {
        let mut v: Vec<_> = a
            .search(q, 10)
            .unwrap()
            .items
            .into_iter()
            .map(|h| (h.item.seq, h.matched))
            .collect();
        v.sort();
        v
    };
    type Matches = Vec<(u64, Vec<&'static str>)>;
    let table: [(&str, Matches); 5] = [
        (
            "otter",
            vec![
                (seqs[0], vec!["subject"]),
                (seqs[1], vec!["body"]),
                (seqs[2], vec!["subject", "body", "filename"]),
            ],
        ),
        (
            "otter from:carol",
            vec![
                (seqs[0], vec!["subject", "from"]),
                (seqs[1], vec!["body", "from"]),
            ],
        ),
        ("msgid:<m4@x>", vec![(seqs[3], vec!["msgid"])]),
        ("m2@x", vec![(seqs[1], vec!["msgid"])]),
        (
            "has:attachment size:>10",
            vec![(seqs[2], vec!["has", "size"])],
        ),
    ];
    for (q, want) in table {
        assert_eq!(matched(q), want, "{q}");
    }
}

#[test]
fn a_search_stops_at_the_newest_matches_and_counts_exactly_when_it_searched_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(dir.path());
    a.set_first_window(64);
    for i in 0..300 {
        let raw = format!(
            "Subject: window {i}{}\r\n\r\nbody\r\n",
            if i == 3 { " rare" } else { "" }
        );
        a.archive(
            incoming(&format!("a-{i}"), raw.as_bytes(), "b@x"),
            raw.as_bytes(),
        )
        .unwrap();
    }
    a.flush_index().unwrap();
    let r = a.search("subject:window", 10).unwrap();
    let seqs: Vec<u64> = r.items.iter().map(|i| i.item.seq).collect();
    assert_eq!(
        seqs,
        (291..=300).rev().collect::<Vec<u64>>(),
        "the newest ten"
    );
    assert_eq!(
        (r.total, r.total_exact),
        (64, false),
        "counted in the first window only"
    );
    let all = a.search("subject:window", 1000).unwrap();
    assert_eq!(
        (all.items.len(), all.total, all.total_exact),
        (300, 300, true)
    );
    let rare = a.search("subject:rare", 10).unwrap();
    assert_eq!(
        (rare.items.len(), rare.items[0].item.seq, rare.total_exact),
        (1, 4, true),
        "found by widening"
    );
    assert_eq!(a.search_all("subject:window").unwrap().len(), 300);
}

#[test]
fn the_same_message_is_stored_once_and_bodies_are_shared() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let first = a
        .archive(incoming("a-1", PLAIN, "bob@example.net"), PLAIN)
        .unwrap();
    let again = a
        .archive(incoming("b-9", PLAIN, "bob@example.net"), PLAIN)
        .unwrap();
    assert_eq!(
        again,
        Stored {
            seq: first.seq,
            new: false
        }
    );
    let other_rcpt = a
        .archive(incoming("a-2", PLAIN, "carol@example.net"), PLAIN)
        .unwrap();
    assert!(other_rcpt.new);
    let t = a.status().unwrap().totals;
    assert_eq!(t.items, 2);
    assert_eq!(t.raw_bytes, 2 * PLAIN.len() as u64);
    assert_eq!(
        record_kinds(&dir.path().join("segments/00000001.seg")),
        ["genesis", "body", "stored", "stored"],
        "the chain's start, one body record for both items, and an entry of each item"
    );
    assert!(matches!(
        a.archive(incoming("a-3", b"other bytes", "x@y"), PLAIN),
        Err(ArchiveError::HashMismatch)
    ));
}

/// The kinds of the records in a segment file, in order.
fn record_kinds(path: &std::path::Path) -> Vec<&'static str> {
    records(path).into_iter().map(|r| r.0).collect()
}

/// The bytes of body frames in the archive's segment files.
fn body_bytes(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .flat_map(|e| records(&e.unwrap().path()))
        .filter(|r| r.0 == "body")
        .map(|r| r.2)
        .sum()
}

/// The records in a segment file, in order: kind, offset, frame length.
pub(crate) fn records(path: &std::path::Path) -> Vec<(&'static str, usize, usize)> {
    let data = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut kinds = Vec::new();
    while at < data.len() {
        let (r, len) = crate::record::next(&data[at..]).unwrap();
        let kind = match r {
            crate::record::Record::Body(..) => "body",
            crate::record::Record::Item(..) => "item",
            crate::record::Record::Removed(_) => "removed",
            crate::record::Record::Entry(e) => match e.event {
                crate::chain::Event::Genesis { .. } => "genesis",
                crate::chain::Event::Item { why, .. } => why.name(),
                crate::chain::Event::Removed(_) => "tombstone",
                crate::chain::Event::Signer { .. } => "signer",
                crate::chain::Event::Key { .. } => "key",
            },
            crate::record::Record::Copied(_) => "copied",
            crate::record::Record::Sealed(_) => "sealed",
        };
        kinds.push((kind, at, len));
        at += len;
    }
    kinds
}

#[test]
fn a_torn_tail_is_cut_and_committed_items_survive() {
    let dir = tempfile::tempdir().unwrap();
    {
        let a = open(dir.path());
        a.archive(incoming("a-1", PLAIN, "bob@example.net"), PLAIN)
            .unwrap();
    }
    // A crash mid-write leaves bytes past the committed length.
    let seg = dir.path().join("segments/00000001.seg");
    let len = std::fs::metadata(&seg).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, b"SPAB\0\0\x10\0torn").unwrap();
    drop(f);
    let a = open(dir.path());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len, "tail cut");
    assert_eq!(a.raw(1).unwrap().1, PLAIN);
    let s = a
        .archive(incoming("a-2", b"next", "bob@example.net"), b"next")
        .unwrap();
    assert_eq!(a.raw(s.seq).unwrap().1, b"next");
}

#[test]
fn a_damaged_record_is_refused_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    a.archive(incoming("a-1", PLAIN, "bob@example.net"), PLAIN)
        .unwrap();
    let seg = dir.path().join("segments/00000001.seg");
    let body_at = records(&seg).iter().find(|r| r.0 == "body").unwrap().1;
    let mut bytes = std::fs::read(&seg).unwrap();
    // A byte of the body's compressed bytes.
    bytes[body_at + crate::record::FRAME_HEAD + 40] ^= 0x55;
    std::fs::write(&seg, bytes).unwrap();
    let e = a.raw(1).unwrap_err();
    assert!(matches!(e, ArchiveError::Corrupt(_)), "{e}");
    let v = a.verify(|_, _| {}).unwrap();
    assert_eq!((v.items, v.ok, v.bad.len(), v.index_entries), (1, 0, 1, 1));
}

#[test]
fn retention_removes_expired_items_keeps_held_ones_and_compaction_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Options::new(dir.path().to_path_buf());
    o.free_bytes_min = 0;
    o.index_heap_bytes = 15 << 20;
    o.segment_bytes_max = 4096;
    let a = Archive::open(&o).unwrap();
    let mut seqs = Vec::new();
    for i in 0..40u32 {
        // Incompressible bodies, so segments fill.
        let raw: Vec<u8> = (0..600u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i * 7919) >> 13) as u8)
            .collect();
        let mut m = incoming(&format!("a-{i}"), &raw, "bob@example.net");
        m.arrived_ms = 1_000 + u64::from(i); // long ago
        seqs.push(a.archive(m, &raw).unwrap().seq);
    }
    let before = a.status().unwrap().totals;
    assert!(before.segments > 3, "{before:?}");
    assert_eq!(a.hold(&seqs[..5], true).unwrap(), 5);
    a.flush_index().unwrap();
    assert_eq!(a.search("from:alice", 100).unwrap().items.len(), 40);
    let mut seen = 0;
    let removed = a.expire(Duration::from_secs(86_400), |n| seen = n).unwrap();
    assert_eq!((removed, seen), (35, 35));
    a.flush_index().unwrap();
    let left: Vec<u64> = a
        .search("from:alice", 100)
        .unwrap()
        .items
        .iter()
        .map(|i| i.item.seq)
        .collect();
    assert_eq!(left.len(), 5);
    assert!(left.iter().all(|s| seqs[..5].contains(s)));
    let bodies_before = body_bytes(dir.path());
    let report = a.compact(50).unwrap();
    assert!(report.segments >= 3 && report.bytes_freed > 0, "{report:?}");
    let after = a.status().unwrap().totals;
    assert!(
        after.stored_bytes < before.stored_bytes,
        "{before:?} → {after:?}"
    );
    // The bodies of removed items are gone; the chain's entries (and the tombstones) stay.
    assert!(
        body_bytes(dir.path()) < bodies_before / 3,
        "{bodies_before} → {}",
        body_bytes(dir.path())
    );
    for s in &seqs[..5] {
        assert_eq!(
            a.raw(*s).unwrap().0.seq,
            *s,
            "held items readable after compaction"
        );
    }
    // Released, they go at the next pass.
    a.hold(&seqs[..5], false).unwrap();
    assert_eq!(a.expire(Duration::from_secs(86_400), |_| {}).unwrap(), 5);
    drop(a);
    let a = Archive::open(&o).unwrap();
    assert_eq!(a.status().unwrap().totals.items, 0);
}

#[test]
fn an_index_lost_in_a_crash_is_rebuilt_from_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    {
        let a = open(dir.path());
        for i in 0..20 {
            let raw = format!("Subject: number{i}\r\n\r\nbody\r\n");
            a.archive(
                incoming(&format!("a-{i}"), raw.as_bytes(), "b@x"),
                raw.as_bytes(),
            )
            .unwrap();
        }
        // No flush: the index may hold none of them.
    }
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let a = open(dir.path());
    a.flush_index().unwrap();
    assert_eq!(a.search("subject:number7", 10).unwrap().items.len(), 1);
    assert_eq!(a.status().unwrap().indexed_through, 20);
    let mut last = (0, 0);
    a.reindex(|d, t| last = (d, t)).unwrap();
    assert_eq!(last, (20, 20));
    assert_eq!(a.search("subject:number19", 10).unwrap().items.len(), 1);
}

fn link(node: &str, secret: &[u8]) -> peer::link::LinkConfig {
    peer::link::LinkConfig::self_signed(node, secret, 100).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_copies_local_items_once_and_a_wrong_secret_copies_nothing() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Arc::new(open(da.path()));
    let b = Arc::new(open(db.path()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(mirror::ReceiverStats::default());
    tokio::spawn(mirror::receive(
        b.clone(),
        listener,
        link("b", b"0123456789abcdef"),
        received.clone(),
    ));
    for i in 0..150 {
        let raw = format!("Subject: mirrored{i}\r\n\r\nbody {i}\r\n");
        a.archive(
            incoming(&format!("a-{i}"), raw.as_bytes(), "b@x"),
            raw.as_bytes(),
        )
        .unwrap();
    }
    // Also on b already: stored once there.
    b.archive(
        incoming("a-0", b"Subject: mirrored0\r\n\r\nbody 0\r\n", "b@x"),
        b"Subject: mirrored0\r\n\r\nbody 0\r\n",
    )
    .unwrap();

    let wrong = Arc::new(mirror::PeerStats::default());
    let bad = tokio::spawn(mirror::copy_to(
        a.clone(),
        addr,
        link("a", b"not-the-secret!!"),
        wrong.clone(),
        Arc::default(),
        Vec::new(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    bad.abort();
    assert!(wrong.auth_failures.load(Ordering::Relaxed) >= 1);
    assert_eq!(wrong.sent.load(Ordering::Relaxed), 0);
    assert_eq!(
        b.status().unwrap().totals.items,
        1,
        "nothing mirrored with a wrong secret"
    );
    assert!(received.auth_failures.load(Ordering::Relaxed) >= 1);

    let stats = Arc::new(mirror::PeerStats::default());
    tokio::spawn(mirror::copy_to(
        a.clone(),
        addr,
        link("a", b"0123456789abcdef"),
        stats.clone(),
        Arc::default(),
        Vec::new(),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while stats.sent.load(Ordering::Relaxed) < 150 {
        assert!(
            std::time::Instant::now() < deadline,
            "mirror stalled at {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.status().unwrap().totals.items, 150);
    assert_eq!(received.duplicates.load(Ordering::Relaxed), 1);
    let bb = b.clone();
    tokio::task::spawn_blocking(move || bb.flush_index())
        .await
        .unwrap()
        .unwrap();
    let found = b.search("subject:mirrored42", 10).unwrap().items;
    assert_eq!(found.len(), 1);
    assert!(
        found[0].item.mirrored && found[0].item.origin == "a" && found[0].item.id == "a-42",
        "{:?}",
        found[0]
    );
    assert_eq!(
        b.raw(found[0].item.seq).unwrap().1,
        b"Subject: mirrored42\r\n\r\nbody 42\r\n"
    );
    // The cursor is durable: a new copier sends nothing again.
    assert_eq!(a.store().cursor(&format!("mirror.{addr}")).unwrap(), 150);
}

use std::sync::atomic::Ordering;

/// Sealed segments on an object store (`object_store`'s in-memory one): uploaded and confirmed,
/// evicted past a cache of 0 bytes, read back by range; retention and compaction write new
/// segments and delete a replaced object only once the segment holding its records is
/// confirmed; verify brings each segment back once.
#[test]
fn segments_on_an_object_store_survive_eviction_retention_and_compaction() {
    use object_store::ObjectStore;
    let dir = tempfile::tempdir().unwrap();
    let mut o = Options::new(dir.path().to_path_buf());
    o.free_bytes_min = 0;
    o.index_heap_bytes = 15 << 20;
    o.segment_bytes_max = 4096;
    o.cache_bytes = 0;
    let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let remote = remote::Remote::over(memory, "unit").unwrap();
    let a = Archive::open_with(&o, Some(remote)).unwrap();
    let body = |i: u32| -> Vec<u8> {
        (0..600u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i * 7919) >> 13) as u8)
            .collect()
    };
    let mut seqs = Vec::new();
    for i in 0..80u32 {
        let raw = body(i);
        let mut m = incoming(&format!("r-{i}"), &raw, "bob@example.net");
        m.arrived_ms = 1_000 + u64::from(i); // long ago
        seqs.push(a.archive(m, &raw).unwrap().seq);
    }
    let objects = |a: &Archive| a.store().remote().unwrap().list().unwrap();
    a.sync_remote().unwrap();
    let t = a.status().unwrap().totals;
    assert!(t.remote_segments >= 4, "{t:?}");
    assert_eq!(t.pending_segments, 0);
    assert_eq!(t.cached_bytes, 0, "a cache of 0 bytes keeps nothing");
    assert_eq!(objects(&a).len() as u64, t.remote_segments);
    let local = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .count();
    assert_eq!(local, 1, "only the open segment stays local");
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(
            a.raw(*s).unwrap().1,
            body(i as u32),
            "item {s} read back by range"
        );
    }
    assert!(a.status().unwrap().remote.unwrap().fetches >= 60);

    // Retention removes most items; compaction rewrites sparse segments into the open one.
    a.hold(&seqs[..5], true).unwrap();
    assert_eq!(a.expire(Duration::from_secs(86_400), |_| {}).unwrap(), 75);
    let before = objects(&a);
    let report = a.compact(50).unwrap();
    assert!(report.segments >= 3, "{report:?}");
    // Their records now live in the open segment, which is not in the store: the old
    // objects stay (a segment the moved records filled and sealed may have joined them).
    a.sync_remote().unwrap();
    let now = objects(&a);
    // Moved records (the chain's entries are carried whole) may fill and seal the open
    // segment; only once such a segment is in the store may a replaced object go.
    let newest_before = before.iter().map(|o| o.0).max().unwrap();
    assert!(
        before.iter().all(|o| now.contains(o)) || now.iter().any(|o| o.0 > newest_before),
        "replaced objects kept until their records are confirmed: {before:?} {now:?}"
    );
    // New mail seals the segment holding the moved records; once it is confirmed, the
    // replaced objects go.
    for i in 80..100u32 {
        let raw = body(i);
        a.archive(incoming(&format!("r-{i}"), &raw, "bob@example.net"), &raw)
            .unwrap();
    }
    a.sync_remote().unwrap();
    let after = objects(&a);
    let t = a.status().unwrap().totals;
    assert_eq!(after.len() as u64, t.remote_segments, "{after:?} {t:?}");
    assert!(a.status().unwrap().remote.unwrap().deletes >= 3);
    for (i, s) in seqs[..5].iter().enumerate() {
        assert_eq!(
            a.raw(*s).unwrap().1,
            body(i as u32),
            "held item after compaction"
        );
    }
    // The index thread reads items too (fetching what is not cached): let it finish first, so
    // that what is counted below is verify's own fetches.
    a.flush_index().unwrap();
    let fetches = a.status().unwrap().remote.unwrap().fetches;
    let v = a.verify(|_, _| {}).unwrap();
    assert_eq!((v.items, v.ok), (25, 25), "{:?}", v.bad);
    let segment_gets = a.status().unwrap().remote.unwrap().fetches - fetches;
    assert!(
        segment_gets <= t.remote_segments,
        "verify fetched {segment_gets} times for {} segments",
        t.remote_segments
    );
}

/// Two archives (the two units of a pair) sharing one bucket under different prefixes: each
/// uploads, lists and reads back only its own segments.
#[test]
fn two_archives_share_a_bucket_under_their_own_prefixes() {
    use object_store::ObjectStore;
    let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let archives: Vec<Archive> = dirs
        .iter()
        .zip(["units/gw_a", "units/gw_b"])
        .map(|(dir, prefix)| {
            let mut o = Options::new(dir.path().to_path_buf());
            o.free_bytes_min = 0;
            o.index_heap_bytes = 15 << 20;
            o.segment_bytes_max = 4096;
            o.cache_bytes = 0;
            let remote = remote::Remote::over(memory.clone(), prefix).unwrap();
            Archive::open_with(&o, Some(remote)).unwrap()
        })
        .collect();
    let mut seqs = [Vec::new(), Vec::new()];
    for i in 0..30u32 {
        for (k, a) in archives.iter().enumerate() {
            let raw: Vec<u8> = (0..600u32)
                .map(|j| {
                    (j.wrapping_mul(2_654_435_761)
                        .wrapping_add(i * 31 + k as u32)
                        >> 11) as u8
                })
                .collect();
            let m = incoming(&format!("u{k}-{i}"), &raw, "bob@example.net");
            seqs[k].push((a.archive(m, &raw).unwrap().seq, raw));
        }
    }
    for (k, a) in archives.iter().enumerate() {
        a.sync_remote().unwrap();
        let t = a.status().unwrap().totals;
        let listed = a.store().remote().unwrap().list().unwrap();
        assert_eq!(
            listed.len() as u64,
            t.remote_segments,
            "unit {k} lists its own"
        );
        for (seq, raw) in &seqs[k] {
            assert_eq!(&a.raw(*seq).unwrap().1, raw, "unit {k} item {seq}");
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let all = rt.block_on(async {
        use futures_util::TryStreamExt;
        memory.list(None).try_collect::<Vec<_>>().await.unwrap()
    });
    let total: u64 = archives
        .iter()
        .map(|a| a.status().unwrap().totals.remote_segments)
        .sum();
    assert_eq!(
        all.len() as u64,
        total + 2,
        "the bucket holds both, apart, and a manifest each"
    );
}

/// An archive on the object store, its prefix claimed: (the archive, its store).
fn archive_on(
    memory: &Arc<dyn object_store::ObjectStore>,
    dir: &std::path::Path,
    prefix: &str,
    node: &str,
) -> Archive {
    let mut o = Options::new(dir.to_path_buf());
    o.free_bytes_min = 0;
    o.index_heap_bytes = 15 << 20;
    o.segment_bytes_max = 4096;
    o.cache_bytes = 0;
    o.node = node.into();
    // The in-memory store honours `If-None-Match`: no read-back delay needed.
    o.claim_settle = Duration::ZERO;
    let remote = remote::Remote::over(memory.clone(), prefix).unwrap();
    Archive::open_with(&o, Some(remote)).unwrap()
}

/// Every object in the store, with its size and ETag.
fn objects(memory: &Arc<dyn object_store::ObjectStore>) -> Vec<(String, u64, Option<String>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        use futures_util::TryStreamExt;
        let mut v: Vec<_> = memory
            .list(None)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.location.to_string(), m.size, m.e_tag))
            .collect();
        v.sort();
        v
    })
}

/// A unit started with an empty state directory on another archive's prefix (a reinstall, a
/// copied configuration) numbered its segments from 1 again and overwrote the other's
/// objects. Now it is refused and writes nothing there.
#[test]
fn a_second_archive_on_a_prefix_is_refused_and_writes_nothing() {
    let memory: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::memory::InMemory::new());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = archive_on(&memory, da.path(), "units/gw", "gw_a");
    let b = archive_on(&memory, db.path(), "units/gw", "gw_b");
    let fill = |x: &Archive, tag: &str| {
        for i in 0..20u32 {
            let raw: Vec<u8> = (0..900u32)
                .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i) >> 9) as u8)
                .chain(tag.bytes())
                .collect();
            x.archive(
                incoming(&format!("{tag}-{i}"), &raw, "bob@example.net"),
                &raw,
            )
            .unwrap();
        }
    };
    fill(&a, "a");
    a.sync_remote().unwrap();
    let before = objects(&memory);
    assert!(before.len() > 2, "{before:?}");
    fill(&b, "b");
    let refused = b.sync_remote().unwrap_err();
    assert!(matches!(refused, ArchiveError::NotOurs(_)), "{refused}");
    let text = refused.to_string();
    assert!(text.contains("gw_a") && text.contains("units/gw"), "{text}");
    assert_eq!(objects(&memory), before, "nothing written or deleted there");
    // A's archive is whole, and it goes on uploading.
    fill(&a, "a2");
    a.sync_remote().unwrap();
    assert!(objects(&memory).len() > before.len());
    // B's own prefix is its own.
    drop(b);
    let b = archive_on(&memory, db.path(), "units/gw_b", "gw_b");
    b.sync_remote().unwrap();
}

/// A store that, like Garage 2.5, ignores `If-None-Match`: a create overwrites.
#[derive(Debug)]
struct IgnoresCreate(Arc<dyn object_store::ObjectStore>);

impl std::fmt::Display for IgnoresCreate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IgnoresCreate({})", self.0)
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for IgnoresCreate {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        mut opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        opts.mode = object_store::PutMode::Overwrite;
        self.0.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.0.get_opts(location, options).await
    }
    async fn delete(&self, location: &object_store::path::Path) -> object_store::Result<()> {
        self.0.delete(location).await
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
    {
        self.0.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.0.copy(from, to).await
    }
    async fn copy_if_not_exists(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.0.copy_if_not_exists(from, to).await
    }
}

/// Two new archives racing for one empty prefix: exactly one owns it, on a store that honours
/// `If-None-Match: *` (the in-memory one, like S3 and MinIO) and, through the read-back after
/// the settle time, on one that ignores it (like Garage 2.5).
#[test]
fn two_archives_racing_for_an_empty_prefix_one_wins() {
    for round in 0..16 {
        let honours = round % 2 == 0;
        let memory: Arc<dyn object_store::ObjectStore> = if honours {
            Arc::new(object_store::memory::InMemory::new())
        } else {
            Arc::new(IgnoresCreate(Arc::new(
                object_store::memory::InMemory::new(),
            )))
        };
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        // Stores without the archive's threads: the upload thread would claim at once.
        let stores: Vec<store::Store> = dirs
            .iter()
            .zip(["gw_a", "gw_b"])
            .map(|(d, node)| {
                let remote = remote::Remote::over(memory.clone(), "shared").unwrap();
                let mut st = store::Store::open_with(d.path(), Some(remote), 0, node).unwrap();
                st.set_claim_settle(if honours {
                    Duration::ZERO
                } else {
                    Duration::from_millis(300)
                });
                st
            })
            .collect();
        let barrier = std::sync::Barrier::new(2);
        let claims: Vec<bool> = std::thread::scope(|s| {
            let runs: Vec<_> = stores
                .iter()
                .map(|st| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        st.claim().is_ok()
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(
            claims.iter().filter(|&&c| c).count(),
            1,
            "round {round} (store honours If-None-Match: {honours}): {claims:?}"
        );
    }
}

/// The daemon's check at start and the upload thread's first pass claim at once: one id, the
/// one in the manifest (two made a second id and refused the unit its own prefix).
#[test]
fn one_archive_claiming_from_two_threads_makes_one_id() {
    for round in 0..20 {
        let memory: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let dir = tempfile::tempdir().unwrap();
        let a = archive_on(&memory, dir.path(), "p", "gw_a");
        let claims: Vec<bool> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..2)
                .map(|_| s.spawn(|| a.store().claim().is_ok()))
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(claims, [true, true], "round {round}");
        let manifest = a.store().remote().unwrap().manifest().unwrap().unwrap();
        let id = a.store().archive_id().unwrap().unwrap();
        assert_eq!(manifest.archive, id.to_string(), "round {round}");
    }
}

/// With an object store, the open segment is sealed once it has held something for
/// `seal_after` and uploaded at the next pass: the store lags the unit by that, not by
/// `segment_bytes_max`. `seal()` does it at once; an empty open segment is not sealed.
#[test]
fn the_open_segment_is_sealed_by_age_and_on_request() {
    let memory: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::memory::InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.segment_bytes_max = 1 << 20;
    o.seal_after = Some(Duration::from_millis(300));
    let remote = remote::Remote::over(memory.clone(), "p").unwrap();
    let a = Archive::open_with(&o, Some(remote)).unwrap();
    let listed = || a.store().remote().unwrap().list().unwrap();
    for i in 0..3 {
        let raw = format!("Subject: {i}\r\n\r\nbody {i}\r\n").into_bytes();
        a.archive(incoming(&format!("m{i}"), &raw, "bob@example.net"), &raw)
            .unwrap();
    }
    assert!(
        listed().is_empty(),
        "far below segment_bytes_max: nothing sealed yet"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listed().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(listed().len(), 1, "sealed by age and uploaded");
    // On request: sealed now, once; an empty open segment is left alone.
    let raw = b"Subject: later\r\n\r\nlater\r\n".to_vec();
    a.archive(incoming("m9", &raw, "bob@example.net"), &raw)
        .unwrap();
    let sealed = a.seal().unwrap();
    assert_eq!(sealed, Some(2));
    assert_eq!(a.seal().unwrap(), None, "nothing held: nothing sealed");
    a.sync_remote().unwrap();
    assert_eq!(listed().len(), 2);
    for i in 0..3 {
        let seq = a
            .find(&incoming(
                &format!("m{i}"),
                format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes(),
                "bob@example.net",
            ))
            .unwrap()
            .unwrap();
        assert!(a.raw(seq).is_ok());
    }
}

/// Every item with its exact bytes, in sequence order.
pub(crate) type ItemsAndBytes = Vec<(Item, Vec<u8>)>;

/// Every item with its exact bytes, and the store's counters (items, raw bytes, held).
pub(crate) fn contents(a: &Archive) -> (ItemsAndBytes, (u64, u64, u64)) {
    let items = a.store().items_after(0, usize::MAX, |_| true).unwrap();
    let all = items
        .into_iter()
        .map(|i| {
            let raw = a.raw(i.seq).unwrap().1;
            (i, raw)
        })
        .collect();
    let t = a.status().unwrap().totals;
    (all, (t.items, t.raw_bytes, t.held))
}

pub(crate) fn wait_rebuilt(a: &Archive) {
    let progress = &a.store().rebuild_progress;
    for _ in 0..500 {
        if !progress.pending.load(Ordering::SeqCst) && !progress.running.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the rebuild did not end");
}

/// A history with every kind of record: items (shared bodies, mirrored ones), holds set and
/// released, retention removals, a compaction that moved records forward.
pub(crate) fn eventful(a: &Archive) {
    let body = |i: u32| -> Vec<u8> {
        let mut b = format!("Subject: event{i}\r\n\r\n").into_bytes();
        b.extend(
            (0..500u32).map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i * 7919) >> 13) as u8),
        );
        b
    };
    let mut seqs = Vec::new();
    let mut old = Vec::new();
    for i in 0..60u32 {
        let raw = body(i % 50); // ten bodies shared by two items each
        let mut m = incoming(&format!("e-{i}"), &raw, &format!("r{i}@example.net"));
        // 30 old items among the first 40, so every old segment keeps a few items whose only
        // record is there (compaction must carry them).
        let is_old = i < 40 && i % 4 != 3;
        m.arrived_ms = if is_old {
            1_000 + u64::from(i)
        } else {
            now_ms()
        };
        m.verdict = if i % 7 == 0 {
            "infected: Eicar".into()
        } else {
            "clean".into()
        };
        let seq = a.archive(m, &raw).unwrap().seq;
        seqs.push(seq);
        if is_old {
            old.push(seq);
        }
    }
    // Held items spread over the old segments.
    let every_third: Vec<u64> = old.iter().copied().step_by(3).collect();
    assert_eq!(a.hold(&every_third, true).unwrap(), 10);
    let released: Vec<u64> = every_third.iter().copied().skip(1).step_by(2).collect();
    assert_eq!(a.hold(&released, false).unwrap(), 5);
    assert_eq!(a.hold(&seqs[40..42], true).unwrap(), 2);
    // 30 old items, 5 of them held: 25 go.
    assert_eq!(a.expire(Duration::from_secs(86_400), |_| {}).unwrap(), 25);
    assert!(a.compact(90).unwrap().segments >= 3);
    // A hold change after the compaction, and mail after it.
    assert_eq!(a.hold(&seqs[40..41], false).unwrap(), 1);
    for i in 60..70u32 {
        let raw = body(i);
        a.archive(incoming(&format!("e-{i}"), &raw, "late@example.net"), &raw)
            .unwrap();
    }
}

/// A lost catalog (and index) beside the segments: the archive notices at open, keeps the
/// segments, rebuilds items, holds, removals, counters and the index from them.
#[test]
fn a_lost_catalog_is_rebuilt_from_the_local_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.segment_bytes_max = 4096;
    let (before, hits_before) = {
        let a = Archive::open(&o).unwrap();
        eventful(&a);
        a.flush_index().unwrap();
        let hits = a.search("subject:event3", 100).unwrap().items.len();
        (contents(&a), hits)
    };
    assert_eq!(before.1, (45, before.1 .1, 6), "45 items, 6 held");
    std::fs::remove_dir_all(dir.path().join("catalog")).unwrap();
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let a = Archive::open(&o).unwrap();
    wait_rebuilt(&a);
    assert_eq!(contents(&a), before);
    a.flush_index().unwrap();
    assert_eq!(
        a.search("subject:event3", 100).unwrap().items.len(),
        hits_before
    );
    let v = a.verify(|_, _| {}).unwrap();
    assert_eq!(
        (v.items, v.ok, v.bad.len(), v.index_entries),
        (45, 45, 0, 45)
    );
    // It goes on: new items after the rebuilt ones, in a new segment.
    let s = a
        .archive(incoming("after", b"after\r\n", "x@y"), b"after\r\n")
        .unwrap();
    assert!(s.new && s.seq > before.0.last().unwrap().0.seq);
    // A rebuild asked for after it ran answers what it found; a catalog that holds items and
    // was not rebuilt here is not rebuilt over.
    assert_eq!(a.rebuild(|_| {}).unwrap().items, 45);
    drop(a);
    let a = Archive::open(&o).unwrap();
    assert!(matches!(a.rebuild(|_| {}), Err(ArchiveError::Refused(_))));
}

/// A new unit (an empty directory) told to adopt the archive of a lost one rebuilds it from
/// the object store alone; without being told, it is refused.
#[test]
fn a_new_unit_adopts_a_lost_units_archive_from_the_object_store() {
    use object_store::ObjectStore;
    let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let options = |dir: &std::path::Path| Options {
        segment_bytes_max: 4096,
        ..options(dir)
    };
    let old = tempfile::tempdir().unwrap();
    let (before, id) = {
        let a = Archive::open_with(
            &options(old.path()),
            Some(remote::Remote::over(memory.clone(), "p").unwrap()),
        )
        .unwrap();
        eventful(&a);
        a.seal().unwrap();
        a.sync_remote().unwrap();
        (contents(&a), a.store().archive_id().unwrap().unwrap())
    };
    drop(old); // the unit is lost

    let new = tempfile::tempdir().unwrap();
    let refused = Archive::open_with(
        &options(new.path()),
        Some(remote::Remote::over(memory.clone(), "p").unwrap()),
    )
    .unwrap();
    assert!(matches!(
        refused.store().claim(),
        Err(ArchiveError::NotOurs(_))
    ));
    drop(refused);
    let mut o = options(new.path());
    o.adopt = Some(id);
    let a =
        Archive::open_with(&o, Some(remote::Remote::over(memory.clone(), "p").unwrap())).unwrap();
    a.store().claim().unwrap();
    let mut seen = 0;
    let rebuilt = a.rebuild(|p| seen = p.done.load(Ordering::SeqCst)).unwrap();
    assert!(
        rebuilt.from_store >= 3 && rebuilt.without_body.is_empty(),
        "{rebuilt:?}"
    );
    assert_eq!((rebuilt.items, rebuilt.held, rebuilt.removed), (45, 6, 25));
    assert_eq!(contents(&a), before);
    assert_eq!(a.store().archive_id().unwrap(), Some(id));
    // A flush right after the rebuild makes all of it searchable.
    a.flush_index().unwrap();
    let st = a.status().unwrap();
    assert_eq!(st.indexed_through, st.last_seq);
    assert_eq!(a.search("from:alice", 100).unwrap().items.len(), 45);
    // New segments are numbered after the store's: nothing there is overwritten.
    let objects = a.store().remote().unwrap().list().unwrap();
    a.archive(incoming("after", b"after\r\n", "x@y"), b"after\r\n")
        .unwrap();
    a.seal().unwrap();
    a.sync_remote().unwrap();
    let now = a.store().remote().unwrap().list().unwrap();
    assert!(
        objects.iter().all(|o| now.contains(o)),
        "{objects:?} {now:?}"
    );
    assert_eq!(now.len(), objects.len() + 1);
}

/// A store that, like Garage 2.5, overwrites on create, holding the archive of a lost unit (in
/// `p`, segments of 4 KiB) with three checkpoints, one object each (as a unit signing one a
/// minute uploads them); answers the store, the archive's id and the store's checkpoints.
fn lost_unit_with_checkpoints() -> (Arc<dyn object_store::ObjectStore>, ArchiveId, String) {
    let memory: Arc<dyn object_store::ObjectStore> = Arc::new(IgnoresCreate(Arc::new(
        object_store::memory::InMemory::new(),
    )));
    let old = tempfile::tempdir().unwrap();
    let a = Archive::open_with(
        &small_segments(old.path()),
        Some(remote::Remote::over(memory.clone(), "p").unwrap()),
    )
    .unwrap();
    for round in 0..3 {
        let raw = format!("Subject: round {round}\r\n\r\nbody\r\n").into_bytes();
        a.archive(incoming(&format!("r{round}"), &raw, "x@y"), &raw)
            .unwrap();
        a.checkpoint_now().unwrap();
        a.seal().unwrap();
        a.sync_remote().unwrap();
    }
    let id = a.store().archive_id().unwrap().unwrap();
    let text = a.store().remote().unwrap().checkpoints().unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    (memory, id, text)
}

/// The checkpoints the store holds under prefix `p`, its objects' lines in order.
fn checkpoints_in(memory: &Arc<dyn object_store::ObjectStore>) -> String {
    remote::Remote::over(memory.clone(), "p")
        .unwrap()
        .checkpoints()
        .unwrap()
}

fn small_segments(dir: &std::path::Path) -> Options {
    Options {
        segment_bytes_max: 4096,
        ..options(dir)
    }
}

/// A new unit in `dir` told to adopt archive `id` from `memory`'s prefix `p`, claimed.
fn adopter(
    memory: &Arc<dyn object_store::ObjectStore>,
    dir: &std::path::Path,
    id: ArchiveId,
) -> Archive {
    let mut o = small_segments(dir);
    o.adopt = Some(id);
    let a =
        Archive::open_with(&o, Some(remote::Remote::over(memory.clone(), "p").unwrap())).unwrap();
    a.store().claim().unwrap();
    a
}

/// The checkpoints a new unit adopts from a lost one's store are not uploaded again by an upload
/// pass running while it adopts them: on a store that overwrites on create (Garage 2.5), a pass
/// that saw the adopted file but not its cursor put them back from offset 0, and the store then
/// held lines twice (a proof against it counted more checkpoints than the unit has).
#[test]
fn checkpoints_adopted_while_uploads_run_stay_once_in_the_store() {
    for attempt in 0..12 {
        let (memory, id, lost_units) = lost_unit_with_checkpoints();
        let in_store = || checkpoints_in(&memory);
        let new = tempfile::tempdir().unwrap();
        let a = Arc::new(adopter(&memory, new.path(), id));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let passes = std::thread::spawn({
            let (a, stop) = (a.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::SeqCst) {
                    // Passes fail while the catalog is rebuilt; the one that matters runs
                    // while the checkpoints are adopted.
                    let _ = a.sync_remote();
                }
            }
        });
        a.rebuild(|_| {}).unwrap();
        // Passes go on past the adoption.
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        passes.join().unwrap();
        let local = std::fs::read_to_string(new.path().join("checkpoints")).unwrap();
        assert_eq!(local, lost_units, "attempt {attempt}: adopted as they were");
        assert_eq!(
            in_store(),
            lost_units,
            "attempt {attempt}: each once in the store"
        );
    }
}

/// A unit stopped between its rebuild's last transaction and taking in the store's checkpoints
/// takes them in when it opens again, before its own go up: they stay once in the store, and
/// its next checkpoint is added after them (not uploaded from offset 0 over the lost unit's
/// first object).
#[test]
fn checkpoints_not_taken_in_before_a_stop_are_taken_in_at_the_next_open() {
    let (memory, id, lost_units) = lost_unit_with_checkpoints();
    let in_store = || checkpoints_in(&memory);
    let new = tempfile::tempdir().unwrap();
    {
        let a = adopter(&memory, new.path(), id);
        a.rebuild(|_| {}).unwrap();
        a.store()
            .as_if_stopped_before_taking_in_checkpoints()
            .unwrap();
    }
    let a = adopter(&memory, new.path(), id);
    let local = || std::fs::read_to_string(new.path().join("checkpoints")).unwrap_or_default();
    assert_eq!(local(), lost_units, "taken in at the open");
    let raw = b"Subject: after\r\n\r\nbody\r\n";
    a.archive(incoming("after", raw, "x@y"), raw).unwrap();
    a.checkpoint_now().unwrap();
    a.seal().unwrap();
    a.sync_remote().unwrap();
    assert_eq!(local().lines().count(), 4, "{}", local());
    assert!(local().starts_with(&lost_units));
    assert_eq!(
        in_store(),
        local(),
        "the store holds each checkpoint once, in order"
    );
}

/// Segments sealed small (by age, or by hand) are merged by compaction into one, and the small
/// objects leave the store once the merged segment is confirmed; every item still reads.
#[test]
fn small_segments_sealed_by_age_are_merged_in_the_store() {
    use object_store::ObjectStore;
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.segment_bytes_max = 1 << 20;
    let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let a = Archive::open_with(&o, Some(remote::Remote::over(memory, "m").unwrap())).unwrap();
    let mut seqs = Vec::new();
    for i in 0..6u32 {
        for j in 0..3u32 {
            let raw = format!("Subject: quiet {i} {j}\r\n\r\nbody\r\n").into_bytes();
            seqs.push(
                a.archive(incoming(&format!("q-{i}-{j}"), &raw, "b@x"), &raw)
                    .unwrap()
                    .seq,
            );
        }
        assert!(a.seal().unwrap().is_some());
    }
    a.sync_remote().unwrap();
    let objects = || a.store().remote().unwrap().list().unwrap();
    assert_eq!(objects().len(), 6, "six small segments: {:?}", objects());
    let report = a.compact(50).unwrap();
    assert_eq!(report.segments, 6, "{report:?}");
    a.seal().unwrap();
    a.sync_remote().unwrap();
    a.sync_remote().unwrap();
    assert_eq!(
        objects().len(),
        1,
        "merged into one object: {:?}",
        objects()
    );
    a.drop_cache().unwrap();
    for s in &seqs {
        assert_eq!(a.raw(*s).unwrap().0.seq, *s);
    }
    // A second pass finds one small segment alone: nothing moves.
    assert_eq!(a.compact(50).unwrap().segments, 0);
}

/// An archive written before item records (bodies only in its segments) gets a record of each
/// item at its first open by this version; then a lost catalog is rebuilt from its segments.
#[test]
fn an_archive_from_before_item_records_is_migrated_at_open_and_can_be_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let a = open(dir.path());
        a.store()
            .as_before_item_records
            .store(true, Ordering::SeqCst);
        for i in 0..20 {
            let raw = format!("Subject: old{i}\r\n\r\nbody\r\n");
            a.archive(
                incoming(&format!("o-{i}"), raw.as_bytes(), "b@x"),
                raw.as_bytes(),
            )
            .unwrap();
        }
        a.hold(&[3], true).unwrap();
        a.store().forget_described().unwrap();
        contents(&a)
    };
    let segment = dir.path().join("segments/00000001.seg");
    let kinds = record_kinds(&segment);
    // The hold above went through this version's writer: an entry (after the chain's start);
    // the rest bodies.
    assert_eq!(kinds.iter().filter(|k| **k == "body").count(), 20);
    assert_eq!(kinds.iter().filter(|k| **k == "held").count(), 1);
    {
        let a = open(dir.path());
        assert_eq!(contents(&a), before);
    }
    let kinds = record_kinds(&segment);
    assert_eq!(
        kinds.iter().filter(|k| **k == "described").count(),
        20,
        "an entry of each item appended at open"
    );
    std::fs::remove_dir_all(dir.path().join("catalog")).unwrap();
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let a = open(dir.path());
    wait_rebuilt(&a);
    assert_eq!(contents(&a), before);
}

/// A unit replaced by one that adopted its archive, come back, writes nothing more under the
/// prefix: its next upload pass stops, and so does its next start.
#[test]
fn a_replaced_unit_that_comes_back_writes_nothing() {
    use object_store::ObjectStore;
    let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let remote = || Some(remote::Remote::over(memory.clone(), "p").unwrap());
    let old_dir = tempfile::tempdir().unwrap();
    let old = Archive::open_with(&options(old_dir.path()), remote()).unwrap();
    let raw = b"Subject: first\r\n\r\nbody\r\n";
    old.archive(incoming("f", raw, "b@x"), raw).unwrap();
    old.seal().unwrap();
    old.sync_remote().unwrap();
    let id = old.store().archive_id().unwrap().unwrap();

    let new_dir = tempfile::tempdir().unwrap();
    let mut o = options(new_dir.path());
    o.adopt = Some(id);
    let new = Archive::open_with(&o, remote()).unwrap();
    new.store().claim().unwrap();
    assert_eq!(new.rebuild(|_| {}).unwrap().items, 1);
    let objects = new.store().remote().unwrap().list().unwrap();

    // The old unit still runs: its next sealed segment stays local.
    let raw = b"Subject: late\r\n\r\nbody\r\n";
    old.archive(incoming("l", raw, "b@x"), raw).unwrap();
    old.seal().unwrap();
    assert!(matches!(old.sync_remote(), Err(ArchiveError::NotOurs(_))));
    assert_eq!(new.store().remote().unwrap().list().unwrap(), objects);
    drop(old);
    let again = Archive::open_with(&options(old_dir.path()), remote()).unwrap();
    let e = again.store().claim().unwrap_err();
    assert!(e.to_string().contains("adopted"), "{e}");
    // The adopting unit goes on writing.
    let raw = b"Subject: new\r\n\r\nbody\r\n";
    new.archive(incoming("n", raw, "b@x"), raw).unwrap();
    new.seal().unwrap();
    new.sync_remote().unwrap();
    assert_eq!(
        new.store().remote().unwrap().list().unwrap().len(),
        objects.len() + 1
    );
}
