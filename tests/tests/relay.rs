//! The relay policy as a stranger meets it: the client connects from a TEST-NET address on `lo`,
//! outside the default `trusted_networks`, so the path under test is the untrusted one. Only
//! plain mailboxes of a relay domain are accepted; sender-specified routing through a relay
//! domain (`%`, `!`, a quoted `@`, a source route) gets `554 5.7.1`, an unquoted `@` in the local
//! part `501 5.1.3`; a trusted (loopback) client keeps routing, and `allow_untrusted_routing`
//! gives it back to strangers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::{stranger_ip, write_config, Client, Daemon};

fn daemon(extra: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!("[smtp]\nrelay_domains = [\"relay.test\", \".sub.test\"]\n{extra}"),
    );
    (Daemon::start_with(&["--config", &cfg]), dir)
}

/// The reply code and enhanced status of RCPT for `rcpt`, in a session of its own (so the
/// session's error limit never interferes), from `from`.
fn rcpt_reply(d: &Daemon, from: std::net::IpAddr, rcpt: &str) -> String {
    let (mut c, greeting) = Client::connect_from(d.smtp, from);
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(c.cmd("EHLO client.example").starts_with("250"));
    let r = c.cmd("MAIL FROM:<stranger@outside.example>");
    assert!(r.starts_with("250"), "MAIL: {r}");
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    r.get(..9).unwrap_or(&r).to_string()
}

const LEGITIMATE: &[&str] = &[
    "user@relay.test",
    "USER@RELAY.TEST",
    "first.last+tag@Relay.Test",
    "\"john doe\"@relay.test",
    "\"quoted\"@relay.test",
    "user@host.sub.test",
    "user@sub.test",
    "postmaster",
];

const ROUTED: &[&str] = &[
    "user%other.example@relay.test",
    "USER%OTHER.EXAMPLE@RELAY.TEST",
    "other.example!user@relay.test",
    "OTHER.EXAMPLE!USER@relay.test",
    "\"user@other.example\"@relay.test",
    "\"user%other.example\"@relay.test",
    "\"other.example!user\"@relay.test",
    "\"user\\@other.example\"@relay.test",
    "user%other.example.@relay.test",
    "@relay.test:user@relay.test",
    "@a.example,@b.example:user@relay.test",
    "user%other.example@host.sub.test",
];

const NOT_OURS: &[&str] = &[
    "user@other.example",
    "user%relay.test@other.example",
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    "user@relay.test.other.example",
    "user@xrelay.test",
    "@relay.test:user@other.example",
];

const INVALID: &[&str] = &[
    "user@other.example@relay.test",
    "user@relay.test.",
    "user@[relay.test]",
    "user@[192.0.2.300]",
    "us(er@relay.test",
    "user%[192.0.2.1]@relay.test",
];

#[test]
fn a_stranger_may_address_only_plain_mailboxes_of_relay_domains() {
    let (d, _dir) = daemon("");
    let stranger = stranger_ip();
    let mut table = Vec::new();
    for (rcpts, want) in [
        (LEGITIMATE, "250 2.1.5"),
        (ROUTED, "554 5.7.1"),
        (NOT_OURS, "554 5.7.1"),
        (INVALID, "501 5.1.3"),
    ] {
        for rcpt in rcpts {
            let got = rcpt_reply(&d, stranger, rcpt);
            table.push(format!("{got}  <{rcpt}>"));
            assert_eq!(got, want, "RCPT TO:<{rcpt}> from a stranger");
        }
    }
    eprintln!("{}", table.join("\n"));
    // The refusal of routing says why.
    let (mut c, _) = Client::connect_from(d.smtp, stranger);
    c.cmd("EHLO stranger.example");
    c.cmd("MAIL FROM:<s@outside.example>");
    let r = c.cmd("RCPT TO:<user%other.example@relay.test>");
    assert_eq!(r, "554 5.7.1 Sender-specified routing is not allowed\r\n");
    // A legitimate recipient still gets its message through from a stranger.
    let r = c.cmd("RCPT TO:<user@relay.test>");
    assert!(r.starts_with("250 2.1.5"), "{r}");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: from a stranger\r\n\r\nhello\r\n.\r\n");
    assert!(c.reply().starts_with("250 2.0.0"));
    let ids = d.spooled_ids();
    assert_eq!(ids.len(), 1);
    assert_eq!(d.envelope(&ids[0]).recipients.len(), 1);
}

#[test]
fn trusted_clients_keep_routing_and_the_config_key_gives_it_to_strangers() {
    let (d, _dir) = daemon("");
    let local = "127.0.0.1".parse().unwrap();
    for rcpt in ROUTED.iter().chain(NOT_OURS) {
        assert_eq!(rcpt_reply(&d, local, rcpt), "250 2.1.5", "<{rcpt}> trusted");
    }
    for rcpt in INVALID {
        assert_eq!(rcpt_reply(&d, local, rcpt), "501 5.1.3", "<{rcpt}> trusted");
    }
    drop(d);

    let (d, _dir) = daemon("allow_untrusted_routing = true\n");
    let stranger = stranger_ip();
    for rcpt in ROUTED {
        assert_eq!(
            rcpt_reply(&d, stranger, rcpt),
            "250 2.1.5",
            "<{rcpt}> allowed"
        );
    }
    assert_eq!(rcpt_reply(&d, stranger, "user@other.example"), "554 5.7.1");
}
