//! The archive as evidence through the real daemon and spoolctl: the unit's signing key is made
//! private at first start and stays out of the archive; `spoolctl archive verify` proves the
//! chain, checkpoints and bodies on the unit; an auditor proves a copied-out archive with
//! `spoolctl archive verify --dir` and the public key alone (no daemon); a cut tail, a body
//! replaced under its own hash and a stranger's key each fail the proof, named, with exit 1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use tests::{send_numbered, spoolctl, wait_until, write_config, Daemon, SmtpSink};

fn ctl_json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json", "archive"];
    all.extend_from_slice(args);
    let (code, out, err) = spoolctl(d, &all);
    assert_eq!(code, 0, "spoolctl archive {args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap()
}

/// `spoolctl archive verify --dir …` with no daemon and no state directory: exit code, stdout.
fn verify_offline(dir: &Path, args: &[&str]) -> (i32, String) {
    let bin = tests::spoold_bin().with_file_name("spoolctl");
    let out = Command::new(bin)
        .args(["archive", "verify", "--dir"])
        .arg(dir)
        .args(args)
        .env_remove("SPOOLPAIR_STATE_DIR")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// What an auditor receives: the archive's `segments/` and `checkpoints`.
fn copy_out(archive: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    std::fs::create_dir(to.path().join("segments")).unwrap();
    for e in std::fs::read_dir(archive.join("segments")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.path().join("segments").join(e.file_name())).unwrap();
    }
    std::fs::copy(archive.join("checkpoints"), to.path().join("checkpoints")).unwrap();
    to
}

fn newest_segment(dir: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

#[test]
fn an_auditor_proves_a_copied_out_archive_with_the_public_key_alone_and_tampering_fails() {
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "node_name = \"ev\"\n[delivery]\ndefault_next_hop = \"{}\"\n[archive]\ncheckpoint_entries = 25\n",
            sink.addr
        ),
    );
    let mut d = Daemon::start_delivering(&["--config", &cfg]);
    let sent = send_numbered(d.smtp, 0, 120);
    assert_eq!(sent.len(), 120);
    assert!(wait_until(60, || d.spooled_ids().is_empty()));

    // The key: private, outside the archive directory; its public half printed.
    let key = ctl_json(&d, &["key"]);
    let public = key["public_key"].as_str().unwrap().to_string();
    assert_eq!(public.len(), 64);
    let key_file = Path::new(key["key_file"].as_str().unwrap()).to_path_buf();
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let archive = d.state.join("archive");
    assert!(!key_file.starts_with(&archive), "{}", key_file.display());
    let secret = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_string();
    // The keyring (encryption at rest is on by default): private, outside the archive too.
    assert_eq!(key["encryption"], true, "{key}");
    let keyring = Path::new(key["keyring"].as_str().unwrap()).to_path_buf();
    assert_eq!(
        std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!keyring.starts_with(&archive), "{}", keyring.display());
    let data_key = key["data_keys"][0]["id"].as_str().unwrap().to_string();
    let keyring_arg = keyring.to_str().unwrap().to_string();

    // On the unit: the proof holds, one entry per item after the genesis.
    let v = ctl_json(&d, &["verify"]);
    let proof = &v["proof"];
    assert_eq!(proof["break_count"], 0, "{v}");
    assert_eq!(proof["items"], 120);
    assert_eq!(proof["bodies"], 120);
    assert_eq!(
        proof["entries"], 122,
        "the genesis, the data key, 120 items"
    );
    assert!(proof["checkpoints"].as_u64().unwrap() >= 4, "{v}");
    assert_eq!(v["failed"].as_array().unwrap().len(), 0);

    // A clean stop signs the head; the auditor gets a copy and the public key.
    assert_eq!(d.stop(), Some(0));
    let copy = copy_out(&archive);
    for e in walk(copy.path()) {
        let bytes = std::fs::read(&e).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the private key is in {}",
            e.display()
        );
    }
    // Without the keyring the auditor is told which key the sealed records need.
    let (code, out) = verify_offline(copy.path(), &["--public-key", &public]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("sealed (key {data_key}) and no keyring was given")),
        "{out}"
    );
    let (code, out) = verify_offline(
        copy.path(),
        &["--public-key", &public, "--keyring", &keyring_arg],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("PROVED"), "{out}");
    assert!(out.contains("chain of 122 entries"), "{out}");
    assert!(out.contains("checked against the keys given"), "{out}");

    // A stranger's key: every checkpoint is named.
    let stranger = "11".repeat(32);
    let (code, out) = verify_offline(
        copy.path(),
        &["--public-key", &stranger, "--keyring", &keyring_arg],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not given to the verifier"), "{out}");

    // The tail cut off: the last checkpoint signs more than the segments hold.
    let cut = copy_out(&archive);
    let seg = newest_segment(cut.path());
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let (code, out) = verify_offline(
        cut.path(),
        &["--public-key", &public, "--keyring", &keyring_arg],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN"), "{out}");
    assert!(
        out.contains("cut off or deleted") || out.contains("record cut short"),
        "{out}"
    );
    assert!(out.contains("NOT PROVED"), "{out}");

    // The unit goes on: a restart, more mail, still proved, the chain continued.
    d.restart();
    let more = send_numbered(d.smtp, 120, 10);
    assert_eq!(more.len(), 10);
    assert!(wait_until(60, || d.spooled_ids().is_empty()));
    let v = ctl_json(&d, &["verify"]);
    assert_eq!(v["proof"]["break_count"], 0, "{v}");
    assert_eq!(v["proof"]["entries"], 132);
    let v = ctl_json(&d, &["verify", "--from-checkpoint"]);
    assert_eq!(v["proof"]["break_count"], 0, "{v}");
    assert!(v["proof"]["from"].as_u64().unwrap() >= 122, "{v}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Every request for archive content leaves exactly one audit entry, in order, with the asker's
/// uid and name and the items it touched; the log proves on the unit and as a copy; an edited
/// line is named; a full audit disk refuses the request (nothing answered unrecorded) until
/// there is room again.
#[test]
fn each_request_for_archive_content_is_recorded_once_and_a_full_audit_disk_refuses_it() {
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let audit_dir = dir.path().join("audit");
    let _tmpfs = tests::Tmpfs::mount(&audit_dir, "256k");
    let cfg = write_config(
        dir.path(),
        &format!(
            "node_name = \"au\"\n[delivery]\ndefault_next_hop = \"{}\"\n[archive]\naudit_dir = \"{}\"\n",
            sink.addr,
            audit_dir.display()
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    assert_eq!(send_numbered(d.smtp, 0, 5).len(), 5);
    assert!(wait_until(60, || d.spooled_ids().is_empty()));
    assert!(wait_until(30, || {
        let st = ctl_json(&d, &["status"]);
        st["indexed_through"] == st["last_seq"]
    }));
    let before = audit_list(&d).len();
    assert_eq!(before, 1, "the genesis only: status is not content");

    let found = ctl_json(&d, &["search", "from:load"]);
    let seqs: Vec<String> = found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seq"].to_string())
        .collect();
    assert_eq!(seqs.len(), 5, "{found}");
    ctl_json(&d, &["show", "2"]);
    ctl_json(&d, &["export", "3"]);
    ctl_json(&d, &["hold", "4"]);
    ctl_json(&d, &["unhold", "4"]);
    ctl_json(&d, &["key"]);
    ctl_json(&d, &["verify"]);
    ctl_json(&d, &["retention"]);
    ctl_json(&d, &["status"]);
    let entries = audit_list(&d);
    let got: Vec<(String, String, Vec<String>)> = entries[1..]
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["detail"].as_str().unwrap().to_string(),
                e["which"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|w| w.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    let one = |s: &str| vec![s.to_string()];
    assert_eq!(
        got,
        vec![
            ("archive search".into(), "from:load".into(), seqs.clone()),
            ("archive show".into(), "2".into(), one("2")),
            ("archive export".into(), "3".into(), one("3")),
            ("archive hold".into(), "4".into(), one("4")),
            ("archive unhold".into(), "4".into(), one("4")),
            ("archive key".into(), String::new(), vec![]),
            ("archive verify".into(), String::new(), vec![]),
            ("archive retention".into(), String::new(), vec![]),
        ]
    );
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    for e in &entries[1..] {
        assert_eq!(e["uid"], uid, "{e}");
        assert_eq!(e["user"], if uid == 0 { "root" } else { "" }, "{e}");
    }
    let (code, out, err) = spoolctl(&d, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("PROVED"), "{out}");

    // A copy, with one query edited: named, exit 1.
    let public = ctl_json(&d, &["key"])["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let copy = tempfile::tempdir().unwrap();
    for f in ["audit.log", "audit.checkpoints"] {
        std::fs::copy(audit_dir.join(f), copy.path().join(f)).unwrap();
    }
    let bin = tests::spoold_bin().with_file_name("spoolctl");
    let offline = |dir: &Path| {
        let out = Command::new(&bin)
            .args(["audit", "verify", "--public-key", &public, "--dir"])
            .arg(dir)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = offline(copy.path());
    assert_eq!(code, 0, "{out}");
    let log = copy.path().join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("from:load", "from:nobody", 1)).unwrap();
    let (code, out) = offline(copy.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN audit line 3"), "{out}");

    // The audit disk full: a search is refused, not answered unrecorded.
    let filler = audit_dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    let (code, out, err) = spoolctl(&d, &["--json", "archive", "search", "from:load"]);
    assert_ne!(code, 0, "answered with a full audit disk: {out}");
    assert!(err.contains("audit log cannot record"), "{err}");
    assert!(!out.contains("\"items\""), "{out}");
    assert!(d.metric("spoold_archive_audit_failures_total").unwrap() >= 1.0);
    std::fs::remove_file(&filler).unwrap();
    ctl_json(&d, &["search", "from:load"]);
    let after = audit_list(&d);
    // The key asked above and the search with room again; the refused search left nothing.
    assert_eq!(
        after[entries.len()..]
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["archive key", "archive search"]
    );
    let (code, out, _) = spoolctl(&d, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}");
}

fn audit_list(d: &Daemon) -> Vec<Value> {
    let (code, out, err) = spoolctl(d, &["--json", "audit", "list"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Encryption at rest through the daemon (on by default): no envelope of the mail in the
/// archive's segments; `archive key rotate` adds a data key (the keyring file first) and
/// `archive rekey` seals every record with it; every export stays byte-exact throughout; both
/// are in the audit log; the proof holds and names the keys.
#[test]
fn rotation_and_rekey_keep_every_export_exact_and_the_segments_hold_no_plaintext() {
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "node_name = \"rk\"\n[delivery]\ndefault_next_hop = \"{}\"\n[archive]\nsegment_bytes_max = 1048576\n",
            sink.addr
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let items = |d: &Daemon| ctl_json(d, &["status"])["items"].as_u64().unwrap();
    let exports = |d: &Daemon, n: u64| -> Vec<Vec<u8>> {
        (1..=n)
            .map(|seq| {
                let out = tests::spoolctl_output(d, &["archive", "export", &seq.to_string()]);
                assert!(out.status.success(), "export {seq}");
                out.stdout
            })
            .collect()
    };
    assert_eq!(send_numbered(d.smtp, 0, 30).len(), 30);
    assert!(wait_until(60, || items(&d) == 30));
    let before = exports(&d, 30);
    let first = ctl_json(&d, &["key"])["data_keys"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let rotated = ctl_json(&d, &["key", "rotate"]);
    let keys = rotated["data_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{rotated}");
    assert_eq!(keys[0]["id"], first.as_str());
    assert_eq!(keys[1]["current"], true);
    let second = keys[1]["id"].as_str().unwrap().to_string();
    assert_eq!(rotated["chain_key"], second.as_str());
    let keyring = Path::new(rotated["keyring"].as_str().unwrap()).to_path_buf();
    let lines = std::fs::read_to_string(&keyring).unwrap();
    assert_eq!(lines.lines().filter(|l| l.starts_with("key ")).count(), 2);
    assert_eq!(
        std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(send_numbered(d.smtp, 30, 10).len(), 10);
    assert!(wait_until(60, || items(&d) == 40));
    let mut all = before.clone();
    all.extend(exports(&d, 40).split_off(30));
    assert_eq!(exports(&d, 40), all, "after the rotation");
    let v = ctl_json(&d, &["verify"]);
    assert_eq!(v["proof"]["break_count"], 0, "{v}");
    let sealed: std::collections::BTreeSet<&String> =
        v["proof"]["sealed"].as_object().unwrap().keys().collect();
    assert_eq!(sealed, [&first, &second].into_iter().collect(), "{v}");

    let rekeyed = ctl_json(&d, &["rekey"]);
    assert_eq!(rekeyed["key"], second.as_str(), "{rekeyed}");
    assert!(rekeyed["resealed"].as_u64().unwrap() >= 60, "{rekeyed}");
    assert_eq!(exports(&d, 40), all, "after the rekey");
    let v = ctl_json(&d, &["verify"]);
    assert_eq!(v["proof"]["break_count"], 0, "{v}");
    assert_eq!(v["proof"]["clear"], 0, "{v}");
    let sealed: Vec<&String> = v["proof"]["sealed"].as_object().unwrap().keys().collect();
    assert_eq!(sealed, [&second], "{v}");
    assert_eq!(
        v["proof"]["keys"],
        serde_json::json!([first.as_str(), second.as_str()]),
        "the chain names both keys: {v}"
    );

    // The envelope of the mail appears in no segment (in clear it does: the object store test).
    for seg in walk(&d.state.join("archive/segments")) {
        let bytes = std::fs::read(&seg).unwrap();
        for plaintext in [&b"rcpt@example.org"[..], b"load@example.com"] {
            assert!(
                !bytes.windows(plaintext.len()).any(|w| w == plaintext),
                "{} in {}",
                String::from_utf8_lossy(plaintext),
                seg.display()
            );
        }
    }
    let actions: Vec<String> = audit_list(&d)
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .filter(|a| a.starts_with("archive key") || a == "archive rekey")
        .collect();
    assert_eq!(
        actions,
        ["archive key", "archive key rotate", "archive rekey"]
    );
}
