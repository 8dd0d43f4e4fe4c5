//! The archive through real daemons: two units mirroring each other (one killed under load and
//! caught up), a wrong shared secret, awkward mail exported byte for byte, the same message
//! inserted twice, kill -9 during archive writes, an archive that cannot write, retention with
//! a legal hold. Every figure is read back through `spoolctl archive … --json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use tests::spool::{Envelope, IdGenerator};
use tests::{
    free_addr, http_get, send_numbered, spoolctl, wait_until, write_config, Acked, Client,
    CrashLoad, Daemon, PySink, SmtpSink,
};

const SECRET: &str = "archive mirror secret 0123456789";

fn ctl_json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json", "archive"];
    all.extend_from_slice(args);
    let (code, out, err) = spoolctl(d, &all);
    assert_eq!(code, 0, "spoolctl archive {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn items(d: &Daemon) -> u64 {
    ctl_json(d, &["status"])["items"].as_u64().unwrap()
}

/// Waits until every item archived so far is searchable (the index follows the catalog).
fn searchable(d: &Daemon) {
    assert!(wait_until(30, || {
        let st = ctl_json(d, &["status"]);
        st["indexed_through"] == st["last_seq"]
    }));
}

/// Items a query finds: `(spool id, origin, mirrored)`.
fn found(d: &Daemon, query: &str) -> Vec<(String, String, bool)> {
    let r = ctl_json(d, &["search", "--limit", "100000", query]);
    r["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["origin"].as_str().unwrap().to_string(),
                i["mirrored"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A delivering unit named `node` relaying to `next_hop`, with `extra` config.
fn unit(node: &str, next_hop: SocketAddr, extra: &str) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "node_name = \"{node}\"\n[delivery]\ndefault_next_hop = \"{next_hop}\"\nretry_schedule_secs = [1]\n{extra}"
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    (dir, d)
}

fn mirror_section(listen: SocketAddr, peer: SocketAddr, secret: &str) -> String {
    format!(
        "[archive]\nlisten = \"{listen}\"\nsecret = \"{secret}\"\n[[archive.mirror]]\npeer = \"{peer}\"\n"
    )
}

#[test]
fn mirrored_units_find_each_others_mail_and_a_killed_peer_catches_up() {
    let sink = SmtpSink::start();
    let (la, lb) = (free_addr(), free_addr());
    let (_da, a) = unit("arch_a", sink.addr, &mirror_section(la, lb, SECRET));
    let (_db, mut b) = unit("arch_b", sink.addr, &mirror_section(lb, la, SECRET));
    let mut on_a = send_numbered(a.smtp, 0, 40);
    let on_b = send_numbered(b.smtp, 1000, 40);
    assert_eq!((on_a.len(), on_b.len()), (40, 40));
    for d in [&a, &b] {
        assert!(wait_until(60, || items(d) == 80), "items: {}", items(d));
    }
    // Search finds each unit's mail on both, with its origin.
    for (d, who) in [(&a, "a"), (&b, "b")] {
        searchable(d);
        let from_a = found(d, "origin:arch_a");
        let from_b = found(d, "origin:arch_b");
        assert_eq!((from_a.len(), from_b.len()), (40, 40), "on {who}");
        assert!(
            from_a.iter().all(|(_, _, m)| *m == (who == "b")),
            "on {who}"
        );
        assert!(
            from_b.iter().all(|(_, _, m)| *m == (who == "a")),
            "on {who}"
        );
        let one = found(d, &format!("msgid:{}", on_b[7]));
        assert_eq!(one.len(), 1, "{who}: {one:?}");
        assert_eq!(one[0].1, "arch_b");
    }

    // B is killed while A takes mail; A's copies wait and B catches up by itself.
    let load = std::thread::spawn({
        let smtp = a.smtp;
        move || {
            let mut acked = Vec::new();
            for k in 0..6 {
                acked.extend(send_numbered(smtp, 2000 + k * 50, 50));
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            acked
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(400));
    b.kill9();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let backlog = ctl_json(&a, &["status"])["mirrors"][0]["backlog"]
        .as_u64()
        .unwrap();
    b.restart();
    on_a.extend(load.join().unwrap());
    assert_eq!(on_a.len(), 340);
    assert!(
        wait_until(90, || items(&b) == 380),
        "B holds {} items after catching up",
        items(&b)
    );
    searchable(&a);
    searchable(&b);
    let a_status = ctl_json(&a, &["status"]);
    eprintln!(
        "mirror backlog while B was down: {backlog}; after: {}",
        a_status["mirrors"][0]
    );
    assert!(
        backlog > 0,
        "the kill left nothing to catch up: the test proved nothing"
    );
    // Nothing missing, nothing extra: exactly A's local mail, once.
    let ids_a: BTreeSet<String> = found(&a, "origin:arch_a")
        .into_iter()
        .map(|f| f.0)
        .collect();
    let ids_on_b: Vec<String> = found(&b, "origin:arch_a")
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(ids_on_b.len(), 340, "copies of A's mail on B");
    assert_eq!(ids_on_b.into_iter().collect::<BTreeSet<_>>(), ids_a);
    assert!(wait_until(20, || ctl_json(&a, &["status"])["mirrors"][0]
        ["backlog"]
        == 0));
    // Right after the catch-up: no backlog means no oldest item, in the same answer.
    let caught_up = ctl_json(&a, &["status"])["mirrors"][0].clone();
    assert_eq!(
        (
            caught_up["backlog"].as_u64(),
            caught_up["oldest_age_secs"].as_u64()
        ),
        (Some(0), Some(0)),
        "{caught_up}"
    );
    // The same figures for Prometheus (gauges refresh every 2 s).
    let m = |d: &Daemon, name: &str| d.metric(name).unwrap_or(-1.0);
    let to_b = format!("{{peer=\"{lb}\"}}");
    assert!(wait_until(10, || {
        m(&a, &format!("spoold_archive_mirror_backlog_items{to_b}")) == 0.0
            && m(
                &a,
                &format!("spoold_archive_mirror_oldest_age_seconds{to_b}"),
            ) == 0.0
            && m(&a, "spoold_archive_items") == 380.0
            && m(&b, "spoold_archive_index_lag_items") == 0.0
    }));
    assert_eq!(m(&a, &format!("spoold_archive_mirror_up{to_b}")), 1.0);
    assert!(m(&a, &format!("spoold_archive_mirror_sent_total{to_b}")) >= 300.0);
    // B's counters start again at its restart: it received at least the backlog since.
    assert!(m(&b, "spoold_archive_mirror_received_total{result=\"new\"}") >= backlog as f64);
    let (raw, stored) = (
        m(&a, "spoold_archive_raw_bytes"),
        m(&a, "spoold_archive_stored_bytes"),
    );
    assert!(
        raw > 380.0 * 1500.0 && stored > 0.0 && stored < raw,
        "raw {raw}, stored {stored}"
    );
}

/// Items imported on one unit (`spoolctl archive import`) are mirrored like any other: its
/// peer finds them, with the importing unit as their origin.
#[test]
fn items_imported_on_one_unit_are_searchable_on_its_mirror_peer() {
    let sink = SmtpSink::start();
    let (la, lb) = (free_addr(), free_addr());
    let (da, a) = unit("imp_a", sink.addr, &mirror_section(la, lb, SECRET));
    let (_db, b) = unit("imp_b", sink.addr, &mirror_section(lb, la, SECRET));
    let mut mbox = Vec::new();
    for i in 0..10 {
        let m = format!(
            "From: h{i}@example.com\r\nTo: r@example.org\r\nSubject: historic {i}\r\nMessage-ID: <h{i}@history.test>\r\n\r\nold mail {i}\r\n"
        );
        mbox.extend_from_slice(
            archive::import::separator(&format!("h{i}@example.com"), 0).as_bytes(),
        );
        archive::import::quote(m.as_bytes(), &mut mbox);
        mbox.push(b'\n');
    }
    let file = da.path().join("history.mbox");
    std::fs::write(&file, &mbox).unwrap();
    let imported = ctl_json(&a, &["import", file.to_str().unwrap()]);
    assert_eq!(imported["archived"], 10, "{imported}");
    assert!(
        wait_until(60, || items(&b) == 10),
        "items on b: {}",
        items(&b)
    );
    searchable(&b);
    let on_b = found(&b, "subject:historic");
    assert_eq!(on_b.len(), 10, "{on_b:?}");
    assert!(on_b
        .iter()
        .all(|(_, origin, mirrored)| origin == "imp_a" && *mirrored));
    assert_eq!(found(&b, "msgid:h7@history.test").len(), 1);
}

#[test]
fn a_wrong_shared_secret_mirrors_nothing_and_is_counted() {
    let sink = SmtpSink::start();
    let (la, lc) = (free_addr(), free_addr());
    let (_da, a) = unit("arch_a", sink.addr, &mirror_section(la, lc, SECRET));
    let (_dc, c) = unit(
        "arch_c",
        sink.addr,
        &mirror_section(lc, la, "not the secret, but long enough"),
    );
    assert_eq!(send_numbered(c.smtp, 0, 5).len(), 5);
    assert!(wait_until(30, || items(&c) == 5));
    let refused_at_a = || {
        a.metric("spoold_archive_mirror_auth_failures_total{peer=\"incoming\"}")
            .unwrap_or(0.0)
    };
    let refused_at_c = || {
        c.metric(&format!(
            "spoold_archive_mirror_auth_failures_total{{peer=\"{la}\"}}"
        ))
        .unwrap_or(0.0)
    };
    assert!(wait_until(20, || refused_at_a() >= 1.0 && refused_at_c() >= 1.0));
    assert_eq!(items(&a), 0, "nothing mirrored with a wrong secret");
    assert_eq!(
        ctl_json(&c, &["status"])["mirrors"][0]["backlog"],
        5,
        "the copies wait"
    );
}

#[test]
fn exported_bytes_equal_the_accepted_bytes_for_awkward_mail() {
    let sink = PySink::start("", None);
    let (_dir, d) = unit("arch_x", sink.addr, "");
    let corpus = archive::corpus::awkward();
    let (mut c, _) = Client::connect(d.smtp);
    assert!(c.cmd("EHLO awkward").starts_with("250"));
    let mut ids = Vec::new();
    for (what, raw) in &corpus {
        let r = c.send_mail("sender@example.com", &["rcpt@example.org"], raw);
        ids.push(tests::queued_id(&r).unwrap_or_else(|| panic!("{what}: {r}")));
    }
    // Every message leaves the spool (the 20,000-byte line is refused by the next hop and
    // bounced: the DSN is archived too).
    assert!(
        wait_until(60, || d.spooled_ids().is_empty()),
        "spool not drained"
    );
    let bounces = d.metric("spoold_bounces_total").unwrap() as u64;
    assert!(bounces <= 1, "{bounces}");
    assert!(
        wait_until(20, || items(&d) == corpus.len() as u64 + bounces),
        "{} items for {} messages and {bounces} bounce(s)",
        items(&d),
        corpus.len()
    );
    searchable(&d);
    let delivered = sink.received();
    for ((what, raw), id) in corpus.iter().zip(&ids) {
        let out = tests::spoolctl_output(&d, &["archive", "export", id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exported = out.stdout;
        assert_eq!(
            tests::strip_received(&exported),
            &raw[..],
            "{what}: not the bytes sent"
        );
        let at_sink = delivered.iter().any(|m| m.message == exported);
        assert!(
            at_sink || (*what == "long lines" && bounces == 1),
            "{what}: not the bytes accepted and delivered"
        );
    }
    // Searchable through MIME: the HTML part, a quoted-printable attachment, a file name.
    let hits = |q: &str| found(&d, q).len();
    assert_eq!(hits("zebrafish"), 1);
    assert_eq!(hits("pangolin"), 1);
    assert_eq!(hits("filename:invoice-2026.pdf"), 1);
    assert_eq!(hits("has:attachment from:carol"), 1);
    let shown = ctl_json(&d, &["show", &ids[3]]);
    assert_eq!(shown["parts"].as_array().unwrap().len(), 4, "{shown}");
}

/// A pair dropped into `input/`, as takeover recovery or an operator would.
fn drop_pair(d: &Daemon, id: &tests::spool::MessageId, body: &[u8], arrived_ms: Option<u64>) {
    let mut env = Envelope::new(id.clone(), "drop@example.com", &["r@example.org"], body);
    if let Some(ms) = arrived_ms {
        env.arrived_ms = ms;
    }
    std::fs::write(d.state.join("input").join(format!("{id}.body")), body).unwrap();
    std::fs::write(
        d.state.join("input").join(format!("{id}.env")),
        env.encode(),
    )
    .unwrap();
    let (code, _, err) = spoolctl(d, &["insert"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn the_same_message_inserted_twice_is_archived_once() {
    let sink = SmtpSink::start();
    let (_dir, d) = unit("arch_i", sink.addr, "");
    let id = IdGenerator::new("elsewhere").unwrap().next_id();
    let body = b"Subject: inserted twice\r\nMessage-ID: <twice@example.com>\r\n\r\nonce in the archive\r\n";
    drop_pair(&d, &id, body, None);
    assert!(wait_until(30, || sink.dumped().len() == 1 && items(&d) == 1));
    searchable(&d);
    drop_pair(&d, &id, body, None);
    assert!(
        wait_until(30, || sink.dumped().len() == 2),
        "delivered again, as asked"
    );
    assert_eq!(items(&d), 1);
    assert_eq!(d.metric("spoold_archive_archived_total"), Some(1.0));
    assert_eq!(found(&d, "msgid:twice@example.com").len(), 1);
}

#[test]
fn kill9_during_archive_writes_loses_no_archived_item_and_no_entry_lacks_its_body() {
    let sink = SmtpSink::start();
    let (_dir, mut d) = unit("arch_k", sink.addr, "");
    let acked: Acked = Default::default();
    let load = CrashLoad::start(d.smtp, 4, 7, |i| 800 + (i % 7) * 900, &acked);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    d.kill9();
    load.stop();
    d.restart();
    let acked: BTreeSet<String> = acked
        .lock()
        .unwrap()
        .values()
        .map(|body| tests::message_id_of(&String::from_utf8_lossy(body)).unwrap())
        .collect();
    assert!(
        acked.len() > 50,
        "load too small to prove anything: {}",
        acked.len()
    );
    assert!(
        wait_until(90, || d.spooled_ids().is_empty()
            && sink.arrivals().len() >= acked.len()),
        "spool not drained"
    );
    // Every acknowledged message was delivered (a few more may have been: accepted, their
    // `250` lost with the kill), and every delivered one was archived first: the archive holds
    // exactly the delivered Message-IDs, each once.
    let delivered: BTreeSet<String> = sink.arrivals().into_keys().collect();
    let undelivered: Vec<&String> = acked.difference(&delivered).collect();
    assert!(
        undelivered.is_empty(),
        "acknowledged, never delivered: {undelivered:?}"
    );
    searchable(&d);
    let mut not_archived_once = Vec::new();
    for mid in &delivered {
        let hits = found(&d, &format!("msgid:{mid}"));
        if hits.len() != 1 {
            not_archived_once.push(format!("{mid}: {} items", hits.len()));
        }
    }
    assert!(
        not_archived_once.is_empty(),
        "delivered but not archived exactly once: {not_archived_once:?}"
    );
    let archived = items(&d);
    assert_eq!(
        archived as usize,
        delivered.len(),
        "no item beyond the delivered mail"
    );
    let v = ctl_json(&d, &["verify"]);
    eprintln!(
        "acknowledged {}, delivered {}, verify: {v}",
        acked.len(),
        delivered.len()
    );
    assert_eq!(v["items"], archived);
    assert_eq!(v["ok"], archived);
    assert_eq!(v["index_entries"], archived);
    assert!(v["failed"].as_array().unwrap().is_empty());
    // The chain survived the kill: every entry in sequence, linked, every body equal to its hash.
    assert_eq!(v["proof"]["break_count"], 0, "{v}");
    assert_eq!(v["proof"]["items"], archived);
    assert!(v["proof"]["entries"].as_u64().unwrap() > archived);
}

#[test]
fn an_archive_that_cannot_write_holds_removal_back_and_nothing_is_delivered_twice() {
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let config = |free: u64| {
        write_config(
            dir.path(),
            &format!(
                "node_name = \"arch_f\"\n[delivery]\ndefault_next_hop = \"{}\"\n[archive]\nfree_bytes_min = {free}\n",
                sink.addr
            ),
        )
    };
    // More free space demanded than any disk has: every archive write is refused.
    let cfg = config(1 << 60);
    let mut d = Daemon::start_delivering(&["--config", &cfg]);
    let acked = send_numbered(d.smtp, 0, 10);
    assert_eq!(acked.len(), 10, "mail keeps coming in");
    assert!(wait_until(20, || d
        .metric("spoold_archive_waiting_messages")
        == Some(10.0)));
    assert!(d.metric("spoold_archive_failures_total").unwrap() >= 10.0);
    let (code, body) = http_get(d.http, "/readyz").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("archive failing"), "{body}");
    // Delivered, but nothing leaves the spool unarchived; the retries deliver nothing again.
    assert!(wait_until(20, || sink.dumped().len() == 10));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(d.spooled_ids().len(), 10);
    d.stop();
    config(0);
    d.restart();
    assert!(
        wait_until(60, || d.spooled_ids().is_empty()),
        "removed once archived"
    );
    sink.assert_exactly_once(&acked);
    assert_eq!(items(&d), 10);
    assert_eq!(d.metric("spoold_archive_waiting_messages"), Some(0.0));
    assert_eq!(http_get(d.http, "/readyz").unwrap().1, "ready\n");
}

#[test]
fn retention_removes_expired_items_and_keeps_held_ones() {
    let sink = SmtpSink::start();
    let (_dir, d) = unit("arch_r", sink.addr, "[archive]\nretention_days = 30\n");
    let ids = IdGenerator::new("old").unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let long_ago = now_ms - 90 * 86_400_000;
    for (tag, when) in [
        ("old-kept", Some(long_ago)),
        ("old-gone", Some(long_ago)),
        ("new", None),
    ] {
        let body = format!("Subject: {tag}\r\n\r\nretention\r\n");
        drop_pair(&d, &ids.next_id(), body.as_bytes(), when);
    }
    assert!(wait_until(30, || items(&d) == 3));
    searchable(&d);
    let held = ctl_json(&d, &["hold", "subject:old-kept"]);
    assert_eq!(
        (held["matched"].as_u64(), held["changed"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(wait_until(10, || d.metric("spoold_archive_held_items") == Some(1.0)));
    let r = ctl_json(&d, &["retention"]);
    assert_eq!(r["removed"], 1, "{r}");
    let left: BTreeSet<String> = ["subject:old-kept", "subject:old-gone", "subject:new"]
        .iter()
        .filter(|q| !found(&d, q).is_empty())
        .map(|q| q.to_string())
        .collect();
    assert_eq!(
        left,
        BTreeSet::from(["subject:old-kept".to_string(), "subject:new".to_string()])
    );
    ctl_json(&d, &["unhold", "subject:old-kept"]);
    assert_eq!(ctl_json(&d, &["retention"])["removed"], 1);
    assert_eq!(items(&d), 1);
}

#[test]
fn a_message_deleted_by_the_operator_is_archived_first() {
    let d = Daemon::start_with(&[]); // spools, does not deliver
    let acked = send_numbered(d.smtp, 0, 2);
    assert_eq!(acked.len(), 2);
    let ids = d.spooled_ids();
    assert_eq!(items(&d), 0, "nothing archived before it is handled");
    let (code, _, err) = spoolctl(&d, &["queue", "delete", &ids[0]]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(items(&d), 1);
    assert!(wait_until(10, || found(&d, &format!("msgid:{}", acked[0]))
        .len()
        == 1));
    assert_eq!(d.spooled_ids(), vec![ids[1].clone()]);
}

/// Checkpoints travel to the mirror peer, which keeps them; `verify --against-peers` compares
/// with them. An insider on A who cuts A's newest entries and the checkpoints that sign them
/// leaves a local archive that proves, and the peer's copies name the cut.
#[test]
fn a_mirror_peer_keeps_the_checkpoints_that_catch_a_cut_of_the_local_chain() {
    let sink = SmtpSink::start();
    let (la, lb) = (free_addr(), free_addr());
    let with_checkpoints = mirror_section(la, lb, SECRET).replacen(
        "[archive]\n",
        "[archive]\ncheckpoint_entries = 5\n",
        1,
    );
    let (_da, mut a) = unit("arch_ca", sink.addr, &with_checkpoints);
    let (_db, mut b) = unit("arch_cb", sink.addr, &mirror_section(lb, la, SECRET));
    assert_eq!(send_numbered(a.smtp, 0, 30).len(), 30);
    assert!(wait_until(60, || items(&b) == 30));
    let key = ctl_json(&a, &["key"]);
    let id = key["archive"].as_str().unwrap().to_string();
    let public = key["public_key"].as_str().unwrap().to_string();
    let kept = b.state.join(format!("archive/peers/{id}.checkpoints"));
    let ours = a.state.join("archive/checkpoints");
    assert!(
        wait_until(30, || {
            let lines = |p: &std::path::Path| {
                std::fs::read_to_string(p)
                    .map(|t| t.lines().count())
                    .unwrap_or(0)
            };
            lines(&ours) >= 6 && lines(&kept) == lines(&ours)
        }),
        "the peer keeps every checkpoint"
    );
    let v = ctl_json(&a, &["verify", "--against-peers"]);
    assert_eq!(v["proof"]["break_count"], 0, "{v}");
    assert!(v["proof"]["compared"].as_u64().unwrap() >= 6, "{v}");
    // The audit log's checkpoints travel too (the requests above are in it).
    let audit_lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let audit_ours = a.state.join("archive/audit.checkpoints");
    let audit_id = {
        let first = std::fs::read_to_string(a.state.join("archive/audit.log")).unwrap();
        let genesis: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        genesis["detail"].as_str().unwrap()[4..36].to_string()
    };
    let audit_kept = b
        .state
        .join(format!("archive/peers/{audit_id}.checkpoints"));
    assert!(
        wait_until(30, || audit_lines(&audit_ours) >= 3
            && audit_lines(&audit_kept) == audit_lines(&audit_ours)),
        "the peer keeps the audit log's checkpoints"
    );
    let (code, out, err) = spoolctl(&a, &["--json", "audit", "verify", "--against-peers"]);
    assert_eq!(code, 0, "{out}{err}");
    let p: Value = serde_json::from_str(&out).unwrap();
    assert!(p["compared"].as_u64().unwrap() >= 3, "{p}");
    // The peer down: a verify asked to compare with it fails, naming it, instead of passing.
    b.stop();
    let (code, out, err) = spoolctl(&a, &["archive", "verify", "--against-peers"]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains(&format!("mirror peer {lb}: its checkpoints")),
        "{err}"
    );

    // The insider's copy: the newest ten entries cut, with the checkpoints that signed them.
    a.stop();
    let copy = tempfile::tempdir().unwrap();
    let archive = a.state.join("archive");
    std::fs::create_dir(copy.path().join("segments")).unwrap();
    let mut segs: Vec<_> = std::fs::read_dir(archive.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    for s in &segs {
        std::fs::copy(s, copy.path().join("segments").join(s.file_name().unwrap())).unwrap();
    }
    let newest = segs
        .iter()
        .rev()
        .find(|s| std::fs::metadata(s).unwrap().len() > 0)
        .unwrap();
    let data = std::fs::read(newest).unwrap();
    // Its records are sealed (encryption at rest is on by default): the insider has the keyring.
    let keyring_file = a.state.join("keys/archive.keyring");
    let keyring = evidence::seal::Keyring::load(&keyring_file)
        .unwrap()
        .expect("a keyring made at first start");
    let mut entries = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let mut opened = Vec::new();
        let (rec, len, sealed) =
            evidence::record::next_opened(&data[at..], Some(&keyring), &mut opened).unwrap();
        assert!(sealed.is_some(), "a record in clear at {at}");
        if let evidence::record::Record::Entry(e) = rec {
            entries.push((at, e.n));
        }
        at += len;
    }
    let (cut_at, first_cut) = entries[entries.len() - 10];
    std::fs::write(
        copy.path()
            .join("segments")
            .join(newest.file_name().unwrap()),
        &data[..cut_at],
    )
    .unwrap();
    let signed: Vec<String> = std::fs::read_to_string(&ours)
        .unwrap()
        .lines()
        .filter(|l| {
            evidence::checkpoint::Checkpoint::from_line(l)
                .unwrap()
                .entries
                <= first_cut
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(copy.path().join("checkpoints"), signed.concat()).unwrap();
    let bin = tests::spoold_bin().with_file_name("spoolctl");
    let verify = |extra: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(&bin)
            .args(["archive", "verify", "--public-key", &public, "--dir"])
            .arg(copy.path())
            .arg("--keyring")
            .arg(&keyring_file)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = verify(&[]);
    assert_eq!(code, 0, "the cut holds locally: {out}");
    let (code, out) = verify(&["--peer-checkpoints".as_ref(), kept.as_os_str()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("checkpoint of"), "{out}");
    assert!(out.contains("cut off or deleted"), "{out}");
    assert!(
        out.contains("the local checkpoints file does not hold it"),
        "{out}"
    );
}
