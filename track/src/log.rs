//! The tracking log of a unit: a writer thread fed through a bounded queue, JSON lines in
//! `events.<n>.jsonl` files, the oldest removed past [`FILES`] of [`FILE_BYTES`], and the
//! two-pass search over them.

use crate::event::{Event, EventKind};
use crate::query::Query;
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
/// A search answers this many events at most, whatever it is asked.
pub const LIMIT_MAX: usize = 100_000;

/// The envelope part of an event: who and which message.
#[derive(Clone, Debug, Default)]
pub struct Envelope {
    /// Envelope sender.
    pub sender: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// The Message-ID header, if found.
    pub message_id: Option<String>,
}

/// The tracking log of this unit.
pub struct Tracker {
    unit: String,
    dir: PathBuf,
    tx: crossbeam_channel::Sender<Event>,
    /// Called for each event dropped because the writer was behind (the daemon counts them).
    on_dropped: Box<dyn Fn() + Send + Sync>,
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
    /// Opens the log in `dir` (created) and starts its writer thread; `on_dropped` is called
    /// for every event the full queue turns away.
    pub fn open(
        unit: &str,
        dir: &Path,
        on_dropped: Box<dyn Fn() + Send + Sync>,
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
            on_dropped,
        }))
    }

    /// Records an event of message `id`.
    pub fn event(&self, id: &impl ToString, kind: EventKind, detail: String) {
        self.push(id, kind, detail, None);
    }

    /// Records an event that names the envelope (searchable by sender, recipient, Message-ID).
    pub fn event_with(&self, id: &impl ToString, kind: EventKind, detail: String, env: Envelope) {
        self.push(id, kind, detail, Some(env));
    }

    fn push(&self, id: &impl ToString, kind: EventKind, detail: String, env: Option<Envelope>) {
        let env = env.map_or((None, Vec::new(), None), |e| {
            (Some(e.sender), e.recipients, e.message_id)
        });
        let event = Event {
            at_ms: now_ms(),
            unit: self.unit.clone(),
            spool_id: id.to_string(),
            kind,
            detail,
            sender: env.0,
            recipients: env.1,
            message_id: env.2,
        };
        if self.tx.try_send(event).is_err() {
            (self.on_dropped)();
        }
    }

    /// The events of the messages `query` selects, oldest first, at most `limit` (and at most
    /// [`LIMIT_MAX`]); the second value says whether more matched. Two passes: the messages any
    /// event selects, then every event of those messages (an event that names only the id,
    /// such as a takeover recovery's copy, may come before the one that names the envelope).
    pub fn search(&self, query: &str, limit: usize) -> Result<(Vec<Event>, bool), String> {
        let limit = limit.clamp(1, LIMIT_MAX);
        let q = Query::parse(query)?;
        let mut ids = std::collections::HashSet::new();
        self.scan(|e| {
            if q.in_time(e.at_ms) && q.selects(&e) {
                ids.insert(e.spool_id);
            }
            true
        });
        let mut out = Vec::new();
        let mut capped = false;
        self.scan(|e| {
            if !q.in_time(e.at_ms) || !ids.contains(&e.spool_id) {
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

/// Milliseconds since the Unix epoch (the log's own clock: an event is stamped when recorded).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_search_follows_every_event_of_the_messages_it_selects() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open("gw_a", dir.path(), Box::new(|| {})).unwrap();
        let env = |from: &str, msgid: &str| Envelope {
            sender: from.into(),
            recipients: vec!["bob@example.org".into()],
            message_id: Some(msgid.into()),
        };
        t.event_with(
            &"m1",
            EventKind::Accepted,
            "client=192.0.2.1".into(),
            env("a@x.org", "<1@x>"),
        );
        t.event_with(
            &"m2",
            EventKind::Accepted,
            String::new(),
            env("c@y.org", "<2@y>"),
        );
        t.event(
            &"m1",
            EventKind::Delivered,
            "mx.example.org:25: 250 ok".into(),
        );
        t.event(&"m2", EventKind::Deferred, "451".into());
        // The writer thread appends them.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (got, capped) = t.search("msgid:<1@x>", 100).unwrap();
        let kinds: Vec<EventKind> = got.iter().map(|e| e.kind).collect();
        assert_eq!(
            (kinds, capped),
            (vec![EventKind::Accepted, EventKind::Delivered], false)
        );
        let (got, _) = t.search("from:y.org", 100).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|e| e.spool_id == "m2"));
        let (got, _) = t.search("bob@example.org", 100).unwrap();
        assert_eq!(got.len(), 4);
        let (got, capped) = t.search("bob@example.org", 3).unwrap();
        assert_eq!((got.len(), capped), (3, true));
        assert!(t.search("after:yesterday", 1).is_err());
        assert!(t.search("", 1).is_err());
    }
}
