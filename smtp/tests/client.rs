//! The SMTP client against this crate's own server over real TCP: byte-exact bodies through
//! dot-stuffing, per-recipient outcomes, connection reuse, and STARTTLS policies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::MemorySink;
use smtp::client::{ClientConfig, ClientError, Connection, TlsPolicy};
use smtp::{serve, RelayPolicy, ServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

async fn server(tls: Option<tokio_rustls::TlsAcceptor>) -> (SocketAddr, Arc<MemorySink>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Arc::new(MemorySink::default());
    let cfg = Arc::new(ServerConfig {
        hostname: "sink.test".into(),
        tls,
        policy: RelayPolicy {
            relay_domains: vec!["ok.test".into()],
            trusted_networks: vec![],
            allow_untrusted_routing: false,
            journal_recipients: Vec::new(),
        },
        ..ServerConfig::default()
    });
    let s = sink.clone();
    tokio::spawn(async move {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            tokio::spawn(serve(stream, peer, cfg.clone(), s.clone(), rx.clone()));
        }
    });
    (addr, sink)
}

fn client_config(tls: Option<Arc<rustls::ClientConfig>>) -> ClientConfig {
    ClientConfig {
        helo: "gw.test".into(),
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        data_timeout: Duration::from_secs(5),
        tls,
    }
}

#[tokio::test]
async fn delivers_byte_exact_with_per_recipient_outcomes_and_reuse() {
    let (addr, sink) = server(None).await;
    let mut c = Connection::connect(addr, "sink.test", &client_config(None), TlsPolicy::May)
        .await
        .unwrap();
    let body = b"Subject: dots\r\n\r\n.one\r\n..two\r\nend\r\n.\r\nx";
    let out = c
        .send(
            "a@x.test",
            &["b@ok.test", "c@denied.test", "d@ok.test"],
            body,
            true,
            false,
        )
        .await
        .unwrap();
    let codes: Vec<u16> = out.recipients.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 554, 250]);
    assert!(c.reset().await);
    let out = c
        .send("", &["e@ok.test"], b"second\r\n", false, false)
        .await
        .unwrap();
    assert_eq!(out.recipients[0].code, 250);
    let out = c
        .send("a@x.test", &["f@denied.test"], b"never\r\n", false, false)
        .await
        .unwrap();
    assert_eq!(
        out.recipients[0].code, 554,
        "no accepted recipient: no DATA"
    );
    c.quit().await;
    let stored = sink.stored.lock().unwrap();
    assert_eq!(stored.len(), 2);
    // The body arrives as sent; a missing final CRLF is added.
    assert_eq!(
        stored[0].2,
        b"Subject: dots\r\n\r\n.one\r\n..two\r\nend\r\n.\r\nx\r\n"
    );
    assert_eq!(stored[0].1, ["b@ok.test", "d@ok.test"]);
    assert_eq!(stored[1].0, "");
}

#[tokio::test]
async fn refused_connection_is_a_temporary_error() {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = Connection::connect(addr, "x", &client_config(None), TlsPolicy::May)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Connect { .. }));
    assert!(err.is_temporary());
}

#[tokio::test]
async fn starttls_may_and_encrypt() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["sink.test".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
    let server_tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let (addr, sink) = server(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_tls)))).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let tls = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let cfg = client_config(Some(tls));
    let mut c = Connection::connect(addr, "sink.test", &cfg, TlsPolicy::Encrypt)
        .await
        .unwrap();
    assert!(c.is_tls());
    let out = c
        .send("a@x.test", &["b@ok.test"], b"secret\r\n", false, false)
        .await
        .unwrap();
    assert_eq!(out.recipients[0].code, 250);
    assert_eq!(sink.stored.lock().unwrap()[0].2, b"secret\r\n");
    // A wrong name fails verification: temporary, so the message waits.
    let err = Connection::connect(addr, "other.test", &cfg, TlsPolicy::May)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ClientError::Tls(_)) && err.is_temporary(),
        "{err}"
    );
    // A server without STARTTLS under policy encrypt is refused.
    let (plain, _) = server(None).await;
    let err = Connection::connect(plain, "sink.test", &cfg, TlsPolicy::Encrypt)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
    let c = Connection::connect(plain, "sink.test", &cfg, TlsPolicy::May)
        .await
        .unwrap();
    assert!(!c.is_tls());
}
