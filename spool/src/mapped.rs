//! Which spool files this process maps or is reading (each `body::MappedBody` registers its
//! file: for as long as it maps it, or while it copies a small one), and the recycler's
//! reservation of a file it is about to reuse: the two must never meet.
//!
//! A leaf: the body reader and the layout's recycling pool both use it; it uses neither.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;

/// The files (device, inode) that live `MappedBody`s map (or are reading) in this process, with
/// how many readers each, and those being recycled right now. A file that is recycled while
/// mapped loses its pages under the reader: touching them past the new end of file kills the
/// process with SIGBUS. The recycler reserves a file that nobody maps before it opens and
/// shortens it ([`open_recycled`]); a reader registers before it checks that the file is still the
/// message's and gives up on a file being recycled, so one always sees the other. The lock is
/// held for the set operations only, never across a system call: readers take it on the async
/// threads.
static MAPPED: std::sync::Mutex<Option<Mapped>> = std::sync::Mutex::new(None);

#[derive(Default)]
struct Mapped {
    readers: std::collections::HashMap<(u64, u64), usize>,
    recycling: std::collections::HashSet<(u64, u64)>,
}

fn with_mapped<T>(f: impl FnOnce(&mut Mapped) -> T) -> T {
    let mut guard = MAPPED.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Default::default))
}

pub(crate) fn inode_of(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Opens the recycled file at `path` for `len` bytes of new content, unless a `MappedBody`
/// maps or reads it: then `None`, and the file stays in the pool for later.
///
/// The file is shortened to `len` if it is longer, never emptied: the new content overwrites
/// the old blocks in place. Truncating to zero freed every block only for the writer to
/// allocate them again (and, on a file system mounted with `discard`, sent the device a
/// discard for each); a file of the same size now costs neither, and its `fsync` has no
/// allocation to write out.
pub(crate) fn open_recycled(path: &std::path::Path, len: u64) -> io::Result<Option<File>> {
    let meta = std::fs::symlink_metadata(path)?;
    let inode = inode_of(&meta);
    let reserved = with_mapped(|m| !m.readers.contains_key(&inode) && m.recycling.insert(inode));
    if !reserved {
        return Ok(None);
    }
    let opened = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .and_then(|f| {
            if meta.len() > len {
                f.set_len(len)?;
            }
            Ok(f)
        });
    with_mapped(|m| m.recycling.remove(&inode));
    opened.map(Some)
}

/// Registers a reader of file `inode`; false if the file is being recycled right now (the
/// message is gone).
pub(crate) fn register_reader(inode: (u64, u64)) -> bool {
    with_mapped(|m| {
        if m.recycling.contains(&inode) {
            return false;
        }
        *m.readers.entry(inode).or_insert(0) += 1;
        true
    })
}

/// A reader of file `inode` is done with it.
pub(crate) fn unregister_reader(inode: (u64, u64)) {
    with_mapped(|m| {
        if let Some(n) = m.readers.get_mut(&inode) {
            *n -= 1;
            if *n == 0 {
                m.readers.remove(&inode);
            }
        }
    });
}
