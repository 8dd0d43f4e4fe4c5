//! The archive as evidence: a copied-out archive is proved with its public key alone, and each
//! way an insider could alter it is named by the proof (the first break: where, and what).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::chain::{Entry, Event};
use crate::checkpoint::Signer;
use crate::tests::{eventful, incoming, options, records};
use std::path::{Path, PathBuf};

/// An archive with every kind of entry (items, holds, releases, tombstones, entries carried by
/// compaction), checkpoints every 10 entries and one at close; answers its key file.
fn evidence(dir: &Path, keys: &Path) -> PathBuf {
    let mut o = options(dir);
    o.segment_bytes_max = 4096;
    o.checkpoint_entries = 10;
    let key = keys.join("archive.key");
    o.signing_key = Some(key.clone());
    let a = Archive::open(&o).unwrap();
    eventful(&a);
    let p = a
        .prove(vec![], proof::Start::Genesis, &[], |_, _| {})
        .unwrap();
    assert!(p.holds(), "{:?}", p.breaks);
    key
}

/// The archive's evidence as an auditor gets it: `segments/` and `checkpoints`, nothing else.
fn copy_out(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    std::fs::create_dir(to.path().join("segments")).unwrap();
    for e in std::fs::read_dir(from.join("segments")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.path().join("segments").join(e.file_name())).unwrap();
    }
    std::fs::copy(from.join("checkpoints"), to.path().join("checkpoints")).unwrap();
    to
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .collect();
    v.sort();
    v
}

/// The frame at `at` in `data` gets its checksum made again (what an insider would do).
fn refit_crc(data: &mut [u8], at: usize) {
    let len = u32::from_be_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
    let crc = crc32c::crc32c(&data[at + 16..at + 16 + len]);
    data[at + 8..at + 12].copy_from_slice(&crc.to_be_bytes());
}

/// The chain entry framed at `at`.
fn entry_at(data: &[u8], at: usize) -> Entry {
    match record::next(&data[at..]).unwrap().0 {
        record::Record::Entry(e) => *e,
        other => panic!("not an entry: {other:?}"),
    }
}

fn prove(dir: &Path, key: [u8; 32]) -> proof::Proof {
    proof::prove_dir(dir, vec![key], proof::Start::Genesis, &[], None).unwrap()
}

/// The newest segment's entries of stored items: (offset, length, entry number).
fn stored_entries(path: &Path) -> Vec<(usize, usize, u64)> {
    let data = std::fs::read(path).unwrap();
    records(path)
        .into_iter()
        .filter(|r| r.0 == "stored")
        .map(|(_, at, len)| (at, len, entry_at(&data, at).n))
        .collect()
}

#[test]
fn a_copied_out_archive_is_proved_with_its_public_key_and_each_tamper_is_named() {
    let state = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = evidence(state.path(), keys.path());
    let key = Signer::load_or_create(&key_file).unwrap().public();
    let untouched = copy_out(state.path());
    let p = prove(untouched.path(), key);
    assert!(p.holds(), "{:?}", p.breaks);
    // The genesis, 70 items stored, 18 hold changes, 25 tombstones.
    assert_eq!(p.entries, 1 + 70 + 18 + 25);
    assert_eq!((p.items, p.bodies, p.tombstones), (45, 45, 25));
    assert!(p.checkpoints >= 8, "{p:?}");
    assert_eq!(
        p.last_checkpoint.unwrap().0,
        p.entries,
        "the close signed the head"
    );
    assert!(
        segment_files(untouched.path())
            .iter()
            .any(|s| records(s).iter().any(|r| r.0 == "copied")),
        "compaction carried entries"
    );
    // Another key than the auditor's is a break of every checkpoint.
    let stranger = Signer::ephemeral().public();
    let p = prove(untouched.path(), stranger);
    assert!(!p.holds());
    assert!(
        p.breaks[0].what.contains("not given to the verifier"),
        "{:?}",
        p.breaks[0]
    );

    type Tamper = fn(&Path) -> String;
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "a body's byte flipped",
            |dir| {
                let seg = &segment_files(dir)[1];
                let body = records(seg).into_iter().find(|r| r.0 == "body").unwrap();
                let mut data = std::fs::read(seg).unwrap();
                data[body.1 + 16 + 40] ^= 0x20;
                std::fs::write(seg, data).unwrap();
                format!("segment {} offset {}", number(seg), body.1)
            },
            "checksum mismatch",
        ),
        (
            "a body's byte flipped and its checksum made again",
            |dir| {
                let seg = &segment_files(dir)[1];
                let body = records(seg).into_iter().find(|r| r.0 == "body").unwrap();
                let mut data = std::fs::read(seg).unwrap();
                data[body.1 + 16 + 40] ^= 0x20;
                refit_crc(&mut data, body.1);
                std::fs::write(seg, data).unwrap();
                format!("segment {} offset {}", number(seg), body.1)
            },
            "a body record: its",
        ),
        (
            "an entry's byte flipped and its checksum made again",
            |dir| {
                let seg = busy_segment(dir);
                let (at, len, n) = stored_entries(&seg)[0];
                let mut data = std::fs::read(&seg).unwrap();
                // A letter of the recipient, near the end of the item: still a readable entry.
                data[at + len - 3] ^= 0x01;
                refit_crc(&mut data, at);
                std::fs::write(&seg, data).unwrap();
                format!("entry {}", n + 1)
            },
            "as the hash of entry",
        ),
        (
            "a checkpoint's signature altered",
            |dir| {
                let path = dir.join("checkpoints");
                let text = std::fs::read_to_string(&path).unwrap();
                let at = text.find("\"signature\":\"").unwrap() + 13;
                let mut b = text.into_bytes();
                b[at] = if b[at] == b'0' { b'1' } else { b'0' };
                std::fs::write(&path, b).unwrap();
                "checkpoints line 1".into()
            },
            "signature does not hold",
        ),
        (
            "an item's entry removed",
            |dir| {
                let seg = busy_segment(dir);
                let (at, len, n) = stored_entries(&seg)[1];
                let mut data = std::fs::read(&seg).unwrap();
                data.drain(at..at + len);
                std::fs::write(&seg, data).unwrap();
                format!("entry {}", n + 1)
            },
            "are missing",
        ),
        (
            "the last records cut off",
            |dir| {
                let seg = busy_segment(dir);
                let (at, _, _) = stored_entries(&seg)[2];
                let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
                f.set_len(at as u64).unwrap();
                for later in segment_files(dir).into_iter().filter(|s| *s > seg) {
                    std::fs::remove_file(later).unwrap();
                }
                "checkpoints line ".into()
            },
            "cut off or deleted",
        ),
        (
            "two entries swapped",
            |dir| {
                let seg = busy_segment(dir);
                let e = stored_entries(&seg);
                let (a, b) = (e[0], e[1]);
                let data = std::fs::read(&seg).unwrap();
                let mut out = data[..a.0].to_vec();
                out.extend_from_slice(&data[b.0..b.0 + b.1]);
                out.extend_from_slice(&data[a.0 + a.1..b.0]);
                out.extend_from_slice(&data[a.0..a.0 + a.1]);
                out.extend_from_slice(&data[b.0 + b.1..]);
                std::fs::write(&seg, out).unwrap();
                format!(
                    "segment {} offset {}",
                    number(&seg),
                    a.0 + (b.0 - a.0 - a.1) + b.1
                )
            },
            "out of their order",
        ),
        (
            "a body and its hash replaced together",
            |dir| {
                let seg = busy_segment(dir);
                let (_, at, len) = records(&seg).into_iter().find(|r| r.0 == "body").unwrap();
                let data = std::fs::read(&seg).unwrap();
                let raw = b"Subject: something else\r\n\r\nnot what was accepted\r\n";
                let mut frame = Vec::new();
                record::frame(
                    &Sha256::digest(raw).into(),
                    &zstd::bulk::compress(raw, 3).unwrap(),
                    &mut frame,
                );
                let item = entry_after(&data, at);
                let mut out = data[..at].to_vec();
                out.extend_from_slice(&frame);
                out.extend_from_slice(&data[at + len..]);
                std::fs::write(&seg, out).unwrap();
                format!("item {item}")
            },
            "is in no segment",
        ),
        (
            "a segment deleted (an object gone from the store)",
            |dir| {
                let segs = segment_files(dir);
                std::fs::remove_file(&segs[1]).unwrap();
                "entry".into()
            },
            "are missing",
        ),
    ];
    for (name, tamper, what) in cases {
        let copy = copy_out(state.path());
        let at = tamper(copy.path());
        let p = prove(copy.path(), key);
        let first = p
            .breaks
            .first()
            .unwrap_or_else(|| panic!("{name}: the proof holds"));
        assert!(
            first.at.starts_with(&at) && first.what.contains(what),
            "{name}: expected {at:?} / {what:?}, the first break is {first:?}"
        );
    }
}

/// The newest segment with four entries of stored items or more (the tampers below need entries
/// before and after the one they alter).
fn busy_segment(dir: &Path) -> PathBuf {
    segment_files(dir)
        .into_iter()
        .rev()
        .find(|s| stored_entries(s).len() >= 4)
        .unwrap()
}

/// Archives small messages `<what><i>` for each `i`.
fn small_mail(a: &Archive, what: &str, range: std::ops::Range<u32>) {
    for i in range {
        let raw = format!("Subject: {what}{i}\r\n\r\nx\r\n");
        a.archive(
            incoming(&format!("{what}-{i}"), raw.as_bytes(), "r@x"),
            raw.as_bytes(),
        )
        .unwrap();
    }
}

fn number(seg: &Path) -> u32 {
    proof::segment_number(seg).unwrap()
}

/// The item whose stored entry follows the body framed at `at`.
fn entry_after(data: &[u8], mut at: usize) -> u64 {
    loop {
        let (rec, len) = record::next(&data[at..]).unwrap();
        if let record::Record::Entry(e) = rec {
            if let Event::Item { item, .. } = e.event {
                return item.seq;
            }
        }
        at += len;
    }
}

/// An insider with the unit's key rewrites the whole chain (one recipient changed, every later
/// hash made again, every checkpoint signed again): the local proof holds, and the checkpoints a
/// mirror peer kept name the rewrite.
#[test]
fn a_rewrite_of_the_whole_chain_is_caught_by_the_checkpoints_a_peer_kept() {
    let state = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = evidence(state.path(), keys.path());
    let signer = Signer::load_or_create(&key_file).unwrap();
    let peer_copy: Vec<checkpoint::Checkpoint> = checkpoint::read(state.path())
        .unwrap()
        .0
        .into_iter()
        .map(|(_, cp)| cp)
        .collect();
    let copy = copy_out(state.path());
    let changed = rewrite_chain(copy.path(), &signer);
    let p = prove(copy.path(), signer.public());
    assert!(p.holds(), "the rewrite holds locally: {:?}", p.breaks);
    let p = proof::prove_dir(
        copy.path(),
        vec![signer.public()],
        proof::Start::Genesis,
        &[("peer b".into(), peer_copy.clone())],
        None,
    )
    .unwrap();
    let caught: Vec<&proof::Break> = p
        .breaks
        .iter()
        .filter(|b| b.at.starts_with("peer b's checkpoint") && b.what.contains("rewritten"))
        .collect();
    let after = peer_copy.iter().filter(|cp| cp.entries > changed).count();
    assert_eq!(caught.len(), after, "{:?}", p.breaks);
    assert!(after > 0);
}

/// Rewrites the archive in `dir`: the recipient of the first item stored in the newest segment
/// changes; every entry from there gets the new hashes; checkpoints are signed again. Answers
/// the entry changed.
fn rewrite_chain(dir: &Path, signer: &Signer) -> u64 {
    let segs = segment_files(dir);
    let newest = segs.last().unwrap().clone();
    let target = stored_entries(&newest)[0].2;
    // Every entry's event bytes, changed where the insider wants.
    let mut events: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
    let each_entry = |data: &[u8], f: &mut dyn FnMut(&Entry)| {
        let mut at = 0;
        while at < data.len() {
            let (rec, len) = record::next(&data[at..]).unwrap();
            match rec {
                record::Record::Entry(e) => f(&e),
                record::Record::Copied(inner) => {
                    let mut i = 0;
                    while i < inner.len() {
                        let (rec, l) = record::next(&inner[i..]).unwrap();
                        if let record::Record::Entry(e) = rec {
                            f(&e);
                        }
                        i += l;
                    }
                }
                _ => {}
            }
            at += len;
        }
    };
    for seg in &segs {
        let data = std::fs::read(seg).unwrap();
        each_entry(&data, &mut |e: &Entry| {
            let mut event = e.event.clone();
            if e.n == target {
                if let Event::Item { item, .. } = &mut event {
                    item.recipients = vec!["someone-else@example.net".into()];
                }
            }
            events.insert(e.n, event.encode());
        });
    }
    let mut head = chain::Head::default();
    let mut payloads = std::collections::HashMap::new();
    let mut hashes = std::collections::HashMap::new();
    for (n, event) in &events {
        assert_eq!(*n, head.next);
        payloads.insert(*n, head.append_encoded(event));
        hashes.insert(*n, head.hash);
    }
    let reframe = |n: u64| {
        let mut f = Vec::new();
        record::frame_entry(&payloads[&n], &mut f);
        f
    };
    for seg in &segs {
        let data = std::fs::read(seg).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let (rec, len) = record::next(&data[at..]).unwrap();
            match rec {
                record::Record::Entry(e) => out.extend(reframe(e.n)),
                record::Record::Copied(inner) => {
                    let mut frames = Vec::new();
                    let mut i = 0;
                    while i < inner.len() {
                        let (rec, l) = record::next(&inner[i..]).unwrap();
                        if let record::Record::Entry(e) = rec {
                            frames.extend(reframe(e.n));
                        }
                        i += l;
                    }
                    record::frame_copied(&frames, &mut out);
                }
                _ => out.extend_from_slice(&data[at..at + len]),
            }
            at += len;
        }
        std::fs::write(seg, out).unwrap();
    }
    let lines: Vec<String> = checkpoint::read(dir)
        .unwrap()
        .0
        .into_iter()
        .map(|(_, cp)| {
            signer
                .sign(
                    cp.archive,
                    cp.entries,
                    hashes[&(cp.entries - 1)],
                    cp.time_ms,
                )
                .to_line()
        })
        .collect();
    std::fs::write(dir.join("checkpoints"), lines.join("\n") + "\n").unwrap();
    target
}

/// On a unit: the proof reads as of a catalog snapshot and checks the catalog's head; after a
/// lost catalog is rebuilt the chain goes on from where the segments left it, with the same
/// archive id; an incremental proof from the last checkpoint hashes only newer bodies.
#[test]
fn the_chain_survives_a_rebuild_and_an_incremental_proof_starts_at_a_checkpoint() {
    let state = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = evidence(state.path(), keys.path());
    let mut o = options(state.path());
    o.segment_bytes_max = 4096;
    o.signing_key = Some(key_file);
    let (id, entries) = {
        let a = Archive::open(&o).unwrap();
        let p = a
            .prove(vec![], proof::Start::Genesis, &[], |_, _| {})
            .unwrap();
        assert!(p.holds(), "{:?}", p.breaks);
        (a.signing_key().unwrap().1.unwrap(), p.entries)
    };
    std::fs::remove_dir_all(state.path().join("catalog")).unwrap();
    std::fs::remove_dir_all(state.path().join("index")).unwrap();
    let a = Archive::open(&o).unwrap();
    crate::tests::wait_rebuilt(&a);
    assert_eq!(a.signing_key().unwrap().1, Some(id));
    small_mail(&a, "after", 0..5);
    let p = a
        .prove(vec![], proof::Start::Genesis, &[], |_, _| {})
        .unwrap();
    assert!(p.holds(), "{:?}", p.breaks);
    assert_eq!(
        p.entries,
        entries + 5,
        "no second genesis, no signer entry: the same key"
    );
    assert_eq!(p.archive, Some(id.to_string()));
    a.checkpoint_now().unwrap();
    small_mail(&a, "after", 5..8);
    let p = a
        .prove(vec![], proof::Start::NewestCheckpoint, &[], |_, _| {})
        .unwrap();
    assert!(p.holds(), "{:?}", p.breaks);
    assert_eq!((p.from, p.entries), (entries + 5, entries + 8));
    assert_eq!(
        (p.items, p.bodies),
        (53, 3),
        "only the bodies of items after the checkpoint"
    );
    // --since: the newest checkpoint signed at or before the time; none that early: everything.
    let cps: Vec<checkpoint::Checkpoint> = checkpoint::read(state.path())
        .unwrap()
        .0
        .into_iter()
        .map(|(_, cp)| cp)
        .collect();
    let earlier = cps
        .windows(2)
        .rev()
        .find(|w| w[0].time_ms < w[1].time_ms)
        .map(|w| w[0].clone())
        .unwrap();
    let p = a
        .prove(vec![], proof::Start::Since(earlier.time_ms), &[], |_, _| {})
        .unwrap();
    assert!(p.holds(), "{:?}", p.breaks);
    assert_eq!(p.from, earlier.entries);
    let p = a
        .prove(vec![], proof::Start::Since(1), &[], |_, _| {})
        .unwrap();
    assert_eq!((p.from, p.bodies), (0, 53));
}

/// Checkpoints go to the object store with the segments they sign (one object per batch, never
/// overwritten), and a proof compares with them.
#[test]
fn checkpoints_go_to_the_object_store_with_the_segments() {
    use object_store::ObjectStore;
    let dir = tempfile::tempdir().unwrap();
    let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let remote = || Some(remote::Remote::over(memory.clone(), "unit").unwrap());
    let a = Archive::open_with(&options(dir.path()), remote()).unwrap();
    let store_text = || a.store().remote().unwrap().checkpoints().unwrap();
    for round in 0..2 {
        small_mail(&a, &format!("round{round}-"), 0..5);
        a.checkpoint_now().unwrap();
        // Without a segment sealed, a pass within 15 minutes of the last upload waits.
        if round == 1 {
            a.sync_remote().unwrap();
            assert_eq!(
                store_text().lines().count(),
                1,
                "no new object without a segment"
            );
        }
        a.seal().unwrap();
        a.sync_remote().unwrap();
        let local = std::fs::read_to_string(dir.path().join("checkpoints")).unwrap();
        assert_eq!(store_text(), local, "round {round}");
    }
    let theirs: Vec<checkpoint::Checkpoint> = checkpoint::parse(&store_text())
        .0
        .into_iter()
        .map(|(_, cp)| cp)
        .collect();
    assert_eq!(theirs.len(), 2);
    let p = a
        .prove(
            vec![],
            proof::Start::Genesis,
            &[("the object store".into(), theirs)],
            |_, _| {},
        )
        .unwrap();
    assert!(p.holds(), "{:?}", p.breaks);
    assert_eq!(p.compared, 2);
}
