//! The server session against scripted clients over an in-memory pipe: exact replies, and
//! exactly what reached the sink.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use smtp::{serve, RelayPolicy, ServerConfig, SessionEnd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::MemorySink;

fn config() -> ServerConfig {
    ServerConfig {
        hostname: "gw.test".into(),
        message_bytes_max: 1000,
        recipients_max: 3,
        line_bytes_max: 512,
        idle_timeout: Duration::from_secs(30),
        errors_max: 20,
        tls: None,
        policy: RelayPolicy {
            relay_domains: vec!["relay.example".into()],
            trusted_networks: vec!["127.0.0.0/8".parse().unwrap()],
            allow_untrusted_routing: false,
            journal_recipients: Vec::new(),
        },
    }
}

/// Sends `input` in one write (maximal pipelining), closes the write side unless told not to,
/// and returns everything the server said plus how the session ended.
async fn talk(
    sink: Arc<MemorySink>,
    cfg: ServerConfig,
    peer: &str,
    input: &[u8],
) -> (String, SessionEnd) {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let (_, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(serve(
        server,
        peer.parse().unwrap(),
        Arc::new(cfg),
        sink,
        rx,
    ));
    client.write_all(input).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    (String::from_utf8(out).unwrap(), task.await.unwrap())
}

fn codes(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| &l[..3])
        .collect()
}

const TRUSTED: &str = "127.0.0.1:40000";
const STRANGER: &str = "198.51.100.7:40000";

#[tokio::test]
async fn pipelined_transaction_is_stored_exactly() {
    let sink = Arc::new(MemorySink::default());
    let (out, end) = talk(
        sink.clone(),
        config(),
        TRUSTED,
        b"EHLO client\r\nMAIL FROM:<a@x.example> BODY=8BITMIME\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@z.example>\r\nDATA\r\nSubject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<d@relay.example>\r\nDATA\r\n.\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "250", "250", "354", "250", "250", "250", "354", "250", "221"]
    );
    assert!(out.contains("250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n"));
    assert!(!out.contains("STARTTLS"), "no TLS configured, none offered");
    assert!(out.contains("250 2.0.0 Ok: queued as Q1\r\n"));
    assert_eq!(end, SessionEnd::Quit);
    let stored = sink.stored.lock().unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].0, "a@x.example");
    assert_eq!(stored[0].1, ["b@y.example", "c@z.example"]);
    assert_eq!(stored[0].2, b"Subject: hi\r\n\r\n.dot\r\nbody\r\n");
    assert_eq!(stored[1].0, "");
    assert!(stored[1].2.is_empty());
}

#[tokio::test]
async fn relay_is_denied_for_strangers_except_relay_domains() {
    let sink = Arc::new(MemorySink::default());
    let (out, _) = talk(
        sink.clone(),
        config(),
        STRANGER,
        b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@elsewhere.example>\r\nRCPT TO:<b@relay.example>\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(codes(&out), ["220", "250", "250", "554", "250", "221"]);
    assert!(out.contains("554 5.7.1 Relay access denied\r\n"));
}

#[tokio::test]
async fn limits_get_precise_replies() {
    let sink = Arc::new(MemorySink::default());
    let long = format!("NOOP {}\r\n", "x".repeat(600));
    let big_body = format!("{}\r\n.\r\n", "y".repeat(1200));
    let script = format!(
        "DATA\r\nMAIL FROM:<a@x.example>\r\nEHLO c\r\nRCPT TO:<b@y.example>\r\nMAIL FROM:<a@x.example> SIZE=5000\r\n\
         MAIL FROM:<a@x.example>\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<1@y.example>\r\nRCPT TO:<2@y.example>\r\n\
         RCPT TO:<3@y.example>\r\nRCPT TO:<4@y.example>\r\nDATA\r\n{big_body}{long}FOO\r\nMAIL FROM:<a@x.example> FOO=1\r\nQUIT\r\n"
    );
    let (out, _) = talk(sink.clone(), config(), TRUSTED, script.as_bytes()).await;
    assert_eq!(
        codes(&out),
        [
            "220", "503", "503", "250", "503", "552", "250", "503", "250", "250", "250", "452",
            "354", "552", "500", "500", "555", "221"
        ],
        "{out}"
    );
    assert!(out.contains("503 5.5.1 Error: send HELO/EHLO first"));
    assert!(out.contains("552 5.3.4 Message size exceeds fixed limit"));
    assert!(out.contains("452 4.5.3 Error: too many recipients"));
    assert!(out.contains("552 5.3.4 Error: message size exceeds fixed limit"));
    assert!(out.contains("500 5.5.2 Error: line too long"));
    assert!(out.contains("500 5.5.1 Error: command not recognized"));
    assert!(sink.stored.lock().unwrap().is_empty());
    assert_eq!(*sink.aborted.lock().unwrap(), 1);
}

#[tokio::test]
async fn bare_lf_in_data_never_ends_the_message_or_starts_another() {
    for evil in [
        &b"Subject: a\r\n\n.\n\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\nDATA\r\nsmuggled\r\n.\r\n"[..],
        b"Subject: a\r\n.\nMAIL FROM:<evil@x.example>\r\n.\r\n",
        b"Subject: a\r\n\r.\r\nMAIL FROM:<evil@x.example>\r\n.\r\n",
    ] {
        let sink = Arc::new(MemorySink::default());
        let mut script = b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n".to_vec();
        script.extend_from_slice(evil);
        let (out, end) = talk(sink.clone(), config(), TRUSTED, &script).await;
        assert_eq!(codes(&out), ["220", "250", "250", "250", "354", "550"], "{out}");
        assert_eq!(end, SessionEnd::ProtocolViolation);
        assert!(sink.stored.lock().unwrap().is_empty());
        assert_eq!(*sink.aborted.lock().unwrap(), 1);
    }
}

#[tokio::test]
async fn bare_lf_in_a_command_closes_the_session() {
    let sink = Arc::new(MemorySink::default());
    let (out, end) = talk(
        sink,
        config(),
        TRUSTED,
        b"EHLO c\nMAIL FROM:<a@x.example>\r\n",
    )
    .await;
    assert_eq!(codes(&out), ["220", "550"]);
    assert_eq!(end, SessionEnd::ProtocolViolation);
}

#[tokio::test]
async fn disconnect_mid_data_stores_nothing() {
    let sink = Arc::new(MemorySink::default());
    let (out, end) = talk(
        sink.clone(),
        config(),
        TRUSTED,
        b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nSubject: half\r\n",
    )
    .await;
    assert_eq!(codes(&out), ["220", "250", "250", "250", "354"]);
    assert_eq!(end, SessionEnd::Disconnected);
    assert!(sink.stored.lock().unwrap().is_empty());
    assert_eq!(*sink.aborted.lock().unwrap(), 1);
}

#[tokio::test]
async fn storage_failures_answer_4xx() {
    for (full, code) in [(true, "452 4.3.1"), (false, "451 4.3.0")] {
        let sink = Arc::new(MemorySink {
            fail_commit: Some(full),
            ..Default::default()
        });
        let (out, _) = talk(
            sink,
            config(),
            TRUSTED,
            b"HELO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
        )
        .await;
        assert!(out.contains(code), "{out}");
    }
}

/// A filter's verdict is the reply as it gave it: at DATA before the body, or after the dot;
/// the message is not stored either way.
#[tokio::test]
async fn a_filter_refusal_is_the_reply_and_nothing_is_stored() {
    let refusal = (554, "5.7.1 Gtube pattern".to_string());
    for (sink, expected) in [
        (
            MemorySink {
                refuse_at_begin: Some(refusal.clone()),
                ..Default::default()
            },
            "250 2.1.5 Ok\r\n554 5.7.1 Gtube pattern\r\n500 5.5.1",
        ),
        (
            MemorySink {
                refuse_at_commit: Some(refusal.clone()),
                ..Default::default()
            },
            "354 End data with <CR><LF>.<CR><LF>\r\n554 5.7.1 Gtube pattern\r\n221",
        ),
    ] {
        let sink = Arc::new(sink);
        let (out, _) = talk(
            sink.clone(),
            config(),
            TRUSTED,
            b"HELO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
        )
        .await;
        assert!(out.contains(expected), "{out}");
        assert!(sink.stored.lock().unwrap().is_empty());
    }
}

#[tokio::test(start_paused = true)]
async fn idle_clients_are_timed_out() {
    let (mut client, server) = tokio::io::duplex(4096);
    let (_, rx) = tokio::sync::watch::channel(false);
    let sink = Arc::new(MemorySink::default());
    let task = tokio::spawn(serve(
        server,
        TRUSTED.parse().unwrap(),
        Arc::new(config()),
        sink,
        rx,
    ));
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    assert_eq!(task.await.unwrap(), SessionEnd::Timeout);
    assert!(String::from_utf8(out)
        .unwrap()
        .ends_with("421 4.4.2 Error: timeout exceeded\r\n"));
}

#[tokio::test]
async fn shutdown_closes_idle_sessions_with_421() {
    let (mut client, server) = tokio::io::duplex(4096);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let sink = Arc::new(MemorySink::default());
    let task = tokio::spawn(serve(
        server,
        TRUSTED.parse().unwrap(),
        Arc::new(config()),
        sink,
        rx,
    ));
    let mut greeting = [0u8; 64];
    let n = client.read(&mut greeting).await.unwrap();
    assert!(greeting[..n].starts_with(b"220 "));
    tx.send(true).unwrap();
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    assert_eq!(task.await.unwrap(), SessionEnd::Shutdown);
    assert!(String::from_utf8(out).unwrap().starts_with("421 4.3.2"));
}

#[tokio::test]
async fn starttls_upgrades_and_discards_pipelined_plaintext() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["gw.test".into()]).unwrap();
    let cert_der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
    let server_cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)
        .unwrap();
    let mut cfg = config();
    cfg.tls = Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg)));

    let (client, server) = tokio::io::duplex(1 << 16);
    let (_, rx) = tokio::sync::watch::channel(false);
    let sink = Arc::new(MemorySink::default());
    let task = tokio::spawn(serve(
        server,
        TRUSTED.parse().unwrap(),
        Arc::new(cfg),
        sink.clone(),
        rx,
    ));
    let mut client = tokio::io::BufReader::new(client);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    client.read_line(&mut line).await.unwrap();
    // The injected MAIL after STARTTLS must not be executed (CVE-2011-0411).
    client
        .write_all(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x.example>\r\n")
        .await
        .unwrap();
    let mut ehlo = String::new();
    loop {
        line.clear();
        client.read_line(&mut line).await.unwrap();
        ehlo.push_str(&line);
        if line.starts_with("220 ") {
            break;
        }
    }
    assert!(
        ehlo.contains("250-STARTTLS\r\n") || ehlo.contains("250 STARTTLS\r\n"),
        "{ehlo}"
    );
    assert!(ehlo.ends_with("220 2.0.0 Ready to start TLS\r\n"));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).unwrap();
    let client_cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let mut tls = connector
        .connect("gw.test".try_into().unwrap(), client.into_inner())
        .await
        .unwrap();
    tls.write_all(b"MAIL FROM:<a@x.example>\r\nEHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nsecret\r\n.\r\nQUIT\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(
        codes(&out),
        ["503", "250", "250", "250", "354", "250", "221"],
        "{out}"
    );
    assert!(!out.contains("STARTTLS"));
    assert_eq!(task.await.unwrap(), SessionEnd::Quit);
    assert_eq!(sink.stored.lock().unwrap()[0].2, b"secret\r\n");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_replies_is_cut_off() {
    let (mut client, server) = tokio::io::duplex(64);
    let (_, rx) = tokio::sync::watch::channel(false);
    let sink = Arc::new(MemorySink::default());
    let task = tokio::spawn(serve(
        server,
        TRUSTED.parse().unwrap(),
        Arc::new(config()),
        sink,
        rx,
    ));
    let writer = tokio::spawn(async move {
        let _ = client.write_all(&b"NOOP\r\n".repeat(2000)).await;
        client // keep the pipe open, never read
    });
    let end = task.await.unwrap();
    assert!(
        matches!(end, SessionEnd::Io(ref e) if e.contains("not reading")),
        "{end:?}"
    );
    drop(writer);
}
