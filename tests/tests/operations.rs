//! Operating a live spoold: metrics checked by promtool, health endpoints, the systemd unit,
//! configuration errors, SIGUSR2 insertion, SIGTERM under load, the portable writer, and a full
//! disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::spool::{Envelope, IdGenerator};
use tests::{have, http_get, queued_id, sample_body, spoold_bin, workspace_root, Client, Daemon};

fn send_one(d: &Daemon, body: &[u8]) -> String {
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO ops");
    let r = c.send_mail("ops@example.com", &["sink@example.org"], body);
    c.cmd("QUIT");
    r
}

#[test]
fn metrics_pass_promtool_and_health_endpoints_answer() {
    assert!(
        have("promtool"),
        "promtool is required (apt-get install prometheus)"
    );
    let d = Daemon::start();
    assert!(queued_id(&send_one(&d, &sample_body(1, 4096))).is_some());
    let (status, metrics) = http_get(d.http, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "spoold_accepted_messages_total 1",
        "spoold_smtp_replies_total{code=\"250\"}",
        "spoold_commit_batch_messages_bucket",
        "spoold_commit_duration_seconds_bucket",
        "spoold_queue_messages{folder=\"spool\"} 1",
        "spoold_io_uring_in_use 1",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    let out = tests::run_with_stdin(
        Command::new("promtool").args(["check", "metrics"]),
        metrics.as_bytes(),
    );
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(http_get(d.http, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(d.http, "/readyz").unwrap().0, 200);
}

#[test]
fn systemd_unit_verifies() {
    assert!(
        have("systemd-analyze"),
        "systemd-analyze is required (apt-get install systemd)"
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(workspace_root().join("systemd/spoold.service")).unwrap();
    assert!(
        unit.contains("Type=notify")
            && unit.contains("WatchdogSec=")
            && unit.contains("ProtectSystem=strict")
    );
    // verify checks that ExecStart exists: point it at the freshly built binary.
    let unit = unit.replace("/usr/bin/spoold", spoold_bin().to_str().unwrap());
    let path = dir.path().join("spoold.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("spoold.service:"),
        "{text}"
    );
    // The sample configuration is accepted by the daemon itself.
    let sample = workspace_root().join("systemd/spoold.toml");
    let out = Command::new(spoold_bin())
        .arg("--config")
        .arg(&sample)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_config_fails_at_start_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[smtp]\nrecipients_max = \"many\"\n", "recipients_max"),
        ("[smtp]\nlisten = \"nowhere\"\n", "listen"),
        ("node_name = \"Upper Case\"\n", "node_name"),
        ("[spool]\nbogus = 1\n", "bogus"),
        ("[smtp\n", "spoold.toml"),
    ] {
        let path = dir.path().join("spoold.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(spoold_bin())
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{text}: {err}");
        assert!(
            err.contains("spoold.toml") && err.contains(key),
            "{text}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = Command::new(spoold_bin())
        .args(["--config", "/nonexistent/spoold.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/spoold.toml"));
}

fn write_pair(dir: &std::path::Path, node: &str, body: &[u8], tamper: bool) -> String {
    let id = IdGenerator::new(node).unwrap().next_id();
    let env = Envelope::new(id.clone(), "x@example.com", &["y@example.org"], body);
    let mut stored_body = body.to_vec();
    if tamper {
        stored_body[0] ^= 1; // same length, other content: only the checksum can tell
    }
    std::fs::write(dir.join(format!("{id}.body")), stored_body).unwrap();
    std::fs::write(dir.join(format!("{id}.env")), env.encode()).unwrap();
    id.to_string()
}

#[test]
fn sigusr2_inserts_input_pairs_and_rejects_bad_ones() {
    let d = Daemon::start();
    let input = d.state.join("input");
    let good = write_pair(&input, "partner", b"Subject: moved\r\n\r\nhello\r\n", false);
    let bad = write_pair(&input, "partner", b"Subject: moved\r\n\r\nhello\r\n", true);
    d.signal(libc::SIGUSR2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d
        .log_text()
        .contains(&format!("new mail inserted (id={good})"))
    {
        assert!(
            Instant::now() < deadline,
            "no insertion log line: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.spooled_ids().contains(&good));
    assert!(d.folder("input").is_empty());
    assert!(d.folder("corrupt").contains(&format!("{bad}.reason")));
    let reason =
        std::fs::read_to_string(d.state.join("corrupt").join(format!("{bad}.reason"))).unwrap();
    assert!(reason.contains("checksum"), "{reason}");
    assert_eq!(d.metric("spoold_inserted_messages_total"), Some(1.0));
    assert_eq!(d.metric("spoold_corrupt_messages_total"), Some(1.0));
}

#[test]
fn sigterm_under_load_exits_cleanly_and_keeps_every_acknowledged_message() {
    let mut d = Daemon::start();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (addr, acked, stop) = (d.smtp, acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut c, _) = Client::connect(addr);
                c.cmd("EHLO term");
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let r = c.cmd("MAIL FROM:<t@example.com>");
                    if !r.starts_with("250") {
                        return;
                    }
                    c.cmd("RCPT TO:<u@example.org>");
                    c.cmd("DATA");
                    c.send(&sample_body(t * 100_000 + i, 3000));
                    c.send(b".\r\n");
                    match queued_id(&c.reply()) {
                        Some(id) => acked.lock().unwrap().push(id),
                        None => return,
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.stop(), Some(0), "SIGTERM exits 0: {}", d.log_text());
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap();
    assert!(!acked.is_empty());
    d.restart();
    let spooled = d.spooled_ids();
    for id in acked.iter() {
        assert!(spooled.contains(id), "{id} acknowledged but missing");
    }
    assert!(d.log_text().contains("spoold stopped"));
}

#[test]
fn portable_writer_is_selectable_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("spoold.toml");
    std::fs::write(&cfg, "[spool]\nio_uring = false\n").unwrap();
    let d = Daemon::start_with(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(d.metric("spoold_io_uring_in_use"), Some(0.0));
    assert!(d.log_text().contains("backend=Portable"));
    let body = sample_body(3, 10_000);
    let id = queued_id(&send_one(&d, &body)).unwrap();
    assert_eq!(d.body_without_received(&id), body);
}

#[test]
fn full_disk_answers_452_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    let _guard = tests::Tmpfs::mount(&mnt, "3m");
    let cfg = dir.path().join("spoold.toml");
    // free_bytes_min = 0: let the writes themselves hit ENOSPC.
    std::fs::write(&cfg, "[spool]\nfree_bytes_min = 0\n").unwrap();
    let mut d = Daemon::start_with(&["--config", cfg.to_str().unwrap()]);
    d.kill9();
    d.state = mnt.join("state");
    d.restart();
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO full");
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..40 {
        let body = sample_body(i, 200_000);
        let r = c.send_mail("f@example.com", &["g@example.org"], &body);
        match queued_id(&r) {
            Some(id) => acked.push((id, body)),
            None => {
                refused = Some(r);
                break;
            }
        }
    }
    let refused = refused.expect("a 3 MiB file system must fill up");
    assert!(refused.starts_with("452 4.3.1"), "{refused}");
    assert!(!acked.is_empty());
    assert!(
        c.cmd("NOOP").starts_with("250"),
        "session survives a full disk"
    );
    assert!(
        d.folder("tmp").is_empty(),
        "failed write cleaned up: {:?}",
        d.folder("tmp")
    );
    for (id, body) in &acked {
        assert_eq!(&d.body_without_received(id), body);
    }
    assert_eq!(
        d.spooled_ids().len(),
        acked.len(),
        "no half-written message visible"
    );
    d.kill9();
}

/// Signals (a storm of SIGUSR2 insertions) arriving while the writer waits on io_uring must not
/// fail or corrupt a commit round. (The writer retries interrupted waits; this run did not
/// manage to provoke an EINTR without that retry either, so it guards rather than reproduces.)
/// The storm starts as soon as `/readyz` answers: a daemon that said it was ready before its
/// handlers existed died of the first SIGUSR2 (seen with a delay put between the two).
#[test]
fn signal_storm_during_load_loses_nothing() {
    let d = Daemon::start();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (addr, acked, stop) = (d.smtp, acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut c, _) = Client::connect(addr);
                c.cmd("EHLO storm");
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let r = c.send_mail(
                        "s@example.com",
                        &["r@example.org"],
                        &sample_body(t * 10_000 + i, 2000),
                    );
                    acked.lock().unwrap().push(
                        queued_id(&r).unwrap_or_else(|| panic!("refused during the storm: {r}")),
                    );
                    i += 1;
                }
            })
        })
        .collect();
    for _ in 0..100 {
        d.signal(libc::SIGUSR2);
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.join().unwrap();
    }
    let spooled = d.spooled_ids();
    let acked = acked.lock().unwrap();
    assert!(!acked.is_empty());
    for id in acked.iter() {
        assert!(spooled.contains(id), "{id} lost");
    }
    assert!(d.folder("tmp").is_empty());
}

/// A 20 MiB message streams to tmp/ while it arrives: the daemon's peak RSS stays far below the
/// message size, and the message is stored whole.
#[test]
fn a_large_message_streams_to_disk_with_bounded_memory() {
    let d = Daemon::start();
    let pid = d.child.as_ref().unwrap().id();
    let peak_mib = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        kib / 1024.0
    };
    let before = peak_mib();
    let body = sample_body(42, 20 * 1024 * 1024);
    let id = queued_id(&send_one(&d, &body)).unwrap();
    let after = peak_mib();
    eprintln!("peak RSS {before:.1} MiB before, {after:.1} MiB after a 20 MiB message");
    assert!(
        after - before < 16.0,
        "peak RSS grew by {:.1} MiB for a 20 MiB message",
        after - before
    );
    assert!(d.body_without_received(&id) == body, "stored whole");
}

/// SIGTERM with a message in DATA: `/readyz` turns 503, new sessions get `421 4.3.2`, the
/// message in DATA is still accepted (the grace), its session then gets `421` at its next
/// command, and the daemon exits 0 with the message spooled.
#[test]
fn sigterm_refuses_new_sessions_lets_data_finish_and_turns_readyz_503() {
    let mut d = Daemon::start();
    let (mut c, _) = Client::connect(d.smtp);
    c.cmd("EHLO grace");
    c.cmd("MAIL FROM:<g@example.com>");
    c.cmd("RCPT TO:<h@example.org>");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: in flight at SIGTERM\r\n\r\nfirst half\r\n");
    d.signal(libc::SIGTERM);
    assert!(
        tests::wait_until(5, || http_get(d.http, "/readyz")
            .is_ok_and(|(s, _)| s == 503)),
        "/readyz answers 503 while shutting down"
    );
    let (_, greeting) = Client::connect(d.smtp);
    assert!(greeting.starts_with("421 4.3.2"), "{greeting}");
    c.send(b"second half\r\n.\r\n");
    let r = c.reply();
    let id = queued_id(&r).unwrap_or_else(|| panic!("DATA finished in the grace: {r}"));
    // The session then ends with 421 at once (read, not provoked: a command sent after the
    // server closed could meet a reset that discards the reply).
    let last = c.reply();
    assert!(last.starts_with("421 4.3.2"), "{last}");
    let child = d.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "spoold did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    d.child = None;
    d.restart();
    assert!(d.spooled_ids().contains(&id));
    assert_eq!(
        d.body_without_received(&id),
        b"Subject: in flight at SIGTERM\r\n\r\nfirst half\r\nsecond half\r\n"
    );
}

/// Under systemd (`Type=notify`): `READY=1` once listening, `WATCHDOG=1` at half the watchdog
/// interval, `STOPPING=1` on SIGTERM, read from a notify socket as systemd would. Started through
/// `sh` so that `WATCHDOG_PID` is spoold's own pid, as systemd sets it.
#[test]
fn sd_notify_sends_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (smtp, http) = (tests::free_addr(), tests::free_addr());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(spoold_bin())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args([
            "--smtp-listen",
            &smtp.to_string(),
            "--http-listen",
            &http.to_string(),
            "--console-listen",
            "off",
        ])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10)
        && seen
            .iter()
            .filter(|m: &&String| m.contains("WATCHDOG=1"))
            .count()
            < 3
    {
        let mut buf = [0u8; 256];
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    assert!(
        seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "watchdog pings at half of 400 ms: {seen:?}"
    );
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut stopping = false;
    let mut buf = [0u8; 256];
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// The queue and ingest metrics README lists move as the queue does: bytes accepted, messages
/// scheduled and deferred, the oldest message's age, deliveries per next hop, the recovery time.
#[test]
fn queue_and_ingest_metrics_follow_the_queue() {
    let sink = tests::SmtpSink::start();
    let hop = tests::proxy::FaultProxy::start(sink.addr);
    hop.partition(true);
    let dir = tempfile::tempdir().unwrap();
    let cfg = tests::write_config(
        dir.path(),
        &format!(
            "[delivery]\ndefault_next_hop = \"{}\"\nretry_schedule_secs = [2]\n",
            hop.addr
        ),
    );
    let mut d = Daemon::start_delivering(&["--config", &cfg]);
    let bodies: Vec<Vec<u8>> = (0..5).map(|i| sample_body(i, 1000 + i * 100)).collect();
    for b in &bodies {
        assert!(queued_id(&send_one(&d, b)).is_some());
    }
    let sent: usize = bodies.iter().map(Vec::len).sum();
    let accepted = d.metric("spoold_accepted_bytes_total").unwrap();
    assert!(
        accepted >= sent as f64 && accepted <= (sent + 5 * 400) as f64,
        "bytes accepted {accepted} for {sent} sent (plus our Received: headers)"
    );
    // The next hop is down: all five deferred, scheduled, and ageing.
    assert!(
        tests::wait_until(10, || d.metric("spoold_queue_deferred_messages")
            == Some(5.0)),
        "deferred: {:?}",
        d.metric("spoold_queue_deferred_messages")
    );
    assert_eq!(d.metric("spoold_queue_scheduled_messages"), Some(5.0));
    assert!(d.metric("spoold_queue_oldest_message_age_seconds").unwrap() > 0.0);
    hop.partition(false);
    assert!(tests::wait_until(15, || sink.dumped().len() == 5));
    assert_eq!(
        d.metric(&format!(
            "spoold_deliveries_total{{next_hop=\"{}\"}}",
            hop.addr
        )),
        Some(5.0)
    );
    assert!(tests::wait_until(5, || d
        .metric("spoold_queue_scheduled_messages")
        == Some(0.0)));
    d.stop();
    d.restart();
    let recovery = d.metric("spoold_recovery_duration_seconds").unwrap();
    assert!((0.0..5.0).contains(&recovery), "{recovery}");
}

/// Every metric README lists is asserted on by at least one test (its name appears in a test
/// file, and each such test reads it from a live daemon), so a metric that is renamed, dropped
/// or never checked fails here. (Existence alone is not checked here: a labelled family shows
/// no series until its first label value.)
#[test]
fn every_metric_readme_lists_is_read_by_a_test() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut listed: Vec<&str> = readme
        .match_indices("spoold_")
        .map(|(i, _)| {
            let rest = &readme[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|m| m.len() > "spoold_".len())
        .collect();
    listed.sort();
    listed.dedup();
    assert!(listed.len() > 30, "README lists the metrics: {listed:?}");
    let this_file = "every_metric_readme_lists_is_read_by_a_test";
    let mut tests_text = String::new();
    for e in std::fs::read_dir(root.join("tests/tests")).unwrap() {
        tests_text.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
    }
    assert!(tests_text.contains(this_file));
    let unread: Vec<&str> = listed
        .into_iter()
        .filter(|m| {
            !tests_text.contains(&format!("\"{m}")) && !tests_text.contains(&format!("\"{m}{{"))
        })
        .collect();
    assert!(
        unread.is_empty(),
        "listed in README, read by no test: {unread:?}"
    );
}

/// The alerting rules in `monitoring/` are valid for Prometheus, and each alert fires and stays
/// quiet where its unit tests say (`promtool test rules`).
#[test]
fn alerting_rules_pass_promtool_check_and_their_unit_tests() {
    assert!(
        have("promtool"),
        "promtool is required (apt-get install prometheus)"
    );
    let dir = workspace_root().join("monitoring");
    for args in [
        ["check", "rules", "spoold.rules.yml"],
        ["test", "rules", "spoold.rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .current_dir(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
