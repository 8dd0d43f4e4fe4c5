//! Real SMTP clients against a running spoold: Python smtplib (with STARTTLS), swaks, and
//! Postfix's smtp-source under concurrent load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::process::Command;
use tests::{have, sample_body, write_self_signed, Daemon};

#[test]
fn python_smtplib_with_starttls() {
    let (d, _dir, cert) = tls_daemon();
    let script = r#"
import smtplib, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
with smtplib.SMTP("127.0.0.1", port, local_hostname="pyclient") as s:
    s.ehlo()
    assert s.has_extn("starttls"), "STARTTLS not offered"
    s.starttls(context=ctx)
    s.ehlo()
    assert not s.has_extn("starttls"), "STARTTLS offered twice"
    assert s.sock.version() == "TLSv1.3", s.sock.version()
    msg = "From: a@example.com\r\nTo: b@example.org\r\nSubject: tls\r\n\r\n.leading dot\r\nbody over TLS\r\n"
    refused = s.sendmail("a@example.com", ["b@example.org", "c@example.org"], msg)
    assert refused == {}, refused
    code, text = s.noop()
    assert code == 250
print("sent")
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &d.smtp.port().to_string(),
            cert.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    let ids = d.spooled_ids();
    assert_eq!(ids.len(), 1);
    assert!(ids[0].ends_with("-gw_tls"));
    assert_eq!(
        d.body_without_received(&ids[0]),
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: tls\r\n\r\n.leading dot\r\nbody over TLS\r\n"
    );
    let raw =
        std::fs::read_to_string(d.state.join("spool").join(format!("{}.body", ids[0]))).unwrap();
    assert!(
        raw.contains("with ESMTPS id"),
        "Received header records TLS: {raw}"
    );
    let env = d.envelope(&ids[0]);
    assert_eq!(env.sender, "a@example.com");
    let rcpts: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, ["b@example.org", "c@example.org"]);
    assert_eq!(env.helo, "pyclient");
}

#[test]
fn swaks_plain_and_pipelined() {
    assert!(have("swaks"), "swaks is required (apt-get install swaks)");
    let d = Daemon::start();
    for (i, extra) in [vec![], vec!["--pipeline"]].into_iter().enumerate() {
        let out = Command::new("swaks")
            .args(["--server", &d.smtp.to_string(), "--from", "s@example.com"])
            .args([
                "--to",
                &format!("r{i}@example.org"),
                "--header",
                &format!("Subject: swaks {i}"),
            ])
            .args(["--body", "hello from swaks\n.single dot line\n"])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("<-  250 2.0.0 Ok: queued as "), "{text}");
    }
    let ids = d.spooled_ids();
    assert_eq!(ids.len(), 2);
    for (i, id) in ids.iter().enumerate() {
        let body = String::from_utf8(d.body_without_received(id)).unwrap();
        assert!(body.contains(&format!("Subject: swaks {i}\r\n")), "{body}");
        assert!(
            body.contains("\r\n\r\nhello from swaks\r\n.single dot line\r\n"),
            "{body}"
        );
        assert_eq!(
            d.envelope(id).recipients[0].address,
            format!("r{i}@example.org")
        );
    }
}

#[test]
fn smtp_source_20_sessions_2000_messages_each_spooled_once() {
    assert!(
        have("smtp-source"),
        "smtp-source is required (apt-get install postfix)"
    );
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    // smtp-source sends the file with LF turned into CRLF and dot-stuffing applied.
    let body = String::from_utf8(sample_body(7, 4096))
        .unwrap()
        .replace("\r\n", "\n");
    let file = dir.path().join("msg.txt");
    std::fs::write(&file, &body).unwrap();
    let total = 40_000;
    let out = Command::new("smtp-source")
        .args([
            "-s",
            "20",
            "-m",
            &total.to_string(),
            "-d",
            "-f",
            "load@example.com",
            "-t",
            "sink@example.org",
        ])
        .arg("-F")
        .arg(&file)
        .arg(d.smtp.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = d.spooled_ids();
    assert_eq!(ids.len(), total, "every message spooled exactly once");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), total);
    // smtp-source ends the message with one empty line after the file's content.
    let expected = format!("{}\r\n", body.replace('\n', "\r\n")).into_bytes();
    for id in &ids {
        let got = d.body_without_received(id);
        assert!(
            got == expected,
            "body of {id} differs: {} bytes vs {} expected",
            got.len(),
            expected.len()
        );
    }
    assert_eq!(
        d.metric("spoold_accepted_messages_total"),
        Some(total as f64)
    );
    assert_eq!(d.folder("tmp").len(), 0);
}

fn tls_daemon() -> (Daemon, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_self_signed(dir.path());
    let config = dir.path().join("spoold.toml");
    std::fs::write(
        &config,
        format!(
            "node_name = \"gw_tls\"\nhostname = \"localhost\"\n[smtp]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", config.to_str().unwrap()]);
    (d, dir, cert)
}

#[test]
fn openssl_s_client_starttls_smtp() {
    assert!(have("openssl"), "openssl is required");
    let (d, _dir, cert) = tls_daemon();
    let out = tests::run_with_stdin(
        Command::new("openssl")
            .args(["s_client", "-starttls", "smtp", "-connect", &d.smtp.to_string()])
            .args(["-servername", "localhost", "-quiet", "-verify_return_error", "-CAfile"])
            .arg(&cert),
        b"EHLO openssl\r\nMAIL FROM:<o@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\nSubject: via openssl\r\n\r\nhi\r\n.\r\nQUIT\r\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("verify return:1") || err.contains("Verification: OK") || out.status.success(),
        "{err}"
    );
    assert!(text.contains("250 2.0.0 Ok: queued as "), "{text}\n{err}");
    assert!(
        !text.contains("STARTTLS"),
        "not offered again inside TLS: {text}"
    );
    let ids = d.spooled_ids();
    assert_eq!(ids.len(), 1);
    let raw =
        std::fs::read_to_string(d.state.join("spool").join(format!("{}.body", ids[0]))).unwrap();
    assert!(raw.contains("with ESMTPS id"), "{raw}");
}

#[test]
fn swaks_with_tls() {
    assert!(have("swaks"), "swaks is required (apt-get install swaks)");
    let (d, _dir, _) = tls_daemon();
    let out = Command::new("swaks")
        .args([
            "--server",
            &d.smtp.to_string(),
            "--tls",
            "--from",
            "t@example.com",
            "--to",
            "r@example.org",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("<~  250 2.0.0 Ok: queued as "),
        "reply read over TLS: {text}"
    );
}
