//! HA replication between two real daemons on loopback: every acknowledged message reaches the
//! passive partner byte-identical; the log drains after the partner is killed; delivery on the
//! active removes the replica; a wrong secret moves no data; an active killed in async mode loses
//! at most what the lag allows; and the partner takes over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::{
    histogram_quantile, pair_config, queued_id, sample_body, wait_until, Client, Daemon, SmtpSink,
};

/// A load running in the background: what it got acknowledged so far, and its threads.
struct Load {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn running(&self) -> bool {
        self.threads.iter().any(|h| !h.is_finished())
    }

    /// Waits for every thread (a panic in one fails the test) and returns what was
    /// acknowledged, with when.
    fn finish(self) -> Vec<(String, Instant)> {
        for h in self.threads {
            if let Err(panic) = h.join() {
                std::panic::resume_unwind(panic);
            }
        }
        self.acked.lock().unwrap().clone()
    }

    /// [`Load::finish`], ids only.
    fn finish_ids(self) -> BTreeSet<String> {
        self.finish().into_iter().map(|(id, _)| id).collect()
    }
}

/// Sends from `threads` sessions, `per_thread` messages each, until `stop`. A session stops at
/// a refusal the daemon may give when it stops accepting or dies (`421`, `451`, a closed
/// connection); any other reply fails the test.
fn load(d: &Daemon, threads: usize, per_thread: usize, stop: Arc<AtomicBool>) -> Load {
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let threads = (0..threads)
        .map(|t| {
            let (addr, acked, stop) = (d.smtp, acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut c, _) = Client::connect(addr);
                c.cmd("EHLO ha");
                let gone = |r: &str| r.is_empty() || r.starts_with("421") || r.starts_with("451");
                for i in 0..per_thread {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let body = sample_body(t * 100_000 + i, 3000);
                    for (step, want) in [
                        ("MAIL FROM:<ha@example.com>", "250"),
                        ("RCPT TO:<rcpt@example.org>", "250"),
                        ("DATA", "354"),
                    ] {
                        let r = c.cmd(step);
                        if gone(&r) {
                            return;
                        }
                        assert!(r.starts_with(want), "{step}: {r}");
                    }
                    c.send(&tests::dot_stuff(&body));
                    c.send(b".\r\n");
                    let r = c.reply();
                    match queued_id(&r) {
                        Some(id) => acked.lock().unwrap().push((id, Instant::now())),
                        None if gone(&r) => return,
                        None => panic!("end of data: {r}"),
                    }
                }
            })
        })
        .collect();
    Load { acked, threads }
}

/// The replication actions waiting for the partner's acknowledgement at this moment, from the
/// daemon's status. The `spoold_ha_pending_actions` gauge is refreshed once a second, so a wait
/// for it to read 0 right after a load can pass on the value from before the load.
fn pending_now(d: &Daemon) -> Option<u64> {
    let (code, out, _) = tests::spoolctl(d, &["--json", "status"]);
    if code != 0 {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(&out).ok()?["ha"]["pending_actions"].as_u64()
}

fn ids(d: &Daemon) -> BTreeSet<String> {
    d.spooled_ids().into_iter().collect()
}

/// Every pair of `ids` in B's `spool/` has exactly the bytes of A's.
fn assert_pairs_identical(a: &Daemon, b: &Daemon, ids: &BTreeSet<String>) {
    for id in ids {
        for ext in ["env", "body"] {
            let fa = std::fs::read(a.state.join("spool").join(format!("{id}.{ext}"))).unwrap();
            let fb = std::fs::read(b.state.join("spool").join(format!("{id}.{ext}"))).unwrap();
            assert!(fa == fb, "{id}.{ext} differs");
        }
    }
}

/// B comes to hold exactly A's spool within 20 s, every pair byte-identical.
fn assert_partner_converges(a: &Daemon, b: &Daemon) {
    assert!(
        wait_until(20, || ids(b) == ids(a)),
        "partner holds {} of {}",
        ids(b).len(),
        ids(a).len()
    );
    assert_pairs_identical(a, b, &ids(a));
}

/// With `ha.outbox_bytes = 0` nothing is held in memory: every ADD is read back from the
/// spool's files (the path taken after restarts and backlogs), and the replicas are the same.
#[test]
fn without_the_outbox_every_add_is_read_from_the_files_and_arrives_identical() {
    let p = pair_config("", None);
    let mut config = std::fs::read_to_string(&p.a_config).unwrap();
    config.push_str("outbox_bytes = 0\n"); // the [ha] table is the file's last
    std::fs::write(&p.a_config, config).unwrap();
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    let acked: BTreeSet<String> = load(&a, 4, 25, Arc::default()).finish_ids();
    assert_eq!(acked.len(), 100);
    assert!(
        wait_until(10, || ids(&b) == acked),
        "the partner has every message"
    );
    assert_pairs_identical(&a, &b, &acked);
    assert_eq!(a.metric("spoold_ha_sent_adds_total{from=\"outbox\"}"), None);
    let from_spool = a.metric("spoold_ha_sent_adds_total{from=\"spool\"}");
    assert!(
        from_spool.unwrap_or(0.0) >= 100.0,
        "from the files: {from_spool:?}"
    );
}

#[test]
fn every_acknowledged_message_reaches_the_partner_byte_identical() {
    let p = pair_config("", None);
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    let (_, greeting) = Client::connect(b.smtp);
    assert!(
        greeting.starts_with("421 4.3.2"),
        "a passive unit refuses SMTP: {greeting}"
    );
    let acked: BTreeSet<String> = load(&a, 8, 40, Arc::default()).finish_ids();
    assert_eq!(acked.len(), 320);
    let started = Instant::now();
    assert!(
        wait_until(10, || ids(&b).is_superset(&acked)),
        "not all on the partner within 10 s: {} of {}\nA: {}\nB: {}\nmissing: {:?}",
        ids(&b).len(),
        acked.len(),
        tests::http_get(a.http, "/admin/status").unwrap().1,
        b.log_text()
            .lines()
            .filter(|l| !l.contains("INFO message accepted"))
            .collect::<Vec<_>>()
            .join("\n")
            + "\nA:\n"
            + &a.log_text()
                .lines()
                .filter(|l| !l.contains("INFO message accepted"))
                .collect::<Vec<_>>()
                .join("\n"),
        acked
            .difference(&ids(&b))
            .take(3)
            .map(|m| b
                .log_text()
                .lines()
                .chain(a.log_text().lines())
                .filter(|l| l.contains(m.as_str()))
                .collect::<Vec<_>>()
                .join("\n")
                + &["tmp", "spool", "vscan", "corrupt", "input"]
                    .iter()
                    .map(|f| format!(
                        "{f}:{:?}",
                        b.folder(f)
                            .iter()
                            .filter(|n| n.starts_with(m.as_str()))
                            .collect::<Vec<_>>()
                    ))
                    .collect::<Vec<_>>()
                    .join(" "))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "partner complete {:?} after the last acknowledgement",
        started.elapsed()
    );
    assert_eq!(ids(&b), acked, "nothing extra on the partner");
    assert_pairs_identical(&a, &b, &acked);
    let replicated_bytes: u64 = acked
        .iter()
        .map(|id| {
            std::fs::metadata(a.state.join("spool").join(format!("{id}.body")))
                .unwrap()
                .len()
        })
        .sum();
    assert!(
        a.metric("spoold_ha_sent_bytes_total").unwrap() >= replicated_bytes as f64,
        "every body's bytes were sent"
    );
    assert!(
        a.metric("spoold_ha_log_append_duration_seconds_count")
            .unwrap()
            >= 1.0,
        "ADDs appended (one call per commit round)"
    );
    assert_eq!(a.metric("spoold_ha_role_active"), Some(1.0));
    assert_eq!(b.metric("spoold_ha_role_active"), Some(0.0));
    let p99 = histogram_quantile(&a, "spoold_ha_replication_lag_seconds", 0.99).unwrap();
    eprintln!("replication lag p99 ~ {p99:.3} s (interpolated in its histogram bucket)");
    // The product promises 10 s and aims well under 100 ms; a loaded CI machine stays far
    // below a second. A value past the last bucket is infinite and fails.
    assert!(p99 < 1.0, "replication lag p99 {p99} s");
    assert_eq!(a.metric("spoold_ha_link_up"), Some(1.0));
    assert!(wait_until(5, || pending_now(&a) == Some(0)));
    // The byte comparison above covered the in-memory path: most ADDs leave from the outbox.
    let from_outbox = a.metric("spoold_ha_sent_adds_total{from=\"outbox\"}");
    assert!(
        from_outbox.unwrap_or(0.0) >= acked.len() as f64 / 2.0,
        "ADDs from the outbox: {from_outbox:?} of {}",
        acked.len()
    );
    // Everything sent, nothing stays held in memory.
    assert!(wait_until(5, || a.metric("spoold_ha_outbox_messages")
        == Some(0.0)
        && a.metric("spoold_ha_outbox_bytes") == Some(0.0)));
}

#[test]
fn partner_killed_under_load_catches_up_with_nothing_missing_or_extra() {
    let p = pair_config("", None);
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let mut b = Daemon::start_with(&["--config", &p.b_config]);
    let acked = load(&a, 6, 60, Arc::default());
    std::thread::sleep(Duration::from_millis(400));
    b.kill9();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        acked.running() && a.metric("spoold_ha_pending_actions").unwrap_or(0.0) > 0.0,
        "the partner died mid-load with actions pending"
    );
    assert!(
        wait_until(3, || a
            .metric("spoold_ha_oldest_pending_age_seconds")
            .unwrap_or(0.0)
            > 0.5),
        "the oldest pending action ages while the partner is down"
    );
    b.restart();
    let acked = acked.finish_ids();
    assert_eq!(acked.len(), 360, "every message acknowledged");
    assert!(
        wait_until(20, || ids(&b) == acked),
        "partner has {} of {}",
        ids(&b).len(),
        acked.len()
    );
    assert!(a.metric("spoold_ha_reconnects_total").unwrap_or(0.0) >= 1.0);
    assert!(
        wait_until(5, || a.metric("spoold_ha_pending_actions") == Some(0.0)),
        "log drained"
    );
}

/// `ADD`s live in memory (the spool is their durable record): an active unit killed while the
/// partner is down loses them, and after its restart the rebuild must find exactly the
/// messages the partner lacks and send them.
#[test]
fn active_killed_with_unsent_adds_rebuilds_them_from_its_spool_after_restart() {
    let p = pair_config("", None);
    let mut a = Daemon::start_with(&["--config", &p.a_config]);
    let mut b = Daemon::start_with(&["--config", &p.b_config]);
    assert_eq!(load(&a, 2, 10, Arc::default()).finish().len(), 20);
    // B holds the first 20 and A has their acknowledgements (B's files show before its
    // acknowledgement reaches A: killed in between, A would count those as pending too).
    assert!(wait_until(10, || ids(&b).len() == 20 && pending_now(&a) == Some(0)));
    b.kill9();
    assert_eq!(load(&a, 4, 25, Arc::default()).finish().len(), 100);
    assert!(
        wait_until(5, || a.metric("spoold_ha_pending_actions") == Some(100.0)),
        "pending actions: {:?}",
        a.metric("spoold_ha_pending_actions")
    );
    a.kill9();
    a.restart();
    assert_eq!(ids(&a).len(), 120, "A's spool kept all it acknowledged");
    assert!(wait_until(5, || a.metric("spoold_ha_log_rebuild_pending") == Some(1.0)));
    b.restart();
    assert_partner_converges(&a, &b);
    let log = a.log_text();
    assert!(
        log.contains("replication log rebuilt")
            && log.contains("held=120")
            && log.contains("missing_on_partner=100"),
        "the rebuild asked about A's 120 and found B's 100 gaps:\n{log}"
    );
    assert!(
        wait_until(5, || a.metric("spoold_ha_pending_actions") == Some(0.0)
            && a.metric("spoold_ha_log_rebuild_pending") == Some(0.0)),
        "log drained and rebuilt"
    );
}

/// A partner whose state directory is lost (a replaced disk) comes back empty, resuming from
/// sequence 0: the active unit rebuilds and sends it everything it holds again.
#[test]
fn a_partner_that_lost_its_state_gets_every_held_message_again() {
    let p = pair_config("", None);
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let mut b = Daemon::start_with(&["--config", &p.b_config]);
    assert_eq!(load(&a, 2, 20, Arc::default()).finish().len(), 40);
    assert!(wait_until(10, || ids(&b).len() == 40));
    b.kill9();
    std::fs::remove_dir_all(&b.state).unwrap();
    b.restart();
    assert_partner_converges(&a, &b);
    assert!(a
        .log_text()
        .contains("the partner resumes behind what it acknowledged: rebuilding"));
    assert!(a.log_text().contains("missing_on_partner=40"));
}

#[test]
fn delivered_on_the_active_is_removed_on_the_partner() {
    let sink = SmtpSink::start();
    let p = pair_config(
        &format!("[delivery]\ndefault_next_hop = \"{}\"\n", sink.addr),
        None,
    );
    let a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_delivering(&["--config", &p.b_config]);
    assert_eq!(load(&a, 4, 25, Arc::default()).finish().len(), 100);
    assert!(
        wait_until(30, || sink.dumped().len() == 100),
        "delivered {}",
        sink.dumped().len()
    );
    assert!(
        wait_until(10, || a.spooled_ids().is_empty()
            && b.spooled_ids().is_empty()),
        "replicas removed: partner still holds {}",
        b.spooled_ids().len()
    );
    assert_eq!(
        sink.dumped().len(),
        100,
        "the passive unit delivered nothing"
    );
}

#[test]
fn wrong_shared_secret_moves_no_data_and_is_counted() {
    let p = pair_config("", Some("a different secret entirely"));
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    assert_eq!(load(&a, 2, 10, Arc::default()).finish().len(), 20);
    assert!(wait_until(10, || a
        .metric("spoold_ha_auth_failures_total")
        .unwrap_or(0.0)
        >= 1.0
        && b.metric("spoold_ha_auth_failures_total").unwrap_or(0.0)
            >= 1.0));
    std::thread::sleep(Duration::from_millis(500));
    assert!(b.spooled_ids().is_empty(), "no data crossed");
    // The gauge is refreshed once a second.
    assert!(
        wait_until(5, || a.metric("spoold_ha_pending_actions") == Some(20.0)),
        "kept pending, not dropped: {:?}",
        a.metric("spoold_ha_pending_actions")
    );
    assert!(a.log_text().contains("failed authentication"));
}

#[test]
fn active_killed_in_async_mode_loses_at_most_the_lag_and_the_partner_takes_over() {
    let sink = SmtpSink::start();
    let p = pair_config(
        &format!("[delivery]\ndefault_next_hop = \"{}\"\n", sink.addr),
        None,
    );
    // A spools without delivering (so its mail is what B must hold); B delivers once active.
    let mut a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_delivering(&["--config", &p.b_config]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = load(&a, 6, 1000, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    let killed_at = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let acked = acked.finish();
    assert!(
        acked.len() >= 50,
        "the kill landed under load: {} acknowledged",
        acked.len()
    );
    assert!(wait_until(5, || b
        .metric("spoold_queue_messages{folder=\"spool\"}")
        .is_some()));
    std::thread::sleep(Duration::from_millis(500));
    let on_b = ids(&b);
    let missing: Vec<&(String, Instant)> =
        acked.iter().filter(|(id, _)| !on_b.contains(id)).collect();
    eprintln!(
        "async mode: {} acknowledged, {} missing on the partner at the kill",
        acked.len(),
        missing.len()
    );
    for (id, at) in &missing {
        assert!(
            killed_at.duration_since(*at) < Duration::from_secs(1),
            "{id} acknowledged long before the kill is missing"
        );
    }
    // Takeover: B becomes active and delivers the replicas it holds.
    let (code, out, err) = tests::spoolctl(&b, &["role", "active"]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, greeting) = Client::connect(b.smtp);
    assert!(
        greeting.starts_with("220 "),
        "the new active unit accepts SMTP"
    );
    assert!(
        wait_until(60, || sink.dumped().len() == on_b.len()),
        "delivered {} of {}",
        sink.dumped().len(),
        on_b.len()
    );
}

#[test]
fn partition_through_a_fault_proxy_then_catch_up() {
    let (p, proxy) = tests::pair_config_through_proxy("");
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    proxy.partition(true);
    let acked: BTreeSet<String> = load(&a, 4, 40, Arc::default()).finish_ids();
    std::thread::sleep(Duration::from_millis(500));
    assert!(ids(&b).len() < acked.len(), "the partition held data back");
    assert_eq!(a.metric("spoold_ha_link_up"), Some(0.0));
    // The gauge is refreshed once a second.
    assert!(
        wait_until(5, || a.metric("spoold_ha_pending_actions").unwrap_or(0.0)
            > 0.0),
        "pending, not dropped"
    );
    let healed = Instant::now();
    proxy.partition(false);
    assert!(
        wait_until(10, || ids(&b) == acked),
        "caught up: {} of {}",
        ids(&b).len(),
        acked.len()
    );
    eprintln!(
        "partition: caught up {:?} after healing ({} messages held back)",
        healed.elapsed(),
        acked.len()
    );
    assert!(wait_until(5, || a.metric("spoold_ha_pending_actions") == Some(0.0)));
}

#[test]
fn sync_mode_every_acknowledged_message_is_on_the_partner_when_the_active_dies() {
    let p = pair_config("", None);
    let sync = |path: &str| {
        let text = std::fs::read_to_string(path).unwrap();
        std::fs::write(
            path,
            format!("{text}replication = \"sync\"\nsync_timeout_ms = 5000\n"),
        )
        .unwrap();
    };
    sync(&p.a_config);
    sync(&p.b_config);
    let mut a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = load(&a, 6, 1000, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    stop.store(true, Ordering::SeqCst);
    let acked = acked.finish();
    assert!(
        acked.len() >= 50,
        "the kill landed under load: {} acknowledged",
        acked.len()
    );
    assert!(!acked.is_empty());
    let on_b = ids(&b);
    let missing = acked.iter().filter(|(id, _)| !on_b.contains(id)).count();
    eprintln!(
        "sync mode: {} acknowledged, {missing} missing on the partner",
        acked.len()
    );
    assert_eq!(
        missing, 0,
        "sync mode: an acknowledged message is missing on the partner"
    );
}

#[test]
fn sync_mode_with_reject_withdraws_mail_while_the_partner_is_down() {
    let p = pair_config("", None);
    let text = std::fs::read_to_string(&p.a_config).unwrap();
    std::fs::write(
        &p.a_config,
        format!(
            "{text}replication = \"sync\"\nsync_partner_down = \"reject\"\nsync_timeout_ms = 500\n"
        ),
    )
    .unwrap();
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let (mut c, _) = Client::connect(a.smtp);
    c.cmd("EHLO sync");
    c.cmd("MAIL FROM:<s@example.com>");
    c.cmd("RCPT TO:<r@example.org>");
    c.cmd("DATA");
    c.send(b"Subject: no partner\r\n\r\nx\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert!(
        a.spooled_ids().is_empty(),
        "withdrawn, so a retry cannot duplicate it"
    );
    assert_eq!(a.metric("spoold_ha_sync_rejected_total"), Some(1.0));
}

#[test]
fn a_full_log_refuses_new_mail_with_451_and_drops_nothing() {
    let p = pair_config("", None);
    let text = std::fs::read_to_string(&p.a_config).unwrap();
    std::fs::write(&p.a_config, format!("{text}pending_max = 5\n")).unwrap();
    let a = Daemon::start_with(&["--config", &p.a_config]); // the partner never starts
    let (mut c, _) = Client::connect(a.smtp);
    c.cmd("EHLO full");
    let mut codes = Vec::new();
    for i in 0..8 {
        c.cmd("MAIL FROM:<f@example.com>");
        c.cmd("RCPT TO:<r@example.org>");
        c.cmd("DATA");
        c.send(format!("Subject: {i}\r\n\r\nx\r\n.\r\n").as_bytes());
        codes.push(c.reply()[..9].to_string());
    }
    assert_eq!(
        codes.iter().filter(|c| c.starts_with("250")).count(),
        5,
        "{codes:?}"
    );
    assert!(codes[5..].iter().all(|c| c == "451 4.3.0"), "{codes:?}");
    assert_eq!(a.spooled_ids().len(), 5, "refused mail left nothing behind");
    assert!(
        wait_until(5, || a.metric("spoold_ha_pending_actions") == Some(5.0)),
        "kept pending"
    );
    assert!(a.metric("spoold_ha_log_full_total").unwrap_or(0.0) >= 3.0);
}

#[test]
fn sync_mode_with_accept_falls_back_to_async_while_the_partner_is_down_and_counts_it() {
    let p = pair_config("", None);
    let text = std::fs::read_to_string(&p.a_config).unwrap();
    std::fs::write(
        &p.a_config,
        format!(
            "{text}replication = \"sync\"\nsync_partner_down = \"accept\"\nsync_timeout_ms = 300\n"
        ),
    )
    .unwrap();
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let acked = load(&a, 1, 3, Arc::default()).finish_ids();
    assert_eq!(acked.len(), 3, "accepted although the partner is down");
    assert_eq!(a.metric("spoold_ha_sync_fallbacks_total"), Some(3.0));
    assert_eq!(a.metric("spoold_ha_sync_rejected_total"), Some(0.0));
    // The partner comes up and gets them (the fallback is async replication, not a loss).
    let b = Daemon::start_with(&["--config", &p.b_config]);
    assert!(
        wait_until(10, || ids(&b) == acked),
        "partner holds {:?}",
        ids(&b)
    );
}

/// Heartbeats: a partner that stops answering without closing its connections (frozen with
/// SIGSTOP, as a hung machine or a black-holed network would look) is taken as gone within a
/// few heartbeats (the link is dropped and retried), and the log drains once it answers again.
#[test]
fn a_silent_partner_is_dropped_after_a_few_heartbeats_and_caught_up_when_it_answers() {
    let p = pair_config("", None);
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    b.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let acked = load(&a, 1, 10, Arc::default()).finish_ids();
    assert_eq!(
        acked.len(),
        10,
        "A accepts while the partner is frozen (async mode)"
    );
    assert!(
        wait_until(10, || a.metric("spoold_ha_link_up") == Some(0.0)),
        "the link is dropped"
    );
    let noticed = frozen.elapsed();
    eprintln!("a frozen partner was dropped after {noticed:?}");
    assert!(noticed < Duration::from_secs(8), "{noticed:?}");
    assert!(a.log_text().contains("partner silent"));
    b.signal(libc::SIGCONT);
    assert!(
        wait_until(20, || ids(&b) == acked),
        "caught up after it answers: {} of 10",
        ids(&b).len()
    );
}

/// A pair whose `[ha]` sections end with `ha_extra`, both spooling without delivering, link up.
fn pair_with(ha_extra: &str) -> (tests::PairConfig, Daemon, Daemon) {
    let p = pair_config("", None);
    for path in [&p.a_config, &p.b_config] {
        let text = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, format!("{text}{ha_extra}")).unwrap();
    }
    let a = Daemon::start_with(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    (p, a, b)
}

/// One message on a new session: the reply to its data, and how long that reply took.
fn send_one(d: &Daemon, n: usize) -> (String, Duration) {
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO frozen");
    let body = tests::sample_body(n, 800);
    let started = Instant::now();
    let reply = c.send_mail("s@example.com", &["r@example.org"], &body);
    (reply, started.elapsed())
}

/// Sync mode against a partner that is frozen (SIGSTOP: its connections stay open and nothing
/// answers), not down: after `sync_timeout_ms`, `reject` answers `451` and keeps nothing,
/// `accept` answers `250` and counts the fallback to async.
#[test]
fn sync_mode_with_a_frozen_partner_answers_as_sync_partner_down_says() {
    for policy in ["reject", "accept"] {
        let (_p, a, b) = pair_with(&format!(
            "replication = \"sync\"\nsync_partner_down = \"{policy}\"\nsync_timeout_ms = 500\n"
        ));
        b.signal(libc::SIGSTOP);
        let replies: Vec<(String, Duration)> = (0..2).map(|n| send_one(&a, n)).collect();
        b.signal(libc::SIGCONT);
        eprintln!("sync, {policy}, partner frozen: {replies:?}");
        for (reply, took) in &replies {
            let want = if policy == "reject" {
                "451 4.3.0"
            } else {
                "250 2.0.0"
            };
            assert!(reply.starts_with(want), "{policy}: {reply}");
            assert!(
                *took >= Duration::from_millis(450),
                "{policy}: answered after {took:?}, before the sync timeout"
            );
        }
        let (rejected, fallbacks) = (
            a.metric("spoold_ha_sync_rejected_total"),
            a.metric("spoold_ha_sync_fallbacks_total"),
        );
        if policy == "reject" {
            assert_eq!((rejected, fallbacks), (Some(2.0), Some(0.0)));
            assert!(a.spooled_ids().is_empty(), "withdrawn: nothing kept");
        } else {
            assert_eq!((rejected, fallbacks), (Some(0.0), Some(2.0)));
            assert_eq!(a.spooled_ids().len(), 2);
            assert!(
                wait_until(10, || ids(&b) == ids(&a)),
                "replicated once the partner answers"
            );
        }
    }
    // A partner that thaws within the timeout: the `250` waits for it, and from then on it
    // holds the message, even when the active unit dies right after answering.
    let (_p, mut a, b) = pair_with(
        "replication = \"sync\"\nsync_partner_down = \"reject\"\nsync_timeout_ms = 2500\n",
    );
    b.signal(libc::SIGSTOP);
    let pid = b.child.as_ref().unwrap().id() as i32;
    let thaw = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1000));
        // SAFETY: kill(2) on the test's own child.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    let (reply, took) = send_one(&a, 7);
    a.kill9();
    thaw.join().unwrap();
    eprintln!("sync, partner thawed after 1 s: {reply:?} in {took:?}");
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    assert!(
        took >= Duration::from_millis(900),
        "answered before the partner had it: {took:?}"
    );
    let id = queued_id(&reply).unwrap();
    assert!(
        wait_until(5, || ids(&b).contains(&id)),
        "the partner holds {id}"
    );
}

/// What sync mode buys: the active unit killed right after its `250`s. The partner is cut off
/// (a partition: nothing sent reaches it) and comes back 1 s later; mail sent meanwhile gets
/// its reply, and the active unit is killed at once. Async mode has acknowledged mail that only
/// the dead unit holds; sync mode acknowledged only what the partner holds (it answered once
/// the partner had the message, or refused with `451`).
#[test]
fn a_kill_right_after_the_250s_loses_nothing_in_sync_mode_and_async_mode_may() {
    for mode in ["sync", "async"] {
        let (p, proxy) = tests::pair_config_through_proxy("");
        let proxy = Arc::new(proxy);
        for path in [&p.a_config, &p.b_config] {
            let text = std::fs::read_to_string(path).unwrap();
            std::fs::write(
                path,
                format!("{text}replication = \"{mode}\"\nsync_partner_down = \"reject\"\nsync_timeout_ms = 2500\n"),
            )
            .unwrap();
        }
        let mut a = Daemon::start_with(&["--config", &p.a_config]);
        let b = Daemon::start_with(&["--config", &p.b_config]);
        assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
        proxy.partition(true);
        let heal = {
            let proxy = proxy.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(1000));
                proxy.partition(false);
            })
        };
        let senders: Vec<_> = (0..4)
            .map(|n| {
                let handle = Daemon::handle_for(a.smtp);
                std::thread::spawn(move || send_one(&handle, 100 + n))
            })
            .collect();
        let replies: Vec<(String, Duration)> =
            senders.into_iter().map(|s| s.join().unwrap()).collect();
        a.kill9();
        heal.join().unwrap();
        let acked: BTreeSet<String> = replies.iter().filter_map(|(r, _)| queued_id(r)).collect();
        for (reply, _) in &replies {
            assert!(
                reply.starts_with("250 2.0.0") || reply.starts_with("451 4.3.0"),
                "{mode}: {reply}"
            );
        }
        std::thread::sleep(Duration::from_millis(1000));
        let on_b = ids(&b);
        let missing: Vec<&String> = acked.difference(&on_b).collect();
        eprintln!(
            "{mode}: {} of 4 acknowledged (replies {:?}), {} of them missing on the partner after the kill",
            acked.len(),
            replies.iter().map(|(r, t)| format!("{} in {t:?}", &r[..3])).collect::<Vec<_>>(),
            missing.len()
        );
        if mode == "sync" {
            assert!(missing.is_empty(), "sync mode lost {missing:?}");
        } else {
            assert_eq!(acked.len(), 4, "async mode acknowledges at once");
            assert_eq!(
                missing.len(),
                4,
                "async mode: the cut-off partner cannot hold what the active acknowledged"
            );
        }
    }
}

/// Regression: a sender reading a message's body from its file (no outbox) keeps the mapping
/// while the link drains; meanwhile the active unit delivers and removes the message, and its
/// file was recycled for new mail, truncated under the mapping: the next read of those pages
/// (rustls encrypting them once the link could take more) killed the daemon with SIGBUS and
/// left no line in its log. The partner is frozen for a moment so that the link backs up.
#[test]
fn a_sender_reading_files_that_delivery_removes_and_recycles_keeps_the_daemon_alive() {
    let sink = SmtpSink::start();
    let p = tests::pair_delivering_to(sink.addr);
    let mut config = std::fs::read_to_string(&p.a_config).unwrap();
    config.push_str("outbox_bytes = 0\n"); // the [ha] table is the file's last
    std::fs::write(&p.a_config, config).unwrap();
    let mut a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    let mut acked = BTreeSet::new();
    for round in 0..6 {
        b.signal(libc::SIGSTOP);
        let sent: Vec<_> = (0..4)
            .map(|t| {
                let smtp = a.smtp;
                std::thread::spawn(move || {
                    let (mut c, _) = Client::connect(smtp);
                    c.cmd("EHLO big");
                    let mut ids = Vec::new();
                    for i in 0..15 {
                        let n = round * 10_000 + t * 1_000 + i;
                        let body = sample_body(n, 60_000 + (n % 7) * 20_000);
                        let r = c.send_mail("s@example.com", &["r@example.org"], &body);
                        match queued_id(&r) {
                            Some(_) => ids.push(
                                tests::message_id_of(&String::from_utf8_lossy(&body)).unwrap(),
                            ),
                            None => break,
                        }
                    }
                    ids
                })
            })
            .collect();
        for s in sent {
            acked.extend(s.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(1500));
        b.signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(500));
        let alive = a.child.as_mut().unwrap().try_wait().unwrap();
        assert!(
            alive.is_none(),
            "round {round}: the active unit died ({alive:?}):\n{}",
            a.log_text()
        );
    }
    assert!(acked.len() >= 300, "{}", acked.len());
    assert!(
        wait_until(60, || a.spooled_ids().is_empty()),
        "the active unit's spool drains"
    );
    let arrivals = sink.arrivals();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|m| !arrivals.contains_key(*m))
        .collect();
    assert!(lost.is_empty(), "acknowledged, never delivered: {lost:?}");
    let from_spool = a.metric("spoold_ha_sent_adds_total{from=\"spool\"}");
    eprintln!(
        "{} acknowledged and delivered; ADDs read from the files: {from_spool:?}",
        acked.len()
    );
}
