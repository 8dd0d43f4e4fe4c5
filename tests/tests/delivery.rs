//! Delivery to real next hops: Postfix's smtp-sink (byte-exact, exactly once, after an outage),
//! an aiosmtpd sink that refuses one recipient (DSN back to the sender; null sender dropped),
//! an aiosmtpd sink that requires STARTTLS, and SIGKILL during delivery under load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tests::{
    free_addr, queued_id, sample_body, wait_until, write_config, write_self_signed, Client, Daemon,
    PySink, SmtpSink,
};

use tests::message_id_of as message_id;

fn send_many(
    d: &Daemon,
    threads: usize,
    per_thread: usize,
    size: usize,
) -> HashMap<String, Vec<u8>> {
    send_many_from(d, 0, threads, per_thread, size)
}

/// Sends `threads × per_thread` messages whose seeds (and Message-IDs) start at `seed_base`.
fn send_many_from(
    d: &Daemon,
    seed_base: usize,
    threads: usize,
    per_thread: usize,
    size: usize,
) -> HashMap<String, Vec<u8>> {
    let sent: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (addr, sent) = (d.smtp, sent.clone());
            std::thread::spawn(move || {
                let (mut c, _) = Client::connect(addr);
                c.cmd("EHLO load");
                for i in 0..per_thread {
                    let body = sample_body(seed_base + t * 100_000 + i, size);
                    let r = c.send_mail("sender@example.com", &["rcpt@example.org"], &body);
                    assert!(queued_id(&r).is_some(), "{r}");
                    let mid = message_id(&String::from_utf8_lossy(&body)).unwrap();
                    sent.lock().unwrap().insert(mid, body);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    Arc::try_unwrap(sent).unwrap().into_inner().unwrap()
}

/// A config file whose default next hop is `hop`, with `extra` lines of `[delivery]` (keep the
/// directory alive).
fn next_hop_config(hop: std::net::SocketAddr, extra: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!("[delivery]\ndefault_next_hop = \"{hop}\"\n{extra}"),
    );
    (dir, cfg)
}

/// A delivering daemon whose default next hop is `sink` (keep the directory alive).
fn relaying_to(sink: &SmtpSink) -> (tempfile::TempDir, Daemon) {
    let (dir, cfg) = next_hop_config(sink.addr, "");
    let d = Daemon::start_delivering(&["--config", &cfg]);
    (dir, d)
}

fn lf(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace("\r\n", "\n")
}

#[test]
fn every_message_reaches_smtp_sink_once_with_the_same_text() {
    let sink = SmtpSink::start();
    let (_dir, d) = relaying_to(&sink);
    let sent = send_many(&d, 8, 40, 3000);
    assert!(
        wait_until(60, || d.spooled_ids().is_empty()),
        "spool not drained: {}",
        d.spooled_ids().len()
    );
    let dumped = sink.dumped();
    assert_eq!(dumped.len(), sent.len(), "each message delivered once");
    let mut seen = HashMap::new();
    for m in &dumped {
        assert_eq!(m.mail_args, "<sender@example.com>");
        assert_eq!(m.rcpt_args, ["<rcpt@example.org>"]);
        let mid = message_id(&m.message).unwrap();
        *seen.entry(mid.clone()).or_insert(0) += 1;
        // Our Received: header first, then the bytes the client sent.
        let ours = tests::strip_received(m.message.as_bytes());
        assert_eq!(String::from_utf8_lossy(ours), lf(&sent[&mid]), "{mid}");
    }
    assert!(seen.values().all(|&n| n == 1));
    assert_eq!(
        d.metric("spoold_delivery_attempts_total{result=\"delivered\"}"),
        Some(sent.len() as f64)
    );
}

/// The same, byte for byte, CRLF included, at a next hop that keeps the bytes it receives
/// (smtp-sink stores LF line endings, so the test above compares text).
#[test]
fn every_message_reaches_a_byte_keeping_next_hop_identical() {
    let sink = PySink::start("", None);
    let (_dir, cfg) = next_hop_config(sink.addr, "");
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let sent = send_many(&d, 4, 20, 3000);
    assert!(wait_until(60, || sink.received().len() == sent.len()));
    for m in sink.received() {
        let ours = tests::strip_received(&m.message);
        let mid = message_id(&String::from_utf8_lossy(ours)).unwrap();
        assert!(
            ours == sent[&mid].as_slice(),
            "{mid}: delivered bytes differ"
        );
    }
}

#[test]
fn next_hop_down_then_up_delivers_everything_once() {
    let sink_addr = free_addr();
    let (_dir, cfg) = next_hop_config(sink_addr, "retry_schedule_secs = [1]\n");
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let sent = send_many(&d, 4, 10, 2000);
    assert!(
        wait_until(10, || d
            .metric("spoold_delivery_attempts_total{result=\"deferred\"}")
            .unwrap_or(0.0)
            >= 40.0),
        "attempts while the next hop is down are deferred"
    );
    assert_eq!(
        d.spooled_ids().len(),
        40,
        "nothing lost while the next hop is down"
    );
    let env = d.envelope(&d.spooled_ids()[0]);
    assert!(
        env.attempts >= 1 && env.last_error.as_deref().unwrap_or("").contains("connect"),
        "{env:?}"
    );
    let sink = SmtpSink::start_on(sink_addr);
    assert!(
        wait_until(30, || d.spooled_ids().is_empty()),
        "spool not drained after the next hop came back"
    );
    let dumped = sink.dumped();
    assert_eq!(dumped.len(), sent.len());
    let mut ids: Vec<String> = dumped
        .iter()
        .map(|m| message_id(&m.message).unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), sent.len(), "nothing twice");
}

#[test]
fn permanent_failure_of_one_recipient_bounces_to_the_sender_only_for_it() {
    let sink = PySink::start("reject", None);
    let (_dir, cfg) = next_hop_config(sink.addr, "");
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO dsn");
    let body =
        b"Subject: partly undeliverable\r\nMessage-ID: <dsn-test@example.com>\r\n\r\nhello\r\n";
    let r = c.send_mail(
        "alice@example.com",
        &[
            "ok1@example.org",
            "reject-me@example.org",
            "ok2@example.org",
        ],
        body,
    );
    assert!(queued_id(&r).is_some());
    // A null-sender message that fails is dropped, not bounced.
    let r = c.send_mail(
        "",
        &["reject-too@example.org"],
        b"Subject: bounce of a bounce\r\n\r\nx\r\n",
    );
    assert!(queued_id(&r).is_some());
    assert!(wait_until(30, || d.spooled_ids().is_empty()
        && sink.received().len() >= 2));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let got = sink.received();
    assert_eq!(
        got.len(),
        2,
        "the original (two recipients) and one DSN: {got:?}"
    );
    let original = got
        .iter()
        .find(|m| m.mail_from == "alice@example.com")
        .unwrap_or_else(|| panic!("{got:?}\n{}", d.log_text()));
    assert_eq!(original.rcpt_tos, ["ok1@example.org", "ok2@example.org"]);
    let dsn = got
        .iter()
        .find(|m| m.mail_from.is_empty() || m.mail_from == "<>")
        .unwrap_or_else(|| panic!("{got:?}"));
    assert_eq!(dsn.rcpt_tos, ["alice@example.com"]);
    let text = String::from_utf8_lossy(&dsn.message);
    assert!(
        text.contains("Content-Type: multipart/report; report-type=delivery-status;"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; reject-me@example.org"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(
        text.contains("Message-ID: <dsn-test@example.com>"),
        "original headers returned"
    );
    assert!(
        !text.contains("ok1@example.org"),
        "only the failed recipient is reported"
    );
    assert!(d
        .log_text()
        .contains("null-sender message failed; dropped without a bounce"));
    assert_eq!(d.metric("spoold_bounces_total"), Some(1.0));
}

#[test]
fn starttls_next_hop_gets_encrypted_delivery() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = write_self_signed(certs.path());
    let sink = PySink::start("", Some((&cert, &key)));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[delivery]\ntls_verify = true\ntls_ca_file = \"{}\"\n[[delivery.routes]]\ndomain = \"*.example.org\"\nnext_hop = \"{}\"\ntls = \"encrypt\"\n",
            cert.display(),
            sink.addr
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO tls");
    let r = c.send_mail(
        "a@example.com",
        &["b@mx.example.org"],
        b"Subject: tls\r\n\r\nsecret\r\n",
    );
    assert!(queued_id(&r).is_some());
    assert!(
        wait_until(30, || sink.received().len() == 1),
        "{}",
        d.log_text()
    );
    let got = &sink.received()[0];
    assert!(got.tls, "delivered over STARTTLS");
    assert!(String::from_utf8_lossy(&got.message).ends_with("\r\n\r\nsecret\r\n"));
}

#[test]
fn sigkill_during_delivery_loses_nothing_and_duplicates_stay_in_the_window() {
    let sink = SmtpSink::start();
    // A next hop slower than ingest, so that mail is both in delivery and queued at the kill.
    let slow = tests::proxy::FaultProxy::start(sink.addr);
    slow.set_reply_delay_ms(30);
    let (_dir, cfg) = next_hop_config(slow.addr, "");
    let mut d = Daemon::start_delivering(&["--config", &cfg]);
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (addr, sent) = (d.smtp, sent.clone());
            std::thread::spawn(move || {
                let (mut c, _) = Client::connect(addr);
                c.cmd("EHLO kill");
                for i in 0..200 {
                    let body = sample_body(t * 100_000 + i, 2500);
                    let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        c.send_mail("k@example.com", &["r@example.org"], &body)
                    })) {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                    if queued_id(&r).is_none() {
                        return;
                    }
                    sent.lock()
                        .unwrap()
                        .insert(message_id(&String::from_utf8_lossy(&body)).unwrap(), ());
                }
            })
        })
        .collect();
    // The kill lands mid-delivery: mail accepted, some delivered, some still held.
    assert!(
        wait_until(30, || sink.dumped().len() >= 20
            && sent.lock().unwrap().len() >= 100),
        "delivery under way"
    );
    let held_at_kill = d.spooled_ids().len();
    d.kill9();
    for s in senders {
        s.join().expect("a sender thread failed");
    }
    eprintln!(
        "killed with {} acknowledged, {} delivered, {held_at_kill} held",
        sent.lock().unwrap().len(),
        sink.dumped().len()
    );
    assert!(held_at_kill > 0, "the kill landed while mail was queued");
    slow.set_reply_delay_ms(0);
    d.restart();
    assert!(
        wait_until(60, || d.spooled_ids().is_empty()),
        "spool not drained after restart"
    );
    let count = sink.arrivals();
    let sent = sent.lock().unwrap();
    for mid in sent.keys() {
        assert!(
            count.contains_key(mid),
            "acknowledged {mid} never delivered"
        );
    }
    let duplicates: usize = count.values().map(|n| n - 1).sum();
    eprintln!(
        "acknowledged {}, delivered {} distinct, duplicates {duplicates}",
        sent.len(),
        count.len()
    );
    // Only messages in flight at the kill (next hop said 250, our .env not yet updated) can go
    // out twice: at most delivery.concurrency_max (20).
    assert!(duplicates <= 20, "{duplicates} duplicates");
}

#[test]
fn recycled_spool_files_carry_only_the_new_messages_bytes() {
    let sink = SmtpSink::start();
    let (_dir, mut d) = relaying_to(&sink);
    let recycled = |d: &Daemon| {
        std::fs::read_dir(d.state.join("tmp"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("recycled.")
            })
            .count()
    };
    // Large messages first: once delivered, their files wait in tmp/ for reuse.
    send_many_from(&d, 0, 4, 15, 20_000);
    assert!(wait_until(60, || d.spooled_ids().is_empty()));
    let pooled = recycled(&d);
    assert!(pooled > 0, "delivered files were recycled");
    assert_eq!(sink.dumped().len(), 60, "each large message delivered once");
    // Next hop gone: small messages reuse the recycled files and stay in spool/.
    drop(sink);
    let sent = send_many_from(&d, 10_000_000, 4, 30, 600);
    assert!(recycled(&d) < pooled, "new mail took recycled files");
    // After a crash, every small message must be whole: a reused file that kept a tail of its
    // old content would differ from the bytes sent (checked below, byte for byte).
    d.kill9();
    d.restart();
    assert_eq!(recycled(&d), 0, "the pool is emptied with the rest of tmp/");
    assert_eq!(
        std::fs::read_dir(d.state.join("corrupt")).unwrap().count(),
        0,
        "nothing corrupt"
    );
    let spooled = d.spooled_ids();
    assert_eq!(spooled.len(), 120);
    for id in &spooled {
        let raw = std::fs::read(d.state.join("spool").join(format!("{id}.body"))).unwrap();
        let text = String::from_utf8_lossy(tests::strip_received(&raw)).into_owned();
        let mid = message_id(&text).unwrap();
        assert!(
            tests::strip_received(&raw) == sent[&mid].as_slice(),
            "{mid}: spooled bytes differ from the bytes sent"
        );
    }
}

/// Recovery reads no envelope (a million of them are minutes of random reads on a cold cache):
/// pairs damaged while the daemon was down are found by their names, and the queue manager sets
/// each aside in `corrupt/` when it first reads it, saying why; the others are delivered once.
#[test]
fn damaged_pairs_found_at_start_are_set_aside_when_first_read_and_the_rest_delivered_once() {
    let sink = SmtpSink::start();
    let (_dir, cfg) = next_hop_config(sink.addr, "");
    let mut d = Daemon::start_with(&["--config", &cfg]);
    send_many(&d, 2, 5, 2000);
    let mut ids = d.spooled_ids();
    ids.sort();
    assert_eq!(ids.len(), 10);
    let message_ids: Vec<String> = ids
        .iter()
        .map(|id| message_id(&lf(&d.body_without_received(id))).unwrap())
        .collect();
    d.kill9();
    let file = |id: &str, ext: &str| d.state.join("spool").join(format!("{id}.{ext}"));
    // 0: torn envelope. 1: body shorter than its envelope says. 2: body of the right length
    // with other bytes. 3: the envelope of message 4 copied over message 3's.
    let env0 = std::fs::read(file(&ids[0], "env")).unwrap();
    std::fs::write(file(&ids[0], "env"), &env0[..env0.len() - 5]).unwrap();
    let body1 = std::fs::read(file(&ids[1], "body")).unwrap();
    std::fs::write(file(&ids[1], "body"), &body1[..100]).unwrap();
    let mut body2 = std::fs::read(file(&ids[2], "body")).unwrap();
    body2[50] ^= 1;
    std::fs::write(file(&ids[2], "body"), &body2).unwrap();
    std::fs::copy(file(&ids[4], "env"), file(&ids[3], "env")).unwrap();

    d.extra_args.retain(|a| a != "--no-delivery");
    d.restart();
    assert!(
        wait_until(30, || d.spooled_ids().is_empty()),
        "still spooled: {:?}",
        d.spooled_ids()
    );
    sink.assert_exactly_once(&message_ids[4..]);
    let reason = |id: &str| {
        std::fs::read_to_string(d.state.join("corrupt").join(format!("{id}.reason")))
            .unwrap_or_else(|e| panic!("{id} not set aside: {e}"))
    };
    for (i, says) in [
        "envelope unusable",
        "body unusable at delivery",
        "checksum",
        "holds the envelope of",
    ]
    .iter()
    .enumerate()
    {
        let r = reason(&ids[i]);
        assert!(r.contains(says), "message {i}: {r}");
        for ext in ["env", "body"] {
            assert!(
                d.state
                    .join("corrupt")
                    .join(format!("{}.{ext}", ids[i]))
                    .exists(),
                "message {i}'s .{ext} kept in corrupt/"
            );
        }
    }
    assert_eq!(d.metric("spoold_corrupt_messages_total"), Some(4.0));
}

/// Recovery reads no envelope, so everything it finds is due at once: a message that was
/// waiting for its retry time is read, put back to that time, and not attempted early.
#[test]
fn a_deferred_message_keeps_its_retry_time_across_a_crash() {
    let nobody = free_addr();
    let (_dir, cfg) = next_hop_config(nobody, "retry_schedule_secs = [3600]\n");
    let mut d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO deferred");
    let r = c.send_mail(
        "sender@example.com",
        &["rcpt@example.org"],
        &sample_body(7, 800),
    );
    let id = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    assert!(
        wait_until(20, || d.envelope(&id).attempts == 1),
        "no failed attempt recorded: {}",
        d.log_text()
    );
    let next = d.envelope(&id).next_attempt_ms;
    d.kill9();
    d.restart();
    // The queue manager reads it at once and puts it back; the gauge counts it each second.
    assert!(
        wait_until(10, || d.metric("spoold_queue_deferred_messages")
            == Some(1.0)),
        "not deferred after the restart: {:?}",
        d.metric("spoold_queue_deferred_messages")
    );
    let env = d.envelope(&id);
    assert_eq!(env.attempts, 1, "attempted again before its retry time");
    assert_eq!(env.next_attempt_ms, next);
}

/// A backlog for a slow next hop holds none of the global delivery slots while it waits for that
/// hop's connections: mail for a fast next hop goes out at once (no head-of-line blocking).
#[test]
fn a_slow_next_hop_backlog_does_not_delay_a_fast_one() {
    let slow_sink = SmtpSink::start();
    let slow = tests::proxy::FaultProxy::start(slow_sink.addr);
    slow.set_reply_delay_ms(300);
    let fast = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[delivery]\nretry_schedule_secs = [1]\n\
             [[delivery.routes]]\ndomain = \"slow.test\"\nnext_hop = \"{}\"\n\
             [[delivery.routes]]\ndomain = \"fast.test\"\nnext_hop = \"{}\"\n",
            slow.addr, fast.addr
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO hol");
    for i in 0..150 {
        let r = c.send_mail("s@example.com", &["r@slow.test"], &sample_body(i, 1000));
        assert!(r.starts_with("250"), "{r}");
    }
    assert!(
        wait_until(10, || !slow_sink.dumped().is_empty()),
        "the slow hop is being served"
    );
    let started = std::time::Instant::now();
    for i in 0..20 {
        let r = c.send_mail(
            "s@example.com",
            &["r@fast.test"],
            &sample_body(1000 + i, 1000),
        );
        assert!(r.starts_with("250"), "{r}");
    }
    assert!(
        wait_until(30, || fast.dumped().len() == 20),
        "fast hop got {} of 20",
        fast.dumped().len()
    );
    let fast_took = started.elapsed();
    let slow_done = slow_sink.dumped().len();
    eprintln!("20 messages for the fast hop delivered in {fast_took:?} while the slow hop had {slow_done} of 150");
    assert!(
        fast_took < std::time::Duration::from_secs(3),
        "the fast hop waited behind the slow one: {fast_took:?}"
    );
    assert!(slow_done < 150, "the slow backlog was still there");
    let most = slow.connections_max();
    eprintln!("at most {most} connections to the slow next hop at once");
    assert!(
        (1..=5).contains(&most),
        "delivery.per_destination_max (5) bounds the connections to one next hop: {most}"
    );
}

/// A next hop that answers 4xx: the message is deferred (attempt counted, the reply recorded),
/// kept, and delivered once when the next hop accepts again.
#[test]
fn a_4xx_from_the_next_hop_is_retried_until_it_accepts() {
    let addr = free_addr();
    let refusing = SmtpSink::start_with(addr, &["-r", "rcpt"]);
    let (_dir, cfg) = next_hop_config(addr, "retry_schedule_secs = [1]\n");
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO retry");
    let body = sample_body(1, 500);
    let id = queued_id(&c.send_mail("s@example.com", &["r@example.org"], &body)).unwrap();
    assert!(wait_until(10, || d.envelope(&id).attempts >= 2), "retried");
    let env = d.envelope(&id);
    let last = env.last_error.clone().unwrap_or_default();
    // smtp-sink's soft refusal of RCPT, recorded whole with the next hop that gave it.
    assert_eq!(
        last,
        format!("{addr}: 450 4.3.0 Error: command failed"),
        "the 4xx is recorded"
    );
    assert!(refusing.dumped().is_empty());
    assert!(
        d.metric("spoold_delivery_attempts_total{result=\"deferred\"}")
            .unwrap_or(0.0)
            >= 2.0
    );
    refusing.stop();
    let accepting = SmtpSink::start_on(addr);
    assert!(wait_until(10, || accepting.dumped().len() == 1));
    assert!(wait_until(5, || d.spooled_ids().is_empty()));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(accepting.dumped().len(), 1, "delivered once");
}

/// Past `delivery.queue_lifetime_secs` a message still deferred bounces: a DSN goes to the
/// sender (through its own route) and the original leaves the spool.
#[test]
fn a_message_past_its_queue_lifetime_bounces_to_the_sender() {
    let bounces = PySink::start("", None);
    let dead = free_addr(); // nothing listens: every attempt is deferred
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[delivery]\ndefault_next_hop = \"{dead}\"\nretry_schedule_secs = [1]\nqueue_lifetime_secs = 2\n\
             [[delivery.routes]]\ndomain = \"sender.test\"\nnext_hop = \"{}\"\n",
            bounces.addr
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO lifetime");
    let id = queued_id(&c.send_mail(
        "me@sender.test",
        &["r@example.org"],
        b"Subject: too late\r\nMessage-ID: <late@test>\r\n\r\nx\r\n",
    ))
    .unwrap();
    assert!(
        wait_until(20, || bounces.received().len() == 1),
        "a DSN reached the sender"
    );
    let dsn = &bounces.received()[0];
    let text = String::from_utf8_lossy(&dsn.message);
    assert_eq!(dsn.rcpt_tos, ["me@sender.test"]);
    assert!(text.contains("queue lifetime exceeded"), "{text}");
    assert!(
        text.contains("<late@test>"),
        "the DSN carries the original's headers"
    );
    assert!(wait_until(5, || !d.spooled_ids().contains(&id)));
    assert_eq!(d.metric("spoold_bounces_total"), Some(1.0));
}

/// Regression: draining a backlog with the archive on (the default) ran archive writes on as
/// many blocking threads as the runtime would make, each holding an LMDB reader slot for life,
/// until the catalog refused readers (`MDB_READERS_FULL`) and messages stayed in the spool.
#[test]
fn a_backlog_of_thousands_drains_with_the_archive_on_and_no_archive_failure() {
    let sink_addr = free_addr();
    let (_dir, cfg) = next_hop_config(sink_addr, "retry_schedule_secs = [1]\n");
    // Spooled while nothing delivers, then drained at full speed.
    let mut d = Daemon::start_with(&["--config", &cfg]);
    let sent = send_many(&d, 8, 500, 1500);
    assert_eq!(d.spooled_ids().len(), 4000);
    // As a crash leaves it: recovery finds the backlog by its file names.
    d.kill9();
    d.extra_args.retain(|a| a != "--no-delivery");
    let sink = SmtpSink::start_on(sink_addr);
    let started = std::time::Instant::now();
    d.restart();
    assert!(
        wait_until(120, || d.spooled_ids().is_empty()),
        "{} still spooled after 120 s; archive failures: {:?}",
        d.spooled_ids().len(),
        d.metric("spoold_archive_failures_total")
    );
    let drained = started.elapsed();
    eprintln!("4,000 messages drained with the archive on in {drained:?}");
    assert_eq!(d.metric("spoold_archive_failures_total"), Some(0.0));
    assert!(
        !d.log_text().contains("archive failed"),
        "{}",
        d.log_text()
            .lines()
            .filter(|l| l.contains("archive failed"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (code, status, err) = tests::spoolctl(&d, &["--json", "archive", "status"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["items"], 4000, "every delivered message is archived");
    assert_eq!(status["waiting"], 0);
    let arrivals = sink.arrivals();
    let mut want: Vec<&String> = sent.keys().collect();
    want.sort();
    let mut got: Vec<&String> = arrivals.keys().collect();
    got.sort();
    assert_eq!(got, want, "the sink holds exactly the spooled Message-IDs");
    assert!(arrivals.values().all(|&n| n == 1), "nothing twice");
}
