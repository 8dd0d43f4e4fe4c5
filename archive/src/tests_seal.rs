//! Encryption at rest: no plaintext of a message in any segment, a proof that opens what is
//! sealed (and names the key it lacks), rotation and rekey that keep every item's bytes, and a
//! wrong or missing keyring refused with the key it lacks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::seal::Keyring;
use crate::tests::{contents, eventful, options, wait_rebuilt};
use std::path::Path;

/// Words of `eventful`'s mail: subjects, the sender, recipients.
const PLAINTEXT: [&[u8]; 3] = [b"Subject: event", b"alice@example.com", b"@example.net"];

/// The plaintext words found in any segment file under `dir`.
fn plaintext_in_segments(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir.join("segments")).unwrap() {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        for word in PLAINTEXT {
            if data.windows(word.len()).any(|w| w == word) {
                found.push(format!(
                    "{} in {}",
                    String::from_utf8_lossy(word),
                    path.display()
                ));
            }
        }
    }
    found
}

fn encrypted(dir: &Path, keyring_file: &Path) -> Options {
    let keyring = match Keyring::load(keyring_file).unwrap() {
        Some(k) => k,
        None => {
            let k = Keyring::generate(now_ms());
            k.save(keyring_file, true).unwrap();
            k
        }
    };
    Options {
        segment_bytes_max: 4096,
        checkpoint_entries: 10,
        encryption: Some(Encryption {
            keyring,
            file: Some(keyring_file.to_path_buf()),
            seal: true,
        }),
        ..options(dir)
    }
}

fn proved(a: &Archive) -> proof::Proof {
    a.checkpoint_now().unwrap();
    let p = a
        .prove(vec![], proof::Start::Genesis, &[], |_, _| {})
        .unwrap();
    assert!(p.holds(), "{:?}", p.breaks);
    p
}

#[test]
fn an_encrypted_archive_holds_no_plaintext_and_rotation_and_rekey_keep_every_item() {
    let state = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let ring = keys.path().join("archive.keyring");
    let o = encrypted(state.path(), &ring);
    let first = Keyring::load(&ring).unwrap().unwrap().current_info().id;
    let a = Archive::open(&o).unwrap();
    eventful(&a);
    let before = contents(&a);
    assert_eq!(before.1 .0, 45);
    assert_eq!(plaintext_in_segments(state.path()), Vec::<String>::new());
    let p = proved(&a);
    assert_eq!(p.keys, [format!("{first:08x}")]);
    assert_eq!(p.clear, 0, "every record sealed: {p:?}");
    assert!(p.sealed[&format!("{first:08x}")] > 100, "{p:?}");
    assert_eq!((p.items, p.bodies), (45, 45));

    // Rotation: the keyring file gains the key before anything is sealed with it; new records
    // name it; the old key still opens the old ones.
    let second = a.rotate_key().unwrap().id;
    assert_ne!(second, first);
    let on_disk = Keyring::load(&ring).unwrap().unwrap();
    assert_eq!(
        on_disk.infos().iter().map(|k| k.id).collect::<Vec<_>>(),
        [first, second]
    );
    for i in 0..5u32 {
        let raw = format!("Subject: event after rotation {i}\r\n\r\nbody {i}\r\n").into_bytes();
        a.archive(
            crate::tests::incoming(&format!("r-{i}"), &raw, "late@example.net"),
            &raw,
        )
        .unwrap();
    }
    let after_rotation = contents(&a);
    assert_eq!(&after_rotation.0[..45], &before.0[..]);
    let p = proved(&a);
    assert_eq!(p.keys, [format!("{first:08x}"), format!("{second:08x}")]);
    assert_eq!(p.sealed.len(), 2, "{p:?}");

    // Rekey: every record sealed with the current key, every item's bytes the same.
    let report = a.rekey().unwrap();
    assert!(report.resealed > 100, "{report:?}");
    assert_eq!(contents(&a), after_rotation);
    let p = proved(&a);
    assert_eq!(
        p.sealed.keys().cloned().collect::<Vec<_>>(),
        [format!("{second:08x}")]
    );
    assert_eq!(p.clear, 0);
    // A second rekey has nothing to do.
    assert_eq!(a.rekey().unwrap().resealed, 0);
    assert_eq!(plaintext_in_segments(state.path()), Vec::<String>::new());

    // An auditor's copy: without the keyring the proof names the key it needs; with it, holds.
    drop(a);
    let p = proof::prove_dir(state.path(), vec![], proof::Start::Genesis, &[], None).unwrap();
    assert!(!p.holds());
    assert!(
        p.breaks[0]
            .what
            .contains(&format!("sealed (key {second:08x}) and no keyring")),
        "{:?}",
        p.breaks[0]
    );
    let keyring = Arc::new(Keyring::load(&ring).unwrap().unwrap());
    let prove_with_keyring = || {
        proof::prove_dir(
            state.path(),
            vec![],
            proof::Start::Genesis,
            &[],
            Some(keyring.clone()),
        )
        .unwrap()
    };
    let p = prove_with_keyring();
    assert!(p.holds(), "{:?}", p.breaks);
    // An insider who flips a byte of a sealed record and fits its checksum again is named:
    // the record fails authentication.
    let seg = state.path().join("segments").join(
        std::fs::read_dir(state.path().join("segments"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| {
                std::fs::metadata(state.path().join("segments").join(n))
                    .unwrap()
                    .len()
                    > 0
            })
            .min()
            .unwrap(),
    );
    let original = std::fs::read(&seg).unwrap();
    let mut data = original.clone();
    data[record::FRAME_HEAD + 40] ^= 1;
    let len = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
    let crc = crc32c::crc32c(&data[record::FRAME_HEAD..record::FRAME_HEAD + len]);
    data[8..12].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&seg, &data).unwrap();
    let p = prove_with_keyring();
    assert!(
        p.breaks
            .iter()
            .any(|b| b.at.ends_with("offset 0") && b.what.contains("fails authentication")),
        "{:?}",
        p.breaks
    );
    std::fs::write(&seg, &original).unwrap();

    // After the rekey the old key can go: a keyring of the current key alone reads everything.
    let text = std::fs::read_to_string(&ring).unwrap();
    let without_first: String = text
        .lines()
        .filter(|l| !l.starts_with(&format!("key {first:08x}")))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without_first, text);
    std::fs::write(&ring, &without_first).unwrap();
    let a = Archive::open(&encrypted(state.path(), &ring)).unwrap();
    assert_eq!(contents(&a), after_rotation);
    drop(a);

    // Another archive's keyring, or none: refused at open, naming the key.
    let other = keys.path().join("other.keyring");
    let err = Archive::open(&encrypted(state.path(), &other))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains(&format!("lacks key {second:08x}")),
        "{err}"
    );
    let err = Archive::open(&Options {
        segment_bytes_max: 4096,
        ..options(state.path())
    })
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("no keyring is configured"),
        "{err}"
    );
}

#[test]
fn a_clear_archive_is_sealed_whole_by_rekey_and_a_lost_catalog_needs_the_keyring() {
    let state = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let ring = keys.path().join("archive.keyring");
    let clear = Options {
        segment_bytes_max: 4096,
        ..options(state.path())
    };
    let before = {
        let a = Archive::open(&clear).unwrap();
        eventful(&a);
        contents(&a)
    };
    // Seen failing: the same mail in clear shows its words in the segments.
    assert!(!plaintext_in_segments(state.path()).is_empty());
    let a = Archive::open(&encrypted(state.path(), &ring)).unwrap();
    let report = a.rekey().unwrap();
    assert!(report.segments > 0 && report.resealed > 0, "{report:?}");
    assert_eq!(contents(&a), before);
    assert_eq!(plaintext_in_segments(state.path()), Vec::<String>::new());
    let p = proved(&a);
    assert_eq!(p.clear, 0, "{p:?}");
    drop(a);

    // The catalog lost: without the keyring the rebuild is refused, naming the key; with it,
    // the same items come back.
    std::fs::remove_dir_all(state.path().join("catalog")).unwrap();
    std::fs::remove_dir_all(state.path().join("index")).unwrap();
    {
        let a = Archive::open(&clear).unwrap();
        let err = a.rebuild(|_| {}).err().unwrap();
        assert!(
            err.to_string()
                .contains("cannot be rebuilt without its keyring"),
            "{err}"
        );
    }
    let a = Archive::open(&encrypted(state.path(), &ring)).unwrap();
    wait_rebuilt(&a);
    a.rebuild(|_| {}).unwrap();
    assert_eq!(contents(&a).0, before.0);
}
