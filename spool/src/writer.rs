//! The group-commit writer: one dedicated thread makes messages durable in rounds.
//!
//! A round takes every request that arrived while the previous round was in flight (at most
//! `batch_max`), then:
//! 1. writes each body and envelope into a nameless file (`O_TMPFILE` in `spool/`) and fsyncs
//!    both — with io_uring in two submits: every file's `write → sync_file_range` (data written
//!    back), then every file's `fsync`, so that the fsyncs run concurrently and find little
//!    left to do (see `write_and_sync_uring`; BENCHMARKS.md has the figures); the portable backend
//!    makes the same calls, its fsyncs spread over a few threads to run concurrently too;
//! 2. links each body, then its envelope, into `spool/` under its name (`linkat`);
//! 3. fsyncs `spool/` once;
//! 4. completes every request of the round.
//!
//! Steps 2–4 run on a second thread (the publisher) while the writer thread already does step 1
//! of the next round: two rounds are in flight at most, and each is acknowledged only after its
//! own directory fsync, which keeps the device busy while a round's names are synced.
//!
//! Nameless files save a directory entry in `tmp/` and its rename per file, and on ext4 the
//! fsync of a newly named file also syncs its parent directory (the gain is measured in
//! BENCHMARKS.md). Where the file system or `/proc` does not allow it (probed at
//! start), files are created in `tmp/` and renamed instead, with the same guarantees. A crash
//! before the link leaves no name anywhere; the file system reclaims the inode (the orphan list
//! on a journaled file system, `e2fsck` without a journal).
//!
//! A request that fails (for example `ENOSPC`) is answered with its error and its `tmp/` files are
//! removed; the rest of the round goes on. Nothing here knows of SMTP or of async runtimes:
//! completion is a plain callback.

use crate::body::BodyParts;
use crate::id::MessageId;
use crate::layout::{Folder, Layout, Part};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default largest number of messages in one commit round.
pub const BATCH_MAX_DEFAULT: usize = 64;
/// Requests that may wait for the writer before senders block (back-pressure).
const QUEUE_CAPACITY: usize = 4096;
/// Linux's limit on iovecs in one writev; longer bodies take the portable path.
const IOV_MAX: usize = 1024;

/// Which backend writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The `io-uring` crate, one ring driven by the writer thread.
    IoUring,
    /// Plain blocking syscalls with the same ordering and durability.
    Portable,
}

/// What the caller wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring when the kernel allows it, else portable.
    Auto,
    /// Always portable.
    Portable,
}

/// How a round makes its files durable before the renames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// fsync every body and envelope (concurrently with io_uring). Costs a device flush per
    /// file; safe on any file system shared with anything.
    #[default]
    PerFile,
    /// Write every file of the round, then one `syncfs(2)` of the spool's file system. Two
    /// device flushes per round whatever its size; meant for a file system dedicated to the
    /// spool, since it also flushes everything else written there.
    FileSystem,
}

/// Writer settings.
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Backend wanted.
    pub backend: BackendChoice,
    /// Largest number of messages per round.
    pub batch_max: usize,
    /// How file contents are made durable.
    pub sync: SyncMode,
    /// Write new files nameless (`O_TMPFILE`) and link them, where the file system allows it;
    /// false always uses named files in `tmp/` and rename.
    pub nameless: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            backend: BackendChoice::Auto,
            batch_max: BATCH_MAX_DEFAULT,
            sync: SyncMode::PerFile,
            nameless: true,
        }
    }
}

/// Why a commit failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The file system is full (`ENOSPC` or `EDQUOT`).
    #[error("spool file system is full: {0}")]
    DiskFull(io::Error),
    /// Any other I/O failure.
    #[error("spool write failed: {0}")]
    Io(io::Error),
    /// The writer has shut down.
    #[error("spool writer is shut down")]
    Closed,
}

impl From<io::Error> for CommitError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => CommitError::DiskFull(e),
            _ => CommitError::Io(e),
        }
    }
}

/// Facts about the round that made a message durable.
#[derive(Clone, Copy, Debug)]
pub struct CommitReceipt {
    /// Messages in the round.
    pub batch_size: usize,
    /// The sequence number the [`PublishHook`] gave this message, if any.
    pub log_seq: Option<u64>,
}

/// Called once per finished round; must be cheap (it runs on the writer thread).
pub trait RoundObserver: Send + Sync {
    /// A round of `batch` messages took `elapsed` from its start to its directory fsync.
    fn round(&self, batch: usize, elapsed: Duration);
}

/// Completion callback for one request; runs on the writer thread, so it must not block.
pub type Completion = Box<dyn FnOnce(Result<CommitReceipt, CommitError>) + Send>;

/// One message to make durable.
pub struct CommitRequest {
    /// Its id (file stem).
    pub id: MessageId,
    /// The encoded envelope.
    pub envelope: Vec<u8>,
    /// The body.
    pub body: BodyParts,
    /// Called when the message is durable in `spool/` or has failed.
    pub done: Completion,
    /// Tell the [`PublishHook`] (replication logs it); false for replicas received from the
    /// partner.
    pub replicate: bool,
}

/// Called by the writer thread after a round's files are durable in `tmp/` and before they are
/// renamed into `spool/`, with the ids that will be published. If it fails, those messages fail
/// (their files are removed). Replication appends its `ADD` actions here, before the messages
/// can be seen or acknowledged.
pub trait PublishHook: Send + Sync {
    /// Records the ids (replication keeps them in memory: the published files are their
    /// durable record across a crash). Returns one sequence number per id, in order.
    fn before_publish(&self, ids: &[&MessageId]) -> io::Result<Vec<u64>>;
    /// The messages given to `before_publish` are now either published durably in `spool/`
    /// or failed and gone; until this call their files may be in no folder at all. Runs
    /// before their requests complete, with their contents still in memory.
    fn after_publish(&self, _messages: &[Published<'_>]) {}
}

/// A message given to [`PublishHook::before_publish`], as its round ends.
pub struct Published<'a> {
    /// Its id.
    pub id: &'a MessageId,
    /// Durable in `spool/` (true) or failed and removed (false).
    pub durable: bool,
    /// The encoded envelope, as written.
    pub envelope: &'a [u8],
    /// The body, as written.
    pub body: &'a BodyParts,
}

/// Handle to the writer thread. Dropping every handle (and calling [`SpoolWriter::shutdown`])
/// lets the thread finish the requests it has and exit.
pub struct SpoolWriter {
    /// `None` once shut down: later requests complete with [`CommitError::Closed`].
    tx: std::sync::RwLock<Option<crossbeam_channel::Sender<CommitRequest>>>,
    backend: Backend,
    nameless: bool,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl SpoolWriter {
    /// Starts the writer thread for `layout` (which must exist).
    pub fn start(
        layout: Layout,
        options: WriterOptions,
        observer: Option<Arc<dyn RoundObserver>>,
    ) -> io::Result<SpoolWriter> {
        Self::start_with_hook(layout, options, observer, None)
    }

    /// [`SpoolWriter::start`] with a [`PublishHook`].
    pub fn start_with_hook(
        layout: Layout,
        options: WriterOptions,
        observer: Option<Arc<dyn RoundObserver>>,
        hook: Option<Arc<dyn PublishHook>>,
    ) -> io::Result<SpoolWriter> {
        let batch_max = options.batch_max.clamp(1, 1024);
        let choice = options.backend;
        let spool_dir = File::open(layout.dir(Folder::Spool))?;
        let ring = match choice {
            BackendChoice::Auto => match io_uring::IoUring::new((batch_max * 4) as u32) {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, using the portable writer");
                    None
                }
            },
            BackendChoice::Portable => None,
        };
        let backend = if ring.is_some() {
            Backend::IoUring
        } else {
            Backend::Portable
        };
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
        let link_by = if options.nameless {
            probe_nameless(&layout)
        } else {
            None
        };
        let nameless = link_by.is_some();
        let publisher = Publisher {
            layout: layout.clone(),
            spool_dir: spool_dir.try_clone()?,
            observer: observer.clone(),
            hook: hook.clone(),
            link_by,
        };
        tracing::info!(
            nameless,
            link_by = ?link_by,
            "spool files are {}",
            if nameless {
                "written nameless (O_TMPFILE) and linked into spool/"
            } else {
                "written in tmp/ and renamed into spool/"
            }
        );
        let spares = if nameless {
            Some(make_spares(layout.clone(), batch_max * 2)?)
        } else {
            None
        };
        let mut worker = Worker {
            layout,
            spool_dir,
            ring,
            batch_max,
            sync: options.sync,
            nameless,
            spares,
            hook,
        };
        let (durable_tx, durable_rx) = crossbeam_channel::bounded(0);
        let publisher_thread = std::thread::Builder::new()
            .name("spool-publish".into())
            .spawn(move || {
                let _fail_stop = AbortOnPanic;
                publisher.run(durable_rx)
            })?;
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                let _fail_stop = AbortOnPanic;
                worker.run(rx, durable_tx);
                // The sender is gone with `run`; the publisher finishes what it has.
                let _ = publisher_thread.join();
            })?;
        Ok(SpoolWriter {
            tx: std::sync::RwLock::new(Some(tx)),
            backend,
            nameless,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Whether new files are written nameless and linked (else named in `tmp/`, renamed).
    pub fn nameless(&self) -> bool {
        self.nameless
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Queues a request; blocks only while the writer's queue is full. On shutdown the request
    /// is completed with [`CommitError::Closed`].
    pub fn submit(&self, req: CommitRequest) {
        let tx = self.tx.read().unwrap_or_else(|p| p.into_inner());
        let refused = match tx.as_ref() {
            Some(tx) => tx
                .send(req)
                .err()
                .map(|crossbeam_channel::SendError(req)| req),
            None => Some(req),
        };
        drop(tx);
        if let Some(req) = refused {
            (req.done)(Err(CommitError::Closed));
        }
    }

    /// Commits one message and waits for it: for tests, tools and benchmarks.
    pub fn commit_blocking(
        &self,
        id: MessageId,
        envelope: Vec<u8>,
        body: BodyParts,
    ) -> Result<CommitReceipt, CommitError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(CommitRequest {
            id,
            envelope,
            body,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
            replicate: true,
        });
        rx.recv().unwrap_or(Err(CommitError::Closed))
    }

    /// Finishes every queued request and stops the thread; requests submitted afterwards
    /// complete with [`CommitError::Closed`]. Blocks until the thread is done; a second call
    /// returns at once.
    pub fn shutdown(&self) {
        // Dropping the only sender ends the worker's loop once the queue is empty.
        drop(self.tx.write().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// One request during its round.
struct Job {
    req: CommitRequest,
    /// Named files in `tmp/`, or `None` for a nameless file (linked from its descriptor).
    tmp_body: Option<PathBuf>,
    tmp_env: Option<PathBuf>,
    body_file: Option<File>,
    body_offset: u64,
    env_file: Option<File>,
    iovecs: Vec<libc::iovec>,
    /// Both files written, and fsynced in per-file mode: by the ring, or by the portable path
    /// for what the ring did not finish.
    synced: bool,
    /// Given to the publish hook's `before_publish`.
    announced: bool,
    /// Sequence number from the publish hook.
    log_seq: Option<u64>,
    error: Option<io::Error>,
}

// SAFETY: the iovecs point into `req.body.chunks` (Bytes, which are Send) owned by the same Job.
unsafe impl Send for Job {}

struct Worker {
    layout: Layout,
    spool_dir: File,
    ring: Option<io_uring::IoUring>,
    batch_max: usize,
    sync: SyncMode,
    nameless: bool,
    /// Nameless files created ahead by the spare-file thread, when files are nameless.
    spares: Option<Spares>,
    hook: Option<Arc<dyn PublishHook>>,
}

/// A round whose files are durable, on its way to the publisher to be named and completed.
struct DurableRound {
    jobs: Vec<Job>,
    started: Instant,
}

/// The second stage of a round, on a thread of its own: names the durable files in `spool/`,
/// fsyncs the directory, completes every request. It works on round N while the writer makes
/// round N+1 durable, so the device is busy with one round's data while the other's directory
/// entries go out.
struct Publisher {
    layout: Layout,
    spool_dir: File,
    observer: Option<Arc<dyn RoundObserver>>,
    hook: Option<Arc<dyn PublishHook>>,
    /// How nameless files are linked; `None` when files are named in `tmp/`.
    link_by: Option<LinkBy>,
}

impl Worker {
    /// Takes rounds from `rx` and hands each, once durable, to the publisher. The rendezvous
    /// channel keeps at most two rounds in flight: one being published, one waiting for it.
    fn run(
        &mut self,
        rx: crossbeam_channel::Receiver<CommitRequest>,
        publisher: crossbeam_channel::Sender<DurableRound>,
    ) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let round = self.make_durable(batch);
            if let Err(crossbeam_channel::SendError(round)) = publisher.send(round) {
                // Only if the publisher thread is gone, which aborts the process; be safe.
                for job in round.jobs {
                    (job.req.done)(Err(CommitError::Closed));
                }
            }
        }
    }

    /// First stage of a round: creates and writes every file, makes them durable and tells
    /// the publish hook.
    fn make_durable(&mut self, batch: Vec<CommitRequest>) -> DurableRound {
        let started = Instant::now();
        let mut jobs: Vec<Job> = batch.into_iter().map(|req| self.open(req)).collect();
        let per_file = self.sync == SyncMode::PerFile;
        if let Some(ring) = self.ring.as_mut() {
            if let Err(e) = write_and_sync_uring(ring, &mut jobs, per_file) {
                tracing::error!(error = %e, "io_uring submit failed; finishing round with the portable path");
            }
        }
        write_and_sync_portable(&mut jobs, per_file);
        if !per_file && jobs.iter().any(|j| j.error.is_none()) {
            // SAFETY: syncfs(2) on a valid open descriptor.
            if unsafe { libc::syncfs(self.spool_dir.as_raw_fd()) } != 0 {
                let e = io::Error::last_os_error();
                for job in jobs.iter_mut().filter(|j| j.error.is_none()) {
                    job.error = Some(io::Error::new(e.kind(), format!("syncfs: {e}")));
                }
            }
        }
        if let Some(hook) = &self.hook {
            let ids: Vec<&MessageId> = jobs
                .iter()
                .filter(|j| j.error.is_none() && j.req.replicate)
                .map(|j| &j.req.id)
                .collect();
            if !ids.is_empty() {
                let result = hook.before_publish(&ids);
                let logged = jobs
                    .iter_mut()
                    .filter(|j| j.error.is_none() && j.req.replicate);
                match result {
                    Ok(seqs) => {
                        for (job, seq) in logged.zip(seqs) {
                            job.announced = true;
                            job.log_seq = Some(seq);
                        }
                    }
                    Err(e) => {
                        for job in logged {
                            job.announced = true;
                            job.error =
                                Some(io::Error::new(e.kind(), format!("replication log: {e}")));
                        }
                    }
                }
            }
        }
        DurableRound { jobs, started }
    }
}

impl Publisher {
    fn run(&self, rx: crossbeam_channel::Receiver<DurableRound>) {
        while let Ok(round) = rx.recv() {
            self.publish(round);
        }
    }

    /// Second stage of a round: links (or renames) every durable file into `spool/`, fsyncs
    /// the directory once, and completes each request.
    fn publish(&self, round: DurableRound) {
        let DurableRound { mut jobs, started } = round;
        let mut renamed = 0;
        for job in jobs.iter_mut().filter(|j| j.error.is_none()) {
            // Body first: an envelope in spool/ always has its body.
            let res = self
                .name(
                    &job.tmp_body,
                    job.body_file.as_ref(),
                    &job.req.id,
                    Part::Body,
                )
                .and_then(|_| {
                    self.name(&job.tmp_env, job.env_file.as_ref(), &job.req.id, Part::Env)
                });
            match res {
                Ok(()) => renamed += 1,
                Err(e) => job.error = Some(e),
            }
        }
        let dir_result = if renamed > 0 && !crate::failpoint::skip_spool_dir_fsync() {
            self.spool_dir.sync_all()
        } else {
            Ok(())
        };
        if let Some(obs) = &self.observer {
            obs.round(jobs.len(), started.elapsed());
        }
        let batch_size = jobs.len();
        if let Err(e) = &dir_result {
            for job in jobs.iter_mut().filter(|j| j.error.is_none()) {
                job.error = Some(io::Error::new(e.kind(), e.to_string()));
            }
        }
        for job in jobs.iter().filter(|j| j.error.is_some()) {
            // Either never published (still in tmp/ or nameless) or published but not
            // durable: in both cases the client gets a 4xx, so remove every trace to keep
            // the spool honest.
            for p in [&job.tmp_env, &job.tmp_body].into_iter().flatten() {
                let _ = std::fs::remove_file(p);
            }
            let _ = std::fs::remove_file(self.layout.path(Folder::Spool, &job.req.id, Part::Env));
            let _ = std::fs::remove_file(self.layout.path(Folder::Spool, &job.req.id, Part::Body));
        }
        if let Some(hook) = &self.hook {
            let announced: Vec<Published<'_>> = jobs
                .iter()
                .filter(|j| j.announced)
                .map(|j| Published {
                    id: &j.req.id,
                    durable: j.error.is_none(),
                    envelope: &j.req.envelope,
                    body: &j.req.body,
                })
                .collect();
            if !announced.is_empty() {
                hook.after_publish(&announced);
            }
        }
        for job in jobs {
            let result = match job.error {
                Some(e) => Err(CommitError::from(e)),
                None => Ok(CommitReceipt {
                    batch_size,
                    log_seq: job.log_seq,
                }),
            };
            (job.req.done)(result);
        }
    }
}

impl Worker {
    /// A new file for `len` bytes of one part: a recycled file from `tmp/` (its old bytes
    /// overwritten, it is not longer than `len`), else nameless in `spool/`, or
    /// `tmp/<id>.<part>`.
    fn create(&self, id: &MessageId, part: Part, len: u64) -> io::Result<(File, Option<PathBuf>)> {
        if let Some((f, path)) = self.layout.take_recycled(len) {
            return Ok((f, Some(path)));
        }
        if self.nameless {
            if let Some(f) = self.spares.as_ref().and_then(|s| s.files.try_recv().ok()) {
                return Ok((f, None));
            }
            return Ok((new_nameless(&self.layout)?, None));
        }
        let path = self.layout.path(Folder::Tmp, id, part);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        Ok((f, Some(path)))
    }

    /// Opens the new files of one request (nameless, or named in `tmp/`) and prepares its
    /// iovecs. A body that was spilled to `tmp/` while it arrived keeps its file.
    fn open(&self, mut req: CommitRequest) -> Job {
        let mut error = None;
        let (body_file, body_offset, tmp_body) = match req.body.spilled.take() {
            Some(s) => (
                Some(s.file),
                s.written,
                Some(self.layout.path(Folder::Tmp, &req.id, Part::Body)),
            ),
            None => match self.create(&req.id, Part::Body, chunks_len(&req.body.chunks)) {
                Ok((f, name)) => (Some(f), 0, name),
                Err(e) => {
                    error = Some(e);
                    (None, 0, None)
                }
            },
        };
        let (env_file, tmp_env) = match self.create(&req.id, Part::Env, req.envelope.len() as u64) {
            Ok((f, name)) => (Some(f), name),
            Err(e) => {
                error.get_or_insert(e);
                (None, None)
            }
        };
        let iovecs = req
            .body
            .chunks
            .iter()
            .map(|c| libc::iovec {
                iov_base: c.as_ptr() as *mut libc::c_void,
                iov_len: c.len(),
            })
            .collect();
        Job {
            req,
            tmp_body,
            tmp_env,
            body_file,
            body_offset,
            env_file,
            iovecs,
            synced: false,
            announced: false,
            log_seq: None,
            error,
        }
    }
}

impl Publisher {
    /// Gives one durable file its name in `spool/`: renames a named `tmp/` file, or links a
    /// nameless one. A stale file of the same name is replaced, as rename would.
    fn name(
        &self,
        named: &Option<PathBuf>,
        file: Option<&File>,
        id: &MessageId,
        part: Part,
    ) -> io::Result<()> {
        let dest = || self.layout.path(Folder::Spool, id, part);
        if let Some(tmp) = named {
            return std::fs::rename(tmp, dest());
        }
        let (Some(file), Some(by)) = (file, self.link_by) else {
            return Err(io::Error::other("nameless file not open"));
        };
        let name = std::ffi::CString::new(format!("{id}.{}", part.ext()))?;
        let link = || link_nameless(file, by, &self.spool_dir, &name);
        match link() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                tracing::warn!(path = %dest().display(), "replacing a stale spool file");
                std::fs::remove_file(dest())?;
                link()
            }
            other => other,
        }
    }
}

/// A new nameless file in `spool/`, for the writer to fill.
fn new_nameless(layout: &Layout) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .mode(0o640)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(layout.dir(Folder::Spool))
}

/// Keeps up to `count` nameless files ready for the writer, so that creating them (an inode
/// allocation each, a large part of a round on the writer thread) happens
/// while the writer waits for the device. Ends when the writer is gone. A file that cannot be
/// created now (a full disk) is left to the writer, which reports the error to its request.
fn make_spares(layout: Layout, count: usize) -> io::Result<Spares> {
    let (tx, files) = crossbeam_channel::bounded(count);
    let (alive, writer_alive) = crossbeam_channel::bounded::<()>(0);
    std::thread::Builder::new()
        .name("spool-spares".into())
        .spawn(move || loop {
            match new_nameless(&layout) {
                Ok(f) => {
                    if tx.send(f).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    if writer_alive.try_recv() == Err(crossbeam_channel::TryRecvError::Disconnected)
                    {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })?;
    Ok(Spares {
        files,
        _alive: alive,
    })
}

/// The writer's end of the spare-file thread; dropping it ends the thread.
struct Spares {
    files: crossbeam_channel::Receiver<File>,
    /// Never sent on: its drop tells the thread, should it be retrying a failed creation.
    _alive: crossbeam_channel::Sender<()>,
}

/// How a nameless file is given a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkBy {
    /// `linkat(fd, "", AT_EMPTY_PATH)`: no path walk; allowed to the process that opened the
    /// file since Linux 6.10 (only with `CAP_DAC_READ_SEARCH` before).
    Descriptor,
    /// `linkat("/proc/self/fd/N", AT_SYMLINK_FOLLOW)`: needs a mounted `/proc`.
    ProcPath,
}

/// Links the nameless `file` as `name` in the directory `dir`.
fn link_nameless(file: &File, by: LinkBy, dir: &File, name: &std::ffi::CStr) -> io::Result<()> {
    let r = match by {
        // SAFETY: valid descriptors and NUL-terminated strings.
        LinkBy::Descriptor => unsafe {
            libc::linkat(
                file.as_raw_fd(),
                c"".as_ptr(),
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        },
        LinkBy::ProcPath => {
            let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
            // SAFETY: as above.
            unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            }
        }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How nameless files can be created in `spool/` and linked by name here, if at all (needs
/// `O_TMPFILE` support in the file system, and either Linux 6.10 or a mounted `/proc`). Leaves
/// nothing behind.
fn probe_nameless(layout: &Layout) -> Option<LinkBy> {
    let name = format!(".nameless-probe-{}", std::process::id());
    let probe = layout.dir(Folder::Tmp).join(&name);
    let cname = std::ffi::CString::new(name).ok()?;
    let attempt = |by: LinkBy| {
        let _ = std::fs::remove_file(&probe);
        let tmp_dir = File::open(layout.dir(Folder::Tmp))?;
        let result = new_nameless(layout).and_then(|f| link_nameless(&f, by, &tmp_dir, &cname));
        let _ = std::fs::remove_file(&probe);
        result
    };
    let mut last = None;
    for by in [LinkBy::Descriptor, LinkBy::ProcPath] {
        match attempt(by) {
            Ok(()) => return Some(by),
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        tracing::info!(error = %e, "nameless spool files unavailable here");
    }
    None
}

/// Ends the process if the writer thread panics: without its writer the daemon could only
/// leave every SMTP session waiting, while a restart runs recovery and serves again (systemd's
/// `Restart=`). Fail-stop, as a durable store should be.
struct AbortOnPanic;

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                "spool writer thread panicked; aborting so that recovery runs on restart"
            );
            std::process::abort();
        }
    }
}

/// Per-job completion state of the io_uring path: how far each chain got.
const BODY_WRITE: u64 = 0;
const BODY_SYNC: u64 = 1;
const ENV_WRITE: u64 = 2;
const ENV_SYNC: u64 = 3;
const BODY_WRITEBACK: u64 = 4;
const ENV_WRITEBACK: u64 = 5;
const STEPS: usize = 6;
const STEP_BITS: u32 = 3;

/// The bytes in `chunks`.
fn chunks_len(chunks: &[Bytes]) -> u64 {
    chunks.iter().map(|c| c.len() as u64).sum()
}

impl Job {
    fn body_len_pending(&self) -> usize {
        chunks_len(&self.req.body.chunks) as usize
    }

    /// Its open files: body, then envelope.
    fn files(&self) -> impl Iterator<Item = &File> {
        [self.body_file.as_ref(), self.env_file.as_ref()]
            .into_iter()
            .flatten()
    }

    /// Writes both files with plain system calls.
    fn write_portable(&mut self) -> io::Result<()> {
        let (Some(body), Some(env)) = (self.body_file.as_mut(), self.env_file.as_mut()) else {
            return Err(io::Error::other("tmp files not open"));
        };
        let mut offset = self.body_offset;
        for chunk in &self.req.body.chunks {
            body.write_all_at(chunk, offset)?;
            offset += chunk.len() as u64;
        }
        env.write_all(&self.req.envelope)?;
        Ok(())
    }
}

/// Threads that fsync one portable round's files concurrently.
const PORTABLE_SYNC_THREADS: usize = 16;

/// The portable backend's part of a round, for every job the ring did not finish (all of them
/// without a ring): the same two phases as [`write_and_sync_uring`], with plain system calls.
/// 1. each file written, its writeback started, then waited for (`sync_file_range`);
/// 2. with `fsync`, every file's `fsync`, spread over a few threads so that they run
///    concurrently as the ring's do: one after another they would cost a device flush each.
///
/// Where io_uring is blocked (container seccomp profiles), this is the daemon's write path.
fn write_and_sync_portable(jobs: &mut [Job], fsync: bool) {
    let mut todo: Vec<&mut Job> = jobs
        .iter_mut()
        .filter(|j| j.error.is_none() && !j.synced)
        .collect();
    for job in todo.iter_mut() {
        if let Err(e) = job.write_portable() {
            job.error = Some(e);
        }
    }
    todo.retain(|j| j.error.is_none());
    if !fsync {
        // The round's syncfs makes them durable.
        for job in todo {
            job.synced = true;
        }
        return;
    }
    let range = |f: &File, flags| {
        // SAFETY: sync_file_range(2) on a valid open descriptor; 0, 0 means the whole file.
        if unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // Start every file's writeback before waiting for any, then wait for each.
    for job in todo.iter_mut() {
        let started: io::Result<()> = job
            .files()
            .try_for_each(|f| range(f, libc::SYNC_FILE_RANGE_WRITE));
        let waited = started.and_then(|()| {
            job.files().try_for_each(|f| {
                range(
                    f,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                )
            })
        });
        if let Err(e) = waited {
            job.error = Some(e);
        }
    }
    todo.retain(|j| j.error.is_none());
    let synced: Vec<io::Result<()>> = {
        let per_job: Vec<Vec<&File>> = todo.iter().map(|j| j.files().collect()).collect();
        let per_thread = per_job.len().div_ceil(PORTABLE_SYNC_THREADS).max(1);
        std::thread::scope(|s| {
            let threads: Vec<_> = per_job
                .chunks(per_thread)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|files| files.iter().try_for_each(|f| f.sync_all()))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .zip(per_job.chunks(per_thread))
                .flat_map(|(t, chunk)| {
                    t.join().unwrap_or_else(|_| {
                        chunk
                            .iter()
                            .map(|_| Err(io::Error::other("fsync thread panicked")))
                            .collect()
                    })
                })
                .collect()
        })
    };
    for (job, result) in todo.into_iter().zip(synced) {
        match result {
            Ok(()) => job.synced = true,
            Err(e) => job.error = Some(e),
        }
    }
}

/// Writes every job's files and, with `fsync`, makes them durable, in two submits:
/// 1. each file's `write`, linked to a `sync_file_range` that writes its data back and waits;
/// 2. an `fsync` of each file.
///
/// Why not one linked `write → fsync` per file: without a journal, ext4's fsync writes the
/// inode's table block synchronously, one block holds 16 inodes, and concurrent fsyncs of
/// neighbours take turns on it (each turn a device write) as delayed allocation keeps
/// dirtying it. With every file's data and block allocation done first, the first fsync of a
/// table block writes it with all its neighbours' final state, and theirs find it clean; the
/// cache flushes of concurrent fsyncs are merged by the block layer. Each fsync still does its
/// whole job: this only changes what is left for it to do.
///
/// A job whose chain fell short (short write, cancelled link) stays unsynced, so the portable
/// path redoes it; only a failure of the ring itself is returned.
fn write_and_sync_uring(
    ring: &mut io_uring::IoUring,
    jobs: &mut [Job],
    fsync: bool,
) -> io::Result<()> {
    use io_uring::{opcode, squeue::Flags, types::Fd};
    // Results per job and step; None = no completion seen.
    let mut results: Vec<[Option<i32>; STEPS]> = vec![[None; STEPS]; jobs.len()];
    let tag = |i: usize, step: u64| (i as u64) << STEP_BITS | step;
    let writeback = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let mut entries = Vec::with_capacity(jobs.len() * 4);
    let mut fsyncs = Vec::with_capacity(jobs.len() * 2);
    for (i, job) in jobs.iter().enumerate() {
        if job.error.is_some() || job.iovecs.len() > IOV_MAX {
            continue;
        }
        let (Some(body), Some(env)) = (&job.body_file, &job.env_file) else {
            continue;
        };
        let body_fd = Fd(body.as_raw_fd());
        let env_fd = Fd(env.as_raw_fd());
        let link = if fsync {
            Flags::IO_LINK
        } else {
            Flags::empty()
        };
        let written_back = |fd: Fd, step: u64| {
            opcode::SyncFileRange::new(fd, 0)
                .flags(writeback)
                .build()
                .user_data(tag(i, step))
        };
        entries.push(
            opcode::Writev::new(body_fd, job.iovecs.as_ptr(), job.iovecs.len() as u32)
                .offset(job.body_offset)
                .build()
                .flags(link)
                .user_data(tag(i, BODY_WRITE)),
        );
        if fsync {
            entries.push(written_back(body_fd, BODY_WRITEBACK));
        }
        let env_len = job.req.envelope.len() as u32;
        entries.push(
            opcode::Write::new(env_fd, job.req.envelope.as_ptr(), env_len)
                .offset(0)
                .build()
                .flags(link)
                .user_data(tag(i, ENV_WRITE)),
        );
        if fsync {
            entries.push(written_back(env_fd, ENV_WRITEBACK));
            fsyncs.push((i, body_fd, BODY_SYNC));
            fsyncs.push((i, env_fd, ENV_SYNC));
        } else {
            // The round's syncfs makes these durable.
            for step in [BODY_WRITEBACK, BODY_SYNC, ENV_WRITEBACK, ENV_SYNC] {
                results[i][step as usize] = Some(0);
            }
        }
    }
    submit_all(ring, &entries, &mut results)?;
    if fsync {
        let written = |i: usize| {
            let r = &results[i];
            r[BODY_WRITEBACK as usize] == Some(0) && r[ENV_WRITEBACK as usize] == Some(0)
        };
        let entries: Vec<_> = fsyncs
            .into_iter()
            .filter(|(i, _, _)| written(*i))
            .map(|(i, fd, step)| opcode::Fsync::new(fd).build().user_data(tag(i, step)))
            .collect();
        submit_all(ring, &entries, &mut results)?;
    }
    for (job, res) in jobs.iter_mut().zip(results) {
        if job.error.is_some() || job.iovecs.len() > IOV_MAX {
            continue;
        }
        let body_ok = res[BODY_WRITE as usize] == Some(job.body_len_pending() as i32)
            && res[BODY_WRITEBACK as usize] == Some(0)
            && res[BODY_SYNC as usize] == Some(0);
        let env_ok = res[ENV_WRITE as usize] == Some(job.req.envelope.len() as i32)
            && res[ENV_WRITEBACK as usize] == Some(0)
            && res[ENV_SYNC as usize] == Some(0);
        let hard_error = res
            .iter()
            .flatten()
            .find(|&&r| r < 0 && r != -libc::ECANCELED)
            .map(|&r| io::Error::from_raw_os_error(-r));
        match (body_ok && env_ok, hard_error) {
            (true, _) => job.synced = true,
            (false, Some(e)) => job.error = Some(e),
            (false, None) => {}
        }
    }
    Ok(())
}

/// Submits `entries` and waits for every one of their completions, recording each result by
/// its tag (job index, step).
fn submit_all(
    ring: &mut io_uring::IoUring,
    entries: &[io_uring::squeue::Entry],
    results: &mut [[Option<i32>; STEPS]],
) -> io::Result<()> {
    for entry in entries {
        // SAFETY: the fds, iovecs and buffers live in the jobs, which outlive this function's
        // wait for every completion below.
        while unsafe { ring.submission().push(entry) }.is_err() {
            retry_eintr(|| ring.submit())?;
        }
    }
    // Every submitted entry is waited for, even across signals (EINTR), so that no completion
    // of this round can be mistaken for one of the next, and no buffer is released while the
    // kernel may still use it.
    let mut seen = 0;
    while seen < entries.len() {
        retry_eintr(|| ring.submit_and_wait(1))?;
        for cqe in ring.completion() {
            let i = (cqe.user_data() >> STEP_BITS) as usize;
            let step = (cqe.user_data() & ((1 << STEP_BITS) - 1)) as usize;
            if let Some(r) = results.get_mut(i).and_then(|r| r.get_mut(step)) {
                *r = Some(cqe.result());
            }
            seen += 1;
        }
    }
    Ok(())
}

/// Repeats a ring call interrupted by a signal (the daemon handles SIGUSR2/SIGTERM, and any
/// thread may take the interruption).
fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Both ways of naming a nameless file give the same durable file its name, with its bytes.
    #[test]
    fn nameless_files_link_by_descriptor_and_by_proc_path() {
        let dir = tempfile::tempdir().unwrap();
        let target = File::open(dir.path()).unwrap();
        for (by, name) in [(LinkBy::Descriptor, "a"), (LinkBy::ProcPath, "b")] {
            let mut f = OpenOptions::new()
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
                .open(dir.path())
                .unwrap();
            f.write_all(name.as_bytes()).unwrap();
            let cname = std::ffi::CString::new(name).unwrap();
            match link_nameless(&f, by, &target, &cname) {
                Ok(()) => {}
                // Before Linux 6.10 only a privileged process may link by descriptor.
                Err(e) if by == LinkBy::Descriptor && e.raw_os_error() == Some(libc::ENOENT) => {
                    continue
                }
                Err(e) => panic!("{by:?}: {e}"),
            }
            let mut text = String::new();
            File::open(dir.path().join(name))
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            assert_eq!(text, name, "{by:?}");
            assert_eq!(
                link_nameless(&f, by, &target, &cname).unwrap_err().kind(),
                io::ErrorKind::AlreadyExists,
                "{by:?}"
            );
        }
    }
}
