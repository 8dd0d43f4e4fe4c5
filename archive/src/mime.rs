//! What `spoolctl archive show` prints of a message: its header section and its MIME parts,
//! parsed with `mail-parser`. Broken MIME gives what the parser recovers, never an error.

use mail_parser::{MessageParser, MimeHeaders, PartType};

/// One part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartInfo {
    /// `type/subtype` (`text/plain` when the part declares none).
    pub content_type: String,
    /// Attachment file name.
    pub name: Option<String>,
    /// Decoded bytes.
    pub size: u64,
}

/// Header section bytes shown at most.
const HEADERS_BYTES_MAX: usize = 64 << 10;

/// The header section (up to 64 KiB, lossily decoded) and the leaf parts.
pub fn describe(raw: &[u8]) -> (String, Vec<PartInfo>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 2)
        .min(HEADERS_BYTES_MAX);
    let headers = String::from_utf8_lossy(&raw[..end]).into_owned();
    let Some(msg) = MessageParser::default().parse(raw) else {
        return (headers, Vec::new());
    };
    let parts = msg
        .parts
        .iter()
        .filter(|p| !matches!(p.body, PartType::Multipart(_)))
        .map(|p| PartInfo {
            content_type: p
                .content_type()
                .map(|c| match c.subtype() {
                    Some(sub) => format!("{}/{}", c.ctype(), sub),
                    None => c.ctype().to_string(),
                })
                .unwrap_or_else(|| "text/plain".into()),
            name: p.attachment_name().map(str::to_string),
            size: p.len() as u64,
        })
        .collect();
    (headers, parts)
}

/// What a list of messages shows of each: its Subject, decoded, and its Message-ID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headline {
    /// The decoded Subject header.
    pub subject: Option<String>,
    /// The Message-ID header, without its angle brackets.
    pub message_id: Option<String>,
}

/// The headline of a message, from its header section only.
pub fn headline(raw: &[u8]) -> Headline {
    match MessageParser::default().parse_headers(raw) {
        Some(m) => Headline {
            subject: m.subject().map(str::to_string),
            message_id: m.message_id().map(str::to_string),
        },
        None => Headline::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_headers_and_leaf_parts() {
        let (_, raw) = crate::corpus::awkward().swap_remove(3);
        let (headers, parts) = describe(&raw);
        assert!(
            headers.starts_with("From: carol@example.org\r\n")
                && headers.ends_with("multipart/mixed; boundary=\"outer\"\r\n"),
            "{headers}"
        );
        let types: Vec<&str> = parts.iter().map(|p| p.content_type.as_str()).collect();
        assert_eq!(
            types,
            ["text/plain", "text/html", "application/pdf", "text/plain"]
        );
        assert_eq!(parts[2].name.as_deref(), Some("invoice-2026.pdf"));
        let (h, p) = describe(b"no header block");
        assert_eq!((h.as_str(), p.len()), ("no header block", 1));
    }
}
