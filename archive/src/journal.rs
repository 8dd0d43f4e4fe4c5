//! Journal intake: what a message sent to a journal address stands for. An Exchange envelope
//! journal report (an `X-MS-Journal-Report` header; a text part listing `Sender:`, `Subject:`,
//! `Message-Id:` and the recipients as `To:`, `Cc:`, `Bcc:` or `Recipient:` lines, each perhaps
//! followed by `, Forwarded: …` or `, Expanded: …`; the original attached as `message/rfc822`)
//! stands for its original, whose envelope is the report's; any other message (a Postfix
//! `always_bcc` copy) stands for itself, its envelope from its header fields.
//!
//! Not here: who may journal (the relay policy), archiving, delivery.

use mail_parser::MessageParser;

/// What a journal message is archived as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journaled {
    /// The message to archive (the original of a report, or the message itself).
    pub raw: Vec<u8>,
    /// Its envelope sender.
    pub sender: String,
    /// Its envelope recipients (a report's Bcc recipients included).
    pub recipients: Vec<String>,
    /// Whether it came out of an envelope journal report.
    pub from_report: bool,
}

/// Reads a message sent to a journal address.
pub fn read(raw: &[u8]) -> Journaled {
    if let Some(j) = exchange_report(raw) {
        return j;
    }
    let (sender, recipients) = crate::import::envelope(raw);
    Journaled {
        raw: raw.to_vec(),
        sender,
        recipients,
        from_report: false,
    }
}

/// The original of an Exchange envelope journal report, with the report's envelope.
fn exchange_report(raw: &[u8]) -> Option<Journaled> {
    let message = MessageParser::default().parse(raw)?;
    message.header_raw("X-MS-Journal-Report")?;
    let report = message.body_text(0)?;
    let mut sender = String::new();
    let mut recipients = Vec::new();
    for line in report.lines() {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        // `To: a@x, Forwarded: b@y`: the first address is the recipient; what follows says how
        // the message reached it.
        let address = value
            .split(',')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(['<', '>'])
            .to_string();
        if address.is_empty() {
            continue;
        }
        match field.trim().to_ascii_lowercase().as_str() {
            "sender" => sender = address,
            "to" | "cc" | "bcc" | "recipient" => recipients.push(address),
            _ => {}
        }
    }
    let original = message.parts.iter().find(|p| p.is_message())?;
    let bytes = match original.message() {
        // Base64 or quoted-printable (not allowed for message/rfc822, but written): the
        // decoded message.
        Some(m) if !matches!(original.encoding, mail_parser::Encoding::None) => {
            m.raw_message().to_vec()
        }
        _ => raw
            .get(original.raw_body_offset() as usize..original.raw_end_offset() as usize)?
            .to_vec(),
    };
    recipients.sort();
    recipients.dedup();
    Some(Journaled {
        raw: bytes,
        sender,
        recipients,
        from_report: true,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ORIGINAL: &[u8] = b"From: Alice <alice@contoso.com>\r\nTo: bob@contoso.com\r\nSubject: Q3 numbers\r\nMessage-ID: <q3@contoso.com>\r\n\r\nThe numbers.\r\n";

    fn report(original: &[u8], encoding: &str) -> Vec<u8> {
        let mut r = b"From: Microsoft Exchange <journal@contoso.com>\r\nTo: journal@archive.example\r\nSubject: Q3 numbers\r\nX-MS-Journal-Report:\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"jr\"\r\n\r\n--jr\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSender: alice@contoso.com\r\nSubject: Q3 numbers\r\nMessage-Id: <q3@contoso.com>\r\nTo: bob@contoso.com\r\nCc: carol@contoso.com, Forwarded: team@contoso.com\r\nBcc: dave@contoso.com\r\n\r\n--jr\r\nContent-Type: message/rfc822\r\n".to_vec();
        r.extend_from_slice(format!("Content-Transfer-Encoding: {encoding}\r\n\r\n").as_bytes());
        r.extend_from_slice(original);
        r.extend_from_slice(b"\r\n--jr--\r\n");
        r
    }

    #[test]
    fn an_envelope_journal_report_stands_for_its_original_with_bcc_in_its_envelope() {
        let j = read(&report(ORIGINAL, "7bit"));
        assert!(j.from_report);
        assert_eq!(j.raw, ORIGINAL, "the original's bytes, exactly");
        assert_eq!(j.sender, "alice@contoso.com");
        assert_eq!(
            j.recipients,
            ["bob@contoso.com", "carol@contoso.com", "dave@contoso.com"]
        );
    }

    #[test]
    fn a_plain_copy_stands_for_itself_and_a_report_header_without_an_original_is_a_copy() {
        let j = read(ORIGINAL);
        assert!(!j.from_report);
        assert_eq!(j.raw, ORIGINAL);
        assert_eq!(
            (j.sender.as_str(), j.recipients.clone()),
            ("alice@contoso.com", vec!["bob@contoso.com".to_string()])
        );
        let no_original = b"X-MS-Journal-Report:\r\nFrom: x@y\r\nTo: j@a\r\n\r\nSender: a@b\r\n";
        assert!(!read(no_original).from_report);
    }
}
