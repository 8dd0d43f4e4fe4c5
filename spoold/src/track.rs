//! Message tracking: a bounded log of what happened to each message on this unit (accepted,
//! replicated, scanned, each delivery attempt, bounced, removed, moved by takeover recovery,
//! archived), one JSON object per line in `<state_dir>/track/`, and the search that
//! `spoolctl track` runs here and on the partner.
//!
//! The log is for people following a message, not for recovery: it is written by its own
//! thread through a bounded queue (mail never waits for it; an event that finds the queue full
//! is dropped and counted), not fsynced, and kept to [`FILES`] files of [`FILE_BYTES`]: the
//! oldest file goes when a new one starts.
//!
//! Not here: the spool's durable state (the `.env` files are the truth), the partner's side of
//! the query (it runs this same search when asked over the peer link).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// One file of the log is closed past this size.
pub const FILE_BYTES: u64 = 16 << 20;
/// Files kept (the current one included): the log's bound is `FILES × FILE_BYTES`.
pub const FILES: u64 = 4;
/// Events waiting for the writer at most. crossbeam's bounded channel allocates and touches
/// every slot up front (about 190 bytes each: 65,536 of them were 12 MiB of the daemon's RSS);
/// 8,192 are most of a second of events at full ingest, and the writer takes up to 4,096 at a
/// time.
const QUEUE: usize = 8_192;

pub use api::TrackEvent as Event;

/// The envelope part of an event: who and which message.
#[derive(Clone, Debug, Default)]
pub struct Envelope<'a> {
    /// Envelope sender.
    pub from: &'a str,
    /// Envelope recipients.
    pub to: Vec<String>,
    /// The Message-ID header, if found.
    pub msgid: Option<String>,
}

impl<'a> Envelope<'a> {
    /// From a spool envelope.
    pub fn of(env: &'a spool::Envelope, msgid: Option<String>) -> Envelope<'a> {
        Envelope {
            from: &env.sender,
            to: env.recipients.iter().map(|r| r.address.clone()).collect(),
            msgid,
        }
    }
}

/// The tracking log of this unit.
pub struct Tracker {
    unit: String,
    dir: PathBuf,
    tx: crossbeam_channel::Sender<Event>,
    /// Events dropped because the writer was behind (`spoold_track_events_dropped_total`).
    dropped: prometheus::IntCounter,
}

fn file_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("events.{n:08}.jsonl"))
}

/// The numbers of the log's files, oldest first.
fn files(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("events.")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .collect();
    v.sort_unstable();
    v
}

impl Tracker {
    /// Opens the log in `dir` (created) and starts its writer thread.
    pub fn open(
        unit: &str,
        dir: &Path,
        dropped: prometheus::IntCounter,
    ) -> std::io::Result<std::sync::Arc<Tracker>> {
        std::fs::create_dir_all(dir)?;
        let (tx, rx) = crossbeam_channel::bounded::<Event>(QUEUE);
        let writer_dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("track-writer".into())
            .spawn(move || write_loop(&writer_dir, &rx))?;
        Ok(std::sync::Arc::new(Tracker {
            unit: unit.to_string(),
            dir: dir.to_path_buf(),
            tx,
            dropped,
        }))
    }

    /// Records an event of message `id`.
    pub fn event(&self, id: &impl ToString, ev: &str, detail: String) {
        self.push(id, ev, detail, None);
    }

    /// Records an event that names the envelope (searchable by sender, recipient, Message-ID).
    pub fn event_with(&self, id: &impl ToString, ev: &str, detail: String, env: Envelope<'_>) {
        self.push(id, ev, detail, Some(env));
    }

    fn push(&self, id: &impl ToString, ev: &str, detail: String, env: Option<Envelope<'_>>) {
        let (from, to, msgid) = match env {
            Some(e) => (Some(e.from.to_string()), e.to, e.msgid),
            None => (None, Vec::new(), None),
        };
        let event = Event {
            t: crate::sink::now_ms(),
            unit: self.unit.clone(),
            id: id.to_string(),
            ev: ev.to_string(),
            detail,
            from,
            to,
            msgid,
        };
        if self.tx.try_send(event).is_err() {
            self.dropped.inc();
        }
    }

    /// The events of the messages `query` selects, oldest first, at most `limit`; the second
    /// value says whether more matched. Two passes: the messages any event selects, then every
    /// event of those messages (an event that names only the id, such as a takeover recovery's
    /// copy, may come before the one that names the envelope).
    pub fn search(&self, query: &str, limit: usize) -> Result<(Vec<Event>, bool), String> {
        let q = Query::parse(query)?;
        let mut ids = std::collections::HashSet::new();
        self.scan(|e| {
            if q.in_time(e.t) && q.selects(&e) {
                ids.insert(e.id);
            }
            true
        });
        let mut out = Vec::new();
        let mut capped = false;
        self.scan(|e| {
            if !q.in_time(e.t) || !ids.contains(&e.id) {
                return true;
            }
            if out.len() >= limit {
                capped = true;
                return false;
            }
            out.push(e);
            true
        });
        Ok((out, capped))
    }

    /// Every event of the log, oldest first, until `each` answers false.
    fn scan(&self, mut each: impl FnMut(Event) -> bool) {
        for n in files(&self.dir) {
            let Ok(f) = std::fs::File::open(file_path(&self.dir, n)) else {
                continue; // rotated away meanwhile
            };
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                let Ok(e) = serde_json::from_str::<Event>(&line) else {
                    continue; // a line cut by a crash
                };
                if !each(e) {
                    return;
                }
            }
        }
    }
}

fn write_loop(dir: &Path, rx: &crossbeam_channel::Receiver<Event>) {
    let mut n = files(dir).last().copied().unwrap_or(1);
    let open = |n: u64| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file_path(dir, n))
    };
    let Ok(mut file) = open(n) else {
        tracing::error!("message tracking: cannot open {}", dir.display());
        return;
    };
    let mut len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::with_capacity(64 << 10);
    while let Ok(first) = rx.recv() {
        buf.clear();
        for e in std::iter::once(first).chain(rx.try_iter().take(4096)) {
            if serde_json::to_writer(&mut buf, &e).is_ok() {
                buf.push(b'\n');
            }
        }
        if file.write_all(&buf).is_err() {
            continue; // the events are lost; mail is not
        }
        len += buf.len() as u64;
        if len >= FILE_BYTES {
            n += 1;
            match open(n) {
                Ok(f) => {
                    file = f;
                    len = 0;
                    for old in files(dir).into_iter().rev().skip(FILES as usize) {
                        let _ = std::fs::remove_file(file_path(dir, old));
                    }
                }
                Err(e) => tracing::error!("message tracking: {e}"),
            }
        }
    }
}

/// What `spoolctl track` asks for: terms ANDed; a bare term matches the id, the Message-ID,
/// the sender or a recipient.
#[derive(Debug, Default)]
struct Query {
    terms: Vec<(Field, String)>,
    after: Option<u64>,
    before: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Any,
    Id,
    MsgId,
    From,
    To,
}

fn parse_time(v: &str) -> Result<u64, String> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .map_err(|e| format!("{v:?}: not a time (RFC 3339 or ms since the epoch): {e}"))
}

impl Query {
    fn parse(text: &str) -> Result<Query, String> {
        let mut q = Query::default();
        for word in text.split_whitespace() {
            let (field, value) = match word.split_once(':') {
                Some(("id", v)) => (Field::Id, v),
                Some(("msgid", v)) => (Field::MsgId, v),
                Some(("from", v)) => (Field::From, v),
                Some(("to", v)) => (Field::To, v),
                Some(("after", v)) => {
                    q.after = Some(parse_time(v)?);
                    continue;
                }
                Some(("before", v)) => {
                    q.before = Some(parse_time(v)?);
                    continue;
                }
                _ => (Field::Any, word),
            };
            q.terms.push((field, value.to_ascii_lowercase()));
        }
        if q.terms.is_empty() {
            return Err(
                "name the message: id:, msgid:, from:, to: or a bare term (after:/before: narrow)"
                    .into(),
            );
        }
        Ok(q)
    }

    fn in_time(&self, t: u64) -> bool {
        self.after.is_none_or(|a| t >= a) && self.before.is_none_or(|b| t < b)
    }

    fn selects(&self, e: &Event) -> bool {
        let has = |v: &str, want: &str| v.to_ascii_lowercase().contains(want);
        // A message has one id: several `id:` terms mean any of them.
        let ids: Vec<&String> = self
            .terms
            .iter()
            .filter(|(f, _)| *f == Field::Id)
            .map(|(_, v)| v)
            .collect();
        if !ids.is_empty() && !ids.iter().any(|w| e.id.to_ascii_lowercase() == **w) {
            return false;
        }
        self.terms
            .iter()
            .filter(|(f, _)| *f != Field::Id)
            .all(|(field, want)| {
                let id = || e.id.to_ascii_lowercase() == *want;
                let msgid = || e.msgid.as_deref().is_some_and(|m| has(m, want));
                let from = || e.from.as_deref().is_some_and(|f| has(f, want));
                let to = || e.to.iter().any(|t| has(t, want));
                match field {
                    Field::Id => true,
                    Field::MsgId => msgid(),
                    Field::From => from(),
                    Field::To => to(),
                    Field::Any => id() || msgid() || from() || to(),
                }
            })
    }
}

/// Answers another unit's tracking query (`{"query": ..., "limit": N}`): this unit's events of
/// the messages it selects.
pub fn answer(tracker: &Tracker, request: &[u8]) -> Result<bytes::Bytes, String> {
    #[derive(serde::Deserialize)]
    struct Asked {
        query: String,
        limit: usize,
    }
    let asked: Asked = serde_json::from_slice(request).map_err(|e| e.to_string())?;
    let (events, capped) = tracker.search(&asked.query, asked.limit.clamp(1, 100_000))?;
    let answer = api::Tracked {
        events,
        capped,
        notes: Vec::new(),
    };
    serde_json::to_vec(&answer)
        .map(bytes::Bytes::from)
        .map_err(|e| e.to_string())
}

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
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_search_follows_every_event_of_the_messages_it_selects() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = prometheus::IntCounter::new("dropped", "dropped").unwrap();
        let t = Tracker::open("gw_a", dir.path(), dropped.clone()).unwrap();
        let env = |from: &'static str, msgid: &str| Envelope {
            from,
            to: vec!["bob@example.org".into()],
            msgid: Some(msgid.into()),
        };
        t.event_with(
            &"m1",
            "accepted",
            "client=192.0.2.1".into(),
            env("a@x.org", "<1@x>"),
        );
        t.event_with(&"m2", "accepted", String::new(), env("c@y.org", "<2@y>"));
        t.event(&"m1", "delivered", "mx.example.org:25: 250 ok".into());
        t.event(&"m2", "deferred", "451".into());
        // The writer thread appends them.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (got, capped) = t.search("msgid:<1@x>", 100).unwrap();
        let evs: Vec<&str> = got.iter().map(|e| e.ev.as_str()).collect();
        assert_eq!((evs, capped), (vec!["accepted", "delivered"], false));
        let (got, _) = t.search("from:y.org", 100).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|e| e.id == "m2"));
        let (got, _) = t.search("bob@example.org", 100).unwrap();
        assert_eq!(got.len(), 4);
        let (got, capped) = t.search("bob@example.org", 3).unwrap();
        assert_eq!((got.len(), capped), (3, true));
        assert!(t.search("after:yesterday", 1).is_err());
        assert!(t.search("", 1).is_err());
        assert_eq!(
            message_id(b"Subject: x\r\nMessage-Id: <9@z>\r\n\r\nMessage-ID: <no>\r\n"),
            Some("<9@z>".into())
        );
        assert_eq!(message_id(b"Subject: x\r\n\r\nbody"), None);
    }
}
