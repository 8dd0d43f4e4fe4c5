//! The malformed-input battery against a live daemon: every limit, bare-LF smuggling,
//! pipelined batches and disconnects mid-DATA get their exact replies, nothing is half-spooled,
//! and the daemon still answers afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use tests::{queued_id, Client, Daemon};

fn daemon() -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("spoold.toml");
    std::fs::write(
        &cfg,
        "node_name = \"battery\"\n[smtp]\nmessage_bytes_max = 200000\nrecipients_max = 5\n\
         idle_timeout_secs = 2\nsessions_max = 4\ntrusted_networks = []\nrelay_domains = [\"relay.test\"]\n\
         [spool]\nspill_bytes = 16384\n",
    )
    .unwrap();
    (
        Daemon::start_with(&["--config", cfg.to_str().unwrap()]),
        dir,
    )
}

fn code(reply: &str) -> &str {
    reply
        .lines()
        .last()
        .map(|l| &l[..l.len().min(9)])
        .unwrap_or("")
}

fn still_answers(d: &Daemon) {
    let (mut c, greeting) = Client::connect(d.smtp);
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(c.cmd("NOOP").starts_with("250 2.0.0"));
    assert!(c.cmd("QUIT").starts_with("221"));
}

#[test]
fn every_limit_and_sequence_error_has_its_reply() {
    let (d, _dir) = daemon();
    let (mut c, _) = Client::connect(d.smtp);
    assert_eq!(code(&c.cmd("MAIL FROM:<a@b.test>")), "503 5.5.1");
    assert_eq!(code(&c.cmd("EHLO battery")), "250 SMTPU");
    assert_eq!(
        code(&c.cmd(&format!("NOOP {}", "x".repeat(600)))),
        "500 5.5.2"
    );
    assert_eq!(code(&c.cmd("RCPT TO:<x@relay.test>")), "503 5.5.1");
    assert_eq!(code(&c.cmd("DATA")), "503 5.5.1");
    assert_eq!(code(&c.cmd("XYZZY")), "500 5.5.1");
    assert_eq!(
        code(&c.cmd("MAIL FROM:<a@b.test> SIZE=999999999")),
        "552 5.3.4"
    );
    assert_eq!(code(&c.cmd("MAIL FROM:<not an address>")), "501 5.1.7");
    assert_eq!(code(&c.cmd("MAIL FROM:<a@b.test>")), "250 2.1.0");
    assert_eq!(code(&c.cmd("MAIL FROM:<a@b.test>")), "503 5.5.1");
    assert_eq!(
        code(&c.cmd("RCPT TO:<victim@elsewhere.test>")),
        "554 5.7.1",
        "not an open relay"
    );
    assert_eq!(code(&c.cmd("DATA")), "554 5.5.1");
    for i in 0..5 {
        assert_eq!(
            code(&c.cmd(&format!("RCPT TO:<r{i}@relay.test>"))),
            "250 2.1.5"
        );
    }
    assert_eq!(code(&c.cmd("RCPT TO:<r5@relay.test>")), "452 4.5.3");
    assert_eq!(code(&c.cmd("DATA")), "354 End d");
    c.send(&[&[b'x'; 100][..], b"\r\n"].concat().repeat(2100));
    c.send(b".\r\n");
    assert_eq!(code(&c.reply()), "552 5.3.4");
    assert_eq!(code(&c.cmd("VRFY someone")), "252 2.0.0");
    assert_eq!(code(&c.cmd("RSET")), "250 2.0.0");
    assert!(d.spooled_ids().is_empty());
    assert!(
        d.folder("tmp").is_empty(),
        "oversize message left nothing in tmp/"
    );
    still_answers(&d);
}

#[test]
fn bare_lf_smuggling_is_refused_and_nothing_is_spooled() {
    let (d, _dir) = daemon();
    for evil in [
        &b"Subject: first\r\n\r\nbody\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@relay.test>\r\nDATA\r\nsmuggled\r\n.\r\n"[..],
        b"Subject: first\r\n\r\nbody\r\n\n.\n\r\nMAIL FROM:<evil@x.test>\r\n",
        b"Subject: first\r\n\r\nbody\r\n.\rMAIL FROM:<evil@x.test>\r\n.\r\n",
    ] {
        let (mut c, _) = Client::connect(d.smtp);
        c.cmd("EHLO evil");
        c.cmd("MAIL FROM:<a@x.test>");
        c.cmd("RCPT TO:<b@relay.test>");
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(evil);
        let r = c.reply();
        assert!(r.starts_with("550 5.5.2 Error: bare <"), "{r}");
        assert_eq!(c.reply(), "", "connection closed after the violation");
    }
    assert!(
        d.spooled_ids().is_empty(),
        "neither the carrier nor the smuggled message spooled"
    );
    still_answers(&d);
}

#[test]
fn nul_in_data_is_refused_at_the_real_end_and_the_session_goes_on() {
    let (d, _dir) = daemon();
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO nul");
    for evil in [
        // A next hop that drops NULs would end the data at `<CRLF>NUL.<CRLF>` and read the rest
        // as a second transaction.
        &b"Subject: first\r\n\r\nbody\r\n\0.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@relay.test>\r\nDATA\r\nsmuggled\r\n"[..],
        b"Subject: first\r\n\r\nbody\r\n.\0\r\nMAIL FROM:<evil@x.test>\r\n",
        b"Subject: \0 in a header\r\n\r\nbody\r\n",
    ] {
        c.cmd("MAIL FROM:<a@x.test>");
        c.cmd("RCPT TO:<b@relay.test>");
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(evil);
        c.send(b".\r\n");
        assert_eq!(
            c.reply(),
            "550 5.6.0 Error: NUL character in message content\r\n"
        );
        assert_eq!(code(&c.cmd("NOOP")), "250 2.0.0", "the session goes on");
    }
    assert!(c
        .send_mail(
            "a@x.test",
            &["b@relay.test"],
            b"Subject: clean\r\n\r\nok\r\n"
        )
        .starts_with("250 2.0.0"));
    let ids = d.spooled_ids();
    assert_eq!(ids.len(), 1, "only the clean message is spooled");
    assert_eq!(
        d.body_without_received(&ids[0]),
        b"Subject: clean\r\n\r\nok\r\n"
    );
    assert!(d.folder("tmp").is_empty(), "{:?}", d.folder("tmp"));
}

#[test]
fn every_refused_command_line_has_its_reply() {
    let (d, _dir) = daemon();
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO lines");
    c.send(b"NOOP a\0b\r\n");
    assert_eq!(
        c.reply(),
        "500 5.5.2 Error: invalid characters in command\r\n"
    );
    c.send(b"MAIL FROM:<a\0@x.test>\r\n");
    assert_eq!(code(&c.reply()), "500 5.5.2", "NUL in MAIL");
    c.send(b"NOOP a\rb\r\n");
    assert_eq!(code(&c.reply()), "500 5.5.2", "bare CR in a command");
    c.send(b"NOOP \xff\xfe\r\n");
    assert_eq!(code(&c.reply()), "500 5.5.2", "invalid UTF-8");
    assert_eq!(code(&c.cmd("MAIL FROM:a@x.test")), "501 5.5.4");
    assert_eq!(code(&c.cmd("MAIL FROM:<a@b@x.test>")), "501 5.1.7");
    assert_eq!(code(&c.cmd("MAIL FROM:<a@x.test>")), "250 2.1.0");
    assert_eq!(code(&c.cmd("RCPT TO:<a@b@relay.test>")), "501 5.1.3");
    assert_eq!(
        code(&c.cmd("RCPT TO:<a@relay.test> NOTIFY=NEVER")),
        "555 5.5.4"
    );
    assert_eq!(
        c.cmd("RCPT TO:<a%b@relay.test>"),
        "554 5.7.1 Sender-specified routing is not allowed\r\n",
        "nothing is trusted in this battery"
    );
    c.send(b"NOOP\n");
    assert_eq!(c.reply(), "550 5.5.2 Error: bare <LF> received\r\n");
    assert_eq!(c.reply(), "", "closed after a bare LF");
    assert!(d.spooled_ids().is_empty());

    let (mut c, _) = Client::connect(d.smtp);
    for _ in 0..19 {
        assert_eq!(code(&c.cmd("XYZZY")), "500 5.5.1");
    }
    assert_eq!(code(&c.cmd("XYZZY")), "500 5.5.1");
    assert_eq!(
        c.reply(),
        "421 4.7.0 Too many errors, closing connection\r\n"
    );
    assert_eq!(c.reply(), "");
    still_answers(&d);
}

#[test]
fn pipelined_batch_spools_each_message_once() {
    let (d, _dir) = daemon();
    let (mut c, _) = Client::connect(d.smtp);
    c.send(b"EHLO pipe\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@relay.test>\r\nRCPT TO:<nope@other.test>\r\nDATA\r\nSubject: one\r\n\r\n..dot\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<c@relay.test>\r\nDATA\r\nSubject: two\r\n\r\n.\r\nQUIT\r\n");
    let mut replies = Vec::new();
    loop {
        let r = c.reply();
        if r.is_empty() {
            break;
        }
        replies.push(r);
    }
    let codes: Vec<&str> = replies.iter().map(|r| code(r)).map(|c| &c[..3]).collect();
    assert_eq!(
        codes,
        ["250", "250", "250", "554", "354", "250", "250", "250", "354", "250", "221"]
    );
    let ids = d.spooled_ids();
    assert_eq!(ids.len(), 2);
    assert_eq!(queued_id(&replies[5]).as_deref(), Some(ids[0].as_str()));
    assert_eq!(
        d.body_without_received(&ids[0]),
        b"Subject: one\r\n\r\n.dot\r\n"
    );
    assert_eq!(d.envelope(&ids[0]).recipients.len(), 1);
    assert_eq!(d.envelope(&ids[1]).sender, "");
}

#[test]
fn disconnect_mid_data_leaves_nothing_behind() {
    let (d, _dir) = daemon();
    for size in [100usize, 100_000] {
        let (mut c, _) = Client::connect(d.smtp);
        c.cmd("EHLO gone");
        c.cmd("MAIL FROM:<a@x.test>");
        c.cmd("RCPT TO:<b@relay.test>");
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(&b"line of a message that never ends\r\n".repeat(size / 35 + 1));
        c.shutdown_write();
        assert_eq!(c.reply(), "");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.spooled_ids().is_empty());
    assert!(
        d.folder("tmp").is_empty(),
        "spilled partial body removed: {:?}",
        d.folder("tmp")
    );
    still_answers(&d);
}

#[test]
fn idle_sessions_time_out_and_excess_sessions_get_421() {
    let (d, _dir) = daemon();
    let started = Instant::now();
    let (mut idle, _) = Client::connect(d.smtp);
    assert_eq!(code(&idle.reply()), "421 4.4.2");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let held: Vec<_> = (0..4).map(|_| Client::connect(d.smtp)).collect();
    let (_, refused) = Client::connect(d.smtp);
    assert!(refused.starts_with("421 4.7.0"), "{refused}");
    assert_eq!(
        d.metric("spoold_smtp_sessions"),
        Some(4.0),
        "the 4 held (the idle one ended)"
    );
    assert_eq!(d.metric("spoold_smtp_sessions_refused_total"), Some(1.0));
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    still_answers(&d);
}
