//! Importing history through the daemon (`spoolctl archive import`): an awkward corpus built
//! here (mboxrd with `From ` lines in bodies, CRLF and LF, an 8-bit header, a truncated last
//! message; a Maildir holding a message the mbox holds too; a directory of .eml files with an
//! empty one, a non-mail one and one above the size limit; a path that does not exist): every
//! verdict and reason right, every archived item's bytes exact, a rerun adds nothing, and an
//! import killed with the daemon and run again loses nothing and archives nothing twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use tests::{spoolctl, wait_until, write_config, Daemon};

fn message(i: usize, crlf: bool, extra: &str) -> Vec<u8> {
    let nl = if crlf { "\r\n" } else { "\n" };
    format!(
        "From: Sender {i} <s{i}@example.com>{nl}To: r{i}@example.org{nl}Subject: import {i}{nl}Message-ID: <{i}@import.test>{nl}Date: Sat, 3 Jan 1996 01:05:34 +0000{nl}{nl}body of {i}{nl}{extra}"
    )
    .into_bytes()
}

/// An mboxrd file of `messages` (each followed by its empty line), then `tail` as is; and
/// where each message (and the tail) starts.
fn mbox(messages: &[Vec<u8>], tail: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::new();
    let mut starts = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        starts.push(out.len());
        out.extend_from_slice(
            format!("From s{i}@example.com Wed Jan  3 01:05:34 1996\n").as_bytes(),
        );
        archive::import::quote(m, &mut out);
        out.extend_from_slice(b"\n");
    }
    starts.push(out.len());
    out.extend_from_slice(tail);
    (out, starts)
}

fn import(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json", "archive", "import"];
    all.extend_from_slice(args);
    let (code, out, err) = spoolctl(d, &all);
    assert_eq!(code, 0, "archive import {args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap()
}

fn export(d: &Daemon, seq: &str) -> Vec<u8> {
    let out = tests::spoolctl_output(d, &["archive", "export", seq]);
    assert!(out.status.success(), "export {seq}");
    out.stdout
}

fn items(d: &Daemon) -> u64 {
    let (code, out, _) = spoolctl(d, &["--json", "archive", "status"]);
    assert_eq!(code, 0);
    serde_json::from_str::<Value>(&out).unwrap()["items"]
        .as_u64()
        .unwrap()
}

/// The report's lines (after its header): verdict, source file name, place, item or reason.
fn report(path: &Path) -> Vec<(String, String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let name = Path::new(f[1])
                .file_name()
                .map_or(f[1].to_string(), |n| n.to_string_lossy().into_owned());
            (f[0].into(), name, f[2].into(), f[3].into())
        })
        .collect()
}

#[test]
fn an_awkward_corpus_gets_a_verdict_per_message_exact_bytes_and_a_rerun_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // In the mbox: `From ` lines in a body (quoted by the writer, unquoted by the reader), CRLF
    // and LF messages, an 8-bit header, and a last message cut short.
    let m1 = message(
        1,
        true,
        "From the start of a line\r\n>From quoted once\r\n\r\nFrom after an empty line\r\n",
    );
    let mut m2 = message(2, false, "");
    m2.splice(0..0, b"X-Latin1: Gr\xfc\xdfe\n".iter().copied());
    let m3 = message(3, true, "");
    let (mbox_bytes, starts) = mbox(
        &[m1.clone(), m2.clone(), m3.clone()],
        b"From cut@example.com Wed Jan  3 01:05:34 1996\nSubject: cut\n\npart",
    );
    std::fs::write(src.join("history.mbox"), &mbox_bytes).unwrap();
    // A Maildir: message 3 again (a duplicate across sources) and a new one.
    let maildir = src.join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(sub)).unwrap();
    }
    let m4 = message(4, true, "");
    std::fs::write(maildir.join("cur/1700000000.M1.host:2,S"), &m3).unwrap();
    std::fs::write(maildir.join("new/1700000001.M2.host"), &m4).unwrap();
    // .eml files: one good, one empty, one not mail, one above the limit (64 KiB here).
    let emls = src.join("eml");
    std::fs::create_dir_all(&emls).unwrap();
    let m5 = message(5, true, "");
    std::fs::write(emls.join("a.eml"), &m5).unwrap();
    std::fs::write(emls.join("empty.eml"), b"").unwrap();
    std::fs::write(
        emls.join("notes.eml"),
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
    )
    .unwrap();
    let big = message(6, true, &"x".repeat(100 * 1024));
    std::fs::write(emls.join("big.eml"), &big).unwrap();

    let cfg = write_config(
        dir.path(),
        "node_name = \"im\"\n[smtp]\nmessage_bytes_max = 65536\n",
    );
    let d = Daemon::start_in(&dir.path().join("state"), &["--config", &cfg]);
    let report_file = dir.path().join("report.tsv");
    let paths = [
        src.join("history.mbox"),
        maildir.clone(),
        emls.clone(),
        src.join("missing.mbox"),
    ];
    let mut args: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    args.push("--report".into());
    args.push(report_file.display().to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let done = import(&d, &argv);
    assert_eq!(
        (
            done["archived"].as_u64(),
            done["duplicates"].as_u64(),
            done["rejected"].as_u64()
        ),
        (Some(5), Some(1), Some(5)),
        "{done}"
    );
    let kinds: Vec<&str> = done["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["mbox", "maildir", "files", "unreadable"]);

    let lines = report(&report_file);
    // The same message in the mbox (its fourth from last) and in the Maildir: whichever of
    // the workers gets to it first archives it, the other finds it a duplicate.
    let twins: Vec<(String, String)> = lines
        .iter()
        .filter(|(_, name, at, _)| {
            name == "1700000000.M1.host:2,S" || at == &format!("byte {}", starts[2])
        })
        .map(|(v, name, _, _)| (v.clone(), name.clone()))
        .collect();
    let mut twin_verdicts: Vec<&str> = twins.iter().map(|(v, _)| v.as_str()).collect();
    twin_verdicts.sort_unstable();
    assert_eq!(twin_verdicts, ["archived", "duplicate"], "{twins:?}");
    let verdicts: BTreeSet<(String, String, String)> = lines
        .iter()
        .filter(|(_, name, at, _)| {
            name != "1700000000.M1.host:2,S" && at != &format!("byte {}", starts[2])
        })
        .map(|(v, name, at, what)| {
            let what = if v == "rejected" {
                what.split(':').next().unwrap().to_string()
            } else {
                String::new()
            };
            (
                v.clone(),
                name.clone(),
                format!("{at} {what}").trim().to_string(),
            )
        })
        .collect();
    let cut_at = mbox_bytes.len();
    let want: BTreeSet<(String, String, String)> = [
        ("archived", "history.mbox", format!("byte {}", starts[0])),
        ("archived", "history.mbox", format!("byte {}", starts[1])),
        (
            "rejected",
            "history.mbox",
            format!("byte {} truncated at byte {cut_at}", starts[3]),
        ),
        ("archived", "1700000001.M2.host", "file".to_string()),
        ("archived", "a.eml", "file".to_string()),
        ("rejected", "big.eml", "file too large".to_string()),
        ("rejected", "empty.eml", "file empty file".to_string()),
        ("rejected", "notes.eml", "file not mail".to_string()),
        ("rejected", "missing.mbox", "path unreadable".to_string()),
    ]
    .into_iter()
    .map(|(v, n, a)| (v.to_string(), n.to_string(), a))
    .collect();
    assert_eq!(verdicts, want, "{lines:#?}");

    // Every archived item's bytes are the message's, exactly; the mbox's date is its arrival.
    let archived: Vec<String> = lines
        .iter()
        .filter(|l| l.0 == "archived")
        .map(|l| l.3.trim_start_matches("item ").to_string())
        .collect();
    let got: BTreeSet<Vec<u8>> = archived.iter().map(|s| export(&d, s)).collect();
    let originals: BTreeSet<Vec<u8>> = [&m1, &m2, &m3, &m4, &m5].into_iter().cloned().collect();
    assert_eq!(got, originals);
    // (Report lines come in the order the archive took the messages, not the source's.)
    let first = lines
        .iter()
        .find(|l| l.1 == "history.mbox" && l.2 == "byte 0")
        .map(|l| l.3.trim_start_matches("item ").to_string())
        .unwrap();
    let (code, out, _) = spoolctl(&d, &["--json", "archive", "show", &first]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["item"]["arrived_ms"], 820_631_134_000u64, "{shown}");
    assert_eq!(shown["item"]["sender"], "s1@example.com", "{shown}");
    assert_eq!(
        shown["item"]["recipients"],
        serde_json::json!(["r1@example.org"])
    );

    // A rerun adds nothing: every message is a duplicate now, the refusals the same.
    let again = import(&d, &argv[..4]);
    assert_eq!(
        (
            again["archived"].as_u64(),
            again["duplicates"].as_u64(),
            again["rejected"].as_u64()
        ),
        (Some(0), Some(6), Some(5)),
        "{again}"
    );
    assert_eq!(items(&d), 5);
    // The audit log has each import.
    let (_, out, _) = spoolctl(&d, &["--json", "audit", "list"]);
    let imports = serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "archive import")
        .count();
    assert_eq!(imports, 2);
}

/// An import killed with the daemon (kill -9) part-way through a large mbox, then run again:
/// every message archived exactly once.
#[test]
fn an_import_killed_part_way_and_run_again_archives_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    const N: usize = 20_000;
    let messages: Vec<Vec<u8>> = (0..N)
        .map(|i| message(i, true, &"line\r\n".repeat(50)))
        .collect();
    let file = dir.path().join("big.mbox");
    std::fs::write(&file, mbox(&messages, b"").0).unwrap();
    let cfg = write_config(dir.path(), "node_name = \"ik\"\n");
    let mut d = Daemon::start_in(&dir.path().join("state"), &["--config", &cfg]);
    let bin = tests::spoold_bin().with_file_name("spoolctl");
    let mut running = std::process::Command::new(&bin)
        .arg("--state-dir")
        .arg(&d.state)
        .args(["archive", "import"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(60, || items(&d) >= 200),
        "the import did not start"
    );
    d.kill9();
    let _ = running.wait();
    let before = {
        d.restart();
        items(&d)
    };
    assert!(
        before > 0 && before < N as u64,
        "killed part-way: {before} of {N}"
    );
    let done = import(&d, &[file.to_str().unwrap()]);
    assert_eq!(
        (
            done["archived"].as_u64().unwrap() + done["duplicates"].as_u64().unwrap(),
            done["rejected"].as_u64()
        ),
        (N as u64, Some(0)),
        "{done}"
    );
    assert_eq!(done["duplicates"].as_u64(), Some(before), "{done}");
    assert_eq!(items(&d), N as u64);
    // Each message once: the archive finds N of them (once the index has caught up).
    assert!(wait_until(60, || {
        let (_, out, _) = spoolctl(&d, &["--json", "archive", "status"]);
        let st: Value = serde_json::from_str(&out).unwrap();
        st["indexed_through"] == st["last_seq"]
    }));
    let (code, out, err) = spoolctl(
        &d,
        &[
            "--json",
            "archive",
            "search",
            "subject:import",
            "--limit",
            "100000",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let found: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(found["total"], N, "every message searchable, once");
    // The items listed (a search lists at most 10,000) are distinct messages.
    let subjects: BTreeSet<String> = found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["subject"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(subjects.len(), found["items"].as_array().unwrap().len());
    // Each result names its message and why it matched: the Message-ID goes with the
    // subject's number, and each field a word was found in is named ("17" is in the
    // subject, the sender's name and the body).
    let (code, out, err) = spoolctl(
        &d,
        &["--json", "archive", "search", "import 17", "--limit", "5"],
    );
    assert_eq!(code, 0, "{err}");
    let found: Value = serde_json::from_str(&out).unwrap();
    let hits: Vec<(String, String, Vec<String>)> = found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["subject"].as_str().unwrap_or("").to_string(),
                i["message_id"].as_str().unwrap_or("").to_string(),
                serde_json::from_value(i["matched"].clone()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        hits,
        vec![(
            "import 17".to_string(),
            "17@import.test".to_string(),
            vec![
                "subject".to_string(),
                "from".to_string(),
                "body".to_string()
            ]
        )],
        "{found}"
    );
    let text = tests::spoolctl_ok(&d, &["archive", "search", "import 17"]);
    assert!(
        text.contains("message-id <17@import.test>  matched: subject, from, body"),
        "{text}"
    );
}

/// Bulk export for discovery: every item of one unit exported as an mbox and imported into a
/// fresh unit comes back byte for byte; the Maildir export holds the same bytes; the manifest
/// is signed by the unit's key over its item lines, names each item's hash, and an edited line
/// fails the signature; the export is audited with the items it wrote.
#[test]
fn a_bulk_export_imported_into_a_fresh_unit_reproduces_every_item_and_its_manifest_is_signed() {
    let dir = tempfile::tempdir().unwrap();
    let messages: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            let crlf = i % 2 == 0;
            let extra = if i % 5 == 0 {
                if crlf {
                    "From a line in the body\r\n>From a quoted one\r\n".to_string()
                } else {
                    "From a line in the body\n>>From twice quoted\n".to_string()
                }
            } else {
                String::new()
            };
            message(100 + i, crlf, &extra)
        })
        .collect();
    let file = dir.path().join("source.mbox");
    std::fs::write(&file, mbox(&messages, b"").0).unwrap();
    let cfg = write_config(dir.path(), "node_name = \"ex\"\n");
    let a = Daemon::start_in(&dir.path().join("a"), &["--config", &cfg]);
    let done = import(&a, &[file.to_str().unwrap()]);
    assert_eq!(done["archived"], 40, "{done}");

    let out = dir.path().join("discovery.mbox");
    let everything = |format: &str, out: &Path| {
        spoolctl(
            &a,
            &[
                "archive",
                "export",
                "--query",
                "after:1970-01-01",
                "--format",
                format,
                "--out",
                out.to_str().unwrap(),
            ],
        )
    };
    let (code, text, err) = everything("mbox", &out);
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.contains("exported 40 item(s)"), "{text}");
    // Never over an existing file.
    let (code, _, err) = everything("mbox", &out);
    assert_ne!(code, 0);
    assert!(err.contains("never writes over"), "{err}");

    // The manifest: 40 item lines, then the closing line signed by the unit's key.
    let manifest =
        std::fs::read_to_string(dir.path().join("discovery.mbox.manifest.jsonl")).unwrap();
    let lines: Vec<&str> = manifest.lines().collect();
    assert_eq!(lines.len(), 41);
    let end: Value = serde_json::from_str(lines[40]).unwrap();
    assert_eq!(end["count"], 40);
    assert_eq!(end["query"], "after:1970-01-01");
    let (_, key_out, _) = spoolctl(&a, &["--json", "archive", "key"]);
    let public = serde_json::from_str::<Value>(&key_out).unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(end["key"], public.as_str());
    assert!(end["checkpoint"].as_str().is_some(), "{end}");
    let holds = |item_lines: &str| {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(item_lines.as_bytes()).into();
        evidence::checkpoint::digest_signature_holds(
            &evidence::unhex(&public).unwrap(),
            archive::exporter::MANIFEST_CONTEXT,
            &digest,
            &evidence::unhex(end["signature"].as_str().unwrap()).unwrap(),
        )
    };
    let item_lines: String = lines[..40].iter().map(|l| format!("{l}\n")).collect();
    assert!(holds(&item_lines));
    assert!(
        !holds(&item_lines.replacen("\"size\":", "\"size\":1", 1)),
        "an edited line"
    );
    let hashes: BTreeSet<String> = lines[..40]
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["sha256"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let want: BTreeSet<String> = messages
        .iter()
        .map(|m| {
            use sha2::Digest;
            evidence::hex(&sha2::Sha256::digest(m))
        })
        .collect();
    assert_eq!(hashes, want);

    // Imported into a fresh unit: the same 40 messages, byte for byte.
    let b = Daemon::start_in(&dir.path().join("b"), &["--config", &cfg]);
    let done = import(&b, &[out.to_str().unwrap()]);
    assert_eq!(
        (done["archived"].as_u64(), done["rejected"].as_u64()),
        (Some(40), Some(0)),
        "{done}"
    );
    let got: BTreeSet<Vec<u8>> = (1..=40).map(|s| export(&b, &s.to_string())).collect();
    let originals: BTreeSet<Vec<u8>> = messages.iter().cloned().collect();
    assert_eq!(got, originals);

    // The Maildir export: the same bytes, one file each in new/.
    let md = dir.path().join("discovery.maildir");
    let (code, text, err) = everything("maildir", &md);
    assert_eq!(code, 0, "{text}{err}");
    let files: BTreeSet<Vec<u8>> = std::fs::read_dir(md.join("new"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(files, originals);

    // The receiver's check, with the public key alone and no daemon: both exports prove; a
    // byte changed in a message, or a message added, is named (exit 1).
    let verify_export = |path: &Path| {
        let out = std::process::Command::new(tests::spoold_bin().with_file_name("spoolctl"))
            .args(["archive", "verify-export"])
            .arg(path)
            .args(["--public-key", &public])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let zipped = dir.path().join("discovery.zip");
    let (code, text, err) = everything("eml-zip", &zipped);
    assert_eq!(code, 0, "{text}{err}");
    for path in [&out, &md, &zipped] {
        let (code, text) = verify_export(path);
        assert_eq!(code, 0, "{text}");
        assert!(
            text.contains("40 item(s) listed, 40 whole") && text.contains("PROVED"),
            "{text}"
        );
    }
    let mut mbox_bytes = std::fs::read(&out).unwrap();
    let at = mbox_bytes
        .windows(11)
        .position(|w| w == b"body of 107")
        .unwrap();
    mbox_bytes[at] = b'B';
    std::fs::write(&out, &mbox_bytes).unwrap();
    let (code, text) = verify_export(&out);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("BROKEN item") && text.contains("are not the"),
        "{text}"
    );
    std::fs::write(
        md.join("new/9999.extra.spoolpair"),
        b"Subject: slipped in\r\n\r\n",
    )
    .unwrap();
    let (code, text) = verify_export(&md);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("new/9999.extra.spoolpair: a message the manifest does not list"),
        "{text}"
    );

    // Audited, with the items each export wrote.
    let (_, out, _) = spoolctl(&a, &["--json", "audit", "list"]);
    let exports: Vec<u64> = serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "archive export" && e["detail"] == "after:1970-01-01")
        .map(|e| e["items"].as_u64().unwrap())
        .collect();
    assert_eq!(
        exports,
        [40, 40, 40, 40],
        "three written, one refused: each asked is recorded"
    );
}

/// Journal intake over SMTP: a plain journal copy is archived (its envelope from its header
/// fields) and not delivered; an Exchange envelope journal report is archived as its original,
/// byte for byte, with the report's recipients (Bcc included) as its envelope, the report kept
/// beside it; a message to a journal address and a real recipient is delivered to the real one
/// only; a client the relay policy does not trust may not journal.
#[test]
fn journal_copies_and_envelope_reports_are_archived_not_delivered_and_strangers_may_not_journal() {
    let sink = tests::SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "node_name = \"jr\"\n[delivery]\ndefault_next_hop = \"{}\"\n[archive]\njournal_recipients = [\"Journal@Archive.test\"]\n",
            sink.addr
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let plain = b"From: Alice <alice@contoso.com>\r\nTo: bob@contoso.com\r\nSubject: plain journal copy\r\nMessage-ID: <plain@contoso.com>\r\n\r\nA copy.\r\n";
    let original = b"From: Alice <alice@contoso.com>\r\nTo: bob@contoso.com\r\nSubject: Q3 numbers\r\nMessage-ID: <q3@contoso.com>\r\n\r\nThe numbers.\r\n";
    let mut report = b"From: Microsoft Exchange <journal@contoso.com>\r\nTo: journal@archive.test\r\nSubject: Q3 numbers\r\nX-MS-Journal-Report:\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"jr\"\r\n\r\n--jr\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSender: alice@contoso.com\r\nSubject: Q3 numbers\r\nMessage-Id: <q3@contoso.com>\r\nTo: bob@contoso.com\r\nCc: carol@contoso.com, Forwarded: team@contoso.com\r\nBcc: dave@contoso.com\r\n\r\n--jr\r\nContent-Type: message/rfc822\r\n\r\n".to_vec();
    report.extend_from_slice(original);
    report.extend_from_slice(b"\r\n--jr--\r\n");
    let both = b"From: erin@contoso.com\r\nTo: frank@example.org\r\nSubject: both\r\n\r\nto a person and the journal\r\n";
    let (mut c, _) = tests::Client::connect(d.smtp);
    assert!(c.cmd("EHLO mta.contoso.com").starts_with("250"));
    for (from, to, body) in [
        (
            "alice@contoso.com",
            vec!["journal@archive.test"],
            &plain[..],
        ),
        (
            "journal@contoso.com",
            vec!["journal@archive.test"],
            &report[..],
        ),
        (
            "erin@contoso.com",
            vec!["frank@example.org", "JOURNAL@archive.test"],
            &both[..],
        ),
    ] {
        let r = c.send_mail(from, &to, body);
        assert!(r.starts_with("250"), "{r}");
    }
    assert!(
        wait_until(60, || d.spooled_ids().is_empty()),
        "the spool empties"
    );
    // Delivered: the third message, to frank only.
    assert!(wait_until(10, || sink.dumped().len() == 1));
    let dumped = sink.dumped();
    assert_eq!(
        dumped[0].rcpt_args,
        ["<frank@example.org>"],
        "{:?}",
        dumped[0].rcpt_args
    );

    // Archived: the plain copy, the report's original and the report, the third message.
    assert_eq!(items(&d), 4);
    let shown: Vec<Value> = (1..=4)
        .map(|s| {
            let (code, out, _) = spoolctl(&d, &["--json", "archive", "show", &s.to_string()]);
            assert_eq!(code, 0);
            serde_json::from_str::<Value>(&out).unwrap()["item"].clone()
        })
        .collect();
    let find = |verdict_ends: &str, sender: &str| -> (String, Value) {
        let item = shown
            .iter()
            .find(|i| {
                i["verdict"].as_str().unwrap().ends_with(verdict_ends) && i["sender"] == sender
            })
            .unwrap_or_else(|| panic!("no {sender} ({verdict_ends}) in {shown:#?}"));
        (item["seq"].to_string(), item.clone())
    };
    let (seq, item) = find("; journal", "alice@contoso.com");
    assert_eq!(item["recipients"], serde_json::json!(["bob@contoso.com"]));
    assert!(
        export(&d, &seq).ends_with(plain),
        "the copy, after the Received: line we add"
    );
    let (seq, item) = find("; journal report", "alice@contoso.com");
    assert_eq!(
        item["recipients"],
        serde_json::json!(["bob@contoso.com", "carol@contoso.com", "dave@contoso.com"])
    );
    assert_eq!(
        export(&d, &seq),
        original.to_vec(),
        "the original, byte for byte"
    );
    let (_, the_report) = find("unscanned", "journal@contoso.com");
    assert!(
        the_report["id"].as_str().unwrap().ends_with(".report"),
        "{the_report}"
    );
    let (_, both_item) = find("; journal", "erin@contoso.com");
    assert_eq!(
        both_item["recipients"],
        serde_json::json!(["frank@example.org"])
    );

    // A stranger may not journal (nor relay).
    let stranger = tests::stranger_ip();
    let (mut c, _) = tests::Client::connect_from(d.smtp, stranger);
    assert!(c.cmd("EHLO outside.example").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<x@outside.example>").starts_with("250"));
    let r = c.cmd("RCPT TO:<journal@archive.test>");
    assert!(r.starts_with("554 5.7.1"), "{r}");
}

/// A Postfix instance of the test's own (its own configuration, queue and log under a temporary
/// directory): `always_bcc` sends a copy of every message to the journal address, routed to
/// spoold; everything else goes to `relay`. Stopped (`postfix abort`) when dropped.
struct Postfix {
    conf: std::path::PathBuf,
    smtp: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Postfix {
    fn start(journal_to: std::net::SocketAddr, relay: std::net::SocketAddr) -> Postfix {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let (conf, queue, data) = (d.join("conf"), d.join("queue"), d.join("data"));
        for p in [&conf, &queue, &data] {
            std::fs::create_dir_all(p).unwrap();
        }
        let chown = std::process::Command::new("chown")
            .arg("postfix")
            .arg(&data)
            .status()
            .unwrap();
        assert!(
            chown.success(),
            "chown postfix (the Debian package makes the user)"
        );
        let smtp = tests::free_addr();
        std::fs::write(
            conf.join("main.cf"),
            format!(
                "compatibility_level = 3.6\nqueue_directory = {q}\ndata_directory = {data}\nmail_owner = postfix\n\
                 setgid_group = postdrop\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nmyhostname = mta.test\n\
                 mydestination =\nmynetworks = 127.0.0.0/8\nrelayhost = [{rh}]:{rp}\nalways_bcc = journal@archive.test\n\
                 transport_maps = inline:{{ archive.test=smtp:[{jh}]:{jp} }}\nmaillog_file = {log}\n\
                 maillog_file_prefixes = {prefix}\nsmtp_tls_security_level = none\nsmtpd_tls_security_level = none\n",
                q = queue.display(),
                data = data.display(),
                rh = relay.ip(),
                rp = relay.port(),
                jh = journal_to.ip(),
                jp = journal_to.port(),
                log = d.join("maillog").display(),
                prefix = d.display(),
            ),
        )
        .unwrap();
        let services = [
            format!("{smtp} inet n - n - - smtpd"),
            "pickup unix n - n 60 1 pickup".into(),
            "cleanup unix n - n - 0 cleanup".into(),
            "qmgr unix n - n 300 1 qmgr".into(),
            "rewrite unix - - n - - trivial-rewrite".into(),
            "bounce unix - - n - 0 bounce".into(),
            "defer unix - - n - 0 bounce".into(),
            "trace unix - - n - 0 bounce".into(),
            "verify unix - - n - 1 verify".into(),
            "flush unix n - n 1000? 0 flush".into(),
            "proxymap unix - - n - - proxymap".into(),
            "smtp unix - - n - - smtp".into(),
            "relay unix - - n - - smtp".into(),
            "showq unix n - n - - showq".into(),
            "error unix - - n - - error".into(),
            "retry unix - - n - - error".into(),
            "discard unix - - n - - discard".into(),
            "anvil unix - - n - 1 anvil".into(),
            "scache unix - - n - 1 scache".into(),
            "postlog unix-dgram n - n - 1 postlogd".into(),
        ];
        std::fs::write(conf.join("master.cf"), services.join("\n") + "\n").unwrap();
        let started = std::process::Command::new("postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .expect("postfix is required (apt-get install postfix)");
        let pf = Postfix {
            conf,
            smtp,
            _dir: dir,
        };
        assert!(
            wait_until(20, || std::net::TcpStream::connect(smtp).is_ok()),
            "postfix did not listen on {smtp}: {}{}\n{}",
            String::from_utf8_lossy(&started.stdout),
            String::from_utf8_lossy(&started.stderr),
            std::fs::read_to_string(d.join("maillog")).unwrap_or_default()
        );
        pf
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = std::process::Command::new("postfix")
            .arg("-c")
            .arg(&self.conf)
            .arg("abort")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output();
    }
}

/// A real Postfix journals to spoold with `always_bcc`: the copy is archived (envelope from its
/// header fields, its bytes as Postfix sent them), not delivered by spoold; the original goes
/// its own way, through Postfix, to the next hop.
#[test]
fn a_real_postfix_always_bcc_feed_is_archived_and_not_delivered() {
    let spoold_next_hop = tests::SmtpSink::start();
    let mta_next_hop = tests::SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "node_name = \"pj\"\n[delivery]\ndefault_next_hop = \"{}\"\n[archive]\njournal_recipients = [\"journal@archive.test\"]\n",
            spoold_next_hop.addr
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let postfix = Postfix::start(d.smtp, mta_next_hop.addr);
    let body = b"From: Alice <alice@contoso.com>\r\nTo: bob@example.org\r\nCc: carol@example.org\r\nSubject: journaled by postfix\r\nMessage-ID: <pf1@contoso.com>\r\n\r\nThrough a real MTA.\r\n";
    let (mut c, greeting) = tests::Client::connect(postfix.smtp);
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.send_mail(
        "alice@contoso.com",
        &["bob@example.org", "carol@example.org"],
        body,
    );
    assert!(r.starts_with("250"), "{r}");
    let _ = c.cmd("QUIT");
    assert!(
        wait_until(60, || items(&d) == 1),
        "the journal copy did not reach the archive"
    );
    assert!(
        wait_until(30, || d.spooled_ids().is_empty()),
        "spoold keeps nothing"
    );
    assert!(
        wait_until(30, || mta_next_hop.dumped().len() == 1),
        "the original went on"
    );
    let original = &mta_next_hop.dumped()[0];
    // (Postfix adds ORCPT= after each address.)
    let mut rcpts: Vec<&str> = original
        .rcpt_args
        .iter()
        .map(|r| r.split(' ').next().unwrap_or(""))
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, ["<bob@example.org>", "<carol@example.org>"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(
        spoold_next_hop.dumped().is_empty(),
        "spoold delivered the journal copy"
    );
    let (code, out, _) = spoolctl(&d, &["--json", "archive", "show", "1"]);
    assert_eq!(code, 0);
    let item = serde_json::from_str::<Value>(&out).unwrap()["item"].clone();
    assert_eq!(item["sender"], "alice@contoso.com", "{item}");
    assert_eq!(
        item["recipients"],
        serde_json::json!(["bob@example.org", "carol@example.org"])
    );
    assert!(
        item["verdict"].as_str().unwrap().ends_with("; journal"),
        "{item}"
    );
    let archived = export(&d, "1");
    let text = String::from_utf8_lossy(&archived);
    assert!(text.ends_with("\r\nThrough a real MTA.\r\n"), "{text}");
    assert!(text.contains("Message-ID: <pf1@contoso.com>"), "{text}");
    assert!(
        text.contains("by mta.test (Postfix)"),
        "Postfix's Received: line: {text}"
    );
}

/// Import from a real Dovecot over IMAPS and over STARTTLS: every message byte for byte, a
/// rerun fetches nothing, new mail is fetched from the last UID on, a wrong password fails
/// clearly, and the password is in no audit line or report.
#[test]
fn an_imap_mailbox_on_dovecot_is_imported_exactly_and_resumed_by_uid() {
    let dv = tests::dovecot::Dovecot::start();
    let messages: Vec<Vec<u8>> = (0..30).map(|i| message(300 + i, true, "")).collect();
    for (i, m) in messages.iter().enumerate() {
        dv.deliver(i, m);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "node_name = \"im4\"\n");
    let d = Daemon::start_in(&dir.path().join("state"), &["--config", &cfg]);
    let imaps = format!("imaps://arch@localhost:{}/INBOX", dv.imaps);
    let report = dir.path().join("imap-report.tsv");
    let args = |url: &str| -> Vec<String> {
        vec![
            "--imap".into(),
            url.into(),
            "--password-file".into(),
            dv.password_file.display().to_string(),
            "--ca-file".into(),
            dv.cert.display().to_string(),
            "--report".into(),
            report.display().to_string(),
        ]
    };
    let run = |url: &str| {
        let a = args(url);
        let argv: Vec<&str> = a.iter().map(String::as_str).collect();
        import(&d, &argv)
    };
    let done = run(&imaps);
    assert_eq!(
        (done["archived"].as_u64(), done["rejected"].as_u64()),
        (Some(30), Some(0)),
        "{done}"
    );
    assert_eq!(done["sources"][0]["kind"], "imap");
    let got: BTreeSet<Vec<u8>> = (1..=30).map(|s| export(&d, &s.to_string())).collect();
    assert_eq!(got, messages.iter().cloned().collect::<BTreeSet<_>>());
    // A rerun fetches nothing; new mail is fetched from the last UID on, over STARTTLS too.
    let again = run(&imaps);
    assert_eq!(
        (again["archived"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(0)),
        "{again}"
    );
    for i in 30..35 {
        dv.deliver(i, &message(300 + i, false, ""));
    }
    let starttls = format!("imap://arch@localhost:{}/INBOX", dv.imap);
    let more = run(&starttls);
    assert_eq!(
        (more["archived"].as_u64(), more["duplicates"].as_u64()),
        (Some(5), Some(0)),
        "resumed by UID: {more}"
    );
    assert_eq!(items(&d), 35);
    // A wrong password: a clear error, nothing archived.
    std::fs::write(&dv.password_file, "wrong\n").unwrap();
    let a = args(&imaps);
    let mut argv: Vec<&str> = vec!["archive", "import"];
    argv.extend(a.iter().map(String::as_str));
    let (code, out, err) = spoolctl(&d, &argv);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("IMAP LOGIN") && err.contains("login as arch"),
        "{err}"
    );
    // The password is nowhere the daemon writes.
    let (_, audit, _) = spoolctl(&d, &["--json", "audit", "list"]);
    assert!(!audit.contains("s3cret-imap"));
    assert!(!std::fs::read_to_string(&report)
        .unwrap()
        .contains("s3cret-imap"));
    assert!(!d.log_text().contains("s3cret-imap"));
}
