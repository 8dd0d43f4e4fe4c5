//! The vscan stage against a real clamd with a signature database made here (the EICAR test
//! file's MD5 as a `.hdb`; nothing downloaded): EICAR in a MIME attachment is quarantined,
//! clean mail is delivered, and with clamd stopped mail waits in vscan/ until it is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::clamd::{base64, eicar, mime_with_attachment, Clamd};
use tests::{queued_id, wait_until, write_config, Client, Daemon, SmtpSink};

fn folder_ids(d: &Daemon, folder: &str) -> Vec<String> {
    d.folder(folder)
        .into_iter()
        .filter_map(|n| n.strip_suffix(".env").map(str::to_string))
        .collect()
}

#[test]
fn clamd_quarantines_eicar_delivers_clean_mail_and_holds_while_down() {
    let work = tempfile::tempdir().unwrap();
    let mut clamd = Clamd::start(&work.path().join("clamd"));
    let sink = SmtpSink::start();
    let cfg = write_config(work.path(), &clamd.scanning_config(sink.addr));
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO scan");
    let infected = queued_id(&c.send_mail(
        "a@example.com",
        &["b@example.org"],
        &mime_with_attachment("virus", &eicar()),
    ))
    .unwrap();
    let clean = queued_id(&c.send_mail(
        "a@example.com",
        &["b@example.org"],
        &mime_with_attachment("clean", b"just text"),
    ))
    .unwrap();
    assert!(
        wait_until(30, || sink.dumped().len() == 1
            && folder_ids(&d, "quarantine").len() == 1),
        "{}",
        d.log_text()
    );
    assert!(sink.dumped()[0].message.contains("Subject: clean"));
    assert_eq!(
        folder_ids(&d, "quarantine"),
        std::slice::from_ref(&infected)
    );
    let env = std::fs::read_to_string(d.state.join("quarantine").join(format!("{infected}.env")))
        .unwrap();
    assert!(
        env.contains("\nscan infected Eicar-Test-Signature"),
        "{env}"
    );
    assert!(
        d.spooled_ids().is_empty(),
        "clean {clean} delivered and removed"
    );
    assert_eq!(
        d.metric("spoold_scan_verdicts_total{verdict=\"infected\"}"),
        Some(1.0)
    );
    assert_eq!(d.metric("spoold_scan_duration_seconds_count"), Some(2.0));

    // Scanner down: mail waits in vscan/ (fail closed), nothing is delivered unscanned.
    clamd.stop();
    let held = queued_id(&c.send_mail(
        "a@example.com",
        &["b@example.org"],
        b"Subject: while down\r\n\r\nx\r\n",
    ))
    .unwrap();
    assert!(wait_until(10, || folder_ids(&d, "vscan") == [held.clone()]));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        sink.dumped().len(),
        1,
        "nothing delivered while clamd is down"
    );
    assert!(
        d.metric("spoold_scan_verdicts_total{verdict=\"error\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    let _clamd = Clamd::start(&work.path().join("clamd"));
    assert!(
        wait_until(30, || sink.dumped().len() == 2),
        "delivered once clamd is back: {}",
        d.log_text()
    );
    assert!(folder_ids(&d, "vscan").is_empty() && d.spooled_ids().is_empty());
}

#[test]
fn fail_open_delivers_unscanned_when_clamd_is_unreachable() {
    let work = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let cfg = write_config(
        work.path(),
        &format!(
            "[delivery]\ndefault_next_hop = \"{}\"\n[filter]\nclamd = \"unix:{}/nowhere.sock\"\nfail_open = true\n",
            sink.addr,
            work.path().display()
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO open");
    assert!(queued_id(&c.send_mail(
        "a@example.com",
        &["b@example.org"],
        b"Subject: open\r\n\r\nx\r\n"
    ))
    .is_some());
    assert!(
        wait_until(20, || sink.dumped().len() == 1),
        "{}",
        d.log_text()
    );
    assert!(d.log_text().contains("fail_open delivers unscanned"));
    assert_eq!(
        d.metric("spoold_scan_verdicts_total{verdict=\"unscanned\"}"),
        Some(1.0)
    );
}

#[test]
fn quarantine_notice_goes_to_the_sender_when_configured() {
    let work = tempfile::tempdir().unwrap();
    let clamd = Clamd::start(&work.path().join("clamd"));
    let sink = SmtpSink::start();
    let cfg = write_config(
        work.path(),
        &format!(
            "[delivery]\ndefault_next_hop = \"{}\"\n[filter]\nclamd = \"unix:{}\"\nnotify_sender = true\n",
            sink.addr,
            clamd.dir.join("clamd.sock").display()
        ),
    );
    let d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO notice");
    assert!(queued_id(&c.send_mail(
        "sender@example.com",
        &["b@example.org"],
        &mime_with_attachment("virus", &eicar())
    ))
    .is_some());
    assert!(
        wait_until(30, || sink.dumped().len() == 1),
        "{}",
        d.log_text()
    );
    let notice = &sink.dumped()[0];
    assert_eq!(notice.mail_args, "<>");
    assert_eq!(notice.rcpt_args, ["<sender@example.com>"]);
    assert!(notice
        .message
        .contains("Subject: Message held: virus found"));
    assert!(notice.message.contains("Eicar-Test-Signature"));
    assert!(
        !notice.message.contains(&base64(&eicar())[..20]),
        "no content returned"
    );
}

/// With an HA partner: a quarantined message's replica is removed there (its verdict is final),
/// a message waiting in `vscan/` is mirrored in the partner's `spool/`, and the folder gauges
/// equal the folder counts on both units.
#[test]
fn the_partner_drops_quarantined_mail_and_mirrors_vscan_as_spool() {
    let work = tempfile::tempdir().unwrap();
    let mut clamd = Clamd::start(&work.path().join("clamd"));
    let sink = SmtpSink::start();
    let p = tests::pair_config(&clamd.scanning_config(sink.addr), None);
    let a = Daemon::start_delivering(&["--config", &p.a_config]);
    let b = Daemon::start_delivering(&["--config", &p.b_config]);
    assert!(wait_until(10, || a.metric("spoold_ha_link_up") == Some(1.0)));
    let (mut c, _) = Client::connect(a.smtp);
    c.cmd("EHLO scan");
    let infected = queued_id(&c.send_mail(
        "a@example.com",
        &["b@example.org"],
        &mime_with_attachment("virus", &eicar()),
    ))
    .unwrap();
    assert!(wait_until(30, || folder_ids(&a, "quarantine") == [infected.clone()]));
    assert!(
        wait_until(10, || b.spooled_ids().is_empty()
            && folder_ids(&b, "quarantine").is_empty()),
        "B dropped the quarantined message's replica: {:?}",
        b.spooled_ids()
    );
    clamd.stop();
    let waiting = queued_id(&c.send_mail(
        "a@example.com",
        &["b@example.org"],
        b"Subject: while down\r\n\r\nx\r\n",
    ))
    .unwrap();
    assert!(wait_until(10, || folder_ids(&a, "vscan") == [waiting.clone()]));
    assert!(wait_until(10, || b.spooled_ids() == [waiting.clone()]));
    for (d, who) in [(&a, "A"), (&b, "B")] {
        for f in ["spool", "vscan", "quarantine", "hold"] {
            let counted = folder_ids(d, f).len() as f64;
            let gauge = d.metric(&format!("spoold_queue_messages{{folder=\"{f}\"}}"));
            assert_eq!(gauge, Some(counted), "{who}: gauge of {f}/");
        }
    }
}

/// A scanner that accepts and never answers: each scan times out after `filter.timeout_secs`
/// (counted as an error, the message waits in `vscan/`); a daemon killed meanwhile scans the
/// message again after its restart, this time through a real clamd on a `tcp:` address, and
/// delivers it once.
#[test]
fn a_hung_scanner_times_out_and_a_restart_rescans_through_a_tcp_clamd() {
    let work = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hung.incoming().flatten() {
            held.push(s); // read nothing, answer nothing
        }
    });
    let config = |clamd: std::net::SocketAddr| {
        write_config(
            work.path(),
            &format!(
                "[delivery]\ndefault_next_hop = \"{}\"\n[filter]\nclamd = \"tcp:{clamd}\"\nretry_secs = 1\ntimeout_secs = 1\n",
                sink.addr
            ),
        )
    };
    let cfg = config(hung_addr);
    let mut d = Daemon::start_delivering(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO hung");
    let id = queued_id(&c.send_mail(
        "a@example.com",
        &["b@example.org"],
        b"Subject: scanned late\r\n\r\nx\r\n",
    ))
    .unwrap();
    assert!(
        wait_until(10, || d
            .metric("spoold_scan_verdicts_total{verdict=\"error\"}")
            .unwrap_or(0.0)
            >= 2.0),
        "scans time out and are retried"
    );
    assert_eq!(folder_ids(&d, "vscan"), std::slice::from_ref(&id));
    assert!(sink.dumped().is_empty(), "nothing delivered unscanned");
    d.kill9();

    let tcp = tests::free_addr();
    let _clamd = Clamd::start_listening(&work.path().join("clamd"), Some(tcp));
    assert!(wait_until(60, || std::net::TcpStream::connect(tcp).is_ok()));
    config(tcp);
    d.restart();
    assert!(
        wait_until(30, || sink.dumped().len() == 1),
        "rescanned after the restart and delivered: {}",
        d.log_text()
    );
    assert!(folder_ids(&d, "vscan").is_empty() && d.spooled_ids().is_empty());
    assert_eq!(
        d.metric("spoold_scan_verdicts_total{verdict=\"clean\"}"),
        Some(1.0)
    );
}

/// A body damaged while the daemon was down (recovery reads no envelope and no body) is found
/// at the scan: set aside in `corrupt/` with the reason, never scanned, never delivered; a clean
/// message beside it goes out.
#[test]
fn a_body_damaged_while_down_is_set_aside_at_the_scan() {
    let work = tempfile::tempdir().unwrap();
    let clamd = Clamd::start(&work.path().join("clamd"));
    let sink = SmtpSink::start();
    let cfg = write_config(work.path(), &clamd.scanning_config(sink.addr));
    let mut d = Daemon::start_with(&["--config", &cfg]);
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO scan");
    let mut send = |subject: &str| {
        let body = format!("Subject: {subject}\r\n\r\nsome text to scan\r\n");
        queued_id(&c.send_mail("a@example.com", &["b@example.org"], body.as_bytes())).unwrap()
    };
    let damaged = send("damaged");
    let clean = send("clean");
    d.kill9();
    let path = d.state.join("spool").join(format!("{damaged}.body"));
    let mut body = std::fs::read(&path).unwrap();
    let last = body.len() - 3;
    body[last] ^= 1;
    std::fs::write(&path, &body).unwrap();

    d.extra_args.retain(|a| a != "--no-delivery");
    d.restart();
    assert!(
        wait_until(30, || d.spooled_ids().is_empty()
            && folder_ids(&d, "vscan").is_empty()),
        "{}",
        d.log_text()
    );
    let dumped = sink.dumped();
    assert_eq!(dumped.len(), 1, "only the clean message is delivered");
    assert!(dumped[0].message.contains("Subject: clean"), "{clean}");
    let reason =
        std::fs::read_to_string(d.state.join("corrupt").join(format!("{damaged}.reason"))).unwrap();
    assert!(
        reason.starts_with("vscan: body unusable at the scan") && reason.contains("checksum"),
        "{reason}"
    );
    assert_eq!(d.metric("spoold_corrupt_messages_total"), Some(1.0));
    assert_eq!(d.metric("spoold_scan_duration_seconds_count"), Some(1.0));
}
