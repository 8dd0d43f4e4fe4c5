//! `track`: message tracking. A bounded log of what happened to each message on a unit
//! (accepted, replicated, scanned, each delivery attempt, bounced, removed, moved by takeover
//! recovery, archived), one JSON object per line in `<state_dir>/track/`, and the search that
//! `spoolctl track` runs on every unit it asks.
//!
//! The log is for people following a message, not for recovery: it is written by its own
//! thread through a bounded queue (mail never waits for it; an event that finds the queue full
//! is dropped and counted), not fsynced, and kept to [`FILES`] files of [`FILE_BYTES`]: the
//! oldest file goes when a new one starts.
//!
//! Not here: the spool's durable state (the `.env` files are the truth), asking other units
//! (the `cluster` crate carries the query over its links), the admin socket (`api`).

pub mod event;
mod log;
pub mod query;

pub use event::{Event, EventKind};
pub use log::{Envelope, Tracker, FILES, FILE_BYTES, LIMIT_MAX};

/// The Message-ID header of a message, from its header block (the first 64 KiB at most).
pub fn message_id(raw: &[u8]) -> Option<String> {
    let head = &raw[..raw.len().min(64 << 10)];
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(head.len());
    for line in head[..end].split(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(line);
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("message-id") {
                let v = value.trim();
                return (!v.is_empty()).then(|| v.to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_id_comes_from_the_header_block_only() {
        assert_eq!(
            message_id(b"Subject: x\r\nMessage-Id: <9@z>\r\n\r\nMessage-ID: <no>\r\n"),
            Some("<9@z>".into())
        );
        assert_eq!(message_id(b"Subject: x\r\n\r\nbody"), None);
        assert_eq!(message_id(b"Message-ID:   \r\n\r\n"), None);
    }
}
