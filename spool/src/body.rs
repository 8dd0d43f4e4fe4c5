//! Message bodies on their way in (held as received buffers, spilled to `tmp/` past a threshold)
//! and on their way out (memory-mapped, checksum-verified).

use crate::id::MessageId;
use crate::layout::{Folder, Layout, Part};
use crate::mapped;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// Default size past which a body in progress is written to `tmp/` instead of held in memory.
pub const SPILL_BYTES_DEFAULT: usize = 128 * 1024;

/// A body whose prefix has already been written (not yet fsynced) to `tmp/<id>.body`.
#[derive(Debug)]
pub struct SpilledBody {
    /// The open file, positioned at its end.
    pub file: File,
    /// Its path in `tmp/`.
    pub path: PathBuf,
    /// Bytes already written.
    pub written: u64,
}

/// A complete body handed to the writer: an optional spilled prefix plus the received buffers
/// that follow it. The buffers reach the kernel as iovecs, without a copy in user space.
#[derive(Debug, Default)]
pub struct BodyParts {
    /// Prefix already in `tmp/`, if the body grew past the spill threshold.
    pub spilled: Option<SpilledBody>,
    /// The rest, in order.
    pub chunks: Vec<Bytes>,
}

/// Accumulates a body as it arrives, hashing it and bounding its memory.
pub struct PendingBody {
    layout: Layout,
    id: MessageId,
    spill_bytes: usize,
    hasher: Sha256,
    len: u64,
    held: usize,
    parts: BodyParts,
}

impl PendingBody {
    /// A new, empty body for message `id`; memory use stays under about `spill_bytes`.
    pub fn new(layout: Layout, id: MessageId, spill_bytes: usize) -> Self {
        PendingBody {
            layout,
            id,
            spill_bytes,
            hasher: Sha256::new(),
            len: 0,
            held: 0,
            parts: BodyParts::default(),
        }
    }

    /// The message id this body belongs to.
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before the first byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a chunk. Past the spill threshold the held chunks are written to `tmp/` (a
    /// page-cache write, no fsync): this may block briefly on the file system.
    pub fn push(&mut self, chunk: Bytes) -> io::Result<()> {
        self.hasher.update(&chunk);
        self.len += chunk.len() as u64;
        self.held += chunk.len();
        self.parts.chunks.push(chunk);
        if self.held >= self.spill_bytes {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        if self.parts.spilled.is_none() {
            let path = self.layout.path(Folder::Tmp, &self.id, Part::Body);
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&path)?;
            self.parts.spilled = Some(SpilledBody {
                file,
                path,
                written: 0,
            });
        }
        if let Some(spilled) = self.parts.spilled.as_mut() {
            for chunk in self.parts.chunks.drain(..) {
                spilled.file.write_all(&chunk)?;
                spilled.written += chunk.len() as u64;
            }
        }
        self.held = 0;
        Ok(())
    }

    /// Replaces the body's first `head_len` bytes with `edit` of them (a milter's header
    /// changes), keeping the rest; length and SHA-256 follow. A body held in memory is
    /// rebuilt there; a spilled one is written again to a new file in `tmp/` (its head, then
    /// the rest copied in the kernel) and hashed again: the one second pass, for messages past
    /// the spill size that a milter changed.
    pub fn replace_head(
        &mut self,
        head_len: u64,
        edit: impl FnOnce(&[u8]) -> Vec<u8>,
    ) -> io::Result<()> {
        let head_len = head_len.min(self.len);
        if self.parts.spilled.is_none() {
            let mut all = Vec::with_capacity(self.len as usize);
            for c in self.parts.chunks.drain(..) {
                all.extend_from_slice(&c);
            }
            let mut new = edit(&all[..head_len as usize]);
            new.extend_from_slice(&all[head_len as usize..]);
            self.hasher = Sha256::new();
            self.hasher.update(&new);
            self.len = new.len() as u64;
            self.held = new.len();
            self.parts.chunks = vec![Bytes::from(new)];
            return Ok(());
        }
        self.spill()?;
        let Some(old) = self.parts.spilled.take() else {
            return Ok(());
        };
        let mut old_file = File::open(&old.path)?;
        let mut head = vec![0u8; head_len as usize];
        io::Read::read_exact(&mut old_file, &mut head)?;
        let new_head = edit(&head);
        let path = old.path.with_extension("body.new");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&path)?;
        file.write_all(&new_head)?;
        // From the old file's position (just past its head): copy_file_range underneath.
        io::copy(&mut old_file, &mut file)?;
        let written = file.metadata()?.len();
        let mut hasher = Sha256::new();
        let mut reader = File::open(&path)?;
        io::copy(&mut reader, &mut hasher)?;
        std::fs::rename(&path, &old.path)?;
        self.hasher = hasher;
        self.len = written;
        self.parts.spilled = Some(SpilledBody {
            file,
            path: old.path,
            written,
        });
        Ok(())
    }

    /// Ends the body: its parts, length and SHA-256.
    pub fn finish(self) -> (BodyParts, u64, [u8; 32]) {
        (self.parts, self.len, self.hasher.finalize().into())
    }

    /// Drops the body, removing any spilled prefix from `tmp/`.
    pub fn discard(self) {
        if let Some(spilled) = self.parts.spilled {
            let _ = std::fs::remove_file(spilled.path);
        }
    }
}

/// Why a stored body cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// Reading or mapping failed.
    #[error("read body: {0}")]
    Io(#[from] io::Error),
    /// Length differs from the envelope's.
    #[error("body is {actual} bytes, envelope says {expected}")]
    Length {
        /// From the envelope.
        expected: u64,
        /// On disk.
        actual: u64,
    },
    /// Checksum differs from the envelope's.
    #[error("body checksum does not match the envelope")]
    Checksum,
}

/// A stored body: read into memory when small, memory-mapped when large. An empty body is an
/// empty slice.
///
/// A small body is copied while its file is registered as read (`crate::mapped`) and the
/// registration ends with the copy: mapping a few KiB costs more than reading them (the
/// mapping's page faults, and its `munmap` flushes the TLB of every CPU running the process).
/// A large one stays mapped, and its file registered, while the value lives: the recycling of
/// removed messages' files (which shortens a file and writes new mail over its bytes) passes
/// it by. A file is otherwise never changed in place after its commit round, only renamed or
/// removed, which leaves a mapping valid.
pub struct MappedBody {
    bytes: Stored,
    /// The mapped file's (device, inode), registered in `crate::mapped` while mapped.
    inode: Option<(u64, u64)>,
}

enum Stored {
    Empty,
    Read(Vec<u8>),
    Mapped(memmap2::Mmap),
}

/// Bodies up to this size are read into memory rather than mapped.
pub const READ_BYTES_MAX: u64 = 64 * 1024;

impl MappedBody {
    /// Reads or maps `path` and checks it against the envelope's length and SHA-256.
    pub fn open_verified(
        path: &std::path::Path,
        len: u64,
        sha256: &[u8; 32],
    ) -> Result<Self, BodyError> {
        let body = Self::open(path, len)?;
        if Sha256::digest(body.bytes()).as_slice() != sha256 {
            return Err(BodyError::Checksum);
        }
        Ok(body)
    }

    /// Reads or maps `path` and checks its length only, for a reader that hashes the bytes itself
    /// (the archive): hashing twice would cost a second pass over every message.
    pub fn open(path: &std::path::Path, len: u64) -> Result<Self, BodyError> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let inode = mapped::inode_of(&meta);
        // Registered before the file is checked: a recycler at work now means the message is
        // gone; one that comes later sees the registration and passes the file by; and one
        // that took the file before could only take it after the remover moved it away from
        // `path` (files are pooled only after that move), which the look at `path` below sees.
        let gone = || {
            BodyError::Io(io::Error::new(
                io::ErrorKind::NotFound,
                "the message was removed (its file is being reused)",
            ))
        };
        if !mapped::register_reader(inode) {
            return Err(gone());
        }
        let mut body = MappedBody {
            bytes: Stored::Empty,
            inode: Some(inode),
        };
        // The look at `path` also gives the length, read after the registration.
        let actual = match std::fs::symlink_metadata(path) {
            Ok(m) if mapped::inode_of(&m) == inode => m.len(),
            _ => return Err(gone()),
        };
        if actual != len {
            return Err(BodyError::Length {
                expected: len,
                actual,
            });
        }
        if actual == 0 {
            return Ok(body);
        }
        if actual <= READ_BYTES_MAX {
            let mut bytes = Vec::with_capacity(actual as usize);
            (&file).take(actual).read_to_end(&mut bytes)?;
            if bytes.len() as u64 != actual {
                return Err(BodyError::Length {
                    expected: len,
                    actual: bytes.len() as u64,
                });
            }
            // The copy is ours: the file may be recycled from now on.
            mapped::unregister_reader(inode);
            body.inode = None;
            body.bytes = Stored::Read(bytes);
            return Ok(body);
        }
        // SAFETY: spool files are never modified in place after their commit round (they are
        // only renamed or removed, which leaves the mapping valid), and the one exception,
        // recycling, passes by a file registered as mapped, as this one now is.
        body.bytes = Stored::Mapped(unsafe { memmap2::Mmap::map(&file)? });
        Ok(body)
    }

    /// The body's bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Stored::Empty => &[],
            Stored::Read(v) => v,
            Stored::Mapped(m) => m,
        }
    }
}

impl Drop for MappedBody {
    fn drop(&mut self) {
        if let Some(inode) = self.inode {
            mapped::unregister_reader(inode);
        }
    }
}

impl AsRef<[u8]> for MappedBody {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

/// SHA-256 of `bytes`, as stored in an envelope's `body-sha256`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
