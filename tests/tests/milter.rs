//! The milter chain before the `250`, with the real daemons operators plug in (rspamd in
//! milter mode, OpenDKIM signing) and with a milter that misbehaves on purpose: a reject is the
//! reply after the dot and nothing is spooled; what a milter adds is in the bytes spooled,
//! replicated, delivered and archived; a milter that is down, hangs or closes mid-body gets its
//! `default_action`; kill -9 while milters answer loses nothing acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use tests::milters::{gtube, Behaviour, FakeMilter, OpenDkim, Rspamd, QUARANTINED_SUBJECT};
use tests::{
    assert_acknowledged_whole, pair_config, queued_id, spoolctl_ok, stranger_ip, wait_until,
    write_config, Acked, Client, CrashLoad, Daemon, PySink,
};

fn message(message_id: &str, subject: &str, text: &str) -> Vec<u8> {
    format!(
        "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n\r\n{text}\r\n"
    )
    .into_bytes()
}

fn body_of(d: &Daemon, folder: &str, id: &str) -> Vec<u8> {
    std::fs::read(d.state.join(folder).join(format!("{id}.body"))).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn milter_metric(d: &Daemon, milter: &str, action: &str) -> f64 {
    d.metric(&format!(
        "spoold_milter_actions_total{{action=\"{action}\",milter=\"{milter}\"}}"
    ))
    .unwrap_or(0.0)
}

/// MAIL, RCPT, DATA by hand: the reply to DATA (a milter that refuses before the body
/// answers there).
fn up_to_data(c: &mut Client, to: &str) -> String {
    assert!(c.cmd("MAIL FROM:<alice@example.com>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{to}>")).starts_with("250"));
    c.cmd("DATA")
}

#[test]
fn rspamd_rejects_gtube_before_the_250_and_its_headers_are_spooled_replicated_and_archived() {
    let dir = tempfile::tempdir().unwrap();
    let rspamd = Rspamd::start(dir.path());
    let next_hop = PySink::start("never-", None);
    let chain = format!(
        "[[filter.milter]]\nname = \"rspamd\"\nsocket = \"inet:{}\"\nend_timeout_secs = 60\n",
        rspamd.addr
    );
    // Phase one: delivery off, so the spooled message and its replica can be read.
    let p = pair_config(&format!("{chain}[delivery]\nenabled = false\n"), None);
    let mut a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_with(&["--config", &p.b_config]);

    let (mut c, _) = Client::connect(a.smtp);
    c.cmd("EHLO client.example");
    let spam = message("gtube@example.com", "cheap", &gtube());
    let r = c.send_mail("alice@example.com", &["bob@example.org"], &spam);
    assert!(r.starts_with("554 5.7.1 Gtube pattern"), "{r}");
    assert!(a.spooled_ids().is_empty(), "a rejected message was spooled");
    assert_eq!(milter_metric(&a, "rspamd", "reject"), 1.0);

    let ham = message("ham@example.com", "lunch", "Shall we meet at noon?");
    let r = c.send_mail("alice@example.com", &["bob@example.org"], &ham);
    let id = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    assert_eq!(a.spooled_ids(), vec![id.clone()], "only the clean message");
    let spooled = body_of(&a, "spool", &id);
    let spooled_text = text(&spooled);
    assert!(
        spooled_text.contains(&format!("X-Rspamd-Queue-Id: {id}\r\n")),
        "{spooled_text}"
    );
    assert!(
        spooled_text.contains("X-Spamd-Result: default: False"),
        "{spooled_text}"
    );
    assert!(spooled_text.contains("X-Spam-Status: No"), "{spooled_text}");
    assert!(spooled.ends_with(b"\r\n\r\nShall we meet at noon?\r\n"));
    let env = a.envelope(&id);
    assert_eq!(
        env.body_len,
        spooled.len() as u64,
        "the envelope counts the added headers"
    );
    assert_eq!(
        a.metric("spoold_milter_duration_seconds_count{milter=\"rspamd\"}"),
        Some(2.0),
        "one observation per message"
    );
    // The partner holds the same bytes.
    assert!(wait_until(10, || b
        .folder("spool")
        .contains(&format!("{id}.body"))));
    assert_eq!(body_of(&b, "spool", &id), spooled, "replica differs");
    // Above its quarantine threshold: accepted, spooled as held (phase two quarantines it).
    let spammy = message("prize@example.com", QUARANTINED_SUBJECT, "Claim it today.");
    let r = c.send_mail("alice@example.com", &["bob@example.org"], &spammy);
    let held = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    assert_eq!(
        a.envelope(&held).scan,
        spool::ScanState::Held("rspamd: Spam message quarantined".into())
    );
    assert_eq!(milter_metric(&a, "rspamd", "quarantine"), 1.0);
    // Tracking names the milter's verdicts.
    let tracked = spoolctl_ok(&a, &["track", "ev:milter"]);
    assert!(
        tracked.contains("rspamd: reject 554 5.7.1 Gtube pattern"),
        "{tracked}"
    );
    c.cmd("QUIT");

    // Phase two: delivery on; the next hop and the archive get the spooled bytes.
    a.stop();
    let a_config = std::fs::read_to_string(&p.a_config).unwrap().replace(
        "[delivery]\nenabled = false\n",
        &format!(
            "[delivery]\ndefault_next_hop = \"{}\"\nretry_schedule_secs = [1]\n",
            next_hop.addr
        ),
    );
    std::fs::write(&p.a_config, a_config).unwrap();
    a.restart();
    assert!(wait_until(30, || next_hop.received().len() == 1));
    assert_eq!(
        next_hop.received()[0].message,
        spooled,
        "delivered bytes differ"
    );
    assert!(wait_until(30, || a.spooled_ids().is_empty()));
    assert_eq!(
        a.folder("quarantine"),
        vec![format!("{held}.body"), format!("{held}.env")],
        "the held message is in quarantine/, not delivered"
    );
    assert!(
        wait_until(10, || !b.folder("spool").contains(&format!("{held}.env"))),
        "still on the partner"
    );
    // Found by its spool id once the index has caught up with the catalog.
    let export = || tests::spoolctl_output(&a, &["archive", "export", &id]);
    assert!(wait_until(30, || export().status.success()));
    let archived = export();
    assert_eq!(archived.stdout, spooled, "archived bytes differ");
}

#[test]
fn opendkim_signs_mail_of_trusted_clients_and_not_of_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let dkim = OpenDkim::start(dir.path());
    let next_hop = PySink::start("never-", None);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        cfg_dir.path(),
        &format!(
            "[smtp]\nrelay_domains = [\"example.org\"]\n[delivery]\ndefault_next_hop = \"{}\"\nretry_schedule_secs = [1]\n\
             [[filter.milter]]\nname = \"opendkim\"\nsocket = \"inet:{}\"\nclients = \"trusted\"\n",
            next_hop.addr, dkim.addr
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut trusted, _) = Client::connect(d.smtp);
    trusted.cmd("EHLO inside.example.com");
    let r = trusted.send_mail(
        "alice@example.com",
        &["bob@example.org"],
        &message(
            "signed@example.com",
            "signed, with a Subject long enough\r\n\tto be folded",
            "Signed by the gateway.",
        ),
    );
    assert!(r.starts_with("250"), "{r}");
    let (mut stranger, _) = Client::connect_from(d.smtp, stranger_ip());
    stranger.cmd("EHLO outside.example.net");
    let r = stranger.send_mail(
        "alice@example.com",
        &["bob@example.org"],
        &message("unsigned@example.com", "unsigned", "From outside."),
    );
    assert!(r.starts_with("250"), "{r}");
    assert!(wait_until(30, || next_hop.received().len() == 2));
    let got = next_hop.received();
    let by_id = |mid: &str| {
        got.iter()
            .find(|m| text(&m.message).contains(&format!("Message-ID: <{mid}>")))
            .unwrap()
            .message
            .clone()
    };
    let signed = by_id("signed@example.com");
    assert!(
        text(&signed).starts_with("DKIM-Signature: v=1;"),
        "{}",
        text(&signed)
    );
    assert!(dkim.verifies(&signed), "the signature does not verify");
    // The check can fail: one byte of the body changed breaks it.
    let mut tampered = signed.clone();
    let at = tampered.len() - 4;
    tampered[at] ^= 0x20;
    assert!(!dkim.verifies(&tampered), "a tampered message verified");
    let unsigned = by_id("unsigned@example.com");
    assert!(
        !text(&unsigned).contains("DKIM-Signature"),
        "a stranger's mail was signed"
    );
    assert_eq!(milter_metric(&d, "opendkim", "accept"), 1.0);
}

#[test]
fn a_milter_that_is_down_tempfails_at_data_or_is_passed_with_accept_and_counted() {
    let gone = "[[filter.milter]]\nname = \"gone\"\nsocket = \"unix:/nonexistent/milter.sock\"\n";
    let d = Daemon::start_with(&["--config", &config(gone)]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let r = up_to_data(&mut c, "bob@example.org");
    assert!(r.starts_with("451 4.7.1"), "{r}");
    assert!(d.spooled_ids().is_empty());
    assert_eq!(milter_metric(&d, "gone", "failed"), 1.0);
    // The session goes on.
    assert!(c.cmd("RSET").starts_with("250"));
    drop(d);

    let d = Daemon::start_with(&[
        "--config",
        &config(&format!("{gone}default_action = \"accept\"\n")),
    ]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let r = c.send_mail(
        "alice@example.com",
        &["bob@example.org"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    let id = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    assert_eq!(d.spooled_ids(), vec![id]);
    assert_eq!(milter_metric(&d, "gone", "failed"), 1.0);
    assert!(d.log_text().contains("milter unavailable"));
}

/// A config file in a directory kept for the test's length.
fn config(text: &str) -> String {
    let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    write_config(dir.path(), &format!("[delivery]\nenabled = false\n{text}"))
}

#[test]
fn a_milter_that_hangs_meets_its_timeout_then_the_default_action() {
    let hang = FakeMilter::start(Behaviour::HangAtEnd);
    let d = Daemon::start_with(&[
        "--config",
        &config(&hang.config("slow", "end_timeout_secs = 1")),
    ]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let started = Instant::now();
    let r = c.send_mail(
        "alice@example.com",
        &["bob@example.org"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    let waited = started.elapsed();
    assert!(r.starts_with("451 4.7.1"), "{r}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert!(d.spooled_ids().is_empty());
    assert_eq!(milter_metric(&d, "slow", "failed"), 1.0);
}

/// A milter that stops reading mid-body (its socket buffer fills with a large message) meets
/// the command timeout on the sending side too: the client gets its answer.
#[test]
fn a_milter_that_stops_reading_mid_body_meets_its_timeout() {
    let staller = FakeMilter::start(Behaviour::StallMidBody);
    let d = Daemon::start_with(&[
        "--config",
        &config(&staller.config("staller", "command_timeout_secs = 1")),
    ]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let big = tests::sample_body(2, 4_000_000);
    let started = Instant::now();
    let r = c.send_mail("alice@example.com", &["bob@example.org"], &big);
    assert!(r.starts_with("451 4.7.1"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(d.spooled_ids().is_empty());
    assert_eq!(milter_metric(&d, "staller", "failed"), 1.0);
    assert!(c.cmd("NOOP").starts_with("250"), "the session goes on");
}

#[test]
fn a_milter_that_closes_mid_body_leaves_the_session_going() {
    let closer = FakeMilter::start(Behaviour::CloseMidBody);
    let d = Daemon::start_with(&["--config", &config(&closer.config("closer", ""))]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let big: Vec<u8> = tests::sample_body(1, 300_000);
    let r = c.send_mail("alice@example.com", &["bob@example.org"], &big);
    assert!(r.starts_with("451 4.7.1"), "{r}");
    let r = c.send_mail("alice@example.com", &["bob@example.org"], &big);
    assert!(r.starts_with("451 4.7.1"), "the session died: {r}");
    assert!(d.spooled_ids().is_empty());
    drop(d);

    let d = Daemon::start_with(&[
        "--config",
        &config(&closer.config("closer", "default_action = \"accept\"")),
    ]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let r = c.send_mail("alice@example.com", &["bob@example.org"], &big);
    let id = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    assert_eq!(
        d.body_without_received(&id),
        big,
        "delivered unfiltered, whole"
    );
}

#[test]
fn a_milters_header_and_quarantine_are_applied_and_the_recipient_may_release() {
    let tagger = FakeMilter::start(Behaviour::AddHeader);
    let quarantiner = FakeMilter::start(Behaviour::Quarantine);
    // The scorer learns what its recipients release: here a command that keeps the message.
    let learned = tempfile::tempdir().unwrap();
    let learned_file = learned.path().join("ham.eml");
    let cfg = config(&format!(
        "{}{}",
        tagger.config("tagger", ""),
        quarantiner.config(
            "scorer",
            &format!(
                "learn_on_release = [\"sh\", \"-c\", \"cat > {}\"]",
                learned_file.display()
            )
        )
    ));
    // Delivery on (to nowhere that answers): the queue manager moves held mail to quarantine/.
    let cfg_text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[delivery]\nenabled = false\n",
        "[delivery]\ndefault_next_hop = \"127.0.0.1:9\"\n",
    );
    std::fs::write(&cfg, cfg_text).unwrap();
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let r = c.send_mail(
        "alice@example.com",
        &["bob@example.org"],
        &message("spam@example.com", "win", "You won."),
    );
    let id = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    assert!(
        wait_until(10, || d.folder("quarantine").contains(&format!("{id}.env"))),
        "not quarantined: {:?}",
        d.folder("spool")
    );
    let env_text =
        text(&std::fs::read(d.state.join("quarantine").join(format!("{id}.env"))).unwrap());
    assert!(
        env_text.contains("\nscan held scorer:%20fake%20score%2020\n"),
        "{env_text}"
    );
    let body = text(&body_of(&d, "quarantine", &id));
    assert!(
        body.contains("\r\nX-Fake-Milter: seen\r\n\r\nYou won."),
        "{body}"
    );
    assert_eq!(milter_metric(&d, "scorer", "quarantine"), 1.0);
    assert_eq!(milter_metric(&d, "tagger", "accept"), 1.0);
    let tracked = spoolctl_ok(&d, &["track", "ev:milter"]);
    assert!(
        tracked.contains("scorer: quarantine fake score 20"),
        "{tracked}"
    );

    // Its recipient releases it (the console's request, in their scope); a stranger to it
    // finds nothing.
    let unit = text(&std::fs::read(d.state.join("quarantine").join(format!("{id}.env"))).unwrap())
        .lines()
        .find_map(|l| l.strip_prefix("origin ").map(str::to_string))
        .unwrap();
    let act = |scope: &str| {
        admin(
            &d,
            &format!(
                r#"{{"cmd":"quarantine_act","unit":"{unit}","id":"{id}","action":"release","scope":["{scope}"],"who":"console:test"}}"#
            ),
        )
    };
    let refused = act("carol@example.org");
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(d.folder("quarantine").contains(&format!("{id}.env")));
    let released = act("bob@example.org");
    assert_eq!(released["ok"], true, "{released}");
    assert!(!d.folder("quarantine").contains(&format!("{id}.env")));
    assert!(wait_until(10, || d
        .folder("spool")
        .contains(&format!("{id}.env"))));
    // Back on the way out: the scan stage (no scanner here: unscanned), then delivery.
    let env = d.envelope(&id);
    assert!(
        matches!(
            env.scan,
            spool::ScanState::Pending | spool::ScanState::Unscanned
        ),
        "{:?}",
        env.scan
    );
    assert!(
        wait_until(10, || std::fs::read(&learned_file)
            .is_ok_and(|b| text(&b) == body)),
        "the scorer was not taught the released message"
    );
}

#[test]
fn a_milter_may_discard_or_rewrite_the_envelope_and_a_header() {
    let discarder = FakeMilter::start(Behaviour::Discard);
    let d = Daemon::start_with(&["--config", &config(&discarder.config("dropper", ""))]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let r = c.send_mail(
        "alice@example.com",
        &["bob@example.org"],
        &message("dropped@example.com", "drop", "Gone."),
    );
    assert!(r.starts_with("250"), "a discard is accepted: {r}");
    assert!(d.spooled_ids().is_empty(), "and kept nowhere");
    assert_eq!(milter_metric(&d, "dropper", "discard"), 1.0);
    drop(d);

    let rewriter = FakeMilter::start(Behaviour::Rewrite);
    let d = Daemon::start_with(&["--config", &config(&rewriter.config("rewriter", ""))]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO client.example");
    let r = c.send_mail(
        "alice@example.com",
        &["bob@example.org", "dave@example.org"],
        &message("rewritten@example.com", "original", "Same body."),
    );
    let id = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    let env = d.envelope(&id);
    assert_eq!(env.sender, "new@example.com");
    let rcpts: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, vec!["dave@example.org", "carol@example.org"]);
    let body = text(&d.body_without_received(&id));
    assert!(
        body.contains("\r\nSubject: rewritten\r\n") && !body.contains("original"),
        "{body}"
    );
}

/// One request on the admin socket, as `spoolctl` and the console send them; the answer line.
fn admin(d: &Daemon, request: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(d.state.join("spoold.sock")).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

#[test]
fn kill_9_while_milters_answer_loses_nothing_acknowledged() {
    let tagger = FakeMilter::start(Behaviour::AddHeader);
    let mut d = Daemon::start_with(&["--config", &config(&tagger.config("tagger", ""))]);
    let acked: Acked = Default::default();
    let load = CrashLoad::start(d.smtp, 4, 7, |i| 500 + (i % 7) * 3000, &acked);
    assert!(wait_until(20, || acked.lock().unwrap().len() >= 200));
    d.kill9();
    load.stop();
    d.restart();
    let acked = acked.lock().unwrap().clone();
    let spool = d.spooled_ids();
    // Every acknowledged message is there whole, as sent with the milter's header added at
    // the end of its header block.
    let expected: std::collections::HashMap<String, Vec<u8>> = acked
        .iter()
        .map(|(id, sent)| {
            let blank = sent.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
            let mut b = sent[..blank].to_vec();
            b.extend_from_slice(b"X-Fake-Milter: seen\r\n");
            b.extend_from_slice(&sent[blank..]);
            (id.clone(), b)
        })
        .collect();
    assert_acknowledged_whole(&d, &expected, "kill -9 with a milter");
    assert!(
        spool.len() <= acked.len() + 4,
        "{} spooled, {} acknowledged: at most one unacknowledged per session",
        spool.len(),
        acked.len()
    );
}
