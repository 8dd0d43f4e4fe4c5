//! The state directory: its folders, file names, and the rename-plus-fsync moves between folders.

use crate::id::MessageId;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A state folder of a node's state directory (listed in ARCHITECTURE.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Folder {
    /// Writes in flight; emptied at start.
    Tmp,
    /// Dropped pairs waiting for insertion.
    Input,
    /// Accepted, durable, waiting for scan or delivery.
    Spool,
    /// Being scanned.
    Vscan,
    /// Held by the filter.
    Quarantine,
    /// Failed validation; kept for an operator.
    Corrupt,
    /// Held by an operator (`spoolctl queue hold`); not delivered until released.
    Hold,
}

impl Folder {
    /// Every folder, in the order they are created.
    pub const ALL: [Folder; 7] = [
        Folder::Tmp,
        Folder::Input,
        Folder::Spool,
        Folder::Vscan,
        Folder::Quarantine,
        Folder::Corrupt,
        Folder::Hold,
    ];

    /// Where a message lives until it leaves for good: listed by `spoolctl queue list`; a
    /// replication `DELETE` removes a replica from whichever of these holds it.
    pub const LIVE: [Folder; 4] = [
        Folder::Spool,
        Folder::Vscan,
        Folder::Hold,
        Folder::Quarantine,
    ];

    /// Mirrored on the HA partner: `spool/` and `vscan/` as replicas in `spool/`, `hold/` in
    /// `hold/`. A quarantined message is not: its verdict is final and its `DELETE` removes
    /// the partner's replica.
    pub const REPLICATED: [Folder; 3] = [Folder::Spool, Folder::Vscan, Folder::Hold];

    /// Worked on by the queue manager (scan, delivery); an active unit schedules these.
    pub const SCHEDULED: [Folder; 2] = [Folder::Spool, Folder::Vscan];

    /// The folder's directory name.
    pub fn name(self) -> &'static str {
        match self {
            Folder::Tmp => "tmp",
            Folder::Input => "input",
            Folder::Spool => "spool",
            Folder::Vscan => "vscan",
            Folder::Quarantine => "quarantine",
            Folder::Corrupt => "corrupt",
            Folder::Hold => "hold",
        }
    }
}

/// Which file of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `<id>.env`, the commit record.
    Env,
    /// `<id>.body`, the raw message.
    Body,
}

impl Part {
    /// File name extension without the dot.
    pub fn ext(self) -> &'static str {
        match self {
            Part::Env => "env",
            Part::Body => "body",
        }
    }
}

/// Paths inside one state directory, and the pool of recycled files that its clones share.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
    pool: Arc<FilePool>,
}

/// Files of removed messages kept in `tmp/` for the writer to reuse instead of allocating new
/// inodes: on ext4 without a journal, allocating an inode while many were freed in the last
/// minute (six while their inode table blocks are dirty) costs a scan over them, which a gateway deleting as fast as it receives pays on every
/// file (see BENCHMARKS.md). `tmp/` is emptied at every start, so the pool needs no durability.
#[derive(Debug, Default)]
struct FilePool {
    names: Mutex<Vec<PathBuf>>,
    max: AtomicUsize,
}

/// Larger files are unlinked, not recycled: the pool should not hold much disk space.
const RECYCLE_BYTES_MAX: u64 = 256 * 1024;

impl Layout {
    /// A layout rooted at `root`; nothing is touched until [`Layout::create`]. Recycling is off
    /// until [`Layout::set_recycling`].
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout {
            root: root.into(),
            pool: Arc::default(),
        }
    }

    /// Keeps up to `max` files of removed messages for reuse (0: unlink them).
    pub fn set_recycling(&self, max: usize) {
        self.pool.max.store(max, Ordering::Relaxed);
        if max == 0 {
            let mut names = self.pool.names.lock().unwrap_or_else(|p| p.into_inner());
            for p in names.drain(..) {
                let _ = fs::remove_file(p);
            }
        }
    }

    /// Takes a recycled file (in `tmp/`) for `len` bytes of new content: opened for writing,
    /// not longer than `len` (its old bytes are overwritten in place), with its path. A file
    /// some reader still maps stays in the pool (rewriting it would pull the pages from under
    /// that reader); one that cannot be opened is dropped from it.
    pub fn take_recycled(&self, len: u64) -> Option<(File, PathBuf)> {
        // Names are taken out one at a time and the pool's lock is not held while a file is
        // opened (the remover adds to the pool meanwhile); mapped ones go back afterwards.
        let pop = || {
            self.pool
                .names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
        };
        let mut mapped = Vec::new();
        let mut taken = None;
        while let Some(path) = pop() {
            match crate::mapped::open_recycled(&path, len) {
                Ok(Some(file)) => {
                    taken = Some((file, path));
                    break;
                }
                Ok(None) => mapped.push(path),
                Err(_) => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        if !mapped.is_empty() {
            let mut names = self.pool.names.lock().unwrap_or_else(|p| p.into_inner());
            // Back at the bottom of the stack: the newest files are tried first.
            names.splice(0..0, mapped);
        }
        taken
    }

    /// Files waiting for reuse.
    pub fn recycled(&self) -> usize {
        self.pool
            .names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Removes one file of a pair from its folder; the caller fsyncs the folder. A small file is
    /// moved into `tmp/` for reuse while the pool has room, else unlinked. Missing is fine.
    pub fn discard(&self, path: &Path) -> io::Result<()> {
        let room = {
            let names = self.pool.names.lock().unwrap_or_else(|p| p.into_inner());
            names.len() < self.pool.max.load(Ordering::Relaxed)
        };
        let small = || {
            fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() <= RECYCLE_BYTES_MAX)
        };
        if room && small() {
            if let Some(name) = path.file_name() {
                let mut to = self.dir(Folder::Tmp).join("recycled.");
                to.as_mut_os_string().push(name);
                match fs::rename(path, &to) {
                    Ok(()) => {
                        self.pool
                            .names
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(to);
                        return Ok(());
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    Err(_) => {} // unlink below
                }
            }
        }
        remove_if_exists(path)
    }

    /// Creates the root and every folder (mode 0750), fsyncing the root so they survive a crash.
    pub fn create(&self) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true).mode(0o750);
        builder.create(&self.root)?;
        for folder in Folder::ALL {
            builder.create(self.dir(folder))?;
        }
        fsync_dir(&self.root)
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A folder's directory.
    pub fn dir(&self, folder: Folder) -> PathBuf {
        self.root.join(folder.name())
    }

    /// The ids whose envelope (a pair's commit record) is in `folder`, in no order; other
    /// names are skipped.
    pub fn ids(&self, folder: Folder) -> io::Result<Vec<MessageId>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.dir(folder))? {
            let name = entry?.file_name();
            let id = name
                .to_str()
                .and_then(split_file_name)
                .filter(|(_, part)| *part == Part::Env)
                .and_then(|(stem, _)| stem.parse().ok());
            out.extend(id);
        }
        Ok(out)
    }

    /// The path of one file of a pair.
    pub fn path(&self, folder: Folder, id: &MessageId, part: Part) -> PathBuf {
        self.dir(folder).join(format!("{id}.{}", part.ext()))
    }

    /// Moves a pair between folders: body first, then the envelope (the commit record), then one
    /// fsync of each directory involved. A crash in between leaves the envelope in exactly one
    /// folder; recovery removes a body whose envelope is elsewhere.
    pub fn move_pair(&self, id: &MessageId, from: Folder, to: Folder) -> io::Result<()> {
        self.move_pairs(std::slice::from_ref(id), from, to)
    }

    /// [`Layout::move_pair`] for many ids with one fsync per directory.
    pub fn move_pairs(&self, ids: &[MessageId], from: Folder, to: Folder) -> io::Result<()> {
        for id in ids {
            fs::rename(
                self.path(from, id, Part::Body),
                self.path(to, id, Part::Body),
            )?;
            fs::rename(self.path(from, id, Part::Env), self.path(to, id, Part::Env))?;
        }
        fsync_dir(&self.dir(to))?;
        fsync_dir(&self.dir(from))
    }

    /// Removes a pair durably: envelope first (so a crash leaves an orphan body, which recovery
    /// deletes, never a body-less envelope), then the body, then a directory fsync.
    pub fn remove_pair(&self, id: &MessageId, folder: Folder) -> io::Result<()> {
        self.discard_pair(id, folder)?;
        fsync_dir(&self.dir(folder))
    }

    /// Takes a pair out of `folder` (envelope first, then body; see [`Layout::discard`]) without
    /// the directory fsync, for callers that sync once for many pairs.
    pub fn discard_pair(&self, id: &MessageId, folder: Folder) -> io::Result<()> {
        self.discard(&self.path(folder, id, Part::Env))?;
        self.discard(&self.path(folder, id, Part::Body))
    }
}

/// Removes a file; a missing file is not an error.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Splits a file name `<id>.<ext>` into the id text and the part; `None` for anything else.
pub fn split_file_name(name: &str) -> Option<(&str, Part)> {
    let (stem, ext) = name.rsplit_once('.')?;
    let part = match ext {
        "env" => Part::Env,
        "body" => Part::Body,
        _ => return None,
    };
    Some((stem, part))
}

impl Layout {
    /// Reads and verifies the envelope of `id` in `folder`: `NotFound` when the message is not
    /// there, `InvalidData` when its file does not hold its envelope (torn, not an envelope,
    /// another message's).
    pub fn read_envelope(
        &self,
        folder: Folder,
        id: &MessageId,
    ) -> io::Result<crate::envelope::Envelope> {
        let path = self.path(folder, id, Part::Env);
        let read = || {
            let bytes = fs::read(&path)?;
            crate::envelope::Envelope::decode(&bytes).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("envelope {id}: {e}"))
            })
        };
        let env = read()?;
        if env.id == *id {
            return Ok(env);
        }
        // Opened just before the message was removed and its file reused for another: the name
        // is gone by now (NotFound). A name that still holds another message's envelope was put
        // there by hand (a copy gone wrong).
        let again = read()?;
        if again.id == *id {
            return Ok(again);
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("envelope {id}: the file holds the envelope of {}", again.id),
        ))
    }

    /// Replaces the envelope of a message in `folder` durably: write to `tmp/`, fsync, rename
    /// over the old one, fsync the folder. A crash leaves either the old or the new envelope.
    pub fn rewrite_envelope(
        &self,
        folder: Folder,
        env: &crate::envelope::Envelope,
    ) -> io::Result<()> {
        use std::io::Write;
        let tmp = self.path(Folder::Tmp, &env.id, Part::Env);
        let mut f = File::create(&tmp)?;
        f.write_all(&env.encode())?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(folder, &env.id, Part::Env))?;
        fsync_dir(&self.dir(folder))
    }
}
