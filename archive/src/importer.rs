//! Importing mail from files into the archive (`spoolctl archive import`): each path read (an
//! mbox mapped, never read whole), each message archived as it is found (durable before the
//! next; the archive's dedup makes a rerun after a kill add nothing and lose nothing), each
//! verdict a line of the report. What is a message and why one is refused is `import.rs`'s.
//!
//! Not here: IMAP, journaling over SMTP, who may import (the admin socket), the audit line.

use crate::basics::{hex, now_ms};
use crate::import::{self, Found, Quoting, Refused, Source};
use crate::{Archive, ArchiveError, Incoming};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Refusals kept in the answer (all are in the report file).
const REFUSALS_KEPT: usize = 100;

/// How to import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// How mbox `From ` quoting is undone.
    pub quoting: Quoting,
    /// Larger messages are refused.
    pub size_max: u64,
    /// The node recorded as each item's origin.
    pub origin: String,
    /// One line per message: verdict, source, place, item or reason.
    pub report: Option<PathBuf>,
}

/// What one path gave.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceReport {
    /// The path.
    pub path: String,
    /// `mbox`, `maildir`, `files`, `message`, or `unreadable`.
    pub kind: String,
    /// Messages archived as new items.
    pub archived: u64,
    /// Messages the archive held already.
    pub duplicates: u64,
    /// Messages (or files) refused.
    pub rejected: u64,
    /// Bytes read.
    pub bytes: u64,
}

/// One refusal: the source, the place in it, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The file.
    pub source: String,
    /// Where in it.
    pub at: String,
    /// Why.
    pub reason: String,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Per path given.
    pub sources: Vec<SourceReport>,
    /// The first refusals.
    pub refusals: Vec<Refusal>,
    /// Items made (their sequence numbers, for the audit log).
    pub new_items: Vec<u64>,
}

impl ImportReport {
    /// Totals: archived, duplicates, rejected.
    pub fn totals(&self) -> (u64, u64, u64) {
        self.sources.iter().fold((0, 0, 0), |t, s| {
            (t.0 + s.archived, t.1 + s.duplicates, t.2 + s.rejected)
        })
    }
}

/// Messages archived at once: the archive commits in groups, so one message at a time would
/// cost a `fdatasync` each.
const WORKERS: usize = 16;
/// Bytes of messages read but not yet archived, at most (one message is always let through).
const IN_FLIGHT_BYTES: u64 = 64 << 20;

/// A message on its way to the archive.
struct Job {
    source: usize,
    name: std::sync::Arc<str>,
    at: String,
    incoming: Incoming,
    raw: Vec<u8>,
}

/// What the archive said of it.
struct Outcome {
    source: usize,
    name: std::sync::Arc<str>,
    at: String,
    len: u64,
    stored: Result<crate::Stored, ArchiveError>,
}

/// The bytes read and not yet archived, and a wake-up when that falls.
#[derive(Default)]
struct Budget {
    bytes: std::sync::Mutex<u64>,
    fell: std::sync::Condvar,
}

impl Budget {
    fn take(&self, len: u64) {
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        while *b > 0 && *b + len > IN_FLIGHT_BYTES {
            b = self.fell.wait(b).unwrap_or_else(|p| p.into_inner());
        }
        *b += len;
    }

    fn give(&self, len: u64) {
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        *b = b.saturating_sub(len);
        self.fell.notify_all();
    }
}

struct Run<'a> {
    opts: &'a ImportOptions,
    report: Option<std::io::BufWriter<std::fs::File>>,
    out: ImportReport,
    done: u64,
    total: u64,
    jobs: Option<crossbeam_channel::Sender<Job>>,
    outcomes: crossbeam_channel::Receiver<Outcome>,
    budget: &'a Budget,
    /// The first failure of the archive: the import stops there.
    failed: Option<ArchiveError>,
}

impl Run<'_> {
    fn line(
        &mut self,
        verdict: &str,
        source: &str,
        at: &str,
        what: &str,
    ) -> Result<(), ArchiveError> {
        if let Some(w) = &mut self.report {
            writeln!(w, "{verdict}\t{source}\t{at}\t{what}")
                .map_err(|e| ArchiveError::Io(format!("import report: {e}")))?;
        }
        Ok(())
    }

    fn refused(&mut self, source: &str, r: Refused) -> Result<(), ArchiveError> {
        self.line("rejected", source, &r.at, &r.reason)?;
        if let Some(s) = self.out.sources.last_mut() {
            s.rejected += 1;
        }
        self.take_outcomes(false)?;
        if self.out.refusals.len() < REFUSALS_KEPT {
            self.out.refusals.push(Refusal {
                source: source.to_string(),
                at: r.at,
                reason: r.reason,
            });
        }
        Ok(())
    }

    /// Hands one message found to the workers that archive it.
    fn found(&mut self, source: &str, m: Found) -> Result<(), ArchiveError> {
        let (sender, recipients) = import::envelope(&m.raw);
        let hash: [u8; 32] = Sha256::digest(&m.raw).into();
        let incoming = Incoming {
            id: format!("import.{}", hex(&hash[..8])),
            origin: self.opts.origin.clone(),
            arrived_ms: m.arrived_ms.unwrap_or_else(now_ms),
            client: "import".into(),
            sender,
            recipients,
            verdict: "imported".into(),
            hash,
        };
        self.budget.take(m.raw.len() as u64);
        let job = Job {
            source: self.out.sources.len().saturating_sub(1),
            name: source.into(),
            at: m.at,
            incoming,
            raw: m.raw,
        };
        if let Some(jobs) = &self.jobs {
            if jobs.send(job).is_err() {
                return Err(ArchiveError::Stopped);
            }
        }
        self.take_outcomes(false)
    }

    /// Takes in what the workers archived (all of it, with `all`, once no more is sent); the
    /// first failure stops the import.
    fn take_outcomes(&mut self, all: bool) -> Result<(), ArchiveError> {
        loop {
            let outcome = if all {
                match self.outcomes.recv() {
                    Ok(o) => o,
                    Err(_) => break,
                }
            } else {
                match self.outcomes.try_recv() {
                    Ok(o) => o,
                    Err(_) => break,
                }
            };
            self.budget.give(outcome.len);
            match outcome.stored {
                Ok(stored) => {
                    let verdict = if stored.new { "archived" } else { "duplicate" };
                    self.line(
                        verdict,
                        &outcome.name,
                        &outcome.at,
                        &format!("item {}", stored.seq),
                    )?;
                    if let Some(s) = self.out.sources.get_mut(outcome.source) {
                        if stored.new {
                            s.archived += 1;
                        } else {
                            s.duplicates += 1;
                        }
                    }
                    if stored.new {
                        self.out.new_items.push(stored.seq);
                    }
                }
                Err(e) => {
                    if self.failed.is_none() {
                        self.failed = Some(ArchiveError::Refused(format!(
                            "import stopped at {} {}: {e}; what was archived stays, and a rerun skips it",
                            outcome.name, outcome.at
                        )));
                    }
                }
            }
        }
        match &self.failed {
            Some(e) if !all => Err(e.clone()),
            _ => Ok(()),
        }
    }

    fn one(&mut self, source: &str, m: Result<Found, Refused>) -> Result<(), ArchiveError> {
        match m {
            Ok(m) => self.found(source, m),
            Err(r) => self.refused(source, r),
        }
    }

    /// A message file (Maildir, `.eml`, a single message), `arrived_ms` from its name or mtime.
    fn file(
        &mut self,
        path: &Path,
        arrived_ms: Option<u64>,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), ArchiveError> {
        let source = path.display().to_string();
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let found = if len > self.opts.size_max {
            Err(Refused {
                at: "file".into(),
                reason: format!(
                    "too large: {len} bytes, above the limit of {}",
                    self.opts.size_max
                ),
            })
        } else {
            match std::fs::read(path) {
                Ok(bytes) => import::message(
                    &bytes,
                    "file",
                    arrived_ms.or_else(|| mtime_ms(path)),
                    self.opts.size_max,
                ),
                Err(e) => Err(Refused {
                    at: "file".into(),
                    reason: format!("unreadable: {e}"),
                }),
            }
        };
        self.one(&source, found)?;
        self.done += len;
        if let Some(s) = self.out.sources.last_mut() {
            s.bytes += len;
        }
        progress(self.done, self.total);
        Ok(())
    }

    fn mbox(
        &mut self,
        path: &Path,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), ArchiveError> {
        let source = path.display().to_string();
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                let reason = format!("unreadable: {e}");
                return self.refused(
                    &source,
                    Refused {
                        at: "file".into(),
                        reason,
                    },
                );
            }
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        // SAFETY: mapped read-only; a file changed under an import reads as it is read (the
        // bytes are hashed and compressed before anything is archived).
        let map = if len == 0 {
            None
        } else {
            Some(
                unsafe { memmap2::Mmap::map(&file) }
                    .map_err(|e| ArchiveError::Io(format!("{source}: {e}")))?,
            )
        };
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        let start = self.done;
        let mut failed = None;
        import::mbox(bytes, self.opts.quoting, self.opts.size_max, |m, end| {
            if failed.is_some() {
                return;
            }
            if let Err(e) = self.one(&source, m) {
                failed = Some(e);
                return;
            }
            self.done = start + end as u64;
            progress(self.done, self.total);
        });
        if let Some(e) = failed {
            return Err(e);
        }
        self.done = start + len;
        if let Some(s) = self.out.sources.last_mut() {
            s.bytes += len;
        }
        Ok(())
    }
}

fn mtime_ms(path: &Path) -> Option<u64> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// The entries of a directory (none when it cannot be read).
fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn size_of(source: &Source) -> u64 {
    let len = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    match source {
        Source::Mbox(p) | Source::Message(p) => len(p),
        Source::Maildir(files) | Source::Files(files) => files.iter().map(len).sum(),
    }
}

/// Imports `paths` into `archive`; `progress(bytes done, bytes in all)`.
pub fn import(
    archive: &Archive,
    paths: &[PathBuf],
    opts: &ImportOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<ImportReport, ArchiveError> {
    let mut sources = Vec::new();
    for path in paths {
        let source = match std::fs::metadata(path) {
            Ok(meta) => {
                let mut head = [0u8; 5];
                let got = if meta.is_dir() {
                    0
                } else {
                    std::fs::File::open(path)
                        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
                        .unwrap_or(0)
                };
                Ok(import::classify(path, meta.is_dir(), &head[..got], list))
            }
            Err(e) => Err(format!("unreadable: {e}")),
        };
        sources.push((path.clone(), source));
    }
    let total = sources
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .map(size_of)
        .sum();
    with_run(archive, opts, total, |run| {
        import_sources(run, &sources, &mut progress)
    })
}

/// Runs `feed` with a [`Run`] whose messages [`WORKERS`] threads archive; then every outcome
/// is taken in, the report synced, and the first failure answered.
fn with_run(
    archive: &Archive,
    opts: &ImportOptions,
    total: u64,
    feed: impl FnOnce(&mut Run<'_>) -> Result<(), ArchiveError>,
) -> Result<ImportReport, ArchiveError> {
    let report = match &opts.report {
        Some(p) => {
            let mut w =
                std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| {
                    ArchiveError::Io(format!("import report {}: {e}", p.display()))
                })?);
            writeln!(w, "verdict\tsource\tat\titem or reason")
                .map_err(|e| ArchiveError::Io(format!("import report: {e}")))?;
            Some(w)
        }
        None => None,
    };
    let budget = Budget::default();
    let (jobs, queue) = crossbeam_channel::bounded::<Job>(WORKERS);
    let (done_tx, outcomes) = crossbeam_channel::unbounded::<Outcome>();
    let mut run = Run {
        opts,
        report,
        out: ImportReport::default(),
        done: 0,
        total,
        jobs: Some(jobs),
        outcomes,
        budget: &budget,
        failed: None,
    };
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            let (queue, done_tx) = (queue.clone(), done_tx.clone());
            scope.spawn(move || {
                for job in queue {
                    let len = job.raw.len() as u64;
                    let stored = archive.archive(job.incoming, &job.raw);
                    let _ = done_tx.send(Outcome {
                        source: job.source,
                        name: job.name,
                        at: job.at,
                        len,
                        stored,
                    });
                }
            });
        }
        drop((queue, done_tx));
        let fed = feed(&mut run);
        finish(&mut run, fed)
    })?;
    Ok(run.out)
}

/// The sources in order, each message handed to the workers.
fn import_sources(
    run: &mut Run<'_>,
    sources: &[(PathBuf, Result<Source, String>)],
    progress: &mut impl FnMut(u64, u64),
) -> Result<(), ArchiveError> {
    {
        for (path, source) in sources {
            let name = path.display().to_string();
            let kind = match source {
                Ok(Source::Mbox(_)) => "mbox",
                Ok(Source::Message(_)) => "message",
                Ok(Source::Maildir(_)) => "maildir",
                Ok(Source::Files(_)) => "files",
                Err(_) => "unreadable",
            };
            run.out.sources.push(SourceReport {
                path: name.clone(),
                kind: kind.into(),
                ..SourceReport::default()
            });
            match source {
                Err(reason) => run.refused(
                    &name,
                    Refused {
                        at: "path".into(),
                        reason: reason.clone(),
                    },
                )?,
                Ok(Source::Mbox(p)) => run.mbox(p, progress)?,
                Ok(Source::Message(p)) => run.file(p, None, progress)?,
                Ok(Source::Maildir(files)) => {
                    for f in files {
                        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                        run.file(f, import::maildir_time(name), progress)?;
                    }
                }
                Ok(Source::Files(files)) => {
                    for f in files {
                        run.file(f, None, progress)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// No more work: the workers finish what they hold, every outcome is written, the report synced.
fn finish(run: &mut Run<'_>, result: Result<(), ArchiveError>) -> Result<(), ArchiveError> {
    run.jobs = None;
    let taken = run.take_outcomes(true);
    if let Some(mut w) = run.report.take() {
        w.flush()
            .and_then(|()| w.get_ref().sync_all())
            .map_err(|e| ArchiveError::Io(format!("import report: {e}")))?;
    }
    result?;
    taken?;
    match run.failed.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Messages asked for in one `UID FETCH` (a round trip each; their bytes are held until they
/// are handed to the workers, so a batch is bounded by the batch size times the size limit).
const IMAP_BATCH: usize = 32;

/// An import from an IMAP mailbox.
#[derive(Clone, Debug)]
pub struct ImapImport {
    /// `imaps://user@host[:port]/mailbox` or `imap://…` (STARTTLS).
    pub url: String,
    /// The password (read by the caller from a file; never logged, never in the report).
    pub password: String,
    /// PEM certificates to trust for the server (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// Only messages the server dates on or after this day (`d-Mon-yyyy`).
    pub since: Option<String>,
    /// Where the UID reached is kept (one small file per mailbox), so a rerun goes on from it.
    pub state_dir: PathBuf,
}

/// The file that says how far an import of `url`'s mailbox got: `<uidvalidity> <last uid>`
/// (one per user, host and mailbox, however it is reached: IMAPS or STARTTLS, any port).
fn imap_state_file(state_dir: &Path, url: &crate::imap::ImapUrl) -> PathBuf {
    let who = format!("{}@{}/{}", url.user, url.host, url.mailbox);
    state_dir.join(format!(
        "imap-{}.uid",
        hex(&Sha256::digest(who.as_bytes())[..8])
    ))
}

/// Imports the messages of an IMAP mailbox (read-only: nothing is changed there) after the UID
/// the last import of it reached (from the start when the mailbox's UIDVALIDITY changed);
/// `progress(messages done, messages to fetch)`.
pub fn import_imap(
    archive: &Archive,
    imap: &ImapImport,
    opts: &ImportOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<ImportReport, ArchiveError> {
    use crate::imap::{ImapUrl, Session};
    let url = ImapUrl::parse(&imap.url).map_err(ArchiveError::Refused)?;
    let (mut session, validity) = Session::open(&url, &imap.password, imap.ca_file.as_deref())
        .map_err(ArchiveError::Refused)?;
    let state = imap_state_file(&imap.state_dir, &url);
    let after = std::fs::read_to_string(&state)
        .ok()
        .and_then(|t| {
            let mut w = t.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((w.next()??, w.next()??))
        })
        .filter(|(v, _)| *v == validity)
        .map_or(0, |(_, last)| last);
    let uids = session
        .uids(after, imap.since.as_deref())
        .map_err(ArchiveError::Refused)?;
    let name = format!(
        "imap{}://{}@{}:{}/{}",
        if url.implicit_tls { "s" } else { "" },
        url.user,
        url.host,
        url.port,
        url.mailbox
    );
    let total = uids.len() as u64;
    let report = with_run(archive, opts, total, |run| {
        run.out.sources.push(SourceReport {
            path: name.clone(),
            kind: "imap".into(),
            ..SourceReport::default()
        });
        let mut done = 0u64;
        for batch in uids.chunks(IMAP_BATCH) {
            let mut fetched = session.fetch(batch).map_err(ArchiveError::Refused)?;
            for uid in batch {
                if let Some((raw, date)) = fetched.remove(uid) {
                    let len = raw.len() as u64;
                    run.one(
                        &name,
                        import::message(&raw, &format!("uid {uid}"), date, opts.size_max),
                    )?;
                    if let Some(s) = run.out.sources.last_mut() {
                        s.bytes += len;
                    }
                }
            }
            done += batch.len() as u64;
            progress(done, total);
        }
        Ok(())
    })?;
    session.logout();
    // Every message up to the last UID is archived (durably) or refused: the next import of
    // this mailbox starts after it.
    if let Some(&last) = uids.last() {
        std::fs::create_dir_all(&imap.state_dir)
            .and_then(|()| {
                let tmp = state.with_extension("new");
                std::fs::write(&tmp, format!("{validity} {last}\n"))?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &state)?;
                std::fs::File::open(&imap.state_dir)?.sync_all()
            })
            .map_err(|e| ArchiveError::Io(format!("import state {}: {e}", state.display())))?;
    }
    Ok(report)
}
