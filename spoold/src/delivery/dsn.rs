//! Delivery status notifications (RFC 3464 `multipart/report; report-type=delivery-status`)
//! for recipients that failed permanently.

use spool::Envelope;
use std::fmt::Write as _;

/// One failed recipient.
#[derive(Clone)]
pub struct Failure {
    /// The recipient address.
    pub recipient: String,
    /// The next hop's reply or our reason, e.g. `550 5.1.1 no such user`.
    pub diagnostic: String,
    /// The next hop, if one answered.
    pub remote: Option<String>,
}

/// The `Status:` code for a diagnostic: its enhanced code if it has one, else 5.0.0.
fn status_of(diagnostic: &str) -> String {
    diagnostic
        .split_whitespace()
        .nth(1)
        .filter(|c| {
            let parts: Vec<&str> = c.split('.').collect();
            parts.len() == 3
                && parts[0] == "5"
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or("5.0.0")
        .to_string()
}

/// The original message's header block, for the third part (`text/rfc822-headers`).
fn headers_of(body: &[u8]) -> &[u8] {
    match body.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => &body[..p + 2],
        None => body,
    }
}

/// Builds the DSN body (CRLF lines) sent from `<>` to the original sender.
pub fn build(hostname: &str, original: &Envelope, body: &[u8], failures: &[Failure]) -> Vec<u8> {
    let boundary = format!("{}/{}", original.id, hostname);
    let date = chrono::Utc::now().to_rfc2822();
    let arrival = chrono::DateTime::from_timestamp_millis(original.arrived_ms as i64)
        .map(|d| d.to_rfc2822())
        .unwrap_or_else(|| date.clone());
    let mut s = String::new();
    let _ = write!(
        s,
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{sender}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         Your message could not be delivered to one or more recipients.\r\n\
         \r\n",
        sender = original.sender,
        id = original.id,
    );
    for f in failures {
        let _ = write!(s, "<{}>: {}\r\n", f.recipient, f.diagnostic);
    }
    let _ = write!(
        s,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Spoolpair-Queue-ID: {id}\r\n\
         Arrival-Date: {arrival}\r\n",
        id = original.id,
    );
    for f in failures {
        let _ = write!(
            s,
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\n",
            f.recipient,
            status_of(&f.diagnostic)
        );
        if let Some(r) = &f.remote {
            let _ = write!(s, "Remote-MTA: dns; {r}\r\n");
        }
        let _ = write!(
            s,
            "Diagnostic-Code: smtp; {}\r\n",
            f.diagnostic.replace(['\r', '\n'], " ")
        );
    }
    let _ = write!(
        s,
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    );
    let mut out = s.into_bytes();
    out.extend_from_slice(headers_of(body));
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// A short notice to the sender that a message was held as infected (`filter.notify_sender`).
/// It names the threat but returns no content.
pub fn quarantine_notice(hostname: &str, original: &Envelope, virus: &str) -> Vec<u8> {
    let recipients: Vec<&str> = original
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{sender}>\r\n\
         Subject: Message held: virus found\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}.quarantine@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         Your message (queue id {id}) to {rcpts} was not delivered:\r\n\
         the virus scanner found {virus}. It is held in quarantine.\r\n",
        sender = original.sender,
        date = chrono::Utc::now().to_rfc2822(),
        id = original.id,
        rcpts = recipients.join(", "),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_come_from_the_reply() {
        assert_eq!(status_of("550 5.1.1 no such user"), "5.1.1");
        assert_eq!(status_of("554 rejected"), "5.0.0");
        assert_eq!(status_of("queue lifetime exceeded"), "5.0.0");
    }

    #[test]
    fn report_has_the_three_parts() {
        let id = spool::IdGenerator::new("n").unwrap().next_id();
        let env = Envelope {
            id,
            origin: "n".into(),
            arrived_ms: 0,
            client: "127.0.0.1".into(),
            helo: "h".into(),
            sender: "alice@example.com".into(),
            body_type: spool::BodyType::SevenBit,
            smtputf8: false,
            recipients: vec![],
            body_len: 0,
            body_sha256: [0; 32],
            attempts: 1,
            next_attempt_ms: 0,
            scan: Default::default(),
            last_error: None,
        };
        let f = [Failure {
            recipient: "bob@example.org".into(),
            diagnostic: "550 5.1.1 no such user".into(),
            remote: Some("mx.example.org".into()),
        }];
        let dsn = String::from_utf8(build(
            "gw.example",
            &env,
            b"Subject: hi\r\nX: y\r\n\r\nsecret body\r\n",
            &f,
        ))
        .unwrap();
        assert!(dsn.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(dsn.contains("To: <alice@example.com>\r\n"));
        assert!(dsn.contains(
            "Final-Recipient: rfc822; bob@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(dsn.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\nX: y\r\n"));
        assert!(
            !dsn.contains("secret body"),
            "only the headers are returned"
        );
        assert!(
            !dsn.contains("\n\n") && !dsn.replace("\r\n", "").contains('\n'),
            "CRLF only"
        );
    }
}
